//! The `outboxd` command: parses the command line and calls into the library.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use outboxd::config::Config;

/// Delivers the messages applications write into a PostgreSQL outbox (api.send_message) through
/// SMTP, HTTP APIs, push and chat providers, or a local spool file.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Main configuration file.
    #[arg(
        short,
        long,
        global = true,
        env = "OUTBOXD_CONFIG",
        default_value = "conf/outboxd.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: create/migrate the database, LISTEN on `outbox`, deliver until TERM/INT.
    Run {
        /// Enqueue one demo message for the file connector at start.
        #[arg(long)]
        demo: bool,
    },
    /// Create the database if missing and apply pending migrations.
    Migrate,
    /// Build every connector from the configuration without sending anything; exit 1 on problems.
    CheckConfig,
    /// Enqueue a message through api.send_message and print its id.
    Send {
        /// Agent code, e.g. file.agent, smtp.agent, fcm.agent.
        #[arg(long)]
        agent: String,
        /// Profile of the agent's connector.
        #[arg(long, default_value = "default")]
        profile: String,
        #[arg(long)]
        address: String,
        #[arg(long)]
        subject: Option<String>,
        /// Message content.
        #[arg(
            long,
            conflicts_with = "content_file",
            required_unless_present = "content_file"
        )]
        content: Option<String>,
        /// Read the content from this file (`-` for stdin).
        #[arg(long)]
        content_file: Option<PathBuf>,
        /// Idempotency key: sending the same code twice returns the first message.
        #[arg(long)]
        code: Option<String>,
        #[arg(long)]
        label: Option<String>,
        #[arg(long, default_value_t = 0)]
        priority: i32,
        /// Deliver not before this time (RFC 3339).
        #[arg(long)]
        send_at: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// Show counts by state and agent, the oldest prepared message, recent failures.
    Status,
    /// Repeat failed messages (failed → prepared).
    Retry {
        /// Message ids.
        ids: Vec<uuid::Uuid>,
        /// Only messages of this agent.
        #[arg(long)]
        agent: Option<String>,
        /// Only messages whose last error has this code (e.g. http-503).
        #[arg(long)]
        error_code: Option<String>,
        /// Every failed message.
        #[arg(long)]
        all: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("outboxd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn connect(cfg: &Config) -> anyhow::Result<tokio_postgres::Client> {
    let (client, _task) = outboxd::db::connect_one(cfg.database_url.expose())
        .await
        .with_context(|| {
            format!(
                "cannot connect to {}",
                outboxd::config::redact_url(cfg.database_url.expose())
            )
        })?;
    Ok(client)
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(&cli.config)?;
    // The demo shows each delivery, which is a DEBUG event of the dispatcher.
    let demo = matches!(cli.command, Command::Run { demo: true });
    outboxd::telemetry::init(
        cfg.log_format,
        if demo {
            "info,outboxd::dispatch=debug"
        } else {
            "info"
        },
    );
    match cli.command {
        Command::Run { demo } => {
            let controls = outboxd::Controls::default();
            let stop = outboxd::shutdown::signals(Arc::clone(&controls.reload))?;
            if demo {
                outboxd::db::migrate::prepare_database(
                    cfg.database_url.expose(),
                    cfg.create_database,
                )
                .await?;
                let id = outboxd::ops::send(&connect(&cfg).await?, &outboxd::ops::demo_message())
                    .await?;
                tracing::info!(message_id = %id, "demo message enqueued for file.agent");
            }
            outboxd::run(cfg, stop, controls).await?;
        }
        Command::Migrate => {
            let applied = outboxd::db::migrate::prepare_database(
                cfg.database_url.expose(),
                cfg.create_database,
            )
            .await?;
            if applied.is_empty() {
                println!("database is up to date");
            } else {
                println!("applied migrations {applied:?}");
            }
        }
        Command::CheckConfig => {
            let report = outboxd::ops::check_config(&cfg).await;
            print!("{report}");
            if !report.ok() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Send {
            agent,
            profile,
            address,
            subject,
            content,
            content_file,
            code,
            label,
            priority,
            send_at,
        } => {
            let content = match (content, content_file) {
                (Some(c), _) => c,
                (None, Some(p)) if p.as_os_str() == "-" => {
                    std::io::read_to_string(std::io::stdin())?
                }
                (None, Some(p)) => std::fs::read_to_string(&p)
                    .with_context(|| format!("cannot read {}", p.display()))?,
                (None, None) => unreachable!("clap requires one"),
            };
            let m = outboxd::ops::NewMessage {
                agent,
                profile,
                address,
                subject,
                content,
                code,
                label,
                priority,
                send_at,
                ..Default::default()
            };
            let id = outboxd::ops::send(&connect(&cfg).await?, &m).await?;
            println!("{id}");
        }
        Command::Status => {
            print!("{}", outboxd::ops::status(&connect(&cfg).await?).await?);
        }
        Command::Retry {
            ids,
            agent,
            error_code,
            all,
        } => {
            if ids.is_empty() && agent.is_none() && error_code.is_none() && !all {
                anyhow::bail!(
                    "name message ids, or filter with --agent / --error-code, or pass --all"
                );
            }
            let f = outboxd::ops::RetryFilter {
                ids,
                agent,
                error_code,
                all,
            };
            let done = outboxd::ops::retry(&connect(&cfg).await?, &f).await?;
            for id in &done {
                println!("{id}");
            }
            eprintln!("{} message(s) repeated", done.len());
        }
    }
    Ok(ExitCode::SUCCESS)
}
