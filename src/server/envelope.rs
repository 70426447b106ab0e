//! The answer envelope every `/api` endpoint uses, the one the DingTalk message center's clients
//! know: `{"id", "ok", "code", "msg", "data", "count"}` — `ok` = 1 and `code` = 0 on success; on
//! failure `ok` = 0 and `code` is one of the stable [`ErrorKind`] codes below (documented in the
//! README and in the OpenAPI document).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

/// A successful answer carrying `data` (`count` = how many items it holds).
pub fn ok(data: Value, count: usize) -> Response {
    Json(json!({"id": 1, "ok": 1, "code": 0, "msg": "", "data": data, "count": count}))
        .into_response()
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
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::BadJson | ErrorKind::Invalid | ErrorKind::UnknownAgent => {
                StatusCode::BAD_REQUEST
            }
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::Database => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
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
        }
    }
}

/// A failed answer: the kind decides code and status, `msg` says what failed.
#[derive(Debug)]
pub struct Failure {
    pub kind: ErrorKind,
    pub msg: String,
}

impl Failure {
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> Self {
        Failure {
            kind,
            msg: msg.into(),
        }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let mut r = (
            self.kind.status(),
            Json(json!({
                "id": 0, "ok": 0, "code": self.kind.code(), "msg": self.msg, "data": Value::Null, "count": 0
            })),
        )
            .into_response();
        if self.kind == ErrorKind::Unauthorized {
            r.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        r
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
