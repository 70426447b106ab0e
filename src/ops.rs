//! Operator commands behind the CLI: enqueue (`send`), `status`, `retry`. Each is one or two SQL
//! statements through the `api` surface, so what the CLI does a DBA can do in psql.

use std::fmt::Write as _;

use uuid::Uuid;

use crate::db::DbError;

/// What `outboxd send` enqueues.
#[derive(Debug, Clone, Default)]
pub struct NewMessage {
    pub parent: Option<Uuid>,
    pub agent: String,
    pub profile: String,
    pub address: String,
    pub subject: Option<String>,
    pub content: String,
    pub label: Option<String>,
    pub description: Option<String>,
    /// Idempotency key (random when absent).
    pub code: Option<String>,
    pub priority: i32,
    pub send_at: Option<chrono::DateTime<chrono::Utc>>,
    pub max_attempts: Option<i32>,
}

/// Enqueues through `api.send_message`; returns the message id (an existing one for a known code).
pub async fn send(client: &tokio_postgres::Client, m: &NewMessage) -> Result<Uuid, DbError> {
    let row = client
        .query_one(
            "SELECT id FROM api.send_message($1::uuid, $2::text, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            &[
                &m.parent,
                &m.agent,
                &m.profile,
                &m.address,
                &m.subject,
                &m.content,
                &m.label,
                &m.description,
                &m.code,
                &m.priority,
                &m.send_at,
                &m.max_attempts,
            ],
        )
        .await?;
    Ok(row.get(0))
}

/// Counts by state and agent, the oldest prepared message's age, recent failures.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub counts: Vec<(String, String, i64)>,
    pub oldest_prepared_secs: Option<f64>,
    pub recent_failures: Vec<(Uuid, String, Option<String>, Option<String>)>,
}

pub async fn status(client: &tokio_postgres::Client) -> Result<Status, DbError> {
    let counts = client
        .query(
            "SELECT statecode, agentcode, count(*) FROM api.service_message \
             WHERE classcode = 'outbox' GROUP BY 1, 2 ORDER BY 1, 2",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let oldest: Option<f64> = client
        .query_one(
            "SELECT extract(epoch FROM now() - min(m.created_at))::float8 \
               FROM outbox.queue q JOIN outbox.messages m ON m.id = q.message_id \
              WHERE NOT q.leased",
            &[],
        )
        .await?
        .get(0);
    let recent_failures = client
        .query(
            "SELECT id, agentcode, lasterrorcode, \
                    (SELECT error_text FROM outbox.attempts t WHERE t.message_id = s.id ORDER BY t.id DESC LIMIT 1) \
               FROM api.service_message s WHERE statecode = 'failed' ORDER BY lastupdate DESC LIMIT 10",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    Ok(Status {
        counts,
        oldest_prepared_secs: oldest,
        recent_failures,
    })
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = String::new();
        writeln!(out, "{:<10} {:<14} {:>8}", "STATE", "AGENT", "COUNT")?;
        for (state, agent, n) in &self.counts {
            writeln!(out, "{state:<10} {agent:<14} {n:>8}")?;
        }
        if self.counts.is_empty() {
            writeln!(out, "(the outbox is empty)")?;
        }
        match self.oldest_prepared_secs {
            Some(s) => writeln!(out, "\noldest prepared message: {s:.1}s old")?,
            None => writeln!(out, "\nno prepared messages")?,
        }
        if !self.recent_failures.is_empty() {
            writeln!(out, "\nrecent failures:")?;
            for (id, agent, code, text) in &self.recent_failures {
                writeln!(
                    out,
                    "  {id} {agent} {} {}",
                    code.as_deref().unwrap_or("-"),
                    text.as_deref().unwrap_or("")
                )?;
            }
        }
        f.write_str(&out)
    }
}

impl Status {
    /// `outboxd status --json`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "queue": self.counts.iter()
                .map(|(state, agent, n)| serde_json::json!({"state": state, "agent": agent, "count": n}))
                .collect::<Vec<_>>(),
            "oldest_prepared_seconds": self.oldest_prepared_secs,
            "recent_failures": self.recent_failures.iter()
                .map(|(id, agent, code, text)| serde_json::json!({
                    "id": id, "agent": agent, "code": code, "error": text
                }))
                .collect::<Vec<_>>(),
        })
    }
}

/// Which failed messages `retry` repeats.
#[derive(Debug, Clone, Default)]
pub struct RetryFilter {
    pub ids: Vec<Uuid>,
    pub agent: Option<String>,
    pub error_code: Option<String>,
    /// Only messages that failed at or after this time.
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// Repeat every failed message (when no other filter is given).
    pub all: bool,
}

/// Repeats failed messages (failed → prepared) through `api.execute_object_action`, one
/// statement each (so one that changed state meanwhile is skipped, not fatal); `progress` hears
/// (done, total) after every message.
pub async fn retry(
    client: &tokio_postgres::Client,
    f: &RetryFilter,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<Uuid>, DbError> {
    let rows = client
        .query(
            "SELECT s.id FROM api.service_message s \
              WHERE s.classcode = 'outbox' AND s.statecode = 'failed' \
                AND (cardinality($1::uuid[]) = 0 OR s.id = ANY ($1)) \
                AND ($2::text IS NULL OR s.agentcode = $2) \
                AND ($3::text IS NULL OR s.lasterrorcode = $3) \
                AND ($5::timestamptz IS NULL OR s.lastupdate >= $5) \
                AND (cardinality($1::uuid[]) > 0 OR $2 IS NOT NULL OR $3 IS NOT NULL \
                     OR $5 IS NOT NULL OR $4) \
              ORDER BY s.created",
            &[&f.ids, &f.agent, &f.error_code, &f.all, &f.since],
        )
        .await?;
    let total = rows.len();
    let mut done = Vec::new();
    for r in rows {
        let id: Uuid = r.get(0);
        match client
            .execute("SELECT api.execute_object_action($1, 'repeat')", &[&id])
            .await
            .map_err(DbError::from)
        {
            Ok(_) => done.push(id),
            // Repeated or deleted by someone else in the meantime.
            Err(e) if e.code().as_deref() == Some("ERR-400-032") => {}
            Err(e) => return Err(e),
        }
        progress(done.len(), total);
    }
    Ok(done)
}

/// Cancels prepared messages (prepared → created: not delivered until submitted again). Returns
/// per id the new state, or the outbox's refusal (`ERR-…: …`).
pub async fn cancel(
    client: &tokio_postgres::Client,
    ids: &[Uuid],
) -> Vec<(Uuid, Result<String, String>)> {
    let mut out = Vec::new();
    for id in ids {
        let r = client
            .query_one(
                "SELECT api.execute_object_action($1, 'cancel') -> 'newstate' ->> 'code'",
                &[id],
            )
            .await
            .map(|row| row.get::<_, String>(0))
            .map_err(|e| {
                DbError::from(e)
                    .to_string()
                    .trim_start_matches("database: ")
                    .to_string()
            });
        out.push((*id, r));
    }
    out
}

/// One delivery attempt, as `outboxd tail` prints it.
#[derive(Debug, Clone)]
pub struct AttemptLine {
    pub seq: i64,
    pub message_id: Uuid,
    pub agent: String,
    pub profile: String,
    pub outcome: String,
    pub error_code: Option<String>,
    pub duration_ms: Option<i32>,
    pub finished_at: chrono::DateTime<chrono::Utc>,
}

impl std::fmt::Display for AttemptLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {} {} {} {} {}",
            self.finished_at.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
            self.message_id,
            self.agent,
            self.profile,
            self.outcome,
            self.error_code.as_deref().unwrap_or("-"),
            self.duration_ms
                .map_or_else(|| "-".to_string(), |d| format!("{d}ms"))
        )
    }
}

/// The newest attempt's sequence number (where `tail` starts by default).
pub async fn last_attempt_seq(client: &tokio_postgres::Client) -> Result<i64, DbError> {
    Ok(client
        .query_one("SELECT coalesce(max(id), 0) FROM outbox.attempts", &[])
        .await?
        .get(0))
}

/// Attempts recorded after `after` (at most 1,000), oldest first.
pub async fn attempts_after(
    client: &tokio_postgres::Client,
    after: i64,
) -> Result<Vec<AttemptLine>, DbError> {
    let rows = client
        .query(
            "SELECT t.id, t.message_id, a.code, m.profile, t.outcome, t.error_code, t.duration_ms, \
                    t.finished_at \
               FROM outbox.attempts t \
               JOIN outbox.messages m ON m.id = t.message_id \
               JOIN outbox.agents a ON a.id = m.agent_id \
              WHERE t.id > $1 ORDER BY t.id LIMIT 1000",
            &[&after],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| AttemptLine {
            seq: r.get(0),
            message_id: r.get(1),
            agent: r.get(2),
            profile: r.get(3),
            outcome: r.get(4),
            error_code: r.get(5),
            duration_ms: r.get(6),
            finished_at: r.get(7),
        })
        .collect())
}

/// The message `outboxd run --demo` enqueues.
pub fn demo_message() -> NewMessage {
    NewMessage {
        agent: "file.agent".into(),
        profile: "default".into(),
        address: "demo@localhost".into(),
        subject: Some("Hello from outboxd".into()),
        content: "{\"text\":\"If you can read this in the spool file, delivery works.\"}".into(),
        ..Default::default()
    }
}

/// The result of `check-config`.
#[derive(Debug, Default)]
pub struct CheckReport {
    pub problems: Vec<String>,
    pub connectors: Vec<String>,
}

impl CheckReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

impl std::fmt::Display for CheckReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in &self.connectors {
            writeln!(f, "ok      {c}")?;
        }
        for p in &self.problems {
            writeln!(f, "problem {p}")?;
        }
        if self.ok() {
            writeln!(
                f,
                "configuration is valid ({} profile(s))",
                self.connectors.len()
            )
        } else {
            writeln!(f, "{} problem(s) found", self.problems.len())
        }
    }
}

/// Builds every connector and runs its self-check, and checks the profiles' timings against the
/// main file's ([`crate::config::Config::check_timing`]); sends nothing.
pub async fn check_config(cfg: &crate::config::Config) -> CheckReport {
    let mut report = CheckReport::default();
    // Leases exist only in outboxd's own schema; the drop-in mode has none to outlive.
    let timing = match cfg.mode {
        crate::config::SourceMode::Outboxd => cfg.check_timing(&cfg.load_profiles().0),
        crate::config::SourceMode::Apostol => Vec::new(),
    };
    match crate::dispatch::build_router(cfg) {
        Err(errors) => report.problems = errors.iter().map(|e| e.to_string()).collect(),
        Ok(router) => {
            for route in router.all() {
                match route.connector.healthcheck().await {
                    Ok(()) => report.connectors.push(route.connector.name().to_string()),
                    Err(e) => report
                        .problems
                        .push(format!("{}: {e}", route.connector.name())),
                }
            }
            report.connectors.sort();
        }
    }
    report.problems.extend(timing.iter().map(|e| e.to_string()));
    report
}
