//! TLS to PostgreSQL: libpq's `sslmode` and `sslrootcert`, on rustls.
//!
//! tokio-postgres itself knows only `disable`, `prefer` and `require`, and never checks a
//! certificate; the connection string's `sslmode` and `sslrootcert` are therefore read here and
//! stripped before tokio-postgres parses the rest. The modes mean what they mean to libpq
//! (<https://www.postgresql.org/docs/15/libpq-ssl.html#LIBPQ-SSL-PROTECTION>):
//!
//! | `sslmode` | encrypted | certificate checked |
//! | --- | --- | --- |
//! | `disable` | never | – |
//! | `prefer` (default) | when the server offers TLS | no |
//! | `require` | always | no; with `sslrootcert`, as `verify-ca` |
//! | `verify-ca` | always | chain to `sslrootcert` |
//! | `verify-full` | always | chain to `sslrootcert` and host name |
//!
//! Invariants: every connection the daemon and its CLI open goes through [`target`]; a verifying
//! mode without a root certificate is a configuration error, never a silent downgrade. The host
//! name is matched against the certificate's subjectAltName entries and, only when it has none,
//! against its Common Name, as libpq does (older self-signed server certificates often carry only
//! a CN).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode as PgSslMode;

use super::DbError;

/// The TLS connector every connection uses (tokio-postgres ignores it when TLS is not used).
pub type Tls = tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode` values that outboxd supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = DbError;
    fn from_str(s: &str) -> Result<Self, DbError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => {
                return Err(DbError::Config(format!(
                    "sslmode \"{s}\" is not supported (use disable, prefer, require, verify-ca or \
                     verify-full)"
                )))
            }
        })
    }
}

/// A parsed connection string: the tokio-postgres settings and the TLS connector they need.
#[derive(Clone)]
pub struct Target {
    pub config: tokio_postgres::Config,
    pub tls: Tls,
    pub mode: SslMode,
}

impl Target {
    /// Opens one connection.
    pub async fn connect(
        &self,
    ) -> Result<
        (
            tokio_postgres::Client,
            tokio_postgres::Connection<
                tokio_postgres::Socket,
                <Tls as tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>>::Stream,
            >,
        ),
        tokio_postgres::Error,
    > {
        self.config.connect(self.tls.clone()).await
    }
}

/// Parses a connection string (URL or `key=value` form), honouring `sslmode` and `sslrootcert`.
/// Errors never quote the string (it may carry a password).
pub fn target(conn: &str) -> Result<Target, DbError> {
    let (rest, mode, rootcert) = split_tls_params(conn);
    let mut config = tokio_postgres::Config::from_str(&rest)
        .map_err(|e| DbError::Config(format!("connection string: {}", super::describe(&e))))?;
    let mode = match mode {
        Some(m) => m.parse()?,
        None => SslMode::Prefer,
    };
    let rootcert = rootcert.map(PathBuf::from).or_else(|| {
        // libpq's default root certificate file, used by the verifying modes when none is named.
        let default = PathBuf::from(std::env::var_os("HOME")?).join(".postgresql/root.crt");
        (matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) && default.exists())
            .then_some(default)
    });
    let verify = match (mode, rootcert) {
        (SslMode::Disable | SslMode::Prefer, _) | (SslMode::Require, None) => Verify::None,
        // libpq: "require" with a root certificate behaves like verify-ca.
        (SslMode::Require | SslMode::VerifyCa, Some(p)) => Verify::Chain(load_roots(&p)?),
        (SslMode::VerifyFull, Some(p)) => Verify::ChainAndName(load_roots(&p)?),
        (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
            return Err(DbError::Config(
                "sslmode=verify-ca and verify-full need sslrootcert=<PEM file of the CA \
                 certificate(s) that sign the server's certificate>"
                    .into(),
            ))
        }
    };
    config.ssl_mode(match mode {
        SslMode::Disable => PgSslMode::Disable,
        SslMode::Prefer => PgSslMode::Prefer,
        _ => PgSslMode::Require,
    });
    Ok(Target {
        config,
        tls: connector(verify)?,
        mode,
    })
}

/// What the verifier checks.
#[derive(Debug)]
enum Verify {
    None,
    Chain(Arc<RootCertStore>),
    ChainAndName(Arc<RootCertStore>),
}

fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, DbError> {
    let shown = path.display();
    let pem = std::fs::read(path)
        .map_err(|e| DbError::Config(format!("sslrootcert {shown}: cannot read: {e}")))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert =
            cert.map_err(|e| DbError::Config(format!("sslrootcert {shown}: not PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| DbError::Config(format!("sslrootcert {shown}: {e}")))?;
    }
    if roots.is_empty() {
        return Err(DbError::Config(format!(
            "sslrootcert {shown}: no certificate in the file"
        )));
    }
    Ok(Arc::new(roots))
}

fn connector(verify: Verify) -> Result<Tls, DbError> {
    // An explicit provider: the process-wide default is ambiguous when several crates enable
    // different rustls backends.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| DbError::Config(format!("TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Verifier { verify, provider }))
        .with_no_client_auth();
    Ok(Tls::new(config))
}

/// Checks as much as the mode asks; the handshake signature is always checked.
#[derive(Debug)]
struct Verifier {
    verify: Verify,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let (roots, check_name) = match &self.verify {
            Verify::None => return Ok(ServerCertVerified::assertion()),
            Verify::Chain(r) => (r, false),
            Verify::ChainAndName(r) => (r, true),
        };
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        if check_name {
            if let Err(e) = verify_server_name(&cert, server_name) {
                if !common_name_matches(end_entity, server_name) {
                    return Err(e);
                }
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// libpq's fallback: a certificate without DNS or IP subjectAltName entries is matched by its
/// Common Name (case-insensitively, `*.` matching one label).
fn common_name_matches(der: &CertificateDer<'_>, server_name: &ServerName<'_>) -> bool {
    let host = match server_name {
        ServerName::DnsName(d) => d.as_ref().to_string(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        _ => return false,
    };
    let names = certificate_names(der);
    if names.has_alt_names {
        return false;
    }
    names.common_names.iter().any(|cn| host_matches(cn, &host))
}

/// The names a certificate is issued to.
#[derive(Debug, Default, PartialEq)]
pub struct CertificateNames {
    /// Whether it has DNS or IP subjectAltName entries (then its CN is not used).
    pub has_alt_names: bool,
    pub dns_alt_names: Vec<String>,
    pub common_names: Vec<String>,
}

/// Reads the subjectAltName DNS entries and Common Names of a DER certificate (empty when it
/// does not parse).
pub fn certificate_names(der: &[u8]) -> CertificateNames {
    use x509_cert::der::{Decode, Tag, Tagged};
    use x509_cert::ext::pkix::name::GeneralName;
    use x509_cert::ext::pkix::SubjectAltName;
    let mut out = CertificateNames::default();
    let Ok(cert) = x509_cert::Certificate::from_der(der) else {
        return out;
    };
    let tbs = &cert.tbs_certificate;
    for ext in tbs.extensions.iter().flatten() {
        if ext.extn_id != x509_cert::der::oid::db::rfc5280::ID_CE_SUBJECT_ALT_NAME {
            continue;
        }
        if let Ok(san) = SubjectAltName::from_der(ext.extn_value.as_bytes()) {
            for name in san.0 {
                match name {
                    GeneralName::DnsName(d) => {
                        out.has_alt_names = true;
                        out.dns_alt_names.push(d.to_string());
                    }
                    GeneralName::IpAddress(_) => out.has_alt_names = true,
                    _ => {}
                }
            }
        }
    }
    for rdn in tbs.subject.0.iter() {
        for atv in rdn.0.iter() {
            let text = matches!(
                atv.value.tag(),
                Tag::Utf8String | Tag::PrintableString | Tag::Ia5String
            );
            if atv.oid == x509_cert::der::oid::db::rfc4519::CN && text {
                if let Ok(s) = std::str::from_utf8(atv.value.value()) {
                    out.common_names.push(s.to_string());
                }
            }
        }
    }
    out
}

fn host_matches(pattern: &str, host: &str) -> bool {
    let (pattern, host) = (pattern.to_ascii_lowercase(), host.to_ascii_lowercase());
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .split_once('.')
            .is_some_and(|(first, rest)| !first.is_empty() && rest == suffix),
        None => pattern == host,
    }
}

/// Removes `sslmode` and `sslrootcert` from a connection string; returns the rest and their
/// values. A string that does not scan is returned whole, for tokio-postgres to report.
fn split_tls_params(s: &str) -> (String, Option<String>, Option<String>) {
    let ours = |k: &str| k == "sslmode" || k == "sslrootcert";
    let (mut mode, mut root) = (None, None);
    let mut take = |k: &str, v: String| match k {
        "sslmode" => mode = Some(v),
        _ => root = Some(v),
    };
    if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        let Some((base, query)) = s.split_once('?') else {
            return (s.to_string(), None, None);
        };
        let mut kept = Vec::new();
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if ours(k) {
                let v = percent_encoding::percent_decode_str(v).decode_utf8_lossy();
                take(k, v.into_owned());
            } else {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return (rest, mode, root);
    }
    let Some(pairs) = scan_key_values(s) else {
        return (s.to_string(), None, None);
    };
    let mut rest = String::new();
    let mut last = 0;
    for (k, v, start, end) in pairs {
        if ours(&k) {
            rest.push_str(&s[last..start]);
            last = end;
            take(&k, v);
        }
    }
    rest.push_str(&s[last..]);
    (rest, mode, root)
}

/// Scans `key = value` pairs as tokio-postgres (and libpq) do: values may be single-quoted, and a
/// backslash escapes the next character. Returns (key, value, start, end) of every pair.
fn scan_key_values(s: &str) -> Option<Vec<(String, String, usize, usize)>> {
    let b: Vec<(usize, char)> = s.char_indices().collect();
    let at = |i: usize| b.get(i).map(|&(_, c)| c);
    let pos = |i: usize| b.get(i).map_or(s.len(), |&(p, _)| p);
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        while at(i).is_some_and(char::is_whitespace) {
            i += 1;
        }
        if at(i).is_none() {
            return Some(out);
        }
        let start = pos(i);
        let mut key = String::new();
        while let Some(c) = at(i).filter(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
            i += 1;
        }
        while at(i).is_some_and(char::is_whitespace) {
            i += 1;
        }
        if key.is_empty() || at(i) != Some('=') {
            return None;
        }
        i += 1;
        while at(i).is_some_and(char::is_whitespace) {
            i += 1;
        }
        let mut value = String::new();
        if at(i) == Some('\'') {
            i += 1;
            loop {
                match at(i)? {
                    '\'' => break,
                    '\\' => {
                        value.push(at(i + 1)?);
                        i += 2;
                    }
                    c => {
                        value.push(c);
                        i += 1;
                    }
                }
            }
            i += 1;
        } else {
            while let Some(c) = at(i).filter(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(at(i + 1));
                    i += 2;
                } else {
                    value.push(c);
                    i += 1;
                }
            }
        }
        out.push((key, value, start, pos(i)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_of_urls() {
        let (rest, mode, root) = split_tls_params(
            "postgres://u:p@db:5432/x?application_name=a&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem",
        );
        assert_eq!(rest, "postgres://u:p@db:5432/x?application_name=a");
        assert_eq!(mode.as_deref(), Some("verify-full"));
        assert_eq!(root.as_deref(), Some("/etc/ca.pem"));
        let (rest, mode, root) = split_tls_params("postgresql://db/x?sslmode=require");
        assert_eq!(
            (rest.as_str(), mode.as_deref(), root),
            ("postgresql://db/x", Some("require"), None)
        );
        assert_eq!(split_tls_params("postgres://db/x").0, "postgres://db/x");
    }

    #[test]
    fn tls_parameters_are_taken_out_of_key_value_strings() {
        let (rest, mode, root) = split_tls_params(
            "host=db sslmode = verify-ca password='it\\'s' sslrootcert='/a b/c.pem' dbname=x",
        );
        assert_eq!(rest, "host=db  password='it\\'s'  dbname=x");
        assert_eq!(mode.as_deref(), Some("verify-ca"));
        assert_eq!(root.as_deref(), Some("/a b/c.pem"));
        let cfg = target(&rest).unwrap();
        assert_eq!(cfg.config.get_password(), Some(&b"it's"[..]));
    }

    #[test]
    fn modes_map_to_what_tokio_postgres_negotiates() {
        let t = target("postgres://db/x").unwrap();
        assert_eq!(t.mode, SslMode::Prefer);
        assert_eq!(t.config.get_ssl_mode(), PgSslMode::Prefer);
        let t = target("postgres://db/x?sslmode=disable").unwrap();
        assert_eq!(t.config.get_ssl_mode(), PgSslMode::Disable);
        let t = target("postgres://db/x?sslmode=require").unwrap();
        assert_eq!(t.config.get_ssl_mode(), PgSslMode::Require);
        let e = target("postgres://u:hunter2@db/x?sslmode=verify-full")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("sslrootcert"), "{e}");
        let e = target("postgres://u:hunter2@db/x?sslmode=sometimes")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("sometimes") && !e.contains("hunter2"), "{e}");
        let e = target("postgres://u:hunter2@db/x?sslmode=verify-ca&sslrootcert=/nonexistent.pem")
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("/nonexistent.pem") && !e.contains("hunter2"),
            "{e}"
        );
        let e = target("postgres://u:hunter2@db/x?sslcompression=1")
            .err()
            .unwrap()
            .to_string();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn host_names_match_like_libpq() {
        assert!(host_matches("localhost", "LOCALHOST"));
        assert!(host_matches("*.example.com", "db.example.com"));
        assert!(!host_matches("*.example.com", "a.db.example.com"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(!host_matches("db.example.com", "db.example.org"));
    }

    #[test]
    fn certificate_names_are_read() {
        let mut params = rcgen::CertificateParams::new(vec!["db.example.com".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "cn.example.com");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let names = certificate_names(cert.der());
        assert!(names.has_alt_names);
        assert_eq!(names.dns_alt_names, vec!["db.example.com".to_string()]);
        assert_eq!(names.common_names, vec!["cn.example.com".to_string()]);
        let der = CertificateDer::from(cert.der().to_vec());
        let name = ServerName::try_from("cn.example.com").unwrap();
        assert!(
            !common_name_matches(&der, &name),
            "a certificate with alt names is not matched by its CN"
        );
        // Without alt names, the CN decides.
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "cn.example.com");
        let cert = params.self_signed(&key).unwrap();
        let der = CertificateDer::from(cert.der().to_vec());
        assert!(!certificate_names(&der).has_alt_names);
        assert!(common_name_matches(&der, &name));
        let other = ServerName::try_from("other.example.com").unwrap();
        assert!(!common_name_matches(&der, &other));
    }
}
