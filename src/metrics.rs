//! Prometheus metrics: one process-wide recorder (the `metrics` crate's facade with
//! `metrics-exporter-prometheus` behind it), rendered by the HTTP server's `/metrics`.
//!
//! Every name is prefixed `outboxd_` and declared here, once, with its help text. Latencies are
//! histograms with fixed buckets (aggregatable across instances, unlike summaries). The recorder
//! is installed on first use; with no HTTP server configured nothing ever renders it, and
//! recording costs an atomic add per event.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const DELIVERIES: &str = "outboxd_deliveries_total";
pub const FAILURES: &str = "outboxd_delivery_failures_total";
pub const ATTEMPT_SECONDS: &str = "outboxd_attempt_duration_seconds";
pub const COMMIT_TO_DELIVERED_SECONDS: &str = "outboxd_commit_to_delivered_seconds";
pub const TOKEN_REFRESHES: &str = "outboxd_token_refreshes_total";
pub const LEASE_RECLAIMS: &str = "outboxd_lease_reclaims_total";
pub const RATE_LIMIT_DEFERRALS: &str = "outboxd_rate_limit_deferrals_total";
pub const RECORDER_BATCH: &str = "outboxd_recorder_batch_size";
pub const MESSAGES: &str = "outboxd_messages";
pub const IN_FLIGHT: &str = "outboxd_deliveries_in_flight";
pub const OLDEST_PREPARED_SECONDS: &str = "outboxd_oldest_prepared_seconds";
pub const KAFKA_RECORDS: &str = "outboxd_kafka_records_total";
pub const KAFKA_ERRORS: &str = "outboxd_kafka_errors_total";
pub const KAFKA_LAG: &str = "outboxd_kafka_lag";

/// Seconds: from 1 ms to 5 min.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
/// Commit → delivered also covers retries and scheduled sends: up to a day.
const END_TO_END_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0,
    86400.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide recorder's handle, installing the recorder on first call.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(ATTEMPT_SECONDS.into()), LATENCY_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(COMMIT_TO_DELIVERED_SECONDS.into()),
                    END_TO_END_BUCKETS,
                )
            })
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(RECORDER_BATCH.into()), BATCH_BUCKETS)
            })
            .expect("bucket lists are not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may be installed already (an embedding program's): then ours only
        // renders what is recorded through it, which is nothing — say so once.
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
        }
        describe();
        handle
    })
}

fn describe() {
    describe_counter!(
        DELIVERIES,
        "Delivery attempts by profile, connector and outcome (done, retry, failed)"
    );
    describe_counter!(
        FAILURES,
        "Failed delivery attempts by profile, connector and stable error code"
    );
    describe_histogram!(
        ATTEMPT_SECONDS,
        metrics::Unit::Seconds,
        "Duration of one delivery attempt"
    );
    describe_histogram!(
        COMMIT_TO_DELIVERED_SECONDS,
        metrics::Unit::Seconds,
        "From the message's creation to its successful delivery"
    );
    describe_counter!(
        TOKEN_REFRESHES,
        "Access tokens fetched from a provider, by connector"
    );
    describe_counter!(
        LEASE_RECLAIMS,
        "Messages whose lease expired and that were reclaimed"
    );
    describe_counter!(
        RATE_LIMIT_DEFERRALS,
        "Deliveries deferred by a rate limit, without an attempt"
    );
    describe_histogram!(
        RECORDER_BATCH,
        "Outcomes written per outbox.record_outcomes call"
    );
    describe_gauge!(
        MESSAGES,
        "Outbox messages by state and agent (from SQL, cached for a few seconds)"
    );
    describe_gauge!(
        IN_FLIGHT,
        "Deliveries claimed by this daemon and not yet recorded"
    );
    describe_gauge!(
        OLDEST_PREPARED_SECONDS,
        "Age of the oldest prepared message"
    );
    describe_counter!(
        KAFKA_RECORDS,
        "Kafka trigger: records handled, by topic and outcome (enqueued, run, dead_letter, skipped)"
    );
    describe_counter!(
        KAFKA_ERRORS,
        "Kafka trigger: failed fetches and batch transactions (retried), by topic and stage"
    );
    describe_gauge!(
        KAFKA_LAG,
        "Kafka trigger: records between the committed offset and the partition's high watermark"
    );
}

/// Kafka records of `topic` that ended as `outcome`.
pub fn kafka_records(topic: &str, outcome: &'static str, n: u64) {
    let _ = handle();
    counter!(KAFKA_RECORDS, "topic" => topic.to_string(), "outcome" => outcome).increment(n);
}

/// A Kafka fetch or batch transaction that failed at `stage` (`fetch`, `database`, `produce`).
pub fn kafka_error(topic: &str, stage: &'static str) {
    let _ = handle();
    counter!(KAFKA_ERRORS, "topic" => topic.to_string(), "stage" => stage).increment(1);
}

/// The lag of one partition after a batch.
pub fn kafka_lag(topic: &str, partition: i32, lag: i64) {
    let _ = handle();
    gauge!(KAFKA_LAG, "topic" => topic.to_string(), "partition" => partition.to_string())
        .set(lag.max(0) as f64);
}

/// One recorded attempt.
pub fn attempt(
    profile: &str,
    connector: &str,
    outcome: &'static str,
    code: Option<&str>,
    took: Duration,
) {
    let kind = kind_of(connector);
    let h = handles(profile, kind);
    let slot = match outcome {
        "done" => &h.done,
        "retry" => &h.retry,
        _ => &h.failed,
    };
    // Registered on the first attempt with this outcome, as before: no zero series for outcomes
    // that never happened.
    slot.get_or_init(|| {
        counter!(DELIVERIES, "profile" => profile.to_string(), "connector" => kind.to_string(), "outcome" => outcome)
    })
    .increment(1);
    if let Some(code) = code {
        let _ = handle();
        counter!(FAILURES, "profile" => profile.to_string(), "connector" => kind.to_string(), "code" => code.to_string())
            .increment(1);
    }
    h.attempt_seconds.record(took.as_secs_f64());
}

/// A delivery `age` after the message was created, through `profile`'s `connector`.
pub fn delivered_after(profile: &str, connector: &str, age: Duration) {
    let kind = kind_of(connector);
    handles(profile, kind)
        .commit_to_delivered
        .get_or_init(|| histogram!(COMMIT_TO_DELIVERED_SECONDS, "connector" => kind.to_string()))
        .record(age.as_secs_f64());
}

/// The metrics every attempt of one (profile, connector kind) pair updates. Registering a
/// labelled metric allocates and hashes its labels, which cost more than the rest of a delivery's
/// bookkeeping; the handles are looked up once per pair instead (a handful per daemon).
struct AttemptHandles {
    done: OnceLock<Counter>,
    retry: OnceLock<Counter>,
    failed: OnceLock<Counter>,
    attempt_seconds: Histogram,
    commit_to_delivered: OnceLock<Histogram>,
}

/// By profile, then connector kind.
type HandleMap = HashMap<String, HashMap<String, Arc<AttemptHandles>>>;

fn handles(profile: &str, kind: &str) -> Arc<AttemptHandles> {
    static HANDLES: OnceLock<RwLock<HandleMap>> = OnceLock::new();
    let map = HANDLES.get_or_init(Default::default);
    if let Some(h) = map.read().unwrap().get(profile).and_then(|m| m.get(kind)) {
        return h.clone();
    }
    let _ = handle();
    let h = Arc::new(AttemptHandles {
        done: OnceLock::new(),
        retry: OnceLock::new(),
        failed: OnceLock::new(),
        attempt_seconds: histogram!(ATTEMPT_SECONDS, "connector" => kind.to_string()),
        commit_to_delivered: OnceLock::new(),
    });
    map.write()
        .unwrap()
        .entry(profile.to_string())
        .or_default()
        .entry(kind.to_string())
        .or_insert(h)
        .clone()
}

pub fn recorder_batch(n: usize) {
    histogram!(RECORDER_BATCH).record(n as f64);
}

pub fn lease_reclaims(n: u64) {
    counter!(LEASE_RECLAIMS).increment(n);
}

pub fn token_refresh(connector: &str) {
    counter!(TOKEN_REFRESHES, "connector" => kind_of(connector).to_string()).increment(1);
}

pub fn in_flight(n: usize) {
    gauge!(IN_FLIGHT).set(n as f64);
}

/// Replaces the per-state, per-agent message gauges with `counts` (state, agent, count); a pair
/// seen before and absent now is set to 0, so an emptied state does not keep its old figure.
pub fn message_counts(counts: &[(String, String, i64)], oldest_prepared_secs: Option<f64>) {
    static SEEN: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap();
    for pair in seen.iter() {
        if !counts.iter().any(|(s, a, _)| (s, a) == (&pair.0, &pair.1)) {
            gauge!(MESSAGES, "state" => pair.0.clone(), "agent" => pair.1.clone()).set(0.0);
        }
    }
    for (state, agent, n) in counts {
        gauge!(MESSAGES, "state" => state.clone(), "agent" => agent.clone()).set(*n as f64);
        if !seen.iter().any(|(s, a)| (s, a) == (state, agent)) {
            seen.push((state.clone(), agent.clone()));
        }
    }
    gauge!(OLDEST_PREPARED_SECONDS).set(oldest_prepared_secs.unwrap_or(0.0));
}

/// `http/default` → `http`: the connector label is the kind; the profile has its own label.
fn kind_of(connector: &str) -> &str {
    connector.split_once('/').map_or(connector, |(k, _)| k)
}
