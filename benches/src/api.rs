//! Calls of the shop's API that both the benchmark and the smoke run make.

use serde_json::{Value, json};

/// Buyer `i` signs up and signs in (and, to pay, charges 10,000 won): its id and access token.
pub async fn sign_up(client: &reqwest::Client, base: &str, i: usize, pay: bool) -> Result<(i64, String), String> {
    let (name, password) = (format!("buyer-{i}"), format!("password of buyer {i}"));
    let credentials = json!({"name": name, "password": password});
    let user: Value = client
        .post(format!("{base}/api/v1/users"))
        .json(&credentials)
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    let id = user["id"].as_i64().ok_or_else(|| format!("no user id: {user}"))?;
    let session: Value = client
        .post(format!("{base}/api/v1/auth/token"))
        .json(&credentials)
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
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
