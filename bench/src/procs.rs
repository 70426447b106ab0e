//! The systems under test, each as a separate process (so its memory can be read from /proc and
//! it competes for the CPUs the way it would in production): the release `outboxd` binary with a
//! generated configuration, and the graphile-worker peer (`bench/peers/graphile/worker.mjs`).
//! Their output goes to a log file in the scenario's work directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// How outboxd is configured for a scenario.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OutboxdSettings {
    pub batch_size: usize,
    pub concurrency: usize,
    pub pool_size: usize,
    pub poll_interval: String,
    /// SMTP connections per profile (the smtp connector's `pool_size`).
    pub smtp_pool_size: usize,
}

/// How the graphile-worker peer is configured for a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GraphileSettings {
    pub concurrency: usize,
    /// `preset.worker.localQueue.size` (-1: off).
    pub local_queue: i64,
    /// `completeJobBatchDelay` / `failJobBatchDelay` in ms (-1: off).
    pub batch_delay_ms: i64,
    pub max_pool_size: usize,
    pub poll_interval_ms: u64,
}

/// A child process of the benchmark.
pub struct Proc {
    child: Child,
    pub log: PathBuf,
    pub started: Instant,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `(VmHWM, VmRSS)` in KiB, from /proc/<pid>/status.
    pub fn memory_kib(&self) -> Option<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        };
        Some((field("VmHWM:")?, field("VmRSS:")?))
    }

    /// CPU seconds (user + system) the process has used so far, from /proc/<pid>/stat.
    pub fn cpu_secs(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).ok()?;
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
        Some(ticks / 100.0)
    }

    /// Waits until the log contains `needle` (the process says it is ready).
    pub async fn wait_log(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if text.contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!(
                    "{} exited ({status}) before saying {needle:?}; see {}",
                    self.log.display(),
                    self.log.display()
                );
            }
            if Instant::now() >= deadline {
                anyhow::bail!("no {needle:?} in {} within {timeout:?}", self.log.display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// TERM, then KILL if it has not exited within `grace`.
    pub async fn stop(mut self, grace: Duration) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(mut cmd: Command, log: PathBuf) -> anyhow::Result<Proc> {
    let out = std::fs::File::create(&log)?;
    let err = out.try_clone()?;
    let started = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("spawn {cmd:?}"))?;
    Ok(Proc {
        child,
        log,
        started,
    })
}

/// Writes `outboxd.toml`, `http.conf` and `smtp.conf` into `dir` and starts `outboxd run` on them.
pub fn start_outboxd(
    bin: &Path,
    dir: &Path,
    database_url: &str,
    sink: &crate::sink::Sink,
    s: &OutboxdSettings,
) -> anyhow::Result<Proc> {
    let sink_url = sink.url();
    std::fs::create_dir_all(dir)?;
    let main = format!(
        "database_url = \"{database_url}\"\n\
         poll_interval = \"{}\"\n\
         batch_size = {}\n\
         concurrency = {}\n\
         pool_size = {}\n\
         lease = \"60s\"\n\
         grace_period = \"2s\"\n\
         migrate_on_start = true\n\
         create_database = false\n\
         worker_id = \"bench\"\n\
         [connectors]\n\
         http = \"http.conf\"\n\
         smtp = \"smtp.conf\"\n",
        s.poll_interval, s.batch_size, s.concurrency, s.pool_size
    );
    std::fs::write(dir.join("outboxd.toml"), main)?;
    // Same request as the peer sends: POST <sink>/sink, JSON body, Idempotency-Key.
    std::fs::write(
        dir.join("http.conf"),
        format!("[default]\nurl = \"{sink_url}\"\ntimeout = \"10s\"\nretry = [\"1s\"]\n"),
    )?;
    // A plain-text relay on loopback, pooled connections as the connector's docs suggest.
    std::fs::write(
        dir.join("smtp.conf"),
        format!(
            "[default]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n\
             from = \"Bench <bench@example.com>\"\nhello_name = \"bench.example.com\"\n\
             pool_size = {}\ntimeout = \"10s\"\nretry = [\"1s\"]\n",
            sink.smtp_addr.port(),
            s.smtp_pool_size
        ),
    )?;
    let mut cmd = Command::new(bin);
    cmd.arg("--config")
        .arg(dir.join("outboxd.toml"))
        .arg("run")
        .env("RUST_LOG", "info")
        .env_remove("DATABASE_URL");
    for (k, _) in std::env::vars() {
        if k.starts_with("OUTBOXD_") {
            cmd.env_remove(k);
        }
    }
    spawn(cmd, dir.join("outboxd.log"))
}

/// Runs the peer's migrations (`worker.mjs migrate`), so enqueueing can use its schema.
pub fn migrate_graphile(peer_dir: &Path, database_url: &str) -> anyhow::Result<()> {
    let status = Command::new("node")
        .arg(peer_dir.join("worker.mjs"))
        .arg("migrate")
        .env("DATABASE_URL", database_url)
        .status()
        .context("run node (is Node.js installed?)")?;
    anyhow::ensure!(status.success(), "graphile-worker migrations failed");
    Ok(())
}

/// Starts the graphile-worker peer; it prints `ready` once it is listening for jobs.
pub fn start_graphile(
    peer_dir: &Path,
    dir: &Path,
    database_url: &str,
    sink_url: &str,
    s: &GraphileSettings,
) -> anyhow::Result<Proc> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = Command::new("node");
    cmd.arg(peer_dir.join("worker.mjs"))
        .arg("run")
        .env("DATABASE_URL", database_url)
        .env("SINK_URL", format!("{sink_url}/sink"))
        .env("CONCURRENCY", s.concurrency.to_string())
        .env("LOCAL_QUEUE", s.local_queue.to_string())
        .env("BATCH_DELAY_MS", s.batch_delay_ms.to_string())
        .env("MAX_POOL_SIZE", s.max_pool_size.to_string())
        .env("POLL_INTERVAL_MS", s.poll_interval_ms.to_string());
    spawn(cmd, dir.join(format!("graphile-c{}.log", s.concurrency)))
}
