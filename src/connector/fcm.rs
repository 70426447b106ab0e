//! The Firebase Cloud Messaging HTTP v1 connector (agent `fcm.agent`): the message's content is
//! the FCM v1 request body (`{"message":{…}}`, optionally `"validate_only"`) as Apostol produces
//! it; the message's `address` supplies `message.token` when the body names no target.
//!
//! Auth is the OAuth2 service-account JWT grant (RS256 assertion, scope `firebase.messaging`)
//! against the key's `token_uri`; access tokens live in the shared [`TokenCache`], one per service
//! account across profiles, refreshed every 55 minutes and when FCM answers 401 without an
//! `FcmError` (then the request is retried once at once; a second 401 is `token-invalid`).
//!
//! Invariants: the content is checked before any network call (one target, string data values),
//! so a malformed message fails with `bad-content` without fetching a token; errors are classified
//! from `error.details[].errorCode` first, then `error.status`, then the HTTP status; `healthcheck`
//! only re-reads and parses the key; the private key and the last access tokens are scrubbed
//! from every error text; requests (token and send) never follow a redirect to another origin
//! (`redirect-denied`). Facts: shared/providers.md §2.7.

use crate::connector::codes;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::provider::token::call_with_token;
use super::provider::{
    classify_status, kebab, parse_retry_after, read_response, retryable_status, truncate,
};
use super::redact::{self, Redactor};
use super::token::{self, TokenCache};
use super::{Connector, DeliveryError, OutboxMessage, Receipt};
use crate::settings::{ConfigError, Dur, ProfileContext, Secret, SecretSource};

mod auth;
use auth::{load_key, JwtGrant};

const DEFAULT_ENDPOINT: &str = "https://fcm.googleapis.com";
const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// Enough for any FCM or token endpoint answer; a larger body is cut, not buffered whole.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// The fields of `message` that name a recipient; FCM wants exactly one.
const TARGETS: [&str; 3] = ["token", "topic", "condition"];

/// An `fcm` profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcmConfig {
    /// The service-account key (the JSON file Firebase hands out), inline…
    pub service_account: Option<Secret>,
    /// …or the name of an environment variable holding that JSON…
    pub service_account_env: Option<String>,
    /// …or the path of that JSON file. One of the three is required.
    pub service_account_file: Option<PathBuf>,
    /// Firebase project id. Default: the key's `project_id`.
    pub project_id: Option<String>,
    /// Base URL of FCM; requests go to `<endpoint>/v1/projects/<project_id>/messages:send`.
    /// Default `https://fcm.googleapis.com`.
    pub endpoint: Option<String>,
    /// OAuth2 token endpoint. Default: the key's `token_uri`, else
    /// `https://oauth2.googleapis.com/token`.
    pub token_uri: Option<String>,
    /// Request timeout for FCM and the token endpoint (common key). Default 30s.
    pub timeout: Option<Dur>,
}

impl FcmConfig {
    fn key_source(&self) -> SecretSource {
        SecretSource::of(
            &self.service_account,
            &self.service_account_env,
            &self.service_account_file,
        )
    }

    /// The config key errors about the service account point at.
    fn key_name(&self) -> &'static str {
        if self.service_account.is_some() {
            "service_account"
        } else if self.service_account_env.is_some() {
            "service_account_env"
        } else {
            "service_account_file"
        }
    }
}

pub struct FcmConnector {
    name: String,
    client: reqwest::Client,
    send_url: String,
    cfg: FcmConfig,
    tokens: Arc<TokenCache>,
    redactor: Redactor,
}

impl FcmConnector {
    pub fn new(ctx: &ProfileContext, cfg: &FcmConfig) -> Result<Self, ConfigError> {
        let profile = ctx.profile.as_str();
        let err = |key: &str, msg: String| ctx.error(key, msg);
        let (key, signing) = load_key(cfg).map_err(|m| err(cfg.key_name(), m))?;
        let project_id = cfg
            .project_id
            .clone()
            .or_else(|| key.project_id.clone())
            .filter(|p| !p.trim().is_empty())
            .ok_or_else(|| {
                err(
                    "project_id",
                    "not set, and the service-account key has no project_id".into(),
                )
            })?;
        // Project ids are lower-case letters, digits and hyphens; anything else would change the
        // request path.
        if !project_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == ':' || c == '.')
        {
            return Err(err(
                "project_id",
                format!("invalid project id \"{project_id}\""),
            ));
        }
        let endpoint = cfg.endpoint.as_deref().unwrap_or(DEFAULT_ENDPOINT);
        url::Url::parse(endpoint).map_err(|e| err("endpoint", format!("invalid URL: {e}")))?;
        let token_uri = cfg
            .token_uri
            .clone()
            .or_else(|| key.token_uri.clone())
            .unwrap_or_else(|| DEFAULT_TOKEN_URI.into());
        url::Url::parse(&token_uri).map_err(|e| err("token_uri", format!("invalid URL: {e}")))?;
        let timeout = cfg.timeout.map_or(Duration::from_secs(30), |d| d.0);
        // The bearer token and the signed assertion never follow a redirect to another origin.
        let client = crate::connector::provider::http_client_builder(timeout)
            .redirect(redact::same_origin_redirects())
            .build()
            .map_err(|e| err("endpoint", format!("cannot build the HTTP client: {e}")))?;
        let mut redactor = Redactor::new();
        redactor.add(key.private_key.expose());
        // A PEM's base64 lines, in case a text quotes part of the key.
        for line in key.private_key.expose().lines() {
            if line.len() >= 16 && !line.starts_with("-----") {
                redactor.add(line.trim());
            }
        }
        for u in [endpoint, token_uri.as_str()] {
            if let Ok(u) = url::Url::parse(u) {
                redactor.add_url(&u, false);
            }
        }
        // One cache per service-account key: the whole key (hashed) is part of the name, so a
        // rotated key loaded by a reload never uses tokens cached for the old one.
        let cache_key = token::credential_key(
            "fcm",
            &[
                &key.client_email,
                key.private_key_id.as_deref().unwrap_or(""),
                &token_uri,
                key.private_key.expose(),
            ],
        );
        let source = JwtGrant {
            client: client.clone(),
            key,
            signing,
            token_uri,
        };
        let tokens = token::shared(&cache_key, || TokenCache::new(source));
        Ok(FcmConnector {
            name: format!("fcm/{profile}"),
            client,
            send_url: format!(
                "{}/v1/projects/{project_id}/messages:send",
                endpoint.trim_end_matches('/')
            ),
            cfg: cfg.clone(),
            tokens,
            redactor,
        })
    }

    async fn post(
        &self,
        token: &Secret,
        body: &[u8],
    ) -> Result<(StatusCode, HeaderMap, String), DeliveryError> {
        let resp = self
            .client
            .post(&self.send_url)
            .bearer_auth(token.expose())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| redact::send_error(&e))?;
        read_response(resp, MAX_RESPONSE_BYTES).await
    }
}

fn bad_content(reason: impl Into<String>) -> DeliveryError {
    DeliveryError::permanent(codes::BAD_CONTENT.code, reason)
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// FCM's `data` maps take string values only (a number is a 400 `TYPE_STRING`).
fn check_string_map(map: Option<&Value>, path: &str) -> Result<(), DeliveryError> {
    let Some(v) = map else { return Ok(()) };
    let obj = v
        .as_object()
        .ok_or_else(|| bad_content(format!("{path} must be an object of strings")))?;
    for (k, v) in obj {
        if !v.is_string() {
            return Err(bad_content(format!(
                "{path}.{k} is {}; FCM data values must be strings",
                json_kind(v)
            )));
        }
    }
    Ok(())
}

/// Checks the content as FCM would and fills the target from `address`; returns the body to send.
fn prepare_body(content: &str, address: Option<&str>) -> Result<Value, DeliveryError> {
    let mut body: Value = serde_json::from_str(content)
        .map_err(|e| bad_content(format!("content is not valid JSON: {e}")))?;
    let top = body
        .as_object_mut()
        .ok_or_else(|| bad_content("content must be a JSON object {\"message\": {…}}"))?;
    if let Some(k) = top
        .keys()
        .find(|k| k.as_str() != "message" && k.as_str() != "validate_only")
    {
        return Err(bad_content(format!(
            "unknown field \"{k}\" (an FCM v1 request has message and validate_only)"
        )));
    }
    if top.get("validate_only").is_some_and(|v| !v.is_boolean()) {
        return Err(bad_content("validate_only must be true or false"));
    }
    let message: &mut Map<String, Value> = top
        .get_mut("message")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| bad_content("content has no \"message\" object"))?;
    message.retain(|k, v| !(TARGETS.contains(&k.as_str()) && v.is_null()));
    let named: Vec<&str> = TARGETS
        .into_iter()
        .filter(|t| message.contains_key(*t))
        .collect();
    match named.as_slice() {
        [] => {
            let token = address
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .ok_or_else(|| {
                    DeliveryError::permanent(
                    codes::BAD_ADDRESS.code,
                    "the message names no target (token, topic or condition) and has no address",
                )
                })?;
            message.insert("token".into(), Value::String(token.into()));
        }
        [one] => {
            if !message[*one].as_str().is_some_and(|s| !s.trim().is_empty()) {
                return Err(bad_content(format!(
                    "message.{one} must be a non-empty string"
                )));
            }
        }
        many => {
            return Err(bad_content(format!(
                "exactly one target is allowed, the message names {}",
                many.join(", ")
            )))
        }
    }
    check_string_map(message.get("data"), "message.data")?;
    check_string_map(
        message.get("android").and_then(|a| a.get("data")),
        "message.android.data",
    )?;
    Ok(body)
}

/// `error.details[].errorCode` (the `FcmError`), else `error.status`, with `error.message`.
fn error_name(text: &str) -> Option<(Option<String>, Option<String>, String)> {
    let v: Value = serde_json::from_str(text).ok()?;
    let e = v.get("error")?.as_object()?;
    let code = e
        .get("details")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find_map(|d| d.get("errorCode")?.as_str())
        .map(str::to_string);
    let status = e.get("status").and_then(Value::as_str).map(str::to_string);
    let message = e
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    Some((code, status, message))
}

/// FCM rejected our OAuth token (401 without an `FcmError`, which would be a credential problem
/// of the Firebase project instead, e.g. `THIRD_PARTY_AUTH_ERROR`).
fn is_stale_token(status: StatusCode, text: &str) -> bool {
    status == StatusCode::UNAUTHORIZED && error_name(text).and_then(|(code, ..)| code).is_none()
}

/// Classifies an FCM error answer (providers.md §2.7 and table 3.3).
fn classify(status: StatusCode, headers: &HeaderMap, text: &str) -> DeliveryError {
    let Some((code, rpc_status, message)) = error_name(text) else {
        return classify_status(status, text, headers);
    };
    let Some(name) = code.or(rpc_status).filter(|n| !n.is_empty()) else {
        return classify_status(status, text, headers);
    };
    let retry = match name.as_str() {
        "UNREGISTERED"
        | "INVALID_ARGUMENT"
        | "SENDER_ID_MISMATCH"
        | "THIRD_PARTY_AUTH_ERROR"
        | "APNS_AUTH_ERROR"
        | "NOT_FOUND"
        | "PERMISSION_DENIED"
        | "UNAUTHENTICATED"
        | "FAILED_PRECONDITION" => false,
        "QUOTA_EXCEEDED" | "RESOURCE_EXHAUSTED" | "UNAVAILABLE" | "INTERNAL"
        | "DEADLINE_EXCEEDED" | "ABORTED" => true,
        _ => retryable_status(status),
    };
    let code = codes::family(codes::FCM_ERROR, &kebab(&name));
    let reason = format!(
        "HTTP {} {name}: {}",
        status.as_u16(),
        truncate(if message.is_empty() { text } else { &message }, 256)
    );
    if retry {
        DeliveryError::retry(code, reason)
            .with_retry_after(parse_retry_after(headers))
            .with_status(status.as_u16())
    } else {
        DeliveryError::permanent(code, reason).with_status(status.as_u16())
    }
}

#[async_trait]
impl Connector for FcmConnector {
    fn name(&self) -> &str {
        &self.name
    }

    async fn deliver(&self, msg: &OutboxMessage) -> Result<Receipt, DeliveryError> {
        let r = self.redactor.result(self.deliver_inner(msg).await);
        self.tokens.redact(r)
    }

    async fn healthcheck(&self) -> Result<(), DeliveryError> {
        load_key(&self.cfg)
            .map(|_| ())
            .map_err(|m| DeliveryError::permanent(codes::BAD_CREDENTIALS.code, m))
    }
}

impl FcmConnector {
    async fn deliver_inner(&self, msg: &OutboxMessage) -> Result<Receipt, DeliveryError> {
        let body = prepare_body(msg.content_required()?, msg.address.as_deref())?;
        let body = serde_json::to_vec(&body).expect("a JSON value serializes");
        let rejected = |(status, _, text): &(StatusCode, HeaderMap, String)| {
            is_stale_token(*status, text).then(|| {
                DeliveryError::retry(
                    codes::TOKEN_INVALID.code,
                    format!(
                        "FCM rejected a freshly fetched access token: {}",
                        truncate(text, 256)
                    ),
                )
                .with_status(status.as_u16())
            })
        };
        let (status, headers, text) = call_with_token(&self.tokens, &self.name, rejected, |t| {
            let body = &body;
            async move { self.post(&t, body).await }
        })
        .await?;
        if !status.is_success() {
            return Err(classify(status, &headers, &text));
        }
        let name = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("name")?.as_str().map(str::to_string));
        Ok(Receipt {
            provider_id: name,
            remote_status: Some(status.as_u16() as i32),
            reply: None,
        })
    }
}

#[cfg(test)]
mod tests;
