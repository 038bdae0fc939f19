//! The sign-in adapters of the shop: how passwords are hashed, how access tokens are signed and checked, how
//! refresh tokens are made and digested, and the in-process throttle of failed sign-ins.
//!
//! It implements the domain's [`shop_domain::ports::PasswordHasher`], [`shop_domain::ports::Tokens`] and
//! [`shop_domain::ports::SignInThrottle`] with well-kept crates (argon2, jsonwebtoken, governor) and depends on
//! no store, no HTTP and no Redis (the throttle shared across instances is in `shop-redis`).
//!
//! - [`password`]: [`Argon2Hasher`], Argon2id with configurable parameters, off the async workers.
//! - [`tokens`]: [`JwtTokens`], HS256 access tokens checked against the domain's clock; refresh tokens.
//! - [`throttle`]: [`GovernorThrottle`], failed sign-ins per key on the domain's clock.

pub mod password;
pub mod throttle;
pub mod tokens;

pub use password::{Argon2Hasher, HashParams};
pub use throttle::GovernorThrottle;
pub use tokens::{AuthSecret, JwtTokens};
