//! Least-privilege SQL (migration 004) against a real PostgreSQL: every function pins a trusted
//! search_path, an operator or function planted on the caller's search_path never runs, and each of
//! the three roles can do what it is for and nothing else — proved by logging in as a fresh
//! member of each group and running real statements that either work or fail with
//! 42501 insufficient_privilege. Also: the daemon runs as `outboxd_daemon` (logged in as a member,
//! or switched to it by `session_role`) and still creates and migrates its database.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use uuid::Uuid;

/// The daemon's hot path and the owner's housekeeping: closed to PUBLIC.
const HOT_PATH: &[&str] = &[
    "claim",
    "extend_leases",
    "record_outcomes",
    "reclaim_expired",
    "release",
];

/// Runs `sql` and asserts it is refused with 42501 insufficient_privilege.
async fn denied(c: &tokio_postgres::Client, sql: &str) {
    match c.batch_execute(sql).await {
        Ok(()) => panic!("must be refused: {sql}"),
        Err(e) => assert_eq!(sqlstate(&e), "42501", "{sql}: {e:?}"),
    }
}

/// Runs `sql` and asserts it works.
async fn works(c: &tokio_postgres::Client, sql: &str) {
    if let Err(e) = c.batch_execute(sql).await {
        panic!("must work: {sql}: {e:?}");
    }
}

/// One call per overload of `outbox.<name>`, every argument NULL of its type: the privilege check
/// comes before the body, whatever the signature is.
async fn null_calls(admin: &tokio_postgres::Client, name: &str) -> Vec<String> {
    let rows = admin
        .query(
            "SELECT format('SELECT * FROM outbox.%I(%s)', p.proname, \
                    coalesce((SELECT string_agg('NULL::' || format_type(a.t, NULL), ', ' ORDER BY a.i) \
                                FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY AS a (t, i)), '')) \
               FROM pg_proc p WHERE p.pronamespace = 'outbox'::regnamespace AND p.proname = $1",
            &[&name],
        )
        .await
        .unwrap();
    assert!(!rows.is_empty(), "outbox.{name} exists");
    rows.iter().map(|r| r.get(0)).collect()
}

async fn send_file(c: &tokio_postgres::Client, code: Option<&str>, address: &str) -> Uuid {
    c.query_one(
        "SELECT id FROM api.send_message(NULL, 'file.agent', 'default', $2, 's', 'c', pCode => $1)",
        &[&code, &address],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test]
async fn every_function_pins_a_trusted_search_path_and_none_is_public() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let rows = c
        .query(
            "SELECT p.oid::regprocedure::text, \
                    (SELECT s FROM unnest(p.proconfig) s WHERE s LIKE 'search\\_path=%'), \
                    has_function_privilege('public', p.oid, 'EXECUTE') \
               FROM pg_proc p WHERE p.pronamespace IN ('outbox'::regnamespace, 'api'::regnamespace) \
              ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    assert!(rows.len() > 20, "the functions of outbox and api");
    let mut problems = Vec::new();
    for r in &rows {
        let (name, path, public): (String, Option<String>, bool) = (r.get(0), r.get(1), r.get(2));
        match path.as_deref().and_then(|p| p.strip_prefix("search_path=")) {
            None => problems.push(format!("{name}: no pinned search_path")),
            Some(p) => {
                let schemas: Vec<&str> = p.split(',').map(|s| s.trim().trim_matches('"')).collect();
                if schemas.first() != Some(&"pg_catalog")
                    || schemas
                        .iter()
                        .any(|s| !["pg_catalog", "outbox", "api", "pg_temp"].contains(s))
                    || schemas.iter().position(|s| *s == "pg_temp") != Some(schemas.len() - 1)
                {
                    problems.push(format!(
                        "{name}: search_path {p} (want pg_catalog first, pg_temp last, only our schemas)"
                    ));
                }
            }
        }
        if public {
            problems.push(format!("{name}: executable by PUBLIC"));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[tokio::test]
async fn an_operator_or_function_planted_on_the_search_path_never_runs() {
    let db = TestDb::new().await;
    let c = db.client().await;
    // What a user allowed to create in a schema on the daemon's search path could do: exact
    // matches for `integer * interval` (002's lease arithmetic) and for make_interval(numeric)
    // (002's execute_object_action), which beat the built-ins that need a cast.
    c.batch_execute(
        "CREATE FUNCTION public.planted(integer, interval) RETURNS interval LANGUAGE plpgsql AS \
           $$ BEGIN RAISE EXCEPTION 'planted operator ran as %', current_user; END $$; \
         CREATE OPERATOR public.* (LEFTARG = integer, RIGHTARG = interval, FUNCTION = public.planted); \
         CREATE FUNCTION public.make_interval(secs numeric) RETURNS interval LANGUAGE plpgsql AS \
           $$ BEGIN RAISE EXCEPTION 'planted make_interval ran as %', current_user; END $$; \
         SET search_path = \"$user\", public",
    )
    .await
    .unwrap();
    // The plant works where nothing is pinned: this session resolves to it.
    let e = c
        .batch_execute("SELECT 2 * interval '1 millisecond'")
        .await
        .unwrap_err();
    assert!(format!("{e:?}").contains("planted"), "{e:?}");

    for _ in 0..3 {
        send_file(&c, None, "a").await;
    }
    let claim = Uuid::new_v4();
    let claimed = c
        .query("SELECT id FROM outbox.claim('w', 2, 60000, $1)", &[&claim])
        .await
        .unwrap_or_else(|e| panic!("claim ran the planted operator: {e:?}"));
    assert_eq!(claimed.len(), 2);
    let ids: Vec<Uuid> = claimed.iter().map(|r| r.get(0)).collect();
    let claims = vec![claim; ids.len()];
    let held = c
        .query(
            "SELECT id FROM outbox.extend_leases('w', $1, $2, 60000)",
            &[&ids, &claims],
        )
        .await
        .unwrap_or_else(|e| panic!("extend_leases ran the planted operator: {e:?}"));
    assert_eq!(held.len(), 2);
    let released: i32 = c
        .query_one("SELECT outbox.release('w', $1, $2, 10)", &[&ids, &claims])
        .await
        .unwrap_or_else(|e| panic!("release ran the planted operator: {e:?}"))
        .get(0);
    assert_eq!(released, 2);
    let id = send_file(&c, None, "b").await;
    c.query_one(
        "SELECT api.execute_object_action($1, 'send', '{\"lease_seconds\": 5}')",
        &[&id],
    )
    .await
    .unwrap_or_else(|e| panic!("execute_object_action ran the planted make_interval: {e:?}"));
    let lease: f64 = c
        .query_one(
            "SELECT extract(epoch FROM lease_expires_at - now())::float8 FROM outbox.live_messages WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(lease > 3.0 && lease <= 5.0, "lease of 5 s, got {lease}");
}

#[tokio::test]
async fn the_application_role_enqueues_and_inspects_through_api_only() {
    let db = TestDb::new().await;
    let admin = db.client().await;
    let role = TestRole::new("outboxd_app").await;
    let app = role.client(&db).await;

    // Enqueue and inspect.
    let id = send_file(&app, Some("order-1"), "alice@example.com").await;
    let row = app
        .query_one(
            "SELECT statecode, address FROM api.get_service_message($1)",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "prepared");
    let listed: i64 = app
        .query_one(
            "SELECT count(*) FROM api.outbox('prepared') WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(listed, 1);
    let by: String = app
        .query_one(
            "SELECT changed_by FROM api.message_history WHERE message_id = $1 AND action = 'submit'",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(by, role.name, "history names the application's login");
    works(&app, "SELECT count(*) FROM api.message_attempt").await;
    works(
        &app,
        "SELECT api.add_outbox(NULL, 'file.agent'::text, NULL, 'default', 'x', 's', 'c')",
    )
    .await;
    let created: Uuid = app
        .query_one(
            "SELECT api.add_outbox(NULL, (SELECT agent FROM api.service_message LIMIT 1), NULL, 'default', 'x', 's', 'c')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let label_ok: bool = app
        .query_one(
            "SELECT result FROM api.set_object_label($1, 'mine')",
            &[&created],
        )
        .await
        .unwrap()
        .get(0);
    assert!(label_ok);
    // The public actions an application may run.
    for action in ["submit", "cancel", "delete", "restore"] {
        app.query_one(
            "SELECT api.execute_object_action($1, $2)",
            &[&created, &action],
        )
        .await
        .unwrap_or_else(|e| panic!("{action}: {e:?}"));
    }
    // The same code again returns the existing message and does not rewrite its address.
    let again = send_file(&app, Some("order-1"), "mallory@example.com").await;
    assert_eq!(again, id);
    let address: String = admin
        .query_one(
            "SELECT address FROM outbox.live_messages WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(address, "alice@example.com");

    // send, done and fail are the daemon's: a message is not marked done by an application.
    for action in ["send", "done", "fail"] {
        let e = app
            .query_one("SELECT api.execute_object_action($1, $2)", &[&id, &action])
            .await
            .expect_err(action);
        assert_eq!(sqlstate(&e), "42501", "{action}: {e:?}");
        assert!(
            e.as_db_error()
                .unwrap()
                .message()
                .starts_with("ERR-403-033"),
            "{e:?}"
        );
    }
    // Nor by calling the daemon's entry point directly.
    denied(
        &app,
        &format!("SELECT outbox.daemon_action('{id}', 'done', NULL)"),
    )
    .await;
    assert_eq!(state_of(&admin, id).await, "prepared");

    // No direct table access, written or read.
    denied(
        &app,
        &format!("UPDATE outbox.messages SET address = 'mallory@example.com' WHERE id = '{id}'"),
    )
    .await;
    denied(
        &app,
        "INSERT INTO outbox.messages (agent_id, state) SELECT agent, 'prepared' FROM api.service_message LIMIT 1",
    )
    .await;
    denied(&app, "DELETE FROM outbox.messages").await;
    denied(&app, "SELECT count(*) FROM outbox.messages").await;
    denied(&app, "SELECT count(*) FROM outbox.attempts").await;
    denied(&app, "INSERT INTO outbox.history (message_id, new_state, action, changed_by) VALUES (gen_random_uuid(), 'x', 'x', 'x')").await;
    // No hot path, no housekeeping, no internals, no replies.
    for name in HOT_PATH
        .iter()
        .chain(&["purge", "insert_outbox", "run_action"])
    {
        for call in null_calls(&admin, name).await {
            denied(&app, &call).await;
        }
    }
    denied(
        &app,
        &format!(
            "SELECT api.add_inbox('{id}', 'file.agent'::text, NULL, 'default', 'a', 's', 'forged')"
        ),
    )
    .await;
    // No DDL in either schema.
    denied(&app, "CREATE TABLE outbox.mine (id int)").await;
    denied(
        &app,
        "CREATE FUNCTION api.mine() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    )
    .await;
}

#[tokio::test]
async fn the_daemon_role_runs_the_hot_path_and_reads_but_writes_no_table_and_runs_no_ddl() {
    let db = TestDb::new().await;
    let admin = db.client().await;
    let role = TestRole::new("outboxd_daemon").await;
    let daemon = role.client(&db).await;

    // The hot path, whatever its signatures: executable (an all-NULL call does nothing).
    for name in HOT_PATH {
        for call in null_calls(&admin, name).await {
            works(&daemon, &call).await;
        }
    }
    // Reads messages and their logs (what `outboxd status` reads), enqueues (`outboxd send`).
    let id = send_file(&daemon, None, "a").await;
    works(&daemon, "SELECT count(*) FROM outbox.messages").await;
    works(&daemon, "SELECT count(*) FROM outbox.attempts").await;
    works(&daemon, "SELECT count(*) FROM outbox.history").await;
    works(&daemon, "SELECT count(*) FROM api.service_message").await;
    // The daemon's actions, and replies.
    for action in ["send", "done"] {
        daemon
            .query_one("SELECT api.execute_object_action($1, $2)", &[&id, &action])
            .await
            .unwrap_or_else(|e| panic!("{action}: {e:?}"));
    }
    assert_eq!(state_of(&admin, id).await, "submitted");
    daemon
        .query_one(
            "SELECT api.add_inbox($1, 'file.agent'::text, NULL, 'default', 'a', 's', 'reply')",
            &[&id],
        )
        .await
        .unwrap();
    daemon
        .query_one("SELECT api.execute_object_action($1, 'repeat')", &[&id])
        .await
        .unwrap();

    // No direct writes: every change goes through the functions and their state machine.
    denied(
        &daemon,
        &format!("UPDATE outbox.messages SET state = 'submitted' WHERE id = '{id}'"),
    )
    .await;
    denied(
        &daemon,
        "INSERT INTO outbox.messages (agent_id) SELECT id FROM outbox.agents LIMIT 1",
    )
    .await;
    denied(&daemon, "DELETE FROM outbox.attempts").await;
    denied(&daemon, "DELETE FROM outbox.history").await;
    denied(&daemon, "TRUNCATE outbox.messages").await;
    denied(
        &daemon,
        "UPDATE outbox.transitions SET to_state = 'submitted'",
    )
    .await;
    // No DDL, no housekeeping.
    denied(&daemon, "CREATE TABLE outbox.mine (id int)").await;
    denied(&daemon, "DROP TABLE outbox.attempts").await;
    denied(&daemon, "ALTER TABLE outbox.messages ADD COLUMN x int").await;
    denied(&daemon, "ALTER FUNCTION outbox.actor() RESET search_path").await;
    denied(
        &daemon,
        "CREATE FUNCTION api.mine() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    )
    .await;
    for call in null_calls(&admin, "purge").await {
        denied(&daemon, &call).await;
    }
}

#[tokio::test]
async fn the_owner_owns_everything_and_later_migrations_run_as_it() {
    let db = TestDb::new().await;
    let admin = db.client().await;
    let foreign: Vec<String> = admin
        .query(
            "SELECT 'schema ' || nspname FROM pg_namespace \
              WHERE nspname IN ('outbox', 'api') AND nspowner <> 'outboxd_owner'::regrole \
             UNION ALL \
             SELECT 'relation ' || c.oid::regclass::text FROM pg_class c \
              WHERE c.relnamespace IN ('outbox'::regnamespace, 'api'::regnamespace) \
                AND c.relowner <> 'outboxd_owner'::regrole \
             UNION ALL \
             SELECT 'function ' || p.oid::regprocedure::text FROM pg_proc p \
              WHERE p.pronamespace IN ('outbox'::regnamespace, 'api'::regnamespace) \
                AND p.proowner <> 'outboxd_owner'::regrole \
             UNION ALL \
             SELECT 'type ' || t.oid::regtype::text FROM pg_type t \
              WHERE t.typnamespace IN ('outbox'::regnamespace, 'api'::regnamespace) \
                AND t.typowner <> 'outboxd_owner'::regrole",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        foreign.is_empty(),
        "not owned by outboxd_owner: {foreign:#?}"
    );

    let role = TestRole::new("outboxd_owner").await;
    let owner = role.client(&db).await;
    // A later migration, as the README tells them to begin.
    works(
        &owner,
        "BEGIN; SET LOCAL ROLE outboxd_owner; \
         CREATE TABLE outbox.later (id int); \
         CREATE FUNCTION outbox.later_fn() RETURNS int LANGUAGE sql \
           SET search_path = pg_catalog, outbox, pg_temp AS 'SELECT 1'; \
         COMMIT",
    )
    .await;
    let (table_owner, public_exec): (String, bool) = admin
        .query_one(
            "SELECT (SELECT relowner::regrole::text FROM pg_class WHERE oid = 'outbox.later'::regclass), \
                    has_function_privilege('public', 'outbox.later_fn()', 'EXECUTE')",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(table_owner, "outboxd_owner");
    assert!(
        !public_exec,
        "what the owner creates later is not executable by PUBLIC"
    );
    works(&owner, "SELECT outbox.purge('30 days')").await;
    // The owner is not the daemon: no role switch needed for housekeeping, but it does not run
    // as a superuser either.
    denied(&owner, "CREATE ROLE outboxd_t_not_allowed").await;
}

/// A file connector profile writing JSON lines under `dir`.
fn file_conf(dir: &Path) -> String {
    format!(
        "[default]\npath = \"{}\"\n",
        path_str(&dir.join("out.jsonl"))
    )
}

#[tokio::test]
async fn a_daemon_logged_in_as_a_member_of_the_daemon_role_delivers() {
    let db = TestDb::new().await;
    let role = TestRole::new("outboxd_daemon").await;
    let app_role = TestRole::new("outboxd_app").await;
    let app = app_role.client(&db).await;
    let admin = db.client().await;
    let dir = tempfile::tempdir().unwrap();
    let mut t = TestConfig::new(&db, &[("file", &file_conf(dir.path()))]);
    t.config.database_url = outboxd::config::Secret::new(db.url_as(&role.name));
    // As shipped: on an up-to-date database these find nothing to do, which the role may see.
    t.config.migrate_on_start = true;
    t.config.create_database = true;
    let daemon = Daemon::start(t.config.clone());
    wait_listening(&admin, Duration::from_secs(10)).await;
    let ids = [
        send_file(&app, None, "a").await,
        send_file(&app, None, "b").await,
    ];
    for id in ids {
        wait_state(&admin, id, "submitted", Duration::from_secs(10)).await;
    }
    let report = daemon.stop().await;
    assert_eq!(report.delivered, 2);
    let lines = std::fs::read_to_string(dir.path().join("out.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 2);
}

#[tokio::test]
async fn session_role_switches_the_daemons_sessions_while_it_creates_and_migrates_as_the_login() {
    // A database that does not exist yet, as on a fresh machine, and the shipped configuration's
    // session_role; the login (the test server's superuser) creates and migrates.
    let db = TestDb::reserved();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("file.conf"), file_conf(dir.path())).unwrap();
    let text = format!(
        "database_url = \"{}\"\nsession_role = \"outboxd_daemon\"\npoll_interval = \"60s\"\n\
         lease = \"5s\"\ndb_timeout = \"5s\"\ngrace_period = \"5s\"\n\
         migrate_on_start = true\ncreate_database = true\n[connectors]\nfile = \"file.conf\"\n",
        db.url
    );
    let cfg =
        outboxd::config::Config::parse(&text, &dir.path().join("outboxd.toml"), |_| None).unwrap();
    assert_eq!(cfg.session_role.as_deref(), Some("outboxd_daemon"));
    let daemon = Daemon::start(cfg.clone());
    let admin = wait_for(Duration::from_secs(20), "the database to exist", || async {
        match tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await {
            Ok((c, conn)) => {
                tokio::spawn(conn);
                Some(c)
            }
            Err(_) => None,
        }
    })
    .await;
    wait_listening(&admin, Duration::from_secs(20)).await;
    let id = send_file(&admin, None, "a").await;
    wait_state(&admin, id, "submitted", Duration::from_secs(10)).await;
    let report = daemon.stop().await;
    assert_eq!(report.delivered, 1);

    // The daemon's sessions (they are opened from this URL) run as the daemon role…
    let (c, conn) = tokio_postgres::connect(cfg.database_url.expose(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let (current, session): (String, String) = c
        .query_one("SELECT current_user::text, session_user::text", &[])
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(current, "outboxd_daemon");
    assert_ne!(session, "outboxd_daemon");
    // …which could not have run the migrations: they ran as the login, and the objects belong to
    // the owner.
    denied(&c, "CREATE TABLE outbox.mine (id int)").await;
    let owner: String = admin
        .query_one(
            "SELECT relowner::regrole::text FROM pg_class WHERE oid = 'outbox.messages'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, "outboxd_owner");
}

#[test]
fn session_role_is_a_checked_plain_name_and_the_environment_can_switch_it_off() {
    let parse = |text: &str, env: &[(&str, &str)]| {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        outboxd::config::Config::parse(text, Path::new("/etc/outboxd/outboxd.toml"), |k| {
            env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })
    };
    let base = "database_url = \"postgres://postgres@db/outboxd\"\n";
    let cfg = parse(&format!("{base}session_role = \"outboxd_daemon\"\n"), &[]).unwrap();
    let pg: tokio_postgres::Config = cfg.database_url.expose().parse().unwrap();
    assert_eq!(pg.get_options(), Some("-c role=outboxd_daemon"));
    assert_eq!(pg.get_user(), Some("postgres"));
    // From the environment, and switched off by an empty value.
    let cfg = parse(base, &[("OUTBOXD_SESSION_ROLE", "outboxd_daemon")]).unwrap();
    assert_eq!(cfg.session_role.as_deref(), Some("outboxd_daemon"));
    let cfg = parse(
        &format!("{base}session_role = \"outboxd_daemon\"\n"),
        &[("OUTBOXD_SESSION_ROLE", "")],
    )
    .unwrap();
    assert_eq!(cfg.session_role, None);
    assert_eq!(cfg.database_url.expose(), "postgres://postgres@db/outboxd");
    // listen_url switches too.
    let cfg = parse(
        &format!(
            "{base}listen_url = \"postgres://postgres@direct/outboxd\"\nsession_role = \"r\"\n"
        ),
        &[],
    )
    .unwrap();
    let pg: tokio_postgres::Config = cfg.listen_url.unwrap().expose().parse().unwrap();
    assert_eq!(pg.get_options(), Some("-c role=r"));
    // Not a plain name: refused, naming the file and the key.
    let e = parse(&format!("{base}session_role = \"x -c y\"\n"), &[]).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("session_role"), "{e}");
    assert!(
        e.to_string().starts_with("/etc/outboxd/outboxd.toml"),
        "{e}"
    );
}
