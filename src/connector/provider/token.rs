//! The one call-with-token step around [`TokenCache`]: send with the cached token; when the
//! provider says the token is no longer valid (FCM/OAuth2 401, WeChat 40001…, as the connector
//! decides), invalidate exactly that token, fetch a fresh one (one fetch for every request that
//! saw it) and resend once. A second rejection is the connector's `token-invalid` error: the
//! credential itself is wrong, and refreshing again would only hammer the token endpoint.
//! Also [`token_from_json`]: the `{access_token, expires_in}` / `errcode` answer of the Chinese
//! platforms' token endpoints.

use std::future::Future;

use crate::connector::token::TokenCache;
use crate::connector::DeliveryError;
use crate::settings::Secret;

/// Calls `send` with the cache's token; if `rejected` finds the answer says the token is invalid,
/// refreshes once and resends. `rejected` returns the error to report if the fresh token is
/// rejected too (the connector's `token-invalid`, with its status and text).
pub async fn call_with_token<T, F, Fut>(
    cache: &TokenCache,
    connector: &str,
    rejected: impl Fn(&T) -> Option<DeliveryError>,
    mut send: F,
) -> Result<T, DeliveryError>
where
    F: FnMut(Secret) -> Fut,
    Fut: Future<Output = Result<T, DeliveryError>>,
{
    let token = cache.get().await?;
    let answer = send(token.clone()).await?;
    if rejected(&answer).is_none() {
        return Ok(answer);
    }
    // RFC 6750 §3.1: the token expired or was revoked.
    tracing::debug!(%connector, "the provider rejected the access token; fetching a new one and sending again");
    drop(answer);
    cache.invalidate(&token).await;
    let fresh = cache.get().await?;
    let answer = send(fresh).await?;
    match rejected(&answer) {
        None => Ok(answer),
        Some(e) => Err(e),
    }
}

/// A token endpoint's answer in the shape WeChat, WeCom and DingTalk share: HTTP 200 with
/// `{"access_token": "…", "expires_in": 7200}`, or an error body that `table` classifies
/// (`errcode` ≠ 0). A retryable status, a [`Class::Retry`](super::body::Class) code or an answer
/// without a token is `token-fetch` (retry: the endpoint is busy or broken); any other refusal is
/// `token-denied` (permanent: the credential is wrong, an operator must act). `expires_in`
/// defaults to `default_life` when absent.
pub fn token_from_json(
    status: reqwest::StatusCode,
    headers: &reqwest::header::HeaderMap,
    body: &str,
    table: &super::body::ErrorTable,
    default_life: std::time::Duration,
) -> Result<crate::connector::token::Token, DeliveryError> {
    use crate::connector::codes::{TOKEN_DENIED, TOKEN_FETCH};
    let text = super::truncate(body, 256);
    if !status.is_success() {
        let reason = format!("token endpoint: HTTP {}: {text}", status.as_u16());
        return Err(if super::retryable_status(status) {
            DeliveryError::retry(TOKEN_FETCH.code, reason)
                .with_retry_after(super::parse_retry_after(headers))
        } else {
            DeliveryError::permanent(TOKEN_DENIED.code, reason)
        }
        .with_status(status.as_u16()));
    }
    let v: serde_json::Value = serde_json::from_str(body).map_err(|_| {
        DeliveryError::retry(
            TOKEN_FETCH.code,
            format!("token endpoint: not JSON: {text}"),
        )
    })?;
    if let Some(e) = table.find(&v) {
        let reason = format!(
            "token endpoint: {} {}",
            e.code,
            super::truncate(&e.message, 256)
        );
        return Err(match e.class {
            super::body::Class::Retry => DeliveryError::retry(TOKEN_FETCH.code, reason),
            _ => DeliveryError::permanent(TOKEN_DENIED.code, reason),
        });
    }
    let token = v
        .get("access_token")
        .and_then(serde_json::Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            DeliveryError::retry(
                TOKEN_FETCH.code,
                "token endpoint: the answer has no access_token",
            )
        })?;
    let life = v
        .get("expires_in")
        .and_then(serde_json::Value::as_u64)
        .map_or(default_life, std::time::Duration::from_secs);
    Ok(crate::connector::token::Token {
        value: Secret::new(token),
        expires_in: life,
    })
}
