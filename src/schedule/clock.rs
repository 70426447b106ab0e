//! The scheduler's clock: the system clock in the daemon, a clock the test moves by hand in
//! tests (no sleeping: set it past a due time and tick, or let a running scheduler wake up). Every
//! scheduling decision reads it, and the SQL functions that decide on time are given its reading
//! (`p_now`) instead of calling `now()`.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use tokio::sync::Notify;

/// A handle on a clock; clones share it (two schedulers on one manual clock see the same time).
#[derive(Clone, Debug, Default)]
pub struct Clock {
    manual: Option<Arc<Manual>>,
}

#[derive(Debug)]
struct Manual {
    at: Mutex<DateTime<Utc>>,
    /// Wakes [`Clock::sleep_until`] whenever the time is set or advanced.
    moved: Notify,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock { manual: None }
    }

    /// A clock that shows `at` until it is set or advanced.
    pub fn manual(at: DateTime<Utc>) -> Clock {
        Clock {
            manual: Some(Arc::new(Manual {
                at: Mutex::new(at),
                moved: Notify::new(),
            })),
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        match &self.manual {
            Some(m) => *m.at.lock().unwrap(),
            None => Utc::now(),
        }
    }

    /// Sets a manual clock (a system clock ignores it).
    pub fn set(&self, at: DateTime<Utc>) {
        if let Some(m) = &self.manual {
            *m.at.lock().unwrap() = at;
            m.moved.notify_waiters();
        }
    }

    /// Moves a manual clock forward.
    pub fn advance(&self, by: chrono::Duration) {
        if let Some(m) = &self.manual {
            *m.at.lock().unwrap() += by;
            m.moved.notify_waiters();
        }
    }

    /// Returns once the clock shows `at` or later: the system clock after a timer, a manual one
    /// when a test sets it there (never by itself).
    pub async fn sleep_until(&self, at: DateTime<Utc>) {
        match &self.manual {
            None => {
                let left = (at - Utc::now()).to_std().unwrap_or_default();
                tokio::time::sleep(left).await;
            }
            Some(m) => loop {
                // Registered before the time is read, so a move in between is not missed.
                let moved = m.moved.notified();
                tokio::pin!(moved);
                moved.as_mut().enable();
                if *m.at.lock().unwrap() >= at {
                    return;
                }
                moved.await;
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_manual_clock_wakes_sleepers_when_moved_past_their_time() {
        let t0 = Utc::now();
        let clock = Clock::manual(t0);
        let at = t0 + chrono::Duration::hours(1);
        let sleeper = tokio::spawn({
            let clock = clock.clone();
            async move { clock.sleep_until(at).await }
        });
        tokio::task::yield_now().await;
        clock.advance(chrono::Duration::minutes(30));
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished(), "half-way there: still asleep");
        clock.advance(chrono::Duration::minutes(30));
        tokio::time::timeout(std::time::Duration::from_secs(5), sleeper)
            .await
            .expect("woken when the clock reached its time")
            .unwrap();
        // Already past: returns at once.
        clock.sleep_until(t0).await;
    }
}
