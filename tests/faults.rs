//! Fault injection (the fast cases; `bench/chaos` runs the long ones): kill -9 of a daemon
//! process mid-run, connections terminated under the daemon, a call abandoned by its timeout,
//! four daemons on one database, hostile sinks (resets, slow drip, huge bodies, garbage, 429
//! without Retry-After), bad rows.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

const T: Duration = Duration::from_secs(30);

async fn count_where(c: &tokio_postgres::Client, cond: &str) -> i64 {
    c.query_one(
        &format!("SELECT count(*) FROM outbox.live_messages WHERE class = 'outbox' AND {cond}"),
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

async fn enqueue_bulk(c: &tokio_postgres::Client, n: usize, profile: &str) {
    c.batch_execute(&format!(
        "SELECT m.id FROM generate_series(1, {n}) i, \
           LATERAL api.send_message(NULL, 'http.agent', '{profile}', '/m', 's', format('{{\"i\":%s}}', i), pCode => 'k' || i) m"
    ))
    .await
    .unwrap();
}

async fn all_submitted(c: &tokio_postgres::Client) {
    wait_for(T, "every message submitted", || async {
        (count_where(c, "state <> 'submitted'").await == 0).then_some(())
    })
    .await;
}

/// Request count per idempotency key.
fn per_key(rx: &Receiver) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in rx.received() {
        *m.entry(r.headers["idempotency-key"].trim_matches('"').to_string())
            .or_default() += 1;
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_run_loses_nothing_and_duplicates_only_what_was_in_flight() {
    let db = TestDb::new().await;
    let rx = Receiver::start(Behaviour::Delay(Duration::from_millis(20))).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("http.conf"), http_conf(&rx.url, "")).unwrap();
    let main = dir.path().join("outboxd.toml");
    std::fs::write(
        &main,
        format!(
            "database_url = \"{}\"\nlease = \"1s\"\npoll_interval = \"200ms\"\nconcurrency = 16\nbatch_size = 16\n\
             [connectors]\nhttp = \"http.conf\"\n",
            db.url
        ),
    )
    .unwrap();
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_outboxd"))
            .arg("--config")
            .arg(&main)
            .arg("run")
            .env_remove("DATABASE_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let c = db.client().await;
    let n = 400;
    enqueue_bulk(&c, n, "default").await;
    let mut first = spawn();
    wait_for(T, "a quarter delivered", || async {
        (rx.count() >= n / 4).then_some(())
    })
    .await;
    first.kill().unwrap(); // SIGKILL: no drain, no hand-back
    first.wait().unwrap();
    // A statement the dead daemon had sent (a claim) may still commit on the server: "in flight"
    // is what is left once its backends are gone.
    wait_for(T, "the killed daemon's backends to end", || async {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND application_name LIKE 'outboxd%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (n == 0).then_some(())
    })
    .await;
    let in_flight: HashSet<String> = c
        .query(
            "SELECT code FROM outbox.live_messages WHERE state = 'sending'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        in_flight.len() <= 16,
        "at most `concurrency` in flight: {}",
        in_flight.len()
    );
    let mut second = spawn();
    all_submitted(&c).await;
    second.kill().unwrap();
    second.wait().unwrap();
    let keys = per_key(&rx);
    assert_eq!(keys.len(), n, "every message reached the sink");
    for (k, times) in &keys {
        if *times > 1 {
            assert!(
                in_flight.contains(k),
                "{k} duplicated ({times}×) but was not in flight at the kill"
            );
            assert_eq!(*times, 2);
        }
    }
    let interrupted = c
        .query_one(
            "SELECT count(*) FROM outbox.attempts WHERE outcome = 'interrupted' AND error_code = 'lease-expired'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(
        interrupted as usize,
        in_flight.len(),
        "each in-flight message reclaimed once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_connections_are_replaced_and_listen_comes_back() {
    let db = TestDb::new().await;
    let rx = Receiver::start(Behaviour::Ok("{}".into())).await;
    let tc = TestConfig::new(&db, &[("http", &http_conf(&rx.url, ""))]);
    assert_eq!(tc.config.poll_interval, Duration::from_secs(60));
    let d = Daemon::start(tc.config.clone());
    let c = db.client().await;
    wait_listening(&c, T).await;
    enqueue_bulk(&c, 50, "default").await;
    all_submitted(&c).await;
    let killed: i64 = c
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
              WHERE datname = current_database() AND application_name LIKE 'outboxd%') t",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(killed >= 2, "the pool and the LISTEN connection: {killed}");
    // The listener reconnects (and wakes the claim loop); later messages arrive by NOTIFY
    // although the poll is a minute away.
    wait_listening(&c, T).await;
    let id = send(&c, "http.agent", "default", "/after", "{}").await;
    wait_state(&c, id, "submitted", Duration::from_secs(10)).await;
    assert_eq!(rx.count(), 51);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_daemons_deliver_each_message_once() {
    let db = TestDb::new().await;
    let rx = Receiver::start(Behaviour::Ok("{}".into())).await;
    let mut tc = TestConfig::new(&db, &[("http", &http_conf(&rx.url, ""))]);
    tc.config.batch_size = 10;
    tc.config.concurrency = 8;
    tc.config.pool_size = 3;
    let c = db.client().await;
    let n = 1000;
    enqueue_bulk(&c, n, "default").await;
    let daemons: Vec<Daemon> = (0..4).map(|_| Daemon::start(tc.config.clone())).collect();
    all_submitted(&c).await;
    let mut total = 0;
    for d in daemons {
        total += d.stop().await.delivered;
    }
    let keys = per_key(&rx);
    assert_eq!(rx.count(), n);
    assert_eq!(keys.len(), n);
    assert_eq!(total, n as u64);
}

/// A raw TCP server that reads one request per connection and misbehaves.
async fn hostile(kind: &'static str) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let _ = s.read(&mut buf).await;
                match kind {
                    "reset" => {
                        // Linger 0 makes the close an RST; it cannot block here (nothing unsent).
                        #[allow(deprecated)]
                        s.set_linger(Some(Duration::ZERO)).unwrap();
                        drop(s); // RST
                    }
                    "drip" => {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
                            .await;
                        for _ in 0..1000 {
                            if s.write_all(b"x").await.is_err() {
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                    "huge" => {
                        let body = vec![b'a'; 10 * 1024 * 1024];
                        let head =
                            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                        let _ = s.write_all(head.as_bytes()).await;
                        let _ = s.write_all(&body).await;
                    }
                    "garbage" => {
                        let _ = s.write_all(b"this is not HTTP at all\r\n\r\n").await;
                    }
                    _ => unreachable!(),
                }
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_sinks_end_in_the_right_state_with_stable_codes() {
    let db = TestDb::new().await;
    let ok_json = Receiver::start(Behaviour::Ok("{{{ not json".into())).await;
    let no_hint = Receiver::start(Behaviour::Status(429)).await;
    let profile = |name: &str, url: &str, extra: &str| {
        format!("[{name}]\nurl = \"{url}\"\nretry = [\"20ms\", \"20ms\"]\ntimeout = \"500ms\"\n{extra}\n")
    };
    let conf = [
        profile("reset", &hostile("reset").await, ""),
        profile("drip", &hostile("drip").await, ""),
        profile("huge", &hostile("huge").await, ""),
        profile("garbage", &hostile("garbage").await, ""),
        profile("badjson", &ok_json.url, ""),
        profile("nohint", &no_hint.url, ""),
    ]
    .concat();
    let tc = TestConfig::new(&db, &[("http", &conf)]);
    let d = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let mut ids = HashMap::new();
    for p in ["reset", "drip", "huge", "garbage", "badjson", "nohint"] {
        ids.insert(p, send(&c, "http.agent", p, "/x", "{}").await);
    }
    let expect_failed = [
        ("reset", "network"),
        ("drip", "timeout"),
        ("garbage", "network"),
        ("nohint", "http-429"),
    ];
    for (p, code) in expect_failed {
        wait_state(&c, ids[p], "failed", T).await;
        let a = attempts(&c, ids[p]).await;
        assert_eq!(
            a.len(),
            3,
            "{p}: the schedule (2 retries) then failed: {a:?}"
        );
        assert!(a.iter().all(|x| x.2.as_deref() == Some(code)), "{p}: {a:?}");
        assert_eq!(a[2].1, "failed");
    }
    // 2xx is success whatever the body; replies are stored, truncated to max_response_bytes.
    for p in ["huge", "badjson"] {
        wait_state(&c, ids[p], "submitted", T).await;
    }
    let len: i32 = c
        .query_one(
            "SELECT length(content) FROM outbox.live_messages WHERE parent = $1",
            &[&ids["huge"]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(len, 65536);
    assert_eq!(
        count_where(&c, "state IN ('sending', 'prepared')").await,
        0,
        "nothing stuck"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_fail_with_clear_codes_while_the_rest_flow() {
    let db = TestDb::new().await;
    let rx = Receiver::start(Behaviour::Ok("{}".into())).await;
    let tc = TestConfig::new(
        &db,
        &[("http", &http_conf(&rx.url, "max_content_bytes = 1000"))],
    );
    let d = Daemon::start(tc.config.clone());
    let c = db.client().await;
    // NUL bytes never get in: PostgreSQL text cannot hold them, the enqueue itself fails.
    let e = c
        .query_one(
            "SELECT id FROM api.send_message(NULL, 'http.agent', 'default', '/x', 's', $1)",
            &[&"a\u{0}b"],
        )
        .await
        .unwrap_err();
    assert_eq!(e.code().unwrap().code(), "22021", "{e}");
    let oversize = send(
        &c,
        "http.agent",
        "default",
        "/x",
        &format!("\"{}\"", "x".repeat(2000)),
    )
    .await;
    let empty = send(&c, "http.agent", "default", "/x", "").await;
    let not_json = send(&c, "http.agent", "default", "/x", "<xml/>").await;
    let good: Vec<Uuid> = {
        let mut v = Vec::new();
        for i in 0..20 {
            v.push(
                send(
                    &c,
                    "http.agent",
                    "default",
                    "/ok",
                    &format!("{{\"i\":{i}}}"),
                )
                .await,
            );
        }
        v
    };
    for (id, code) in [
        (oversize, "content-too-large"),
        (empty, "bad-content"),
        (not_json, "bad-content"),
    ] {
        wait_state(&c, id, "failed", T).await;
        assert_eq!(attempts(&c, id).await[0].2.as_deref(), Some(code));
    }
    for id in good {
        wait_state(&c, id, "submitted", T).await;
    }
    assert_eq!(rx.count(), 20, "only the good ones reached the sink");
    d.stop().await;
}

/// The pid of the backend a pooled connection of `db` talks to.
async fn pool_pid(db: &outboxd::db::Db) -> i32 {
    db.pool()
        .get()
        .await
        .unwrap()
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_call_stops_on_the_server_and_its_connection_is_not_reused() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let db_timeout = Duration::from_millis(500);
    // With the server-side statement_timeout (as the daemon runs), and without it, where only the
    // cancel request sent when the client gives up can stop the statement.
    let no_statement_timeout = format!("{}?options=-c%20statement_timeout%3D0", db.url);
    for (case, url) in [
        ("statement_timeout and cancel", db.url.clone()),
        ("cancel only", no_statement_timeout),
    ] {
        let id = send(&c, "file.agent", "default", "a", case).await;
        let claim = Uuid::new_v4();
        let claimed: Vec<Uuid> = c
            .query("SELECT id FROM outbox.claim('w', 10, 60000, $1)", &[&claim])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(claimed, vec![id]);
        let pool = outboxd::db::Db::connect(&url, 2, db_timeout, None).unwrap();
        let shown: String = pool
            .pool()
            .get()
            .await
            .unwrap()
            .query_one("SHOW statement_timeout", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            shown,
            if case == "cancel only" { "0" } else { "500ms" },
            "{case}"
        );
        let first = pool_pid(&pool).await;
        // The test holds the lock of the message's queue row (its lease) past db_timeout.
        let mut locker = db.client().await;
        let tx = locker.transaction().await.unwrap();
        tx.execute(
            "SELECT 1 FROM outbox.queue WHERE message_id = $1 FOR UPDATE",
            &[&id],
        )
        .await
        .unwrap();
        let e = pool
            .release("w", &[(id, claim)], Duration::from_secs(1))
            .await
            .unwrap_err();
        // statement_timeout equals db_timeout, so under load the server may end the statement
        // first (57014, and the connection stays healthy); otherwise the client gives up and
        // cancels it. Without statement_timeout only the client can.
        let abandoned = matches!(e, outboxd::db::DbError::Timeout(..));
        assert!(
            abandoned || (case != "cancel only" && e.code().as_deref() == Some("57014")),
            "{case}: {e}"
        );
        // The server stops the abandoned statement, and the connection that ran it is closed
        // rather than handed out again; all while the lock is still held.
        wait_for(T, "the abandoned statement to stop", || async {
            let running: i64 = c
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                      AND application_name = 'outboxd' AND state = 'active'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            (running == 0).then_some(())
        })
        .await;
        wait_for(T, "the abandoned connection to be closed", || async {
            if !abandoned {
                return Some(());
            }
            let open: i64 = c
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                    &[&first],
                )
                .await
                .unwrap()
                .get(0);
            (open == 0).then_some(())
        })
        .await;
        tx.rollback().await.unwrap();
        // The next call gets a healthy connection, and the abandoned release never ran.
        assert_eq!(state_of(&c, id).await, "sending", "{case}");
        if abandoned {
            assert_ne!(pool_pid(&pool).await, first, "{case}");
        }
        assert_eq!(
            pool.release("w", &[(id, claim)], Duration::from_secs(1))
                .await
                .unwrap(),
            1,
            "{case}"
        );
    }
}
