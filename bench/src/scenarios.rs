//! The scenarios, in the order they run, and the summary with targets and ratios.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use crate::pg::{self, BenchDb};
use crate::pgcost::{self, Cost, Meter};
use crate::procs::{self, GraphileSettings, OutboxdSettings, Proc};
use crate::report::{thousands, Percentiles, Report};
use crate::sink::Sink;
use crate::Opts;

/// Warm-up messages before each latency measurement (not counted).
const WARMUP: u64 = 50;

/// Backlog scenario: messages per bulk INSERT…
const BACKLOG_CHUNK: u64 = 100_000;
/// …and `api.send_message` calls, one at a time, at the end of each step.
const BACKLOG_SINGLE_SENDS: u64 = 2_000;
/// Backlog scenario: claim + release calls before the measured ones (not counted).
const BACKLOG_CLAIM_WARMUP: usize = 5;

/// What a daemon did while [`Bench::sample_memory`] watched it.
#[derive(Default)]
struct MemorySample {
    hwm_kib: u64,
    max_rss_kib: u64,
    /// Requests the sink answered by the end.
    delivered: u64,
    /// When the sink had answered its first request (to 50 ms).
    first_receipt: Option<Instant>,
    end: Option<Instant>,
}

impl MemorySample {
    /// Deliveries per second from the first receipt to the end of the sampling.
    fn rate(&self) -> f64 {
        match (self.first_receipt, self.end) {
            (Some(a), Some(b)) if b > a => self.delivered as f64 / (b - a).as_secs_f64(),
            _ => 0.0,
        }
    }
}

/// Which burn-down: HTTP POSTs of `--messages`, SMTP mails, or the big HTTP backlog
/// (`--big-messages`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Burn {
    Http,
    Smtp,
    Big,
}

/// Which system a scenario drives.
#[derive(Clone, Copy, PartialEq, Eq)]
enum System {
    Outboxd,
    Graphile,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Outboxd => "outboxd",
            System::Graphile => "graphile-worker",
        }
    }

    /// The system's public one-message enqueue call: `$1` = n.
    fn enqueue_one(self) -> String {
        match self {
            System::Outboxd => format!(
                "SELECT id FROM api.send_message(NULL::uuid, 'http.agent'::text, 'default', '/sink', NULL, {}, \
                 NULL, NULL, 'bench-' || $1::bigint)",
                pg::body_sql("$1::bigint")
            ),
            System::Graphile => format!(
                "SELECT (graphile_worker.add_job('post', {}::json)).id",
                pg::body_sql("$1::bigint")
            ),
        }
    }
}

struct Bench {
    opts: Opts,
    /// A connection to the admin database (WAL positions), and the postmaster's pid (CPU).
    admin: tokio_postgres::Client,
    postmaster: u32,
    sink: Arc<Sink>,
    work: PathBuf,
    report: Report,
    settings: OutboxdSettings,
    /// Next message number: every scenario uses fresh numbers, so sink slots are never reused.
    next_n: u64,
}

pub async fn run_all(opts: Opts) -> anyhow::Result<()> {
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    let work = opts.results.join(format!("work-{stamp}"));
    std::fs::create_dir_all(&work)?;
    let peer_messages = opts.peer_messages.unwrap_or(opts.messages);
    // Numbers restart at 1 in every scenario (see `fresh`): the largest one decides. The backlog
    // scenario only counts its deliveries (10M tracked slots would cost 80 MB for nothing).
    let slots = opts
        .messages
        .max(opts.memory_backlog)
        .max(peer_messages)
        .max(opts.smtp_messages)
        .max(opts.big_messages)
        .max(opts.latency_messages + WARMUP + opts.rate * opts.rate_secs) as usize
        + 1_000;
    let sink = Sink::start(slots)?;
    let settings = OutboxdSettings {
        batch_size: opts.batch_size,
        concurrency: opts.concurrency,
        pool_size: opts.pool_size,
        poll_interval: "60s".into(),
        smtp_pool_size: opts.smtp_pool_size,
    };
    let admin = pg::connect(&opts.admin_url).await?;
    let postmaster = pgcost::postmaster_pid(&admin).await?;
    let mut b = Bench {
        admin,
        postmaster,
        sink,
        work,
        report: Report::default(),
        settings,
        next_n: 1,
        opts: opts.clone(),
    };
    b.machine().await?;
    println!(
        "outboxd-bench: sink at {}, work files in {}",
        b.sink.url(),
        b.work.display()
    );

    if opts.wants("sink") {
        b.sink_rate().await?;
    }
    if opts.wants("floor") {
        b.floor().await?;
    }
    if opts.wants("burn") {
        b.burn(System::Outboxd, None, opts.messages, Burn::Http)
            .await?;
    }
    if opts.wants("big") {
        if opts.big_messages > 0 {
            b.burn(System::Outboxd, None, opts.big_messages, Burn::Big)
                .await?;
        } else {
            b.report.row(
                "burn-down (big)",
                "outboxd, big backlog",
                "-",
                "skipped: opt-in, BENCH_BIG_MESSAGES=1000000 (or --big-messages N)",
            );
        }
    }
    if opts.wants("latency") {
        b.latency(System::Outboxd, None).await?;
    }
    if opts.wants("idle") {
        b.idle().await?;
    }
    if opts.wants("memory") {
        b.memory().await?;
    }
    if opts.wants("backlog") {
        b.backlog().await?;
    }
    if opts.wants("smtp") {
        b.burn(System::Outboxd, None, opts.smtp_messages, Burn::Smtp)
            .await?;
        b.nodemailer(opts.smtp_messages).await?;
    }
    if opts.wants("peer") && !opts.no_peer {
        b.peer(peer_messages).await?;
    }
    b.summary();

    println!();
    println!(
        "outboxd-bench results ({}; figures taken on a shared machine are noisy)",
        stamp
    );
    b.report.print();
    let path = opts.results.join(format!("{stamp}.json"));
    let out = json!({
        "timestamp": stamp,
        "options": opts,
        "outboxd_settings": b.settings,
        "figures": b.report.figures,
    });
    std::fs::write(&path, serde_json::to_string_pretty(&out)?)?;
    println!("JSON: {}", path.display());
    Ok(())
}

impl Bench {
    /// A clean sink and message numbers from 1 (every scenario has a fresh database).
    fn fresh(&mut self) {
        self.sink.reset();
        self.next_n = 1;
    }

    fn take_numbers(&mut self, count: u64) -> u64 {
        let from = self.next_n;
        self.next_n += count;
        from
    }

    async fn machine(&mut self) -> anyhow::Result<()> {
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|s| s.trim().to_string())
            })
            .unwrap_or_default();
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let load = load
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ");
        let server = pg::server_facts(&self.opts.admin_url).await?;
        let node = command_version("node", &["--version"]);
        let pgbench = command_version("pgbench", &["--version"]);
        let pgv = server["version"].as_str().unwrap_or("?").to_string();
        self.report.row(
            "machine",
            "cores / load at start",
            format!("{cores} / {load}"),
            cpu.clone(),
        );
        self.report.row(
            "machine",
            "PostgreSQL",
            pgv,
            format!(
                "synchronous_commit={} shared_buffers={}",
                server["synchronous_commit"].as_str().unwrap_or("?"),
                server["shared_buffers"].as_str().unwrap_or("?")
            ),
        );
        self.report.row("machine", "node", node.clone(), "");
        self.report.set(
            "machine",
            "facts",
            json!({"cores": cores, "cpu": cpu, "loadavg_at_start": load, "postgres": server,
                   "node": node, "pgbench": pgbench, "outboxd_bin": self.opts.outboxd}),
        );
        self.report.row(
            "settings",
            "outboxd bench profile",
            format!(
                "batch_size={} concurrency={} pool_size={}",
                self.settings.batch_size, self.settings.concurrency, self.settings.pool_size
            ),
            "",
        );
        Ok(())
    }

    /// The sink's raw rate from one keep-alive client (sanity: it must be far above the systems).
    async fn sink_rate(&mut self) -> anyhow::Result<()> {
        let seq = crate::sink::raw_rate(&self.sink, 1, 2.0).await?;
        let par = crate::sink::raw_rate(&self.sink, 64, 2.0).await?;
        self.sink.reset();
        self.report.row(
            "sink",
            "raw rate, 1 client",
            format!("{} req/s", thousands(seq)),
            format!("sequential; {} req/s with 64 in flight", thousands(par)),
        );
        self.report.set(
            "sink",
            "raw_rate",
            json!({"sequential_req_s": seq, "in_flight_64_req_s": par}),
        );
        Ok(())
    }

    /// The outbox floor: pgbench runs claim + record_outcomes (batches of 500) on a backlog.
    async fn floor(&mut self) -> anyhow::Result<()> {
        let batch = 500u64;
        let mut best = 0.0f64;
        let mut best_cost: Option<Cost> = None;
        let mut best_total = 0;
        let mut runs = Vec::new();
        for &clients in &self.opts.floor_clients.clone() {
            let per_client = (self.opts.messages / batch / clients as u64).max(1);
            let total = per_client * clients as u64 * batch;
            let db = BenchDb::outbox(
                &self.opts.admin_url,
                "floor",
                &self.opts.outboxd,
                &self.work,
            )
            .await?;
            let c = db.client().await?;
            let from = self.take_numbers(total);
            pg::enqueue_outbox(&c, from, total, false).await?;
            drop(c);
            self.admin.batch_execute("CHECKPOINT").await?;
            let mut meter = Meter::start(&self.admin, self.postmaster, &db.name, vec![]).await?;
            let u = url::Url::parse(&db.url)?;
            let out = tokio::process::Command::new("pgbench")
                .args(["-n", "-M", "prepared", "-f"])
                .arg(Path::new("bench/floor.sql"))
                .args(["-D", &format!("batch={batch}")])
                .args(["-c", &clients.to_string(), "-j", &clients.to_string()])
                .args(["-t", &per_client.to_string()])
                .args(["-h", u.host_str().unwrap_or("127.0.0.1")])
                .args(["-p", &u.port().unwrap_or(5432).to_string()])
                .args([
                    "-U",
                    if u.username().is_empty() {
                        "postgres"
                    } else {
                        u.username()
                    },
                ])
                .arg(&db.name)
                .kill_on_drop(true)
                .output();
            tokio::pin!(out);
            let out = loop {
                tokio::select! {
                    r = &mut out => break r.context("run pgbench")?,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => meter.sample(),
                }
            };
            let cost = meter.finish(&self.admin).await?;
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            anyhow::ensure!(
                out.status.success(),
                "pgbench failed: {}{}",
                text,
                String::from_utf8_lossy(&out.stderr)
            );
            let tps: f64 = text
                .lines()
                .find(|l| l.starts_with("tps = "))
                .and_then(|l| l.split_whitespace().nth(2))
                .and_then(|v| v.parse().ok())
                .context("no tps in pgbench output")?;
            let c = db.client().await?;
            let left = pg::outbox_remaining(&c).await?;
            drop(c);
            anyhow::ensure!(left == 0, "floor left {left} messages unsubmitted");
            let rate = tps * batch as f64;
            if rate > best {
                best = rate;
                best_cost = Some(cost);
                best_total = total;
            }
            runs.push(json!({"clients": clients, "messages": total, "tps": tps,
                             "messages_per_s": rate, "postgres": cost.json(total)}));
            self.report.row(
                "floor",
                &format!("pgbench claim+record, {clients} client(s)"),
                format!("{} msg/s", thousands(rate)),
                format!(
                    "{total} messages, batches of {batch}, after a CHECKPOINT; {}",
                    cost.show(total)
                ),
            );
            db.drop_now().await?;
        }
        self.report.set("floor", "runs", json!(runs));
        self.report.set("floor", "best_messages_per_s", json!(best));
        if let Some(cost) = best_cost {
            self.report
                .set("floor", "best_postgres", cost.json(best_total));
        }
        Ok(())
    }

    fn start(
        &self,
        system: System,
        db: &BenchDb,
        tag: &str,
        g: Option<&GraphileSettings>,
    ) -> anyhow::Result<Proc> {
        let dir = self.work.join(tag);
        match system {
            System::Outboxd => procs::start_outboxd(
                &self.opts.outboxd,
                &dir,
                &db.url,
                &self.sink,
                &self.settings,
            ),
            System::Graphile => procs::start_graphile(
                &self.opts.peer_dir,
                &dir,
                &db.url,
                &self.sink.url(),
                g.expect("graphile settings"),
            ),
        }
    }

    async fn fresh_db(&self, system: System, tag: &str) -> anyhow::Result<BenchDb> {
        match system {
            System::Outboxd => {
                BenchDb::outbox(&self.opts.admin_url, tag, &self.opts.outboxd, &self.work).await
            }
            System::Graphile => {
                let db = BenchDb::create(&self.opts.admin_url, tag).await?;
                procs::migrate_graphile(&self.opts.peer_dir, &db.url)?;
                Ok(db)
            }
        }
    }

    async fn ready(system: System, p: &mut Proc) -> anyhow::Result<()> {
        let needle = match system {
            System::Outboxd => "listening on channel outbox",
            System::Graphile => "ready",
        };
        p.wait_log(needle, Duration::from_secs(30)).await
    }

    /// Burn-down: a backlog enqueued in one statement, then the system starts; time until every
    /// message is delivered (sink) and recorded (database). Returns messages/s.
    async fn burn(
        &mut self,
        system: System,
        g: Option<&GraphileSettings>,
        count: u64,
        kind: Burn,
    ) -> anyhow::Result<f64> {
        let smtp = kind == Burn::Smtp;
        let tag = match g {
            Some(g) => format!("burn_graphile_c{}", g.concurrency),
            None if smtp => "burn_outboxd_smtp".to_string(),
            None if kind == Burn::Big => "burn_outboxd_big".to_string(),
            None => "burn_outboxd".to_string(),
        };
        let db = self.fresh_db(system, &tag).await?;
        let c = db.client().await?;
        self.fresh();
        let from = self.take_numbers(count);
        let enqueue = match system {
            System::Outboxd => pg::enqueue_outbox(&c, from, count, smtp).await?,
            System::Graphile => pg::enqueue_graphile(&c, from, count).await?,
        };
        // Per-function calls and times of the hot path (PL/pgSQL only, this database only).
        c.batch_execute(&format!(
            "ALTER DATABASE {} SET track_functions = 'pl'",
            db.name
        ))
        .await?;
        let xacts_before = db.xacts().await?;
        // A checkpoint first, so every run starts with the same full-page-write debt.
        self.admin.batch_execute("CHECKPOINT").await?;
        let mut meter = Meter::start(
            &self.admin,
            self.postmaster,
            &db.name,
            vec![pgcost::backend_pid(&c).await?],
        )
        .await?;
        let p = self.start(system, &db, &tag, g)?;
        let spawned = p.started;
        let timeout = Duration::from_secs(self.opts.timeout_secs);
        let mut peak_rss = 0;
        let deadline = Instant::now() + timeout;
        let mut sampled = Instant::now();
        while self.sink.count() < count && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
            if let Some((hwm, _)) = p.memory_kib() {
                peak_rss = peak_rss.max(hwm);
            }
            if sampled.elapsed() >= Duration::from_millis(50) {
                meter.sample();
                sampled = Instant::now();
            }
        }
        let delivered_at = Instant::now();
        let delivered = self.sink.count();
        let mut polls = 0;
        loop {
            polls += 1;
            let left = match system {
                System::Outboxd => pg::outbox_remaining(&c).await?,
                System::Graphile => pg::graphile_remaining(&c).await?,
            };
            if left == 0 || Instant::now() >= deadline {
                break;
            }
            meter.sample();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let done_at = Instant::now();
        let cost = meter.finish(&self.admin).await?;
        if let Some((hwm, _)) = p.memory_kib() {
            peak_rss = peak_rss.max(hwm);
        }
        let cpu = p.cpu_secs().unwrap_or(0.0);
        p.stop(Duration::from_secs(5)).await;
        // Not counted: the benchmark's own "how many are left" polls.
        let xacts = db.xacts().await? - xacts_before - polls;
        // The daemon's backends have exited (and flushed their statistics) once it stopped.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let functions = pg::function_stats(&c).await?;
        for f in &functions {
            if f.calls > 0 && f.total_ms > 10.0 {
                self.report.row(
                    "hot path",
                    &format!("{} ({tag})", f.name),
                    format!("{} calls", thousands(f.calls as f64)),
                    format!(
                        "{:.0} msgs/call; {:.2} ms/call total, {:.2} self; {:.1} s in all",
                        count as f64 / f.calls as f64,
                        f.total_ms / f.calls as f64,
                        f.self_ms / f.calls as f64,
                        f.total_ms / 1e3
                    ),
                );
            }
        }
        let first = (from..from + count)
            .filter_map(|n| self.sink.arrival(n))
            .min()
            .unwrap_or(spawned);
        anyhow::ensure!(
            delivered >= count,
            "{}: only {delivered} of {count} delivered within {timeout:?} (see {})",
            system.name(),
            p_log(&self.work, &tag)
        );
        let steady = done_at.duration_since(first).as_secs_f64();
        let rate = count as f64 / steady;
        let wall = done_at.duration_since(spawned).as_secs_f64();
        let startup = first.duration_since(spawned).as_secs_f64();
        let record_lag = done_at.duration_since(delivered_at).as_secs_f64();
        let section = match g {
            Some(_) => "peer burn-down".to_string(),
            None if smtp => "smtp".to_string(),
            None if kind == Burn::Big => "burn-down (big)".to_string(),
            None => "burn-down".to_string(),
        };
        let label = match g {
            Some(g) => format!(
                "graphile-worker c={} localQueue={} batchDelay={}ms",
                g.concurrency, g.local_queue, g.batch_delay_ms
            ),
            None if smtp => format!(
                "outboxd → SMTP sink, {} mails, pool_size {}",
                thousands(count as f64),
                self.settings.smtp_pool_size
            ),
            None => format!("outboxd, {} messages", thousands(count as f64)),
        };
        self.report.row(
            &section,
            &label,
            format!("{} msg/s", thousands(rate)),
            format!(
                "first receipt→all recorded {steady:.2}s; start-up {startup:.2}s; {} txns ({:.1}/1k msgs); its own CPU {:.2}s ({:.0} µs/msg); {}; dup {}; peak RSS {:.1} MiB; enqueue {:.1}s",
                thousands(xacts as f64),
                xacts as f64 * 1000.0 / count as f64,
                cpu,
                cpu * 1e6 / count as f64,
                cost.show(count),
                self.sink.duplicates(),
                peak_rss as f64 / 1024.0,
                enqueue.as_secs_f64()
            ),
        );
        let key = match g {
            Some(g) => format!("c{}", g.concurrency),
            None => "outboxd".into(),
        };
        self.report.set(
            if g.is_some() {
                "peer_burn_down"
            } else if smtp {
                "smtp"
            } else if kind == Burn::Big {
                "burn_down_big"
            } else {
                "burn_down"
            },
            &key,
            json!({"messages": count, "messages_per_s": rate, "steady_s": steady, "wall_s": wall,
                   "startup_s": startup, "last_receipt_to_recorded_s": record_lag,
                   "enqueue_s": enqueue.as_secs_f64(), "transactions": xacts,
                   "duplicates": self.sink.duplicates(), "peak_rss_kib": peak_rss, "cpu_s": cpu,
                   "cpu_us_per_msg": cpu * 1e6 / count as f64, "postgres": cost.json(count),
                   "graphile": g,
                   "functions": functions.iter().map(|f| json!({"name": f.name, "calls": f.calls,
                       "total_ms": f.total_ms, "self_ms": f.self_ms})).collect::<Vec<_>>()}),
        );
        drop(c);
        db.drop_now().await?;
        Ok(rate)
    }

    /// Latency, sequential and at a steady offered load.
    async fn latency(
        &mut self,
        system: System,
        g: Option<&GraphileSettings>,
    ) -> anyhow::Result<(Option<Percentiles>, Option<Percentiles>)> {
        let tag = match system {
            System::Outboxd => "latency_outboxd".to_string(),
            System::Graphile => format!("latency_graphile_c{}", g.map_or(0, |g| g.concurrency)),
        };
        let db = self.fresh_db(system, &tag).await?;
        let mut p = self.start(system, &db, &tag, g)?;
        Self::ready(system, &mut p).await?;
        self.fresh();
        let c = db.client().await?;
        let st = c.prepare(&system.enqueue_one()).await?;

        // Sequential: one message at a time, the next one only once the previous has arrived.
        let n_seq = self.opts.latency_messages;
        let from = self.take_numbers(WARMUP + n_seq);
        let mut lat = Vec::with_capacity(n_seq as usize);
        let mut lat_call = Vec::with_capacity(n_seq as usize);
        let mut rtt = Vec::with_capacity(n_seq as usize);
        for i in 0..WARMUP + n_seq {
            let n = from + i;
            let t0 = Instant::now();
            c.query_one(&st, &[&(n as i64)]).await?;
            let t1 = Instant::now();
            let arrived = self
                .wait_arrival(n, Duration::from_secs(10))
                .await
                .with_context(|| {
                    format!(
                        "{}: message {n} did not arrive (see {})",
                        system.name(),
                        p_log(&self.work, &tag)
                    )
                })?;
            if i >= WARMUP {
                // From the commit (the enqueue call has returned) to the sink's receipt; a
                // message can arrive before the producer hears its commit: 0 then.
                lat.push(arrived.saturating_duration_since(t1));
                lat_call.push(arrived.saturating_duration_since(t0));
                rtt.push(t1 - t0);
            }
        }
        let seq = Percentiles::of(&mut lat);
        let seq_call = Percentiles::of(&mut lat_call);
        let ins = Percentiles::of(&mut rtt);

        // Steady offered load: message k is due at start + k/rate, from `producers` connections.
        let rate = self.opts.rate;
        let total = rate * self.opts.rate_secs;
        let from = self.take_numbers(total);
        let sent: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
        let committed: Arc<Vec<AtomicU64>> =
            Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
        let next = Arc::new(AtomicU64::new(0));
        let late = Arc::new(AtomicU64::new(0));
        let base = self.sink.base;
        let mut conns = Vec::new();
        for _ in 0..self.opts.producers {
            let pc = db.client().await?;
            let st = pc.prepare(&system.enqueue_one()).await?;
            conns.push((pc, st));
        }
        let start = Instant::now() + Duration::from_millis(20);
        let mut producers = tokio::task::JoinSet::new();
        for (pc, st) in conns {
            let (sent, committed, next, late) =
                (sent.clone(), committed.clone(), next.clone(), late.clone());
            producers.spawn(async move {
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= total {
                        return anyhow::Ok(());
                    }
                    let due = start + Duration::from_secs_f64(k as f64 / rate as f64);
                    let now = Instant::now();
                    if now < due {
                        tokio::time::sleep_until(due.into()).await;
                    } else if now - due > Duration::from_millis(5) {
                        late.fetch_add(1, Ordering::Relaxed);
                    }
                    let t0 = Instant::now();
                    sent[k as usize]
                        .store(t0.duration_since(base).as_nanos() as u64, Ordering::Relaxed);
                    pc.query_one(&st, &[&((from + k) as i64)]).await?;
                    committed[k as usize]
                        .store(base.elapsed().as_nanos() as u64, Ordering::Relaxed);
                }
            });
        }
        while let Some(r) = producers.join_next().await {
            r??;
        }
        let offered_s = start.elapsed().as_secs_f64();
        let deadline = Instant::now() + Duration::from_secs(30);
        while (from..from + total).any(|n| self.sink.arrival(n).is_none())
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut steady = Vec::with_capacity(total as usize);
        let mut steady_call = Vec::with_capacity(total as usize);
        let mut missing = 0;
        for k in 0..total {
            let at = |v: &AtomicU64| base + Duration::from_nanos(v.load(Ordering::Relaxed));
            match self.sink.arrival(from + k) {
                Some(a) => {
                    steady.push(a.saturating_duration_since(at(&committed[k as usize])));
                    steady_call.push(a.saturating_duration_since(at(&sent[k as usize])));
                }
                None => missing += 1,
            }
        }
        let steady_p = Percentiles::of(&mut steady);
        let steady_call_p = Percentiles::of(&mut steady_call);
        p.stop(Duration::from_secs(5)).await;
        drop(c);
        db.drop_now().await?;

        let section = if system == System::Outboxd {
            "latency"
        } else {
            "peer latency"
        };
        let who = match g {
            Some(g) => format!("graphile-worker c={}: ", g.concurrency),
            None => String::new(),
        };
        if let Some(s) = &seq {
            self.report.row(
                section,
                &format!("{who}sequential commit→receipt ({n_seq})"),
                s.show(),
                format!(
                    "target p50≤1 p99≤3 ms; from the start of the enqueue call p50 {:.2} p99 {:.2} ms (the call alone p50 {:.2})",
                    seq_call.as_ref().map_or(0.0, |i| i.p50),
                    seq_call.as_ref().map_or(0.0, |i| i.p99),
                    ins.as_ref().map_or(0.0, |i| i.p50)
                ),
            );
        }
        if let Some(s) = &steady_p {
            self.report.row(
                section,
                &format!("{who}{rate}/s offered, {} producers", self.opts.producers),
                s.show(),
                format!(
                    "commit→receipt; target p99≤10 ms; from call start p99 {:.2} ms; {total} msgs in {offered_s:.1}s; {} late starts; {missing} missing",
                    steady_call_p.as_ref().map_or(0.0, |i| i.p99),
                    late.load(Ordering::Relaxed)
                ),
            );
        }
        let key = match g {
            Some(g) => format!("graphile_c{}", g.concurrency),
            None => "outboxd".into(),
        };
        self.report.set(
            if system == System::Outboxd { "latency" } else { "peer_latency" },
            &key,
            json!({"sequential": seq.as_ref().map(|p| p.json()),
                   "sequential_from_call_start": seq_call.as_ref().map(|p| p.json()),
                   "enqueue_call": ins.as_ref().map(|p| p.json()),
                   "steady": steady_p.as_ref().map(|p| p.json()),
                   "steady_from_call_start": steady_call_p.as_ref().map(|p| p.json()), "offered_per_s": rate,
                   "offered_messages": total, "offered_s": offered_s, "producers": self.opts.producers,
                   "late_starts": late.load(Ordering::Relaxed), "missing": missing, "graphile": g}),
        );
        Ok((seq, steady_p))
    }

    async fn wait_arrival(&self, n: u64, timeout: Duration) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.sink.arrived.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(a) = self.sink.arrival(n) {
                return Ok(a);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            anyhow::ensure!(!left.is_zero(), "timed out");
            let _ = tokio::time::timeout(left, notified).await;
        }
    }

    /// Idle cost: transactions an idle daemon runs (pg_stat_database of its own database).
    async fn idle(&mut self) -> anyhow::Result<()> {
        let db =
            BenchDb::outbox(&self.opts.admin_url, "idle", &self.opts.outboxd, &self.work).await?;
        let c = db.client().await?;
        c.batch_execute(&format!(
            "ALTER DATABASE {} SET track_functions = 'pl'",
            db.name
        ))
        .await?;
        drop(c);
        let mut settings = self.settings.clone();
        settings.poll_interval = self.opts.idle_poll.clone();
        let dir = self.work.join("idle");
        let mut p = procs::start_outboxd(&self.opts.outboxd, &dir, &db.url, &self.sink, &settings)?;
        Self::ready(System::Outboxd, &mut p).await?;
        // Backends flush their statistics at most every second, idle ones within 10 s: let the
        // start-up settle, then count over the window (both readings lag alike).
        tokio::time::sleep(Duration::from_secs(12)).await;
        let calls = |f: &[pg::FunctionStat]| -> i64 {
            f.iter()
                .filter(|f| f.name == "outbox.claim" || f.name == "outbox.reclaim_expired")
                .map(|f| f.calls)
                .sum()
        };
        let c = db.client().await?;
        let calls_before = calls(&pg::function_stats(&c).await?);
        drop(c);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = db.xacts().await?;
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(self.opts.idle_secs)).await;
        let after = db.xacts().await?;
        let elapsed = t0.elapsed().as_secs_f64();
        let c = db.client().await?;
        let calls_after = calls(&pg::function_stats(&c).await?);
        drop(c);
        let rss = p.memory_kib();
        p.stop(Duration::from_secs(5)).await;
        db.drop_now().await?;
        // The one reading of function statistics inside the window is not the daemon's.
        let xacts = after - before - 1;
        let per_min = xacts as f64 * 60.0 / elapsed;
        let poll = self.opts.idle_poll.clone();
        let ticks = elapsed / outboxd_poll_secs(&poll).unwrap_or(60.0);
        self.report.row(
            "idle",
            &format!("transactions/min, idle daemon (poll {poll})"),
            format!("{per_min:.1}"),
            format!(
                "{xacts} in {elapsed:.0}s ≈ {:.1} per poll tick; claim+reclaim calls {}; target: none between polls beyond LISTEN",
                xacts as f64 / ticks.max(1.0),
                calls_after - calls_before
            ),
        );
        if let Some((hwm, rss)) = rss {
            self.report.row(
                "idle",
                "RSS, idle daemon",
                format!("{:.1} MiB", rss as f64 / 1024.0),
                format!("peak {:.1} MiB", hwm as f64 / 1024.0),
            );
        }
        self.report.set(
            "idle",
            "outboxd",
            json!({"window_s": elapsed, "poll_interval": poll, "transactions": xacts,
                   "claim_and_reclaim_calls": calls_after - calls_before,
                   "transactions_per_min": per_min, "rss_kib": rss.map(|r| r.1), "hwm_kib": rss.map(|r| r.0)}),
        );
        Ok(())
    }

    /// Peak RSS while the daemon works on a large backlog.
    async fn memory(&mut self) -> anyhow::Result<()> {
        let count = self.opts.memory_backlog;
        let db = BenchDb::outbox(
            &self.opts.admin_url,
            "memory",
            &self.opts.outboxd,
            &self.work,
        )
        .await?;
        let c = db.client().await?;
        self.fresh();
        let from = self.take_numbers(count);
        let enqueue = pg::enqueue_outbox(&c, from, count, false).await?;
        let dir = self.work.join("memory");
        let p = procs::start_outboxd(
            &self.opts.outboxd,
            &dir,
            &db.url,
            &self.sink,
            &self.settings,
        )?;
        let m = self.sample_memory(&p, self.opts.memory_secs, count).await;
        let (hwm, max_rss, delivered) = (m.hwm_kib, m.max_rss_kib, m.delivered);
        p.stop(Duration::from_secs(5)).await;
        drop(c);
        db.drop_now().await?;
        self.report.row(
            "memory",
            &format!("peak RSS (VmHWM), {} backlog", thousands(count as f64)),
            format!("{:.1} MiB", hwm as f64 / 1024.0),
            format!(
                "target ≤50 MiB; {} delivered in {}s of sampling; enqueue took {:.1}s",
                thousands(delivered as f64),
                self.opts.memory_secs,
                enqueue.as_secs_f64()
            ),
        );
        self.report.set(
            "memory",
            "outboxd",
            json!({"backlog": count, "vm_hwm_kib": hwm, "max_vm_rss_kib": max_rss,
                   "delivered_while_sampling": delivered, "sampling_s": self.opts.memory_secs,
                   "enqueue_s": enqueue.as_secs_f64()}),
        );
        Ok(())
    }

    /// Samples the daemon's VmHWM/VmRSS every 50 ms for `secs` (or until `count` messages have
    /// reached the sink).
    async fn sample_memory(&self, p: &Proc, secs: u64, count: u64) -> MemorySample {
        let until = Instant::now() + Duration::from_secs(secs);
        let mut m = MemorySample::default();
        loop {
            if let Some((h, r)) = p.memory_kib() {
                m.hwm_kib = m.hwm_kib.max(h);
                m.max_rss_kib = m.max_rss_kib.max(r);
            }
            m.delivered = self.sink.count();
            if m.first_receipt.is_none() && m.delivered > 0 {
                m.first_receipt = Some(Instant::now());
            }
            if Instant::now() >= until || m.delivered >= count {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        m.end = Some(Instant::now());
        m
    }

    /// Backlog (issue 9, "Scale"): on its own database, the backlog grows in steps (a tenth, 3/10
    /// and all of `--backlog-messages`); at each step the enqueue rate (bulk INSERT in chunks,
    /// and `api.send_message` one call at a time), the size on disk per message, and the latency
    /// of `outbox.claim` of 500 and of 1, each handed back with `outbox.release_claim` so the
    /// backlog stays the same. At the largest step the daemon delivers from it while its RSS is
    /// sampled. Only the api/outbox functions and the shared enqueue helper touch the schema.
    async fn backlog(&mut self) -> anyhow::Result<()> {
        let total = self.opts.backlog_messages;
        let mut steps = vec![total / 10, total * 3 / 10, total];
        steps.retain(|&n| n > 0);
        steps.dedup();
        anyhow::ensure!(!steps.is_empty(), "--backlog-messages must be > 0");
        let db = self.fresh_db(System::Outboxd, "backlog").await?;
        let c = db.client().await?;
        self.fresh();
        let send = c.prepare(&System::Outboxd.enqueue_one()).await?;
        let claim = c
            .prepare(
                "SELECT k.id::text, (SELECT count(*) FROM outbox.claim($1, $2, 60000, k.id))
                   FROM (SELECT gen_random_uuid() AS id) k",
            )
            .await?;
        let release = c
            .prepare("SELECT outbox.release_claim($1, $2::text::uuid)")
            .await?;
        let mut queued = 0u64;
        let mut results = Vec::new();
        for &step in &steps {
            // Enqueue up to the step: most in bulk, the last few one call at a time.
            let singles = BACKLOG_SINGLE_SENDS.min(step - queued);
            let bulk = step - queued - singles;
            let t = Instant::now();
            let mut left = bulk;
            while left > 0 {
                let chunk = left.min(BACKLOG_CHUNK);
                let from = self.take_numbers(chunk);
                pg::insert_outbox(&c, from, chunk, false).await?;
                left -= chunk;
            }
            let bulk_s = t.elapsed().as_secs_f64();
            let from = self.take_numbers(singles);
            let t = Instant::now();
            for n in from..from + singles {
                c.query_one(&send, &[&(n as i64)]).await?;
            }
            let singles_s = t.elapsed().as_secs_f64();
            queued = step;
            // Statistics as autovacuum would keep them (the whole database: no table named).
            let t = Instant::now();
            c.batch_execute("ANALYZE").await?;
            let analyze_s = t.elapsed().as_secs_f64();
            let bytes = pg::outbox_schema_bytes(&c).await?;

            let worker = "bench-backlog";
            let mut lat = Vec::new();
            for limit in [500i32, 1] {
                let mut claims = Vec::with_capacity(self.opts.backlog_claims);
                let mut releases = Vec::with_capacity(self.opts.backlog_claims);
                for i in 0..BACKLOG_CLAIM_WARMUP + self.opts.backlog_claims {
                    let t0 = Instant::now();
                    let row = c.query_one(&claim, &[&worker, &limit]).await?;
                    let t1 = Instant::now();
                    let (id, got): (String, i64) = (row.get(0), row.get(1));
                    let back: i32 = c.query_one(&release, &[&worker, &id]).await?.get(0);
                    let t2 = Instant::now();
                    anyhow::ensure!(
                        got == i64::from(limit) && i64::from(back) == got,
                        "backlog {step}: claimed {got} of {limit}, released {back}"
                    );
                    if i >= BACKLOG_CLAIM_WARMUP {
                        claims.push(t1 - t0);
                        releases.push(t2 - t1);
                    }
                }
                let claim_p = Percentiles::of(&mut claims).context("no claim samples")?;
                let release_p = Percentiles::of(&mut releases).context("no release samples")?;
                lat.push((limit, claim_p, release_p));
            }
            let bulk_rate = bulk as f64 / bulk_s.max(f64::MIN_POSITIVE);
            let single_rate = singles as f64 / singles_s.max(f64::MIN_POSITIVE);
            let per_msg = bytes as f64 / step as f64;
            self.report.row(
                "backlog",
                &format!("enqueue to {}", thousands(step as f64)),
                format!("{} msg/s", thousands(bulk_rate)),
                format!(
                    "{} in bulk (INSERT … generate_series, chunks of {}) in {bulk_s:.1}s; api.send_message one by one: {} calls/s ({singles} calls); outbox schema {:.0} MiB = {per_msg:.0} B/msg; ANALYZE {analyze_s:.1}s",
                    thousands(bulk as f64),
                    thousands(BACKLOG_CHUNK as f64),
                    thousands(single_rate),
                    bytes as f64 / 1048576.0
                ),
            );
            for (limit, claim_p, release_p) in &lat {
                self.report.row(
                    "backlog",
                    &format!(
                        "claim {limit} at {} backlog ({} calls)",
                        thousands(step as f64),
                        claim_p.n
                    ),
                    format!("p50 {:.2} ms", claim_p.p50),
                    format!(
                        "p99 {:.2} / max {:.2} ms; release_claim p50 {:.2} / p99 {:.2} ms",
                        claim_p.p99, claim_p.max, release_p.p50, release_p.p99
                    ),
                );
            }
            results.push(json!({
                "backlog": step, "bulk_messages": bulk, "bulk_s": bulk_s,
                "bulk_messages_per_s": bulk_rate, "send_message_calls": singles,
                "send_message_s": singles_s, "send_message_calls_per_s": single_rate,
                "analyze_s": analyze_s, "outbox_schema_bytes": bytes,
                "outbox_schema_bytes_per_msg": per_msg,
                "claims": lat.iter().map(|(limit, cp, rp)| json!({
                    "limit": limit, "claim": cp.json(), "release_claim": rp.json()}))
                    .collect::<Vec<_>>(),
            }));
        }
        self.report.set("backlog", "steps", json!(results));
        // Flat means ≈ 1.0×: the claim does not slow down as the backlog grows.
        let p50_of = |r: &serde_json::Value, limit: i64| {
            r["claims"]
                .as_array()
                .and_then(|a| a.iter().find(|c| c["limit"] == limit))
                .and_then(|c| c["claim"]["p50_ms"].as_f64())
        };
        if let (Some(first), Some(last)) = (results.first(), results.last()) {
            for limit in [500, 1] {
                if let (Some(a), Some(b)) = (p50_of(first, limit), p50_of(last, limit)) {
                    let ratio = b / a.max(f64::MIN_POSITIVE);
                    self.report.row(
                        "backlog",
                        &format!(
                            "claim {limit} p50 at {} vs {}",
                            thousands(steps[0] as f64),
                            thousands(total as f64)
                        ),
                        format!("{ratio:.2}×"),
                        format!("{a:.2} → {b:.2} ms; flat ≈ 1.0×"),
                    );
                    self.report
                        .set("backlog", &format!("claim{limit}_p50_ratio"), json!(ratio));
                }
            }
        }

        // The daemon on the largest backlog: RSS and delivery rate.
        let p = self.start(System::Outboxd, &db, "backlog", None)?;
        let secs = self.opts.backlog_daemon_secs;
        let m = self.sample_memory(&p, secs, total).await;
        let cpu = p.cpu_secs().unwrap_or(0.0);
        p.stop(Duration::from_secs(5)).await;
        let rate = m.rate();
        let hwm_mib = m.hwm_kib as f64 / 1024.0;
        self.report.row(
            "backlog",
            &format!("daemon peak RSS (VmHWM), {} backlog", thousands(total as f64)),
            format!("{hwm_mib:.1} MiB"),
            format!(
                "target ≤50 MiB ({}); max VmRSS {:.1} MiB; {} delivered in {secs}s at {} msg/s (first receipt → end); its CPU {cpu:.1}s",
                if hwm_mib <= 50.0 { "met" } else { "missed" },
                m.max_rss_kib as f64 / 1024.0,
                thousands(m.delivered as f64),
                thousands(rate)
            ),
        );
        self.report.set(
            "backlog",
            "daemon",
            json!({"backlog": total, "sampling_s": secs, "vm_hwm_kib": m.hwm_kib,
                   "max_vm_rss_kib": m.max_rss_kib, "delivered": m.delivered,
                   "messages_per_s": rate, "cpu_s": cpu, "target_mib": 50,
                   "met": hwm_mib <= 50.0}),
        );
        drop(c);
        db.drop_now().await?;
        Ok(())
    }

    /// nodemailer (pooled, `maxConnections` = the smtp pool size, as many mails in flight as
    /// outboxd's `concurrency`) sending the smtp scenario's mails to the same SMTP sink; rate =
    /// mails / (first receipt → every sendMail resolved). A row says why when it is skipped.
    async fn nodemailer(&mut self, count: u64) -> anyhow::Result<()> {
        let label = format!(
            "nodemailer → SMTP sink, {} mails, maxConnections {}",
            thousands(count as f64),
            self.settings.smtp_pool_size
        );
        let dir = self.opts.nodemailer_dir.clone();
        let skip = if self.opts.no_peer {
            Some("skipped (--no-peer)".to_string())
        } else if command_version("node", &["--version"]) == "not installed" {
            Some("skipped (Node.js not found)".to_string())
        } else if !dir.join("node_modules/nodemailer").exists() {
            Some(format!(
                "skipped (nodemailer not installed: run {}/install.sh)",
                dir.display()
            ))
        } else {
            None
        };
        if let Some(why) = skip {
            self.report.row("smtp", &label, "-", why);
            return Ok(());
        }
        self.fresh();
        let from = self.take_numbers(count);
        let spawned = Instant::now();
        let out = tokio::process::Command::new("node")
            .arg(dir.join("send.mjs"))
            .env("SMTP_HOST", self.sink.smtp_addr.ip().to_string())
            .env("SMTP_PORT", self.sink.smtp_addr.port().to_string())
            .env("FROM_N", from.to_string())
            .env("COUNT", count.to_string())
            .env("POOL", self.settings.smtp_pool_size.to_string())
            .env("IN_FLIGHT", self.settings.concurrency.to_string())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(self.opts.timeout_secs), out)
            .await
            .context("nodemailer peer timed out")?
            .context("run node (is Node.js installed?)")?;
        let done_at = Instant::now();
        let stdout = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(
            out.status.success(),
            "nodemailer peer failed ({}): {}{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        let own: serde_json::Value = stdout
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or_default();
        let delivered = self.sink.count();
        anyhow::ensure!(
            delivered >= count,
            "nodemailer: only {delivered} of {count} mails reached the sink ({stdout})"
        );
        let first = (from..from + count)
            .filter_map(|n| self.sink.arrival(n))
            .min()
            .unwrap_or(spawned);
        let steady = done_at.duration_since(first).as_secs_f64();
        let rate = count as f64 / steady;
        self.report.row(
            "smtp",
            &label,
            format!("{} msg/s", thousands(rate)),
            format!(
                "first receipt→all sent {steady:.2}s; start-up {:.2}s; its own clock {} msg/s; dup {}",
                first.duration_since(spawned).as_secs_f64(),
                own["messages_per_s"]
                    .as_f64()
                    .map_or("?".to_string(), thousands),
                self.sink.duplicates()
            ),
        );
        self.report.set(
            "smtp",
            "nodemailer",
            json!({"messages": count, "messages_per_s": rate, "steady_s": steady,
                   "startup_s": first.duration_since(spawned).as_secs_f64(),
                   "duplicates": self.sink.duplicates(), "own": own}),
        );
        Ok(())
    }

    /// graphile-worker: burn-down over the concurrency sweep, latency at the best setting.
    async fn peer(&mut self, count: u64) -> anyhow::Result<()> {
        if !self
            .opts
            .peer_dir
            .join("node_modules/graphile-worker")
            .exists()
        {
            anyhow::bail!(
                "graphile-worker is not installed: run {}/install.sh (or pass --no-peer)",
                self.opts.peer_dir.display()
            );
        }
        let mut best: Option<(f64, GraphileSettings)> = None;
        for &c in &self.opts.peer_concurrency.clone() {
            let g = GraphileSettings {
                concurrency: c,
                local_queue: (c + 1) as i64,
                batch_delay_ms: self.opts.peer_batch_delay_ms,
                max_pool_size: (c + 2).clamp(10, 40),
                poll_interval_ms: 2000,
            };
            let rate = self
                .burn(System::Graphile, Some(&g), count, Burn::Http)
                .await?;
            if best.as_ref().map_or(true, |(r, _)| rate > *r) {
                best = Some((rate, g));
            }
        }
        let Some((rate, best_g)) = best else {
            return Ok(());
        };
        self.report
            .set("peer_burn_down", "best_messages_per_s", json!(rate));
        self.report.set(
            "peer_burn_down",
            "best_key",
            json!(format!("c{}", best_g.concurrency)),
        );
        // Latency is about wake-up, not throughput: graphile-worker's docs say a local queue can
        // add latency and advise a small one or none at low throughput, and batched completion
        // only delays the bookkeeping; so: the sweep's smallest concurrency, neither feature.
        let lg = GraphileSettings {
            concurrency: self
                .opts
                .peer_concurrency
                .iter()
                .copied()
                .min()
                .unwrap_or(8),
            local_queue: -1,
            batch_delay_ms: -1,
            max_pool_size: 10,
            poll_interval_ms: 2000,
        };
        self.latency(System::Graphile, Some(&lg)).await?;
        Ok(())
    }

    /// Ratios against the targets.
    fn summary(&mut self) {
        let f = &serde_json::Value::Object(self.report.figures.clone());
        let outboxd = f["burn_down"]["outboxd"]["messages_per_s"].as_f64();
        let floor = f["floor"]["best_messages_per_s"].as_f64();
        let peer = f["peer_burn_down"]["best_messages_per_s"].as_f64();
        let mut rows = Vec::new();
        if let (Some(o), Some(p)) = (outboxd, peer) {
            rows.push((
                "outboxd / graphile-worker best",
                format!("{:.2}×", o / p),
                "target ≥3×".to_string(),
                json!(o / p),
                "vs_graphile",
            ));
        }
        if let (Some(o), Some(fl)) = (outboxd, floor) {
            rows.push((
                "outboxd / outbox floor",
                format!("{:.0} %", 100.0 * o / fl),
                "target ≥60 %".to_string(),
                json!(o / fl),
                "vs_floor",
            ));
        }
        // Per delivered message, outboxd's 100k burn-down against graphile-worker's best setting.
        let ours = &f["burn_down"]["outboxd"];
        let theirs = f["peer_burn_down"]["best_key"]
            .as_str()
            .map(|k| &f["peer_burn_down"][k]);
        let per_msg = [
            (
                "PostgreSQL CPU/msg, outboxd / graphile",
                "/postgres/server_cpu_us_per_msg",
                "µs",
                "target ≤½ (server-wide: every postgres process incl. exited backends)",
                "pg_cpu_vs_graphile",
            ),
            (
                "PostgreSQL CPU/msg in its db's backends, outboxd / graphile",
                "/postgres/database_cpu_us_per_msg",
                "µs",
                "target ≤½ (only the backends of the bench database: less noise from other users)",
                "pg_db_cpu_vs_graphile",
            ),
            (
                "WAL bytes/msg, outboxd / graphile",
                "/postgres/wal_bytes_per_msg",
                "B",
                "target ≤1×, stretch ≤½ (server-wide pg_current_wal_lsn difference)",
                "wal_vs_graphile",
            ),
            (
                "own CPU/msg, outboxd / graphile-worker process",
                "/cpu_us_per_msg",
                "µs",
                "(the daemon's process vs node's)",
                "process_cpu_vs_graphile",
            ),
        ];
        for (what, ptr, unit, target, key) in per_msg {
            if let (Some(o), Some(p)) = (
                ours.pointer(ptr).and_then(|v| v.as_f64()),
                theirs.and_then(|t| t.pointer(ptr)).and_then(|v| v.as_f64()),
            ) {
                rows.push((
                    what,
                    format!(
                        "{:.2}× ({o:.0} vs {p:.0} {unit})",
                        o / p.max(f64::MIN_POSITIVE)
                    ),
                    target.to_string(),
                    json!({"ratio": o / p.max(f64::MIN_POSITIVE), "outboxd": o, "graphile": p}),
                    key,
                ));
            }
        }
        if let (Some(o), Some(n)) = (
            f["smtp"]["outboxd"]["messages_per_s"].as_f64(),
            f["smtp"]["nodemailer"]["messages_per_s"].as_f64(),
        ) {
            rows.push((
                "outboxd SMTP / nodemailer",
                format!("{:.2}×", o / n),
                "target ≥5×".to_string(),
                json!(o / n),
                "smtp_vs_nodemailer",
            ));
        }
        let seq_p = |k: &str, q: &str| f["latency"]["outboxd"][k][q].as_f64();
        let peer_lat = f["peer_latency"]
            .as_object()
            .and_then(|m| m.values().next().cloned());
        if let (Some(o), Some(pl)) = (
            seq_p("sequential", "p50_ms"),
            peer_lat
                .as_ref()
                .and_then(|v| v["sequential"]["p50_ms"].as_f64()),
        ) {
            rows.push((
                "sequential p50 graphile / outboxd",
                format!("{:.1}×", pl / o),
                "(latency: higher = outboxd faster)".to_string(),
                json!(pl / o),
                "latency_p50_graphile_over_outboxd",
            ));
        }
        for (what, value, note, j, key) in rows {
            self.report.row("ratios", what, value, note);
            self.report.set("ratios", key, j);
        }
    }
}

fn p_log(work: &Path, tag: &str) -> String {
    work.join(tag).display().to_string()
}

fn outboxd_poll_secs(s: &str) -> Option<f64> {
    let s = s.trim();
    if let Some(ms) = s.strip_suffix("ms") {
        return ms.trim().parse::<f64>().ok().map(|v| v / 1000.0);
    }
    if let Some(sec) = s.strip_suffix('s') {
        return sec.trim().parse().ok();
    }
    if let Some(m) = s.strip_suffix('m') {
        return m.trim().parse::<f64>().ok().map(|v| v * 60.0);
    }
    None
}

fn command_version(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "not installed".into())
}
