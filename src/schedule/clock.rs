//! The scheduler's clock: the system clock in the daemon, a clock the test moves by hand in
//! tests (no sleeping: set it past a due time and tick). Every scheduling decision reads it, and
//! the SQL functions that decide on time are given its reading (`p_now`) instead of calling
//! `now()`.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

/// A handle on a clock; clones share it (two schedulers on one manual clock see the same time).
#[derive(Clone, Debug, Default)]
pub struct Clock {
    manual: Option<Arc<Mutex<DateTime<Utc>>>>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock { manual: None }
    }

    /// A clock that shows `at` until it is set or advanced.
    pub fn manual(at: DateTime<Utc>) -> Clock {
        Clock {
            manual: Some(Arc::new(Mutex::new(at))),
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        match &self.manual {
            Some(t) => *t.lock().unwrap(),
            None => Utc::now(),
        }
    }

    /// Sets a manual clock (a system clock ignores it).
    pub fn set(&self, at: DateTime<Utc>) {
        if let Some(t) = &self.manual {
            *t.lock().unwrap() = at;
        }
    }

    /// Moves a manual clock forward.
    pub fn advance(&self, by: chrono::Duration) {
        if let Some(t) = &self.manual {
            let mut t = t.lock().unwrap();
            *t += by;
        }
    }
}
