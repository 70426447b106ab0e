//! In-process doubles of the WeChat Official Account API, the WeCom app API and the WeCom group
//! robot, on one server on 127.0.0.1:0, checking what they receive the way the platforms do
//! (shared/providers.md §2.1–2.3):
//!
//! - WeChat: `GET /cgi-bin/token` (the classic call) is counted and refused; `POST
//!   /cgi-bin/stable_token` checks grant type, appid and secret, and with `force_refresh: false`
//!   returns the current token (a new one only when there is none valid); `POST
//!   /cgi-bin/message/template/send?access_token=` answers 40001 for anything but the current
//!   token, 47003 for a malformed body, sends a (touser, client_msg_id) pair once.
//! - WeCom: `GET /cgi-bin/gettoken?corpid&corpsecret` (same token within validity); `POST
//!   /cgi-bin/media/upload?access_token&type` parses the multipart form (field `media`, with a
//!   filename, `filelength` and the part's content type) and hands out a media_id; an `image`
//!   must be JPG or PNG (by its first bytes; else 40005) of at most 10 MB (else 40006); `POST /cgi-bin/message/send` checks the token (40014),
//!   `agentid`, the msgtype's part, media ids (40007), lists unknown users in `invaliduser` and
//!   answers 81013 when no recipient is valid.
//! - Robot: `POST /cgi-bin/webhook/send?key=` checks the key (93000) and an image's MD5 against
//!   its base64 bytes (301019), and that it is a JPG or PNG (40005) of at most 2 MB before base64
//!   (40009).
//!
//! Each service can be scripted to answer error codes next (after the token check), and `echo`
//! makes every error message repeat the credential it got (a careless provider), for leak tests.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use base64::Engine as _;
use serde_json::{json, Value};

type Q = Query<HashMap<String, String>>;

/// A file WeCom received by `media/upload`.
#[derive(Debug, Clone, PartialEq)]
pub struct Upload {
    pub kind: String,
    pub filename: String,
    /// The part's `Content-Type`.
    pub content_type: String,
    /// The part's `filelength` parameter.
    pub filelength: Option<usize>,
    pub bytes: Vec<u8>,
}

/// JPG or PNG, by the first bytes.
fn jpg_or_png(b: &[u8]) -> bool {
    b.starts_with(b"\x89PNG\r\n\x1a\n") || b.starts_with(b"\xff\xd8\xff")
}

#[derive(Default)]
struct Service {
    token: Mutex<Option<String>>,
    token_calls: AtomicUsize,
    reject_all: AtomicBool,
    script: Mutex<VecDeque<i64>>,
    sent: Mutex<Vec<Value>>,
    /// Requests refused for a stale or unknown token.
    rejected: AtomicUsize,
}

impl Service {
    fn current_or_new(&self) -> String {
        self.token_calls.fetch_add(1, Ordering::SeqCst);
        let mut t = self.token.lock().unwrap();
        t.get_or_insert_with(|| format!("TOKEN-{}", uuid::Uuid::new_v4().simple()))
            .clone()
    }

    fn token_ok(&self, q: &HashMap<String, String>) -> bool {
        let ok = !self.reject_all.load(Ordering::SeqCst)
            && q.get("access_token").is_some()
            && self.token.lock().unwrap().as_ref() == q.get("access_token");
        if !ok {
            self.rejected.fetch_add(1, Ordering::SeqCst);
        }
        ok
    }

    fn scripted(&self) -> Option<i64> {
        self.script.lock().unwrap().pop_front()
    }
}

struct St {
    appid: String,
    secret: String,
    corpid: String,
    corpsecret: String,
    agentid: i64,
    bot_key: String,
    wx: Service,
    classic_calls: AtomicUsize,
    force_refresh: Mutex<Vec<Value>>,
    wx_dedup: Mutex<HashMap<(String, String), u64>>,
    wc: Service,
    users: HashSet<&'static str>,
    parties: HashSet<&'static str>,
    media: Mutex<HashMap<String, Upload>>,
    uploads: Mutex<Vec<Upload>>,
    /// Errcodes the next well-formed uploads answer.
    upload_script: Mutex<VecDeque<i64>>,
    bot: Service,
    echo: AtomicBool,
    next: AtomicUsize,
    /// WeCom and robot requests received (any answer).
    hits: AtomicUsize,
}

impl St {
    fn err(&self, code: i64, msg: &str, credential: &str) -> Response {
        let mut m = msg.to_string();
        if self.echo.load(Ordering::SeqCst) {
            m.push_str(&format!(" (you sent {credential})"));
        }
        Json(json!({"errcode": code, "errmsg": m})).into_response()
    }

    fn n(&self) -> usize {
        self.next.fetch_add(1, Ordering::SeqCst) + 1
    }
}

/// The three doubles on one local server.
pub struct WeixinDouble {
    /// Base URL of all three APIs (the profiles' `base_url`).
    pub url: String,
    pub appid: String,
    pub secret: String,
    pub corpid: String,
    pub corpsecret: String,
    pub agentid: i64,
    pub bot_key: String,
    st: Arc<St>,
    _shutdown: Arc<tokio::sync::oneshot::Sender<()>>,
}

impl WeixinDouble {
    pub async fn start() -> WeixinDouble {
        let tag = || uuid::Uuid::new_v4().simple().to_string();
        let st = Arc::new(St {
            appid: format!("wx{}", &tag()[..16]),
            secret: format!("WXSECRET{}", tag()),
            corpid: format!("ww{}", &tag()[..16]),
            corpsecret: format!("CORPSECRET{}", tag()),
            agentid: 1000002,
            bot_key: format!("BOTKEY{}", tag()),
            wx: Service::default(),
            classic_calls: Default::default(),
            force_refresh: Default::default(),
            wx_dedup: Default::default(),
            wc: Service::default(),
            users: ["zhangsan", "lisi"].into_iter().collect(),
            parties: ["1", "2"].into_iter().collect(),
            media: Default::default(),
            uploads: Default::default(),
            upload_script: Default::default(),
            hits: Default::default(),
            bot: Service::default(),
            echo: Default::default(),
            next: Default::default(),
        });
        let app = axum::Router::new()
            .route("/cgi-bin/token", get(classic_token))
            .route("/cgi-bin/stable_token", post(stable_token))
            .route("/cgi-bin/message/template/send", post(template_send))
            .route("/cgi-bin/gettoken", get(gettoken))
            .route("/cgi-bin/media/upload", post(media_upload))
            .route("/cgi-bin/message/send", post(message_send))
            .route("/cgi-bin/webhook/send", post(webhook_send))
            .with_state(st.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let tx = crate::common::serve_on(listener, app);
        WeixinDouble {
            url,
            appid: st.appid.clone(),
            secret: st.secret.clone(),
            corpid: st.corpid.clone(),
            corpsecret: st.corpsecret.clone(),
            agentid: st.agentid,
            bot_key: st.bot_key.clone(),
            st,
            _shutdown: tx,
        }
    }

    /// Template messages WeChat accepted (bodies), once per (touser, client_msg_id).
    pub fn wechat_sent(&self) -> Vec<Value> {
        self.st.wx.sent.lock().unwrap().clone()
    }
    pub fn stable_token_calls(&self) -> usize {
        self.st.wx.token_calls.load(Ordering::SeqCst)
    }
    pub fn classic_token_calls(&self) -> usize {
        self.st.classic_calls.load(Ordering::SeqCst)
    }
    /// The `force_refresh` of every stable_token call (null when absent).
    pub fn force_refresh_seen(&self) -> Vec<Value> {
        self.st.force_refresh.lock().unwrap().clone()
    }
    /// Sends refused with 40001 (stale or unknown token).
    pub fn wechat_rejected(&self) -> usize {
        self.st.wx.rejected.load(Ordering::SeqCst)
    }
    /// The current WeChat token expires: sends with it get 40001, stable_token issues a new one.
    pub fn expire_wechat_token(&self) {
        *self.st.wx.token.lock().unwrap() = None;
    }
    /// Every WeChat send answers 40001, whatever the token.
    pub fn reject_every_wechat_token(&self, on: bool) {
        self.st.wx.reject_all.store(on, Ordering::SeqCst);
    }
    /// The next WeChat sends answer these errcodes.
    pub fn script_wechat(&self, codes: &[i64]) {
        self.st.wx.script.lock().unwrap().extend(codes);
    }
    pub fn current_tokens(&self) -> Vec<String> {
        [&self.st.wx, &self.st.wc]
            .iter()
            .filter_map(|s| s.token.lock().unwrap().clone())
            .collect()
    }

    pub fn wecom_sent(&self) -> Vec<Value> {
        self.st.wc.sent.lock().unwrap().clone()
    }
    pub fn gettoken_calls(&self) -> usize {
        self.st.wc.token_calls.load(Ordering::SeqCst)
    }
    pub fn expire_wecom_token(&self) {
        *self.st.wc.token.lock().unwrap() = None;
    }
    pub fn script_wecom(&self, codes: &[i64]) {
        self.st.wc.script.lock().unwrap().extend(codes);
    }
    /// The next well-formed `media/upload` calls answer these errcodes, in order.
    #[allow(dead_code)] // tests/cards.rs
    pub fn script_upload(&self, codes: &[i64]) {
        self.st.upload_script.lock().unwrap().extend(codes);
    }

    /// How many requests the WeCom app and robot endpoints (token, upload, send) received.
    #[allow(dead_code)] // tests/cards.rs
    pub fn wecom_hits(&self) -> usize {
        self.st.hits.load(Ordering::SeqCst)
    }

    pub fn uploads(&self) -> Vec<Upload> {
        self.st.uploads.lock().unwrap().clone()
    }

    pub fn bot_sent(&self) -> Vec<Value> {
        self.st.bot.sent.lock().unwrap().clone()
    }
    pub fn script_bot(&self, codes: &[i64]) {
        self.st.bot.script.lock().unwrap().extend(codes);
    }

    /// Error messages repeat the credential they got.
    pub fn echo_credentials(&self, on: bool) {
        self.st.echo.store(on, Ordering::SeqCst);
    }
}

async fn classic_token(State(st): State<Arc<St>>, q: Q) -> Response {
    st.classic_calls.fetch_add(1, Ordering::SeqCst);
    let secret = q.get("secret").cloned().unwrap_or_default();
    st.err(
        48001,
        "the double refuses the classic token call: use stable_token",
        &secret,
    )
}

async fn stable_token(State(st): State<Arc<St>>, body: String) -> Response {
    let Ok(v) = serde_json::from_str::<Value>(&body) else {
        return st.err(47001, "data format error", "");
    };
    st.force_refresh
        .lock()
        .unwrap()
        .push(v.get("force_refresh").cloned().unwrap_or(Value::Null));
    let secret = v["secret"].as_str().unwrap_or("");
    if v.get("force_update").is_some() || v["grant_type"] != "client_credential" {
        return st.err(47001, "data format error", secret);
    }
    if v["appid"] != st.appid.as_str() {
        return st.err(40013, "invalid appid", secret);
    }
    if secret != st.secret {
        return st.err(40125, "invalid appsecret", secret);
    }
    if v["force_refresh"] == true {
        *st.wx.token.lock().unwrap() = None;
    }
    let t = st.wx.current_or_new();
    Json(json!({"access_token": t, "expires_in": 7200})).into_response()
}

async fn template_send(State(st): State<Arc<St>>, q: Q, body: String) -> Response {
    let given = q.get("access_token").cloned().unwrap_or_default();
    if !st.wx.token_ok(&q) {
        return st.err(
            40001,
            "invalid credential, access_token is invalid or not latest",
            &given,
        );
    }
    let Ok(v) = serde_json::from_str::<Value>(&body) else {
        return st.err(47001, "data format error", "");
    };
    let data_ok = v["data"]
        .as_object()
        .is_some_and(|d| !d.is_empty() && d.values().all(|e| e["value"].is_string()));
    if !v["touser"].as_str().is_some_and(|t| !t.is_empty())
        || !v["template_id"].is_string()
        || !data_ok
    {
        return st.err(47003, "argument invalid! data.xxx.value invalid", "");
    }
    if let Some(code) = st.wx.scripted() {
        return st.err(code, &format!("scripted {code}"), &given);
    }
    let key = (
        v["touser"].as_str().unwrap().to_string(),
        v["client_msg_id"].as_str().unwrap_or("").to_string(),
    );
    let mut dedup = st.wx_dedup.lock().unwrap();
    let msgid = match dedup.get(&key).filter(|_| !key.1.is_empty()) {
        Some(id) => *id,
        None => {
            let id = 200228332 + st.n() as u64;
            dedup.insert(key, id);
            st.wx.sent.lock().unwrap().push(v);
            id
        }
    };
    Json(json!({"errcode": 0, "errmsg": "ok", "msgid": msgid})).into_response()
}

async fn gettoken(State(st): State<Arc<St>>, q: Q) -> Response {
    st.hits.fetch_add(1, Ordering::SeqCst);
    let secret = q.get("corpsecret").cloned().unwrap_or_default();
    if q.get("corpid") != Some(&st.corpid) {
        return st.err(40013, "invalid corpid", &secret);
    }
    if secret != st.corpsecret {
        return st.err(40001, "invalid secret", &secret);
    }
    let t = st.wc.current_or_new();
    Json(json!({"errcode": 0, "errmsg": "ok", "access_token": t, "expires_in": 7200}))
        .into_response()
}

/// The file part of a multipart/form-data body.
struct FilePart {
    field: String,
    filename: String,
    content_type: String,
    filelength: Option<usize>,
    bytes: Vec<u8>,
}

fn multipart_file(headers: &HeaderMap, body: &[u8]) -> Option<FilePart> {
    let ct = headers.get("content-type")?.to_str().ok()?;
    let boundary = ct.strip_prefix("multipart/form-data; boundary=")?;
    let open = format!("--{boundary}\r\n");
    let close = format!("\r\n--{boundary}--\r\n");
    let rest = body.strip_prefix(open.as_bytes())?;
    let rest = rest.strip_suffix(close.as_bytes())?;
    let split = rest.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&rest[..split]).ok()?;
    let disp = head.lines().find(|l| {
        l.to_ascii_lowercase()
            .starts_with("content-disposition: form-data")
    })?;
    let param = |name: &str| {
        let start = disp.find(&format!("{name}=\""))? + name.len() + 2;
        let end = disp[start..].find('"')? + start;
        Some(disp[start..end].to_string())
    };
    let filelength = disp
        .split(';')
        .find_map(|p| p.trim().strip_prefix("filelength="))
        .and_then(|n| n.trim().parse().ok());
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("content-type:")
                .then(|| l["content-type:".len()..].trim().to_string())
        })
        .unwrap_or_default();
    Some(FilePart {
        field: param("name")?,
        filename: param("filename")?,
        content_type,
        filelength,
        bytes: rest[split + 4..].to_vec(),
    })
}

async fn media_upload(
    State(st): State<Arc<St>>,
    q: Q,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    st.hits.fetch_add(1, Ordering::SeqCst);
    let given = q.get("access_token").cloned().unwrap_or_default();
    if !st.wc.token_ok(&q) {
        return st.err(40014, "invalid access_token", &given);
    }
    let kind = q.get("type").cloned().unwrap_or_default();
    if !["image", "voice", "video", "file"].contains(&kind.as_str()) {
        return st.err(40004, "invalid media type", "");
    }
    match multipart_file(&headers, &body) {
        Some(p) if p.field == "media" && !p.filename.is_empty() => {
            if kind == "image" && !jpg_or_png(&p.bytes) {
                return st.err(40005, "invalid file type", "");
            }
            if kind == "image" && p.bytes.len() > 10 * 1024 * 1024 {
                return st.err(40006, "invalid file size", "");
            }
            if let Some(code) = st.upload_script.lock().unwrap().pop_front() {
                return st.err(code, &format!("scripted {code}"), &given);
            }
            let id = format!("MEDIA-{}", st.n());
            let up = Upload {
                kind: kind.clone(),
                filename: p.filename,
                content_type: p.content_type,
                filelength: p.filelength,
                bytes: p.bytes,
            };
            st.media.lock().unwrap().insert(id.clone(), up.clone());
            st.uploads.lock().unwrap().push(up);
            Json(
                json!({"errcode": 0, "errmsg": "", "type": kind, "media_id": id,
                        "created_at": "1380000000"}),
            )
            .into_response()
        }
        _ => st.err(41005, "media data missing", ""),
    }
}

async fn message_send(State(st): State<Arc<St>>, q: Q, body: String) -> Response {
    st.hits.fetch_add(1, Ordering::SeqCst);
    let given = q.get("access_token").cloned().unwrap_or_default();
    if !st.wc.token_ok(&q) {
        return st.err(40014, "invalid access_token", &given);
    }
    let Ok(v) = serde_json::from_str::<Value>(&body) else {
        return st.err(44004, "empty content or bad JSON", "");
    };
    if v["agentid"].as_i64() != Some(st.agentid) {
        return st.err(40056, "invalid agentid", "");
    }
    let msgtype = v["msgtype"].as_str().unwrap_or("");
    let part = &v[msgtype];
    let part_ok = match msgtype {
        "text" | "markdown" => part["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty() && c.len() <= 2048),
        "textcard" => ["title", "description", "url"]
            .iter()
            .all(|k| part[k].is_string()),
        "image" | "file" => {
            let media = st.media.lock().unwrap();
            match part["media_id"].as_str().and_then(|id| media.get(id)) {
                Some(up) if up.kind == msgtype => true,
                _ => return st.err(40007, "invalid media_id", ""),
            }
        }
        _ => false,
    };
    if !part_ok {
        return st.err(40008, "invalid message type or content", "");
    }
    if let Some(code) = st.wc.scripted() {
        return st.err(code, &format!("scripted {code}"), &given);
    }
    let list = |k: &str| -> Vec<String> {
        v[k].as_str()
            .filter(|s| !s.is_empty())
            .map(|s| s.split('|').map(str::to_string).collect())
            .unwrap_or_default()
    };
    let (users, parties, tags) = (list("touser"), list("toparty"), list("totag"));
    let all = users.iter().any(|u| u == "@all");
    let invalid_users: Vec<String> = users
        .iter()
        .filter(|u| !all && !st.users.contains(u.to_lowercase().as_str()))
        .map(|u| u.to_lowercase())
        .collect();
    let invalid_parties: Vec<String> = parties
        .iter()
        .filter(|p| !st.parties.contains(p.as_str()))
        .cloned()
        .collect();
    let valid = all
        || users.len() > invalid_users.len()
        || parties.len() > invalid_parties.len()
        || !tags.is_empty();
    if !valid {
        return st.err(81013, "user & party & tag all invalid", "");
    }
    st.wc.sent.lock().unwrap().push(v);
    Json(json!({
        "errcode": 0, "errmsg": "ok",
        "invaliduser": invalid_users.join("|"),
        "invalidparty": invalid_parties.join("|"),
        "invalidtag": "", "unlicenseduser": "",
        "msgid": format!("MSGID-{}", st.n()), "response_code": "rc"
    }))
    .into_response()
}

async fn webhook_send(State(st): State<Arc<St>>, q: Q, body: String) -> Response {
    st.hits.fetch_add(1, Ordering::SeqCst);
    let given = q.get("key").cloned().unwrap_or_default();
    if given != st.bot_key {
        return st.err(93000, "invalid webhook url", &given);
    }
    let Ok(v) = serde_json::from_str::<Value>(&body) else {
        return st.err(40035, "bad JSON", "");
    };
    let msgtype = v["msgtype"].as_str().unwrap_or("");
    let part = &v[msgtype];
    let ok = match msgtype {
        "text" => {
            part["content"].as_str().is_some_and(|c| c.len() <= 2048)
                && ["mentioned_list", "mentioned_mobile_list"]
                    .iter()
                    .all(|k| part[k].is_null() || part[k].is_array())
        }
        "markdown" => part["content"].is_string(),
        "news" => part["articles"].as_array().is_some_and(|a| !a.is_empty()),
        "image" => {
            let bytes = part["base64"]
                .as_str()
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok());
            let Some(bytes) = bytes else {
                return st.err(40009, "invalid image", "");
            };
            if !jpg_or_png(&bytes) {
                return st.err(40005, "invalid file type", "");
            }
            if bytes.len() > 2 * 1024 * 1024 {
                return st.err(40009, "invalid image size", "");
            }
            use md5::{Digest, Md5};
            let md5: String = Md5::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            if part["md5"].as_str() != Some(md5.as_str()) {
                return st.err(301019, "media md5 not match", "");
            }
            true
        }
        _ => false,
    };
    if !ok {
        return st.err(40008, "invalid message type", "");
    }
    if let Some(code) = st.bot.scripted() {
        return st.err(code, &format!("scripted {code}"), &given);
    }
    st.bot.sent.lock().unwrap().push(v);
    Json(json!({"errcode": 0, "errmsg": "ok"})).into_response()
}
