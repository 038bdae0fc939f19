//! SeaORM persistence adapters of the shop (PostgreSQL and SQLite).

pub mod entity;
