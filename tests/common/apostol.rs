//! An Apostol platform database for the drop-in tests: a fresh, empty database (no outboxd
//! migration) with tests/fixtures/apostol/platform.sql loaded, and helpers that read the
//! fixture's rows as MessageServer's writes leave them.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use outboxd::apostol::config::ApostolConfig;
use outboxd::config::{Config, ProfileCommon, Secret, SourceMode};
use uuid::Uuid;

use crate::common::TestDb;

pub const FIXTURE: &str = include_str!("../fixtures/apostol/platform.sql");
pub const CLIENT_ID: &str = "service-client";
pub const CLIENT_SECRET: &str = "service-secret-Qx7";

/// A platform database of its own (dropped on `Drop`).
pub struct Platform {
    pub db: TestDb,
}

impl Platform {
    pub async fn new() -> Platform {
        let db = TestDb::reserved();
        let (admin, conn) =
            tokio_postgres::connect(&crate::common::admin_url(), tokio_postgres::NoTls)
                .await
                .expect("connect to the test server");
        tokio::spawn(conn);
        admin
            .batch_execute(&format!("CREATE DATABASE {}", db.name))
            .await
            .expect("create the platform database");
        db.client()
            .await
            .batch_execute(FIXTURE)
            .await
            .expect("load the Apostol fixture");
        Platform { db }
    }

    /// The superuser's connection (the tests' view of the rows).
    pub async fn admin(&self) -> tokio_postgres::Client {
        self.db.client().await
    }

    /// A drop-in configuration: connects as apibot (as MessageServer), logs in with the fixture's
    /// client, keeps its journal in `state_file`; the profiles come from `message_server` (an
    /// Apostol INI file) and/or `[connectors]`.
    pub fn config(
        &self,
        message_server: Option<&Path>,
        state_file: &Path,
        common: ProfileCommon,
    ) -> Config {
        Config {
            database_url: Secret::new(self.db.url_as("apibot")),
            poll_interval: Duration::from_secs(60),
            lease: Duration::from_secs(5),
            grace_period: Duration::from_secs(5),
            db_timeout: Duration::from_secs(5),
            migrate_on_start: false,
            create_database: false,
            mode: SourceMode::Apostol,
            apostol: Some(ApostolConfig {
                client_id: CLIENT_ID.into(),
                client_secret: Secret::new(CLIENT_SECRET),
                username: "apibot".into(),
                agent: "outboxd test".into(),
                host: "127.0.0.1".parse().unwrap(),
                relogin_every: Duration::from_secs(24 * 3600),
                message_server: message_server.map(Path::to_path_buf),
                prefix: None,
                state_file: Some(state_file.to_path_buf()),
                common,
            }),
            ..Config::default()
        }
    }
}

/// Writes `<dir>/conf/apostol.conf` with a `[process/MessageServer]` section naming
/// `conf/api.conf`, whose `[default]` profile points at `url`; returns the INI's path.
pub fn message_server_ini(dir: &Path, url: &str) -> std::path::PathBuf {
    let conf = dir.join("conf");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(
        conf.join("apostol.conf"),
        "[main]\nuser=apostol\n\n[process/MessageServer]\nenable=true\napi=conf/api.conf   ; generic API\n",
    )
    .unwrap();
    std::fs::write(
        conf.join("api.conf"),
        format!("[default]\nuri={url}\nauth=Bearer\ntoken=api-token-9f2\ncontent_type=application/json\n"),
    )
    .unwrap();
    conf.join("apostol.conf")
}

/// As an application: authorizes the fixture's app session and calls api.send_message.
pub async fn send(
    c: &mut tokio_postgres::Client,
    agent: &str,
    profile: &str,
    address: &str,
    content: &str,
) -> Uuid {
    let tx = c.transaction().await.unwrap();
    tx.query_one("SELECT * FROM api.authorize('app-session')", &[])
        .await
        .unwrap();
    let id: Uuid = tx
        .query_one(
            "SELECT id FROM api.send_message(NULL, (SELECT id FROM api.agent WHERE code = $1), $2, $3, 'subject', $4)",
            &[&agent, &profile, &address, &content],
        )
        .await
        .unwrap()
        .get(0);
    tx.commit().await.unwrap();
    id
}

/// A message put straight into `prepared` (an UPDATE-less insert: no NOTIFY), so only a poll
/// finds it.
pub async fn insert_prepared(
    c: &tokio_postgres::Client,
    agent: &str,
    profile: &str,
    address: &str,
    content: &str,
) -> Uuid {
    c.query_one(
        "INSERT INTO db.messages (typecode, agent, profile, address, subject, content, state) \
         VALUES ('message.outbox', (SELECT id FROM db.agents WHERE code = $1), $2, $3, 'subject', $4, 'prepared') \
         RETURNING id",
        &[&agent, &profile, &address, &content],
    )
    .await
    .unwrap()
    .get(0)
}

pub async fn state(c: &tokio_postgres::Client, id: Uuid) -> String {
    c.query_one("SELECT state FROM db.messages WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0)
}

pub async fn label(c: &tokio_postgres::Client, id: Uuid) -> Option<String> {
    c.query_one("SELECT label FROM db.messages WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0)
}

/// The actions executed on a message, in order (submit included).
pub async fn actions(c: &tokio_postgres::Client, id: Uuid) -> Vec<String> {
    c.query(
        "SELECT detail FROM db.log WHERE call = 'action' AND object = $1 ORDER BY id",
        &[&id],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// How often `call` is in the log.
pub async fn calls(c: &tokio_postgres::Client, call: &str) -> i64 {
    c.query_one("SELECT count(*) FROM db.log WHERE call = $1", &[&call])
        .await
        .unwrap()
        .get(0)
}

/// (content, agent code, profile, address) of the inbox replies whose parent is `id`.
pub async fn inbox(
    c: &tokio_postgres::Client,
    id: Uuid,
) -> Vec<(Option<String>, String, String, Option<String>)> {
    c.query(
        "SELECT content, agentcode, profile, address FROM api.inbox WHERE parent = $1 ORDER BY created",
        &[&id],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

/// Waits until message `id` is in `want`.
pub async fn wait_state(c: &tokio_postgres::Client, id: Uuid, want: &str, timeout: Duration) {
    crate::common::wait_for(timeout, &format!("message {id} to be {want}"), || async {
        (state(c, id).await == want).then_some(())
    })
    .await
}
