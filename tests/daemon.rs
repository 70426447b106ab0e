//! The daemon against a real PostgreSQL and in-process HTTP receivers: wake-up by NOTIFY, poll
//! fallback, retries and their schedule, Retry-After, permanent failures, crash recovery through
//! lease expiry, two daemons, graceful drain, and malformed rows.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use uuid::Uuid;

const T: Duration = Duration::from_secs(15);

fn http_cfg(db: &TestDb, url: &str, extra: &str) -> TestConfig {
    TestConfig::new(db, &[("http", &http_conf(url, extra))])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_the_daemon_long_before_the_poll() {
    let db = TestDb::new().await;
    let rx = Receiver::start(Behaviour::Ok("{\"id\":\"r-1\"}".into())).await;
    let tc = http_cfg(&db, &rx.url, "");
    assert_eq!(tc.config.poll_interval, Duration::from_secs(60));
    let d = Daemon::start(tc.config.clone());
    let c = db.client().await;
    wait_listening(&c, T).await;
    let first = send(&c, "http.agent", "default", "/hook", "{\"n\":1}").await;
    wait_state(&c, first, "submitted", T).await;
    // The start-up claims are over; only a notification can bring the next one in time.
    let started = std::time::Instant::now();
    let second = send(&c, "http.agent", "default", "/hook", "{\"n\":2}").await;
    wait_state(&c, second, "submitted", Duration::from_secs(5)).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    let got = rx.received();
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].path, "/hook");
    assert_eq!(got[1].body, "{\"n\":2}");
    let code: String = c
        .query_one(
            "SELECT code FROM outbox.live_messages WHERE id = $1",
            &[&second],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(got[1].headers["idempotency-key"], format!("\"{code}\""));
    assert_eq!(got[1].headers["content-type"], "application/json");
    // Provider id and the stored reply.
    let r = c
        .query_one(
            "SELECT label, providermessageid FROM api.service_message WHERE id = $1",
            &[&second],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, Option<String>>(0).as_deref(), Some("r-1"));
    assert_eq!(r.get::<_, Option<String>>(1).as_deref(), Some("r-1"));
    let reply: String = c
        .query_one(
            "SELECT content FROM api.service_message WHERE parent = $1 AND classcode = 'inbox'",
            &[&second],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(reply, "{\"id\":\"r-1\"}");
    assert_eq!(
        attempts(&c, second).await,
        vec![(1, "done".into(), None, Some(200))]
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_delivers_when_listen_is_unavailable() {
    let db = TestDb::new().await;
    let rx = Receiver::start(Behaviour::Ok("{}".into())).await;
    let mut tc = http_cfg(&db, &rx.url, "");
    // Nothing listens on port 1: LISTEN never connects.
    tc.config.listen_url = Some(outboxd::config::Secret::new(
        "postgres://postgres@127.0.0.1:1/nothing",
    ));
    tc.config.poll_interval = Duration::from_millis(200);
    let d = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let ids = [
        send(&c, "http.agent", "default", "/a", "{}").await,
        send(&c, "http.agent", "default", "/b", "{}").await,
    ];
    for id in ids {
        wait_state(&c, id, "submitted", T).await;
    }
    assert_eq!(rx.count(), 2);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_follow_the_schedule_then_fail_at_max_attempts() {
    let db = TestDb::new().await;
    let rx = Receiver::start(Behaviour::Status(503)).await;
    let tc = http_cfg(&db, &rx.url, "");
    let d = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let id = send(&c, "http.agent", "default", "/x", "{}").await;
    wait_state(&c, id, "failed", T).await;
    let a = attempts(&c, id).await;
    // retry = 3 delays → 4 attempts.
    assert_eq!(
        a,
        vec![
            (1, "retry".into(), Some("http-503".into()), Some(503)),
            (2, "retry".into(), Some("http-503".into()), Some(503)),
            (3, "retry".into(), Some("http-503".into()), Some(503)),
            (4, "failed".into(), Some("http-503".into()), Some(503)),
        ]
    );
    assert_eq!(rx.count(), 4);
    let last: String = c
        .query_one(
            "SELECT last_error_code FROM outbox.live_messages WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(last, "http-503");
    // A message's own max_attempts wins over the profile's.
    let one: Uuid = c
        .query_one(
            "SELECT id FROM api.send_message(NULL, 'http.agent', 'default', '/y', 's', '{}', pMaxAttempts => 1)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    wait_state(&c, one, "failed", T).await;
    assert_eq!(attempts(&c, one).await.len(), 1);
    // The operator repeats it once the receiver recovers.
    rx.set(Behaviour::Ok("{}".into()));
    let f = outboxd::ops::RetryFilter {
        error_code: Some("http-503".into()),
        ..Default::default()
    };
    let repeated = outboxd::ops::retry(&c, &f, |_, _| {}).await.unwrap();
    assert_eq!(repeated.len(), 2);
    wait_state(&c, id, "submitted", T).await;
    wait_state(&c, one, "submitted", T).await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_and_client_errors_fail_at_once() {
    let db = TestDb::new().await;
    let rx = Receiver::start(Behaviour::TooManyRequests(30)).await;
    let tc = http_cfg(&db, &rx.url, "");
    let d = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let id = send(&c, "http.agent", "default", "/x", "{}").await;
    wait_for(T, "the first attempt", || async {
        (!attempts(&c, id).await.is_empty()).then_some(())
    })
    .await;
    assert_eq!(
        attempts(&c, id).await,
        vec![(1, "retry".into(), Some("http-429".into()), Some(429))]
    );
    let wait: f64 = c
        .query_one(
            "SELECT extract(epoch FROM next_attempt_at - updated_at)::float8 FROM outbox.live_messages WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        (29.0..=31.0).contains(&wait),
        "Retry-After 30 s, not the 20 ms schedule: {wait}"
    );
    assert_eq!(state_of(&c, id).await, "prepared");

    rx.set(Behaviour::Status(404));
    let gone = send(&c, "http.agent", "default", "/gone", "{}").await;
    wait_state(&c, gone, "failed", T).await;
    assert_eq!(
        attempts(&c, gone).await,
        vec![(1, "failed".into(), Some("http-404".into()), Some(404))]
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_daemons_messages_are_reclaimed_after_the_lease_and_delivered() {
    let db = TestDb::new().await;
    let rx = Receiver::start(Behaviour::Hang).await;
    let mut tc = http_cfg(&db, &rx.url, "timeout = \"60s\"");
    tc.config.lease = Duration::from_millis(600);
    tc.config.poll_interval = Duration::from_millis(100);
    tc.config.worker_id = Some("doomed".into());
    let a = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let id = send(&c, "http.agent", "default", "/x", "{}").await;
    wait_for(T, "the request to hang at the receiver", || async {
        (rx.count() == 1).then_some(())
    })
    .await;
    assert_eq!(state_of(&c, id).await, "sending");
    a.crash().await;
    rx.set(Behaviour::Ok("{}".into()));
    tc.config.worker_id = Some("survivor".into());
    let b = Daemon::start(tc.config.clone());
    wait_state(&c, id, "submitted", T).await;
    let rows = c
        .query(
            "SELECT outcome, error_code, worker FROM outbox.attempts WHERE message_id = $1 ORDER BY id",
            &[&id],
        )
        .await
        .unwrap();
    let got: Vec<(String, Option<String>, Option<String>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "interrupted".into(),
                Some("lease-expired".into()),
                Some("doomed".into())
            ),
            ("done".into(), None, Some("survivor".into())),
        ]
    );
    // Same idempotency key both times: the receiver can de-duplicate.
    let r = rx.received();
    assert_eq!(r.len(), 2);
    assert_eq!(
        r[0].headers["idempotency-key"],
        r[1].headers["idempotency-key"]
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_heartbeat_keeps_a_slow_delivery_from_being_reclaimed() {
    let db = TestDb::new().await;
    let rx = Receiver::start(Behaviour::Delay(Duration::from_millis(1500))).await;
    let mut tc = http_cfg(&db, &rx.url, "timeout = \"10s\"");
    tc.config.lease = Duration::from_millis(300);
    tc.config.poll_interval = Duration::from_millis(50);
    let a = Daemon::start(tc.config.clone());
    let b = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let id = send(&c, "http.agent", "default", "/slow", "{}").await;
    wait_state(&c, id, "submitted", T).await;
    assert_eq!(rx.count(), 1, "five lease periods long, yet delivered once");
    assert_eq!(attempts(&c, id).await.len(), 1);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_deliver_each_message_exactly_once() {
    let db = TestDb::new().await;
    let rx = Receiver::start(Behaviour::Ok("{}".into())).await;
    let mut tc = http_cfg(&db, &rx.url, "");
    tc.config.batch_size = 7;
    tc.config.concurrency = 8;
    tc.config.poll_interval = Duration::from_millis(100);
    let c = db.client().await;
    let n = 300;
    c.batch_execute(&format!(
        "SELECT m.id FROM generate_series(1, {n}) i, \
           LATERAL api.send_message(NULL, 'http.agent', 'default', '/m', 's', format('{{\"i\":%s}}', i), pCode => 'k' || i) m"
    ))
    .await
    .unwrap();
    let a = Daemon::start(tc.config.clone());
    let b = Daemon::start(tc.config.clone());
    wait_for(T, "all messages submitted", || async {
        let left: i64 = c
            .query_one("SELECT count(*) FROM outbox.live_messages WHERE class = 'outbox' AND state <> 'submitted'", &[])
            .await
            .unwrap()
            .get(0);
        (left == 0).then_some(())
    })
    .await;
    let ra = a.stop().await;
    let rb = b.stop().await;
    let got = rx.received();
    let mut by_key: HashMap<String, usize> = HashMap::new();
    for r in &got {
        *by_key
            .entry(r.headers["idempotency-key"].clone())
            .or_default() += 1;
    }
    assert_eq!(got.len(), n);
    assert_eq!(by_key.len(), n);
    assert!(by_key.values().all(|&v| v == 1));
    assert_eq!(ra.delivered + rb.delivered, n as u64);
    assert!(
        ra.delivered > 0 && rb.delivered > 0,
        "both worked: {ra:?} {rb:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn term_drains_in_flight_deliveries_and_leaves_the_rest_prepared() {
    let db = TestDb::new().await;
    let rx = Receiver::start(Behaviour::Delay(Duration::from_millis(400))).await;
    let mut tc = http_cfg(&db, &rx.url, "");
    tc.config.concurrency = 2;
    tc.config.batch_size = 2;
    let d = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(send(&c, "http.agent", "default", &format!("/{i}"), "{}").await);
    }
    wait_for(T, "two deliveries in flight", || async {
        (rx.count() == 2).then_some(())
    })
    .await;
    let report = d.stop().await;
    assert_eq!(report.delivered, 2, "{report:?}");
    assert_eq!(report.released, 0);
    let states: HashMap<String, i64> = c
        .query(
            "SELECT state, count(*) FROM outbox.live_messages WHERE class = 'outbox' GROUP BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(states.get("submitted"), Some(&2));
    assert_eq!(states.get("prepared"), Some(&3));
    assert_eq!(states.get("sending"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_grace_period_unfinished_messages_are_handed_back() {
    let db = TestDb::new().await;
    let rx = Receiver::start(Behaviour::Hang).await;
    let mut tc = http_cfg(&db, &rx.url, "timeout = \"60s\"");
    tc.config.grace_period = Duration::from_millis(200);
    let d = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let id = send(&c, "http.agent", "default", "/x", "{}").await;
    wait_for(T, "the request to hang", || async {
        (rx.count() == 1).then_some(())
    })
    .await;
    let report = d.stop().await;
    assert_eq!(report.released, 1);
    assert_eq!(state_of(&c, id).await, "prepared");
    let r = c
        .query_one(
            "SELECT attempts, (SELECT error_code FROM outbox.attempts WHERE message_id = $1) FROM outbox.live_messages WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, i32>(0), 0, "not counted as an attempt");
    assert_eq!(r.get::<_, String>(1), "shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_rows_fail_with_clear_codes_while_others_flow() {
    let db = TestDb::new().await;
    let rx = Receiver::start(Behaviour::Ok("{}".into())).await;
    let spool = tempfile::tempdir().unwrap();
    let file_conf = format!(
        "[default]\npath = \"{}/out.jsonl\"\n",
        path_str(spool.path())
    );
    let tc = TestConfig::new(
        &db,
        &[("http", &http_conf(&rx.url, "")), ("file", &file_conf)],
    );
    let c = db.client().await;
    c.batch_execute(
        "INSERT INTO outbox.agents (type_code, code) VALUES ('custom.agent', 'pigeon.agent')",
    )
    .await
    .unwrap();
    let d = Daemon::start(tc.config.clone());
    let unknown_agent = send(&c, "pigeon.agent", "default", "roof", "coo").await;
    let unknown_profile = send(&c, "file.agent", "nope", "a", "x").await;
    let bad_json = send(&c, "http.agent", "default", "/x", "{not json").await;
    let not_configured = send(&c, "smtp.agent", "default", "a@b", "x").await;
    let good_http = send(&c, "http.agent", "default", "/ok", "{\"ok\":true}").await;
    let good_file = send(&c, "file.agent", "default", "a", "fine").await;
    for (id, code) in [
        (unknown_agent, "unknown-agent"),
        (unknown_profile, "unknown-profile"),
        (bad_json, "bad-content"),
        (not_configured, "connector-not-configured"),
    ] {
        wait_state(&c, id, "failed", T).await;
        let a = attempts(&c, id).await;
        assert_eq!(a.len(), 1, "{code}: failed at once");
        assert_eq!(a[0].2.as_deref(), Some(code));
    }
    wait_state(&c, good_http, "submitted", T).await;
    wait_state(&c, good_file, "submitted", T).await;
    assert_eq!(rx.count(), 1, "the bad JSON never reached the receiver");
    let text: String = c
        .query_one(
            "SELECT error_text FROM outbox.attempts WHERE message_id = $1",
            &[&unknown_profile],
        )
        .await
        .unwrap()
        .get(0);
    assert!(text.contains("nope") && text.contains("default"), "{text}");
    assert!(!d.is_finished(), "the daemon keeps running");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hup_reload_picks_up_a_new_profile_and_keeps_the_old_on_error() {
    let db = TestDb::new().await;
    let spool = tempfile::tempdir().unwrap();
    let base = format!("[default]\npath = \"{}/a.jsonl\"\n", path_str(spool.path()));
    let mut tc = TestConfig::new(&db, &[("file", &base)]);
    tc.config.poll_interval = Duration::from_millis(100);
    let d = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let conf_path = tc.config.connectors["file"].clone();
    // A broken file is refused; the old profiles stay.
    std::fs::write(&conf_path, "[default]\nbogus = 1\n").unwrap();
    d.controls.reload.notify_one();
    let first = send(&c, "file.agent", "default", "a", "1").await;
    wait_state(&c, first, "submitted", T).await;
    // A valid file with a new profile is taken.
    std::fs::write(
        &conf_path,
        format!(
            "{base}[extra]\npath = \"{}/b.jsonl\"\n",
            path_str(spool.path())
        ),
    )
    .unwrap();
    d.controls.reload.notify_one();
    wait_for(T, "the extra profile to work", || async {
        let id = send(&c, "file.agent", "extra", "a", "2").await;
        wait_for(T, "an outcome", || async {
            let s = state_of(&c, id).await;
            (s == "submitted" || s == "failed").then_some(s)
        })
        .await
        .eq("submitted")
        .then_some(())
    })
    .await;
    assert!(spool.path().join("b.jsonl").exists());
    d.stop().await;
}
