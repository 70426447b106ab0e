//! The binary under systemd's notify protocol, with a NOTIFY_SOCKET the test listens on: READY=1
//! only once LISTEN is up, STATUS= lines, WATCHDOG=1 at half WatchdogSec, RELOADING=1 … READY=1 on
//! HUP, STOPPING=1 on TERM; and `systemd-analyze verify` on the shipped unit.
mod common;
use common::*;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tokio::net::UnixDatagram;

fn write_config(dir: &Path, db_url: &str) -> std::path::PathBuf {
    std::fs::write(
        dir.join("file.conf"),
        format!("[default]\npath = \"{}/spool.jsonl\"\n", dir.display()),
    )
    .unwrap();
    let main = dir.join("outboxd.toml");
    std::fs::write(
        &main,
        format!(
            "database_url = \"{db_url}\"\npoll_interval = \"200ms\"\n[connectors]\nfile = \"file.conf\"\n"
        ),
    )
    .unwrap();
    main
}

/// The next notification, within `timeout`.
async fn next(sock: &UnixDatagram, timeout: Duration) -> String {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(timeout, sock.recv(&mut buf))
        .await
        .expect("a notification in time")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Reads notifications until one contains `what`; returns it and everything read before it.
async fn until(sock: &UnixDatagram, what: &str, timeout: Duration) -> (String, Vec<String>) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        assert!(
            !left.is_zero(),
            "no {what} within {timeout:?}; got {seen:?}"
        );
        let m = next(sock, left).await;
        if m.lines().any(|l| l == what || l.starts_with(what)) {
            return (m, seen);
        }
        seen.push(m);
    }
}

fn signal(pid: u32, sig: &str) {
    assert!(Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_speaks_the_notify_protocol() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let main = write_config(dir.path(), &db.url);
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    // WATCHDOG_PID must be the daemon's own pid: the shell exports its $$ and execs the binary.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_outboxd"))
        .arg("-c")
        .arg(&main)
        .arg("run")
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let c = db.client().await;

    let (ready, _) = until(&sock, "READY=1", Duration::from_secs(20)).await;
    assert!(ready.contains("STATUS=ready: listening"), "{ready}");
    assert!(
        listeners(&c).await >= 1,
        "READY=1 before the LISTEN connection was up"
    );

    // The watchdog at half of WatchdogSec (400 ms → every 200 ms): three pings come quickly.
    for _ in 0..3 {
        until(&sock, "WATCHDOG=1", Duration::from_secs(2)).await;
    }
    let id = send(&c, "file.agent", "default", "a", "one").await;
    wait_state(&c, id, "submitted", Duration::from_secs(10)).await;
    // A STATUS= line every poll interval (200 ms here) with the queue depth and the counts.
    until(
        &sock,
        "STATUS=0 prepared, 0 in flight; delivered 1, retried 0, failed 0",
        Duration::from_secs(5),
    )
    .await;

    signal(pid, "HUP");
    let (reloading, _) = until(&sock, "RELOADING=1", Duration::from_secs(5)).await;
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    let (ready, _) = until(&sock, "READY=1", Duration::from_secs(5)).await;
    assert!(ready.contains("profiles reloaded"), "{ready}");

    signal(pid, "TERM");
    until(&sock, "STOPPING=1", Duration::from_secs(5)).await;
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn the_shipped_unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/outboxd.service"
    ))
    .unwrap();
    assert!(
        unit.contains("Type=notify") && unit.contains("WatchdogSec="),
        "{unit}"
    );
    assert!(unit.contains(
        "ExecStartPre=/usr/local/bin/outboxd --config /etc/outboxd/outboxd.toml check-config"
    ));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outboxd.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/outboxd", env!("CARGO_BIN_EXE_outboxd")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian's systemd package) is installed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Unknown keys are only warnings: none may be printed either.
    assert!(
        stderr.trim().is_empty(),
        "systemd-analyze warned:\n{stderr}"
    );
}
