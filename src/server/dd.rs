//! The DingTalk message center's own endpoints, so its clients switch to outboxd without a change:
//!
//! - `POST /v1/dd/topapi/message`: a work notification (`userid_list`, `dept_id_list`,
//!   `to_all_user` — at least one — and `msg`), enqueued for `dingtalk.agent`;
//! - `POST /v1/dd/chat/send`: a group chat message (`chatid`, `msg`), enqueued likewise;
//! - `POST /v1/dd/chat/create`: `chat/create` (`name`, `owner`, `useridlist`), called directly;
//!   `data.chatid` is the new chat;
//! - `POST /v1/dd/media/upload`: `media/upload` (`type`, the file `media` as multipart form data
//!   as DingTalk takes it, or JSON `{"type", "media": {"base64", "filename"}}`), called directly;
//!   `data.media_id` is the upload.
//!
//! Field names are DingTalk's (`userid_list`/`dept_id_list` are comma-separated strings there;
//! arrays are accepted too). The profile is the query parameter `profile` (default `default`);
//! auth is the REST API's bearer tokens; every answer is the envelope in the center's convention
//! ([`Center`]: failures have `code` 1 and `data` = `"[errcode] errmsg"`).
//!
//! Invariants: sends only call `api.send_message` (the outbox delivers them; `?wait=` waits for
//! the outcome, [`super::outcome`]); the direct calls go through the daemon's own connector of the
//! profile (same token cache, same redaction) and each one — success or failure — is recorded in
//! `outbox.dingtalk_calls` (sql/018) with a summary of the request that holds no secret and no
//! file bytes (name, size, SHA-256).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Multipart, RawQuery, Request, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use axum::Router;
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::Digest;

use super::api::{authorized, body_bytes, enqueue, idempotency_key};
use super::envelope::{self, Center, ErrorKind, Failure};
use super::outcome::{parse_wait, query_value};
use super::AppState;
use crate::connector::dingtalk::{parse_address, poller, DingtalkConnector};
use crate::connector::{Connector, DeliveryError};
use crate::ops::NewMessage;

/// The agent the sends are enqueued for.
pub const AGENT: &str = "dingtalk.agent";
/// The media types `media/upload` takes.
pub const MEDIA_TYPES: &[&str] = &["image", "voice", "video", "file"];

type Answer = Result<Value, Failure>;

pub fn routes() -> Router<Arc<AppState>> {
    let not_allowed = || async {
        Center(Failure::new(
            ErrorKind::MethodNotAllowed,
            "this endpoint takes POST",
        ))
    };
    Router::new()
        .route(
            "/v1/dd/topapi/message",
            post(topapi_message).fallback(not_allowed),
        )
        .route("/v1/dd/chat/send", post(chat_send).fallback(not_allowed))
        .route(
            "/v1/dd/chat/create",
            post(chat_create).fallback(not_allowed),
        )
        .route(
            "/v1/dd/media/upload",
            post(media_upload).fallback(not_allowed),
        )
        // Other paths under /v1/dd answer in the center's envelope too.
        .route(
            "/v1/dd/*rest",
            any(|| async { Center(Failure::new(ErrorKind::NotFound, "no such endpoint")) }),
        )
}

fn answer(r: Answer) -> Response {
    match r {
        Ok(data) => envelope::ok(data, 0),
        Err(f) => Center(f).into_response(),
    }
}

fn invalid(msg: impl Into<String>) -> Failure {
    Failure::new(ErrorKind::Invalid, msg)
}

/// The `profile` query parameter (default `default`) and its connector.
fn profile(st: &AppState, query: Option<&str>) -> Result<(String, Arc<dyn Connector>), Failure> {
    let name = query_value(query, "profile")
        .filter(|p| !p.trim().is_empty())
        .unwrap_or_else(|| "default".into());
    st.router
        .as_ref()
        .and_then(|r| r.load().dingtalk(&name))
        .map(|c| (name.clone(), c))
        .ok_or_else(|| {
            Failure::new(
                ErrorKind::UnknownProfile,
                format!("no dingtalk profile \"{name}\" is configured"),
            )
        })
}

/// The dingtalk connector behind a route [`crate::dispatch::Router::dingtalk`] returned.
fn dingtalk(c: &Arc<dyn Connector>) -> &DingtalkConnector {
    c.as_any()
        .and_then(|a| a.downcast_ref())
        .expect("Router::dingtalk returns dingtalk connectors only")
}

/// The JSON body as `T`, with the center's failures for bad JSON and bad fields.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Failure> {
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => invalid(e.to_string()),
        _ => Failure::new(
            ErrorKind::BadJson,
            format!("the body is not valid JSON: {e}"),
        ),
    })
}

/// A list of ids as DingTalk takes it (`"a,b"`) or as a JSON array (of strings or numbers).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum IdList {
    Text(String),
    List(Vec<Value>),
}

impl IdList {
    fn ids(&self, field: &str) -> Result<Vec<String>, Failure> {
        let ids: Vec<String> = match self {
            IdList::Text(s) => s.split(',').map(|x| x.trim().to_string()).collect(),
            IdList::List(l) => l
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.trim().to_string()),
                    Value::Number(n) => Ok(n.to_string()),
                    _ => Err(invalid(format!("{field} holds strings or numbers"))),
                })
                .collect::<Result<_, _>>()?,
        };
        let ids: Vec<String> = ids.into_iter().filter(|x| !x.is_empty()).collect();
        if let Some(bad) = ids.iter().find(|x| x.contains([',', ';', '\0'])) {
            return Err(invalid(format!("{field}: \"{bad}\" is not an id")));
        }
        Ok(ids)
    }
}

/// `to_all_user` as DingTalk takes it: a boolean, or `"true"`/`"false"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Flag {
    Bool(bool),
    Text(String),
}

/// The `msg` object (or a string holding it, as DingTalk's form-encoded clients send it), with a
/// `msgtype` and its part: the content of the message.
fn msg_content(msg: Option<Value>) -> Result<String, Failure> {
    let msg = match msg {
        Some(Value::String(s)) => serde_json::from_str(&s)
            .map_err(|_| invalid("msg must be a JSON object (or a string holding one)"))?,
        Some(v) => v,
        None => return Err(invalid("msg is required")),
    };
    let t = msg
        .get("msgtype")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| invalid("msg needs a msgtype"))?;
    if !msg.get(t).is_some_and(Value::is_object) {
        return Err(invalid(format!(
            "msg of msgtype {t} needs a \"{t}\" object"
        )));
    }
    Ok(msg.to_string())
}

#[derive(Debug, Deserialize)]
struct NoticeRequest {
    userid_list: Option<IdList>,
    dept_id_list: Option<IdList>,
    to_all_user: Option<Flag>,
    msg: Option<Value>,
    /// Sent by DingTalk clients; the profile's `agent_id` is used.
    #[allow(dead_code)]
    agent_id: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct ChatSendRequest {
    chatid: Option<String>,
    msg: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct ChatCreateRequest {
    name: Option<String>,
    owner: Option<String>,
    useridlist: Option<IdList>,
}

/// The address of a work notification (`users:…;depts:…;all`), checked as the connector will.
fn notice_address(r: &NoticeRequest) -> Result<String, Failure> {
    let users = r
        .userid_list
        .as_ref()
        .map_or(Ok(Vec::new()), |l| l.ids("userid_list"))?;
    let depts = r
        .dept_id_list
        .as_ref()
        .map_or(Ok(Vec::new()), |l| l.ids("dept_id_list"))?;
    let all = match &r.to_all_user {
        None | Some(Flag::Bool(false)) => false,
        Some(Flag::Bool(true)) => true,
        Some(Flag::Text(t)) => match t.trim() {
            "true" => true,
            "false" | "" => false,
            _ => return Err(invalid("to_all_user must be true or false")),
        },
    };
    if users.is_empty() && depts.is_empty() && !all {
        return Err(invalid(
            "no recipient: give at least one of userid_list, dept_id_list and to_all_user",
        ));
    }
    let mut parts = Vec::new();
    if !users.is_empty() {
        parts.push(format!("users:{}", users.join(",")));
    }
    if !depts.is_empty() {
        parts.push(format!("depts:{}", depts.join(",")));
    }
    if all {
        parts.push("all".into());
    }
    let address = parts.join(";");
    parse_address(&address).map_err(|e| invalid(e.reason().to_string()))?;
    Ok(address)
}

/// Enqueues a send (`address`, `content`) of the profile and answers with its id, or with its
/// outcome under `?wait=`.
async fn send(
    st: &AppState,
    query: Option<&str>,
    headers: &HeaderMap,
    profile: String,
    address: String,
    content: String,
    provider_name: &str,
) -> Answer {
    let wait = parse_wait(query)?;
    let msg = NewMessage {
        parent: None,
        agent: AGENT.into(),
        profile,
        address,
        subject: None,
        content,
        label: None,
        description: None,
        code: idempotency_key(headers)?,
        priority: 0,
        send_at: None,
        max_attempts: None,
    };
    let o = enqueue(st, &msg, wait).await?;
    if let Some(f) = o.failure("dingtalk-") {
        return Err(f);
    }
    let mut data = match wait {
        None => json!({"id": o.id}),
        Some(_) => o.data(),
    };
    if let Some(p) = &o.provider_id {
        data[provider_name] = p.clone().into();
    }
    Ok(data)
}

async fn topapi_message(
    State(st): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    answer(
        async {
            authorized(&headers, &st.tokens)?;
            let (profile, _) = profile(&st, query.as_deref())?;
            let req: NoticeRequest = parse(&body_bytes(body)?)?;
            let address = notice_address(&req)?;
            let content = msg_content(req.msg)?;
            send(
                &st,
                query.as_deref(),
                &headers,
                profile,
                address,
                content,
                "task_id",
            )
            .await
        }
        .await,
    )
}

async fn chat_send(
    State(st): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    answer(
        async {
            authorized(&headers, &st.tokens)?;
            let (profile, _) = profile(&st, query.as_deref())?;
            let req: ChatSendRequest = parse(&body_bytes(body)?)?;
            let chatid = req
                .chatid
                .map(|c| c.trim().to_string())
                .filter(|c| !c.is_empty())
                .ok_or_else(|| invalid("chatid is required"))?;
            let address = format!("chat:{chatid}");
            parse_address(&address).map_err(|e| invalid(format!("chatid: {}", e.reason())))?;
            let content = msg_content(req.msg)?;
            send(
                &st,
                query.as_deref(),
                &headers,
                profile,
                address,
                content,
                "messageId",
            )
            .await
        }
        .await,
    )
}

/// Records a direct call in `outbox.dingtalk_calls`. A failure to record is logged, not
/// answered: the call happened (a client told it failed would repeat it).
async fn record(
    st: &AppState,
    profile: &str,
    kind: &str,
    request: &Value,
    result: &Result<String, DeliveryError>,
) {
    let (ok, code, text) = match result {
        Ok(v) => (Some(v.as_str()), None, None),
        Err(e) => (None, Some(e.code()), Some(e.reason())),
    };
    let r = st
        .db
        .timed("dingtalk record call", async {
            let c = st.db.pool().get().await?;
            c.execute(
                "SELECT outbox.dingtalk_record_call($1, $2, $3, $4, $5, $6)",
                &[&profile, &kind, request, &ok, &code, &text],
            )
            .await?;
            Ok(())
        })
        .await;
    if let Err(e) = r {
        tracing::error!(profile = %profile, connector = "dingtalk", kind, error = %e,
            "a direct DingTalk call could not be recorded in outbox.dingtalk_calls");
    }
}

/// A direct call's error as the center answers it: DingTalk's own errcode (`dingtalk-<errcode>`
/// without its prefix) or outboxd's stable code, and the text.
fn call_failure(what: &str, e: &DeliveryError) -> Failure {
    let code = e.code().strip_prefix("dingtalk-").unwrap_or(e.code());
    Failure::provider(format!("{what} failed: {}", e.code()), code, e.reason())
}

async fn chat_create(
    State(st): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    answer(
        async {
            authorized(&headers, &st.tokens)?;
            let (profile, c) = profile(&st, query.as_deref())?;
            let req: ChatCreateRequest = parse(&body_bytes(body)?)?;
            let need = |v: Option<String>, field: &str| {
                v.map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| invalid(format!("{field} is required")))
            };
            let name = need(req.name, "name")?;
            let owner = need(req.owner, "owner")?;
            let users = req
                .useridlist
                .ok_or_else(|| invalid("useridlist is required"))?
                .ids("useridlist")?;
            let summary = json!({"name": name, "owner": owner, "useridlist": users});
            let r =
                poller::create_and_record(&st.db, dingtalk(&c), &profile, &name, &owner, &users)
                    .await
                    .map_err(|e| super::api::db_failure(&e))?;
            record(&st, &profile, "chat/create", &summary, &r).await;
            match r {
                Ok(chatid) => Ok(json!({"chatid": chatid})),
                Err(e) => Err(call_failure("chat/create", &e)),
            }
        }
        .await,
    )
}

/// What to upload.
struct Media {
    kind: String,
    filename: String,
    data: Vec<u8>,
}

/// The upload of a multipart form: field `type` (or the query's `type`) and the file `media`.
async fn multipart_media(
    mut form: Multipart,
    query_type: Option<String>,
) -> Result<Media, Failure> {
    let bad = |e: axum::extract::multipart::MultipartError| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            Failure::new(ErrorKind::TooLarge, "the body is too large")
        } else {
            invalid(format!(
                "the multipart form is not valid: {}",
                e.body_text()
            ))
        }
    };
    let (mut kind, mut file) = (query_type, None);
    while let Some(field) = form.next_field().await.map_err(bad)? {
        match field.name() {
            Some("type") => kind = Some(field.text().await.map_err(bad)?),
            Some("media") => {
                let filename = field.file_name().unwrap_or("media").to_string();
                file = Some((filename, field.bytes().await.map_err(bad)?.to_vec()));
            }
            _ => {}
        }
    }
    let (filename, data) = file.ok_or_else(|| invalid("the form has no file field \"media\""))?;
    Ok(Media {
        kind: kind.unwrap_or_default(),
        filename,
        data,
    })
}

/// The upload of a JSON body: `{"type", "media": {"base64", "filename"}}`.
fn json_media(body: &[u8], query_type: Option<String>) -> Result<Media, Failure> {
    #[derive(Deserialize)]
    struct File {
        base64: String,
        filename: Option<String>,
    }
    #[derive(Deserialize)]
    struct Upload {
        #[serde(rename = "type")]
        kind: Option<String>,
        media: Option<File>,
    }
    let u: Upload = parse(body)?;
    let f = u
        .media
        .ok_or_else(|| invalid("media is required: {\"base64\": …, \"filename\": …}"))?;
    let data = base64::engine::general_purpose::STANDARD
        .decode(f.base64.trim())
        .map_err(|_| invalid("media.base64 is not base64"))?;
    Ok(Media {
        kind: u.kind.or(query_type).unwrap_or_default(),
        filename: f.filename.unwrap_or_else(|| "media".into()),
        data,
    })
}

async fn media_upload(
    State(st): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
    req: Request,
) -> Response {
    let headers = req.headers().clone();
    answer(
        async {
            authorized(&headers, &st.tokens)?;
            let (profile, c) = profile(&st, query.as_deref())?;
            let query_type = query_value(query.as_deref(), "type");
            let multipart = headers
                .get(axum::http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|t| t.starts_with("multipart/form-data"));
            let media = if multipart {
                let form = Multipart::from_request(req, &st)
                    .await
                    .map_err(|e| invalid(e.body_text()))?;
                multipart_media(form, query_type).await?
            } else {
                let body = Bytes::from_request(req, &st).await;
                json_media(&body_bytes(body)?, query_type)?
            };
            if !MEDIA_TYPES.contains(&media.kind.as_str()) {
                return Err(invalid(format!(
                    "type must be one of {}",
                    MEDIA_TYPES.join(", ")
                )));
            }
            if media.data.is_empty() {
                return Err(invalid("media is empty"));
            }
            let summary = json!({
                "type": media.kind,
                "filename": media.filename,
                "bytes": media.data.len(),
                "sha256": format!("{:x}", sha2::Sha256::digest(&media.data)),
            });
            let r = dingtalk(&c)
                .upload_media(&media.kind, &media.filename, media.data)
                .await;
            record(&st, &profile, "media/upload", &summary, &r).await;
            match r {
                Ok(media_id) => Ok(json!({"media_id": media_id, "type": media.kind})),
                Err(e) => Err(call_failure("media/upload", &e)),
            }
        }
        .await,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(body: &str) -> Result<String, Failure> {
        notice_address(&serde_json::from_str(body).unwrap())
    }

    #[test]
    fn recipients_are_taken_as_dingtalk_writes_them_or_as_arrays() {
        assert_eq!(
            notice(r#"{"userid_list":"u1, u2","dept_id_list":"7"}"#).unwrap(),
            "users:u1,u2;depts:7"
        );
        assert_eq!(
            notice(r#"{"userid_list":["u1","u2"],"dept_id_list":[7,8],"to_all_user":"true"}"#)
                .unwrap(),
            "users:u1,u2;depts:7,8;all"
        );
        assert_eq!(notice(r#"{"to_all_user":true}"#).unwrap(), "all");
        for bad in [
            r#"{}"#,
            r#"{"userid_list":"","to_all_user":false}"#,
            r#"{"dept_id_list":"sales"}"#,
            r#"{"userid_list":["a;b"]}"#,
        ] {
            assert_eq!(notice(bad).unwrap_err().kind, ErrorKind::Invalid, "{bad}");
        }
    }

    #[test]
    fn msg_needs_a_msgtype_and_its_part() {
        let ok = msg_content(Some(json!({"msgtype":"text","text":{"content":"hi"}}))).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&ok).unwrap()["text"]["content"],
            "hi"
        );
        let s = msg_content(Some(json!(r#"{"msgtype":"text","text":{"content":"hi"}}"#))).unwrap();
        assert_eq!(s, ok);
        assert!(msg_content(None).is_err());
        assert!(msg_content(Some(json!({"msgtype":"text"}))).is_err());
        assert!(msg_content(Some(json!({"text":{}}))).is_err());
    }
}
