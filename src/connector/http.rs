//! The generic `http` connector (Apostol's "API" connector): `api.agent` messages whose agent has
//! no dedicated connector land here. The profile gives the base URL, method, headers and
//! credentials; the message gives the path (`address`), the body (`content`) and, optionally, the
//! method (`subject`, when it is an HTTP method name).
//!
//! Classification (house style, RFC 9110): 2xx done; 408, 429 and 5xx except 501 retry, honouring
//! `Retry-After` (seconds or HTTP-date); network errors and timeouts retry; every other status is
//! permanent. The message code goes out as `Idempotency-Key`, so a retried request can be
//! de-duplicated by the receiver.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use serde::Deserialize;

use super::{Connector, DeliveryError, OutboxMessage, Receipt};
use crate::config::{ConfigError, Dur, Secret, SecretSource};

/// An `http` profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Base URL; the message's `address` is appended to it (Apostol: `uri + address`).
    pub url: String,
    /// Default method. Default `POST`.
    #[serde(default = "default_method")]
    pub method: String,
    /// `Content-Type` of the body. Default `application/json`.
    #[serde(default = "default_content_type")]
    pub content_type: String,
    /// Extra headers sent with every request.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Scheme of the `Authorization` header when a token is set. Default `Bearer`.
    #[serde(default = "default_auth_scheme")]
    pub auth_scheme: String,
    /// Token for `Authorization: <auth_scheme> <token>`: inline…
    pub token: Option<Secret>,
    /// …or from this environment variable…
    pub token_env: Option<String>,
    /// …or from this file.
    pub token_file: Option<std::path::PathBuf>,
    /// Check that the body is JSON before sending (default: when `content_type` is JSON).
    pub validate_json: Option<bool>,
    /// Name of the idempotency header, empty to send none. Default `Idempotency-Key`.
    #[serde(default = "default_idempotency_header")]
    pub idempotency_header: String,
    /// Store the response body as an inbox reply. Default true.
    #[serde(default = "default_true")]
    pub store_reply: bool,
    /// Bytes of the response body kept (reply and error text). Default 65536.
    #[serde(default = "default_max_response")]
    pub max_response_bytes: usize,
    /// Request timeout (common key). Default 30s.
    pub timeout: Option<Dur>,
}

fn default_method() -> String {
    "POST".into()
}
fn default_content_type() -> String {
    "application/json".into()
}
fn default_auth_scheme() -> String {
    "Bearer".into()
}
fn default_idempotency_header() -> String {
    "Idempotency-Key".into()
}
fn default_true() -> bool {
    true
}
fn default_max_response() -> usize {
    65536
}

pub struct HttpConnector {
    name: String,
    client: reqwest::Client,
    base: String,
    method: Method,
    headers: HeaderMap,
    idempotency_header: Option<HeaderName>,
    validate_json: bool,
    store_reply: bool,
    max_response_bytes: usize,
}

impl HttpConnector {
    pub fn new(profile: &str, cfg: &HttpConfig) -> Result<Self, ConfigError> {
        let err = |key: &str, msg: String| {
            ConfigError::new("http.conf", Some(format!("{profile}.{key}")), msg)
        };
        url::Url::parse(&cfg.url).map_err(|e| err("url", format!("invalid URL: {e}")))?;
        let method = Method::from_bytes(cfg.method.to_uppercase().as_bytes())
            .map_err(|_| err("method", format!("invalid method \"{}\"", cfg.method)))?;
        let mut headers = HeaderMap::new();
        for (k, v) in &cfg.headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| err("headers", format!("invalid header name \"{k}\"")))?;
            let value = HeaderValue::from_str(v)
                .map_err(|_| err("headers", format!("invalid value for header \"{k}\"")))?;
            headers.insert(name, value);
        }
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_str(&cfg.content_type)
                .map_err(|_| err("content_type", "invalid content type".into()))?,
        );
        let token = SecretSource {
            value: cfg.token.clone(),
            env: cfg.token_env.clone(),
            file: cfg.token_file.clone(),
        }
        .resolve("token")
        .map_err(|m| err("token", m))?;
        if let Some(t) = token {
            let mut v = HeaderValue::from_str(&format!("{} {}", cfg.auth_scheme, t.expose()))
                .map_err(|_| err("token", "token is not a valid header value".into()))?;
            v.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, v);
        }
        let idempotency_header = if cfg.idempotency_header.is_empty() {
            None
        } else {
            Some(
                HeaderName::from_bytes(cfg.idempotency_header.as_bytes())
                    .map_err(|_| err("idempotency_header", "invalid header name".into()))?,
            )
        };
        let timeout = cfg.timeout.map_or(Duration::from_secs(30), |d| d.0);
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("outboxd/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| err("url", format!("cannot build the HTTP client: {e}")))?;
        Ok(HttpConnector {
            name: format!("http/{profile}"),
            client,
            base: cfg.url.trim_end_matches('/').to_string(),
            method,
            headers,
            idempotency_header,
            validate_json: cfg
                .validate_json
                .unwrap_or_else(|| cfg.content_type.to_ascii_lowercase().contains("json")),
            store_reply: cfg.store_reply,
            max_response_bytes: cfg.max_response_bytes,
        })
    }

    fn url_for(&self, msg: &OutboxMessage) -> String {
        match msg.address.as_deref().map(str::trim) {
            None | Some("") => self.base.clone(),
            Some(path) if path.starts_with('/') => format!("{}{path}", self.base),
            Some(path) => format!("{}/{path}", self.base),
        }
    }

    fn method_for(&self, msg: &OutboxMessage) -> Method {
        match msg.subject.as_deref() {
            Some(s @ ("GET" | "POST" | "PUT" | "PATCH" | "DELETE")) => {
                Method::from_bytes(s.as_bytes()).expect("known method")
            }
            _ => self.method.clone(),
        }
    }
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

/// The house classification of an HTTP status that is not a success.
pub fn classify_status(status: StatusCode, body: &str, headers: &HeaderMap) -> DeliveryError {
    let code = format!("http-{}", status.as_u16());
    let reason = format!("HTTP {}: {}", status.as_u16(), truncate(body, 256));
    let retryable = status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || (status.is_server_error() && status != StatusCode::NOT_IMPLEMENTED);
    if retryable {
        DeliveryError::retry(code, reason)
            .with_retry_after(parse_retry_after(headers))
            .with_status(status.as_u16() as i32)
    } else {
        DeliveryError::permanent(code, reason).with_status(status.as_u16() as i32)
    }
}

/// A transport failure (no status): always retryable.
pub fn classify_transport(e: &reqwest::Error) -> DeliveryError {
    let code = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else {
        "network"
    };
    // reqwest's Display omits the cause; the chain says what happened.
    let mut reason = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        reason.push_str(": ");
        reason.push_str(&s.to_string());
        src = s.source();
    }
    DeliveryError::retry(code, reason)
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

#[async_trait]
impl Connector for HttpConnector {
    fn name(&self) -> &str {
        &self.name
    }

    async fn deliver(&self, msg: &OutboxMessage) -> Result<Receipt, DeliveryError> {
        let body = msg.content.clone().unwrap_or_default();
        if self.validate_json {
            if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(&body) {
                return Err(DeliveryError::permanent(
                    "bad-content",
                    format!("content is not valid JSON: {e}"),
                ));
            }
        }
        let mut req = self
            .client
            .request(self.method_for(msg), self.url_for(msg))
            .headers(self.headers.clone())
            .body(body);
        if let Some(h) = &self.idempotency_header {
            // draft-ietf-httpapi-idempotency-key-header: the value is a Structured-Field string.
            req = req.header(h, format!("\"{}\"", msg.code));
        }
        let resp = req.send().await.map_err(|e| classify_transport(&e))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = read_limited(resp, self.max_response_bytes)
            .await
            .map_err(|e| classify_transport(&e))?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if !status.is_success() {
            return Err(classify_status(status, &text, &headers));
        }
        let provider_id = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| {
                ["id", "message_id", "messageId", "name"]
                    .iter()
                    .find_map(|k| v.get(k).map(json_scalar))
            });
        Ok(Receipt {
            provider_id,
            remote_status: Some(status.as_u16() as i32),
            reply: (self.store_reply && !text.is_empty()).then_some(text),
        })
    }
}

fn json_scalar(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified_as_the_house_style_says() {
        let h = HeaderMap::new();
        for (s, retry) in [
            (408, true),
            (429, true),
            (500, true),
            (503, true),
            (501, false),
            (400, false),
            (404, false),
            (422, false),
        ] {
            let e = classify_status(StatusCode::from_u16(s).unwrap(), "x", &h);
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
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
