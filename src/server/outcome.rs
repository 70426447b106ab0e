//! `?wait=<duration>` on the send endpoints (`POST /api/v1/message/send`, `POST
//! /v1/dd/topapi/message`, `POST /v1/dd/chat/send`): after the message is in the outbox, wait up
//! to that long (at most [`MAX_WAIT`]) for its outcome and answer with it.
//!
//! How: poll the message's row (a primary-key read) with a deadline, every [`FIRST_POLL`] at
//! first and backing off to every [`MAX_POLL`]. Not LISTEN: that would need either a dedicated
//! connection per waiting request or a shared listener fanning out, and a NOTIFY from the record
//! functions on every outcome of every message — a cost the hot path would pay even when nobody
//! waits. A waiting request costs at most four cheap reads a second, only while it waits, and the
//! wait is bounded well inside the request timeout.
//!
//! Outcomes: `submitted` (with the provider's id, e.g. a work notification's `task_id`) and
//! `failed` (with the stable error code and the last attempt's text) end the wait, as does any
//! state that no delivery will change (`created` after a cancel, `deleted`); on the deadline the
//! answer carries the state the message is in (`prepared`, `sending`: still on its way).

use std::time::Duration;

use serde_json::{json, Value};
use uuid::Uuid;

use super::envelope::{ErrorKind, Failure};
use crate::db::{Db, DbError};

/// The longest wait honoured (a longer `?wait=` is cut to this): the answer comes well before the
/// server's request timeout ([`super::REQUEST_TIMEOUT`], 30 s).
pub const MAX_WAIT: Duration = Duration::from_secs(25);
/// The first re-read of the message after the enqueue.
pub const FIRST_POLL: Duration = Duration::from_millis(25);
/// The slowest re-read.
pub const MAX_POLL: Duration = Duration::from_millis(250);

/// `wait` from a raw query string: a duration (`5s`, `1500ms`, `2m`) or a number of seconds; cut
/// to [`MAX_WAIT`]. `None` when the query has no `wait`.
pub fn parse_wait(raw_query: Option<&str>) -> Result<Option<Duration>, Failure> {
    let Some(v) = query_value(raw_query, "wait") else {
        return Ok(None);
    };
    let v = v.trim();
    let d = match v.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(v).map_err(|e| {
            Failure::new(
                ErrorKind::Invalid,
                format!("wait must be a duration such as 5s or 1500ms: {e}"),
            )
        })?,
    };
    Ok(Some(d.min(MAX_WAIT)))
}

/// The first value of `key` in a raw query string, form-decoded.
pub fn query_value(raw_query: Option<&str>, key: &str) -> Option<String> {
    url::form_urlencoded::parse(raw_query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// Where a message stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub id: Uuid,
    pub state: String,
    pub provider_id: Option<String>,
    pub error_code: Option<String>,
    pub error_text: Option<String>,
}

impl Outcome {
    /// Whether a delivery may still change the state.
    pub fn pending(&self) -> bool {
        matches!(self.state.as_str(), "prepared" | "sending")
    }

    /// The `data` of a success answer: id, state and, once submitted, the provider's id.
    pub fn data(&self) -> Value {
        let mut d = json!({"id": self.id, "state": self.state});
        if let Some(p) = &self.provider_id {
            d["provider_id"] = p.clone().into();
        }
        d
    }

    /// The failure answer of a failed message: `data` = `"[code] text"`, where `code` is the
    /// stable error code with `strip` taken off its front (`dingtalk-` for the DingTalk center,
    /// whose clients know DingTalk's bare errcodes).
    pub fn failure(&self, strip: &str) -> Option<Failure> {
        if self.state != "failed" {
            return None;
        }
        let code = self.error_code.as_deref().unwrap_or("unknown");
        Some(Failure::provider(
            format!("message {} failed: {code}", self.id),
            code.strip_prefix(strip).unwrap_or(code),
            self.error_text.as_deref().unwrap_or(""),
        ))
    }
}

async fn read(db: &Db, id: Uuid) -> Result<Option<Outcome>, DbError> {
    db.timed("api wait", async {
        let c = db.pool().get().await?;
        let row = c
            .query_opt(
                "SELECT m.state, m.provider_message_id, m.last_error_code, \
                        (SELECT a.error_text FROM outbox.attempts a WHERE a.message_id = m.id \
                          ORDER BY a.attempt DESC, a.id DESC LIMIT 1) \
                   FROM outbox.live_messages m WHERE m.id = $1",
                &[&id],
            )
            .await?;
        Ok(row.map(|r| Outcome {
            id,
            state: r.get(0),
            provider_id: r.get(1),
            error_code: r.get(2),
            error_text: r.get(3),
        }))
    })
    .await
}

/// Reads message `id` until it is no longer pending or `within` has passed; its last state.
/// A message purged meanwhile reads as state `deleted`.
pub async fn wait(db: &Db, id: Uuid, within: Duration) -> Result<Outcome, DbError> {
    let deadline = tokio::time::Instant::now() + within;
    let mut pause = FIRST_POLL;
    loop {
        let o = read(db, id).await?.unwrap_or_else(|| Outcome {
            id,
            state: "deleted".into(),
            provider_id: None,
            error_code: None,
            error_text: None,
        });
        let now = tokio::time::Instant::now();
        if !o.pending() || now >= deadline {
            return Ok(o);
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(MAX_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_is_a_duration_or_seconds_and_capped() {
        assert_eq!(parse_wait(None).unwrap(), None);
        assert_eq!(parse_wait(Some("profile=x")).unwrap(), None);
        assert_eq!(
            parse_wait(Some("wait=5s")).unwrap(),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            parse_wait(Some("a=1&wait=1500ms")).unwrap(),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_wait(Some("wait=3")).unwrap(),
            Some(Duration::from_secs(3))
        );
        assert_eq!(parse_wait(Some("wait=1h")).unwrap(), Some(MAX_WAIT));
        let e = parse_wait(Some("wait=soon")).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid);
        assert!(e.msg.contains("wait"), "{}", e.msg);
    }

    #[test]
    fn a_failed_outcome_names_the_code_in_data() {
        let o = Outcome {
            id: Uuid::nil(),
            state: "failed".into(),
            provider_id: None,
            error_code: Some("dingtalk-34019".into()),
            error_text: Some("chatid不存在".into()),
        };
        let f = o.failure("dingtalk-").unwrap();
        assert_eq!(f.data.as_deref(), Some("[34019] chatid不存在"));
        assert!(f.msg.contains("dingtalk-34019"), "{}", f.msg);
        let f = o.failure("").unwrap();
        assert_eq!(f.data.as_deref(), Some("[dingtalk-34019] chatid不存在"));
        let ok = Outcome {
            state: "submitted".into(),
            provider_id: Some("42".into()),
            ..o
        };
        assert!(ok.failure("").is_none());
        assert_eq!(ok.data()["provider_id"], "42");
    }
}
