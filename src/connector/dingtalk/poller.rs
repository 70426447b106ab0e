//! The daemon's DingTalk task, the one part of this connector that touches the database (through
//! the SECURITY DEFINER functions of sql/010, as the daemon's role):
//!
//! - **send results**: a work notification's `errcode 0` only means DingTalk accepted the task
//!   (providers.md §2.5, table 3.3 "silently dropped"), so each delivered one gets a row in
//!   `outbox.dingtalk_send_results` (a trigger on its `done` attempt writes it); this task calls
//!   `getsendresult` for due rows after each delay of the profile's `result_polls`, stores the
//!   `send_result` (`invalid_user_id_list`, `forbidden_list`, `failed_user_id_list`…) and marks
//!   the row final after the last one (or on a permanent error). Queryable with
//!   `api.dingtalk_send_results()`.
//! - **chats**: `api.dingtalk_create_chat` only records a request; this task calls `chat/create`
//!   for requested chats and records the `chatid` (or the error) — `api.dingtalk_chats()`.
//!
//! Invariants: rows are claimed with `FOR UPDATE SKIP LOCKED` and a five-minute lease, so several
//! daemons never poll the same row at once; a database or DingTalk error ends the round, never the
//! daemon; the connectors are built from the configuration once, at start (a reload does not
//! change them; token caches are shared with the delivering connectors).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::DingtalkConnector;
use crate::config::Config;
use crate::connector::{ConnectorConfig, DeliveryError};
use crate::db::{Db, DbError};
use crate::settings::ProfileContext;

/// Rows claimed per profile per round.
const BATCH: i32 = 50;

/// The DingTalk profiles to poll for.
pub struct Poller {
    profiles: Vec<(String, Arc<DingtalkConnector>)>,
    tick: Duration,
}

impl Poller {
    /// A poller for the configuration's `dingtalk` profiles; `None` when there is none.
    pub fn from_config(cfg: &Config) -> Option<Poller> {
        let (profiles, _) = cfg.load_profiles();
        let profiles: Vec<(String, Arc<DingtalkConnector>)> = profiles
            .map
            .iter()
            .filter_map(|((_, name), p)| match &p.connector {
                ConnectorConfig::Dingtalk(c) => {
                    let ctx = ProfileContext::new(p.source.clone(), name.clone());
                    match DingtalkConnector::new(&ctx, c) {
                        Ok(c) => Some((name.clone(), Arc::new(c))),
                        // build_router reports it too; the daemon does not start then.
                        Err(e) => {
                            tracing::warn!(profile = %name, error = %e, "dingtalk profile not polled");
                            None
                        }
                    }
                }
                _ => None,
            })
            .collect();
        if profiles.is_empty() {
            return None;
        }
        // Often enough for the shortest delay, at most every 30 s, at least every 50 ms.
        let tick = profiles
            .iter()
            .flat_map(|(_, c)| c.result_polls().iter().copied())
            .min()
            .unwrap_or(Duration::from_secs(30))
            .clamp(Duration::from_millis(50), Duration::from_secs(30));
        Some(Poller { profiles, tick })
    }

    /// Polls every `tick` until `stop`.
    pub async fn run(self, db: Db, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            for (profile, c) in &self.profiles {
                if let Err(e) = round(&db, profile, c).await {
                    tracing::warn!(profile = %profile, connector = "dingtalk", error = %e,
                        "dingtalk poll round failed; next round at the next tick");
                }
            }
        }
    }
}

fn interval(d: Duration) -> String {
    format!("{} milliseconds", d.as_millis())
}

/// One round for one profile: requested chats, then due send results.
pub async fn round(db: &Db, profile: &str, c: &DingtalkConnector) -> Result<(), DbError> {
    let chats = db
        .timed("dingtalk chats", async {
            let conn = db.pool().get().await?;
            Ok(conn
                .query(
                    "SELECT id, name, owner, userids FROM outbox.dingtalk_claim_chats($1, $2)",
                    &[&profile, &BATCH],
                )
                .await?)
        })
        .await?;
    for row in chats {
        let (id, name, owner, users): (Uuid, String, String, Vec<String>) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let r = c.create_chat(&name, &owner, &users).await;
        record_chat(db, id, &r).await?;
    }
    let polls = c.result_polls();
    let Some(first) = polls.first() else {
        return Ok(());
    };
    let due = db
        .timed("dingtalk send results", async {
            let conn = db.pool().get().await?;
            Ok(conn
                .query(
                    "SELECT message_id, task_id, polls \
                     FROM outbox.dingtalk_due_send_results($1, $2::text::interval, $3)",
                    &[&profile, &interval(*first), &BATCH],
                )
                .await?)
        })
        .await?;
    for row in due {
        let (message_id, task_id, done): (Uuid, String, i32) = (row.get(0), row.get(1), row.get(2));
        let r = c.send_result(&task_id).await;
        // The next call after the next delay; none after the last, or after a permanent error.
        let next = match &r {
            Err(e) if !e.is_retry() => None,
            _ => polls.get(done as usize + 1).map(|d| interval(*d)),
        };
        let (result, code, text) = match &r {
            Ok(v) => (Some(v.clone()), None, None),
            Err(e) => (
                None,
                Some(e.code().to_string()),
                Some(e.reason().to_string()),
            ),
        };
        db.timed("dingtalk record send result", async {
            let conn = db.pool().get().await?;
            conn.execute(
                "SELECT outbox.dingtalk_record_send_result($1, $2, $3, $4, $5::text::interval)",
                &[&message_id, &result, &code, &text, &next],
            )
            .await?;
            Ok(())
        })
        .await?;
    }
    Ok(())
}

/// Records the outcome of a `chat/create`.
pub async fn record_chat(
    db: &Db,
    id: Uuid,
    r: &Result<String, DeliveryError>,
) -> Result<(), DbError> {
    let (chatid, code, text) = match r {
        Ok(chatid) => (Some(chatid.as_str()), None, None),
        Err(e) => (None, Some(e.code()), Some(e.reason())),
    };
    db.timed("dingtalk record chat", async {
        let conn = db.pool().get().await?;
        conn.execute(
            "SELECT outbox.dingtalk_record_chat($1, $2, $3, $4)",
            &[&id, &chatid, &code, &text],
        )
        .await?;
        Ok(())
    })
    .await
}

/// `outboxd dingtalk chat-create`: records the request (claimed by this process), calls
/// `chat/create` with the profile's app and records the `chatid`; returns it.
pub async fn create_chat_now(
    cfg: &Config,
    profile: &str,
    name: &str,
    owner: &str,
    users: &[String],
) -> Result<String, String> {
    let (profiles, _) = cfg.load_profiles();
    let (c, source) = profiles
        .map
        .iter()
        .find_map(|((_, n), p)| match &p.connector {
            ConnectorConfig::Dingtalk(c) if n == profile => Some((c.clone(), p.source.clone())),
            _ => None,
        })
        .ok_or_else(|| format!("no dingtalk profile \"{profile}\" in the configuration"))?;
    let connector = DingtalkConnector::new(&ProfileContext::new(source, profile), &c)
        .map_err(|e| e.to_string())?;
    let db = Db::connect(cfg.database_url.expose(), 1, cfg.db_timeout, None)
        .map_err(|e| e.to_string())?;
    create_and_record(&db, &connector, profile, name, owner, users)
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// A `chat/create` made now by this process (the CLI, the HTTP server's `/v1/dd/chat/create`):
/// the request is recorded as claimed by us (so the poller leaves it alone), the call is made,
/// and its `chatid` or error recorded — `api.dingtalk_chats()` shows it like any other. The outer
/// error is the database's; the inner result is DingTalk's answer.
pub async fn create_and_record(
    db: &Db,
    connector: &DingtalkConnector,
    profile: &str,
    name: &str,
    owner: &str,
    users: &[String],
) -> Result<Result<String, DeliveryError>, DbError> {
    let id: Uuid = db
        .timed("dingtalk request chat", async {
            let conn = db.pool().get().await?;
            Ok(conn
                .query_one(
                    "SELECT api.dingtalk_create_chat($1, $2, $3, $4, true)",
                    &[&profile, &name, &owner, &users],
                )
                .await?
                .get(0))
        })
        .await?;
    let r = connector.create_chat(name, owner, users).await;
    record_chat(db, id, &r).await?;
    Ok(r)
}
