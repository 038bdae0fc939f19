//! What authentication adds to every user-scoped request: checking its access token (an HS256 JWT: parse,
//! HMAC, claims), and, once per sign-in, issuing one.
//!
//! `cargo bench -p shop-bench --bench tokens`

#![allow(clippy::unwrap_used, clippy::expect_used, missing_debug_implementations)]

use std::time::Duration;

use chrono::Utc;
use criterion::{Criterion, criterion_group, criterion_main};
use shop_auth::{AuthSecret, JwtTokens};
use shop_domain::ids::UserId;
use shop_domain::ports::Tokens;

fn tokens(c: &mut Criterion) {
    let tokens = JwtTokens::new(&AuthSecret::generate(), Duration::from_secs(900));
    let user = UserId::new(42).unwrap();
    let token = tokens.access_token(user, Utc::now()).unwrap().token;
    c.bench_function("access token/verify", |b| b.iter(|| tokens.verify_access(&token, Utc::now()).unwrap()));
    c.bench_function("access token/issue", |b| b.iter(|| tokens.access_token(user, Utc::now()).unwrap()));
}

criterion_group!(benches, tokens);
criterion_main!(benches);
