//! Provider fallback (issue 10): a profile may name fallback profiles, of any kind
//! (`fallback = ["aliyunsms/oncall"]` on a chat robot), that deliver its messages when the
//! primary keeps failing.
//!
//! A message goes to a fallback when it has used `fallback_attempts` attempts (on its own profile)
//! or when its profile has failed with retryable errors, and nothing but, for longer than
//! `fallback_after` (as this daemon saw it). Fallbacks take the attempts that follow in turn
//! (the first, the second, …, then the first again). While a profile is "down" one message every
//! `fallback_after` still tries it, so the profile comes back once it works. The message keeps its
//! own retry schedule and `max_attempts`; the fallback's connector, `timeout`, size limit and rate
//! limits apply to the attempt it makes, and the attempt row names the profile that made it
//! (`outbox.attempts.profile`).
//!
//! Invariants: the message is never changed (its address and content go to the fallback as they
//! are); a permanent error of the primary (bad content, unknown recipient) is final and never
//! retried elsewhere; the health state is per daemon and in memory only (a restart forgets it,
//! and the attempt rule still holds).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A profile's `fallback`, `fallback_after` and `fallback_attempts` keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallback {
    /// `<kind>/<profile>` of each fallback, in order.
    pub profiles: Vec<String>,
    /// Go to the fallbacks once the profile has failed (retryably, without a success) this long.
    pub after: Option<Duration>,
    /// Go to the fallbacks from the attempt after this many (default 1 when neither is set).
    pub attempts: Option<u32>,
}

impl Fallback {
    /// Validates the keys as written; the error is (key, message).
    pub fn from_keys(
        profiles: Option<Vec<String>>,
        after: Option<Duration>,
        attempts: Option<u32>,
    ) -> Result<Option<Fallback>, (&'static str, String)> {
        let Some(profiles) = profiles.filter(|p| !p.is_empty()) else {
            if after.is_some() || attempts.is_some() {
                let key = if after.is_some() {
                    "fallback_after"
                } else {
                    "fallback_attempts"
                };
                return Err((key, "has no effect without `fallback`".into()));
            }
            return Ok(None);
        };
        for p in &profiles {
            let ok = p
                .split_once('/')
                .is_some_and(|(k, n)| !k.is_empty() && !n.is_empty() && !n.contains('/'));
            if !ok {
                return Err((
                    "fallback",
                    format!("\"{p}\" is not a profile: write \"<kind>/<profile>\", e.g. \"aliyunsms/oncall\""),
                ));
            }
        }
        if attempts == Some(0) {
            return Err(("fallback_attempts", "must be at least 1".into()));
        }
        let attempts = match (after, attempts) {
            (None, None) => Some(1),
            (_, a) => a,
        };
        Ok(Some(Fallback {
            profiles,
            after,
            attempts,
        }))
    }
}

/// How one profile has been doing, as this daemon saw it.
#[derive(Debug, Clone, Copy)]
struct Health {
    /// The first retryable failure since the last success.
    failing_since: Instant,
    /// The last time a message was let through to the profile while it was down.
    probed: Instant,
}

/// Per-profile health, shared by the deliveries of one daemon.
#[derive(Debug, Default)]
pub struct HealthBook {
    profiles: Mutex<HashMap<String, Health>>,
}

impl HealthBook {
    /// Records how an attempt on `profile` went: success clears, a retryable failure starts (or
    /// continues) a failing streak; a permanent error says nothing about the profile.
    pub fn observe(&self, profile: &str, outcome: &str, retryable_error: bool, now: Instant) {
        let mut map = self.profiles.lock().unwrap();
        if outcome == "done" {
            map.remove(profile);
        } else if retryable_error {
            map.entry(profile.to_string()).or_insert(Health {
                failing_since: now,
                probed: now,
            });
        }
    }

    /// Whether `profile` counts as down after `window` of failures — false for one message every
    /// `window` (the probe that lets it come back).
    fn down(&self, profile: &str, window: Duration, now: Instant) -> bool {
        let mut map = self.profiles.lock().unwrap();
        let Some(h) = map.get_mut(profile) else {
            return false;
        };
        if now.saturating_duration_since(h.failing_since) < window {
            return false;
        }
        if now.saturating_duration_since(h.probed) >= window {
            h.probed = now;
            return false;
        }
        true
    }
}

/// Which fallback (index into `profiles`) makes attempt `attempt` (1-based) of a message of a
/// profile with fallback `f`, or `None` for the profile itself; `now` is the daemon's clock.
pub fn choose(
    f: &Fallback,
    profile: &str,
    attempt: i32,
    health: &HealthBook,
    now: Instant,
) -> Option<usize> {
    if f.profiles.is_empty() {
        return None;
    }
    if let Some(n) = f.attempts {
        if attempt > n as i32 {
            return Some((attempt - n as i32 - 1) as usize % f.profiles.len());
        }
    }
    match f.after {
        Some(window) if health.down(profile, window, now) => Some(0),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_validated() {
        assert_eq!(Fallback::from_keys(None, None, None), Ok(None));
        let f = Fallback::from_keys(Some(vec!["sms/backup".into()]), None, None)
            .unwrap()
            .unwrap();
        assert_eq!(f.attempts, Some(1), "default: after the first attempt");
        assert_eq!(
            Fallback::from_keys(None, Some(Duration::from_secs(1)), None)
                .unwrap_err()
                .0,
            "fallback_after"
        );
        assert_eq!(
            Fallback::from_keys(Some(vec!["backup".into()]), None, None)
                .unwrap_err()
                .0,
            "fallback"
        );
        assert_eq!(
            Fallback::from_keys(Some(vec!["sms/b".into()]), None, Some(0))
                .unwrap_err()
                .0,
            "fallback_attempts"
        );
        let f = Fallback::from_keys(Some(vec!["a/x".into()]), Some(Duration::from_secs(5)), None)
            .unwrap()
            .unwrap();
        assert_eq!(f.attempts, None, "the window alone");
    }

    #[test]
    fn attempts_past_the_limit_go_to_the_fallbacks_in_turn() {
        let f = Fallback {
            profiles: vec!["a/x".into(), "b/y".into()],
            after: None,
            attempts: Some(2),
        };
        let h = HealthBook::default();
        let now = Instant::now();
        let picks: Vec<Option<usize>> = (1..=6).map(|a| choose(&f, "p/q", a, &h, now)).collect();
        assert_eq!(picks, [None, None, Some(0), Some(1), Some(0), Some(1)]);
    }

    #[test]
    fn a_profile_failing_longer_than_the_window_is_down_but_probed() {
        let w = Duration::from_secs(60);
        let f = Fallback {
            profiles: vec!["a/x".into()],
            after: Some(w),
            attempts: None,
        };
        let h = HealthBook::default();
        let t0 = Instant::now();
        assert_eq!(choose(&f, "p/q", 1, &h, t0), None, "never failed");
        h.observe("p/q", "retry", true, t0);
        assert_eq!(
            choose(&f, "p/q", 1, &h, t0 + w / 2),
            None,
            "failing, not long enough"
        );
        h.observe("p/q", "failed", false, t0 + w / 2);
        assert_eq!(choose(&f, "p/q", 1, &h, t0 + w), None, "the probe");
        assert_eq!(choose(&f, "p/q", 1, &h, t0 + w), Some(0), "down");
        assert_eq!(choose(&f, "p/q", 1, &h, t0 + w * 2), None, "the next probe");
        h.observe("p/q", "done", false, t0 + w * 2);
        assert_eq!(choose(&f, "p/q", 1, &h, t0 + w * 2), None, "back up");
    }
}
