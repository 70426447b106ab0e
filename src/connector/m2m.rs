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

use std::time::Duration;

use async_trait::async_trait;
use quick_xml::events::{BytesDecl, BytesStart, BytesText, Event};
use quick_xml::name::ResolveResult;
use quick_xml::reader::NsReader;
use quick_xml::writer::Writer;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use serde::Deserialize;

use super::http::{classify_status, classify_transport, read_limited, truncate};
use super::{Connector, DeliveryError, OutboxMessage, Receipt};
use crate::config::{ConfigError, Dur, Secret, SecretSource};

/// Namespace of the M2M XML API's operations.
pub const M2M_NS: &str = "http://mcommunicator.ru/M2M";
/// SOAP 1.1 envelope namespace.
pub const SOAP11_NS: &str = "http://schemas.xmlsoap.org/soap/envelope/";
/// SOAP 1.2 envelope namespace.
pub const SOAP12_NS: &str = "http://www.w3.org/2003/05/soap-envelope";
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
}

impl M2mConnector {
    pub fn new(profile: &str, cfg: &M2mConfig) -> Result<Self, ConfigError> {
        let err = |key: &str, msg: String| {
            ConfigError::new("m2m.conf", Some(format!("{profile}.{key}")), msg)
        };
        let url = cfg.url.clone().unwrap_or_else(|| {
            match cfg.api {
                M2mApi::Soap => DEFAULT_SOAP_URL,
                M2mApi::Omnichannel => DEFAULT_OMNICHANNEL_URL,
            }
            .to_string()
        });
        url::Url::parse(&url).map_err(|e| err("url", format!("invalid URL: {e}")))?;
        let password = SecretSource {
            value: cfg.password.clone(),
            env: cfg.password_env.clone(),
            file: cfg.password_file.clone(),
        }
        .resolve("password")
        .map_err(|m| err("password", m))?;
        let token = SecretSource {
            value: cfg.token.clone(),
            env: cfg.token_env.clone(),
            file: cfg.token_file.clone(),
        }
        .resolve("token")
        .map_err(|m| err("token", m))?;
        let scheme = cfg.auth_scheme.clone().unwrap_or_else(|| {
            match cfg.api {
                M2mApi::Soap => "Bearer",
                M2mApi::Omnichannel => "Basic",
            }
            .to_string()
        });
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
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("outboxd/", env!("CARGO_PKG_VERSION")))
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
        })
    }

    /// The `SendMessage` envelope for one SMS; every value is XML-escaped.
    fn envelope(&self, msid: &str, text: &str) -> String {
        let (prefix, ns) = match self.soap_version {
            SoapVersion::V11 => ("soap", SOAP11_NS),
            SoapVersion::V12 => ("soap12", SOAP12_NS),
        };
        let mut fields = vec![("msid", msid), ("message", text), ("naming", &self.naming)];
        if let Auth::Login {
            login,
            password_md5,
        } = &self.auth
        {
            fields.push(("login", login));
            fields.push(("password", password_md5));
        }
        let mut w = Writer::new(Vec::new());
        let xmlns = format!("xmlns:{prefix}");
        let write = |w: &mut Writer<Vec<u8>>| -> std::io::Result<()> {
            w.write_event(Event::Decl(BytesDecl::new("1.0", Some("utf-8"), None)))?;
            w.create_element(format!("{prefix}:Envelope"))
                .with_attribute(("xmlns:xsi", "http://www.w3.org/2001/XMLSchema-instance"))
                .with_attribute(("xmlns:xsd", "http://www.w3.org/2001/XMLSchema"))
                .with_attribute((xmlns.as_str(), ns))
                .write_inner_content(|w| {
                    w.create_element(format!("{prefix}:Body"))
                        .write_inner_content(|w| {
                            w.create_element("SendMessage")
                                .with_attribute(("xmlns", M2M_NS))
                                .write_inner_content(|w| {
                                    for (name, value) in &fields {
                                        w.create_element(*name)
                                            .write_text_content(xml_text(value))?;
                                    }
                                    Ok(())
                                })?;
                            Ok(())
                        })?;
                    Ok(())
                })?;
            Ok(())
        };
        write(&mut w).expect("writing to a Vec cannot fail");
        String::from_utf8(w.into_inner()).expect("quick-xml writes UTF-8")
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
        let resp = req.send().await.map_err(|e| classify_transport(&e))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = read_limited(resp, self.max_response_bytes)
            .await
            .map_err(|e| classify_transport(&e))?;
        let text = String::from_utf8_lossy(&bytes);
        let status_i = status.as_u16() as i32;
        let elements = match parse_elements(&text) {
            Ok(e) => e,
            Err(_) if !status.is_success() => return Err(classify_status(status, &text, &headers)),
            // A 200 that is not XML comes from something in between (proxy, captive portal), not
            // from MTS: nothing was sent, so trying again is safe.
            Err(e) => {
                return Err(DeliveryError::retry(
                    "m2m-bad-response",
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
        let resp = req.send().await.map_err(|e| classify_transport(&e))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = read_limited(resp, self.max_response_bytes)
            .await
            .map_err(|e| classify_transport(&e))?;
        let text = String::from_utf8_lossy(&bytes);
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
        let content = msg.content_required()?;
        if let Some(env) = detect_envelope(content)? {
            if self.api == M2mApi::Omnichannel {
                return Err(DeliveryError::permanent(
                    "bad-content",
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

/// Text for an element: XML-escaped, with CR written as a character reference so that XML's
/// end-of-line normalisation (XML 1.0 §2.11) does not turn CRLF into LF on the other side.
fn xml_text(s: &str) -> BytesText<'static> {
    BytesText::from_escaped(quick_xml::escape::escape(s).replace('\r', "&#13;"))
}

/// Normalises a phone number to the digits MTS wants (`79001234567`): separators (space, `-`,
/// `.`, `(`, `)`) and a leading `+` are dropped; anything else is a `bad-address`. With a
/// `country_code`, a 10-digit national number gets it in front, and for `7` the Russian trunk
/// prefix `8` of an 11-digit number becomes `7`. The result must have 11 to 15 digits (E.164).
pub fn normalise_msid(address: &str, country_code: &str) -> Result<String, DeliveryError> {
    let bad = |why: &str| {
        DeliveryError::permanent(
            "bad-address",
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
            "bad-content",
            "the message text is empty",
        ));
    }
    let n = text.chars().count();
    if n > MAX_MESSAGE_CHARS {
        return Err(DeliveryError::permanent(
            "bad-content",
            format!("the message has {n} characters; MTS accepts at most {MAX_MESSAGE_CHARS}"),
        ));
    }
    if let Some(c) = text.chars().find(|&c| {
        (c < ' ' && !matches!(c, '\t' | '\n' | '\r')) || matches!(c, '\u{FFFE}' | '\u{FFFF}')
    }) {
        return Err(DeliveryError::permanent(
            "bad-content",
            format!(
                "the message contains U+{:04X}, which XML cannot carry",
                c as u32
            ),
        ));
    }
    Ok(())
}

/// A pre-built envelope found in `content`.
#[derive(Debug, PartialEq)]
pub struct Envelope {
    pub version: SoapVersion,
    /// Local name of the first element of the Body (`SendMessage`).
    pub operation: String,
}

/// Whether `content` is a whole SOAP envelope: its root element is `Envelope`, with or without a
/// prefix (`<soap:Envelope`, `<soap12:Envelope`, `<Envelope`). The SOAP version comes from the
/// envelope's namespace (1.2 when it is the 1.2 one, else 1.1). An envelope that is not well-formed
/// XML is a `bad-content`: posting it would only earn a fault, and escaping it as SMS text would
/// text the recipient a page of XML.
pub fn detect_envelope(content: &str) -> Result<Option<Envelope>, DeliveryError> {
    let t = content.trim_start_matches('\u{feff}').trim_start();
    if !t.starts_with('<') {
        return Ok(None);
    }
    let mut reader = NsReader::from_str(t);
    let root_is_envelope = loop {
        match reader.read_event() {
            Ok(Event::Start(s) | Event::Empty(s)) => break local_name(&s) == "Envelope",
            Ok(Event::Decl(_) | Event::Comment(_) | Event::PI(_) | Event::DocType(_)) => {}
            Ok(Event::Text(x)) if x.iter().all(u8::is_ascii_whitespace) => {}
            _ => break false,
        }
    };
    if !root_is_envelope {
        return Ok(None);
    }
    let elements = parse_elements(t).map_err(|e| {
        DeliveryError::permanent(
            "bad-content",
            format!("content looks like a SOAP envelope but is not well-formed XML: {e}"),
        )
    })?;
    let version = if elements[0].ns.as_deref() == Some(SOAP12_NS) {
        SoapVersion::V12
    } else {
        SoapVersion::V11
    };
    let operation = elements
        .iter()
        .find(|e| e.depth == 2 && e.parent.as_deref() == Some("Body"))
        .map_or_else(|| "SendMessage".to_string(), |e| e.name.clone());
    Ok(Some(Envelope { version, operation }))
}

/// One element of a parsed document, in document order.
#[derive(Debug, Clone, PartialEq)]
struct Element {
    /// Namespace URI, when bound.
    ns: Option<String>,
    /// Local name.
    name: String,
    /// Local name of the parent element.
    parent: Option<String>,
    /// 0 for the root.
    depth: usize,
    /// Text directly inside the element, references resolved.
    text: String,
}

/// Parses XML into a flat list of elements. Small on purpose: the answers of the M2M API are a
/// handful of elements, and a flat list lets callers ask "the first `SendMessageResult`".
fn parse_elements(xml: &str) -> Result<Vec<Element>, String> {
    let mut reader = NsReader::from_str(xml);
    let mut out: Vec<Element> = Vec::new();
    let mut stack: Vec<usize> = Vec::new();
    loop {
        let (ns, ev) = reader.read_resolved_event().map_err(|e| e.to_string())?;
        let ns = match ns {
            ResolveResult::Bound(n) => Some(String::from_utf8_lossy(n.as_ref()).into_owned()),
            _ => None,
        };
        match ev {
            Event::Start(ref s) | Event::Empty(ref s) => {
                let idx = out.len();
                out.push(Element {
                    ns,
                    name: local_name(s),
                    parent: stack.last().map(|&i| out[i].name.clone()),
                    depth: stack.len(),
                    text: String::new(),
                });
                if matches!(ev, Event::Start(_)) {
                    stack.push(idx);
                }
            }
            Event::End(_) => {
                stack.pop();
            }
            Event::Text(t) => {
                let s = t.xml10_content().map_err(|e| e.to_string())?;
                if let Some(&i) = stack.last() {
                    out[i].text.push_str(&s);
                } else if !s.trim().is_empty() {
                    return Err("text outside the root element".into());
                }
            }
            Event::CData(t) => {
                if let Some(&i) = stack.last() {
                    out[i]
                        .text
                        .push_str(&t.xml10_content().map_err(|e| e.to_string())?);
                }
            }
            Event::GeneralRef(r) => {
                let resolved = match r.resolve_char_ref().map_err(|e| e.to_string())? {
                    Some(c) => c.to_string(),
                    None => {
                        let name = r.decode().map_err(|e| e.to_string())?;
                        quick_xml::escape::resolve_predefined_entity(&name)
                            .ok_or_else(|| format!("unknown entity &{name};"))?
                            .to_string()
                    }
                };
                if let Some(&i) = stack.last() {
                    out[i].text.push_str(&resolved);
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if out.is_empty() {
        return Err("no root element".into());
    }
    if !stack.is_empty() {
        return Err("unclosed element".into());
    }
    Ok(out)
}

fn local_name(s: &BytesStart<'_>) -> String {
    String::from_utf8_lossy(s.local_name().as_ref()).into_owned()
}

/// What a SOAP fault says.
#[derive(Debug, Default, PartialEq)]
struct Fault {
    /// `faultcode` (1.1) or `Code/Value` (1.2), e.g. `soap:Server`.
    code: String,
    /// `faultstring` (1.1) or `Reason/Text` (1.2).
    reason: String,
    /// Every text inside the fault, detail included, where the MTS code may also be.
    all_text: String,
}

fn find_fault(elements: &[Element]) -> Option<Fault> {
    let start = elements.iter().position(|e| {
        e.name == "Fault" && matches!(e.ns.as_deref(), Some(SOAP11_NS | SOAP12_NS))
    })?;
    let depth = elements[start].depth;
    let mut f = Fault::default();
    for e in elements[start + 1..].iter().take_while(|e| e.depth > depth) {
        let t = e.text.trim();
        match (e.parent.as_deref(), e.name.as_str()) {
            (_, "faultcode") | (Some("Code"), "Value") if f.code.is_empty() => f.code = t.into(),
            (_, "faultstring") | (Some("Reason"), "Text") if f.reason.is_empty() => {
                f.reason = t.into()
            }
            _ => {}
        }
        if !t.is_empty() {
            f.all_text.push_str(t);
            f.all_text.push(' ');
        }
    }
    Some(f)
}

/// The fault strings of the M2M API and whether each is worth retrying (providers.md §2.9, 3.3).
const FAULTS: &[(&str, bool)] = &[
    ("SYSTEM_FAILURE", true),
    ("TOO_MANY_PARAMETERS", false),
    ("INCORRECT_PASSWORD", false),
    ("MSID_FORMAT_ERROR", false),
    ("MESSAGE_FORMAT_ERROR", false),
    ("WRONG_ID", false),
    ("MESSAGE_HANDLING_ERROR", false),
    ("NO_SUCH_SUBSCRIBER", false),
    ("TEST_LIMIT_EXCEEDED", false),
    ("TRUSTED_LIMIT_EXCEEDED", false),
    ("IP_NOT_ALLOWED", false),
    ("MAX_LENGTH_EXCEEDED", false),
    ("OPERATION_NOT_ALLOWED", false),
    ("EMPTY_MESSAGE_NOT_ALLOWED", false),
    ("ACCOUNT_IS_BLOCKED", false),
    ("OBJECT_ALREADY_EXISTS", false),
    ("MSID_IS_IN_BLACKLIST", false),
    ("MSIDS_ARE_IN_BLACKLIST", false),
    ("TIME_IS_IN_THE_PAST", false),
];

/// The stable error code of an M2M fault string: `m2m-` and the string in kebab case.
pub fn fault_code(fault: &str) -> String {
    format!("m2m-{}", fault.to_ascii_lowercase().replace('_', "-"))
}

fn classify_fault(f: &Fault) -> DeliveryError {
    let reason = format!(
        "SOAP fault {}: {}",
        if f.code.is_empty() {
            "(no code)"
        } else {
            &f.code
        },
        truncate(
            if f.reason.is_empty() {
                &f.all_text
            } else {
                &f.reason
            },
            512
        )
    );
    // ASMX wraps the code in prose ("Server was unable to process request. ---> X"): look for a
    // whole word, so MSID_IS_IN_BLACKLIST and MSIDS_ARE_IN_BLACKLIST stay apart.
    let known = format!("{} {}", f.reason, f.all_text)
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .find_map(|w| FAULTS.iter().find(|(name, _)| *name == w).copied());
    match known {
        Some((name, true)) => DeliveryError::retry(fault_code(name), reason),
        Some((name, false)) => DeliveryError::permanent(fault_code(name), reason),
        None => {
            // SOAP 1.1 `Client` / 1.2 `Sender`: the request itself is wrong, sending it again
            // will not help. Anything else may be the server's passing trouble.
            let local = f.code.rsplit(':').next().unwrap_or_default();
            if matches!(local, "Client" | "Sender") {
                DeliveryError::permanent("m2m-fault", reason)
            } else {
                DeliveryError::retry("m2m-fault", reason)
            }
        }
    }
}

fn json_scalar(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_profiles_parse() {
        let text = include_str!("../../conf/m2m.conf");
        let profiles = crate::config::parse_profiles("m2m", text, "m2m.conf").unwrap();
        assert_eq!(profiles.len(), 2);
    }

    #[test]
    fn md5_is_lower_hex() {
        assert_eq!(md5_hex("password"), "5f4dcc3b5aa765d61d8327deb882cf99");
    }

    #[test]
    fn phones_are_normalised_or_rejected() {
        for (input, want) in [
            ("+7 (900) 123-45-67", "79001234567"),
            ("89001234567", "79001234567"),
            ("9001234567", "79001234567"),
            ("375291234567", "375291234567"),
        ] {
            assert_eq!(normalise_msid(input, "7").unwrap(), want, "{input}");
        }
        for bad in [
            "",
            "abc",
            "+7 900 123 45 6x",
            "12345",
            "7900123456789012",
            "7900,79001",
        ] {
            let e = normalise_msid(bad, "7").unwrap_err();
            assert_eq!(e.code(), "bad-address", "{bad}");
            assert!(!e.is_retry());
        }
        assert!(normalise_msid("9001234567", "").is_err());
    }

    #[test]
    fn text_is_checked() {
        assert!(check_text("привет").is_ok());
        assert_eq!(check_text(" ").unwrap_err().code(), "bad-content");
        assert!(check_text(&"я".repeat(1000)).is_ok());
        assert_eq!(
            check_text(&"я".repeat(1001)).unwrap_err().code(),
            "bad-content"
        );
        assert_eq!(check_text("a\u{1}b").unwrap_err().code(), "bad-content");
    }

    #[test]
    fn envelopes_are_detected_with_their_version() {
        let e12 = format!(
            "<?xml version=\"1.0\"?>\n<soap12:Envelope xmlns:soap12=\"{SOAP12_NS}\"><soap12:Body>\
             <SendMessages xmlns=\"{M2M_NS}\"/></soap12:Body></soap12:Envelope>"
        );
        assert_eq!(
            detect_envelope(&e12).unwrap(),
            Some(Envelope {
                version: SoapVersion::V12,
                operation: "SendMessages".into()
            })
        );
        let e11 = format!(
            "<Envelope xmlns=\"{SOAP11_NS}\"><Body><SendMessage xmlns=\"{M2M_NS}\"/></Body></Envelope>"
        );
        assert_eq!(
            detect_envelope(&e11).unwrap().unwrap().version,
            SoapVersion::V11
        );
        assert_eq!(detect_envelope("Hello <b>you</b>").unwrap(), None);
        assert_eq!(detect_envelope("<b>Envelope</b>").unwrap(), None);
        let broken = format!("<soap:Envelope xmlns:soap=\"{SOAP11_NS}\"><soap:Body>");
        assert_eq!(detect_envelope(&broken).unwrap_err().code(), "bad-content");
    }

    #[test]
    fn built_envelope_escapes_text_and_parses_back() {
        let cfg: M2mConfig = toml::from_str(
            "login = \"acme\"\npassword = \"secret\"\nnaming = \"A&B\"\nsoap_version = \"1.1\"",
        )
        .unwrap();
        let c = M2mConnector::new("default", &cfg).unwrap();
        let text = "1 < 2 & \"q\" 'a' ]]> \r\nend";
        let xml = c.envelope("79001234567", text);
        let els = parse_elements(&xml).unwrap();
        let get = |n: &str| els.iter().find(|e| e.name == n).unwrap();
        assert_eq!(get("Envelope").ns.as_deref(), Some(SOAP11_NS));
        assert_eq!(get("SendMessage").ns.as_deref(), Some(M2M_NS));
        assert_eq!(get("message").text, text);
        assert_eq!(get("naming").text, "A&B");
        assert_eq!(get("password").text, md5_hex("secret"));
        assert_eq!(
            detect_envelope(&xml).unwrap().unwrap().operation,
            "SendMessage"
        );
    }

    #[test]
    fn faults_are_classified_by_their_string() {
        let fault = |code: &str, reason: &str| Fault {
            code: code.into(),
            reason: reason.into(),
            all_text: format!("{code} {reason}"),
        };
        let e = classify_fault(&fault("soap:Server", "SYSTEM_FAILURE"));
        assert!(e.is_retry());
        assert_eq!(e.code(), "m2m-system-failure");
        let e = classify_fault(&fault(
            "soap:Server",
            "Server was unable to process request. ---> INCORRECT_PASSWORD",
        ));
        assert!(!e.is_retry());
        assert_eq!(e.code(), "m2m-incorrect-password");
        for (name, retry) in FAULTS {
            let e = classify_fault(&fault("soap:Server", name));
            assert_eq!(e.is_retry(), *retry, "{name}");
            assert_eq!(e.code(), fault_code(name));
        }
        assert_eq!(
            classify_fault(&fault("soap:Server", "MSIDS_ARE_IN_BLACKLIST")).code(),
            "m2m-msids-are-in-blacklist"
        );
        assert!(classify_fault(&fault("soap:Server", "boom")).is_retry());
        assert!(!classify_fault(&fault("soap12:Sender", "boom")).is_retry());
    }

    #[test]
    fn soap12_fault_is_found() {
        let xml = format!(
            "<s:Envelope xmlns:s=\"{SOAP12_NS}\"><s:Body><s:Fault><s:Code><s:Value>s:Receiver</s:Value>\
             </s:Code><s:Reason><s:Text xml:lang=\"en\">NO_SUCH_SUBSCRIBER</s:Text></s:Reason>\
             </s:Fault></s:Body></s:Envelope>"
        );
        let f = find_fault(&parse_elements(&xml).unwrap()).unwrap();
        assert_eq!(f.code, "s:Receiver");
        assert_eq!(f.reason, "NO_SUCH_SUBSCRIBER");
        assert_eq!(classify_fault(&f).code(), "m2m-no-such-subscriber");
    }

    #[test]
    fn config_needs_one_kind_of_credentials() {
        let parse = |s: &str| M2mConnector::new("p", &toml::from_str::<M2mConfig>(s).unwrap());
        assert!(parse("token = \"t\"").is_ok());
        assert!(parse("login = \"l\"\npassword = \"p\"").is_ok());
        assert!(parse("login = \"l\"").is_err());
        assert!(parse("login = \"l\"\npassword = \"p\"\ntoken = \"t\"").is_err());
        assert!(parse("api = \"omnichannel\"\ntoken = \"t\"").is_err()); // no naming
        assert!(parse("api = \"omnichannel\"\ntoken = \"t\"\nnaming = \"ACME\"").is_ok());
        assert!(parse("password_is_md5 = true\nlogin = \"l\"\npassword = \"xyz\"").is_err());
        assert!(toml::from_str::<M2mConfig>("tokn = \"t\"").is_err());
    }
}
