//! The retry schedule: what happens after a retryable failure.
//!
//! A profile carries a list of delays; attempt n waits `delays[n-1]` (the last delay repeats),
//! ±20 % jitter so a burst of failures does not come back as a burst. A provider's `Retry-After`
//! wins over the schedule (RFC 9110 §10.2.3). After `max_attempts` the failure is final.

use std::time::Duration;

use rand::Rng;

use crate::config::ProfileCommon;

/// The longest provider-requested delay honoured.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// What to do with a retryable failure of attempt `attempt` (1-based).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RetryDecision {
    RetryAfter(Duration),
    GiveUp,
}

pub fn decide(
    common: &ProfileCommon,
    message_max_attempts: Option<i32>,
    attempt: i32,
    retry_after: Option<Duration>,
) -> RetryDecision {
    let max = message_max_attempts
        .filter(|m| *m > 0)
        .map(|m| m as u32)
        .unwrap_or(common.max_attempts);
    if attempt.max(0) as u32 >= max {
        return RetryDecision::GiveUp;
    }
    if let Some(hint) = retry_after {
        // A provider's hint wins, within reason: a broken or hostile Retry-After must not park a
        // message for weeks.
        return RetryDecision::RetryAfter(hint.min(MAX_RETRY_AFTER));
    }
    let base = if common.retry.is_empty() {
        Duration::ZERO
    } else {
        let i = ((attempt.max(1) - 1) as usize).min(common.retry.len() - 1);
        common.retry[i]
    };
    RetryDecision::RetryAfter(jitter(base))
}

/// `d` ± 20 %.
pub fn jitter(d: Duration) -> Duration {
    let f: f64 = rand::thread_rng().gen_range(0.8..=1.2);
    d.mul_f64(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common(retry: &[u64], max: u32) -> ProfileCommon {
        ProfileCommon {
            retry: retry.iter().map(|s| Duration::from_secs(*s)).collect(),
            max_attempts: max,
            timeout: Duration::from_secs(1),
            max_content_bytes: 1024,
        }
    }

    #[test]
    fn follows_the_schedule_with_jitter_and_gives_up_at_max() {
        let c = common(&[10, 100], 4);
        for (attempt, base) in [(1, 10.0), (2, 100.0), (3, 100.0)] {
            match decide(&c, None, attempt, None) {
                RetryDecision::RetryAfter(d) => {
                    let s = d.as_secs_f64();
                    assert!(s >= base * 0.8 && s <= base * 1.2, "attempt {attempt}: {s}");
                }
                other => panic!("attempt {attempt}: {other:?}"),
            }
        }
        assert_eq!(decide(&c, None, 4, None), RetryDecision::GiveUp);
        assert_eq!(decide(&c, Some(2), 2, None), RetryDecision::GiveUp);
    }

    #[test]
    fn retry_after_wins() {
        let c = common(&[10], 5);
        assert_eq!(
            decide(&c, None, 1, Some(Duration::from_secs(42))),
            RetryDecision::RetryAfter(Duration::from_secs(42))
        );
        assert_eq!(
            decide(&c, None, 1, Some(Duration::from_secs(90 * 24 * 3600))),
            RetryDecision::RetryAfter(MAX_RETRY_AFTER)
        );
    }
}
