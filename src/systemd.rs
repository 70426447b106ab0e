//! systemd's notify protocol (sd_notify(3), `Type=notify`): READY=1 once migrations are checked and
//! the LISTEN connection is up, STATUS= lines with what the daemon is doing, WATCHDOG=1 while the
//! claim loop is healthy, RELOADING=1 … READY=1 around a HUP reload, STOPPING=1 when the drain
//! starts.
//!
//! Everything here is a no-op unless systemd started us (`NOTIFY_SOCKET` set), so tests and
//! foreground runs pay nothing. The watchdog is fed by its own task, but only while the claim loop
//! is not stuck: a loop step (reclaim, claim) that has been running for longer than three
//! database timeouts — every database call is bounded by one — means something is wedged, so
//! feeding stops and systemd restarts the daemon after `WatchdogSec`.

use std::time::Duration;

use sd_notify::NotifyState;

/// Sends notifications when `NOTIFY_SOCKET` is set.
#[derive(Debug, Clone, Copy, Default)]
pub struct Notifier {
    enabled: bool,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` from the environment.
    pub fn from_env() -> Notifier {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        let mut usec = 0;
        let watchdog = (enabled && sd_notify::watchdog_enabled(false, &mut usec) && usec > 0)
            .then(|| Duration::from_micros(usec));
        Notifier { enabled, watchdog }
    }

    /// A notifier that never sends (the library's default when embedded).
    pub fn disabled() -> Notifier {
        Notifier {
            enabled: false,
            watchdog: None,
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// `WatchdogSec`, when systemd asked for a watchdog.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    fn send(&self, states: &[NotifyState]) {
        if self.enabled {
            if let Err(e) = sd_notify::notify(false, states) {
                tracing::warn!(error = %e, "cannot notify systemd");
            }
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    /// RELOADING=1 with the MONOTONIC_USEC that `Type=notify-reload` requires.
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("draining")]);
    }

    pub fn watchdog_ping(&self) {
        self.send(&[NotifyState::Watchdog]);
    }
}
