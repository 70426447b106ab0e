//! An in-process double of DingTalk's `oapi` host (shared/providers.md §2.4, §2.5) on
//! 127.0.0.1:0, checking what it receives as DingTalk does:
//!
//! - `POST /robot/send`: the robot's `access_token` (else 300001), and when the robot signs, the
//!   `timestamp` (milliseconds, within one hour of the double's clock, else 310000 `invalid
//!   timestamp`) and the `sign` (the form-decoded query value must equal
//!   base64(HMAC-SHA256(secret, timestamp + "\n" + secret)), else 310000 `sign not match`); the
//!   JSON body and the fields of its msgtype (else 40035). `too_fast(n)` answers 130101 n times.
//! - `GET /gettoken`: appkey/appsecret (else 40089), hands out `app-token-<n>`;
//!   `expire_tokens()` makes the tokens handed out so far answer 42001.
//! - `asyncsend_v2`, `getsendresult`, `chat/create`, `chat/send`, `media/upload` (multipart
//!   field `media`): the access token (40014 unknown, 42001 expired), `agent_id`, at least one
//!   recipient (1430000), known task ids, chat ids and media ids. getsendresult sorts users by
//!   name: `ghost*` invalid, `busy*` forbidden (143105), `fail*` failed, the rest unread.
//!   `fail_next(path, errcode, errmsg)` answers the next authorized call of `path` with that
//!   error (a refusal the double has no rule for, e.g. chat/create's unknown owner). An
//!   `image` upload must be JPG, GIF, PNG or BMP (by its first bytes; else 40005) of at most
//!   20 MB (else 40006). `fail_uploads` / `fail_sends` script the next uploads' / work
//!   notifications' errcodes.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

pub const ROBOT_TOKEN: &str = "robot-access-token-6f1e0c";
pub const ROBOT_SECRET: &str = "SECdouble-robot-secret-9a7b";
pub const APP_KEY: &str = "dingappkey123";
pub const APP_SECRET: &str = "app-secret-value-77c1d2";
pub const AGENT_ID: i64 = 153858650;

/// One request the double accepted for processing.
#[derive(Debug, Clone)]
pub struct Call {
    pub path: String,
    /// The query, form-decoded.
    pub query: BTreeMap<String, String>,
    pub raw_query: String,
    pub body: Value,
    /// The bytes of an uploaded `media` part.
    pub media: Option<Vec<u8>>,
    /// What the double answered.
    pub answer: Value,
}

#[derive(Default)]
struct Inner {
    calls: Vec<Call>,
    too_fast: u32,
    token_requests: u32,
    live_tokens: HashSet<String>,
    expired_tokens: HashSet<String>,
    next: u64,
    tasks: BTreeMap<String, Value>,
    chats: BTreeMap<String, Value>,
    media: BTreeMap<String, Vec<u8>>,
    /// Errcodes the next uploads / work notifications answer (after their checks).
    upload_errors: std::collections::VecDeque<i64>,
    send_errors: std::collections::VecDeque<i64>,
    /// Echo the received query in robot error messages (a provider that leaks: redaction test).
    echo: bool,
    /// The next call of a path answers this error.
    fail_next: BTreeMap<String, Value>,
}

#[derive(Clone)]
pub struct DingtalkDouble {
    pub url: String,
    inner: Arc<Mutex<Inner>>,
    _shutdown: Arc<tokio::sync::oneshot::Sender<()>>,
}

fn err(code: i64, msg: &str) -> Value {
    json!({"errcode": code, "errmsg": msg})
}

fn robot_sign(secret: &str, ts: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{ts}\n{secret}").as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// The robot's field checks per msgtype.
fn robot_body_error(b: &Value) -> Option<Value> {
    let need = |part: &str, keys: &[&str]| {
        keys.iter().all(|k| {
            b.pointer(&format!("/{part}/{k}"))
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty())
        })
    };
    let ok = match b.get("msgtype").and_then(Value::as_str) {
        Some("text") => need("text", &["content"]),
        Some("markdown") => need("markdown", &["title", "text"]),
        Some("link") => need("link", &["title", "text", "messageUrl"]),
        Some("actionCard") => {
            need("actionCard", &["title", "text"])
                && (need("actionCard", &["singleTitle", "singleURL"])
                    || b.pointer("/actionCard/btns")
                        .and_then(Value::as_array)
                        .is_some_and(|l| !l.is_empty()))
        }
        Some("feedCard") => b.pointer("/feedCard/links").is_some(),
        _ => false,
    };
    (!ok).then(|| err(40035, "缺少参数 json"))
}

/// The bytes of the multipart part named `field`.
fn multipart_part(content_type: &str, body: &[u8], field: &str) -> Option<Vec<u8>> {
    let boundary = content_type.split("boundary=").nth(1)?.trim_matches('"');
    let delim = format!("--{boundary}");
    let text = body;
    let find = |hay: &[u8], needle: &[u8], from: usize| {
        hay[from..]
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|p| p + from)
    };
    let mut pos = find(text, delim.as_bytes(), 0)?;
    loop {
        let start = pos + delim.len();
        if text[start..].starts_with(b"--") {
            return None;
        }
        let next = find(text, delim.as_bytes(), start)?;
        let part = &text[start..next];
        let split = find(part, b"\r\n\r\n", 0)?;
        let headers = String::from_utf8_lossy(&part[..split]);
        if headers.contains(&format!("name=\"{field}\"")) {
            let data = &part[split + 4..];
            return Some(data.strip_suffix(b"\r\n").unwrap_or(data).to_vec());
        }
        pos = next;
    }
}

impl DingtalkDouble {
    pub async fn start() -> DingtalkDouble {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tx = crate::common::serve_on(listener, app);
        DingtalkDouble {
            url: format!("http://{addr}"),
            inner,
            _shutdown: tx,
        }
    }

    /// The next `n` robot messages are answered 130101.
    pub fn too_fast(&self, n: u32) {
        self.inner.lock().unwrap().too_fast = n;
    }

    /// The next authorized call of `path` answers `{"errcode": code, "errmsg": msg}`.
    pub fn fail_next(&self, path: &str, code: i64, msg: &str) {
        self.inner
            .lock()
            .unwrap()
            .fail_next
            .insert(path.to_string(), err(code, msg));
    }

    /// The next uploads answer these errcodes, in order (after the token and form checks).
    pub fn fail_uploads(&self, codes: &[i64]) {
        self.inner.lock().unwrap().upload_errors.extend(codes);
    }

    /// The next work notifications answer these errcodes, in order (after their checks).
    pub fn fail_sends(&self, codes: &[i64]) {
        self.inner.lock().unwrap().send_errors.extend(codes);
    }

    pub fn echo_queries(&self) {
        self.inner.lock().unwrap().echo = true;
    }

    /// Every app token handed out so far now answers 42001 (expired).
    pub fn expire_tokens(&self) {
        let mut i = self.inner.lock().unwrap();
        let live: Vec<String> = i.live_tokens.drain().collect();
        i.expired_tokens.extend(live);
    }

    pub fn token_requests(&self) -> u32 {
        self.inner.lock().unwrap().token_requests
    }

    pub fn calls(&self, path: &str) -> Vec<Call> {
        self.inner
            .lock()
            .unwrap()
            .calls
            .iter()
            .filter(|c| c.path == path)
            .cloned()
            .collect()
    }

    pub fn all_calls(&self) -> Vec<Call> {
        self.inner.lock().unwrap().calls.clone()
    }

    pub fn chats(&self) -> BTreeMap<String, Value> {
        self.inner.lock().unwrap().chats.clone()
    }
}

async fn handle(
    State(inner): State<Arc<Mutex<Inner>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let raw_query = uri.query().unwrap_or("").to_string();
    let query: BTreeMap<String, String> = url::form_urlencoded::parse(raw_query.as_bytes())
        .into_owned()
        .collect();
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let path = uri.path().to_string();
    let mut i = inner.lock().unwrap();
    let mut media = None;
    let json_body = || serde_json::from_slice::<Value>(&body).ok();
    let answer = match (method.as_str(), path.as_str()) {
        ("POST", "/robot/send") => robot(&mut i, &query, &raw_query, &content_type, json_body()),
        ("GET", "/gettoken") => {
            i.token_requests += 1;
            if query.get("appkey").map(String::as_str) != Some(APP_KEY)
                || query.get("appsecret").map(String::as_str) != Some(APP_SECRET)
            {
                err(40089, "不合法的corpid或corpsecret")
            } else {
                let t = format!("app-token-{}", i.token_requests);
                i.live_tokens.insert(t.clone());
                json!({"errcode": 0, "errmsg": "ok", "access_token": t, "expires_in": 7200})
            }
        }
        ("POST", p) => match token_error(&i, &query) {
            Some(e) => e,
            None if i.fail_next.contains_key(p) => i.fail_next.remove(p).unwrap(),
            None => match p {
                "/media/upload" => {
                    media = multipart_part(&content_type, &body, "media");
                    match (&media, query.get("type").map(String::as_str)) {
                        // Images: jpg, gif, png or bmp, at most 20 MB.
                        (Some(m), Some("image"))
                            if !m.is_empty()
                                && ![&b"\x89PNG"[..], b"\xff\xd8", b"GIF8", b"BM"]
                                    .iter()
                                    .any(|magic| m.starts_with(magic)) =>
                        {
                            err(40005, "不合法的文件类型")
                        }
                        (Some(m), Some("image")) if m.len() > 20 * 1024 * 1024 => {
                            err(40006, "不合法的文件大小")
                        }
                        (Some(m), Some("image" | "voice" | "video" | "file"))
                            if !m.is_empty() && !i.upload_errors.is_empty() =>
                        {
                            let code = i.upload_errors.pop_front().unwrap();
                            err(code, &format!("scripted {code}"))
                        }
                        (Some(m), Some("image" | "voice" | "video" | "file")) if !m.is_empty() => {
                            i.next += 1;
                            let id = format!("@lAXP{}", i.next);
                            i.media.insert(id.clone(), m.clone());
                            json!({"errcode":0,"errmsg":"ok","media_id":id,"created_at":1726589815213u64,"type":query["type"]})
                        }
                        _ => err(40035, "缺少参数 media"),
                    }
                }
                _ => match json_body() {
                    None => err(40035, "缺少参数 json"),
                    Some(b) => app_call(&mut i, p, &b),
                },
            },
        },
        _ => err(404, "no such API"),
    };
    i.calls.push(Call {
        path,
        query,
        raw_query,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        media,
        answer: answer.clone(),
    });
    ([("content-type", "application/json")], answer.to_string()).into_response()
}

fn robot(
    i: &mut Inner,
    query: &BTreeMap<String, String>,
    raw_query: &str,
    content_type: &str,
    body: Option<Value>,
) -> Value {
    let leak = |m: &str| {
        if i.echo {
            format!("{m} ({raw_query})")
        } else {
            m.to_string()
        }
    };
    if query.get("access_token").map(String::as_str) != Some(ROBOT_TOKEN) {
        return err(300001, &leak("token is not exist"));
    }
    let (Some(ts), Some(sign)) = (query.get("timestamp"), query.get("sign")) else {
        return err(310000, &leak("sign not match"));
    };
    let Ok(ms) = ts.parse::<i64>() else {
        return err(310000, "invalid timestamp");
    };
    if (chrono::Utc::now().timestamp_millis() - ms).abs() > 3_600_000 {
        return err(310000, "invalid timestamp");
    }
    if *sign != robot_sign(ROBOT_SECRET, ts) {
        return err(310000, &leak("sign not match"));
    }
    if !content_type.starts_with("application/json") {
        return err(40035, "缺少参数 json");
    }
    let Some(body) = body else {
        return err(40035, "缺少参数 json");
    };
    if let Some(e) = robot_body_error(&body) {
        return e;
    }
    if i.too_fast > 0 {
        i.too_fast -= 1;
        return err(130101, "send too fast, exceed 20 times per minute");
    }
    err(0, "ok")
}

fn token_error(i: &Inner, query: &BTreeMap<String, String>) -> Option<Value> {
    let t = query.get("access_token").map(String::as_str).unwrap_or("");
    if i.live_tokens.contains(t) {
        None
    } else if i.expired_tokens.contains(t) {
        Some(err(42001, "access_token超时"))
    } else {
        Some(err(40014, "不合法的access_token"))
    }
}

fn msg_error(i: &Inner, msg: Option<&Value>) -> Option<Value> {
    let Some(msg) = msg else {
        return Some(err(40035, "缺少参数 msg"));
    };
    let t = msg.get("msgtype").and_then(Value::as_str).unwrap_or("");
    if msg.get(t).is_none() {
        return Some(err(40035, "缺少参数 msgtype"));
    }
    if matches!(t, "image" | "file" | "voice") {
        let id = msg[t].get("media_id").and_then(Value::as_str).unwrap_or("");
        if !i.media.contains_key(id) {
            return Some(err(40007, "不合法的媒体文件id"));
        }
    }
    None
}

fn app_call(i: &mut Inner, path: &str, b: &Value) -> Value {
    match path {
        "/topapi/message/corpconversation/asyncsend_v2" => {
            if b.get("agent_id").and_then(Value::as_i64) != Some(AGENT_ID) {
                return err(40056, "不合法的agentid");
            }
            if let Some(e) = msg_error(i, b.get("msg")) {
                return e;
            }
            let users = b.get("userid_list").and_then(Value::as_str).unwrap_or("");
            let depts = b.get("dept_id_list").and_then(Value::as_str).unwrap_or("");
            let all = b
                .get("to_all_user")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            if users.is_empty() && depts.is_empty() && !all {
                return err(1430000, "接收者为空");
            }
            if let Some(code) = i.send_errors.pop_front() {
                return err(code, &format!("scripted {code}"));
            }
            i.next += 1;
            let task = 256271667500 + i.next;
            i.tasks.insert(task.to_string(), b.clone());
            json!({"errcode":0,"errmsg":"ok","task_id":task,"request_id":format!("req{task}")})
        }
        "/topapi/message/corpconversation/getsendresult" => {
            if b.get("agent_id").and_then(Value::as_i64) != Some(AGENT_ID) {
                return err(40056, "不合法的agentid");
            }
            let task = b.get("task_id").map(|t| match t {
                Value::String(s) => s.clone(),
                o => o.to_string(),
            });
            let Some(sent) = task.and_then(|t| i.tasks.get(&t).cloned()) else {
                return err(40035, "task_id不存在");
            };
            let users: Vec<&str> = sent
                .get("userid_list")
                .and_then(Value::as_str)
                .unwrap_or("")
                .split(',')
                .filter(|u| !u.is_empty())
                .collect();
            let pick = |p: &str| -> Vec<&str> {
                users.iter().copied().filter(|u| u.starts_with(p)).collect()
            };
            let rest: Vec<&str> = users
                .iter()
                .copied()
                .filter(|u| !["ghost", "busy", "fail"].iter().any(|p| u.starts_with(p)))
                .collect();
            let forbidden: Vec<Value> = pick("busy")
                .iter()
                .map(|u| json!({"code":"143105","count":500,"userid":u}))
                .collect();
            json!({"errcode":0,"errmsg":"ok","send_result":{
                "invalid_user_id_list": pick("ghost"),
                "forbidden_user_id_list": pick("busy"),
                "failed_user_id_list": pick("fail"),
                "read_user_id_list": [],
                "unread_user_id_list": rest,
                "invalid_dept_id_list": [],
                "forbidden_list": forbidden
            }})
        }
        "/chat/create" => {
            let name = b.get("name").and_then(Value::as_str).unwrap_or("");
            let owner = b.get("owner").and_then(Value::as_str).unwrap_or("");
            if name.is_empty()
                || owner.is_empty()
                || !b.get("useridlist").is_some_and(Value::is_array)
            {
                return err(40035, "缺少参数 name/owner/useridlist");
            }
            i.next += 1;
            let id = format!("chat{:032x}", i.next);
            i.chats.insert(id.clone(), b.clone());
            json!({"errcode":0,"errmsg":"ok","chatid":id,"openConversationId":format!("cid{}", i.next),"conversationTag":2})
        }
        "/chat/send" => {
            let chat = b.get("chatid").and_then(Value::as_str).unwrap_or("");
            if !i.chats.contains_key(chat) {
                return err(34019, "chatid不存在");
            }
            if let Some(e) = msg_error(i, b.get("msg")) {
                return e;
            }
            i.next += 1;
            json!({"errcode":0,"errmsg":"ok","messageId":format!("msg{}", i.next)})
        }
        _ => err(404, "no such API"),
    }
}
