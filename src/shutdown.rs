//! Signals: TERM and INT stop claiming and drain (the returned future completes); QUIT exits at
//! once; HUP asks the daemon to reload its profile files.

use std::sync::Arc;

use futures::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
use tokio::sync::Notify;

/// Listens for signals; returns a future that completes on TERM/INT.
pub fn signals(reload: Arc<Notify>) -> std::io::Result<impl std::future::Future<Output = ()>> {
    let mut signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGQUIT, SIGHUP])?;
    Ok(async move {
        while let Some(sig) = signals.next().await {
            match sig {
                SIGHUP => {
                    tracing::info!("SIGHUP: reloading profiles");
                    reload.notify_one();
                }
                SIGQUIT => {
                    tracing::warn!("SIGQUIT: exiting now; claimed messages are reclaimed when their leases expire");
                    std::process::exit(3);
                }
                _ => {
                    tracing::info!(signal = sig, "stop requested");
                    return;
                }
            }
        }
    })
}
