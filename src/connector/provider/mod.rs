//! The provider toolkit: plumbing every provider connector shares (vector keeps the same in
//! `sinks/util/`), so that a connector file holds only its config, its request builder and its
//! error table.
//!
//! - [`status`]: the one HTTP status / transport classifier (408, 429 and 5xx except 501 retry,
//!   honouring `Retry-After` from the headers or, through a hook, the body; other statuses are
//!   permanent) and `Retry-After` parsing;
//! - [`body`]: "200 with an error body" (`errcode`, `ok:false`, `Code`, `errorCode`), classified by
//!   the connector's own [`body::ErrorTable`];
//! - [`token`]: the one call-with-token step around [`TokenCache`](super::token::TokenCache):
//!   invalidate → refresh → resend once on the provider's token-invalid signal;
//! - [`sign`]: HMAC helpers;
//! - [`multipart`]: a one-file `multipart/form-data` body (media uploads);
//! - [`media`]: pictures (rendered cards) through chat providers — choosing the picture, the
//!   size/type limits checked before any network call, the upload call, media ids kept for
//!   retries;
//! - [`content`]: chat contents (a JSON object of the platform's fields, or plain text) and the
//!   field checks body builders make before sending;
//! - here: the HTTP client builder, bounded reads and small text helpers.
//!
//! Invariants: nothing here knows a provider; a read never holds more than the caller's limit; no
//! helper formats a URL or a credential into an error (transport errors lose their URL).

pub mod body;
pub mod content;
pub mod media;
pub mod multipart;
pub mod sign;
pub mod status;
pub mod token;

use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::StatusCode;

use super::DeliveryError;
pub use status::{classify_status, classify_transport, parse_retry_after, retryable_status};

/// The HTTP client settings every HTTP-based connector starts from: a total timeout, a connect
/// timeout of at most 10 s, and outboxd's user agent. Connectors add their own (resolver, redirects)
/// before `build()`.
pub fn http_client_builder(timeout: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .user_agent(concat!("outboxd/", env!("CARGO_PKG_VERSION")))
}

/// A response's status, headers and body as text (at most `max` bytes read; invalid UTF-8
/// replaced), transport errors classified. NULs are left to the recorder, which makes every
/// connector's texts storable.
pub async fn read_response(
    resp: reqwest::Response,
    max: usize,
) -> Result<(StatusCode, HeaderMap, String), DeliveryError> {
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = read_limited(resp, max)
        .await
        .map_err(|e| classify_transport(&e))?;
    Ok((
        status,
        headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    ))
}

/// Reads at most `max` bytes of a body, dropping the rest (a huge body cannot exhaust memory).
pub async fn read_limited(
    mut resp: reqwest::Response,
    max: usize,
) -> Result<Vec<u8>, reqwest::Error> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        let room = max.saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() >= max {
            break;
        }
    }
    Ok(out)
}

/// At most `max` bytes of `s`, cut at a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A JSON scalar as text: a string without its quotes, anything else as JSON (`42`, `true`).
pub fn json_scalar(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A provider's error name as a kebab-case fragment of a stable code (`UNREGISTERED` →
/// `unregistered`, `Bad Thing` → `bad-thing`, `QUOTA_EXCEEDED` → `quota-exceeded`): ASCII letters
/// and digits lower-cased, anything else a dash, no dash at either end; `unknown` when nothing is
/// left.
pub fn kebab(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let s = s.trim_matches('-');
    if s.is_empty() {
        "unknown".into()
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kebab_makes_code_fragments() {
        assert_eq!(kebab("1"), "1");
        assert_eq!(kebab("Bad Thing"), "bad-thing");
        assert_eq!(kebab("QUOTA_EXCEEDED"), "quota-exceeded");
        assert_eq!(kebab("INCORRECT_PASSWORD"), "incorrect-password");
        assert_eq!(kebab("--"), "unknown");
    }

    #[test]
    fn truncate_cuts_at_a_char_boundary() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 8), "abc");
    }

    #[test]
    fn json_scalars_lose_their_quotes_only() {
        assert_eq!(json_scalar(&serde_json::json!("x")), "x");
        assert_eq!(json_scalar(&serde_json::json!(42)), "42");
    }
}
