//! Test harness: a fresh PostgreSQL database per test (migrated, dropped afterwards), an in-process
//! daemon that can be stopped or aborted, in-process HTTP receivers on 127.0.0.1:0 with switchable
//! behaviour, and a bounded wait helper (no bare sleeps).
#![allow(dead_code)]

pub mod api;
pub mod cli;
pub mod m2m_double;
pub mod sba_double;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outboxd::config::{Config, Secret};
use outboxd::{Controls, RunReport};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The server the tests use: `DATABASE_URL`, default the local PostgreSQL.
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A database of its own for one test, with the migrations applied; dropped on `Drop`.
pub struct TestDb {
    pub url: String,
    pub name: String,
    admin: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        init_tracing();
        let admin = admin_url();
        let name = format!("outboxd_t_{}", Uuid::new_v4().simple());
        let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
            .await
            .expect("connect to the test server (DATABASE_URL)");
        let task = tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        drop(client);
        let _ = task.await;
        let mut u = url::Url::parse(&admin).expect("DATABASE_URL is a URL");
        u.set_path(&format!("/{name}"));
        let url = u.to_string();
        outboxd::db::migrate::prepare_database(&url, false)
            .await
            .expect("migrate test database");
        TestDb { url, name, admin }
    }

    /// A fresh client connection.
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .expect("connect to test database");
        tokio::spawn(conn);
        client
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        admin_execute_in_drop(
            &self.admin,
            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

impl TestDb {
    /// A database name of its own that is not created (for a daemon that creates it); dropped
    /// on `Drop` if it exists by then.
    pub fn reserved() -> TestDb {
        init_tracing();
        let admin = admin_url();
        let name = format!("outboxd_t_{}", Uuid::new_v4().simple());
        let mut u = url::Url::parse(&admin).expect("DATABASE_URL is a URL");
        u.set_path(&format!("/{name}"));
        TestDb {
            url: u.to_string(),
            name,
            admin,
        }
    }

    /// `url` with another user name (trust authentication: any LOGIN role).
    pub fn url_as(&self, user: &str) -> String {
        let mut u = url::Url::parse(&self.url).expect("a URL");
        u.set_username(user).expect("a user name");
        u.set_password(None).expect("no password");
        u.to_string()
    }
}

/// A LOGIN role of its own for one test, a member of a NOLOGIN group such as `outboxd_app` (roles
/// are cluster-wide: the name is unique); dropped on `Drop`. It must own nothing: tests that
/// create objects `SET ROLE` to the group first.
pub struct TestRole {
    pub name: String,
    admin: String,
}

impl TestRole {
    pub async fn new(group: &str) -> TestRole {
        let admin = admin_url();
        let name = format!("outboxd_t_login_{}", Uuid::new_v4().simple());
        let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
            .await
            .expect("connect to the test server (DATABASE_URL)");
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE ROLE {name} LOGIN IN ROLE {group}"))
            .await
            .expect("create test login role");
        TestRole { name, admin }
    }

    /// A connection to `db` logged in as this role.
    pub async fn client(&self, db: &TestDb) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&db.url_as(&self.name), tokio_postgres::NoTls)
            .await
            .expect("connect as the test role");
        tokio::spawn(conn);
        client
    }
}

impl Drop for TestRole {
    fn drop(&mut self) {
        admin_execute_in_drop(&self.admin, format!("DROP ROLE IF EXISTS {}", self.name));
    }
}

/// Runs `sql` on the admin connection from a `Drop`, which runs outside any runtime guarantee:
/// in a thread with its own runtime, ignoring errors (cleanup is best effort).
fn admin_execute_in_drop(admin: &str, sql: String) {
    let admin = admin.to_string();
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            if let Ok((client, conn)) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await
            {
                tokio::spawn(conn);
                let _ = client.batch_execute(&sql).await;
            }
        });
    })
    .join();
}

/// The SQLSTATE of a failed statement ("" when it is not a server error).
pub fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_string()).unwrap_or_default()
}

/// Writes connector `.conf` files into a temp dir and returns a fast test configuration.
pub struct TestConfig {
    pub dir: tempfile::TempDir,
    pub config: Config,
}

impl TestConfig {
    /// `connectors`: (kind, contents of `<kind>.conf`).
    pub fn new(db: &TestDb, connectors: &[(&str, &str)]) -> TestConfig {
        let dir = tempfile::tempdir().unwrap();
        let mut map = BTreeMap::new();
        for (kind, text) in connectors {
            let p = dir.path().join(format!("{kind}.conf"));
            std::fs::write(&p, text).unwrap();
            map.insert(kind.to_string(), p);
        }
        let config = Config {
            database_url: Secret::new(db.url.clone()),
            poll_interval: Duration::from_secs(60),
            lease: Duration::from_secs(5),
            grace_period: Duration::from_secs(5),
            db_timeout: Duration::from_secs(5),
            migrate_on_start: false,
            create_database: false,
            connectors: map,
            ..Config::default()
        };
        TestConfig { dir, config }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A daemon running in-process.
pub struct Daemon {
    stop: CancellationToken,
    pub controls: Controls,
    handle: tokio::task::JoinHandle<Result<RunReport, outboxd::dispatch::RunError>>,
}

impl Daemon {
    pub fn start(cfg: Config) -> Daemon {
        Daemon::start_with(cfg, Controls::default())
    }

    /// With controls of the test's own (a manual task clock, say).
    pub fn start_with(cfg: Config, controls: Controls) -> Daemon {
        if let Err(errors) = outboxd::dispatch::build_router(&cfg) {
            panic!("test configuration is invalid: {errors:?}");
        }
        let stop = CancellationToken::new();
        let s = stop.clone();
        let handle = tokio::spawn(outboxd::run(cfg, s.cancelled_owned(), controls.clone()));
        Daemon {
            stop,
            controls,
            handle,
        }
    }

    /// Graceful stop (as TERM does); returns the report.
    pub async fn stop(self) -> RunReport {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("daemon stops within 30s")
            .expect("daemon task")
            .expect("daemon run")
    }

    /// Simulated crash: the daemon and its tasks vanish without recording anything more.
    pub async fn crash(self) {
        self.handle.abort();
        let _ = self.handle.await;
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

/// Polls `f` every 20 ms until it returns `Some`, failing the test after `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How many daemon LISTEN connections on `outbox` this database has.
pub async fn listeners(c: &tokio_postgres::Client) -> i64 {
    c.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND application_name = 'outboxd-listen' AND query = 'LISTEN outbox'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Waits until exactly one daemon LISTENs on this database.
pub async fn wait_listening(c: &tokio_postgres::Client, timeout: Duration) {
    wait_for(timeout, "the daemon's LISTEN connection", || async {
        (listeners(c).await == 1).then_some(())
    })
    .await
}

/// The state code of a message.
pub async fn state_of(c: &tokio_postgres::Client, id: Uuid) -> String {
    c.query_one(
        "SELECT state FROM outbox.live_messages WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap()
    .get(0)
}

/// The actions of a message's history as users see it (`api.message_history`: the logged changes
/// and the claim and outcome transitions the attempt rows stand for), oldest first.
pub async fn history_actions(c: &tokio_postgres::Client, id: Uuid) -> Vec<String> {
    c.query(
        "SELECT action FROM api.message_history WHERE message_id = $1 \
         ORDER BY changed_at, CASE action WHEN 'create' THEN 0 WHEN 'submit' THEN 1 WHEN 'send' THEN 2 ELSE 3 END",
        &[&id],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Waits until message `id` is in `state`.
pub async fn wait_state(c: &tokio_postgres::Client, id: Uuid, state: &str, timeout: Duration) {
    wait_for(timeout, &format!("message {id} to be {state}"), || async {
        (state_of(c, id).await == state).then_some(())
    })
    .await
}

/// Enqueues with api.send_message.
pub async fn send(
    c: &tokio_postgres::Client,
    agent: &str,
    profile: &str,
    address: &str,
    content: &str,
) -> Uuid {
    c.query_one(
        "SELECT id FROM api.send_message(NULL, $1::text, $2, $3, 'subject', $4)",
        &[&agent, &profile, &address, &content],
    )
    .await
    .unwrap()
    .get(0)
}

/// (attempt, outcome, error_code, remote_status) of every attempt of a message, in order.
pub async fn attempts(
    c: &tokio_postgres::Client,
    id: Uuid,
) -> Vec<(i32, String, Option<String>, Option<i32>)> {
    c.query(
        "SELECT attempt, outcome, error_code, remote_status FROM outbox.attempts \
         WHERE message_id = $1 ORDER BY id",
        &[&id],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

/// Serves `app` on `listener` until the returned sender is dropped.
pub fn serve_on(
    listener: tokio::net::TcpListener,
    app: axum::Router,
) -> Arc<tokio::sync::oneshot::Sender<()>> {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    Arc::new(tx)
}

/// Serves `app` on 127.0.0.1:0; returns its base URL and the shutdown handle.
pub async fn serve(app: axum::Router) -> (String, Arc<tokio::sync::oneshot::Sender<()>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (format!("http://{addr}"), serve_on(listener, app))
}

/// How an HTTP receiver answers.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// 200 with this JSON body.
    Ok(String),
    /// This status with a small body.
    Status(u16),
    /// 429 with `Retry-After: <secs>`.
    TooManyRequests(u64),
    /// Never answers.
    Hang,
    /// Waits, then 200.
    Delay(Duration),
}

/// One request a receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

/// An HTTP server on 127.0.0.1:0 that records every request and answers per its behaviour.
#[derive(Clone)]
pub struct Receiver {
    pub url: String,
    behaviour: Arc<Mutex<Behaviour>>,
    received: Arc<Mutex<Vec<Received>>>,
    _shutdown: Arc<tokio::sync::oneshot::Sender<()>>,
}

impl Receiver {
    pub async fn start(b: Behaviour) -> Receiver {
        use axum::extract::State;
        use axum::http::{HeaderMap, Method, StatusCode, Uri};
        use axum::response::{IntoResponse, Response};

        type St = (Arc<Mutex<Behaviour>>, Arc<Mutex<Vec<Received>>>);
        async fn handle(
            State((behaviour, received)): State<St>,
            method: Method,
            uri: Uri,
            headers: HeaderMap,
            body: String,
        ) -> Response {
            received.lock().unwrap().push(Received {
                method: method.to_string(),
                path: uri.path().to_string(),
                headers: headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                    .collect(),
                body,
            });
            let b = behaviour.lock().unwrap().clone();
            match b {
                Behaviour::Ok(body) => (StatusCode::OK, body).into_response(),
                Behaviour::Status(s) => (
                    StatusCode::from_u16(s).unwrap(),
                    format!("{{\"error\":\"status {s}\"}}"),
                )
                    .into_response(),
                Behaviour::TooManyRequests(secs) => (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", secs.to_string())],
                    "slow down",
                )
                    .into_response(),
                Behaviour::Hang => {
                    std::future::pending::<()>().await;
                    unreachable!()
                }
                Behaviour::Delay(d) => {
                    tokio::time::sleep(d).await;
                    (StatusCode::OK, "{\"id\":\"delayed\"}").into_response()
                }
            }
        }

        let behaviour = Arc::new(Mutex::new(b));
        let received = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new()
            .fallback(handle)
            .with_state((behaviour.clone(), received.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tx = serve_on(listener, app);
        Receiver {
            url: format!("http://{addr}"),
            behaviour,
            received,
            _shutdown: tx,
        }
    }

    pub fn set(&self, b: Behaviour) {
        *self.behaviour.lock().unwrap() = b;
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }
}

/// An http.conf with one `default` profile pointing at `url`, and fast retries.
/// `extra` may set its own `timeout` (default 2s).
pub fn http_conf(url: &str, extra: &str) -> String {
    let timeout = if extra.contains("timeout") {
        ""
    } else {
        "timeout = \"2s\"\n"
    };
    format!(
        "[default]\nurl = \"{url}\"\nretry = [\"20ms\", \"20ms\", \"20ms\"]\n{timeout}{extra}\n"
    )
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}
