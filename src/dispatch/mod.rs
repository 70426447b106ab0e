//! The delivery daemon: claim loop, concurrent deliveries, batched outcome recording, lease
//! heartbeat, reclaim of expired leases, graceful drain.
//!
//! Data path: a wake-up (NOTIFY via the listener, a poll tick, or freed capacity) runs
//! `outbox.claim` for as many messages as there are free delivery slots (at most `batch_size`);
//! each claimed message is delivered in its own task (a panic becomes a failed attempt) — through a
//! fallback profile when its profile's fallback rule says so ([`fallback`]), and, for a profile
//! with rate windows, only after `outbox.rate_take` granted a turn: a message over the limit is
//! deferred by that same call, uncharged, and its slot freed at once ([`ratelimit`]); outcomes go
//! through a channel to one recorder, which writes whatever has accumulated with one
//! `outbox.record_outcomes` call. While deliveries run, a heartbeat extends their leases.
//!
//! Invariants: a claim (message id, claim id) is in `inflight` from its claim until its outcome is
//! recorded; the claim id is the fencing token every heartbeat, outcome and hand-back presents, so
//! an outcome whose lease was lost (reclaimed, maybe claimed again — even by this daemon) is
//! recorded as stale and changes nothing. An outcome is never dropped: transient errors are
//! retried; only a data error gets the fallback without the provider's texts. On graceful stop the
//! outcomes of finished deliveries are recorded first; then only messages whose delivery did not
//! finish within the grace period are handed back with `outbox.release` (never one whose outcome
//! is pending). A claim call that failed on the client may have committed on the server: its
//! messages are handed back with `outbox.release_claim`, uncharged. If the daemon dies instead,
//! leases expire and any daemon reclaims them.

pub mod fallback;
pub mod ratelimit;
pub mod retention;
pub mod retry;
pub mod router;
pub mod stats;

use std::collections::{HashMap, HashSet};
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
use crate::db::{ClaimKey, Db, DbError, OutcomeRow, RateTurn, Recorded};
pub use retry::RetryDecision;
pub use router::Router;

/// Why the daemon could not start (it does not stop for anything else but a signal).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Db(#[from] DbError),
    #[error("configuration has {} problem(s):\n{}", .0.len(), .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Config(Vec<ConfigError>),
    #[error("cannot listen on {0} (http_listen): {1}")]
    Listen(std::net::SocketAddr, std::io::Error),
    #[error("{0}")]
    Fonts(#[from] crate::render::fonts::FontError),
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
    /// Outcomes ignored because their claim had lost its lease (not counted above).
    pub stale: u64,
    /// Messages of claim calls that failed on the client but committed on the server, handed
    /// back undelivered with `outbox.release_claim`.
    pub orphaned: u64,
    /// Put back uncharged by a rate limit, due when their window allows them (not counted above).
    pub deferred: u64,
}

/// Handles that control a running daemon.
#[derive(Clone, Default)]
pub struct Controls {
    /// Reload the profile files (SIGHUP).
    pub reload: Arc<Notify>,
    /// What the daemon knows about itself (status, metrics).
    pub stats: Arc<stats::Stats>,
    /// The HTTP server's bound address, once it listens (`http_listen` with port 0 picks one).
    pub http_addr: Arc<std::sync::OnceLock<std::net::SocketAddr>>,
    /// systemd's notify socket (disabled unless the binary found `NOTIFY_SOCKET`).
    pub notifier: crate::systemd::Notifier,
    /// The task scheduler's clock (the system clock unless a test sets a manual one).
    pub clock: crate::schedule::Clock,
    /// Fault injection for the Kafka trigger's crash tests (off by default).
    pub kafka_faults: crate::kafka::Faults,
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

/// What the daemon knows about one claim it holds.
#[derive(Debug, Default, Clone, Copy)]
struct Flight {
    /// The delivery finished: its outcome is with the recorder (never hand the message back).
    finished: bool,
    /// The heartbeat found the lease lost: the outcome will be stale.
    lost: bool,
}

struct Shared {
    db: Db,
    /// Picture cards: the fonts, parsed once at start, and decoded backgrounds.
    cards: Arc<crate::render::card::Cards>,
    worker: String,
    inflight: Mutex<HashMap<ClaimKey, Flight>>,
    report: Mutex<RunReport>,
    /// How each profile has been doing, for provider fallback.
    health: fallback::HealthBook,
}

/// How late a reserved rate slot may be taken up: a message claimed later than this after its
/// slot takes a new turn, so that the gaps the window keeps between sends stay within this much.
const RATE_LATE: Duration = Duration::from_millis(50);

/// Runs the daemon until `shutdown` completes, then drains (see the module docs).
pub async fn run(
    cfg: Config,
    shutdown: impl Future<Output = ()> + Send,
    controls: Controls,
) -> Result<RunReport, RunError> {
    if cfg.mode == crate::config::SourceMode::Apostol {
        return crate::apostol::run(cfg, shutdown, controls).await;
    }
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
    // Fonts are parsed here, once: a CJK font takes a moment, which no card should pay.
    let cards_cfg = cfg.cards.clone();
    let fonts = tokio::task::spawn_blocking(move || crate::render::fonts::Fonts::load(&cards_cfg))
        .await
        .expect("font loading does not panic")?;
    let cards = Arc::new(crate::render::card::Cards::new(
        Arc::new(fonts),
        cfg.cards.backgrounds.clone(),
    ));
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
        cards,
        worker,
        inflight: Mutex::new(HashMap::new()),
        report: Mutex::new(RunReport::default()),
        health: fallback::HealthBook::default(),
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
    // The scheduler's wake-ups share the LISTEN connection (sql/021).
    let tasks_wake = Arc::new(Notify::new());
    let mut channels = vec![(crate::db::listener::CHANNEL, wake.clone())];
    if cfg.tasks.enabled {
        channels.push((crate::schedule::CHANNEL, tasks_wake.clone()));
    }
    background.spawn(crate::db::listener::run(
        listen_url,
        cfg.db_timeout,
        channels,
        controls.stats.clone(),
        background_stop.clone(),
    ));
    let mut read_base = cfg.tasks.read_base_url.clone();
    if let Some(addr) = cfg.http_listen {
        let listener = crate::server::bind(addr)
            .await
            .map_err(|e| RunError::Listen(addr, e))?;
        if let Ok(bound) = listener.local_addr() {
            let _ = controls.http_addr.set(bound);
            read_base.get_or_insert_with(|| format!("http://{bound}/m/"));
        }
        let state = Arc::new(
            crate::server::AppState::new(
                shared.db.clone(),
                controls.stats.clone(),
                shared.worker.clone(),
                cfg.api_tokens.clone(),
            )
            .with_router(router.clone()),
        );
        background.spawn(crate::server::serve(
            listener,
            state,
            cfg.http_max_body_bytes,
            background_stop.clone(),
        ));
    }
    background.spawn(heartbeat(
        shared.clone(),
        cfg.lease,
        background_stop.clone(),
    ));
    if cfg.tasks.enabled {
        // A pool of its own (opened lazily): a long fan-out never takes the claim loop's
        // connections.
        let db = Db::connect(
            cfg.database_url.expose(),
            crate::schedule::POOL_SIZE,
            cfg.db_timeout,
            None,
        )?;
        let scheduler = crate::schedule::Scheduler::new(
            db,
            controls.clock.clone(),
            cfg.tasks.clone(),
            read_base,
            shared.worker.clone(),
        );
        background.spawn(scheduler.run(tasks_wake, cfg.poll_interval, background_stop.clone()));
    }
    if let Some(kafka) = &cfg.kafka {
        // Its own small pool: a partition's batch transaction holds a connection while it runs.
        let db = Db::connect(
            cfg.database_url.expose(),
            crate::kafka::POOL_SIZE,
            cfg.db_timeout,
            None,
        )?;
        background.spawn(crate::kafka::run(
            kafka.clone(),
            db,
            controls.kafka_faults.clone(),
            background_stop.clone(),
        ));
    }
    if cfg.retention.enabled() {
        background.spawn(retention::run(
            shared.db.clone(),
            cfg.retention.clone(),
            background_stop.clone(),
        ));
    }
    if let Some(p) = crate::connector::dingtalk::poller::Poller::from_config(&cfg) {
        background.spawn(p.run(shared.db.clone(), background_stop.clone()));
    }
    if controls.notifier.enabled() {
        background.spawn(systemd_loop(
            shared.clone(),
            controls.clone(),
            cfg.clone(),
            background_stop.clone(),
        ));
    }
    {
        let cfg = cfg.clone();
        let router = router.clone();
        let reload = controls.reload.clone();
        let notifier = controls.notifier;
        let stop = background_stop.clone();
        background.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = reload.notified() => {}
                }
                notifier.reloading();
                let result = build_router(&cfg);
                notifier.ready("profiles reloaded");
                match result {
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
        controls.stats.clone(),
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
    // Claim calls that failed on the client but may have committed on the server.
    let mut orphans: Vec<(Uuid, Instant)> = Vec::new();
    // The claim call running when the stop came (its future is dropped, it may have committed).
    let claim_running: Mutex<Option<Uuid>> = Mutex::new(None);

    {
        let stop = stop.clone();
        let shutdown = shutdown;
        tokio::pin!(shutdown);
        let claim_loop = async {
            // Every expired lease once at start (a scan of the whole queue); from then on the
            // claim hands back the expired leases it meets on its way through the queue.
            match shared.db.reclaim_expired(&shared.worker).await {
                Ok(n) => note_reclaims(n as usize),
                Err(e) => tracing::warn!(error = %e, "reclaim failed"),
            }
            loop {
                while deliveries.try_join_next().is_some() {}
                controls.stats.loop_busy(true);
                release_orphans(&shared, &mut orphans, cfg.lease).await;
                // Wait for a free delivery slot.
                let free = slots.available_permits();
                if free == 0 {
                    controls.stats.loop_busy(false);
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        p = slots.acquire() => drop(p),
                    }
                    continue;
                }
                let want = free.min(cfg.batch_size);
                let claim_id = Uuid::new_v4();
                *claim_running.lock().unwrap() = Some(claim_id);
                let result = shared
                    .db
                    .claim(&shared.worker, want, cfg.lease, claim_id)
                    .await;
                *claim_running.lock().unwrap() = None;
                let claimed = match result {
                    Ok((c, reclaimed)) => {
                        db_backoff = Duration::from_millis(100);
                        note_reclaims(reclaimed);
                        c
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?db_backoff, "claim failed");
                        controls.stats.loop_busy(false);
                        if may_have_committed(&e) {
                            orphans.push((claim_id, Instant::now()));
                        }
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
                controls
                    .stats
                    .set_in_flight(shared.inflight.lock().unwrap().len() + n);
                for (msg, template) in claimed {
                    let permit = slots
                        .clone()
                        .try_acquire_owned()
                        .expect("the claim loop is the only taker of slots");
                    let key = (msg.id, claim_id);
                    shared
                        .inflight
                        .lock()
                        .unwrap()
                        .insert(key, Flight::default());
                    let routes = router.load_full();
                    let tx = done_tx.clone();
                    let stats = controls.stats.clone();
                    let shared = shared.clone();
                    let wake = wake.clone();
                    deliveries.spawn(async move {
                        let route = routes.resolve(&msg).cloned();
                        let (msg, route) = render_template(&shared, msg, template, route).await;
                        let route = route.map(|r| with_fallback(&routes, r, &msg, &shared.health));
                        let connector = route
                            .as_ref()
                            .map_or_else(|_| "-".to_string(), |r| r.connector.name().to_string());
                        let buckets = match &route {
                            Ok(r) if !r.rate_limits.is_empty() => ratelimit::buckets(
                                &r.profile,
                                &r.rate_limits,
                                msg.address.as_deref(),
                            ),
                            _ => Vec::new(),
                        };
                        let mut route = route;
                        if !buckets.is_empty() {
                            match shared
                                .db
                                .rate_take(&shared.worker, key, &buckets, RATE_LATE)
                                .await
                            {
                                Ok(RateTurn::Send) => {}
                                Ok(turn) => {
                                    // Already back in prepared (or no longer ours): nothing to
                                    // record, and the slot is free at once.
                                    let left = {
                                        let mut inflight = shared.inflight.lock().unwrap();
                                        inflight.remove(&key);
                                        inflight.len()
                                    };
                                    stats.set_in_flight(left);
                                    if let RateTurn::Deferred(wait) = turn {
                                        shared.report.lock().unwrap().deferred += 1;
                                        tracing::debug!(message_id = %msg.id, profile = %msg.profile, connector, wait = ?wait, "over the rate limit; deferred");
                                        tokio::spawn(async move {
                                            tokio::time::sleep(wait + Duration::from_millis(1)).await;
                                            wake.notify_one();
                                        });
                                    }
                                    drop(permit);
                                    return;
                                }
                                Err(e) => {
                                    tracing::warn!(message_id = %msg.id, profile = %msg.profile, error = %e, "rate limiter unavailable; the message is not sent now");
                                    route = route.map(|r| router::Route {
                                        connector: Arc::new(Unavailable(e.to_string())),
                                        ..r
                                    });
                                }
                            }
                        }
                        let profile = route.as_ref().ok().map(|r| r.profile.clone());
                        let (mut row, too_fast) = deliver_one(&msg, route).await;
                        row.claim_id = claim_id;
                        if let Some(block) = too_fast.filter(|_| !buckets.is_empty()) {
                            let blocked = ratelimit::blocked_by_too_fast(&buckets);
                            match shared.db.rate_block(&blocked, block).await {
                                Ok(()) => tracing::warn!(message_id = %msg.id, profile = %msg.profile, connector, block = ?block, "the platform said too fast; its rate windows are blocked"),
                                Err(e) => tracing::warn!(message_id = %msg.id, error = %e, "could not block the rate windows after a too-fast answer"),
                            }
                        }
                        if let Some(p) = &profile {
                            shared.health.observe(
                                p,
                                row.outcome,
                                row.outcome == "retry",
                                Instant::now(),
                            );
                        }
                        observe(&stats, &msg, &connector, &row);
                        // From here on the message is never handed back: its outcome is pending.
                        if let Some(f) = shared.inflight.lock().unwrap().get_mut(&key) {
                            f.finished = true;
                        }
                        let _ = tx.send((row, permit));
                    });
                }
                if n == want {
                    // Possibly more waiting: go again as soon as there is room.
                    continue;
                }
                controls.stats.loop_busy(false);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = wake.notified() => {}
                    _ = poll.tick() => {}
                }
            }
        };
        tokio::select! {
            _ = claim_loop => {}
            _ = &mut shutdown => {
                controls.notifier.stopping();
                tracing::info!(in_flight = deliveries.len(), grace = ?cfg.grace_period, "stopping: no new claims, draining");
            }
        }
        stop.cancel();
    }
    if let Some(claim_id) = claim_running.lock().unwrap().take() {
        orphans.push((claim_id, Instant::now()));
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
    // The outcomes of finished deliveries are recorded before anything is handed back. The
    // recorder retries transient errors while the heartbeat (still running) keeps their leases;
    // it is given up to a lease period, after which the leases would expire anyway. (Worst case
    // with the defaults: grace 10 s + lease 30 s + two DB timeouts of 10 s = systemd's
    // TimeoutStopSec=60.)
    let recorder_finished = tokio::time::timeout(cfg.lease + cfg.db_timeout, recorder)
        .await
        .is_ok();
    let (leftover, pending): (Vec<ClaimKey>, usize) = {
        let inflight = shared.inflight.lock().unwrap();
        let leftover = inflight
            .iter()
            .filter(|(_, f)| !f.finished && !f.lost)
            .map(|(k, _)| *k)
            .collect();
        (leftover, inflight.values().filter(|f| f.finished).count())
    };
    if !recorder_finished || pending > 0 {
        tracing::error!(
            count = pending,
            "could not record every outcome; their leases will expire and be reclaimed"
        );
    }
    release_orphans(&shared, &mut orphans, cfg.lease).await;
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

/// A message built from a template gets its subject and content rendered here, before routing
/// hands it to a connector; a render error takes the route's place, so it is recorded as the
/// (permanent) outcome of this attempt and the connector is never called. Messages without a
/// template pass through untouched. A picture card is rendered (or its stored picture read)
/// here too, see [`crate::render::stage`].
async fn render_template(
    shared: &Shared,
    mut msg: OutboxMessage,
    template: Option<crate::render::Job>,
    route: Result<router::Route, DeliveryError>,
) -> (OutboxMessage, Result<router::Route, DeliveryError>) {
    let Some(job) = template else {
        return (msg, route);
    };
    if route.is_err() {
        // Not routable: no use rendering (nor storing a picture) for it.
        return (msg, route);
    }
    let (name, version) = (job.template.name.clone(), job.template.version);
    match crate::render::stage::prepare(&shared.cards, &shared.db, &mut msg, job).await {
        Ok(()) => (msg, route),
        Err(e) => {
            tracing::error!(message_id = %msg.id, profile = %msg.profile, template = %name,
                version, code = e.code(), error = %e, "template cannot be rendered");
            (msg, Err(e))
        }
    }
}

/// The route a message's attempt takes: its profile's, or a fallback's when the profile's
/// fallback rule says so (see [`fallback`]). The fallback's connector and settings make the
/// attempt; the message keeps its own retry schedule and attempt limit.
fn with_fallback(
    routes: &Router,
    route: router::Route,
    msg: &OutboxMessage,
    health: &fallback::HealthBook,
) -> router::Route {
    let Some(f) = &route.fallback else {
        return route;
    };
    let Some(i) = fallback::choose(f, &route.profile, msg.attempt, health, Instant::now()) else {
        return route;
    };
    match routes.profile(&f.profiles[i]) {
        Some(other) => {
            tracing::info!(message_id = %msg.id, profile = %route.profile, fallback = %other.profile, attempt = msg.attempt, "delivering through a fallback profile");
            router::Route {
                common: crate::config::ProfileCommon {
                    retry: route.common.retry.clone(),
                    max_attempts: route.common.max_attempts,
                    ..other.common.clone()
                },
                ..other.clone()
            }
        }
        // Checked when the router was built; a reload keeps both or neither.
        None => route,
    }
}

/// Stands in for the connector when the rate limiter could not be asked: the message is not sent
/// (sending it could break the limit for the whole fleet) and is retried.
struct Unavailable(String);

#[async_trait::async_trait]
impl crate::connector::Connector for Unavailable {
    fn name(&self) -> &str {
        "rate-limiter"
    }
    async fn deliver(&self, _: &OutboxMessage) -> Result<Receipt, DeliveryError> {
        Err(DeliveryError::retry(
            crate::connector::codes::RATE_LIMIT_UNAVAILABLE.code,
            format!("the rate limiter could not be asked: {}", self.0),
        ))
    }
}

/// Delivers one message and turns the result into the row to record; also says for how long the
/// platform asked the profile to stop when it answered "too fast" (also the drop-in mode's
/// delivery step, [`crate::apostol`]).
pub(crate) async fn deliver_one(
    msg: &OutboxMessage,
    route: Result<router::Route, DeliveryError>,
) -> (OutcomeRow, Option<Duration>) {
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
    let profile = route.as_ref().ok().map(|r| r.profile.to_string());
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
    let too_fast = match &result {
        Err(DeliveryError::Retry {
            too_fast: true,
            retry_after,
            ..
        }) => Some(*retry_after),
        _ => None,
    };
    let mut row = outcome_row(msg, &connector, result, common.as_ref(), duration_ms);
    row.profile = profile;
    // A 429 without a block time holds the profile until this message's own retry.
    let too_fast = too_fast.map(|after| {
        after
            .unwrap_or_else(|| Duration::from_millis(row.retry_delay_ms.unwrap_or(0).max(0) as u64))
    });
    (row, too_fast)
}

/// Counts one attempt in the metrics and the per-profile status.
fn observe(stats: &stats::Stats, msg: &OutboxMessage, connector: &str, row: &OutcomeRow) {
    let took = Duration::from_millis(row.duration_ms.max(0) as u64);
    crate::metrics::attempt(
        &msg.profile,
        connector,
        row.outcome,
        row.error_code.as_deref(),
        took,
    );
    stats.record(connector, row.error_code.as_deref());
    if row.outcome == "done" {
        let age = (chrono::Utc::now() - msg.created)
            .to_std()
            .unwrap_or_default();
        crate::metrics::delivered_after(&msg.profile, connector, age);
    }
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
        claim_id: Uuid::nil(),
        attempt: msg.attempt,
        outcome: "done",
        error_code: None,
        error_text: None,
        remote_status: None,
        provider_id: None,
        duration_ms,
        retry_delay_ms: None,
        reply: None,
        profile: None,
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
    stats: Arc<stats::Stats>,
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
        crate::metrics::recorder_batch(batch.len());
        let mut backoff = Duration::from_millis(50);
        let results = loop {
            match shared.db.record_outcomes(&shared.worker, &batch).await {
                Ok(r) => break r.into_iter().collect::<HashMap<_, _>>(),
                // A data error will not go away by retrying: find the row that causes it and
                // record that one without its texts.
                Err(e) if is_data_error(&e) => {
                    tracing::error!(error = %e, count = batch.len(), "an outcome cannot be stored as is; recording one by one");
                    break record_one_by_one(&shared, &batch).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, count = batch.len(), retry_in = ?backoff, "recording outcomes failed");
                    tokio::time::sleep(backoff).await;
                    backoff = next_backoff(backoff);
                }
            }
        };
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
                let key = (r.id, r.claim_id);
                inflight.remove(&key);
                stats.set_in_flight(inflight.len());
                match results.get(&key) {
                    Some(Recorded::Recorded | Recorded::Duplicate) => match r.outcome {
                        "done" => report.delivered += 1,
                        "retry" => report.retried += 1,
                        _ => report.failed += 1,
                    },
                    Some(Recorded::Stale) => {
                        report.stale += 1;
                        tracing::warn!(message_id = %r.id, claim_id = %r.claim_id, attempt = r.attempt, outcome = r.outcome, code = r.error_code.as_deref().unwrap_or(""), "outcome ignored: the claim had lost its lease (the message was reclaimed)");
                    }
                    // Only when even the fallback without texts was refused (logged there).
                    None => {}
                }
            }
        }
        batch.clear();
        permits.clear();
    }
}

/// SQLSTATE class 22 (data exception) or 23 (integrity constraint violation): the row itself is
/// the problem, retrying it as is cannot help.
fn is_data_error(e: &DbError) -> bool {
    e.code()
        .is_some_and(|c| c.starts_with("22") || c.starts_with("23"))
}

fn next_backoff(d: Duration) -> Duration {
    (d * 2).min(Duration::from_secs(5))
}

/// The slow path of [`record_loop`]: each row alone. A transient error is retried with backoff
/// (an outcome is never dropped for it); a data error is retried once without the texts that came
/// from the provider. A row refused even so is left to its lease (it expires and the message is
/// retried) — the only outcome ever given up.
async fn record_one_by_one(shared: &Shared, batch: &[OutcomeRow]) -> HashMap<ClaimKey, Recorded> {
    let mut results = HashMap::new();
    for row in batch {
        let mut row = row.clone();
        let mut bare = false;
        let mut backoff = Duration::from_millis(50);
        loop {
            match shared
                .db
                .record_outcomes(&shared.worker, std::slice::from_ref(&row))
                .await
            {
                Ok(r) => {
                    results.extend(r);
                    break;
                }
                Err(e) if is_data_error(&e) && !bare => {
                    bare = true;
                    row = OutcomeRow {
                        error_text: Some("(the provider's text could not be stored)".into()),
                        provider_id: None,
                        reply: None,
                        ..row
                    };
                }
                Err(e) if is_data_error(&e) => {
                    tracing::error!(message_id = %row.id, error = %e, "cannot record the outcome; the lease will expire and the message be retried");
                    break;
                }
                Err(e) => {
                    tracing::warn!(message_id = %row.id, error = %e, retry_in = ?backoff, "recording an outcome failed");
                    tokio::time::sleep(backoff).await;
                    backoff = next_backoff(backoff);
                }
            }
        }
    }
    results
}

/// Whether a failed claim call may have committed on the server anyway (and so left orphaned
/// messages in `sending`): a client-side timeout or a lost connection. An error the server
/// reported rolled the claim back; a pool error never sent it.
fn may_have_committed(e: &DbError) -> bool {
    match e {
        DbError::Timeout(..) => true,
        DbError::Query(q) => q.as_db_error().is_none(),
        DbError::Pool(_) | DbError::Config(_) => false,
    }
}

/// Under systemd: READY=1 once the LISTEN connection is up (or after `db_timeout`, when polling
/// has to cover for it), a STATUS= line every poll interval with the queue depth, and WATCHDOG=1
/// every half `WatchdogSec` while the claim loop is not stuck in a step (see [`crate::systemd`]).
async fn systemd_loop(
    shared: Arc<Shared>,
    controls: Controls,
    cfg: Config,
    stop: CancellationToken,
) {
    let notifier = controls.notifier;
    let stats = controls.stats.clone();
    let listening = async {
        while !stats.listener_connected() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let ready = if tokio::time::timeout(cfg.db_timeout, listening)
        .await
        .is_ok()
    {
        "ready: listening on channel outbox"
    } else {
        "ready: LISTEN not connected yet, polling"
    };
    notifier.ready(ready);
    let feed_every = notifier
        .watchdog()
        .map_or(Duration::from_secs(3600), |w| w / 2);
    let mut feed = tokio::time::interval(feed_every);
    let mut report = tokio::time::interval(cfg.poll_interval);
    report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stuck_after = cfg.db_timeout * 3;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = feed.tick(), if notifier.watchdog().is_some() => {
                match stats.loop_busy_for() {
                    Some(busy) if busy > stuck_after => tracing::error!(
                        busy_for = ?busy,
                        "the claim loop is stuck; not feeding the systemd watchdog"
                    ),
                    _ => notifier.watchdog_ping(),
                }
            }
            _ = report.tick() => {
                let prepared = shared
                    .db
                    .timed("status", async {
                        let c = shared.db.pool().get().await?;
                        let row = c
                            .query_one("SELECT count(*) FROM outbox.queue WHERE NOT leased", &[])
                            .await?;
                        Ok(row.get::<_, i64>(0))
                    })
                    .await;
                let r = shared.report.lock().unwrap().clone();
                let queue = prepared.map_or_else(|_| "database unreachable".to_string(), |n| format!("{n} prepared"));
                notifier.status(&format!(
                    "{queue}, {} in flight; delivered {}, retried {}, failed {}",
                    stats.in_flight(),
                    r.delivered,
                    r.retried,
                    r.failed
                ));
            }
        }
    }
}

/// Counts and logs the messages whose expired lease a claim or the reclaim at start handed back.
fn note_reclaims(n: usize) {
    if n > 0 {
        crate::metrics::lease_reclaims(n as u64);
        tracing::warn!(count = n, "reclaimed messages whose lease expired");
    }
}

/// Hands back the messages of failed claim calls (see [`may_have_committed`]); one call each,
/// kept for the next round when it fails. After a lease period they are the reclaim's business.
async fn release_orphans(shared: &Shared, orphans: &mut Vec<(Uuid, Instant)>, lease: Duration) {
    let mut keep = Vec::new();
    for (claim_id, since) in orphans.drain(..) {
        match shared.db.release_claim(&shared.worker, claim_id).await {
            Ok(n) => {
                if n > 0 {
                    tracing::warn!(%claim_id, count = n, "handed back the messages of a claim whose call failed (none was delivered)");
                }
                shared.report.lock().unwrap().orphaned += n as u64;
            }
            Err(e) if since.elapsed() < lease => {
                tracing::warn!(%claim_id, error = %e, "handing back a failed claim failed; will try again");
                keep.push((claim_id, since));
            }
            Err(e) => {
                tracing::error!(%claim_id, error = %e, "could not hand back a failed claim; its messages will be reclaimed when their lease expires");
            }
        }
    }
    *orphans = keep;
}

/// Extends the leases of in-flight messages every lease/3. A lease found lost is not extended
/// again: its outcome will be stale (the claim id fences it in `outbox.record_outcomes`).
async fn heartbeat(shared: Arc<Shared>, lease: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(lease / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let claims: Vec<ClaimKey> = shared
            .inflight
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, f)| !f.lost)
            .map(|(k, _)| *k)
            .collect();
        if claims.is_empty() {
            continue;
        }
        match shared
            .db
            .extend_leases(&shared.worker, &claims, lease)
            .await
        {
            Ok(held) if held.len() < claims.len() => {
                let held: HashSet<ClaimKey> = held.into_iter().collect();
                let mut inflight = shared.inflight.lock().unwrap();
                for key in claims.iter().filter(|k| !held.contains(k)) {
                    // Gone from inflight: its outcome was recorded meanwhile.
                    if let Some(f) = inflight.get_mut(key) {
                        f.lost = true;
                        // A finished one may just have been recorded; the recorder tells.
                        if !f.finished {
                            tracing::warn!(message_id = %key.0, claim_id = %key.1, "lease lost (reclaimed?); the delivery's outcome will be ignored");
                        }
                    }
                }
            }
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
            images: Vec::new(),
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
            profile: "test/misbehaving".into(),
            rate_limits: Vec::new().into(),
            fallback: None,
        })
    }

    #[tokio::test]
    async fn a_panicking_connector_is_a_failed_attempt() {
        let row = deliver_one(&msg(1), route("panic")).await.0;
        assert_eq!(row.outcome, "retry");
        assert_eq!(row.error_code.as_deref(), Some("connector-panic"));
        assert!(row.error_text.unwrap().contains("boom"));
        let last = deliver_one(&msg(2), route("panic")).await.0;
        assert_eq!(last.outcome, "failed", "max_attempts reached");
    }

    #[tokio::test]
    async fn a_delivery_past_the_profile_timeout_is_retried() {
        let row = deliver_one(&msg(1), route("hang")).await.0;
        assert_eq!(row.outcome, "retry");
        assert_eq!(row.error_code.as_deref(), Some("timeout"));
        let d = row.retry_delay_ms.unwrap();
        assert!((8000..=12000).contains(&d), "10 s ± 20 %: {d}");
        let ok = deliver_one(&msg(1), route("ok")).await.0;
        assert_eq!((ok.outcome, ok.error_code), ("done", None));
        let mut big = msg(1);
        big.content = Some("x".repeat(11));
        let row = deliver_one(&big, route("ok")).await.0;
        assert_eq!(row.outcome, "failed");
        assert_eq!(row.error_code.as_deref(), Some("content-too-large"));
    }
}
