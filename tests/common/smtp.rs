//! An in-process SMTP server on 127.0.0.1:0 for the smtp connector's tests: EHLO/HELO, AUTH PLAIN
//! and LOGIN against one user, STARTTLS or implicit TLS with a self-signed certificate made at
//! test time (rcgen + tokio-rustls), MAIL/RCPT/DATA with dot-unstuffing, RSET/NOOP/QUIT.
//! Behaviour is switchable while it runs (accept, 4xx/5xx on RCPT or DATA, a delay before the
//! reply to the DATA terminator); it records every message (envelope + raw bytes), counts TCP
//! connections, DATA terminators received, RSETs, and transactions aborted because the client
//! closed the connection before the reply to the terminator.
//!
//! It checks what a real server checks: AUTH is offered only when configured (and, with
//! STARTTLS, only after the upgrade), MAIL before AUTH is refused when AUTH is required, DATA
//! needs a recipient, a line starting with "." is unstuffed (RFC 5321 §4.5.2), and a connection
//! closed before the reply to the terminator cancels the transaction (RFC 5321 §4.1.1.10: the server
//! "MUST cancel any pending transaction"), so such a mail is not accepted.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_rustls::rustls;

/// How the server answers transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpBehaviour {
    Accept,
    /// `450 4.2.1` to every RCPT.
    TempFailRcpt,
    /// `550 5.1.1` to every RCPT.
    PermFailRcpt,
    /// `451 4.3.0` after the data.
    TempFailData,
    /// `554 5.6.0` after the data.
    PermFailData,
    /// Never replies after the data.
    HangData,
}

/// How connections are secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerTls {
    None,
    /// Plain connection that offers STARTTLS.
    Starttls,
    /// TLS from the first byte.
    Implicit,
}

/// One message the server accepted.
#[derive(Debug, Clone)]
pub struct Mail {
    pub from: String,
    pub rcpt: Vec<String>,
    /// The data after dot-unstuffing, up to (not including) the terminating ".\r\n".
    pub data: Vec<u8>,
    pub auth_user: Option<String>,
    pub tls: bool,
    /// 1-based number of the TCP connection it came on.
    pub connection: usize,
}

struct State {
    behaviour: Mutex<SmtpBehaviour>,
    /// How long the server takes to answer the DATA terminator.
    data_delay: Mutex<Duration>,
    mails: Mutex<Vec<Mail>>,
    connections: AtomicUsize,
    /// DATA terminators received (transactions the client completed on its side).
    terminators: AtomicUsize,
    /// Transactions cancelled because the connection closed before the terminator's reply.
    aborted: AtomicUsize,
    rsets: AtomicUsize,
    /// Terminators received and not yet answered (or abandoned).
    pending: AtomicUsize,
    /// (mechanism, user, accepted) of every AUTH attempt.
    auths: Mutex<Vec<(String, String, bool)>>,
    credentials: Option<(String, String)>,
    tls: ServerTls,
    acceptor: tokio_rustls::TlsAcceptor,
}

#[derive(Clone)]
pub struct SmtpServer {
    pub port: u16,
    /// PEM of the self-signed certificate (valid for 127.0.0.1 and localhost).
    pub cert_pem: String,
    state: Arc<State>,
    _shutdown: Arc<tokio::sync::oneshot::Sender<()>>,
}

impl SmtpServer {
    /// Starts a server; `credentials` makes AUTH mandatory.
    pub async fn start(tls: ServerTls, credentials: Option<(&str, &str)>) -> SmtpServer {
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
            .unwrap();
        let cert_der = ck.cert.der().clone();
        let key_der =
            rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert_der], key_der)
        .unwrap();
        let state = Arc::new(State {
            behaviour: Mutex::new(SmtpBehaviour::Accept),
            data_delay: Mutex::new(Duration::ZERO),
            mails: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
            terminators: AtomicUsize::new(0),
            aborted: AtomicUsize::new(0),
            rsets: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            auths: Mutex::new(Vec::new()),
            credentials: credentials.map(|(u, p)| (u.to_string(), p.to_string())),
            tls,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut rx => break,
                    accepted = listener.accept() => {
                        let Ok((sock, _)) = accepted else { continue };
                        let n = st.connections.fetch_add(1, Ordering::SeqCst) + 1;
                        let st = st.clone();
                        tokio::spawn(async move {
                            if st.tls == ServerTls::Implicit {
                                if let Ok(tls) = st.acceptor.accept(sock).await {
                                    let _ = session(tls, st.clone(), n, true).await;
                                }
                            } else if let Ok(Some(plain)) = session(sock, st.clone(), n, false).await {
                                if let Ok(tls) = st.acceptor.accept(plain).await {
                                    let _ = session(tls, st.clone(), n, true).await;
                                }
                            }
                        });
                    }
                }
            }
        });
        SmtpServer {
            port,
            cert_pem: ck.cert.pem(),
            state,
            _shutdown: Arc::new(tx),
        }
    }

    pub fn set(&self, b: SmtpBehaviour) {
        *self.state.behaviour.lock().unwrap() = b;
    }

    /// Every later reply to a DATA terminator comes after `d` (the client may hang up meanwhile).
    pub fn set_data_delay(&self, d: Duration) {
        *self.state.data_delay.lock().unwrap() = d;
    }

    /// DATA terminators received so far.
    pub fn terminators(&self) -> usize {
        self.state.terminators.load(Ordering::SeqCst)
    }

    /// Transactions the client abandoned by closing the connection before the terminator's reply.
    pub fn aborted(&self) -> usize {
        self.state.aborted.load(Ordering::SeqCst)
    }

    /// Transactions whose terminator arrived and whose reply is not sent yet.
    pub fn pending(&self) -> usize {
        self.state.pending.load(Ordering::SeqCst)
    }

    pub fn rsets(&self) -> usize {
        self.state.rsets.load(Ordering::SeqCst)
    }

    /// The Message-ID header of every accepted mail, in order.
    pub fn message_ids(&self) -> Vec<String> {
        self.mails()
            .iter()
            .map(|m| {
                String::from_utf8_lossy(&m.data)
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("message-id")
                            .then(|| value.trim().to_string())
                    })
                    .unwrap_or_default()
            })
            .collect()
    }

    pub fn mails(&self) -> Vec<Mail> {
        self.state.mails.lock().unwrap().clone()
    }

    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    pub fn auths(&self) -> Vec<(String, String, bool)> {
        self.state.auths.lock().unwrap().clone()
    }
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn unb64(s: &str) -> Option<String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .ok()?;
    String::from_utf8(bytes).ok()
}

/// Runs one session on `io`. Returns the plain stream when the client asked for STARTTLS.
async fn session<S>(io: S, st: Arc<State>, conn: usize, tls: bool) -> std::io::Result<Option<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut io = BufReader::new(io);
    if !tls || st.tls == ServerTls::Implicit {
        io.write_all(b"220 test.local ESMTP outboxd-test\r\n")
            .await?;
    }
    let mut user: Option<String> = None;
    let mut from: Option<String> = None;
    let mut rcpt: Vec<String> = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if io.read_until(b'\n', &mut line).await? == 0 {
            return Ok(None);
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        let upper = text.to_ascii_uppercase();
        let verb = upper.split_whitespace().next().unwrap_or("").to_string();
        let auth_offered = st.credentials.is_some() && (tls || st.tls != ServerTls::Starttls);
        let reply: String = match verb.as_str() {
            "EHLO" => {
                let mut r = String::from("250-test.local greets you\r\n");
                if st.tls == ServerTls::Starttls && !tls {
                    r.push_str("250-STARTTLS\r\n");
                }
                if auth_offered {
                    r.push_str("250-AUTH PLAIN LOGIN\r\n");
                }
                r.push_str("250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 10485760\r\n");
                r
            }
            "HELO" => "250 test.local\r\n".into(),
            "STARTTLS" if st.tls == ServerTls::Starttls && !tls => {
                io.write_all(b"220 2.0.0 Ready to start TLS\r\n").await?;
                io.flush().await?;
                return Ok(Some(io.into_inner()));
            }
            "AUTH" if auth_offered => {
                let parts: Vec<&str> = text.split_whitespace().collect();
                let mech = parts
                    .get(1)
                    .map(|m| m.to_ascii_uppercase())
                    .unwrap_or_default();
                let (u, p) = match mech.as_str() {
                    "PLAIN" => {
                        let initial = match parts.get(2) {
                            Some(i) => i.to_string(),
                            None => {
                                io.write_all(b"334 \r\n").await?;
                                read_line(&mut io).await?
                            }
                        };
                        let decoded = unb64(&initial).unwrap_or_default();
                        let mut f = decoded.split('\0');
                        let _authzid = f.next();
                        (
                            f.next().unwrap_or("").to_string(),
                            f.next().unwrap_or("").to_string(),
                        )
                    }
                    "LOGIN" => {
                        let u = match parts.get(2) {
                            Some(i) => unb64(i).unwrap_or_default(),
                            None => {
                                io.write_all(format!("334 {}\r\n", b64("Username:")).as_bytes())
                                    .await?;
                                unb64(&read_line(&mut io).await?).unwrap_or_default()
                            }
                        };
                        io.write_all(format!("334 {}\r\n", b64("Password:")).as_bytes())
                            .await?;
                        let p = unb64(&read_line(&mut io).await?).unwrap_or_default();
                        (u, p)
                    }
                    _ => {
                        io.write_all(b"504 5.5.4 Unrecognized authentication type\r\n")
                            .await?;
                        continue;
                    }
                };
                let ok = st.credentials.as_ref() == Some(&(u.clone(), p));
                st.auths.lock().unwrap().push((mech, u.clone(), ok));
                if ok {
                    user = Some(u);
                    "235 2.7.0 Authentication successful\r\n".into()
                } else {
                    "535 5.7.8 Authentication credentials invalid\r\n".into()
                }
            }
            "MAIL" => {
                if st.credentials.is_some() && user.is_none() {
                    "530 5.7.0 Authentication required\r\n".into()
                } else if let Some(addr) = path_of(&text) {
                    from = Some(addr);
                    rcpt.clear();
                    "250 2.1.0 Ok\r\n".into()
                } else {
                    "501 5.5.4 Syntax: MAIL FROM:<address>\r\n".into()
                }
            }
            "RCPT" => {
                if from.is_none() {
                    "503 5.5.1 Need MAIL first\r\n".into()
                } else {
                    match (*st.behaviour.lock().unwrap(), path_of(&text)) {
                        (_, None) => "501 5.5.4 Syntax: RCPT TO:<address>\r\n".into(),
                        (SmtpBehaviour::TempFailRcpt, _) => {
                            "450 4.2.1 Mailbox temporarily unavailable\r\n".into()
                        }
                        (SmtpBehaviour::PermFailRcpt, _) => "550 5.1.1 No such user\r\n".into(),
                        (_, Some(addr)) => {
                            rcpt.push(addr);
                            "250 2.1.5 Ok\r\n".into()
                        }
                    }
                }
            }
            "DATA" => {
                if rcpt.is_empty() {
                    "503 5.5.1 Need RCPT first\r\n".into()
                } else {
                    io.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                        .await?;
                    let mut data = Vec::new();
                    loop {
                        line.clear();
                        if io.read_until(b'\n', &mut line).await? == 0 {
                            return Ok(None);
                        }
                        if line == b".\r\n" {
                            break;
                        }
                        // Dot-unstuffing (RFC 5321 §4.5.2).
                        let l = if line.starts_with(b".") {
                            &line[1..]
                        } else {
                            &line[..]
                        };
                        data.extend_from_slice(l);
                    }
                    st.terminators.fetch_add(1, Ordering::SeqCst);
                    st.pending.fetch_add(1, Ordering::SeqCst);
                    let _answered = Decrement(&st.pending);
                    let delay = *st.data_delay.lock().unwrap();
                    let behaviour = *st.behaviour.lock().unwrap();
                    let wait = async {
                        if behaviour == SmtpBehaviour::HangData {
                            std::future::pending::<()>().await;
                        }
                        tokio::time::sleep(delay).await;
                    };
                    // While it "processes" the mail, the server notices a client that hangs up:
                    // the transaction is then cancelled, not delivered (RFC 5321 §4.1.1.10).
                    tokio::pin!(wait);
                    tokio::select! {
                        _ = &mut wait => {}
                        peek = io.fill_buf() => {
                            if peek.map_or(true, |b| b.is_empty()) {
                                st.aborted.fetch_add(1, Ordering::SeqCst);
                                return Ok(None);
                            }
                            // The client sent more (not ours to read yet): keep waiting.
                            wait.await;
                        }
                    }
                    let r = match behaviour {
                        SmtpBehaviour::TempFailData => "451 4.3.0 Try again later\r\n".into(),
                        SmtpBehaviour::PermFailData => "554 5.6.0 Message rejected\r\n".into(),
                        _ => {
                            let mut mails = st.mails.lock().unwrap();
                            mails.push(Mail {
                                from: from.take().unwrap_or_default(),
                                rcpt: std::mem::take(&mut rcpt),
                                data,
                                auth_user: user.clone(),
                                tls,
                                connection: conn,
                            });
                            format!("250 2.0.0 Ok: queued as Q{}\r\n", mails.len())
                        }
                    };
                    from = None;
                    rcpt.clear();
                    r
                }
            }
            "RSET" => {
                st.rsets.fetch_add(1, Ordering::SeqCst);
                from = None;
                rcpt.clear();
                "250 2.0.0 Ok\r\n".into()
            }
            "NOOP" => "250 2.0.0 Ok\r\n".into(),
            "QUIT" => {
                io.write_all(b"221 2.0.0 Bye\r\n").await?;
                io.flush().await?;
                return Ok(None);
            }
            _ => "502 5.5.2 Command not recognized\r\n".into(),
        };
        io.write_all(reply.as_bytes()).await?;
        io.flush().await?;
    }
}

/// Decrements a counter when dropped (however the transaction ends).
struct Decrement<'a>(&'a AtomicUsize);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn read_line<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<S>,
) -> std::io::Result<String> {
    io.flush().await?;
    let mut l = String::new();
    io.read_line(&mut l).await?;
    Ok(l.trim_end().to_string())
}

/// The address in `MAIL FROM:<a@b> SIZE=…` / `RCPT TO:<a@b>`.
fn path_of(cmd: &str) -> Option<String> {
    let start = cmd.find('<')?;
    let end = cmd[start..].find('>')? + start;
    Some(cmd[start + 1..end].to_string())
}
