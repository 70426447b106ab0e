//! End-to-end tests of the `m2m` connector (MTS Communicator) through the daemon, against the
//! fake service in `common/m2m_double.rs`.

mod common;

use std::time::Duration;

use common::m2m_double::{M2mDouble, Trouble, M2M_NS, SOAP11_NS, SOAP12_NS};
use common::*;

const WAIT: Duration = Duration::from_secs(20);

/// An m2m.conf profile with fast retries.
fn profile(name: &str, url: &str, extra: &str) -> String {
    format!(
        "[{name}]\nurl = \"{url}\"\nretry = [\"20ms\", \"20ms\", \"20ms\"]\ntimeout = \"5s\"\n{extra}\n"
    )
}

/// Starts the daemon; a short poll interval picks due retries up quickly.
fn start(db: &TestDb, conf: &str) -> (TestConfig, Daemon) {
    let mut tc = TestConfig::new(db, &[("m2m", conf)]);
    tc.config.poll_interval = Duration::from_millis(50);
    let d = Daemon::start(tc.config.clone());
    (tc, d)
}

async fn provider_id(
    c: &tokio_postgres::Client,
    id: uuid::Uuid,
) -> (Option<String>, Option<String>) {
    let r = c
        .query_one(
            "SELECT provider_message_id, label FROM outbox.live_messages WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

fn md5_hex(s: &str) -> String {
    use md5::{Digest, Md5};
    Md5::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soap12_with_login_and_md5_password_delivers_and_stores_the_message_id() {
    let db = TestDb::new().await;
    let m2m = M2mDouble::start("acme", "s3cret", "unused").await;
    let secrets = tempfile::tempdir().unwrap();
    let pw = secrets.path().join("m2m.password");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let conf = profile(
        "default",
        &m2m.soap_url(),
        &format!(
            "login = \"acme\"\npassword_file = \"{}\"\nnaming = \"ACME & Co\"",
            path_str(&pw)
        ),
    );
    let (_tc, daemon) = start(&db, &conf);
    let c = db.client().await;
    // Markup, quotes, CRLF and Cyrillic must arrive exactly as written.
    let text = "Код 1234 <b>&amp;</b> \"ok\" 'x'\r\nвторая строка";
    let id = send(&c, "m2m.agent", "default", "+7 (900) 123-45-67", text).await;
    wait_state(&c, id, "submitted", WAIT).await;

    assert_eq!(
        provider_id(&c, id).await,
        (Some("1000000001".into()), Some("1000000001".into()))
    );
    assert_eq!(
        attempts(&c, id).await,
        vec![(1, "done".into(), None, Some(200))]
    );
    let reqs = m2m.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.outcome, "ok 1000000001");
    assert_eq!(r.binding, "1.2");
    assert_eq!(
        r.headers["content-type"],
        format!("application/soap+xml; charset=utf-8; action=\"{M2M_NS}/SendMessage\"")
    );
    assert!(!r.headers.contains_key("authorization"));
    assert_eq!(r.fields["msid"], "79001234567");
    assert_eq!(r.fields["message"], text);
    assert_eq!(r.fields["naming"], "ACME & Co");
    assert_eq!(r.fields["login"], "acme");
    assert_eq!(r.fields["password"], md5_hex("s3cret"));
    assert!(r.body.contains(SOAP12_NS));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soap11_with_bearer_token_sends_soapaction_and_no_login() {
    let db = TestDb::new().await;
    let m2m = M2mDouble::start("acme", "s3cret", "tok-123").await;
    let conf = profile(
        "default",
        &m2m.soap_url(),
        "token = \"tok-123\"\nsoap_version = \"1.1\"\nnaming = \"ACME\"",
    );
    let (_tc, daemon) = start(&db, &conf);
    let c = db.client().await;
    let id = send(&c, "m2m.agent", "default", "89001234567", "hello").await;
    wait_state(&c, id, "submitted", WAIT).await;

    assert_eq!(provider_id(&c, id).await.0.as_deref(), Some("1000000001"));
    let r = &m2m.requests()[0];
    assert_eq!(r.binding, "1.1");
    assert_eq!(r.headers["content-type"], "text/xml; charset=utf-8");
    assert_eq!(r.headers["soapaction"], format!("\"{M2M_NS}/SendMessage\""));
    assert_eq!(r.headers["authorization"], "Bearer tok-123");
    assert_eq!(r.fields["msid"], "79001234567");
    assert!(!r.fields.contains_key("login") && !r.fields.contains_key("password"));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_faults_fail_after_one_attempt_with_a_stable_code() {
    let db = TestDb::new().await;
    let m2m = M2mDouble::start("acme", "s3cret", "tok").await;
    m2m.always_fault("79000000001", "NO_SUCH_SUBSCRIBER");
    m2m.always_fault("79000000002", "MSID_IS_IN_BLACKLIST");
    m2m.queue("79000000004", &[Trouble::Fault("ACCOUNT_IS_BLOCKED")]);
    let conf = [
        profile(
            "default",
            &m2m.soap_url(),
            "login = \"acme\"\npassword = \"s3cret\"\nsoap_version = \"1.1\"",
        ),
        profile(
            "wrong",
            &m2m.soap_url(),
            "login = \"acme\"\npassword = \"nope\"",
        ),
    ]
    .join("\n");
    let (_tc, daemon) = start(&db, &conf);
    let c = db.client().await;
    let cases = [
        ("default", "79000000001", "m2m-no-such-subscriber"),
        ("default", "79000000002", "m2m-msid-is-in-blacklist"),
        ("wrong", "79000000003", "m2m-incorrect-password"),
        ("default", "79000000004", "m2m-account-is-blocked"),
    ];
    let mut ids = Vec::new();
    for (p, msid, _) in cases {
        ids.push(send(&c, "m2m.agent", p, msid, "hi").await);
    }
    for (id, (_, _, code)) in ids.iter().zip(cases) {
        wait_state(&c, *id, "failed", WAIT).await;
        assert_eq!(
            attempts(&c, *id).await,
            vec![(1, "failed".into(), Some(code.into()), Some(500))],
            "{code}"
        );
    }
    // One request each: nothing was retried.
    assert_eq!(m2m.count(), cases.len());
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_failure_5xx_and_network_errors_are_retried() {
    let db = TestDb::new().await;
    let m2m = M2mDouble::start("acme", "s3cret", "tok").await;
    m2m.queue(
        "79001234567",
        &[Trouble::Fault("SYSTEM_FAILURE"), Trouble::Status(503)],
    );
    // A port nobody listens on: bind one, then let it go.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let conf = [
        profile("default", &m2m.soap_url(), "token = \"tok\""),
        profile(
            "down",
            &format!("http://{closed}/m2m/m2m_api.asmx"),
            "token = \"tok\"\nmax_attempts = 2",
        ),
    ]
    .join("\n");
    let (_tc, daemon) = start(&db, &conf);
    let c = db.client().await;
    let id = send(&c, "m2m.agent", "default", "79001234567", "retry me").await;
    let down = send(&c, "m2m.agent", "down", "79001234567", "nobody home").await;
    wait_state(&c, id, "submitted", WAIT).await;
    assert_eq!(
        attempts(&c, id).await,
        vec![
            (
                1,
                "retry".into(),
                Some("m2m-system-failure".into()),
                Some(500)
            ),
            (2, "retry".into(), Some("http-503".into()), Some(503)),
            (3, "done".into(), None, Some(200)),
        ]
    );
    assert_eq!(provider_id(&c, id).await.0.as_deref(), Some("1000000001"));
    assert_eq!(m2m.count(), 3);

    wait_state(&c, down, "failed", WAIT).await;
    let a = attempts(&c, down).await;
    assert_eq!(a.len(), 2, "{a:?}");
    assert_eq!(a[0].1, "retry");
    assert_eq!(a[0].2.as_deref(), Some("connect"));
    assert_eq!(a[1].1, "failed");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prebuilt_envelopes_are_posted_byte_for_byte() {
    let db = TestDb::new().await;
    let m2m = M2mDouble::start("acme", "s3cret", "tok").await;
    // As Apostol v1 renders it in the database: SOAP 1.2, indented, a comment, an escaped text.
    let env12 = format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<!-- rendered by the database -->\n\
         <soap12:Envelope xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" \
         xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\" xmlns:soap12=\"{SOAP12_NS}\">\n  \
         <soap12:Body>\n    <SendMessage xmlns=\"{M2M_NS}\">\n      <msid>79001112233</msid>\n      \
         <message>Pre-built &amp; kept   as is</message>\n      <naming>ACME</naming>\n    \
         </SendMessage>\n  </soap12:Body>\n</soap12:Envelope>\n"
    );
    // SOAP 1.1 with old-style credentials inside, while the profile says 1.2: the envelope decides.
    let env11 = format!(
        "<soap:Envelope xmlns:soap=\"{SOAP11_NS}\"><soap:Body><SendMessage xmlns=\"{M2M_NS}\">\
         <msid>79004445566</msid><message>one-one</message><naming>ACME</naming>\
         <login>acme</login><password>{}</password></SendMessage></soap:Body></soap:Envelope>",
        md5_hex("s3cret")
    );
    let conf = [
        profile("bearer", &m2m.soap_url(), "token = \"tok\""),
        profile(
            "login",
            &m2m.soap_url(),
            "login = \"acme\"\npassword = \"s3cret\"\nsoap_version = \"1.2\"",
        ),
    ]
    .join("\n");
    let (_tc, daemon) = start(&db, &conf);
    let c = db.client().await;
    let a = send(&c, "m2m.agent", "bearer", "79001112233", &env12).await;
    wait_state(&c, a, "submitted", WAIT).await;
    let b = send(&c, "m2m.agent", "login", "79004445566", &env11).await;
    wait_state(&c, b, "submitted", WAIT).await;

    let reqs = m2m.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].body.as_bytes(), env12.as_bytes());
    assert_eq!(reqs[0].binding, "1.2");
    assert_eq!(reqs[0].headers["authorization"], "Bearer tok");
    assert_eq!(reqs[0].fields["message"], "Pre-built & kept   as is");
    assert_eq!(reqs[1].body.as_bytes(), env11.as_bytes());
    assert_eq!(reqs[1].binding, "1.1");
    assert_eq!(
        reqs[1].headers["soapaction"],
        format!("\"{M2M_NS}/SendMessage\"")
    );
    assert!(!reqs[1].headers.contains_key("authorization"));
    assert_eq!(provider_id(&c, a).await.0.as_deref(), Some("1000000001"));
    assert_eq!(provider_id(&c, b).await.0.as_deref(), Some("1000000002"));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_phone_or_text_fails_without_calling_the_provider() {
    let db = TestDb::new().await;
    let m2m = M2mDouble::start("acme", "s3cret", "tok").await;
    let conf = profile("default", &m2m.soap_url(), "token = \"tok\"");
    let (_tc, daemon) = start(&db, &conf);
    let c = db.client().await;
    let long = "я".repeat(1001);
    let broken = format!("<soap:Envelope xmlns:soap=\"{SOAP11_NS}\"><soap:Body>");
    let cases = [
        ("not a phone", "hi", "bad-address"),
        ("+7 900 123", "hi", "bad-address"),
        ("", "hi", "bad-address"),
        ("79001234567", long.as_str(), "bad-content"),
        ("79001234567", "   ", "bad-content"),
        ("79001234567", broken.as_str(), "bad-content"),
    ];
    let mut ids = Vec::new();
    for (address, content, _) in cases {
        ids.push(send(&c, "m2m.agent", "default", address, content).await);
    }
    for (id, (address, _, code)) in ids.iter().zip(cases) {
        wait_state(&c, *id, "failed", WAIT).await;
        assert_eq!(
            attempts(&c, *id).await,
            vec![(1, "failed".into(), Some(code.into()), None)],
            "{address}"
        );
    }
    assert_eq!(m2m.count(), 0);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn omnichannel_posts_the_documented_json_with_a_basic_token() {
    let db = TestDb::new().await;
    let m2m = M2mDouble::start("acme", "s3cret", "omni-token").await;
    let conf = [
        profile(
            "default",
            &m2m.omnichannel_url(),
            "api = \"omnichannel\"\ntoken = \"omni-token\"\nnaming = \"ACME\"",
        ),
        profile(
            "wrong",
            &m2m.omnichannel_url(),
            "api = \"omnichannel\"\ntoken = \"stale\"\nnaming = \"ACME\"",
        ),
    ]
    .join("\n");
    let (_tc, daemon) = start(&db, &conf);
    let c = db.client().await;
    let id = send(
        &c,
        "m2m.agent",
        "default",
        "8 (900) 765-43-21",
        "Ваш код: 42",
    )
    .await;
    wait_state(&c, id, "submitted", WAIT).await;
    assert_eq!(
        provider_id(&c, id).await.0.as_deref(),
        Some("omni-1000000001")
    );
    let r = &m2m.requests()[0];
    assert_eq!(r.binding, "json");
    assert_eq!(r.headers["authorization"], "Basic omni-token");
    let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({
            "options": {"from": {"sms_address": "ACME"}},
            "messages": [{"to": [{"msisdn": "79007654321"}], "content": {"short_text": "Ваш код: 42"}}],
        })
    );

    let bad = send(&c, "m2m.agent", "wrong", "79007654321", "x").await;
    wait_state(&c, bad, "failed", WAIT).await;
    assert_eq!(
        attempts(&c, bad).await,
        vec![(1, "failed".into(), Some("http-401".into()), Some(401))]
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_follow_a_redirect_to_another_origin() {
    let db = TestDb::new().await;
    let m2m = M2mDouble::start("acme", "s3cret", "tok-m2m").await;
    // The profile's endpoint answers 307 to the real service on another port.
    let (moved, hits, _r) = common::api::redirector(&m2m.base).await;
    let conf = format!(
        "{}{}",
        profile(
            "login",
            &format!("{moved}/m2m/m2m_api.asmx"),
            "login = \"acme\"\npassword = \"s3cret\"\nmax_attempts = 1"
        ),
        profile(
            "bearer",
            &format!("{moved}/m2m/m2m_api.asmx"),
            "token = \"tok-m2m\"\nmax_attempts = 1"
        )
    );
    let (_tc, daemon) = start(&db, &conf);
    let c = db.client().await;
    let a = send(&c, "m2m.agent", "login", "79001234567", "hello").await;
    let b = send(&c, "m2m.agent", "bearer", "79001234567", "hello").await;
    for id in [a, b] {
        wait_state(&c, id, "failed", WAIT).await;
        assert_eq!(
            attempts(&c, id).await,
            [(1, "failed".into(), Some("redirect-denied".into()), None)]
        );
    }
    daemon.stop().await;
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(m2m.count(), 0, "nothing reached the other origin");
}
