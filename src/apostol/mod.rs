//! Drop-in mode (`source = "apostol"`): the daemon serves an existing Apostol db-platform
//! database in place of its C++ MessageServer, through the platform's `api` functions only — it
//! owns nothing there and runs no migration.
//!
//! Data path, as MessageServer's: every NOTIFY on `outbox` (a wake-up only), every poll tick
//! and the start run `api.outbox('prepared') ORDER BY created`; each message not already in
//! flight here is read with `api.get_service_message(id)` and taken with
//! `api.execute_object_action(id, 'send')` — the state machine is the claim: a second daemon's
//! `send` fails with `ERR-400-032` and it leaves the message alone. The delivery goes through
//! outboxd's router and connectors (the dispatcher's [`deliver_one`]); its outcome is written
//! where MessageServer writes it: `api.add_inbox` for a reply, `done` and the provider's id as
//! the label (`api.set_object_label`), or `fail` and the error text as the label. Every batch is
//! one transaction starting with `api.authorize` ([`session`]).
//!
//! What Apostol lacks is kept daemon-side in the [`journal`]: a retryable failure is `fail` +
//! label now and `repeat` (failed → prepared, which notifies) when the profile's retry delay has
//! passed; a send interrupted by a crash is found in `sending` at the next start and delivered
//! again (`fail` + `repeat`: at least once); on TERM/INT, sends still running after the grace
//! period are handed back the same way, uncharged. Only with `state_file` does this survive a
//! restart.

pub mod config;
pub mod ini;
pub mod journal;
pub mod session;

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_postgres::Row;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::{Config, ProfileCommon};
use crate::connector::{codes, DeliveryError, OutboxMessage};
use crate::db::{Db, OutcomeRow};
use crate::dispatch::{build_router, deliver_one, router, Controls, Router, RunError, RunReport};
use journal::Journal;
use session::{BatchError, Param, Session, Stmt};

const OUTBOX: &str = "SELECT * FROM api.outbox($1::text) ORDER BY created";
const GET: &str = "SELECT * FROM api.get_service_message($1::uuid)";
const ACTION: &str = "SELECT * FROM api.execute_object_action($1::uuid, $2::text)";
const LABEL: &str = "SELECT * FROM api.set_object_label($1::uuid, $2::text)";
const INBOX: &str = "SELECT * FROM api.add_inbox($1::uuid, $2::uuid, $3::text, $4::text, $5::text, $6::text, $7::text)";

/// Apostol's code for an action the message's state does not allow.
const NOT_ALLOWED: &str = "ERR-400-032";

struct Ctx {
    session: Session,
    journal: Journal,
    router: ArcSwap<Router>,
    inflight: Mutex<HashSet<Uuid>>,
    report: Mutex<RunReport>,
}

/// Runs the drop-in daemon until `shutdown` completes (see the module docs).
pub async fn run(
    cfg: Config,
    shutdown: impl Future<Output = ()> + Send,
    controls: Controls,
) -> Result<RunReport, RunError> {
    let ap = cfg.apostol.clone().expect("source = apostol has [apostol]");
    let router = build_router(&cfg).map_err(RunError::Config)?;
    let journal = Journal::open(ap.state_file.clone()).map_err(|m| {
        RunError::Config(vec![crate::config::ConfigError::new(
            &cfg.source,
            Some("apostol.state_file".into()),
            m,
        )])
    })?;
    let db = Db::connect(
        cfg.database_url.expose(),
        cfg.pool_size,
        cfg.db_timeout,
        None,
    )?;
    tracing::info!(
        database = %crate::config::redact_url(cfg.database_url.expose()),
        username = %ap.username,
        concurrency = cfg.concurrency,
        poll_interval = ?cfg.poll_interval,
        state_file = ?ap.state_file,
        "outboxd started in Apostol drop-in mode"
    );
    if cfg.http_listen.is_some() || cfg.retention.enabled() {
        tracing::warn!(
            "http_listen and [retention] work on outboxd's own schema; not used in drop-in mode"
        );
    }
    let ctx = Arc::new(Ctx {
        session: Session::new(db, ap),
        journal,
        router: ArcSwap::from_pointee(router),
        inflight: Mutex::new(HashSet::new()),
        report: Mutex::new(RunReport::default()),
    });

    let background_stop = CancellationToken::new();
    let wake = Arc::new(Notify::new());
    let mut background = JoinSet::new();
    let listen_url = cfg
        .listen_url
        .as_ref()
        .unwrap_or(&cfg.database_url)
        .expose()
        .to_string();
    background.spawn(crate::db::listener::run(
        listen_url,
        cfg.db_timeout,
        vec![(crate::db::listener::CHANNEL, wake.clone())],
        controls.stats.clone(),
        background_stop.clone(),
    ));
    {
        let (ctx, cfg, reload, stop) = (
            ctx.clone(),
            cfg.clone(),
            controls.reload.clone(),
            background_stop.clone(),
        );
        background.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = reload.notified() => {}
                }
                match build_router(&cfg) {
                    Ok(r) => {
                        ctx.router.store(Arc::new(r));
                        tracing::info!("profiles reloaded");
                    }
                    Err(errors) => {
                        for e in errors {
                            tracing::error!(error = %e, "reload refused; keeping the previous profiles");
                        }
                    }
                }
            }
        });
    }

    recover(&ctx).await;

    let slots = Arc::new(Semaphore::new(cfg.concurrency));
    let mut deliveries: JoinSet<()> = JoinSet::new();
    let mut poll = tokio::time::interval(cfg.poll_interval);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = Duration::from_millis(100);
    let stop = CancellationToken::new();
    {
        tokio::pin!(shutdown);
        loop {
            while deliveries.try_join_next().is_some() {}
            repeat_due(&ctx).await;
            let pause = match scan(&ctx, &slots, &mut deliveries, &stop).await {
                Ok(()) => {
                    backoff = Duration::from_millis(100);
                    None
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "reading api.outbox failed");
                    let b = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    Some(b)
                }
            };
            let due = ctx.journal.next_due().map(|d| {
                (d - chrono::Utc::now())
                    .to_std()
                    .unwrap_or_default()
                    .max(Duration::from_millis(1))
            });
            let wait = match (pause, due) {
                (Some(p), Some(d)) => Some(p.min(d)),
                (p, d) => p.or(d),
            };
            tokio::select! {
                _ = &mut shutdown => break,
                _ = wake.notified() => {}
                _ = poll.tick() => {}
                _ = sleep_opt(wait) => {}
                _ = deliveries.join_next(), if !deliveries.is_empty() => {}
            }
        }
    }
    stop.cancel();
    // Drain: running deliveries may finish within the grace period; what is left is aborted and
    // handed back uncharged (fail + repeat: prepared again, notified).
    let drained = tokio::time::timeout(cfg.grace_period, async {
        while deliveries.join_next().await.is_some() {}
    })
    .await
    .is_ok();
    if !drained {
        deliveries.shutdown().await;
        let left: Vec<Uuid> = ctx.inflight.lock().unwrap().drain().collect();
        for id in left {
            let text = "shutdown: the daemon stopped before the delivery finished; handed back";
            match hand_back(&ctx, id, text).await {
                Ok(()) => {
                    ctx.journal.uncharge(id);
                    ctx.report.lock().unwrap().released += 1;
                }
                Err(e) => {
                    tracing::error!(message_id = %id, error = %e, "hand-back failed; the message stays in sending until the next start recovers it")
                }
            }
        }
    }
    background_stop.cancel();
    while background.join_next().await.is_some() {}
    let report = ctx.report.lock().unwrap().clone();
    tracing::info!(?report, "outboxd (drop-in) stopped");
    Ok(report)
}

async fn sleep_opt(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// One read of the prepared messages; each one not in flight here gets a delivery task while
/// slots are free (the rest waits for the next wake-up, poll or freed slot).
async fn scan(
    ctx: &Arc<Ctx>,
    slots: &Arc<Semaphore>,
    deliveries: &mut JoinSet<()>,
    stop: &CancellationToken,
) -> Result<(), BatchError> {
    if slots.available_permits() == 0 {
        return Ok(());
    }
    let rows = ctx
        .session
        .batch("api.outbox", &[Stmt::new(OUTBOX, vec![text("prepared")])])
        .await?;
    for row in rows.into_iter().flatten() {
        let Ok(id) = row.try_get::<_, Uuid>("id") else {
            continue;
        };
        if !ours(&ctx.router.load(), &row) {
            continue;
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            break;
        };
        if !ctx.inflight.lock().unwrap().insert(id) {
            continue;
        }
        let ctx = ctx.clone();
        let stop = stop.clone();
        deliveries.spawn(async move {
            let _permit = permit;
            if let Err(e) = deliver(&ctx, id, &stop).await {
                tracing::warn!(message_id = %id, error = %e, "drop-in delivery step failed");
            }
            ctx.inflight.lock().unwrap().remove(&id);
        });
    }
    Ok(())
}

/// Whether a prepared message is this daemon's to send. As MessageServer, which handles only the
/// agents it has a connector for: a message whose agent routes nowhere (`system.agent`,
/// `notice.agent`…, read by other parts of the platform) or to a kind that is not configured is
/// left prepared, untouched.
fn ours(r: &Router, row: &Row) -> bool {
    let (msg, _) = message(row, 1);
    match r.resolve(&msg) {
        Err(e)
            if e.code() == codes::UNKNOWN_AGENT.code
                || e.code() == codes::CONNECTOR_NOT_CONFIGURED.code =>
        {
            tracing::debug!(message_id = %msg.id, agent = %msg.agent, reason = e.reason(), "not ours: left prepared");
            false
        }
        _ => true,
    }
}

fn text(s: &str) -> Param {
    Param::Text(Some(s.to_string()))
}

/// Reads, takes (`send`), delivers and records one message.
async fn deliver(ctx: &Ctx, id: Uuid, stop: &CancellationToken) -> Result<(), BatchError> {
    let rows = ctx
        .session
        .batch(
            "api.get_service_message",
            &[Stmt::new(GET, vec![Param::Uuid(id)])],
        )
        .await?;
    let Some(row) = rows.into_iter().flatten().next() else {
        return Ok(());
    };
    if col(&row, "statecode").as_deref() != Some("prepared") {
        return Ok(());
    }
    let attempt = ctx.journal.get(id).map_or(0, |e| e.attempts) + 1;
    let (msg, agent) = message(&row, attempt);
    if stop.is_cancelled() {
        return Ok(());
    }
    match ctx
        .session
        .batch(
            "send",
            &[Stmt::new(ACTION, vec![Param::Uuid(id), text("send")])],
        )
        .await
    {
        Ok(_) => {}
        Err(e) if e.apostol_code().as_deref() == Some(NOT_ALLOWED) => {
            tracing::debug!(message_id = %id, "taken by someone else (send not allowed in its state)");
            return Ok(());
        }
        Err(e) => return Err(e),
    }
    ctx.report.lock().unwrap().claimed += 1;
    ctx.journal.sending(id, attempt);
    let (msg, route) = route(&ctx.router.load(), msg);
    // No rate limits in this mode (MessageServer's profiles have none): the "too fast" block
    // time the dispatcher would apply to a limiter is not used.
    let (row, _block) = deliver_one(&msg, route).await;
    record(ctx, &msg, agent, row).await
}

/// Routes a message; an SMTP profile written `<profile>@<domain>` finds the profile of the part
/// before `@` when none has the whole name (MessageServer's rule, [`ini::profile_name`]).
fn route(
    r: &Router,
    mut msg: OutboxMessage,
) -> (OutboxMessage, Result<router::Route, DeliveryError>) {
    let first = r.resolve(&msg).cloned();
    match first {
        Err(e) if e.code() == codes::UNKNOWN_PROFILE.code && msg.profile.contains('@') => {
            let whole = msg.profile.clone();
            msg.profile = ini::profile_name("smtp", &whole, |_| false).to_string();
            let second = r.resolve(&msg).cloned();
            if second.is_err() {
                msg.profile = whole;
                return (msg, Err(e));
            }
            (msg, second)
        }
        other => (msg, other),
    }
}

/// Writes the outcome where MessageServer does; retries the write (the message is in `sending`
/// until it succeeds) and leaves the message to the next start's recovery if it cannot.
async fn record(
    ctx: &Ctx,
    msg: &OutboxMessage,
    agent: Option<Uuid>,
    row: OutcomeRow,
) -> Result<(), BatchError> {
    let row = row.storable();
    let id = msg.id;
    let error = row
        .error_text
        .as_ref()
        .map(|t| format!("{}: {t}", row.error_code.as_deref().unwrap_or("error")));
    let mut stmts = Vec::new();
    match row.outcome {
        "done" => {
            if let Some(reply) = &row.reply {
                stmts.push(Stmt::new(
                    INBOX,
                    vec![
                        Param::Uuid(id),
                        agent.map_or(Param::Text(None), Param::Uuid),
                        Param::Text(None),
                        Param::Text(Some(msg.profile.clone())),
                        Param::Text(msg.address.clone()),
                        Param::Text(msg.subject.clone()),
                        Param::Text(Some(reply.clone())),
                    ],
                ));
            }
            stmts.push(Stmt::new(ACTION, vec![Param::Uuid(id), text("done")]));
            if let Some(p) = &row.provider_id {
                stmts.push(Stmt::new(LABEL, vec![Param::Uuid(id), text(p)]));
            }
        }
        _ => {
            stmts.push(Stmt::new(ACTION, vec![Param::Uuid(id), text("fail")]));
            stmts.push(Stmt::new(
                LABEL,
                vec![Param::Uuid(id), Param::Text(error.clone())],
            ));
        }
    }
    let mut backoff = Duration::from_millis(50);
    let mut tries = 0;
    loop {
        match ctx.session.batch("outcome", &stmts).await {
            Ok(rows) => {
                if let Some(label) = rows.last().and_then(|r| r.first()) {
                    if !label.try_get::<_, bool>("result").unwrap_or(true) {
                        tracing::warn!(message_id = %id, message = col(label, "message").as_deref().unwrap_or(""), "api.set_object_label refused the label");
                    }
                }
                break;
            }
            Err(e) if e.apostol_code().as_deref() == Some(NOT_ALLOWED) => {
                // Someone (an operator) moved it meanwhile: the outcome has no place any more.
                tracing::warn!(message_id = %id, error = %e, outcome = row.outcome, "the message left sending meanwhile; outcome not written");
                ctx.journal.forget(id);
                return Ok(());
            }
            Err(e) if tries < 8 => {
                tries += 1;
                tracing::warn!(message_id = %id, error = %e, retry_in = ?backoff, "writing the outcome failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
    let mut report = ctx.report.lock().unwrap();
    match (row.outcome, row.retry_delay_ms) {
        ("done", _) => {
            report.delivered += 1;
            ctx.journal.forget(id);
        }
        ("retry", Some(ms)) => {
            report.retried += 1;
            let due = chrono::Utc::now() + chrono::Duration::milliseconds(ms.max(0) as i64);
            ctx.journal.retry_at(id, due);
        }
        _ => {
            report.failed += 1;
            ctx.journal.forget(id);
        }
    }
    Ok(())
}

/// `repeat` for every retry that fell due (failed → prepared; the NOTIFY wakes the scan).
async fn repeat_due(ctx: &Ctx) {
    for id in ctx.journal.due(chrono::Utc::now()) {
        match ctx
            .session
            .batch(
                "repeat",
                &[Stmt::new(ACTION, vec![Param::Uuid(id), text("repeat")])],
            )
            .await
        {
            Ok(_) => ctx.journal.repeated(id),
            Err(e) if e.apostol_code().as_deref() == Some(NOT_ALLOWED) => {
                tracing::info!(message_id = %id, "not failed any more (repeated or deleted by hand); retry dropped");
                ctx.journal.forget(id);
            }
            Err(e) => tracing::warn!(message_id = %id, error = %e, "repeat failed; will try again"),
        }
    }
}

/// `fail` + label + `repeat` in one batch: a message in `sending` goes back to prepared.
async fn hand_back(ctx: &Ctx, id: Uuid, label: &str) -> Result<(), BatchError> {
    ctx.session
        .batch(
            "hand back",
            &[
                Stmt::new(ACTION, vec![Param::Uuid(id), text("fail")]),
                Stmt::new(LABEL, vec![Param::Uuid(id), text(label)]),
                Stmt::new(ACTION, vec![Param::Uuid(id), text("repeat")]),
            ],
        )
        .await
        .map(|_| ())
}

/// At start: every send the journal says was in flight (the daemon died during it) is still in
/// `sending`; its outcome is unknown, so it counts as an attempt and is delivered again (fail +
/// label + repeat) while attempts remain, or failed for good.
async fn recover(ctx: &Ctx) {
    for (id, entry) in ctx.journal.entries().into_iter().filter(|(_, e)| e.sending) {
        let rows = match ctx
            .session
            .batch(
                "api.get_service_message",
                &[Stmt::new(GET, vec![Param::Uuid(id)])],
            )
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(message_id = %id, error = %e, "cannot read an interrupted send; left for the next start");
                continue;
            }
        };
        let Some(row) = rows.into_iter().flatten().next() else {
            ctx.journal.forget(id);
            continue;
        };
        if col(&row, "statecode").as_deref() != Some("sending") {
            ctx.journal.forget(id);
            continue;
        }
        let (msg, _) = message(&row, entry.attempts);
        let common = ctx
            .router
            .load()
            .resolve(&msg)
            .map_or_else(|_| ProfileCommon::default(), |r| r.common.clone());
        let why = format!(
            "interrupted: the daemon stopped during attempt {}; its outcome is unknown",
            entry.attempts
        );
        let again = (entry.attempts.max(0) as u32) < common.max_attempts;
        let result = if again {
            hand_back(ctx, id, &format!("{why}; delivering again")).await
        } else {
            ctx.session
                .batch(
                    "fail",
                    &[
                        Stmt::new(ACTION, vec![Param::Uuid(id), text("fail")]),
                        Stmt::new(LABEL, vec![Param::Uuid(id), text(&why)]),
                    ],
                )
                .await
                .map(|_| ())
        };
        match result {
            Ok(()) => {
                tracing::warn!(message_id = %id, attempt = entry.attempts, again, "recovered a send interrupted by a stop");
                if again {
                    ctx.journal.repeated(id);
                } else {
                    ctx.journal.forget(id);
                }
            }
            Err(e) => {
                tracing::warn!(message_id = %id, error = %e, "cannot recover an interrupted send; left for the next start")
            }
        }
    }
}

fn col(row: &Row, name: &str) -> Option<String> {
    row.try_get::<_, Option<String>>(name).ok().flatten()
}

/// The message a connector sees, from a row of `api.service_message`, and the agent's id.
fn message(row: &Row, attempt: i32) -> (OutboxMessage, Option<Uuid>) {
    let created = row
        .try_get::<_, chrono::DateTime<chrono::Utc>>("created")
        .or_else(|_| {
            row.try_get::<_, chrono::NaiveDateTime>("created")
                .map(|n| n.and_utc())
        })
        .unwrap_or_else(|_| chrono::Utc::now());
    let msg = OutboxMessage {
        id: row.get("id"),
        code: col(row, "code").unwrap_or_default(),
        agent_type: col(row, "agenttypecode").unwrap_or_default(),
        agent: col(row, "agentcode").unwrap_or_default(),
        profile: col(row, "profile").unwrap_or_default(),
        address: col(row, "address"),
        subject: col(row, "subject"),
        content: col(row, "content"),
        label: col(row, "label"),
        attempt,
        max_attempts: None,
        priority: match col(row, "prioritycode").as_deref() {
            Some("low") => -1,
            Some("high") => 1,
            Some("critical") => 2,
            _ => 0,
        },
        created,
        images: Vec::new(),
    };
    (msg, row.try_get::<_, Option<Uuid>>("agent").ok().flatten())
}
