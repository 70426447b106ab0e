//! The daemon's own HTTP server (axum): health (`/heartbeat`, `/ping`), `/sys/status`,
//! Prometheus `/metrics`, the REST enqueue API under `/api/v1` (see [`api`]) and the DingTalk
//! message center's endpoints under `/v1/dd` (see [`dd`]).
//!
//! Off unless `http_listen` is configured. It never delivers anything itself and holds no state
//! of its own beyond short caches: status and enqueue go through SQL (`api.*`), so the database
//! stays the single source of truth. Invariants: every request is bounded in size
//! (`http_max_body_bytes`) and time (`REQUEST_TIMEOUT`); the server stops with the daemon
//! (graceful: requests in progress finish); a scrape or a status call reads the message counts
//! from a cache refreshed at most every `COUNTS_TTL`, so a busy dashboard does not scan the table.

pub mod api;
pub mod dd;
pub mod envelope;
pub mod openapi;
pub mod outcome;
pub mod read;
pub mod task_api;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Json;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::Secret;
use crate::db::Db;
use crate::dispatch::router::Router;
use crate::dispatch::stats::Stats;

/// Upper bound of one request, body included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long message counts are reused by `/metrics` and `/sys/status`.
pub const COUNTS_TTL: Duration = Duration::from_secs(5);

/// What the handlers share.
pub struct AppState {
    pub db: Db,
    pub stats: Arc<Stats>,
    pub worker: String,
    /// Bearer tokens accepted by `/api/v1` (none: every API call is refused with 401).
    pub tokens: Vec<Secret>,
    /// The daemon's connectors (swapped on reload), for the direct calls of `/v1/dd/*`; `None`:
    /// those endpoints answer "unknown profile".
    pub router: Option<Arc<ArcSwap<Router>>>,
    counts: tokio::sync::Mutex<Option<(Instant, Result<crate::ops::Status, String>)>>,
}

impl AppState {
    pub fn new(db: Db, stats: Arc<Stats>, worker: String, tokens: Vec<Secret>) -> Self {
        AppState {
            db,
            stats,
            worker,
            tokens,
            router: None,
            counts: tokio::sync::Mutex::new(None),
        }
    }

    /// The state with the daemon's connectors.
    pub fn with_router(mut self, router: Arc<ArcSwap<Router>>) -> Self {
        self.router = Some(router);
        self
    }

    /// Counts by state and agent and the oldest prepared age, at most `COUNTS_TTL` old. Callers
    /// arriving while a refresh runs wait for it instead of starting their own.
    async fn counts(&self) -> Result<crate::ops::Status, String> {
        let mut cache = self.counts.lock().await;
        if let Some((at, v)) = cache.as_ref() {
            if at.elapsed() < COUNTS_TTL {
                return v.clone();
            }
        }
        let fresh = self
            .db
            .timed("status", async {
                let c = self.db.pool().get().await?;
                crate::ops::status(&c).await
            })
            .await
            .map_err(|e| e.to_string());
        if let Ok(s) = &fresh {
            crate::metrics::message_counts(&s.counts, s.oldest_prepared_secs);
        }
        *cache = Some((Instant::now(), fresh.clone()));
        fresh
    }
}

/// The routes, without a listener (tests drive it directly too).
pub fn router(state: Arc<AppState>, max_body_bytes: usize) -> axum::Router {
    axum::Router::new()
        .route("/heartbeat", get(|| async { "OK" }))
        .route("/ping", get(|| async { "PONG" }))
        .route("/sys/status", get(status))
        .route("/metrics", get(metrics))
        .merge(api::routes())
        .merge(task_api::routes())
        .merge(read::routes())
        .merge(dd::routes())
        .fallback(envelope::not_found)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::middleware::from_fn(bounded_in_time))
        .with_state(state)
}

/// Serves on `listener` until `stop` is cancelled, then lets requests in progress finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    max_body_bytes: usize,
    stop: CancellationToken,
) {
    let addr = listener.local_addr().ok();
    tracing::info!(address = ?addr, "HTTP server listening");
    let app = router(state, max_body_bytes);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "HTTP server failed");
    }
}

/// Binds `addr` (port 0 picks a free one).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

async fn bounded_in_time(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(r) => r,
        Err(_) => envelope::Failure::new(envelope::ErrorKind::Timeout, "the request took too long")
            .into_response(),
    }
}

async fn status(State(st): State<Arc<AppState>>) -> Response {
    let counts = st.counts().await;
    let (reachable, db_error, queue, oldest) = match &counts {
        Ok(s) => (
            true,
            None,
            s.counts
                .iter()
                .map(|(state, agent, n)| json!({"state": state, "agent": agent, "count": n}))
                .collect::<Vec<_>>(),
            s.oldest_prepared_secs,
        ),
        Err(e) => (false, Some(e.clone()), Vec::new(), None),
    };
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "worker": st.worker,
        "started_at": st.stats.started_at(),
        "uptime_seconds": st.stats.uptime_secs(),
        "database": {"reachable": reachable, "error": db_error},
        "listener_connected": st.stats.listener_connected(),
        "in_flight": st.stats.in_flight(),
        "queue": queue,
        "oldest_prepared_seconds": oldest,
        "profiles": st.stats.profiles(),
    }))
    .into_response()
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    // Refresh the SQL-backed gauges (cached); a database outage leaves the last figures.
    let _ = st.counts().await;
    crate::metrics::in_flight(st.stats.in_flight());
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::handle().render(),
    )
        .into_response()
}
