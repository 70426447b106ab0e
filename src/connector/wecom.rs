//! The WeCom (企业微信) app-message connector (agent `wecom.agent`; shared/providers.md §2.2):
//! `cgi-bin/message/send` as the profile's app (`agentid`), with a token from `cgi-bin/gettoken`
//! (corpid + corpsecret) cached per (base URL, corpid, secret) across profiles.
//!
//! The content is the message without `agentid`:
//!
//! ```json
//! {"msgtype": "text", "text": {"content": "hello"},
//!  "touser": "zhangsan|lisi", "toparty": "2|3", "totag": ["1"],   (optional, see below)
//!  "safe": 0, "enable_id_trans": 0}                                (optional)
//! ```
//!
//! msgtypes `text` and `markdown` (`content` ≤ 2048 bytes), `textcard` (`title`, `description`,
//! `url`, optional `btntxt`), `image` and `file`: `{"media_id": "…"}`, or the file itself as
//! `{"base64": "…", "filename": "report.pdf"}`, which is uploaded first (`media/upload`, field
//! `media`) and sent by the `media_id` it returns. Recipients: `touser` (`@all`, or ids joined by
//! `|`; an array is joined), else the message's address; `toparty`, `totag` likewise (strings or
//! arrays). At least one is required (`bad-address`).
//!
//! **Picture cards**: a message with a picture ([`OutboxMessage::images`], a rendered card) is sent
//! as that picture — `media/upload?type=image` (field `media`, PNG/JPEG up to 10 MB, WeCom's
//! limit; larger is `image-too-large` before any call), then one `msgtype: image` message with the
//! returned `media_id` to the message's address (`touser`, ids joined by `|`). The content (the
//! card's alt text) is not sent as a second message: WeCom's image message has no caption, the
//! text is drawn on the card, and a second send could double the picture when the text failed
//! and the message was retried. A retry after a failed send reuses the media id (valid 3 days;
//! kept a day, in memory), so it is the same request JSON, which the duplicate check covers.
//!
//! `enable_duplicate_check: 1` (with `duplicate_check_interval`, default 1800 s) is on unless the
//! profile turns it off: a retry of the same message is the same request JSON, which WeCom then
//! sends once. (WeCom compares the JSON, so two messages with identical content and recipients
//! inside the interval are sent once too: turn it off for a profile where that matters.)
//!
//! A reply that lists `invaliduser`, `invalidparty`, `invalidtag` or `unlicenseduser` is a
//! partial delivery: the message is done (the others got it), `msgid` is its provider id, and the
//! lists are kept as the receipt's reply — `{"invaliduser": "…", …}` with the non-empty lists —
//! which the dispatcher stores as an inbox message whose parent is the outbox message. Every
//! recipient invalid is errcode 81013: failed as `wecom-81013`.
//!
//! Invariants: the content is checked before any network call; errors come from the body
//! (`errcode`): 40001/40014/42001 refresh the token and resend once, -1 (`wecom-busy`) retries,
//! 45009 is "too fast" (retried after a minute, the profile held back), 81013, 60020 (IP not
//! trusted), 48001, 40003 and unknown codes fail; the token and the corp secret are in query
//! strings, so they are scrubbed from every text and transport errors lose their URL.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::codes;
use super::provider::body::{Class, ErrorTable};
use super::provider::media::{self, Limits, MediaIds, PNG_JPEG};
use super::provider::multipart::file_form;
use super::provider::token::call_with_token;
use super::provider::{json_scalar, truncate};
use super::redact::Redactor;
use super::token::{self, TokenCache};
use super::wechat::{
    answer, bad_content, base_url, client, post_with_token, required_secret, token_rejected,
    TokenRequest, ERRCODE, TOKEN_ERRORS, TOKEN_INVALID_CODES,
};
use super::{Connector, DeliveryError, OutboxMessage, Receipt};
use crate::settings::{ConfigError, Dur, ProfileContext, Secret, SecretSource};

const DEFAULT_BASE_URL: &str = "https://qyapi.weixin.qq.com";
/// text and markdown content limit (providers.md §2.2).
const MAX_TEXT_BYTES: usize = 2048;
/// How long WeCom's 45009 (frequency limit) holds the profile back: it names no time, and its
/// limits are per minute.
const TOO_FAST_BLOCK: Duration = Duration::from_secs(60);
/// `media/upload?type=image`: JPG/PNG up to 10 MB (WeCom's media doc).
const PICTURES: Limits = Limits {
    provider: "WeCom",
    max_bytes: 10 * 1024 * 1024,
    types: PNG_JPEG,
};
/// How long an uploaded picture's media id is reused for retries (WeCom keeps it 3 days).
const MEDIA_ID_LIFE: Duration = Duration::from_secs(86400);
/// The reply fields that list recipients WeCom did not deliver to.
const INVALID_LISTS: [&str; 4] = [
    "invaliduser",
    "invalidparty",
    "invalidtag",
    "unlicenseduser",
];

/// A `wecom` profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WecomConfig {
    /// The corporation id (企业ID). Required.
    pub corpid: String,
    /// The app's secret, inline (avoid)…
    pub corpsecret: Option<Secret>,
    /// …or the name of an environment variable holding it…
    pub corpsecret_env: Option<String>,
    /// …or the path of a file holding it. One of the three is required.
    pub corpsecret_file: Option<PathBuf>,
    /// The app's `agentid` (an integer). Required.
    pub agentid: i64,
    /// Base URL of the API. Default `https://qyapi.weixin.qq.com`.
    pub base_url: Option<String>,
    /// Send `enable_duplicate_check: 1`. Default true.
    pub duplicate_check: Option<bool>,
    /// `duplicate_check_interval`, whole seconds, at most 4h. Default 1800s.
    pub duplicate_check_interval: Option<Dur>,
    /// Request timeout (common key), for the token, upload and send. Default 30s.
    pub timeout: Option<Dur>,
}

pub struct WecomConnector {
    name: String,
    client: reqwest::Client,
    base: String,
    agentid: i64,
    /// `duplicate_check_interval` in seconds, `None` when the check is off.
    duplicate_check: Option<u64>,
    tokens: Arc<TokenCache>,
    redactor: Redactor,
    /// Media ids of pictures whose send is still to succeed.
    media: MediaIds,
}

/// The `errcode`s of `message/send` and `media/upload` (providers.md §2.2, §3.3).
const SEND_ERRORS: ErrorTable = ErrorTable {
    prefix: "wecom",
    field: ERRCODE,
    message: &["/errmsg"],
    codes: &[
        TOKEN_INVALID_CODES[0],
        TOKEN_INVALID_CODES[1],
        TOKEN_INVALID_CODES[2],
        ("-1", Class::Retry),
        ("45009", Class::Retry),
        ("81013", Class::Permanent),
        ("60020", Class::Permanent),
        ("48001", Class::Permanent),
        ("40003", Class::Permanent),
    ],
    default: Class::Permanent,
};

impl WecomConnector {
    pub fn new(ctx: &ProfileContext, cfg: &WecomConfig) -> Result<Self, ConfigError> {
        if cfg.corpid.trim().is_empty() {
            return Err(ctx.error("corpid", "is empty"));
        }
        let secret = required_secret(
            ctx,
            "corpsecret",
            SecretSource::of(&cfg.corpsecret, &cfg.corpsecret_env, &cfg.corpsecret_file),
        )?;
        let base = base_url(ctx, &cfg.base_url, DEFAULT_BASE_URL)?;
        let interval = cfg
            .duplicate_check_interval
            .map_or(Duration::from_secs(1800), |d| d.0);
        if interval < Duration::from_secs(1) || interval > Duration::from_secs(4 * 3600) {
            return Err(ctx.error(
                "duplicate_check_interval",
                "must be between 1s and 4h (WeCom's maximum)",
            ));
        }
        let client = client(ctx, cfg.timeout)?;
        let mut redactor = Redactor::new();
        redactor.add(secret.expose());
        let token_url = format!("{base}/cgi-bin/gettoken");
        let key = token::credential_key("wecom", &[&token_url, &cfg.corpid, secret.expose()]);
        let source = TokenRequest::Get {
            client: client.clone(),
            url: token_url,
            query: vec![
                ("corpid", Secret::new(cfg.corpid.clone())),
                ("corpsecret", secret),
            ],
            table: TOKEN_ERRORS,
        };
        Ok(WecomConnector {
            name: format!("wecom/{}", ctx.profile),
            client,
            base,
            agentid: cfg.agentid,
            duplicate_check: cfg
                .duplicate_check
                .unwrap_or(true)
                .then_some(interval.as_secs()),
            tokens: token::shared(&key, || TokenCache::new(source)),
            redactor,
            media: MediaIds::new(MEDIA_ID_LIFE),
        })
    }
}

/// A file the content carries, to upload before the send.
#[derive(Debug, PartialEq)]
struct Upload {
    /// `image` or `file` (the upload's `type` and the msgtype).
    kind: &'static str,
    filename: String,
    bytes: Vec<u8>,
}

/// A recipient list: a `|`-joined string or an array of ids.
fn recipients(v: &Value, key: &str) -> Result<Option<String>, DeliveryError> {
    let joined = match v {
        Value::Null => return Ok(None),
        Value::String(s) => s.trim().to_string(),
        Value::Array(a) => a
            .iter()
            .map(|x| match x {
                Value::String(s) => Ok(s.trim().to_string()),
                Value::Number(n) => Ok(n.to_string()),
                _ => Err(()),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| bad_content(format!("{key} must be ids")))?
            .join("|"),
        _ => return Err(bad_content(format!("{key} must be a string or an array"))),
    };
    Ok((!joined.is_empty()).then_some(joined))
}

/// Base64 without the line breaks that encoders (PostgreSQL's `encode`, MIME) put in.
pub(super) fn without_whitespace(b64: &str) -> String {
    b64.chars().filter(|c| !c.is_ascii_whitespace()).collect()
}

fn string_field(obj: &Map<String, Value>, path: &str, key: &str) -> Result<String, DeliveryError> {
    obj.get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.trim().is_empty())
        .map(str::to_string)
        .ok_or_else(|| bad_content(format!("{path}.{key} is required (a string)")))
}

/// The body of `message/send` (without `agentid` and the duplicate check) and the file to upload
/// first, from the content and the message's address.
fn build_body(
    content: &str,
    address: Option<&str>,
) -> Result<(Value, Option<Upload>), DeliveryError> {
    let v: Value = serde_json::from_str(content)
        .map_err(|e| bad_content(format!("content is not JSON: {e}")))?;
    let Value::Object(top) = v else {
        return Err(bad_content("content must be a JSON object with a msgtype"));
    };
    let msgtype = top
        .get("msgtype")
        .and_then(Value::as_str)
        .ok_or_else(|| bad_content("content has no msgtype"))?
        .to_string();
    let allowed = [
        "msgtype",
        "touser",
        "toparty",
        "totag",
        "safe",
        "enable_id_trans",
    ];
    if let Some(k) = top
        .keys()
        .find(|k| !allowed.contains(&k.as_str()) && **k != msgtype)
    {
        return Err(bad_content(format!(
            "unknown field \"{k}\" for msgtype {msgtype}"
        )));
    }
    let part = top
        .get(&msgtype)
        .and_then(Value::as_object)
        .ok_or_else(|| bad_content(format!("msgtype {msgtype} needs a \"{msgtype}\" object")))?;
    let mut upload = None;
    let part = match msgtype.as_str() {
        "text" | "markdown" => {
            let text = string_field(part, &msgtype, "content")?;
            if text.len() > MAX_TEXT_BYTES {
                return Err(bad_content(format!(
                    "{msgtype}.content is {} bytes; WeCom takes at most {MAX_TEXT_BYTES}",
                    text.len()
                )));
            }
            json!({ "content": text })
        }
        "textcard" => {
            let mut card = Map::new();
            for k in ["title", "description", "url"] {
                card.insert(k.into(), Value::String(string_field(part, "textcard", k)?));
            }
            if let Some(b) = part.get("btntxt").and_then(Value::as_str) {
                card.insert("btntxt".into(), Value::String(b.into()));
            }
            Value::Object(card)
        }
        "image" | "file" => {
            let kind = if msgtype == "image" { "image" } else { "file" };
            if let Some(id) = part.get("media_id").and_then(Value::as_str) {
                json!({ "media_id": id })
            } else {
                let data = without_whitespace(&string_field(part, kind, "base64")?);
                let bytes = B64
                    .decode(&data)
                    .map_err(|e| bad_content(format!("{kind}.base64 is not base64: {e}")))?;
                let filename = string_field(part, kind, "filename")?;
                upload = Some(Upload {
                    kind,
                    filename,
                    bytes,
                });
                // Filled with the uploaded media_id.
                json!({})
            }
        }
        other => {
            return Err(bad_content(format!(
                "msgtype {other} is not supported (text, markdown, textcard, image, file)"
            )))
        }
    };
    let mut body = json!({ "msgtype": msgtype });
    body[&msgtype] = part;
    let touser = match recipients(top.get("touser").unwrap_or(&Value::Null), "touser")? {
        Some(t) => Some(t),
        None => recipients(&json!(address.unwrap_or("")), "address")?,
    };
    let mut any = false;
    for (k, v) in [
        ("touser", touser),
        (
            "toparty",
            recipients(top.get("toparty").unwrap_or(&Value::Null), "toparty")?,
        ),
        (
            "totag",
            recipients(top.get("totag").unwrap_or(&Value::Null), "totag")?,
        ),
    ] {
        if let Some(v) = v {
            body[k] = Value::String(v);
            any = true;
        }
    }
    if !any {
        return Err(DeliveryError::permanent(
            codes::BAD_ADDRESS.code,
            "no recipient: set the address or touser, toparty or totag",
        ));
    }
    for k in ["safe", "enable_id_trans"] {
        if let Some(v) = top.get(k) {
            body[k] = v.clone();
        }
    }
    Ok((body, upload))
}

/// The lists of recipients WeCom did not deliver to, as the reply to keep (`None` when all
/// got it).
fn invalid_recipients(answer: &Value) -> Option<String> {
    let mut lists = Map::new();
    for k in INVALID_LISTS {
        if let Some(s) = answer.get(k).map(json_scalar).filter(|s| !s.is_empty()) {
            lists.insert(k.into(), Value::String(s));
        }
    }
    (!lists.is_empty()).then(|| Value::Object(lists).to_string())
}

/// 45009 is WeCom's "too fast": the profile waits a minute.
fn too_fast(e: DeliveryError) -> DeliveryError {
    if e.code() == codes::family(codes::WECOM_ERROR, "45009") {
        let status = e.remote_status().unwrap_or(200);
        DeliveryError::too_fast(e.code(), e.reason(), TOO_FAST_BLOCK).with_status(status)
    } else {
        e
    }
}

#[async_trait]
impl Connector for WecomConnector {
    fn name(&self) -> &str {
        &self.name
    }

    async fn deliver(&self, msg: &OutboxMessage) -> Result<Receipt, DeliveryError> {
        let r = self
            .redactor
            .result(self.deliver_inner(msg).await.map_err(too_fast));
        self.tokens.redact(r)
    }
}

impl WecomConnector {
    /// Calls `path` with the cached token (refreshed and resent once on a token-invalid code) and
    /// returns the checked answer.
    async fn call(
        &self,
        path: &str,
        query: &[(&str, &str)],
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Value), DeliveryError> {
        let url = format!("{}{path}", self.base);
        let (status, headers, text) = call_with_token(
            &self.tokens,
            &self.name,
            |a| token_rejected(&SEND_ERRORS, a),
            |t| {
                let (url, body) = (&url, body.clone());
                async move {
                    post_with_token(&self.client, url, &t, query, body.into(), content_type).await
                }
            },
        )
        .await?;
        let v = answer(
            status,
            &headers,
            &text,
            &SEND_ERRORS,
            codes::WECOM_BAD_RESPONSE,
        )?;
        Ok((status.as_u16(), v))
    }

    /// A picture card: the picture uploaded (or its media id kept from a failed send), then one
    /// image message to the address.
    async fn deliver_picture(
        &self,
        msg: &OutboxMessage,
        img: &super::Image,
    ) -> Result<Receipt, DeliveryError> {
        let touser = recipients(&json!(msg.address.as_deref().unwrap_or("")), "address")?
            .ok_or_else(|| {
                DeliveryError::permanent(
                    codes::BAD_ADDRESS.code,
                    "a picture goes to the message's address (touser), which is empty",
                )
            })?;
        let upload = media::upload(
            img,
            "media",
            "/media_id",
            |ct, form| async move {
                let (_, v) = self
                    .call("/cgi-bin/media/upload", &[("type", "image")], &ct, form)
                    .await?;
                Ok(v)
            },
            |r| DeliveryError::retry(codes::WECOM_BAD_RESPONSE.code, format!("media/upload: {r}")),
        );
        let id = self.media.get_or_upload(msg.id, upload).await?;
        let body = json!({"msgtype": "image", "image": {"media_id": id}, "touser": touser});
        let r = self.send(msg, body).await;
        if !matches!(&r, Err(e) if e.is_retry()) {
            self.media.forget(msg.id);
        }
        r
    }

    async fn deliver_inner(&self, msg: &OutboxMessage) -> Result<Receipt, DeliveryError> {
        if let Some(img) = media::picture(msg, &PICTURES)? {
            return self.deliver_picture(msg, img).await;
        }
        let (mut body, upload) = build_body(msg.content_required()?, msg.address.as_deref())?;
        if let Some(u) = upload {
            let (ct, form) = file_form("media", &u.filename, media::mime_of(&u.filename), &u.bytes);
            let (_, v) = self
                .call("/cgi-bin/media/upload", &[("type", u.kind)], &ct, form)
                .await?;
            let id = v.get("media_id").and_then(Value::as_str).ok_or_else(|| {
                DeliveryError::retry(
                    codes::WECOM_BAD_RESPONSE.code,
                    format!(
                        "media/upload answered no media_id: {}",
                        truncate(&v.to_string(), 256)
                    ),
                )
            })?;
            body[u.kind] = json!({ "media_id": id });
        }
        self.send(msg, body).await
    }

    /// `message/send` of `body` (with the profile's `agentid` and duplicate check added).
    async fn send(&self, msg: &OutboxMessage, mut body: Value) -> Result<Receipt, DeliveryError> {
        body["agentid"] = json!(self.agentid);
        if let Some(interval) = self.duplicate_check {
            body["enable_duplicate_check"] = json!(1);
            body["duplicate_check_interval"] = json!(interval);
        }
        let body = serde_json::to_vec(&body).expect("a JSON value serializes");
        let (status, v) = self
            .call("/cgi-bin/message/send", &[], "application/json", body)
            .await?;
        let reply = invalid_recipients(&v);
        if let Some(lists) = &reply {
            // Not an error (the others got it), but someone should fix the directory or the list.
            tracing::warn!(message_id = %msg.id, profile = %msg.profile, connector = %self.name, invalid = %lists, "WeCom did not deliver to some recipients");
        }
        Ok(Receipt {
            provider_id: v.get("msgid").map(json_scalar),
            remote_status: Some(status.into()),
            reply,
        })
    }
}

#[cfg(test)]
mod tests;
