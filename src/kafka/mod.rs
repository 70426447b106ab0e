//! The Kafka trigger ("producer → Kafka → outboxd → outbox"): consumes enqueue requests
//! (`send_topic`, the REST send body as JSON) and task-run requests (`task_topic`) and enqueues
//! them through `api.send_message` / `api.run_task`, like the REST API does.
//!
//! Shape: one supervisor ([`run`]) looks the topics' partitions up at start and every
//! `metadata_interval`, and starts one task per partition; each partition task fetches a batch
//! (rskafka), applies it in one PostgreSQL transaction ([`batch`]) and moves on from the offset
//! that transaction committed. Offsets live in PostgreSQL (`outbox.kafka_offsets`), not in a Kafka
//! consumer group: they move in the same transaction as the messages, so every record is enqueued
//! exactly once — a redelivered or refetched record is skipped by offset. Refused records (poison)
//! go to `outbox.kafka_dead_letters` with the reason, and to `dead_letter_topic` when configured
//! (best effort, after the commit: the table is the record).
//!
//! Invariants: a batch's transaction is never cancelled half-way by shutdown (only fetches and
//! waits are); a failed fetch or transaction backs off and refetches from the committed offset;
//! the daemon keeps running whatever the broker does.

pub mod batch;
pub mod config;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rskafka::client::error::{Error as ClientError, ProtocolError};
use rskafka::client::partition::{Compression, OffsetAt, PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use rskafka::record::{Record, RecordAndOffset};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use batch::{Faults, Kind};
pub use config::{KafkaConfig, StartAt};

use crate::db::{Db, DbError};

/// Connections of the trigger's own pool: partitions share them, one per batch in progress.
pub const POOL_SIZE: usize = 4;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// A failure of one partition's consumer (it backs off and starts again).
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("kafka: {0}")]
    Client(#[from] ClientError),
    #[error("{0}")]
    Db(#[from] DbError),
    /// The fault hook ([`Faults`]) abandoned a batch before COMMIT.
    #[error("the batch transaction was abandoned before COMMIT (fault injection)")]
    Injected,
}

/// `OUTBOXD_KAFKA_BROKERS` (comma-separated) overrides `kafka.brokers`.
pub fn apply_env(main: &mut toml::Table, env: &impl Fn(&str) -> Option<String>) {
    let Some(v) = env("OUTBOXD_KAFKA_BROKERS") else {
        return;
    };
    let brokers: Vec<toml::Value> = v
        .split(',')
        .map(str::trim)
        .filter(|b| !b.is_empty())
        .map(|b| toml::Value::String(b.to_string()))
        .collect();
    let table = main
        .entry("kafka")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(t) = table {
        t.insert("brokers".into(), toml::Value::Array(brokers));
    }
}

/// What every partition task shares.
struct Ctx {
    cfg: KafkaConfig,
    client: Client,
    db: Db,
    faults: Faults,
}

/// Runs the trigger until `stop` is cancelled: connects (retrying), starts a task per partition
/// of the configured topics, and checks for new partitions every `metadata_interval`.
pub async fn run(cfg: KafkaConfig, db: Db, faults: Faults, stop: CancellationToken) {
    let mut backoff = BACKOFF_MIN;
    let client = loop {
        let built = ClientBuilder::new(cfg.brokers.clone())
            .client_id("outboxd")
            .backoff_config(rskafka::BackoffConfig {
                init_backoff: BACKOFF_MIN,
                max_backoff: Duration::from_secs(5),
                base: 2.0,
                // Without a deadline rskafka retries a dead broker forever, inside one call.
                deadline: Some(Duration::from_secs(30)),
            })
            .build();
        tokio::select! {
            _ = stop.cancelled() => return,
            r = built => match r {
                Ok(c) => break c,
                Err(e) => {
                    tracing::warn!(error = %e, brokers = ?cfg.brokers, "kafka: cannot connect; retrying");
                    if !pause(&stop, &mut backoff).await {
                        return;
                    }
                }
            }
        }
    };
    tracing::info!(brokers = ?cfg.brokers, group = %cfg.group, "kafka trigger connected");
    let ctx = Arc::new(Ctx {
        cfg,
        client,
        db,
        faults,
    });
    let mut topics: Vec<(String, Kind)> = Vec::new();
    if let Some(t) = &ctx.cfg.send_topic {
        topics.push((t.clone(), Kind::Send));
    }
    if let Some(t) = &ctx.cfg.task_topic {
        topics.push((t.clone(), Kind::Task));
    }
    let mut started: HashSet<(String, i32)> = HashSet::new();
    let mut missing_reported: HashSet<String> = HashSet::new();
    let mut partitions = JoinSet::new();
    let mut tick = tokio::time::interval(ctx.cfg.metadata_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let listed = tokio::select! {
            _ = stop.cancelled() => break,
            r = ctx.client.list_topics() => r,
        };
        let listed = match listed {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "kafka: cannot list topics; trying again later");
                continue;
            }
        };
        for (topic, kind) in &topics {
            let Some(found) = listed.iter().find(|t| &t.name == topic) else {
                if missing_reported.insert(topic.clone()) {
                    tracing::warn!(topic = %topic, "kafka: topic not found; waiting for it");
                }
                continue;
            };
            for &p in &found.partitions {
                if started.insert((topic.clone(), p)) {
                    tracing::info!(topic = %topic, partition = p, "kafka: consuming partition");
                    partitions.spawn(partition_loop(
                        ctx.clone(),
                        topic.clone(),
                        *kind,
                        p,
                        stop.clone(),
                    ));
                }
            }
        }
    }
    while partitions.join_next().await.is_some() {}
    tracing::info!("kafka trigger stopped");
}

/// Waits `backoff` (doubling it for next time, up to a limit) unless `stop` comes first; false
/// when stopped.
async fn pause(stop: &CancellationToken, backoff: &mut Duration) -> bool {
    let wait = *backoff;
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(wait) => true,
    }
}

/// Consumes one partition until `stop`, starting again (from the committed offset) after every
/// failure.
async fn partition_loop(
    ctx: Arc<Ctx>,
    topic: String,
    kind: Kind,
    partition: i32,
    stop: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        match consume(&ctx, &topic, kind, partition, &stop, &mut backoff).await {
            Ok(()) => return,
            Err(e) => {
                let stage = if matches!(e, KafkaError::Client(_)) {
                    "fetch"
                } else {
                    "database"
                };
                crate::metrics::kafka_error(&topic, stage);
                tracing::warn!(topic = %topic, partition, error = %e, "kafka: partition consumer failed; starting again from the committed offset");
                if !pause(&stop, &mut backoff).await {
                    return;
                }
            }
        }
    }
}

async fn consume(
    ctx: &Ctx,
    topic: &str,
    kind: Kind,
    partition: i32,
    stop: &CancellationToken,
    backoff: &mut Duration,
) -> Result<(), KafkaError> {
    let cfg = &ctx.cfg;
    let pc = tokio::select! {
        _ = stop.cancelled() => return Ok(()),
        r = ctx.client.partition_client(topic, partition, UnknownTopicHandling::Retry) => r?,
    };
    let committed = ctx
        .db
        .timed("kafka position", async {
            let c = ctx.db.pool().get().await?;
            Ok(c.query_one(
                "SELECT outbox.kafka_position($1, $2, $3)",
                &[&cfg.group, &topic, &partition],
            )
            .await?
            .get::<_, Option<i64>>(0))
        })
        .await?;
    let mut position = match committed {
        Some(n) => n,
        None => {
            let at = match cfg.start {
                StartAt::Earliest => OffsetAt::Earliest,
                StartAt::Latest => OffsetAt::Latest,
            };
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                r = pc.get_offset(at) => r?,
            }
        }
    };
    let src = batch::Source {
        group: &cfg.group,
        topic,
        partition,
        kind,
    };
    let wait_ms = cfg.fetch_wait.as_millis().min(i32::MAX as u128) as i32;
    // Fetched records not yet applied (a fetch may return more than `batch_records`).
    let mut buffered: VecDeque<RecordAndOffset> = VecDeque::new();
    let mut high_watermark = position;
    // tansu 0.6 answers a fetch from an offset inside a record batch with no records (Kafka
    // returns the whole batch and the client drops the records before the offset): when a fetch
    // comes back empty below the high watermark, the next one starts `lookback` records earlier
    // (doubling, down to `floor`: the earliest kept offset, or past records already seen), and
    // the records before `position` are dropped here.
    let mut lookback: i64 = 0;
    let mut floor: i64 = 0;
    let mut searched: Option<i64> = None;
    loop {
        if buffered.is_empty() {
            let started = Instant::now();
            let from = (position - lookback).max(floor).min(position);
            let fetched = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                r = pc.fetch_records(from, 1..cfg.fetch_max_bytes, wait_ms) => r,
            };
            let (mut records, hw) = match fetched {
                Ok(f) => f,
                Err(ClientError::ServerError {
                    protocol_error: ProtocolError::OffsetOutOfRange,
                    ..
                }) => {
                    let moved = async {
                        if from < position {
                            floor = pc.get_offset(OffsetAt::Earliest).await?;
                        } else {
                            position = out_of_range(&pc, topic, partition, position).await?;
                            floor = 0;
                        }
                        Ok::<_, KafkaError>(())
                    };
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        r = moved => r?,
                    }
                    lookback = 0;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            high_watermark = hw;
            let below = records.iter().map(|r| r.offset).max();
            records.retain(|r| r.offset >= position);
            if records.is_empty() {
                if hw > position && searched != Some(position) {
                    if let Some(m) = below {
                        // Only records before `position` came back: the batch holding it starts
                        // after them.
                        floor = floor.max(m + 1);
                        lookback = (lookback * 2).max(1);
                        continue;
                    }
                    if from > floor {
                        lookback = (lookback * 2).max(1);
                        continue;
                    }
                }
                searched = Some(position);
                lookback = 0;
                crate::metrics::kafka_lag(topic, partition, hw - position);
                // A broker that answers an empty fetch at once must not make this a busy loop.
                let rest = cfg.fetch_wait.saturating_sub(started.elapsed());
                if rest > Duration::from_millis(5) {
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(rest) => {}
                    }
                }
                continue;
            }
            lookback = 0;
            records.sort_by_key(|r| r.offset);
            buffered.extend(records);
        }
        let n = buffered.len().min(cfg.batch_records);
        let records: Vec<RecordAndOffset> = buffered.drain(..n).collect();
        let Some(applied) = batch::apply(&ctx.db, &src, position, &records, &ctx.faults).await?
        else {
            return Err(KafkaError::Injected);
        };
        *backoff = BACKOFF_MIN;
        crate::metrics::kafka_records(topic, "enqueued", applied.enqueued);
        crate::metrics::kafka_records(topic, "run", applied.runs);
        crate::metrics::kafka_records(topic, "skipped", applied.skipped);
        crate::metrics::kafka_records(topic, "dead_letter", applied.dead.len() as u64);
        crate::metrics::kafka_lag(topic, partition, high_watermark - applied.next);
        tracing::debug!(topic = %topic, partition, from = position, next = applied.next,
            enqueued = applied.enqueued, runs = applied.runs, dead = applied.dead.len(), "kafka batch committed");
        for d in &applied.dead {
            tracing::warn!(topic = %topic, partition, offset = d.offset, code = d.code, reason = %d.reason, "kafka: record refused (dead letter)");
        }
        if !applied.dead.is_empty() {
            if let Some(dlq) = &cfg.dead_letter_topic {
                // Not waited for on shutdown: the dead letters are in the table already.
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = produce_dead_letters(ctx, dlq, topic, partition, &applied.dead) => {}
                }
            }
        }
        position = applied.next;
        buffered.retain(|r| r.offset >= position);
    }
}

/// The fetch offset is outside what the broker keeps: records were deleted by retention before
/// they were consumed (start at the earliest kept, and say so), or the offset is past the end.
async fn out_of_range(
    pc: &PartitionClient,
    topic: &str,
    partition: i32,
    position: i64,
) -> Result<i64, KafkaError> {
    let earliest = pc.get_offset(OffsetAt::Earliest).await?;
    let latest = pc.get_offset(OffsetAt::Latest).await?;
    if position < earliest {
        tracing::error!(topic = %topic, partition, position, earliest,
            "kafka: records were deleted by the broker before they were consumed; continuing at the earliest kept");
        Ok(earliest)
    } else {
        tracing::warn!(topic = %topic, partition, position, latest,
            "kafka: committed offset is past the partition's end (topic recreated?); waiting at the end");
        Ok(latest.min(position))
    }
}

/// Produces refused records to the dead-letter topic (partition 0), with what was wrong in
/// headers. Best effort: a failure is logged and counted; the table keeps every dead letter.
async fn produce_dead_letters(
    ctx: &Ctx,
    dlq: &str,
    topic: &str,
    partition: i32,
    dead: &[batch::DeadLetter],
) {
    let records = dead
        .iter()
        .map(|d| Record {
            key: d.key.clone(),
            value: d.value.clone(),
            headers: BTreeMap::from([
                ("outboxd-reason".to_string(), d.reason.clone().into_bytes()),
                ("outboxd-code".to_string(), d.code.to_string().into_bytes()),
                ("outboxd-topic".to_string(), topic.as_bytes().to_vec()),
                (
                    "outboxd-partition".to_string(),
                    partition.to_string().into_bytes(),
                ),
                (
                    "outboxd-offset".to_string(),
                    d.offset.to_string().into_bytes(),
                ),
            ]),
            timestamp: chrono::Utc::now(),
        })
        .collect();
    let result = async {
        let pc = ctx
            .client
            .partition_client(dlq, 0, UnknownTopicHandling::Error)
            .await?;
        pc.produce(records, Compression::NoCompression).await
    }
    .await;
    if let Err(e) = result {
        crate::metrics::kafka_error(topic, "produce");
        tracing::warn!(topic = %dlq, error = %e, "kafka: cannot produce to the dead-letter topic; the dead letters are in outbox.kafka_dead_letters");
    }
}
