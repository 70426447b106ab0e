//! Templates (issue 11): versions in the database, messages built from a template and rendered by
//! the daemon before the file connector writes them, escaping per kind, a missing variable failing
//! the message for good, syntax checked on save by the CLI, the app role's rights, `outboxd render`.

mod common;

use std::time::Duration;

use common::*;
use uuid::Uuid;

const T: Duration = Duration::from_secs(15);

fn file_cfg(db: &TestDb, spool: &std::path::Path) -> TestConfig {
    TestConfig::new(
        db,
        &[(
            "file",
            &format!("[default]\npath = \"{}/out.jsonl\"\n", path_str(spool)),
        )],
    )
}

/// The spool lines, as JSON.
fn spool_lines(spool: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(spool.join("out.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn line_of(spool: &std::path::Path, id: Uuid) -> serde_json::Value {
    spool_lines(spool)
        .into_iter()
        .find(|l| l["id"] == id.to_string())
        .unwrap_or_else(|| panic!("no spool line for {id}"))
}

async fn add(
    c: &tokio_postgres::Client,
    name: &str,
    kind: &str,
    subject: Option<&str>,
    body: &str,
) {
    c.execute(
        "SELECT api.add_template($1, $2, $3, $4, 'file.agent')",
        &[&name, &kind, &body, &subject],
    )
    .await
    .unwrap();
}

async fn send_template(c: &tokio_postgres::Client, name: &str, vars: serde_json::Value) -> Uuid {
    c.query_one(
        "SELECT api.send_template(NULL, NULL, NULL, 'someone', $1, $2)",
        &[&name, &vars],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_adds_a_version_and_messages_keep_theirs() {
    let db = TestDb::new().await;
    let spool = tempfile::tempdir().unwrap();
    let c = db.client().await;
    add(
        &c,
        "notice",
        "text",
        Some("Hi {{ name }}"),
        "Old: {{ name }}",
    )
    .await;
    // Enqueued before the edit, delivered after it.
    let before = send_template(&c, "notice", serde_json::json!({"name": "Ann"})).await;
    let v: i32 = c
        .query_one(
            "SELECT api.update_template('notice', 'New: {{ name }}')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 2);
    let after = send_template(&c, "notice", serde_json::json!({"name": "Bob"})).await;

    let listed = c
        .query_one(
            "SELECT version FROM api.templates() WHERE name = 'notice'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(listed.get::<_, i32>(0), 2);
    let old = c
        .query_one("SELECT body, subject FROM api.template('notice', 1)", &[])
        .await
        .unwrap();
    assert_eq!(old.get::<_, String>(0), "Old: {{ name }}");
    // The subject is kept when an update gives none.
    let new = c
        .query_one("SELECT body, subject FROM api.template('notice')", &[])
        .await
        .unwrap();
    assert_eq!(new.get::<_, String>(0), "New: {{ name }}");
    assert_eq!(new.get::<_, String>(1), "Hi {{ name }}");
    // A version is never rewritten, even by the owner.
    let e = c
        .execute("UPDATE outbox.template_versions SET body = 'x'", &[])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("ERR-400-042") || format!("{e:?}").contains("ERR-400-042"));

    // The TestConfig holds the conf files' directory: keep it until the daemon stops.
    let tc = file_cfg(&db, spool.path());
    let d = Daemon::start(tc.config.clone());
    wait_state(&c, before, "submitted", T).await;
    wait_state(&c, after, "submitted", T).await;
    d.stop().await;

    let l = line_of(spool.path(), before);
    assert_eq!(l["content"], "Old: Ann");
    assert_eq!(l["subject"], "Hi Ann");
    let l = line_of(spool.path(), after);
    assert_eq!(l["content"], "New: Bob");
    assert_eq!(l["subject"], "Hi Bob");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_renders_loops_html_and_json_escaping() {
    let db = TestDb::new().await;
    let spool = tempfile::tempdir().unwrap();
    let c = db.client().await;
    add(
        &c,
        "mail",
        "html",
        Some("Order {{ order }}"),
        "<p>Hello {{ name }}</p><ul>{% for i in items %}<li>{{ i | title }}</li>{% endfor %}</ul>\
         {% if note is defined %}<b>{{ note }}</b>{% endif %}",
    )
    .await;
    add(
        &c,
        "hook",
        "json",
        None,
        r#"{"text": {{ text }}, "count": {{ items | length }}}"#,
    )
    .await;
    let html = send_template(
        &c,
        "mail",
        serde_json::json!({"name": "<script>alert(1)</script>", "order": 7, "items": ["tea", "cake"]}),
    )
    .await;
    let tricky = "say \"hi\"\n\\ </script>";
    let json = send_template(
        &c,
        "hook",
        serde_json::json!({"text": tricky, "items": [1, 2, 3]}),
    )
    .await;

    // The TestConfig holds the conf files' directory: keep it until the daemon stops.
    let tc = file_cfg(&db, spool.path());
    let d = Daemon::start(tc.config.clone());
    wait_state(&c, html, "submitted", T).await;
    wait_state(&c, json, "submitted", T).await;
    d.stop().await;

    let l = line_of(spool.path(), html);
    assert_eq!(l["subject"], "Order 7");
    assert_eq!(
        l["content"],
        "<p>Hello &lt;script&gt;alert(1)&lt;&#x2f;script&gt;</p><ul><li>Tea</li><li>Cake</li></ul>"
    );
    let l = line_of(spool.path(), json);
    let body: serde_json::Value = serde_json::from_str(l["content"].as_str().unwrap()).unwrap();
    assert_eq!(body, serde_json::json!({"text": tricky, "count": 3}));
    // The stored message keeps its recorded version and variables, not rendered text.
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM outbox.message_templates mt \
             JOIN outbox.template_versions v ON v.id = mt.template_version_id \
             WHERE mt.message_id = ANY($1) AND v.version = 1",
            &[&vec![html, json]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_variable_fails_the_message_for_good_and_names_it() {
    let db = TestDb::new().await;
    let spool = tempfile::tempdir().unwrap();
    let c = db.client().await;
    add(&c, "greet", "text", None, "Hello {{ user.first_name }}!").await;
    // A syntax error saved with plain SQL (not through the CLI) fails at render time.
    add(&c, "broken", "text", None, "Hello {{ name ").await;
    let missing = send_template(&c, "greet", serde_json::json!({"user": {}})).await;
    let broken = send_template(&c, "broken", serde_json::json!({"name": "x"})).await;
    let good = send_template(
        &c,
        "greet",
        serde_json::json!({"user": {"first_name": "Eve"}}),
    )
    .await;

    // The TestConfig holds the conf files' directory: keep it until the daemon stops.
    let tc = file_cfg(&db, spool.path());
    let d = Daemon::start(tc.config.clone());
    wait_state(&c, missing, "failed", T).await;
    wait_state(&c, broken, "failed", T).await;
    wait_state(&c, good, "submitted", T).await;
    d.stop().await;

    let a = c
        .query(
            "SELECT outcome, error_code, error_text FROM outbox.attempts WHERE message_id = $1",
            &[&missing],
        )
        .await
        .unwrap();
    assert_eq!(a.len(), 1, "permanent: one attempt, no retry");
    assert_eq!(a[0].get::<_, String>(0), "failed");
    assert_eq!(a[0].get::<_, String>(1), "template-missing-var");
    let text: String = a[0].get(2);
    assert!(text.contains("user.first_name"), "{text}");
    let code: String = c
        .query_one(
            "SELECT error_code FROM outbox.attempts WHERE message_id = $1",
            &[&broken],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(code, "template-syntax");
    // Nothing with a placeholder reached the spool.
    let lines = spool_lines(spool.path());
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["content"], "Hello Eve!");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_role_uses_the_template_api_but_not_the_tables() {
    let db = TestDb::new().await;
    let role = TestRole::new("outboxd_app").await;
    let app = role.client(&db).await;
    app.execute(
        "SELECT api.add_template('t', 'text', 'Hi {{ n }}', NULL, 'file.agent')",
        &[],
    )
    .await
    .unwrap();
    app.execute("SELECT api.update_template('t', 'Hey {{ n }}')", &[])
        .await
        .unwrap();
    let n: i64 = app
        .query_one("SELECT count(*) FROM api.templates()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let body: String = app
        .query_one(
            "SELECT body FROM api.preview_template('t', '{\"n\": 1}')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(body, "Hey {{ n }}");
    let id: Uuid = app
        .query_one(
            "SELECT api.send_template(NULL, NULL, NULL, 'x', 't', '{\"n\": 1}')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let c = db.client().await;
    assert_eq!(state_of(&c, id).await, "prepared");
    for sql in [
        "SELECT * FROM outbox.templates",
        "SELECT * FROM outbox.template_versions",
        "SELECT * FROM outbox.message_templates",
        "INSERT INTO outbox.templates (name, kind) VALUES ('x', 'text')",
        "UPDATE outbox.template_versions SET body = 'x'",
        "SELECT * FROM outbox.message_templates_of(ARRAY[]::uuid[])",
    ] {
        let e = app.execute(sql, &[]).await.unwrap_err();
        assert_eq!(sqlstate(&e), "42501", "{sql}: {e}");
    }
    // Errors keep their codes for applications.
    let e = app
        .execute("SELECT api.add_template('t', 'text', 'x')", &[])
        .await
        .unwrap_err();
    assert!(format!("{e:?}").contains("ERR-400-041"), "{e:?}");
    let e = app
        .execute("SELECT api.add_template('card', 'image', 'x')", &[])
        .await
        .unwrap_err();
    assert!(format!("{e:?}").contains("ERR-400-042"), "{e:?}");
    let e = app
        .execute(
            "SELECT api.send_template(NULL, NULL, NULL, 'x', 'nope', '{}')",
            &[],
        )
        .await
        .unwrap_err();
    assert!(format!("{e:?}").contains("ERR-400-040"), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_checks_syntax_on_save_and_renders_previews() {
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
    let p = |name: &str, text: &str| {
        let f = dir.path().join(name);
        std::fs::write(&f, text).unwrap();
        f
    };
    let bad = p("bad.html", "<p>{% for x in items %}{{ x }}</p>");
    let good = p("mail.html", "<p>Hi {{ name }}</p>\n");
    let vars = p("vars.json", r#"{"name": "<b>Al</b>"}"#);
    let c = db.client().await;

    // Refused before anything is stored.
    let (ok, _, err) = cli::run(
        cli::outboxd(&main)
            .args(["template", "add", "mail", "--file"])
            .arg(&bad),
    );
    assert!(!ok);
    assert!(err.contains("syntax error"), "{err}");
    let n: i64 = c
        .query_one("SELECT count(*) FROM outbox.templates", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);

    let (ok, _, err) = cli::run(
        cli::outboxd(&main)
            .args([
                "template",
                "add",
                "mail",
                "--agent",
                "file.agent",
                "--subject",
                "For {{ name }}",
                "--file",
            ])
            .arg(&good),
    );
    assert!(ok, "{err}");
    let kind: String = c
        .query_one("SELECT kind FROM api.template('mail')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kind, "html", "the kind comes from the extension");
    // An update is checked too.
    let (ok, _, err) = cli::run(
        cli::outboxd(&main)
            .args(["template", "update", "mail", "--file"])
            .arg(&bad),
    );
    assert!(!ok && err.contains("syntax error"), "{err}");
    let (ok, out, _) = cli::run(cli::outboxd(&main).args(["template", "list"]));
    assert!(ok);
    assert!(out.contains("mail\thtml\tfile.agent\t-\tv1"), "{out}");

    // render NAME from the database, and FILE from disk, with --out.
    let (ok, out, err) = cli::run(
        cli::outboxd(&main)
            .args(["render", "--template", "mail", "--vars"])
            .arg(&vars),
    );
    assert!(ok, "{err}");
    assert_eq!(
        out,
        "Subject: For <b>Al</b>\n\n<p>Hi &lt;b&gt;Al&lt;&#x2f;b&gt;</p>\n"
    );
    let out_file = dir.path().join("out.txt");
    let text = p("notice.txt", "Dear {{ name }}");
    let (ok, out, err) = cli::run(
        cli::outboxd(&main)
            .arg("render")
            .arg("--template")
            .arg(&text)
            .arg("--vars")
            .arg(&vars)
            .arg("--out")
            .arg(&out_file),
    );
    assert!(ok, "{err}");
    assert_eq!(out, "");
    assert_eq!(
        std::fs::read_to_string(&out_file).unwrap(),
        "Dear <b>Al</b>"
    );
    // A missing variable is an error with its code, not a half-rendered text.
    let (ok, out, err) = cli::run(
        cli::outboxd(&main)
            .arg("render")
            .arg("--template")
            .arg(&text),
    );
    assert!(!ok);
    assert!(out.is_empty());
    assert!(
        err.contains("template-missing-var") && err.contains("`name`"),
        "{err}"
    );
}
