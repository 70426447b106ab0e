//! The SMTP connection pool: lettre's SMTP client ([`AsyncSmtpConnection`]) over TCP sockets that
//! we open ourselves, with TCP_NODELAY.
//!
//! Why not lettre's own pooled `AsyncSmtpTransport`: it never sets TCP_NODELAY, and it writes the
//! DATA terminator `\r\n.\r\n` as a separate small write after the body (lettre's
//! `AsyncSmtpConnection::message_iter`). With Nagle's algorithm on, that small write waits for the
//! ACK of the body, which the server delays (delayed ACK, ~40 ms on Linux), so every mail stalled
//! ~40 ms: 16 connections delivered ~400 msg/s at most. See RFC 896 (Nagle) and RFC 1122
//! §4.2.3.2 (delayed ACK) for the interaction.
//!
//! Behaviour kept from lettre's pool: at most `pool_size` connections (here also at most
//! `pool_size` transactions at once), idle ones closed after `pool_idle_timeout`, a parked
//! connection checked with NOOP before reuse, a broken one never parked. Unlike lettre's, a
//! transaction the server refuses with a reply (a rejected recipient, a rejected DATA) does not
//! cost the connection: the session is reset with RSET and parked, instead of QUIT, reconnect,
//! TLS handshake and AUTH for the next message.
//!
//! Invariants: a connection is parked only after a transaction that ended with a reply (accepted,
//! or refused and reset), never after a network or protocol error; the caller's deadline bounds
//! the checkout (connect with TLS, greeting, EHLO, STARTTLS and AUTH; the NOOP check) and the
//! transaction together, and a connection whose deadline passed mid-transaction, or whose future
//! was dropped, is closed, never parked; AUTH never goes over an unencrypted connection unless
//! the profile allows it (`tls = "none"` and `allow_plaintext_auth = true`).

use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
#[allow(deprecated)]
use lettre::transport::smtp::client::AsyncNetworkStream;
use lettre::transport::smtp::client::{AsyncSmtpConnection, AsyncTokioStream, Tls};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt, Rset};
use lettre::transport::smtp::extension::ClientId;
use lettre::transport::smtp::extension::{Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Where and how to connect.
#[derive(Clone)]
pub struct Settings {
    pub host: String,
    pub port: u16,
    pub tls: Tls,
    pub hello_name: ClientId,
    pub credentials: Option<Credentials>,
    pub mechanisms: Vec<Mechanism>,
    pub timeout: Duration,
    /// AUTH may go over an unencrypted connection (`tls = "none"` + `allow_plaintext_auth`).
    pub plaintext_auth: bool,
    pub pool_size: u32,
    pub idle_timeout: Duration,
}

/// Why a transaction failed.
#[derive(Debug)]
pub enum SendError {
    /// An error lettre reported (replies, TLS, protocol, network).
    Smtp(lettre::transport::smtp::Error),
    /// The TCP connection could not be opened.
    Connect(std::io::Error),
    /// The connection cannot be secured as the profile requires (no STARTTLS offered).
    Tls(&'static str),
    /// The message needs a capability the server lacks (SMTPUTF8, 8BITMIME); nothing was sent.
    Client(&'static str),
    /// The delivery's deadline passed (connection set-up or transaction).
    Timeout(&'static str),
}

pub struct Pool {
    settings: Settings,
    permits: Arc<Semaphore>,
    idle: Mutex<Vec<(AsyncSmtpConnection, Instant)>>,
    /// The idle-connection reaper, spawned on the first checkout (inside the daemon's runtime).
    reaper: OnceLock<()>,
}

impl Pool {
    pub fn new(settings: Settings) -> Arc<Pool> {
        Arc::new(Pool {
            permits: Arc::new(Semaphore::new(settings.pool_size.max(1) as usize)),
            settings,
            idle: Mutex::new(Vec::new()),
            reaper: OnceLock::new(),
        })
    }

    /// A slot for one transaction; waiting for it is cancellable (nothing was sent yet).
    pub async fn permit(&self) -> OwnedSemaphorePermit {
        Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    /// Connections parked now (tests).
    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap().len()
    }

    /// One SMTP transaction over a pooled (or new) connection, holding `_permit` (one of the
    /// pool's slots), finished by `deadline` or abandoned.
    ///
    /// Abandoned means the connection is closed without waiting for the server's next reply:
    /// on the deadline here, or when the caller drops this future (a shutdown). Closed before the
    /// end of the data, the server never has the whole message. Closed after the terminator
    /// `<CRLF>.<CRLF>` but before its reply was read, RFC 5321 §4.1.1.10 says the server "MUST
    /// cancel any pending transaction, but not undo any previously completed transaction": a
    /// server that had not yet sent its 250 drops the mail, so nothing is delivered behind the
    /// daemon's back. The one window left is a 250 already sent but not read in time (RFC 1047's
    /// duplicate problem); the retry then repeats the same Message-ID, which receivers can
    /// de-duplicate on. RFC 5321 §4.5.3.2.6 suggests waiting up to 10 minutes for that reply;
    /// a profile whose `timeout` is far below the server's processing time widens the window.
    pub async fn send(
        self: &Arc<Self>,
        _permit: OwnedSemaphorePermit,
        envelope: &Envelope,
        bytes: &[u8],
        deadline: tokio::time::Instant,
    ) -> Result<Response, SendError> {
        self.start_reaper();
        let mut conn = match tokio::time::timeout_at(deadline, self.checkout()).await {
            Ok(c) => c?,
            Err(_) => return Err(SendError::Timeout("SMTP connection set-up timed out")),
        };
        let ended = match tokio::time::timeout_at(deadline, transaction(&mut conn, envelope, bytes))
            .await
        {
            Ok(ended) => ended,
            // `conn` is dropped here: the socket closes before the reply (see above).
            Err(_) => return Err(SendError::Timeout("SMTP transaction timed out")),
        };
        match ended {
            Ok(resp) => {
                self.park(conn);
                Ok(resp)
            }
            Err(Failure::Refused { error, open }) => {
                // 421: the server is closing the channel (RFC 5321 §4.2.2).
                let closing = error.status().is_some_and(|c| u16::from(c) == 421);
                // RSET aborts the open transaction and clears its buffers (RFC 5321 §4.1.1.5);
                // after the reply to the terminator there is none (§4.1.1.4). Within the same
                // deadline: the refusal is the outcome whether or not the reset succeeds.
                let keep = !closing
                    && (!open
                        || matches!(
                            tokio::time::timeout_at(deadline, conn.command(Rset)).await,
                            Ok(Ok(_))
                        ));
                if keep {
                    self.park(conn);
                }
                Err(SendError::Smtp(error))
            }
            Err(Failure::Unsent(why)) => {
                self.park(conn);
                Err(SendError::Client(why))
            }
            Err(Failure::Broken(e)) => Err(e),
        }
    }

    /// Keeps a connection for the next transaction (unless the pool is full of idle ones).
    fn park(&self, conn: AsyncSmtpConnection) {
        if conn.has_broken() {
            return;
        }
        let mut idle = self.idle.lock().unwrap();
        if idle.len() < self.settings.pool_size as usize {
            idle.push((conn, Instant::now()));
        }
    }

    /// A parked connection that answers NOOP, else a new one. The caller's deadline bounds it.
    async fn checkout(&self) -> Result<AsyncSmtpConnection, SendError> {
        let t = self.settings.timeout;
        loop {
            let parked = self.idle.lock().unwrap().pop();
            let Some((mut conn, since)) = parked else {
                return self.connect().await;
            };
            if since.elapsed() > self.settings.idle_timeout {
                tokio::spawn(close(conn, t));
                continue;
            }
            // Checked with NOOP as lettre's pool does; a dead one is dropped and the next tried.
            if let Ok(true) = tokio::time::timeout(t, conn.test_connected()).await {
                return Ok(conn);
            }
        }
    }

    /// A new connection: TCP with TCP_NODELAY, implicit TLS or STARTTLS as configured, EHLO,
    /// AUTH when there are credentials, and only over TLS unless the profile allows plain text.
    async fn connect(&self) -> Result<AsyncSmtpConnection, SendError> {
        let s = &self.settings;
        let tcp = TcpStream::connect((s.host.as_str(), s.port))
            .await
            .map_err(SendError::Connect)?;
        tcp.set_nodelay(true).map_err(SendError::Connect)?;
        // lettre sees our implicit-TLS stream as a plain one (`is_encrypted` is false), so
        // encryption is tracked here.
        let mut encrypted = false;
        let mut conn = match &s.tls {
            Tls::Wrapper(params) => {
                // Implicit TLS: lettre's own rustls upgrade over our socket, then the greeting
                // and EHLO through the encrypted stream.
                #[allow(deprecated)]
                let mut stream = AsyncNetworkStream::use_existing_tokio1(Box::new(tcp));
                stream
                    .upgrade_tls(params.clone())
                    .await
                    .map_err(SendError::Smtp)?;
                encrypted = true;
                AsyncSmtpConnection::connect_with_transport(
                    Box::new(TlsOver(stream)),
                    &s.hello_name,
                )
                .await
                .map_err(SendError::Smtp)?
            }
            _ => AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &s.hello_name)
                .await
                .map_err(SendError::Smtp)?,
        };
        match &s.tls {
            Tls::Opportunistic(params) | Tls::Required(params) if conn.can_starttls() => {
                conn.starttls(params.clone(), &s.hello_name)
                    .await
                    .map_err(SendError::Smtp)?;
                encrypted = true;
            }
            Tls::Required(_) => {
                conn.abort().await;
                return Err(SendError::Tls(
                    "the server does not offer STARTTLS, which the profile requires",
                ));
            }
            _ => {}
        }
        if let Some(credentials) = &s.credentials {
            // An opportunistic profile whose server (or someone in between, RFC 3207 §6)
            // hides STARTTLS must not hand over its password in clear text.
            if !encrypted && !s.plaintext_auth {
                conn.abort().await;
                return Err(SendError::Tls(
                    "the server does not offer STARTTLS; credentials are never sent over an \
                     unencrypted connection (only tls = \"none\" with allow_plaintext_auth)",
                ));
            }
            conn.auth(&s.mechanisms, credentials)
                .await
                .map_err(SendError::Smtp)?;
        }
        Ok(conn)
    }

    /// Closes connections idle for longer than `idle_timeout`, every `idle_timeout`; ends when
    /// the pool is dropped.
    fn start_reaper(self: &Arc<Self>) {
        self.reaper.get_or_init(|| {
            let weak: Weak<Pool> = Arc::downgrade(self);
            let every = self.settings.idle_timeout.max(Duration::from_millis(100));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let Some(pool) = weak.upgrade() else { return };
                    let expired: Vec<_> = {
                        let mut idle = pool.idle.lock().unwrap();
                        let limit = pool.settings.idle_timeout;
                        let (old, keep) = std::mem::take(&mut *idle)
                            .into_iter()
                            .partition(|(_, since)| since.elapsed() > limit);
                        *idle = keep;
                        old
                    };
                    let t = pool.settings.timeout;
                    drop(pool);
                    for (conn, _) in expired {
                        close(conn, t).await;
                    }
                }
            });
        });
    }
}

/// How a transaction that did not succeed ended.
enum Failure {
    /// The server refused with a reply; the session is still in step. `open`: the refusal came
    /// before the end of the data, so the transaction is still open on the server.
    Refused {
        error: lettre::transport::smtp::Error,
        open: bool,
    },
    /// The message needs a capability the server lacks; nothing was sent.
    Unsent(&'static str),
    /// The connection is unusable (network or protocol error).
    Broken(SendError),
}

/// MAIL, RCPT for every recipient, DATA, the message: lettre's `AsyncSmtpConnection::send`
/// without its QUIT-and-close on a refusal, which the caller handles (RSET and reuse).
async fn transaction(
    conn: &mut AsyncSmtpConnection,
    envelope: &Envelope,
    email: &[u8],
) -> Result<Response, Failure> {
    // Internationalisation as lettre does it: SMTPUTF8 (RFC 6531) for non-ASCII addresses,
    // 8BITMIME (RFC 6152) for a non-ASCII body; without the extension, nothing is sent.
    let mut params = Vec::new();
    let non_ascii_address = envelope
        .from()
        .into_iter()
        .chain(envelope.to())
        .any(|a| !AsRef::<str>::as_ref(a).is_ascii());
    if non_ascii_address {
        if !conn.server_info().supports_feature(Extension::SmtpUtfEight) {
            return Err(Failure::Unsent(
                "Envelope contains non-ascii chars but server does not support SMTPUTF8",
            ));
        }
        params.push(MailParameter::SmtpUtfEight);
    }
    if !email.is_ascii() {
        if !conn.server_info().supports_feature(Extension::EightBitMime) {
            return Err(Failure::Unsent(
                "Message contains non-ascii chars but server does not support 8BITMIME",
            ));
        }
        params.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    // A negative reply leaves the session in step; anything else does not.
    let ended = |open: bool| {
        move |error: lettre::transport::smtp::Error| {
            if error.status().is_some() {
                Failure::Refused { error, open }
            } else {
                Failure::Broken(SendError::Smtp(error))
            }
        }
    };
    conn.command(Mail::new(envelope.from().cloned(), params))
        .await
        .map_err(ended(true))?;
    for to in envelope.to() {
        conn.command(Rcpt::new(to.clone(), Vec::new()))
            .await
            .map_err(ended(true))?;
    }
    conn.command(Data).await.map_err(ended(true))?;
    conn.message(email).await.map_err(ended(false))
}

/// QUIT, bounded; the socket closes when the connection is dropped.
async fn close(mut conn: AsyncSmtpConnection, t: Duration) {
    let _ = tokio::time::timeout(t, conn.quit()).await;
}

/// lettre's TLS stream (futures-io traits) seen as a tokio stream, so that
/// [`AsyncSmtpConnection::connect_with_transport`] can run the SMTP session over it.
#[allow(deprecated)]
#[derive(Debug)]
struct TlsOver(AsyncNetworkStream);

impl AsyncRead for TlsOver {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let slice = buf.initialize_unfilled();
        match futures::io::AsyncRead::poll_read(Pin::new(&mut self.0), cx, slice) {
            Poll::Ready(Ok(n)) => {
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for TlsOver {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        futures::io::AsyncWrite::poll_write(Pin::new(&mut self.0), cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        futures::io::AsyncWrite::poll_flush(Pin::new(&mut self.0), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        futures::io::AsyncWrite::poll_close(Pin::new(&mut self.0), cx)
    }
}

impl AsyncTokioStream for TlsOver {
    fn peer_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.0.peer_addr()
    }
}
