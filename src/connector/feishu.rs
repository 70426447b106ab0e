//! The `feishu` connector (`api.agent`/`feishu.agent`): a Feishu / Lark custom bot webhook
//! (`POST <base_url>/open-apis/bot/v2/hook/<hook_token>`), optionally signed. Facts:
//! shared/providers.md §2.12 and the signing table §3.1.
//!
//! The content is plain text (a `text` message) or a JSON object with `msg_type` and its fields:
//! `text` (`content.text`), `post` (`content.post`), `interactive` (`card`), `image`
//! (`content.image_key`), `share_chat` (`content.share_chat_id`). The bot posts to the chat it
//! belongs to; the address is not used. With a signing secret every request carries `timestamp`
//! (seconds) and `sign` in the JSON body — see [`sign`]: unlike DingTalk, `timestamp\nsecret` is the
//! HMAC **key** and the message is empty.
//!
//! Invariants: the hook token (the whole webhook path) and the secret are credentials, scrubbed
//! from every text and never sent to another origin. Feishu answers errors in the body
//! (`{"code":19021,"msg":"…"}`, older bots `StatusCode`), read with the toolkit's [`ErrorTable`]:
//! `11232` (flow control) is "too fast", retried after [`FLOW_CONTROL_BLOCK`]; `2200` retries; the
//! other codes fail as `feishu-<code>`.
//!
//! Picture cards are not sent as pictures: the bot's `msg_type: image` takes an `image_key`,
//! which only the app API's image upload hands out (a webhook bot has no upload; providers.md
//! §2.12), so a card message's picture is ignored and its content delivered as usual.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::provider::body::{Class, ErrorTable, Field};
use super::provider::content::{bad_content, check_string, check_type, object_or_text};
use super::provider::sign::hmac_sha256_base64;
use super::provider::{classify_status, http_client_builder, read_response};
use super::redact::{self, Redactor};
use super::{Connector, DeliveryError, OutboxMessage, Receipt};
use crate::settings::{ConfigError, Dur, ProfileContext, Secret, SecretSource};

/// Feishu's open platform (Lark: `https://open.larksuite.com`).
pub const DEFAULT_BASE_URL: &str = "https://open.feishu.cn";
/// How long a bot is held back after `11232` (flow control). Feishu names no time; its limits
/// are 100 requests a minute and 5 a second per bot, so after a minute both windows are clear.
pub const FLOW_CONTROL_BLOCK: Duration = Duration::from_secs(60);
/// Enough for any Feishu answer; a larger body is cut, not buffered whole.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// The message types a custom bot sends.
const MSG_TYPES: [&str; 5] = ["text", "post", "image", "share_chat", "interactive"];

const CODES: &[(&str, Class)] = &[
    ("11232", Class::Retry),
    ("2200", Class::Retry),
    // Signature or timestamp: a configuration (or clock) problem an operator must fix.
    ("19021", Class::Permanent),
    ("9499", Class::Permanent),
];

/// Errors in today's answers (`code`, `msg`).
const ERRORS: ErrorTable = ErrorTable {
    prefix: "feishu",
    field: Field::Code {
        pointer: "/code",
        success: &["0"],
    },
    message: &["/msg"],
    codes: CODES,
    default: Class::Permanent,
};

/// Errors in older bots' answers (`StatusCode`, `StatusMessage`).
const LEGACY_ERRORS: ErrorTable = ErrorTable {
    field: Field::Code {
        pointer: "/StatusCode",
        success: &["0"],
    },
    message: &["/StatusMessage"],
    ..ERRORS
};

/// A `feishu` profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeishuConfig {
    /// The bot's hook token, the last segment of its webhook URL (a credential): inline…
    pub hook_token: Option<Secret>,
    /// …or from this environment variable…
    pub hook_token_env: Option<String>,
    /// …or from this file. One of the three is required.
    pub hook_token_file: Option<PathBuf>,
    /// The signing secret ("signature verification" in the bot's security settings), when the
    /// bot has one: inline…
    pub secret: Option<Secret>,
    /// …or from this environment variable…
    pub secret_env: Option<String>,
    /// …or from this file.
    pub secret_file: Option<PathBuf>,
    /// Base URL; requests go to `<base_url>/open-apis/bot/v2/hook/<hook_token>`. Default
    /// `https://open.feishu.cn` (Lark: `https://open.larksuite.com`).
    pub base_url: Option<String>,
    /// Request timeout (common key). Default 30s.
    pub timeout: Option<Dur>,
}

pub struct FeishuConnector {
    name: String,
    client: reqwest::Client,
    /// The webhook URL: it carries the hook token.
    url: Secret,
    secret: Option<Secret>,
    redactor: Redactor,
}

/// The `sign` of a request at `timestamp` (Unix seconds): base64 of HMAC-SHA256 whose key is
/// `timestamp + "\n" + secret` and whose message is empty (providers.md §2.12).
pub fn sign(timestamp: i64, secret: &str) -> String {
    hmac_sha256_base64(format!("{timestamp}\n{secret}").as_bytes(), &[])
}

impl FeishuConnector {
    pub fn new(ctx: &ProfileContext, cfg: &FeishuConfig) -> Result<Self, ConfigError> {
        let hook = SecretSource::of(&cfg.hook_token, &cfg.hook_token_env, &cfg.hook_token_file)
            .resolve("hook_token")
            .map_err(|m| ctx.error("hook_token", m))?
            .ok_or_else(|| {
                ctx.error(
                    "hook_token",
                    "required (the last segment of the bot's webhook URL)",
                )
            })?;
        let token = hook.expose().trim();
        // It becomes a path segment: nothing that would change the path or the query.
        if token.is_empty()
            || !token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(ctx.error(
                "hook_token",
                "must be the token only (letters, digits, - and _), not the whole URL",
            ));
        }
        let secret = SecretSource::of(&cfg.secret, &cfg.secret_env, &cfg.secret_file)
            .resolve("secret")
            .map_err(|m| ctx.error("secret", m))?;
        let base = cfg.base_url.as_deref().unwrap_or(DEFAULT_BASE_URL);
        url::Url::parse(base).map_err(|e| ctx.error("base_url", format!("invalid URL: {e}")))?;
        let url = format!(
            "{}/open-apis/bot/v2/hook/{token}",
            base.trim_end_matches('/')
        );
        let mut redactor = Redactor::new();
        redactor.add(token);
        if let Ok(u) = url::Url::parse(&url) {
            redactor.add_url(&u, false);
        }
        if let Some(s) = &secret {
            redactor.add(s.expose());
        }
        let timeout = cfg.timeout.map_or(Duration::from_secs(30), |d| d.0);
        let client = http_client_builder(timeout)
            .redirect(redact::same_origin_redirects())
            .build()
            .map_err(|e| ctx.error("timeout", format!("cannot build the HTTP client: {e}")))?;
        Ok(FeishuConnector {
            name: format!("feishu/{}", ctx.profile),
            client,
            url: Secret::new(url),
            secret,
            redactor,
        })
    }

    async fn deliver_inner(&self, msg: &OutboxMessage) -> Result<Receipt, DeliveryError> {
        let mut body = payload(msg.content_required()?)?;
        if let Some(secret) = &self.secret {
            let ts = chrono::Utc::now().timestamp();
            body.insert("timestamp".into(), Value::String(ts.to_string()));
            body.insert("sign".into(), Value::String(sign(ts, secret.expose())));
        }
        let resp = self
            .client
            .post(self.url.expose())
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/json; charset=utf-8",
            )
            .body(serde_json::to_vec(&body).expect("a JSON object serializes"))
            .send()
            .await
            .map_err(|e| redact::send_error(&e))?;
        let (status, headers, text) = read_response(resp, MAX_RESPONSE_BYTES).await?;
        answer(status, &headers, &text)
    }
}

/// The request body of a content (without `timestamp`/`sign`), checked as Feishu would.
fn payload(content: &str) -> Result<Map<String, Value>, DeliveryError> {
    if !content.trim_start().starts_with('{') {
        check_string(&object_or_text(content, "text")?, "text", true)?;
        let mut body = Map::new();
        body.insert("msg_type".into(), "text".into());
        body.insert("content".into(), serde_json::json!({ "text": content }));
        return Ok(body);
    }
    let mut body = object_or_text(content, "text")?;
    // Ours to add, from the profile's secret.
    body.remove("timestamp");
    body.remove("sign");
    check_string(&body, "msg_type", true)?;
    let msg_type = body["msg_type"].as_str().unwrap_or_default().to_string();
    if !MSG_TYPES.contains(&msg_type.as_str()) {
        return Err(bad_content(format!(
            "msg_type \"{msg_type}\" is not one a custom bot sends ({})",
            MSG_TYPES.join(", ")
        )));
    }
    if msg_type == "interactive" {
        if body.get("card").is_none() {
            return Err(bad_content(
                "an interactive message needs a \"card\" object",
            ));
        }
        return check_type(&body, "card", Value::is_object, "an object").map(|()| body);
    }
    let empty = Map::new();
    let inner = match body.get("content") {
        Some(Value::Object(m)) => m,
        None => &empty,
        Some(_) => return Err(bad_content("\"content\" must be an object")),
    };
    match msg_type.as_str() {
        "text" => check_string(inner, "text", true)?,
        "post" => {
            if !inner.get("post").is_some_and(Value::is_object) {
                return Err(bad_content("a post message needs a content.post object"));
            }
        }
        "image" => check_string(inner, "image_key", true)?,
        _ => check_string(inner, "share_chat_id", true)?,
    }
    Ok(body)
}

/// The outcome of an answer: an error code in the body wins (Feishu says 19021 with HTTP 200
/// and 9499 with 400), then the HTTP status.
fn answer(status: StatusCode, headers: &HeaderMap, text: &str) -> Result<Receipt, DeliveryError> {
    let v = serde_json::from_str::<Value>(text).ok();
    if let Some(f) = v
        .as_ref()
        .and_then(|v| ERRORS.find(v).or_else(|| LEGACY_ERRORS.find(v)))
    {
        let e = ERRORS.error(&f).with_status(status.as_u16());
        return Err(if f.code == "11232" {
            DeliveryError::too_fast(e.code(), e.reason(), FLOW_CONTROL_BLOCK)
                .with_status(status.as_u16())
        } else {
            e
        });
    }
    if !status.is_success() {
        return Err(classify_status(status, text, headers));
    }
    Ok(Receipt {
        provider_id: None,
        remote_status: Some(status.as_u16().into()),
        reply: None,
    })
}

#[async_trait]
impl Connector for FeishuConnector {
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
    use serde_json::json;

    #[test]
    fn the_signature_reproduces_the_published_vector() {
        // providers.md §3.4: secret SECtest, timestamp 1700000000.
        assert_eq!(
            sign(1_700_000_000, "SECtest"),
            "G7XpBpG8NgG02fJOAhX6FRAObIljmFoxVReo8I62pEk="
        );
        // Not DingTalk's recipe (key = secret, message = the concatenation).
        assert_ne!(
            sign(1_700_000_000, "SECtest"),
            hmac_sha256_base64(b"SECtest", &[b"1700000000\nSECtest"])
        );
    }

    #[test]
    fn contents_become_bodies_of_the_known_types() {
        assert_eq!(
            Value::Object(payload("hello").unwrap()),
            json!({"msg_type": "text", "content": {"text": "hello"}})
        );
        let card = r#"{"msg_type":"interactive","card":{"elements":[]},"sign":"x"}"#;
        assert_eq!(
            Value::Object(payload(card).unwrap()),
            json!({"msg_type": "interactive", "card": {"elements": []}})
        );
        let post = r#"{"msg_type":"post","content":{"post":{"zh_cn":{"title":"t","content":[]}}}}"#;
        assert!(payload(post).is_ok());
        for bad in [
            "",
            r#"{"content":{"text":"x"}}"#,
            r#"{"msg_type":"audio"}"#,
            r#"{"msg_type":"text","content":{"text":""}}"#,
            r#"{"msg_type":"post","content":{}}"#,
            r#"{"msg_type":"interactive"}"#,
            r#"{"msg_type":"image","content":"x"}"#,
        ] {
            assert_eq!(payload(bad).unwrap_err().code(), "bad-content", "{bad}");
        }
    }

    #[test]
    fn errors_are_read_from_the_body() {
        let (ok, h) = (StatusCode::OK, HeaderMap::new());
        assert!(answer(ok, &h, r#"{"code":0,"data":{},"msg":"success"}"#).is_ok());
        assert!(answer(ok, &h, r#"{"StatusCode":0,"StatusMessage":"success"}"#).is_ok());
        let e = answer(StatusCode::BAD_GATEWAY, &h, "<html>").unwrap_err();
        assert_eq!((e.code(), e.is_retry()), ("http-502", true));
        let e = answer(ok, &h, r#"{"code":11232,"msg":"frequency limited"}"#).unwrap_err();
        assert!(
            matches!(&e, DeliveryError::Retry { code, retry_after: Some(d), .. }
            if code == "feishu-11232" && *d == FLOW_CONTROL_BLOCK)
        );
        for (body, code, retry) in [
            (
                r#"{"code":2200,"msg":"internal error"}"#,
                "feishu-2200",
                true,
            ),
            (
                r#"{"code":19021,"msg":"sign match fail"}"#,
                "feishu-19021",
                false,
            ),
            (r#"{"code":9499,"msg":"Bad Request"}"#, "feishu-9499", false),
            (
                r#"{"StatusCode":19021,"StatusMessage":"sign"}"#,
                "feishu-19021",
                false,
            ),
        ] {
            let e = answer(StatusCode::BAD_REQUEST, &h, body).unwrap_err();
            assert_eq!((e.code(), e.is_retry()), (code, retry), "{body}");
        }
    }

    #[test]
    fn the_hook_token_is_a_path_segment() {
        let ctx = ProfileContext::new("feishu.conf", "ops");
        let parse = |t: &str| -> FeishuConfig { toml::from_str(t).unwrap() };
        let e = FeishuConnector::new(&ctx, &parse("")).err().unwrap();
        assert_eq!(e.key.as_deref(), Some("ops.hook_token"));
        let whole = "hook_token = \"https://open.feishu.cn/open-apis/bot/v2/hook/S3CRET\"";
        let e = FeishuConnector::new(&ctx, &parse(whole)).err().unwrap();
        assert!(!e.to_string().contains("S3CRET"), "{e}");
        assert!(FeishuConnector::new(&ctx, &parse("hook_token = \"abc-123\"")).is_ok());
    }
}
