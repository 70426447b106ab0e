//! Operations: retention in batches (content cleared first, messages deleted later, one daemon at
//! a time), the daemon's retention task, and the operator CLI (status --json, cancel, retry
//! --failed --since, purge --dry-run, tail).
mod common;
use common::*;

use std::io::BufRead;
use std::process::Stdio;
use std::time::Duration;

use outboxd::config::Retention;
use outboxd::dispatch::retention::{self, Phase};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A message taken through send → done (or fail) by hand, finished `age` ago, with an attempt row,
/// a history and an inbox reply.
async fn finished(c: &tokio_postgres::Client, outcome: &str, age: &str) -> Uuid {
    let id = send(c, "file.agent", "default", "a@b", "secret reset link").await;
    c.execute("SELECT api.execute_object_action($1, 'send')", &[&id])
        .await
        .unwrap();
    c.execute("SELECT api.execute_object_action($1, $2)", &[&id, &outcome])
        .await
        .unwrap();
    c.execute(
        "INSERT INTO outbox.attempts (message_id, attempt, outcome) VALUES ($1, 1, 'done')",
        &[&id],
    )
    .await
    .unwrap();
    c.execute(
        "SELECT api.add_inbox($1, 'file.agent', NULL, 'default', 'a@b', 'reply', 'reply body')",
        &[&id],
    )
    .await
    .unwrap();
    c.execute(
        &format!(
            "UPDATE outbox.messages SET updated_at = now() - interval '{age}', \
             created_at = now() - interval '{age}' WHERE id = $1 OR parent = $1"
        ),
        &[&id],
    )
    .await
    .unwrap();
    // Its log rows are as old (they move to the log partition of that time, sql/022).
    for sql in [
        "UPDATE outbox.attempts SET finished_at = now() - $2::text::interval WHERE message_id = $1",
        "UPDATE outbox.history SET changed_at = now() - $2::text::interval WHERE message_id = $1",
    ] {
        c.execute(sql, &[&id, &age]).await.unwrap();
    }
    id
}

async fn content(c: &tokio_postgres::Client, id: Uuid) -> Option<Option<String>> {
    c.query_opt(
        "SELECT content FROM outbox.live_messages WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap()
    .map(|r| r.get(0))
}

async fn count(c: &tokio_postgres::Client, sql: &str, id: Uuid) -> i64 {
    c.query_one(sql, &[&id]).await.unwrap().get(0)
}

fn db_of(url: &str) -> outboxd::db::Db {
    outboxd::db::Db::connect(url, 2, Duration::from_secs(5), None).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_clears_content_then_deletes_in_batches_one_daemon_at_a_time() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let mut week_old = Vec::new();
    for i in 0..5 {
        week_old.push(finished(&c, if i % 2 == 0 { "done" } else { "fail" }, "10 days").await);
    }
    let mut ancient = Vec::new();
    for _ in 0..3 {
        ancient.push(finished(&c, "done", "60 days").await);
    }
    let fresh = finished(&c, "done", "1 hour").await;
    // Old but not finished: never touched.
    let waiting = send(&c, "file.agent", "default", "a@b", "still to send").await;
    c.execute(
        "UPDATE outbox.messages SET updated_at = now() - interval '90 days' WHERE id = $1",
        &[&waiting],
    )
    .await
    .unwrap();

    let r = Retention {
        content_after: Some(Duration::from_secs(7 * 86400)),
        delete_after: Some(Duration::from_secs(30 * 86400)),
        batch_size: 2,
        every: Duration::from_secs(3600),
    };
    let pool = db_of(&db.url);
    let preview = retention::preview(&pool, &r).await.unwrap();
    // 8 outbox messages and their 8 replies have content older than 7 days; 3 are past 30 days.
    assert_eq!((preview.content_rows, preview.delete_rows), (16, 3));

    // Another daemon purging holds the lock: this one backs off and changes nothing.
    let mut other = db.client().await;
    let tx = other.transaction().await.unwrap();
    tx.execute("SELECT pg_advisory_xact_lock(7310593858634612081)", &[])
        .await
        .unwrap();
    let busy = retention::run_once(&pool, &r, &CancellationToken::new(), |_, _, _| {})
        .await
        .unwrap();
    assert!(busy.busy);
    assert_eq!(
        content(&c, week_old[0]).await,
        Some(Some("secret reset link".into()))
    );
    tx.rollback().await.unwrap();

    let mut batches = Vec::new();
    let done = retention::run_once(&pool, &r, &CancellationToken::new(), |phase, n, _| {
        batches.push((phase, n))
    })
    .await
    .unwrap();
    assert_eq!(
        (done.contents_cleared, done.messages_deleted, done.busy),
        (16, 3, false)
    );
    assert!(
        batches.iter().all(|(_, n)| *n <= 2),
        "batches of at most 2: {batches:?}"
    );
    assert_eq!(
        batches.iter().filter(|(p, _)| *p == Phase::Content).count(),
        9,
        "{batches:?}"
    );

    for id in &week_old {
        assert_eq!(content(&c, *id).await, Some(None), "content cleared");
        let reply: Option<String> = c
            .query_one(
                "SELECT content FROM outbox.live_messages WHERE parent = $1",
                &[id],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(reply, None, "the reply's content too");
        assert_eq!(
            count(
                &c,
                "SELECT count(*) FROM outbox.attempts WHERE message_id = $1",
                *id
            )
            .await,
            1,
            "metadata stays"
        );
        assert!(
            count(
                &c,
                "SELECT count(*) FROM outbox.history WHERE message_id = $1",
                *id
            )
            .await
                >= 3
        );
    }
    for id in &ancient {
        assert_eq!(content(&c, *id).await, None, "deleted");
        for t in ["outbox.attempts", "outbox.history"] {
            let sql = format!("SELECT count(*) FROM {t} WHERE message_id = $1");
            assert_eq!(count(&c, &sql, *id).await, 0, "{t}");
        }
        assert_eq!(
            count(
                &c,
                "SELECT count(*) FROM outbox.live_messages WHERE parent = $1",
                *id
            )
            .await,
            0
        );
    }
    assert_eq!(
        content(&c, fresh).await,
        Some(Some("secret reset link".into()))
    );
    assert_eq!(
        content(&c, waiting).await,
        Some(Some("still to send".into()))
    );
    assert_eq!(state_of(&c, waiting).await, "prepared");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_runs_retention_on_its_own() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let old = finished(&c, "done", "2 days").await;
    let mut tc = TestConfig::new(&db, &[]);
    tc.config.retention = Retention {
        content_after: Some(Duration::from_secs(86400)),
        delete_after: None,
        batch_size: 10,
        every: Duration::from_millis(100),
    };
    let daemon = Daemon::start(tc.config.clone());
    wait_for(
        Duration::from_secs(10),
        "the daemon's retention round",
        || {
            let c = &c;
            async move { (content(c, old).await == Some(None)).then_some(()) }
        },
    )
    .await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_cli_status_cancel_retry_purge_and_tail() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("file.conf"),
        format!(
            "[default]\npath = \"{}/spool.jsonl\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let main = dir.path().join("outboxd.toml");
    std::fs::write(
        &main,
        format!(
            "database_url = \"{}\"\n[connectors]\nfile = \"file.conf\"\n",
            db.url
        ),
    )
    .unwrap();
    let c = db.client().await;

    // cancel: prepared → created; a second cancel is refused with the outbox's code.
    let p = send(&c, "file.agent", "default", "a@b", "x").await;
    let (ok, out, _) = cli::run(cli::outboxd(&main).arg("cancel").arg(p.to_string()));
    assert!(ok && out.contains(&format!("{p} created")), "{out}");
    let (ok, _, err) = cli::run(cli::outboxd(&main).arg("cancel").arg(p.to_string()));
    assert!(!ok && err.contains("ERR-400-032"), "{err}");

    // retry --failed --since: only the recent failure is repeated.
    let recent = finished(&c, "fail", "10 minutes").await;
    let older = finished(&c, "fail", "3 hours").await;
    let (ok, out, err) = cli::run(cli::outboxd(&main).args(["retry", "--failed", "--since", "1h"]));
    assert!(ok, "{err}");
    assert_eq!(out.trim(), recent.to_string());
    assert_eq!(state_of(&c, recent).await, "prepared");
    assert_eq!(state_of(&c, older).await, "failed");

    // status --json.
    let (ok, out, err) = cli::run(cli::outboxd(&main).args(["status", "--json"]));
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["queue"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!({"state": "failed", "agent": "file.agent", "count": 1})));
    assert_eq!(v["recent_failures"][0]["id"], older.to_string());

    // purge --dry-run reports, changes nothing; purge applies.
    let (ok, out, err) =
        cli::run(cli::outboxd(&main).args(["purge", "--dry-run", "--delete-after", "2h"]));
    assert!(ok, "{err}");
    assert!(out.contains("would delete 1 message(s)"), "{out}");
    assert_eq!(state_of(&c, older).await, "failed");
    let (ok, out, err) = cli::run(cli::outboxd(&main).args(["purge", "--delete-after", "2h"]));
    assert!(ok && out.contains("deleted 1 message(s)"), "{out}{err}");
    assert!(c
        .query_opt(
            "SELECT 1 FROM outbox.live_messages WHERE id = $1",
            &[&older]
        )
        .await
        .unwrap()
        .is_none());

    // tail: follows deliveries as the daemon records them. --from-start: without it, a tail
    // process slow to start (a loaded machine) could begin after the delivery below and miss it.
    let mut tail = cli::outboxd(&main)
        .args(["tail", "--from-start", "--interval", "50ms"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = tail.stdout.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    let tc = TestConfig::new(
        &db,
        &[(
            "file",
            &std::fs::read_to_string(dir.path().join("file.conf")).unwrap(),
        )],
    );
    let daemon = Daemon::start(tc.config.clone());
    let id = send(&c, "file.agent", "default", "a@b", "watch me").await;
    let line = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let l = rx.recv().await.expect("tail keeps running");
            if l.contains(&id.to_string()) {
                return l;
            }
        }
    })
    .await
    .expect("tail printed the delivery");
    assert!(line.contains(" file.agent default done - "), "{line}");
    assert!(line.ends_with("ms"), "{line}");
    let _ = tail.kill();
    let _ = tail.wait();
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_clears_the_variables_of_templated_messages() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.execute(
        "SELECT api.add_template('reset', 'text', 'Your code: {{ code }}', 'Reset', 'file.agent')",
        &[],
    )
    .await
    .unwrap();
    let id: Uuid = c
        .query_one(
            "SELECT api.send_template(NULL, NULL::text, 'default', 'a@b', 'reset', '{\"code\": \"314159\"}')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    for action in ["send", "done"] {
        c.execute("SELECT api.execute_object_action($1, $2)", &[&id, &action])
            .await
            .unwrap();
    }
    c.execute(
        "UPDATE outbox.messages SET updated_at = now() - interval '10 days' WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap();
    let r = Retention {
        content_after: Some(Duration::from_secs(7 * 86400)),
        delete_after: None,
        batch_size: 10,
        every: Duration::from_secs(3600),
    };
    let done = retention::run_once(&db_of(&db.url), &r, &CancellationToken::new(), |_, _, _| {})
        .await
        .unwrap();
    assert_eq!(done.contents_cleared, 1);
    let vars: serde_json::Value = c
        .query_one(
            "SELECT vars FROM outbox.message_templates WHERE message_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(vars, serde_json::json!({}), "the one-time code is gone");
}

/// Retention's content step also clears what the tasks keep of a message (sql/017): the body
/// stored for its read link (the read link then finds nothing, the read counts stay), its
/// template variables and its picture; `retention_preview` (`purge --dry-run`) counts them, and a
/// message with only a task body left counts as having content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_clears_task_bodies_variables_and_pictures() {
    let db = TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(
        "SELECT api.add_template('cover', 'text', 'Hi {{ name }}, read {{ read_url }}', NULL, 'file.agent'); \
         SELECT api.add_template('page', 'html', '<p>Reset: {{ link }}</p>'); \
         SELECT api.add_task('reset', 'cover', 'manual', '[\"a@b\"]', pBody => 'page');",
    )
    .await
    .unwrap();
    let run: i64 = c
        .query_one("SELECT api.run_task('reset')", &[])
        .await
        .unwrap()
        .get(0);
    // Three task messages: an old one with everything, an old one with only its body left, a
    // fresh one.
    let full = finished(&c, "done", "10 days").await;
    let bare = finished(&c, "done", "10 days").await;
    let fresh = finished(&c, "done", "1 hour").await;
    c.execute(
        "UPDATE outbox.messages SET content = NULL WHERE id = $1 OR parent = $1",
        &[&bare],
    )
    .await
    .unwrap();
    for (i, id) in [full, bare, fresh].iter().enumerate() {
        c.execute(
            "INSERT INTO outbox.task_messages (message_id, run_id, address, read_token, body, read_count) \
             VALUES ($1, $2, $3, $4, '<p>Reset: https://x/reset?k=SECRET</p>', 2)",
            &[id, &run, &format!("r{i}@b"), &format!("token-{i}")],
        )
        .await
        .unwrap();
    }
    c.execute(
        "INSERT INTO outbox.message_templates (message_id, template_version_id, vars) \
         SELECT $1, v.id, '{\"name\": \"Ann\", \"link\": \"SECRET\"}' FROM outbox.template_versions v \
           JOIN outbox.templates t ON t.id = v.template_id WHERE t.name = 'cover'",
        &[&full],
    )
    .await
    .unwrap();
    c.execute(
        "INSERT INTO outbox.message_images (message_id, file_name, mime, width, height, bytes) \
         VALUES ($1, 'card.png', 'image/png', 1, 1, '\\x89504e47')",
        &[&full],
    )
    .await
    .unwrap();

    let r = Retention {
        content_after: Some(Duration::from_secs(7 * 86400)),
        delete_after: None,
        batch_size: 10,
        every: Duration::from_secs(3600),
    };
    let pool = db_of(&db.url);
    let preview = retention::preview(&pool, &r).await.unwrap();
    // full + its reply, bare (its reply has no content left): 3; two task bodies.
    assert_eq!((preview.content_rows, preview.task_body_rows), (3, 2));

    let done = retention::run_once(&pool, &r, &CancellationToken::new(), |_, _, _| {})
        .await
        .unwrap();
    assert_eq!(done.contents_cleared, 3);
    let bodies = c
        .query(
            "SELECT message_id, body, read_count FROM outbox.task_messages ORDER BY address",
            &[],
        )
        .await
        .unwrap();
    let bodies: Vec<(Uuid, Option<String>, i32)> = bodies
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(bodies[0], (full, None, 2), "body cleared, reads kept");
    assert_eq!(bodies[1], (bare, None, 2));
    assert_eq!(bodies[2].0, fresh);
    assert!(bodies[2].1.is_some(), "the fresh body stays");
    let vars: serde_json::Value = c
        .query_one(
            "SELECT vars FROM outbox.message_templates WHERE message_id = $1",
            &[&full],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(vars, serde_json::json!({}));
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM outbox.message_images WHERE message_id = $1",
            full
        )
        .await,
        0,
        "the picture goes with the variables"
    );
    // The read link of a cleared message finds nothing; the fresh one still serves its page.
    for (token, found) in [("token-0", 0), ("token-1", 0), ("token-2", 1)] {
        let n = c
            .query("SELECT * FROM outbox.read_message($1)", &[&token])
            .await
            .unwrap()
            .len();
        assert_eq!(n, found, "{token}");
    }
    let again = retention::preview(&pool, &r).await.unwrap();
    assert_eq!((again.content_rows, again.task_body_rows), (0, 0));
}

#[tokio::test]
async fn the_logs_are_weekly_partitions_and_old_weeks_are_dropped_whole() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let id = send(&c, "file.agent", "default", "a@b", "hello").await;
    let week = |sql: &'static str| {
        let c = &c;
        async move { c.query_one(sql, &[&id]).await.unwrap().get::<_, String>(0) }
    };
    // This week's rows are in this week's partition (made by the migration, 4 weeks ahead).
    let this_week: String = c
        .query_one(
            "SELECT 'outbox.history_w' || to_char(date_trunc('week', now() AT TIME ZONE 'UTC'), 'YYYYMMDD')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        week("SELECT DISTINCT tableoid::regclass::text FROM outbox.history WHERE message_id = $1")
            .await,
        this_week
    );
    // A week three weeks back, with the message's history moved into it.
    let old: String = c
        .query_one(
            "SELECT 'history_w' || to_char(date_trunc('week', now() AT TIME ZONE 'UTC') - interval '21 days', 'YYYYMMDD')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    c.batch_execute(&format!(
        "CREATE TABLE outbox.{old} PARTITION OF outbox.history FOR VALUES \
         FROM ((date_trunc('week', now() AT TIME ZONE 'UTC') - interval '21 days') AT TIME ZONE 'UTC') \
         TO ((date_trunc('week', now() AT TIME ZONE 'UTC') - interval '14 days') AT TIME ZONE 'UTC')"
    ))
    .await
    .unwrap();
    c.execute(
        "UPDATE outbox.history SET changed_at = now() - interval '20 days' WHERE message_id = $1 AND action = 'create'",
        &[&id],
    )
    .await
    .unwrap();
    assert_eq!(
        week("SELECT tableoid::regclass::text FROM outbox.history WHERE message_id = $1 AND action = 'create'").await,
        format!("outbox.{old}")
    );
    // Kept 30 days: nothing goes. Kept 7 days: that week goes whole, this week stays.
    let dropped = |age: &'static str| {
        let c = &c;
        async move {
            c.query_one(
                "SELECT outbox.drop_log_partitions($1::text::interval)",
                &[&age],
            )
            .await
            .unwrap()
            .get::<_, i32>(0)
        }
    };
    assert_eq!(dropped("30 days").await, 0);
    assert_eq!(dropped("7 days").await, 1);
    let gone: bool = c
        .query_one(
            "SELECT to_regclass($1) IS NULL",
            &[&format!("outbox.{old}")],
        )
        .await
        .unwrap()
        .get(0);
    assert!(gone);
    assert_eq!(history_actions(&c, id).await, ["submit"]);
    // Making the weeks ahead again is a no-op.
    let made: i32 = c
        .query_one("SELECT outbox.ensure_log_partitions(4)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(made, 0);
}
