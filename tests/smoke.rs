mod common;
use common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_connector_delivers_a_message_end_to_end() {
    let db = TestDb::new().await;
    let tc = TestConfig::new(&db, &[]);
    let spool = tc.path("spool.jsonl");
    let conf = format!("[default]\npath = \"{}\"\n", path_str(&spool));
    let tc2 = TestConfig::new(&db, &[("file", &conf)]);
    let daemon = Daemon::start(tc2.config.clone());
    let c = db.client().await;
    let id = send(&c, "file.agent", "default", "x@y", "hello").await;
    wait_state(&c, id, "submitted", Duration::from_secs(10)).await;
    let text = std::fs::read_to_string(&spool).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(line["id"], id.to_string());
    assert_eq!(line["content"], "hello");
    let report = daemon.stop().await;
    assert_eq!(report.delivered, 1);
    drop(tc);
}
