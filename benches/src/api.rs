//! Calls of the shop's API that the benchmark, the read benchmark and the smoke run make.

use std::time::Duration;

use serde_json::{Value, json};

/// The HTTP client of a run: up to `idle` pooled connections, each request bounded by `timeout`. Idle connections
/// are dropped after 4 s, before the server's keep-alive (5 s by default) closes them: otherwise a request can
/// take a connection at the instant the server closes it and fail with "error sending request".
pub fn client(idle: usize, timeout: Duration) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(idle)
        .pool_idle_timeout(Duration::from_secs(4))
        .timeout(timeout)
        .build()
        .map_err(|e| e.to_string())
}

/// Sends `request` and reads its JSON body.
pub async fn json_of(request: reqwest::RequestBuilder) -> Result<Value, String> {
    request.send().await.map_err(|e| e.to_string())?.json().await.map_err(|e| e.to_string())
}

/// An admin creates a product of one option with `stock` units: the product as the API answers it.
pub async fn create_product(
    client: &reqwest::Client,
    base: &str,
    admin_token: &str,
    name: &str,
    stock: i64,
) -> Result<Value, String> {
    let body = json!({"name": name, "options": [{"name": "one size", "price": 1000, "stock": stock}]});
    json_of(client.post(format!("{base}/api/v1/admin/products")).bearer_auth(admin_token).json(&body)).await
}

/// The stock of `product`'s first option, as the public API shows it.
pub async fn option_stock(client: &reqwest::Client, base: &str, product: i64) -> Result<i64, String> {
    let detail = json_of(client.get(format!("{base}/api/v1/products/{product}"))).await?;
    detail["options"][0]["stock"].as_i64().ok_or_else(|| format!("no stock: {detail}"))
}

/// Buyer `i` signs up and signs in (and, to pay, charges 10,000 won): its id and access token.
pub async fn sign_up(client: &reqwest::Client, base: &str, i: usize, pay: bool) -> Result<(i64, String), String> {
    let (name, password) = (format!("buyer-{i}"), format!("password of buyer {i}"));
    let credentials = json!({"name": name, "password": password});
    let user = json_of(client.post(format!("{base}/api/v1/users")).json(&credentials)).await?;
    let id = user["id"].as_i64().ok_or_else(|| format!("no user id: {user}"))?;
    let session = json_of(client.post(format!("{base}/api/v1/auth/token")).json(&credentials)).await?;
    let token = session["accessToken"].as_str().ok_or_else(|| format!("no access token: {session}"))?.to_owned();
    if pay {
        client
            .post(format!("{base}/api/v1/users/{id}/balance/charge"))
            .bearer_auth(&token)
            .json(&json!({"amount": 10_000}))
            .send()
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok((id, token))
}
