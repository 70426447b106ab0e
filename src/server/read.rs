//! Read links: `GET /m/{token}` serves the body a task execution rendered for one recipient
//! (`outbox.task_messages.body`, HTML) and records the read — first read time, last read time,
//! count — through `outbox.read_message`, queryable in `api.task_messages`.
//!
//! The token is the only secret: 32 base64url characters from the CSPRNG (see
//! [`crate::schedule`]). It is never logged; a malformed one is refused before any query; the page
//! is sent with `Referrer-Policy: no-referrer` (links in the body must not carry the token to
//! other sites) and `Cache-Control: no-store`. No bearer token: the link is the recipient's.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::AppState;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new().route("/m/:token", get(read))
}

fn page(status: StatusCode, html: String) -> Response {
    let mut r = (status, html).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn plain(status: StatusCode, what: &str) -> Response {
    page(
        status,
        format!(
            "<!DOCTYPE html>\n<meta charset=\"utf-8\">\n<title>{what}</title>\n<p>{what}</p>\n"
        ),
    )
}

/// A token as the scheduler makes them (anything else cannot exist).
fn well_formed(token: &str) -> bool {
    token.len() == 32
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

async fn read(State(st): State<Arc<AppState>>, Path(token): Path<String>) -> Response {
    if !well_formed(&token) {
        return plain(StatusCode::NOT_FOUND, "This message does not exist.");
    }
    let result = st
        .db
        .timed("read link", async {
            let c = st.db.pool().get().await?;
            let row = c
                .query_opt(
                    "SELECT message_id, body FROM outbox.read_message($1)",
                    &[&token],
                )
                .await?;
            Ok(row.map(|r| (r.get::<_, uuid::Uuid>(0), r.get::<_, String>(1))))
        })
        .await;
    match result {
        Ok(Some((id, body))) => {
            tracing::debug!(message_id = %id, "read link opened");
            page(StatusCode::OK, body)
        }
        Ok(None) => plain(StatusCode::NOT_FOUND, "This message does not exist."),
        Err(e) => {
            tracing::warn!(error = %e, "read link: database unavailable");
            plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "This message cannot be shown right now; try again later.",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_scheduler_tokens_are_looked_up() {
        assert!(super::well_formed("abcdefghijklmnopqrstuvwxyz012-_A"));
        assert!(!super::well_formed("short"));
        assert!(!super::well_formed("abcdefghijklmnopqrstuvwxyz012-_'"));
    }
}
