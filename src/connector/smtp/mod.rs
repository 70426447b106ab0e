//! The `smtp` connector (`email.agent` / `smtp.agent`): sends e-mail through an SMTP server with
//! lettre's SMTP client, over pooled TCP_NODELAY connections that are reused across messages
//! (Apostol opened one per message; see [`pool`] for why not lettre's own pool).
//!
//! - `address` holds the recipients (comma-separated); the profile gives the server, credentials
//!   and sender; `content` is a complete RFC 5322 message, a JSON form, or a text/HTML body
//!   (see [`content`]).
//! - Classification follows lettre's predicates (RFC 5321 §4.2.1): 4xx replies retry as `smtp-4xx`,
//!   5xx fail as `smtp-5xx`, both with the reply code as remote status; connection, TLS and
//!   protocol failures and timeouts retry (`smtp-connect`, `smtp-network`, `smtp-tls`,
//!   `smtp-protocol`, `timeout`); a message the server cannot take by capability
//!   (e.g. non-ASCII without 8BITMIME) fails as `smtp-client`.
//! - The provider id is the server's queue id from the reply to DATA when it gives one, else the
//!   Message-ID (`<outbox id@sender domain>`, the same on every retry so receivers can de-duplicate).
//!
//! - Capacity vs timeout (issue 8): a delivery first waits for one of the profile's `pool_size`
//!   slots, then gets the whole `timeout` for its connection set-up and transaction
//!   ([`Connector::deliver_within`]); queueing behind a slow server is not a timeout.
//! - TLS policy: credentials go only over TLS (implicit, or STARTTLS). `opportunistic` with
//!   credentials fails with `smtp-tls` when the server offers no STARTTLS, as `starttls` always
//!   does; AUTH in clear text needs `tls = "none"` and `allow_plaintext_auth = true`.
//!
//! Invariants: one pool per profile, its reaper task spawned on first use inside the daemon's
//! runtime; the transaction runs inside the delivery's future, so a delivery that times out or is
//! dropped closes its connection mid-transaction (see [`pool::Pool::send`] for what that means to
//! the server) and never parks it or completes it later; `healthcheck` never opens a
//! connection.

pub mod config;
pub mod content;
pub mod pool;
pub mod services;

use crate::connector::codes;
use std::sync::Arc;

use async_trait::async_trait;
use lettre::address::Envelope as SmtpEnvelope;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::{Credentials, Mechanism, DEFAULT_MECHANISMS};
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::transport::smtp::response::Response;
use lettre::Address;

pub use config::{AuthMethod, SmtpConfig, TlsMode};

use super::{Connector, DeliveryError, OutboxMessage, Receipt};
use crate::settings::{ConfigError, ProfileContext};
use content::{Built, Form};

pub struct SmtpConnector {
    name: String,
    from: Mailbox,
    /// The profile's `timeout`, for a bare [`Connector::deliver`].
    timeout: std::time::Duration,
    pool: Arc<pool::Pool>,
}

impl SmtpConnector {
    pub fn new(ctx: &ProfileContext, cfg: &SmtpConfig) -> Result<Self, ConfigError> {
        let profile = ctx.profile.as_str();
        let r = cfg.resolve(ctx)?;
        let err = |key: &str, msg: String| ctx.error(key, msg);
        let tls_parameters = || -> Result<TlsParameters, ConfigError> {
            let mut b = TlsParameters::builder(r.host.clone());
            if let Some(pem) = &r.ca_pem {
                let cert = Certificate::from_pem(pem)
                    .map_err(|e| err("ca_file", format!("not a PEM certificate: {e}")))?;
                b = b.add_root_certificate(cert);
            }
            b.dangerous_accept_invalid_certs(r.accept_invalid_certs)
                .build_rustls()
                .map_err(|e| err("tls", format!("cannot set up TLS: {e}")))
        };
        let tls = match r.tls {
            TlsMode::None => Tls::None,
            TlsMode::Opportunistic => Tls::Opportunistic(tls_parameters()?),
            TlsMode::Starttls => Tls::Required(tls_parameters()?),
            TlsMode::Tls => Tls::Wrapper(tls_parameters()?),
        };
        let settings = pool::Settings {
            host: r.host.clone(),
            port: r.port,
            tls,
            hello_name: r
                .hello_name
                .as_ref()
                .map_or_else(ClientId::default, |h| ClientId::Domain(h.clone())),
            credentials: r
                .credentials
                .as_ref()
                .map(|(user, pass)| Credentials::new(user.clone(), pass.expose().to_string())),
            mechanisms: match r.auth_method {
                Some(m) => vec![match m {
                    AuthMethod::Plain => Mechanism::Plain,
                    AuthMethod::Login => Mechanism::Login,
                    AuthMethod::Xoauth2 => Mechanism::Xoauth2,
                }],
                None => DEFAULT_MECHANISMS.to_vec(),
            },
            timeout: r.timeout,
            plaintext_auth: r.allow_plaintext_auth,
            pool_size: r.pool_size,
            idle_timeout: r.pool_idle_timeout,
        };
        Ok(SmtpConnector {
            name: format!("smtp/{profile}"),
            from: r.from,
            timeout: r.timeout,
            pool: pool::Pool::new(settings),
        })
    }

    /// The bytes to send and the envelope recipients, from the message's form.
    fn prepare(&self, msg: &OutboxMessage) -> Result<(Built, Option<String>), DeliveryError> {
        let text = msg.content_required()?;
        let to = content::parse_mailboxes(msg.address.as_deref().unwrap_or(""), "address")?;
        let message_id = format!("<{}@{}>", msg.id, self.from.email.domain());
        let env = content::Envelope {
            from: &self.from,
            to,
            subject: msg.subject.as_deref(),
            message_id: message_id.clone(),
        };
        if !msg.images.is_empty() {
            // A picture card: its text is plain (the card's `alt`), never one of the forms.
            return Ok((
                content::build_with_images(text, &msg.images, env)?,
                Some(message_id),
            ));
        }
        match content::detect(text) {
            Form::Raw(raw) => Ok((
                Built {
                    bytes: content::raw_bytes(raw),
                    to: env.to,
                    extra_rcpt: Vec::new(),
                },
                content::raw_header(raw, "message-id"),
            )),
            Form::Json(v) => Ok((content::build_json(v, env)?, Some(message_id))),
            Form::BrokenJson(e) => Err(DeliveryError::permanent(
                codes::BAD_CONTENT.code,
                format!("content looks like the JSON form but is not valid JSON: {e}"),
            )),
            Form::Body(body) => Ok((content::build_body(body, env)?, Some(message_id))),
        }
    }
}

/// Envelope recipients: every `to`, `cc` and `bcc` address once, in order.
fn envelope(from: &Mailbox, built: &Built) -> Result<SmtpEnvelope, DeliveryError> {
    let mut rcpt: Vec<Address> = Vec::new();
    for m in built.to.iter().chain(&built.extra_rcpt) {
        if !rcpt.contains(&m.email) {
            rcpt.push(m.email.clone());
        }
    }
    if rcpt.is_empty() {
        return Err(DeliveryError::permanent(
            codes::BAD_ADDRESS.code,
            "the message has no recipient",
        ));
    }
    SmtpEnvelope::new(Some(from.email.clone()), rcpt)
        .map_err(|e| DeliveryError::permanent(codes::BAD_ADDRESS.code, e.to_string()))
}

/// The house classification of a lettre SMTP error.
pub fn classify(e: &lettre::transport::smtp::Error) -> DeliveryError {
    // lettre's Display includes the source (the server's reply text, the io error).
    let reason = e.to_string();
    let status = e.status().map(|c| i32::from(u16::from(c)));
    let err = if e.is_permanent() {
        DeliveryError::permanent(codes::SMTP_5XX.code, reason)
    } else if e.is_transient() {
        DeliveryError::retry(codes::SMTP_4XX.code, reason)
    } else if e.is_timeout() {
        DeliveryError::retry(codes::TIMEOUT.code, reason)
    } else if e.is_tls() || is_tls_failure(e) {
        DeliveryError::retry(codes::SMTP_TLS.code, reason)
    } else if e.is_client() {
        // lettre refused to send: the server lacks a capability the message needs (SMTPUTF8,
        // 8BITMIME, a common AUTH mechanism). Retrying the same message cannot help.
        DeliveryError::permanent(codes::SMTP_CLIENT.code, reason)
    } else if e.is_response() {
        DeliveryError::retry(codes::SMTP_PROTOCOL.code, reason)
    } else if e.is_transport_shutdown() {
        DeliveryError::retry(codes::SMTP_SHUTDOWN.code, reason)
    } else if reason.starts_with("Connection error") {
        DeliveryError::retry(codes::SMTP_CONNECT.code, reason)
    } else {
        DeliveryError::retry(codes::SMTP_NETWORK.code, reason)
    };
    match status {
        Some(s) => err.with_status(s),
        None => err,
    }
}

/// The house classification of a failed pooled transaction.
fn classify_send(e: pool::SendError) -> DeliveryError {
    match e {
        pool::SendError::Smtp(e) => classify(&e),
        pool::SendError::Connect(e) => {
            DeliveryError::retry(codes::SMTP_CONNECT.code, format!("Connection error: {e}"))
        }
        pool::SendError::Tls(why) => DeliveryError::retry(codes::SMTP_TLS.code, why),
        // As lettre's own client errors (see `classify`).
        pool::SendError::Client(why) => DeliveryError::permanent(codes::SMTP_CLIENT.code, why),
        pool::SendError::Timeout(what) => DeliveryError::retry(codes::TIMEOUT.code, what),
    }
}

/// lettre reports a failed TLS handshake (STARTTLS or implicit) as a connection error whose
/// io::Error has kind `InvalidData` (how tokio-rustls wraps `rustls::Error`, e.g. an untrusted
/// certificate); a refused or reset TCP connection has other kinds.
fn is_tls_failure(e: &lettre::transport::smtp::Error) -> bool {
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::InvalidData;
        }
        src = s.source();
    }
    false
}

/// The queue id in a reply to DATA: `250 2.0.0 Ok: queued as 4Xyz` (Postfix), `250 OK id=1a-2b`
/// (Exim), `250 Ok 0100018e…` (SES); `None` for a bare `OK`.
pub fn queue_id(resp: &Response) -> Option<String> {
    let text = resp.message().collect::<Vec<_>>().join(" ");
    let mut t = text.trim();
    // Drop an enhanced status code (RFC 3463), e.g. "2.0.0".
    if let Some((first, rest)) = t.split_once(' ') {
        if first.split('.').count() == 3 && first.split('.').all(|p| p.parse::<u16>().is_ok()) {
            t = rest.trim();
        }
    }
    if let Some(i) = t.find("queued as ") {
        let id = t[i + 10..].split_whitespace().next()?;
        return Some(id.trim_end_matches(['.', ',', ')']).to_string());
    }
    if let Some(i) = t.find("id=") {
        let id = t[i + 3..].split_whitespace().next()?;
        return Some(id.to_string());
    }
    let lower = t.to_ascii_lowercase();
    let lower = lower.trim_end_matches(['.', '!']);
    let bare = [
        "",
        "ok",
        "queued",
        "accepted",
        "message accepted",
        "ok queued",
    ];
    if bare.contains(&lower) {
        return None;
    }
    Some(
        t.strip_prefix("Ok ")
            .or_else(|| t.strip_prefix("OK "))
            .unwrap_or(t)
            .trim()
            .to_string(),
    )
}

#[async_trait]
impl Connector for SmtpConnector {
    fn name(&self) -> &str {
        &self.name
    }

    async fn deliver(&self, msg: &OutboxMessage) -> Result<Receipt, DeliveryError> {
        self.deliver_within(msg, self.timeout).await
    }

    async fn deliver_within(
        &self,
        msg: &OutboxMessage,
        timeout: std::time::Duration,
    ) -> Result<Receipt, DeliveryError> {
        let (built, message_id) = self.prepare(msg)?;
        let envelope = envelope(&self.from, &built)?;
        // Capacity first, unbounded and cancellable (nothing has been sent yet); the clock of the
        // provider call starts once a slot is held.
        let permit = self.pool.permit().await;
        let deadline = tokio::time::Instant::now() + timeout;
        // In this future, not a task of its own: dropping it (a shutdown) closes the connection
        // mid-transaction, as the deadline does.
        let resp = self
            .pool
            .send(permit, &envelope, &built.bytes, deadline)
            .await
            .map_err(classify_send)?;
        Ok(Receipt {
            provider_id: queue_id(&resp).or(message_id),
            remote_status: Some(i32::from(u16::from(resp.code()))),
            reply: None,
        })
    }

    // Default healthcheck: configuration was resolved in `new`; connecting here could trip a
    // provider's rate limits and `check-config` must not talk to servers.
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(s: &str) -> Response {
        s.parse().unwrap()
    }

    #[test]
    fn queue_ids_are_read_from_common_replies() {
        let cases = [
            ("250 2.0.0 Ok: queued as 4XyzAB12\r\n", Some("4XyzAB12")),
            ("250 OK id=1rAbCd-0001xY-2Z\r\n", Some("1rAbCd-0001xY-2Z")),
            (
                "250 Ok 0100018e-abc-000000\r\n",
                Some("0100018e-abc-000000"),
            ),
            (
                "250 2.0.0 OK  1700000000 a1-20020a.1 - gsmtp\r\n",
                Some("1700000000 a1-20020a.1 - gsmtp"),
            ),
            ("250 OK\r\n", None),
            ("250 2.0.0 Ok\r\n", None),
        ];
        for (r, want) in cases {
            assert_eq!(queue_id(&resp(r)).as_deref(), want, "{r:?}");
        }
    }

    #[test]
    fn a_profile_builds_without_a_runtime_and_without_connecting() {
        let cfg: SmtpConfig =
            toml::from_str("host = \"127.0.0.1\"\nport = 1\ntls = \"starttls\"").unwrap();
        let c = SmtpConnector::new(
            &ProfileContext::new("smtp.conf", "noreply@example.com"),
            &cfg,
        )
        .unwrap();
        assert_eq!(c.name(), "smtp/noreply@example.com");
        assert_eq!(c.pool.idle_count(), 0);
    }
}
