//! The `sba` connector: Sberbank internet acquiring (Apostol's `api.agent`/`sba.agent`).
//!
//! As in Apostol v1, `address` is the REST path (default `/payment/rest/register.do`; a bare method
//! name such as `registerPreAuth.do` is taken under `/payment/rest/`) and `content` the request
//! parameters, either URL-encoded (`amount=10000&returnUrl=…`, what Apostol produces) or a JSON
//! object of the same parameters (nested JSON values such as `jsonParams` or `orderBundle` are sent
//! as JSON strings). The profile adds the credentials (`userName` + `password`, or `token`; any in
//! the content are replaced) and the request goes out as a form-encoded POST. Whatever the
//! operation, a success is stored as the reply (an inbox message whose parent is the outbox
//! message) and its `orderId` as the provider id.
//!
//! For the register operations (`register.do`, `registerPreAuth.do`) the connector also fills in
//! what Sberbank requires: `orderNumber` (unless the content has one) from the message code — at
//! most 32 characters, see [`order_number`] — checks that `amount` is in kopecks (digits only), and
//! takes `returnUrl`/`failUrl` from the profile unless the content gives them.
//!
//! The address cannot pick any REST method with the merchant's credentials (`refund.do`,
//! `reverse.do`…): only the methods the profile lists in `methods` are called (default
//! `register.do` and `getOrderStatusExtended.do`); any other fails with `method-denied` before a
//! request is made. The status call of the register recovery is the connector's own and always
//! made. Credentials never follow a redirect to another origin.
//!
//! Classification: HTTP statuses and network errors follow the http connector. Sberbank reports
//! errors in a 200 body: `errorCode` (a string; `ErrorCode` and `error.code` are accepted too),
//! absent or `"0"` = success. `7` (system error) retries; every other code is permanent as
//! `sba-<code>`. Code `1` on a register (order number already used) is not taken at its word: the
//! order is looked up with `getOrderStatusExtended.do?orderNumber=…` and, if it exists with the same
//! amount, the message is done with that order's id. That makes a retry after a crash or a lost
//! response idempotent.

use crate::connector::codes;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::Value;

use super::provider::{classify_status, json_scalar, kebab, read_response, truncate};
use super::redact::{self, Redactor};
use super::{Connector, DeliveryError, OutboxMessage, Receipt};
use crate::settings::{ConfigError, Dur, ProfileContext, Secret, SecretSource};

/// Sberbank's production host.
pub const PRODUCTION_URL: &str = "https://securepayments.sberbank.ru";
/// Sberbank's test host (`test = true`).
pub const TEST_URL: &str = "https://3dsec.sberbank.ru";
/// The path used when a message has no address.
pub const DEFAULT_PATH: &str = "/payment/rest/register.do";
/// The longest `orderNumber` Sberbank accepts (ANS..32).
pub const MAX_ORDER_NUMBER: usize = 32;
/// The methods a profile may call when it lists none: a register and the status call that makes
/// re-registration idempotent.
pub const DEFAULT_METHODS: &[&str] = &["register.do", "getOrderStatusExtended.do"];

/// An `sba` profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SbaConfig {
    /// Use the test host `https://3dsec.sberbank.ru` instead of `https://securepayments.sberbank.ru`.
    /// Default false.
    #[serde(default)]
    pub test: bool,
    /// Base URL, overriding the host `test` selects; the message's path is appended.
    pub base_url: Option<String>,
    /// Merchant API login (`userName`); needs a password.
    pub user_name: Option<String>,
    /// Merchant API password: inline…
    pub password: Option<Secret>,
    /// …or from this environment variable…
    pub password_env: Option<String>,
    /// …or from this file.
    pub password_file: Option<std::path::PathBuf>,
    /// Merchant token, instead of user_name/password: inline…
    pub token: Option<Secret>,
    /// …or from this environment variable…
    pub token_env: Option<String>,
    /// …or from this file.
    pub token_file: Option<std::path::PathBuf>,
    /// `returnUrl` of register requests whose content has none (absolute URL).
    pub return_url: Option<String>,
    /// `failUrl` of register requests whose content has none (absolute URL). Optional.
    pub fail_url: Option<String>,
    /// REST methods (the last segment of the address, e.g. `registerPreAuth.do`) that messages
    /// may call with the profile's credentials; others fail with `method-denied`, unsent.
    /// Default `["register.do", "getOrderStatusExtended.do"]`.
    #[serde(default = "default_methods")]
    pub methods: Vec<String>,
    /// Bytes of the response body read. Default 65536.
    #[serde(default = "default_max_response")]
    pub max_response_bytes: usize,
    /// Request timeout (common key). Default 30s.
    pub timeout: Option<Dur>,
}

fn default_max_response() -> usize {
    65536
}
fn default_methods() -> Vec<String> {
    DEFAULT_METHODS.iter().map(|m| m.to_string()).collect()
}

pub struct SbaConnector {
    name: String,
    client: reqwest::Client,
    base: String,
    /// `userName`/`password` or `token`, sent first in every request.
    credentials: Vec<(&'static str, Secret)>,
    return_url: Option<String>,
    fail_url: Option<String>,
    /// `methods`, lower case.
    methods: Vec<String>,
    max_response_bytes: usize,
    redactor: Redactor,
}

impl SbaConnector {
    pub fn new(ctx: &ProfileContext, cfg: &SbaConfig) -> Result<Self, ConfigError> {
        let profile = ctx.profile.as_str();
        let err = |key: &str, msg: String| ctx.error(key, msg);
        let base = cfg
            .base_url
            .clone()
            .unwrap_or_else(|| if cfg.test { TEST_URL } else { PRODUCTION_URL }.to_string());
        let parsed =
            url::Url::parse(&base).map_err(|e| err("base_url", format!("invalid URL: {e}")))?;
        let mut redactor = Redactor::new();
        redactor.add_url(&parsed, false);
        let password = SecretSource::of(&cfg.password, &cfg.password_env, &cfg.password_file)
            .resolve("password")
            .map_err(|m| err("password", m))?;
        let token = SecretSource::of(&cfg.token, &cfg.token_env, &cfg.token_file)
            .resolve("token")
            .map_err(|m| err("token", m))?;
        for s in [&password, &token].into_iter().flatten() {
            redactor.add(s.expose());
        }
        let credentials = match (&cfg.user_name, password, token) {
            (Some(u), Some(p), None) => vec![("userName", Secret::new(u.clone())), ("password", p)],
            (None, None, Some(t)) => vec![("token", t)],
            _ => {
                return Err(err(
                    "user_name",
                    "set either user_name + password (password / password_env / password_file) \
                     or a token"
                        .into(),
                ))
            }
        };
        for (key, u) in [("return_url", &cfg.return_url), ("fail_url", &cfg.fail_url)] {
            if let Some(u) = u {
                check_absolute(u).map_err(|m| err(key, m))?;
            }
        }
        let mut methods = Vec::new();
        for m in &cfg.methods {
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.') {
                return Err(err(
                    "methods",
                    format!(
                        "\"{}\" is not a method name such as register.do",
                        truncate(m, 64)
                    ),
                ));
            }
            methods.push(m.to_ascii_lowercase());
        }
        let timeout = cfg.timeout.map_or(Duration::from_secs(30), |d| d.0);
        // The form carries the merchant's password: never to another origin (a 307/308 would
        // resend it).
        let client = crate::connector::provider::http_client_builder(timeout)
            .redirect(redact::same_origin_redirects())
            .build()
            .map_err(|e| err("base_url", format!("cannot build the HTTP client: {e}")))?;
        Ok(SbaConnector {
            name: format!("sba/{profile}"),
            client,
            base: base.trim_end_matches('/').to_string(),
            credentials,
            return_url: cfg.return_url.clone(),
            fail_url: cfg.fail_url.clone(),
            methods,
            max_response_bytes: cfg.max_response_bytes,
            redactor,
        })
    }

    /// POSTs `params` (after the credentials) as a form; returns the JSON answer.
    async fn call(
        &self,
        path: &str,
        params: &[(String, String)],
    ) -> Result<(StatusCode, String, Value), DeliveryError> {
        // The serializer is not Send: build the body before the first await.
        let body = {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            for (k, v) in &self.credentials {
                form.append_pair(k, v.expose());
            }
            for (k, v) in params {
                form.append_pair(k, v);
            }
            form.finish()
        };
        let resp = self
            .client
            .post(format!("{}{path}", self.base))
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body)
            .send()
            .await
            .map_err(|e| redact::send_error(&e))?;
        let (status, headers, text) = read_response(resp, self.max_response_bytes).await?;
        if !status.is_success() {
            return Err(classify_status(status, &text, &headers));
        }
        // A 200 that is not JSON comes from something in between (a maintenance page): retrying is
        // safe, since a register that did go through is recognised by its order number.
        let value = serde_json::from_str::<Value>(&text)
            .ok()
            .filter(Value::is_object)
            .ok_or_else(|| {
                DeliveryError::retry(
                    codes::SBA_BAD_RESPONSE.code,
                    format!(
                        "HTTP 200 with a body that is not a JSON object: {}",
                        truncate(&text, 256)
                    ),
                )
                .with_status(status.as_u16() as i32)
            })?;
        Ok((status, text, value))
    }

    /// Code 1 on a register: the order number exists. If the order is ours (same amount), the
    /// earlier attempt went through and this one is done with its id.
    async fn recover(
        &self,
        path: &str,
        order_number: &str,
        amount: &str,
        register_error: &str,
    ) -> Result<Receipt, DeliveryError> {
        let status_path = sibling_path(path, "getOrderStatusExtended.do");
        let params = [("orderNumber".to_string(), order_number.to_string())];
        let (status, _, v) = self.call(&status_path, &params).await?;
        let used = |why: String| {
            DeliveryError::permanent("sba-1", format!("register: {register_error}; {why}"))
                .with_status(status.as_u16() as i32)
        };
        if let Some((code, message)) = sber_error(&v) {
            return Err(if code == "7" {
                DeliveryError::retry("sba-7", format!("getOrderStatusExtended: {message}"))
                    .with_status(status.as_u16() as i32)
            } else {
                used(format!("getOrderStatusExtended says {code}: {message}"))
            });
        }
        // The order id is `orderId` in some versions, the `mdOrder` attribute in the documented one.
        let order_id = v
            .get("orderId")
            .and_then(Value::as_str)
            .or_else(|| {
                v.get("attributes")?
                    .as_array()?
                    .iter()
                    .find(|a| a.get("name").and_then(Value::as_str) == Some("mdOrder"))?
                    .get("value")?
                    .as_str()
            })
            .filter(|s| !s.is_empty())
            .ok_or_else(|| used("the existing order has no id in getOrderStatusExtended".into()))?
            .to_string();
        if let Some(existing) = v.get("amount").map(json_scalar) {
            if existing != amount {
                return Err(used(format!(
                    "order number {order_number} belongs to an order of {existing}, not {amount}"
                )));
            }
        }
        tracing::info!(
            order_number,
            order_id,
            "sba: order already registered; taking it as this message's"
        );
        let reply = serde_json::json!({
            "orderId": order_id,
            "orderNumber": order_number,
            "recovered": true,
            "orderStatus": v,
        });
        Ok(Receipt {
            provider_id: Some(order_id),
            remote_status: Some(status.as_u16() as i32),
            reply: Some(reply.to_string()),
        })
    }

    /// Fills in and checks the parameters of a register operation; returns (orderNumber, amount).
    fn prepare_register(
        &self,
        msg: &OutboxMessage,
        params: &mut Vec<(String, String)>,
    ) -> Result<(String, String), DeliveryError> {
        let bad = |m: String| DeliveryError::permanent(codes::BAD_CONTENT.code, m);
        let get = |params: &[(String, String)], k: &str| {
            params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        };
        let order_number = match get(params, "orderNumber") {
            Some(n) if n.is_empty() || n.chars().count() > MAX_ORDER_NUMBER => {
                return Err(bad(format!(
                    "orderNumber \"{}\" must have 1 to {MAX_ORDER_NUMBER} characters",
                    truncate(&n, 64)
                )))
            }
            Some(n) => n,
            None => {
                let n = order_number(&msg.code);
                params.push(("orderNumber".into(), n.clone()));
                n
            }
        };
        let amount = get(params, "amount").ok_or_else(|| bad("amount is missing".into()))?;
        if amount.is_empty() || amount.len() > 12 || !amount.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(format!(
                "amount \"{}\" must be 1 to 12 digits, in kopecks",
                truncate(&amount, 64)
            )));
        }
        for (key, default) in [("returnUrl", &self.return_url), ("failUrl", &self.fail_url)] {
            match get(params, key) {
                Some(u) => check_absolute(&u).map_err(|m| bad(format!("{key}: {m}")))?,
                None => match default {
                    Some(u) => params.push((key.into(), u.clone())),
                    None if key == "returnUrl" => {
                        return Err(bad(
                            "returnUrl is missing (give it in the content or as return_url in \
                             the profile)"
                                .into(),
                        ))
                    }
                    None => {}
                },
            }
        }
        Ok((order_number, amount))
    }
}

#[async_trait]
impl Connector for SbaConnector {
    fn name(&self) -> &str {
        &self.name
    }

    async fn deliver(&self, msg: &OutboxMessage) -> Result<Receipt, DeliveryError> {
        self.redactor.result(self.deliver_inner(msg).await)
    }
}

impl SbaConnector {
    /// Refuses a path whose method the profile does not list, or that could reach another method
    /// than its last segment names (dot segments, escapes, parameters).
    fn check_method(&self, path: &str) -> Result<(), DeliveryError> {
        let method = method_name(path).to_ascii_lowercase();
        let odd = path
            .split('/')
            .any(|s| s == "." || s == ".." || s.contains(['%', ';', '\\']))
            || path
                .split('/')
                .rev()
                .skip(1)
                .any(|s| s.to_ascii_lowercase().ends_with(".do"));
        if odd || !self.methods.contains(&method) {
            return Err(DeliveryError::permanent(
                codes::METHOD_DENIED.code,
                format!(
                    "method \"{}\" is not in the profile's methods ({}); nothing was sent",
                    truncate(method_name(path), 64),
                    self.methods.join(", ")
                ),
            ));
        }
        Ok(())
    }

    async fn deliver_inner(&self, msg: &OutboxMessage) -> Result<Receipt, DeliveryError> {
        let path = request_path(msg.address.as_deref())?;
        self.check_method(&path)?;
        let mut params = parse_params(msg.content.as_deref().unwrap_or_default())?;
        // The profile's credentials win; they are sent first by `call`.
        params.retain(|(k, _)| !matches!(k.as_str(), "userName" | "password" | "token"));
        let register = method_name(&path).starts_with("register");
        let order = if register {
            Some(self.prepare_register(msg, &mut params)?)
        } else {
            None
        };
        let (status, text, v) = self.call(&path, &params).await?;
        let status_i = status.as_u16() as i32;
        match (sber_error(&v), &order) {
            (None, _) => {
                let order_id = v.get("orderId").map(json_scalar).filter(|s| !s.is_empty());
                if register && order_id.is_none() {
                    return Err(DeliveryError::retry(
                        codes::SBA_BAD_RESPONSE.code,
                        format!(
                            "register answered without orderId: {}",
                            truncate(&text, 256)
                        ),
                    )
                    .with_status(status_i));
                }
                Ok(Receipt {
                    provider_id: order_id,
                    remote_status: Some(status_i),
                    reply: Some(text),
                })
            }
            (Some((code, message)), Some((number, amount))) if code == "1" => {
                self.recover(&path, number, amount, &message).await
            }
            (Some((code, message)), _) if code == "7" => {
                Err(DeliveryError::retry("sba-7", message).with_status(status_i))
            }
            (Some((code, message)), _) => Err(DeliveryError::permanent(
                codes::family(codes::SBA_ERROR, &kebab(&code)),
                message,
            )
            .with_status(status_i)),
        }
    }
}

/// The `orderNumber` of a message: its code when that has at most 32 printable ASCII characters;
/// else, for a hex code (Apostol's random 64-hex codes), its first 32 hex digits (128 random bits,
/// as unique as a UUID); else the first 32 hex digits of the SHA-256 of the code. Stable across
/// retries, which is what makes a repeated register recognisable.
pub fn order_number(code: &str) -> String {
    if code.len() <= MAX_ORDER_NUMBER
        && !code.is_empty()
        && code.bytes().all(|b| b.is_ascii_graphic())
    {
        return code.to_string();
    }
    if !code.is_empty() && code.bytes().all(|b| b.is_ascii_hexdigit()) {
        return code[..MAX_ORDER_NUMBER].to_string();
    }
    use sha2::{Digest, Sha256};
    Sha256::digest(code.as_bytes())
        .iter()
        .take(MAX_ORDER_NUMBER / 2)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The path of a message: its address (a path, or a bare method name under `/payment/rest/`), or
/// [`DEFAULT_PATH`]. A full URL is refused: the credentials go to the profile's host only.
fn request_path(address: Option<&str>) -> Result<String, DeliveryError> {
    let a = address.map(str::trim).unwrap_or_default();
    if a.is_empty() {
        return Ok(DEFAULT_PATH.into());
    }
    if a.contains("://") || a.starts_with("//") || a.contains(['?', '#', ' ']) {
        return Err(DeliveryError::permanent(
            codes::BAD_ADDRESS.code,
            format!(
                "address \"{}\" must be a path such as {DEFAULT_PATH}",
                truncate(a, 64)
            ),
        ));
    }
    Ok(if a.starts_with('/') {
        a.to_string()
    } else {
        format!("/payment/rest/{a}")
    })
}

/// The last segment of a path (`register.do`).
fn method_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// `path` with its last segment replaced by `method`, so a status query goes to the same API
/// generation as the register it follows.
fn sibling_path(path: &str, method: &str) -> String {
    match path.rfind('/') {
        Some(i) => format!("{}{method}", &path[..=i]),
        None => format!("/payment/rest/{method}"),
    }
}

/// The parameters in `content`: a JSON object, or URL-encoded pairs.
pub fn parse_params(content: &str) -> Result<Vec<(String, String)>, DeliveryError> {
    let t = content.trim();
    if t.starts_with('{') {
        let obj: serde_json::Map<String, Value> = serde_json::from_str(t).map_err(|e| {
            DeliveryError::permanent(
                codes::BAD_CONTENT.code,
                format!("content is not a JSON object: {e}"),
            )
        })?;
        return Ok(obj
            .into_iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k, json_scalar(&v)))
            .collect());
    }
    Ok(url::form_urlencoded::parse(t.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect())
}

/// The error of a Sberbank answer, as (code, message); `None` when it is a success.
pub fn sber_error(v: &Value) -> Option<(String, String)> {
    let code = v
        .get("errorCode")
        .or_else(|| v.get("ErrorCode"))
        .or_else(|| v.pointer("/error/code"))
        .map(json_scalar)?;
    let code = code.trim().to_string();
    if code.is_empty() || code == "0" {
        return None;
    }
    let message = [
        "/errorMessage",
        "/ErrorMessage",
        "/error/message",
        "/error/description",
    ]
    .iter()
    .find_map(|p| v.pointer(p).and_then(Value::as_str))
    .unwrap_or("(no message)")
    .to_string();
    Some((code, message))
}

fn check_absolute(u: &str) -> Result<(), String> {
    match url::Url::parse(u) {
        Ok(p) if matches!(p.scheme(), "http" | "https") && p.has_host() => Ok(()),
        _ => Err(format!(
            "\"{}\" is not an absolute http(s) URL",
            truncate(u, 128)
        )),
    }
}

#[cfg(test)]
mod tests;
