//! Database access: the connection pool, database creation, migrations, and the outbox queries of
//! the daemon's hot path and of the CLI.
//!
//! Invariants: every call is bounded by `db_timeout`; the hot path is one round trip per batch
//! (`outbox.claim`, `outbox.extend_leases`, `outbox.record_outcomes`, `outbox.reclaim_expired`,
//! `outbox.release`), through statements prepared once per pooled connection. Every claim carries
//! a fencing token (a claim id the daemon generates per `outbox.claim` call): heartbeats, outcomes
//! and hand-backs present (message id, claim id) and touch a message only while that claim holds
//! it (`sql/003_fencing.sql`).

pub mod listener;
pub mod migrate;

use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;
use uuid::Uuid;

use crate::connector::OutboxMessage;

/// A database failure.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {}", describe(.0))]
    Query(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database call timed out after {0:?}: {1}")]
    Timeout(Duration, &'static str),
    #[error("database configuration: {0}")]
    Config(String),
}

/// tokio-postgres prints only "db error" for server errors: show the server's message.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{}: {}", d.code().code(), d.message()),
        None => e.to_string(),
    }
}

impl DbError {
    /// The SQLSTATE or, for outbox errors, the `ERR-…` code at the start of the message.
    pub fn code(&self) -> Option<String> {
        match self {
            DbError::Query(e) => e.as_db_error().map(|d| {
                d.message()
                    .split_once(':')
                    .filter(|(c, _)| c.starts_with("ERR-"))
                    .map(|(c, _)| c.to_string())
                    .unwrap_or_else(|| d.code().code().to_string())
            }),
            _ => None,
        }
    }
}

/// One delivery outcome, as `outbox.record_outcomes` takes it.
#[derive(Debug, Clone)]
pub struct OutcomeRow {
    pub id: Uuid,
    /// The fencing token of the claim that produced this outcome.
    pub claim_id: Uuid,
    /// The attempt number the claim returned.
    pub attempt: i32,
    /// `done`, `retry` or `failed`.
    pub outcome: &'static str,
    pub error_code: Option<String>,
    pub error_text: Option<String>,
    pub remote_status: Option<i32>,
    pub provider_id: Option<String>,
    pub duration_ms: i32,
    pub retry_delay_ms: Option<i32>,
    pub reply: Option<String>,
}

impl OutcomeRow {
    /// A copy whose texts PostgreSQL accepts (NUL replaced by U+FFFD).
    pub fn storable(&self) -> OutcomeRow {
        fn clean(s: &Option<String>) -> Option<String> {
            s.as_ref().map(|t| {
                if t.contains('\0') {
                    t.replace('\0', "\u{FFFD}")
                } else {
                    t.clone()
                }
            })
        }
        OutcomeRow {
            error_code: clean(&self.error_code),
            error_text: clean(&self.error_text),
            provider_id: clean(&self.provider_id),
            reply: clean(&self.reply),
            ..self.clone()
        }
    }
}

/// What `outbox.record_outcomes` did with one outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Applied: the message changed state and an attempt row was written.
    Recorded,
    /// Already recorded by an earlier call of this claim whose answer was lost; nothing written.
    Duplicate,
    /// The claim had lost its lease (reclaimed, maybe claimed again): the message was not changed.
    Stale,
}

/// One claim a daemon holds: the message and the fencing token of the claim.
pub type ClaimKey = (Uuid, Uuid);

/// The pool and the timeout every call obeys.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
    timeout: Duration,
}

const CLAIM: &str =
    "SELECT id, code, agenttypecode, agentcode, profile, address, subject, content, \
                     label, attempts, max_attempts, priority, created \
                     FROM outbox.claim($1, $2, $3, $4)";
const RECORD: &str = "SELECT id, claim_id, result \
                      FROM outbox.record_outcomes($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)";

impl Db {
    /// Builds a pool (connections are opened lazily) whose sessions use `synchronous_commit`
    /// (when given).
    pub fn connect(
        url: &str,
        pool_size: usize,
        timeout: Duration,
        synchronous_commit: Option<&str>,
    ) -> Result<Db, DbError> {
        let mut pg =
            tokio_postgres::Config::from_str(url).map_err(|e| DbError::Config(e.to_string()))?;
        if pg.get_application_name().is_none() {
            pg.application_name("outboxd");
        }
        if let Some(sc) = synchronous_commit {
            let mut options = pg.get_options().map(str::to_string).unwrap_or_default();
            if !options.is_empty() {
                options.push(' ');
            }
            options.push_str(&format!("-c synchronous_commit={sc}"));
            pg.options(&options);
        }
        pg.connect_timeout(timeout);
        pg.keepalives(true);
        let mgr = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(pool_size)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| DbError::Config(e.to_string()))?;
        Ok(Db { pool, timeout })
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Runs `f` under the call timeout.
    pub async fn timed<T>(
        &self,
        what: &'static str,
        f: impl Future<Output = Result<T, DbError>>,
    ) -> Result<T, DbError> {
        tokio::time::timeout(self.timeout, f)
            .await
            .map_err(|_| DbError::Timeout(self.timeout, what))?
    }

    /// Claims up to `limit` due messages for `worker` under the fencing token `claim_id` (new for
    /// every call), moving them to `sending` under a lease. When this fails, the claim may still
    /// have committed on the server: hand its messages back with [`Db::release_claim`].
    pub async fn claim(
        &self,
        worker: &str,
        limit: usize,
        lease: Duration,
        claim_id: Uuid,
    ) -> Result<Vec<OutboxMessage>, DbError> {
        self.timed("claim", async {
            let c = self.pool.get().await?;
            let st = c.prepare_cached(CLAIM).await?;
            let rows = c
                .query(
                    &st,
                    &[
                        &worker,
                        &(limit as i32),
                        &(lease.as_millis() as i32),
                        &claim_id,
                    ],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| OutboxMessage {
                    id: r.get(0),
                    code: r.get(1),
                    agent_type: r.get(2),
                    agent: r.get(3),
                    profile: r.get(4),
                    address: r.get(5),
                    subject: r.get(6),
                    content: r.get(7),
                    label: r.get(8),
                    attempt: r.get(9),
                    max_attempts: r.get(10),
                    priority: r.get(11),
                    created: r.get(12),
                })
                .collect())
        })
        .await
    }

    /// Hands back the messages an orphaned claim left in `sending` (its call failed on the client
    /// but may have committed on the server): no attempt row, no lease expiry charged. Returns how
    /// many; a claim that reaches the server later claims nothing.
    pub async fn release_claim(&self, worker: &str, claim_id: Uuid) -> Result<i32, DbError> {
        self.timed("release_claim", async {
            let c = self.pool.get().await?;
            let row = c
                .query_one("SELECT outbox.release_claim($1, $2)", &[&worker, &claim_id])
                .await?;
            Ok(row.get(0))
        })
        .await
    }

    /// Extends the leases `worker` holds on `claims`; returns the claims it still holds.
    pub async fn extend_leases(
        &self,
        worker: &str,
        claims: &[ClaimKey],
        lease: Duration,
    ) -> Result<Vec<ClaimKey>, DbError> {
        let ids: Vec<Uuid> = claims.iter().map(|c| c.0).collect();
        let claim_ids: Vec<Uuid> = claims.iter().map(|c| c.1).collect();
        self.timed("extend_leases", async {
            let c = self.pool.get().await?;
            let st = c
                .prepare_cached("SELECT id, claim_id FROM outbox.extend_leases($1, $2, $3, $4)")
                .await?;
            let rows = c
                .query(
                    &st,
                    &[&worker, &ids, &claim_ids, &(lease.as_millis() as i32)],
                )
                .await?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
        .await
    }

    /// Records a batch of outcomes in one round trip; returns what happened to each (by claim).
    /// Texts are made storable first: PostgreSQL `text` cannot hold NUL, and one provider's odd
    /// reply must not keep a whole batch from being recorded. Safe to retry: an outcome already
    /// recorded by an earlier call of the same claim comes back [`Recorded::Duplicate`].
    pub async fn record_outcomes(
        &self,
        worker: &str,
        rows: &[OutcomeRow],
    ) -> Result<Vec<(ClaimKey, Recorded)>, DbError> {
        let clean: Vec<OutcomeRow> = rows.iter().map(OutcomeRow::storable).collect();
        let rows = clean.as_slice();
        let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
        let claim_ids: Vec<Uuid> = rows.iter().map(|r| r.claim_id).collect();
        let attempts: Vec<i32> = rows.iter().map(|r| r.attempt).collect();
        let outcomes: Vec<&str> = rows.iter().map(|r| r.outcome).collect();
        let codes: Vec<Option<&str>> = rows.iter().map(|r| r.error_code.as_deref()).collect();
        let texts: Vec<Option<&str>> = rows.iter().map(|r| r.error_text.as_deref()).collect();
        let statuses: Vec<Option<i32>> = rows.iter().map(|r| r.remote_status).collect();
        let providers: Vec<Option<&str>> = rows.iter().map(|r| r.provider_id.as_deref()).collect();
        let durations: Vec<i32> = rows.iter().map(|r| r.duration_ms).collect();
        let delays: Vec<Option<i32>> = rows.iter().map(|r| r.retry_delay_ms).collect();
        let replies: Vec<Option<&str>> = rows.iter().map(|r| r.reply.as_deref()).collect();
        self.timed("record_outcomes", async {
            let c = self.pool.get().await?;
            let st = c.prepare_cached(RECORD).await?;
            let rows = c
                .query(
                    &st,
                    &[
                        &worker, &ids, &claim_ids, &attempts, &outcomes, &codes, &texts, &statuses,
                        &providers, &durations, &delays, &replies,
                    ],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| {
                    let result = match r.get::<_, &str>(2) {
                        "recorded" => Recorded::Recorded,
                        "duplicate" => Recorded::Duplicate,
                        _ => Recorded::Stale,
                    };
                    ((r.get(0), r.get(1)), result)
                })
                .collect())
        })
        .await
    }

    /// Moves messages whose lease expired back to prepared; returns how many.
    pub async fn reclaim_expired(&self, worker: &str) -> Result<i32, DbError> {
        self.timed("reclaim_expired", async {
            let c = self.pool.get().await?;
            let st = c
                .prepare_cached("SELECT outbox.reclaim_expired($1)")
                .await?;
            Ok(c.query_one(&st, &[&worker]).await?.get(0))
        })
        .await
    }

    /// Hands messages whose delivery did not finish back as prepared (shutdown), due after
    /// `delay`; only the claims `worker` still holds.
    pub async fn release(
        &self,
        worker: &str,
        claims: &[ClaimKey],
        delay: Duration,
    ) -> Result<i32, DbError> {
        let ids: Vec<Uuid> = claims.iter().map(|c| c.0).collect();
        let claim_ids: Vec<Uuid> = claims.iter().map(|c| c.1).collect();
        self.timed("release", async {
            let c = self.pool.get().await?;
            let row = c
                .query_one(
                    "SELECT outbox.release($1, $2, $3, $4)",
                    &[&worker, &ids, &claim_ids, &(delay.as_millis() as i32)],
                )
                .await?;
            Ok(row.get(0))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_bytes_are_replaced_before_recording() {
        let row = OutcomeRow {
            id: Uuid::nil(),
            claim_id: Uuid::nil(),
            attempt: 1,
            outcome: "done",
            error_code: None,
            error_text: Some("a\0b".into()),
            remote_status: None,
            provider_id: Some("p\0".into()),
            duration_ms: 1,
            retry_delay_ms: None,
            reply: Some("\0".into()),
        };
        let s = row.storable();
        assert_eq!(s.error_text.as_deref(), Some("a\u{FFFD}b"));
        assert_eq!(s.provider_id.as_deref(), Some("p\u{FFFD}"));
        assert_eq!(s.reply.as_deref(), Some("\u{FFFD}"));
    }
}
