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
//! connection checked with NOOP before reuse, a broken one never parked.
//!
//! Invariants: a connection is parked only after a complete transaction that left it unbroken;
//! every network step (connect with TLS, greeting, EHLO, STARTTLS and AUTH as one step; the NOOP
//! check; the transaction) is bounded by `timeout`, and a connection whose step timed out is
//! dropped, never parked.

use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
#[allow(deprecated)]
use lettre::transport::smtp::client::AsyncNetworkStream;
use lettre::transport::smtp::client::{AsyncSmtpConnection, AsyncTokioStream, Tls};
use lettre::transport::smtp::extension::ClientId;
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
    /// A network step took longer than `timeout`.
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

    /// One SMTP transaction over a pooled (or new) connection. Call it in a task of its own so
    /// that it runs to its end even if the caller stops waiting.
    pub async fn send(
        self: &Arc<Self>,
        _permit: OwnedSemaphorePermit,
        envelope: &Envelope,
        bytes: &[u8],
    ) -> Result<Response, SendError> {
        self.start_reaper();
        let mut conn = self.checkout().await?;
        let t = self.settings.timeout;
        let resp = match tokio::time::timeout(t, conn.send(envelope, bytes)).await {
            Ok(r) => r,
            // Dropped mid-transaction: never parked.
            Err(_) => return Err(SendError::Timeout("SMTP transaction timed out")),
        };
        if !conn.has_broken() {
            let mut idle = self.idle.lock().unwrap();
            if idle.len() < self.settings.pool_size as usize {
                idle.push((conn, Instant::now()));
            }
        }
        resp.map_err(SendError::Smtp)
    }

    async fn checkout(&self) -> Result<AsyncSmtpConnection, SendError> {
        let t = self.settings.timeout;
        loop {
            let parked = self.idle.lock().unwrap().pop();
            let Some((mut conn, since)) = parked else {
                return match tokio::time::timeout(t, self.connect()).await {
                    Ok(r) => r,
                    Err(_) => Err(SendError::Timeout("SMTP connection set-up timed out")),
                };
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
    /// AUTH when there are credentials.
    async fn connect(&self) -> Result<AsyncSmtpConnection, SendError> {
        let s = &self.settings;
        let tcp = TcpStream::connect((s.host.as_str(), s.port))
            .await
            .map_err(SendError::Connect)?;
        tcp.set_nodelay(true).map_err(SendError::Connect)?;
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
            Tls::Opportunistic(params) if conn.can_starttls() => conn
                .starttls(params.clone(), &s.hello_name)
                .await
                .map_err(SendError::Smtp)?,
            Tls::Required(params) => conn
                .starttls(params.clone(), &s.hello_name)
                .await
                .map_err(SendError::Smtp)?,
            _ => {}
        }
        if let Some(credentials) = &s.credentials {
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
