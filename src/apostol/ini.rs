//! MessageServer's profile map, read from Apostol's INI configuration and mapped onto outboxd's
//! connector profiles (the alternative to `[connectors]` in drop-in mode).
//!
//! Apostol's main INI file has a section `[process/MessageServer]`: `enable=true`, and for every
//! other key `<kind>=<file>` (default `conf/<kind>.conf`, relative to Apostol's prefix). Each such
//! file is INI again, one `[section]` per profile, selected by the message's `profile` column
//! (for SMTP the part before `@`, since Apostol writes SMTP profiles `<profile>@<domain>`).
//! Mapped kinds: `smtp` (keys `host` as a URL `smtp://host:port`, `username`, `password`) → the
//! smtp connector, and `api` (keys `uri`, `auth`, `token`, `content_type`) → the http connector.
//! MessageServer's `fcm`, `m2m` and `sba` files hold credentials in shapes of their own (OAuth2
//! provider files, service-account JSON): they are not mapped; configure those kinds in
//! `[connectors]`, which then takes the kind's place and the INI key is skipped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::apostol::config::ApostolConfig;
use crate::config::ProfileConfig;
use crate::connector::ConnectorConfig;
use crate::settings::ConfigError;

/// The section MessageServer reads.
pub const SECTION: &str = "process/MessageServer";

/// One INI file: sections in order, each with its keys in order. Keys are lower-cased (Apostol
/// lower-cases the kind names it reads).
pub type Ini = Vec<(String, Vec<(String, String)>)>;

/// Parses INI text: `[section]`, `key=value`, comments from `;` or `#` at the start of a line or
/// after white space, surrounding quotes dropped. A key before any section is an error.
pub fn parse(text: &str, file: &str) -> Result<Ini, ConfigError> {
    let mut out: Ini = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = strip_comment(raw).trim();
        if line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            out.push((name.trim().to_string(), Vec::new()));
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(ConfigError::new(
                file,
                None,
                format!("line {}: expected key=value or [section]", n + 1),
            ));
        };
        let Some((_, keys)) = out.last_mut() else {
            return Err(ConfigError::new(
                file,
                Some(k.trim().to_string()),
                format!("line {}: a key before any [section]", n + 1),
            ));
        };
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|x| x.strip_suffix('"'))
            .unwrap_or(v);
        keys.push((k.trim().to_lowercase(), v.to_string()));
    }
    Ok(out)
}

fn strip_comment(line: &str) -> &str {
    let t = line.trim_start();
    if t.starts_with(';') || t.starts_with('#') {
        return "";
    }
    let bytes = line.as_bytes();
    for i in 1..bytes.len() {
        if (bytes[i] == b'#' || bytes[i] == b';') && bytes[i - 1].is_ascii_whitespace() {
            return &line[..i];
        }
    }
    line
}

fn read(path: &Path) -> Result<Ini, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(&file, None, format!("cannot read: {e}")))?;
    parse(&text, &file)
}

/// A profile read from MessageServer's files, keyed by (outboxd kind, profile).
pub type Mapped = ((String, String), ProfileConfig);

/// Reads `[process/MessageServer]` and every profile file it names, as outboxd profiles keyed by
/// (kind, profile). Kinds that `[connectors]` configures are skipped. Returns what maps and every
/// problem found.
pub fn load_profiles(
    cfg: &ApostolConfig,
    connectors: &BTreeMap<String, PathBuf>,
) -> (Vec<Mapped>, Vec<ConfigError>) {
    let Some(main) = cfg.message_server.as_ref() else {
        return (Vec::new(), Vec::new());
    };
    let main_file = main.display().to_string();
    let ini = match read(main) {
        Ok(i) => i,
        Err(e) => return (Vec::new(), vec![e]),
    };
    let Some((_, keys)) = ini.iter().find(|(s, _)| s == SECTION) else {
        return (
            Vec::new(),
            vec![ConfigError::new(
                &main_file,
                Some(SECTION.into()),
                "no such section (MessageServer's profile files are listed there)",
            )],
        );
    };
    // <prefix>/conf/apostol.conf: the prefix is the parent of the file's directory.
    let prefix = cfg.prefix.clone().unwrap_or_else(|| {
        main.parent()
            .and_then(Path::parent)
            .unwrap_or(Path::new("."))
            .to_path_buf()
    });
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (kind, value) in keys {
        if kind == "enable" {
            continue;
        }
        let outboxd_kind = match kind.as_str() {
            "smtp" => "smtp",
            "api" => "http",
            _ => kind.as_str(),
        };
        if connectors.contains_key(outboxd_kind) {
            continue;
        }
        if !["smtp", "api"].contains(&kind.as_str()) {
            errors.push(ConfigError::new(
                &main_file,
                Some(format!("{SECTION}.{kind}")),
                format!(
                    "MessageServer's {kind} profiles are not read from its files; configure the \
                     kind in [connectors] ({kind} = \"{kind}.conf\") and this key is skipped"
                ),
            ));
            continue;
        }
        let path = if value.is_empty() {
            PathBuf::from(format!("conf/{kind}.conf"))
        } else {
            PathBuf::from(value)
        };
        let path = if path.is_absolute() {
            path
        } else {
            prefix.join(path)
        };
        let file = path.display().to_string();
        let profiles = match read(&path) {
            Ok(p) => p,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        for (name, keys) in profiles {
            let table = match kind.as_str() {
                "smtp" => smtp_table(&keys),
                _ => api_table(&keys),
            };
            let table = match table {
                Ok(t) => t,
                Err((key, msg)) => {
                    errors.push(ConfigError::new(&file, Some(format!("{name}.{key}")), msg));
                    continue;
                }
            };
            match ConnectorConfig::from_table(outboxd_kind, table) {
                Ok(connector) => out.push((
                    (outboxd_kind.to_string(), name),
                    ProfileConfig {
                        common: cfg.common.clone(),
                        connector,
                        source: file.clone(),
                        rate_limits: Vec::new(),
                        fallback: None,
                    },
                )),
                Err((key, msg)) => errors.push(ConfigError::new(
                    &file,
                    Some(format!("{name}.{}", key.unwrap_or_default())),
                    msg,
                )),
            }
        }
    }
    (out, errors)
}

type Table = Result<toml::Table, (String, String)>;

fn get<'a>(keys: &'a [(String, String)], k: &str) -> Option<&'a str> {
    keys.iter()
        .find(|(n, _)| n == k)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

/// MessageServer's SMTP profile: `host` is a URL (`smtp://host:port`, `smtps://` for implicit
/// TLS; MessageServer's default `localhost:25`), `username`, `password`.
fn smtp_table(keys: &[(String, String)]) -> Table {
    let mut t = toml::Table::new();
    let host = get(keys, "host").unwrap_or("smtp://localhost:25");
    let with_scheme = if host.contains("://") {
        host.to_string()
    } else {
        format!("smtp://{host}")
    };
    let u = url::Url::parse(&with_scheme).map_err(|_| {
        (
            "host".to_string(),
            format!("not a URL or host:port: {host:?}"),
        )
    })?;
    let name = u
        .host_str()
        .ok_or_else(|| ("host".to_string(), "has no host name".to_string()))?;
    t.insert("host".into(), name.into());
    if let Some(p) = u.port() {
        t.insert("port".into(), i64::from(p).into());
    }
    if u.scheme() == "smtps" {
        t.insert("tls".into(), "tls".into());
    }
    if let Some(user) = get(keys, "username") {
        t.insert("username".into(), user.into());
    }
    if let Some(pass) = get(keys, "password") {
        t.insert("password".into(), pass.into());
    }
    Ok(t)
}

/// MessageServer's generic API profile: POST `uri` + the message's address with the content as
/// body, `Authorization: <auth> <token>` (auth default Bearer), `content_type` (default JSON).
/// MessageServer does not check the body, so neither does the mapped profile.
fn api_table(keys: &[(String, String)]) -> Table {
    let mut t = toml::Table::new();
    let uri = get(keys, "uri").ok_or_else(|| ("uri".to_string(), "required".to_string()))?;
    t.insert("url".into(), uri.into());
    if let Some(a) = get(keys, "auth") {
        t.insert("auth_scheme".into(), a.into());
    }
    if get(keys, "token_type").is_some_and(|v| v.eq_ignore_ascii_case("oauth2")) {
        return Err((
            "token_type".into(),
            "OAuth2 provider tokens are not read from MessageServer's files; write this profile \
             in outboxd's http.conf with an [<profile>.oauth2] table"
                .into(),
        ));
    }
    if let Some(tok) = get(keys, "token") {
        t.insert("token".into(), tok.into());
    }
    if let Some(ct) = get(keys, "content_type") {
        t.insert("content_type".into(), ct.into());
    }
    t.insert("validate_json".into(), false.into());
    Ok(t)
}

/// The profile a message's `profile` column selects for its kind: Apostol writes SMTP profiles
/// `<profile>@<domain>`, and MessageServer looks up the part before `@`. Only in drop-in mode,
/// and only when no profile of the whole name exists.
pub fn profile_name<'a>(kind: &str, profile: &'a str, has: impl Fn(&str) -> bool) -> &'a str {
    if kind == "smtp" && !has(profile) {
        if let Some((name, _)) = profile.split_once('@') {
            return name;
        }
    }
    profile
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_apostol_ini_with_inline_comments() {
        let ini = parse(
            "; Apostol\n[main]\nuser=apostol\n\n[process/MessageServer]\nenable=true\nsmtp=conf/smtp.conf      # SMTP server(s)\napi=\"conf/api.conf\"\n",
            "apostol.conf",
        )
        .unwrap();
        let (_, keys) = ini.iter().find(|(s, _)| s == SECTION).unwrap();
        assert_eq!(
            keys,
            &[
                ("enable".to_string(), "true".to_string()),
                ("smtp".to_string(), "conf/smtp.conf".to_string()),
                ("api".to_string(), "conf/api.conf".to_string())
            ]
        );
        assert!(parse("x=1\n", "f").is_err());
    }

    #[test]
    fn maps_smtp_and_api_profiles() {
        let t = smtp_table(&[
            ("host".into(), "smtps://mail.example.com:465".into()),
            ("username".into(), "noreply@example.com".into()),
            ("password".into(), "pw".into()),
        ])
        .unwrap();
        assert_eq!(t["host"].as_str(), Some("mail.example.com"));
        assert_eq!(t["port"].as_integer(), Some(465));
        assert_eq!(t["tls"].as_str(), Some("tls"));
        assert!(ConnectorConfig::from_table("smtp", t).is_ok());
        let t = api_table(&[
            ("uri".into(), "https://api.example.com".into()),
            ("auth".into(), "Token".into()),
            ("token".into(), "t".into()),
        ])
        .unwrap();
        assert_eq!(t["auth_scheme"].as_str(), Some("Token"));
        assert!(ConnectorConfig::from_table("http", t).is_ok());
        let e = api_table(&[
            ("uri".into(), "https://x".into()),
            ("token_type".into(), "oauth2".into()),
        ])
        .unwrap_err();
        assert_eq!(e.0, "token_type");
        assert_eq!(
            profile_name("smtp", "noreply@example.com", |_| false),
            "noreply"
        );
        assert_eq!(
            profile_name("smtp", "noreply@example.com", |_| true),
            "noreply@example.com"
        );
        assert_eq!(profile_name("http", "a@b", |_| false), "a@b");
    }
}
