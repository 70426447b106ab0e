//! Secrets: values that are never printed.
//!
//! A [`Secret`] is written inline; a [`SecretSource`] may also come from an environment variable
//! (`*_env`) or a file (`*_file`), so credentials stay out of configuration files.

use std::fmt;

use serde::{Deserialize, Deserializer};

/// A value whose `Debug`/`Display` print `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself; call only where it is used.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// Where a secret comes from: inline value, environment variable, or file (trailing newline trimmed).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct SecretSource {
    pub value: Option<Secret>,
    pub env: Option<String>,
    pub file: Option<std::path::PathBuf>,
}

impl SecretSource {
    /// The three keys a config struct has for one secret (`x`, `x_env`, `x_file`).
    pub fn of(
        value: &Option<Secret>,
        env: &Option<String>,
        file: &Option<std::path::PathBuf>,
    ) -> SecretSource {
        SecretSource {
            value: value.clone(),
            env: env.clone(),
            file: file.clone(),
        }
    }

    /// Resolves the secret; `None` when no source is set. `what` names the key in errors.
    pub fn resolve(&self, what: &str) -> Result<Option<Secret>, String> {
        let set = [
            self.value.is_some(),
            self.env.is_some(),
            self.file.is_some(),
        ];
        if set.iter().filter(|s| **s).count() > 1 {
            return Err(format!(
                "set only one of {what}, {what}_env and {what}_file"
            ));
        }
        if let Some(v) = &self.value {
            return Ok(Some(v.clone()));
        }
        if let Some(name) = &self.env {
            return std::env::var(name)
                .map(|v| Some(Secret(v)))
                .map_err(|_| format!("{what}_env: environment variable {name} is not set"));
        }
        if let Some(path) = &self.file {
            return std::fs::read_to_string(path)
                .map(|v| Some(Secret(v.trim_end_matches(['\r', '\n']).to_string())))
                .map_err(|e| format!("{what}_file: cannot read {}: {e}", path.display()));
        }
        Ok(None)
    }
}

/// Whether a URL query parameter carries a credential (`password`, `sslpassword`,
/// `access_token`, `key`, `api_key`, `secret`, `signature`…): its value is never printed.
pub fn is_credential_param(name: &str) -> bool {
    let n = name.to_ascii_lowercase().replace(['-', '_'], "");
    [
        "pass",
        "pwd",
        "secret",
        "token",
        "key",
        "sig",
        "auth",
        "credential",
        "session",
    ]
    .iter()
    .any(|w| n.contains(w))
}

/// A URL with its password and the values of its credential query parameters
/// ([`is_credential_param`]) replaced by `***`, for logs (`database_url` may carry
/// `?password=`). A text that does not parse as a URL (a `key=value` connection string, which
/// may hold a password too) is not printed at all.
pub fn redact_url(url: &str) -> String {
    let Ok(mut u) = url::Url::parse(url) else {
        return "(unparsable url)".into();
    };
    if u.password().is_some() {
        let _ = u.set_password(Some("***"));
    }
    if u.query().is_some() {
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| {
                let v = if is_credential_param(&k) {
                    "***".to_string()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        u.query_pairs_mut().clear().extend_pairs(pairs);
    }
    u.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_source_only() {
        let both = SecretSource {
            value: Some(Secret::new("a")),
            env: Some("X".into()),
            file: None,
        };
        assert!(both.resolve("token").unwrap_err().contains("token_env"));
        let none = SecretSource::default();
        assert_eq!(none.resolve("token").unwrap(), None);
    }

    #[test]
    fn debug_and_display_hide_the_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "Secret(***) ***");
        assert_eq!(
            redact_url("postgres://u:hunter2@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        let r = redact_url("postgres://u@h/db?sslmode=require&password=hunter3&sslpassword=k3y");
        assert!(!r.contains("hunter3") && !r.contains("k3y"), "{r}");
        assert!(r.contains("sslmode=require"), "{r}");
        assert_eq!(redact_url("host=h password=hunter4"), "(unparsable url)");
    }
}
