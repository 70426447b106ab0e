//! Apostol-shaped SQL (issue 13, migration 006): the statements of `../shared/apostol.md` replayed
//! verbatim against outboxd's own database — the producer's as a login in `outboxd_app`, the
//! MessageServer's outbox statements as a login in `outboxd_daemon` — checking the columns (all 56
//! of Apostol's, in Apostol's order, outboxd's own after them), the states and the jsonb shapes.

mod common;

use common::*;
use serde_json::Value;
use uuid::Uuid;

/// The columns of Apostol's `api.service_message`, in Apostol's order (apostol.md).
const APOSTOL_COLUMNS: [&str; 56] = [
    "id",
    "object",
    "parent",
    "entity",
    "entitycode",
    "entityname",
    "class",
    "classcode",
    "classlabel",
    "type",
    "typecode",
    "typename",
    "typedescription",
    "statetype",
    "statetypecode",
    "statetypename",
    "state",
    "statecode",
    "statelabel",
    "created",
    "lastupdate",
    "operdate",
    "code",
    "name",
    "label",
    "description",
    "agenttype",
    "agenttypecode",
    "agenttypename",
    "agenttypedescription",
    "agent",
    "agentcode",
    "agentname",
    "agentdescription",
    "profile",
    "address",
    "subject",
    "content",
    "priority",
    "prioritycode",
    "priorityname",
    "prioritydescription",
    "owner",
    "ownercode",
    "ownername",
    "oper",
    "opercode",
    "opername",
    "area",
    "areacode",
    "areaname",
    "areadescription",
    "scope",
    "scopecode",
    "scopename",
    "scopedescription",
];

/// The canonical producer call of apostol.md, verbatim.
const SEND: &str = "SELECT id FROM api.send_message(null, (SELECT id FROM api.agent WHERE code = 'smtp.agent'), 'noreply@example.com', 'user@example.com', 'Hello', 'Body')";

/// Asserts that `names` start with Apostol's 56 columns in order.
fn assert_apostol_columns(what: &str, names: &[String]) {
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    assert!(
        names.len() > 56,
        "{what}: {} columns: {names:?}",
        names.len()
    );
    assert_eq!(&names[..56], &APOSTOL_COLUMNS[..], "{what}");
    // outboxd's own come after them.
    assert!(names[56..].contains(&"attempts"), "{what}: {names:?}");
}

/// The column names `sql` returns.
async fn columns_of(c: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    let st = c.prepare(sql).await.unwrap();
    st.columns().iter().map(|c| c.name().to_string()).collect()
}

fn error_text(e: tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| e.to_string())
}

#[tokio::test]
async fn the_producer_and_message_server_statements_of_apostol_md_run_verbatim() {
    let db = TestDb::new().await;
    let app_role = TestRole::new("outboxd_app").await;
    let daemon_role = TestRole::new("outboxd_daemon").await;
    let app = app_role.client(&db).await;
    let daemon = daemon_role.client(&db).await;

    // --- The application -------------------------------------------------------------------

    // The canonical call: one row, the message prepared when it returns.
    let rows = app.query(SEND, &[]).await.unwrap();
    assert_eq!(rows.len(), 1);
    let first: Uuid = rows[0].get("id");
    // The whole row is api.message: Apostol's columns in order, then outboxd's.
    let star = SEND.replacen("SELECT id FROM", "SELECT * FROM", 1);
    assert_apostol_columns("api.send_message", &columns_of(&app, &star).await);
    assert_apostol_columns(
        "api.message",
        &columns_of(&app, "SELECT * FROM api.message").await,
    );
    let r = app
        .query_one(
            "SELECT statecode, statetypecode, typecode, classcode, prioritycode, priorityname, \
                    agentcode, agenttypecode, agenttypename, profile, address, subject, content, \
                    code, entitycode, owner, area, scope, priority \
               FROM api.message WHERE id = $1",
            &[&first],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>("statecode"), "prepared");
    assert_eq!(r.get::<_, String>("statetypecode"), "enabled");
    assert_eq!(r.get::<_, String>("typecode"), "message.outbox");
    assert_eq!(r.get::<_, String>("classcode"), "outbox");
    assert_eq!(r.get::<_, String>("prioritycode"), "medium", "the default");
    assert_eq!(r.get::<_, String>("priorityname"), "Medium");
    assert_eq!(r.get::<_, i32>("priority"), 0);
    assert_eq!(r.get::<_, String>("agentcode"), "smtp.agent");
    assert_eq!(r.get::<_, String>("agenttypecode"), "email.agent");
    assert_eq!(r.get::<_, String>("agenttypename"), "E-mail");
    assert_eq!(r.get::<_, String>("profile"), "noreply@example.com");
    assert_eq!(r.get::<_, String>("address"), "user@example.com");
    assert_eq!(r.get::<_, String>("subject"), "Hello");
    assert_eq!(r.get::<_, String>("content"), "Body");
    let code: String = r.get("code");
    assert!(
        code.len() == 64 && code.chars().all(|c| c.is_ascii_hexdigit()),
        "a random 64-hex code: {code}"
    );
    assert_eq!(r.get::<_, String>("entitycode"), "message");
    assert!(r.get::<_, Option<Uuid>>("owner").is_none());
    assert!(r.get::<_, Option<Uuid>>("area").is_none());
    assert!(r.get::<_, Option<Uuid>>("scope").is_none());

    // Apostol's named arguments, label and description too.
    let named: Uuid = app
        .query_one(
            "SELECT id FROM api.send_message(pParent => null, pAgent => (SELECT id FROM api.agent WHERE code = 'smtp.agent'), \
             pProfile => 'noreply@example.com', pAddress => 'user@example.com', pSubject => 'Hi', \
             pContent => 'Body', pLabel => 'L', pDescription => 'D')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let r = app
        .query_one(
            "SELECT label, description FROM api.message WHERE id = $1",
            &[&named],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "L");
    assert_eq!(r.get::<_, String>(1), "D");

    // The priority codes map to outboxd's integer priority.
    for (code, value) in [("low", -1), ("medium", 0), ("high", 1), ("critical", 10)] {
        let p: String = app
            .query_one(
                "SELECT prioritycode FROM api.send_message(NULL, 'file.agent', 'default', 'a', 's', 'c', \
                 pPriority => (SELECT value FROM api.priority WHERE code = $1))",
                &[&code],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(p, code, "priority {value}");
    }

    // The agents view: ids by code, Apostol's leading columns.
    let names = columns_of(&app, "SELECT * FROM api.agent").await;
    assert_eq!(&names[..3], ["id", "object", "parent"]);
    for col in ["code", "name", "label", "description", "typecode"] {
        assert!(names.iter().any(|n| n == col), "api.agent.{col}: {names:?}");
    }
    let agents: Vec<(String, String)> = app
        .query("SELECT code, typecode FROM api.agent ORDER BY code", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (code, ty) in [
        ("system.agent", "system.agent"),
        ("notice.agent", "system.agent"),
        ("smtp.agent", "email.agent"),
        ("pop3.agent", "email.agent"),
        ("imap.agent", "email.agent"),
        ("fcm.agent", "api.agent"),
        ("m2m.agent", "api.agent"),
        ("sba.agent", "api.agent"),
    ] {
        assert!(
            agents.contains(&(code.to_string(), ty.to_string())),
            "{code} of type {ty} in api.agent: {agents:?}"
        );
    }

    // add_outbox: the same arguments plus pCode, created without submitting, returns the id.
    let add = "SELECT api.add_outbox(null, (SELECT id FROM api.agent WHERE code = 'smtp.agent'), 'invoice-7', 'noreply@example.com', 'user@example.com', 'Invoice', 'Body')";
    let created: Uuid = app.query_one(add, &[]).await.unwrap().get(0);
    let state: String = app
        .query_one(
            "SELECT statecode FROM api.get_service_message($1)",
            &[&created],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(state, "created");
    // Deliberate difference: a repeated pCode returns the existing message (idempotency).
    let again: Uuid = app.query_one(add, &[]).await.unwrap().get(0);
    assert_eq!(again, created);

    // api.outbox by state code and by state uuid.
    let created_state: Uuid = app
        .query_one("SELECT state FROM api.outbox WHERE id = $1", &[&created])
        .await
        .unwrap()
        .get(0);
    let by_uuid: Vec<Uuid> = app
        .query("SELECT id FROM api.outbox($1::uuid)", &[&created_state])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(by_uuid, vec![created]);
    let by_code: Vec<Uuid> = app
        .query("SELECT id FROM api.outbox('created') ORDER BY created", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(by_code, vec![created]);

    // execute_object_action with Apostol's parameter names: submit it.
    let j: Value = app
        .query_one(
            "SELECT api.execute_object_action(pObject => $1, pCode => 'submit')",
            &[&created],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(j["newstate"]["code"], "prepared");
    assert_eq!(j["object"], created.to_string());
    // Apostol's action codes that no state allows: ERR-400-032, naming the state.
    for code in ["edit", "enable", "drop", "disable", "update"] {
        let e = app
            .query_one(
                "SELECT api.execute_object_action($1, $2)",
                &[&created, &code],
            )
            .await
            .map(|_| ())
            .map_err(error_text)
            .unwrap_err();
        assert!(
            e.starts_with("ERR-400-032") && e.contains("\"prepared\""),
            "{code}: {e}"
        );
    }
    let e = app
        .query_one("SELECT api.execute_object_action($1, 'bogus')", &[&created])
        .await
        .map(|_| ())
        .map_err(error_text)
        .unwrap_err();
    assert!(e.starts_with("ERR-400-029"), "{e}");
    // The overload taking the action's uuid: cancel by id (the id the answer above names).
    let cancel_id: Uuid = daemon
        .query_one("SELECT id FROM outbox.actions WHERE code = 'cancel'", &[])
        .await
        .unwrap()
        .get(0);
    let j: Value = app
        .query_one(
            "SELECT api.execute_object_action($1, $2::uuid)",
            &[&created, &cancel_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(j["action"]["code"], "cancel");
    assert_eq!(j["action"]["id"], cancel_id.to_string());
    assert_eq!(j["newstate"]["code"], "created");
    let e = app
        .query_one(
            "SELECT api.execute_object_action($1, $2::uuid)",
            &[&created, &Uuid::new_v4()],
        )
        .await
        .map(|_| ())
        .map_err(error_text)
        .unwrap_err();
    assert!(e.starts_with("ERR-400-029"), "{e}");
    // send/done/fail stay the daemon's, by code and by uuid.
    let send_id: Uuid = daemon
        .query_one("SELECT id FROM outbox.actions WHERE code = 'send'", &[])
        .await
        .unwrap()
        .get(0);
    let e = app
        .query_one("SELECT api.execute_object_action($1, 'send')", &[&first])
        .await
        .map(|_| ())
        .map_err(error_text)
        .unwrap_err();
    assert!(e.starts_with("ERR-403-033"), "{e}");
    let e = app
        .query_one(
            "SELECT api.execute_object_action($1, $2::uuid)",
            &[&first, &send_id],
        )
        .await
        .map(|_| ())
        .map_err(error_text)
        .unwrap_err();
    assert!(e.starts_with("ERR-403-033"), "{e}");

    // --- MessageServer's outbox statements, as the daemon role -----------------------------

    let poll = "SELECT * FROM api.outbox('prepared') ORDER BY created";
    assert_apostol_columns("api.outbox(text)", &columns_of(&daemon, poll).await);
    assert_apostol_columns(
        "api.outbox(uuid)",
        &columns_of(&daemon, "SELECT * FROM api.outbox($1::uuid)").await,
    );
    let polled: Vec<Uuid> = daemon
        .query(poll, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get("id"))
        .collect();
    assert_eq!(polled.first(), Some(&first), "ORDER BY created: {polled:?}");

    let get = format!("SELECT * FROM api.get_service_message('{first}')");
    assert_apostol_columns("api.get_service_message", &columns_of(&daemon, &get).await);
    let m = daemon.query_one(&get, &[]).await.unwrap();
    for (col, want) in [
        ("agenttypecode", "email.agent"),
        ("agentcode", "smtp.agent"),
        ("profile", "noreply@example.com"),
        ("address", "user@example.com"),
        ("subject", "Hello"),
        ("content", "Body"),
        ("statecode", "prepared"),
    ] {
        assert_eq!(m.get::<_, String>(col), want, "{col}");
    }

    // send → set_object_label(provider id) → done.
    let act = |id: Uuid, code: &'static str| {
        let sql = format!("SELECT * FROM api.execute_object_action('{id}', '{code}')");
        let daemon = &daemon;
        async move {
            daemon
                .query_one(&sql, &[])
                .await
                .map(|r| r.get::<_, Value>(0))
                .map_err(error_text)
        }
    };
    let j = act(first, "send").await.unwrap();
    assert_eq!(j["action"]["code"], "send");
    assert!(j["action"]["id"].as_str().unwrap().parse::<Uuid>().is_ok());
    assert!(j.get("method").is_some());
    assert_eq!(j["object"], first.to_string());
    for key in ["id", "code", "label", "type", "typecode"] {
        assert!(j["newstate"].get(key).is_some(), "newstate.{key}: {j}");
    }
    assert_eq!(j["newstate"]["code"], "sending");
    assert_eq!(j["newstate"]["typecode"], "enabled");
    let label = daemon
        .query_one(
            &format!("SELECT * FROM api.set_object_label('{first}', 'projects/p/messages/1')"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(label.columns()[0].name(), "id");
    assert_eq!(label.columns()[1].name(), "result");
    assert_eq!(label.columns()[2].name(), "message");
    assert_eq!(label.get::<_, Uuid>(0), first);
    assert!(label.get::<_, bool>(1));
    let j = act(first, "done").await.unwrap();
    assert_eq!(j["newstate"]["code"], "submitted");
    assert_eq!(j["newstate"]["typecode"], "disabled");
    let r = daemon.query_one(&get, &[]).await.unwrap();
    assert_eq!(r.get::<_, String>("statecode"), "submitted");
    assert_eq!(r.get::<_, String>("label"), "projects/p/messages/1");

    // A reply saved with add_inbox in Apostol's argument order.
    let reply: Uuid = daemon
        .query_one(
            &format!(
                "SELECT api.add_inbox('{first}', (SELECT id FROM api.agent WHERE code = 'smtp.agent'), \
                 null, 'noreply@example.com', 'user@example.com', 'Re: Hello', '{{\"ok\":true}}', \
                 'reply-label', 'reply-description')"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let r = daemon
        .query_one(
            "SELECT parent, classcode, typecode, content, label, description FROM api.inbox WHERE id = $1",
            &[&reply],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, Uuid>("parent"), first);
    assert_eq!(r.get::<_, String>("classcode"), "inbox");
    assert_eq!(r.get::<_, String>("typecode"), "message.inbox");
    assert_eq!(r.get::<_, String>("content"), "{\"ok\":true}");
    assert_eq!(r.get::<_, String>("label"), "reply-label");
    assert_eq!(r.get::<_, String>("description"), "reply-description");

    // fail straight from prepared (legal), the error text in the label; the application repeats.
    let second: Uuid = app.query_one(SEND, &[]).await.unwrap().get(0);
    let label = daemon
        .query_one(
            &format!(
                "SELECT * FROM api.set_object_label('{second}', 'smtp-5xx: 550 no such user')"
            ),
            &[],
        )
        .await
        .unwrap();
    assert!(label.get::<_, bool>("result"));
    let j = act(second, "fail").await.unwrap();
    assert_eq!(j["newstate"]["code"], "failed");
    // A state the action does not fit: ERR-400-032 naming the state.
    let e = act(second, "done").await.unwrap_err();
    assert!(
        e.starts_with("ERR-400-032") && e.contains("\"failed\""),
        "{e}"
    );
    let j: Value = app
        .query_one("SELECT api.execute_object_action($1, 'repeat')", &[&second])
        .await
        .unwrap()
        .get(0);
    assert_eq!(j["newstate"]["code"], "prepared");
    // set_object_label reports instead of raising.
    let missing = daemon
        .query_one(
            &format!(
                "SELECT * FROM api.set_object_label('{}', 'x')",
                Uuid::new_v4()
            ),
            &[],
        )
        .await
        .unwrap();
    assert!(!missing.get::<_, bool>("result"));
    assert!(missing
        .get::<_, String>("message")
        .starts_with("ERR-400-030"));
}
