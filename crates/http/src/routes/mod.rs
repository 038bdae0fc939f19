//! Handlers and their DTOs, one module per resource.

pub mod admin;
pub mod auth;
pub mod cart;
pub mod events;
pub mod health;
pub mod orders;
pub mod products;
pub mod users;
