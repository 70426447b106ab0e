//! The SQL calls behind `outboxd task …`: `add` checks the schedule here, in Rust (the cron
//! expression with croner, the zone with chrono-tz), before `api.add_task` stores it; the others
//! call `api.run_task`, `api.pause_task`, `api.resume_task`, `api.tasks`, `api.task` and the
//! progress views, and format what they return.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::plan::{PlanError, Schedule};
use crate::db::DbError;

/// Why a task command failed.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("{0}")]
    Plan(#[from] PlanError),
    #[error("{0}")]
    Db(#[from] DbError),
}

impl From<tokio_postgres::Error> for TaskError {
    fn from(e: tokio_postgres::Error) -> Self {
        TaskError::Db(e.into())
    }
}

/// What `outboxd task add` saves (see `api.add_task`).
#[derive(Debug, Clone, Default)]
pub struct NewTask {
    pub name: String,
    pub cover: String,
    pub body: Option<String>,
    /// `once 2026-12-24 18:00`, `hourly 45`, `daily 09:30`, `cron 0 9 * * MON-FRI`, `manual`.
    pub schedule: String,
    pub time_zone: String,
    /// A JSON array of addresses or `{"address", "vars"}` objects.
    pub recipients: Option<Value>,
    /// A table or view name.
    pub source: Option<String>,
    pub vars: Value,
    pub agent: Option<String>,
    pub profile: Option<String>,
    pub max_runs: Option<i32>,
    pub start_at: Option<DateTime<Utc>>,
    pub end_at: Option<DateTime<Utc>>,
    pub enabled: bool,
    /// `once` or `skip`.
    pub catch_up: String,
    pub description: Option<String>,
}

/// Checks what the daemon will have to read (zone, cron expression, local times) before saving.
pub fn check(t: &NewTask) -> Result<(), TaskError> {
    let schedule = t.schedule.trim();
    let (kind, spec) = schedule.split_once(' ').unwrap_or((schedule, ""));
    let kind = kind.to_ascii_lowercase();
    match kind.as_str() {
        // The database normalizes these (any PostgreSQL timestamp for once) and checks them.
        "once" | "hourly" | "daily" | "manual" => {
            Schedule::parse("manual", None, &t.time_zone, None, None)?;
        }
        _ => {
            Schedule::parse(&kind, Some(spec), &t.time_zone, t.start_at, t.end_at)?;
        }
    }
    Ok(())
}

/// Checks, then creates the task; returns its id.
pub async fn add(client: &tokio_postgres::Client, t: &NewTask) -> Result<uuid::Uuid, TaskError> {
    check(t)?;
    let row = client
        .query_one(
            "SELECT api.add_task(pName => $1, pCover => $2, pSchedule => $3, pRecipients => $4, \
             pSource => $5, pVars => $6, pBody => $7, pAgent => $8, pProfile => $9, \
             pTimeZone => $10, pMaxRuns => $11, pStartAt => $12, pEndAt => $13, \
             pEnabled => $14, pCatchUp => $15, pDescription => $16)",
            &[
                &t.name,
                &t.cover,
                &t.schedule,
                &t.recipients,
                &t.source,
                &t.vars,
                &t.body,
                &t.agent,
                &t.profile,
                &t.time_zone,
                &t.max_runs,
                &t.start_at,
                &t.end_at,
                &t.enabled,
                &t.catch_up,
                &t.description,
            ],
        )
        .await?;
    Ok(row.get(0))
}

/// `outboxd task run`: starts one execution now; returns its run id.
pub async fn run(client: &tokio_postgres::Client, task: &str) -> Result<i64, TaskError> {
    Ok(client
        .query_one("SELECT api.run_task($1::text)", &[&task])
        .await?
        .get(0))
}

pub async fn pause(client: &tokio_postgres::Client, task: &str) -> Result<(), TaskError> {
    client
        .execute("SELECT api.pause_task($1::text)", &[&task])
        .await?;
    Ok(())
}

pub async fn resume(client: &tokio_postgres::Client, task: &str) -> Result<(), TaskError> {
    client
        .execute("SELECT api.resume_task($1::text)", &[&task])
        .await?;
    Ok(())
}

fn time(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| "-".into())
}

/// `outboxd task list`: name, state, schedule, zone, next run, runs / maximum.
pub async fn list(client: &tokio_postgres::Client) -> Result<String, TaskError> {
    let rows = client
        .query(
            "SELECT name, state, schedule, time_zone, next_run_at, run_count, max_runs FROM api.tasks()",
            &[],
        )
        .await?;
    let mut out = String::new();
    for r in rows {
        let max: Option<i32> = r.get(6);
        let _ = writeln!(
            out,
            "{}\t{}\t{}\t{}\t{}\t{}/{}",
            r.get::<_, String>(0),
            r.get::<_, String>(1),
            r.get::<_, String>(2),
            r.get::<_, String>(3),
            time(r.get(4)),
            r.get::<_, i32>(5),
            max.map_or_else(|| "-".into(), |m| m.to_string()),
        );
    }
    Ok(out)
}

/// `outboxd task show`: the task, its executions with their progress, and — for one execution
/// (`run_no`, default the newest) — every recipient not sent yet or failed, with why.
pub async fn show(
    client: &tokio_postgres::Client,
    task: &str,
    run_no: Option<i32>,
) -> Result<String, TaskError> {
    let t = client
        .query_one(
            "SELECT id, name, state, schedule, time_zone, next_run_at, run_count, max_runs, \
             agent, profile, cover, body, recipients, last_error, catch_up, start_at, end_at, \
             skipped_count FROM api.task($1::text)",
            &[&task],
        )
        .await?;
    let id: uuid::Uuid = t.get(0);
    let mut out = String::new();
    let max: Option<i32> = t.get(7);
    let _ = writeln!(
        out,
        "task {} ({id}): {}",
        t.get::<_, String>(1),
        t.get::<_, String>(2)
    );
    let _ = writeln!(
        out,
        "  schedule: {} in {}, catch-up {}, runs {}/{}, skipped {}, next {}",
        t.get::<_, String>(3),
        t.get::<_, String>(4),
        t.get::<_, String>(14),
        t.get::<_, i32>(6),
        max.map_or_else(|| "-".into(), |m| m.to_string()),
        t.get::<_, i32>(17),
        time(t.get(5)),
    );
    let _ = writeln!(out, "  between {} and {}", time(t.get(15)), time(t.get(16)));
    let _ = writeln!(
        out,
        "  channel: {} / {}; cover {}, body {}; recipients: {}",
        t.get::<_, String>(8),
        t.get::<_, String>(9),
        t.get::<_, String>(10),
        t.get::<_, Option<String>>(11).unwrap_or_else(|| "-".into()),
        t.get::<_, String>(12),
    );
    if let Some(e) = t.get::<_, Option<String>>(13) {
        let _ = writeln!(out, "  last error: {e}");
    }
    let runs = client
        .query(
            "SELECT run_no, due_at, trigger, state, enqueued, sent, failed, pending, read, last_error \
             FROM api.task_runs WHERE task_id = $1 ORDER BY run_no",
            &[&id],
        )
        .await?;
    let _ = writeln!(
        out,
        "runs (no, due, trigger, state, enqueued, sent, failed, pending, read):"
    );
    for r in &runs {
        let _ = writeln!(
            out,
            "  #{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}{}",
            r.get::<_, i32>(0),
            time(r.get(1)),
            r.get::<_, String>(2),
            r.get::<_, String>(3),
            r.get::<_, i32>(4),
            r.get::<_, i64>(5),
            r.get::<_, i64>(6),
            r.get::<_, i64>(7),
            r.get::<_, i64>(8),
            r.get::<_, Option<String>>(9)
                .map(|e| format!("\t{e}"))
                .unwrap_or_default(),
        );
    }
    let Some(no) = run_no.or_else(|| runs.last().map(|r| r.get(0))) else {
        return Ok(out);
    };
    let rows = client
        .query(
            "SELECT address, state, error_code, error_text, read_count FROM api.task_messages \
             WHERE task_id = $1 AND run_no = $2 AND state <> 'submitted' ORDER BY address",
            &[&id, &no],
        )
        .await?;
    let _ = writeln!(
        out,
        "run #{no}: {} recipient(s) not sent (address, state, code, why):",
        rows.len()
    );
    for r in rows {
        let _ = writeln!(
            out,
            "  {}\t{}\t{}\t{}",
            r.get::<_, String>(0),
            r.get::<_, String>(1),
            r.get::<_, Option<String>>(2).unwrap_or_else(|| "-".into()),
            r.get::<_, Option<String>>(3).unwrap_or_else(|| "-".into()),
        );
    }
    Ok(out)
}
