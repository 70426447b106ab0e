//! The one HTTP status and transport classifier (house style, RFC 9110 §15): 2xx is a success;
//! 408, 429 and 5xx except 501 are worth retrying, honouring `Retry-After` (§10.2.3: seconds or an
//! HTTP-date) or a provider's body hint; 501 (the server does not support the request: it will
//! not next time either) and every other 4xx are permanent. Network errors retry and lose their
//! URL ([`classify_transport`]).

use std::time::Duration;

use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::StatusCode;

use super::truncate;
use crate::connector::{codes, DeliveryError};

pub use crate::connector::redact::transport_error as classify_transport;

/// Whether a non-success HTTP status is worth retrying: 408, 429 and 5xx except 501.
pub fn retryable_status(s: StatusCode) -> bool {
    s == StatusCode::REQUEST_TIMEOUT
        || s == StatusCode::TOO_MANY_REQUESTS
        || (s.is_server_error() && s != StatusCode::NOT_IMPLEMENTED)
}

/// Parses `Retry-After`: delay-seconds or an HTTP-date (RFC 9110 §10.2.3).
pub fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let delta = when.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(delta.to_std().unwrap_or(Duration::ZERO))
}

/// A retry hint in a JSON body: whole seconds at the JSON `pointer` (Telegram:
/// `/parameters/retry_after`). `None` when the body is not JSON or has no number there.
pub fn retry_after_in_body(body: &str, pointer: &str) -> Option<Duration> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v.pointer(pointer)?.as_u64().map(Duration::from_secs)
}

/// The house classification of an HTTP status that is not a success: code `http-<status>`, the
/// reason with at most 256 bytes of the body, `Retry-After` from the headers.
pub fn classify_status(status: StatusCode, body: &str, headers: &HeaderMap) -> DeliveryError {
    classify_status_with(status, body, headers, None)
}

/// A provider's hook that finds a retry delay in an error body (see [`retry_after_in_body`]).
pub type BodyRetryAfter = dyn Fn(&str) -> Option<Duration> + Sync;

/// [`classify_status`] with the provider's body hint for the retry delay, used when the headers
/// carry none.
pub fn classify_status_with(
    status: StatusCode,
    body: &str,
    headers: &HeaderMap,
    body_retry_after: Option<&BodyRetryAfter>,
) -> DeliveryError {
    let code = codes::family(codes::HTTP_STATUS, &status.as_u16().to_string());
    let reason = format!("HTTP {}: {}", status.as_u16(), truncate(body, 256));
    if retryable_status(status) {
        let after = parse_retry_after(headers).or_else(|| body_retry_after.and_then(|f| f(body)));
        let e = DeliveryError::retry(code, reason)
            .with_retry_after(after)
            .with_status(status.as_u16());
        // 429 is the platform's "too fast" (RFC 6585 §4): the rate limiter holds the profile back.
        if status == StatusCode::TOO_MANY_REQUESTS {
            e.marked_too_fast()
        } else {
            e
        }
    } else {
        DeliveryError::permanent(code, reason).with_status(status.as_u16())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn statuses_are_classified_as_the_house_style_says() {
        let h = HeaderMap::new();
        for (s, retry) in [
            (408, true),
            (429, true),
            (500, true),
            (502, true),
            (503, true),
            (504, true),
            (501, false),
            (400, false),
            (401, false),
            (404, false),
            (422, false),
        ] {
            let st = StatusCode::from_u16(s).unwrap();
            assert_eq!(retryable_status(st), retry, "status {s}");
            let e = classify_status(st, "x", &h);
            assert_eq!(e.is_retry(), retry, "status {s}");
            assert_eq!(e.code(), format!("http-{s}"));
            assert_eq!(e.remote_status(), Some(s as i32));
        }
    }

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(parse_retry_after(&h), Some(Duration::from_secs(7)));
        let later = (chrono::Utc::now() + chrono::Duration::seconds(120)).to_rfc2822();
        h.insert(RETRY_AFTER, HeaderValue::from_str(&later).unwrap());
        let d = parse_retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(parse_retry_after(&h), None);
    }

    #[test]
    fn a_body_hint_is_used_when_the_headers_have_none() {
        let body = r#"{"ok":false,"error_code":429,"parameters":{"retry_after":13}}"#;
        let hook = |b: &str| retry_after_in_body(b, "/parameters/retry_after");
        let e = classify_status_with(
            StatusCode::TOO_MANY_REQUESTS,
            body,
            &HeaderMap::new(),
            Some(&hook),
        );
        assert_eq!(
            e,
            DeliveryError::retry("http-429", format!("HTTP 429: {body}"))
                .with_retry_after(Some(Duration::from_secs(13)))
                .with_status(429u16)
                .marked_too_fast()
        );
        assert!(e.is_too_fast(), "429 is the platform's too fast");
        assert!(
            !classify_status(StatusCode::SERVICE_UNAVAILABLE, "", &HeaderMap::new()).is_too_fast()
        );
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("2"));
        let e = classify_status_with(StatusCode::TOO_MANY_REQUESTS, body, &h, Some(&hook));
        assert!(
            matches!(e, DeliveryError::Retry { retry_after: Some(d), .. } if d == Duration::from_secs(2))
        );
        assert_eq!(retry_after_in_body("not json", "/x"), None);
    }
}
