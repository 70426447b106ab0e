//! No secret ever leaves: one daemon with a distinct secret in every connector kind and every
//! secret-bearing key (main file, http, smtp, fcm, m2m, sba; file has none, so its secret is in a
//! broken file), deliveries that fail in every way (connection refused, TLS error, 401 and 5xx
//! whose bodies echo the request, a token endpoint that echoes the form, a success whose reply
//! echoes the request), then broken profile files and a HUP. The captured log (DEBUG, every
//! crate), `outbox.attempts`, inbox replies, `outboxd status`, `check-config` and configuration
//! errors are then searched for every secret.
mod common;
#[allow(dead_code)]
#[path = "common/fcm.rs"]
mod fcm_double;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::IntoResponse;
use base64::Engine as _;
use common::*;
use outboxd::config::Secret;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(30);

/// Where the log lines go: a buffer the test reads.
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

/// Installs the capturing subscriber (before the harness installs its own): DEBUG for every crate,
/// `log` records (reqwest, hyper) included.
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

fn log_text() -> String {
    String::from_utf8_lossy(&logs().0.lock().unwrap()).into_owned()
}

/// A server that answers with the request echoed, as careless providers do: the status comes from
/// the path (`/s401…` → 401, `/s500…` → 500, else 200), the body repeats the credentials it got.
async fn echo_server() -> (String, Arc<tokio::sync::oneshot::Sender<()>>) {
    async fn echo(uri: Uri, headers: HeaderMap, body: String) -> axum::response::Response {
        let h = |n: &str| {
            headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        let tail: String = {
            let chars: Vec<char> = body.chars().collect();
            chars[chars.len().saturating_sub(200)..].iter().collect()
        };
        let text = format!(
            "auth={} key={} uri={} tail={tail} body={body}",
            h("authorization"),
            h("x-api-key"),
            uri
        );
        let status = if uri.path().starts_with("/s401") {
            StatusCode::UNAUTHORIZED
        } else if uri.path().starts_with("/s500") {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::OK
        };
        (status, text).into_response()
    }
    serve(axum::Router::new().fallback(echo)).await
}

/// A port nothing listens on.
async fn closed_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

/// A PEM RSA private key and one of its base64 lines (what a leak would show).
fn rsa_key() -> (String, String) {
    use rsa::pkcs8::{EncodePrivateKey, LineEnding};
    let key = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
    let pem = key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
    let line = pem.lines().nth(5).unwrap().to_string();
    (pem, line)
}

fn service_account(pem: &str, token_uri: &str) -> String {
    serde_json::json!({
        "type": "service_account",
        "project_id": "secrets-test",
        "private_key_id": "kid-1",
        "private_key": pem,
        "client_email": "outboxd@secrets-test.iam.gserviceaccount.com",
        "token_uri": token_uri,
    })
    .to_string()
}

fn md5_hex(s: &str) -> String {
    use md5::{Digest, Md5};
    Md5::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Every place a secret could surface, by name.
struct Places(Vec<(String, String)>);

impl Places {
    fn add(&mut self, place: impl Into<String>, text: impl Into<String>) {
        self.0.push((place.into(), text.into()));
    }

    /// Every (secret name, place, excerpt) where a secret shows.
    fn leaks(&self, secrets: &[(&str, String)]) -> Vec<String> {
        let mut out = Vec::new();
        for (name, value) in secrets {
            for (place, text) in &self.0 {
                if let Some(i) = text.find(value.as_str()) {
                    let from = text[..i].char_indices().rev().nth(80).map_or(0, |(j, _)| j);
                    let to = (i + value.len() + 40).min(text.len());
                    let to = (to..=text.len())
                        .find(|j| text.is_char_boundary(*j))
                        .unwrap();
                    out.push(format!("{name} in {place}: …{}…", &text[from..to]));
                }
            }
        }
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_logs_attempts_replies_status_or_config_errors() {
    logs();
    let db = TestDb::new().await;
    let (echo, _echo) = echo_server().await;
    let closed = closed_port().await;
    let plain_port: u16 = echo.rsplit(':').next().unwrap().parse().unwrap();
    let (fcm_pem, fcm_line) = rsa_key();
    // Issuers of real access tokens, for APIs that echo the bearer token back.
    let ts_secret = format!("Sxtsbasic{}", &Uuid::new_v4().simple().to_string()[..10]);
    let ts = common::api::TokenServer::start("outboxd", &ts_secret, None, None).await;
    let fcm_double = fcm_double::FcmDouble::start().await;

    let s = |name: &str| format!("Sx{name}{}", &Uuid::new_v4().simple().to_string()[..10]);
    let db_password = s("dbquery");
    let listen_password = s("listen");
    let bot = format!("123456:{}", s("bot"));
    let query_token = s("qtoken");
    let http_token = s("httptoken");
    let hook_path = s("hookpath");
    let signing_raw = s("signing");
    let signing_b64 = base64::engine::general_purpose::STANDARD.encode(&signing_raw);
    let wecom_key = s("wecomkey");
    let api_key = s("apikey");
    let token_file_value = s("tokenfile");
    let client_secret = s("client");
    let reply_token = s("reply");
    let sba_password = s("sbapw");
    let sba_token = s("sbatoken");
    let m2m_token = s("m2mtoken");
    let m2m_password = s("m2mpw");
    let smtp_password = s("smtppw");
    let bad_line = s("badline");
    let wrong_type = s("wrongtype");
    let file_line = s("fileline");
    let variant = s("variant");
    let duration = s("duration");
    let m2m_line = s("m2mline");
    let main_line = s("mainline");
    let main_type = s("maintype");

    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("http.token");
    std::fs::write(&token_file, format!("{token_file_value}\n")).unwrap();
    std::env::set_var("OUTBOXD_SECRETS_TEST_CLIENT", &client_secret);
    std::env::set_var("OUTBOXD_SECRETS_TEST_M2M", &m2m_password);
    std::fs::create_dir(dir.path().join("echoed")).unwrap();
    let fcm_echoed_key = fcm_double.write_key(&dir.path().join("echoed"));
    let fcm_key_file = dir.path().join("sa.json");
    std::fs::write(
        &fcm_key_file,
        service_account(&fcm_pem, &format!("{echo}/s401/token")),
    )
    .unwrap();

    let common = "max_attempts = 1\ntimeout = \"5s\"\n";
    let http = format!(
        "[refused]\nurl = \"http://127.0.0.1:{closed}/bot{bot}/send?access_token={query_token}&lang=en\"\n\
         token = \"{http_token}\"\n{common}\n\
         [tls]\nurl = \"https://127.0.0.1:{plain_port}/hooks/{hook_path}\"\nurl_secret = true\n\
         signing_secret = \"whsec_{signing_b64}\"\n{common}\n\
         [unauthorized]\nurl = \"{echo}/s401/cgi-bin/webhook/send?key={wecom_key}\"\n\
         token_file = \"{}\"\nheaders = {{ \"X-Api-Key\" = \"{api_key}\" }}\n{common}\n\
         [oauth]\nurl = \"{echo}/s500/api\"\n{common}\n\
         [oauth.oauth2]\ntoken_url = \"{echo}/s401/oauth/token\"\nclient_id = \"outboxd\"\n\
         client_secret_env = \"OUTBOXD_SECRETS_TEST_CLIENT\"\nclient_auth = \"form\"\n\n\
         [reply]\nurl = \"{echo}/ok\"\ntoken = \"{reply_token}\"\n{common}\n\
         [bearer]\nurl = \"{echo}/s401/api\"\n{common}\n\
         [bearer.oauth2]\ntoken_url = \"{}\"\nclient_id = \"outboxd\"\nclient_secret = \"{ts_secret}\"\n",
        path_str(&token_file),
        ts.token_url()
    );
    let sba = format!(
        "[default]\nbase_url = \"{echo}/s500\"\nuser_name = \"shop\"\npassword = \"{sba_password}\"\n\
         return_url = \"https://shop.example/ok\"\n{common}\n\
         [tls]\nbase_url = \"https://127.0.0.1:{plain_port}\"\ntoken = \"{sba_token}\"\n\
         return_url = \"https://shop.example/ok\"\n{common}\n"
    );
    let m2m = format!(
        "[default]\nurl = \"{echo}/s401/m2m\"\ntoken = \"{m2m_token}\"\n{common}\n\
         [login]\nurl = \"{echo}/s500/m2m\"\nlogin = \"acme\"\npassword_env = \"OUTBOXD_SECRETS_TEST_M2M\"\n{common}\n"
    );
    let fcm = format!(
        "[default]\nservice_account = '{}'\nendpoint = \"{echo}/s500\"\n{common}\n\
         [denied]\nservice_account_file = \"{}\"\nendpoint = \"{echo}/s500\"\n{common}\n\
         [echoed]\nservice_account_file = \"{}\"\nendpoint = \"{echo}/s401\"\n{common}\n",
        service_account(&fcm_pem, &format!("http://127.0.0.1:{closed}/token")),
        path_str(&fcm_key_file),
        path_str(&fcm_echoed_key)
    );
    let smtp = format!(
        "[default]\nhost = \"127.0.0.1\"\nport = {closed}\ntls = \"tls\"\nusername = \"mailer\"\n\
         password = \"{smtp_password}\"\nfrom = \"outboxd@example.org\"\n{common}\n\
         [tls]\nhost = \"127.0.0.1\"\nport = {plain_port}\ntls = \"tls\"\nusername = \"mailer\"\n\
         password = \"{smtp_password}\"\nfrom = \"outboxd@example.org\"\n{common}\n"
    );
    let file = format!(
        "[default]\npath = \"{}\"\n",
        path_str(&dir.path().join("spool.jsonl"))
    );
    let mut tc = TestConfig::new(
        &db,
        &[
            ("http", &http),
            ("sba", &sba),
            ("m2m", &m2m),
            ("fcm", &fcm),
            ("smtp", &smtp),
            ("file", &file),
        ],
    );
    // A password in the query of database_url and in the user info of listen_url (trust auth
    // ignores both).
    tc.config.database_url = Secret::new(format!("{}?password={db_password}", db.url));
    let mut listen = url::Url::parse(&db.url).unwrap();
    listen.set_password(Some(&listen_password)).unwrap();
    tc.config.listen_url = Some(Secret::new(listen.to_string()));
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;

    let form = "amount=100&description=order";
    let fcm_body = r#"{"message":{"data":{"k":"v"}}}"#;
    let sends = [
        ("http.agent", "refused", "", "{}"),
        ("http.agent", "tls", "", "{}"),
        ("http.agent", "unauthorized", "", "{}"),
        ("http.agent", "oauth", "/x", "{}"),
        ("sba.agent", "default", "", form),
        ("sba.agent", "tls", "", form),
        ("m2m.agent", "default", "79001234567", "hello"),
        ("m2m.agent", "login", "79001234567", "hello"),
        ("fcm.agent", "default", "device-1", fcm_body),
        ("fcm.agent", "denied", "device-1", fcm_body),
        ("fcm.agent", "echoed", "device-1", fcm_body),
        ("smtp.agent", "default", "to@example.org", "hello"),
        ("smtp.agent", "tls", "to@example.org", "hello"),
        ("http.agent", "bearer", "/x", "{}"),
    ];
    let mut ids = Vec::new();
    for (agent, profile, address, content) in sends {
        ids.push((
            profile,
            agent,
            send(&c, agent, profile, address, content).await,
        ));
    }
    let reply = send(&c, "http.agent", "reply", "/echo", "{}").await;
    for (profile, agent, id) in &ids {
        wait_for(WAIT, &format!("{agent}/{profile} to fail"), || async {
            (state_of(&c, *id).await == "failed").then_some(())
        })
        .await;
    }
    wait_state(&c, reply, "submitted", WAIT).await;

    // Broken profile files, then HUP: every file's error is logged and the old profiles stay.
    let broken = [
        (
            "http",
            format!("{http}\n[bad]\nurl = \"http://x/\"\ntoken = \"{bad_line}\" trailing\n"),
        ),
        (
            "sba",
            format!(
                "{sba}\n[typed]\nmax_attempts = \"{wrong_type}\"\n[dur]\ntimeout = \"{duration}\"\n"
            ),
        ),
        (
            "file",
            format!("{file}\n[other]\npath = \"{file_line}\" x\n"),
        ),
        (
            "fcm",
            format!(
                "[default]\nservice_account = '{}' oops\n",
                service_account(&fcm_pem, "http://127.0.0.1:1/token")
            ),
        ),
        (
            "smtp",
            format!("{smtp}\n[variant]\nhost = \"h\"\ntls = \"{variant}\"\n"),
        ),
        (
            "m2m",
            format!("{m2m}\n[broken]\nlogin = \"acme\"\npassword = \"{m2m_line}\" x\n"),
        ),
    ];
    for (kind, text) in &broken {
        std::fs::write(tc.path(&format!("{kind}.conf")), text).unwrap();
    }
    daemon.controls.reload.notify_one();
    wait_for(
        WAIT,
        "the refused files and profiles in the log",
        || async { (log_text().matches("reload refused").count() > broken.len()).then_some(()) },
    )
    .await;
    let check = outboxd::ops::check_config(&tc.config).await;
    let status = outboxd::ops::status(&c).await.unwrap();
    daemon.stop().await;

    let mut places = Places(Vec::new());
    places.add("check-config", check.to_string());
    places.add("status", status.to_string());
    // Main-file errors: a syntax error on the line of a secret, a secret under a typed key.
    for (what, text) in [
        (
            "main syntax",
            format!("database_url = \"postgres://u:{main_line}@h/db\" x\n"),
        ),
        ("main type", format!("batch_size = \"{main_type}\"\n")),
    ] {
        let e =
            outboxd::config::Config::parse(&text, std::path::Path::new("outboxd.toml"), |_| None)
                .expect_err(what);
        assert!(
            e.to_string().contains("outboxd.toml"),
            "the error names the file: {e}"
        );
        places.add(format!("config error ({what})"), e.to_string());
    }
    for r in c
        .query(
            "SELECT message_id::text, error_code, error_text FROM outbox.attempts",
            &[],
        )
        .await
        .unwrap()
    {
        let (id, code, text): (String, Option<String>, Option<String>) =
            (r.get(0), r.get(1), r.get(2));
        places.add(
            format!("attempt of {id} ({})", code.unwrap_or_default()),
            text.unwrap_or_default(),
        );
    }
    let replies = c
        .query(
            "SELECT coalesce(content, '') FROM outbox.live_messages WHERE class = 'inbox'",
            &[],
        )
        .await
        .unwrap();
    assert!(!replies.is_empty(), "the reply profile stored its reply");
    for r in replies {
        places.add("inbox reply", r.get::<_, String>(0));
    }
    let log = log_text();
    places.add("log", log.clone());

    // The scenarios really happened (each kind of failure is in the attempts)…
    let codes: Vec<String> = c
        .query("SELECT DISTINCT error_code FROM outbox.attempts WHERE error_code IS NOT NULL ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for want in [
        "connect",
        "http-401",
        "http-500",
        "token-denied",
        "token-fetch",
        "token-invalid",
    ] {
        assert!(codes.iter().any(|c| c == want), "{want} in {codes:?}");
    }
    assert!(codes.iter().any(|c| c.starts_with("smtp-")), "{codes:?}");
    for name in [
        "http.conf",
        "sba.conf",
        "file.conf",
        "fcm.conf",
        "smtp.conf",
        "m2m.conf",
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains("reload refused") && l.contains(name)),
            "the refused {name} is logged with its name"
        );
    }
    assert!(log.contains("outboxd started"), "the start is logged");
    // …and the redacted texts still say what went wrong.
    assert!(
        log.contains("line ") && log.contains("column "),
        "syntax errors keep the line"
    );

    let secrets: Vec<(&str, String)> = vec![
        ("database_url ?password=", db_password),
        ("listen_url password", listen_password),
        ("http url /bot<token>/", bot),
        ("http url ?access_token=", query_token),
        ("http token", http_token),
        ("http url_secret path", hook_path),
        ("http signing_secret", signing_b64),
        ("http url ?key=", wecom_key),
        ("http headers X-Api-Key", api_key),
        ("http token_file", token_file_value),
        ("http oauth2 client_secret_env", client_secret),
        ("http token echoed in a reply", reply_token),
        ("sba password", sba_password),
        ("sba token", sba_token),
        ("m2m token", m2m_token),
        ("m2m password_env", m2m_password.clone()),
        ("m2m password (its MD5, sent)", md5_hex(&m2m_password)),
        ("smtp password", smtp_password),
        ("fcm private key", fcm_line),
        ("http.conf syntax error line", bad_line),
        ("sba.conf value of a typed key", wrong_type),
        ("file.conf syntax error line", file_line),
        ("smtp.conf enum value", variant),
        ("m2m.conf syntax error line", m2m_line),
        ("sba.conf duration value", duration),
        ("http oauth2 client_secret (basic)", ts_secret),
        ("main file syntax error line", main_line),
        ("main file value of a typed key", main_type),
    ];
    let mut leaks = places.leaks(&secrets);
    // Access tokens (the OAuth2 server's, FCM's) that APIs echoed back are not shown either.
    assert!(
        ts.hits() >= 2 && fcm_double.token_requests() >= 2,
        "tokens were issued"
    );
    for (place, text) in &places.0 {
        for (i, _) in text.match_indices("Bearer ") {
            if !text[i + 7..].starts_with("***") {
                let end = (i + 40..text.len().min(i + 60))
                    .find(|j| text.is_char_boundary(*j))
                    .unwrap_or(text.len());
                leaks.push(format!("an access token in {place}: {}", &text[i..end]));
            }
        }
    }
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
}
