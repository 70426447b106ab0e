//! The `telegram` connector (`api.agent`/`telegram.agent`): Telegram Bot API `sendMessage`
//! (`POST <api_url>/bot<token>/sendMessage`). Facts: shared/providers.md §2.11.
//!
//! The address is the `chat_id` (a number, `-100…` for supergroups and channels, or
//! `@channelusername`); the content is plain text or a JSON object of `sendMessage` fields (`text`,
//! `parse_mode`, `disable_notification`, `message_thread_id`, `reply_markup`,
//! `link_preview_options`…); the profile may give defaults for `parse_mode` and
//! `disable_notification`. `result.message_id` is stored as the provider id.
//!
//! **Picture cards**: a message with a picture ([`OutboxMessage::images`], a rendered card) is sent
//! with `sendPhoto` instead — one `multipart/form-data` call (`chat_id`, `caption`,
//! `disable_notification` from the profile, the file as `photo`), the message's text (the card's
//! alt text) as the photo's caption, plain (no `parse_mode`: alt text is not markup), cut to
//! Telegram's 1024 characters with `…`. The Bot API's limits for photos — at most 10 MB, width +
//! height at most 10000 — are checked before the call (`image-too-large`). One call, so a retry
//! never doubles anything; its errors are `sendMessage`'s. (The Bot API's `sendPhoto` is not in
//! providers.md; its fields and limits are the Bot API documentation's.)
//!
//! A group that became a supergroup answers 400 with `parameters.migrate_to_chat_id`: the message
//! is sent once more, at once and within the same delivery, to the new chat id, and the move is
//! recorded as the delivery's reply — an inbox message whose parent is the outbox message, content
//! `{"event":"migrate_to_chat_id","from_chat_id":…,"migrate_to_chat_id":…,"message_id":…}` — so the
//! application can update the chat id it keeps (see the README).
//!
//! Invariants: the bot token lives in the URL path, so it is scrubbed from every text (reqwest's
//! errors, which quote the URL, lose it) and never follows a redirect to another origin. Errors
//! are read from the body (`ok:false`, `error_code`, `description`) with the toolkit's
//! [`ErrorTable`]: 429 is "too fast", retried after `parameters.retry_after`; 5xx retries; 403
//! (blocked, kicked), 400 (chat not found, bad entities) and 401 (bad token) fail as
//! `telegram-<error_code>`.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::provider::body::{Class, ErrorTable, Field};
use super::provider::content::{
    bad_content, check_string, check_type, object_or_text, set_recipient,
};
use super::provider::media::{self, Limits, PNG_JPEG};
use super::provider::multipart;
use super::provider::status::{classify_status_with, retry_after_in_body};
use super::provider::{http_client_builder, json_scalar, parse_retry_after, read_response};
use super::redact::{self, Redactor};
use super::{codes, Connector, DeliveryError, OutboxMessage, Receipt};
use crate::settings::{ConfigError, Dur, ProfileContext, Secret, SecretSource};

/// The Bot API.
pub const DEFAULT_API_URL: &str = "https://api.telegram.org";
/// The wait after a 429 that names no `retry_after` (the Bot FAQ: about one message a second per
/// chat).
pub const DEFAULT_BLOCK: Duration = Duration::from_secs(1);
/// `parse_mode` values Telegram knows.
pub const PARSE_MODES: [&str; 3] = ["MarkdownV2", "HTML", "Markdown"];
/// The longest text, in characters (after entity parsing: checked here only without a parse mode).
pub const MAX_TEXT_CHARS: usize = 4096;
/// Where Telegram says how long to wait.
const RETRY_AFTER: &str = "/parameters/retry_after";
/// Enough for any Bot API answer; a larger body is cut, not buffered whole.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// `sendPhoto`'s `photo`: at most 10 MB (the Bot API's limit for photos sent as files).
const PICTURES: Limits = Limits {
    provider: "Telegram",
    max_bytes: 10 * 1024 * 1024,
    types: PNG_JPEG,
};
/// A photo's width + height, at most (the Bot API).
const MAX_PHOTO_SIDES: u32 = 10_000;
/// A caption's length, in characters (the Bot API).
pub const MAX_CAPTION_CHARS: usize = 1024;

/// `error_code` is an HTTP status: 429 and 5xx retry, the others are permanent.
const ERRORS: ErrorTable = ErrorTable {
    prefix: "telegram",
    field: Field::OkFlag {
        ok: "/ok",
        code: "/error_code",
    },
    message: &["/description"],
    codes: &[
        ("429", Class::Retry),
        ("500", Class::Retry),
        ("502", Class::Retry),
        ("503", Class::Retry),
        ("504", Class::Retry),
    ],
    default: Class::Permanent,
};

/// A `telegram` profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelegramConfig {
    /// The bot token from @BotFather (`123456789:AA…`): inline…
    pub bot_token: Option<Secret>,
    /// …or from this environment variable…
    pub bot_token_env: Option<String>,
    /// …or from this file. One of the three is required.
    pub bot_token_file: Option<PathBuf>,
    /// Base URL of the Bot API; requests go to `<api_url>/bot<token>/sendMessage`. Default
    /// `https://api.telegram.org`.
    pub api_url: Option<String>,
    /// `parse_mode` of messages whose content sets none: `MarkdownV2`, `HTML` or `Markdown`.
    /// Default: none (plain text).
    pub parse_mode: Option<String>,
    /// `disable_notification` of messages whose content sets none. Default: unset (Telegram's
    /// default, a notification).
    pub disable_notification: Option<bool>,
    /// Request timeout (common key). Default 30s.
    pub timeout: Option<Dur>,
}

pub struct TelegramConnector {
    name: String,
    client: reqwest::Client,
    /// `…/bot<token>/sendMessage`: a credential.
    url: Secret,
    /// `…/bot<token>/sendPhoto`: a credential.
    photo_url: Secret,
    parse_mode: Option<String>,
    disable_notification: Option<bool>,
    redactor: Redactor,
}

/// What one `sendMessage` answer said.
#[derive(Debug, PartialEq)]
enum Sent {
    /// Accepted: the message id and the HTTP status.
    Delivered(Option<String>, u16),
    /// The chat became a supergroup with this id: nothing was sent.
    Moved(i64),
}

impl TelegramConnector {
    pub fn new(ctx: &ProfileContext, cfg: &TelegramConfig) -> Result<Self, ConfigError> {
        let token = SecretSource::of(&cfg.bot_token, &cfg.bot_token_env, &cfg.bot_token_file)
            .resolve("bot_token")
            .map_err(|m| ctx.error("bot_token", m))?
            .ok_or_else(|| ctx.error("bot_token", "required (the token from @BotFather)"))?;
        let t = token.expose().trim();
        // `<bot id>:<secret>`: it becomes a path segment, so nothing else is allowed in it.
        let well_formed = t.split_once(':').is_some_and(|(id, secret)| {
            !id.is_empty()
                && id.bytes().all(|b| b.is_ascii_digit())
                && !secret.is_empty()
                && secret
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
        if !well_formed {
            return Err(ctx.error(
                "bot_token",
                "must look like 123456789:AA… (the bot id, a colon, the secret)",
            ));
        }
        if let Some(p) = cfg.parse_mode.as_deref() {
            if !PARSE_MODES.contains(&p) {
                return Err(ctx.error(
                    "parse_mode",
                    format!("must be one of {}", PARSE_MODES.join(", ")),
                ));
            }
        }
        let base = cfg.api_url.as_deref().unwrap_or(DEFAULT_API_URL);
        url::Url::parse(base).map_err(|e| ctx.error("api_url", format!("invalid URL: {e}")))?;
        let url = format!("{}/bot{t}/sendMessage", base.trim_end_matches('/'));
        let photo_url = format!("{}/bot{t}/sendPhoto", base.trim_end_matches('/'));
        let mut redactor = Redactor::new();
        redactor.add(t);
        if let Ok(u) = url::Url::parse(&url) {
            redactor.add_url(&u, false);
        }
        let timeout = cfg.timeout.map_or(Duration::from_secs(30), |d| d.0);
        let client = http_client_builder(timeout)
            .redirect(redact::same_origin_redirects())
            .build()
            .map_err(|e| ctx.error("timeout", format!("cannot build the HTTP client: {e}")))?;
        Ok(TelegramConnector {
            name: format!("telegram/{}", ctx.profile),
            client,
            url: Secret::new(url),
            photo_url: Secret::new(photo_url),
            parse_mode: cfg.parse_mode.clone(),
            disable_notification: cfg.disable_notification,
            redactor,
        })
    }

    /// `sendMessage` with `body`, or `sendPhoto` with `body`'s fields and `photo`.
    async fn send(
        &self,
        body: &Map<String, Value>,
        photo: Option<&super::Image>,
    ) -> Result<Sent, DeliveryError> {
        let req = match photo {
            None => self
                .client
                .post(self.url.expose())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(serde_json::to_vec(body).expect("a JSON object serializes")),
            Some(img) => {
                let fields: Vec<(&str, String)> = body
                    .iter()
                    .map(|(k, v)| (k.as_str(), json_scalar(v)))
                    .collect();
                let fields: Vec<(&str, &str)> =
                    fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let (ct, form) =
                    multipart::form(&fields, "photo", &img.file_name, &img.mime, &img.bytes);
                self.client
                    .post(self.photo_url.expose())
                    .header(reqwest::header::CONTENT_TYPE, ct)
                    .body(form)
            }
        };
        let resp = req.send().await.map_err(|e| redact::send_error(&e))?;
        let (status, headers, text) = read_response(resp, MAX_RESPONSE_BYTES).await?;
        answer(status, &headers, &text)
    }

    async fn deliver_inner(&self, msg: &OutboxMessage) -> Result<Receipt, DeliveryError> {
        let chat = chat_id(msg.address_required()?)?;
        let photo = media::picture(msg, &PICTURES)?;
        let mut body = match photo {
            Some(img) => self.photo_fields(msg, img)?,
            None => payload(
                msg.content_required()?,
                self.parse_mode.as_deref(),
                self.disable_notification,
            )?,
        };
        set_recipient(&mut body, "chat_id", chat.clone())?;
        let new = match self.send(&body, photo).await? {
            Sent::Delivered(id, status) => return Ok(receipt(id, status, None)),
            Sent::Moved(new) => new,
        };
        // The group became a supergroup: the same message, once, to its new id.
        body.insert("chat_id".into(), new.into());
        let moved = format!("the chat {chat} became {new}");
        match self.send(&body, photo).await {
            Ok(Sent::Delivered(id, status)) => {
                tracing::info!(message_id = %msg.id, profile = %msg.profile, connector = %self.name, from_chat_id = %chat, migrate_to_chat_id = new, "the Telegram group became a supergroup; delivered to its new chat id");
                let reply = json!({
                    "event": "migrate_to_chat_id",
                    "from_chat_id": chat,
                    "migrate_to_chat_id": new,
                    "message_id": id.as_deref().and_then(|i| i.parse::<i64>().ok()),
                });
                Ok(receipt(id, status, Some(reply.to_string())))
            }
            Ok(Sent::Moved(again)) => Err(DeliveryError::permanent(
                codes::family(codes::TELEGRAM_ERROR, "400"),
                format!("{moved}, which moved again to {again}"),
            )
            .with_status(400u16)),
            Err(e) => Err(noted(e, &moved)),
        }
    }
}

impl TelegramConnector {
    /// `sendPhoto`'s text fields for a picture: the caption (the message's text, cut to 1024
    /// characters) and the profile's `disable_notification`; the photo's sides checked.
    fn photo_fields(
        &self,
        msg: &OutboxMessage,
        img: &super::Image,
    ) -> Result<Map<String, Value>, DeliveryError> {
        if img.width + img.height > MAX_PHOTO_SIDES {
            return Err(DeliveryError::permanent(
                codes::IMAGE_TOO_LARGE.code,
                format!(
                    "the picture {} is {}×{}; Telegram takes width + height up to {MAX_PHOTO_SIDES}",
                    img.file_name, img.width, img.height
                ),
            ));
        }
        let mut body = Map::new();
        if let Some(text) = media::caption(msg) {
            let caption = if text.chars().count() > MAX_CAPTION_CHARS {
                let cut: String = text.chars().take(MAX_CAPTION_CHARS - 1).collect();
                format!("{cut}…")
            } else {
                text.to_string()
            };
            body.insert("caption".into(), caption.into());
        }
        if let Some(d) = self.disable_notification {
            body.insert("disable_notification".into(), d.into());
        }
        Ok(body)
    }
}

fn receipt(id: Option<String>, status: u16, reply: Option<String>) -> Receipt {
    Receipt {
        provider_id: id,
        remote_status: Some(status.into()),
        reply,
    }
}

/// `e` with `(note)` after its reason.
fn noted(mut e: DeliveryError, note: &str) -> DeliveryError {
    match &mut e {
        DeliveryError::Retry { reason, .. } | DeliveryError::Permanent { reason, .. } => {
            reason.push_str(&format!(" ({note})"));
        }
    }
    e
}

/// The `chat_id` of an address: a number, or `@channelusername`.
fn chat_id(address: &str) -> Result<Value, DeliveryError> {
    let a = address.trim();
    if let Ok(n) = a.parse::<i64>() {
        return Ok(n.into());
    }
    match a.strip_prefix('@') {
        Some(name)
            if !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') =>
        {
            Ok(a.into())
        }
        _ => Err(DeliveryError::permanent(
            codes::BAD_ADDRESS.code,
            "a Telegram chat id is a number (-100… for supergroups) or @channelusername",
        )),
    }
}

/// The `sendMessage` fields of a content, with the profile's defaults, checked as Telegram would.
fn payload(
    content: &str,
    parse_mode: Option<&str>,
    disable_notification: Option<bool>,
) -> Result<Map<String, Value>, DeliveryError> {
    let mut body = object_or_text(content, "text")?;
    check_string(&body, "text", true)?;
    check_type(
        &body,
        "disable_notification",
        Value::is_boolean,
        "true or false",
    )?;
    // An explicit null turns the profile's parse mode off.
    match body.get("parse_mode") {
        Some(Value::Null) => {
            body.remove("parse_mode");
        }
        Some(_) => check_string(&body, "parse_mode", true)?,
        None => {
            if let Some(p) = parse_mode {
                body.insert("parse_mode".into(), p.into());
            }
        }
    }
    if let (Some(d), false) = (
        disable_notification,
        body.contains_key("disable_notification"),
    ) {
        body.insert("disable_notification".into(), d.into());
    }
    match body.get("parse_mode").and_then(Value::as_str) {
        Some(p) if !PARSE_MODES.contains(&p) => {
            return Err(bad_content(format!(
                "parse_mode \"{p}\" is not one of {}",
                PARSE_MODES.join(", ")
            )))
        }
        Some(_) => {}
        None => {
            let n = body["text"].as_str().map_or(0, |t| t.chars().count());
            if n > MAX_TEXT_CHARS {
                return Err(bad_content(format!(
                    "text has {n} characters; Telegram takes at most {MAX_TEXT_CHARS}"
                )));
            }
        }
    }
    Ok(body)
}

/// What a `sendMessage` answer says: `ok:true` is delivered; `migrate_to_chat_id` is a move;
/// other errors are classified by `error_code` (the body's wins over the HTTP status).
fn answer(status: StatusCode, headers: &HeaderMap, text: &str) -> Result<Sent, DeliveryError> {
    let v = serde_json::from_str::<Value>(text).ok();
    let Some(v) = v else {
        return if status.is_success() {
            Ok(Sent::Delivered(None, status.as_u16()))
        } else {
            let hint = |b: &str| retry_after_in_body(b, RETRY_AFTER);
            Err(classify_status_with(status, text, headers, Some(&hint)))
        };
    };
    let Some(f) = ERRORS.find(&v) else {
        if !status.is_success() {
            let hint = |b: &str| retry_after_in_body(b, RETRY_AFTER);
            return Err(classify_status_with(status, text, headers, Some(&hint)));
        }
        let id = v
            .pointer("/result/message_id")
            .map(super::provider::json_scalar);
        return Ok(Sent::Delivered(id, status.as_u16()));
    };
    if let Some(new) = v
        .pointer("/parameters/migrate_to_chat_id")
        .and_then(Value::as_i64)
    {
        return Ok(Sent::Moved(new));
    }
    let e = ERRORS.error(&f).with_status(status.as_u16());
    if f.code == "429" {
        let block = retry_after_in_body(text, RETRY_AFTER)
            .or_else(|| parse_retry_after(headers))
            .unwrap_or(DEFAULT_BLOCK);
        return Err(
            DeliveryError::too_fast(e.code(), e.reason(), block).with_status(status.as_u16())
        );
    }
    Err(e)
}

#[async_trait]
impl Connector for TelegramConnector {
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

    #[test]
    fn addresses_are_chat_ids() {
        assert_eq!(chat_id("123456789").unwrap(), json!(123456789));
        assert_eq!(
            chat_id(" -1001234567890 ").unwrap(),
            json!(-1001234567890i64)
        );
        assert_eq!(chat_id("@my_channel").unwrap(), json!("@my_channel"));
        for bad in ["@", "chat 1", "@a/b", ""] {
            assert_eq!(chat_id(bad).unwrap_err().code(), "bad-address", "{bad}");
        }
    }

    #[test]
    fn contents_take_the_profile_defaults() {
        let b = payload("*hi*", Some("MarkdownV2"), Some(true)).unwrap();
        assert_eq!(
            Value::Object(b),
            json!({"text": "*hi*", "parse_mode": "MarkdownV2", "disable_notification": true})
        );
        let b = payload(
            r#"{"text":"x","parse_mode":null,"disable_notification":false}"#,
            Some("HTML"),
            Some(true),
        )
        .unwrap();
        assert_eq!(
            Value::Object(b),
            json!({"text": "x", "disable_notification": false})
        );
        let long = "x".repeat(MAX_TEXT_CHARS + 1);
        for bad in [
            r#"{"parse_mode":"HTML"}"#.to_string(),
            r#"{"text":"x","parse_mode":"BBCode"}"#.into(),
            r#"{"text":"x","disable_notification":"yes"}"#.into(),
            long,
        ] {
            assert_eq!(payload(&bad, None, None).unwrap_err().code(), "bad-content");
        }
        assert!(payload(&"x".repeat(MAX_TEXT_CHARS + 1), Some("HTML"), None).is_ok());
    }

    #[test]
    fn answers_are_read_from_the_body() {
        let h = HeaderMap::new();
        assert_eq!(
            answer(
                StatusCode::OK,
                &h,
                r#"{"ok":true,"result":{"message_id":42}}"#
            ),
            Ok(Sent::Delivered(Some("42".into()), 200))
        );
        let e = answer(
            StatusCode::TOO_MANY_REQUESTS,
            &h,
            r#"{"ok":false,"error_code":429,"description":"Too Many Requests: retry after 34","parameters":{"retry_after":34}}"#,
        )
        .unwrap_err();
        assert!(
            matches!(&e, DeliveryError::Retry { code, retry_after: Some(d), remote_status: Some(429), .. }
            if code == "telegram-429" && *d == Duration::from_secs(34))
        );
        let moved = r#"{"ok":false,"error_code":400,"description":"Bad Request: group chat was upgraded to a supergroup chat","parameters":{"migrate_to_chat_id":-1001234567890}}"#;
        assert_eq!(
            answer(StatusCode::BAD_REQUEST, &h, moved),
            Ok(Sent::Moved(-1001234567890))
        );
        for (status, body, code, retry) in [
            (
                403,
                r#"{"ok":false,"error_code":403,"description":"Forbidden: bot was blocked by the user"}"#,
                "telegram-403",
                false,
            ),
            (
                400,
                r#"{"ok":false,"error_code":400,"description":"Bad Request: chat not found"}"#,
                "telegram-400",
                false,
            ),
            (
                401,
                r#"{"ok":false,"error_code":401,"description":"Unauthorized"}"#,
                "telegram-401",
                false,
            ),
            (
                502,
                r#"{"ok":false,"error_code":502,"description":"Bad Gateway"}"#,
                "telegram-502",
                true,
            ),
            (502, "<html>Bad Gateway</html>", "http-502", true),
        ] {
            let e = answer(StatusCode::from_u16(status).unwrap(), &h, body).unwrap_err();
            assert_eq!((e.code(), e.is_retry()), (code, retry), "{body}");
        }
    }

    #[test]
    fn the_token_must_be_a_bot_token() {
        let ctx = ProfileContext::new("telegram.conf", "ops");
        let parse = |t: &str| -> TelegramConfig { toml::from_str(t).unwrap() };
        for bad in ["", "bot_token = \"S3CRET/../x\"", "bot_token = \"1:a b\""] {
            let e = TelegramConnector::new(&ctx, &parse(bad)).err().unwrap();
            assert_eq!(e.key.as_deref(), Some("ops.bot_token"), "{bad}");
            assert!(!e.to_string().contains("S3CRET"), "{e}");
        }
        let e = TelegramConnector::new(&ctx, &parse("bot_token = \"1:AA\"\nparse_mode = \"md\""))
            .err()
            .unwrap();
        assert_eq!(e.key.as_deref(), Some("ops.parse_mode"));
        assert!(TelegramConnector::new(&ctx, &parse("bot_token = \"123:AA-b_c\"")).is_ok());
    }

    #[test]
    fn photo_captions_are_cut_to_1024_characters_and_sides_checked() {
        let ctx = ProfileContext::new("telegram.conf", "ops");
        let t = TelegramConnector::new(
            &ctx,
            &toml::from_str::<TelegramConfig>(
                "bot_token = \"123:AA\"\ndisable_notification = true",
            )
            .unwrap(),
        )
        .unwrap();
        let img = |w, h| crate::connector::Image {
            file_name: "card.png".into(),
            mime: "image/png".into(),
            width: w,
            height: h,
            bytes: b"\x89PNG".to_vec().into(),
        };
        let msg = |content: &str| OutboxMessage {
            id: uuid::Uuid::new_v4(),
            code: "c".into(),
            agent_type: "api".into(),
            agent: "telegram.agent".into(),
            profile: "ops".into(),
            address: Some("42".into()),
            subject: None,
            content: Some(content.into()),
            label: None,
            attempt: 1,
            max_attempts: None,
            priority: 0,
            created: chrono::Utc::now(),
            images: vec![std::sync::Arc::new(img(1080, 608))],
        };
        let long = "春".repeat(2000);
        let f = t.photo_fields(&msg(&long), &img(1080, 608)).unwrap();
        let caption = f["caption"].as_str().unwrap();
        assert_eq!(caption.chars().count(), MAX_CAPTION_CHARS);
        assert!(caption.ends_with("春…"));
        assert_eq!(f["disable_notification"], true);
        assert!(!f.contains_key("parse_mode"));
        let f = t.photo_fields(&msg("  "), &img(1080, 608)).unwrap();
        assert!(!f.contains_key("caption"), "no empty caption");
        let e = t.photo_fields(&msg("x"), &img(9000, 1001)).unwrap_err();
        assert_eq!(e.code(), codes::IMAGE_TOO_LARGE.code);
    }
}
