//! The generic `http` connector (Apostol's "API" connector): `api.agent` messages whose agent has
//! no dedicated connector land here. The profile gives the base URL, method, headers and
//! credentials; the message gives the path (`address`), the body (`content`) and, optionally, the
//! method (`subject`, when it is an HTTP method name).
//!
//! Classification (house style, RFC 9110): 2xx done; 408, 429 and 5xx except 501 retry, honouring
//! `Retry-After` (seconds or HTTP-date); network errors and timeouts retry; every other status is
//! permanent. The message code goes out as `Idempotency-Key`, so a retried request can be
//! de-duplicated by the receiver.
//!
//! Hardening (each in its own file): an optional OAuth2 client-credentials token per profile
//! ([`oauth`], refreshed through the shared token cache, and once more when the API answers 401),
//! optional Standard Webhooks signing ([`sign`]), and a host allowlist enforced at connect time
//! ([`allow`]) so that a message cannot make the daemon call internal services. Response bodies
//! are read up to `max_response_bytes` (error texts up to 256 bytes), whatever the server sends.
//!
//! Secrets (invariants): the credentials — `Authorization` (token or OAuth2), the signature and
//! the profile's `headers` — go only to the origin of `url` and to `credential_hosts`; a redirect
//! that would carry them elsewhere, or from https to http, is refused (`redirect-denied`). Every
//! result passes through the profile's [`Redactor`] (token, secrets, secret-looking headers, the
//! credential parts of `url`, all of its path with `url_secret`) and the token cache's, so no
//! error text, log line or reply holds a secret. A GET, HEAD, DELETE or OPTIONS without content
//! has no body, so it needs no JSON.

pub mod allow;
pub mod oauth;
pub mod sign;

// `dispatch` truncates error texts with this path; the helper lives in the provider toolkit.
pub use super::provider::truncate;

use crate::connector::codes;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use serde::Deserialize;

use super::provider::token::call_with_token;
use super::provider::{classify_status, json_scalar, read_response};
use super::redact::{self, Redactor};
use super::token::TokenCache;
use super::{Connector, DeliveryError, OutboxMessage, Receipt};
use crate::settings::{ConfigError, Dur, ProfileContext, Secret, SecretSource};
use allow::Policy;
use sign::Signer;

/// An `http` profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Base URL; the message's `address` is appended to it (Apostol: `uri + address`).
    pub url: String,
    /// Default method. Default `POST`.
    #[serde(default = "default_method")]
    pub method: String,
    /// `Content-Type` of the body. Default `application/json`.
    #[serde(default = "default_content_type")]
    pub content_type: String,
    /// Extra headers sent with every request.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Scheme of the `Authorization` header when a token is set. Default `Bearer`.
    #[serde(default = "default_auth_scheme")]
    pub auth_scheme: String,
    /// Token for `Authorization: <auth_scheme> <token>`: inline…
    pub token: Option<Secret>,
    /// …or from this environment variable…
    pub token_env: Option<String>,
    /// …or from this file.
    pub token_file: Option<std::path::PathBuf>,
    /// Check that the body is JSON before sending (default: when `content_type` is JSON).
    pub validate_json: Option<bool>,
    /// Name of the idempotency header, empty to send none. Default `Idempotency-Key`.
    #[serde(default = "default_idempotency_header")]
    pub idempotency_header: String,
    /// Store the response body as an inbox reply. Default true.
    #[serde(default = "default_true")]
    pub store_reply: bool,
    /// Bytes of the response body kept (reply and error text). Default 65536.
    #[serde(default = "default_max_response")]
    pub max_response_bytes: usize,
    /// Request timeout (common key). Default 30s.
    pub timeout: Option<Dur>,
    /// OAuth2 client-credentials token for `Authorization` (instead of `token`). Default none.
    pub oauth2: Option<Box<oauth::OAuth2Config>>,
    /// Standard Webhooks signing secret (`whsec_<base64>`): inline…
    pub signing_secret: Option<Secret>,
    /// …or from this environment variable…
    pub signing_secret_env: Option<String>,
    /// …or from this file. Default: requests are not signed.
    pub signing_secret_file: Option<std::path::PathBuf>,
    /// Use an `address` that is an absolute http(s) URL as the whole URL (instead of refusing the
    /// message with `host-denied`). Default false.
    #[serde(default)]
    pub allow_absolute_address: bool,
    /// Admit hosts other than the profile's own that resolve to private, loopback, link-local or
    /// other non-public addresses. Default false.
    #[serde(default)]
    pub allow_private: bool,
    /// When set, the only hosts besides the profile's own that requests may reach: names,
    /// `*.suffix` wildcards, IP addresses, CIDRs. Default empty (any public host).
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Hosts besides the profile's own (`host` for any port, or `host:port`) that receive the
    /// profile's credentials — `Authorization` (token or OAuth2), the signature headers and
    /// `headers` — on an absolute `address` or a redirect. Elsewhere a request goes without them
    /// and a redirect that would carry them is refused (`redirect-denied`). Default empty.
    #[serde(default)]
    pub credential_hosts: Vec<String>,
    /// The path and query of `url` are a credential (a Slack or Teams webhook path): they are
    /// replaced by `***` in every error text and log line. A password in `url`, Telegram's
    /// `/bot<token>/` and credential query parameters (`access_token`, `key`, `token`,
    /// `signature`…) are redacted anyway. Default false.
    #[serde(default)]
    pub url_secret: bool,
}

fn default_method() -> String {
    "POST".into()
}
fn default_content_type() -> String {
    "application/json".into()
}
fn default_auth_scheme() -> String {
    "Bearer".into()
}
fn default_idempotency_header() -> String {
    "Idempotency-Key".into()
}
fn default_true() -> bool {
    true
}
fn default_max_response() -> usize {
    65536
}

pub struct HttpConnector {
    name: String,
    client: reqwest::Client,
    base: String,
    base_url: url::Url,
    policy: Arc<Policy>,
    allow_absolute_address: bool,
    /// The OAuth2 token cache and the scheme it goes out with.
    oauth: Option<(Arc<TokenCache>, String)>,
    signer: Option<Signer>,
    method: Method,
    /// `Content-Type`: sent with every request that has a body.
    content_type: HeaderValue,
    /// The profile's `headers` and static `Authorization`: credentials, sent only to
    /// [`Self::credential_origins`].
    headers: HeaderMap,
    /// Origins that receive the credentials: the profile's own and `credential_hosts`.
    credential_origins: Arc<CredentialOrigins>,
    idempotency_header: Option<HeaderName>,
    validate_json: bool,
    store_reply: bool,
    max_response_bytes: usize,
    redactor: Redactor,
    /// Where the recent addresses lead (see [`Target`]), at most [`TARGETS`] of them.
    targets: Mutex<HashMap<String, Target>>,
}

/// What an address resolves to: the checked URL and whether it may have the credentials. Both
/// depend only on the address and the profile, and most messages of a profile go to a handful of
/// addresses; parsing (IDNA included) and the origin check were a tenth of the daemon's
/// instructions per message, so they are kept instead of redone for every message.
#[derive(Clone)]
struct Target {
    url: url::Url,
    credentials: bool,
}

/// Addresses remembered per profile; past that the memory starts over (a profile that sends
/// everywhere just parses every time, as before).
const TARGETS: usize = 256;

/// The origins an `http` profile's credentials may go to.
#[derive(Debug, Default)]
struct CredentialOrigins {
    /// `scheme://host:port` of the profile's URL.
    own: String,
    /// `credential_hosts`: (host, port or any).
    extra: Vec<(String, Option<u16>)>,
    /// Whether the profile has credentials at all; without, redirects follow the allowlist only.
    any: bool,
}

impl CredentialOrigins {
    fn admits(&self, u: &url::Url) -> bool {
        if redact::origin(u) == self.own {
            return true;
        }
        // A profile on https never sends its credentials in clear, not even to credential_hosts.
        if self.own.starts_with("https:") && u.scheme() != "https" {
            return false;
        }
        let host = u.host_str().unwrap_or("").to_ascii_lowercase();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        self.extra
            .iter()
            .any(|(h, p)| h == host && p.map_or(true, |p| Some(p) == u.port_or_known_default()))
    }

    /// Whether a redirect from the request's first URL to `next` may be followed: a request that
    /// carried credentials is only redirected to an origin that may have them, never from https
    /// to http.
    fn check_redirect(
        &self,
        first: &url::Url,
        next: &url::Url,
    ) -> Result<(), redact::RedirectRefused> {
        if !self.any || !self.admits(first) {
            return Ok(());
        }
        let downgrade = first.scheme() == "https" && next.scheme() != "https";
        if self.admits(next) && !downgrade {
            Ok(())
        } else {
            Err(redact::RedirectRefused {
                to: redact::origin(next),
                from: redact::origin(first),
            })
        }
    }
}

/// `credential_hosts` entries: `host` or `host:port` (IPv6 in brackets).
fn parse_credential_hosts(list: &[String]) -> Result<Vec<(String, Option<u16>)>, String> {
    list.iter()
        .map(|raw| {
            let s = raw.trim().to_ascii_lowercase();
            let parsed = url::Url::parse(&format!("http://{s}/"))
                .ok()
                .filter(|u| u.path() == "/" && u.username().is_empty() && u.query().is_none());
            let u = parsed.ok_or_else(|| format!("\"{raw}\" is not a host or host:port"))?;
            let host = u.host_str().unwrap_or("");
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let explicit_port = s
                .rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
                && !(s.starts_with('[') && s.ends_with(']'));
            Ok((
                host,
                if explicit_port {
                    u.port_or_known_default()
                } else {
                    None
                },
            ))
        })
        .collect()
}

/// Whether a header of `headers` carries a credential (`Authorization`, `X-Api-Key`, `Cookie`…):
/// marked sensitive and scrubbed from texts.
fn is_secret_header(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.contains("cookie") || crate::settings::is_credential_param(&n)
}

impl HttpConnector {
    pub fn new(ctx: &ProfileContext, cfg: &HttpConfig) -> Result<Self, ConfigError> {
        let profile = ctx.profile.as_str();
        let err = |key: &str, msg: String| ctx.error(key, msg);
        let base_url =
            url::Url::parse(&cfg.url).map_err(|e| err("url", format!("invalid URL: {e}")))?;
        if !matches!(base_url.scheme(), "http" | "https") || base_url.host().is_none() {
            return Err(err(
                "url",
                "must be an http or https URL with a host".into(),
            ));
        }
        let method = Method::from_bytes(cfg.method.to_uppercase().as_bytes())
            .map_err(|_| err("method", format!("invalid method \"{}\"", cfg.method)))?;
        let mut redactor = Redactor::new();
        redactor.add_url(&base_url, cfg.url_secret);
        let mut headers = HeaderMap::new();
        for (k, v) in &cfg.headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| err("headers", format!("invalid header name \"{k}\"")))?;
            let mut value = HeaderValue::from_str(v)
                .map_err(|_| err("headers", format!("invalid value for header \"{k}\"")))?;
            if is_secret_header(k) {
                value.set_sensitive(true);
                redactor.add(v);
            }
            headers.insert(name, value);
        }
        let content_type = HeaderValue::from_str(&cfg.content_type)
            .map_err(|_| err("content_type", "invalid content type".into()))?;
        let token = SecretSource::of(&cfg.token, &cfg.token_env, &cfg.token_file)
            .resolve("token")
            .map_err(|m| err("token", m))?;
        if token.is_some() && cfg.oauth2.is_some() {
            return Err(err(
                "oauth2",
                "set either a static token (token, token_env, token_file) or oauth2, not both"
                    .into(),
            ));
        }
        if let Some(t) = &token {
            redactor.add(t.expose());
            let mut v = HeaderValue::from_str(&format!("{} {}", cfg.auth_scheme, t.expose()))
                .map_err(|_| err("token", "token is not a valid header value".into()))?;
            v.set_sensitive(true);
            headers.insert(AUTHORIZATION, v);
        }
        let idempotency_header = if cfg.idempotency_header.is_empty() {
            None
        } else {
            Some(
                HeaderName::from_bytes(cfg.idempotency_header.as_bytes())
                    .map_err(|_| err("idempotency_header", "invalid header name".into()))?,
            )
        };
        let timeout = cfg.timeout.map_or(Duration::from_secs(30), |d| d.0);
        let policy = Arc::new(
            Policy::new(&base_url, cfg.allow_private, &cfg.allowed_hosts)
                .map_err(|m| err("allowed_hosts", m))?,
        );
        let credential_origins = Arc::new(CredentialOrigins {
            own: redact::origin(&base_url),
            extra: parse_credential_hosts(&cfg.credential_hosts)
                .map_err(|m| err("credential_hosts", m))?,
            any: token.is_some()
                || cfg.oauth2.is_some()
                || cfg.signing_secret.is_some()
                || cfg.signing_secret_env.is_some()
                || cfg.signing_secret_file.is_some()
                || !cfg.headers.is_empty(),
        });
        let redirect_policy = policy.clone();
        let redirect_origins = credential_origins.clone();
        let client = crate::connector::provider::http_client_builder(timeout)
            // Names are checked where they are resolved for the connection (no rebinding window)…
            .dns_resolver(Arc::new(allow::Guard(policy.clone())))
            // …and IP-literal redirect targets, which never reach the resolver, here; credentials
            // never follow a redirect to an origin that may not have them.
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                let first = attempt.previous().first().cloned();
                if attempt.previous().len() >= 10 {
                    attempt.error("too many redirects")
                } else if let Err(denied) = redirect_policy.check_url(attempt.url()) {
                    attempt.error(denied)
                } else if let Some(Err(refused)) =
                    first.map(|f| redirect_origins.check_redirect(&f, attempt.url()))
                {
                    attempt.error(refused)
                } else {
                    attempt.follow()
                }
            }))
            .build()
            .map_err(|e| err("url", format!("cannot build the HTTP client: {e}")))?;
        let oauth = match &cfg.oauth2 {
            Some(o) => Some((
                oauth::cache_for(o, timeout, &mut redactor).map_err(|m| err("oauth2", m))?,
                cfg.auth_scheme.clone(),
            )),
            None => None,
        };
        let signing_secret = SecretSource::of(
            &cfg.signing_secret,
            &cfg.signing_secret_env,
            &cfg.signing_secret_file,
        )
        .resolve("signing_secret")
        .map_err(|m| err("signing_secret", m))?;
        if let Some(s) = &signing_secret {
            redactor.add(s.expose());
        }
        let signer = signing_secret
            .map(|s| Signer::new(&s))
            .transpose()
            .map_err(|m| err("signing_secret", m))?;
        Ok(HttpConnector {
            name: format!("http/{profile}"),
            client,
            base: cfg.url.trim_end_matches('/').to_string(),
            base_url,
            policy,
            allow_absolute_address: cfg.allow_absolute_address,
            oauth,
            signer,
            method,
            content_type,
            headers,
            credential_origins,
            idempotency_header,
            validate_json: cfg
                .validate_json
                .unwrap_or_else(|| cfg.content_type.to_ascii_lowercase().contains("json")),
            store_reply: cfg.store_reply,
            max_response_bytes: cfg.max_response_bytes,
            redactor,
            targets: Mutex::new(HashMap::new()),
        })
    }

    /// The message's [`Target`]: remembered, or found by [`Self::url_for`] (errors are not
    /// remembered).
    fn target_for(&self, msg: &OutboxMessage) -> Result<Target, DeliveryError> {
        let address = msg.address.as_deref().map(str::trim).unwrap_or("");
        if let Some(t) = self.targets.lock().unwrap().get(address) {
            return Ok(t.clone());
        }
        let url = self.url_for(msg)?;
        let target = Target {
            credentials: self.credential_origins.admits(&url),
            url,
        };
        let mut targets = self.targets.lock().unwrap();
        if targets.len() >= TARGETS {
            targets.clear();
        }
        targets.insert(address.to_string(), target.clone());
        Ok(target)
    }

    /// Base URL + `address` (Apostol: `uri + address`), or the address itself when it is an
    /// absolute URL and the profile allows that; checked against the allowlist.
    fn url_for(&self, msg: &OutboxMessage) -> Result<url::Url, DeliveryError> {
        let address = msg.address.as_deref().map(str::trim).unwrap_or("");
        let scheme = address
            .split_once("://")
            .map(|(s, _)| s.to_ascii_lowercase());
        let absolute = matches!(scheme.as_deref(), Some("http" | "https"));
        let text = if absolute {
            if !self.allow_absolute_address {
                return Err(DeliveryError::permanent(
                    codes::HOST_DENIED.code,
                    "the address is an absolute URL and the profile does not set allow_absolute_address",
                ));
            }
            address.to_string()
        } else if address.is_empty() {
            self.base.clone()
        } else if address.starts_with('/') {
            format!("{}{address}", self.base)
        } else {
            format!("{}/{address}", self.base)
        };
        let url = url::Url::parse(&text).map_err(|e| {
            DeliveryError::permanent(
                codes::BAD_ADDRESS.code,
                format!("not a valid URL ({e}): {text}"),
            )
        })?;
        // A path cannot move the request to another host; if the URL parser disagrees, refuse.
        if !absolute
            && (url.host() != self.base_url.host() || url.scheme() != self.base_url.scheme())
        {
            return Err(DeliveryError::permanent(
                codes::HOST_DENIED.code,
                format!("the address changes the host of the profile's URL: {address}"),
            ));
        }
        self.policy.check_url(&url).map_err(denied)?;
        Ok(url)
    }

    fn method_for(&self, msg: &OutboxMessage) -> Method {
        match msg.subject.as_deref() {
            Some(s @ ("GET" | "POST" | "PUT" | "PATCH" | "DELETE")) => {
                Method::from_bytes(s.as_bytes()).expect("known method")
            }
            _ => self.method.clone(),
        }
    }
}

#[async_trait]
impl Connector for HttpConnector {
    fn name(&self) -> &str {
        &self.name
    }

    async fn deliver(&self, msg: &OutboxMessage) -> Result<Receipt, DeliveryError> {
        // Whatever a provider echoes, and whatever URL an error names, no secret leaves.
        let r = self.redactor.result(self.deliver_inner(msg).await);
        match &self.oauth {
            Some((cache, _)) => cache.redact(r),
            None => r,
        }
    }
}

impl HttpConnector {
    async fn deliver_inner(&self, msg: &OutboxMessage) -> Result<Receipt, DeliveryError> {
        let Target { url, credentials } = self.target_for(msg)?;
        let method = self.method_for(msg);
        let body = msg.content.as_deref().unwrap_or("");
        // A GET, HEAD, DELETE or OPTIONS with no content is a request without a body (RFC 9110
        // §9.3): nothing to validate, no Content-Type.
        let bodiless = body.is_empty()
            && matches!(
                method,
                Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS
            );
        if self.validate_json && !bodiless {
            if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(body) {
                return Err(DeliveryError::permanent(
                    codes::BAD_CONTENT.code,
                    format!("content is not valid JSON: {e}"),
                ));
            }
        }
        // Credentials go to the profile's own origin and to `credential_hosts` only
        // (`credentials`, from the target).
        let mut headers = if credentials {
            self.headers.clone()
        } else {
            HeaderMap::new()
        };
        if !bodiless {
            headers.insert(CONTENT_TYPE, self.content_type.clone());
        }
        let code = HeaderValue::from_str(&msg.code).map_err(|_| {
            DeliveryError::permanent(
                codes::BAD_CODE.code,
                "the message code is not a valid header value",
            )
        })?;
        if let Some(h) = &self.idempotency_header {
            // draft-ietf-httpapi-idempotency-key-header: the value is a Structured-Field string.
            let v = HeaderValue::from_str(&format!("\"{}\"", msg.code)).map_err(|_| {
                DeliveryError::permanent(
                    codes::BAD_CODE.code,
                    "the message code is not a valid header value",
                )
            })?;
            headers.insert(h.clone(), v);
        }
        if let Some(signer) = self.signer.as_ref().filter(|_| credentials) {
            for (name, value) in signer.headers(&msg.code, body.as_bytes()) {
                let v = if name == "webhook-id" {
                    code.clone()
                } else {
                    HeaderValue::from_str(&value).expect("ASCII")
                };
                headers.insert(name, v);
            }
        }
        // One copy of the content, shared by a resend (a 401 with OAuth2).
        let body = (!bodiless).then(|| bytes::Bytes::copy_from_slice(body.as_bytes()));
        let oauth = self.oauth.as_ref().filter(|_| credentials);
        let send = |headers: HeaderMap| async {
            let resp = self.send(&method, &url, headers, &body).await?;
            read_response(resp, self.max_response_bytes).await
        };
        let (status, resp_headers, text) = match oauth {
            None => send(headers).await?,
            // RFC 6750 §3.1: a 401 means the token expired or was revoked: refresh once (one
            // fetch for all the requests that saw this token) and resend.
            Some((cache, scheme)) => {
                let rejected = |(status, _, text): &(StatusCode, HeaderMap, String)| {
                    (*status == StatusCode::UNAUTHORIZED).then(|| {
                        DeliveryError::retry(
                            codes::TOKEN_INVALID.code,
                            format!("HTTP 401 with a fresh token: {}", truncate(text, 256)),
                        )
                        .with_status(401)
                    })
                };
                call_with_token(cache, &self.name, rejected, |token| {
                    let headers = with_token(&headers, scheme, &token);
                    async move { send(headers?).await }
                })
                .await?
            }
        };
        if !status.is_success() {
            return Err(classify_status(status, &text, &resp_headers));
        }
        let provider_id = (!text.is_empty())
            .then(|| serde_json::from_str::<serde_json::Value>(&text).ok())
            .flatten()
            .and_then(|v| {
                ["id", "message_id", "messageId", "name"]
                    .iter()
                    .find_map(|k| v.get(k).map(json_scalar))
            });
        Ok(Receipt {
            provider_id: provider_id.map(|p| truncate(&p, 256).to_string()),
            remote_status: Some(status.as_u16() as i32),
            reply: (self.store_reply && !text.is_empty()).then_some(text),
        })
    }
}

impl HttpConnector {
    async fn send(
        &self,
        method: &Method,
        url: &url::Url,
        headers: HeaderMap,
        body: &Option<bytes::Bytes>,
    ) -> Result<reqwest::Response, DeliveryError> {
        let mut req = self
            .client
            .request(method.clone(), url.clone())
            .headers(headers);
        if let Some(b) = body {
            req = req.body(b.clone());
        }
        req.send().await.map_err(|e| classify_send(&e))
    }
}

/// `headers` with `Authorization: <scheme> <token>` (marked sensitive: never printed).
fn with_token(
    headers: &HeaderMap,
    scheme: &str,
    token: &Secret,
) -> Result<HeaderMap, DeliveryError> {
    let mut v = HeaderValue::from_str(&format!("{scheme} {}", token.expose())).map_err(|_| {
        DeliveryError::retry(
            codes::TOKEN_INVALID.code,
            "the token is not a valid header value",
        )
    })?;
    v.set_sensitive(true);
    let mut h = headers.clone();
    h.insert(AUTHORIZATION, v);
    Ok(h)
}

/// A failed send: refused by the allowlist (resolver or redirect policy) or a transport error.
fn classify_send(e: &reqwest::Error) -> DeliveryError {
    match allow::is_denied(e) {
        Some(d) => denied(d.clone()),
        None => redact::send_error(e),
    }
}

fn denied(d: allow::HostDenied) -> DeliveryError {
    DeliveryError::permanent(codes::HOST_DENIED.code, d.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(text: &str) -> Result<HttpConnector, ConfigError> {
        let cfg: HttpConfig = toml::from_str(text).expect("parses");
        HttpConnector::new(&ProfileContext::new("http.conf", "p"), &cfg)
    }

    #[test]
    fn the_example_conf_and_its_commented_oauth2_section_build() {
        let text = include_str!("../../../conf/http.conf");
        let profiles = crate::config::parse_profiles("http", text, "conf/http.conf").unwrap();
        for (name, p) in &profiles {
            p.connector
                .build(&ProfileContext::new("conf/http.conf", name.clone()))
                .unwrap();
        }
        let oauth: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("# [default.oauth2]"))
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.starts_with('[') || l.contains(" = "))
            .collect();
        assert!(oauth.len() >= 8, "{oauth:?}");
        std::env::set_var("OUTBOXD_HTTP_CLIENT_SECRET", "example");
        let text = format!("{text}\n{}\n", oauth.join("\n"));
        let profiles = crate::config::parse_profiles("http", &text, "conf/http.conf").unwrap();
        match &profiles[0].1.connector {
            crate::connector::ConnectorConfig::Http(c) => {
                let o = c.oauth2.as_ref().expect("the oauth2 section");
                assert_eq!(o.client_auth, oauth::ClientAuth::Basic);
                assert_eq!(o.refresh_every.unwrap().0, Duration::from_secs(55 * 60));
            }
            other => panic!("{other:?}"),
        }
        profiles[0]
            .1
            .connector
            .build(&ProfileContext::new("conf/http.conf", "default"))
            .unwrap();
    }

    #[test]
    fn conflicting_or_malformed_hardening_keys_are_config_errors() {
        let base = "url = \"http://127.0.0.1:1/\"\n";
        let oauth = "[oauth2]\ntoken_url = \"http://127.0.0.1:2/t\"\nclient_id = \"c\"\n";
        let e = build(&format!(
            "{base}token = \"t\"\n{oauth}client_secret = \"s\"\n"
        ))
        .err()
        .unwrap();
        assert_eq!(e.key.as_deref(), Some("p.oauth2"));
        let e = build(&format!("{base}{oauth}")).err().unwrap();
        assert!(e.message.contains("client_secret"), "{e}");
        let e = build(&format!("{base}allowed_hosts = [\"10.0.0.0/99\"]\n"))
            .err()
            .unwrap();
        assert_eq!(e.key.as_deref(), Some("p.allowed_hosts"));
        let e = build(&format!("{base}signing_secret = \"whsec_%%%\"\n"))
            .err()
            .unwrap();
        assert_eq!(e.key.as_deref(), Some("p.signing_secret"));
        assert!(
            !e.to_string().contains("%%%"),
            "the secret is not echoed: {e}"
        );
        let e = build("url = \"file:///etc/passwd\"\n").err().unwrap();
        assert_eq!(e.key.as_deref(), Some("p.url"));
    }

    #[test]
    fn urls_are_base_plus_address_and_absolute_only_when_allowed() {
        let msg = |address: &str| OutboxMessage {
            id: uuid::Uuid::nil(),
            code: "c".into(),
            agent_type: "api.agent".into(),
            agent: "http.agent".into(),
            profile: "p".into(),
            address: Some(address.into()),
            subject: None,
            content: None,
            label: None,
            attempt: 1,
            max_attempts: None,
            priority: 0,
            created: chrono::Utc::now(),
            images: Vec::new(),
        };
        let c = build("url = \"https://api.example.com/v1/\"\n").unwrap();
        let url = |a: &str| c.url_for(&msg(a)).map(|u| u.to_string());
        assert_eq!(url("").unwrap(), "https://api.example.com/v1");
        assert_eq!(url("/send").unwrap(), "https://api.example.com/v1/send");
        assert_eq!(
            url("send?x=1").unwrap(),
            "https://api.example.com/v1/send?x=1"
        );
        assert_eq!(
            url("//evil.example/x").unwrap(),
            "https://api.example.com/v1//evil.example/x"
        );
        assert_eq!(
            url("@evil.example").unwrap(),
            "https://api.example.com/v1/@evil.example"
        );
        assert_eq!(
            url("https://evil.example/").unwrap_err().code(),
            "host-denied"
        );
        assert_eq!(
            url("HTTP://evil.example/").unwrap_err().code(),
            "host-denied"
        );
        let c =
            build("url = \"https://api.example.com\"\nallow_absolute_address = true\n").unwrap();
        let url = |a: &str| c.url_for(&msg(a)).map(|u| u.to_string());
        assert_eq!(
            url("https://other.example/x").unwrap(),
            "https://other.example/x"
        );
        assert_eq!(
            url("http://169.254.169.254/latest").unwrap_err().code(),
            "host-denied"
        );
        assert_eq!(url("http://[fd00::1]/").unwrap_err().code(), "host-denied");
    }

    #[test]
    fn credentials_go_to_the_own_origin_and_credential_hosts_only() {
        let c = build(
            "url = \"https://api.example.com/v1\"\ntoken = \"t0ken\"\n\
             credential_hosts = [\"files.example.com\", \"10.0.0.5:8443\", \"[::1]\"]\n",
        )
        .unwrap();
        let o = &c.credential_origins;
        let u = |s: &str| url::Url::parse(s).unwrap();
        assert!(o.any);
        for yes in [
            "https://api.example.com/x",
            "https://api.example.com:443/x",
            "https://files.example.com:9000/x",
            "https://10.0.0.5:8443/",
            "https://[::1]:1/",
        ] {
            assert!(o.admits(&u(yes)), "{yes}");
        }
        for no in [
            "http://api.example.com/x",
            "https://api.example.com:8443/x",
            "https://other.example.com/",
            "http://files.example.com/",
            "https://10.0.0.5/",
        ] {
            assert!(!o.admits(&u(no)), "{no}");
        }
        let first = u("https://api.example.com/a");
        assert!(o
            .check_redirect(&first, &u("https://api.example.com/b"))
            .is_ok());
        assert!(o
            .check_redirect(&first, &u("https://files.example.com/b"))
            .is_ok());
        assert!(o
            .check_redirect(&first, &u("https://evil.example/b"))
            .is_err());
        assert!(o
            .check_redirect(&first, &u("http://api.example.com/b"))
            .is_err());
        // A request that carried no credentials is redirected as the allowlist says.
        assert!(o
            .check_redirect(&u("https://other.example/"), &u("https://evil.example/"))
            .is_ok());
        let e = build("url = \"https://a.example\"\ncredential_hosts = [\"a.example/x\"]\n")
            .err()
            .unwrap();
        assert_eq!(e.key.as_deref(), Some("p.credential_hosts"));
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
