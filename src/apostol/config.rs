//! `[apostol]`: the drop-in mode's settings (how to log in as MessageServer does, where
//! MessageServer's profile files are, where the daemon keeps what Apostol has no place for).
//!
//! Every key can be overridden by `OUTBOXD_APOSTOL_<KEY>`; the client secret comes from
//! `client_secret`, `client_secret_env` or `client_secret_file` and is resolved here, once, into a
//! [`Secret`] that never prints.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::ProfileCommon;
use crate::settings::{ConfigError, Dur, Secret, SecretSource};

/// `[apostol]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApostolFile {
    client_id: Option<String>,
    client_secret: Option<Secret>,
    client_secret_env: Option<String>,
    client_secret_file: Option<PathBuf>,
    username: Option<String>,
    agent: Option<String>,
    host: Option<String>,
    relogin_every: Option<Dur>,
    message_server: Option<PathBuf>,
    prefix: Option<PathBuf>,
    state_file: Option<PathBuf>,
    retry: Option<Vec<Dur>>,
    max_attempts: Option<u32>,
    timeout: Option<Dur>,
}

/// The drop-in mode's settings, resolved.
#[derive(Debug, Clone)]
pub struct ApostolConfig {
    /// The OAuth2 client id `api.login` gets (MessageServer: the `service` application of the
    /// default provider).
    pub client_id: String,
    /// Its secret; never logged.
    pub client_secret: Secret,
    /// The bot whose session `api.get_sessions` returns. Default `apibot`.
    pub username: String,
    /// The agent string of the sessions (`pAgent`). Default `outboxd (MessageServer drop-in)`.
    pub agent: String,
    /// The host of the sessions (`pHost`, an inet). Default 127.0.0.1.
    pub host: IpAddr,
    /// Log in again after this long even when the session still works. Default 24h.
    pub relogin_every: Duration,
    /// The Apostol INI file whose `[process/MessageServer]` section lists the profile files.
    pub message_server: Option<PathBuf>,
    /// Apostol's prefix: relative profile file names in that section are relative to it.
    /// Default: the parent of the INI file's directory (`<prefix>/conf/apostol.conf`).
    pub prefix: Option<PathBuf>,
    /// Where retry schedules and in-flight sends are kept across restarts. Default: none
    /// (memory only).
    pub state_file: Option<PathBuf>,
    /// Retry, attempts and timeout of the profiles read from MessageServer's files.
    pub common: ProfileCommon,
}

/// The keys `OUTBOXD_APOSTOL_<KEY>` overrides.
const ENV_KEYS: &[&str] = &[
    "client_id",
    "client_secret",
    "client_secret_env",
    "client_secret_file",
    "username",
    "agent",
    "host",
    "relogin_every",
    "message_server",
    "prefix",
    "state_file",
];

/// Applies `OUTBOXD_APOSTOL_*` to the `[apostol]` table of the main file (creating it).
pub fn apply_env(main: &mut toml::Table, env: &impl Fn(&str) -> Option<String>) {
    for key in ENV_KEYS {
        let Some(v) = env(&format!("OUTBOXD_APOSTOL_{}", key.to_uppercase())) else {
            continue;
        };
        let table = main
            .entry("apostol")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(t) = table {
            t.insert(key.to_string(), toml::Value::String(v));
        }
    }
}

impl ApostolFile {
    /// Checks the table and resolves the secret; `base` is the main file's directory.
    pub fn resolve(self, file: &str, base: &Path) -> Result<ApostolConfig, ConfigError> {
        let err =
            |key: &str, msg: String| ConfigError::new(file, Some(format!("apostol.{key}")), msg);
        let client_id = self
            .client_id
            .filter(|c| !c.is_empty())
            .ok_or_else(|| err("client_id", "required (the bot's OAuth2 client id)".into()))?;
        let client_secret = SecretSource::of(
            &self.client_secret,
            &self.client_secret_env,
            &self.client_secret_file.map(|p| abs(base, p)),
        )
        .resolve("client_secret")
        .map_err(|m| err("client_secret", m))?
        .ok_or_else(|| {
            err(
                "client_secret",
                "required: one of client_secret, client_secret_env, client_secret_file".into(),
            )
        })?;
        let host = match self.host {
            None => IpAddr::from([127, 0, 0, 1]),
            Some(h) => h.parse().map_err(|_| {
                err(
                    "host",
                    format!("must be an IP address (an inet), not {h:?}"),
                )
            })?,
        };
        let mut common = ProfileCommon::default();
        if let Some(r) = self.retry {
            common.retry = r.into_iter().map(|d| d.0).collect();
            common.max_attempts = common.retry.len() as u32 + 1;
        }
        if let Some(m) = self.max_attempts {
            if m == 0 {
                return Err(err("max_attempts", "must be at least 1".into()));
            }
            common.max_attempts = m;
        }
        if let Some(t) = self.timeout {
            common.timeout = t.0;
        }
        let username = self.username.unwrap_or_else(|| "apibot".into());
        if username.is_empty() {
            return Err(err("username", "must not be empty".into()));
        }
        let relogin_every = self
            .relogin_every
            .map_or(Duration::from_secs(24 * 3600), |d| d.0);
        if relogin_every < Duration::from_secs(1) {
            return Err(err("relogin_every", "must be at least 1s".into()));
        }
        Ok(ApostolConfig {
            client_id,
            client_secret,
            username,
            agent: self
                .agent
                .unwrap_or_else(|| "outboxd (MessageServer drop-in)".into()),
            host,
            relogin_every,
            message_server: self.message_server.map(|p| abs(base, p)),
            prefix: self.prefix.map(|p| abs(base, p)),
            state_file: self.state_file.map(|p| abs(base, p)),
            common,
        })
    }
}

fn abs(base: &Path, p: PathBuf) -> PathBuf {
    if p.is_absolute() {
        p
    } else {
        base.join(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, SourceMode};

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::parse(text, Path::new("/etc/outboxd/outboxd.toml"), |k| {
            env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn the_apostol_table_with_env_overrides_and_a_secret_that_never_prints() {
        let cfg = parse(
            "source = \"apostol\"\n[apostol]\nclient_id = \"id\"\nclient_secret = \"s3cr3t-value\"\nmessage_server = \"../apostol/conf/apostol.conf\"\nretry = [\"1s\"]\n",
            &[("OUTBOXD_APOSTOL_HOST", "10.0.0.7"), ("OUTBOXD_APOSTOL_USERNAME", "mailbot")],
        )
        .unwrap();
        assert_eq!(cfg.mode, SourceMode::Apostol);
        let a = cfg.apostol.unwrap();
        assert_eq!(a.client_id, "id");
        assert_eq!(a.client_secret.expose(), "s3cr3t-value");
        assert_eq!(a.host.to_string(), "10.0.0.7");
        assert_eq!(a.username, "mailbot");
        assert_eq!(a.common.max_attempts, 2);
        assert_eq!(
            a.message_server.clone().unwrap(),
            Path::new("/etc/outboxd/../apostol/conf/apostol.conf")
        );
        assert!(!format!("{a:?}").contains("s3cr3t"));
    }

    #[test]
    fn the_shipped_configuration_documents_every_key() {
        let text = include_str!("../../conf/outboxd.toml");
        let block = &text[text.find("# [apostol]").expect("an [apostol] example")..];
        let mut documented: Vec<&str> = block
            .lines()
            .filter_map(|l| l.strip_prefix("# ")?.split_once(" = ").map(|(k, _)| k))
            .filter(|k| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
            .collect();
        documented.sort_unstable();
        documented.dedup();
        let mut keys: Vec<&str> = ENV_KEYS
            .iter()
            .copied()
            .filter(|k| *k != "client_secret")
            .chain(["retry", "max_attempts", "timeout"])
            .collect();
        keys.sort_unstable();
        assert_eq!(documented, keys);
        assert!(block.contains("client_secret (inline)"));
    }

    #[test]
    fn mistakes_name_the_key() {
        let e = parse("source = \"apostol\"\n", &[]).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("apostol"));
        let e = parse(
            "source = \"apostol\"\n[apostol]\nclient_secret = \"x\"\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("apostol.client_id"));
        let e = parse("source = \"apostol\"\n[apostol]\nclient_id = \"x\"\n", &[]).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("apostol.client_secret"));
        let e = parse(
            "source = \"apostol\"\n[apostol]\nclient_id = \"x\"\nclient_secret_env = \"NOPE_NOT_SET\"\n",
            &[],
        )
        .unwrap_err();
        assert!(e.message.contains("NOPE_NOT_SET"), "{}", e.message);
        let e = parse("[apostol]\nclient_id = \"x\"\n", &[]).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("apostol"));
        let e = parse(
            "source = \"apostol\"\n[apostol]\nclient_id = \"x\"\nclient_secret = \"y\"\nhost = \"here\"\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("apostol.host"));
    }
}
