//! TLS to PostgreSQL, against the test server (`ssl = on`): `sslmode` in `database_url` decides
//! whether every session the daemon opens (pool and LISTEN) is encrypted, and the verifying modes
//! check the server's certificate against `sslrootcert` — refused with a wrong root (a CA made
//! here), accepted with the server's own self-signed certificate as root (`SHOW ssl_cert_file`,
//! Debian's snakeoil on the test machines), whose name decides `verify-full`.

mod common;

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use common::*;
use outboxd::db::Db;

const T: Duration = Duration::from_secs(15);

/// `url` with its password set to `password` and `params` appended to its query.
fn url_with(url: &str, password: Option<&str>, params: &[(&str, &str)]) -> String {
    let mut u = url::Url::parse(url).unwrap();
    if let Some(p) = password {
        u.set_password(Some(p)).unwrap();
    }
    for (k, v) in params {
        u.query_pairs_mut().append_pair(k, v);
    }
    u.to_string()
}

/// (application_name, ssl) of every daemon session on this database.
async fn daemon_sessions(c: &tokio_postgres::Client) -> Vec<(String, bool)> {
    c.query(
        "SELECT a.application_name, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
          WHERE a.datname = current_database() AND a.application_name LIKE 'outboxd%' \
          ORDER BY 1",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// Whether the first connection of a pool on `url` is encrypted, or why it failed.
async fn pool_ssl(url: &str) -> Result<bool, String> {
    let db = Db::connect(url, 2, Duration::from_secs(5), None).map_err(|e| e.to_string())?;
    let c = db
        .pool()
        .get()
        .await
        .map_err(|e| outboxd::db::DbError::from(e).to_string())?;
    Ok(c.query_one(
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        &[],
    )
    .await
    .unwrap()
    .get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_decides_whether_every_daemon_session_is_encrypted() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let dir = tempfile::tempdir().unwrap();
    let file_conf = format!(
        "[default]\npath = \"{}/spool.jsonl\"\n",
        dir.path().display()
    );
    for (mode, encrypted) in [("require", true), ("disable", false)] {
        let mut tc = TestConfig::new(&db, &[("file", &file_conf)]);
        tc.config.database_url =
            outboxd::config::Secret::new(url_with(&db.url, None, &[("sslmode", mode)]));
        // The migrations run through the same TLS settings.
        tc.config.migrate_on_start = true;
        let d = Daemon::start(tc.config.clone());
        wait_listening(&c, T).await;
        let id = send(&c, "file.agent", "default", "a", mode).await;
        wait_state(&c, id, "submitted", T).await;
        let sessions = daemon_sessions(&c).await;
        assert!(
            sessions.iter().any(|(a, _)| a == "outboxd")
                && sessions.iter().any(|(a, _)| a == "outboxd-listen"),
            "pool and LISTEN sessions: {sessions:?}"
        );
        assert!(
            sessions.iter().all(|(_, ssl)| *ssl == encrypted),
            "sslmode={mode}: {sessions:?}"
        );
        d.stop().await;
        wait_for(T, "the daemon's sessions to end", || async {
            daemon_sessions(&c).await.is_empty().then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn a_wrong_root_certificate_is_refused_with_a_clear_error_and_no_secret() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    // A CA that signed nothing the server has.
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "outboxd test CA");
    let ca = params
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let root = dir.path().join("wrong-ca.pem");
    std::fs::write(&root, ca.pem()).unwrap();
    let root = root.to_str().unwrap();
    let secret = "pw-must-not-leak-7731";
    for mode in ["verify-full", "verify-ca", "require"] {
        let url = url_with(
            &db.url,
            Some(secret),
            &[("sslmode", mode), ("sslrootcert", root)],
        );
        let e = pool_ssl(&url).await.unwrap_err();
        assert!(
            e.contains("TLS handshake") && e.contains("invalid peer certificate"),
            "sslmode={mode} with a wrong root: {e}"
        );
        assert!(!e.contains(secret), "{e}");
        if mode == "verify-full" {
            let e = outboxd::db::migrate::prepare_database(&url, true)
                .await
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("invalid peer certificate") && !e.contains(secret),
                "migrations connect the same way: {e}"
            );
            // The CLI too.
            let conf = dir.path().join("outboxd.toml");
            std::fs::write(&conf, format!("database_url = \"{url}\"\n")).unwrap();
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_outboxd"))
                .arg("--config")
                .arg(&conf)
                .arg("status")
                .env_remove("DATABASE_URL")
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success());
            assert!(
                stderr.contains("invalid peer certificate") && !stderr.contains(secret),
                "{stderr}"
            );
        }
    }
    // Without a root certificate, `require` encrypts without checking (as libpq does).
    let url = url_with(&db.url, Some(secret), &[("sslmode", "require")]);
    assert_eq!(pool_ssl(&url).await, Ok(true));
}

/// The IP address the test server listens on (`hostaddr`), and its host as written.
async fn server_address() -> (IpAddr, String) {
    let u = url::Url::parse(&admin_url()).unwrap();
    let host = u.host_str().unwrap().trim_matches(['[', ']']).to_string();
    let port = u.port().unwrap_or(5432);
    let addr = tokio::net::lookup_host((host.as_str(), port))
        .await
        .unwrap()
        .next()
        .unwrap();
    (addr.ip(), host)
}

#[tokio::test]
async fn verify_ca_and_verify_full_accept_the_servers_own_certificate() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let cert_file: String = c.query_one("SHOW ssl_cert_file", &[]).await.unwrap().get(0);
    let pem = std::fs::read(Path::new(&cert_file))
        .unwrap_or_else(|e| panic!("the server's certificate {cert_file}: {e}"));
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
    let names = outboxd::db::tls::certificate_names(&der);
    let parsed = <x509_cert::Certificate as x509_cert::der::Decode>::from_der(&der).unwrap();
    assert_eq!(
        parsed.tbs_certificate.issuer, parsed.tbs_certificate.subject,
        "this test takes the server's certificate {cert_file} as its own root: it must be self-signed"
    );
    // Debian's snakeoil: self-signed (so it is its own root), issued to the host name it was made
    // on (here `localhost`, as subjectAltName and CN); that name is connected to through the
    // server's address (hostaddr), whatever it is.
    let name = names
        .dns_alt_names
        .first()
        .or(names.common_names.first())
        .unwrap_or_else(|| panic!("{cert_file} names no host: {names:?}"))
        .clone();
    let (ip, _) = server_address().await;
    let ip = ip.to_string();
    let with = |host: &str, mode: &str| {
        let mut u = url::Url::parse(&db.url).unwrap();
        u.set_host(Some(host)).unwrap();
        url_with(
            u.as_str(),
            None,
            &[
                ("hostaddr", &ip),
                ("sslmode", mode),
                ("sslrootcert", &cert_file),
            ],
        )
    };
    assert_eq!(pool_ssl(&with(&name, "verify-full")).await, Ok(true));
    assert_eq!(pool_ssl(&with(&name, "verify-ca")).await, Ok(true));
    // A name the certificate does not carry: the chain is right, so only verify-full refuses.
    let other = "not-the-server.invalid";
    assert_eq!(pool_ssl(&with(other, "verify-ca")).await, Ok(true));
    let e = pool_ssl(&with(other, "verify-full")).await.unwrap_err();
    assert!(
        e.contains("invalid peer certificate") && e.contains("not valid for name"),
        "{e}"
    );
    // The migrations connect the same way.
    outboxd::db::migrate::prepare_database(&with(&name, "verify-full"), false)
        .await
        .unwrap();
}
