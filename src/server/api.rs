//! The REST enqueue API: `POST /api/v1/message/send` and its OpenAPI document at
//! `GET /api/v1/openapi.json`.
//!
//! It only calls `api.send_message` (through [`crate::ops::send`]), so what REST does a DBA can do
//! in psql and every rule of the outbox (agents, idempotency codes, NOTIFY) applies unchanged.
//! Authentication: `Authorization: Bearer <token>`, compared in constant time with every
//! configured token. An `Idempotency-Key` header becomes the message code (a body `code` wins),
//! so a client that retries a request after a timeout never enqueues twice. `?wait=5s` waits up
//! to that long for the outcome ([`super::outcome`]).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::envelope::{self, ErrorKind, Failure};
use super::AppState;
use crate::ops::NewMessage;

/// Longest accepted idempotency code, agent, profile, label (bytes).
const MAX_NAME: usize = 512;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/api/v1/message/send",
            post(send).fallback(envelope::method_not_allowed),
        )
        .route(
            "/api/v1/openapi.json",
            get(|| async { Json(super::openapi::document()) })
                .fallback(envelope::method_not_allowed),
        )
}

/// The body of `POST /api/v1/message/send`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendRequest {
    /// Agent code (e.g. `smtp.agent`) or id.
    pub agent: String,
    /// Profile of the agent's connector. Default `default`.
    pub profile: Option<String>,
    pub address: String,
    pub subject: Option<String>,
    /// A string is stored as is; any other JSON value is stored as its JSON text.
    pub content: Option<Value>,
    /// Idempotency key (also from the `Idempotency-Key` header).
    pub code: Option<String>,
    pub priority: Option<i32>,
    /// Not before this time (RFC 3339).
    pub send_at: Option<chrono::DateTime<chrono::Utc>>,
    pub label: Option<String>,
    pub description: Option<String>,
    pub parent: Option<Uuid>,
    pub max_attempts: Option<i32>,
}

/// Checks the bearer token against every configured token, in constant time for each.
pub fn authorized(headers: &HeaderMap, tokens: &[crate::config::Secret]) -> Result<(), Failure> {
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let Some(given) = given else {
        return Err(Failure::new(
            ErrorKind::Unauthorized,
            "an Authorization: Bearer token is required",
        ));
    };
    // No early exit: every token is compared, so timing does not tell which one (or none) matched.
    let mut ok = subtle::Choice::from(0u8);
    for t in tokens {
        ok |= given.as_bytes().ct_eq(t.expose().as_bytes());
    }
    if bool::from(ok) {
        Ok(())
    } else {
        Err(Failure::new(
            ErrorKind::Unauthorized,
            "the bearer token is not valid",
        ))
    }
}

/// The `Idempotency-Key` header, if any (trimmed, at most [`MAX_NAME`] bytes).
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Failure> {
    let invalid = |msg: &str| Err(Failure::new(ErrorKind::Invalid, msg));
    match headers.get("idempotency-key") {
        None => Ok(None),
        Some(v) => match v.to_str() {
            Ok(s) if s.trim().len() > MAX_NAME => {
                invalid("the Idempotency-Key header is longer than 512 bytes")
            }
            Ok(s) if !s.trim().is_empty() => Ok(Some(s.trim().to_string())),
            _ => invalid("the Idempotency-Key header must be visible ASCII"),
        },
    }
}

/// The body as bytes, or the failure of a body too large or unreadable.
pub fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, Failure> {
    match body {
        Ok(b) => Ok(b),
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Err(Failure::new(ErrorKind::TooLarge, "the body is too large"))
        }
        Err(e) => Err(Failure::new(ErrorKind::BadJson, e.body_text())),
    }
}

/// Enqueues `msg` (`api.send_message`); with `wait`, waits for its outcome ([`super::outcome`]).
pub async fn enqueue(
    st: &AppState,
    msg: &NewMessage,
    wait: Option<std::time::Duration>,
) -> Result<super::outcome::Outcome, Failure> {
    let id = st
        .db
        .timed("api send", async {
            let c = st.db.pool().get().await?;
            crate::ops::send(&c, msg).await
        })
        .await
        .map_err(|e| db_failure(&e))?;
    match wait {
        Some(within) => super::outcome::wait(&st.db, id, within)
            .await
            .map_err(|e| db_failure(&e)),
        None => Ok(super::outcome::Outcome {
            id,
            state: "prepared".into(),
            provider_id: None,
            error_code: None,
            error_text: None,
        }),
    }
}

/// Reads and validates the body into the message to enqueue.
pub fn parse_send(headers: &HeaderMap, body: &[u8]) -> Result<NewMessage, Failure> {
    let req: SendRequest = serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => Failure::new(ErrorKind::Invalid, e.to_string()),
        _ => Failure::new(
            ErrorKind::BadJson,
            format!("the body is not valid JSON: {e}"),
        ),
    })?;
    let invalid = |msg: String| Err(Failure::new(ErrorKind::Invalid, msg));
    let header_key = idempotency_key(headers)?;
    for (name, v) in [
        ("agent", Some(&req.agent)),
        ("profile", req.profile.as_ref()),
        ("code", req.code.as_ref()),
        ("label", req.label.as_ref()),
        ("Idempotency-Key", header_key.as_ref()),
    ] {
        if let Some(v) = v {
            if v.len() > MAX_NAME {
                return invalid(format!("{name} is longer than {MAX_NAME} bytes"));
            }
            if v.contains('\0') {
                return invalid(format!("{name} contains a NUL character"));
            }
        }
    }
    if req.agent.trim().is_empty() {
        return invalid("agent must not be empty".into());
    }
    if req.address.trim().is_empty() {
        return invalid("address must not be empty".into());
    }
    if let Some(n) = req.max_attempts {
        if n < 1 {
            return invalid("max_attempts must be at least 1".into());
        }
    }
    let content = match req.content {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s,
        Some(other) => other.to_string(),
    };
    let text_fields = [
        Some(&req.address),
        req.subject.as_ref(),
        Some(&content),
        req.description.as_ref(),
    ];
    if text_fields.iter().flatten().any(|s| s.contains('\0')) {
        return invalid("text fields must not contain NUL characters".into());
    }
    Ok(NewMessage {
        parent: req.parent,
        agent: req.agent,
        profile: req.profile.unwrap_or_else(|| "default".into()),
        address: req.address,
        subject: req.subject,
        content,
        label: req.label,
        description: req.description,
        code: req.code.or(header_key),
        priority: req.priority.unwrap_or(0),
        send_at: req.send_at,
        max_attempts: req.max_attempts,
    })
}

async fn send(
    State(st): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = async {
        authorized(&headers, &st.tokens)?;
        let wait = super::outcome::parse_wait(query.as_deref())?;
        let body = body_bytes(body)?;
        let msg = parse_send(&headers, &body)?;
        let o = enqueue(&st, &msg, wait).await?;
        if let Some(f) = o.failure("") {
            return Err(f);
        }
        // Without `wait` the answer stays what it always was: just the id.
        Ok(match wait {
            None => json!({"id": o.id}),
            Some(_) => o.data(),
        })
    }
    .await;
    match r {
        Ok(data) => envelope::ok(data, 1),
        Err(f) => f.into_response(),
    }
}

/// A database error as the envelope reports it: the outbox's own `ERR-…` refusals are the
/// client's fault (with the text PostgreSQL gave); anything else is the server's.
pub(super) fn db_failure(e: &crate::db::DbError) -> Failure {
    if let Some(kind) = envelope::refusal_kind(e) {
        return Failure::new(kind, e.to_string());
    }
    match e.code() {
        Some(_) => {
            tracing::error!(error = %e, "REST enqueue failed");
            Failure::new(ErrorKind::Database, "the database refused the request")
        }
        None => {
            tracing::warn!(error = %e, "REST enqueue: database unavailable");
            Failure::new(ErrorKind::Unavailable, "the database is unavailable")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn any_configured_token_is_accepted_and_nothing_else() {
        let tokens = [Secret::new("alpha-token"), Secret::new("beta-token")];
        for t in ["alpha-token", "beta-token"] {
            let auth = format!("Bearer {t}");
            assert!(authorized(&headers(&[("authorization", &auth)]), &tokens).is_ok());
        }
        for bad in [
            "Bearer alpha",
            "Bearer alpha-tokenx",
            "Basic alpha-token",
            "",
        ] {
            let r = authorized(&headers(&[("authorization", bad)]), &tokens);
            assert_eq!(r.unwrap_err().kind, ErrorKind::Unauthorized, "{bad:?}");
        }
        assert!(authorized(&headers(&[]), &tokens).is_err());
        assert!(authorized(&headers(&[("authorization", "Bearer x")]), &[]).is_err());
    }

    #[test]
    fn bodies_are_validated_with_the_field_named() {
        let h = headers(&[]);
        let m = parse_send(
            &h,
            br#"{"agent":"file.agent","address":"a@b","content":{"k":1},"priority":3}"#,
        )
        .unwrap();
        assert_eq!(
            (m.profile.as_str(), m.content.as_str(), m.priority),
            ("default", r#"{"k":1}"#, 3)
        );
        let e = parse_send(&h, b"{not json").unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadJson);
        let e = parse_send(&h, br#"{"address":"a@b"}"#).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid);
        assert!(e.msg.contains("agent"), "{}", e.msg);
        let e = parse_send(&h, br#"{"agent":"x","address":"a","colour":"red"}"#).unwrap_err();
        assert!(e.msg.contains("colour"), "{}", e.msg);
        let e = parse_send(&h, br#"{"agent":"x","address":" "}"#).unwrap_err();
        assert!(e.msg.contains("address"), "{}", e.msg);
        let e = parse_send(&h, br#"{"agent":"x","address":"a","priority":"high"}"#).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid);
    }

    #[test]
    fn the_idempotency_key_header_is_the_code_unless_the_body_has_one() {
        let h = headers(&[("idempotency-key", "order-42")]);
        let m = parse_send(&h, br#"{"agent":"x","address":"a"}"#).unwrap();
        assert_eq!(m.code.as_deref(), Some("order-42"));
        let m = parse_send(&h, br#"{"agent":"x","address":"a","code":"own"}"#).unwrap();
        assert_eq!(m.code.as_deref(), Some("own"));
    }
}
