//! End-to-end tests of the smtp connector: the daemon delivers to an in-process SMTP server
//! (tests/common/smtp.rs) and the received bytes are parsed back with mail-parser.

mod common;
#[path = "common/smtp.rs"]
mod smtp_server;

use std::time::Duration;

use common::*;
use mail_parser::{MessageParser, MimeHeaders};
use outboxd::connector::smtp::services;
use smtp_server::{ServerTls, SmtpBehaviour, SmtpServer};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(15);
const PROFILE: &str = "noreply@example.com";

/// An smtp.conf with one profile named like Apostol's (`<profile>@<domain>`), fast retries.
fn smtp_conf(server: &SmtpServer, extra: &str) -> String {
    format!(
        "[\"{PROFILE}\"]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n\
         retry = [\"20ms\"]\nmax_attempts = 3\ntimeout = \"5s\"\n{extra}\n",
        server.port
    )
}

async fn send_mail(
    c: &tokio_postgres::Client,
    profile: &str,
    address: &str,
    subject: &str,
    content: &str,
) -> Uuid {
    c.query_one(
        "SELECT id FROM api.send_message(NULL, 'smtp.agent', $1, $2, $3, $4)",
        &[&profile, &address, &subject, &content],
    )
    .await
    .unwrap()
    .get(0)
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

async fn last_error_code(c: &tokio_postgres::Client, id: Uuid) -> Option<String> {
    attempts(c, id).await.last().and_then(|a| a.2.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_message_is_delivered_with_utf8_subject_and_sender_name() {
    let server = SmtpServer::start(ServerTls::None, None).await;
    let db = TestDb::new().await;
    let conf = smtp_conf(&server, "from_name = \"Служба доставки\"");
    let tc = TestConfig::new(&db, &[("smtp", &conf)]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let id = send_mail(
        &c,
        PROFILE,
        "ivan@example.org",
        "Заказ №42 готов ✓",
        "Здравствуйте!\nВаш заказ готов.",
    )
    .await;
    wait_state(&c, id, "submitted", WAIT).await;

    assert_eq!(
        attempts(&c, id).await,
        vec![(1, "done".to_string(), None, Some(250))]
    );
    // The server's queue id from the reply to DATA.
    assert_eq!(provider_id(&c, id).await.as_deref(), Some("Q1"));
    let mails = server.mails();
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].from, PROFILE);
    assert_eq!(mails[0].rcpt, vec!["ivan@example.org"]);
    let m = MessageParser::default().parse(&mails[0].data).unwrap();
    assert_eq!(m.subject(), Some("Заказ №42 готов ✓"));
    let from = m.from().unwrap().first().unwrap();
    assert_eq!(from.name(), Some("Служба доставки"));
    assert_eq!(from.address(), Some(PROFILE));
    assert_eq!(
        m.to().unwrap().first().unwrap().address(),
        Some("ivan@example.org")
    );
    // Body lines travel with CRLF (RFC 5322 §2.3).
    assert_eq!(
        m.body_text(0).unwrap().trim_end(),
        "Здравствуйте!\r\nВаш заказ готов."
    );
    let ct = m.content_type().unwrap();
    assert_eq!((ct.ctype(), ct.subtype()), ("text", Some("plain")));
    assert_eq!(
        m.message_id(),
        Some(format!("{id}@example.com").as_str()),
        "Message-ID is derived from the outbox id"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_html_body_goes_out_as_text_and_html_alternative() {
    let server = SmtpServer::start(ServerTls::None, None).await;
    let db = TestDb::new().await;
    let tc = TestConfig::new(&db, &[("smtp", &smtp_conf(&server, ""))]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let html = "<html><body><p>Hello &amp; welcome</p><p>Второй абзац</p></body></html>";
    let id = send_mail(&c, PROFILE, "a@example.org", "Hi", html).await;
    wait_state(&c, id, "submitted", WAIT).await;
    let mails = server.mails();
    let m = MessageParser::default().parse(&mails[0].data).unwrap();
    assert_eq!(m.content_type().unwrap().subtype(), Some("alternative"));
    assert_eq!(m.body_html(0).unwrap().trim_end(), html);
    assert_eq!(
        m.body_text(0).unwrap().trim_end(),
        "Hello & welcome\r\nВторой абзац"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_form_sets_cc_bcc_reply_to_headers_and_both_parts() {
    let server = SmtpServer::start(ServerTls::None, None).await;
    let db = TestDb::new().await;
    let tc = TestConfig::new(&db, &[("smtp", &smtp_conf(&server, ""))]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let content = serde_json::json!({
        "subject": "Счёт",
        "text": "plain part",
        "html": "<p>html part</p>",
        "cc": ["Анна <anna@example.org>", "bob@example.org"],
        "bcc": "audit@example.org",
        "reply_to": "support@example.com",
        "headers": {"X-Order": "42", "List-Unsubscribe": "<mailto:u@example.com>"}
    })
    .to_string();
    let id = send_mail(&c, PROFILE, "to@example.org", "ignored", &content).await;
    wait_state(&c, id, "submitted", WAIT).await;

    let mails = server.mails();
    assert_eq!(
        mails[0].rcpt,
        vec![
            "to@example.org",
            "anna@example.org",
            "bob@example.org",
            "audit@example.org"
        ]
    );
    let raw = String::from_utf8_lossy(&mails[0].data).to_string();
    assert!(
        !raw.to_ascii_lowercase().contains("\nbcc:"),
        "Bcc must stay off the headers:\n{raw}"
    );
    assert!(!raw.contains("audit@example.org"), "{raw}");
    let m = MessageParser::default().parse(&mails[0].data).unwrap();
    assert_eq!(m.subject(), Some("Счёт"));
    let cc: Vec<_> = m
        .cc()
        .unwrap()
        .iter()
        .map(|a| (a.name(), a.address()))
        .collect();
    assert_eq!(
        cc,
        vec![
            (Some("Анна"), Some("anna@example.org")),
            (None, Some("bob@example.org"))
        ]
    );
    assert_eq!(
        m.reply_to().unwrap().first().unwrap().address(),
        Some("support@example.com")
    );
    assert_eq!(m.header_raw("X-Order").map(str::trim), Some("42"));
    assert_eq!(m.body_text(0).unwrap().trim_end(), "plain part");
    assert_eq!(m.body_html(0).unwrap().trim_end(), "<p>html part</p>");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_recipients_in_address_all_get_the_message() {
    let server = SmtpServer::start(ServerTls::None, None).await;
    let db = TestDb::new().await;
    let tc = TestConfig::new(&db, &[("smtp", &smtp_conf(&server, ""))]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let id = send_mail(
        &c,
        PROFILE,
        "a@example.org, \"Doe, Jane\" <jane@example.org>,c@example.net",
        "s",
        "body",
    )
    .await;
    wait_state(&c, id, "submitted", WAIT).await;
    let mails = server.mails();
    assert_eq!(mails.len(), 1);
    assert_eq!(
        mails[0].rcpt,
        vec!["a@example.org", "jane@example.org", "c@example.net"]
    );
    let m = MessageParser::default().parse(&mails[0].data).unwrap();
    let to: Vec<_> = m
        .to()
        .unwrap()
        .iter()
        .map(|a| a.address().unwrap().to_string())
        .collect();
    assert_eq!(
        to,
        vec!["a@example.org", "jane@example.org", "c@example.net"]
    );
    assert_eq!(
        m.to().unwrap().iter().nth(1).unwrap().name(),
        Some("Doe, Jane")
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_rfc5322_message_passes_through_byte_for_byte() {
    let server = SmtpServer::start(ServerTls::None, None).await;
    let db = TestDb::new().await;
    let tc = TestConfig::new(&db, &[("smtp", &smtp_conf(&server, ""))]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    // As Apostol's SQL builds it: its own headers, MIME, 8-bit UTF-8, a line starting with a dot
    // (dot-stuffed on the wire, unstuffed by the server).
    let raw = "From: \"Billing\" <billing@example.com>\r\n\
               To: someone@example.org\r\n\
               Subject: =?UTF-8?B?0KHRh9GR0YI=?=\r\n\
               Message-ID: <apostol-123@example.com>\r\n\
               MIME-Version: 1.0\r\n\
               Content-Type: text/plain; charset=utf-8\r\n\
               Content-Transfer-Encoding: 8bit\r\n\
               \r\n\
               Строка один\r\n\
               .leading dot\r\n\
               ..two dots\r\n\
               last line\r\n";
    let id = send_mail(&c, PROFILE, "someone@example.org", "unused", raw).await;
    wait_state(&c, id, "submitted", WAIT).await;
    let mails = server.mails();
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].from, PROFILE, "envelope sender is the profile's");
    assert_eq!(mails[0].rcpt, vec!["someone@example.org"]);
    assert_eq!(
        String::from_utf8_lossy(&mails[0].data),
        raw,
        "the message must arrive unchanged"
    );
    assert_eq!(provider_id(&c, id).await.as_deref(), Some("Q1"));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4xx_reply_retries_then_fails_after_max_attempts() {
    let server = SmtpServer::start(ServerTls::None, None).await;
    server.set(SmtpBehaviour::TempFailRcpt);
    let db = TestDb::new().await;
    let tc = TestConfig::new(&db, &[("smtp", &smtp_conf(&server, ""))]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let id = send_mail(&c, PROFILE, "a@example.org", "s", "body").await;
    wait_state(&c, id, "failed", WAIT).await;
    let a = attempts(&c, id).await;
    let code = Some("smtp-4xx".to_string());
    assert_eq!(
        a,
        vec![
            (1, "retry".to_string(), code.clone(), Some(450)),
            (2, "retry".to_string(), code.clone(), Some(450)),
            (3, "failed".to_string(), code, Some(450)),
        ]
    );
    assert!(server.mails().is_empty());
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4xx_after_data_is_retried_and_delivered_once_the_server_recovers() {
    let server = SmtpServer::start(ServerTls::None, None).await;
    server.set(SmtpBehaviour::TempFailData);
    let db = TestDb::new().await;
    let conf = smtp_conf(&server, "").replace("retry = [\"20ms\"]", "retry = [\"300ms\"]");
    let tc = TestConfig::new(&db, &[("smtp", &conf)]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let id = send_mail(&c, PROFILE, "a@example.org", "s", "body").await;
    wait_for(WAIT, "a first failed attempt", || async {
        (!attempts(&c, id).await.is_empty()).then_some(())
    })
    .await;
    server.set(SmtpBehaviour::Accept);
    wait_state(&c, id, "submitted", WAIT).await;
    let a = attempts(&c, id).await;
    assert_eq!(
        a[0],
        (1, "retry".into(), Some("smtp-4xx".into()), Some(451))
    );
    assert_eq!(a.last().unwrap().1, "done");
    assert_eq!(server.mails().len(), 1);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_reply_fails_at_once() {
    let server = SmtpServer::start(ServerTls::None, None).await;
    server.set(SmtpBehaviour::PermFailRcpt);
    let db = TestDb::new().await;
    let tc = TestConfig::new(&db, &[("smtp", &smtp_conf(&server, ""))]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let id = send_mail(&c, PROFILE, "nobody@example.org", "s", "body").await;
    wait_state(&c, id, "failed", WAIT).await;
    assert_eq!(
        attempts(&c, id).await,
        vec![(
            1,
            "failed".to_string(),
            Some("smtp-5xx".to_string()),
            Some(550)
        )]
    );
    // And a 5xx after the data.
    server.set(SmtpBehaviour::PermFailData);
    let id = send_mail(&c, PROFILE, "a@example.org", "s", "body").await;
    wait_state(&c, id, "failed", WAIT).await;
    assert_eq!(
        attempts(&c, id).await,
        vec![(
            1,
            "failed".to_string(),
            Some("smtp-5xx".to_string()),
            Some(554)
        )]
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_plain_and_login_succeed_with_the_right_password() {
    let server = SmtpServer::start(ServerTls::None, Some(("mailer", "s3cret-пароль"))).await;
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("smtp.password");
    std::fs::write(&pw, "s3cret-пароль\n").unwrap();
    // Two profiles: PLAIN with an inline password, LOGIN with the password from a file.
    let conf = format!(
        "{}username = \"mailer\"\npassword = \"s3cret-пароль\"\nauth_method = \"PLAIN\"\n\
         allow_plaintext_auth = true\n\n\
         [login]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\nfrom = \"login@example.com\"\n\
         username = \"mailer\"\npassword_file = \"{}\"\nauth_method = \"LOGIN\"\n\
         allow_plaintext_auth = true\n",
        smtp_conf(&server, ""),
        server.port,
        path_str(&pw)
    );
    let tc = TestConfig::new(&db, &[("smtp", &conf)]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let a = send_mail(&c, PROFILE, "a@example.org", "s", "one").await;
    wait_state(&c, a, "submitted", WAIT).await;
    let b = send_mail(&c, "login", "b@example.org", "s", "two").await;
    wait_state(&c, b, "submitted", WAIT).await;
    let mails = server.mails();
    assert_eq!(mails.len(), 2);
    assert!(mails
        .iter()
        .all(|m| m.auth_user.as_deref() == Some("mailer")));
    assert_eq!(mails[1].from, "login@example.com");
    let mechs: Vec<_> = server
        .auths()
        .into_iter()
        .map(|(m, _, ok)| (m, ok))
        .collect();
    assert_eq!(
        mechs,
        vec![("PLAIN".to_string(), true), ("LOGIN".to_string(), true)]
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_fails_with_the_servers_5xx() {
    let server = SmtpServer::start(ServerTls::None, Some(("mailer", "right"))).await;
    let db = TestDb::new().await;
    let env = format!("OUTBOXD_TEST_SMTP_PW_{}", Uuid::new_v4().simple());
    std::env::set_var(&env, "wrong");
    let conf = smtp_conf(
        &server,
        &format!("username = \"mailer\"\npassword_env = \"{env}\"\nallow_plaintext_auth = true"),
    );
    let tc = TestConfig::new(&db, &[("smtp", &conf)]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let id = send_mail(&c, PROFILE, "a@example.org", "s", "body").await;
    wait_state(&c, id, "failed", WAIT).await;
    assert_eq!(
        attempts(&c, id).await,
        vec![(
            1,
            "failed".to_string(),
            Some("smtp-5xx".to_string()),
            Some(535)
        )]
    );
    assert_eq!(server.auths().len(), 1);
    assert!(!server.auths()[0].2);
    assert!(server.mails().is_empty());
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_with_a_trusted_ca_file_then_auth() {
    let server = SmtpServer::start(ServerTls::Starttls, Some(("mailer", "pw"))).await;
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &server.cert_pem).unwrap();
    let conf = smtp_conf(
        &server,
        &format!(
            "username = \"mailer\"\npassword = \"pw\"\nca_file = \"{}\"",
            path_str(&ca)
        ),
    )
    .replace("tls = \"none\"", "tls = \"starttls\"");
    let tc = TestConfig::new(&db, &[("smtp", &conf)]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let id = send_mail(&c, PROFILE, "a@example.org", "s", "over TLS").await;
    wait_state(&c, id, "submitted", WAIT).await;
    let mails = server.mails();
    assert_eq!(mails.len(), 1);
    assert!(mails[0].tls, "the transaction must run after STARTTLS");
    assert_eq!(mails[0].auth_user.as_deref(), Some("mailer"));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_without_trust_in_the_certificate_is_a_tls_retry() {
    let server = SmtpServer::start(ServerTls::Starttls, None).await;
    let db = TestDb::new().await;
    let conf = smtp_conf(&server, "max_attempts = 1")
        .replace("max_attempts = 3\n", "")
        .replace("tls = \"none\"", "tls = \"starttls\"");
    let tc = TestConfig::new(&db, &[("smtp", &conf)]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let id = send_mail(&c, PROFILE, "a@example.org", "s", "body").await;
    wait_state(&c, id, "failed", WAIT).await;
    assert_eq!(last_error_code(&c, id).await.as_deref(), Some("smtp-tls"));
    assert!(server.mails().is_empty());
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implicit_tls_delivers() {
    let server = SmtpServer::start(ServerTls::Implicit, Some(("mailer", "pw"))).await;
    let db = TestDb::new().await;
    // accept_invalid_certs is the testing-only escape hatch; ca_file is covered above. AUTH goes
    // over the implicit TLS (which lettre does not see as encrypted: the pool tracks it).
    let conf = smtp_conf(
        &server,
        "accept_invalid_certs = true\nusername = \"mailer\"\npassword = \"pw\"",
    )
    .replace("tls = \"none\"", "tls = \"tls\"");
    let tc = TestConfig::new(&db, &[("smtp", &conf)]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let id = send_mail(&c, PROFILE, "a@example.org", "s", "over SMTPS").await;
    wait_state(&c, id, "submitted", WAIT).await;
    let mails = server.mails();
    assert_eq!(mails.len(), 1);
    assert!(mails[0].tls);
    assert_eq!(mails[0].auth_user.as_deref(), Some("mailer"));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_pooled_and_reused_across_messages() {
    let server = SmtpServer::start(ServerTls::None, None).await;
    let db = TestDb::new().await;
    let mut tc = TestConfig::new(&db, &[("smtp", &smtp_conf(&server, "pool_size = 2"))]);
    // One delivery at a time, so every message after the first finds the parked connection.
    tc.config.concurrency = 1;
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(send_mail(&c, PROFILE, "a@example.org", "s", &format!("message {i}")).await);
    }
    for id in &ids {
        wait_state(&c, *id, "submitted", WAIT).await;
    }
    assert_eq!(server.mails().len(), 5);
    assert_eq!(
        server.connections(),
        1,
        "5 messages must share one SMTP connection"
    );
    assert!(server.mails().iter().all(|m| m.connection == 1));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_addresses_and_malformed_json_forms_fail_permanently() {
    let server = SmtpServer::start(ServerTls::None, None).await;
    let db = TestDb::new().await;
    let tc = TestConfig::new(&db, &[("smtp", &smtp_conf(&server, ""))]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let cases = [
        ("not an address", "body", "bad-address"),
        (
            "a@example.org",
            "{\"text\": \"hi\", \"cc\": [\"broken@\"]}",
            "bad-address",
        ),
        (
            "a@example.org",
            "{\"text\": \"hi\", \"bbc\": \"x@example.org\"}",
            "bad-content",
        ),
        ("a@example.org", "{\"text\": 42}", "bad-content"),
        ("a@example.org", "{\"text\": \"unterminated", "bad-content"),
        (
            "a@example.org",
            "{\"cc\": \"b@example.org\"}",
            "bad-content",
        ),
    ];
    for (address, content, code) in cases {
        let id = send_mail(&c, PROFILE, address, "s", content).await;
        wait_state(&c, id, "failed", WAIT).await;
        let a = attempts(&c, id).await;
        assert_eq!(a.len(), 1, "{content}: permanent, no retry");
        assert_eq!(a[0].2.as_deref(), Some(code), "{address} / {content}");
    }
    assert!(server.mails().is_empty());
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_keys_override_a_service_preset() {
    // Maildev's preset is localhost:1025 without TLS; host and port point it at the test server.
    let server = SmtpServer::start(ServerTls::None, None).await;
    let db = TestDb::new().await;
    let conf = format!(
        "[\"{PROFILE}\"]\nservice = \"maildev\"\nhost = \"127.0.0.1\"\nport = {}\n",
        server.port
    );
    let tc = TestConfig::new(&db, &[("smtp", &conf)]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let id = send_mail(&c, PROFILE, "a@example.org", "s", "body").await;
    wait_state(&c, id, "submitted", WAIT).await;
    assert_eq!(server.mails().len(), 1);
    daemon.stop().await;
}

#[test]
fn presets_are_found_by_name_alias_or_address_ignoring_case_and_punctuation() {
    let qq = services::lookup("QQ").unwrap();
    assert_eq!(
        (qq.host.as_deref(), qq.port, qq.secure),
        (Some("smtp.qq.com"), Some(465), true)
    );
    assert_eq!(services::lookup("qq"), Some(qq));
    assert_eq!(services::lookup("someone@qq.com"), Some(qq));
    let feishu = services::lookup("Feishu Mail").unwrap();
    assert_eq!(feishu.host.as_deref(), Some("smtp.feishu.cn"));
    assert_eq!(services::lookup("FeishuMail"), Some(feishu));
    assert_eq!(services::lookup("feishu"), Some(feishu));
    // nodemailer writes this port as the string "465".
    let qiye = services::lookup("qiye.aliyun").unwrap();
    assert_eq!(
        (qiye.host.as_deref(), qiye.port, qiye.secure),
        (Some("smtp.mxhichina.com"), Some(465), true)
    );
    assert_eq!(
        services::lookup("163").unwrap().host.as_deref(),
        Some("smtp.163.com")
    );
    assert_eq!(
        services::lookup("Gmail").unwrap().host.as_deref(),
        Some("smtp.gmail.com")
    );
    assert_eq!(
        services::lookup("x@googlemail.com")
            .unwrap()
            .host
            .as_deref(),
        Some("smtp.gmail.com")
    );
    assert_eq!(
        services::lookup("QQ Enterprise").unwrap().host.as_deref(),
        Some("smtp.exmail.qq.com")
    );
    assert_eq!(
        services::lookup("yandex").unwrap().host.as_deref(),
        Some("smtp.yandex.ru")
    );
    assert_eq!(
        services::lookup("ses-eu-west-1").unwrap().host.as_deref(),
        Some("email-smtp.eu-west-1.amazonaws.com")
    );
    assert_eq!(services::lookup("Maildev").unwrap().host, None);
    assert_eq!(services::lookup("hot.ee").unwrap().port, None);
    assert_eq!(services::lookup("No Such Mail"), None);
}

#[test]
fn an_unknown_service_is_a_config_error_naming_file_and_key() {
    let text = "[\"noreply@example.com\"]\nservice = \"Pigeon Post\"\n";
    let errors =
        outboxd::config::parse_profiles("smtp", text, "/etc/outboxd/smtp.conf").unwrap_err();
    assert_eq!(errors.len(), 1);
    let e = &errors[0];
    assert_eq!(e.file, "/etc/outboxd/smtp.conf");
    // The loader names the profile and the key.
    assert_eq!(e.key.as_deref(), Some("noreply@example.com.service"));
    assert!(
        e.message
            .contains("service = \"Pigeon Post\": unknown service"),
        "{e}"
    );
    assert!(e.message.contains("QQ"), "lists the known services: {e}");
    let shown = e.to_string();
    assert!(
        shown.starts_with("/etc/outboxd/smtp.conf: key `noreply@example.com.service`: service = "),
        "{shown}"
    );
}

#[test]
fn every_documented_key_of_conf_smtp_conf_parses() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/smtp.conf")).unwrap();
    let profiles = outboxd::config::parse_profiles("smtp", &text, "conf/smtp.conf").unwrap();
    assert!(profiles.iter().any(|(n, _)| n == "noreply@example.com"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_answering_is_a_timeout_and_a_closed_port_a_connect_error() {
    let server = SmtpServer::start(ServerTls::None, None).await;
    server.set(SmtpBehaviour::HangData);
    // A port nobody listens on: bind, note it, close it.
    let closed = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    };
    let db = TestDb::new().await;
    let conf = format!(
        "{}\n[closed]\nhost = \"127.0.0.1\"\nport = {closed}\ntls = \"none\"\n\
         from = \"c@example.com\"\nmax_attempts = 1\n",
        smtp_conf(&server, "")
            .replace("max_attempts = 3", "max_attempts = 1")
            .replace("timeout = \"5s\"", "timeout = \"500ms\"")
    );
    let tc = TestConfig::new(&db, &[("smtp", &conf)]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let hung = send_mail(&c, PROFILE, "a@example.org", "s", "body").await;
    let refused = send_mail(&c, "closed", "a@example.org", "s", "body").await;
    wait_state(&c, hung, "failed", WAIT).await;
    wait_state(&c, refused, "failed", WAIT).await;
    assert_eq!(last_error_code(&c, hung).await.as_deref(), Some("timeout"));
    assert_eq!(
        last_error_code(&c, refused).await.as_deref(),
        Some("smtp-connect")
    );
    assert!(server.mails().is_empty());
    daemon.stop().await;
}

/// Waits until every message is `submitted` or `failed`; returns how many are `submitted`.
async fn wait_all_final(c: &tokio_postgres::Client, ids: &[Uuid], timeout: Duration) -> usize {
    wait_for(
        timeout,
        "every message to be submitted or failed",
        || async {
            let mut submitted = 0;
            for id in ids {
                match state_of(c, *id).await.as_str() {
                    "submitted" => submitted += 1,
                    "failed" => {}
                    _ => return None,
                }
            }
            Some(submitted)
        },
    )
    .await
}

/// Issue 8, reproduced: a server that takes 1.5 s to answer the DATA terminator, one pooled
/// connection, a 2 s timeout and 10 messages. The timeout must bound the provider call, not the
/// wait for the pooled connection, and a transaction the daemon gave up on must not complete
/// behind its back: before the fix the server got 11 transactions for 7 distinct Message-IDs
/// and 7 accepted mails ended `failed` with `timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_server_behind_a_small_pool_gets_each_message_once_and_none_is_failed() {
    let server = SmtpServer::start(ServerTls::None, None).await;
    server.set_data_delay(Duration::from_millis(1500));
    let db = TestDb::new().await;
    let conf = format!(
        "[\"{PROFILE}\"]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n\
         pool_size = 1\ntimeout = \"2s\"\nretry = [\"1s\"]\nmax_attempts = 5\n",
        server.port
    );
    let tc = TestConfig::new(&db, &[("smtp", &conf)]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(send_mail(&c, PROFILE, "a@example.org", "s", &format!("message {i}")).await);
    }
    // 10 transactions of 1.5 s one after another, plus slack.
    let submitted = wait_all_final(&c, &ids, Duration::from_secs(90)).await;
    // And until no transaction is left half-way on the server (one the daemon abandoned).
    wait_for(WAIT, "no transaction pending on the server", || async {
        (server.pending() == 0).then_some(())
    })
    .await;
    let mut distinct = server.message_ids();
    distinct.sort();
    distinct.dedup();
    let timeouts: i64 = c
        .query_one(
            "SELECT count(*) FROM outbox.attempts WHERE error_code = 'timeout'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    eprintln!(
        "slow-smtp scenario: terminators={} accepted={} distinct_message_ids={} aborted={} \
         submitted={submitted} failed={} timeout_attempts={timeouts}",
        server.terminators(),
        server.mails().len(),
        distinct.len(),
        server.aborted(),
        ids.len() - submitted,
    );
    assert_eq!(
        server.terminators(),
        10,
        "exactly one transaction per message"
    );
    assert_eq!(server.mails().len(), 10);
    assert_eq!(distinct.len(), 10);
    assert_eq!(submitted, 10, "every accepted mail is submitted");
    assert_eq!(timeouts, 0);
    for id in &ids {
        assert_eq!(
            attempts(&c, *id).await,
            vec![(1, "done".to_string(), None, Some(250))]
        );
    }
    daemon.stop().await;
}

/// A transaction the daemon gives up on is aborted, never completed behind its back: the server
/// sees the connection close before it answers the DATA terminator (and so, per RFC 5321
/// §4.1.1.10, cancels it). Both ways to give up: the profile's timeout, and a shutdown whose
/// grace period ends mid-transaction (which, before issue 8, left the transaction running in a
/// detached task that delivered the mail after the message had been handed back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_transaction_is_aborted_and_never_completes_later() {
    let server = SmtpServer::start(ServerTls::None, None).await;
    let db = TestDb::new().await;
    let c = db.client().await;

    // The timeout: the server needs 3 s for the terminator, the profile allows 500 ms.
    server.set_data_delay(Duration::from_secs(3));
    let conf = smtp_conf(&server, "")
        .replace("max_attempts = 3", "max_attempts = 1")
        .replace("timeout = \"5s\"", "timeout = \"500ms\"");
    let tc = TestConfig::new(&db, &[("smtp", &conf)]);
    let daemon = Daemon::start(tc.config.clone());
    let id = send_mail(&c, PROFILE, "a@example.org", "s", "too slow").await;
    wait_state(&c, id, "failed", WAIT).await;
    assert_eq!(last_error_code(&c, id).await.as_deref(), Some("timeout"));
    wait_for(WAIT, "the server to settle the transaction", || async {
        (server.aborted() + server.mails().len() == 1).then_some(())
    })
    .await;
    assert_eq!(server.aborted(), 1, "closed before the terminator's reply");
    assert!(
        server.mails().is_empty(),
        "the server must not have accepted it"
    );
    // The abandoned connection was not parked: the next message opens a new one.
    server.set_data_delay(Duration::ZERO);
    let next = send_mail(&c, PROFILE, "a@example.org", "s", "fast").await;
    wait_state(&c, next, "submitted", WAIT).await;
    assert_eq!(server.connections(), 2);
    assert_eq!(server.mails()[0].connection, 2);
    daemon.stop().await;

    // The shutdown: stopped mid-transaction with a short grace period.
    server.set_data_delay(Duration::from_secs(2));
    let mut tc = TestConfig::new(&db, &[("smtp", &smtp_conf(&server, ""))]);
    tc.config.grace_period = Duration::from_millis(200);
    let daemon = Daemon::start(tc.config.clone());
    let id = send_mail(&c, PROFILE, "a@example.org", "s", "interrupted").await;
    wait_for(WAIT, "the terminator to reach the server", || async {
        (server.terminators() == 3).then_some(())
    })
    .await;
    let report = daemon.stop().await;
    assert_eq!(report.released, 1, "handed back, not finished");
    assert_eq!(state_of(&c, id).await, "prepared");
    wait_for(WAIT, "the server to settle the transaction", || async {
        (server.aborted() + server.mails().len() == 3).then_some(())
    })
    .await;
    assert_eq!(server.aborted(), 2, "closed before the terminator's reply");
    assert_eq!(
        server.mails().len(),
        1,
        "only the fast message was accepted"
    );
    assert_eq!(server.pending(), 0);
}

/// A refused recipient or a refused DATA ends that message's transaction, not the session: the
/// pooled connection is reset (RSET) and reused, so a run of rejected messages does not cost a
/// reconnect (and TLS handshake and AUTH) each. lettre's own client QUITs on every refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_messages_reset_the_session_and_keep_the_connection() {
    let server = SmtpServer::start(ServerTls::None, None).await;
    let db = TestDb::new().await;
    let conf = smtp_conf(&server, "pool_size = 1").replace("max_attempts = 3", "max_attempts = 1");
    let mut tc = TestConfig::new(&db, &[("smtp", &conf)]);
    tc.config.concurrency = 1;
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let refusals = [
        (SmtpBehaviour::PermFailRcpt, "smtp-5xx", 550),
        (SmtpBehaviour::TempFailRcpt, "smtp-4xx", 450),
        (SmtpBehaviour::PermFailData, "smtp-5xx", 554),
        (SmtpBehaviour::TempFailData, "smtp-4xx", 451),
    ];
    for (behaviour, code, status) in refusals {
        server.set(behaviour);
        let id = send_mail(&c, PROFILE, "a@example.org", "s", "refused").await;
        wait_state(&c, id, "failed", WAIT).await;
        assert_eq!(
            attempts(&c, id).await,
            vec![(
                1,
                "failed".to_string(),
                Some(code.to_string()),
                Some(status)
            )],
            "{behaviour:?}"
        );
    }
    server.set(SmtpBehaviour::Accept);
    for i in 0..2 {
        let id = send_mail(&c, PROFILE, "a@example.org", "s", &format!("good {i}")).await;
        wait_state(&c, id, "submitted", WAIT).await;
    }
    assert_eq!(server.mails().len(), 2);
    assert_eq!(
        server.connections(),
        1,
        "one connection for all six messages"
    );
    // A refused RCPT leaves the transaction open: RSET closes it. The reply to the terminator
    // ends it already (RFC 5321 §4.1.1.4).
    assert_eq!(server.rsets(), 2);
    daemon.stop().await;
}

/// A server (or someone in between) that hides STARTTLS from its EHLO reply while offering AUTH
/// gets no credentials: `starttls`, `opportunistic` and a preset of a provider that requires TLS
/// all fail with `smtp-tls` before AUTH (RFC 3207 §6 downgrade; RFC 8314 §4.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_hiding_starttls_never_gets_the_password() {
    // Plain text only, AUTH offered anyway: what a STARTTLS-stripping attacker shows.
    let server = SmtpServer::start(ServerTls::None, Some(("mailer", "pw"))).await;
    let db = TestDb::new().await;
    let profile = |name: &str, tls: &str| {
        format!(
            "[\"{name}\"]\nhost = \"127.0.0.1\"\nport = {}\n{tls}\nusername = \"mailer\"\n\
             password = \"pw\"\nmax_attempts = 1\ntimeout = \"5s\"\n",
            server.port
        )
    };
    let conf = [
        profile("required@example.com", "tls = \"starttls\""),
        profile("opportunistic@example.com", "tls = \"opportunistic\""),
        // Outlook365's table entry says `secure: false` (nodemailer: STARTTLS when offered).
        profile("preset@example.com", "service = \"Outlook365\""),
    ]
    .join("\n");
    let tc = TestConfig::new(&db, &[("smtp", &conf)]);
    let daemon = Daemon::start(tc.config.clone());
    let c = db.client().await;
    for p in [
        "required@example.com",
        "opportunistic@example.com",
        "preset@example.com",
    ] {
        let id = send_mail(&c, p, "a@example.org", "s", "secret mail").await;
        wait_state(&c, id, "failed", WAIT).await;
        assert_eq!(
            last_error_code(&c, id).await.as_deref(),
            Some("smtp-tls"),
            "{p}"
        );
    }
    assert!(
        server.auths().is_empty(),
        "AUTH in clear text: {:?}",
        server.auths()
    );
    assert!(server.mails().is_empty());
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_refuses_plaintext_auth_unless_tls_none_allows_it() {
    let db = TestDb::new().await;
    let creds = "host = \"127.0.0.1\"\nport = 2525\nusername = \"u\"\npassword = \"p\"\n";
    let conf = format!(
        "[\"{PROFILE}\"]\n{creds}tls = \"none\"\n\n\
         [\"allowed@example.com\"]\n{creds}tls = \"none\"\nallow_plaintext_auth = true\n\n\
         [\"misplaced@example.com\"]\n{creds}tls = \"starttls\"\nallow_plaintext_auth = true\n"
    );
    let tc = TestConfig::new(&db, &[("smtp", &conf)]);
    let Err(errors) = outboxd::dispatch::build_router(&tc.config) else {
        panic!("the configuration must be refused");
    };
    let file = path_str(&tc.path("smtp.conf"));
    let mut found: Vec<_> = errors
        .iter()
        .map(|e| (e.file.clone(), e.key.clone().unwrap_or_default()))
        .collect();
    found.sort();
    assert_eq!(
        found,
        vec![
            (
                file.clone(),
                "misplaced@example.com.allow_plaintext_auth".to_string()
            ),
            (file, format!("{PROFILE}.tls")),
        ],
        "{errors:?}"
    );
    let report = outboxd::ops::check_config(&tc.config).await;
    assert!(!report.ok());
    let shown = report.to_string();
    assert!(shown.contains(&format!("{PROFILE}.tls")), "{shown}");
    assert!(shown.contains("smtp.conf"), "{shown}");
}
