//! The `dingbot` and `dingtalk` connectors end to end: a real daemon and PostgreSQL, and an
//! in-process double of DingTalk's oapi host that verifies the robot signature and timestamp
//! window, the access tokens, the required fields and answers DingTalk's error bodies
//! (tests/common/dingtalk_double.rs).

mod common;
// Only this test binary needs the DingTalk double, so it stays out of `common`'s module tree.
#[path = "common/dingtalk_double.rs"]
mod double;

use std::time::Duration;

use base64::Engine;
use common::*;
use double::*;
use serde_json::{json, Value};
use uuid::Uuid;

const T: Duration = Duration::from_secs(15);

fn dingbot_conf(d: &DingtalkDouble, secret: &str) -> String {
    format!(
        "[default]\naccess_token = \"{ROBOT_TOKEN}\"\nsecret = \"{secret}\"\nendpoint = \"{}\"\n\
         retry = [\"20ms\", \"20ms\", \"20ms\"]\ntimeout = \"5s\"\n",
        d.url
    )
}

fn dingtalk_conf(d: &DingtalkDouble) -> String {
    dingtalk_conf_polling(d, r#"["50ms", "50ms"]"#)
}

fn dingtalk_conf_polling(d: &DingtalkDouble, polls: &str) -> String {
    format!(
        "[default]\nappkey = \"{APP_KEY}\"\nappsecret = \"{APP_SECRET}\"\nagent_id = {AGENT_ID}\n\
         endpoint = \"{}\"\nresult_polls = {polls}\n\
         retry = [\"20ms\", \"20ms\", \"20ms\"]\ntimeout = \"5s\"\n",
        d.url
    )
}

async fn setup(kinds: &[(&str, String)]) -> (TestDb, TestConfig, Daemon) {
    let db = TestDb::new().await;
    let list: Vec<(&str, &str)> = kinds.iter().map(|(k, t)| (*k, t.as_str())).collect();
    let tc = TestConfig::new(&db, &list);
    let d = Daemon::start(tc.config.clone());
    (db, tc, d)
}

/// Waits until `id` is submitted or failed and returns which.
async fn wait_final(c: &tokio_postgres::Client, id: Uuid) -> String {
    wait_for(
        T,
        &format!("message {id} to be submitted or failed"),
        || async {
            let s = state_of(c, id).await;
            (s == "submitted" || s == "failed").then_some(s)
        },
    )
    .await
}

async fn provider_id(c: &tokio_postgres::Client, id: Uuid) -> Option<String> {
    c.query_one(
        "SELECT provider_message_id FROM outbox.live_messages WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap()
    .get(0)
}

/// No text the database keeps about deliveries holds any of `secrets`.
async fn assert_no_secrets(c: &tokio_postgres::Client, secrets: &[&str]) {
    let rows = c
        .query(
            "SELECT coalesce(error_text, '') || ' ' || coalesce(provider_message_id, '') FROM outbox.attempts \
             UNION ALL SELECT coalesce(last_error_code, '') || ' ' || coalesce(provider_message_id, '') FROM outbox.live_messages \
             UNION ALL SELECT coalesce(error_text, '') FROM outbox.dingtalk_send_results \
             UNION ALL SELECT coalesce(error_text, '') FROM outbox.dingtalk_chats",
            &[],
        )
        .await
        .unwrap();
    for r in rows {
        let t: String = r.get(0);
        for s in secrets {
            assert!(!t.contains(s), "a secret in {t:?}");
        }
    }
}

async fn error_texts(c: &tokio_postgres::Client, id: Uuid) -> Vec<String> {
    c.query(
        "SELECT coalesce(error_text, '') FROM outbox.attempts WHERE message_id = $1 ORDER BY id",
        &[&id],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_robot_delivers_signed_messages_of_every_type() {
    let dd = DingtalkDouble::start().await;
    let (db, _tc, d) = setup(&[("dingbot", dingbot_conf(&dd, ROBOT_SECRET))]).await;
    let c = db.client().await;
    let mut ids = Vec::new();
    for sql in [
        "SELECT api.send_dingbot('default', 'text', 'disk full @13800000000', pAtMobiles => ARRAY['13800000000'], pAtUserIds => ARRAY['user1'])",
        "SELECT api.send_dingbot('default', 'markdown', '### Disk\n- full', 'Disk', pAtAll => true)",
        "SELECT api.send_dingbot('default', 'link', 'see the report', 'Report', pUrl => 'https://example.com/r', pPicUrl => 'https://example.com/p.png')",
        "SELECT api.send_dingbot('default', 'actionCard', 'approve?', 'Approval', pUrl => 'https://example.com/a', pButton => 'Open')",
    ] {
        ids.push(c.query_one(sql, &[]).await.unwrap().get::<_, Uuid>(0));
    }
    for id in &ids {
        assert_eq!(
            wait_final(&c, *id).await,
            "submitted",
            "{:?}",
            attempts(&c, *id).await
        );
        assert_eq!(
            attempts(&c, *id).await,
            vec![(1, "done".to_string(), None, Some(200))]
        );
    }
    let calls = dd.calls("/robot/send");
    assert_eq!(calls.len(), 4);
    let types: Vec<&str> = calls
        .iter()
        .map(|c| c.body["msgtype"].as_str().unwrap())
        .collect();
    for t in ["text", "markdown", "link", "actionCard"] {
        assert!(types.contains(&t), "{types:?}");
    }
    let text = calls.iter().find(|c| c.body["msgtype"] == "text").unwrap();
    assert_eq!(
        text.body,
        json!({"msgtype":"text","text":{"content":"disk full @13800000000"},
               "at":{"isAtAll":false,"atMobiles":["13800000000"],"atUserIds":["user1"]}})
    );
    let md = calls
        .iter()
        .find(|c| c.body["msgtype"] == "markdown")
        .unwrap();
    assert_eq!(md.body["at"]["isAtAll"], true);
    // Every call was accepted by the double's signature check, with the sign URL-encoded.
    assert!(calls.iter().all(|c| c.answer["errcode"] == 0));
    assert!(calls
        .iter()
        .all(|c| c.raw_query.contains("&timestamp=") && c.raw_query.contains("&sign=")));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_signature_is_rejected_and_the_message_fails_without_leaking() {
    let dd = DingtalkDouble::start().await;
    dd.echo_queries();
    let wrong = "SECwrong-secret-of-this-profile";
    let (db, _tc, d) = setup(&[("dingbot", dingbot_conf(&dd, wrong))]).await;
    let c = db.client().await;
    let id = send(&c, "dingbot.agent", "default", "robot", "plain text alert").await;
    assert_eq!(wait_final(&c, id).await, "failed");
    assert_eq!(
        attempts(&c, id).await,
        vec![(
            1,
            "failed".to_string(),
            Some("dingbot-310000".to_string()),
            Some(200)
        )]
    );
    let calls = dd.calls("/robot/send");
    assert_eq!(calls.len(), 1, "permanent: sent once");
    assert_eq!(calls[0].answer["errcode"], 310000);
    assert_eq!(
        calls[0].body,
        json!({"msgtype":"text","text":{"content":"plain text alert"}})
    );
    // The double echoed the query (token and sign) into its errmsg: all of it is scrubbed.
    let texts = error_texts(&c, id).await;
    assert!(texts[0].contains("sign not match"), "{texts:?}");
    let sign = calls[0].query["sign"].clone();
    assert_no_secrets(&c, &[ROBOT_TOKEN, wrong, &sign]).await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_fast_is_a_retry_held_back_ten_minutes_not_a_failure() {
    let dd = DingtalkDouble::start().await;
    dd.too_fast(1);
    let (db, _tc, d) = setup(&[("dingbot", dingbot_conf(&dd, ROBOT_SECRET))]).await;
    let c = db.client().await;
    let id = send(&c, "dingbot.agent", "default", "robot", "hello").await;
    wait_for(T, "the 130101 attempt", || async {
        (!attempts(&c, id).await.is_empty()).then_some(())
    })
    .await;
    wait_state(&c, id, "prepared", T).await;
    assert_eq!(
        attempts(&c, id).await,
        vec![(
            1,
            "retry".to_string(),
            Some("dingbot-130101".to_string()),
            Some(200)
        )]
    );
    // Held back by the block DingTalk announces (10 minutes), not the profile's 20 ms.
    let wait: f64 = c
        .query_one(
            "SELECT extract(epoch FROM next_attempt_at - now())::float8 FROM outbox.live_messages WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(wait > 540.0 && wait <= 600.0, "{wait}");
    assert_eq!(dd.calls("/robot/send").len(), 1);
    // The robot's windows are held back as long (the rate limiter's block).
    let blocked: i64 = c
        .query_one(
            "SELECT count(*) FROM outbox.rate_windows WHERE blocked_until > now() + interval '9 minutes'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(blocked > 0, "130101 blocks the profile's windows");
    // When the block is over (time passed, here by hand), it goes.
    c.execute(
        "UPDATE outbox.messages SET next_attempt_at = now() WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap();
    c.execute("UPDATE outbox.rate_windows SET blocked_until = NULL", &[])
        .await
        .unwrap();
    c.execute("NOTIFY outbox", &[]).await.unwrap();
    assert_eq!(wait_final(&c, id).await, "submitted");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_token_is_refreshed_once_on_a_token_error_then_the_notice_is_resent() {
    let dd = DingtalkDouble::start().await;
    // No getsendresult calls: the only calls with a token are the sends.
    let (db, _tc, d) = setup(&[("dingtalk", dingtalk_conf_polling(&dd, "[]"))]).await;
    let c = db.client().await;
    let first = send(&c, "dingtalk.agent", "default", "alice", "one").await;
    assert_eq!(wait_final(&c, first).await, "submitted");
    assert_eq!(dd.token_requests(), 1);
    dd.expire_tokens();
    let second = send(&c, "dingtalk.agent", "default", "users:alice,bob", "two").await;
    assert_eq!(
        wait_final(&c, second).await,
        "submitted",
        "{:?}",
        attempts(&c, second).await
    );
    assert_eq!(dd.token_requests(), 2, "one refresh");
    let sends = dd.calls("/topapi/message/corpconversation/asyncsend_v2");
    assert_eq!(sends.len(), 3, "first, rejected with 42001, resent");
    assert_eq!(sends[1].answer["errcode"], 42001);
    assert_eq!(sends[2].body["userid_list"], "alice,bob");
    assert_eq!(
        sends[2].body["msg"],
        json!({"msgtype":"text","text":{"content":"two"}})
    );
    assert_eq!(
        attempts(&c, second).await,
        vec![(1, "done".to_string(), None, Some(200))]
    );
    assert_no_secrets(&c, &[APP_SECRET, "app-token-1", "app-token-2"]).await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_task_id_is_stored_and_send_results_are_recorded_in_sql() {
    let dd = DingtalkDouble::start().await;
    let (db, _tc, d) = setup(&[("dingtalk", dingtalk_conf(&dd))]).await;
    let c = db.client().await;
    let id: Uuid = c
        .query_one(
            "SELECT api.send_dingtalk('default', 'daily report', \
             pUsers => ARRAY['alice', 'ghost1', 'busy1', 'fail1'], pDepts => ARRAY['123'])",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(wait_final(&c, id).await, "submitted");
    let sends = dd.calls("/topapi/message/corpconversation/asyncsend_v2");
    assert_eq!(sends.len(), 1);
    assert_eq!(sends[0].body["agent_id"], AGENT_ID);
    assert_eq!(sends[0].body["dept_id_list"], "123");
    let task = sends[0].answer["task_id"].to_string();
    assert_eq!(provider_id(&c, id).await, Some(task.clone()));
    let row = wait_for(T, "the final send result", || async {
        let r = c
            .query_opt(
                "SELECT task_id, polls, final, invalid_user_ids, forbidden, failed_user_ids, unread_user_ids \
                 FROM api.dingtalk_send_results($1)",
                &[&id],
            )
            .await
            .unwrap()?;
        r.get::<_, bool>(2).then_some(r)
    })
    .await;
    assert_eq!(row.get::<_, String>(0), task);
    assert_eq!(row.get::<_, i32>(1), 2, "one call per result_polls delay");
    assert_eq!(row.get::<_, Value>(3), json!(["ghost1"]));
    assert_eq!(
        row.get::<_, Value>(4),
        json!([{"code":"143105","count":500,"userid":"busy1"}])
    );
    assert_eq!(row.get::<_, Value>(5), json!(["fail1"]));
    assert_eq!(row.get::<_, Value>(6), json!(["alice"]));
    let polls = dd.calls("/topapi/message/corpconversation/getsendresult");
    assert_eq!(polls.len(), 2);
    assert_eq!(
        polls[0].body,
        json!({"agent_id": AGENT_ID, "task_id": sends[0].answer["task_id"]})
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chats_are_created_from_sql_and_the_cli_path_and_group_sends_work() {
    let dd = DingtalkDouble::start().await;
    let (db, tc, d) = setup(&[("dingtalk", dingtalk_conf(&dd))]).await;
    let c = db.client().await;
    // SQL: a request the daemon carries out.
    let req: Uuid = c
        .query_one(
            "SELECT api.dingtalk_create_chat('default', 'On call', 'alice', ARRAY['alice', 'bob'])",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let chatid: String = wait_for(T, "the chat to be created", || async {
        let r = c
            .query_one(
                "SELECT state, chatid FROM api.dingtalk_chats() WHERE id = $1",
                &[&req],
            )
            .await
            .unwrap();
        (r.get::<_, String>(0) == "created").then(|| r.get(1))
    })
    .await;
    let created = dd.chats();
    assert_eq!(
        created[&chatid],
        json!({"name":"On call","owner":"alice","useridlist":["alice","bob"]})
    );
    // The CLI: `outboxd dingtalk chat-create` calls DingTalk at once and prints the chat id.
    let main = tc.path("outboxd.toml");
    std::fs::write(
        &main,
        format!(
            "database_url = \"{}\"\n[connectors]\ndingtalk = \"{}\"\n",
            db.url,
            path_str(&tc.path("dingtalk.conf"))
        ),
    )
    .unwrap();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_outboxd"))
            .env_remove("DATABASE_URL")
            .args([
                "-c",
                &path_str(&main),
                "dingtalk",
                "chat-create",
                "--profile",
                "default",
            ])
            .args([
                "--name",
                "Release",
                "--owner",
                "carol",
                "--users",
                "carol,dave",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli_chat = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(
        dd.chats()[&cli_chat],
        json!({"name":"Release","owner":"carol","useridlist":["carol","dave"]})
    );
    let listed: Vec<(String, Option<String>)> = c
        .query(
            "SELECT state, chatid FROM api.dingtalk_chats() WHERE name = 'Release'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        listed,
        vec![("created".to_string(), Some(cli_chat.clone()))]
    );
    // A group send into the first chat.
    let id: Uuid = c
        .query_one(
            "SELECT api.send_dingtalk('default', 'deploy done', pChat => $1)",
            &[&chatid],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        wait_final(&c, id).await,
        "submitted",
        "{:?}",
        attempts(&c, id).await
    );
    let sends = dd.calls("/chat/send");
    assert_eq!(sends.len(), 1);
    assert_eq!(
        sends[0].body,
        json!({"chatid": chatid, "msg": {"msgtype":"text","text":{"content":"deploy done"}}})
    );
    assert_eq!(
        provider_id(&c, id).await,
        sends[0].answer["messageId"].as_str().map(str::to_string)
    );
    // A chat message is not a work notification: nothing to poll.
    let n: i64 = c
        .query_one("SELECT count(*) FROM api.dingtalk_send_results($1)", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    assert_eq!(
        dd.calls("/topapi/message/corpconversation/asyncsend_v2")
            .len(),
        0
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_is_uploaded_first_and_sent_by_media_id() {
    let dd = DingtalkDouble::start().await;
    let (db, _tc, d) = setup(&[("dingtalk", dingtalk_conf(&dd))]).await;
    let c = db.client().await;
    // PNG's signature first: the double checks an image's type as DingTalk does.
    let png: Vec<u8> = b"\x89PNG\r\n\x1a\n"
        .iter()
        .copied()
        .chain((0u8..=255).cycle().take(3000))
        .collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
    let msg = json!({"msgtype":"image","image":{"base64": b64, "filename":"chart.png"}});
    let id: Uuid = c
        .query_one(
            "SELECT api.send_dingtalk('default', NULL, pUsers => ARRAY['alice'], pMsg => $1)",
            &[&msg],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        wait_final(&c, id).await,
        "submitted",
        "{:?}",
        attempts(&c, id).await
    );
    let uploads = dd.calls("/media/upload");
    assert_eq!(uploads.len(), 1);
    assert_eq!(uploads[0].query["type"], "image");
    assert_eq!(uploads[0].media.as_deref(), Some(png.as_slice()));
    let media_id = uploads[0].answer["media_id"].clone();
    let sends = dd.calls("/topapi/message/corpconversation/asyncsend_v2");
    assert_eq!(sends.len(), 1);
    assert_eq!(
        sends[0].body["msg"],
        json!({"msgtype":"image","image":{"media_id": media_id}})
    );
    let order: Vec<String> = dd.all_calls().iter().map(|c| c.path.clone()).collect();
    let up = order.iter().position(|p| p == "/media/upload").unwrap();
    let send = order
        .iter()
        .position(|p| p.ends_with("asyncsend_v2"))
        .unwrap();
    assert!(up < send, "{order:?}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_recipients_and_contents_fail_before_any_call() {
    let dd = DingtalkDouble::start().await;
    let (db, _tc, d) = setup(&[
        ("dingtalk", dingtalk_conf(&dd)),
        ("dingbot", dingbot_conf(&dd, ROBOT_SECRET)),
    ])
    .await;
    let c = db.client().await;
    let cases = [
        ("dingtalk.agent", "depts:sales", "hi", "bad-address"),
        ("dingtalk.agent", " ; ", "hi", "bad-address"),
        (
            "dingtalk.agent",
            "alice",
            r#"{"msgtype":"image","image":{}}"#,
            "bad-content",
        ),
        (
            "dingbot.agent",
            "robot",
            r#"{"msgtype":"link","link":{"title":"t"}}"#,
            "bad-content",
        ),
    ];
    let mut ids = Vec::new();
    for (agent, address, content, _) in cases {
        ids.push(send(&c, agent, "default", address, content).await);
    }
    for (id, (_, _, _, code)) in ids.iter().zip(cases) {
        assert_eq!(wait_final(&c, *id).await, "failed");
        assert_eq!(attempts(&c, *id).await[0].2.as_deref(), Some(code));
    }
    assert!(dd.all_calls().is_empty(), "{:?}", dd.all_calls());
    // SQL refuses a work notification without recipients.
    let e = c
        .query_one("SELECT api.send_dingtalk('default', 'hi')", &[])
        .await
        .unwrap_err();
    let text = e
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default();
    assert!(text.starts_with("ERR-400-050"), "{e:?}");
    d.stop().await;
}
