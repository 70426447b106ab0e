//! The `slack` connector (`api.agent`/`slack.agent`): Slack's Web API `chat.postMessage` with a
//! bot token, or an incoming webhook. Facts: shared/providers.md §2.6.
//!
//! The content is a JSON object of `chat.postMessage` fields (`text`, `blocks`, `attachments`,
//! `thread_ts`, `mrkdwn`, `unfurl_links`, `username`, `icon_emoji`…), or plain text, which becomes
//! `text`; one of `text`, `blocks`, `attachments` is required. With a token the address is the
//! `channel` (an id such as `C123ABC456`, or a name); a webhook posts to the channel it was made
//! for and ignores the address. Invariants: the token and the whole webhook URL are credentials,
//! scrubbed from every text a delivery produces, and never follow a redirect to another origin;
//! `invalid_auth`/`token_revoked` fail (a bot token cannot be refreshed); a message Slack accepted
//! (`ok:true`, its `ts` stored as the provider id) is never retried.
//!
//! Classification: the Web API answers HTTP 200 with `{"ok":false,"error":"…"}` (read with the
//! toolkit's [`ErrorTable`], codes `slack-<error>`); webhooks answer an HTTP status and a
//! plain-text error (`404 channel_not_found`, `410 channel_is_archived`, `500 rollup_error`),
//! classified by the status. HTTP 429, or the error `ratelimited`, is "too fast": retried after
//! `Retry-After` (else [`DEFAULT_BLOCK`]).
//!
//! Picture cards are not sent as pictures: providers.md §2.6 gives `chat.postMessage` and
//! incoming webhooks, neither of which uploads a file, so a card message's picture is ignored and
//! its content delivered as usual.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::codes;
use super::provider::body::{Class, ErrorTable, Field};
use super::provider::content::{
    bad_content, check_string, check_type, object_or_text, set_recipient,
};
use super::provider::{
    classify_status, http_client_builder, kebab, parse_retry_after, read_response,
    retryable_status, truncate,
};
use super::redact::{self, Redactor};
use super::{Connector, DeliveryError, OutboxMessage, Receipt};
use crate::settings::{ConfigError, Dur, ProfileContext, Secret, SecretSource};

/// Slack's Web API.
pub const DEFAULT_API_URL: &str = "https://slack.com/api";
/// The wait after a "too fast" answer that names none: chat.postMessage allows about one message
/// per second per channel.
pub const DEFAULT_BLOCK: Duration = Duration::from_secs(1);
/// Enough for any Slack answer; a larger body is cut, not buffered whole.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// `chat.postMessage` errors (providers.md §2.6); any other error is permanent.
const API_ERRORS: ErrorTable = ErrorTable {
    prefix: "slack",
    field: Field::OkFlag {
        ok: "/ok",
        code: "/error",
    },
    message: &["/error"],
    codes: &[
        ("ratelimited", Class::Retry),
        ("internal_error", Class::Retry),
        // "May have partly succeeded" (providers.md): still a retry, as Slack advises.
        ("fatal_error", Class::Retry),
        // Documented by Slack for every Web API method, transient by nature.
        ("service_unavailable", Class::Retry),
        ("request_timeout", Class::Retry),
        // A bot token has no refresh: these fail, they are not `token-invalid`.
        ("invalid_auth", Class::Permanent),
        ("token_revoked", Class::Permanent),
        ("not_authed", Class::Permanent),
        ("account_inactive", Class::Permanent),
        ("channel_not_found", Class::Permanent),
        ("not_in_channel", Class::Permanent),
        ("is_archived", Class::Permanent),
    ],
    default: Class::Permanent,
};

/// A `slack` profile: exactly one of a bot token (`chat.postMessage`) and a webhook URL.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackConfig {
    /// Bot token (`xoxb-…`) for `chat.postMessage`: inline…
    pub token: Option<Secret>,
    /// …or from this environment variable…
    pub token_env: Option<String>,
    /// …or from this file.
    pub token_file: Option<PathBuf>,
    /// Incoming webhook URL (`https://hooks.slack.com/services/T…/B…/…`), a credential as a whole:
    /// inline…
    pub webhook_url: Option<Secret>,
    /// …or from this environment variable…
    pub webhook_url_env: Option<String>,
    /// …or from this file.
    pub webhook_url_file: Option<PathBuf>,
    /// Base URL of the Web API; requests go to `<api_url>/chat.postMessage`. Default
    /// `https://slack.com/api`.
    pub api_url: Option<String>,
    /// Request timeout (common key). Default 30s.
    pub timeout: Option<Dur>,
}

/// Where a profile posts.
enum Target {
    Api { url: String, token: Secret },
    Webhook { url: Secret },
}

pub struct SlackConnector {
    name: String,
    client: reqwest::Client,
    target: Target,
    redactor: Redactor,
}

impl SlackConnector {
    pub fn new(ctx: &ProfileContext, cfg: &SlackConfig) -> Result<Self, ConfigError> {
        let token = SecretSource::of(&cfg.token, &cfg.token_env, &cfg.token_file)
            .resolve("token")
            .map_err(|m| ctx.error("token", m))?;
        let hook = SecretSource::of(
            &cfg.webhook_url,
            &cfg.webhook_url_env,
            &cfg.webhook_url_file,
        )
        .resolve("webhook_url")
        .map_err(|m| ctx.error("webhook_url", m))?;
        let mut redactor = Redactor::new();
        let target = match (token, hook) {
            (Some(token), None) => {
                let t = token.expose();
                if t.trim().is_empty() || t.chars().any(|c| c.is_control() || c == ' ') {
                    return Err(ctx.error("token", "must be a bot token such as xoxb-…"));
                }
                redactor.add(t);
                let base = cfg.api_url.as_deref().unwrap_or(DEFAULT_API_URL);
                let u = url::Url::parse(base)
                    .map_err(|e| ctx.error("api_url", format!("invalid URL: {e}")))?;
                redactor.add_url(&u, false);
                Target::Api {
                    url: format!("{}/chat.postMessage", base.trim_end_matches('/')),
                    token,
                }
            }
            (None, Some(url)) => {
                if cfg.api_url.is_some() {
                    return Err(ctx.error("api_url", "a webhook profile does not use the Web API"));
                }
                // No parse error text: it would quote the URL.
                let u = url::Url::parse(url.expose())
                    .ok()
                    .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
                    .ok_or_else(|| ctx.error("webhook_url", "not an http(s) URL"))?;
                redactor.add(url.expose()).add_url(&u, true);
                Target::Webhook { url }
            }
            (Some(_), Some(_)) => return Err(ctx.error(
                "webhook_url",
                "set either token (chat.postMessage) or webhook_url (incoming webhook), not both",
            )),
            (None, None) => {
                return Err(ctx.error(
                    "token",
                    "set token (chat.postMessage) or webhook_url (incoming webhook)",
                ))
            }
        };
        let timeout = cfg.timeout.map_or(Duration::from_secs(30), |d| d.0);
        // The token and the webhook path never follow a redirect to another origin.
        let client = http_client_builder(timeout)
            .redirect(redact::same_origin_redirects())
            .build()
            .map_err(|e| ctx.error("timeout", format!("cannot build the HTTP client: {e}")))?;
        Ok(SlackConnector {
            name: format!("slack/{}", ctx.profile),
            client,
            target,
            redactor,
        })
    }

    async fn post(
        &self,
        url: &str,
        token: Option<&Secret>,
        body: &Map<String, Value>,
    ) -> Result<(StatusCode, HeaderMap, String), DeliveryError> {
        let mut req = self
            .client
            .post(url)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/json; charset=utf-8",
            )
            .body(serde_json::to_vec(body).expect("a JSON object serializes"));
        if let Some(t) = token {
            req = req.bearer_auth(t.expose());
        }
        let resp = req.send().await.map_err(|e| redact::send_error(&e))?;
        read_response(resp, MAX_RESPONSE_BYTES).await
    }

    async fn deliver_inner(&self, msg: &OutboxMessage) -> Result<Receipt, DeliveryError> {
        let mut body = payload(msg.content_required()?)?;
        match &self.target {
            Target::Api { url, token } => {
                let channel = msg.address_required()?.trim();
                set_recipient(&mut body, "channel", Value::String(channel.into()))?;
                let (status, headers, text) = self.post(url, Some(token), &body).await?;
                api_answer(status, &headers, &text)
            }
            Target::Webhook { url } => {
                let (status, headers, text) = self.post(url.expose(), None, &body).await?;
                webhook_answer(status, &headers, &text)
            }
        }
    }
}

/// The message fields of a content, checked as Slack would (`no_text`, `invalid_blocks`…).
fn payload(content: &str) -> Result<Map<String, Value>, DeliveryError> {
    let body = object_or_text(content, "text")?;
    check_string(&body, "text", false)?;
    check_type(&body, "blocks", Value::is_array, "an array of blocks")?;
    check_type(
        &body,
        "attachments",
        Value::is_array,
        "an array of attachments",
    )?;
    check_string(&body, "thread_ts", false)?;
    let has = |k: &str| match body.get(k) {
        Some(Value::Array(a)) => !a.is_empty(),
        Some(v) => !v.is_null(),
        None => false,
    };
    if !["text", "blocks", "attachments"].into_iter().any(has) {
        return Err(bad_content(
            "a Slack message needs text, blocks or attachments",
        ));
    }
    Ok(body)
}

/// The "too fast" error: retried after `Retry-After`, else [`DEFAULT_BLOCK`].
fn too_fast(headers: &HeaderMap, status: StatusCode, reason: String) -> DeliveryError {
    let block = parse_retry_after(headers).unwrap_or(DEFAULT_BLOCK);
    DeliveryError::too_fast(API_ERRORS.stable_code("ratelimited"), reason, block)
        .with_status(status.as_u16())
}

/// A `chat.postMessage` answer: `ok:true` is done with `ts` as the provider id.
fn api_answer(
    status: StatusCode,
    headers: &HeaderMap,
    text: &str,
) -> Result<Receipt, DeliveryError> {
    let v = serde_json::from_str::<Value>(text).ok();
    let failure = v.as_ref().and_then(|v| API_ERRORS.find(v));
    if status == StatusCode::TOO_MANY_REQUESTS
        || failure.as_ref().is_some_and(|f| f.code == "ratelimited")
    {
        return Err(too_fast(
            headers,
            status,
            format!("HTTP {}: ratelimited", status.as_u16()),
        ));
    }
    if let Some(f) = failure {
        return Err(API_ERRORS.error(&f).with_status(status.as_u16()));
    }
    if !status.is_success() {
        return Err(classify_status(status, text, headers));
    }
    Ok(Receipt {
        provider_id: v
            .as_ref()
            .and_then(|v| v.get("ts")?.as_str())
            .map(str::to_string),
        remote_status: Some(status.as_u16().into()),
        reply: None,
    })
}

/// An incoming webhook's answer: 2xx (body `ok`) is done; an error is its status and a
/// plain-text code (`channel_not_found`, `invalid_payload`…), classified by the status.
fn webhook_answer(
    status: StatusCode,
    headers: &HeaderMap,
    text: &str,
) -> Result<Receipt, DeliveryError> {
    if status.is_success() {
        return Ok(Receipt {
            provider_id: None,
            remote_status: Some(status.as_u16().into()),
            reply: None,
        });
    }
    let name = text.trim();
    if status == StatusCode::TOO_MANY_REQUESTS {
        return Err(too_fast(
            headers,
            status,
            format!("HTTP 429: {}", truncate(name, 256)),
        ));
    }
    let is_code = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !is_code {
        // Not Slack's answer (a proxy's page…): the house classification of the status.
        return Err(classify_status(status, text, headers));
    }
    let code = codes::family(codes::SLACK_ERROR, &kebab(name));
    let reason = format!("HTTP {}: {name}", status.as_u16());
    Err(if retryable_status(status) {
        DeliveryError::retry(code, reason).with_retry_after(parse_retry_after(headers))
    } else {
        DeliveryError::permanent(code, reason)
    }
    .with_status(status.as_u16()))
}

#[async_trait]
impl Connector for SlackConnector {
    fn name(&self) -> &str {
        &self.name
    }

    async fn deliver(&self, msg: &OutboxMessage) -> Result<Receipt, DeliveryError> {
        self.redactor.result(self.deliver_inner(msg).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderValue, RETRY_AFTER};
    use serde_json::json;

    fn ok() -> StatusCode {
        StatusCode::OK
    }

    #[test]
    fn plain_text_and_json_contents_become_messages() {
        assert_eq!(
            Value::Object(payload("disk full").unwrap()),
            json!({"text": "disk full"})
        );
        let b = payload(r#"{"blocks":[{"type":"section"}],"thread_ts":"1.2"}"#).unwrap();
        assert_eq!(b["thread_ts"], "1.2");
        for bad in [
            r#"{"thread_ts":"1.2"}"#,
            r#"{"blocks":{}}"#,
            r#"{"text":5}"#,
            r#"{"blocks":[]}"#,
        ] {
            assert_eq!(payload(bad).unwrap_err().code(), "bad-content", "{bad}");
        }
    }

    #[test]
    fn api_errors_are_read_from_the_body() {
        let h = HeaderMap::new();
        let r = api_answer(
            ok(),
            &h,
            r#"{"ok":true,"channel":"C1","ts":"1503435956.000247"}"#,
        );
        assert_eq!(r.unwrap().provider_id.as_deref(), Some("1503435956.000247"));
        for (error, code, retry) in [
            ("channel_not_found", "slack-channel-not-found", false),
            ("not_in_channel", "slack-not-in-channel", false),
            ("is_archived", "slack-is-archived", false),
            ("invalid_auth", "slack-invalid-auth", false),
            ("token_revoked", "slack-token-revoked", false),
            ("internal_error", "slack-internal-error", true),
            ("something_new", "slack-something-new", false),
        ] {
            let e =
                api_answer(ok(), &h, &format!(r#"{{"ok":false,"error":"{error}"}}"#)).unwrap_err();
            assert_eq!((e.code(), e.is_retry()), (code, retry), "{error}");
        }
    }

    #[test]
    fn ratelimits_wait_for_retry_after() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("30"));
        let e = api_answer(
            StatusCode::TOO_MANY_REQUESTS,
            &h,
            r#"{"ok":false,"error":"ratelimited"}"#,
        )
        .unwrap_err();
        assert!(
            matches!(&e, DeliveryError::Retry { code, retry_after: Some(d), .. }
            if code == "slack-ratelimited" && *d == Duration::from_secs(30))
        );
        let e = api_answer(
            ok(),
            &HeaderMap::new(),
            r#"{"ok":false,"error":"ratelimited"}"#,
        )
        .unwrap_err();
        assert!(
            matches!(e, DeliveryError::Retry { retry_after: Some(d), .. } if d == DEFAULT_BLOCK)
        );
        let e = webhook_answer(StatusCode::TOO_MANY_REQUESTS, &h, "rate_limited").unwrap_err();
        assert_eq!(e.code(), "slack-ratelimited");
    }

    #[test]
    fn webhook_errors_are_plain_text() {
        let h = HeaderMap::new();
        assert!(webhook_answer(ok(), &h, "ok").is_ok());
        for (status, body, code, retry) in [
            (404, "channel_not_found", "slack-channel-not-found", false),
            (404, "no_service", "slack-no-service", false),
            (
                410,
                "channel_is_archived",
                "slack-channel-is-archived",
                false,
            ),
            (400, "invalid_payload", "slack-invalid-payload", false),
            (403, "action_prohibited", "slack-action-prohibited", false),
            (500, "rollup_error", "slack-rollup-error", true),
            (502, "<html>bad gateway</html>", "http-502", true),
        ] {
            let e = webhook_answer(StatusCode::from_u16(status).unwrap(), &h, body).unwrap_err();
            assert_eq!((e.code(), e.is_retry()), (code, retry), "{status} {body}");
            assert_eq!(e.remote_status(), Some(status as i32));
        }
    }

    #[test]
    fn a_profile_is_a_token_or_a_webhook() {
        let ctx = ProfileContext::new("slack.conf", "ops");
        let parse = |t: &str| -> SlackConfig { toml::from_str(t).unwrap() };
        let e = SlackConnector::new(&ctx, &parse("")).err().unwrap();
        assert_eq!(e.key.as_deref(), Some("ops.token"));
        let both =
            parse("token = \"xoxb-1\"\nwebhook_url = \"https://hooks.slack.com/services/T/B/x\"");
        let e = SlackConnector::new(&ctx, &both).err().unwrap();
        assert_eq!(e.key.as_deref(), Some("ops.webhook_url"));
        let e = SlackConnector::new(&ctx, &parse("webhook_url = \"not a url S3CRET\""))
            .err()
            .unwrap();
        assert!(!e.to_string().contains("S3CRET"), "{e}");
        assert!(SlackConnector::new(&ctx, &parse("token = \"xoxb-1-2\"")).is_ok());
    }
}
