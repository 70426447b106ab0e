//! The LISTEN connection: one dedicated connection (not from the pool) that LISTENs on channel
//! `outbox` — and `outbox_tasks` when the task scheduler runs (sql/021) — and turns every
//! notification into a wake-up of the loop behind its channel (the claim loop, the scheduler).
//!
//! Invariants: a notification is only a wake-up (its payload is not trusted or needed); after every
//! (re)connect every loop is woken, since notifications sent while disconnected are lost; the
//! connection is re-established with exponential backoff (100 ms … 30 s).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, Notify};
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use crate::db::DbError;

/// The channel of the messages' wake-ups (`NOTIFY outbox`, sql/001).
pub const CHANNEL: &str = "outbox";

/// A channel to LISTEN on, and what its notifications wake.
pub type Channel = (&'static str, Arc<Notify>);

/// Keeps a LISTEN connection open on `channels` until `stop` is cancelled.
pub async fn run(
    url: String,
    connect_timeout: Duration,
    channels: Vec<Channel>,
    stats: Arc<crate::dispatch::stats::Stats>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let outcome = tokio::select! {
            _ = stop.cancelled() => return,
            r = listen_once(&url, connect_timeout, &channels, &stats, &mut backoff) => r,
        };
        stats.set_listener_connected(false);
        if let Err(e) = outcome {
            tracing::warn!(error = %e, retry_in = ?backoff, "LISTEN connection lost; polling covers the gap");
        }
        // Whatever happened, every loop should look again.
        wake_all(&channels);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

fn wake_all(channels: &[Channel]) {
    for (_, wake) in channels {
        wake.notify_one();
    }
}

async fn listen_once(
    url: &str,
    connect_timeout: Duration,
    channels: &[Channel],
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
    let names: Vec<&'static str> = channels.iter().map(|(name, _)| *name).collect();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let known = names.clone();
    let pump = tokio::spawn(async move {
        let mut stream = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = stream.next().await {
            match m {
                Ok(AsyncMessage::Notification(n)) => {
                    let Some(i) = known.iter().position(|name| *name == n.channel()) else {
                        continue;
                    };
                    if tx.send(Ok(i)).is_err() {
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
    // One statement per channel, `outbox` last: pg_stat_activity shows a session's last
    // statement, and `LISTEN outbox` is what operators (and the tests) look for. The names are
    // this crate's constants, not input: nothing to quote.
    let (main, others): (Vec<&str>, Vec<&str>) = names.iter().partition(|n| **n == CHANNEL);
    for name in others.into_iter().chain(main) {
        tokio::time::timeout(
            connect_timeout,
            client.batch_execute(&format!("LISTEN {name}")),
        )
        .await
        .unwrap_or_else(|_| Ok(()))?;
        // bench/run and bench/chaos wait for "listening on channel outbox".
        tracing::info!("listening on channel {name}");
    }
    stats.set_listener_connected(true);
    *backoff = Duration::from_millis(100);
    wake_all(channels);
    loop {
        match rx.recv().await {
            Some(Ok(i)) => channels[i].1.notify_one(),
            Some(Err(e)) => return Err(e.into()),
            None => {
                // The connection ended without an error: report it through a query on the client.
                return Ok(client.batch_execute("SELECT 1").await?);
            }
        }
    }
}
