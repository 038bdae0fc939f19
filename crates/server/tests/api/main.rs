#![allow(clippy::unwrap_used, clippy::expect_used)]
//! API tests: the real application on a random port, over a fresh SQLite file and a fresh PostgreSQL database
//! per test, driven through real HTTP. One binary, so it links once.

mod admin;
mod auth;
mod cart;
mod catalogue;
mod combining;
mod faults;
mod fencing;
mod helpers;
mod idempotency;
mod lanes;
mod operations;
mod orders;
mod outbox;
mod products;
mod proxy;
mod redis_locks;
mod redis_optimistic;
mod shutdown;
mod users;
