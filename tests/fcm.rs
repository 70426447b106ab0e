//! The FCM HTTP v1 connector end to end: a real daemon and PostgreSQL, and in-process doubles of
//! Google's token endpoint and FCM that verify the signed JWT assertion and the bearer token
//! (tests/common/fcm.rs).

mod common;
// Only this test binary needs the FCM doubles, so they stay out of `common`'s module tree.
#[path = "common/fcm.rs"]
mod double;

use std::time::Duration;

use common::*;
use double::{FcmDouble, Reply};
use serde_json::{json, Value};
use uuid::Uuid;

const T: Duration = Duration::from_secs(15);

/// An fcm.conf whose `default` profile takes project id and token URI from the key file, with
/// fast retries. `extra` adds keys.
fn fcm_conf(fcm: &FcmDouble, key: &std::path::Path, extra: &str) -> String {
    format!(
        "[default]\nservice_account_file = \"{}\"\nendpoint = \"{}\"\n\
         retry = [\"20ms\", \"20ms\", \"20ms\"]\ntimeout = \"5s\"\n{extra}\n",
        path_str(key),
        fcm.url
    )
}

/// A fresh database, the doubles and a running daemon with one `fcm` profile. The returned
/// configs own the temporary directories (key file and fcm.conf).
async fn setup(extra: &str) -> (TestDb, FcmDouble, (TestConfig, TestConfig), Daemon) {
    let db = TestDb::new().await;
    let fcm = FcmDouble::start().await;
    let keys = TestConfig::new(&db, &[]);
    let key = fcm.write_key(keys.dir.path());
    let tc = TestConfig::new(&db, &[("fcm", &fcm_conf(&fcm, &key, extra))]);
    let d = Daemon::start(tc.config.clone());
    (db, fcm, (keys, tc), d)
}

async fn send_fcm(c: &tokio_postgres::Client, address: &str, content: &Value) -> Uuid {
    send(c, "fcm.agent", "default", address, &content.to_string()).await
}

/// Waits until `id` is submitted or failed and returns which, so that a wrong outcome fails the
/// test at once with its attempts instead of a time-out.
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

fn attempt(n: i32, outcome: &str, code: Option<&str>, status: Option<i32>) -> AttemptRow {
    (n, outcome.into(), code.map(str::to_string), status)
}

type AttemptRow = (i32, String, Option<String>, Option<i32>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_and_stores_the_fcm_message_name() {
    let (db, fcm, _tc, d) = setup("").await;
    let c = db.client().await;
    let content = json!({"message": {
        "token": "device-1",
        "notification": {"title": "Hi", "body": "Text"},
        "data": {"orderId": "42"},
        "android": {"priority": "HIGH"}
    }});
    let id = send_fcm(&c, "ignored-address", &content).await;
    assert_eq!(
        wait_final(&c, id).await,
        "submitted",
        "{:?}",
        attempts(&c, id).await
    );
    let sent = fcm.sent();
    assert_eq!(sent.len(), 1);
    // The body goes out as written: the body's token wins over the address.
    assert_eq!(sent[0].body, content);
    let name = format!("projects/{}/messages/0:0%31bd1c9631bd1c96", fcm.project_id);
    assert_eq!(provider_id(&c, id).await.as_deref(), Some(name.as_str()));
    assert_eq!(
        attempts(&c, id).await,
        vec![attempt(1, "done", None, Some(200))]
    );
    assert_eq!(fcm.token_requests(), 1);
    assert_eq!(fcm.token_rejections(), Vec::<String>::new());
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_address_supplies_the_token_and_validate_only_passes_through() {
    let (db, fcm, _tc, d) = setup("").await;
    let c = db.client().await;
    let id = send_fcm(
        &c,
        "device-from-address",
        &json!({"validate_only": true, "message": {"notification": {"title": "Hi"}}}),
    )
    .await;
    assert_eq!(
        wait_final(&c, id).await,
        "submitted",
        "{:?}",
        attempts(&c, id).await
    );
    let sent = fcm.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].body["message"]["token"], "device-from-address");
    assert_eq!(sent[0].body["validate_only"], true);
    let name = format!("projects/{}/messages/fake_message_id", fcm.project_id);
    assert_eq!(provider_id(&c, id).await.as_deref(), Some(name.as_str()));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unregistered_fails_at_once() {
    let (db, fcm, _tc, d) = setup("").await;
    fcm.script([Reply::Error {
        http: 404,
        status: "NOT_FOUND",
        error_code: Some("UNREGISTERED"),
        retry_after: None,
    }]);
    let c = db.client().await;
    let id = send_fcm(&c, "", &json!({"message": {"token": "gone"}})).await;
    assert_eq!(
        wait_final(&c, id).await,
        "failed",
        "{:?}",
        attempts(&c, id).await
    );
    assert_eq!(
        attempts(&c, id).await,
        vec![attempt(1, "failed", Some("fcm-unregistered"), Some(404))]
    );
    assert_eq!(fcm.sent().len(), 1);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_exceeded_is_retried_after_the_retry_after_delay() {
    let (db, fcm, _tc, d) = setup("").await;
    fcm.script([Reply::Error {
        http: 429,
        status: "RESOURCE_EXHAUSTED",
        error_code: Some("QUOTA_EXCEEDED"),
        retry_after: Some(1),
    }]);
    let c = db.client().await;
    let id = send_fcm(&c, "", &json!({"message": {"topic": "news"}})).await;
    assert_eq!(
        wait_final(&c, id).await,
        "submitted",
        "{:?}",
        attempts(&c, id).await
    );
    assert_eq!(
        attempts(&c, id).await,
        vec![
            attempt(1, "retry", Some("fcm-quota-exceeded"), Some(429)),
            attempt(2, "done", None, Some(200)),
        ]
    );
    let sent = fcm.sent();
    assert_eq!(sent.len(), 2);
    // The profile's schedule says 20ms: only Retry-After explains a gap of about a second.
    let gap = sent[1].at - sent[0].at;
    assert!(gap >= Duration::from_millis(900), "{gap:?}");
    assert_eq!(fcm.token_requests(), 1);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_content_fails_as_bad_content_without_calling_fcm() {
    let (db, fcm, _tc, d) = setup("").await;
    let c = db.client().await;
    let number = send_fcm(
        &c,
        "",
        &json!({"message": {"token": "d", "data": {"count": 3}}}),
    )
    .await;
    let not_json = send(&c, "fcm.agent", "default", "d", "{\"message\":").await;
    let two_targets = send_fcm(&c, "", &json!({"message": {"token": "d", "topic": "t"}})).await;
    for id in [number, not_json, two_targets] {
        assert_eq!(
            wait_final(&c, id).await,
            "failed",
            "{:?}",
            attempts(&c, id).await
        );
        assert_eq!(
            attempts(&c, id).await,
            vec![attempt(1, "failed", Some("bad-content"), None)]
        );
    }
    let text: String = c
        .query_one(
            "SELECT error_text FROM outbox.attempts WHERE message_id = $1",
            &[&number],
        )
        .await
        .unwrap()
        .get(0);
    assert!(text.contains("message.data.count"), "{text}");
    assert_eq!(fcm.sent().len(), 0);
    assert_eq!(fcm.token_requests(), 0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_refreshed_once_and_the_send_repeated() {
    let (db, fcm, _tc, d) = setup("").await;
    let c = db.client().await;
    let first = send_fcm(&c, "d1", &json!({"message": {}})).await;
    assert_eq!(
        wait_final(&c, first).await,
        "submitted",
        "{:?}",
        attempts(&c, first).await
    );
    assert_eq!(fcm.token_requests(), 1);
    fcm.revoke_tokens();
    let second = send_fcm(&c, "d2", &json!({"message": {}})).await;
    assert_eq!(
        wait_final(&c, second).await,
        "submitted",
        "{:?}",
        attempts(&c, second).await
    );
    // One attempt: the refresh and the repeated request happen inside it.
    assert_eq!(
        attempts(&c, second).await,
        vec![attempt(1, "done", None, Some(200))]
    );
    assert_eq!(fcm.token_requests(), 2);
    let sent = fcm.sent();
    let answered: Vec<u16> = sent.iter().map(|s| s.answered).collect();
    assert_eq!(answered, [200, 401, 200]);
    assert_eq!(sent[0].bearer, sent[1].bearer);
    assert_ne!(sent[1].bearer, sent[2].bearer);
    assert_eq!(fcm.token_rejections(), Vec::<String>::new());
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_401_is_token_invalid_after_exactly_one_refresh() {
    let (db, fcm, _tc, d) = setup("max_attempts = 1").await;
    fcm.reject_every_token();
    let c = db.client().await;
    let id = send_fcm(&c, "d", &json!({"message": {}})).await;
    assert_eq!(
        wait_final(&c, id).await,
        "failed",
        "{:?}",
        attempts(&c, id).await
    );
    assert_eq!(
        attempts(&c, id).await,
        vec![attempt(1, "failed", Some("token-invalid"), Some(401))]
    );
    assert_eq!(fcm.token_requests(), 2);
    assert_eq!(fcm.sent().len(), 2);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn third_party_auth_error_is_permanent_and_keeps_the_token() {
    let (db, fcm, _tc, d) = setup("").await;
    fcm.script([Reply::Error {
        http: 401,
        status: "UNAUTHENTICATED",
        error_code: Some("THIRD_PARTY_AUTH_ERROR"),
        retry_after: None,
    }]);
    let c = db.client().await;
    let id = send_fcm(&c, "ios-device", &json!({"message": {}})).await;
    assert_eq!(
        wait_final(&c, id).await,
        "failed",
        "{:?}",
        attempts(&c, id).await
    );
    assert_eq!(
        attempts(&c, id).await,
        vec![attempt(
            1,
            "failed",
            Some("fcm-third-party-auth-error"),
            Some(401)
        )]
    );
    assert_eq!(fcm.token_requests(), 1);
    assert_eq!(fcm.sent().len(), 1);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assertion_signed_by_another_key_is_denied() {
    let db = TestDb::new().await;
    let fcm = FcmDouble::start().await;
    let keys = TestConfig::new(&db, &[]);
    let key = keys.path("service-account.json");
    std::fs::write(
        &key,
        fcm.service_account_json_with(&double::impostor_key().private_pem),
    )
    .unwrap();
    let tc = TestConfig::new(&db, &[("fcm", &fcm_conf(&fcm, &key, ""))]);
    let d = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let id = send_fcm(&c, "d", &json!({"message": {}})).await;
    assert_eq!(
        wait_final(&c, id).await,
        "failed",
        "{:?}",
        attempts(&c, id).await
    );
    assert_eq!(
        attempts(&c, id).await,
        vec![attempt(1, "failed", Some("token-denied"), Some(400))]
    );
    let rejections = fcm.token_rejections();
    assert_eq!(rejections.len(), 1);
    assert!(rejections[0].contains("signature"), "{rejections:?}");
    assert_eq!(fcm.sent().len(), 0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_messages_on_a_cold_cache_fetch_one_token() {
    let db = TestDb::new().await;
    let fcm = FcmDouble::start().await;
    // A slow token endpoint keeps every delivery waiting on the same first fetch.
    fcm.set_token_delay(Duration::from_millis(300));
    let tc = TestConfig::new(&db, &[]);
    let key = fcm.write_key(tc.dir.path());
    let tc2 = TestConfig::new(&db, &[("fcm", &fcm_conf(&fcm, &key, ""))]);
    let c = db.client().await;
    // Enqueued before the daemon starts, so that one claim picks them all up at once.
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(send_fcm(&c, &format!("device-{i}"), &json!({"message": {}})).await);
    }
    let d = Daemon::start(tc2.config.clone());
    for id in &ids {
        assert_eq!(
            wait_final(&c, *id).await,
            "submitted",
            "{:?}",
            attempts(&c, *id).await
        );
    }
    assert_eq!(fcm.token_requests(), 1);
    let sent = fcm.sent();
    assert_eq!(sent.len(), 20);
    assert!(sent.iter().all(|s| s.bearer == sent[0].bearer));
    let report = d.stop().await;
    assert_eq!(report.delivered, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_are_checked_at_build_and_healthcheck_sends_nothing() {
    let fcm = FcmDouble::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = fcm.write_key(dir.path());
    let build = |text: String| {
        let mut p = outboxd::config::parse_profiles("fcm", &text, "fcm.conf")
            .map_err(|e| format!("{e:?}"))?;
        let (name, profile) = p.remove(0);
        profile
            .connector
            .build(&outboxd::config::ProfileContext::new("fcm.conf", name))
            .map_err(|e| e.to_string())
    };
    let ok = build(fcm_conf(&fcm, &key, "")).unwrap();
    ok.healthcheck().await.unwrap();
    assert_eq!(fcm.token_requests() + fcm.sent().len(), 0);

    // The key inline, and the project id overridden.
    let inline = format!(
        "[default]\nservice_account = '''{}'''\nproject_id = \"other-project\"\n",
        fcm.service_account_json()
    );
    build(inline).unwrap();

    let err = build(fcm_conf(&fcm, &dir.path().join("missing.json"), ""))
        .map(|_| ())
        .unwrap_err();
    assert!(err.contains("default.service_account_file"), "{err}");
    let user_key = dir.path().join("user.json");
    std::fs::write(
        &user_key,
        json!({"type": "authorized_user", "client_email": "a@b", "private_key": "x"}).to_string(),
    )
    .unwrap();
    let err = build(fcm_conf(&fcm, &user_key, ""))
        .map(|_| ())
        .unwrap_err();
    assert!(err.contains("authorized_user"), "{err}");
    let mut broken: Value = serde_json::from_str(&fcm.service_account_json()).unwrap();
    broken["private_key"] = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into();
    std::fs::write(&user_key, broken.to_string()).unwrap();
    let err = build(fcm_conf(&fcm, &user_key, ""))
        .map(|_| ())
        .unwrap_err();
    assert!(err.contains("private_key"), "{err}");
    let err = build(fcm_conf(&fcm, &key, "projectid = \"x\""))
        .map(|_| ())
        .unwrap_err();
    assert!(err.contains("projectid"), "{err}");
    // The secret never shows in errors.
    assert!(!err.contains("BEGIN"));
}

#[test]
fn the_example_profile_documents_only_real_keys() {
    let text = include_str!("../conf/fcm.conf");
    // Uncomment every documented key: each must be one the connector accepts.
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
    for key in ["service_account_env", "project_id", "endpoint", "token_uri"] {
        assert!(all.contains(&format!("\n{key} = ")), "{key} is documented");
    }
    let profiles = outboxd::config::parse_profiles("fcm", &all, "fcm.conf").unwrap();
    assert_eq!(profiles.len(), 1);
    assert_eq!(profiles[0].1.common.retry[0], Duration::from_secs(60));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_token_never_follows_a_redirect_to_another_origin() {
    let db = TestDb::new().await;
    let fcm = FcmDouble::start().await;
    let (moved, hits, _r) = common::api::redirector(&fcm.url).await;
    let keys = TestConfig::new(&db, &[]);
    let key = fcm.write_key(keys.dir.path());
    let conf = format!(
        "[default]\nservice_account_file = \"{}\"\nendpoint = \"{moved}\"\nmax_attempts = 1\n\
         timeout = \"5s\"\n",
        path_str(&key)
    );
    let tc = TestConfig::new(&db, &[("fcm", &conf)]);
    let d = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let id = send_fcm(&c, "device-1", &json!({"message": {"data": {"k": "v"}}})).await;
    assert_eq!(wait_final(&c, id).await, "failed");
    d.stop().await;
    assert_eq!(
        attempts(&c, id).await,
        vec![attempt(1, "failed", Some("redirect-denied"), None)]
    );
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(fcm.sent().is_empty(), "{:?}", fcm.sent());
}
