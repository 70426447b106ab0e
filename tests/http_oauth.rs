//! OAuth2-protected generic API profiles, end to end through the daemon: a local token endpoint
//! and an API that accepts only the endpoint's live tokens.
mod common;
use common::api::{reload_until_profile, Api, TokenMode, TokenServer};
use common::*;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);

/// A profile that gets its token from `ts` for `api`; `extra` goes into `[default.oauth2]`.
fn conf(api: &Api, ts: &TokenServer, extra: &str) -> String {
    format!(
        "[default]\nurl = \"{}\"\nretry = [\"20ms\", \"20ms\", \"20ms\"]\ntimeout = \"5s\"\n\n\
         [default.oauth2]\ntoken_url = \"{}\"\nclient_id = \"outboxd client\"\n\
         scopes = [\"send:messages\", \"read:status\"]\naudience = \"https://api.test\"\n{extra}\n",
        api.url,
        ts.token_url()
    )
}

fn bearer(s: &common::api::Seen) -> String {
    s.req
        .headers
        .get("authorization")
        .cloned()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_with_a_client_credentials_token_and_reuses_it() {
    let db = TestDb::new().await;
    let ts = TokenServer::start(
        "outboxd client",
        "s3:cr&t",
        Some("send:messages read:status"),
        Some("https://api.test"),
    )
    .await;
    let api = Api::start(Some(&ts), None).await;
    let tc = TestConfig::new(
        &db,
        &[("http", &conf(&api, &ts, "client_secret = \"s3:cr&t\""))],
    );
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let a = send(&c, "http.agent", "default", "/v1/a", "{\"n\":1}").await;
    wait_state(&c, a, "submitted", WAIT).await;
    let b = send(&c, "http.agent", "default", "/v1/b", "{\"n\":2}").await;
    wait_state(&c, b, "submitted", WAIT).await;
    daemon.stop().await;

    // One token, fetched with HTTP Basic client authentication (the crate's default), the
    // requested scopes and the audience as an extra parameter.
    let reqs = ts.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(reqs[0].client_auth, "basic");
    assert_eq!(reqs[0].form["grant_type"], "client_credentials");
    assert_eq!(reqs[0].form["audience"], "https://api.test");
    let seen = api.seen();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|s| s.status == 200));
    assert!(bearer(&seen[0]).starts_with("Bearer tok-1-"), "{seen:?}");
    assert_eq!(bearer(&seen[0]), bearer(&seen[1]));
    assert_eq!(seen[0].req.path, "/v1/a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn form_client_auth_with_the_secret_from_a_file() {
    let db = TestDb::new().await;
    let ts = TokenServer::start(
        "outboxd client",
        "from-file",
        Some("send:messages read:status"),
        Some("https://api.test"),
    )
    .await;
    let api = Api::start(Some(&ts), None).await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client.secret");
    std::fs::write(&secret, "from-file\n").unwrap();
    let extra = format!(
        "client_secret_file = \"{}\"\nclient_auth = \"form\"",
        path_str(&secret)
    );
    let tc = TestConfig::new(&db, &[("http", &conf(&api, &ts, &extra))]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let id = send(&c, "http.agent", "default", "x", "{}").await;
    wait_state(&c, id, "submitted", WAIT).await;
    daemon.stop().await;
    let reqs = ts.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].client_auth, "form");
    assert_eq!(reqs[0].form["client_id"], "outboxd client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_refreshed_once_on_401_and_the_request_resent() {
    let db = TestDb::new().await;
    let ts = TokenServer::start(
        "outboxd client",
        "s",
        Some("send:messages read:status"),
        Some("https://api.test"),
    )
    .await;
    let api = Api::start(Some(&ts), None).await;
    let tc = TestConfig::new(&db, &[("http", &conf(&api, &ts, "client_secret = \"s\""))]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let first = send(&c, "http.agent", "default", "/one", "{}").await;
    wait_state(&c, first, "submitted", WAIT).await;
    assert_eq!(ts.hits(), 1);

    // The provider expires the cached token: the next request gets 401.
    ts.revoke_all();
    let second = send(&c, "http.agent", "default", "/two", "{}").await;
    wait_state(&c, second, "submitted", WAIT).await;
    daemon.stop().await;

    assert_eq!(ts.hits(), 2, "one refresh");
    let seen = api.seen();
    let statuses: Vec<u16> = seen.iter().map(|s| s.status).collect();
    assert_eq!(statuses, [200, 401, 200]);
    assert_eq!(
        bearer(&seen[0]),
        bearer(&seen[1]),
        "the stale token got the 401"
    );
    assert_ne!(
        bearer(&seen[1]),
        bearer(&seen[2]),
        "the resend carries a new token"
    );
    assert!(bearer(&seen[2]).starts_with("Bearer tok-2-"));
    // The refresh happened inside one attempt.
    let att = attempts(&c, second).await;
    assert_eq!(att.len(), 1, "{att:?}");
    assert_eq!(att[0].1, "done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_401_with_a_fresh_token_is_token_invalid() {
    let db = TestDb::new().await;
    let ts = TokenServer::start("id", "s", None, None).await;
    // The API knows another token server: every token is refused.
    let other = TokenServer::start("x", "y", None, None).await;
    let api = Api::start(Some(&other), None).await;
    let text = format!(
        "[default]\nurl = \"{}\"\nmax_attempts = 1\ntimeout = \"5s\"\n\
         [default.oauth2]\ntoken_url = \"{}\"\nclient_id = \"id\"\nclient_secret = \"s\"\n",
        api.url,
        ts.token_url()
    );
    let tc = TestConfig::new(&db, &[("http", &text)]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let id = send(&c, "http.agent", "default", "/", "{}").await;
    wait_state(&c, id, "failed", WAIT).await;
    daemon.stop().await;
    assert_eq!(
        attempts(&c, id).await,
        [(1, "failed".into(), Some("token-invalid".into()), Some(401))]
    );
    assert_eq!(ts.hits(), 2, "one fetch, one refresh, no more");
    assert_eq!(api.count(), 2, "sent, resent once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_messages_on_a_cold_cache_fetch_one_token() {
    let db = TestDb::new().await;
    let ts = TokenServer::start(
        "outboxd client",
        "s",
        Some("send:messages read:status"),
        Some("https://api.test"),
    )
    .await;
    // A slow token endpoint keeps every delivery waiting on the same fetch.
    ts.set_delay(Duration::from_millis(300));
    let api = Api::start(Some(&ts), None).await;
    let tc = TestConfig::new(&db, &[("http", &conf(&api, &ts, "client_secret = \"s\""))]);
    let c = db.client().await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(send(&c, "http.agent", "default", &format!("/m{i}"), "{}").await);
    }
    let daemon = Daemon::start(tc.config.clone());
    for id in &ids {
        wait_state(&c, *id, "submitted", WAIT).await;
    }
    daemon.stop().await;
    assert_eq!(ts.hits(), 1);
    assert_eq!(api.count(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_client_fails_the_message_as_token_denied() {
    let db = TestDb::new().await;
    let ts = TokenServer::start("id", "right", None, None).await;
    let api = Api::start(Some(&ts), None).await;
    let text = format!(
        "[default]\nurl = \"{}\"\nretry = [\"20ms\"]\ntimeout = \"5s\"\n\
         [default.oauth2]\ntoken_url = \"{}\"\nclient_id = \"id\"\nclient_secret = \"wrong\"\n",
        api.url,
        ts.token_url()
    );
    let tc = TestConfig::new(&db, &[("http", &text)]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let id = send(&c, "http.agent", "default", "/", "{}").await;
    wait_state(&c, id, "failed", WAIT).await;
    daemon.stop().await;
    assert_eq!(
        attempts(&c, id).await,
        [(1, "failed".into(), Some("token-denied".into()), None)]
    );
    let text: String = c
        .query_one(
            "SELECT error_text FROM outbox.attempts WHERE message_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(text.contains("invalid_client"), "{text}");
    assert!(
        !text.contains("wrong"),
        "the secret is not in the error: {text}"
    );
    assert_eq!(api.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_outage_retries_as_token_fetch() {
    let db = TestDb::new().await;
    let ts = TokenServer::start("id", "s", None, None).await;
    ts.set_mode(TokenMode::Fail(503));
    let api = Api::start(Some(&ts), None).await;
    let text = format!(
        "[default]\nurl = \"{}\"\nretry = [\"20ms\", \"20ms\", \"20ms\", \"20ms\"]\ntimeout = \"5s\"\n\
         [default.oauth2]\ntoken_url = \"{}\"\nclient_id = \"id\"\nclient_secret = \"s\"\n",
        api.url,
        ts.token_url()
    );
    let tc = TestConfig::new(&db, &[("http", &text)]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let id = send(&c, "http.agent", "default", "/", "{}").await;
    wait_for(WAIT, "a token-fetch retry", || async {
        attempts(&c, id).await.first().cloned()
    })
    .await;
    ts.set_mode(TokenMode::Issue);
    wait_state(&c, id, "submitted", WAIT).await;
    daemon.stop().await;
    let att = attempts(&c, id).await;
    assert_eq!(
        att[0],
        (1, "retry".into(), Some("token-fetch".into()), Some(503))
    );
    assert_eq!(att.last().unwrap().1, "done");
    assert_eq!(api.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_every_bounds_the_age_of_a_token() {
    let db = TestDb::new().await;
    let ts = TokenServer::start("id", "s", None, None).await;
    let api = Api::start(Some(&ts), None).await;
    let text = format!(
        "[default]\nurl = \"{}\"\ntimeout = \"5s\"\n\
         [default.oauth2]\ntoken_url = \"{}\"\nclient_id = \"id\"\nclient_secret_env = \"OUTBOXD_TEST_OAUTH_SECRET\"\n\
         refresh_every = \"0s\"\n",
        api.url,
        ts.token_url()
    );
    std::env::set_var("OUTBOXD_TEST_OAUTH_SECRET", "s");
    let tc = TestConfig::new(&db, &[("http", &text)]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    for i in 0..2 {
        let id = send(&c, "http.agent", "default", &format!("/{i}"), "{}").await;
        wait_state(&c, id, "submitted", WAIT).await;
    }
    daemon.stop().await;
    assert_eq!(ts.hits(), 2, "a token older than refresh_every is not used");
}

/// A profile `name` for `api` with the token from `ts` (client `id`, no scopes); `extra` goes into
/// the profile, `oauth` into its `oauth2` section.
fn profile(name: &str, api: &Api, ts: &TokenServer, extra: &str, oauth: &str) -> String {
    format!(
        "[{name}]\nurl = \"{}\"\nmax_attempts = 1\ntimeout = \"5s\"\n{extra}\n\
         [{name}.oauth2]\ntoken_url = \"{}\"\nclient_id = \"id\"\n{oauth}\n",
        api.url,
        ts.token_url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_that_differ_only_in_their_secret_or_client_auth_share_no_token() {
    let db = TestDb::new().await;
    let ts = TokenServer::start("id", "right", None, None).await;
    let api = Api::start(Some(&ts), None).await;
    // Same token_url, client_id and scopes: `a` and `b` differ in the secret, `a` and `c` in the
    // client authentication.
    let text = [
        profile("a", &api, &ts, "", "client_secret = \"right\""),
        profile("b", &api, &ts, "", "client_secret = \"wrong\""),
        profile(
            "c",
            &api,
            &ts,
            "",
            "client_secret = \"right\"\nclient_auth = \"form\"",
        ),
    ]
    .concat();
    let tc = TestConfig::new(&db, &[("http", &text)]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let a = send(&c, "http.agent", "a", "/a", "{}").await;
    wait_state(&c, a, "submitted", WAIT).await;
    let b = send(&c, "http.agent", "b", "/b", "{}").await;
    wait_state(&c, b, "failed", WAIT).await;
    let cc = send(&c, "http.agent", "c", "/c", "{}").await;
    wait_state(&c, cc, "submitted", WAIT).await;
    daemon.stop().await;
    assert_eq!(
        attempts(&c, b).await,
        [(1, "failed".into(), Some("token-denied".into()), None)],
        "b authenticates with its own (wrong) secret, not with a's token"
    );
    let auth: Vec<String> = ts
        .requests()
        .iter()
        .map(|r| r.client_auth.clone())
        .collect();
    assert_eq!(auth, ["basic", "basic", "form"], "one fetch per credential");
    let paths: Vec<String> = api.seen().iter().map(|s| s.req.path.clone()).collect();
    assert_eq!(paths, ["/a", "/c"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_client_and_signing_secrets_takes_effect_on_reload() {
    const K1: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const K2: &str = "whsec_c2Vjb25kIHNpZ25pbmcga2V5IGZvciBvdXRib3hk";
    let db = TestDb::new().await;
    let ts = TokenServer::start("id", "secret-one", None, None).await;
    let api = Api::start(Some(&ts), Some(K1)).await;
    let probe = Api::start(None, None).await;
    let conf = |secret: &str, key: &str, probe_profile: &str| {
        format!(
            "{}{probe_profile}",
            profile(
                "default",
                &api,
                &ts,
                &format!("signing_secret = \"{key}\""),
                &format!("client_secret = \"{secret}\"")
            )
        )
    };
    let tc = TestConfig::new(&db, &[("http", &conf("secret-one", K1, ""))]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let before = send(&c, "http.agent", "default", "/before", "{}").await;
    wait_state(&c, before, "submitted", WAIT).await;

    // The provider rotates both secrets (old tokens die with the old client secret); the
    // operator writes the new ones and sends HUP.
    ts.set_client_secret("secret-two");
    ts.revoke_all();
    api.set_signing_secret(K2);
    std::fs::write(
        tc.path("http.conf"),
        conf(
            "secret-two",
            K2,
            &format!("[probe]\nurl = \"{}\"\n", probe.url),
        ),
    )
    .unwrap();
    reload_until_profile(&daemon.controls, &c, "probe", WAIT).await;
    let after = send(&c, "http.agent", "default", "/after", "{}").await;
    wait_state(&c, after, "submitted", WAIT).await;
    daemon.stop().await;
    let reqs = ts.requests();
    assert_eq!(reqs.len(), 2, "one token per secret: {reqs:?}");
    let seen = api.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[1].req.path, "/after");
    assert_eq!(seen[1].status, 200);
    assert_eq!(seen[1].signature_ok, Some(true), "signed with the new key");
    assert!(bearer(&seen[1]).starts_with("Bearer tok-2-"), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_lived_token_is_reused_for_most_of_its_life() {
    let db = TestDb::new().await;
    let ts = TokenServer::start("id", "s", None, None).await;
    // 60 s: with a fixed 60 s refresh margin every message fetched a new token.
    ts.set_expires_in(60);
    let api = Api::start(Some(&ts), None).await;
    let text = profile("default", &api, &ts, "", "client_secret = \"s\"");
    let tc = TestConfig::new(&db, &[("http", &text)]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    for i in 0..5 {
        let id = send(&c, "http.agent", "default", &format!("/{i}"), "{}").await;
        wait_state(&c, id, "submitted", WAIT).await;
    }
    daemon.stop().await;
    assert_eq!(ts.hits(), 1, "one token for five messages");
    assert_eq!(api.count(), 5);
}
