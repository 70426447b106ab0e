//! The delivery daemon: claim loop, concurrent deliveries, batched outcome recording, lease
//! heartbeat, reclaim of expired leases, graceful drain.
//!
//! Data path: a wake-up (NOTIFY via the listener, a poll tick, or freed capacity) runs
//! `outbox.claim` for as many messages as there are free delivery slots (at most `batch_size`);
//! each claimed message is delivered in its own task (a panic becomes a failed attempt); outcomes go
//! through a channel to one recorder, which writes whatever has accumulated with one
//! `outbox.record_outcomes` call. While deliveries run, a heartbeat extends their leases.
//!
//! Invariants: a message is in `inflight` from its claim until its outcome is recorded; on graceful
//! stop, messages whose delivery did not finish within the grace period are handed back with
//! `outbox.release`; if the daemon dies instead, their leases expire and any daemon reclaims them.

pub mod retry;
pub mod router;

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures::FutureExt;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::config::{Config, ConfigError};
use crate::connector::{DeliveryError, OutboxMessage, Receipt};
use crate::db::{Db, DbError, OutcomeRow};
pub use retry::RetryDecision;
pub use router::Router;

/// Why the daemon could not start (it does not stop for anything else but a signal).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Db(#[from] DbError),
    #[error("configuration has {} problem(s):\n{}", .0.len(), .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Config(Vec<ConfigError>),
}

/// What the daemon did, returned when it stops.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RunReport {
    pub claimed: u64,
    pub delivered: u64,
    pub retried: u64,
    pub failed: u64,
    /// Handed back as prepared on shutdown.
    pub released: u64,
}

/// Handles that control a running daemon.
#[derive(Clone, Default)]
pub struct Controls {
    /// Reload the profile files (SIGHUP).
    pub reload: Arc<Notify>,
}

/// A short, unique name for this daemon: host-pid-random.
pub fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    format!(
        "{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

/// Builds the router from the profile files; collects every problem of every file.
pub fn build_router(cfg: &Config) -> Result<Router, Vec<ConfigError>> {
    let (profiles, mut errors) = cfg.load_profiles();
    match Router::build(&cfg.routes, &profiles) {
        Ok(r) if errors.is_empty() => Ok(r),
        Ok(_) => Err(errors),
        Err(mut e) => {
            errors.append(&mut e);
            Err(errors)
        }
    }
}

struct Shared {
    db: Db,
    worker: String,
    inflight: Mutex<HashSet<Uuid>>,
    report: Mutex<RunReport>,
}

/// Runs the daemon until `shutdown` completes, then drains (see the module docs).
pub async fn run(
    cfg: Config,
    shutdown: impl Future<Output = ()> + Send,
    controls: Controls,
) -> Result<RunReport, RunError> {
    let router = Arc::new(ArcSwap::from_pointee(
        build_router(&cfg).map_err(RunError::Config)?,
    ));
    if cfg.migrate_on_start {
        crate::db::migrate::prepare_database(cfg.database_url.expose(), cfg.create_database)
            .await?;
    }
    let db = Db::connect(
        cfg.database_url.expose(),
        cfg.pool_size,
        cfg.db_timeout,
        Some(&cfg.synchronous_commit),
    )?;
    let worker = cfg.worker_id.clone().unwrap_or_else(default_worker_id);
    tracing::info!(
        worker = %worker,
        database = %crate::config::redact_url(cfg.database_url.expose()),
        concurrency = cfg.concurrency,
        batch_size = cfg.batch_size,
        poll_interval = ?cfg.poll_interval,
        "outboxd started"
    );
    let shared = Arc::new(Shared {
        db,
        worker,
        inflight: Mutex::new(HashSet::new()),
        report: Mutex::new(RunReport::default()),
    });

    let stop = CancellationToken::new();
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
        wake.clone(),
        background_stop.clone(),
    ));
    background.spawn(heartbeat(
        shared.clone(),
        cfg.lease,
        background_stop.clone(),
    ));
    {
        let cfg = cfg.clone();
        let router = router.clone();
        let reload = controls.reload.clone();
        let stop = background_stop.clone();
        background.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = reload.notified() => {}
                }
                match build_router(&cfg) {
                    Ok(r) => {
                        router.store(Arc::new(r));
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

    // A delivery slot travels with its outcome and is freed once the outcome is recorded, so at
    // most `concurrency` messages are in `sending` per daemon (what a crash can duplicate).
    let (done_tx, done_rx) = mpsc::unbounded_channel::<(OutcomeRow, OwnedSemaphorePermit)>();
    let recorder = tokio::spawn(record_loop(
        shared.clone(),
        done_rx,
        cfg.batch_size.max(500),
        wake.clone(),
    ));
    let recorder = tokio_util::task::AbortOnDropHandle::new(recorder);

    let slots = Arc::new(Semaphore::new(cfg.concurrency));
    let mut deliveries: JoinSet<()> = JoinSet::new();
    let mut poll = tokio::time::interval(cfg.poll_interval);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut db_backoff = Duration::from_millis(100);

    {
        let stop = stop.clone();
        let shutdown = shutdown;
        tokio::pin!(shutdown);
        let claim_loop = async {
            let mut reclaim_due = true;
            loop {
                while deliveries.try_join_next().is_some() {}
                if reclaim_due {
                    reclaim_due = false;
                    match shared.db.reclaim_expired(&shared.worker).await {
                        Ok(0) => {}
                        Ok(n) => {
                            tracing::warn!(count = n, "reclaimed messages whose lease expired")
                        }
                        Err(e) => tracing::warn!(error = %e, "reclaim failed"),
                    }
                }
                // Wait for a free delivery slot.
                let free = slots.available_permits();
                if free == 0 {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        p = slots.acquire() => drop(p),
                    }
                    continue;
                }
                let want = free.min(cfg.batch_size);
                let claimed = match shared.db.claim(&shared.worker, want, cfg.lease).await {
                    Ok(c) => {
                        db_backoff = Duration::from_millis(100);
                        c
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?db_backoff, "claim failed");
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(db_backoff) => {}
                        }
                        db_backoff = (db_backoff * 2).min(Duration::from_secs(30));
                        continue;
                    }
                };
                let n = claimed.len();
                shared.report.lock().unwrap().claimed += n as u64;
                for msg in claimed {
                    let permit = slots
                        .clone()
                        .try_acquire_owned()
                        .expect("the claim loop is the only taker of slots");
                    shared.inflight.lock().unwrap().insert(msg.id);
                    let route = router.load().resolve(&msg).cloned();
                    let tx = done_tx.clone();
                    deliveries.spawn(async move {
                        let row = deliver_one(&msg, route).await;
                        let _ = tx.send((row, permit));
                    });
                }
                if n == want {
                    // Possibly more waiting: go again as soon as there is room.
                    continue;
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = wake.notified() => {}
                    _ = poll.tick() => reclaim_due = true,
                }
            }
        };
        tokio::select! {
            _ = claim_loop => {}
            _ = &mut shutdown => {
                tracing::info!(in_flight = deliveries.len(), grace = ?cfg.grace_period, "stopping: no new claims, draining");
            }
        }
        stop.cancel();
    }

    // Drain: in-flight deliveries may finish within the grace period.
    let drained = tokio::time::timeout(cfg.grace_period, async {
        while deliveries.join_next().await.is_some() {}
    })
    .await
    .is_ok();
    if !drained {
        tracing::warn!(
            remaining = deliveries.len(),
            "grace period over; handing the rest back"
        );
        deliveries.shutdown().await;
    }
    drop(done_tx);
    let recorder_finished = tokio::time::timeout(cfg.grace_period + cfg.db_timeout, recorder)
        .await
        .is_ok();
    if !recorder_finished {
        tracing::error!(
            "could not record every outcome; their leases will expire and be reclaimed"
        );
    }
    let leftover: Vec<Uuid> = shared.inflight.lock().unwrap().iter().copied().collect();
    if !leftover.is_empty() {
        match shared
            .db
            .release(&shared.worker, &leftover, Duration::from_secs(1))
            .await
        {
            Ok(n) => {
                shared.report.lock().unwrap().released += n as u64;
                tracing::info!(count = n, "handed back unfinished messages");
            }
            Err(e) => {
                tracing::error!(error = %e, "hand-back failed; leases will expire and be reclaimed")
            }
        }
    }
    background_stop.cancel();
    while background.join_next().await.is_some() {}
    let report = shared.report.lock().unwrap().clone();
    tracing::info!(?report, "outboxd stopped");
    Ok(report)
}

/// Delivers one message and turns the result into the row to record.
async fn deliver_one(
    msg: &OutboxMessage,
    route: Result<router::Route, DeliveryError>,
) -> OutcomeRow {
    let started = Instant::now();
    let span = tracing::debug_span!(
        "deliver",
        message_id = %msg.id,
        profile = %msg.profile,
        connector = tracing::field::Empty,
        attempt = msg.attempt
    );
    let connector = route
        .as_ref()
        .map_or_else(|_| "-".to_string(), |r| r.connector.name().to_string());
    let (result, common) = match route {
        Err(e) => (Err(e), None),
        Ok(route)
            if msg.content.as_ref().map_or(0, String::len) > route.common.max_content_bytes =>
        {
            (
                Err(DeliveryError::permanent(
                    "content-too-large",
                    format!(
                        "content is {} bytes; the profile allows {} (max_content_bytes)",
                        msg.content.as_ref().map_or(0, String::len),
                        route.common.max_content_bytes
                    ),
                )),
                Some(route.common),
            )
        }
        Ok(route) => {
            span.record("connector", route.connector.name());
            // The connector bounds its provider call by the timeout, after any wait for
            // per-profile capacity (Connector::deliver_within).
            let timeout = route.common.timeout;
            let fut = std::panic::AssertUnwindSafe(route.connector.deliver_within(msg, timeout))
                .catch_unwind()
                .instrument(span);
            let r = match fut.await {
                Ok(r) => r,
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    Err(DeliveryError::retry(
                        "connector-panic",
                        format!("the connector panicked: {what}"),
                    ))
                }
            };
            (r, Some(route.common))
        }
    };
    let duration_ms = started.elapsed().as_millis().min(i32::MAX as u128) as i32;
    outcome_row(msg, &connector, result, common.as_ref(), duration_ms)
}

/// Classifies a result into done / retry (with its delay) / failed.
pub fn outcome_row(
    msg: &OutboxMessage,
    connector: &str,
    result: Result<Receipt, DeliveryError>,
    common: Option<&crate::config::ProfileCommon>,
    duration_ms: i32,
) -> OutcomeRow {
    let base = OutcomeRow {
        id: msg.id,
        outcome: "done",
        error_code: None,
        error_text: None,
        remote_status: None,
        provider_id: None,
        duration_ms,
        retry_delay_ms: None,
        reply: None,
    };
    match result {
        Ok(r) => {
            tracing::debug!(message_id = %msg.id, profile = %msg.profile, connector, attempt = msg.attempt, provider_id = r.provider_id.as_deref().unwrap_or(""), "delivered");
            OutcomeRow {
                remote_status: r.remote_status,
                provider_id: r.provider_id,
                reply: r.reply,
                ..base
            }
        }
        Err(e) => {
            let default_common = crate::config::ProfileCommon::default();
            let common = common.unwrap_or(&default_common);
            let decision = match &e {
                DeliveryError::Retry { retry_after, .. } => {
                    retry::decide(common, msg.max_attempts, msg.attempt, *retry_after)
                }
                DeliveryError::Permanent { .. } => RetryDecision::GiveUp,
            };
            let (outcome, delay) = match decision {
                RetryDecision::RetryAfter(d) => {
                    tracing::warn!(message_id = %msg.id, profile = %msg.profile, connector, attempt = msg.attempt, code = e.code(), error = e.reason(), retry_in = ?d, "delivery failed; will retry");
                    ("retry", Some(d.as_millis().min(i32::MAX as u128) as i32))
                }
                RetryDecision::GiveUp => {
                    tracing::error!(message_id = %msg.id, profile = %msg.profile, connector, attempt = msg.attempt, code = e.code(), error = e.reason(), "delivery failed for good");
                    ("failed", None)
                }
            };
            OutcomeRow {
                outcome,
                error_code: Some(e.code().to_string()),
                error_text: Some(crate::connector::http::truncate(e.reason(), 2000).to_string()),
                remote_status: e.remote_status(),
                retry_delay_ms: delay,
                ..base
            }
        }
    }
}

/// Writes outcomes in batches: everything that has accumulated, one round trip.
///
/// A retry this daemon scheduled wakes the claim loop when it falls due, so retries do not wait for
/// the next poll (other daemons find it by polling).
async fn record_loop(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<(OutcomeRow, OwnedSemaphorePermit)>,
    max: usize,
    wake: Arc<Notify>,
) {
    let mut batch = Vec::with_capacity(max);
    let mut permits = Vec::with_capacity(max);
    while let Some((first, permit)) = rx.recv().await {
        batch.push(first);
        permits.push(permit);
        while batch.len() < max {
            match rx.try_recv() {
                Ok((r, p)) => {
                    batch.push(r);
                    permits.push(p);
                }
                Err(_) => break,
            }
        }
        let mut backoff = Duration::from_millis(50);
        loop {
            match shared.db.record_outcomes(&shared.worker, &batch).await {
                Ok(_) => break,
                // A data error (SQLSTATE class 22/23) will not go away by retrying: find the row
                // that causes it and record that one without its texts.
                Err(e)
                    if e.code()
                        .is_some_and(|c| c.starts_with("22") || c.starts_with("23")) =>
                {
                    tracing::error!(error = %e, count = batch.len(), "an outcome cannot be stored as is; recording one by one");
                    record_one_by_one(&shared, &batch).await;
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, count = batch.len(), retry_in = ?backoff, "recording outcomes failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        if let Some(ms) = batch.iter().filter_map(|r| r.retry_delay_ms).min() {
            let wake = wake.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(ms.max(0) as u64 + 1)).await;
                wake.notify_one();
            });
        }
        {
            let mut inflight = shared.inflight.lock().unwrap();
            let mut report = shared.report.lock().unwrap();
            for r in &batch {
                inflight.remove(&r.id);
                match r.outcome {
                    "done" => report.delivered += 1,
                    "retry" => report.retried += 1,
                    _ => report.failed += 1,
                }
            }
        }
        batch.clear();
        permits.clear();
    }
}

/// The slow path of [`record_loop`]: each row alone, and a row that still fails without the texts
/// that came from the provider (its lease expires and it is retried if even that fails).
async fn record_one_by_one(shared: &Shared, batch: &[OutcomeRow]) {
    for row in batch {
        let single = std::slice::from_ref(row);
        if shared
            .db
            .record_outcomes(&shared.worker, single)
            .await
            .is_ok()
        {
            continue;
        }
        let bare = OutcomeRow {
            error_text: Some("(the provider's text could not be stored)".into()),
            provider_id: None,
            reply: None,
            ..row.clone()
        };
        if let Err(e) = shared.db.record_outcomes(&shared.worker, &[bare]).await {
            tracing::error!(message_id = %row.id, error = %e, "cannot record the outcome; the lease will expire and the message be retried");
        }
    }
}

/// Extends the leases of in-flight messages every lease/3.
async fn heartbeat(shared: Arc<Shared>, lease: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(lease / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let ids: Vec<Uuid> = shared.inflight.lock().unwrap().iter().copied().collect();
        if ids.is_empty() {
            continue;
        }
        match shared.db.extend_leases(&shared.worker, &ids, lease).await {
            Ok(n) if (n as usize) < ids.len() => tracing::warn!(
                held = n,
                expected = ids.len(),
                "some leases were lost (reclaimed by another daemon?)"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "lease heartbeat failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProfileCommon;
    use crate::connector::Connector;

    struct Misbehaving(&'static str);

    #[async_trait::async_trait]
    impl Connector for Misbehaving {
        fn name(&self) -> &str {
            "test/misbehaving"
        }
        async fn deliver(&self, _: &OutboxMessage) -> Result<Receipt, DeliveryError> {
            match self.0 {
                "panic" => panic!("boom"),
                "hang" => std::future::pending().await,
                _ => Ok(Receipt::default()),
            }
        }
    }

    fn msg(attempt: i32) -> OutboxMessage {
        OutboxMessage {
            id: Uuid::new_v4(),
            code: "c".into(),
            agent_type: "api.agent".into(),
            agent: "x.agent".into(),
            profile: "default".into(),
            address: None,
            subject: None,
            content: None,
            label: None,
            attempt,
            max_attempts: None,
            priority: 0,
            created: chrono::Utc::now(),
        }
    }

    fn route(kind: &'static str) -> Result<router::Route, DeliveryError> {
        Ok(router::Route {
            connector: Arc::new(Misbehaving(kind)),
            common: ProfileCommon {
                retry: vec![Duration::from_secs(10)],
                max_attempts: 2,
                timeout: Duration::from_millis(50),
                max_content_bytes: 10,
            },
        })
    }

    #[tokio::test]
    async fn a_panicking_connector_is_a_failed_attempt() {
        let row = deliver_one(&msg(1), route("panic")).await;
        assert_eq!(row.outcome, "retry");
        assert_eq!(row.error_code.as_deref(), Some("connector-panic"));
        assert!(row.error_text.unwrap().contains("boom"));
        let last = deliver_one(&msg(2), route("panic")).await;
        assert_eq!(last.outcome, "failed", "max_attempts reached");
    }

    #[tokio::test]
    async fn a_delivery_past_the_profile_timeout_is_retried() {
        let row = deliver_one(&msg(1), route("hang")).await;
        assert_eq!(row.outcome, "retry");
        assert_eq!(row.error_code.as_deref(), Some("timeout"));
        let d = row.retry_delay_ms.unwrap();
        assert!((8000..=12000).contains(&d), "10 s ± 20 %: {d}");
        let ok = deliver_one(&msg(1), route("ok")).await;
        assert_eq!((ok.outcome, ok.error_code), ("done", None));
        let mut big = msg(1);
        big.content = Some("x".repeat(11));
        let row = deliver_one(&big, route("ok")).await;
        assert_eq!(row.outcome, "failed");
        assert_eq!(row.error_code.as_deref(), Some("content-too-large"));
    }
}
