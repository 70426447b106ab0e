//! The one call-with-token step around [`TokenCache`]: send with the cached token; when the
//! provider says the token is no longer valid (FCM/OAuth2 401, WeChat 40001…, as the connector
//! decides), invalidate exactly that token, fetch a fresh one (one fetch for every request that
//! saw it) and resend once. A second rejection is the connector's `token-invalid` error: the
//! credential itself is wrong, and refreshing again would only hammer the token endpoint.

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
