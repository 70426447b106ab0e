//! The wechat, wecom and wecombot connectors end to end: a real daemon and PostgreSQL, messages
//! enqueued with the SQL shortcuts of migration 9, and in-process doubles of the WeChat, WeCom
//! and WeCom robot APIs that check tokens, bodies and MD5s (tests/common/wechat_double.rs).

mod common;
#[path = "common/wechat_double.rs"]
mod double;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::*;
use double::{Upload, WeixinDouble};
use serde_json::{json, Value};
use uuid::Uuid;

const T: Duration = Duration::from_secs(20);

/// Log lines go to a buffer the leak test reads (DEBUG, every crate); installed by every test
/// before the harness would install its own.
#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Buf {
    type Writer = Buf;
    fn make_writer(&'a self) -> Buf {
        self.clone()
    }
}

fn logs() -> &'static Buf {
    static LOGS: OnceLock<Buf> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Buf::default();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
            .with_writer(buf.clone())
            .with_ansi(false)
            .try_init();
        buf
    })
}

/// The three profiles files, pointing at the double; `strict` profiles allow one attempt.
fn confs(d: &WeixinDouble, secret_file: &std::path::Path) -> Vec<(&'static str, String)> {
    let common = format!(
        "base_url = \"{}\"\nretry = [\"20ms\", \"20ms\", \"20ms\"]\ntimeout = \"5s\"\n",
        d.url
    );
    vec![
        (
            "wechat",
            format!(
                "[default]\nappid = \"{}\"\nsecret_file = \"{}\"\n{common}\n\
                 [strict]\nappid = \"{}\"\nsecret_file = \"{}\"\nmax_attempts = 1\n{common}",
                d.appid,
                path_str(secret_file),
                d.appid,
                path_str(secret_file)
            ),
        ),
        (
            "wecom",
            format!(
                "[default]\ncorpid = \"{}\"\ncorpsecret = \"{}\"\nagentid = {}\n{common}",
                d.corpid, d.corpsecret, d.agentid
            ),
        ),
        (
            "wecombot",
            format!("[default]\nkey = \"{}\"\n{common}", d.bot_key),
        ),
    ]
}

struct Setup {
    db: TestDb,
    d: WeixinDouble,
    _tc: TestConfig,
    _secrets: tempfile::TempDir,
    daemon: Daemon,
}

async fn setup() -> Setup {
    logs();
    let db = TestDb::new().await;
    let d = WeixinDouble::start().await;
    let secrets = tempfile::tempdir().unwrap();
    let secret_file = secrets.path().join("wechat.secret");
    std::fs::write(&secret_file, format!("{}\n", d.secret)).unwrap();
    let confs = confs(&d, &secret_file);
    let refs: Vec<(&str, &str)> = confs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let tc = TestConfig::new(&db, &refs);
    let daemon = Daemon::start(tc.config.clone());
    Setup {
        db,
        d,
        _tc: tc,
        _secrets: secrets,
        daemon,
    }
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

async fn one_id(
    c: &tokio_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Uuid {
    c.query_one(sql, params).await.unwrap().get(0)
}

async fn row_text(c: &tokio_postgres::Client, sql: &str, id: Uuid) -> Option<String> {
    c.query_one(sql, &[&id]).await.unwrap().get(0)
}

fn attempt(n: i32, outcome: &str, code: Option<&str>, status: Option<i32>) -> AttemptRow {
    (n, outcome.into(), code.map(str::to_string), status)
}

type AttemptRow = (i32, String, Option<String>, Option<i32>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wechat_delivers_with_a_stable_token_and_the_code_as_client_msg_id() {
    let s = setup().await;
    let c = s.db.client().await;
    let id = one_id(
        &c,
        "SELECT id FROM api.send_wechat('default', 'oOPENID1', 'TPL-1', \
         '{\"thing01\": \"Order 42\", \"amount01\": {\"value\": \"¥100\", \"color\": \"#173177\"}}', \
         pUrl => 'https://example.com/o/42', pCode => 'order-42-shipped')",
        &[],
    )
    .await;
    assert_eq!(
        wait_final(&c, id).await,
        "submitted",
        "{:?}",
        attempts(&c, id).await
    );
    let sent = s.d.wechat_sent();
    assert_eq!(
        sent,
        vec![json!({
            "touser": "oOPENID1",
            "template_id": "TPL-1",
            "url": "https://example.com/o/42",
            "client_msg_id": "order-42-shipped",
            "data": {"thing01": {"value": "Order 42"},
                     "amount01": {"value": "¥100", "color": "#173177"}},
        })]
    );
    let pid = row_text(
        &c,
        "SELECT provider_message_id FROM outbox.live_messages WHERE id = $1",
        id,
    )
    .await;
    assert_eq!(pid.as_deref(), Some("200228333"));
    assert_eq!(
        attempts(&c, id).await,
        vec![attempt(1, "done", None, Some(200))]
    );
    // A second message reuses the token.
    let second = one_id(
        &c,
        "SELECT id FROM api.send_wechat('default', 'oOPENID2', 'TPL-1', '{\"thing01\": \"x\"}')",
        &[],
    )
    .await;
    assert_eq!(wait_final(&c, second).await, "submitted");
    assert_eq!(s.d.classic_token_calls(), 0, "never the classic token call");
    assert_eq!(s.d.stable_token_calls(), 1);
    assert_eq!(s.d.force_refresh_seen(), vec![json!(false)]);
    // The code generated for the second message went as its client_msg_id.
    let code = row_text(
        &c,
        "SELECT code FROM outbox.live_messages WHERE id = $1",
        second,
    )
    .await;
    assert_eq!(
        s.d.wechat_sent()[1]["client_msg_id"].as_str(),
        code.as_deref()
    );
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wechat_refreshes_the_token_once_on_40001_and_a_second_rejection_is_token_invalid() {
    let s = setup().await;
    let c = s.db.client().await;
    let send = |to: &'static str, profile: &'static str| {
        let c = &c;
        async move {
            one_id(
                c,
                "SELECT id FROM api.send_wechat($1, $2, 'TPL', '{\"k\": \"v\"}')",
                &[&profile, &to],
            )
            .await
        }
    };
    let first = send("o1", "default").await;
    assert_eq!(wait_final(&c, first).await, "submitted");
    s.d.expire_wechat_token();
    let second = send("o2", "default").await;
    assert_eq!(
        wait_final(&c, second).await,
        "submitted",
        "{:?}",
        attempts(&c, second).await
    );
    // One attempt: the 40001, the refresh and the resend happen inside it.
    assert_eq!(
        attempts(&c, second).await,
        vec![attempt(1, "done", None, Some(200))]
    );
    assert_eq!((s.d.stable_token_calls(), s.d.wechat_rejected()), (2, 1));

    s.d.reject_every_wechat_token(true);
    let third = send("o3", "strict").await;
    assert_eq!(wait_final(&c, third).await, "failed");
    assert_eq!(
        attempts(&c, third).await,
        vec![attempt(1, "failed", Some("token-invalid"), Some(200))]
    );
    // Exactly one refresh for the one attempt, and two sends (first and resend).
    assert_eq!((s.d.stable_token_calls(), s.d.wechat_rejected()), (3, 3));
    assert_eq!(s.d.classic_token_calls(), 0);
    assert!(s.d.force_refresh_seen().iter().all(|f| f == &json!(false)));
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wechat_43004_fails_45009_and_busy_retry_and_bad_content_never_calls() {
    let s = setup().await;
    let c = s.db.client().await;
    s.d.script_wechat(&[43004]);
    let unfollowed = one_id(
        &c,
        "SELECT id FROM api.send_wechat('default', 'oGONE', 'TPL', '{\"k\": \"v\"}')",
        &[],
    )
    .await;
    assert_eq!(wait_final(&c, unfollowed).await, "failed");
    assert_eq!(
        attempts(&c, unfollowed).await,
        vec![attempt(1, "failed", Some("wechat-43004"), Some(200))]
    );
    s.d.script_wechat(&[45009, -1]);
    let busy = one_id(
        &c,
        "SELECT id FROM api.send_wechat('default', 'oBUSY', 'TPL', '{\"k\": \"v\"}')",
        &[],
    )
    .await;
    assert_eq!(
        wait_final(&c, busy).await,
        "submitted",
        "{:?}",
        attempts(&c, busy).await
    );
    assert_eq!(
        attempts(&c, busy).await,
        vec![
            attempt(1, "retry", Some("wechat-45009"), Some(200)),
            attempt(2, "retry", Some("wechat-busy"), Some(200)),
            attempt(3, "done", None, Some(200)),
        ]
    );
    let before = s.d.wechat_sent().len();
    let bad = send(
        &c,
        "wechat.agent",
        "default",
        "o",
        "{\"template_id\": \"T\"}",
    )
    .await;
    let no_address = one_id(
        &c,
        "SELECT id FROM api.send_wechat('default', NULL, 'TPL', '{\"k\": \"v\"}')",
        &[],
    )
    .await;
    assert_eq!(wait_final(&c, bad).await, "failed");
    assert_eq!(wait_final(&c, no_address).await, "failed");
    assert_eq!(attempts(&c, bad).await[0].2.as_deref(), Some("bad-content"));
    assert_eq!(
        attempts(&c, no_address).await[0].2.as_deref(),
        Some("bad-address")
    );
    assert_eq!(s.d.wechat_sent().len(), before);
    s.daemon.stop().await;
}

async fn inbox_reply(c: &tokio_postgres::Client, id: Uuid) -> Option<String> {
    c.query_opt(
        "SELECT content FROM outbox.live_messages WHERE parent = $1 AND class = 'inbox'",
        &[&id],
    )
    .await
    .unwrap()
    .map(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wecom_partial_delivery_is_done_with_the_invalid_list_and_all_invalid_fails() {
    let s = setup().await;
    let c = s.db.client().await;
    let partial = one_id(
        &c,
        "SELECT id FROM api.send_wecom_text('default', 'zhangsan|Ghost', 'Build failed', pToParty => '2|99')",
        &[],
    )
    .await;
    assert_eq!(
        wait_final(&c, partial).await,
        "submitted",
        "{:?}",
        attempts(&c, partial).await
    );
    let sent = s.d.wecom_sent();
    assert_eq!(sent.len(), 1);
    let code = row_text(
        &c,
        "SELECT code FROM outbox.live_messages WHERE id = $1",
        partial,
    )
    .await;
    assert!(code.is_some());
    assert_eq!(
        sent[0],
        json!({"msgtype": "text", "text": {"content": "Build failed"}, "touser": "zhangsan|Ghost",
               "toparty": "2|99", "agentid": s.d.agentid, "enable_duplicate_check": 1,
               "duplicate_check_interval": 1800})
    );
    let pid = row_text(
        &c,
        "SELECT provider_message_id FROM outbox.live_messages WHERE id = $1",
        partial,
    )
    .await;
    assert!(pid.is_some_and(|p| p.starts_with("MSGID-")));
    let reply: Value =
        serde_json::from_str(&inbox_reply(&c, partial).await.expect("the lists are kept")).unwrap();
    assert_eq!(reply, json!({"invaliduser": "ghost", "invalidparty": "99"}));

    let none = one_id(
        &c,
        "SELECT id FROM api.send_wecom_text('default', 'ghost1|ghost2', 'x')",
        &[],
    )
    .await;
    assert_eq!(wait_final(&c, none).await, "failed");
    assert_eq!(
        attempts(&c, none).await,
        vec![attempt(1, "failed", Some("wecom-81013"), Some(200))]
    );
    // A full delivery keeps no reply.
    let full = one_id(
        &c,
        "SELECT id FROM api.send_wecom('default', '@all', 'markdown', '{\"content\": \"**ok**\"}')",
        &[],
    )
    .await;
    assert_eq!(wait_final(&c, full).await, "submitted");
    assert_eq!(inbox_reply(&c, full).await, None);
    assert_eq!(s.d.gettoken_calls(), 1);
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wecom_files_are_uploaded_then_sent_by_media_id_and_a_stale_token_is_refreshed() {
    let s = setup().await;
    let c = s.db.client().await;
    let first = one_id(
        &c,
        "SELECT id FROM api.send_wecom_text('default', 'lisi', 'warm up')",
        &[],
    )
    .await;
    assert_eq!(wait_final(&c, first).await, "submitted");
    s.d.expire_wecom_token();
    // 3000 bytes: PostgreSQL's base64 breaks that into lines.
    let file: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
    let id = one_id(
        &c,
        "SELECT id FROM api.send_wecom_file('default', 'zhangsan', 'report.bin', $1)",
        &[&file],
    )
    .await;
    assert_eq!(
        wait_final(&c, id).await,
        "submitted",
        "{:?}",
        attempts(&c, id).await
    );
    assert_eq!(
        attempts(&c, id).await,
        vec![attempt(1, "done", None, Some(200))]
    );
    assert_eq!(
        s.d.uploads(),
        vec![Upload {
            kind: "file".into(),
            filename: "report.bin".into(),
            content_type: "application/octet-stream".into(),
            filelength: Some(file.len()),
            bytes: file
        }]
    );
    let sent = s.d.wecom_sent();
    assert_eq!(sent[1]["msgtype"], "file");
    assert!(sent[1]["file"]["media_id"]
        .as_str()
        .unwrap()
        .starts_with("MEDIA-"));
    assert_eq!(s.d.gettoken_calls(), 2, "one refresh after the stale token");
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wecombot_image_md5_checks_out_and_45009_holds_the_message_a_minute() {
    let s = setup().await;
    let c = s.db.client().await;
    // PNG's signature first: the double checks an image's type as WeCom does.
    let image: Vec<u8> = b"\x89PNG\r\n\x1a\n"
        .iter()
        .copied()
        .chain((0..5000u32).map(|i| (i % 256) as u8))
        .collect();
    let img = one_id(
        &c,
        "SELECT id FROM api.send_wecombot_image('default', $1)",
        &[&image],
    )
    .await;
    assert_eq!(
        wait_final(&c, img).await,
        "submitted",
        "{:?}",
        attempts(&c, img).await
    );
    let text = one_id(
        &c,
        "SELECT id FROM api.send_wecombot_text('default', 'disk full', ARRAY['@all'], ARRAY['13800001111'])",
        &[],
    )
    .await;
    assert_eq!(wait_final(&c, text).await, "submitted");
    let sent = s.d.bot_sent();
    use base64::Engine as _;
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(sent[0]["image"]["base64"].as_str().unwrap())
            .unwrap(),
        image
    );
    assert_eq!(
        sent[1],
        json!({"msgtype": "text", "text": {"content": "disk full", "mentioned_list": ["@all"],
               "mentioned_mobile_list": ["13800001111"]}})
    );

    s.d.script_bot(&[45009]);
    let fast = one_id(
        &c,
        "SELECT id FROM api.send_wecombot_text('default', 'again')",
        &[],
    )
    .await;
    wait_for(T, "the too-fast attempt", || async {
        (!attempts(&c, fast).await.is_empty()).then_some(())
    })
    .await;
    assert_eq!(
        attempts(&c, fast).await,
        vec![attempt(1, "retry", Some("wecombot-45009"), Some(200))]
    );
    // The profile's schedule says 20ms: the platform's minute decides.
    let wait: f64 = c
        .query_one(
            "SELECT extract(epoch FROM next_attempt_at - now())::float8 FROM outbox.live_messages WHERE id = $1",
            &[&fast],
        )
        .await
        .unwrap()
        .get(0);
    assert!(wait > 40.0, "next attempt in {wait}s");
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_or_token_reaches_attempts_replies_or_logs() {
    let s = setup().await;
    let c = s.db.client().await;
    // Warm the token caches, then make the doubles echo every credential in their errors.
    let ok = one_id(
        &c,
        "SELECT id FROM api.send_wechat('default', 'o1', 'T', '{\"k\": \"v\"}')",
        &[],
    )
    .await;
    let ok2 = one_id(
        &c,
        "SELECT id FROM api.send_wecom_text('default', 'zhangsan|nobody', 'x')",
        &[],
    )
    .await;
    assert_eq!(wait_final(&c, ok).await, "submitted");
    assert_eq!(wait_final(&c, ok2).await, "submitted");
    let tokens = s.d.current_tokens();
    assert_eq!(tokens.len(), 2);
    s.d.echo_credentials(true);
    s.d.script_wechat(&[40037]);
    s.d.script_wecom(&[60020]);
    s.d.script_bot(&[40058]);
    let ids = [
        one_id(
            &c,
            "SELECT id FROM api.send_wechat('strict', 'o2', 'T', '{\"k\": \"v\"}')",
            &[],
        )
        .await,
        one_id(
            &c,
            "SELECT id FROM api.send_wecom_text('default', 'zhangsan', 'x')",
            &[],
        )
        .await,
        one_id(
            &c,
            "SELECT id FROM api.send_wecombot_text('default', 'x')",
            &[],
        )
        .await,
    ];
    for id in ids {
        assert_eq!(
            wait_final(&c, id).await,
            "failed",
            "{:?}",
            attempts(&c, id).await
        );
    }
    // A stale token echoed back, for the token endpoint too (its 40001 carries the secret).
    s.d.reject_every_wechat_token(true);
    let stale = one_id(
        &c,
        "SELECT id FROM api.send_wechat('strict', 'o3', 'T', '{\"k\": \"v\"}')",
        &[],
    )
    .await;
    assert_eq!(wait_final(&c, stale).await, "failed");
    s.daemon.stop().await;

    let texts: Vec<String> = c
        .query(
            "SELECT coalesce(error_text, '') || ' ' || coalesce(provider_message_id, '') FROM outbox.attempts \
             UNION ALL SELECT coalesce(content, '') || ' ' || coalesce(label, '') FROM outbox.live_messages WHERE class = 'inbox'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let all = texts.join("\n");
    assert!(
        all.contains("(you sent ***)"),
        "the echoes were recorded, scrubbed: {all}"
    );
    let log = String::from_utf8_lossy(&logs().0.lock().unwrap()).into_owned();
    let mut secrets = vec![
        s.d.secret.clone(),
        s.d.corpsecret.clone(),
        s.d.bot_key.clone(),
    ];
    secrets.extend(tokens);
    secrets.extend(s.d.current_tokens());
    for secret in &secrets {
        assert!(
            !all.contains(secret.as_str()),
            "a secret in attempts/replies: {all}"
        );
        assert!(!log.contains(secret.as_str()), "a secret in the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applications_may_call_the_shortcuts_and_the_content_is_built_from_arguments() {
    logs();
    let db = TestDb::new().await;
    let role = TestRole::new("outboxd_app").await;
    let app = role.client(&db).await;
    let cases: [(&str, &str, Option<&str>, Value); 4] = [
        (
            "SELECT id FROM api.send_wechat('oa', 'oX', 'TPL', '{\"k\": \"v\"}', \
             pMiniProgram => '{\"appid\": \"wxmini\"}', pCode => 'c1')",
            "wechat.agent",
            Some("oX"),
            json!({"template_id": "TPL", "data": {"k": "v"}, "miniprogram": {"appid": "wxmini"}}),
        ),
        (
            "SELECT id FROM api.send_wecom_text('app', NULL, '**x**', pToParty => '2', pToTag => '7', pMarkdown => true)",
            "wecom.agent",
            None,
            json!({"msgtype": "markdown", "markdown": {"content": "**x**"}, "toparty": "2", "totag": "7"}),
        ),
        (
            "SELECT id FROM api.send_wecom_file('app', 'u', 'a.png', '\\x68656c6c6f'::bytea, 'image')",
            "wecom.agent",
            Some("u"),
            json!({"msgtype": "image", "image": {"base64": "aGVsbG8=", "filename": "a.png"}}),
        ),
        (
            "SELECT id FROM api.send_wecombot('ops', 'news', '{\"articles\": [{\"title\": \"T\", \"url\": \"https://u\"}]}')",
            "wecombot.agent",
            None,
            json!({"msgtype": "news", "news": {"articles": [{"title": "T", "url": "https://u"}]}}),
        ),
    ];
    for (sql, agent, address, content) in cases {
        let id: Uuid = app.query_one(sql, &[]).await.unwrap().get(0);
        let r = app
            .query_one(
                "SELECT agentcode, address, content, statecode FROM api.message WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap();
        assert_eq!(r.get::<_, String>(0), agent, "{sql}");
        assert_eq!(r.get::<_, Option<String>>(1).as_deref(), address, "{sql}");
        let got: Value = serde_json::from_str(&r.get::<_, String>(2)).unwrap();
        assert_eq!(got, content, "{sql}");
        assert_eq!(r.get::<_, String>(3), "prepared");
    }
    // Definer, pinned, not PUBLIC's (as 004 wants every api function).
    let funcs: Vec<(String, bool, bool, bool)> = db
        .client()
        .await
        .query(
            "SELECT p.oid::regprocedure::text, p.prosecdef, \
                    'search_path=pg_catalog, outbox, pg_temp' = ANY (p.proconfig), \
                    has_function_privilege('public', p.oid, 'EXECUTE') \
               FROM pg_proc p WHERE p.pronamespace = 'api'::regnamespace \
                AND p.proname LIKE 'send\\_we%' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(funcs.len(), 7, "{funcs:?}");
    for (name, definer, pinned, public) in &funcs {
        assert!(*definer && *pinned && !*public, "{name}");
    }
    // pCode makes the call idempotent, as api.send_message is.
    let again: i64 = app
        .query_one(
            "SELECT count(*) FROM api.send_wechat('oa', 'oX', 'TPL', '{\"k\": \"v\"}', pCode => 'c1')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(again, 1);
    let n: i64 = app
        .query_one("SELECT count(*) FROM api.message WHERE code = 'c1'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}
