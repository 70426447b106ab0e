//! Hardening of the generic http connector, end to end through the daemon: Standard Webhooks
//! signatures checked by the receiver, the host allowlist (absolute addresses, private targets,
//! redirects), and response bodies that are huge, endless or hold NUL bytes.
mod common;
use common::api::{Answer, Api};
use common::*;
use std::time::Duration;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(15);
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

async fn code_of(c: &tokio_postgres::Client, id: Uuid) -> String {
    c.query_one(
        "SELECT code FROM outbox.live_messages WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap()
    .get(0)
}

async fn error_text(c: &tokio_postgres::Client, id: Uuid) -> String {
    c.query_one(
        "SELECT error_text FROM outbox.attempts WHERE message_id = $1 ORDER BY id DESC LIMIT 1",
        &[&id],
    )
    .await
    .unwrap()
    .get(0)
}

async fn reply_of(c: &tokio_postgres::Client, id: Uuid) -> Option<String> {
    c.query_opt(
        "SELECT content FROM outbox.live_messages WHERE parent = $1 AND class = 'inbox'",
        &[&id],
    )
    .await
    .unwrap()
    .map(|r| r.get(0))
}

async fn failed_with(c: &tokio_postgres::Client, id: Uuid, code: &str) {
    wait_state(c, id, "failed", WAIT).await;
    let att = attempts(c, id).await;
    assert_eq!(att.len(), 1, "{att:?}");
    assert_eq!(att[0].2.as_deref(), Some(code), "{att:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_requests_verify_and_keep_their_webhook_id_across_a_retry() {
    let db = TestDb::new().await;
    let api = Api::start(None, Some(SECRET)).await;
    api.fail_next(1);
    let secret_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret_file.path(), format!("{SECRET}\n")).unwrap();
    let conf = http_conf(
        &api.url,
        &format!("signing_secret_file = \"{}\"", path_str(secret_file.path())),
    );
    let tc = TestConfig::new(&db, &[("http", &conf)]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let id = send(&c, "http.agent", "default", "/hook", "{\"event\":\"paid\"}").await;
    wait_state(&c, id, "submitted", WAIT).await;
    daemon.stop().await;

    let seen = api.seen();
    let statuses: Vec<u16> = seen.iter().map(|s| s.status).collect();
    assert_eq!(statuses, [503, 200], "a retry, then success");
    assert!(
        seen.iter().all(|s| s.signature_ok == Some(true)),
        "{seen:?}"
    );
    let code = code_of(&c, id).await;
    for s in &seen {
        assert_eq!(s.req.headers["webhook-id"], code);
        assert_eq!(s.req.headers["idempotency-key"], format!("\"{code}\""));
        assert!(s.req.headers["webhook-signature"].starts_with("v1,"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_signing_secret_is_refused_by_the_receiver() {
    // The receiver's check can fail: the same double refuses a signature made with another key.
    let db = TestDb::new().await;
    let api = Api::start(None, Some(SECRET)).await;
    let conf = http_conf(
        &api.url,
        "signing_secret = \"whsec_c2VjcmV0LWJ1dC1ub3QtdGhlLXJpZ2h0LW9uZQ==\"",
    );
    let tc = TestConfig::new(&db, &[("http", &conf)]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let id = send(&c, "http.agent", "default", "/hook", "{}").await;
    failed_with(&c, id, "http-400").await;
    daemon.stop().await;
    assert_eq!(api.seen()[0].signature_ok, Some(false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_addresses_to_private_hosts_are_denied_while_normal_messages_flow() {
    let db = TestDb::new().await;
    let api = Api::start(None, None).await;
    // Stands for an internal service the rows must not reach.
    let internal = Api::start(None, None).await;
    let p = internal.port();
    let conf = format!(
        "{}\n[strict]\nurl = \"{}\"\ntimeout = \"2s\"\n",
        http_conf(&api.url, "allow_absolute_address = true"),
        api.url
    );
    let tc = TestConfig::new(&db, &[("http", &conf)]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let denied = [
        // by the resolver, at connect time
        format!("http://localhost:{p}/admin"),
        // IP literals, before sending
        format!("http://[::1]:{p}/admin"),
        format!("http://[::ffff:127.0.0.2]:{p}/admin"),
        format!("http://127.1.2.3:{p}/admin"),
    ];
    let mut ids = Vec::new();
    for a in &denied {
        ids.push(send(&c, "http.agent", "default", a, "{}").await);
    }
    let ok = send(&c, "http.agent", "default", "/v1/ok", "{}").await;
    let ok_absolute = send(
        &c,
        "http.agent",
        "default",
        &format!("{}/v1/absolute", api.url),
        "{}",
    )
    .await;
    // Without allow_absolute_address an absolute address is refused outright.
    let strict = send(
        &c,
        "http.agent",
        "strict",
        &format!("{}/v1/x", api.url),
        "{}",
    )
    .await;
    for id in &ids {
        failed_with(&c, *id, "host-denied").await;
    }
    failed_with(&c, strict, "host-denied").await;
    wait_state(&c, ok, "submitted", WAIT).await;
    // The profile's own host is the operator's, however it is written.
    wait_state(&c, ok_absolute, "submitted", WAIT).await;
    daemon.stop().await;
    assert_eq!(internal.count(), 0, "nothing reached the internal service");
    let paths: Vec<String> = api.seen().iter().map(|s| s.req.path.clone()).collect();
    assert_eq!(paths.len(), 2);
    assert!(paths.contains(&"/v1/ok".to_string()) && paths.contains(&"/v1/absolute".into()));
    let why = error_text(&c, ids[0]).await;
    assert!(why.contains("localhost"), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allowlist_admits_listed_hosts_and_nothing_else() {
    let db = TestDb::new().await;
    let api = Api::start(None, None).await;
    let other = Api::start(None, None).await;
    let p = other.port();
    let conf = format!(
        "{}\n[cidr]\nurl = \"{}\"\nallow_absolute_address = true\nallowed_hosts = [\"127.0.0.0/8\"]\n",
        http_conf(
            &api.url,
            "allow_absolute_address = true\nallowed_hosts = [\"localhost\", \"*.corp.example\"]"
        ),
        api.url
    );
    let tc = TestConfig::new(&db, &[("http", &conf)]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let by_name = send(
        &c,
        "http.agent",
        "default",
        &format!("http://localhost:{p}/by-name"),
        "{}",
    )
    .await;
    let by_cidr = send(
        &c,
        "http.agent",
        "cidr",
        &format!("http://localhost:{p}/by-cidr"),
        "{}",
    )
    .await;
    // Not on the list (and loopback): refused without a connection.
    let unlisted = send(
        &c,
        "http.agent",
        "default",
        &format!("http://127.0.0.2:{p}/unlisted"),
        "{}",
    )
    .await;
    wait_state(&c, by_name, "submitted", WAIT).await;
    wait_state(&c, by_cidr, "submitted", WAIT).await;
    failed_with(&c, unlisted, "host-denied").await;
    daemon.stop().await;
    let mut paths: Vec<String> = other.seen().iter().map(|s| s.req.path.clone()).collect();
    paths.sort();
    assert_eq!(paths, ["/by-cidr", "/by-name"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_to_private_hosts_are_denied() {
    let db = TestDb::new().await;
    let api = Api::start(None, None).await;
    let internal = Api::start(None, None).await;
    let p = internal.port();
    let conf = http_conf(&api.url, "");
    let tc = TestConfig::new(&db, &[("http", &conf)]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    for target in [
        format!("http://localhost:{p}/admin"),
        format!("http://[::1]:{p}/admin"),
    ] {
        api.set_answer(Answer::Redirect {
            from: "/moved".into(),
            to: target,
        });
        let id = send(&c, "http.agent", "default", "/moved", "{}").await;
        failed_with(&c, id, "host-denied").await;
    }
    // A redirect within the profile's host is followed.
    api.set_answer(Answer::Redirect {
        from: "/moved".into(),
        to: format!("{}/new", api.url),
    });
    let id = send(&c, "http.agent", "default", "/moved", "{}").await;
    wait_state(&c, id, "submitted", WAIT).await;
    assert_eq!(api.seen().last().unwrap().req.path, "/new");
    daemon.stop().await;
    assert_eq!(internal.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_endless_and_nul_bodies_are_stored_truncated() {
    let db = TestDb::new().await;
    let api = Api::start(None, None).await;
    let conf = http_conf(&api.url, "max_response_bytes = 1000\nmax_attempts = 1");
    let tc = TestConfig::new(&db, &[("http", &conf)]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;

    // 10 MB success body: the reply keeps max_response_bytes.
    api.set_answer(Answer::Big {
        status: 200,
        bytes: 10 * 1024 * 1024,
    });
    let big_ok = send(&c, "http.agent", "default", "/big", "{}").await;
    wait_state(&c, big_ok, "submitted", WAIT).await;
    let reply = reply_of(&c, big_ok).await.expect("a reply");
    assert_eq!(reply.len(), 1000);

    // 10 MB error body: the error text is short.
    api.set_answer(Answer::Big {
        status: 500,
        bytes: 10 * 1024 * 1024,
    });
    let big_err = send(&c, "http.agent", "default", "/big", "{}").await;
    failed_with(&c, big_err, "http-500").await;
    let text = error_text(&c, big_err).await;
    assert!(
        text.starts_with("HTTP 500: xxx") && text.len() <= 300,
        "{}",
        text.len()
    );

    // A body that never ends is not read to its end (the delivery completes).
    api.set_answer(Answer::Endless);
    let endless = send(&c, "http.agent", "default", "/endless", "{}").await;
    wait_state(&c, endless, "submitted", WAIT).await;
    assert_eq!(reply_of(&c, endless).await.unwrap().len(), 1000);

    // NUL bytes cannot go into PostgreSQL text: they are replaced, the outcome is recorded.
    api.set_answer(Answer::Nul);
    let nul = send(&c, "http.agent", "default", "/nul", "{}").await;
    wait_state(&c, nul, "submitted", WAIT).await;
    assert_eq!(reply_of(&c, nul).await.unwrap(), "a\u{FFFD}b");
    daemon.stop().await;
}

/// Enqueues a message whose subject (the method) and content (maybe NULL) are given.
async fn send_method(
    c: &tokio_postgres::Client,
    address: &str,
    method: &str,
    content: Option<&str>,
) -> Uuid {
    c.query_one(
        "SELECT id FROM api.send_message(NULL, 'http.agent'::text, 'default', $1, $2, $3)",
        &[&address, &method, &content],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_delete_without_content_need_no_json() {
    let db = TestDb::new().await;
    let api = Api::start(None, None).await;
    // A JSON profile (the default content type), so a POST's body must be JSON.
    let tc = TestConfig::new(&db, &[("http", &http_conf(&api.url, "max_attempts = 1"))]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let get_null = send_method(&c, "/items/1", "GET", None).await;
    let get_empty = send_method(&c, "/items/2", "GET", Some("")).await;
    let delete_null = send_method(&c, "/items/3", "DELETE", None).await;
    let delete_empty = send_method(&c, "/items/4", "DELETE", Some("")).await;
    // A POST still needs JSON.
    let post_empty = send_method(&c, "/items", "POST", Some("")).await;
    for id in [get_null, get_empty, delete_null, delete_empty] {
        wait_state(&c, id, "submitted", WAIT).await;
    }
    failed_with(&c, post_empty, "bad-content").await;
    daemon.stop().await;
    let mut seen: Vec<(String, String, String, Option<String>)> = api
        .seen()
        .iter()
        .map(|s| {
            (
                s.req.method.clone(),
                s.req.path.clone(),
                s.req.body.clone(),
                s.req.headers.get("content-type").cloned(),
            )
        })
        .collect();
    seen.sort();
    let want = |m: &str, p: &str| (m.to_string(), p.to_string(), String::new(), None);
    assert_eq!(
        seen,
        [
            want("DELETE", "/items/3"),
            want("DELETE", "/items/4"),
            want("GET", "/items/1"),
            want("GET", "/items/2"),
        ],
        "bodiless requests, without a Content-Type"
    );
}

/// What of the profile's credentials a request carried.
fn credentials_in(s: &common::api::Seen) -> Vec<&'static str> {
    let h = &s.req.headers;
    let mut out = Vec::new();
    if h.contains_key("authorization") {
        out.push("authorization");
    }
    if h.contains_key("x-api-key") {
        out.push("x-api-key");
    }
    if h.contains_key("webhook-signature") {
        out.push("webhook-signature");
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_go_only_to_the_profiles_origin_unless_it_opts_in() {
    let db = TestDb::new().await;
    let own = Api::start(None, Some(SECRET)).await;
    // Another origin: the same 127.0.0.1, another port.
    let other = Api::start(None, None).await;
    let creds = format!(
        "allow_absolute_address = true\ntoken = \"static-token-1\"\nsigning_secret = \"{SECRET}\"\n\
         headers = {{ \"X-Api-Key\" = \"key-1\" }}\n"
    );
    let conf = format!(
        "{}\n[optin]\nurl = \"{}\"\nmax_attempts = 1\n{creds}credential_hosts = [\"127.0.0.1:{}\"]\n",
        http_conf(&own.url, &format!("max_attempts = 1\n{creds}")),
        own.url,
        other.port()
    );
    let tc = TestConfig::new(&db, &[("http", &conf)]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;

    // An absolute address on another origin goes without the credentials…
    let abs = send(
        &c,
        "http.agent",
        "default",
        &format!("{}/abs", other.url),
        "{}",
    )
    .await;
    wait_state(&c, abs, "submitted", WAIT).await;
    // …and a redirect from the profile's origin to another is not followed with them.
    own.set_answer(Answer::Redirect {
        from: "/moved".into(),
        to: format!("{}/landing", other.url),
    });
    let moved = send(&c, "http.agent", "default", "/moved", "{}").await;
    failed_with(&c, moved, "redirect-denied").await;
    let why = error_text(&c, moved).await;
    assert!(!why.contains("landing"), "no path in the error: {why}");
    let seen = other.seen();
    assert_eq!(
        seen.len(),
        1,
        "only the absolute request reached it: {seen:?}"
    );
    assert_eq!(seen[0].req.path, "/abs");
    assert_eq!(credentials_in(&seen[0]), Vec::<&str>::new(), "{seen:?}");
    // The profile's own origin gets them all (and the signature checks out).
    let mine = own.seen();
    assert_eq!(mine.len(), 1);
    assert_eq!(
        credentials_in(&mine[0]),
        ["authorization", "x-api-key", "webhook-signature"]
    );
    assert_eq!(mine[0].signature_ok, Some(true));

    // A profile that lists the other origin in credential_hosts sends them there, and follows
    // the redirect.
    let abs = send(
        &c,
        "http.agent",
        "optin",
        &format!("{}/abs2", other.url),
        "{}",
    )
    .await;
    wait_state(&c, abs, "submitted", WAIT).await;
    let moved = send(&c, "http.agent", "optin", "/moved", "{}").await;
    wait_state(&c, moved, "submitted", WAIT).await;
    daemon.stop().await;
    let seen = other.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(seen[1].req.path, "/abs2");
    assert_eq!(seen[2].req.path, "/landing");
    assert_eq!(
        seen[1].req.headers.get("authorization").map(String::as_str),
        Some("Bearer static-token-1")
    );
    // (reqwest itself drops Authorization when a redirect changes host or port.)
    for s in &seen[1..] {
        assert_eq!(s.req.headers["x-api-key"], "key-1");
        assert!(s.req.headers.contains_key("webhook-signature"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_without_credentials_still_follows_redirects_to_other_origins() {
    let db = TestDb::new().await;
    let own = Api::start(None, None).await;
    let other = Api::start(None, None).await;
    own.set_answer(Answer::Redirect {
        from: "/moved".into(),
        to: format!("{}/landing", other.url),
    });
    let tc = TestConfig::new(&db, &[("http", &http_conf(&own.url, "max_attempts = 1"))]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let id = send(&c, "http.agent", "default", "/moved", "{}").await;
    wait_state(&c, id, "submitted", WAIT).await;
    daemon.stop().await;
    assert_eq!(other.seen()[0].req.path, "/landing");
}
