//! The LISTEN connection: one dedicated connection (not from the pool) that LISTENs on channel
//! `outbox` and turns every notification into a wake-up of the claim loop.
//!
//! Invariants: a notification is only a wake-up (its payload is not trusted or needed); after every
//! (re)connect the claim loop is woken, since notifications sent while disconnected are lost; the
//! connection is re-established with exponential backoff (100 ms … 30 s).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, Notify};
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use crate::db::DbError;

/// Keeps a LISTEN connection open until `stop` is cancelled.
pub async fn run(
    url: String,
    connect_timeout: Duration,
    wake: Arc<Notify>,
    stats: Arc<crate::dispatch::stats::Stats>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let outcome = tokio::select! {
            _ = stop.cancelled() => return,
            r = listen_once(&url, connect_timeout, &wake, &stats, &mut backoff) => r,
        };
        stats.set_listener_connected(false);
        if let Err(e) = outcome {
            tracing::warn!(error = %e, retry_in = ?backoff, "LISTEN connection lost; polling covers the gap");
        }
        // Whatever happened, the claim loop should look again.
        wake.notify_one();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

async fn listen_once(
    url: &str,
    connect_timeout: Duration,
    wake: &Notify,
    stats: &crate::dispatch::stats::Stats,
    backoff: &mut Duration,
) -> Result<(), DbError> {
    let mut target = crate::db::tls::target(url)?;
    let cfg = &mut target.config;
    cfg.connect_timeout(connect_timeout);
    cfg.keepalives(true);
    cfg.keepalives_idle(Duration::from_secs(30));
    cfg.application_name("outboxd-listen");
    let (client, mut conn) = target.connect().await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let pump = tokio::spawn(async move {
        let mut stream = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = stream.next().await {
            match m {
                Ok(AsyncMessage::Notification(_)) => {
                    if tx.send(Ok(())).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
    });
    let _abort = tokio_util::task::AbortOnDropHandle::new(pump);
    tokio::time::timeout(connect_timeout, client.batch_execute("LISTEN outbox"))
        .await
        .unwrap_or_else(|_| Ok(()))?;
    tracing::info!("listening on channel outbox");
    stats.set_listener_connected(true);
    *backoff = Duration::from_millis(100);
    wake.notify_one();
    loop {
        match rx.recv().await {
            Some(Ok(())) => wake.notify_one(),
            Some(Err(e)) => return Err(e.into()),
            None => {
                // The connection ended without an error: report it through a query on the client.
                return Ok(client.batch_execute("SELECT 1").await?);
            }
        }
    }
}
