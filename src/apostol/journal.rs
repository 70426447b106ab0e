//! What the drop-in daemon knows that an Apostol database has no place for: per message, the
//! attempts made, whether a send is in flight, and when the next retry is due.
//!
//! Kept in memory, and — when `[apostol] state_file` is set — in that JSON file, rewritten
//! (write to a temporary file, then rename) on every change, so that it survives a restart:
//! retries still fall due, and a send a crash interrupted (left in `sending`) is found and
//! delivered again. Without the file a restart forgets both (see the README).
//!
//! Invariant: an entry exists only for a message the daemon moved out of `prepared` and whose
//! cycle is not over (in flight, or failed with a retry scheduled).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One message's daemon-side state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Attempts made (charged) so far.
    pub attempts: i32,
    /// `send` executed and no outcome written yet.
    pub sending: bool,
    /// Failed with a retry due at this time (`repeat` then).
    pub due_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    messages: BTreeMap<Uuid, Entry>,
}

/// The daemon-side state, optionally persisted.
pub struct Journal {
    path: Option<PathBuf>,
    state: Mutex<State>,
}

impl Journal {
    /// Loads `path` when it exists (an unreadable file is an error: starting without it would
    /// forget in-flight sends).
    pub fn open(path: Option<PathBuf>) -> Result<Journal, String> {
        let state = match &path {
            Some(p) if p.exists() => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| format!("cannot read state_file {}: {e}", p.display()))?;
                serde_json::from_str(&text)
                    .map_err(|e| format!("state_file {} is not outboxd's: {e}", p.display()))?
            }
            _ => State::default(),
        };
        Ok(Journal {
            path,
            state: Mutex::new(state),
        })
    }

    pub fn get(&self, id: Uuid) -> Option<Entry> {
        self.state.lock().unwrap().messages.get(&id).cloned()
    }

    /// Every entry (recovery at start).
    pub fn entries(&self) -> Vec<(Uuid, Entry)> {
        let s = self.state.lock().unwrap();
        s.messages.iter().map(|(k, v)| (*k, v.clone())).collect()
    }

    /// Attempt `attempt` of `id` has started (`send` executed).
    pub fn sending(&self, id: Uuid, attempt: i32) {
        self.update(id, |e| {
            e.attempts = attempt;
            e.sending = true;
            e.due_at = None;
        });
    }

    /// The attempt failed; `repeat` is due at `due_at`.
    pub fn retry_at(&self, id: Uuid, due_at: DateTime<Utc>) {
        self.update(id, |e| {
            e.sending = false;
            e.due_at = Some(due_at);
        });
    }

    /// `repeat` ran: the message is prepared again, nothing due (the attempts stay counted).
    pub fn repeated(&self, id: Uuid) {
        self.update(id, |e| {
            e.sending = false;
            e.due_at = None;
        });
    }

    /// The attempt was handed back uncharged (shutdown): one attempt less, nothing due.
    pub fn uncharge(&self, id: Uuid) {
        let keep = {
            let mut s = self.state.lock().unwrap();
            match s.messages.get_mut(&id) {
                Some(e) if e.attempts > 1 => {
                    e.attempts -= 1;
                    e.sending = false;
                    e.due_at = None;
                    true
                }
                _ => false,
            }
        };
        if !keep {
            self.forget(id);
        } else {
            self.save();
        }
    }

    /// The message's cycle is over (done, failed for good, or no longer ours).
    pub fn forget(&self, id: Uuid) {
        let removed = self.state.lock().unwrap().messages.remove(&id).is_some();
        if removed {
            self.save();
        }
    }

    /// Messages whose retry is due at `now`.
    pub fn due(&self, now: DateTime<Utc>) -> Vec<Uuid> {
        let s = self.state.lock().unwrap();
        s.messages
            .iter()
            .filter(|(_, e)| e.due_at.is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect()
    }

    /// The earliest due retry.
    pub fn next_due(&self) -> Option<DateTime<Utc>> {
        let s = self.state.lock().unwrap();
        s.messages.values().filter_map(|e| e.due_at).min()
    }

    fn update(&self, id: Uuid, f: impl FnOnce(&mut Entry)) {
        f(self.state.lock().unwrap().messages.entry(id).or_default());
        self.save();
    }

    fn save(&self) {
        let Some(path) = &self.path else { return };
        let text = {
            let s = self.state.lock().unwrap();
            serde_json::to_string_pretty(&*s).expect("plain data serializes")
        };
        let tmp = path.with_extension("tmp");
        let result = std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, path));
        if let Err(e) = result {
            tracing::error!(path = %path.display(), error = %e, "cannot write the drop-in state file; a restart would forget retries and in-flight sends");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let j = Journal::open(Some(path.clone())).unwrap();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        j.sending(a, 1);
        j.sending(b, 2);
        let due = Utc::now();
        j.retry_at(b, due);
        let j = Journal::open(Some(path.clone())).unwrap();
        assert_eq!(
            j.get(a).unwrap(),
            Entry {
                attempts: 1,
                sending: true,
                due_at: None
            }
        );
        assert_eq!(j.due(due), vec![b]);
        j.uncharge(a);
        j.forget(b);
        assert!(Journal::open(Some(path)).unwrap().entries().is_empty());
    }
}
