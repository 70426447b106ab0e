//! The loopback HTTP sink: accepts every request as fast as it can, answers `200` with an empty
//! body (so outboxd stores no reply row), counts requests and records when each benchmark message
//! arrived.
//!
//! A message is identified by its `Idempotency-Key` header, `"bench-<n>"` (outboxd sends the message
//! code there; the graphile-worker peer sends the same header). Arrival times are nanoseconds since
//! the sink's `base` instant, stored in a fixed table indexed by `n`, so the producer (same process)
//! computes latencies on one monotonic clock. It runs on its own thread and single-threaded runtime,
//! so it never waits behind the benchmark's own work.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::sync::Notify;

/// What the sink has seen.
pub struct Sink {
    pub addr: SocketAddr,
    /// The SMTP side: the same counters, fed by the DATA of each mail.
    pub smtp_addr: SocketAddr,
    pub base: Instant,
    /// Requests answered (whatever their key).
    count: AtomicU64,
    /// Requests whose message had already arrived once (redeliveries).
    duplicates: AtomicU64,
    /// Arrival of message `n` in ns since `base` (+1, so 0 means "not yet").
    arrivals: Vec<AtomicU64>,
    /// Woken on every arrival (the sequential latency producer waits on it).
    pub arrived: Notify,
}

impl Sink {
    /// Starts the sink on 127.0.0.1:0 in a thread of its own; `slots` bounds the tracked `n`.
    pub fn start(slots: usize) -> anyhow::Result<Arc<Sink>> {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let smtp_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        smtp_listener.set_nonblocking(true)?;
        let smtp_addr = smtp_listener.local_addr()?;
        let sink = Arc::new(Sink {
            addr,
            smtp_addr,
            base: Instant::now(),
            count: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            arrivals: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            arrived: Notify::new(),
        });
        let s = sink.clone();
        std::thread::Builder::new()
            .name("sink".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("sink runtime");
                let smtp = s.clone();
                rt.spawn(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(smtp_listener).expect("smtp listener");
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(smtp_session(smtp.clone(), stream));
                    }
                });
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(std_listener).expect("sink listener");
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        let _ = stream.set_nodelay(true);
                        let s = s.clone();
                        tokio::spawn(async move {
                            let svc = hyper::service::service_fn(move |req| {
                                let s = s.clone();
                                async move { s.handle(req).await }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .keep_alive(true)
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                });
            })?;
        Ok(sink)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn handle(&self, req: Request<Incoming>) -> Result<Response<Empty<Bytes>>, Infallible> {
        let n = req
            .headers()
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_key);
        // Read the whole body, as a real receiver would.
        let _ = req.into_body().collect().await;
        self.record(n);
        Ok(Response::new(Empty::new()))
    }

    /// Counts one delivery of message `n` (if known).
    fn record(&self, n: Option<u64>) {
        let now = self.base.elapsed().as_nanos() as u64 + 1;
        if let Some(slot) = n.and_then(|n| self.arrivals.get(n as usize)) {
            if slot
                .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                self.duplicates.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::AcqRel);
        self.arrived.notify_waiters();
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    pub fn duplicates(&self) -> u64 {
        self.duplicates.load(Ordering::Relaxed)
    }

    /// When message `n` arrived, if it did.
    pub fn arrival(&self, n: u64) -> Option<Instant> {
        let v = self.arrivals.get(n as usize)?.load(Ordering::Acquire);
        (v != 0).then(|| self.base + Duration::from_nanos(v - 1))
    }

    /// Forgets arrivals and counts (between scenarios).
    pub fn reset(&self) {
        for a in &self.arrivals {
            a.store(0, Ordering::Relaxed);
        }
        self.count.store(0, Ordering::Release);
        self.duplicates.store(0, Ordering::Release);
    }
}

/// One SMTP session (RFC 5321, the subset a client needs: EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP,
/// QUIT; no PIPELINING, no TLS): every mail is accepted, and its `bench-<n>` (in the body) recorded.
async fn smtp_session(sink: Arc<Sink>, stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut line = Vec::with_capacity(512);
    if w.write_all(b"220 outboxd-bench ESMTP\r\n").await.is_err() {
        return;
    }
    loop {
        line.clear();
        match r.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let verb = line
            .get(..4)
            .map(|v| v.to_ascii_uppercase())
            .unwrap_or_default();
        let reply: &[u8] = match verb.as_slice() {
            b"EHLO" => b"250-outboxd-bench\r\n250 8BITMIME\r\n",
            b"HELO" => b"250 outboxd-bench\r\n",
            b"MAIL" | b"RCPT" | b"RSET" | b"NOOP" => b"250 OK\r\n",
            b"QUIT" => {
                let _ = w.write_all(b"221 bye\r\n").await;
                return;
            }
            b"DATA" => {
                if w.write_all(b"354 go ahead\r\n").await.is_err() {
                    return;
                }
                let mut n = None;
                loop {
                    line.clear();
                    match r.read_until(b'\n', &mut line).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    if line == b".\r\n" || line == b".\n" {
                        break;
                    }
                    if n.is_none() {
                        n = find_key(&line);
                    }
                }
                sink.record(n);
                b"250 OK queued\r\n"
            }
            _ => b"500 unrecognised command\r\n",
        };
        if w.write_all(reply).await.is_err() {
            return;
        }
    }
}

/// The first `bench-<digits>` in a line of mail.
fn find_key(line: &[u8]) -> Option<u64> {
    let i = line.windows(6).position(|w| w == b"bench-")?;
    let digits: String = line[i + 6..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .map(|&b| b as char)
        .collect();
    digits.parse().ok()
}

/// `"bench-42"` (a structured-field string, or bare) → 42.
pub fn parse_key(v: &str) -> Option<u64> {
    v.trim_matches('"').strip_prefix("bench-")?.parse().ok()
}

/// The sink's raw rate, requests/s, from one keep-alive client: `in_flight` requests at a time
/// for `secs` seconds.
pub async fn raw_rate(sink: &Sink, in_flight: usize, secs: f64) -> anyhow::Result<f64> {
    let client = reqwest::Client::builder().build()?;
    let url = format!("{}/raw", sink.url());
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..in_flight {
        let client = client.clone();
        let url = url.clone();
        tasks.spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                let r = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body("{\"n\":0}")
                    .send()
                    .await?;
                let _ = r.bytes().await?;
                n += 1;
            }
            anyhow::Ok(n)
        });
    }
    let mut total = 0;
    while let Some(r) = tasks.join_next().await {
        total += r??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_with_or_without_quotes() {
        assert_eq!(parse_key("\"bench-42\""), Some(42));
        assert_eq!(parse_key("bench-7"), Some(7));
        assert_eq!(parse_key("other"), None);
        assert_eq!(find_key(b"Body bench-17\r\n"), Some(17));
        assert_eq!(find_key(b"nothing\r\n"), None);
    }
}
