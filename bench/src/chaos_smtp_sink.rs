//! `chaos-smtp-sink`: the slow SMTP server of `bench/chaos --only slow` (issue 8). Every mail
//! takes `--delay-ms` to be answered after its DATA terminator, as a slow provider would; a
//! client that hangs up meanwhile cancels the transaction (RFC 5321 §4.1.1.10: the server "MUST
//! cancel any pending transaction"), as a real server does, so only mails whose `250` was sent
//! count as accepted.
//!
//! Accepted mails are appended to `--spool` as `{"id":"<outbox id>"}` lines (the id comes from
//! outboxd's `Message-ID: <id@domain>`), the same format as the file connector's spool that the
//! other chaos scenarios read; cancelled ones to `--aborted`, one id per line. It prints
//! `port=<n>` once it listens on 127.0.0.1:0 and runs until killed.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

struct Files {
    spool: Mutex<std::fs::File>,
    aborted: Mutex<std::fs::File>,
}

fn arg(args: &[String], name: &str) -> anyhow::Result<String> {
    let i = args
        .iter()
        .position(|a| a == name)
        .ok_or_else(|| anyhow::anyhow!("missing {name}"))?;
    args.get(i + 1)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("{name} needs a value"))
}

fn append(path: &str) -> anyhow::Result<std::fs::File> {
    Ok(std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let delay = Duration::from_millis(arg(&args, "--delay-ms")?.parse()?);
    let files = Arc::new(Files {
        spool: Mutex::new(append(&arg(&args, "--spool")?)?),
        aborted: Mutex::new(append(&arg(&args, "--aborted")?)?),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("port={}", listener.local_addr()?.port());
    std::io::stdout().flush()?;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(session(stream, files.clone(), delay));
    }
}

/// One session: EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT; every mail accepted after `delay`.
async fn session(stream: tokio::net::TcpStream, files: Arc<Files>, delay: Duration) {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut line = Vec::with_capacity(512);
    if w.write_all(b"220 chaos-slow ESMTP\r\n").await.is_err() {
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
            b"EHLO" => b"250-chaos-slow\r\n250 8BITMIME\r\n",
            b"HELO" => b"250 chaos-slow\r\n",
            b"MAIL" | b"RCPT" | b"RSET" | b"NOOP" => b"250 OK\r\n",
            b"QUIT" => {
                let _ = w.write_all(b"221 bye\r\n").await;
                return;
            }
            b"DATA" => {
                if w.write_all(b"354 go ahead\r\n").await.is_err() {
                    return;
                }
                let mut id = None;
                loop {
                    line.clear();
                    match r.read_until(b'\n', &mut line).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    if line == b".\r\n" {
                        break;
                    }
                    if id.is_none() {
                        id = message_id(&line);
                    }
                }
                let id = id.unwrap_or_else(|| "-".into());
                // The slow part; a client that closes meanwhile cancels the transaction.
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    peek = r.fill_buf() => {
                        if peek.map_or(true, |b| b.is_empty()) {
                            let _ = writeln!(files.aborted.lock().unwrap(), "{id}");
                            return;
                        }
                        tokio::time::sleep(delay).await;
                    }
                }
                let _ = writeln!(files.spool.lock().unwrap(), "{{\"id\":\"{id}\"}}");
                b"250 OK queued\r\n"
            }
            _ => b"500 unrecognised command\r\n",
        };
        if w.write_all(reply).await.is_err() {
            return;
        }
    }
}

/// The outbox id in `Message-ID: <id@domain>`.
fn message_id(line: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(line).ok()?;
    let (name, value) = text.split_once(':')?;
    if !name.eq_ignore_ascii_case("message-id") {
        return None;
    }
    let v = value.trim().trim_start_matches('<');
    Some(v.split('@').next()?.to_string())
}
