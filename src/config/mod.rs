//! Configuration: the main TOML file, one `.conf` file per connector kind (one TOML table per
//! profile), and `OUTBOXD_*` / `DATABASE_URL` environment overrides.
//!
//! Invariants: unknown keys are rejected; every error names the file and the key; secrets are
//! [`Secret`]s, whose `Debug` and `Display` never print the value. Relative paths in the main file
//! are relative to the main file's directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

// The leaf types live in `settings` so that `connector` need not import `config`; these paths
// keep working.
pub use crate::settings::{
    deserialize_table, is_credential_param, redact_url, toml_syntax, ConfigError, Dur,
    ProfileContext, Secret, SecretSource,
};

use crate::connector::ConnectorConfig;

/// How log lines look.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// Whose database the daemon serves (`source`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceMode {
    /// outboxd's own schema (migrated by the daemon): the claim loop of [`crate::dispatch`].
    #[default]
    Outboxd,
    /// An existing Apostol db-platform database, served through its `api` functions as
    /// MessageServer does (see [`crate::apostol`]); no migration runs there.
    Apostol,
}

/// The main file, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MainFile {
    database_url: Option<Secret>,
    listen_url: Option<Secret>,
    poll_interval: Option<Dur>,
    batch_size: Option<usize>,
    concurrency: Option<usize>,
    lease: Option<Dur>,
    grace_period: Option<Dur>,
    db_timeout: Option<Dur>,
    pool_size: Option<usize>,
    synchronous_commit: Option<String>,
    session_role: Option<String>,
    log_format: Option<LogFormat>,
    migrate_on_start: Option<bool>,
    create_database: Option<bool>,
    worker_id: Option<String>,
    http_listen: Option<String>,
    http_max_body_bytes: Option<usize>,
    api_token_file: Option<PathBuf>,
    retention: Option<RetentionFile>,
    source: Option<SourceMode>,
    apostol: Option<crate::apostol::config::ApostolFile>,
    tasks: Option<crate::schedule::TasksConfig>,
    kafka: Option<crate::kafka::KafkaConfig>,
    cards: Option<crate::render::fonts::CardsConfig>,
    #[serde(default)]
    connectors: BTreeMap<String, PathBuf>,
    #[serde(default)]
    routes: BTreeMap<String, String>,
}

/// `[retention]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetentionFile {
    content_after: Option<Dur>,
    delete_after: Option<Dur>,
    batch_size: Option<usize>,
    every: Option<Dur>,
}

/// What the daemon deletes, and when (`[retention]`). Both ages count from a message's last state
/// change; nothing is deleted unless configured.
#[derive(Debug, Clone, PartialEq)]
pub struct Retention {
    /// The content of finished messages (submitted, failed, deleted) and of inbox replies is
    /// cleared this long after they finished; metadata, attempts and history stay.
    pub content_after: Option<Duration>,
    /// Finished messages are deleted with their replies, attempts and history this long after.
    pub delete_after: Option<Duration>,
    /// Messages per batch; each batch is one short transaction.
    pub batch_size: usize,
    /// How often the daemon runs retention.
    pub every: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            content_after: None,
            delete_after: None,
            batch_size: 1000,
            every: Duration::from_secs(3600),
        }
    }
}

impl Retention {
    pub fn enabled(&self) -> bool {
        self.content_after.is_some() || self.delete_after.is_some()
    }
}

/// The daemon's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the outbox lives (`DATABASE_URL` / `OUTBOXD_DATABASE_URL` override it).
    pub database_url: Secret,
    /// A direct connection for LISTEN when `database_url` goes through a transaction-pooling proxy.
    pub listen_url: Option<Secret>,
    /// Fallback poll: claims anything a notification missed, due retries and scheduled messages.
    pub poll_interval: Duration,
    /// Messages claimed per round trip.
    pub batch_size: usize,
    /// Deliveries in flight at once.
    pub concurrency: usize,
    /// How long a claim is valid without a heartbeat. At least every profile's `timeout` plus
    /// `db_timeout` (see [`Config::check_timing`]).
    pub lease: Duration,
    /// On TERM/INT, how long in-flight deliveries may finish before they are handed back.
    pub grace_period: Duration,
    /// Upper bound of every database call, on the client and (as `statement_timeout`) on the
    /// server.
    pub db_timeout: Duration,
    /// Pooled connections for ordinary queries.
    pub pool_size: usize,
    /// `synchronous_commit` of the daemon's own sessions (claims, outcomes, leases). `off` by
    /// default: a commit lost in a PostgreSQL crash only means a message is delivered again, which
    /// at-least-once delivery allows, and it saves a WAL flush per batch.
    pub synchronous_commit: String,
    /// The role the daemon's sessions (pool, LISTEN, the CLI's queries) switch to after connecting
    /// (`SET ROLE`, as the startup option `-c role=…`, folded into `database_url` and `listen_url`
    /// by [`Config::parse`]); migrations and CREATE DATABASE run as the connecting user. `None`
    /// (the default) or empty: no switch. The shipped configuration says `outboxd_daemon`.
    pub session_role: Option<String>,
    pub log_format: LogFormat,
    /// Apply pending migrations when `run` starts.
    pub migrate_on_start: bool,
    /// Create the database when it does not exist.
    pub create_database: bool,
    /// Name of this daemon in leases and history (default: host-pid-random).
    pub worker_id: Option<String>,
    /// The HTTP server's address (health, status, metrics, REST enqueue); off when `None`.
    pub http_listen: Option<std::net::SocketAddr>,
    /// Largest request body the HTTP server reads.
    pub http_max_body_bytes: usize,
    /// Bearer tokens the REST API accepts: `OUTBOXD_API_TOKEN` (comma-separated) and the lines
    /// of `api_token_file`. None: every REST call is refused.
    pub api_tokens: Vec<Secret>,
    /// What the daemon deletes, and when.
    pub retention: Retention,
    /// The task scheduler (`[tasks]`).
    pub tasks: crate::schedule::TasksConfig,
    /// The Kafka trigger (`[kafka]`); off when `None`.
    pub kafka: Option<crate::kafka::KafkaConfig>,
    /// Picture cards: fonts (parsed once at start), the fallback list, the backgrounds directory.
    pub cards: crate::render::fonts::CardsConfig,
    /// Connector kind → its `.conf` file.
    pub connectors: BTreeMap<String, PathBuf>,
    /// Agent code → connector kind, on top of the built-in routes.
    pub routes: BTreeMap<String, String>,
    /// Whose database `database_url` points at (`source`, default outboxd).
    pub mode: SourceMode,
    /// `[apostol]`: the drop-in mode's settings (present when `mode` is Apostol).
    pub apostol: Option<crate::apostol::config::ApostolConfig>,
    /// The main file this came from, for messages.
    pub source: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database_url: Secret::new("postgres://postgres@127.0.0.1:5432/outboxd"),
            listen_url: None,
            poll_interval: Duration::from_secs(60),
            batch_size: 100,
            concurrency: 64,
            // The default profile timeout (30 s) plus the default db_timeout (10 s), rounded up.
            lease: Duration::from_secs(60),
            grace_period: Duration::from_secs(10),
            db_timeout: Duration::from_secs(10),
            pool_size: 8,
            synchronous_commit: "off".into(),
            session_role: None,
            log_format: LogFormat::Human,
            migrate_on_start: true,
            create_database: true,
            worker_id: None,
            http_listen: None,
            http_max_body_bytes: 1 << 20,
            api_tokens: Vec::new(),
            retention: Retention::default(),
            tasks: Default::default(),
            kafka: None,
            cards: Default::default(),
            connectors: BTreeMap::new(),
            routes: BTreeMap::new(),
            mode: SourceMode::Outboxd,
            apostol: None,
            source: "(defaults)".into(),
        }
    }
}

/// Environment overrides of the main file: `OUTBOXD_<KEY>` for every scalar key.
const ENV_KEYS: &[&str] = &[
    "database_url",
    "listen_url",
    "poll_interval",
    "batch_size",
    "concurrency",
    "lease",
    "grace_period",
    "db_timeout",
    "pool_size",
    "synchronous_commit",
    "session_role",
    "log_format",
    "migrate_on_start",
    "create_database",
    "worker_id",
    "http_listen",
    "http_max_body_bytes",
    "api_token_file",
    "source",
];

impl Config {
    /// Reads the main file and applies the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(
                path.display().to_string(),
                None,
                format!("cannot read: {e}"),
            )
        })?;
        Self::parse(&text, path, |k| std::env::var(k).ok())
    }

    /// Parses main-file text; `env` looks up environment variables (tests pass their own).
    pub fn parse(
        text: &str,
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::new(&file, None, toml_syntax(text, &e)))?;
        for key in ENV_KEYS {
            let name = format!("OUTBOXD_{}", key.to_uppercase());
            let value = env(&name).or_else(|| {
                (*key == "database_url")
                    .then(|| env("DATABASE_URL"))
                    .flatten()
            });
            if let Some(v) = value {
                table.insert(key.to_string(), env_value(&v));
            }
        }
        crate::apostol::config::apply_env(&mut table, &env);
        crate::kafka::apply_env(&mut table, &env);
        let main: MainFile =
            deserialize_table(table).map_err(|(key, msg)| ConfigError::new(&file, key, msg))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mode = main.source.unwrap_or_default();
        let apostol = match (mode, main.apostol) {
            (SourceMode::Apostol, Some(a)) => Some(a.resolve(&file, base)?),
            (SourceMode::Apostol, None) => {
                return Err(ConfigError::new(
                    &file,
                    Some("apostol".into()),
                    "source = \"apostol\" needs an [apostol] table (client_id, client_secret…)",
                ))
            }
            (SourceMode::Outboxd, Some(_)) => {
                return Err(ConfigError::new(
                    &file,
                    Some("apostol".into()),
                    "[apostol] is read only with source = \"apostol\"",
                ))
            }
            (SourceMode::Outboxd, None) => None,
        };
        let d = Config::default();
        let http_listen = match &main.http_listen {
            None => None,
            Some(a) if a.trim().is_empty() => None,
            Some(a) => Some(a.parse().map_err(|_| {
                ConfigError::new(
                    &file,
                    Some("http_listen".into()),
                    "must be an address with a port, e.g. \"127.0.0.1:8086\"",
                )
            })?),
        };
        let api_tokens = api_tokens(
            env("OUTBOXD_API_TOKEN"),
            main.api_token_file.as_ref().map(|p| {
                if p.is_absolute() {
                    p.clone()
                } else {
                    base.join(p)
                }
            }),
            &file,
        )?;
        let cfg = Config {
            database_url: main.database_url.unwrap_or(d.database_url),
            listen_url: main.listen_url,
            poll_interval: main.poll_interval.map_or(d.poll_interval, |x| x.0),
            batch_size: main.batch_size.unwrap_or(d.batch_size),
            concurrency: main.concurrency.unwrap_or(d.concurrency),
            lease: main.lease.map_or(d.lease, |x| x.0),
            grace_period: main.grace_period.map_or(d.grace_period, |x| x.0),
            db_timeout: main.db_timeout.map_or(d.db_timeout, |x| x.0),
            pool_size: main.pool_size.unwrap_or(d.pool_size),
            synchronous_commit: main.synchronous_commit.unwrap_or(d.synchronous_commit),
            session_role: main.session_role.filter(|r| !r.is_empty()),
            log_format: main.log_format.unwrap_or_default(),
            migrate_on_start: main.migrate_on_start.unwrap_or(d.migrate_on_start),
            create_database: main.create_database.unwrap_or(d.create_database),
            worker_id: main.worker_id,
            http_listen,
            http_max_body_bytes: main.http_max_body_bytes.unwrap_or(d.http_max_body_bytes),
            api_tokens,
            retention: match main.retention {
                None => d.retention,
                Some(r) => Retention {
                    content_after: r.content_after.map(|x| x.0),
                    delete_after: r.delete_after.map(|x| x.0),
                    batch_size: r.batch_size.unwrap_or(d.retention.batch_size),
                    every: r.every.map_or(d.retention.every, |x| x.0),
                },
            },
            tasks: main.tasks.unwrap_or_default(),
            kafka: main.kafka,
            cards: main.cards.unwrap_or_default().resolve(base),
            connectors: main
                .connectors
                .into_iter()
                .map(|(k, p)| (k, if p.is_absolute() { p } else { base.join(p) }))
                .collect(),
            routes: main.routes,
            mode,
            apostol,
            source: file.clone(),
        };
        cfg.validate()?;
        Ok(cfg.with_session_role())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, msg: &str| Err(ConfigError::new(&self.source, Some(key.into()), msg));
        if self.batch_size == 0 || self.batch_size > 10_000 {
            return err("batch_size", "must be between 1 and 10000");
        }
        if self.concurrency == 0 {
            return err("concurrency", "must be at least 1");
        }
        if !["on", "off", "local", "remote_write", "remote_apply"]
            .contains(&self.synchronous_commit.as_str())
        {
            return err(
                "synchronous_commit",
                "must be one of on, off, local, remote_write, remote_apply",
            );
        }
        if let Some(role) = &self.session_role {
            let plain = role.len() <= 63
                && role.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                && role
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !plain {
                return err(
                    "session_role",
                    "must be a plain role name (lower case letters, digits, _)",
                );
            }
        }
        if self.pool_size < 2 {
            return err("pool_size", "must be at least 2");
        }
        if self.lease < Duration::from_millis(100) {
            return err("lease", "must be at least 100ms");
        }
        // The hot path passes the lease to SQL as 32-bit milliseconds.
        if self.lease > MAX_SQL_MILLIS {
            return err("lease", MAX_SQL_MILLIS_TEXT);
        }
        if self.db_timeout.is_zero() {
            return err(
                "db_timeout",
                "must be more than 0 (every database call needs a bound)",
            );
        }
        // It is also the sessions' statement_timeout, an integer of milliseconds.
        if self.db_timeout > MAX_SQL_MILLIS {
            return err("db_timeout", MAX_SQL_MILLIS_TEXT);
        }
        for (key, url) in [
            ("database_url", Some(&self.database_url)),
            ("listen_url", self.listen_url.as_ref()),
        ] {
            let Some(url) = url else { continue };
            // The message never quotes the URL: it may carry a password.
            let target = crate::db::tls::target(url.expose()).map_err(|e| {
                ConfigError::new(
                    &self.source,
                    Some(key.into()),
                    match e {
                        crate::db::DbError::Config(m) => m,
                        e => e.to_string(),
                    },
                )
            })?;
            if key != "database_url" {
                continue;
            }
            match crate::db::statement_timeout_of(&target.config) {
                None => {}
                Some(None) => {
                    return err(
                        key,
                        "the statement_timeout in its options is not a duration PostgreSQL reads",
                    )
                }
                Some(Some(t)) if t.is_zero() || t > self.db_timeout => {
                    return Err(ConfigError::new(
                        &self.source,
                        Some(key.into()),
                        format!(
                            "the statement_timeout in its options ({}) must be between 1ms and \
                             db_timeout ({}): a statement the daemon gave up on would otherwise \
                             keep running on the server",
                            if t.is_zero() {
                                "0, disabled".to_string()
                            } else {
                                humantime::format_duration(t).to_string()
                            },
                            humantime::format_duration(self.db_timeout)
                        ),
                    ))
                }
                Some(Some(_)) => {}
            }
        }
        if self.poll_interval < Duration::from_millis(10) {
            return err("poll_interval", "must be at least 10ms");
        }
        let r = &self.retention;
        if r.batch_size == 0 || r.batch_size > 100_000 {
            return err("retention.batch_size", "must be between 1 and 100000");
        }
        if r.every < Duration::from_secs(1) {
            return err("retention.every", "must be at least 1s");
        }
        if let (Some(c), Some(d)) = (r.content_after, r.delete_after) {
            if c > d {
                return err(
                    "retention.content_after",
                    "must not be longer than retention.delete_after (the message would be gone first)",
                );
            }
        }
        if let Err((key, msg)) = self.tasks.check() {
            return err(key, msg);
        }
        if let Some(Err((key, msg))) = self.kafka.as_ref().map(|k| k.check()) {
            return err(key, msg);
        }
        for kind in self.connectors.keys() {
            if crate::connector::kind(kind).is_none() {
                return Err(ConfigError::new(
                    &self.source,
                    Some(format!("connectors.{kind}")),
                    format!(
                        "unknown connector kind (known: {})",
                        crate::connector::kind_names()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        for (agent, kind) in &self.routes {
            if crate::connector::kind(kind).is_none() {
                return Err(ConfigError::new(
                    &self.source,
                    Some(format!("routes.{agent}")),
                    format!("unknown connector kind \"{kind}\""),
                ));
            }
        }
        Ok(())
    }

    /// Folds `session_role` into `database_url` and `listen_url` (see
    /// [`crate::db::with_session_role`]), so every session the daemon opens from them switches
    /// role.
    pub fn with_session_role(mut self) -> Config {
        if let Some(role) = &self.session_role {
            self.database_url = Secret::new(crate::db::with_session_role(
                self.database_url.expose(),
                role,
            ));
            self.listen_url = self
                .listen_url
                .map(|u| Secret::new(crate::db::with_session_role(u.expose(), role)));
        }
        self
    }

    /// Checks the profiles' timings against the main file's, as `check-config` does: a delivery
    /// must end before its lease does even when no heartbeat gets through. The lease starts when
    /// the claim runs on the server; the delivery starts when the claim's rows arrive (at most
    /// `db_timeout` later) and ends at most the profile's `timeout` after that, hence
    /// `lease >= timeout + db_timeout`. Within that, the heartbeat (every lease/3) is needed
    /// only for what is not bounded by `timeout`; a delivery that outlives its lease may be
    /// reclaimed and sent twice.
    pub fn check_timing(&self, profiles: &Profiles) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        for ((_, name), p) in &profiles.map {
            let needed = p.common.timeout + self.db_timeout;
            if self.lease < needed {
                errors.push(ConfigError::new(
                    &p.source,
                    Some(format!("{name}.timeout")),
                    format!(
                        "timeout {} plus db_timeout {} is longer than the lease {} ({}: key \
                         `lease`): a delivery could outlive its claim and be sent twice; raise \
                         lease to at least {} or shorten timeout",
                        humantime::format_duration(p.common.timeout),
                        humantime::format_duration(self.db_timeout),
                        humantime::format_duration(self.lease),
                        self.source,
                        humantime::format_duration(needed),
                    ),
                ));
            }
        }
        errors
    }

    /// Reads every connector's `.conf` file: the profiles that parse, and every problem found.
    pub fn load_profiles(&self) -> (Profiles, Vec<ConfigError>) {
        let mut profiles = Profiles::default();
        let mut errors = Vec::new();
        for (kind, path) in &self.connectors {
            let (list, mut e) = load_profile_file(kind, path);
            errors.append(&mut e);
            for (name, p) in list {
                profiles.map.insert((kind.clone(), name), p);
            }
        }
        // Drop-in mode: MessageServer's own profile files, as an alternative to [connectors].
        if let Some(a) = self.apostol.as_ref().filter(|a| a.message_server.is_some()) {
            let (list, mut e) = crate::apostol::ini::load_profiles(a, &self.connectors);
            errors.append(&mut e);
            for ((kind, name), p) in list {
                if profiles.map.contains_key(&(kind.clone(), name.clone())) {
                    errors.push(ConfigError::new(
                        &p.source,
                        Some(name.clone()),
                        format!("profile {name} of kind {kind} is also defined in [connectors]"),
                    ));
                    continue;
                }
                profiles.map.insert((kind, name), p);
            }
        }
        (profiles, errors)
    }
}

/// The REST API's tokens: comma-separated in `OUTBOXD_API_TOKEN`, one per line in the token file
/// (blank lines and `#` comments skipped). Shorter than 16 characters is refused: a bearer token
/// is the only thing between the network and the outbox.
fn api_tokens(
    env: Option<String>,
    file: Option<PathBuf>,
    source: &str,
) -> Result<Vec<Secret>, ConfigError> {
    let mut tokens: Vec<(String, String)> = Vec::new();
    if let Some(v) = env {
        for t in v.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            tokens.push((t.to_string(), "OUTBOXD_API_TOKEN".into()));
        }
    }
    if let Some(path) = file {
        let text = std::fs::read_to_string(&path).map_err(|e| {
            ConfigError::new(
                source,
                Some("api_token_file".into()),
                format!("cannot read {}: {}", path.display(), e.kind()),
            )
        })?;
        for (i, line) in text.lines().enumerate() {
            let t = line.trim();
            if !t.is_empty() && !t.starts_with('#') {
                tokens.push((t.to_string(), format!("{} line {}", path.display(), i + 1)));
            }
        }
    }
    tokens
        .into_iter()
        .map(|(t, from)| {
            if t.len() < 16 {
                Err(ConfigError::new(
                    source,
                    Some("api_token_file".into()),
                    format!("the API token from {from} is shorter than 16 characters"),
                ))
            } else {
                Ok(Secret::new(t))
            }
        })
        .collect()
}

/// The longest duration the hot path can pass to SQL: it passes milliseconds as `integer`.
const MAX_SQL_MILLIS: Duration = Duration::from_millis(i32::MAX as u64);
const MAX_SQL_MILLIS_TEXT: &str =
    "must be at most 2147483647ms (24days 20h 31m 23s 647ms): it is passed to PostgreSQL as 32-bit milliseconds";

/// An environment value as TOML: integers and booleans typed, everything else a string.
fn env_value(v: &str) -> toml::Value {
    if let Ok(i) = v.parse::<i64>() {
        toml::Value::Integer(i)
    } else if let Ok(b) = v.parse::<bool>() {
        toml::Value::Boolean(b)
    } else {
        toml::Value::String(v.to_string())
    }
}

/// Settings every profile has, whatever its connector.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileCommon {
    /// Delays between attempts; ±20 % jitter is applied.
    pub retry: Vec<Duration>,
    /// Attempts before a retryable failure becomes final (default: retry delays + 1).
    pub max_attempts: u32,
    /// Upper bound of one delivery.
    pub timeout: Duration,
    /// Larger content fails with `content-too-large` before any connector sees it.
    pub max_content_bytes: usize,
}

impl Default for ProfileCommon {
    fn default() -> Self {
        let retry: Vec<Duration> = [5, 300, 1800, 7200, 18000, 36000, 36000]
            .into_iter()
            .map(Duration::from_secs)
            .collect();
        ProfileCommon {
            max_attempts: retry.len() as u32 + 1,
            retry,
            timeout: Duration::from_secs(30),
            max_content_bytes: 16 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommonKeys {
    retry: Option<Vec<Dur>>,
    max_attempts: Option<u32>,
    timeout: Option<Dur>,
    max_content_bytes: Option<usize>,
}

/// The keys of a profile that the dispatcher applies around its connector (issue 10).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DispatchKeys {
    rate_limit: Option<Vec<String>>,
    rate_limit_per: Option<String>,
    fallback: Option<Vec<String>>,
    fallback_after: Option<Dur>,
    fallback_attempts: Option<u32>,
}

/// One profile: the common settings and the connector's own.
#[derive(Debug, Clone)]
pub struct ProfileConfig {
    pub common: ProfileCommon,
    /// `rate_limit` / `rate_limit_per`, or the kind's built-in limits (see
    /// [`crate::dispatch::ratelimit`]); empty: unlimited.
    pub rate_limits: Vec<crate::dispatch::ratelimit::RateWindow>,
    /// `fallback`, `fallback_after`, `fallback_attempts` (see [`crate::dispatch::fallback`]).
    pub fallback: Option<crate::dispatch::fallback::Fallback>,
    pub connector: ConnectorConfig,
    /// The file it came from, for error messages.
    pub source: String,
}

/// Every profile of every configured connector, keyed by (kind, profile name).
#[derive(Debug, Clone, Default)]
pub struct Profiles {
    pub map: BTreeMap<(String, String), ProfileConfig>,
}

/// Parses a `<kind>.conf` file: one table per profile. Returns the profiles that parse and every
/// problem found.
pub fn load_profile_file(
    kind: &str,
    path: &Path,
) -> (Vec<(String, ProfileConfig)>, Vec<ConfigError>) {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => parse_profiles_partial(kind, &text, &file),
        Err(e) => (
            Vec::new(),
            vec![ConfigError::new(&file, None, format!("cannot read: {e}"))],
        ),
    }
}

/// Parses the text of a `<kind>.conf` file; any problem fails the whole file.
pub fn parse_profiles(
    kind: &str,
    text: &str,
    file: &str,
) -> Result<Vec<(String, ProfileConfig)>, Vec<ConfigError>> {
    match parse_profiles_partial(kind, text, file) {
        (ok, errors) if errors.is_empty() => Ok(ok),
        (_, errors) => Err(errors),
    }
}

fn parse_profiles_partial(
    kind: &str,
    text: &str,
    file: &str,
) -> (Vec<(String, ProfileConfig)>, Vec<ConfigError>) {
    let table: toml::Table = match text.parse() {
        Ok(t) => t,
        Err(e) => {
            let e: toml::de::Error = e;
            return (
                Vec::new(),
                vec![ConfigError::new(file, None, toml_syntax(text, &e))],
            );
        }
    };
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (name, value) in table {
        let toml::Value::Table(mut t) = value else {
            errors.push(ConfigError::new(
                file,
                Some(name.clone()),
                "expected a table per profile, e.g. [default]",
            ));
            continue;
        };
        let mut common_table = toml::Table::new();
        for key in ["retry", "max_attempts", "timeout", "max_content_bytes"] {
            if let Some(v) = t.remove(key) {
                common_table.insert(key.into(), v);
            }
        }
        let mut dispatch_table = toml::Table::new();
        for key in [
            "rate_limit",
            "rate_limit_per",
            "fallback",
            "fallback_after",
            "fallback_attempts",
        ] {
            if let Some(v) = t.remove(key) {
                dispatch_table.insert(key.into(), v);
            }
        }
        let dispatch = deserialize_table::<DispatchKeys>(dispatch_table)
            .map_err(|(key, msg)| (key.unwrap_or_default(), msg))
            .and_then(|d| {
                let limits =
                    crate::dispatch::ratelimit::from_keys(kind, d.rate_limit, d.rate_limit_per)
                        .map_err(|(k, m)| (k.to_string(), m))?;
                let fallback = crate::dispatch::fallback::Fallback::from_keys(
                    d.fallback,
                    d.fallback_after.map(|x| x.0),
                    d.fallback_attempts,
                )
                .map_err(|(k, m)| (k.to_string(), m))?;
                Ok((limits, fallback))
            });
        let (rate_limits, fallback) = match dispatch {
            Ok(x) => x,
            Err((key, msg)) => {
                errors.push(ConfigError::new(file, Some(format!("{name}.{key}")), msg));
                continue;
            }
        };
        // `timeout` is also the connector's own request timeout: hand it on.
        if let Some(v) = common_table.get("timeout") {
            t.insert("timeout".into(), v.clone());
        }
        let common: CommonKeys = match deserialize_table(common_table) {
            Ok(c) => c,
            Err((key, msg)) => {
                errors.push(ConfigError::new(
                    file,
                    Some(format!("{name}.{}", key.unwrap_or_default())),
                    msg,
                ));
                continue;
            }
        };
        let mut c = ProfileCommon::default();
        if let Some(r) = common.retry {
            c.retry = r.into_iter().map(|d| d.0).collect();
            c.max_attempts = c.retry.len() as u32 + 1;
            // A delay goes to SQL as 32-bit milliseconds after +20 % jitter.
            if let Some(d) = c
                .retry
                .iter()
                .find(|d| d.as_millis() * 6 / 5 > i32::MAX as u128)
            {
                errors.push(ConfigError::new(
                    file,
                    Some(format!("{name}.retry")),
                    format!(
                        "delay {} is too long: with its +20 % jitter a delay must stay within \
                         2147483647ms (it is passed to PostgreSQL as 32-bit milliseconds): at \
                         most about 20days 17h",
                        humantime::format_duration(*d)
                    ),
                ));
                continue;
            }
        }
        if let Some(m) = common.max_attempts {
            if m == 0 {
                errors.push(ConfigError::new(
                    file,
                    Some(format!("{name}.max_attempts")),
                    "must be at least 1",
                ));
                continue;
            }
            c.max_attempts = m;
        }
        if let Some(t) = common.timeout {
            c.timeout = t.0;
        }
        if let Some(m) = common.max_content_bytes {
            c.max_content_bytes = m;
        }
        match ConnectorConfig::from_table(kind, t) {
            Ok(connector) => out.push((
                name,
                ProfileConfig {
                    common: c,
                    rate_limits,
                    fallback,
                    connector,
                    source: file.to_string(),
                },
            )),
            Err((key, msg)) => errors.push(ConfigError::new(
                file,
                Some(match key {
                    Some(k) => format!("{name}.{k}"),
                    None => name.clone(),
                }),
                msg,
            )),
        }
    }
    (out, errors)
}
