//! Retention: clears the content of finished messages after `content_after` and deletes them (with
//! their replies) after `delete_after`, and drops the weeks of the attempt and history logs older
//! than `delete_after` (sql/022), in batches of `batch_size` messages, each
//! batch one short transaction (`outbox.clear_content`, `outbox.purge_batch` of sql/005). The
//! content step clears everything that repeats what a message said: its content, its template
//! variables (and so its rendered picture, sql/014) and the read-link body a task stored for it
//! (sql/017).
//!
//! Invariants: only one daemon purges at a time (each batch takes a transaction-level advisory
//! lock; a daemon that finds it taken stops this round and tries again at the next); no batch holds
//! locks for longer than one statement; a database error ends the round, never the daemon.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Retention;
use crate::db::{Db, DbError};

/// Which half of retention a batch belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Content,
    Delete,
}

/// What one round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Purged {
    pub contents_cleared: u64,
    pub messages_deleted: u64,
    /// Weekly partitions of the attempt and history logs dropped (sql/022).
    pub log_partitions_dropped: u64,
    /// Another daemon held the retention lock.
    pub busy: bool,
}

/// What a round would touch now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Preview {
    /// Messages whose content, template variables or task body the content step would clear.
    pub content_rows: i64,
    pub delete_rows: i64,
    /// Of those, the task messages whose read-link body would be cleared (sql/017).
    pub task_body_rows: i64,
}

fn interval(d: Duration) -> String {
    format!("{} milliseconds", d.as_millis())
}

/// Runs retention once, batch after batch until nothing is left or `stop` is cancelled;
/// `progress` hears about every batch (phase, rows in it, rows so far in that phase).
pub async fn run_once(
    db: &Db,
    r: &Retention,
    stop: &CancellationToken,
    mut progress: impl FnMut(Phase, u64, u64),
) -> Result<Purged, DbError> {
    let mut out = Purged::default();
    let phases = [
        (
            Phase::Content,
            r.content_after,
            "SELECT outbox.clear_content($1::text::interval, $2)",
        ),
        (
            Phase::Delete,
            r.delete_after,
            "SELECT outbox.purge_batch($1::text::interval, $2)",
        ),
    ];
    for (phase, age, sql) in phases {
        let Some(age) = age else { continue };
        let age = interval(age);
        let mut total = 0u64;
        loop {
            if stop.is_cancelled() {
                return Ok(out);
            }
            let n: i32 = db
                .timed("retention", async {
                    let c = db.pool().get().await?;
                    Ok(c.query_one(sql, &[&age, &(r.batch_size as i32)])
                        .await?
                        .get(0))
                })
                .await?;
            if n < 0 {
                out.busy = true;
                return Ok(out);
            }
            total += n as u64;
            match phase {
                Phase::Content => out.contents_cleared = total,
                Phase::Delete => out.messages_deleted = total,
            }
            progress(phase, n as u64, total);
            if (n as usize) < r.batch_size {
                break;
            }
            // Let deliveries have the database between batches.
            tokio::task::yield_now().await;
        }
    }
    // The logs (sql/022): the weeks ahead are made, the weeks past `delete_after` dropped.
    let age = r.delete_after.map(interval);
    out.log_partitions_dropped = db
        .timed("retention", async {
            let c = db.pool().get().await?;
            c.execute("SELECT outbox.ensure_log_partitions(4)", &[])
                .await?;
            let dropped: i32 = match &age {
                Some(age) => c
                    .query_one(
                        "SELECT outbox.drop_log_partitions($1::text::interval)",
                        &[age],
                    )
                    .await?
                    .get(0),
                None => 0,
            };
            Ok(dropped as u64)
        })
        .await?;
    Ok(out)
}

/// What [`run_once`] would touch now (`outboxd purge --dry-run`).
pub async fn preview(db: &Db, r: &Retention) -> Result<Preview, DbError> {
    let content = r.content_after.map(interval);
    let delete = r.delete_after.map(interval);
    db.timed("retention preview", async {
        let c = db.pool().get().await?;
        let row = c
            .query_one(
                "SELECT content_rows, delete_rows, task_body_rows \
                 FROM outbox.retention_preview($1::text::interval, $2::text::interval)",
                &[&content, &delete],
            )
            .await?;
        Ok(Preview {
            content_rows: row.get(0),
            delete_rows: row.get(1),
            task_body_rows: row.get(2),
        })
    })
    .await
}

/// The daemon's retention task: a round every `every` (the first one `every` after start).
pub async fn run(db: Db, r: Retention, stop: CancellationToken) {
    let mut tick = tokio::time::interval(r.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match run_once(&db, &r, &stop, |_, _, _| {}).await {
            Ok(p) if p.busy => tracing::debug!("retention: another daemon is purging"),
            Ok(p) if p.contents_cleared + p.messages_deleted > 0 => tracing::info!(
                contents_cleared = p.contents_cleared,
                messages_deleted = p.messages_deleted,
                "retention round done"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "retention round failed; next round at the next tick")
            }
        }
    }
}
