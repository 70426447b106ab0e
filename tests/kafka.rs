//! The Kafka trigger (issue 12) end to end against a real Kafka-protocol broker: the `tansu`
//! broker (`.ci/kafka` builds it once per machine), started per test on a free loopback port with
//! in-memory storage, and fed with the same Rust client the daemon uses (rskafka). Enqueue requests
//! are delivered by a daemon with the file connector, with the deterministic `kafka:…` code or the
//! Idempotency-Key header; task-run records run tasks; poison records go to the dead-letter table
//! and topic while the records after them are enqueued; batches that crash between the enqueue and
//! the COMMIT, and a daemon aborted mid-stream, end with every record handled exactly once; a
//! restarted daemon resumes from the committed offset.

mod common;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use outboxd::kafka::KafkaConfig;
use rskafka::client::partition::{Compression, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use rskafka::record::Record;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(20);

/// A tansu broker, killed on drop.
struct Broker {
    child: Child,
    addr: String,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The broker binary: `$OUTBOXD_TANSU`, or where `.ci/kafka` caches it.
fn tansu_path() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("OUTBOXD_TANSU").filter(|p| !p.is_empty()) {
        return p.into();
    }
    let cache = std::env::var_os("OUTBOXD_CACHE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/outboxd")
        });
    cache.join("tansu-0.6.0/bin/tansu")
}

impl Broker {
    /// Starts tansu on a free port (picked by binding :0 and releasing it; another process may
    /// take it in between, so a broker that exits at once is started again on another port).
    async fn start() -> Broker {
        let bin = tansu_path();
        assert!(
            bin.exists(),
            "the Kafka tests need the tansu broker at {} — run `bash .ci/kafka` (it builds it once \
             and prints its path) or set OUTBOXD_TANSU",
            bin.display()
        );
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let url = format!("tcp://127.0.0.1:{port}");
            let mut child = Command::new(&bin)
                .arg("broker")
                .args(["--listener-url", &url, "--advertised-listener-url", &url])
                .args(["--storage-engine", "memory://tansu/"])
                .args(["--cluster-id", "outboxd-test"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start tansu");
            let addr = format!("127.0.0.1:{port}");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // exited (port taken?): try another port
                }
                if tokio::net::TcpStream::connect(&addr).await.is_ok() {
                    return Broker { child, addr };
                }
                if tokio::time::Instant::now() >= deadline {
                    let _ = child.kill();
                    panic!("tansu did not listen on {addr} within 20s");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        panic!("tansu did not start on any of 5 ports");
    }

    async fn client(&self) -> Client {
        ClientBuilder::new(vec![self.addr.clone()])
            .build()
            .await
            .expect("connect to tansu")
    }
}

async fn create_topic(client: &Client, topic: &str, partitions: i32) {
    client
        .controller_client()
        .unwrap()
        .create_topic(topic, partitions, 1, 5_000)
        .await
        .expect("create topic");
}

/// Produces records (headers, value) to partition 0 of `topic`.
/// One record to produce: its headers and value.
type Rec<'a> = (Vec<(&'a str, &'a str)>, Vec<u8>);

async fn produce(client: &Client, topic: &str, records: Vec<Rec<'_>>) {
    let pc = client
        .partition_client(topic, 0, UnknownTopicHandling::Retry)
        .await
        .unwrap();
    let records = records
        .into_iter()
        .map(|(headers, value)| Record {
            key: None,
            value: Some(value),
            headers: headers
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect::<BTreeMap<_, _>>(),
            timestamp: chrono::Utc::now(),
        })
        .collect();
    pc.produce(records, Compression::NoCompression)
        .await
        .expect("produce");
}

fn send_body(address: &str, extra: Value) -> Vec<u8> {
    let mut v = json!({"agent": "file.agent", "address": address, "subject": "hi", "content": "from kafka"});
    if let (Value::Object(m), Value::Object(e)) = (&mut v, extra) {
        m.extend(e);
    }
    v.to_string().into_bytes()
}

fn kafka_config(broker: &Broker, send: Option<&str>, task: Option<&str>) -> KafkaConfig {
    KafkaConfig {
        brokers: vec![broker.addr.clone()],
        send_topic: send.map(str::to_string),
        task_topic: task.map(str::to_string),
        fetch_wait: Duration::from_millis(100),
        metadata_interval: Duration::from_millis(200),
        ..KafkaConfig::default()
    }
}

/// A daemon config with the file connector spooling to `spool.jsonl` in a temp dir, its sessions
/// running as the daemon role.
struct Setup {
    tc: TestConfig,
    spool: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn daemon_config(db: &TestDb, kafka: KafkaConfig) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool.jsonl");
    let conf = format!("[default]\npath = \"{}\"\n", path_str(&spool));
    let mut tc = TestConfig::new(db, &[("file", &conf)]);
    tc.config.poll_interval = Duration::from_millis(100);
    tc.config.tasks.poll_interval = Duration::from_millis(50);
    tc.config.kafka = Some(kafka);
    // As shipped: the daemon's sessions run as outboxd_daemon, so the trigger's grants are tested.
    tc.config.database_url =
        outboxd::config::Secret::new(outboxd::db::with_session_role(&db.url, "outboxd_daemon"));
    Setup {
        tc,
        spool,
        _dir: dir,
    }
}

fn spool(p: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

async fn next_offset(c: &tokio_postgres::Client, topic: &str) -> Option<i64> {
    c.query_opt(
        "SELECT next_offset FROM api.kafka_offsets WHERE consumer_group = 'outboxd' AND topic = $1 AND partition = 0",
        &[&topic],
    )
    .await
    .unwrap()
    .map(|r| r.get(0))
}

async fn wait_offset(c: &tokio_postgres::Client, topic: &str, n: i64) {
    wait_for(
        T,
        &format!("the committed offset of {topic} to reach {n}"),
        || async { (next_offset(c, topic).await == Some(n)).then_some(()) },
    )
    .await
}

/// Enqueue requests end to end: each record becomes one delivered message; a record without a
/// code gets `kafka:<topic>:<partition>:<offset>`, the Idempotency-Key header is the code unless
/// the body has one, and a record repeating a known code is answered with the existing message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_requests_are_delivered_with_their_codes() {
    let broker = Broker::start().await;
    let kc = broker.client().await;
    create_topic(&kc, "outbox.send", 1).await;
    produce(
        &kc,
        "outbox.send",
        vec![
            (vec![], send_body("ann@example.com", json!({}))),
            (
                vec![("Idempotency-Key", "order-42")],
                send_body("bob@example.com", json!({})),
            ),
            (
                vec![("Idempotency-Key", "ignored")],
                send_body("cy@example.com", json!({"code": "own-code"})),
            ),
            // The same request again (a producer's retry): the same message, not a new one.
            (
                vec![("Idempotency-Key", "order-42")],
                send_body("bob@example.com", json!({})),
            ),
        ],
    )
    .await;
    let db = TestDb::new().await;
    let c = db.client().await;
    let mut setup = daemon_config(&db, kafka_config(&broker, Some("outbox.send"), None));
    setup.tc.config.http_listen = Some("127.0.0.1:0".parse().unwrap());
    let (tc, spool_path) = (&setup.tc, &setup.spool);
    let daemon = Daemon::start(tc.config.clone());
    wait_offset(&c, "outbox.send", 4).await;
    // The records are counted by topic and outcome (the repeated one too: it was answered).
    let addr = *daemon
        .controls
        .http_addr
        .get()
        .expect("the HTTP server listens");
    let metrics = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .contains(r#"outboxd_kafka_records_total{topic="outbox.send",outcome="enqueued"} 4"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"outboxd_kafka_lag{topic="outbox.send",partition="0"} 0"#),
        "{metrics}"
    );
    let lines = wait_for(T, "three deliveries", || async {
        let l = spool(spool_path);
        (l.len() >= 3).then_some(l)
    })
    .await;
    let mut got: Vec<(String, String)> = lines
        .iter()
        .map(|l| {
            (
                l["code"].as_str().unwrap().to_string(),
                l["address"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("kafka:outbox.send:0:0".into(), "ann@example.com".into()),
            ("order-42".into(), "bob@example.com".into()),
            ("own-code".into(), "cy@example.com".into()),
        ]
    );
    let n: i64 = c
        .query_one("SELECT count(*) FROM outbox.live_messages", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3, "the repeated record did not enqueue a second message");
    let dead: i64 = c
        .query_one("SELECT count(*) FROM api.kafka_dead_letters", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(dead, 0);
    daemon.stop().await;
}

/// Poison records (not JSON, an unknown field, an unknown agent, a task that does not exist) are
/// written to the dead-letter table with the REST code and reason, and produced to the dead-letter
/// topic with an `outboxd-reason` header; the good records around them are enqueued and run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_are_dead_lettered_and_the_rest_handled() {
    let broker = Broker::start().await;
    let kc = broker.client().await;
    for t in ["in.send", "in.tasks", "in.dead"] {
        create_topic(&kc, t, 1).await;
    }
    let db = TestDb::new().await;
    let c = db.client().await;
    c.execute(
        "SELECT api.add_template('cover', 'text', 'Hello {{ name }}', NULL, 'file.agent')",
        &[],
    )
    .await
    .unwrap();
    c.execute(
        "SELECT api.add_task('news', 'cover', 'manual', '[{\"address\": \"ann@x\", \"vars\": {\"name\": \"Ann\"}}]')",
        &[],
    )
    .await
    .unwrap();
    produce(
        &kc,
        "in.send",
        vec![
            (vec![], b"{not json".to_vec()),
            (vec![], send_body("a@x", json!({"colour": "red"}))),
            (vec![], send_body("b@x", json!({"agent": "no.such.agent"}))),
            (vec![], send_body("good@x", json!({}))),
        ],
    )
    .await;
    produce(
        &kc,
        "in.tasks",
        vec![
            (vec![], br#"{"task": "news"}"#.to_vec()),
            (vec![], br#"{"task": "nope"}"#.to_vec()),
            (vec![], b"news".to_vec()),
        ],
    )
    .await;
    let mut k = kafka_config(&broker, Some("in.send"), Some("in.tasks"));
    k.dead_letter_topic = Some("in.dead".into());
    let setup = daemon_config(&db, k);
    let (tc, spool_path) = (&setup.tc, &setup.spool);
    let daemon = Daemon::start(tc.config.clone());
    wait_offset(&c, "in.send", 4).await;
    wait_offset(&c, "in.tasks", 3).await;

    let rows = c
        .query(
            "SELECT topic, \"offset\", code, reason, value_text FROM api.kafka_dead_letters ORDER BY topic, \"offset\"",
            &[],
        )
        .await
        .unwrap();
    let dead: Vec<(String, i64, i32, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(dead.len(), 4, "{dead:?}");
    assert_eq!(
        (&dead[0].0[..], dead[0].1, dead[0].2),
        ("in.send", 0, 40001)
    );
    assert!(dead[0].3.contains("not valid JSON"), "{}", dead[0].3);
    assert_eq!((dead[1].1, dead[1].2), (1, 40002));
    assert!(dead[1].3.contains("colour"), "{}", dead[1].3);
    assert_eq!((dead[2].1, dead[2].2), (2, 40003));
    assert!(dead[2].3.contains("ERR-400-031"), "{}", dead[2].3);
    assert_eq!(
        (&dead[3].0[..], dead[3].1, dead[3].2),
        ("in.tasks", 1, 40401)
    );
    assert!(dead[3].3.contains("ERR-400-060"), "{}", dead[3].3);
    assert_eq!(
        rows[0].get::<_, Option<String>>(4).as_deref(),
        Some("{not json")
    );

    // The good records: one message from the send topic, two executions of the task.
    let runs: i64 = c
        .query_one(
            "SELECT count(*) FROM api.task_runs WHERE task = 'news'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(runs, 2);
    let lines = wait_for(T, "the good message and the task's two sends", || async {
        let l = spool(spool_path);
        (l.len() >= 3).then_some(l)
    })
    .await;
    let mut addresses: Vec<&str> = lines
        .iter()
        .map(|l| l["address"].as_str().unwrap())
        .collect();
    addresses.sort();
    assert_eq!(addresses, ["ann@x", "ann@x", "good@x"]);

    // The dead-letter topic has the four records with their reasons.
    let pc = kc
        .partition_client("in.dead", 0, UnknownTopicHandling::Retry)
        .await
        .unwrap();
    let records = wait_for(T, "four records on the dead-letter topic", || async {
        let (r, _) = pc.fetch_records(0, 1..1_000_000, 100).await.ok()?;
        (r.len() >= 4).then_some(r)
    })
    .await;
    assert_eq!(records.len(), 4);
    let first = &records
        .iter()
        .find(|r| r.record.headers.get("outboxd-offset").map(Vec::as_slice) == Some(b"0"))
        .expect("the not-JSON record")
        .record;
    assert_eq!(first.value.as_deref(), Some(&b"{not json"[..]));
    let reason = String::from_utf8(first.headers["outboxd-reason"].clone()).unwrap();
    assert!(reason.contains("not valid JSON"), "{reason}");
    assert_eq!(first.headers["outboxd-code"], b"40001");
    daemon.stop().await;
}

async fn count(c: &tokio_postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

/// Batches that die after their sends and before COMMIT (the fault hook closes the transaction's
/// connection, as a killed daemon would), then a daemon aborted mid-stream, then a restart with
/// more records: every enqueue request is enqueued once and every task-run request runs once —
/// task runs carry no idempotency code, so a double would show — and the offsets end at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_between_enqueue_and_commit_lose_and_double_nothing() {
    let broker = Broker::start().await;
    let kc = broker.client().await;
    create_topic(&kc, "c.send", 1).await;
    create_topic(&kc, "c.tasks", 1).await;
    let db = TestDb::new().await;
    let c = db.client().await;
    c.execute(
        "SELECT api.add_template('cover', 'text', 'Hello', NULL, 'file.agent')",
        &[],
    )
    .await
    .unwrap();
    c.execute(
        "SELECT api.add_task('ping', 'cover', 'manual', '[\"ops@x\"]')",
        &[],
    )
    .await
    .unwrap();
    let sends = |from: usize, to: usize| {
        (from..to)
            .map(|i| (vec![], send_body(&format!("r{i}@x"), json!({}))))
            .collect::<Vec<_>>()
    };
    let tasks = |n: usize| {
        (0..n)
            .map(|_| (vec![], b"ping".to_vec()))
            .collect::<Vec<_>>()
    };
    produce(&kc, "c.send", sends(0, 20)).await;
    produce(&kc, "c.tasks", tasks(12)).await;

    let mut k = kafka_config(&broker, Some("c.send"), Some("c.tasks"));
    k.batch_records = 5;
    let setup = daemon_config(&db, k);
    let tc = &setup.tc;
    let daemon = Daemon::start(tc.config.clone());
    let faults = daemon.controls.kafka_faults.clone();
    faults.crash_before_commit.store(3, Ordering::SeqCst);
    wait_offset(&c, "c.send", 20).await;
    wait_offset(&c, "c.tasks", 12).await;
    assert_eq!(faults.crash_before_commit.load(Ordering::SeqCst), 0);
    let crashed = faults.crashed_records.load(Ordering::SeqCst);
    assert!(
        crashed >= 3,
        "three batches crashed after handling records ({crashed})"
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM outbox.live_messages WHERE code LIKE 'kafka:c.send:0:%'"
        )
        .await,
        20
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM api.task_runs WHERE task = 'ping'").await,
        12
    );
    daemon.stop().await;

    // A daemon aborted while it consumes (its batch transaction dies with it), then a fresh one.
    produce(&kc, "c.send", sends(20, 40)).await;
    produce(&kc, "c.tasks", tasks(12)).await;
    let daemon = Daemon::start(tc.config.clone());
    wait_for(T, "the second daemon to commit a batch", || async {
        (next_offset(&c, "c.send").await > Some(20) || next_offset(&c, "c.tasks").await > Some(12))
            .then_some(())
    })
    .await;
    daemon.crash().await;
    let daemon = Daemon::start(tc.config.clone());
    wait_offset(&c, "c.send", 40).await;
    wait_offset(&c, "c.tasks", 24).await;
    let codes: Vec<String> = c
        .query(
            "SELECT code FROM outbox.live_messages WHERE code LIKE 'kafka:c.send:0:%' ORDER BY code",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut want: Vec<String> = (0..40).map(|i| format!("kafka:c.send:0:{i}")).collect();
    want.sort();
    assert_eq!(codes, want);
    assert_eq!(
        count(&c, "SELECT count(*) FROM api.task_runs WHERE task = 'ping'").await,
        24
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM api.kafka_dead_letters").await,
        0
    );
    daemon.stop().await;
}

/// A restarted daemon resumes from the committed offset: records produced while it was down are
/// enqueued, the ones before are not handled again (their rows are untouched), and a consumer
/// group of another name starts from the beginning on its own offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_from_the_committed_offset() {
    let broker = Broker::start().await;
    let kc = broker.client().await;
    create_topic(&kc, "r.send", 1).await;
    let db = TestDb::new().await;
    let c = db.client().await;
    produce(
        &kc,
        "r.send",
        (0..5)
            .map(|i| (vec![], send_body(&format!("a{i}@x"), json!({}))))
            .collect(),
    )
    .await;
    let setup = daemon_config(&db, kafka_config(&broker, Some("r.send"), None));
    let (tc, spool_path) = (&setup.tc, &setup.spool);
    let daemon = Daemon::start(tc.config.clone());
    wait_offset(&c, "r.send", 5).await;
    daemon.stop().await;
    let before: Vec<(String, chrono::DateTime<chrono::Utc>)> = c
        .query(
            "SELECT code, created_at FROM outbox.live_messages ORDER BY code",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(before.len(), 5);

    produce(
        &kc,
        "r.send",
        (5..8)
            .map(|i| (vec![], send_body(&format!("a{i}@x"), json!({}))))
            .collect(),
    )
    .await;
    let daemon = Daemon::start(tc.config.clone());
    wait_offset(&c, "r.send", 8).await;
    wait_for(T, "eight deliveries", || async {
        (spool(spool_path).len() >= 8).then_some(())
    })
    .await;
    let after: Vec<(String, chrono::DateTime<chrono::Utc>)> = c
        .query(
            "SELECT code, created_at FROM outbox.live_messages ORDER BY code",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(after.len(), 8);
    for b in &before {
        assert!(after.contains(b), "{b:?} kept as it was");
    }
    let delivered = spool(spool_path);
    assert_eq!(delivered.len(), 8, "each record delivered once");
    daemon.stop().await;

    // Another group consumes the same topic from the beginning, on offsets of its own; its
    // enqueue requests carry the same deterministic codes, so nothing is enqueued twice.
    let mut k = kafka_config(&broker, Some("r.send"), None);
    k.group = "second".into();
    let mut cfg2 = tc.config.clone();
    cfg2.kafka = Some(k);
    let daemon = Daemon::start(cfg2);
    wait_for(T, "the second group's offset", || async {
        let n: Option<i64> = c
            .query_opt(
                "SELECT next_offset FROM api.kafka_offsets WHERE consumer_group = 'second'",
                &[],
            )
            .await
            .unwrap()
            .map(|r| r.get(0));
        (n == Some(8)).then_some(())
    })
    .await;
    assert_eq!(
        count(&c, "SELECT count(*) FROM outbox.live_messages").await,
        8
    );
    assert_eq!(next_offset(&c, "r.send").await, Some(8));
    daemon.stop().await;
}
