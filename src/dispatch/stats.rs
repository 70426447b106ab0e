//! What a running daemon knows about itself, for `/sys/status` and the metrics: when it started,
//! whether its LISTEN connection is up, how many deliveries are in flight, and per profile the last
//! success and the last failure with its code.
//!
//! Invariants: updated by the dispatcher only (claim loop, recorder, listener); readers take
//! snapshots, never hold the lock across an await.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::Serialize;

/// Shared, cheap-to-update runtime state of one daemon.
#[derive(Debug)]
pub struct Stats {
    started: Instant,
    started_at: DateTime<Utc>,
    listener_connected: AtomicBool,
    in_flight: AtomicUsize,
    profiles: Mutex<BTreeMap<String, ProfileStats>>,
    /// When the claim loop's current step (reclaim, claim) started; `None` while it waits.
    busy_since: Mutex<Option<Instant>>,
}

/// The last outcomes of one profile (`<kind>/<profile>`, the connector's name).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ProfileStats {
    pub last_success_at: Option<DateTime<Utc>>,
    pub last_failure_at: Option<DateTime<Utc>>,
    pub last_failure_code: Option<String>,
    pub delivered: u64,
    pub failed_attempts: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Instant::now(),
            started_at: Utc::now(),
            listener_connected: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            profiles: Mutex::new(BTreeMap::new()),
            busy_since: Mutex::new(None),
        }
    }
}

impl Stats {
    pub fn uptime_secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub fn started_at(&self) -> DateTime<Utc> {
        self.started_at
    }

    pub fn set_listener_connected(&self, up: bool) {
        self.listener_connected.store(up, Ordering::Relaxed);
    }

    pub fn listener_connected(&self) -> bool {
        self.listener_connected.load(Ordering::Relaxed)
    }

    pub fn set_in_flight(&self, n: usize) {
        self.in_flight.store(n, Ordering::Relaxed);
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The claim loop starts (`true`) or ends (`false`) a step that talks to the database.
    pub fn loop_busy(&self, busy: bool) {
        *self.busy_since.lock().unwrap() = busy.then(Instant::now);
    }

    /// How long the claim loop's current step has been running (`None`: it is waiting).
    pub fn loop_busy_for(&self) -> Option<std::time::Duration> {
        self.busy_since.lock().unwrap().map(|t| t.elapsed())
    }

    /// Records one attempt's outcome for `connector` (`<kind>/<profile>`); `error_code` is `None`
    /// for a delivery.
    pub fn record(&self, connector: &str, error_code: Option<&str>) {
        let now = Utc::now();
        let mut map = self.profiles.lock().unwrap();
        // The key is allocated once per profile, not per attempt.
        if !map.contains_key(connector) {
            map.insert(connector.to_string(), ProfileStats::default());
        }
        let p = map.get_mut(connector).expect("just inserted");
        match error_code {
            None => {
                p.last_success_at = Some(now);
                p.delivered += 1;
            }
            Some(code) => {
                p.last_failure_at = Some(now);
                p.last_failure_code = Some(code.to_string());
                p.failed_attempts += 1;
            }
        }
    }

    /// A copy of the per-profile figures.
    pub fn profiles(&self) -> BTreeMap<String, ProfileStats> {
        self.profiles.lock().unwrap().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_kept_per_profile() {
        let s = Stats::default();
        s.record("http/default", None);
        s.record("http/default", Some("http-503"));
        s.record("smtp/mail", Some("smtp-5xx"));
        let p = s.profiles();
        assert_eq!(p["http/default"].delivered, 1);
        assert_eq!(
            p["http/default"].last_failure_code.as_deref(),
            Some("http-503")
        );
        assert!(p["http/default"].last_success_at.is_some());
        assert_eq!(p["smtp/mail"].failed_attempts, 1);
        assert!(p["smtp/mail"].last_success_at.is_none());
    }
}
