//! `outboxd-bench`: the benchmark of issue 5. Prints figures (house style: speed and memory targets
//! live here, not in timed tests) and writes them as JSON.
//!
//! Every scenario runs on a fresh database of the same PostgreSQL server, against one in-process
//! loopback HTTP sink ([`sink`]); the systems under test run as separate processes ([`procs`]).
//! Scenarios: the sink's raw rate; the outbox floor (pgbench running the bare claim + record SQL);
//! burn-down of a backlog; insert→receipt latency, sequential and at a steady offered load; idle
//! cost in transactions per minute; peak RSS with a large backlog; enqueue rate, claim latency and
//! RSS as a backlog grows to 10M (`backlog`); and the graphile-worker peer on
//! the burn-down and latency scenarios. Run it through `bash bench/run`.

mod pg;
mod pgcost;
mod procs;
mod report;
mod scenarios;
mod sink;

use std::path::PathBuf;

use clap::Parser;

/// The outboxd benchmark (see bench/README.md and the README's "Benchmark" section).
#[derive(Parser, Debug, Clone, serde::Serialize)]
#[command(version, about)]
pub struct Opts {
    /// Server to create the benchmark databases on (needs CREATEDB).
    #[arg(
        long,
        env = "BENCH_ADMIN_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub admin_url: String,
    /// The release outboxd binary.
    #[arg(long, default_value = "target/release/outboxd")]
    pub outboxd: PathBuf,
    /// Messages in the burn-down backlog (and per floor run).
    #[arg(long, default_value_t = 100_000)]
    pub messages: u64,
    /// Messages of the big burn-down (0 skips it; bench/run passes 1,000,000 unless told otherwise).
    #[arg(long, env = "BENCH_BIG_MESSAGES", default_value_t = 0)]
    pub big_messages: u64,
    /// Messages per graphile-worker burn-down run (default: --messages).
    #[arg(long)]
    pub peer_messages: Option<u64>,
    /// Sequential latency: messages measured (after 50 warm-up ones).
    #[arg(long, default_value_t = 1_000)]
    pub latency_messages: u64,
    /// Steady-load latency: offered messages per second…
    #[arg(long, default_value_t = 500)]
    pub rate: u64,
    /// …for this many seconds…
    #[arg(long, default_value_t = 10)]
    pub rate_secs: u64,
    /// …from this many concurrent producers (one connection each).
    #[arg(long, default_value_t = 16)]
    pub producers: usize,
    /// Backlog for the memory scenario.
    #[arg(long, default_value_t = 1_000_000)]
    pub memory_backlog: u64,
    /// How long the daemon works on the memory backlog while RSS is sampled.
    #[arg(long, default_value_t = 20)]
    pub memory_secs: u64,
    /// Backlog scenario: messages at its largest step (steps at a tenth, 3/10 and all of it);
    /// bench/run passes 1,000,000 unless this or BENCH_BACKLOG_MESSAGES is given.
    #[arg(long, env = "BENCH_BACKLOG_MESSAGES", default_value_t = 10_000_000)]
    pub backlog_messages: u64,
    /// Backlog scenario: claim + release_claim calls measured per step and claim size.
    #[arg(long, default_value_t = 50)]
    pub backlog_claims: usize,
    /// Backlog scenario: how long the daemon delivers from the largest backlog while RSS is sampled.
    #[arg(long, default_value_t = 30)]
    pub backlog_daemon_secs: u64,
    /// Idle cost: seconds measured…
    #[arg(long, default_value_t = 120)]
    pub idle_secs: u64,
    /// …with this poll interval (outboxd's default).
    #[arg(long, default_value = "60s")]
    pub idle_poll: String,
    /// outboxd bench profile: messages claimed per round trip.
    #[arg(long, default_value_t = 500)]
    pub batch_size: usize,
    /// outboxd bench profile: deliveries in flight (claimed, not yet recorded).
    #[arg(long, default_value_t = 1000)]
    pub concurrency: usize,
    /// outboxd bench profile: pooled connections.
    #[arg(long, default_value_t = 4)]
    pub pool_size: usize,
    /// SMTP burn-down: mails through the smtp connector to the SMTP side of the sink.
    #[arg(long, default_value_t = 20_000)]
    pub smtp_messages: u64,
    /// SMTP burn-down: the smtp connector's connection pool.
    #[arg(long, default_value_t = 16)]
    pub smtp_pool_size: usize,
    /// graphile-worker concurrency sweep.
    #[arg(long, value_delimiter = ',', default_value = "8,32,128")]
    pub peer_concurrency: Vec<usize>,
    /// graphile-worker completeJobBatchDelay/failJobBatchDelay (ms; -1 off).
    #[arg(long, default_value_t = 0)]
    pub peer_batch_delay_ms: i64,
    /// Skip the graphile-worker peer.
    #[arg(long)]
    pub no_peer: bool,
    /// Directory of the graphile-worker peer.
    #[arg(long, default_value = "bench/peers/graphile")]
    pub peer_dir: PathBuf,
    /// Directory of the nodemailer peer of the SMTP scenario (skipped with --no-peer).
    #[arg(long, default_value = "bench/peers/nodemailer")]
    pub nodemailer_dir: PathBuf,
    /// pgbench clients for the floor (the best run is reported).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub floor_clients: Vec<usize>,
    /// Only these scenarios (sink,floor,burn,big,latency,idle,memory,backlog,smtp,peer); default all.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Where the JSON results and the work files (configs, logs) go.
    #[arg(long, default_value = "bench/results")]
    pub results: PathBuf,
    /// Upper bound of one burn-down.
    #[arg(long, default_value_t = 900)]
    pub timeout_secs: u64,
}

impl Opts {
    pub fn wants(&self, scenario: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == scenario)
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let opts = Opts::parse();
    scenarios::run_all(opts).await
}
