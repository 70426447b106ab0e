//! Scheduled and recurring send tasks (`sql/015_tasks.sql`): the daemon's scheduler.
//!
//! When it has work (see *Waiting* below), the scheduler (one per daemon; any number of daemons)
//! ticks: it does two things, each in short transactions:
//!
//! 1. **Schedule.** It locks the tasks that are due or not planned yet (`outbox.due_tasks`,
//!    `FOR UPDATE SKIP LOCKED`: another daemon skips them), decides with [`plan::decide`] what
//!    each needs — wait, run, or skip missed due times — and records it with
//!    `outbox.advance_task`, which inserts the execution row and moves the task to its next run
//!    in the same transaction. An execution is unique per (task, due time), so however many
//!    schedulers see a due time, it runs once; the task is finished at its maximum count or when
//!    its schedule is over.
//! 2. **Fan out.** It locks one unfinished execution (`outbox.lock_task_run`, SKIP LOCKED),
//!    reads the next `tasks.batch_size` recipients after the execution's cursor, renders each
//!    recipient's body once (HTML, stored for the read link) and writes the whole batch with one
//!    `outbox.enqueue_task_batch` call — one prepared message per recipient whose code is
//!    deterministic (task + run + recipient), its cover template version and variables (rendered
//!    by the daemon at delivery, like any templated message), and the cursor moved past the batch
//!    — then commits, and takes the next batch.
//!
//! Invariants: a batch is all or nothing (a crash, a kill, a timeout roll it back, and it is read
//! again from the same cursor); a replayed batch inserts nothing twice (codes are unique per
//! agent); so every recipient of an execution is enqueued exactly once. Time comes from a
//! [`Clock`] (the system clock, or one a test moves), and every SQL function that decides on time
//! is given it as `p_now`. A database error ends the tick, never the daemon.
//!
//! **Waiting** (sql/021). After a tick the scheduler asks `outbox.task_wakeup()` when it has work
//! next and sleeps until then, on its clock: the earliest `next_run_at`, at most the daemon's
//! `poll_interval` (the fallback poll, after which it asks again: one query). A `NOTIFY
//! outbox_tasks` — a task added, resumed or moved earlier, an `api.run_task` — wakes it at once.
//! Work that is due but that it did not get (another scheduler holds it, or the tick failed) is
//! looked at again after `tasks.poll_interval`. So an idle daemon makes one scheduler query per
//! poll interval, and none in between.

pub mod clock;
pub mod plan;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use rand::RngCore as _;
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use clock::Clock;
use plan::{Decision, DueTask, Schedule};

use crate::db::{Db, DbError};
use crate::render::{text, Kind, RenderError};

/// `[tasks]` in the main file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TasksConfig {
    /// Run the scheduler in this daemon. Default true; several daemons may run it at once.
    pub enabled: bool,
    /// How soon it looks again at work that is due but was not its own (another daemon's
    /// scheduler held it) or after a failed tick. Otherwise the scheduler sleeps until the next
    /// due time (at most the daemon's `poll_interval`) and is woken by `NOTIFY outbox_tasks`.
    /// Default 1s.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Recipients per fan-out batch: one transaction, one INSERT … SELECT. Default 1000.
    pub batch_size: usize,
    /// How late a due time may be and still count as on time; with a task's catch_up = skip,
    /// due times older than this are not run at all. Default 1m.
    #[serde(with = "humantime_serde")]
    pub misfire_grace: Duration,
    /// Base of the read links: the `read_url` variable is this followed by the token, e.g.
    /// "https://example.com/m/" (the HTTP server serves `GET /m/{token}`; put a proxy in front of
    /// it). Default: the daemon's own `http_listen` address, `http://ADDR/m/`.
    pub read_base_url: Option<String>,
}

impl Default for TasksConfig {
    fn default() -> Self {
        TasksConfig {
            enabled: true,
            poll_interval: Duration::from_secs(1),
            batch_size: 1000,
            misfire_grace: Duration::from_secs(60),
            read_base_url: None,
        }
    }
}

impl TasksConfig {
    /// Checks the values; the error names the key (under `tasks.`).
    pub fn check(&self) -> Result<(), (&'static str, &'static str)> {
        if self.batch_size == 0 || self.batch_size > 10_000 {
            return Err(("tasks.batch_size", "must be between 1 and 10000"));
        }
        if self.poll_interval < Duration::from_millis(10) {
            return Err(("tasks.poll_interval", "must be at least 10ms"));
        }
        if let Some(u) = &self.read_base_url {
            let ok = url::Url::parse(u)
                .map(|p| matches!(p.scheme(), "http" | "https") && u.ends_with('/'))
                .unwrap_or(false);
            if !ok {
                return Err((
                    "tasks.read_base_url",
                    "must be an http(s) URL ending in \"/\", e.g. \"https://example.com/m/\"",
                ));
            }
        }
        Ok(())
    }
}

/// What one tick did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tick {
    /// Executions started.
    pub started: usize,
    /// Due times not run (missed while no scheduler ran).
    pub skipped: usize,
    /// Fan-out batches committed, and messages they created.
    pub batches: usize,
    pub enqueued: u64,
}

/// The channel of the scheduler's wake-ups (sql/021).
pub const CHANNEL: &str = "outbox_tasks";

/// What the scheduler waits for after a tick or a look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Nothing to do: until a wake-up or the poll.
    Idle,
    /// Until the clock shows this time (or a wake-up, or the poll).
    Until(DateTime<Utc>),
    /// Something is due now.
    Due,
}

/// Connections of the scheduler's own pool: one for scheduling or a batch, one spare.
pub const POOL_SIZE: usize = 2;

/// Tasks locked per scheduling transaction.
const SCHEDULE_BATCH: i32 = 100;

/// One scheduler (the daemon runs one, on a pool of its own of [`POOL_SIZE`]; tests may run
/// several on one database).
pub struct Scheduler {
    db: Db,
    clock: Clock,
    cfg: TasksConfig,
    read_base: Option<String>,
    worker: String,
}

impl Scheduler {
    /// `read_base`: the base of read links (see [`TasksConfig::read_base_url`]); None: messages
    /// get no `read_url`.
    pub fn new(
        db: Db,
        clock: Clock,
        cfg: TasksConfig,
        read_base: Option<String>,
        worker: String,
    ) -> Scheduler {
        Scheduler {
            db,
            clock,
            cfg,
            read_base,
            worker,
        }
    }

    /// Ticks when there is work until `stop` (see the module docs, *Waiting*): `wake` is
    /// notified on `NOTIFY outbox_tasks`; `poll` is the daemon's poll interval, the longest it
    /// sleeps without looking. Stopping mid-batch rolls that batch back (it is done again by the
    /// next scheduler to run).
    pub async fn run(self, wake: Arc<Notify>, poll: Duration, stop: CancellationToken) {
        tracing::info!(poll_interval = ?poll, retry_interval = ?self.cfg.poll_interval, batch_size = self.cfg.batch_size, "task scheduler started");
        let mut tick = true;
        loop {
            if tick {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = self.tick() => {
                        if let Err(e) = r {
                            tracing::warn!(error = %e, "task scheduler tick failed; trying again");
                        }
                    }
                }
            }
            let wait = tokio::select! {
                _ = stop.cancelled() => return,
                w = self.next_wait() => w,
            };
            if wait == Wait::Due && !tick {
                // Found by the poll's look (a run another daemon left, say): go now.
                tick = true;
                continue;
            }
            let until = async {
                match wait {
                    Wait::Until(t) => self.clock.sleep_until(t).await,
                    _ => std::future::pending().await,
                }
            };
            // Due right after a tick: not ours to take now; look again soon, as before sql/021.
            let retry = if wait == Wait::Due {
                self.cfg.poll_interval
            } else {
                poll
            };
            tick = tokio::select! {
                _ = stop.cancelled() => return,
                _ = wake.notified() => true,
                _ = until => true,
                // The poll: ask again (a tick only if something is due); a retry: tick.
                _ = tokio::time::sleep(retry) => wait == Wait::Due,
            };
        }
    }

    /// When there is work next (`outbox.task_wakeup`); a failed look counts as work now, so that
    /// the tick reports the error and the scheduler tries again after `tasks.poll_interval`.
    async fn next_wait(&self) -> Wait {
        let next = self
            .db
            .timed("task wake-up", async {
                let c = self.db.pool().get().await?;
                // -infinity (work now) is not a chrono time: the finite part separately.
                let row = c
                    .query_one(
                        "SELECT w IS NOT NULL, CASE WHEN isfinite(w) THEN w END \
                         FROM outbox.task_wakeup() AS w",
                        &[],
                    )
                    .await?;
                Ok((
                    row.get::<_, bool>(0),
                    row.get::<_, Option<DateTime<Utc>>>(1),
                ))
            })
            .await;
        match next {
            Ok((false, _)) => Wait::Idle,
            Ok((true, Some(t))) if t > self.clock.now() => Wait::Until(t),
            Ok((true, _)) => Wait::Due,
            Err(e) => {
                tracing::warn!(error = %e, "task scheduler could not look for work; trying again");
                Wait::Due
            }
        }
    }

    /// Starts what is due at the clock's time, then fans out every unfinished execution.
    pub async fn tick(&self) -> Result<Tick, DbError> {
        let mut tick = Tick::default();
        while self.schedule_due(&mut tick).await? == SCHEDULE_BATCH as usize {}
        while let Some(n) = self.fan_out_batch().await? {
            tick.batches += 1;
            tick.enqueued += n;
        }
        Ok(tick)
    }

    /// One scheduling transaction; returns how many tasks it held.
    async fn schedule_due(&self, tick: &mut Tick) -> Result<usize, DbError> {
        let now = self.clock.now();
        let grace = self.cfg.misfire_grace;
        self.db
            .timed("task schedule", async {
                let mut c = self.db.pool().get().await?;
                let tx = c.transaction().await?;
                let rows = tx
                    .query(
                        "SELECT id, name, schedule_kind, schedule_spec, time_zone, catch_up, \
                         planned_from, start_at, end_at, next_run_at FROM outbox.due_tasks($1, $2)",
                        &[&now, &SCHEDULE_BATCH],
                    )
                    .await?;
                for r in &rows {
                    let task = DueTask {
                        id: r.get(0),
                        name: r.get(1),
                        catch_up_once: r.get::<_, String>(5) == "once",
                        planned_from: r.get(6),
                        next_run_at: r.get(9),
                    };
                    let schedule = match Schedule::parse(
                        r.get(2),
                        r.get(3),
                        r.get(4),
                        r.get(7),
                        r.get(8),
                    ) {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::error!(task = %task.name, error = %e, "task disabled: its schedule cannot be read");
                            tx.execute(
                                "SELECT outbox.refuse_task($1, $2, $3)",
                                &[&task.id, &e.to_string(), &now],
                            )
                            .await?;
                            continue;
                        }
                    };
                    let (due, trigger, next, skipped) =
                        match plan::decide(&schedule, &task, now, grace) {
                            Decision::Wait { next } => (None, None, next, 0),
                            Decision::Run {
                                due,
                                catch_up,
                                next,
                                skipped,
                            } => (
                                Some(due),
                                Some(if catch_up { "catch_up" } else { "schedule" }),
                                next,
                                skipped,
                            ),
                            Decision::Skip { next, skipped } => (None, None, next, skipped),
                        };
                    let run: Option<i64> = tx
                        .query_one(
                            "SELECT outbox.advance_task($1, $2, $3, $4, $5, $6)",
                            &[&task.id, &due, &trigger, &next, &skipped, &now],
                        )
                        .await?
                        .get(0);
                    if skipped > 0 {
                        tracing::warn!(task = %task.name, skipped, "due times missed while no scheduler ran were not run");
                        tick.skipped += skipped as usize;
                    }
                    if let Some(run) = run {
                        tracing::info!(task = %task.name, run, due = ?due, trigger = ?trigger, "task execution started");
                        tick.started += 1;
                    }
                }
                tx.commit().await?;
                Ok(rows.len())
            })
            .await
    }

    /// One fan-out batch of the oldest unfinished execution no other scheduler holds; None when
    /// there is none.
    async fn fan_out_batch(&self) -> Result<Option<u64>, DbError> {
        let limit = self.cfg.batch_size;
        self.db
            .timed("task fan-out", async {
                let mut c = self.db.pool().get().await?;
                let tx = c.transaction().await?;
                let Some(run) = tx
                    .query_opt(
                        "SELECT run_id, task, run_no, vars, body_name, body_kind, body \
                         FROM outbox.lock_task_run()",
                        &[],
                    )
                    .await?
                else {
                    return Ok(None);
                };
                let run_id: i64 = run.get(0);
                let task: String = run.get(1);
                let run_no: i32 = run.get(2);
                let shared: Value = run.get(3);
                let body = match (run.get::<_, Option<String>>(4), run.get::<_, Option<String>>(6)) {
                    (Some(name), Some(source)) => Some(Body {
                        name,
                        kind: run.get(5),
                        source,
                    }),
                    _ => None,
                };
                let rows = match tx
                    .query(
                        "SELECT address, vars FROM outbox.task_recipients_after($1, $2)",
                        &[&run_id, &(limit as i32)],
                    )
                    .await
                {
                    Ok(rows) => rows,
                    Err(e) => {
                        let e = DbError::from(e);
                        if e.code().as_deref() != Some("ERR-400-063") {
                            return Err(e);
                        }
                        // The source is gone: give this execution up so the ones behind it go on.
                        tx.rollback().await?;
                        tracing::error!(task = %task, run = run_id, error = %e, "task execution failed: its recipients cannot be read");
                        c.execute(
                            "SELECT outbox.fail_task_run($1, $2)",
                            &[&run_id, &e.to_string()],
                        )
                        .await?;
                        return Ok(Some(0));
                    }
                };
                let done = rows.len() < limit;
                let mut batch = Batch::default();
                for r in &rows {
                    let address: String = r.get(0);
                    let own: Value = r.get(1);
                    self.add_recipient(&mut batch, &shared, own, address, body.as_ref());
                }
                let n: i32 = tx
                    .query_one(
                        "SELECT outbox.enqueue_task_batch($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                        &[
                            &run_id,
                            &batch.addresses,
                            &batch.vars,
                            &batch.bodies,
                            &batch.tokens,
                            &batch.error_codes,
                            &batch.error_texts,
                            &done,
                            &self.worker,
                        ],
                    )
                    .await?
                    .get(0);
                tx.commit().await?;
                tracing::debug!(task = %task, run = run_id, run_no, recipients = rows.len(), enqueued = n, done, "fan-out batch");
                if done {
                    tracing::info!(task = %task, run = run_id, run_no, "task execution enqueued");
                }
                Ok(Some(n as u64))
            })
            .await
    }

    /// Adds one recipient to `batch`: the merged variables (shared, then the recipient's own,
    /// then `address` unless given and `read_url` with a body), the rendered body and its token.
    fn add_recipient(
        &self,
        batch: &mut Batch,
        shared: &Value,
        own: Value,
        address: String,
        body: Option<&Body>,
    ) {
        let mut vars: Map<String, Value> = shared.as_object().cloned().unwrap_or_default();
        if let Value::Object(own) = own {
            vars.extend(own);
        }
        vars.entry("address")
            .or_insert_with(|| Value::String(address.clone()));
        let mut token = None;
        let mut rendered = None;
        let mut error: Option<RenderError> = None;
        if let Some(b) = body {
            let t = read_token();
            if let Some(base) = &self.read_base {
                vars.insert("read_url".into(), Value::String(format!("{base}{t}")));
            }
            let vars_v = Value::Object(vars.clone());
            match render_body(b, &vars_v) {
                Ok(html) => {
                    rendered = Some(html);
                    token = Some(t);
                }
                Err(e) => error = Some(e),
            }
        }
        batch.addresses.push(address);
        batch.vars.push(Value::Object(vars));
        batch.bodies.push(rendered);
        batch.tokens.push(token);
        batch
            .error_codes
            .push(error.as_ref().map(|e| e.code().to_string()));
        batch.error_texts.push(error.map(|e| e.to_string()));
    }
}

/// The arrays of one `outbox.enqueue_task_batch` call, one element per recipient.
#[derive(Default)]
struct Batch {
    addresses: Vec<String>,
    vars: Vec<Value>,
    bodies: Vec<Option<String>>,
    tokens: Vec<Option<String>>,
    error_codes: Vec<Option<String>>,
    error_texts: Vec<Option<String>>,
}

/// The body template an execution pinned.
struct Body {
    name: String,
    kind: String,
    source: String,
}

/// A read link's token: 192 bits from the operating system's CSPRNG, base64url (32 characters).
fn read_token() -> String {
    let mut b = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// The body as the read link serves it: an html template as rendered, other text kinds rendered
/// and shown as preformatted text.
fn render_body(b: &Body, vars: &Value) -> Result<String, RenderError> {
    let kind = Kind::parse(&b.kind)?;
    let out = text::render(&b.name, "body", kind, &b.source, vars)?;
    Ok(match kind {
        Kind::Html => out,
        _ => format!(
            "<!DOCTYPE html>\n<meta charset=\"utf-8\">\n<pre>{}</pre>\n",
            escape_html(&out)
        ),
    })
}

fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_and_distinct() {
        let a = read_token();
        assert_eq!(a.len(), 32);
        assert_ne!(a, read_token());
        assert!(a
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
    }

    #[test]
    fn bodies_render_as_html() {
        let b = Body {
            name: "b".into(),
            kind: "text".into(),
            source: "1 < {{ n }}".into(),
        };
        let html = render_body(&b, &serde_json::json!({"n": 2})).unwrap();
        assert!(html.contains("<pre>1 &lt; 2</pre>"), "{html}");
        let e = render_body(&b, &serde_json::json!({})).unwrap_err();
        assert_eq!(e.code(), "template-missing-var");
    }

    #[test]
    fn the_config_is_checked() {
        assert!(TasksConfig::default().check().is_ok());
        let c = TasksConfig {
            read_base_url: Some("https://example.com/m".into()),
            ..Default::default()
        };
        assert_eq!(c.check().unwrap_err().0, "tasks.read_base_url");
    }
}
