//! End-to-end tests of the `slack`, `feishu` and `telegram` connectors: through the daemon,
//! against real PostgreSQL and the verifying double of `common/chat_double.rs` (one HTTP server
//! acting as all three platforms). Every test ends by searching the captured log (DEBUG, every
//! crate), `outbox.attempts` and `outbox.messages` (inbox replies included) for the double's
//! credentials.

#[allow(dead_code)]
#[path = "common/chat_double.rs"]
mod chat_double;
mod common;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use chat_double::{ChatDouble, Platform, Trouble, BLOCKED_CHAT, OLD_GROUP, SUPERGROUP};
use common::*;
use serde_json::{json, Value};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(20);
const FAST: &str = "retry = [\"20ms\", \"20ms\", \"20ms\"]\ntimeout = \"5s\"";

/// Where the log lines go: a buffer the tests read.
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

/// Installs the capturing subscriber before the harness installs its own: DEBUG, every crate.
fn logs() -> &'static Buf {
    static LOGS: OnceLock<Buf> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Buf::default();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
            .with_writer(buf.clone())
            .with_ansi(false)
            .try_init()
            .expect("the capturing subscriber is the first");
        buf
    })
}

async fn setup() -> (TestDb, tokio_postgres::Client, ChatDouble) {
    logs();
    let db = TestDb::new().await;
    let c = db.client().await;
    (db, c, ChatDouble::start().await)
}

fn start(db: &TestDb, kind: &str, conf: &str) -> (TestConfig, Daemon) {
    let mut tc = TestConfig::new(db, &[(kind, conf)]);
    // Due retries are picked up by the poll.
    tc.config.poll_interval = Duration::from_millis(50);
    let d = Daemon::start(tc.config.clone());
    (tc, d)
}

/// Waits until the message is submitted or failed; returns which.
async fn final_state(c: &tokio_postgres::Client, id: Uuid) -> String {
    wait_for(
        WAIT,
        &format!("message {id} to be delivered or failed"),
        || async {
            let s = state_of(c, id).await;
            (s == "submitted" || s == "failed").then_some(s)
        },
    )
    .await
}

/// Waits for the message's `n`th attempt row.
async fn wait_attempts(c: &tokio_postgres::Client, id: Uuid, n: usize) {
    wait_for(WAIT, &format!("{n} attempts of {id}"), || async {
        (attempts(c, id).await.len() >= n).then_some(())
    })
    .await
}

fn attempt(
    n: i32,
    outcome: &str,
    code: Option<&str>,
    status: Option<i32>,
) -> (i32, String, Option<String>, Option<i32>) {
    (n, outcome.into(), code.map(str::to_string), status)
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

/// Seconds from the last attempt to the message's next due time (both written in one
/// transaction, so exactly the delay the daemon chose).
async fn next_due_after_last_attempt(c: &tokio_postgres::Client, id: Uuid) -> f64 {
    c.query_one(
        "SELECT extract(epoch FROM m.next_attempt_at - a.finished_at)::float8 \
           FROM outbox.live_messages m JOIN outbox.attempts a ON a.message_id = m.id \
          WHERE m.id = $1 ORDER BY a.id DESC LIMIT 1",
        &[&id],
    )
    .await
    .unwrap()
    .get(0)
}

/// Makes a waiting retry due now (instead of sleeping through the platform's block).
async fn make_due(c: &tokio_postgres::Client, id: Uuid) {
    let n = c
        .execute(
            "UPDATE outbox.messages SET next_attempt_at = now() WHERE id = $1 AND state = 'prepared'",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(n, 1, "message {id} waits for a retry");
    // A "too fast" answer also held the profile's rate windows back: that time has passed too.
    c.execute("UPDATE outbox.rate_windows SET blocked_until = NULL", &[])
        .await
        .unwrap();
}

async fn replies(c: &tokio_postgres::Client, id: Uuid) -> Vec<Value> {
    c.query(
        "SELECT content FROM outbox.live_messages WHERE class = 'inbox' AND parent = $1",
        &[&id],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| serde_json::from_str(r.get::<_, &str>(0)).unwrap())
    .collect()
}

/// No credential in the log, the attempts or the messages (replies, labels, provider ids).
async fn assert_no_secret(c: &tokio_postgres::Client, secrets: &[String]) {
    let stored: String = c
        .query_one(
            "SELECT coalesce((SELECT string_agg(a::text, E'\\n') FROM outbox.attempts a), '') \
                 || coalesce((SELECT string_agg(m::text, E'\\n') FROM outbox.live_messages m), '')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let log = String::from_utf8_lossy(&logs().0.lock().unwrap()).into_owned();
    assert!(!log.is_empty(), "the log was captured");
    for s in secrets {
        assert!(!stored.contains(s.as_str()), "{s} stored in the database");
        assert!(!log.contains(s.as_str()), "{s} in the log");
    }
}

fn slack_conf(d: &ChatDouble, wrong_token: &str) -> String {
    format!(
        "[default]\ntoken = \"{}\"\napi_url = \"{}/api\"\n{FAST}\n\
         [revoked]\ntoken = \"{}\"\napi_url = \"{}/api\"\n{FAST}\n\
         [wrong]\ntoken = \"{wrong_token}\"\napi_url = \"{}/api\"\n{FAST}\n\
         [hook]\nwebhook_url = \"{}\"\n{FAST}\n\
         [gone]\nwebhook_url = \"{}/services/T0TEST/B0TEST/hkRevokedHookSecret\"\n{FAST}\n",
        d.slack_token, d.url, d.slack_revoked, d.url, d.url, d.hook_url, d.url
    )
}

#[tokio::test]
async fn slack_posts_with_the_bot_token_and_fails_on_permanent_errors() {
    let (db, c, slack) = setup().await;
    let wrong = format!("xoxb-9-{}", Uuid::new_v4().simple());
    let (_tc, d) = start(&db, "slack", &slack_conf(&slack, &wrong));
    let app = TestRole::new("outboxd_app").await;
    let a = app.client(&db).await;

    let text = send(
        &c,
        "slack.agent",
        "default",
        "C0GENERAL",
        "disk full on db1",
    )
    .await;
    // Built by the SQL wrapper, as an application would (its own role).
    let blocks: Uuid = a
        .query_one(
            "SELECT api.send_slack('default', 'general', 'fallback', \
                    '[{\"type\":\"section\",\"text\":{\"type\":\"mrkdwn\",\"text\":\"*bold*\"}}]', \
                    '1700000000.000007')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(final_state(&c, text).await, "submitted");
    assert_eq!(final_state(&c, blocks).await, "submitted");
    let got = slack.got(Platform::SlackApi);
    assert_eq!(got.len(), 2, "{got:?}");
    for g in &got {
        assert_eq!(
            g.authorization.as_deref(),
            Some(format!("Bearer {}", slack.slack_token).as_str())
        );
        assert!(g.content_type.starts_with("application/json"), "{g:?}");
    }
    let by_text = |t: &str| got.iter().find(|g| g.body["text"] == t).unwrap().clone();
    assert_eq!(
        by_text("disk full on db1").body,
        json!({"channel": "C0GENERAL", "text": "disk full on db1"})
    );
    let b = by_text("fallback").body;
    assert_eq!(b["channel"], "general");
    assert_eq!(b["thread_ts"], "1700000000.000007");
    assert_eq!(b["blocks"][0]["text"]["text"], "*bold*");
    // The message `ts` is the provider id.
    for (id, g) in [
        (text, by_text("disk full on db1")),
        (blocks, by_text("fallback")),
    ] {
        let answer: Value = serde_json::from_str(&g.answer).unwrap();
        assert_eq!(provider_id(&c, id).await.as_deref(), answer["ts"].as_str());
        assert_eq!(
            attempts(&c, id).await,
            vec![attempt(1, "done", None, Some(200))]
        );
    }

    // Permanent errors fail at once, with Slack's error as the code.
    let mut failing = Vec::new();
    for (profile, channel, code) in [
        ("default", "C0NOWHERE", "slack-channel-not-found"),
        ("default", "C0OUTSIDE", "slack-not-in-channel"),
        ("default", "C0ARCHIVED", "slack-is-archived"),
        ("revoked", "C0GENERAL", "slack-token-revoked"),
        ("wrong", "C0GENERAL", "slack-invalid-auth"),
    ] {
        let id = send(&c, "slack.agent", profile, channel, "hello").await;
        failing.push((id, code));
    }
    for (id, code) in &failing {
        assert_eq!(final_state(&c, *id).await, "failed", "{code}");
        assert_eq!(
            attempts(&c, *id).await,
            vec![attempt(1, "failed", Some(code), Some(200))]
        );
    }
    // A bot token has no refresh: one request with it, and nothing more.
    let with_wrong: Vec<_> = slack
        .got(Platform::SlackApi)
        .into_iter()
        .filter(|g| g.authorization.as_deref() == Some(format!("Bearer {wrong}").as_str()))
        .collect();
    assert_eq!(with_wrong.len(), 1, "{with_wrong:?}");

    // A message Slack would refuse (no_text) is refused before a request is made.
    let before = slack.got(Platform::SlackApi).len();
    let empty = send(
        &c,
        "slack.agent",
        "default",
        "C0GENERAL",
        r#"{"thread_ts":"1.2"}"#,
    )
    .await;
    assert_eq!(final_state(&c, empty).await, "failed");
    assert_eq!(
        attempts(&c, empty).await,
        vec![attempt(1, "failed", Some("bad-content"), None)]
    );
    assert_eq!(slack.got(Platform::SlackApi).len(), before);

    d.stop().await;
    let mut secrets = slack.secrets();
    secrets.push(wrong);
    assert_no_secret(&c, &secrets).await;
}

#[tokio::test]
async fn slack_rate_limits_retry_after_their_hint_and_webhooks_classify_plain_text() {
    let (db, c, slack) = setup().await;
    let (_tc, d) = start(&db, "slack", &slack_conf(&slack, "xoxb-unused"));

    // chat.postMessage: 429 + Retry-After 7, then internal_error, then accepted.
    slack.script(
        Platform::SlackApi,
        [
            Trouble::SlackRateLimited(7),
            Trouble::SlackError("internal_error"),
        ],
    );
    let id = send(&c, "slack.agent", "default", "C0GENERAL", "deploy started").await;
    wait_attempts(&c, id, 1).await;
    assert_eq!(state_of(&c, id).await, "prepared");
    assert_eq!(
        attempts(&c, id).await,
        vec![attempt(1, "retry", Some("slack-ratelimited"), Some(429))]
    );
    let wait = next_due_after_last_attempt(&c, id).await;
    assert!((wait - 7.0).abs() < 0.001, "due {wait}s after the 429");
    make_due(&c, id).await;
    assert_eq!(final_state(&c, id).await, "submitted");
    assert_eq!(
        attempts(&c, id).await,
        vec![
            attempt(1, "retry", Some("slack-ratelimited"), Some(429)),
            attempt(2, "retry", Some("slack-internal-error"), Some(200)),
            attempt(3, "done", None, Some(200)),
        ]
    );
    assert_eq!(slack.got(Platform::SlackApi).len(), 3);

    // The webhook: its own channel (the address is not sent), no Authorization, plain text.
    slack.script(Platform::SlackHook, [Trouble::SlackRateLimited(3)]);
    let hook = send(&c, "slack.agent", "hook", "", r#"{"text":"from the hook"}"#).await;
    wait_attempts(&c, hook, 1).await;
    assert_eq!(
        attempts(&c, hook).await,
        vec![attempt(1, "retry", Some("slack-ratelimited"), Some(429))]
    );
    let wait = next_due_after_last_attempt(&c, hook).await;
    assert!((wait - 3.0).abs() < 0.001, "due {wait}s after the 429");
    make_due(&c, hook).await;
    assert_eq!(final_state(&c, hook).await, "submitted");
    let got = slack.got(Platform::SlackHook);
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].body, json!({"text": "from the hook"}));
    assert_eq!(got[1].authorization, None);
    assert_eq!((got[1].status, got[1].answer.as_str()), (200, "ok"));

    // 500 rollup_error retries; 410 channel_is_archived and a revoked hook (404 no_service) fail.
    slack.script(
        Platform::SlackHook,
        [Trouble::HookError(500, "rollup_error")],
    );
    let rollup = send(&c, "slack.agent", "hook", "", "again").await;
    assert_eq!(final_state(&c, rollup).await, "submitted");
    assert_eq!(
        attempts(&c, rollup).await,
        vec![
            attempt(1, "retry", Some("slack-rollup-error"), Some(500)),
            attempt(2, "done", None, Some(200)),
        ]
    );
    slack.script(
        Platform::SlackHook,
        [Trouble::HookError(410, "channel_is_archived")],
    );
    let archived = send(&c, "slack.agent", "hook", "", "archived").await;
    assert_eq!(final_state(&c, archived).await, "failed");
    assert_eq!(
        attempts(&c, archived).await,
        vec![attempt(
            1,
            "failed",
            Some("slack-channel-is-archived"),
            Some(410)
        )]
    );
    let gone = send(&c, "slack.agent", "gone", "", "revoked hook").await;
    assert_eq!(final_state(&c, gone).await, "failed");
    assert_eq!(
        attempts(&c, gone).await,
        vec![attempt(1, "failed", Some("slack-no-service"), Some(404))]
    );

    d.stop().await;
    let mut secrets = slack.secrets();
    secrets.push("hkRevokedHookSecret".into());
    assert_no_secret(&c, &secrets).await;
}

#[tokio::test]
async fn feishu_signs_its_requests_and_reads_errors_from_the_body() {
    let (db, c, feishu) = setup().await;
    let base = &feishu.url;
    let (token, secret) = (&feishu.feishu_token, &feishu.feishu_secret);
    let wrong_secret = format!("SEC{}", Uuid::new_v4().simple());
    let conf = format!(
        "[default]\nhook_token = \"{token}\"\nsecret = \"{secret}\"\nbase_url = \"{base}\"\n{FAST}\n\
         [unsigned]\nhook_token = \"{token}\"\nbase_url = \"{base}\"\n{FAST}\n\
         [wrongkey]\nhook_token = \"{token}\"\nsecret = \"{wrong_secret}\"\nbase_url = \"{base}\"\n{FAST}\n\
         [other]\nhook_token = \"fsUnknownHookToken\"\nsecret = \"{secret}\"\nbase_url = \"{base}\"\n{FAST}\n"
    );
    let (_tc, d) = start(&db, "feishu", &conf);
    let app = TestRole::new("outboxd_app").await;
    let a = app.client(&db).await;

    // Text (plain content), post and card (built by the SQL wrapper) are delivered signed.
    let text = send(&c, "feishu.agent", "default", "", "build 1234 passed").await;
    let post: Uuid = a
        .query_one(
            "SELECT api.send_feishu('default', NULL, \
                    pPost => '{\"zh_cn\":{\"title\":\"Deploy\",\"content\":[[{\"tag\":\"text\",\"text\":\"ok\"}]]}}')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let card: Uuid = a
        .query_one(
            "SELECT api.send_feishu('default', NULL, pCard => '{\"elements\":[{\"tag\":\"div\"}]}')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    for id in [text, post, card] {
        assert_eq!(final_state(&c, id).await, "submitted");
        assert_eq!(
            attempts(&c, id).await,
            vec![attempt(1, "done", None, Some(200))]
        );
    }
    let got = feishu.got(Platform::Feishu);
    assert_eq!(got.len(), 3);
    let now = chrono::Utc::now().timestamp();
    for g in &got {
        assert_eq!(g.path, format!("/open-apis/bot/v2/hook/{token}"));
        assert_eq!(g.status, 200, "{}", g.answer);
        let ts: i64 = g.body["timestamp"].as_str().unwrap().parse().unwrap();
        assert!((now - ts).abs() < 60, "timestamp in seconds: {ts}");
        assert_eq!(
            g.body["sign"].as_str().unwrap(),
            chat_double::feishu_sign(ts, secret)
        );
    }
    let kinds: Vec<&str> = got
        .iter()
        .map(|g| g.body["msg_type"].as_str().unwrap())
        .collect();
    for k in ["text", "post", "interactive"] {
        assert!(kinds.contains(&k), "{kinds:?}");
    }
    let t = got.iter().find(|g| g.body["msg_type"] == "text").unwrap();
    assert_eq!(t.body["content"], json!({"text": "build 1234 passed"}));

    // 11232 is too fast: held back a minute, not failed; then 2200 retries; then delivered.
    feishu.script(
        Platform::Feishu,
        [
            Trouble::FeishuCode(
                11232,
                "frequency limited psm[lark.oapi.app_platform_runtime]",
            ),
            Trouble::FeishuCode(2200, "internal error"),
        ],
    );
    let busy = send(&c, "feishu.agent", "default", "", "busy").await;
    wait_attempts(&c, busy, 1).await;
    assert_eq!(
        attempts(&c, busy).await,
        vec![attempt(1, "retry", Some("feishu-11232"), Some(200))]
    );
    let wait = next_due_after_last_attempt(&c, busy).await;
    assert!((wait - 60.0).abs() < 0.001, "due {wait}s after 11232");
    make_due(&c, busy).await;
    assert_eq!(final_state(&c, busy).await, "submitted");
    assert_eq!(
        attempts(&c, busy).await,
        vec![
            attempt(1, "retry", Some("feishu-11232"), Some(200)),
            attempt(2, "retry", Some("feishu-2200"), Some(200)),
            attempt(3, "done", None, Some(200)),
        ]
    );

    // Signature and token errors fail at once; so does a bad request.
    feishu.script(Platform::Feishu, [Trouble::FeishuCode(9499, "Bad Request")]);
    let bad = send(&c, "feishu.agent", "default", "", "refused").await;
    assert_eq!(final_state(&c, bad).await, "failed");
    assert_eq!(
        attempts(&c, bad).await,
        vec![attempt(1, "failed", Some("feishu-9499"), Some(200))]
    );
    for (profile, code) in [
        ("unsigned", "feishu-19021"),
        ("wrongkey", "feishu-19021"),
        ("other", "feishu-19001"),
    ] {
        let id = send(&c, "feishu.agent", profile, "", "hello").await;
        assert_eq!(final_state(&c, id).await, "failed", "{profile}");
        assert_eq!(
            attempts(&c, id).await,
            vec![attempt(1, "failed", Some(code), Some(200))],
            "{profile}"
        );
    }
    // A message type the bot does not send is refused unsent.
    let before = feishu.got(Platform::Feishu).len();
    let audio = send(&c, "feishu.agent", "default", "", r#"{"msg_type":"audio"}"#).await;
    assert_eq!(final_state(&c, audio).await, "failed");
    assert_eq!(
        attempts(&c, audio).await,
        vec![attempt(1, "failed", Some("bad-content"), None)]
    );
    assert_eq!(feishu.got(Platform::Feishu).len(), before);

    d.stop().await;
    let mut secrets = feishu.secrets();
    secrets.extend([wrong_secret, "fsUnknownHookToken".into()]);
    assert_no_secret(&c, &secrets).await;
}

#[tokio::test]
async fn telegram_sends_follows_a_migration_and_waits_for_retry_after() {
    let (db, c, tg) = setup().await;
    let base = &tg.url;
    let token = &tg.telegram_token;
    let wrong = format!("7000001:AAwrong{}", Uuid::new_v4().simple());
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let conf = format!(
        "[default]\nbot_token = \"{token}\"\napi_url = \"{base}\"\nparse_mode = \"HTML\"\n\
         disable_notification = true\n{FAST}\n\
         [wrong]\nbot_token = \"{wrong}\"\napi_url = \"{base}\"\n{FAST}\n\
         [down]\nbot_token = \"{token}\"\napi_url = \"http://127.0.0.1:{closed}\"\n\
         max_attempts = 1\ntimeout = \"5s\"\n"
    );
    let (_tc, d) = start(&db, "telegram", &conf);
    let app = TestRole::new("outboxd_app").await;
    let a = app.client(&db).await;

    // The profile's defaults, and the wrapper's explicit fields.
    let plain = send(
        &c,
        "telegram.agent",
        "default",
        "123456789",
        "<b>Backup</b> done",
    )
    .await;
    let explicit: Uuid = a
        .query_one(
            "SELECT api.send_telegram('default', '@outboxd_test', 'Backup \\*done\\*', 'MarkdownV2', false)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    for id in [plain, explicit] {
        assert_eq!(final_state(&c, id).await, "submitted");
        assert_eq!(
            attempts(&c, id).await,
            vec![attempt(1, "done", None, Some(200))]
        );
    }
    let got = tg.got(Platform::Telegram);
    assert_eq!(got.len(), 2);
    let find = |chat: Value| {
        got.iter()
            .find(|g| g.body["chat_id"] == chat)
            .unwrap()
            .clone()
    };
    let p = find(json!(123456789));
    assert_eq!(p.path, format!("/bot{token}/sendMessage"));
    assert_eq!(
        p.body,
        json!({"chat_id": 123456789, "text": "<b>Backup</b> done", "parse_mode": "HTML",
               "disable_notification": true})
    );
    let e = find(json!("@outboxd_test"));
    assert_eq!(
        e.body,
        json!({"chat_id": "@outboxd_test", "text": "Backup \\*done\\*", "parse_mode": "MarkdownV2",
               "disable_notification": false})
    );
    for (id, g) in [(plain, p), (explicit, e)] {
        let answer: Value = serde_json::from_str(&g.answer).unwrap();
        assert_eq!(
            provider_id(&c, id).await,
            Some(answer["result"]["message_id"].to_string())
        );
    }

    // A group that became a supergroup: sent again at once to the new id, and the move recorded.
    let moved = send(
        &c,
        "telegram.agent",
        "default",
        &OLD_GROUP.to_string(),
        "moved?",
    )
    .await;
    assert_eq!(final_state(&c, moved).await, "submitted");
    assert_eq!(
        attempts(&c, moved).await,
        vec![attempt(1, "done", None, Some(200))]
    );
    let got = tg.got(Platform::Telegram);
    let to_old: Vec<_> = got
        .iter()
        .filter(|g| g.body["chat_id"] == OLD_GROUP)
        .collect();
    let to_new: Vec<_> = got
        .iter()
        .filter(|g| g.body["chat_id"] == SUPERGROUP)
        .collect();
    assert_eq!((to_old.len(), to_new.len()), (1, 1), "{got:?}");
    assert_eq!(to_old[0].status, 400);
    let answer: Value = serde_json::from_str(&to_new[0].answer).unwrap();
    let message_id = answer["result"]["message_id"].as_i64().unwrap();
    assert_eq!(provider_id(&c, moved).await, Some(message_id.to_string()));
    assert_eq!(
        replies(&c, moved).await,
        vec![
            json!({"event": "migrate_to_chat_id", "from_chat_id": OLD_GROUP,
                    "migrate_to_chat_id": SUPERGROUP, "message_id": message_id})
        ]
    );
    // Queryable with plain SQL: the chats that moved.
    let moves: Vec<(String, String)> = c
        .query(
            "SELECT o.address, i.content::jsonb ->> 'migrate_to_chat_id' FROM api.inbox i \
               JOIN api.outbox o ON o.id = i.parent \
              WHERE i.agentcode = 'telegram.agent' \
                AND i.content::jsonb ->> 'event' = 'migrate_to_chat_id'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(moves, vec![(OLD_GROUP.to_string(), SUPERGROUP.to_string())]);

    // 429: the next attempt is due after retry_after, not failed, then delivered.
    tg.script(Platform::Telegram, [Trouble::TelegramTooMany(34)]);
    let busy = send(&c, "telegram.agent", "default", "123456789", "busy").await;
    wait_attempts(&c, busy, 1).await;
    assert_eq!(state_of(&c, busy).await, "prepared");
    assert_eq!(
        attempts(&c, busy).await,
        vec![attempt(1, "retry", Some("telegram-429"), Some(429))]
    );
    let wait = next_due_after_last_attempt(&c, busy).await;
    assert!((wait - 34.0).abs() < 0.001, "due {wait}s after the 429");
    make_due(&c, busy).await;
    assert_eq!(final_state(&c, busy).await, "submitted");

    // Blocked, unknown chat, bad token: failed at once; a network error loses the token.
    let mut failing = Vec::new();
    for (profile, chat, code, status) in [
        (
            "default",
            BLOCKED_CHAT.to_string(),
            "telegram-403",
            Some(403),
        ),
        ("default", "-77".to_string(), "telegram-400", Some(400)),
        ("wrong", "123".to_string(), "telegram-401", Some(401)),
        ("down", "123".to_string(), "connect", None),
        ("default", "not a chat".to_string(), "bad-address", None),
    ] {
        let id = send(&c, "telegram.agent", profile, &chat, "hello").await;
        failing.push((id, code, status));
    }
    for (id, code, status) in failing {
        assert_eq!(final_state(&c, id).await, "failed", "{code}");
        assert_eq!(
            attempts(&c, id).await,
            vec![attempt(1, "failed", Some(code), status)]
        );
    }
    let texts: Vec<String> = c
        .query(
            "SELECT error_text FROM outbox.attempts WHERE error_code = 'connect'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(texts.len(), 1);
    assert!(
        texts[0].starts_with("error sending request"),
        "{}",
        texts[0]
    );

    d.stop().await;
    let mut secrets = tg.secrets();
    secrets.push(wrong.clone());
    secrets.push(wrong.split(':').nth(1).unwrap().to_string());
    assert_no_secret(&c, &secrets).await;
}

#[tokio::test]
async fn the_sql_wrappers_build_the_contents_and_refuse_what_cannot_be_sent() {
    logs();
    let db = TestDb::new().await;
    let app = TestRole::new("outboxd_app").await;
    let a = app.client(&db).await;
    let row = |id: Uuid| {
        let a = &a;
        async move {
            let r = a
                .query_one(
                    "SELECT agentcode, profile, address, content, statecode, code FROM api.message \
                      WHERE id = $1",
                    &[&id],
                )
                .await
                .unwrap();
            let content: String = r.get(3);
            (
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, Option<String>>(2),
                serde_json::from_str::<Value>(&content).unwrap(),
                r.get::<_, String>(4),
                r.get::<_, String>(5),
            )
        }
    };
    let one = |sql: &'static str| {
        let a = &a;
        async move { a.query_one(sql, &[]).await.map(|r| r.get::<_, Uuid>(0)) }
    };

    let s = one("SELECT api.send_slack('ops', 'C0GENERAL', 'hi', pCode => 'slack-1')")
        .await
        .unwrap();
    let (agent, profile, address, content, state, code) = row(s).await;
    assert_eq!(
        (
            agent.as_str(),
            profile.as_str(),
            address.as_deref(),
            state.as_str(),
            code.as_str()
        ),
        (
            "slack.agent",
            "ops",
            Some("C0GENERAL"),
            "prepared",
            "slack-1"
        )
    );
    assert_eq!(content, json!({"text": "hi"}));
    // The same code again is the same message (idempotency key).
    let again = one("SELECT api.send_slack('ops', 'C0GENERAL', 'hi', pCode => 'slack-1')")
        .await
        .unwrap();
    assert_eq!(again, s);
    let s = one("SELECT api.send_slack('default', NULL, NULL, '[{\"type\":\"divider\"}]', '1.2')")
        .await
        .unwrap();
    assert_eq!(
        row(s).await.3,
        json!({"blocks": [{"type": "divider"}], "thread_ts": "1.2"})
    );

    let f = one("SELECT api.send_feishu('default', 'hello')")
        .await
        .unwrap();
    let (agent, _, address, content, ..) = row(f).await;
    assert_eq!((agent.as_str(), address), ("feishu.agent", None));
    assert_eq!(
        content,
        json!({"msg_type": "text", "content": {"text": "hello"}})
    );
    let f = one("SELECT api.send_feishu('default', NULL, pCard => '{\"elements\":[]}')")
        .await
        .unwrap();
    assert_eq!(
        row(f).await.3,
        json!({"msg_type": "interactive", "card": {"elements": []}})
    );

    let t =
        one("SELECT api.send_telegram('default', '-100123', 'x', 'HTML', true, pPriority => 10)")
            .await
            .unwrap();
    let (agent, _, address, content, ..) = row(t).await;
    assert_eq!(
        (agent.as_str(), address.as_deref()),
        ("telegram.agent", Some("-100123"))
    );
    assert_eq!(
        content,
        json!({"text": "x", "parse_mode": "HTML", "disable_notification": true})
    );
    let t = one("SELECT api.send_telegram('default', '42', 'plain')")
        .await
        .unwrap();
    assert_eq!(row(t).await.3, json!({"text": "plain"}));

    for bad in [
        "SELECT api.send_slack('default', 'C1', NULL)",
        "SELECT api.send_slack('default', 'C1', 'x', '{\"type\":\"divider\"}')",
        "SELECT api.send_feishu('default', NULL)",
        "SELECT api.send_feishu('default', 'x', pCard => '{}')",
        "SELECT api.send_feishu('default', NULL, pPost => '[]')",
        "SELECT api.send_telegram('default', NULL, 'x')",
        "SELECT api.send_telegram('default', '1', '')",
        "SELECT api.send_telegram('default', '1', 'x', 'BBCode')",
    ] {
        let e = one(bad).await.unwrap_err();
        assert_eq!(sqlstate(&e), "22023", "{bad}: {e}");
        let msg = e.as_db_error().unwrap().message();
        assert!(msg.starts_with("ERR-400-070: "), "{bad}: {msg}");
    }
}
