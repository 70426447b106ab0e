//! Configuration errors (file and key named, secrets never printed), environment overrides, and
//! the CLI end to end (`send`, `status`, `retry`, `check-config`, `migrate`) as a user runs it.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use outboxd::config::{parse_profiles, Config};

fn parse_main(text: &str) -> Result<Config, String> {
    Config::parse(text, Path::new("/etc/outboxd/outboxd.toml"), |_| None).map_err(|e| e.to_string())
}

#[test]
fn main_file_errors_name_the_file_and_the_key() {
    let e = parse_main("poll_intervall = \"5s\"").unwrap_err();
    assert!(e.starts_with("/etc/outboxd/outboxd.toml"), "{e}");
    assert!(e.contains("poll_intervall"), "{e}");
    let e = parse_main("lease = \"soon\"").unwrap_err();
    assert!(
        e.contains("key `lease`") && e.contains("invalid duration"),
        "{e}"
    );
    let e = parse_main("concurrency = 0").unwrap_err();
    assert!(e.contains("key `concurrency`"), "{e}");
    let e = parse_main("[connectors]\ncarrier_pigeon = \"p.conf\"").unwrap_err();
    assert!(
        e.contains("connectors.carrier_pigeon") && e.contains("unknown connector kind"),
        "{e}"
    );
    let e = parse_main("[routes]\n\"x.agent\" = \"fax\"").unwrap_err();
    assert!(e.contains("routes.x.agent"), "{e}");
    let e = parse_main("batch_size = \"many\"").unwrap_err();
    assert!(e.contains("key `batch_size`"), "{e}");
}

#[test]
fn defaults_env_overrides_and_relative_paths() {
    let cfg = Config::parse(
        "concurrency = 3\n[connectors]\nfile = \"file.conf\"\n",
        Path::new("/etc/outboxd/outboxd.toml"),
        |k| match k {
            "OUTBOXD_CONCURRENCY" => Some("9".into()),
            "DATABASE_URL" => Some("postgres://u:hunter2@db/outbox".into()),
            "OUTBOXD_POLL_INTERVAL" => Some("250ms".into()),
            _ => None,
        },
    )
    .unwrap();
    assert_eq!(cfg.concurrency, 9, "env wins over the file");
    assert_eq!(cfg.poll_interval, Duration::from_millis(250));
    assert_eq!(cfg.lease, Duration::from_secs(60), "default");
    assert_eq!(cfg.database_url.expose(), "postgres://u:hunter2@db/outbox");
    assert_eq!(cfg.connectors["file"], Path::new("/etc/outboxd/file.conf"));
    let printed = format!("{cfg:?}");
    assert!(
        !printed.contains("hunter2"),
        "secrets never printed: {printed}"
    );
    // OUTBOXD_DATABASE_URL beats DATABASE_URL.
    let cfg = Config::parse("", Path::new("x.toml"), |k| match k {
        "OUTBOXD_DATABASE_URL" => Some("postgres://a/b".into()),
        "DATABASE_URL" => Some("postgres://c/d".into()),
        _ => None,
    })
    .unwrap();
    assert_eq!(cfg.database_url.expose(), "postgres://a/b");
}

#[test]
fn profile_errors_name_the_file_the_profile_and_the_key() {
    let errs = parse_profiles(
        "http",
        "[default]\nurl = \"http://x\"\nmethodd = \"GET\"\n[other]\nurl = \"http://y\"\nretry = [\"5 parsecs\"]\n[third]\nmax_attempts = 0\nurl = \"http://z\"\n",
        "conf/http.conf",
    )
    .unwrap_err();
    let all: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
    assert_eq!(all.len(), 3, "{all:#?}");
    assert!(
        all.iter()
            .any(|e| e.starts_with("conf/http.conf: key `default.methodd`")),
        "{all:#?}"
    );
    assert!(
        all.iter()
            .any(|e| e.contains("key `other.retry") && e.contains("invalid duration")),
        "{all:#?}"
    );
    assert!(
        all.iter().any(|e| e.contains("key `third.max_attempts`")),
        "{all:#?}"
    );
    let errs =
        parse_profiles("http", "[default]\nmethod = \"GET\"\n", "conf/http.conf").unwrap_err();
    assert!(
        errs[0].to_string().contains("url"),
        "missing required key named: {}",
        errs[0]
    );
    let ok = parse_profiles(
        "http",
        "[default]\nurl = \"http://x\"\nretry = [\"1s\", \"2m\"]\n",
        "conf/http.conf",
    )
    .unwrap();
    assert_eq!(
        ok[0].1.common.retry,
        vec![Duration::from_secs(1), Duration::from_secs(120)]
    );
    assert_eq!(ok[0].1.common.max_attempts, 3);
}

#[test]
fn timing_settings_that_cannot_work_are_refused_naming_the_key() {
    let e = parse_main("db_timeout = \"0s\"").unwrap_err();
    assert!(
        e.starts_with("/etc/outboxd/outboxd.toml: key `db_timeout`"),
        "{e}"
    );
    // The hot path passes milliseconds as a 32-bit integer: 25 days used to wrap around.
    let e = parse_main("lease = \"25days\"").unwrap_err();
    assert!(
        e.contains("key `lease`") && e.contains("2147483647ms"),
        "{e}"
    );
    let e = parse_main("db_timeout = \"25days\"").unwrap_err();
    assert!(e.contains("key `db_timeout`"), "{e}");
    assert!(parse_main("lease = \"24days\"").is_ok());
    // A statement_timeout of the URL's own must not outlast db_timeout (nor be disabled).
    let url = |options: &str| {
        format!(
            "db_timeout = \"10s\"\ndatabase_url = \"postgres://u:hunter2@db/x?options={options}\"\n"
        )
    };
    for bad in [
        "-c%20statement_timeout%3D60s",
        "-c%20statement_timeout%3D0",
        "-c%20statement_timeout%3Dsoon",
    ] {
        let e = parse_main(&url(bad)).unwrap_err();
        assert!(
            e.contains("key `database_url`") && e.contains("statement_timeout"),
            "{bad}: {e}"
        );
        assert!(!e.contains("hunter2"), "{e}");
    }
    assert!(parse_main(&url("-c%20statement_timeout%3D5s")).is_ok());
    // TLS settings are checked when the file is read, without quoting the URL.
    let e = parse_main("database_url = \"postgres://u:hunter2@db/x?sslmode=verify-full\"\n")
        .unwrap_err();
    assert!(
        e.contains("key `database_url`") && e.contains("sslrootcert") && !e.contains("hunter2"),
        "{e}"
    );
    let e = parse_main("listen_url = \"postgres://u:hunter2@db/x?sslmode=always\"\n").unwrap_err();
    assert!(
        e.contains("key `listen_url`") && e.contains("always") && !e.contains("hunter2"),
        "{e}"
    );
    // A retry delay whose jitter overflows the same 32-bit milliseconds.
    let errs = parse_profiles(
        "http",
        "[slow]\nurl = \"http://x\"\nretry = [\"5s\", \"21days\"]\n",
        "conf/http.conf",
    )
    .unwrap_err();
    assert!(
        errs[0]
            .to_string()
            .starts_with("conf/http.conf: key `slow.retry`"),
        "{}",
        errs[0]
    );
    assert!(parse_profiles(
        "http",
        "[slow]\nurl = \"http://x\"\nretry = [\"20days\"]\n",
        "conf/http.conf"
    )
    .is_ok());
}

#[test]
fn a_lease_shorter_than_a_profiles_timeout_plus_db_timeout_is_a_problem() {
    let profiles = |text: &str| {
        let mut p = outboxd::config::Profiles::default();
        for (name, profile) in parse_profiles("http", text, "conf/http.conf").unwrap() {
            p.map.insert(("http".into(), name), profile);
        }
        p
    };
    let defaults = Config::default();
    let p = profiles("[default]\nurl = \"http://x\"\n");
    assert_eq!(
        defaults.check_timing(&p),
        vec![],
        "the defaults are consistent"
    );
    let cfg = parse_main("lease = \"30s\"\ndb_timeout = \"5s\"").unwrap();
    let p = profiles(
        "[fast]\nurl = \"http://x\"\ntimeout = \"25s\"\n[slow]\nurl = \"http://y\"\ntimeout = \"26s\"\n",
    );
    let errs: Vec<String> = cfg.check_timing(&p).iter().map(|e| e.to_string()).collect();
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].starts_with("conf/http.conf: key `slow.timeout`")
            && errs[0].contains("/etc/outboxd/outboxd.toml: key `lease`")
            && errs[0].contains("31s"),
        "{errs:#?}"
    );
}

fn write_config(dir: &Path, db_url: &str, extra_conf: &str) -> std::path::PathBuf {
    std::fs::write(
        dir.join("file.conf"),
        format!(
            "[default]\npath = \"{}/spool.jsonl\"\n{extra_conf}",
            dir.display()
        ),
    )
    .unwrap();
    let main = dir.join("outboxd.toml");
    std::fs::write(
        &main,
        format!("database_url = \"{db_url}\"\n[connectors]\nfile = \"file.conf\"\n"),
    )
    .unwrap();
    main
}

#[tokio::test]
async fn check_config_lists_every_problem_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let main = write_config(
        dir.path(),
        "postgres://postgres:s3cret@127.0.0.1:1/x",
        "[broken]\ndirectory = \"d\"\npath = \"p\"\n[typo]\npaht = \"x\"\n",
    );
    let (ok, stdout, _) = cli::run(cli::bare().arg("--config").arg(&main).arg("check-config"));
    assert!(!ok);
    assert!(stdout.contains("typo.paht"), "{stdout}");
    assert!(stdout.contains("broken.path"), "{stdout}");
    assert!(stdout.contains("2 problem(s)"), "{stdout}");
    assert!(!stdout.contains("s3cret"));
    let main = write_config(dir.path(), "postgres://x@127.0.0.1:1/x", "");
    let (ok, stdout, stderr) = cli::run(cli::bare().arg("--config").arg(&main).arg("check-config"));
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("ok      file/default"), "{stdout}");
    // A main file that does not parse.
    std::fs::write(&main, "concurrency = \"lots\"\n").unwrap();
    let (ok, _, stderr) = cli::run(cli::bare().arg("--config").arg(&main).arg("check-config"));
    assert!(!ok);
    assert!(
        stderr.contains("outboxd.toml") && stderr.contains("concurrency"),
        "{stderr}"
    );
}

#[tokio::test]
async fn check_config_refuses_timings_that_cannot_work() {
    let dir = tempfile::tempdir().unwrap();
    let main = write_config(
        dir.path(),
        "postgres://x@127.0.0.1:1/x",
        "timeout = \"55s\"\n",
    );
    let (ok, stdout, _) = cli::run(cli::bare().arg("--config").arg(&main).arg("check-config"));
    assert!(!ok, "{stdout}");
    let file_conf = dir.path().join("file.conf").display().to_string();
    assert!(
        stdout.contains(&format!("{file_conf}: key `default.timeout`"))
            && stdout.contains("key `lease`")
            && stdout.contains("1 problem(s)"),
        "{stdout}"
    );
    let text = std::fs::read_to_string(&main).unwrap();
    std::fs::write(&main, format!("lease = \"65s\"\n{text}")).unwrap();
    let (ok, stdout, stderr) = cli::run(cli::bare().arg("--config").arg(&main).arg("check-config"));
    assert!(ok, "{stdout}{stderr}");
    std::fs::write(&main, format!("db_timeout = \"0s\"\n{text}")).unwrap();
    let (ok, _, stderr) = cli::run(cli::bare().arg("--config").arg(&main).arg("check-config"));
    assert!(!ok);
    assert!(
        stderr.contains("outboxd.toml: key `db_timeout`"),
        "{stderr}"
    );
}

#[tokio::test]
async fn send_status_and_retry_from_the_command_line() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let main = write_config(dir.path(), &db.url, "");
    let (ok, stdout, stderr) = cli::run(cli::bare().arg("-c").arg(&main).args([
        "send",
        "--agent",
        "file.agent",
        "--address",
        "ops@example.com",
        "--subject",
        "Hi",
        "--content",
        "hello",
        "--code",
        "cli-1",
    ]));
    assert!(ok, "{stderr}");
    let id: uuid::Uuid = stdout.trim().parse().expect("send prints the id");
    // The same code again: the same message.
    let (_, again, _) = cli::run(cli::bare().arg("-c").arg(&main).args([
        "send",
        "--agent",
        "file.agent",
        "--address",
        "x",
        "--content",
        "other",
        "--code",
        "cli-1",
    ]));
    assert_eq!(again.trim(), id.to_string());
    let c = db.client().await;
    assert_eq!(state_of(&c, id).await, "prepared");
    // A message that fails: unknown profile, delivered by an in-process daemon.
    let bad: uuid::Uuid = c
        .query_one(
            "SELECT id FROM api.send_message(NULL, 'file.agent', 'ghost', 'a', 's', 'c')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let mut cfg = Config::load(&main).unwrap();
    cfg.migrate_on_start = false;
    let d = Daemon::start(cfg);
    wait_state(&c, id, "submitted", Duration::from_secs(15)).await;
    wait_state(&c, bad, "failed", Duration::from_secs(15)).await;
    d.stop().await;
    let (ok, status, _) = cli::run(cli::bare().arg("-c").arg(&main).arg("status"));
    assert!(ok);
    assert!(
        status.contains("submitted") && status.contains("failed"),
        "{status}"
    );
    assert!(
        status.contains("unknown-profile"),
        "recent failures show their code: {status}"
    );
    // retry with no selection refuses; with a filter it repeats.
    let (ok, _, stderr) = cli::run(cli::bare().arg("-c").arg(&main).arg("retry"));
    assert!(!ok && stderr.contains("--all"), "{stderr}");
    let (ok, out, _) = cli::run(cli::bare().arg("-c").arg(&main).args([
        "retry",
        "--error-code",
        "unknown-profile",
    ]));
    assert!(ok);
    assert_eq!(out.trim(), bad.to_string());
    assert_eq!(state_of(&c, bad).await, "prepared");
}

#[tokio::test]
async fn migrate_creates_the_database_when_missing() {
    let name = format!("outboxd_t_{}", uuid::Uuid::new_v4().simple());
    let mut u = url::Url::parse(&admin_url()).unwrap();
    u.set_path(&format!("/{name}"));
    let dir = tempfile::tempdir().unwrap();
    let main = write_config(dir.path(), u.as_str(), "");
    let (ok, out, err) = cli::run(cli::bare().arg("-c").arg(&main).arg("migrate"));
    assert!(ok, "{err}");
    let all: Vec<i32> = outboxd::db::migrate::MIGRATIONS
        .iter()
        .map(|m| m.0)
        .collect();
    assert!(
        out.contains(&format!("applied migrations {all:?}")),
        "{out}"
    );
    let (ok, out, _) = cli::run(cli::bare().arg("-c").arg(&main).arg("migrate"));
    assert!(ok && out.contains("up to date"), "{out}");
    let (admin, conn) = tokio_postgres::connect(&admin_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    admin
        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await
        .unwrap();
}

/// Sends a signal to a child process with kill(1).
fn signal(child: &std::process::Child, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig}");
}

#[tokio::test]
async fn the_binary_reloads_on_hup_and_drains_on_term() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let main = write_config(dir.path(), &db.url, "");
    let log = dir.path().join("daemon.log");
    let mut child = cli::bare()
        .arg("-c")
        .arg(&main)
        .arg("run")
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let c = db.client().await;
    let first = send(&c, "file.agent", "default", "a", "one").await;
    wait_state(&c, first, "submitted", Duration::from_secs(15)).await;
    // HUP: a new profile appears without a restart.
    std::fs::write(
        dir.path().join("file.conf"),
        format!(
            "[default]\npath = \"{0}/spool.jsonl\"\n[late]\npath = \"{0}/late.jsonl\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    signal(&child, "HUP");
    wait_for(Duration::from_secs(15), "the reload", || async {
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("profiles reloaded")
            .then_some(())
    })
    .await;
    let late = send(&c, "file.agent", "late", "a", "two").await;
    wait_state(&c, late, "submitted", Duration::from_secs(15)).await;
    assert!(dir.path().join("late.jsonl").exists());
    // TERM: a clean, successful exit.
    signal(&child, "TERM");
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("stop requested") && text.contains("outboxd stopped"),
        "{text}"
    );
}

#[tokio::test]
async fn the_daemons_sessions_use_the_configured_synchronous_commit() {
    let db = TestDb::new().await;
    assert_eq!(Config::default().synchronous_commit, "off");
    for setting in ["off", "on"] {
        let pool =
            outboxd::db::Db::connect(&db.url, 2, Duration::from_secs(5), Some(setting)).unwrap();
        let c = pool.pool().get().await.unwrap();
        let shown: String = c
            .query_one("SHOW synchronous_commit", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(shown, setting);
    }
    let e = parse_main("synchronous_commit = \"sometimes\"").unwrap_err();
    assert!(e.contains("key `synchronous_commit`"), "{e}");
}

/// `[kafka]` is off unless present; its keys are checked and named; `OUTBOXD_KAFKA_BROKERS`
/// (comma-separated) replaces the brokers.
#[test]
fn the_kafka_section_is_parsed_checked_and_overridden_by_env() {
    assert!(parse_main("").unwrap().kafka.is_none());
    let cfg = Config::parse(
        "[kafka]\nbrokers = [\"k1:9092\"]\nsend_topic = \"outbox.send\"\nbatch_records = 7\n",
        Path::new("/etc/outboxd/outboxd.toml"),
        |k| (k == "OUTBOXD_KAFKA_BROKERS").then(|| "a:1, b:2".to_string()),
    )
    .unwrap();
    let k = cfg.kafka.unwrap();
    assert_eq!(k.brokers, ["a:1", "b:2"]);
    assert_eq!((k.batch_records, k.group.as_str()), (7, "outboxd"));
    let e = parse_main("[kafka]\nbrokers = [\"k:9092\"]\nsend_topic = \"s\"\nbatch_records = 0\n")
        .unwrap_err();
    assert!(e.contains("kafka.batch_records"), "{e}");
    let e = parse_main("[kafka]\nbrokers = [\"k:9092\"]\nsend_topc = \"s\"\n").unwrap_err();
    assert!(e.contains("send_topc"), "{e}");
    let e = parse_main("[kafka]\nsend_topic = \"s\"\n").unwrap_err();
    assert!(e.contains("kafka.brokers"), "{e}");
}
