//! The leaf types of configuration, shared by [`config`](crate::config) (which reads the files)
//! and [`connector`](crate::connector) (which builds from them) without either importing the
//! other: [`ConfigError`], [`ProfileContext`], [`Secret`] / [`SecretSource`], [`Dur`] and the
//! path-keeping [`deserialize_table`].
//!
//! Invariant: this module imports nothing else of the crate.

mod duration;
mod secret;

pub use duration::Dur;
pub use secret::{is_credential_param, redact_url, Secret, SecretSource};

/// A configuration problem, naming the file and (when known) the key.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{file}{}: {message}", key.as_ref().map(|k| format!(": key `{k}`")).unwrap_or_default())]
pub struct ConfigError {
    pub file: String,
    pub key: Option<String>,
    pub message: String,
}

impl ConfigError {
    pub fn new(file: impl Into<String>, key: Option<String>, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.into(),
            key,
            message: message.into(),
        }
    }
}

/// Where a profile comes from: the file it was read from and its name there. Every connector's
/// constructor takes one, so its errors name the real file and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileContext {
    /// The `.conf` file, as the main configuration names it (`conf/http.conf`).
    pub file: String,
    /// The profile's table name in that file.
    pub profile: String,
}

impl ProfileContext {
    pub fn new(file: impl Into<String>, profile: impl Into<String>) -> Self {
        ProfileContext {
            file: file.into(),
            profile: profile.into(),
        }
    }

    /// An error about `key` of this profile (`<profile>.<key>` in the file).
    pub fn error(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::new(&self.file, Some(format!("{}.{key}", self.profile)), message)
    }
}

/// Deserializes a table, reporting the path of the offending key.
pub fn deserialize_table<T: serde::de::DeserializeOwned>(
    table: toml::Table,
) -> Result<T, (Option<String>, String)> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let path = e.path().to_string();
        let message = without_value(e.into_inner().message());
        let mut key = (path != "." && !path.is_empty()).then_some(path);
        // serde reports an unknown field at its parent's path: name the field itself.
        if let Some(field) = message
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next())
        {
            key = Some(match key {
                Some(k) if k == field || k.ends_with(&format!(".{field}")) => k,
                Some(k) => format!("{k}.{field}"),
                None => field.to_string(),
            });
        }
        (key, message)
    })
}

/// A TOML syntax error as line, column and message. Not toml's `Display`, which quotes the
/// offending source line: that line may hold a secret.
pub fn toml_syntax(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim();
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("TOML syntax error at line {line}, column {column}: {message}")
        }
        None => format!("TOML syntax error: {message}"),
    }
}

/// A serde message without the value it quotes (`invalid type: string "…", expected u32`,
/// `unknown variant `…``): the value may be a secret written under the wrong key.
fn without_value(message: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            if let Some(i) = rest.find(", expected") {
                // serde's `Unexpected` is a kind, then the value in quotes or backticks.
                let kind = rest[..i].split(['"', '`']).next().unwrap_or("").trim();
                return format!("{prefix}{kind}{}", &rest[i..]);
            }
        }
    }
    if let Some(rest) = message.strip_prefix("unknown variant `") {
        if let Some(i) = rest.find("`, expected") {
            return format!("unknown variant{}", &rest[i + 1..]);
        }
    }
    // Custom `invalid …` messages (`invalid duration "…": …`) quote the value in double quotes.
    // (Other messages quote what the user must see, such as an unknown smtp `service` name.)
    if !message.starts_with("invalid ") {
        return message.to_string();
    }
    let mut out = String::new();
    let mut parts = message.split('"');
    if let Some(first) = parts.next() {
        out.push_str(first);
    }
    let rest: Vec<&str> = parts.collect();
    for (i, p) in rest.iter().enumerate() {
        match (i % 2, i + 1 == rest.len()) {
            (0, false) => out.push('…'),
            _ if i % 2 == 0 => {
                out.push('"');
                out.push_str(p);
            }
            _ => out.push_str(p),
        }
    }
    out
}
