//! The `smtp` profile as written in `smtp.conf` ([`SmtpConfig`], pure serde data) and its
//! resolution into the settings the connector uses ([`Resolved`]): preset, then explicit keys.
//!
//! Invariants: explicit keys always override the `service` preset; an unknown `service` is rejected
//! while the file is parsed, so the error names the file and the key; the password is a
//! [`Secret`] from exactly the first of `password`, `password_env`, `password_file` that is set.

use std::path::PathBuf;
use std::time::Duration;

use lettre::message::Mailbox;
use serde::{Deserialize, Deserializer};

use super::services::{self, Service};
use crate::settings::{ConfigError, Dur, ProfileContext, Secret, SecretSource};

/// An `smtp` profile. The profile's table name may be an address (`["noreply@example.com"]`,
/// Apostol's `<profile>@<domain>`), which then is the default sender.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    /// A well-known provider (nodemailer's list: `"QQ"`, `"Gmail"`, `"163"`, `"Feishu Mail"`, an
    /// e-mail address at the provider's domain…) that fills in `host`, `port` and `tls`.
    pub service: Option<ServiceName>,
    /// Legacy nodemailer option (`secureConnection`): true = implicit TLS, false = STARTTLS when
    /// offered. `tls` wins over it.
    #[serde(alias = "secureConnection")]
    pub secure_connection: Option<bool>,
    /// Server host name or IP. Default: the preset's, else `localhost`.
    pub host: Option<String>,
    /// Server port. Default: the preset's, else 465 for `tls = "tls"`, 25 for `"none"`, else 587.
    pub port: Option<u16>,
    /// `none`, `opportunistic` (STARTTLS when offered), `starttls` (required) or `tls` (implicit
    /// TLS, SMTPS). Default: the preset's, else `tls` on port 465 and `starttls` on any other.
    pub tls: Option<TlsMode>,
    /// SASL user name; with a password, the connection authenticates, over TLS only (see
    /// `allow_plaintext_auth`).
    pub username: Option<String>,
    /// Password, inline…
    pub password: Option<Secret>,
    /// …or from this environment variable…
    pub password_env: Option<String>,
    /// …or from this file (trailing newline trimmed).
    pub password_file: Option<PathBuf>,
    /// SASL mechanism: `PLAIN`, `LOGIN` or `XOAUTH2` (password = token). Default: the preset's,
    /// else PLAIN, then LOGIN, whichever the server offers.
    pub auth_method: Option<AuthMethod>,
    /// Envelope sender and `From:`, `addr@domain` or `Name <addr@domain>`. Default: the profile
    /// name when it is an address, else `username` when it is one.
    pub from: Option<String>,
    /// Display name of `From:` (UTF-8 allowed) when `from` has none.
    pub from_name: Option<String>,
    /// Name sent with EHLO. Default: this machine's host name.
    pub hello_name: Option<String>,
    /// Connections kept open and reused across messages, one transaction each; deliveries
    /// beyond it wait for a free one, outside `timeout`. Default 4.
    pub pool_size: Option<u32>,
    /// Pooled connections idle for longer are closed. Default 60s.
    pub pool_idle_timeout: Option<Dur>,
    /// The common per-delivery timeout, counted from the moment the delivery holds a pool slot:
    /// it bounds connecting (TLS, AUTH) and the transaction together. Default 30s.
    pub timeout: Option<Dur>,
    /// PEM file with extra CA certificates to trust (a private CA, a self-signed server).
    pub ca_file: Option<PathBuf>,
    /// Accept any server certificate. FOR TESTING ONLY: it disables TLS server authentication.
    #[serde(default)]
    pub accept_invalid_certs: bool,
    /// Send the credentials over an unencrypted connection. Only with `tls = "none"` (a trusted
    /// local relay); required there when credentials are set. Default false.
    #[serde(default)]
    pub allow_plaintext_auth: bool,
}

/// How the connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plain text only (local relays, test servers).
    None,
    /// STARTTLS when the server offers it, plain text otherwise (nodemailer's default) — but
    /// never AUTH in plain text: with credentials and no STARTTLS offered, delivery fails with
    /// `smtp-tls`, as with `Starttls`.
    Opportunistic,
    /// STARTTLS, and fail when the server does not offer it.
    Starttls,
    /// TLS from the first byte (SMTPS, RFC 8314), usually port 465.
    #[serde(alias = "implicit", alias = "ssl", alias = "smtps")]
    Tls,
}

/// SASL mechanisms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum AuthMethod {
    #[serde(alias = "plain")]
    Plain,
    #[serde(alias = "login")]
    Login,
    #[serde(alias = "xoauth2")]
    Xoauth2,
}

/// A `service` value that names a built-in preset (checked while the file is parsed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceName {
    pub written: String,
    pub service: &'static Service,
}

impl<'de> Deserialize<'de> for ServiceName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let written = String::deserialize(d)?;
        match services::lookup(&written) {
            Some(service) => Ok(ServiceName { written, service }),
            None => Err(serde::de::Error::custom(format!(
                // The value is repeated so the message reads well on its own.
                "service = \"{written}\": unknown service (known: {}; or set host/port/tls instead)",
                services::names().join(", ")
            ))),
        }
    }
}

/// A profile with presets applied and secrets read.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub credentials: Option<(String, Secret)>,
    pub auth_method: Option<AuthMethod>,
    pub from: Mailbox,
    pub hello_name: Option<String>,
    pub pool_size: u32,
    pub pool_idle_timeout: Duration,
    pub timeout: Duration,
    pub ca_pem: Option<Vec<u8>>,
    pub accept_invalid_certs: bool,
    pub allow_plaintext_auth: bool,
}

impl SmtpConfig {
    /// Applies the preset and defaults, reads secrets and the CA file. Errors name
    /// the profile's file and `<profile>.<key>`.
    pub fn resolve(&self, ctx: &ProfileContext) -> Result<Resolved, ConfigError> {
        let err = |key: &str, msg: String| ctx.error(key, msg);
        let preset = self.service.as_ref().map(|s| s.service);
        // Presets never resolve to opportunistic STARTTLS: every provider in the table takes
        // credentials, and a provider's submission port that loses its STARTTLS (a downgrade,
        // RFC 3207 §6) must fail, not fall back to plain text. nodemailer is more lenient
        // (`secure: false` = STARTTLS when offered); only an explicit `tls` key gets that here.
        let preset_tls = preset.map(|p| {
            if p.ignore_tls {
                TlsMode::None
            } else if p.secure && p.port == Some(587) {
                // Disroot says `secure: true` on 587, the STARTTLS submission port (RFC 8314
                // §3.3): implicit TLS there cannot work, so read it as "TLS required".
                TlsMode::Starttls
            } else if p.secure || p.port == Some(465) {
                // 465 is the implicit-TLS submission port (RFC 8314 §3.3) even where the table
                // omits `secure` (Bluewin, Loopia).
                TlsMode::Tls
            } else {
                TlsMode::Starttls
            }
        });
        let legacy_tls = self.secure_connection.map(|s| {
            if s {
                TlsMode::Tls
            } else {
                TlsMode::Opportunistic
            }
        });
        let port_hint = self.port.or(preset.and_then(|p| p.port));
        let tls = self
            .tls
            .or(legacy_tls)
            .or(preset_tls)
            .unwrap_or(match port_hint {
                Some(465) => TlsMode::Tls,
                _ => TlsMode::Starttls,
            });
        let port = port_hint.unwrap_or(match tls {
            TlsMode::Tls => 465,
            TlsMode::None => 25,
            _ => 587,
        });
        let host = self
            .host
            .clone()
            .or_else(|| preset.and_then(|p| p.host.clone()))
            .unwrap_or_else(|| "localhost".into());
        if host.trim().is_empty() {
            return Err(err("host", "must not be empty".into()));
        }

        let password = SecretSource::of(&self.password, &self.password_env, &self.password_file)
            .resolve("password")
            .map_err(|m| err("password", m))?;
        let credentials = match (&self.username, password) {
            (Some(u), Some(p)) => Some((u.clone(), p)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(err(
                    "password",
                    "username is set: set one of password, password_env, password_file".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(err(
                    "username",
                    "a password is set without a username".into(),
                ))
            }
        };
        let auth_method = self.auth_method.or_else(|| {
            preset.and_then(|p| p.auth_method.as_deref()).and_then(|m| {
                match m.to_ascii_uppercase().as_str() {
                    "PLAIN" => Some(AuthMethod::Plain),
                    "LOGIN" => Some(AuthMethod::Login),
                    "XOAUTH2" => Some(AuthMethod::Xoauth2),
                    _ => None,
                }
            })
        });

        let from = match &self.from {
            Some(f) => f
                .parse::<Mailbox>()
                .map_err(|e| err("from", format!("invalid address \"{f}\": {e}")))?,
            None => ctx
                .profile
                .as_str()
                .parse::<Mailbox>()
                .ok()
                .filter(|m| m.name.is_none())
                .or_else(|| self.username.as_deref().and_then(|u| u.parse().ok()))
                .ok_or_else(|| {
                    err(
                        "from",
                        "required (the profile name and the username are not addresses)".into(),
                    )
                })?,
        };
        let from = match (&from.name, &self.from_name) {
            (None, Some(n)) => Mailbox::new(Some(n.clone()), from.email),
            _ => from,
        };

        let ca_pem = match &self.ca_file {
            Some(p) => Some(
                std::fs::read(p)
                    .map_err(|e| err("ca_file", format!("cannot read {}: {e}", p.display())))?,
            ),
            None => None,
        };
        // RFC 8314 §4.1 / RFC 4954 §4: no password over an unencrypted connection unless the
        // profile says so twice (no TLS at all, and plain-text AUTH allowed).
        match (tls, credentials.is_some(), self.allow_plaintext_auth) {
            (TlsMode::None, true, false) => {
                return Err(err(
                    "tls",
                    "tls = \"none\" with a username and password would send the password in \
                     clear text: use \"starttls\" or \"tls\", or, for a trusted local relay only, \
                     set allow_plaintext_auth = true"
                        .into(),
                ))
            }
            (TlsMode::None, _, _) | (_, _, false) => {}
            (_, _, true) => {
                return Err(err(
                    "allow_plaintext_auth",
                    "applies only with tls = \"none\": every other mode authenticates over TLS \
                     only"
                        .into(),
                ))
            }
        }
        let pool_size = self.pool_size.unwrap_or(4);
        if pool_size == 0 {
            return Err(err("pool_size", "must be at least 1".into()));
        }
        Ok(Resolved {
            host,
            port,
            tls,
            credentials,
            auth_method,
            from,
            hello_name: self.hello_name.clone(),
            pool_size,
            pool_idle_timeout: self
                .pool_idle_timeout
                .map_or(Duration::from_secs(60), |d| d.0),
            timeout: self.timeout.map_or(Duration::from_secs(30), |d| d.0),
            ca_pem,
            accept_invalid_certs: self.accept_invalid_certs,
            allow_plaintext_auth: self.allow_plaintext_auth,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> SmtpConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn a_preset_fills_host_port_and_tls_and_explicit_keys_win() {
        let r = parse("service = \"QQ\"\nusername = \"a@qq.com\"\npassword = \"x\"")
            .resolve(&ProfileContext::new("smtp.conf", "p"))
            .unwrap();
        assert_eq!(
            (r.host.as_str(), r.port, r.tls),
            ("smtp.qq.com", 465, TlsMode::Tls)
        );
        assert_eq!(r.from.email.to_string(), "a@qq.com");
        let r = parse("service = \"qq\"\nport = 587\ntls = \"starttls\"\nfrom = \"a@b.c\"")
            .resolve(&ProfileContext::new("smtp.conf", "p"))
            .unwrap();
        assert_eq!(
            (r.host.as_str(), r.port, r.tls),
            ("smtp.qq.com", 587, TlsMode::Starttls)
        );
        let r = parse("service = \"Gmail\"\nhost = \"relay.local\"\nfrom = \"a@b.c\"")
            .resolve(&ProfileContext::new("smtp.conf", "p"))
            .unwrap();
        assert_eq!(
            (r.host.as_str(), r.port, r.tls),
            ("relay.local", 465, TlsMode::Tls)
        );
    }

    #[test]
    fn quirky_presets_resolve() {
        let r = parse("service = \"Maildev\"")
            .resolve(&ProfileContext::new("smtp.conf", "n@x.org"))
            .unwrap();
        assert_eq!(
            (r.host.as_str(), r.port, r.tls),
            ("localhost", 1025, TlsMode::None)
        );
        let r = parse("service = \"hot.ee\"")
            .resolve(&ProfileContext::new("smtp.conf", "n@x.org"))
            .unwrap();
        assert_eq!(
            (r.host.as_str(), r.port, r.tls),
            ("mail.hot.ee", 587, TlsMode::Starttls)
        );
        let r = parse("service = \"Disroot\"")
            .resolve(&ProfileContext::new("smtp.conf", "n@x.org"))
            .unwrap();
        assert_eq!((r.port, r.tls), (587, TlsMode::Starttls));
        assert_eq!(r.auth_method, Some(AuthMethod::Login));
        let r = parse("service = \"Outlook365\"")
            .resolve(&ProfileContext::new("smtp.conf", "n@x.org"))
            .unwrap();
        assert_eq!((r.port, r.tls), (587, TlsMode::Starttls));
        let r = parse("service = \"Bluewin\"")
            .resolve(&ProfileContext::new("smtp.conf", "n@x.org"))
            .unwrap();
        assert_eq!((r.port, r.tls), (465, TlsMode::Tls));
    }

    #[test]
    fn no_preset_is_opportunistic() {
        for name in services::names() {
            let r = parse(&format!("service = \"{name}\"\nfrom = \"a@b.c\""))
                .resolve(&ProfileContext::new("smtp.conf", "p"))
                .unwrap();
            assert_ne!(r.tls, TlsMode::Opportunistic, "{name}");
        }
    }

    #[test]
    fn plaintext_auth_needs_tls_none_and_the_explicit_key() {
        let creds = "host = \"h\"\nusername = \"u\"\npassword = \"p\"\n";
        let e = parse(&format!("{creds}tls = \"none\""))
            .resolve(&ProfileContext::new("smtp.conf", "a@b.c"))
            .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("a@b.c.tls"));
        assert!(e.message.contains("allow_plaintext_auth"), "{e}");
        assert!(
            !e.message.contains("\"p\""),
            "no secret in the message: {e}"
        );
        let r = parse(&format!(
            "{creds}tls = \"none\"\nallow_plaintext_auth = true"
        ))
        .resolve(&ProfileContext::new("smtp.conf", "a@b.c"))
        .unwrap();
        assert!(r.allow_plaintext_auth);
        let e = parse(&format!(
            "{creds}tls = \"opportunistic\"\nallow_plaintext_auth = true"
        ))
        .resolve(&ProfileContext::new("smtp.conf", "a@b.c"))
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("a@b.c.allow_plaintext_auth"));
        // Without credentials, plain text is fine.
        parse("host = \"h\"\ntls = \"none\"")
            .resolve(&ProfileContext::new("smtp.conf", "a@b.c"))
            .unwrap();
    }

    #[test]
    fn legacy_secure_connection_is_accepted() {
        let r = parse("host = \"h\"\nport = 2465\nsecureConnection = true")
            .resolve(&ProfileContext::new("smtp.conf", "n@x.org"))
            .unwrap();
        assert_eq!(r.tls, TlsMode::Tls);
        let r = parse("service = \"QQ\"\nsecure_connection = false")
            .resolve(&ProfileContext::new("smtp.conf", "n@x.org"))
            .unwrap();
        assert_eq!((r.port, r.tls), (465, TlsMode::Opportunistic));
    }

    #[test]
    fn defaults_without_a_preset() {
        let r = parse("host = \"h\"")
            .resolve(&ProfileContext::new("smtp.conf", "n@x.org"))
            .unwrap();
        assert_eq!((r.port, r.tls), (587, TlsMode::Starttls));
        let r = parse("host = \"h\"\nport = 465")
            .resolve(&ProfileContext::new("smtp.conf", "n@x.org"))
            .unwrap();
        assert_eq!(r.tls, TlsMode::Tls);
        let r = parse("host = \"h\"\ntls = \"none\"")
            .resolve(&ProfileContext::new("smtp.conf", "n@x.org"))
            .unwrap();
        assert_eq!(r.port, 25);
    }

    #[test]
    fn the_sender_comes_from_from_the_profile_name_or_the_username() {
        let r = parse("host = \"h\"\nfrom = \"Служба <svc@x.org>\"")
            .resolve(&ProfileContext::new("smtp.conf", "p"))
            .unwrap();
        assert_eq!(r.from.name.as_deref(), Some("Служба"));
        let r = parse("host = \"h\"\nfrom_name = \"Outbox\"")
            .resolve(&ProfileContext::new("smtp.conf", "noreply@example.com"))
            .unwrap();
        assert_eq!(r.from.to_string(), "Outbox <noreply@example.com>");
        let e = parse("host = \"h\"")
            .resolve(&ProfileContext::new("smtp.conf", "default"))
            .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("default.from"));
    }

    #[test]
    fn credentials_need_both_halves() {
        let e = parse("host = \"h\"\nusername = \"u\"")
            .resolve(&ProfileContext::new("smtp.conf", "a@b.c"))
            .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("a@b.c.password"));
        let e = parse(
            "host = \"h\"\npassword_env = \"OUTBOXD_TEST_SURELY_UNSET_VAR\"\nusername = \"u\"",
        )
        .resolve(&ProfileContext::new("smtp.conf", "a@b.c"))
        .unwrap_err();
        assert!(e.message.contains("OUTBOXD_TEST_SURELY_UNSET_VAR"), "{e}");
    }

    #[test]
    fn an_unknown_service_is_rejected_while_parsing() {
        let e = toml::from_str::<SmtpConfig>("service = \"Nope Mail\"").unwrap_err();
        assert!(
            e.message()
                .contains("service = \"Nope Mail\": unknown service"),
            "{e}"
        );
    }
}
