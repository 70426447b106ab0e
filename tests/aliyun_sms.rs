//! The Aliyun SMS connector end to end: a real daemon and PostgreSQL, and an in-process double of
//! the SMS API that verifies signature v1, nonces and timestamps and answers SendSms and
//! QuerySendDetails as Aliyun does (tests/common/aliyun_double.rs). Every test also searches the
//! captured log (DEBUG, every crate) and the attempts for the AccessKey pair and every signature.

mod common;
#[path = "common/aliyun_double.rs"]
mod double;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::*;
use double::{AliyunDouble, Reply};
use uuid::Uuid;

const T: Duration = Duration::from_secs(20);
const KEY_ID: &str = "LTAI5tOutboxdTestKeyId";
const SECRET: &str = "OutboxdTestSecret0123456789";

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

/// The capturing subscriber, installed before the harness's own.
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

fn conf(sms: &AliyunDouble, secret: &str, extra: &str) -> String {
    let timeout = if extra.contains("timeout") {
        ""
    } else {
        "timeout = \"5s\"\n"
    };
    format!(
        "[default]\naccess_key_id = \"{KEY_ID}\"\naccess_key_secret = \"{secret}\"\n\
         endpoint = \"{}\"\nsign_name = \"Shop\"\ntemplate_code = \"SMS_100\"\n\
         retry = [\"20ms\", \"20ms\", \"20ms\"]\n{timeout}{extra}\n",
        sms.url
    )
}

struct Setup {
    db: TestDb,
    sms: AliyunDouble,
    _tc: TestConfig,
    daemon: Daemon,
    c: tokio_postgres::Client,
}

async fn setup(secret: &str, extra: &str) -> Setup {
    logs();
    let db = TestDb::new().await;
    let sms = AliyunDouble::start(KEY_ID, SECRET).await;
    let tc = TestConfig::new(&db, &[("aliyunsms", &conf(&sms, secret, extra))]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    Setup {
        db,
        sms,
        _tc: tc,
        daemon,
        c,
    }
}

impl Setup {
    /// Stops the daemon and checks that no credential or signature was logged or recorded.
    async fn finish(self, ids: &[Uuid]) {
        let Setup {
            db, sms, daemon, c, ..
        } = self;
        daemon.stop().await;
        let log = String::from_utf8_lossy(&logs().0.lock().unwrap()).into_owned();
        assert!(log.contains("aliyunsms/default"), "the log is captured");
        let mut secrets = vec![KEY_ID.to_string(), SECRET.to_string()];
        for s in sms.signatures() {
            secrets.push(s.clone());
            secrets.push(
                percent_encoding::utf8_percent_encode(&s, percent_encoding::NON_ALPHANUMERIC)
                    .to_string(),
            );
        }
        let texts: Vec<String> = c
            .query(
                "SELECT coalesce(error_text, '') || ' ' || coalesce(provider_message_id, '') \
                 FROM outbox.attempts WHERE message_id = ANY($1)",
                &[&ids],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        for s in &secrets {
            assert!(!log.contains(s.as_str()), "the log holds {s}");
            for t in &texts {
                assert!(!t.contains(s.as_str()), "an attempt holds {s}: {t}");
            }
        }
        drop(db);
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

async fn provider_id(c: &tokio_postgres::Client, id: Uuid) -> Option<String> {
    c.query_one(
        "SELECT providermessageid FROM api.service_message WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap()
    .get(0)
}

async fn code_of(c: &tokio_postgres::Client, id: Uuid) -> String {
    c.query_one(
        "SELECT code FROM outbox.live_messages WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap()
    .get(0)
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

type AttemptRow = (i32, String, Option<String>, Option<i32>);

fn attempt(n: i32, outcome: &str, code: Option<&str>, status: Option<i32>) -> AttemptRow {
    (n, outcome.into(), code.map(str::to_string), status)
}

async fn send_sms(c: &tokio_postgres::Client, phone: &str, content: &str) -> Uuid {
    send(c, "aliyunsms.agent", "default", phone, content).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_through_the_sql_wrapper_and_stores_the_biz_id() {
    let s = setup(SECRET, "").await;
    let id: Uuid =
        s.c.query_one(
            "SELECT api.send_sms_aliyun('13800000000', '{\"code\": 4821}'::jsonb)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        wait_final(&s.c, id).await,
        "submitted",
        "{:?}",
        attempts(&s.c, id).await
    );
    let sent = s.sms.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].phone_numbers, "13800000000");
    assert_eq!(sent[0].sign_name, "Shop", "the profile's default");
    assert_eq!(sent[0].template_code, "SMS_100", "the profile's default");
    assert_eq!(
        sent[0].template_param,
        Some(serde_json::json!({"code": "4821"}))
    );
    assert_eq!(
        sent[0].out_id.as_deref(),
        Some(code_of(&s.c, id).await.as_str())
    );
    assert_eq!(
        provider_id(&s.c, id).await.as_deref(),
        Some(sent[0].biz_id.as_str())
    );
    assert_eq!(
        attempts(&s.c, id).await,
        vec![attempt(1, "done", None, Some(200))]
    );
    // Even the first attempt checks first (an interrupted attempt keeps its number).
    let q = s.sms.queries();
    assert!(!q.is_empty());
    assert_eq!(q[0]["PhoneNumber"], "13800000000");
    // The content names the template and sign; the SQL wrapper refuses params that are no object.
    let id2: Uuid = s
        .c
        .query_one(
            "SELECT api.send_sms_aliyun('+8613900000000', NULL, 'SMS_200', 'Shop', pCode => 'order-7')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        wait_final(&s.c, id2).await,
        "submitted",
        "{:?}",
        attempts(&s.c, id2).await
    );
    let sent = s.sms.sent();
    assert_eq!(sent.len(), 2);
    assert_eq!(
        (
            sent[1].template_code.as_str(),
            sent[1].template_param.as_ref(),
            sent[1].out_id.as_deref()
        ),
        ("SMS_200", None, Some("order-7"))
    );
    let e =
        s.c.query_one(
            "SELECT api.send_sms_aliyun('13800000000', '[1]'::jsonb)",
            &[],
        )
        .await
        .unwrap_err();
    assert!(format!("{e:?}").contains("ERR-400-042"), "{e:?}");
    // Every request was signed over a nonce of its own: nothing was refused.
    assert_eq!(s.sms.send_requests(), 2);
    s.finish(&[id, id2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_fails_with_signature_does_not_match_and_leaks_nothing() {
    let s = setup("WrongSecretForOutboxdTest", "").await;
    let id = send_sms(&s.c, "13800000000", r#"{"params": {"code": "1"}}"#).await;
    assert_eq!(
        wait_final(&s.c, id).await,
        "failed",
        "{:?}",
        attempts(&s.c, id).await
    );
    assert_eq!(
        attempts(&s.c, id).await,
        vec![attempt(
            1,
            "failed",
            Some("aliyun-signature-does-not-match"),
            Some(400)
        )]
    );
    let text = &error_texts(&s.c, id).await[0];
    // Aliyun echoes its string to sign, AccessKeyId included: scrubbed.
    assert!(
        text.contains("SignatureDoesNotMatch") && text.contains("***"),
        "{text}"
    );
    assert!(!text.contains("WrongSecretForOutboxdTest"), "{text}");
    assert!(s.sms.sent().is_empty());
    let log = String::from_utf8_lossy(&logs().0.lock().unwrap()).into_owned();
    assert!(!log.contains("WrongSecretForOutboxdTest"));
    s.finish(&[id]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn business_limit_control_is_too_fast_and_retried_after_the_block() {
    let s = setup(SECRET, "business_limit_block = \"800ms\"").await;
    s.sms.script([Reply::Code(
        "isv.BUSINESS_LIMIT_CONTROL",
        "触发分钟级流控Permits:1",
    )]);
    let id = send_sms(&s.c, "13800000000", r#"{"params": {"code": "1"}}"#).await;
    assert_eq!(
        wait_final(&s.c, id).await,
        "submitted",
        "{:?}",
        attempts(&s.c, id).await
    );
    assert_eq!(
        attempts(&s.c, id).await,
        vec![
            attempt(
                1,
                "retry",
                Some("aliyun-isv-business-limit-control"),
                Some(200)
            ),
            attempt(2, "done", None, Some(200)),
        ]
    );
    let gap_ms: f64 =
        s.c.query_one(
            "SELECT (extract(epoch FROM max(finished_at) - min(finished_at)) * 1000)::float8 \
             FROM outbox.attempts WHERE message_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    // The schedule says 20ms: only the 800ms block explains this gap.
    assert!(gap_ms >= 700.0, "{gap_ms}");
    // Attempt 2 checked first (nothing had gone), then sent once.
    assert!(s.sms.queries().len() >= 2, "each attempt checked first");
    assert_eq!(s.sms.sent().len(), 1);
    assert_eq!(s.sms.send_requests(), 2);
    s.finish(&[id]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_sign_and_number_errors_fail_at_once() {
    let s = setup(SECRET, "").await;
    let c = &s.c;
    let cases = [
        (
            "13800000000",
            r#"{"params": {"other": "1"}}"#,
            "aliyun-isv-template-missing-parameters",
        ),
        (
            "13800000000",
            r#"{"template_code": "SMS_999"}"#,
            "aliyun-isv-sms-template-illegal",
        ),
        (
            "13800000000",
            r#"{"sign_name": "Nope", "params": {"code": "1"}}"#,
            "aliyun-isv-sms-signature-illegal",
        ),
    ];
    let mut ids = Vec::new();
    for (phone, content, code) in cases {
        let id = send_sms(c, phone, content).await;
        assert_eq!(
            wait_final(c, id).await,
            "failed",
            "{:?}",
            attempts(c, id).await
        );
        assert_eq!(
            attempts(c, id).await,
            vec![attempt(1, "failed", Some(code), Some(200))]
        );
        ids.push(id);
    }
    // A number the connector can already tell is wrong is never sent.
    let id = send_sms(c, "138-0000", r#"{"params": {"code": "1"}}"#).await;
    assert_eq!(wait_final(c, id).await, "failed");
    assert_eq!(
        attempts(c, id).await,
        vec![attempt(1, "failed", Some("bad-address"), None)]
    );
    ids.push(id);
    assert_eq!(s.sms.send_requests(), 3);
    assert!(s.sms.sent().is_empty());
    s.finish(&ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_sms_whose_answer_is_lost_is_found_by_query_and_not_sent_again() {
    let s = setup(SECRET, "timeout = \"1s\"").await;
    s.sms.script([Reply::AcceptThenHang]);
    let id = send_sms(&s.c, "13800000000", r#"{"params": {"code": "77"}}"#).await;
    assert_eq!(
        wait_final(&s.c, id).await,
        "submitted",
        "{:?}",
        attempts(&s.c, id).await
    );
    assert_eq!(
        attempts(&s.c, id).await,
        vec![
            attempt(1, "retry", Some("timeout"), None),
            attempt(2, "done", None, Some(200)),
        ]
    );
    assert_eq!(s.sms.send_requests(), 1, "exactly one SendSms");
    assert_eq!(s.sms.sent().len(), 1);
    let q = s.sms.queries();
    assert!(!q.is_empty());
    let code = code_of(&s.c, id).await;
    assert_eq!(q[0]["PhoneNumber"], "13800000000");
    assert!(
        q.iter().any(|p| p["SendDate"] == s.sms.sent()[0].date),
        "{q:?}"
    );
    assert_eq!(s.sms.sent()[0].out_id.as_deref(), Some(code.as_str()));
    // A QuerySendDetails record has no BizId.
    assert_eq!(provider_id(&s.c, id).await, None);
    s.finish(&[id]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_lost_before_the_service_acted_is_sent_exactly_once_on_retry() {
    let s = setup(SECRET, "timeout = \"1s\"").await;
    s.sms.script([Reply::HangBeforeRecord]);
    let id = send_sms(&s.c, "13800000000", r#"{"params": {"code": "78"}}"#).await;
    assert_eq!(
        wait_final(&s.c, id).await,
        "submitted",
        "{:?}",
        attempts(&s.c, id).await
    );
    assert_eq!(
        attempts(&s.c, id).await,
        vec![
            attempt(1, "retry", Some("timeout"), None),
            attempt(2, "done", None, Some(200)),
        ]
    );
    let sent = s.sms.sent();
    assert_eq!(sent.len(), 1, "sent exactly once");
    assert_eq!(s.sms.send_requests(), 2);
    assert!(!s.sms.queries().is_empty(), "checked before sending again");
    assert_eq!(
        provider_id(&s.c, id).await.as_deref(),
        Some(sent[0].biz_id.as_str())
    );
    // The signature travelled percent-encoded, never as raw base64 with '+' or '/'.
    for q in s.sms.raw_queries() {
        let sig = q.split("Signature=").nth(1).unwrap_or("");
        assert!(!sig.contains('+') && !sig.contains('/'), "{q}");
    }
    s.finish(&[id]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_during_send_sms_does_not_make_the_next_one_send_again() {
    let mut s = setup(SECRET, "timeout = \"30s\"").await;
    s.sms.script([Reply::AcceptThenHang]);
    let id = send_sms(&s.c, "13800000000", r#"{"params": {"code": "79"}}"#).await;
    wait_for(T, "the SMS to reach the double", || async {
        (s.sms.sent().len() == 1).then_some(())
    })
    .await;
    // Killed mid-call: the lease (5s) expires and the message comes back with its attempt number
    // unchanged (attempt 1 again), which `attempt > 1` alone would not catch.
    // Another daemon of the fleet (its own worker id, a short poll) takes over.
    let mut tc = TestConfig::new(
        &s.db,
        &[("aliyunsms", &conf(&s.sms, SECRET, "timeout = \"5s\""))],
    );
    tc.config.poll_interval = Duration::from_millis(100);
    tc.config.worker_id = Some("survivor".into());
    let first = std::mem::replace(&mut s.daemon, Daemon::start(tc.config.clone()));
    first.crash().await;
    assert_eq!(
        wait_final(&s.c, id).await,
        "submitted",
        "{:?}",
        attempts(&s.c, id).await
    );
    let rows = attempts(&s.c, id).await;
    assert_eq!(
        rows,
        vec![
            attempt(1, "interrupted", Some("lease-expired"), None),
            attempt(1, "done", None, Some(200)),
        ]
    );
    assert_eq!(s.sms.send_requests(), 1, "exactly one SendSms");
    assert_eq!(s.sms.sent().len(), 1);
    s._tc = tc;
    s.finish(&[id]).await;
}

#[test]
fn the_example_profile_documents_only_real_keys() {
    let text = include_str!("../conf/aliyunsms.conf");
    let all: String = text
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if rest.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                }) =>
            {
                rest
            }
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    for key in [
        "access_key_id_env",
        "access_key_secret_env",
        "access_key_secret_file",
        "endpoint",
        "region_id",
        "sign_name",
        "template_code",
        "business_limit_block",
        "check_first_attempt",
    ] {
        assert!(all.contains(&format!("\n{key} = ")), "{key} is documented");
    }
    let profiles = outboxd::config::parse_profiles("aliyunsms", &all, "aliyunsms.conf").unwrap();
    assert_eq!(profiles.len(), 1);
    assert_eq!(profiles[0].1.common.retry[0], Duration::from_secs(60));
}
