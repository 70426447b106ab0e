//! The daemon's HTTP server with a real client: health, status, metrics, the REST enqueue API in
//! the envelope on success and on every error kind, and the OpenAPI document against the handler.
mod common;
use common::*;

use std::time::Duration;

use outboxd::config::Secret;
use serde_json::{json, Value};

const TOKEN: &str = "test-token-0123456789";

struct Server {
    _dir: tempfile::TempDir,
    _db_cfg: TestConfig,
    daemon: Daemon,
    base: String,
    spool: std::path::PathBuf,
    http: reqwest::Client,
}

async fn start(
    db: &TestDb,
    profile: &str,
    tune: impl FnOnce(&mut outboxd::config::Config),
) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool.jsonl");
    let conf = format!("[{profile}]\npath = \"{}\"\n", path_str(&spool));
    let mut tc = TestConfig::new(db, &[("file", &conf)]);
    tc.config.http_listen = Some("127.0.0.1:0".parse().unwrap());
    tc.config.api_tokens = vec![Secret::new("another-token-abcdefgh"), Secret::new(TOKEN)];
    tune(&mut tc.config);
    let daemon = Daemon::start(tc.config.clone());
    let controls = daemon.controls.clone();
    let addr = wait_for(Duration::from_secs(10), "the HTTP server to listen", || {
        let c = controls.clone();
        async move { c.http_addr.get().copied() }
    })
    .await;
    Server {
        _dir: dir,
        _db_cfg: tc,
        daemon,
        base: format!("http://{addr}"),
        spool,
        http: reqwest::Client::new(),
    }
}

impl Server {
    async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
    }

    async fn post(
        &self,
        path: &str,
        token: Option<&str>,
        body: &str,
        key: Option<&str>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }
}

/// The envelope's shape, on success and on failure.
fn assert_envelope(v: &Value, ok: bool, code: u64) {
    for k in ["id", "ok", "code", "msg", "data", "count"] {
        assert!(v.get(k).is_some(), "envelope lacks {k}: {v}");
    }
    assert_eq!(v["ok"], if ok { 1 } else { 0 }, "{v}");
    assert_eq!(v["code"], code, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_status_and_metrics_reflect_real_deliveries() {
    let db = TestDb::new().await;
    let profile = format!("m{}", uuid::Uuid::new_v4().simple());
    let s = start(&db, &profile, |_| {}).await;
    assert_eq!(s.get("/heartbeat").await.text().await.unwrap(), "OK");
    assert_eq!(s.get("/ping").await.text().await.unwrap(), "PONG");

    let c = db.client().await;
    let id = send(&c, "file.agent", &profile, "ops@example.com", "hello").await;
    wait_state(&c, id, "submitted", Duration::from_secs(10)).await;
    // An unknown profile is a failed attempt with its code.
    let bad = send(&c, "file.agent", "no-such-profile", "ops@example.com", "x").await;
    wait_state(&c, bad, "failed", Duration::from_secs(10)).await;

    let status: Value = wait_for(
        Duration::from_secs(10),
        "status with the listener up",
        || {
            let s = &s;
            async move {
                let v: Value = s.get("/sys/status").await.json().await.unwrap();
                (v["listener_connected"] == true).then_some(v)
            }
        },
    )
    .await;
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["database"]["reachable"], true);
    assert_eq!(status["in_flight"], 0);
    let queue = status["queue"].as_array().unwrap();
    assert!(
        queue.contains(&json!({"state": "submitted", "agent": "file.agent", "count": 1})),
        "{queue:?}"
    );
    assert!(queue.contains(&json!({"state": "failed", "agent": "file.agent", "count": 1})));
    let p = &status["profiles"][format!("file/{profile}")];
    assert!(p["last_success_at"].is_string(), "{status}");
    assert_eq!(p["delivered"], 1);

    let text = s.get("/metrics").await.text().await.unwrap();
    let done = format!(
        "outboxd_deliveries_total{{profile=\"{profile}\",connector=\"file\",outcome=\"done\"}} 1"
    );
    assert!(text.contains(&done), "{done} not in:\n{text}");
    assert!(
        text.contains("outboxd_attempt_duration_seconds_bucket{connector=\"file\",le=\"0.001\"}"),
        "{text}"
    );
    assert!(
        text.contains("outboxd_commit_to_delivered_seconds_bucket{connector=\"file\""),
        "{text}"
    );
    assert!(text.contains("outboxd_delivery_failures_total{profile=\"no-such-profile\",connector=\"-\",code=\"unknown-profile\"}"), "{text}");
    assert!(
        text.contains("outboxd_messages{state=\"submitted\",agent=\"file.agent\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("outboxd_recorder_batch_size_bucket"),
        "{text}"
    );
    assert!(
        !text.contains("quantile="),
        "histograms, not summaries:\n{text}"
    );
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_enqueue_delivers_and_answers_every_error_in_the_envelope() {
    let db = TestDb::new().await;
    let s = start(&db, "default", |c| c.http_max_body_bytes = 2048).await;
    let path = "/api/v1/message/send";
    let body =
        r#"{"agent":"file.agent","address":"ops@example.com","subject":"Hi","content":{"n":42}}"#;

    let (st, v) = s.post(path, None, body, None).await;
    assert_eq!(st, 401);
    assert_envelope(&v, false, 40101);
    let (st, v) = s
        .post(path, Some("test-token-012345678X"), body, None)
        .await;
    assert_eq!(st, 401);
    assert_envelope(&v, false, 40101);

    let (st, v) = s.post(path, Some(TOKEN), body, Some("order-42")).await;
    assert_eq!(st, 200, "{v}");
    assert_envelope(&v, true, 0);
    assert_eq!(v["id"], 1);
    let id: uuid::Uuid = v["data"]["id"].as_str().unwrap().parse().unwrap();
    let c = db.client().await;
    wait_state(&c, id, "submitted", Duration::from_secs(10)).await;
    let line: Value = serde_json::from_str(
        std::fs::read_to_string(&s.spool)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(line["id"], id.to_string());
    assert_eq!(line["content"], r#"{"n":42}"#);

    // The same Idempotency-Key: the same message, not a second one.
    let (_, again) = s.post(path, Some(TOKEN), body, Some("order-42")).await;
    assert_eq!(again["data"]["id"], id.to_string());
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM outbox.live_messages WHERE class = 'outbox'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let code: String = c
        .query_one(
            "SELECT code FROM outbox.live_messages WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(code, "order-42");

    let cases: &[(&str, u16, u64, &str)] = &[
        ("{not json", 400, 40001, "JSON"),
        (r#"{"address":"a@b"}"#, 400, 40002, "agent"),
        (
            r#"{"agent":"file.agent","address":"a@b","colour":1}"#,
            400,
            40002,
            "colour",
        ),
        (
            r#"{"agent":"no.such.agent","address":"a@b"}"#,
            400,
            40003,
            "no.such.agent",
        ),
    ];
    for (b, status, code, mentions) in cases {
        let (st, v) = s.post(path, Some(TOKEN), b, None).await;
        assert_eq!(st, *status, "{b}: {v}");
        assert_envelope(&v, false, *code);
        assert!(v["msg"].as_str().unwrap().contains(mentions), "{b}: {v}");
    }
    let big = format!(
        r#"{{"agent":"file.agent","address":"a@b","content":"{}"}}"#,
        "x".repeat(4096)
    );
    let (st, v) = s.post(path, Some(TOKEN), &big, None).await;
    assert_eq!(st, 413);
    assert_envelope(&v, false, 41301);

    let r = s.get(path).await;
    assert_eq!(r.status().as_u16(), 405);
    assert_envelope(&r.json().await.unwrap(), false, 40501);
    let r = s.get("/api/v1/nothing-here").await;
    assert_eq!(r.status().as_u16(), 404);
    assert_envelope(&r.json().await.unwrap(), false, 40401);

    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM outbox.live_messages WHERE class = 'outbox'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "no failed request enqueued anything");
    s.daemon.stop().await;
}

/// A value of the schema's type, for a body that uses every property.
fn example(schema: &Value) -> Value {
    match (schema["type"].as_str(), schema["format"].as_str()) {
        (Some("string"), Some("date-time")) => json!("2030-01-01T00:00:00Z"),
        (Some("string"), Some("uuid")) => json!(uuid::Uuid::nil().to_string()),
        (Some("string"), _) => json!("x@example.com"),
        (Some("integer"), _) => json!(1),
        _ => json!("any content"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_matches_the_handler() {
    let db = TestDb::new().await;
    let s = start(&db, "default", |_| {}).await;
    let doc: Value = s.get("/api/v1/openapi.json").await.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let post = &doc["paths"]["/api/v1/message/send"]["post"];
    assert!(post.is_object(), "{doc}");
    let schema = &doc["components"]["schemas"]["SendRequest"];
    let props = schema["properties"].as_object().unwrap();
    let mut full = serde_json::Map::new();
    for (k, v) in props {
        full.insert(k.clone(), example(v));
    }
    full.insert("agent".into(), json!("file.agent"));
    full.remove("parent"); // a parent must exist; it is accepted by the schema check below
    let (st, v) = s
        .post(
            "/api/v1/message/send",
            Some(TOKEN),
            &Value::Object(full.clone()).to_string(),
            None,
        )
        .await;
    assert_eq!(st, 200, "every documented property is accepted: {v}");
    for req in schema["required"].as_array().unwrap() {
        let mut b = full.clone();
        b.remove(req.as_str().unwrap());
        let (st, v) = s
            .post(
                "/api/v1/message/send",
                Some(TOKEN),
                &Value::Object(b).to_string(),
                None,
            )
            .await;
        assert_eq!(
            (st, v["code"].as_u64()),
            (400, Some(40002)),
            "{req} missing: {v}"
        );
    }
    // Every documented code is in the README's table, and the README lists no other.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let documented: Vec<u64> = doc["x-error-codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["code"].as_u64().unwrap())
        .collect();
    for code in &documented {
        assert!(
            readme.contains(&format!("| {code} |")),
            "README lacks code {code}"
        );
    }
    let in_readme = readme
        .lines()
        .filter(|l| l.starts_with("| 4") || l.starts_with("| 5"))
        .filter_map(|l| l[2..].split(' ').next()?.parse::<u64>().ok())
        .filter(|c| *c > 10000)
        .count();
    assert_eq!(in_readme, documented.len(), "README's REST code table");
    s.daemon.stop().await;
}
