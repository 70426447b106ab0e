//! The `dingtalk` connector (agent `dingtalk.agent`): the DingTalk app APIs of the legacy `oapi`
//! family (shared/providers.md §2.5) — work notifications (`asyncsend_v2`), group chats
//! (`chat/create`, `chat/send`) and media upload (`media/upload`).
//!
//! - The **address** names the recipients: `chat:<chatid>` sends into a group chat
//!   (`chat/send`); otherwise `;`-separated parts `users:<userid>,<userid>` (a part without a
//!   prefix is a userid list too), `depts:<id>,<id>` and `all` (`to_all_user`) make a work
//!   notification for the profile's `agent_id`. No recipient at all is `bad-address`.
//! - The **content** is DingTalk's `msg` object (`{"msgtype":"text","text":{"content":"…"}}`,
//!   `markdown`, `link`, `action_card`, `oa`…); a content that is not JSON is sent as `text`. An
//!   `image`, `file` or `voice` part that carries `{"base64": "…", "filename": "…"}` instead of a
//!   `media_id` is uploaded first (`media/upload`, field `media`) and sent with the `media_id`
//!   DingTalk returns.
//! - **Picture cards**: a message with a picture ([`OutboxMessage::images`], a rendered card) is
//!   sent as that picture — `media/upload?type=image` (field `media`, PNG/JPEG up to 20 MB, the
//!   limit providers.md gives; larger is `image-too-large` before any call), then one
//!   `msgtype: image` (`image.media_id`) to the address, as a work notification or into a chat.
//!   The content (the card's alt text) is not sent as a second message: the image has no caption,
//!   the text is drawn on the card, and a second send could double the picture when the text
//!   failed and the message was retried. A retry after a failed send reuses the media id (kept an
//!   hour, in memory): the same content to the same user, which DingTalk delivers once a day.
//! - A work notification is asynchronous: `errcode 0` only means the task was accepted; its
//!   `task_id` becomes the provider id, and the daemon's [`poller`] later calls `getsendresult`
//!   and stores the per-user outcome (`outbox.dingtalk_send_results`, sql/010).
//!
//! Auth: the app access token (`gettoken?appkey&appsecret`, 7200 s) lives in the shared
//! [`TokenCache`] (one per app across profiles); when DingTalk answers a token error (`40001`,
//! `40014` invalid, `42001` expired — the oapi keeps WeChat's codes) it is refreshed once and the
//! call resent ([`call_with_token`]).
//!
//! Classification (HTTP 200 with `errcode`): `143103`/`143104` (QPM exceeded) are "too fast" for
//! a minute; `-1` and `1430003` (system protection) retry; `143105` (daily cap per user),
//! `143106` (duplicate today), `1430000` (no recipients), `1430002` (forbidden content) and
//! unknown codes are permanent, as `dingtalk-<errcode>`.
//!
//! Invariants: the app secret and the access tokens are scrubbed from every text (they travel in
//! query strings); transport errors lose their URL; the content is checked before any network
//! call.

mod content;
pub mod poller;

use content::{bad_content, prepare_msg, Upload};
pub use content::{parse_address, Recipients};

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Value};

use super::provider::body::{BodyError, Class, ErrorTable, Field};
use super::provider::media::{self, Limits, MediaIds, PNG_JPEG};
use super::provider::multipart::file_form;
use super::provider::token::call_with_token;
use super::provider::{classify_status, json_scalar, read_response, truncate};
use super::redact::{self, Redactor};
use super::token::{self, Token, TokenCache, TokenSource};
use super::{codes, Connector, DeliveryError, OutboxMessage, Receipt};
use crate::settings::{ConfigError, Dur, ProfileContext, Secret, SecretSource};

/// DingTalk's API host.
pub const DEFAULT_ENDPOINT: &str = "https://oapi.dingtalk.com";
/// `msg` of a work notification: at most this many bytes (providers.md §2.5).
pub const MAX_MSG_BYTES: usize = 2048;
/// `media/upload?type=image` (providers.md §2.5: files up to about 20 MB).
const PICTURES: Limits = Limits {
    provider: "DingTalk",
    max_bytes: 20 * 1024 * 1024,
    types: PNG_JPEG,
};
/// How long an uploaded picture's media id is reused for retries (DingTalk names no lifetime).
const MEDIA_ID_LIFE: Duration = Duration::from_secs(3600);
/// How long a QPM "too fast" holds the profile back: until the next minute.
pub const QPM_BLOCK: Duration = Duration::from_secs(60);
const MAX_RESPONSE_BYTES: usize = 256 * 1024;
/// The `getsendresult` calls after a send, by default.
const DEFAULT_RESULT_POLLS: [u64; 3] = [60, 600, 3600];

/// The app APIs' `errcode`s (providers.md §2.5, table 3.3).
pub const ERRORS: ErrorTable = ErrorTable {
    prefix: "dingtalk",
    field: Field::Code {
        pointer: "/errcode",
        success: &["0"],
    },
    message: &["/errmsg"],
    codes: &[
        ("40001", Class::TokenInvalid),
        ("40014", Class::TokenInvalid),
        ("42001", Class::TokenInvalid),
        ("-1", Class::Retry),
        ("143103", Class::Retry),
        ("143104", Class::Retry),
        ("1430003", Class::Retry),
        ("143105", Class::Permanent),
        ("143106", Class::Permanent),
        ("1430000", Class::Permanent),
        ("1430002", Class::Permanent),
    ],
    default: Class::Permanent,
};

/// The error of a body that reports one: [`ERRORS`], with QPM "too fast" holding the profile
/// back a minute.
pub fn classify(e: &BodyError) -> DeliveryError {
    let err = ERRORS.error(e);
    match e.code.as_str() {
        "143103" | "143104" => DeliveryError::too_fast(err.code(), err.reason(), QPM_BLOCK),
        _ => err,
    }
}

/// A `dingtalk` profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DingtalkConfig {
    /// The app's AppKey.
    pub appkey: String,
    /// The app's AppSecret: inline…
    pub appsecret: Option<Secret>,
    /// …or from this environment variable…
    pub appsecret_env: Option<String>,
    /// …or from this file. One of the three is required.
    pub appsecret_file: Option<std::path::PathBuf>,
    /// The app's AgentId (`agent_id` of work notifications). Required for them; a profile that
    /// only sends into chats may leave it out.
    pub agent_id: Option<i64>,
    /// Base URL of the oapi. Default `https://oapi.dingtalk.com`.
    pub endpoint: Option<String>,
    /// When the daemon calls `getsendresult` for a work notification, counted from the previous
    /// call (the first from the send); after the last the result is final. Default
    /// `["1m", "10m", "1h"]`; `[]` turns polling off.
    pub result_polls: Option<Vec<Dur>>,
    /// Request timeout (common key). Default 30s.
    pub timeout: Option<Dur>,
}

fn bad_response(reason: impl Into<String>) -> DeliveryError {
    DeliveryError::retry(codes::DINGTALK_BAD_RESPONSE.code, reason)
}

/// `gettoken` (providers.md §2.5).
struct AppToken {
    client: reqwest::Client,
    url: url::Url,
}

#[async_trait]
impl TokenSource for AppToken {
    async fn fetch(&self) -> Result<Token, DeliveryError> {
        let fetch_err = |r: String| DeliveryError::retry(codes::TOKEN_FETCH.code, r);
        let resp = self
            .client
            .get(self.url.clone())
            .send()
            .await
            .map_err(|e| fetch_err(redact::transport_error(&e).reason().to_string()))?;
        let (status, headers, text) = read_response(resp, MAX_RESPONSE_BYTES).await?;
        if !status.is_success() {
            let e = classify_status(status, &text, &headers);
            let reason = format!("gettoken: {}", e.reason());
            let e = if e.is_retry() {
                fetch_err(reason)
            } else {
                DeliveryError::permanent(codes::TOKEN_DENIED.code, reason)
            };
            return Err(e.with_status(status.as_u16()));
        }
        let v: Value = serde_json::from_str(&text)
            .map_err(|_| fetch_err(format!("gettoken answered: {}", truncate(&text, 256))))?;
        if let Some(e) = ERRORS.find(&v) {
            let reason = format!("gettoken errcode {}: {}", e.code, truncate(&e.message, 256));
            return Err(if e.class == Class::Retry {
                fetch_err(reason)
            } else {
                DeliveryError::permanent(codes::TOKEN_DENIED.code, reason)
            });
        }
        let value = v
            .get("access_token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| fetch_err("gettoken answered without an access_token".into()))?;
        let expires_in = v.get("expires_in").and_then(Value::as_u64).unwrap_or(7200);
        Ok(Token {
            value: Secret::new(value),
            expires_in: Duration::from_secs(expires_in),
        })
    }
}

/// What a request carries.
enum Payload<'a> {
    Json(&'a Value),
    /// (content type, body, extra query pairs)
    Multipart(&'a str, &'a [u8], &'a [(&'a str, &'a str)]),
}

pub struct DingtalkConnector {
    name: String,
    client: reqwest::Client,
    endpoint: String,
    agent_id: Option<i64>,
    result_polls: Vec<Duration>,
    tokens: Arc<TokenCache>,
    redactor: Redactor,
    /// Media ids of pictures whose send is still to succeed.
    media: MediaIds,
}

impl DingtalkConnector {
    pub fn new(ctx: &ProfileContext, cfg: &DingtalkConfig) -> Result<Self, ConfigError> {
        if cfg.appkey.trim().is_empty() {
            return Err(ctx.error("appkey", "must not be empty"));
        }
        let secret = SecretSource::of(&cfg.appsecret, &cfg.appsecret_env, &cfg.appsecret_file)
            .resolve("appsecret")
            .map_err(|m| ctx.error("appsecret", m))?
            .filter(|s| !s.expose().is_empty())
            .ok_or_else(|| {
                ctx.error(
                    "appsecret",
                    "required (appsecret, appsecret_env or appsecret_file)",
                )
            })?;
        let endpoint = cfg
            .endpoint
            .as_deref()
            .unwrap_or(DEFAULT_ENDPOINT)
            .trim_end_matches('/')
            .to_string();
        let mut token_url = url::Url::parse(&format!("{endpoint}/gettoken"))
            .map_err(|e| ctx.error("endpoint", format!("invalid URL: {e}")))?;
        token_url
            .query_pairs_mut()
            .append_pair("appkey", &cfg.appkey)
            .append_pair("appsecret", secret.expose());
        let timeout = cfg.timeout.map_or(Duration::from_secs(30), |d| d.0);
        let client = super::provider::http_client_builder(timeout)
            .redirect(redact::same_origin_redirects())
            .build()
            .map_err(|e| ctx.error("endpoint", format!("cannot build the HTTP client: {e}")))?;
        let mut redactor = Redactor::new();
        redactor.add(secret.expose());
        let key = token::credential_key("dingtalk", &[&endpoint, &cfg.appkey, secret.expose()]);
        let source = AppToken {
            client: client.clone(),
            url: token_url,
        };
        let tokens = token::shared(&key, || TokenCache::new(source));
        let result_polls = cfg.result_polls.as_ref().map_or_else(
            || DEFAULT_RESULT_POLLS.map(Duration::from_secs).to_vec(),
            |l| l.iter().map(|d| d.0).collect(),
        );
        Ok(DingtalkConnector {
            name: format!("dingtalk/{}", ctx.profile),
            client,
            endpoint,
            agent_id: cfg.agent_id,
            result_polls,
            tokens,
            redactor,
            media: MediaIds::new(MEDIA_ID_LIFE),
        })
    }

    /// The delays of the `getsendresult` calls after a send (see [`DingtalkConfig::result_polls`]).
    pub fn result_polls(&self) -> &[Duration] {
        &self.result_polls
    }

    /// `result` with the profile's secret and the latest tokens scrubbed from its texts.
    pub fn redact<T>(&self, r: Result<T, DeliveryError>) -> Result<T, DeliveryError> {
        r.map_err(|e| {
            let e = self.redactor.error(e);
            self.tokens.redact(Err(e)).unwrap_err()
        })
    }

    /// One oapi call with the app token: `POST <endpoint><path>?access_token=…`, refreshed and
    /// resent once on a token error; the answer when its `errcode` is 0, else its error.
    async fn call(&self, path: &str, payload: Payload<'_>) -> Result<Value, DeliveryError> {
        let rejected = |v: &Value| {
            ERRORS
                .find(v)
                .filter(|e| e.class == Class::TokenInvalid)
                .map(|e| ERRORS.error(&e))
        };
        let v = call_with_token(&self.tokens, &self.name, rejected, |t| {
            let payload = &payload;
            async move { self.post(path, &t, payload).await }
        })
        .await?;
        match ERRORS.find(&v) {
            None => Ok(v),
            Some(e) => Err(classify(&e)),
        }
    }

    async fn post(
        &self,
        path: &str,
        token: &Secret,
        payload: &Payload<'_>,
    ) -> Result<Value, DeliveryError> {
        let mut url = url::Url::parse(&format!("{}{path}", self.endpoint))
            .map_err(|e| bad_response(format!("bad endpoint URL: {e}")))?;
        url.query_pairs_mut()
            .append_pair("access_token", token.expose());
        let req = match payload {
            Payload::Json(v) => self
                .client
                .post(url)
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/json; charset=utf-8",
                )
                .body(serde_json::to_vec(v).expect("a JSON value serializes")),
            Payload::Multipart(ct, body, query) => {
                url.query_pairs_mut().extend_pairs(query.iter());
                self.client
                    .post(url)
                    .header(reqwest::header::CONTENT_TYPE, *ct)
                    .body(body.to_vec())
            }
        };
        let resp = req.send().await.map_err(|e| redact::send_error(&e))?;
        let (status, headers, text) = read_response(resp, MAX_RESPONSE_BYTES).await?;
        if !status.is_success() {
            return Err(classify_status(status, &text, &headers));
        }
        serde_json::from_str(&text).map_err(|_| {
            bad_response(format!(
                "DingTalk answered something that is not JSON: {}",
                truncate(&text, 256)
            ))
        })
    }

    /// `media/upload`: the `media_id` of an uploaded file of `kind` (image, voice, file).
    async fn upload(&self, u: &Upload) -> Result<String, DeliveryError> {
        let (ct, body) = file_form("media", &u.filename, media::mime_of(&u.filename), &u.data);
        let query = [("type", u.kind.as_str())];
        let v = self
            .call("/media/upload", Payload::Multipart(&ct, &body, &query))
            .await?;
        v.get("media_id")
            .and_then(Value::as_str)
            .filter(|m| !m.is_empty())
            .map(str::to_string)
            .ok_or_else(|| bad_response("media/upload answered without a media_id"))
    }

    /// `media/upload` of `data` as a `kind` (image, voice, video, file) named `filename`: the
    /// `media_id` DingTalk returns (the HTTP server's `/v1/dd/media/upload`).
    pub async fn upload_media(
        &self,
        kind: &str,
        filename: &str,
        data: Vec<u8>,
    ) -> Result<String, DeliveryError> {
        let u = Upload {
            kind: kind.to_string(),
            data,
            filename: filename.to_string(),
        };
        let r = self.upload(&u).await;
        self.redact(r)
    }

    /// `chat/create`: the new chat's `chatid` (providers.md §2.5). Not idempotent.
    pub async fn create_chat(
        &self,
        name: &str,
        owner: &str,
        users: &[String],
    ) -> Result<String, DeliveryError> {
        let r = async {
            let body = json!({"name": name, "owner": owner, "useridlist": users});
            let v = self.call("/chat/create", Payload::Json(&body)).await?;
            v.get("chatid")
                .and_then(Value::as_str)
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .ok_or_else(|| bad_response("chat/create answered without a chatid"))
        }
        .await;
        self.redact(r)
    }

    /// `getsendresult` of a work notification: its `send_result` object.
    pub async fn send_result(&self, task_id: &str) -> Result<Value, DeliveryError> {
        let r = async {
            let agent_id = self.agent_id.ok_or_else(|| {
                DeliveryError::permanent(codes::BAD_CREDENTIALS.code, "the profile has no agent_id")
            })?;
            let task: Value = task_id
                .parse::<i64>()
                .map(Value::from)
                .unwrap_or_else(|_| Value::from(task_id));
            let body = json!({"agent_id": agent_id, "task_id": task});
            let v = self
                .call(
                    "/topapi/message/corpconversation/getsendresult",
                    Payload::Json(&body),
                )
                .await?;
            Ok(v.get("send_result").cloned().unwrap_or(json!({})))
        }
        .await;
        self.redact(r)
    }

    async fn deliver_inner(&self, msg: &OutboxMessage) -> Result<Receipt, DeliveryError> {
        let to = parse_address(msg.address_required()?)?;
        let picture = media::picture(msg, &PICTURES)?;
        let (mut m, upload) = match picture {
            Some(_) => (json!({"msgtype": "image"}), None),
            None => prepare_msg(msg.content_required()?)?,
        };
        let agent_id = match &to {
            Recipients::Notice { .. } => Some(self.agent_id.ok_or_else(|| {
                DeliveryError::permanent(
                    codes::BAD_CREDENTIALS.code,
                    "work notifications need the profile's agent_id",
                )
            })?),
            Recipients::Chat(_) => None,
        };
        if let Some(u) = &upload {
            let media_id = self.upload(u).await?;
            m[&u.kind] = json!({"media_id": media_id});
        }
        let Some(img) = picture else {
            return self.send(msg, to, agent_id, m).await;
        };
        let upload = media::upload(
            img,
            "media",
            "/media_id",
            |ct, body| async move {
                let query = [("type", "image")];
                self.call("/media/upload", Payload::Multipart(&ct, &body, &query))
                    .await
            },
            bad_response,
        );
        m["image"] = json!({"media_id": self.media.get_or_upload(msg.id, upload).await?});
        let r = self.send(msg, to, agent_id, m).await;
        if !matches!(&r, Err(e) if e.is_retry()) {
            self.media.forget(msg.id);
        }
        r
    }

    /// Sends `m` to `to`: `chat/send`, or a work notification as `agent_id`.
    async fn send(
        &self,
        msg: &OutboxMessage,
        to: Recipients,
        agent_id: Option<i64>,
        m: Value,
    ) -> Result<Receipt, DeliveryError> {
        match to {
            Recipients::Chat(chatid) => {
                let body = json!({"chatid": chatid, "msg": m});
                let v = self.call("/chat/send", Payload::Json(&body)).await?;
                Ok(Receipt {
                    provider_id: v.get("messageId").map(json_scalar),
                    remote_status: Some(200),
                    reply: None,
                })
            }
            Recipients::Notice { users, depts, all } => {
                let size = serde_json::to_vec(&m).map_or(0, |b| b.len());
                if size > MAX_MSG_BYTES {
                    return Err(bad_content(format!(
                        "msg is {size} bytes; DingTalk takes at most {MAX_MSG_BYTES}"
                    )));
                }
                let mut body = json!({"agent_id": agent_id, "msg": m});
                if !users.is_empty() {
                    body["userid_list"] = users.join(",").into();
                }
                if !depts.is_empty() {
                    body["dept_id_list"] = depts.join(",").into();
                }
                if all {
                    body["to_all_user"] = true.into();
                }
                let v = self
                    .call(
                        "/topapi/message/corpconversation/asyncsend_v2",
                        Payload::Json(&body),
                    )
                    .await?;
                let task_id = v.get("task_id").map(json_scalar);
                if task_id.is_none() {
                    // Accepted (errcode 0): never resend; there is just nothing to poll.
                    tracing::warn!(connector = %self.name, message_id = %msg.id,
                        "asyncsend_v2 answered without a task_id; no send result will be polled");
                }
                Ok(Receipt {
                    provider_id: task_id,
                    remote_status: Some(200),
                    reply: None,
                })
            }
        }
    }
}

#[async_trait]
impl Connector for DingtalkConnector {
    fn name(&self) -> &str {
        &self.name
    }

    async fn deliver(&self, msg: &OutboxMessage) -> Result<Receipt, DeliveryError> {
        let r = self.redactor.result(self.deliver_inner(msg).await);
        self.tokens.redact(r)
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

#[cfg(test)]
mod tests;
