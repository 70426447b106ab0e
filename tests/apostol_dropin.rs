//! Drop-in mode (issue 13) end to end: a real daemon with `source = "apostol"` serving a fresh
//! database that holds only the Apostol platform fixture (tests/fixtures/apostol/platform.sql;
//! no outboxd migration), with its profiles read from a MessageServer INI configuration and
//! delivered by the http connector to a receiver on 127.0.0.1:0. The assertions read the
//! fixture's rows: states, the actions in order (its log), labels, inbox replies, sessions.

mod common;
#[path = "common/apostol.rs"]
mod platform;

use std::path::Path;
use std::time::Duration;

use common::*;
use outboxd::config::ProfileCommon;
use platform::*;
use uuid::Uuid;

const T: Duration = Duration::from_secs(15);

fn common_settings(retry: Duration, timeout: Duration) -> ProfileCommon {
    ProfileCommon {
        retry: vec![retry],
        max_attempts: 3,
        timeout,
        max_content_bytes: 1 << 20,
    }
}

/// The drop-in journal as the daemon left it on disk: message id → (attempts, sending, due).
fn journal(path: &Path) -> serde_json::Map<String, serde_json::Value> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Default::default();
    };
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["messages"].as_object().cloned().unwrap_or_default()
}

async fn wait_journal(
    path: &Path,
    what: &str,
    f: impl Fn(&serde_json::Map<String, serde_json::Value>) -> bool,
) {
    wait_for(T, what, || async { f(&journal(path)).then_some(()) }).await
}

fn entry(j: &serde_json::Map<String, serde_json::Value>, id: Uuid) -> Option<&serde_json::Value> {
    j.get(&id.to_string())
}

#[tokio::test]
async fn send_done_and_fail_repeat_done_through_notify_with_a_restart_in_the_middle() {
    let p = Platform::new().await;
    let mut app = p.admin().await;
    let rx = Receiver::start(Behaviour::Ok(
        r#"{"id":"pay-1","status":"accepted"}"#.into(),
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ini = message_server_ini(dir.path(), &rx.url);
    let state_file = dir.path().join("dropin-state.json");
    // Poll every 60 s: what is delivered within seconds came by NOTIFY.
    let cfg = p.config(
        Some(&ini),
        &state_file,
        common_settings(Duration::from_secs(2), Duration::from_secs(2)),
    );
    let d = Daemon::start(cfg.clone());
    wait_listening(&app, T).await;
    wait_for(T, "the start's read of api.outbox", || async {
        (calls(&app, "outbox").await >= 1).then_some(())
    })
    .await;

    // send → done: the provider's id as the label, the reply as an inbox message.
    let content = r#"{"amount":100}"#;
    let a = platform::send(&mut app, "payment.agent", "default", "/payments", content).await;
    platform::wait_state(&app, a, "submitted", T).await;
    assert_eq!(actions(&app, a).await, ["submit", "send", "done"]);
    assert_eq!(label(&app, a).await.as_deref(), Some("pay-1"));
    assert_eq!(
        inbox(&app, a).await,
        [(
            Some(r#"{"id":"pay-1","status":"accepted"}"#.to_string()),
            "payment.agent".to_string(),
            "default".to_string(),
            Some("/payments".to_string())
        )]
    );
    let got = rx.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].method, "POST");
    assert_eq!(got[0].path, "/payments");
    assert_eq!(got[0].body, content);
    assert_eq!(got[0].headers["authorization"], "Bearer api-token-9f2");
    assert_eq!(got[0].headers["content-type"], "application/json");

    // fail (a retryable 503): failed with the error text as the label, a retry kept daemon-side.
    rx.set(Behaviour::Status(503));
    let b = platform::send(&mut app, "payment.agent", "default", "/payments", content).await;
    platform::wait_state(&app, b, "failed", T).await;
    let l = label(&app, b).await.unwrap();
    assert!(l.starts_with("http-503: "), "{l}");
    assert_eq!(actions(&app, b).await, ["submit", "send", "fail"]);
    wait_journal(&state_file, "b's retry in the state file", |j| {
        entry(j, b).is_some_and(|e| e["attempts"] == 1 && e["due_at"].is_string())
    })
    .await;
    // Restart before the retry is due: it survives in the state file.
    d.stop().await;
    assert_eq!(platform::state(&app, b).await, "failed");
    rx.set(Behaviour::Ok(r#"{"id":"pay-2"}"#.into()));
    let d = Daemon::start(cfg.clone());
    platform::wait_state(&app, b, "submitted", T).await;
    assert_eq!(
        actions(&app, b).await,
        ["submit", "send", "fail", "repeat", "send", "done"]
    );
    assert_eq!(label(&app, b).await.as_deref(), Some("pay-2"));
    assert_eq!(
        inbox(&app, b).await.len(),
        1,
        "one reply: the attempt that succeeded"
    );
    assert_eq!(rx.count(), 3);

    // A permanent failure (400) is failed for good: no repeat.
    rx.set(Behaviour::Status(400));
    let c = platform::send(&mut app, "payment.agent", "default", "/payments", content).await;
    platform::wait_state(&app, c, "failed", T).await;
    let l = label(&app, c).await.unwrap();
    assert!(l.starts_with("http-400: "), "{l}");
    let report = d.stop().await;
    assert_eq!((report.delivered, report.failed, report.retried), (1, 1, 0));
    assert_eq!(actions(&app, c).await, ["submit", "send", "fail"]);
    assert!(
        journal(&state_file).is_empty(),
        "{:?}",
        journal(&state_file)
    );
    // Every write of the daemon ran in a batch authorized as the bot.
    let unauthorized: i64 = app
        .query_one(
            "SELECT count(*) FROM db.log WHERE call IN ('action', 'set_object_label', 'add_inbox') \
             AND username IS DISTINCT FROM 'apibot' AND detail NOT IN ('submit')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(unauthorized, 0);
    // The database is not ours: nothing of outboxd's schema was created there.
    let ours: i64 = app
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'outbox'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ours, 0);
}

#[tokio::test]
async fn the_poll_finds_what_no_notify_announced_and_an_expired_session_logs_in_again() {
    let p = Platform::new().await;
    let app = p.admin().await;
    let rx = Receiver::start(Behaviour::Ok(r#"{"id":"p"}"#.into())).await;
    let dir = tempfile::tempdir().unwrap();
    let ini = message_server_ini(dir.path(), &rx.url);
    let state_file = dir.path().join("state.json");
    let mut cfg = p.config(
        Some(&ini),
        &state_file,
        common_settings(Duration::from_millis(50), Duration::from_secs(2)),
    );
    cfg.poll_interval = Duration::from_millis(200);
    let d = Daemon::start(cfg);
    wait_listening(&app, T).await;

    // A message for an agent no connector handles (read by another part of the platform) is
    // left alone, as MessageServer leaves it.
    let notice = insert_prepared(&app, "notice.agent", "default", "", "{}").await;
    // Inserted straight into prepared: no NOTIFY, only the poll finds it.
    let first = insert_prepared(&app, "payment.agent", "default", "/a", "{}").await;
    platform::wait_state(&app, first, "submitted", T).await;
    assert_eq!(actions(&app, first).await, ["send", "done"]);
    assert_eq!(calls(&app, "login").await, 1);
    assert_eq!(calls(&app, "get_sessions").await, 1);
    let open_logins: i64 = app
        .query_one(
            "SELECT count(*) FROM db.sessions WHERE kind = 'login' AND NOT closed",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(open_logins, 0, "the login session is signed out");

    // The bot session expires: authorize says no, the daemon logs in again and carries on.
    app.execute(
        "UPDATE db.sessions SET closed = true WHERE kind = 'bot'",
        &[],
    )
    .await
    .unwrap();
    let second = insert_prepared(&app, "payment.agent", "default", "/b", "{}").await;
    platform::wait_state(&app, second, "submitted", T).await;
    assert_eq!(actions(&app, second).await, ["send", "done"]);
    assert!(calls(&app, "authorize-refused").await >= 1);
    assert_eq!(calls(&app, "login").await, 2);
    let open_bots: i64 = app
        .query_one(
            "SELECT count(*) FROM db.sessions WHERE kind = 'bot' AND NOT closed",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(open_bots, 1);
    assert_eq!(rx.count(), 2);
    d.stop().await;
    assert_eq!(platform::state(&app, notice).await, "prepared");
    assert!(actions(&app, notice).await.is_empty());
    let polls = calls(&app, "outbox").await;
    assert!(polls >= 3, "polled {polls} times");
}

#[tokio::test]
async fn a_stop_hands_back_and_a_send_a_crash_interrupted_is_delivered_again() {
    let p = Platform::new().await;
    let mut app = p.admin().await;
    let rx = Receiver::start(Behaviour::Hang).await;
    let dir = tempfile::tempdir().unwrap();
    let ini = message_server_ini(dir.path(), &rx.url);
    let state_file = dir.path().join("state.json");
    let mut cfg = p.config(
        Some(&ini),
        &state_file,
        common_settings(Duration::from_millis(50), Duration::from_secs(30)),
    );
    cfg.grace_period = Duration::from_millis(300);

    // A graceful stop while the provider hangs: handed back to prepared, uncharged.
    let d = Daemon::start(cfg.clone());
    wait_listening(&app, T).await;
    let m = platform::send(&mut app, "payment.agent", "default", "/slow", "{}").await;
    platform::wait_state(&app, m, "sending", T).await;
    wait_for(T, "the provider call", || async {
        (rx.count() == 1).then_some(())
    })
    .await;
    let report = d.stop().await;
    assert_eq!(report.released, 1);
    assert_eq!(platform::state(&app, m).await, "prepared");
    assert!(label(&app, m).await.unwrap().starts_with("shutdown: "));
    assert_eq!(actions(&app, m).await, ["submit", "send", "fail", "repeat"]);
    assert!(journal(&state_file).is_empty());

    // A crash during the next attempt leaves it in sending (MessageServer would leave it there
    // for good) …
    let d = Daemon::start(cfg.clone());
    platform::wait_state(&app, m, "sending", T).await;
    wait_for(T, "the second provider call", || async {
        (rx.count() == 2).then_some(())
    })
    .await;
    wait_journal(&state_file, "m in flight in the state file", |j| {
        entry(j, m).is_some_and(|e| e["sending"] == true && e["attempts"] == 1)
    })
    .await;
    d.crash().await;
    assert_eq!(platform::state(&app, m).await, "sending");

    // … and the next start finds it there and delivers it again.
    rx.set(Behaviour::Ok(r#"{"id":"again"}"#.into()));
    let d = Daemon::start(cfg);
    platform::wait_state(&app, m, "submitted", T).await;
    assert_eq!(
        actions(&app, m).await,
        ["submit", "send", "fail", "repeat", "send", "fail", "repeat", "send", "done"]
    );
    assert_eq!(label(&app, m).await.as_deref(), Some("again"));
    assert_eq!(rx.count(), 3);
    let interrupted: i64 = app
        .query_one(
            "SELECT count(*) FROM db.log WHERE call = 'set_object_label' AND object = $1 \
             AND detail LIKE 'interrupted: the daemon stopped during attempt 1%'",
            &[&m],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(interrupted, 1);
    d.stop().await;
    assert!(journal(&state_file).is_empty());
}

#[tokio::test]
async fn two_daemons_never_send_the_same_message() {
    let p = Platform::new().await;
    let mut app = p.admin().await;
    let rx = Receiver::start(Behaviour::Ok(r#"{"id":"x"}"#.into())).await;
    let dir = tempfile::tempdir().unwrap();
    let ini = message_server_ini(dir.path(), &rx.url);
    let settings = common_settings(Duration::from_millis(50), Duration::from_secs(2));
    let one = Daemon::start(p.config(Some(&ini), &dir.path().join("one.json"), settings.clone()));
    let two = Daemon::start(p.config(Some(&ini), &dir.path().join("two.json"), settings));
    wait_for(T, "both daemons listening", || async {
        (listeners(&app).await == 2).then_some(())
    })
    .await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(
            platform::send(
                &mut app,
                "payment.agent",
                "default",
                &format!("/m{i}"),
                "{}",
            )
            .await,
        );
    }
    for id in &ids {
        platform::wait_state(&app, *id, "submitted", T).await;
        assert_eq!(actions(&app, *id).await, ["submit", "send", "done"]);
    }
    let (a, b) = (one.stop().await, two.stop().await);
    assert_eq!(a.delivered + b.delivered, 20);
    assert_eq!(rx.count(), 20, "each message sent once");
}
