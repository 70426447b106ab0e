//! The `outboxd` command: parses the command line and calls into the library.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use outboxd::config::Config;

/// mimalloc instead of glibc's malloc: a delivery allocates and frees many small buffers (request,
/// headers, reply) across threads, where glibc's arenas spent a fifth of the daemon's CPU in the
/// burn-down (malloc, free, consolidation, arena locks); see the README's figures.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    Status {
        /// Refresh every --interval until interrupted.
        #[arg(long)]
        watch: bool,
        #[arg(long, default_value = "2s")]
        interval: humantime::Duration,
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
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
        /// Only messages that failed since then: a duration ("2h": the last two hours) or an
        /// RFC 3339 time.
        #[arg(long, value_parser = parse_since)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Every failed message (with the other filters: every one that matches them).
        #[arg(long, visible_alias = "failed")]
        all: bool,
    },
    /// Cancel prepared messages (prepared → created: kept, not delivered).
    Cancel {
        #[arg(required = true)]
        ids: Vec<uuid::Uuid>,
    },
    /// Follow deliveries live: time, message id, agent, profile, outcome, code, latency.
    Tail {
        /// Start with the oldest recorded attempt instead of the next new one.
        #[arg(long)]
        from_start: bool,
        #[arg(long, default_value = "500ms")]
        interval: humantime::Duration,
    },
    /// Apply retention now (the `[retention]` settings, or the ages given here).
    Purge {
        /// Only report what would be cleared and deleted.
        #[arg(long)]
        dry_run: bool,
        /// Clear the content of messages finished longer ago than this.
        #[arg(long)]
        content_after: Option<humantime::Duration>,
        /// Delete messages finished longer ago than this.
        #[arg(long)]
        delete_after: Option<humantime::Duration>,
    },
    /// Manage message templates (stored in the database, versioned; the syntax is checked here
    /// before saving).
    #[command(subcommand)]
    Template(TemplateCommand),
    /// DingTalk app tools (profiles of the dingtalk connector).
    #[command(subcommand)]
    Dingtalk(DingtalkCommand),
    /// Manage scheduled and recurring send tasks (stored in the database; run by the daemon).
    #[command(subcommand)]
    Task(TaskCommand),
    /// Render a template (a NAME in the database, or a FILE) with variables, as the daemon would.
    /// Prints `Subject: …`, a blank line and the body; with --out, writes the body there and
    /// prints only the subject line.
    Render {
        /// A template name, or the path of a template file.
        #[arg(long)]
        template: String,
        /// A JSON object of variables (default: none).
        #[arg(long)]
        vars: Option<PathBuf>,
        /// The kind of a template file (default: from its extension: .card.json is image, .html,
        /// .md, .json, else text).
        #[arg(long, value_parser = parse_kind)]
        kind: Option<outboxd::render::Kind>,
        /// The subject template of a template file.
        #[arg(long)]
        subject: Option<String>,
        /// Write the rendered body to this file (a picture card: the PNG; required).
        #[arg(long)]
        out: Option<PathBuf>,
        /// A picture card: render it this many times more on this thread and print cards/s
        /// (the benchmark of bench/cards).
        #[arg(long, default_value_t = 0)]
        repeat: u32,
    },
}

#[derive(Subcommand)]
enum DingtalkCommand {
    /// Create a group chat (`chat/create`) with the profile's app, record it (api.dingtalk_chats())
    /// and print its chatid, the address `chat:<chatid>` of api.send_dingtalk.
    ChatCreate {
        #[arg(long, default_value = "default")]
        profile: String,
        #[arg(long)]
        name: String,
        /// The owner's userid.
        #[arg(long)]
        owner: String,
        /// Member userids, comma-separated.
        #[arg(long, value_delimiter = ',')]
        users: Vec<String>,
    },
}

#[derive(Subcommand)]
enum TemplateCommand {
    /// Create a template (version 1) from a file.
    Add {
        name: String,
        #[arg(long)]
        file: PathBuf,
        /// text, html, markdown, json or image (default: from the file's extension; .card.json
        /// is image).
        #[arg(long, value_parser = parse_kind)]
        kind: Option<outboxd::render::Kind>,
        /// Subject template (e-mail).
        #[arg(long)]
        subject: Option<String>,
        /// Default agent of api.send_template (code or id).
        #[arg(long)]
        agent: Option<String>,
        /// Default profile of api.send_template.
        #[arg(long)]
        profile: Option<String>,
        #[arg(long)]
        description: Option<String>,
    },
    /// Add the next version of a template from a file (messages already built keep theirs).
    Update {
        name: String,
        #[arg(long)]
        file: PathBuf,
        /// New subject template (default: keep the current one; "" removes it).
        #[arg(long)]
        subject: Option<String>,
    },
    /// List templates: name, kind, agent, profile, newest version.
    List,
    /// Print one version of a template (default: the newest).
    Show {
        name: String,
        #[arg(long)]
        version: Option<i32>,
    },
}

// Parsed once per process: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum TaskCommand {
    /// Create a task (api.add_task); the schedule and zone are checked before saving.
    Add {
        name: String,
        /// The cover template: what each recipient gets, rendered for the channel.
        #[arg(long)]
        cover: String,
        /// The body template: the page behind the cover's {{ read_url }}.
        #[arg(long)]
        body: Option<String>,
        /// "once 2026-12-24 18:00", "hourly 45", "daily 09:30", "cron 0 9 * * MON-FRI" or "manual".
        #[arg(long)]
        schedule: String,
        /// IANA time zone of the schedule's local times.
        #[arg(long, default_value = "UTC")]
        zone: String,
        /// A JSON file: an array of addresses or {"address": …, "vars": {…}} objects.
        #[arg(long, conflicts_with = "source", required_unless_present = "source")]
        recipients: Option<PathBuf>,
        /// A table or view with a column `address` (and `vars`, or other columns as variables).
        #[arg(long)]
        source: Option<String>,
        /// A JSON file with the variables every recipient shares.
        #[arg(long)]
        vars: Option<PathBuf>,
        /// Agent (code or id); default: the cover template's.
        #[arg(long)]
        agent: Option<String>,
        /// Profile; default: the cover template's, else "default".
        #[arg(long)]
        profile: Option<String>,
        /// Run at most this many times (a once task: 1).
        #[arg(long)]
        max_runs: Option<i32>,
        /// Not before this time (RFC 3339).
        #[arg(long, value_parser = parse_time)]
        start: Option<chrono::DateTime<chrono::Utc>>,
        /// Not after this time (RFC 3339).
        #[arg(long, value_parser = parse_time)]
        end: Option<chrono::DateTime<chrono::Utc>>,
        /// After downtime: run once for the missed due times ("once") or not at all ("skip").
        #[arg(long, default_value = "once")]
        catch_up: String,
        /// Create it paused.
        #[arg(long)]
        paused: bool,
        #[arg(long)]
        description: Option<String>,
    },
    /// List tasks: name, state, schedule, zone, next run, runs/maximum.
    List,
    /// Show a task, its executions' progress, and one execution's recipients not sent (and why).
    Show {
        /// The task's name or id.
        task: String,
        /// The execution (run number; default the newest).
        #[arg(long)]
        run: Option<i32>,
    },
    /// Start one execution now (api.run_task); prints its run id.
    Run { task: String },
    /// Stop scheduling a task.
    Pause { task: String },
    /// Schedule a paused task again, from now on.
    Resume { task: String },
}

fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|_| format!("\"{s}\" is not an RFC 3339 time"))
}

fn read_json(p: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    serde_json::from_str(&read_file(p)?).with_context(|| format!("{} is not JSON", p.display()))
}

fn parse_kind(s: &str) -> Result<outboxd::render::Kind, String> {
    outboxd::render::Kind::parse(s)
        .map_err(|_| format!("\"{s}\" is not one of text, html, markdown, json, image"))
}

fn read_file(p: &std::path::Path) -> anyhow::Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
}

/// `--since`: a duration back from now, or an RFC 3339 time.
fn parse_since(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    if let Ok(d) = humantime::parse_duration(s) {
        let d = chrono::Duration::from_std(d).map_err(|e| e.to_string())?;
        return Ok(chrono::Utc::now() - d);
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|_| format!("\"{s}\" is neither a duration (2h) nor an RFC 3339 time"))
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
    // Drop-in mode: the database is Apostol's; only the daemon and check-config know how to
    // talk to it (through its api functions). The other commands work on outboxd's schema.
    if cfg.mode == outboxd::config::SourceMode::Apostol
        && !matches!(
            cli.command,
            Command::Run { demo: false } | Command::CheckConfig
        )
    {
        anyhow::bail!(
            "source = \"apostol\": the database is an Apostol database outboxd does not own; \
             only `run` and `check-config` work in drop-in mode (use the platform's api functions)"
        );
    }
    match cli.command {
        Command::Run { demo } => {
            let controls = outboxd::Controls {
                notifier: outboxd::systemd::Notifier::from_env(),
                ..Default::default()
            };
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
        Command::Dingtalk(DingtalkCommand::ChatCreate {
            profile,
            name,
            owner,
            users,
        }) => {
            let chatid = outboxd::connector::dingtalk::poller::create_chat_now(
                &cfg, &profile, &name, &owner, &users,
            )
            .await
            .map_err(anyhow::Error::msg)?;
            println!("{chatid}");
        }
        Command::Template(t) => {
            use outboxd::render::store;
            let client = connect(&cfg).await?;
            match t {
                TemplateCommand::Add {
                    name,
                    file,
                    kind,
                    subject,
                    agent,
                    profile,
                    description,
                } => {
                    let t = store::NewTemplate {
                        kind: kind.unwrap_or_else(|| outboxd::render::Kind::from_path(&file)),
                        body: read_file(&file)?,
                        name,
                        subject,
                        agent,
                        profile,
                        description,
                    };
                    let id = store::add(&client, &t).await?;
                    println!("{id}");
                }
                TemplateCommand::Update {
                    name,
                    file,
                    subject,
                } => {
                    let v = store::update(&client, &name, subject.as_deref(), &read_file(&file)?)
                        .await?;
                    println!("{name} v{v}");
                }
                TemplateCommand::List => print!("{}", store::list(&client).await?),
                TemplateCommand::Show { name, version } => {
                    let t = store::get(&client, &name, version).await?;
                    println!("# {} v{} ({})", t.name, t.version, t.kind);
                    if let Some(s) = &t.subject {
                        println!("Subject: {s}");
                    }
                    println!();
                    print!("{}", t.body);
                }
            }
        }
        Command::Task(t) => {
            use outboxd::schedule::store;
            let client = connect(&cfg).await?;
            match t {
                TaskCommand::Add {
                    name,
                    cover,
                    body,
                    schedule,
                    zone,
                    recipients,
                    source,
                    vars,
                    agent,
                    profile,
                    max_runs,
                    start,
                    end,
                    catch_up,
                    paused,
                    description,
                } => {
                    let t = store::NewTask {
                        name,
                        cover,
                        body,
                        schedule,
                        time_zone: zone,
                        recipients: recipients.as_deref().map(read_json).transpose()?,
                        source,
                        vars: match vars {
                            Some(p) => read_json(&p)?,
                            None => serde_json::json!({}),
                        },
                        agent,
                        profile,
                        max_runs,
                        start_at: start,
                        end_at: end,
                        enabled: !paused,
                        catch_up,
                        description,
                    };
                    println!("{}", store::add(&client, &t).await?);
                }
                TaskCommand::List => print!("{}", store::list(&client).await?),
                TaskCommand::Show { task, run } => {
                    print!("{}", store::show(&client, &task, run).await?)
                }
                TaskCommand::Run { task } => println!("{}", store::run(&client, &task).await?),
                TaskCommand::Pause { task } => store::pause(&client, &task).await?,
                TaskCommand::Resume { task } => store::resume(&client, &task).await?,
            }
        }
        Command::Render {
            template,
            vars,
            kind,
            subject,
            out,
            repeat,
        } => {
            let vars: serde_json::Value = match vars {
                Some(p) => serde_json::from_str(&read_file(&p)?)
                    .with_context(|| format!("{} is not JSON", p.display()))?,
                None => serde_json::json!({}),
            };
            anyhow::ensure!(vars.is_object(), "the variables must be a JSON object");
            let path = std::path::Path::new(&template);
            let source = if path.is_file() {
                outboxd::render::Template {
                    name: path
                        .file_name()
                        .map_or_else(|| template.clone(), |n| n.to_string_lossy().into_owned()),
                    kind: kind
                        .unwrap_or_else(|| outboxd::render::Kind::from_path(path))
                        .as_str()
                        .to_string(),
                    version: 0,
                    subject,
                    body: read_file(path)?,
                }
            } else {
                outboxd::render::store::preview_source(&connect(&cfg).await?, &template, &vars)
                    .await?
            };
            if source.kind == "image" {
                // A picture card: the fonts of [cards], parsed once for this preview.
                let out = out.context("a picture card needs --out FILE.png")?;
                let fonts = outboxd::render::fonts::Fonts::load(&cfg.cards)?;
                let dir = outboxd::render::card::preview_dir(
                    cfg.cards.backgrounds.as_deref(),
                    path.is_file().then_some(path),
                );
                let cards = outboxd::render::card::Cards::new(Arc::new(fonts), dir);
                let spec = outboxd::render::card::CardSpec::parse(&source.name, &source.body)
                    .map_err(|e| anyhow::anyhow!("{} ({})", e, e.code()))?;
                let background = match spec.background_ref() {
                    Ok(Some(outboxd::render::card::BackgroundRef::Db(n))) => connect(&cfg)
                        .await?
                        .query_opt(
                            "SELECT bytes FROM outbox.card_backgrounds WHERE name = $1",
                            &[&n],
                        )
                        .await?
                        .map(|r| r.get(0)),
                    _ => None,
                };
                let (alt, image) = cards
                    .render(&source, &vars, background)
                    .map_err(|e| anyhow::anyhow!("{} ({})", e, e.code()))?;
                std::fs::write(&out, &image.bytes)
                    .with_context(|| format!("cannot write {}", out.display()))?;
                if repeat > 0 {
                    let started = std::time::Instant::now();
                    for _ in 0..repeat {
                        cards
                            .render(&source, &vars, None)
                            .map_err(|e| anyhow::anyhow!("{e}"))?;
                    }
                    let s = started.elapsed().as_secs_f64();
                    println!(
                        "rendered {repeat} cards in {s:.3}s: {:.1} cards/s",
                        repeat as f64 / s
                    );
                }
                println!(
                    "{}: {}x{} PNG, {} bytes",
                    out.display(),
                    image.width,
                    image.height,
                    image.bytes.len()
                );
                println!("{alt}");
                return Ok(ExitCode::SUCCESS);
            }
            let job = outboxd::render::Job {
                template: source,
                vars,
            };
            let r = match outboxd::render::render(&job) {
                Ok(r) => r,
                Err(e) => anyhow::bail!("{} ({})", e, e.code()),
            };
            if let Some(s) = &r.subject {
                println!("Subject: {s}");
            }
            match out {
                Some(p) => std::fs::write(&p, &r.content)
                    .with_context(|| format!("cannot write {}", p.display()))?,
                None => {
                    if r.subject.is_some() {
                        println!();
                    }
                    print!("{}", r.content);
                }
            }
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
        Command::Status {
            watch,
            interval,
            json,
        } => {
            let client = connect(&cfg).await?;
            loop {
                let s = outboxd::ops::status(&client).await?;
                if watch && !json {
                    // Clear the screen and home the cursor, as watch(1) does.
                    println!("\x1b[2J\x1b[H{}", chrono::Utc::now().to_rfc3339());
                }
                if json {
                    println!("{}", s.to_json());
                } else {
                    print!("{s}");
                }
                if !watch {
                    break;
                }
                tokio::time::sleep(*interval).await;
            }
        }
        Command::Retry {
            ids,
            agent,
            error_code,
            since,
            all,
        } => {
            if ids.is_empty() && agent.is_none() && error_code.is_none() && since.is_none() && !all
            {
                anyhow::bail!(
                    "name message ids, or filter with --agent / --error-code / --since, or pass --failed (--all)"
                );
            }
            let f = outboxd::ops::RetryFilter {
                ids,
                agent,
                error_code,
                since,
                all,
            };
            let done = outboxd::ops::retry(&connect(&cfg).await?, &f, |n, total| {
                if total >= 100 && (n % 100 == 0 || n == total) {
                    eprintln!("repeated {n}/{total}");
                }
            })
            .await?;
            for id in &done {
                println!("{id}");
            }
            eprintln!("{} message(s) repeated", done.len());
        }
        Command::Cancel { ids } => {
            let mut failed = false;
            for (id, r) in outboxd::ops::cancel(&connect(&cfg).await?, &ids).await {
                match r {
                    Ok(state) => println!("{id} {state}"),
                    Err(e) => {
                        failed = true;
                        eprintln!("{id} {e}");
                    }
                }
            }
            if failed {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Tail {
            from_start,
            interval,
        } => {
            let client = connect(&cfg).await?;
            let mut after = if from_start {
                0
            } else {
                outboxd::ops::last_attempt_seq(&client).await?
            };
            loop {
                let lines = outboxd::ops::attempts_after(&client, after).await?;
                for l in &lines {
                    println!("{l}");
                    after = l.seq;
                }
                use std::io::Write as _;
                std::io::stdout().flush()?;
                if lines.len() < 1000 {
                    tokio::time::sleep(*interval).await;
                }
            }
        }
        Command::Purge {
            dry_run,
            content_after,
            delete_after,
        } => {
            let mut r = cfg.retention.clone();
            if let Some(d) = content_after {
                r.content_after = Some(*d);
            }
            if let Some(d) = delete_after {
                r.delete_after = Some(*d);
            }
            if !r.enabled() {
                anyhow::bail!(
                    "nothing to purge: set [retention] content_after / delete_after, or pass --content-after / --delete-after"
                );
            }
            let db = outboxd::db::Db::connect(
                cfg.database_url.expose(),
                2,
                cfg.db_timeout,
                Some(&cfg.synchronous_commit),
            )?;
            if dry_run {
                let p = outboxd::dispatch::retention::preview(&db, &r).await?;
                println!(
                    "would clear the content of {} message(s) ({} with a task's read-link body)",
                    p.content_rows, p.task_body_rows
                );
                println!(
                    "would delete {} message(s) with their replies, attempts and history",
                    p.delete_rows
                );
            } else {
                use outboxd::dispatch::retention::Phase;
                let stop = tokio_util::sync::CancellationToken::new();
                let p =
                    outboxd::dispatch::retention::run_once(&db, &r, &stop, |phase, _, total| {
                        let what = match phase {
                            Phase::Content => "contents cleared",
                            Phase::Delete => "messages deleted",
                        };
                        eprintln!("{what}: {total}");
                    })
                    .await?;
                if p.busy {
                    anyhow::bail!("another daemon is purging right now; try again later");
                }
                println!(
                    "cleared the content of {} message(s), deleted {} message(s)",
                    p.contents_cleared, p.messages_deleted
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
