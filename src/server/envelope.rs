//! The answer envelope every endpoint uses, the one the DingTalk message center's clients know:
//! `{"id", "ok", "code", "msg", "data", "count"}` — `ok` = 1 and `code` = 0 on success; on
//! failure `ok` = 0 and `msg` says what failed. Two conventions for the failure's `code`, both
//! documented in the README and in the OpenAPI document:
//!
//! - `/api/v1/*` (outboxd's own REST API): one of the stable [`ErrorKind`] codes below, `data`
//!   null — or `"[<error code>] <error text>"` when a delivery or provider call failed;
//! - `/v1/dd/*` (the DingTalk message center's endpoints, [`Center`]): always `code` = 1, as the
//!   center answers, with `data` = `"[<provider errcode>] <provider errmsg>"` when DingTalk refused
//!   (e.g. `"[34019] chatid不存在"`) and `"[<ErrorKind code>] <its meaning>"` otherwise (e.g.
//!   `"[40101] missing or wrong bearer token"`), so a client can always read `data` as a string.
//!
//! The HTTP status is the kind's in both.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

/// A successful answer carrying `data` (`count` = how many items it holds).
pub fn ok(data: Value, count: usize) -> Response {
    Json(json!({"id": 1, "ok": 1, "code": 0, "msg": "", "data": data, "count": count}))
        .into_response()
}

/// The kind of refusal a database error is when it is the request's fault — the outbox's own
/// `ERR-400-*` refusals (`ERR-400-031` unknown agent, `ERR-400-060` unknown task) and data errors
/// (SQLSTATE classes 22 and 23) — or `None` when it is the server's (or the database is down).
/// Shared by the REST enqueue and the Kafka trigger, which dead-letters exactly these.
pub fn refusal_kind(e: &crate::db::DbError) -> Option<ErrorKind> {
    match e.code()?.as_str() {
        "ERR-400-031" => Some(ErrorKind::UnknownAgent),
        "ERR-400-060" => Some(ErrorKind::NotFound),
        c if c.starts_with("ERR-400") || c.starts_with("22") || c.starts_with("23") => {
            Some(ErrorKind::Invalid)
        }
        _ => None,
    }
}

/// Every kind of failure, with its stable code and HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The body is not JSON.
    BadJson,
    /// A field is missing, unknown, of the wrong type or out of range.
    Invalid,
    /// The agent is not known to the outbox (ERR-400-031).
    UnknownAgent,
    /// No or a wrong bearer token.
    Unauthorized,
    /// No such endpoint.
    NotFound,
    /// The endpoint exists, not with this method.
    MethodNotAllowed,
    /// The body is larger than `http_max_body_bytes`.
    TooLarge,
    /// The database refused the request.
    Database,
    /// The database is unreachable or did not answer in time.
    Unavailable,
    /// The request took longer than the server allows.
    Timeout,
    /// No such profile of the connector a `/v1/dd/*` endpoint uses.
    UnknownProfile,
    /// The provider refused: the message failed (`?wait=`) or a direct call (`/v1/dd/chat/create`,
    /// `/v1/dd/media/upload`) did; `data` is `"[code] text"`.
    ProviderFailed,
}

impl ErrorKind {
    /// Every kind, for the documentation test.
    pub const ALL: &'static [ErrorKind] = &[
        ErrorKind::BadJson,
        ErrorKind::Invalid,
        ErrorKind::UnknownAgent,
        ErrorKind::Unauthorized,
        ErrorKind::NotFound,
        ErrorKind::MethodNotAllowed,
        ErrorKind::TooLarge,
        ErrorKind::Database,
        ErrorKind::Unavailable,
        ErrorKind::Timeout,
        ErrorKind::UnknownProfile,
        ErrorKind::ProviderFailed,
    ];

    pub fn code(self) -> u32 {
        match self {
            ErrorKind::BadJson => 40001,
            ErrorKind::Invalid => 40002,
            ErrorKind::UnknownAgent => 40003,
            ErrorKind::Unauthorized => 40101,
            ErrorKind::NotFound => 40401,
            ErrorKind::MethodNotAllowed => 40501,
            ErrorKind::TooLarge => 41301,
            ErrorKind::Database => 50001,
            ErrorKind::Unavailable => 50301,
            ErrorKind::Timeout => 50401,
            ErrorKind::UnknownProfile => 40004,
            ErrorKind::ProviderFailed => 50201,
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::BadJson
            | ErrorKind::Invalid
            | ErrorKind::UnknownAgent
            | ErrorKind::UnknownProfile => StatusCode::BAD_REQUEST,
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::Database => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::ProviderFailed => StatusCode::BAD_GATEWAY,
        }
    }

    /// One line of meaning, as the README and the OpenAPI document print it.
    pub fn meaning(self) -> &'static str {
        match self {
            ErrorKind::BadJson => "the body is not valid JSON",
            ErrorKind::Invalid => "a field is missing, unknown, of the wrong type or out of range",
            ErrorKind::UnknownAgent => "the agent is not known to the outbox",
            ErrorKind::Unauthorized => "missing or wrong bearer token",
            ErrorKind::NotFound => "no such endpoint",
            ErrorKind::MethodNotAllowed => "the endpoint does not take this method",
            ErrorKind::TooLarge => "the body is larger than http_max_body_bytes",
            ErrorKind::Database => "the database refused the request",
            ErrorKind::Unavailable => "the database is unreachable or did not answer in time",
            ErrorKind::Timeout => "the request took longer than the server allows",
            ErrorKind::UnknownProfile => "the connector has no such profile",
            ErrorKind::ProviderFailed => {
                "the provider refused the message or the call; data is \"[code] text\""
            }
        }
    }
}

/// A failed answer: the kind decides code and status, `msg` says what failed, `data` (if any)
/// is the provider's `"[code] text"`.
#[derive(Debug)]
pub struct Failure {
    pub kind: ErrorKind,
    pub msg: String,
    pub data: Option<String>,
}

impl Failure {
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> Self {
        Failure {
            kind,
            msg: msg.into(),
            data: None,
        }
    }

    /// A provider's refusal: `data` = `"[code] text"`.
    pub fn provider(msg: impl Into<String>, code: &str, text: &str) -> Self {
        Failure {
            kind: ErrorKind::ProviderFailed,
            msg: msg.into(),
            data: Some(format!("[{code}] {text}")),
        }
    }

    fn respond(self, code: u32, data: Value) -> Response {
        let unauthorized = self.kind == ErrorKind::Unauthorized;
        let mut r = (
            self.kind.status(),
            Json(json!({
                "id": 0, "ok": 0, "code": code, "msg": self.msg, "data": data, "count": 0
            })),
        )
            .into_response();
        if unauthorized {
            r.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        r
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let code = self.kind.code();
        let data = self.data.clone().map_or(Value::Null, Value::from);
        self.respond(code, data)
    }
}

/// A failure in the DingTalk message center's convention (`/v1/dd/*`): `code` = 1, `data` the
/// provider's `"[errcode] errmsg"` or else `"[<ErrorKind code>] <meaning>"`.
#[derive(Debug)]
pub struct Center(pub Failure);

impl From<Failure> for Center {
    fn from(f: Failure) -> Self {
        Center(f)
    }
}

impl IntoResponse for Center {
    fn into_response(self) -> Response {
        let f = self.0;
        let data = f
            .data
            .clone()
            .unwrap_or_else(|| format!("[{}] {}", f.kind.code(), f.kind.meaning()));
        f.respond(1, Value::from(data))
    }
}

pub async fn not_found() -> Failure {
    Failure::new(ErrorKind::NotFound, "no such endpoint")
}

pub async fn method_not_allowed() -> Failure {
    Failure::new(
        ErrorKind::MethodNotAllowed,
        "this endpoint does not take this method",
    )
}
