//! Tasks (issue 11): scheduled and recurring sends. The schedule under a controlled clock through
//! the SQL surface; exactly N executions under two schedulers; a crash in the middle of a 10k
//! fan-out ending with every recipient enqueued once; progress views against the messages'
//! states; read links recording reads; run_task through SQL, REST and the CLI.

mod common;

use std::time::Duration;

use chrono::{DateTime, Utc};
use common::*;
use outboxd::config::Secret;
use outboxd::db::Db;
use outboxd::schedule::{Clock, Scheduler, TasksConfig};
use serde_json::{json, Value};
use uuid::Uuid;

const T: Duration = Duration::from_secs(30);
const TOKEN: &str = "tasks-test-token-0123456789";

fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// A scheduler with a pool of its own (as another daemon would have).
fn scheduler(db: &TestDb, clock: &Clock, batch: usize, worker: &str) -> Scheduler {
    let pool = Db::connect(&db.url, 2, Duration::from_secs(20), None).unwrap();
    Scheduler::new(
        pool,
        clock.clone(),
        TasksConfig {
            batch_size: batch,
            ..Default::default()
        },
        Some("https://example.com/m/".into()),
        worker.into(),
    )
}

async fn add_cover(c: &tokio_postgres::Client) {
    c.execute(
        "SELECT api.add_template('cover', 'text', 'Hi {{ name }}, read {{ read_url }}', NULL, 'file.agent')",
        &[],
    )
    .await
    .unwrap();
    c.execute(
        "SELECT api.add_template('page', 'html', '<h1>{{ title }}</h1><p>for {{ name }}</p>')",
        &[],
    )
    .await
    .unwrap();
}

async fn one<T: for<'a> tokio_postgres::types::FromSql<'a>>(
    c: &tokio_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> T {
    c.query_one(sql, params).await.unwrap().get(0)
}

/// Some when execution `run` has every recipient enqueued.
async fn run_enqueued(c: &tokio_postgres::Client, run: i64) -> Option<()> {
    let state: String = one(
        c,
        "SELECT state FROM outbox.task_runs WHERE id = $1",
        &[&run],
    )
    .await;
    (state == "enqueued").then_some(())
}

/// "hourly at :45" created at 5:25 first runs at 6:45 (not 5:45), then every hour; a daily task
/// keeps its local time across the change to summer time; paused tasks do not run and resume
/// from the resume time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schedule_follows_the_clock() {
    let db = TestDb::new().await;
    let c = db.client().await;
    add_cover(&c).await;
    let clock = Clock::manual(utc("2026-12-02T05:25:00Z"));
    let s = scheduler(&db, &clock, 1000, "w1");
    c.execute(
        "SELECT api.add_task('hourly', 'cover', 'hourly :45', '[\"a@x\"]', pVars => '{\"name\": \"A\"}', \
         pNow => '2026-12-02T05:25:00Z')",
        &[],
    )
    .await
    .unwrap();
    let next = || async {
        one::<Option<DateTime<Utc>>>(&c, "SELECT next_run_at FROM api.task('hourly')", &[]).await
    };
    s.tick().await.unwrap();
    assert_eq!(next().await, Some(utc("2026-12-02T06:45:00Z")));
    clock.set(utc("2026-12-02T05:50:00Z"));
    assert_eq!(s.tick().await.unwrap().started, 0, "5:45 is not run");
    clock.set(utc("2026-12-02T06:45:00Z"));
    let t = s.tick().await.unwrap();
    assert_eq!((t.started, t.enqueued), (1, 1));
    assert_eq!(next().await, Some(utc("2026-12-02T07:45:00Z")));
    let due: DateTime<Utc> =
        one(&c, "SELECT due_at FROM api.task_runs WHERE run_no = 1", &[]).await;
    assert_eq!(due, utc("2026-12-02T06:45:00Z"));

    // Paused over 7:45 and 8:45, resumed at 9:10: next is 10:45 (the hour after the resume).
    c.execute(
        "SELECT api.pause_task('hourly', '2026-12-02T07:00:00Z')",
        &[],
    )
    .await
    .unwrap();
    clock.set(utc("2026-12-02T09:00:00Z"));
    assert_eq!(s.tick().await.unwrap().started, 0);
    c.execute(
        "SELECT api.resume_task('hourly', '2026-12-02T09:10:00Z')",
        &[],
    )
    .await
    .unwrap();
    clock.set(utc("2026-12-02T09:10:00Z"));
    s.tick().await.unwrap();
    assert_eq!(next().await, Some(utc("2026-12-02T10:45:00Z")));

    // Daily 09:30 in Berlin, created Saturday 28 March 2026: Sunday (summer time from 02:00)
    // 09:30 CEST is 07:30 UTC; the Friday before it would have been 08:30 UTC.
    clock.set(utc("2026-03-28T07:00:00Z"));
    c.execute(
        "SELECT api.add_task('daily', 'cover', 'daily 09:30', '[\"a@x\"]', pVars => '{\"name\": \"A\"}', \
         pTimeZone => 'Europe/Berlin', pMaxRuns => 2, pNow => '2026-03-28T07:00:00Z')",
        &[],
    )
    .await
    .unwrap();
    s.tick().await.unwrap();
    let daily = || async {
        one::<Option<DateTime<Utc>>>(&c, "SELECT next_run_at FROM api.task('daily')", &[]).await
    };
    assert_eq!(daily().await, Some(utc("2026-03-29T07:30:00Z")));
    clock.set(utc("2026-03-29T07:30:00Z"));
    s.tick().await.unwrap();
    assert_eq!(daily().await, Some(utc("2026-03-30T07:30:00Z")));
    clock.set(utc("2026-03-30T07:31:00Z"));
    s.tick().await.unwrap();
    let (state, runs): (String, i32) = {
        let r = c
            .query_one("SELECT state, run_count FROM api.task('daily')", &[])
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((state.as_str(), runs), ("finished", 2), "max count reached");

    // A cron expression the daemon cannot read disables the task, saying why.
    c.execute(
        "SELECT api.add_task('badcron', 'cover', 'cron 99 * * * *', '[\"a@x\"]')",
        &[],
    )
    .await
    .unwrap();
    s.tick().await.unwrap();
    let r = c
        .query_one("SELECT state, last_error FROM api.task('badcron')", &[])
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "paused");
    assert!(
        r.get::<_, String>(1).contains("cron expression"),
        "{:?}",
        r.get::<_, String>(1)
    );
}

/// A recurring task with max count 5, two schedulers (two pools) ticking together as the clock
/// moves in 10-minute steps over 12 hours, with a 3-hour outage in the middle (catch_up = once):
/// exactly 5 executions, one per due time, each recipient enqueued once per execution.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_schedulers_make_exactly_n_runs() {
    let db = TestDb::new().await;
    let c = db.client().await;
    add_cover(&c).await;
    let clock = Clock::manual(utc("2026-12-02T05:25:00Z"));
    let a = scheduler(&db, &clock, 1, "a");
    let b = scheduler(&db, &clock, 1, "b");
    c.execute(
        "SELECT api.add_task('n', 'cover', 'hourly 45', '[\"a@x\", \"b@x\", \"c@x\"]', \
         pVars => '{\"name\": \"all\"}', pMaxRuns => 5, pNow => '2026-12-02T05:25:00Z')",
        &[],
    )
    .await
    .unwrap();
    let mut started = 0;
    for step in 0..72 {
        clock.set(utc("2026-12-02T05:25:00Z") + chrono::Duration::minutes(10 * step));
        // 8:00 to 11:00: no scheduler runs.
        let h = clock.now().format("%H").to_string();
        if ("08".."11").contains(&h.as_str()) {
            continue;
        }
        let (ta, tb) = tokio::join!(a.tick(), b.tick());
        started += ta.unwrap().started + tb.unwrap().started;
    }
    assert_eq!(started, 5);
    let runs = c
        .query(
            "SELECT run_no, due_at, trigger, enqueued FROM api.task_runs ORDER BY run_no",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(i32, DateTime<Utc>, String, i32)> = runs
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let want = |n, t: &str, trig: &str| (n, utc(t), trig.to_string(), 3);
    assert_eq!(
        got,
        vec![
            want(1, "2026-12-02T06:45:00Z", "schedule"),
            want(2, "2026-12-02T07:45:00Z", "schedule"),
            // 8:45, 9:45 and 10:45 passed while down: one catch-up run for the newest.
            want(3, "2026-12-02T10:45:00Z", "catch_up"),
            want(4, "2026-12-02T11:45:00Z", "schedule"),
            want(5, "2026-12-02T12:45:00Z", "schedule"),
        ]
    );
    let (messages, distinct): (i64, i64) = {
        let r = c
            .query_one(
                "SELECT count(*), count(DISTINCT (m.address, tm.run_id)) FROM outbox.live_messages m \
                 JOIN outbox.task_messages tm ON tm.message_id = m.id",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((messages, distinct), (15, 15));
    let r = c
        .query_one(
            "SELECT state, run_count, skipped_count FROM api.task('n')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            r.get::<_, String>(0),
            r.get::<_, i32>(1),
            r.get::<_, i32>(2)
        ),
        ("finished".to_string(), 5, 2)
    );
}

/// 10,000 recipients from a view, batches of 1000. A test transaction holds the code of the
/// 5,500th recipient, so the sixth batch blocks in the middle of its INSERT; the scheduler is
/// killed there (its task aborted, its pool dropped), the blocking transaction rolls back, and
/// a second scheduler finishes the execution: every recipient has exactly one message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_fan_out_enqueues_every_recipient_once() {
    let db = TestDb::new().await;
    let c = db.client().await;
    add_cover(&c).await;
    c.batch_execute(
        "CREATE VIEW public.crowd AS \
           SELECT format('user%s@example.com', lpad(g::text, 5, '0')) AS address, \
                  jsonb_build_object('name', 'n' || g) AS vars \
             FROM generate_series(1, 10000) g; \
         GRANT SELECT ON public.crowd TO outboxd_owner;",
    )
    .await
    .unwrap();
    let task: Uuid = one(
        &c,
        "SELECT api.add_task('crowd', 'cover', 'manual', pSource => 'crowd', pBody => 'page', \
         pVars => '{\"title\": \"News\"}')",
        &[],
    )
    .await;
    let clock = Clock::manual(utc("2026-12-02T05:00:00Z"));
    let run: i64 = one(
        &c,
        "SELECT api.run_task('crowd', '2026-12-02T05:00:00Z')",
        &[],
    )
    .await;

    let mut blocker = db.client().await;
    let tx = blocker.transaction().await.unwrap();
    tx.execute(
        "INSERT INTO outbox.messages (agent_id, code, address) \
         SELECT id, outbox.task_message_code($1, 1, 'user05500@example.com'), 'blocker' \
           FROM outbox.agents WHERE code = 'file.agent'",
        &[&task],
    )
    .await
    .unwrap();

    let first = scheduler(&db, &clock, 1000, "first");
    let handle = tokio::spawn(async move { first.tick().await });
    wait_for(T, "the sixth batch to block on the held code", || async {
        let waiting: i64 = one(
            &c,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock'",
            &[],
        )
        .await;
        (waiting > 0).then_some(())
    })
    .await;
    let enqueued: i32 = one(
        &c,
        "SELECT enqueued FROM outbox.task_runs WHERE id = $1",
        &[&run],
    )
    .await;
    assert_eq!(enqueued, 5000, "five batches committed before the crash");
    handle.abort();
    assert!(handle.await.unwrap_err().is_cancelled());
    tx.rollback().await.unwrap();

    let second = scheduler(&db, &clock, 1000, "second");
    wait_for(T, "the execution to be enqueued", || async {
        second.tick().await.unwrap();
        run_enqueued(&c, run).await
    })
    .await;
    let r = c
        .query_one(
            "SELECT count(*), count(DISTINCT m.address), count(tm.message_id), \
                    count(DISTINCT tm.read_token), count(tm.body) \
               FROM outbox.live_messages m LEFT JOIN outbox.task_messages tm ON tm.message_id = m.id \
              WHERE m.code LIKE 'task-%'",
            &[],
        )
        .await
        .unwrap();
    let counts: Vec<i64> = (0..5).map(|i| r.get(i)).collect();
    assert_eq!(counts, vec![10000; 5]);
    let enqueued: i32 = one(
        &c,
        "SELECT enqueued FROM api.task_runs WHERE id = $1",
        &[&run],
    )
    .await;
    assert_eq!(enqueued, 10000);
    let vars: Value = one(
        &c,
        "SELECT mt.vars FROM outbox.message_templates mt JOIN outbox.live_messages m ON m.id = mt.message_id \
          WHERE m.address = 'user05500@example.com'",
        &[],
    )
    .await;
    assert_eq!(vars["name"], "n5500");
    assert_eq!(vars["title"], "News");
    assert!(vars["read_url"]
        .as_str()
        .unwrap()
        .starts_with("https://example.com/m/"));
}

struct Daemonized {
    _dir: tempfile::TempDir,
    _cfg: TestConfig,
    daemon: Daemon,
    base: String,
    spool: std::path::PathBuf,
}

async fn start_daemon(db: &TestDb) -> Daemonized {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool.jsonl");
    let conf = format!("[default]\npath = \"{}\"\n", path_str(&spool));
    let mut tc = TestConfig::new(db, &[("file", &conf)]);
    tc.config.http_listen = Some("127.0.0.1:0".parse().unwrap());
    tc.config.api_tokens = vec![Secret::new(TOKEN)];
    tc.config.poll_interval = Duration::from_millis(200);
    tc.config.tasks.poll_interval = Duration::from_millis(50);
    let daemon = Daemon::start(tc.config.clone());
    let controls = daemon.controls.clone();
    let addr = wait_for(Duration::from_secs(10), "the HTTP server", || {
        let c = controls.clone();
        async move { c.http_addr.get().copied() }
    })
    .await;
    Daemonized {
        _dir: dir,
        _cfg: tc,
        daemon,
        base: format!("http://{addr}"),
        spool,
    }
}

fn spool_lines(p: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A daemon with the file connector and the HTTP server: an execution started through SQL and
/// one through REST are fanned out and delivered; the progress view's numbers are those of the
/// messages; a recipient whose body cannot be rendered fails with the template's code; the read
/// link serves the body and records the first read time and the count; REST refuses without a
/// token, for an unknown task, and past the maximum; the OpenAPI document lists the endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executions_deliver_track_progress_and_record_reads() {
    let db = TestDb::new().await;
    let c = db.client().await;
    add_cover(&c).await;
    c.execute(
        "SELECT api.add_task('news', 'cover', 'manual', \
           '[{\"address\": \"ann@x\", \"vars\": {\"name\": \"Ann\"}}, \
             {\"address\": \"bob@x\", \"vars\": {\"name\": \"Bob\"}}, \
             \"nobody@x\"]', \
         pBody => 'page', pVars => '{\"title\": \"Winter <sale>\"}', pMaxRuns => 2)",
        &[],
    )
    .await
    .unwrap();
    let d = start_daemon(&db).await;
    let http = reqwest::Client::new();

    // Run 1 through SQL.
    let run1: i64 = one(&c, "SELECT api.run_task('news')", &[]).await;
    let settled = |run: i64| {
        let c = &c;
        async move {
            wait_for(T, "the execution to be enqueued and delivered", || async {
                let r = c
                    .query_one(
                        "SELECT state, pending FROM api.task_runs WHERE id = $1",
                        &[&run],
                    )
                    .await
                    .unwrap();
                (r.get::<_, String>(0) == "enqueued" && r.get::<_, i64>(1) == 0).then_some(())
            })
            .await
        }
    };
    settled(run1).await;
    let r = c
        .query_one(
            "SELECT enqueued, sent, failed, pending, read FROM api.task_runs WHERE id = $1",
            &[&run1],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            r.get::<_, i32>(0),
            r.get::<_, i64>(1),
            r.get::<_, i64>(2),
            r.get::<_, i64>(3),
            r.get::<_, i64>(4)
        ),
        (3, 2, 1, 0, 0)
    );
    // The same numbers straight from the messages.
    let states = c
        .query(
            "SELECT m.state, count(*) FROM outbox.live_messages m JOIN outbox.task_messages tm \
             ON tm.message_id = m.id WHERE tm.run_id = $1 GROUP BY m.state ORDER BY m.state",
            &[&run1],
        )
        .await
        .unwrap();
    let states: Vec<(String, i64)> = states.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        states,
        vec![("failed".to_string(), 1), ("submitted".to_string(), 2)]
    );
    // Who failed, and why.
    let r = c
        .query_one(
            "SELECT address, state, error_code, error_text FROM api.task_messages \
             WHERE run_id = $1 AND state = 'failed'",
            &[&run1],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "nobody@x");
    assert_eq!(r.get::<_, String>(2), "template-missing-var");
    assert!(
        r.get::<_, String>(3).contains("name"),
        "{}",
        r.get::<_, String>(3)
    );

    // The cover was delivered with its read link; opening it shows the body and counts.
    let lines = spool_lines(&d.spool);
    let ann = lines
        .iter()
        .find(|l| l["address"] == "ann@x")
        .expect("ann's message");
    let content = ann["content"].as_str().unwrap();
    let url = content
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no read link in {content}"));
    assert!(url.starts_with(&format!("{}/m/", d.base)), "{url}");
    for _ in 0..2 {
        let resp = http.get(url).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/html; charset=utf-8");
        assert_eq!(resp.headers()["referrer-policy"], "no-referrer");
        let page = resp.text().await.unwrap();
        assert_eq!(page, "<h1>Winter &lt;sale&gt;</h1><p>for Ann</p>");
    }
    let r = c
        .query_one(
            "SELECT first_read_at, last_read_at, read_count FROM api.task_messages WHERE address = 'ann@x'",
            &[],
        )
        .await
        .unwrap();
    let first: DateTime<Utc> = r.get(0);
    let last: DateTime<Utc> = r.get(1);
    assert!(first <= last);
    assert_eq!(r.get::<_, i32>(2), 2);
    let read: i64 = one(&c, "SELECT read FROM api.task_runs WHERE id = $1", &[&run1]).await;
    assert_eq!(read, 1);
    let r = http
        .get(format!("{}/m/{}", d.base, "A".repeat(32)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // REST: refused without a token and for an unknown task; run 2 through REST, then the
    // maximum of 2 is reached.
    let post = |path: String, token: Option<&'static str>| {
        let http = http.clone();
        async move {
            let mut req = http.post(path);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (st, v) = post(format!("{}/api/v1/task/news/run", d.base), None).await;
    assert_eq!((st, v["code"].as_u64()), (401, Some(40101)));
    let (st, v) = post(format!("{}/api/v1/task/nosuch/run", d.base), Some(TOKEN)).await;
    assert_eq!((st, v["code"].as_u64()), (404, Some(40401)), "{v}");
    let (st, v) = post(format!("{}/api/v1/task/news/run", d.base), Some(TOKEN)).await;
    assert_eq!(
        (st, v["ok"].as_u64(), v["code"].as_u64()),
        (200, Some(1), Some(0)),
        "{v}"
    );
    let run2 = v["data"]["run"].as_i64().unwrap();
    settled(run2).await;
    let sent: i64 = one(&c, "SELECT sent FROM api.task_runs WHERE id = $1", &[&run2]).await;
    assert_eq!(sent, 2);
    let (st, v) = post(format!("{}/api/v1/task/news/run", d.base), Some(TOKEN)).await;
    assert_eq!((st, v["code"].as_u64()), (400, Some(40002)), "{v}");
    assert!(v["msg"].as_str().unwrap().contains("maximum"), "{v}");
    assert_eq!(spool_lines(&d.spool).len(), 4);

    let doc: Value = http
        .get(format!("{}/api/v1/openapi.json", d.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let op = &doc["paths"]["/api/v1/task/{id}/run"]["post"];
    for code in ["200", "401", "404", "400"] {
        assert!(op["responses"][code].is_object(), "{code}: {op}");
    }
    d.daemon.stop().await;
}

/// `outboxd task add|list|show|run|pause|resume`, with the cron expression checked before saving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_manages_tasks() {
    let db = TestDb::new().await;
    let c = db.client().await;
    add_cover(&c).await;
    let dir = tempfile::tempdir().unwrap();
    let main = dir.path().join("outboxd.toml");
    std::fs::write(&main, format!("database_url = \"{}\"\n", db.url)).unwrap();
    let recipients = dir.path().join("to.json");
    std::fs::write(
        &recipients,
        json!([{"address": "ann@x", "vars": {"name": "Ann"}}, "bob@x"]).to_string(),
    )
    .unwrap();
    let vars = dir.path().join("vars.json");
    std::fs::write(&vars, r#"{"name": "friend", "title": "Hello"}"#).unwrap();

    let (ok, _, err) = cli::run(
        cli::outboxd(&main)
            .args([
                "task",
                "add",
                "weekly",
                "--cover",
                "cover",
                "--schedule",
                "cron 0 9 * * FUNDAY",
                "--recipients",
            ])
            .arg(&recipients),
    );
    assert!(!ok);
    assert!(err.contains("cron expression"), "{err}");
    let n: i64 = one(&c, "SELECT count(*) FROM outbox.tasks", &[]).await;
    assert_eq!(n, 0, "refused before saving");

    let (ok, out, err) = cli::run(
        cli::outboxd(&main)
            .args([
                "task",
                "add",
                "weekly",
                "--cover",
                "cover",
                "--body",
                "page",
                "--schedule",
                "cron 0 9 * * MON",
                "--zone",
                "America/New_York",
                "--max-runs",
                "3",
                "--recipients",
            ])
            .arg(&recipients)
            .arg("--vars")
            .arg(&vars),
    );
    assert!(ok, "{err}");
    let id: Uuid = out.trim().parse().unwrap();
    let (ok, out, _) = cli::run(cli::outboxd(&main).args(["task", "list"]));
    assert!(ok);
    assert!(
        out.starts_with("weekly\tactive\tcron 0 9 * * MON\tAmerica/New_York\t-\t0/3"),
        "{out}"
    );
    let (ok, out, err) = cli::run(cli::outboxd(&main).args(["task", "run", "weekly"]));
    assert!(ok, "{err}");
    let run_id: i64 = out.trim().parse().unwrap();
    let (trigger, task): (String, Uuid) = {
        let r = c
            .query_one(
                "SELECT trigger, task_id FROM api.task_runs WHERE id = $1",
                &[&run_id],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((trigger.as_str(), task), ("manual", id));
    // Fanned out by a scheduler, then shown with its recipients not sent yet.
    let clock = Clock::manual(Utc::now());
    scheduler(&db, &clock, 1000, "w").tick().await.unwrap();
    let (ok, out, err) = cli::run(cli::outboxd(&main).args(["task", "show", &id.to_string()]));
    assert!(ok, "{err}");
    assert!(out.contains("task weekly"), "{out}");
    assert!(out.contains("#1\t"), "{out}");
    assert!(out.contains("manual\tenqueued\t2\t0\t0\t2\t0"), "{out}");
    assert!(out.contains("ann@x\tprepared"), "{out}");

    let (ok, _, err) = cli::run(cli::outboxd(&main).args(["task", "pause", "weekly"]));
    assert!(ok, "{err}");
    let state: String = one(&c, "SELECT state FROM api.task('weekly')", &[]).await;
    assert_eq!(state, "paused");
    let (ok, _, err) = cli::run(cli::outboxd(&main).args(["task", "resume", "weekly"]));
    assert!(ok, "{err}");
    let state: String = one(&c, "SELECT state FROM api.task('weekly')", &[]).await;
    assert_eq!(state, "active");
    let (ok, _, err) = cli::run(cli::outboxd(&main).args(["task", "run", "nosuch"]));
    assert!(!ok);
    assert!(err.contains("ERR-400-060"), "{err}");
}

/// The SQL surface refuses what it cannot run, with its codes; applications may manage tasks
/// but not read the tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tasks_are_refused_with_codes() {
    let db = TestDb::new().await;
    let c = db.client().await;
    add_cover(&c).await;
    for (sql, code) in [
        (
            "SELECT api.add_task('x', 'nosuch', 'manual', '[\"a\"]')",
            "ERR-400-040",
        ),
        (
            "SELECT api.add_task('x', 'cover', 'weekly 3', '[\"a\"]')",
            "ERR-400-062",
        ),
        (
            "SELECT api.add_task('x', 'cover', 'hourly 61', '[\"a\"]')",
            "ERR-400-062",
        ),
        (
            "SELECT api.add_task('x', 'cover', 'manual', '[\"a\"]', pTimeZone => 'Mars/Base')",
            "ERR-400-062",
        ),
        (
            "SELECT api.add_task('x', 'cover', 'once 2020-01-01 00:00', '[\"a\"]')",
            "ERR-400-062",
        ),
        (
            "SELECT api.add_task('x', 'cover', 'manual', '[\"a\", \"a\"]')",
            "ERR-400-062",
        ),
        (
            "SELECT api.add_task('x', 'cover', 'manual', '[{\"vars\": {}}]')",
            "ERR-400-062",
        ),
        (
            "SELECT api.add_task('x', 'cover', 'manual', pSource => 'x; DROP TABLE y')",
            "ERR-400-063",
        ),
        (
            "SELECT api.add_task('x', 'cover', 'manual', pSource => 'outbox.messages')",
            "ERR-400-063",
        ),
        ("SELECT api.add_task('x', 'cover', 'manual')", "ERR-400-062"),
        ("SELECT api.run_task('nosuch')", "ERR-400-060"),
    ] {
        let e = c.execute(sql, &[]).await.unwrap_err();
        let msg = e
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_default();
        assert!(msg.starts_with(code), "{sql}: {msg}");
    }
    c.execute(
        "SELECT api.add_task('x', 'cover', 'manual', '[\"a\"]')",
        &[],
    )
    .await
    .unwrap();
    let e = c
        .execute(
            "SELECT api.add_task('x', 'cover', 'manual', '[\"a\"]')",
            &[],
        )
        .await
        .unwrap_err();
    assert!(e
        .as_db_error()
        .unwrap()
        .message()
        .starts_with("ERR-400-061"));

    let app = TestRole::new("outboxd_app").await;
    let ac = app.client(&db).await;
    let run: i64 = one(&ac, "SELECT api.run_task('x')", &[]).await;
    assert!(run > 0);
    let n: i64 = one(&ac, "SELECT count(*) FROM api.task_runs", &[]).await;
    assert_eq!(n, 1);
    let e = ac
        .execute("SELECT count(*) FROM outbox.tasks", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "42501");
    let e = ac
        .execute("SELECT * FROM outbox.lock_task_run()", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "the fan-out is the daemon's");
}

/// A daemon session of this database, as pg_stat_activity shows it (live, unlike the cumulative
/// statistics, which are flushed up to 10 s late).
#[derive(Debug, PartialEq)]
struct Session {
    pid: i32,
    /// When its last statement started.
    last_statement: Option<DateTime<Utc>>,
    state: Option<String>,
}

/// Every daemon session, and whether it is idle and its last statement began over 500 ms ago.
async fn daemon_sessions(c: &tokio_postgres::Client) -> Vec<(Session, bool)> {
    c.query(
        "SELECT pid, query_start, state, state = 'idle' AND \
                coalesce(clock_timestamp() - query_start > interval '500 milliseconds', false) \
           FROM pg_stat_activity \
          WHERE datname = current_database() AND application_name LIKE 'outboxd%' \
            AND pid <> pg_backend_pid() \
          ORDER BY pid",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| {
        let s = Session {
            pid: r.get(0),
            last_statement: r.get(1),
            state: r.get(2),
        };
        (s, r.get(3))
    })
    .collect()
}

/// A daemon with the file connector (its poll: TestConfig's 60 s) and the given controls; the
/// directory holds its spool.
fn quiet_daemon(
    db: &TestDb,
    controls: outboxd::dispatch::Controls,
) -> (tempfile::TempDir, TestConfig, Daemon) {
    let dir = tempfile::tempdir().unwrap();
    let conf = format!(
        "[default]\npath = \"{}\"\n",
        path_str(&dir.path().join("spool.jsonl"))
    );
    let mut tc = TestConfig::new(db, &[("file", &conf)]);
    // The retry interval, which was the tick of every scheduler before sql/021.
    tc.config.tasks.poll_interval = Duration::from_millis(20);
    let daemon = Daemon::start_with(tc.config.clone(), controls);
    (dir, tc, daemon)
}

/// Issue 9, "idle: no queries between polls": an idle daemon with the scheduler on (and a task
/// planned for later) runs no statement at all between its 60 s polls — every daemon session's
/// last statement stays the same over a window in which a scheduler ticking at
/// tasks.poll_interval (20 ms here) would have run 150 ticks. Work still starts at once: an
/// api.run_task is fanned out on its NOTIFY, and a task added now and due in a few seconds is
/// planned on its NOTIFY and run at its time, both long before the next poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_daemon_makes_no_task_queries_between_polls() {
    let db = TestDb::new().await;
    let c = db.client().await;
    add_cover(&c).await;
    c.execute(
        "SELECT api.add_task('daily', 'cover', 'daily 09:30', '[\"ann@x\"]')",
        &[],
    )
    .await
    .unwrap();
    c.execute(
        "SELECT api.add_task('news', 'cover', 'manual', '[\"bob@x\"]')",
        &[],
    )
    .await
    .unwrap();
    let (_dir, _tc, daemon) = quiet_daemon(&db, Default::default());
    wait_listening(&c, T).await;
    wait_for(T, "the daily task planned", || async {
        one::<Option<DateTime<Utc>>>(
            &c,
            "SELECT next_run_at FROM outbox.tasks WHERE name = 'daily'",
            &[],
        )
        .await
    })
    .await;
    let before = wait_for(T, "every daemon session idle for 500 ms", || async {
        let s = daemon_sessions(&c).await;
        s.iter().all(|(_, quiet)| *quiet).then_some(s)
    })
    .await;
    assert!(
        before.len() >= 3,
        "pool, scheduler and LISTEN sessions: {before:?}"
    );
    // The measurement window: nothing to wait for, the assertion is that nothing happens in it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sessions = |s: Vec<(Session, bool)>| s.into_iter().map(|(s, _)| s).collect::<Vec<_>>();
    assert_eq!(
        sessions(daemon_sessions(&c).await),
        sessions(before),
        "no daemon session ran a statement between polls"
    );

    let run: i64 = one(&c, "SELECT api.run_task('news')", &[]).await;
    wait_for(Duration::from_secs(10), "the manual run fanned out", || {
        run_enqueued(&c, run)
    })
    .await;

    c.execute(
        "SELECT api.add_task('soon', 'cover', 'once ' || to_char(now() AT TIME ZONE 'UTC' \
           + interval '3 seconds', 'YYYY-MM-DD HH24:MI:SS'), '[\"cy@x\"]')",
        &[],
    )
    .await
    .unwrap();
    wait_for(
        Duration::from_secs(15),
        "the new task run at its time",
        || async {
            let n: i64 = one(
                &c,
                "SELECT count(*) FROM outbox.task_runs r JOIN outbox.tasks t ON t.id = r.task_id \
              WHERE t.name = 'soon' AND r.trigger = 'schedule' AND r.state = 'enqueued'",
                &[],
            )
            .await;
            (n == 1).then_some(())
        },
    )
    .await;
    daemon.stop().await;
}

/// A running scheduler sleeps on its clock, not on real time: a task added under a manual clock
/// is planned on its NOTIFY, and runs when the test moves the clock to its due time — with
/// nothing else to wake the scheduler (the next poll is 60 s away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_scheduler_wakes_when_its_clock_reaches_the_due_time() {
    let db = TestDb::new().await;
    let c = db.client().await;
    add_cover(&c).await;
    let clock = Clock::manual(utc("2026-12-02T05:25:00Z"));
    let controls = outboxd::dispatch::Controls {
        clock: clock.clone(),
        ..Default::default()
    };
    let (_dir, _tc, daemon) = quiet_daemon(&db, controls);
    wait_listening(&c, T).await;
    c.execute(
        "SELECT api.add_task('hourly', 'cover', 'hourly 45', '[\"ann@x\"]', pNow => $1)",
        &[&clock.now()],
    )
    .await
    .unwrap();
    let next_run = || async {
        one::<Option<DateTime<Utc>>>(
            &c,
            "SELECT next_run_at FROM outbox.tasks WHERE name = 'hourly'",
            &[],
        )
        .await
    };
    let next = wait_for(T, "the task planned", next_run).await;
    assert_eq!(next, utc("2026-12-02T06:45:00Z"));
    let runs = || async {
        one::<i64>(
            &c,
            "SELECT count(*) FROM outbox.task_runs WHERE state = 'enqueued'",
            &[],
        )
        .await
    };
    assert_eq!(runs().await, 0);

    clock.set(utc("2026-12-02T06:45:00Z"));
    wait_for(Duration::from_secs(10), "the run at 6:45", || async {
        (runs().await == 1).then_some(())
    })
    .await;
    assert_eq!(next_run().await, Some(utc("2026-12-02T07:45:00Z")));
    daemon.stop().await;
}
