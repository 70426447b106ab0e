//! One in-process HTTP server on 127.0.0.1:0 that is Slack, Feishu and Telegram at once, checking
//! what it receives the way the platforms do (shared/providers.md §2.6, §2.11, §2.12) and answering
//! with their real error bodies:
//!
//! - Slack Web API `POST /api/chat.postMessage`: `Authorization: Bearer` must be the bot token
//!   (none → `not_authed`, the revoked one → `token_revoked`, another → `invalid_auth`), JSON
//!   with `channel` and one of `text`/`blocks`/`attachments` (`no_text`), `blocks` an array
//!   (`invalid_blocks`); channels: `C0GENERAL` (or `general`) is open, `C0OUTSIDE` →
//!   `not_in_channel`, `C0ARCHIVED` → `is_archived`, others `channel_not_found`. HTTP 200 for all
//!   of them; 429 + `Retry-After` when scripted. OK: `{"ok":true,"channel","ts","message"}`.
//! - Slack incoming webhook `POST /services/T0TEST/B0TEST/<secret>`: another path is 404
//!   `no_service`; a body without text or blocks 400 `invalid_payload`; OK: 200 `ok` (plain text).
//! - Feishu `POST /open-apis/bot/v2/hook/<token>`: another token is 19001; with the bot's secret,
//!   `timestamp` (seconds, within an hour) and `sign` = base64(HMAC-SHA256(key = ts\nsecret,
//!   msg = "")) are required, else 19021; a `msg_type` the bot does not know or a message without
//!   its fields is 9499 (HTTP 400). OK: `{"code":0,"data":{},"msg":"success"}`.
//! - Telegram `POST /bot<token>/sendMessage`: another token is 401 `Unauthorized`; `chat_id` and
//!   `text` required, `parse_mode` one of the three; chats: positive ids and `@outboxd_test` exist,
//!   [`BLOCKED_CHAT`] → 403 blocked, [`OLD_GROUP`] → 400 with `migrate_to_chat_id` =
//!   [`SUPERGROUP`], which exists; others 400 `chat not found`. OK: `result.message_id` from 42 on.
//!   `POST /bot<token>/sendPhoto` (Bot API) takes `multipart/form-data`: text fields `chat_id`,
//!   optional `caption` (≤ 1024 characters, else 400 `message caption is too long`) and
//!   `disable_notification`, and the file part `photo` (with a filename; missing → 400 `there is no
//!   photo in the request`), which must be a PNG or JPEG (else 400 `IMAGE_PROCESS_FAILED`) of at
//!   most 10 MB (else 400 `file is too big`); same chats, scripts and answers, with
//!   `result.photo` and `result.caption`. The request's text fields are kept as [`Got::body`],
//!   the photo's bytes as [`Got::file`].
//!
//! Transient answers (rate limits, internal errors) are scripted per platform and used in order
//! by the next well-formed, authorised requests.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

/// A Telegram chat whose user blocked the bot.
pub const BLOCKED_CHAT: i64 = 666;
/// A Telegram group that became [`SUPERGROUP`].
pub const OLD_GROUP: i64 = -4242;
pub const SUPERGROUP: i64 = -1_000_000_004_242;

/// Which platform a request went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    SlackApi,
    SlackHook,
    Feishu,
    Telegram,
}

/// A scripted transient answer.
#[derive(Debug, Clone)]
pub enum Trouble {
    /// Slack: HTTP 429, `Retry-After: <secs>`, body `{"ok":false,"error":"ratelimited"}` (the
    /// webhook: plain text `rate_limited`).
    SlackRateLimited(u64),
    /// Slack: 200 `{"ok":false,"error":<error>}`.
    SlackError(&'static str),
    /// Slack webhook: this status and plain-text code.
    HookError(u16, &'static str),
    /// Feishu: 200 `{"code":<code>,"msg":<msg>,"data":{}}`.
    FeishuCode(i64, &'static str),
    /// Telegram: 429 `{"ok":false,"error_code":429,…,"parameters":{"retry_after":<secs>}}`.
    TelegramTooMany(u64),
}

/// One request the double got.
#[derive(Debug, Clone)]
pub struct Got {
    pub platform: Platform,
    pub path: String,
    pub authorization: Option<String>,
    pub content_type: String,
    pub body: Value,
    /// The file part of a multipart request (Telegram's `photo`).
    pub file: Option<Vec<u8>>,
    /// The HTTP status it was answered with.
    pub status: u16,
    /// What it was answered, as text.
    pub answer: String,
}

struct St {
    slack_token: String,
    slack_revoked: String,
    hook_path: String,
    feishu_token: String,
    feishu_secret: String,
    telegram_token: String,
    scripts: Mutex<Vec<(Platform, VecDeque<Trouble>)>>,
    got: Mutex<Vec<Got>>,
    next_id: AtomicI64,
}

/// The three platforms on one server; the credentials are random per double.
pub struct ChatDouble {
    pub url: String,
    pub slack_token: String,
    /// A token Slack revoked.
    pub slack_revoked: String,
    /// The webhook URL (a credential as a whole).
    pub hook_url: String,
    pub feishu_token: String,
    pub feishu_secret: String,
    pub telegram_token: String,
    st: Arc<St>,
    _shutdown: Arc<tokio::sync::oneshot::Sender<()>>,
}

impl ChatDouble {
    pub async fn start() -> ChatDouble {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let st = Arc::new(St {
            slack_token: format!("xoxb-1-{}", &tag[..16]),
            slack_revoked: format!("xoxb-2-{}", &tag[16..]),
            hook_path: format!("/services/T0TEST/B0TEST/hk{}", &tag[..24]),
            feishu_token: format!("fs-{}", &tag[4..28]),
            feishu_secret: format!("SEC{}", &tag[8..]),
            telegram_token: format!("7000001:AA{}", &tag[2..30]),
            scripts: Mutex::new(Vec::new()),
            got: Mutex::new(Vec::new()),
            next_id: AtomicI64::new(42),
        });
        let app = axum::Router::new().fallback(handle).with_state(st.clone());
        let (url, shutdown) = crate::common::serve(app).await;
        ChatDouble {
            hook_url: format!("{url}{}", st.hook_path),
            url,
            slack_token: st.slack_token.clone(),
            slack_revoked: st.slack_revoked.clone(),
            feishu_token: st.feishu_token.clone(),
            feishu_secret: st.feishu_secret.clone(),
            telegram_token: st.telegram_token.clone(),
            st,
            _shutdown: shutdown,
        }
    }

    /// The credentials a log, an attempt or a reply must never show.
    pub fn secrets(&self) -> Vec<String> {
        let hook_secret = self.hook_url.rsplit('/').next().unwrap().to_string();
        vec![
            self.slack_token.clone(),
            self.slack_revoked.clone(),
            hook_secret,
            self.feishu_token.clone(),
            self.feishu_secret.clone(),
            self.telegram_token.clone(),
            self.telegram_token.split(':').nth(1).unwrap().to_string(),
        ]
    }

    /// Answers of the next well-formed requests to `p`, in order.
    pub fn script(&self, p: Platform, troubles: impl IntoIterator<Item = Trouble>) {
        let mut s = self.st.scripts.lock().unwrap();
        match s.iter_mut().find(|(q, _)| *q == p) {
            Some((_, v)) => v.extend(troubles),
            None => s.push((p, troubles.into_iter().collect())),
        }
    }

    pub fn got(&self, p: Platform) -> Vec<Got> {
        self.st
            .got
            .lock()
            .unwrap()
            .iter()
            .filter(|g| g.platform == p)
            .cloned()
            .collect()
    }
}

fn next_trouble(st: &St, p: Platform) -> Option<Trouble> {
    st.scripts
        .lock()
        .unwrap()
        .iter_mut()
        .find(|(q, _)| *q == p)
        .and_then(|(_, v)| v.pop_front())
}

async fn handle(
    axum::extract::State(st): axum::extract::State<Arc<St>>,
    uri: Uri,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let path = uri.path().to_string();
    let platform = if path.starts_with("/api/") {
        Platform::SlackApi
    } else if path.starts_with("/services/") {
        Platform::SlackHook
    } else if path.starts_with("/open-apis/") {
        Platform::Feishu
    } else {
        Platform::Telegram
    };
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let (parsed, file) = match content_type.strip_prefix("multipart/form-data; boundary=") {
        Some(boundary) => form_parts(boundary, &body),
        None => (serde_json::from_slice(&body).unwrap_or(Value::Null), None),
    };
    let (status, extra, answer) = match platform {
        Platform::SlackApi => slack_api(&st, &path, &headers, &parsed),
        Platform::SlackHook => slack_hook(&st, &path, &parsed),
        Platform::Feishu => feishu(&st, &path, &parsed),
        Platform::Telegram => telegram(&st, &path, &parsed, file.as_deref()),
    };
    st.got.lock().unwrap().push(Got {
        platform,
        path,
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        content_type,
        body: parsed,
        file,
        status,
        answer: answer.clone(),
    });
    let mut r = (StatusCode::from_u16(status).unwrap(), answer).into_response();
    let ct = if platform == Platform::SlackHook {
        "text/plain"
    } else {
        "application/json"
    };
    r.headers_mut().insert("content-type", ct.parse().unwrap());
    for (k, v) in extra {
        r.headers_mut().insert(k, v.parse().unwrap());
    }
    r
}

type Answer = (u16, Vec<(&'static str, String)>, String);

/// A `multipart/form-data` body: its text fields as a JSON object of strings, and the bytes of
/// its file part (the one with a filename; its field name under `"_file_field"`).
fn form_parts(boundary: &str, body: &[u8]) -> (Value, Option<Vec<u8>>) {
    let delim = format!("--{boundary}");
    let find = |hay: &[u8], needle: &[u8], from: usize| {
        hay.get(from..)?
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|p| p + from)
    };
    let mut fields = serde_json::Map::new();
    let mut file = None;
    let Some(mut pos) = find(body, delim.as_bytes(), 0) else {
        return (Value::Null, None);
    };
    loop {
        let start = pos + delim.len();
        if body[start..].starts_with(b"--") {
            break;
        }
        let Some(next) = find(body, delim.as_bytes(), start) else {
            break;
        };
        let part = &body[start..next];
        let part = part.strip_prefix(b"\r\n").unwrap_or(part);
        let part = part.strip_suffix(b"\r\n").unwrap_or(part);
        let Some(split) = find(part, b"\r\n\r\n", 0) else {
            break;
        };
        let head = String::from_utf8_lossy(&part[..split]).to_string();
        let data = &part[split + 4..];
        let param = |name: &str| {
            let start = head.find(&format!("{name}=\""))? + name.len() + 2;
            let end = head[start..].find('"')? + start;
            Some(head[start..end].to_string())
        };
        if let Some(name) = param("name") {
            if param("filename").is_some() {
                fields.insert("_file_field".into(), name.into());
                file = Some(data.to_vec());
            } else {
                fields.insert(name, String::from_utf8_lossy(data).into());
            }
        }
        pos = next;
    }
    (Value::Object(fields), file)
}

fn slack_error(e: &str) -> Answer {
    (200, vec![], json!({"ok": false, "error": e}).to_string())
}

fn slack_api(st: &St, path: &str, headers: &HeaderMap, b: &Value) -> Answer {
    if path != "/api/chat.postMessage" {
        return (404, vec![], "".into());
    }
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match bearer {
        None => return slack_error("not_authed"),
        Some(t) if t == st.slack_revoked => return slack_error("token_revoked"),
        Some(t) if t != st.slack_token => return slack_error("invalid_auth"),
        _ => {}
    }
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("application/json") {
        return slack_error("invalid_arguments");
    }
    let Some(channel) = b["channel"].as_str() else {
        return slack_error("channel_not_found");
    };
    let has = |k: &str| match &b[k] {
        Value::Array(a) => !a.is_empty(),
        Value::String(s) => !s.is_empty(),
        _ => false,
    };
    if !(has("text") || has("blocks") || has("attachments")) {
        return slack_error("no_text");
    }
    if !b["blocks"].is_null() && !b["blocks"].is_array() {
        return slack_error("invalid_blocks");
    }
    match next_trouble(st, Platform::SlackApi) {
        Some(Trouble::SlackRateLimited(secs)) => {
            return (
                429,
                vec![("retry-after", secs.to_string())],
                json!({"ok": false, "error": "ratelimited"}).to_string(),
            )
        }
        Some(Trouble::SlackError(e)) => return slack_error(e),
        Some(other) => panic!("not a Slack API trouble: {other:?}"),
        None => {}
    }
    let id = match channel {
        "C0GENERAL" | "general" | "#general" => "C0GENERAL",
        "C0OUTSIDE" => return slack_error("not_in_channel"),
        "C0ARCHIVED" => return slack_error("is_archived"),
        _ => return slack_error("channel_not_found"),
    };
    let n = st.next_id.fetch_add(1, Ordering::SeqCst);
    let ts = format!("1700000000.{n:06}");
    let answer = json!({
        "ok": true,
        "channel": id,
        "ts": ts,
        "message": {"type": "message", "text": b["text"], "ts": ts, "bot_id": "B0TEST"},
    });
    (200, vec![], answer.to_string())
}

fn slack_hook(st: &St, path: &str, b: &Value) -> Answer {
    if path != st.hook_path {
        return (404, vec![], "no_service".into());
    }
    let has = |k: &str| match &b[k] {
        Value::Array(a) => !a.is_empty(),
        Value::String(s) => !s.is_empty(),
        _ => false,
    };
    if !(has("text") || has("blocks") || has("attachments")) {
        return (400, vec![], "invalid_payload".into());
    }
    match next_trouble(st, Platform::SlackHook) {
        Some(Trouble::SlackRateLimited(secs)) => (
            429,
            vec![("retry-after", secs.to_string())],
            "rate_limited".into(),
        ),
        Some(Trouble::HookError(status, text)) => (status, vec![], text.into()),
        Some(other) => panic!("not a Slack webhook trouble: {other:?}"),
        None => (200, vec![], "ok".into()),
    }
}

fn feishu_code(http: u16, code: i64, msg: &str) -> Answer {
    (
        http,
        vec![],
        json!({"code": code, "data": {}, "msg": msg}).to_string(),
    )
}

/// Feishu's recipe: the concatenation is the key, the message is empty.
pub fn feishu_sign(ts: i64, secret: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(format!("{ts}\n{secret}").as_bytes()).unwrap();
    mac.update(b"");
    B64.encode(mac.finalize().into_bytes())
}

fn feishu(st: &St, path: &str, b: &Value) -> Answer {
    if path != format!("/open-apis/bot/v2/hook/{}", st.feishu_token) {
        return feishu_code(
            200,
            19001,
            "param invalid: incoming webhook access token invalid",
        );
    }
    let ts = match &b["timestamp"] {
        Value::String(s) => s.parse::<i64>().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    };
    let signed = ts.is_some_and(|ts| {
        (chrono::Utc::now().timestamp() - ts).abs() <= 3600
            && b["sign"].as_str() == Some(feishu_sign(ts, &st.feishu_secret).as_str())
    });
    if !signed {
        return feishu_code(
            200,
            19021,
            "sign match fail or timestamp is not within one hour from current time",
        );
    }
    let ok = match b["msg_type"].as_str() {
        Some("text") => b["content"]["text"].as_str().is_some_and(|t| !t.is_empty()),
        Some("post") => b["content"]["post"].is_object(),
        Some("interactive") => b["card"].is_object(),
        Some("image") => b["content"]["image_key"].is_string(),
        Some("share_chat") => b["content"]["share_chat_id"].is_string(),
        _ => false,
    };
    if !ok {
        return feishu_code(400, 9499, "Bad Request");
    }
    match next_trouble(st, Platform::Feishu) {
        Some(Trouble::FeishuCode(code, msg)) => feishu_code(200, code, msg),
        Some(other) => panic!("not a Feishu trouble: {other:?}"),
        None => feishu_code(200, 0, "success"),
    }
}

fn telegram_error(code: u16, description: &str, parameters: Option<Value>) -> Answer {
    let mut v = json!({"ok": false, "error_code": code, "description": description});
    if let Some(p) = parameters {
        v["parameters"] = p;
    }
    (code, vec![], v.to_string())
}

fn telegram(st: &St, path: &str, b: &Value, file: Option<&[u8]>) -> Answer {
    let Some(rest) = path.strip_prefix(&format!("/bot{}/", st.telegram_token)) else {
        return telegram_error(401, "Unauthorized", None);
    };
    let photo = match rest {
        "sendMessage" => false,
        "sendPhoto" => true,
        _ => return telegram_error(404, "Not Found", None),
    };
    let chat = match &b["chat_id"] {
        Value::Number(n) => n.as_i64().map(|n| n.to_string()),
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        _ => None,
    };
    let Some(chat) = chat else {
        return telegram_error(400, "Bad Request: chat_id is empty", None);
    };
    if photo {
        let Some(bytes) = file.filter(|_| b["_file_field"] == "photo") else {
            return telegram_error(400, "Bad Request: there is no photo in the request", None);
        };
        if !(bytes.starts_with(b"\x89PNG\r\n\x1a\n") || bytes.starts_with(b"\xff\xd8\xff")) {
            return telegram_error(400, "Bad Request: IMAGE_PROCESS_FAILED", None);
        }
        if bytes.len() > 10 * 1024 * 1024 {
            return telegram_error(400, "Bad Request: file is too big", None);
        }
        if b["caption"]
            .as_str()
            .is_some_and(|c| c.chars().count() > 1024)
        {
            return telegram_error(400, "Bad Request: message caption is too long", None);
        }
    } else if !b["text"].as_str().is_some_and(|t| !t.trim().is_empty()) {
        return telegram_error(400, "Bad Request: message text is empty", None);
    }
    if let Some(p) = b.get("parse_mode").filter(|p| !p.is_null()) {
        if !["MarkdownV2", "HTML", "Markdown"].contains(&p.as_str().unwrap_or("")) {
            return telegram_error(400, "Bad Request: unsupported parse_mode", None);
        }
    }
    if let Some(Trouble::TelegramTooMany(secs)) = next_trouble(st, Platform::Telegram) {
        return telegram_error(
            429,
            &format!("Too Many Requests: retry after {secs}"),
            Some(json!({"retry_after": secs})),
        );
    }
    let id: Option<i64> = chat.parse().ok();
    match id {
        Some(BLOCKED_CHAT) => {
            return telegram_error(403, "Forbidden: bot was blocked by the user", None)
        }
        Some(OLD_GROUP) => {
            return telegram_error(
                400,
                "Bad Request: group chat was upgraded to a supergroup chat",
                Some(json!({"migrate_to_chat_id": SUPERGROUP})),
            )
        }
        Some(SUPERGROUP) => {}
        Some(n) if n > 0 => {}
        None if chat == "@outboxd_test" => {}
        _ => return telegram_error(400, "Bad Request: chat not found", None),
    }
    let n = st.next_id.fetch_add(1, Ordering::SeqCst);
    let chat_json = match id {
        Some(i) => json!({"id": i, "type": if i > 0 { "private" } else { "supergroup" }}),
        None => json!({"id": -1_000_000_000_777i64, "type": "channel", "username": "outboxd_test"}),
    };
    let mut answer = json!({
        "ok": true,
        "result": {
            "message_id": n,
            "from": {"id": 7000000, "is_bot": true, "first_name": "outboxd test"},
            "chat": chat_json,
            "date": chrono::Utc::now().timestamp(),
        }
    });
    if photo {
        answer["result"]["photo"] = json!([{"file_id": format!("PHOTO-{n}"),
            "file_unique_id": format!("u{n}"), "file_size": file.map_or(0, <[u8]>::len)}]);
        if let Some(c) = b.get("caption") {
            answer["result"]["caption"] = c.clone();
        }
    } else {
        answer["result"]["text"] = b["text"].clone();
    }
    (200, vec![], answer.to_string())
}
