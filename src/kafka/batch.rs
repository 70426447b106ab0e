//! One fetched batch of one partition = one PostgreSQL transaction (see `sql/016_kafka.sql`):
//! `outbox.kafka_take` locks the partition's offset row and says where the committed records end;
//! every later record is handled under its own savepoint (`api.send_message` or `api.run_task`),
//! a refused one is rolled back to its savepoint and written to `outbox.kafka_dead_letters`;
//! `outbox.kafka_advance` moves the offset past the batch; COMMIT.
//!
//! Invariants: the offset moves only in the transaction that enqueued its records, so a record is
//! enqueued exactly once whatever fails where; an enqueue request without a code gets the
//! deterministic code `kafka:<topic>:<partition>:<offset>` as a second line of defence (an
//! operator's replay of old offsets finds the existing messages). On any database error the
//! connection is closed, not returned to the pool (it is inside a transaction), and nothing of
//! the batch stays.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use rskafka::record::RecordAndOffset;
use serde::Deserialize;

use crate::db::{Db, DbError};
use crate::server::envelope::ErrorKind;

/// What the records of a topic ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Enqueue requests (the REST send body).
    Send,
    /// Task-run requests.
    Task,
}

/// Fault injection for the crash tests: makes batch transactions die after their sends and
/// before COMMIT, as a daemon killed at that moment would (its connection closes; the server
/// rolls back). Off unless a test sets it.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Batches still to crash before COMMIT.
    pub crash_before_commit: Arc<AtomicU32>,
    /// Records handled (enqueued, run or dead-lettered) in batches that then crashed.
    pub crashed_records: Arc<AtomicU64>,
}

/// A record the trigger refused.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// The REST envelope's code for the same refusal.
    pub code: u32,
    pub reason: String,
}

/// What a committed batch did.
#[derive(Debug, Default)]
pub struct Applied {
    /// The committed offset after the batch: where the next fetch starts.
    pub next: i64,
    pub enqueued: u64,
    pub runs: u64,
    /// Below the committed offset already (a redelivery): not handled again.
    pub skipped: u64,
    pub dead: Vec<DeadLetter>,
}

/// How a record ended inside the transaction.
enum Handled {
    Enqueued,
    Run,
}

/// Why a record was not handled.
enum Refused {
    /// The record is at fault: dead letter (code, reason).
    Poison(u32, String),
    /// The database is (transient, or an operator must act): the batch is retried.
    Db(DbError),
}

/// Where the batch came from.
pub struct Source<'a> {
    pub group: &'a str,
    pub topic: &'a str,
    pub partition: i32,
    pub kind: Kind,
}

/// Applies `records` (fetched from `fetched_from`, in offset order) in one transaction. `Ok(None)`:
/// the fault hook crashed it (nothing committed).
pub async fn apply(
    db: &Db,
    src: &Source<'_>,
    fetched_from: i64,
    records: &[RecordAndOffset],
    faults: &Faults,
) -> Result<Option<Applied>, DbError> {
    db.timed("kafka batch", async {
        let conn = db.pool().get().await?;
        match run(&conn, src, fetched_from, records, faults).await {
            Ok(Some(applied)) => Ok(Some(applied)),
            Ok(None) => {
                conn.discard();
                Ok(None)
            }
            Err(e) => {
                conn.discard();
                Err(e)
            }
        }
    })
    .await
}

async fn run(
    c: &tokio_postgres::Client,
    src: &Source<'_>,
    fetched_from: i64,
    records: &[RecordAndOffset],
    faults: &Faults,
) -> Result<Option<Applied>, DbError> {
    c.batch_execute("BEGIN").await?;
    let committed: i64 = c
        .query_one(
            "SELECT outbox.kafka_take($1, $2, $3, $4)",
            &[&src.group, &src.topic, &src.partition, &fetched_from],
        )
        .await?
        .get(0);
    let mut applied = Applied {
        next: committed,
        ..Applied::default()
    };
    if committed < fetched_from {
        // Records between the committed offset and the fetch are missing from this batch
        // (an operator moved the offset back): refetch from the committed offset.
        c.batch_execute("ROLLBACK").await?;
        return Ok(Some(applied));
    }
    let mut handled = 0u64;
    for rec in records {
        if rec.offset < committed {
            applied.skipped += 1;
            continue;
        }
        c.batch_execute("SAVEPOINT kafka_record").await?;
        match handle(c, src, rec).await {
            Ok(h) => {
                c.batch_execute("RELEASE SAVEPOINT kafka_record").await?;
                match h {
                    Handled::Enqueued => applied.enqueued += 1,
                    Handled::Run => applied.runs += 1,
                }
            }
            Err(Refused::Poison(code, reason)) => {
                c.batch_execute("ROLLBACK TO SAVEPOINT kafka_record")
                    .await?;
                let dead = DeadLetter {
                    offset: rec.offset,
                    key: rec.record.key.clone(),
                    value: rec.record.value.clone(),
                    code,
                    reason,
                };
                c.execute(
                    "SELECT outbox.kafka_dead_letter($1, $2, $3, $4, $5, $6, $7, $8)",
                    &[
                        &src.group,
                        &src.topic,
                        &src.partition,
                        &dead.offset,
                        &dead.key,
                        &dead.value,
                        &(dead.code as i32),
                        &dead.reason,
                    ],
                )
                .await?;
                applied.dead.push(dead);
            }
            Err(Refused::Db(e)) => return Err(e),
        }
        handled += 1;
        applied.next = rec.offset + 1;
    }
    if handled == 0 {
        c.batch_execute("ROLLBACK").await?;
        return Ok(Some(applied));
    }
    c.execute(
        "SELECT outbox.kafka_advance($1, $2, $3, $4)",
        &[&src.group, &src.topic, &src.partition, &applied.next],
    )
    .await?;
    let crash = faults
        .crash_before_commit
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if crash {
        faults.crashed_records.fetch_add(handled, Ordering::SeqCst);
        return Ok(None);
    }
    c.batch_execute("COMMIT").await?;
    Ok(Some(applied))
}

/// Handles one record inside the batch's transaction (under its savepoint).
async fn handle(
    c: &tokio_postgres::Client,
    src: &Source<'_>,
    rec: &RecordAndOffset,
) -> Result<Handled, Refused> {
    let value = rec.record.value.as_deref().unwrap_or_default();
    match src.kind {
        Kind::Send => {
            let headers = header_map(&rec.record.headers);
            let mut msg = crate::server::api::parse_send(&headers, value)
                .map_err(|f| Refused::Poison(f.kind.code(), f.msg))?;
            msg.code.get_or_insert_with(|| {
                format!("kafka:{}:{}:{}", src.topic, src.partition, rec.offset)
            });
            crate::ops::send(c, &msg).await.map_err(refusal)?;
            Ok(Handled::Enqueued)
        }
        Kind::Task => {
            let task = task_of(value).map_err(|m| Refused::Poison(ErrorKind::Invalid.code(), m))?;
            c.query_one("SELECT api.run_task($1::text)", &[&task])
                .await
                .map_err(|e| refusal(e.into()))?;
            Ok(Handled::Run)
        }
    }
}

/// A database error of one record: the outbox's own refusals and data errors are the record's
/// fault (the same classes the REST API answers with 400/404); anything else is retried.
fn refusal(e: DbError) -> Refused {
    match crate::server::envelope::refusal_kind(&e) {
        Some(kind) => Refused::Poison(kind.code(), e.to_string()),
        None => Refused::Db(e),
    }
}

/// Kafka record headers as HTTP headers (names are case-insensitive there). A header that is not
/// a valid HTTP header is ignored.
pub fn header_map(headers: &std::collections::BTreeMap<String, Vec<u8>>) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_bytes(v),
        ) {
            map.append(name, value);
        }
    }
    map
}

/// The task of a task-run record: `{"task": "<id or name>"}`, a JSON string, or the bare text.
pub fn task_of(value: &[u8]) -> Result<String, String> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Run {
        task: String,
    }
    let text = std::str::from_utf8(value)
        .map_err(|_| "the task-run record is not UTF-8 text".to_string())?
        .trim();
    let task = if text.starts_with('{') {
        serde_json::from_str::<Run>(text)
            .map_err(|e| format!("the task-run record is not {{\"task\": \"<id or name>\"}}: {e}"))?
            .task
    } else if text.starts_with('"') {
        serde_json::from_str::<String>(text)
            .map_err(|e| format!("the task-run record is not a JSON string: {e}"))?
    } else {
        text.to_string()
    };
    let task = task.trim().to_string();
    if task.is_empty() || task.len() > 512 || task.contains('\0') {
        return Err("the task id or name must be 1 to 512 characters".into());
    }
    Ok(task)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_records_in_every_accepted_form() {
        assert_eq!(
            task_of(br#"{"task": "daily-report"}"#).unwrap(),
            "daily-report"
        );
        assert_eq!(task_of(br#""daily-report""#).unwrap(), "daily-report");
        assert_eq!(task_of(b" daily-report\n").unwrap(), "daily-report");
        assert!(task_of(br#"{"task": 1}"#).is_err());
        assert!(task_of(br#"{"task": "a", "x": 1}"#).is_err());
        assert!(task_of(b"").is_err());
        assert!(task_of(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn record_headers_become_http_headers() {
        let mut h = std::collections::BTreeMap::new();
        h.insert("Idempotency-Key".to_string(), b"order-7".to_vec());
        h.insert("bad header".to_string(), b"x".to_vec());
        let m = header_map(&h);
        assert_eq!(m.get("idempotency-key").unwrap(), "order-7");
        assert_eq!(m.len(), 1);
    }
}
