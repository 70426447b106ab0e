//! The `m2m` connector: SMS through MTS Communicator M2M (Apostol's `api.agent`/`m2m.agent`).
//!
//! Two APIs, chosen per profile with `api`:
//! - `soap` (default): the M2M XML API, operation `SendMessage(msid, message, naming)` in namespace
//!   `http://mcommunicator.ru/M2M`, as SOAP 1.2 (default, what Apostol v1 renders) or SOAP 1.1 with
//!   `SOAPAction`. Auth is either `login` + hex-MD5 `password` inside the operation (old style) or an
//!   `Authorization: Bearer <token>` header (Apostol v1). The message id (`SendMessageResult`) becomes
//!   the provider id. When `content` already is a SOAP envelope (Apostol v1 lets the database render
//!   it), it is posted byte-for-byte and only the auth header is added.
//! - `omnichannel`: the newer MTS HTTP API (`POST …/http-api/v1/messages`, JSON body,
//!   `Authorization: Basic <token>` by default) that Apostol's current module uses.
//!
//! The phone comes from `address` (normalised to digits, see [`normalise_msid`]), the text from
//! `content` (at most 1000 characters, MTS's limit).
//!
//! Classification: SOAP faults are read whatever the HTTP status (ASMX answers faults with 500):
//! `SYSTEM_FAILURE` retries, every other documented fault string is permanent with the code
//! `m2m-<fault in kebab case>` (`m2m-incorrect-password`, `m2m-no-such-subscriber`…); an unknown
//! fault retries unless its fault code blames the client. Without a fault, HTTP statuses and network
//! errors follow the house rules of the http connector.
//!
//! Secrets: the password (and its MD5) and the token are scrubbed from every error text; requests
//! never follow a redirect to another origin (`redirect-denied`).

use crate::connector::codes;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use serde::Deserialize;

use super::provider::{classify_status, json_scalar, read_response, truncate};
use super::redact::{self, Redactor};
use super::{Connector, DeliveryError, OutboxMessage, Receipt};
use crate::settings::{ConfigError, Dur, ProfileContext, Secret, SecretSource};

mod soap;
pub use soap::{
    build_envelope, detect_envelope, fault_code, Envelope, M2M_NS, SOAP11_NS, SOAP12_NS,
};
use soap::{classify_fault, find_fault, parse_elements};

/// MTS's limit on the text of one message, in characters.
pub const MAX_MESSAGE_CHARS: usize = 1000;

const DEFAULT_SOAP_URL: &str = "https://api.mcommunicator.ru/m2m/m2m_api.asmx";
const DEFAULT_OMNICHANNEL_URL: &str = "https://omnichannel.mts.ru/http-api/v1/messages";

/// Which MTS API a profile talks to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum M2mApi {
    /// The M2M XML API (SOAP `SendMessage`).
    #[default]
    Soap,
    /// The omnichannel HTTP API (JSON).
    Omnichannel,
}

/// SOAP binding of the M2M XML API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum SoapVersion {
    /// `text/xml` with a `SOAPAction` header.
    #[serde(rename = "1.1")]
    V11,
    /// `application/soap+xml` with the action in the content type.
    #[default]
    #[serde(rename = "1.2")]
    V12,
}

/// An `m2m` profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct M2mConfig {
    /// `soap` (M2M XML API, default) or `omnichannel` (HTTP API).
    #[serde(default)]
    pub api: M2mApi,
    /// Endpoint. Default `https://api.mcommunicator.ru/m2m/m2m_api.asmx` (soap) or
    /// `https://omnichannel.mts.ru/http-api/v1/messages` (omnichannel).
    pub url: Option<String>,
    /// SOAP binding, `"1.1"` or `"1.2"`. Default `"1.2"`. Ignored for pre-built envelopes, whose own
    /// namespace decides.
    #[serde(default)]
    pub soap_version: SoapVersion,
    /// Account login for old-style auth (soap only); needs a password.
    pub login: Option<String>,
    /// Account password (the plain one; its hex MD5 is sent): inline…
    pub password: Option<Secret>,
    /// …or from this environment variable…
    pub password_env: Option<String>,
    /// …or from this file.
    pub password_file: Option<std::path::PathBuf>,
    /// The password given already is the hex MD5 (so the plain one need not be stored).
    /// Default false.
    #[serde(default)]
    pub password_is_md5: bool,
    /// Token for `Authorization: <auth_scheme> <token>` (soap: instead of login/password;
    /// omnichannel: required): inline…
    pub token: Option<Secret>,
    /// …or from this environment variable…
    pub token_env: Option<String>,
    /// …or from this file.
    pub token_file: Option<std::path::PathBuf>,
    /// Scheme of the `Authorization` header. Default `Bearer` (soap) or `Basic` (omnichannel).
    pub auth_scheme: Option<String>,
    /// Approved sender name (alpha name). Optional for soap (empty = the account's default),
    /// required for omnichannel.
    pub naming: Option<String>,
    /// Country code put in front of 10-digit national numbers; with `"7"`, a Russian trunk prefix
    /// (`8XXXXXXXXXX`) is also rewritten to `7XXXXXXXXXX`. `""` disables both. Default `"7"`.
    #[serde(default = "default_country_code")]
    pub country_code: String,
    /// Bytes of the response body read. Default 65536.
    #[serde(default = "default_max_response")]
    pub max_response_bytes: usize,
    /// Request timeout (common key). Default 30s.
    pub timeout: Option<Dur>,
}

fn default_country_code() -> String {
    "7".into()
}
fn default_max_response() -> usize {
    65536
}

/// How requests authenticate.
enum Auth {
    /// Old style: login and hex-MD5 password inside the operation.
    Login { login: String, password_md5: String },
    /// An `Authorization` header.
    Header(HeaderValue),
}

pub struct M2mConnector {
    name: String,
    client: reqwest::Client,
    url: String,
    api: M2mApi,
    soap_version: SoapVersion,
    auth: Auth,
    naming: String,
    country_code: String,
    max_response_bytes: usize,
    redactor: Redactor,
}

impl M2mConnector {
    pub fn new(ctx: &ProfileContext, cfg: &M2mConfig) -> Result<Self, ConfigError> {
        let profile = ctx.profile.as_str();
        let err = |key: &str, msg: String| ctx.error(key, msg);
        let url = cfg.url.clone().unwrap_or_else(|| {
            match cfg.api {
                M2mApi::Soap => DEFAULT_SOAP_URL,
                M2mApi::Omnichannel => DEFAULT_OMNICHANNEL_URL,
            }
            .to_string()
        });
        let parsed = url::Url::parse(&url).map_err(|e| err("url", format!("invalid URL: {e}")))?;
        let mut redactor = Redactor::new();
        redactor.add_url(&parsed, false);
        let password = SecretSource::of(&cfg.password, &cfg.password_env, &cfg.password_file)
            .resolve("password")
            .map_err(|m| err("password", m))?;
        let token = SecretSource::of(&cfg.token, &cfg.token_env, &cfg.token_file)
            .resolve("token")
            .map_err(|m| err("token", m))?;
        let scheme = cfg.auth_scheme.clone().unwrap_or_else(|| {
            match cfg.api {
                M2mApi::Soap => "Bearer",
                M2mApi::Omnichannel => "Basic",
            }
            .to_string()
        });
        // The password and the MD5 of it that goes on the wire, the token.
        if let Some(p) = &password {
            redactor.add(p.expose()).add(&md5_hex(p.expose()));
        }
        if let Some(t) = &token {
            redactor.add(t.expose());
        }
        let auth = match (cfg.api, &cfg.login, password, token) {
            (_, None, None, Some(t)) => {
                let mut v = HeaderValue::from_str(&format!("{scheme} {}", t.expose()))
                    .map_err(|_| err("token", "token is not a valid header value".into()))?;
                v.set_sensitive(true);
                Auth::Header(v)
            }
            (M2mApi::Soap, Some(login), Some(pw), None) => Auth::Login {
                login: login.clone(),
                password_md5: if cfg.password_is_md5 {
                    let h = pw.expose().trim().to_ascii_lowercase();
                    if h.len() != 32 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(err(
                            "password",
                            "password_is_md5 is set but the password is not 32 hex digits".into(),
                        ));
                    }
                    h
                } else {
                    md5_hex(pw.expose())
                },
            },
            (M2mApi::Omnichannel, ..) => return Err(err(
                "token",
                "the omnichannel API needs a token (token / token_env / token_file) and no login"
                    .into(),
            )),
            _ => return Err(err(
                "login",
                "set either login + password (password / password_env / password_file) or a token"
                    .into(),
            )),
        };
        let naming = cfg.naming.clone().unwrap_or_default();
        if cfg.api == M2mApi::Omnichannel && naming.trim().is_empty() {
            return Err(err(
                "naming",
                "the omnichannel API needs a sender name".into(),
            ));
        }
        if !cfg.country_code.bytes().all(|b| b.is_ascii_digit()) || cfg.country_code.len() > 3 {
            return Err(err("country_code", "must be 0 to 3 digits".into()));
        }
        let timeout = cfg.timeout.map_or(Duration::from_secs(30), |d| d.0);
        // Credentials (header or envelope) never follow a redirect to another origin.
        let client = crate::connector::provider::http_client_builder(timeout)
            .redirect(redact::same_origin_redirects())
            .build()
            .map_err(|e| err("url", format!("cannot build the HTTP client: {e}")))?;
        Ok(M2mConnector {
            name: format!("m2m/{profile}"),
            client,
            url,
            api: cfg.api,
            soap_version: cfg.soap_version,
            auth,
            naming,
            country_code: cfg.country_code.clone(),
            max_response_bytes: cfg.max_response_bytes,
            redactor,
        })
    }

    /// The `SendMessage` envelope for one SMS.
    fn envelope(&self, msid: &str, text: &str) -> String {
        let mut fields = vec![("msid", msid), ("message", text), ("naming", &self.naming)];
        if let Auth::Login {
            login,
            password_md5,
        } = &self.auth
        {
            fields.push(("login", login));
            fields.push(("password", password_md5));
        }
        soap::build_envelope(self.soap_version, "SendMessage", &fields)
    }

    async fn post_soap(
        &self,
        body: String,
        version: SoapVersion,
        operation: &str,
    ) -> Result<Receipt, DeliveryError> {
        let action = format!("{M2M_NS}/{operation}");
        let mut req = self.client.post(&self.url).body(body);
        req = match version {
            SoapVersion::V11 => req
                .header(CONTENT_TYPE, "text/xml; charset=utf-8")
                .header("SOAPAction", format!("\"{action}\"")),
            // SOAP 1.2 carries the action as a media-type parameter (RFC 3902).
            SoapVersion::V12 => req.header(
                CONTENT_TYPE,
                format!("application/soap+xml; charset=utf-8; action=\"{action}\""),
            ),
        };
        if let Auth::Header(v) = &self.auth {
            req = req.header(AUTHORIZATION, v.clone());
        }
        let resp = req.send().await.map_err(|e| redact::send_error(&e))?;
        let (status, headers, text) = read_response(resp, self.max_response_bytes).await?;
        let status_i = status.as_u16() as i32;
        let elements = match parse_elements(&text) {
            Ok(e) => e,
            Err(_) if !status.is_success() => return Err(classify_status(status, &text, &headers)),
            // A 200 that is not XML comes from something in between (proxy, captive portal), not
            // from MTS: nothing was sent, so trying again is safe.
            Err(e) => {
                return Err(DeliveryError::retry(
                    codes::M2M_BAD_RESPONSE.code,
                    format!(
                        "HTTP 200 with a body that is not XML ({e}): {}",
                        truncate(&text, 256)
                    ),
                )
                .with_status(status_i))
            }
        };
        if let Some(fault) = find_fault(&elements) {
            return Err(classify_fault(&fault).with_status(status_i));
        }
        if !status.is_success() {
            return Err(classify_status(status, &text, &headers));
        }
        // SendMessage answers SendMessageResult; a pre-built SendMessages envelope answers a list
        // of {Msid, MessageID}, whose first id stands for the message.
        let provider_id = ["SendMessageResult", "MessageID"].iter().find_map(|n| {
            elements
                .iter()
                .find(|e| e.name == *n && e.ns.as_deref() == Some(M2M_NS))
                .map(|e| e.text.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        Ok(Receipt {
            provider_id,
            remote_status: Some(status_i),
            reply: None,
        })
    }

    async fn post_omnichannel(&self, msid: &str, text: &str) -> Result<Receipt, DeliveryError> {
        let body = serde_json::json!({
            "options": {"from": {"sms_address": self.naming}},
            "messages": [{"to": [{"msisdn": msid}], "content": {"short_text": text}}],
        });
        let mut req = self.client.post(&self.url).json(&body);
        if let Auth::Header(v) = &self.auth {
            req = req.header(AUTHORIZATION, v.clone());
        }
        let resp = req.send().await.map_err(|e| redact::send_error(&e))?;
        let (status, headers, text) = read_response(resp, self.max_response_bytes).await?;
        if !status.is_success() {
            return Err(classify_status(status, &text, &headers));
        }
        // The response schema is not documented publicly: take the first id-like field found.
        let provider_id = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| {
                let first = v.pointer("/messages/0").cloned().unwrap_or_default();
                ["internal_id", "message_id", "messageId", "id"]
                    .iter()
                    .find_map(|k| first.get(k).or_else(|| v.get(k)).map(json_scalar))
            });
        Ok(Receipt {
            provider_id,
            remote_status: Some(status.as_u16() as i32),
            reply: None,
        })
    }
}

#[async_trait]
impl Connector for M2mConnector {
    fn name(&self) -> &str {
        &self.name
    }

    async fn deliver(&self, msg: &OutboxMessage) -> Result<Receipt, DeliveryError> {
        self.redactor.result(self.deliver_inner(msg).await)
    }
}

impl M2mConnector {
    async fn deliver_inner(&self, msg: &OutboxMessage) -> Result<Receipt, DeliveryError> {
        let content = msg.content_required()?;
        if let Some(env) = detect_envelope(content)? {
            if self.api == M2mApi::Omnichannel {
                return Err(DeliveryError::permanent(
                    codes::BAD_CONTENT.code,
                    "content is a SOAP envelope, but the profile uses the omnichannel API",
                ));
            }
            // Apostol v1: the database rendered the request; the msid is inside it.
            return self
                .post_soap(content.to_string(), env.version, &env.operation)
                .await;
        }
        let msid = normalise_msid(msg.address_required()?, &self.country_code)?;
        check_text(content)?;
        match self.api {
            M2mApi::Soap => {
                let body = self.envelope(&msid, content);
                self.post_soap(body, self.soap_version, "SendMessage").await
            }
            M2mApi::Omnichannel => self.post_omnichannel(&msid, content).await,
        }
    }
}

/// The hex MD5 of a password, as the M2M API expects it.
pub fn md5_hex(s: &str) -> String {
    use md5::{Digest, Md5};
    Md5::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Normalises a phone number to the digits MTS wants (`79001234567`): separators (space, `-`,
/// `.`, `(`, `)`) and a leading `+` are dropped; anything else is a `bad-address`. With a
/// `country_code`, a 10-digit national number gets it in front, and for `7` the Russian trunk
/// prefix `8` of an 11-digit number becomes `7`. The result must have 11 to 15 digits (E.164).
pub fn normalise_msid(address: &str, country_code: &str) -> Result<String, DeliveryError> {
    let bad = |why: &str| {
        DeliveryError::permanent(
            codes::BAD_ADDRESS.code,
            format!("\"{}\": {why}", truncate(address, 64)),
        )
    };
    let trimmed = address.trim();
    let rest = trimmed.strip_prefix('+').unwrap_or(trimmed);
    let mut digits = String::with_capacity(rest.len());
    for c in rest.chars() {
        match c {
            '0'..='9' => digits.push(c),
            ' ' | '-' | '.' | '(' | ')' => {}
            _ => return Err(bad("a phone number has only digits and separators")),
        }
    }
    if !country_code.is_empty() {
        if digits.len() == 10 {
            digits.insert_str(0, country_code);
        } else if country_code == "7" && digits.len() == 11 && digits.starts_with('8') {
            digits.replace_range(0..1, "7");
        }
    }
    if !(11..=15).contains(&digits.len()) {
        return Err(bad("expected 11 to 15 digits with the country code"));
    }
    Ok(digits)
}

/// Checks the text of an SMS: not empty, at most [`MAX_MESSAGE_CHARS`], and only characters XML
/// 1.0 can carry.
fn check_text(text: &str) -> Result<(), DeliveryError> {
    if text.trim().is_empty() {
        return Err(DeliveryError::permanent(
            codes::BAD_CONTENT.code,
            "the message text is empty",
        ));
    }
    let n = text.chars().count();
    if n > MAX_MESSAGE_CHARS {
        return Err(DeliveryError::permanent(
            codes::BAD_CONTENT.code,
            format!("the message has {n} characters; MTS accepts at most {MAX_MESSAGE_CHARS}"),
        ));
    }
    if let Some(c) = text.chars().find(|&c| {
        (c < ' ' && !matches!(c, '\t' | '\n' | '\r')) || matches!(c, '\u{FFFE}' | '\u{FFFF}')
    }) {
        return Err(DeliveryError::permanent(
            codes::BAD_CONTENT.code,
            format!(
                "the message contains U+{:04X}, which XML cannot carry",
                c as u32
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
