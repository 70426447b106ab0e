//! Database access: the connection pool, database creation, migrations, and the outbox queries of
//! the daemon's hot path and of the CLI.
//!
//! Invariants: every call is bounded by `db_timeout`, on the client ([`Db::timed`]) and on the
//! server (the sessions' `statement_timeout`); a call abandoned by its timeout is cancelled on the
//! server and its connection is closed, never handed out again; the hot path is one round trip per
//! batch (`outbox.claim`, `outbox.extend_leases`, `outbox.record_outcomes`,
//! `outbox.reclaim_expired`, `outbox.release`), through statements prepared once per pooled
//! connection. Every claim carries a fencing token (a claim id the daemon generates per
//! `outbox.claim` call): heartbeats, outcomes and hand-backs present (message id, claim id) and
//! touch a message only while that claim holds it (`sql/003_fencing.sql`). Every connection
//! honours the URL's `sslmode` ([`tls`]).

pub mod listener;
pub mod migrate;
pub mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, RecyclingMethod};
use tokio_postgres::CancelToken;
use uuid::Uuid;

use crate::connector::OutboxMessage;

/// A database failure.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {}", describe(.0))]
    Query(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(deadpool_postgres::PoolError),
    #[error("database call timed out after {0:?}: {1}")]
    Timeout(Duration, &'static str),
    #[error("database configuration: {0}")]
    Config(String),
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            // A connection that could not be opened: say why (TLS, refused, authentication).
            deadpool_postgres::PoolError::Backend(e) => DbError::Query(e),
            e => DbError::Pool(e),
        }
    }
}

/// tokio-postgres prints only "db error" for server errors: show the server's message. Other
/// errors print only their kind ("error performing TLS handshake"), so their immediate cause is
/// shown too, against the house rule of no source chain in `Display`: it is the only text that
/// says what failed, and tokio-postgres never puts the connection string (or its password) in it.
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{}: {}", d.code().code(), d.message()),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
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

/// `url` with the startup option `-c role=<role>` added to its `options` (kept, if it has any):
/// every session opened from it runs as `role` (`SET ROLE`, checked by the server against the
/// login's memberships) — the pool, the LISTEN connection and the CLI alike. Works for both
/// `postgres://` URLs and `key=value` strings; the last `options` wins in either.
/// `role` must be a plain name (the configuration checks it).
pub fn with_session_role(url: &str, role: &str) -> String {
    let existing = tokio_postgres::Config::from_str(url)
        .ok()
        .and_then(|c| c.get_options().map(str::to_string))
        .unwrap_or_default();
    let options = if existing.is_empty() {
        format!("-c role={role}")
    } else {
        format!("{existing} -c role={role}")
    };
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        // tokio-postgres percent-decodes query values but does not read `+` as a space.
        let encoded: String = options
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut params: Vec<&str> = query
            .split('&')
            .filter(|p| !p.is_empty() && !p.starts_with("options="))
            .collect();
        let opt = format!("options={encoded}");
        params.push(&opt);
        format!("{base}?{}", params.join("&"))
    } else {
        let quoted = options.replace('\\', "\\\\").replace('\'', "\\'");
        format!("{url} options='{quoted}'")
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
    /// `<kind>/<profile>` of the connector that made the attempt (a fallback's, when one did);
    /// `None` when no connector was found.
    pub profile: Option<String>,
}

impl OutcomeRow {
    /// Whether a text holds a NUL, which PostgreSQL `text` cannot store (see [`Self::storable`]).
    pub fn needs_cleaning(&self) -> bool {
        [
            &self.error_code,
            &self.error_text,
            &self.provider_id,
            &self.reply,
        ]
        .iter()
        .any(|t| t.as_deref().is_some_and(|t| t.contains('\0')))
    }

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

tokio::task_local! {
    /// The [`Db::timed`] call the current task is in, so that [`Pool::get`] can register the
    /// connections the call uses.
    static CALL: Arc<Call>;
}

/// The connections one timed call has checked out, and whether the call was abandoned.
#[derive(Default)]
struct Call {
    abandoned: AtomicBool,
    /// Cancel tokens of the connections still checked out (`None` once returned).
    checked_out: Mutex<Vec<Option<CancelToken>>>,
}

/// The connection pool. A connection taken inside [`Db::timed`] is tracked: if the call times out,
/// the statement it runs is cancelled on the server and the connection is closed rather than
/// returned, since it may still be busy with the abandoned statement (or in a transaction).
#[derive(Clone)]
pub struct Pool {
    inner: deadpool_postgres::Pool,
    tls: tls::Tls,
}

impl Pool {
    /// Waits for a connection (bounded by the pool's wait timeout).
    pub async fn get(&self) -> Result<Conn, deadpool_postgres::PoolError> {
        let obj = self.inner.get().await?;
        let tracked = CALL.try_with(|call| {
            let mut list = call.checked_out.lock().unwrap();
            list.push(Some(obj.cancel_token()));
            (Arc::clone(call), list.len() - 1)
        });
        Ok(Conn {
            obj: Some(obj),
            tracked: tracked.ok(),
        })
    }

    pub fn status(&self) -> deadpool_postgres::Status {
        self.inner.status()
    }
}

/// A pooled connection; derefs to the client.
pub struct Conn {
    obj: Option<deadpool_postgres::Object>,
    tracked: Option<(Arc<Call>, usize)>,
}

impl Deref for Conn {
    type Target = deadpool_postgres::Object;
    fn deref(&self) -> &Self::Target {
        self.obj.as_ref().expect("present until dropped")
    }
}

impl DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.obj.as_mut().expect("present until dropped")
    }
}

impl Conn {
    /// Closes the connection instead of returning it to the pool: after an error inside an
    /// explicit transaction (`BEGIN` … `COMMIT` as statements), whose state the pool cannot see.
    /// The server rolls back whatever the session had not committed.
    pub fn discard(mut self) {
        if let Some(obj) = self.obj.take() {
            drop(deadpool_postgres::Object::take(obj));
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let Some((call, slot)) = &self.tracked else {
            return;
        };
        if call.abandoned.load(Ordering::SeqCst) {
            if let Some(obj) = self.obj.take() {
                // Out of the pool for good; dropping the client closes the connection once the
                // cancelled statement has ended.
                drop(deadpool_postgres::Object::take(obj));
            }
        } else {
            call.checked_out.lock().unwrap()[*slot] = None;
        }
    }
}

const CLAIM: &str =
    "SELECT id, code, agenttypecode, agentcode, profile, address, subject, content, \
                     label, attempts, max_attempts, priority, created, reclaimed \
                     FROM outbox.claim($1, $2, $3, $4)";
const TEMPLATES: &str = "SELECT message_id, name, kind, version, subject, body, vars \
                         FROM outbox.message_templates_of($1)";
const RECORD: &str = "SELECT id, claim_id, result \
                      FROM outbox.record_outcomes($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)";
const RATE_TAKE: &str =
    "SELECT result, wait_ms FROM outbox.rate_take($1, $2, $3, $4, $5, $6, $7, NULL)";
const RATE_BLOCK: &str = "SELECT outbox.rate_block($1, $2, $3, $4, NULL)";

/// What `outbox.rate_take` decided for a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateTurn {
    /// Every window allows it now: deliver.
    Send,
    /// Over a limit: already back in prepared (uncharged), due after this wait.
    Deferred(Duration),
    /// The claim is no longer held (its lease was lost): drop the delivery.
    NotHeld,
}

impl Db {
    /// Builds a pool (connections are opened lazily, with TLS as the URL's `sslmode` says) whose
    /// sessions use `synchronous_commit` (when given) and `statement_timeout = timeout` (unless
    /// the URL's `options` set one), so that the server stops a statement the client gave up on
    /// even when the cancel request cannot reach it.
    pub fn connect(
        url: &str,
        pool_size: usize,
        timeout: Duration,
        synchronous_commit: Option<&str>,
    ) -> Result<Db, DbError> {
        let target = tls::target(url)?;
        let mut pg = target.config;
        if pg.get_application_name().is_none() {
            pg.application_name("outboxd");
        }
        let mut options = pg.get_options().map(str::to_string).unwrap_or_default();
        let mut add = |setting: String| {
            if !options.is_empty() {
                options.push(' ');
            }
            options.push_str(&format!("-c {setting}"));
        };
        if let Some(sc) = synchronous_commit {
            add(format!("synchronous_commit={sc}"));
        }
        if statement_timeout_of(&pg).is_none() {
            add(format!("statement_timeout={}", timeout.as_millis().max(1)));
        }
        pg.options(&options);
        pg.connect_timeout(timeout);
        pg.keepalives(true);
        let mgr = Manager::from_config(
            pg,
            target.tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = deadpool_postgres::Pool::builder(mgr)
            .max_size(pool_size)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| DbError::Config(e.to_string()))?;
        Ok(Db {
            pool: Pool {
                inner: pool,
                tls: target.tls,
            },
            timeout,
        })
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Runs `f` under the call timeout. When it fires, the statements of the connections `f`
    /// holds are cancelled on the server (a cancel request, as psql's Ctrl-C) and those
    /// connections are closed instead of going back to the pool.
    pub async fn timed<T>(
        &self,
        what: &'static str,
        f: impl Future<Output = Result<T, DbError>>,
    ) -> Result<T, DbError> {
        let call = Arc::new(Call::default());
        let fut = CALL.scope(Arc::clone(&call), f);
        tokio::pin!(fut);
        match tokio::time::timeout(self.timeout, &mut fut).await {
            Ok(r) => r,
            Err(_) => {
                // Marked before `fut` (and the connections in it) is dropped at the end of this
                // function, so that they are taken out of the pool.
                call.abandoned.store(true, Ordering::SeqCst);
                let tokens: Vec<CancelToken> = call
                    .checked_out
                    .lock()
                    .unwrap()
                    .iter_mut()
                    .filter_map(Option::take)
                    .collect();
                for token in tokens {
                    let tls = self.pool.tls.clone();
                    let limit = self.timeout;
                    tokio::spawn(async move {
                        match tokio::time::timeout(limit, token.cancel_query(tls)).await {
                            Ok(Ok(())) => tracing::debug!(call = what, "abandoned statement cancelled"),
                            Ok(Err(e)) => tracing::warn!(call = what, error = %DbError::from(e), "cannot cancel an abandoned statement; statement_timeout ends it"),
                            Err(_) => tracing::warn!(call = what, "cancel request timed out; statement_timeout ends the abandoned statement"),
                        }
                    });
                }
                Err(DbError::Timeout(self.timeout, what))
            }
        }
    }

    /// Claims up to `limit` due messages for `worker` under the fencing token `claim_id` (new for
    /// every call), moving them to `sending` under a lease. When this fails, the claim may still
    /// have committed on the server: hand its messages back with [`Db::release_claim`].
    /// Also returns how many of them the claim found with an expired lease and handed back first.
    pub async fn claim(
        &self,
        worker: &str,
        limit: usize,
        lease: Duration,
        claim_id: Uuid,
    ) -> Result<(Vec<(OutboxMessage, Option<crate::render::Job>)>, usize), DbError> {
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
            let reclaimed = rows.iter().filter(|r| r.get::<_, bool>(13)).count();
            let mut claimed: Vec<(OutboxMessage, Option<crate::render::Job>)> = rows
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
                    images: Vec::new(),
                })
                .map(|m| (m, None))
                .collect();
            // One batched read per claim for the messages built from a template (none, mostly:
            // then the query finds nothing in a primary-key lookup). Part of the claim call: if it
            // fails, the caller hands the whole claim back with release_claim.
            if !claimed.is_empty() {
                let ids: Vec<Uuid> = claimed.iter().map(|(m, _)| m.id).collect();
                let st = c.prepare_cached(TEMPLATES).await?;
                let mut jobs: HashMap<Uuid, crate::render::Job> = c
                    .query(&st, &[&ids])
                    .await?
                    .iter()
                    .map(|r| {
                        (
                            r.get(0),
                            crate::render::Job {
                                template: crate::render::Template {
                                    name: r.get(1),
                                    kind: r.get(2),
                                    version: r.get(3),
                                    subject: r.get(4),
                                    body: r.get(5),
                                },
                                vars: r.get(6),
                            },
                        )
                    })
                    .collect();
                for (m, job) in claimed.iter_mut() {
                    *job = jobs.remove(&m.id);
                }
            }
            Ok((claimed, reclaimed))
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
        // Copies only of the rows that need cleaning (hardly ever one).
        let clean: Vec<std::borrow::Cow<OutcomeRow>> = rows
            .iter()
            .map(|r| {
                if r.needs_cleaning() {
                    std::borrow::Cow::Owned(r.storable())
                } else {
                    std::borrow::Cow::Borrowed(r)
                }
            })
            .collect();
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
        let profiles: Vec<Option<&str>> = rows.iter().map(|r| r.profile.as_deref()).collect();
        self.timed("record_outcomes", async {
            let c = self.pool.get().await?;
            let st = c.prepare_cached(RECORD).await?;
            let rows = c
                .query(
                    &st,
                    &[
                        &worker, &ids, &claim_ids, &attempts, &outcomes, &codes, &texts, &statuses,
                        &providers, &durations, &delays, &replies, &profiles,
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

    /// Takes a turn in the rate windows `buckets` for the claim (`id`, `claim_id`) that `worker`
    /// holds, in one round trip; a message over the limit is deferred by the same call (see
    /// `sql/013_rate_limits.sql`). A reservation more than `late` overdue is not honoured.
    pub async fn rate_take(
        &self,
        worker: &str,
        claim: ClaimKey,
        buckets: &[crate::dispatch::ratelimit::Bucket],
        late: Duration,
    ) -> Result<RateTurn, DbError> {
        let names: Vec<&str> = buckets.iter().map(|b| b.name.as_str()).collect();
        let windows: Vec<i32> = buckets.iter().map(|b| b.window_ms).collect();
        let counts: Vec<i32> = buckets.iter().map(|b| b.count).collect();
        let late_ms = late.as_millis().min(i32::MAX as u128) as i32;
        self.timed("rate_take", async {
            let c = self.pool.get().await?;
            let st = c.prepare_cached(RATE_TAKE).await?;
            let row = c
                .query_opt(
                    &st,
                    &[
                        &worker, &claim.0, &claim.1, &names, &windows, &counts, &late_ms,
                    ],
                )
                .await?;
            Ok(match row {
                None => RateTurn::NotHeld,
                Some(r) if r.get::<_, &str>(0) == "send" => RateTurn::Send,
                Some(r) => {
                    RateTurn::Deferred(Duration::from_millis(r.get::<_, i32>(1).max(0) as u64))
                }
            })
        })
        .await
    }

    /// Blocks the rate windows `buckets` for `block` (the platform said "too fast").
    pub async fn rate_block(
        &self,
        buckets: &[crate::dispatch::ratelimit::Bucket],
        block: Duration,
    ) -> Result<(), DbError> {
        let names: Vec<&str> = buckets.iter().map(|b| b.name.as_str()).collect();
        let windows: Vec<i32> = buckets.iter().map(|b| b.window_ms).collect();
        let counts: Vec<i32> = buckets.iter().map(|b| b.count).collect();
        let block_ms = block.as_millis().min(i32::MAX as u128) as i32;
        self.timed("rate_block", async {
            let c = self.pool.get().await?;
            let st = c.prepare_cached(RATE_BLOCK).await?;
            c.execute(&st, &[&names, &windows, &counts, &block_ms])
                .await?;
            Ok(())
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

/// The `statement_timeout` that a connection string's `options` (`-c statement_timeout=…`) set, if
/// any, as PostgreSQL reads it (a number is milliseconds; units `us`, `ms`, `s`, `min`, `h`, `d`).
/// `Some(None)` when it is set but unreadable.
pub fn statement_timeout_of(pg: &tokio_postgres::Config) -> Option<Option<Duration>> {
    let options = pg.get_options()?;
    let mut value = None;
    let mut words = options.split_whitespace().peekable();
    while let Some(w) = words.next() {
        let setting = match w {
            "-c" => words.next().unwrap_or_default(),
            w => match w.strip_prefix("-c").or_else(|| w.strip_prefix("--")) {
                Some(s) => s,
                None => continue,
            },
        };
        if let Some(v) = setting
            .strip_prefix("statement_timeout=")
            .or_else(|| setting.strip_prefix("statement-timeout="))
        {
            value = Some(parse_pg_duration(v));
        }
    }
    value
}

fn parse_pg_duration(v: &str) -> Option<Duration> {
    let v = v.trim_matches('\'');
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (n, unit) = v.split_at(split);
    let n: u64 = n.parse().ok()?;
    Some(match unit.trim() {
        "" | "ms" => Duration::from_millis(n),
        "us" => Duration::from_micros(n),
        "s" => Duration::from_secs(n),
        "min" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "d" => Duration::from_secs(n * 86400),
        _ => return None,
    })
}

/// Opens one connection outside the pool (migrations, the CLI), with TLS as the URL's `sslmode`
/// says; the connection runs in a spawned task, whose handle is returned.
pub async fn connect_one(
    url: &str,
) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), DbError> {
    let (client, conn) = tls::target(url)?.connect().await?;
    let task = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %DbError::from(e), "connection ended");
        }
    });
    Ok((client, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_role_joins_the_options() {
        for (url, want) in [
            ("postgres://u@h/db", "-c role=r"),
            ("postgres://u@h/db?application_name=x", "-c role=r"),
            (
                "postgres://u@h/db?options=-c%20synchronous_commit%3Don&sslmode=disable",
                "-c synchronous_commit=on -c role=r",
            ),
            ("host=h user=u dbname=db", "-c role=r"),
            (
                "host=h user=u options='-c work_mem=8MB'",
                "-c work_mem=8MB -c role=r",
            ),
        ] {
            let got = with_session_role(url, "r");
            let cfg = tokio_postgres::Config::from_str(&got).unwrap();
            assert_eq!(cfg.get_options(), Some(want), "{url} -> {got}");
            assert_eq!(cfg.get_user(), Some("u"), "{got}");
        }
        let cfg = tokio_postgres::Config::from_str(&with_session_role(
            "postgres://u@h/db?application_name=x",
            "r",
        ))
        .unwrap();
        assert_eq!(cfg.get_application_name(), Some("x"));
    }

    #[test]
    fn statement_timeouts_are_read_from_options() {
        let cfg = |o: &str| {
            let mut c = tokio_postgres::Config::new();
            c.options(o);
            c
        };
        assert_eq!(statement_timeout_of(&tokio_postgres::Config::new()), None);
        assert_eq!(
            statement_timeout_of(&cfg("-c synchronous_commit=off")),
            None
        );
        assert_eq!(
            statement_timeout_of(&cfg("-c statement_timeout=1500")),
            Some(Some(Duration::from_millis(1500)))
        );
        assert_eq!(
            statement_timeout_of(&cfg("-cstatement_timeout=2s -c x=y")),
            Some(Some(Duration::from_secs(2)))
        );
        assert_eq!(
            statement_timeout_of(&cfg("--statement-timeout=0")),
            Some(Some(Duration::ZERO))
        );
        assert_eq!(
            statement_timeout_of(&cfg("-c statement_timeout=soon")),
            Some(None)
        );
    }

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
            profile: None,
        };
        assert!(row.needs_cleaning());
        let s = row.storable();
        assert!(!s.needs_cleaning());
        assert_eq!(s.error_text.as_deref(), Some("a\u{FFFD}b"));
        assert_eq!(s.provider_id.as_deref(), Some("p\u{FFFD}"));
        assert_eq!(s.reply.as_deref(), Some("\u{FFFD}"));
    }
}
