//! The WeChat Official Account (公众号) template-message connector (agent `wechat.agent`;
//! shared/providers.md §2.1). The message's `address` is the recipient's openid, its `content`
//! the template message without recipient:
//!
//! ```json
//! {"template_id": "TEMPLATE_ID",
//!  "url": "https://example.com/detail",                                  (optional)
//!  "miniprogram": {"appid": "MINIAPPID", "pagepath": "index?foo=bar"},  (optional)
//!  "data": {"keyword1": {"value": "巧克力", "color": "#173177"}, "amount01": "¥100"}}
//! ```
//!
//! A `data` entry may be a bare string (sent as `{"value": …}`). The body sent is that object
//! with `touser` = the address and `client_msg_id` = the message code, so WeChat sends a retry of
//! the same message once. The returned `msgid` is the provider id.
//!
//! Tokens come from `stable_token` with `force_refresh: false` only — never the classic
//! `cgi-bin/token`, whose every call invalidates the token other daemons (or other systems of the
//! same account) hold. They are cached per (base URL, appid, secret) across profiles; 40001,
//! 40014 and 42001 invalidate the token, a new one is fetched and the message sent once more
//! (a second rejection is `token-invalid`).
//!
//! Invariants: the content is checked before any network call (`bad-content`, `bad-address`);
//! errors are read from the body (`errcode`, HTTP 200): -1 (`wechat-busy`) and 45009 retry,
//! 43004 (not following the account), 40003 (bad openid), 40037, 47003, 48001 and unknown codes
//! fail; the access token travels in the query string, so it, the app secret and the last tokens
//! are scrubbed from every text, and transport errors lose their URL.
//!
//! The helpers [`answer`] and [`TokenRequest`] are shared with the WeCom connectors (`wecom`,
//! `wecombot`): the same Tencent `errcode` answers and token endpoints.
//!
//! Picture cards are not sent as pictures: a template message (providers.md §2.1) carries no
//! image, so a card message's picture is ignored and its content read as usual (a card's plain
//! alt text is not a template message: `bad-content`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::codes::{self, Code};
use super::provider::body::{Class, ErrorTable, Field};
use super::provider::token::{call_with_token, token_from_json};
use super::provider::{classify_status, http_client_builder, json_scalar, read_response, truncate};
use super::redact::{self, Redactor};
use super::token::{self, Token, TokenCache, TokenSource};
use super::{Connector, DeliveryError, OutboxMessage, Receipt};
use crate::settings::{ConfigError, Dur, ProfileContext, Secret, SecretSource};

const DEFAULT_BASE_URL: &str = "https://api.weixin.qq.com";
/// Enough for any answer of these APIs; a larger body is cut, not buffered whole.
pub(super) const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// What `expires_in` is when an answer lacks it (both platforms hand out 7200 s tokens).
pub(super) const TOKEN_LIFE: Duration = Duration::from_secs(7200);

/// A `wechat` profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WechatConfig {
    /// The Official Account's AppID. Required.
    pub appid: String,
    /// The AppSecret, inline (avoid: keep secrets out of config files)…
    pub secret: Option<Secret>,
    /// …or the name of an environment variable holding it…
    pub secret_env: Option<String>,
    /// …or the path of a file holding it. One of the three is required.
    pub secret_file: Option<PathBuf>,
    /// Base URL of the API (`/cgi-bin/stable_token`, `/cgi-bin/message/template/send`).
    /// Default `https://api.weixin.qq.com`.
    pub base_url: Option<String>,
    /// Request timeout (common key), for the token and the send. Default 30s.
    pub timeout: Option<Dur>,
}

pub struct WechatConnector {
    name: String,
    client: reqwest::Client,
    send_url: String,
    tokens: Arc<TokenCache>,
    redactor: Redactor,
}

/// The base URL of a profile, checked (errors name `base_url`).
pub(super) fn base_url(
    ctx: &ProfileContext,
    configured: &Option<String>,
    default: &str,
) -> Result<String, ConfigError> {
    let base = configured.as_deref().unwrap_or(default);
    let u =
        url::Url::parse(base).map_err(|e| ctx.error("base_url", format!("invalid URL: {e}")))?;
    if !matches!(u.scheme(), "http" | "https") || u.query().is_some() {
        return Err(ctx.error("base_url", "must be an http(s) URL without a query"));
    }
    Ok(base.trim_end_matches('/').to_string())
}

/// The profile's secret from `<key>`, `<key>_env` or `<key>_file`, required and not blank.
pub(super) fn required_secret(
    ctx: &ProfileContext,
    key: &str,
    source: SecretSource,
) -> Result<Secret, ConfigError> {
    let s = source
        .resolve(key)
        .map_err(|m| ctx.error(key, m))?
        .ok_or_else(|| ctx.error(key, format!("required: set {key}_env, {key}_file or {key}")))?;
    if s.expose().trim().is_empty() {
        return Err(ctx.error(key, "is empty"));
    }
    Ok(s)
}

/// The HTTP client of these connectors: the profile's timeout, no redirect to another origin
/// (the URL carries the token).
pub(super) fn client(
    ctx: &ProfileContext,
    timeout: Option<Dur>,
) -> Result<reqwest::Client, ConfigError> {
    http_client_builder(timeout.map_or(Duration::from_secs(30), |d| d.0))
        .redirect(redact::same_origin_redirects())
        .build()
        .map_err(|e| ctx.error("base_url", format!("cannot build the HTTP client: {e}")))
}

impl WechatConnector {
    pub fn new(ctx: &ProfileContext, cfg: &WechatConfig) -> Result<Self, ConfigError> {
        if cfg.appid.trim().is_empty() {
            return Err(ctx.error("appid", "is empty"));
        }
        let secret = required_secret(
            ctx,
            "secret",
            SecretSource::of(&cfg.secret, &cfg.secret_env, &cfg.secret_file),
        )?;
        let base = base_url(ctx, &cfg.base_url, DEFAULT_BASE_URL)?;
        let client = client(ctx, cfg.timeout)?;
        let mut redactor = Redactor::new();
        redactor.add(secret.expose());
        let token_url = format!("{base}/cgi-bin/stable_token");
        let key = token::credential_key("wechat", &[&token_url, &cfg.appid, secret.expose()]);
        let source = TokenRequest::Post {
            client: client.clone(),
            url: token_url,
            body: json!({
                "grant_type": "client_credential",
                "appid": cfg.appid,
                "secret": secret.expose(),
                // Never force: a forced refresh invalidates the token every other daemon holds.
                "force_refresh": false,
            }),
            table: TOKEN_ERRORS,
        };
        Ok(WechatConnector {
            name: format!("wechat/{}", ctx.profile),
            client,
            send_url: format!("{base}/cgi-bin/message/template/send"),
            tokens: token::shared(&key, || TokenCache::new(source)),
            redactor,
        })
    }
}

/// The `errcode` table of the token endpoints (WeChat `stable_token`, WeCom `gettoken`): -1 (busy)
/// and 45009 (call quota) are worth another try (`token-fetch`), anything else is a refused
/// credential (`token-denied`: 40013 invalid appid, 40125 invalid secret, 40164 IP not allowed…).
pub(super) const TOKEN_ERRORS: ErrorTable = ErrorTable {
    prefix: "token",
    field: ERRCODE,
    message: &["/errmsg"],
    codes: &[("-1", Class::Retry), ("45009", Class::Retry)],
    default: Class::Permanent,
};

/// Where Tencent's APIs put their code: `errcode`, 0 meaning success.
pub(super) const ERRCODE: Field = Field::Code {
    pointer: "/errcode",
    success: &["0"],
};

/// The token-invalid codes of WeChat and WeCom (providers.md §3.2): refresh and send once more.
pub(super) const TOKEN_INVALID_CODES: [(&str, Class); 3] = [
    ("40001", Class::TokenInvalid),
    ("40014", Class::TokenInvalid),
    ("42001", Class::TokenInvalid),
];

/// The template send's `errcode`s (providers.md §2.1, §3.3).
const SEND_ERRORS: ErrorTable = ErrorTable {
    prefix: "wechat",
    field: ERRCODE,
    message: &["/errmsg"],
    codes: &[
        TOKEN_INVALID_CODES[0],
        TOKEN_INVALID_CODES[1],
        TOKEN_INVALID_CODES[2],
        ("-1", Class::Retry),
        ("45009", Class::Retry),
        ("43004", Class::Permanent),
        ("40003", Class::Permanent),
        ("40037", Class::Permanent),
        ("47003", Class::Permanent),
        ("48001", Class::Permanent),
    ],
    default: Class::Permanent,
};

/// How a token is fetched: WeChat's `stable_token` (POST JSON) or WeCom's `gettoken` (GET with
/// the credential in the query); both answer `{access_token, expires_in}` or an `errcode`.
pub(super) enum TokenRequest {
    Post {
        client: reqwest::Client,
        url: String,
        body: Value,
        table: ErrorTable,
    },
    Get {
        client: reqwest::Client,
        url: String,
        query: Vec<(&'static str, Secret)>,
        table: ErrorTable,
    },
}

#[async_trait]
impl TokenSource for TokenRequest {
    async fn fetch(&self) -> Result<Token, DeliveryError> {
        let (sent, table) = match self {
            TokenRequest::Post {
                client,
                url,
                body,
                table,
            } => (client.post(url).json(body).send().await, table),
            TokenRequest::Get {
                client,
                url,
                query,
                table,
            } => {
                let q: Vec<(&str, &str)> = query.iter().map(|(k, v)| (*k, v.expose())).collect();
                (client.get(url).query(&q).send().await, table)
            }
        };
        let resp = sent.map_err(|e| {
            let e = redact::send_error(&e);
            if e.is_retry() {
                DeliveryError::retry(
                    codes::TOKEN_FETCH.code,
                    format!("token endpoint: {}", e.reason()),
                )
            } else {
                e
            }
        })?;
        let (status, headers, text) = read_response(resp, MAX_RESPONSE_BYTES).await?;
        token_from_json(status, &headers, &text, table, TOKEN_LIFE)
    }
}

/// A Tencent API answer: a non-success status is classified as HTTP ([`classify_status`]), a body
/// that is not a JSON object is `bad_response` (retry), an `errcode` ≠ 0 is classified by `table`
/// (-1, "system busy", is written `<prefix>-busy`); else the parsed body.
pub(super) fn answer(
    status: StatusCode,
    headers: &HeaderMap,
    text: &str,
    table: &ErrorTable,
    bad_response: Code,
) -> Result<Value, DeliveryError> {
    if !status.is_success() {
        return Err(classify_status(status, text, headers));
    }
    let v: Value = serde_json::from_str(text)
        .ok()
        .filter(Value::is_object)
        .ok_or_else(|| {
            DeliveryError::retry(
                bad_response.code,
                format!("not a JSON answer: {}", truncate(text, 256)),
            )
            .with_status(status.as_u16())
        })?;
    match table.find(&v) {
        None => Ok(v),
        Some(e) if e.code == "-1" => Err(DeliveryError::retry(
            table.stable_code("busy"),
            format!("-1 {}", truncate(&e.message, 256)),
        )
        .with_status(status.as_u16())),
        Some(e) => Err(table.error(&e).with_status(status.as_u16())),
    }
}

/// The `rejected` signal of [`call_with_token`] for Tencent answers: the body carries one of the
/// table's token-invalid codes.
pub(super) fn token_rejected(
    table: &ErrorTable,
    answer: &(StatusCode, HeaderMap, String),
) -> Option<DeliveryError> {
    let (status, _, text) = answer;
    table.is_token_invalid(text).then(|| {
        DeliveryError::retry(
            codes::TOKEN_INVALID.code,
            format!(
                "a freshly fetched access token was rejected: {}",
                truncate(text, 256)
            ),
        )
        .with_status(status.as_u16())
    })
}

pub(super) fn bad_content(reason: impl Into<String>) -> DeliveryError {
    DeliveryError::permanent(codes::BAD_CONTENT.code, reason)
}

/// The template message's content (see the module doc).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Content {
    template_id: String,
    url: Option<String>,
    miniprogram: Option<Map<String, Value>>,
    data: Map<String, Value>,
}

/// The body of `message/template/send` for `openid`, `code` and the content (see the module doc).
fn build_body(openid: &str, code: &str, content: &str) -> Result<Value, DeliveryError> {
    let c: Content = serde_json::from_str(content)
        .map_err(|e| bad_content(format!("content is not a WeChat template message: {e}")))?;
    if c.template_id.trim().is_empty() {
        return Err(bad_content("template_id is empty"));
    }
    if c.data.is_empty() {
        return Err(bad_content("data is empty"));
    }
    let mut data = Map::new();
    for (k, v) in c.data {
        let entry = match v {
            Value::String(s) => json!({ "value": s }),
            Value::Object(o) if o.get("value").is_some_and(Value::is_string) => Value::Object(o),
            _ => {
                return Err(bad_content(format!(
                    "data.{k} must be a string or {{\"value\": \"…\", \"color\"?: \"…\"}}"
                )))
            }
        };
        data.insert(k, entry);
    }
    let mut body = json!({
        "touser": openid,
        "template_id": c.template_id,
        "client_msg_id": code,
        "data": data,
    });
    if let Some(url) = c.url.filter(|u| !u.is_empty()) {
        body["url"] = Value::String(url);
    }
    if let Some(mp) = c.miniprogram {
        if !mp.get("appid").is_some_and(Value::is_string) {
            return Err(bad_content("miniprogram needs an appid"));
        }
        body["miniprogram"] = Value::Object(mp);
    }
    Ok(body)
}

/// POSTs a JSON body to `url?access_token=<token>`.
pub(super) async fn post_with_token(
    client: &reqwest::Client,
    url: &str,
    token: &Secret,
    query: &[(&str, &str)],
    body: reqwest::Body,
    content_type: &str,
) -> Result<(StatusCode, HeaderMap, String), DeliveryError> {
    let resp = client
        .post(url)
        .query(&[("access_token", token.expose())])
        .query(query)
        .header(reqwest::header::CONTENT_TYPE, content_type)
        .body(body)
        .send()
        .await
        .map_err(|e| redact::send_error(&e))?;
    read_response(resp, MAX_RESPONSE_BYTES).await
}

#[async_trait]
impl Connector for WechatConnector {
    fn name(&self) -> &str {
        &self.name
    }

    async fn deliver(&self, msg: &OutboxMessage) -> Result<Receipt, DeliveryError> {
        let r = self.redactor.result(self.deliver_inner(msg).await);
        self.tokens.redact(r)
    }
}

impl WechatConnector {
    async fn deliver_inner(&self, msg: &OutboxMessage) -> Result<Receipt, DeliveryError> {
        let openid = msg.address_required()?.trim();
        let body = build_body(openid, &msg.code, msg.content_required()?)?;
        let body = serde_json::to_vec(&body).expect("a JSON value serializes");
        let (status, headers, text) = call_with_token(
            &self.tokens,
            &self.name,
            |a| token_rejected(&SEND_ERRORS, a),
            |t| {
                let body = body.clone();
                async move {
                    post_with_token(
                        &self.client,
                        &self.send_url,
                        &t,
                        &[],
                        body.into(),
                        "application/json",
                    )
                    .await
                }
            },
        )
        .await?;
        let v = answer(
            status,
            &headers,
            &text,
            &SEND_ERRORS,
            codes::WECHAT_BAD_RESPONSE,
        )?;
        Ok(Receipt {
            provider_id: v.get("msgid").map(json_scalar),
            remote_status: Some(status.as_u16().into()),
            reply: None,
        })
    }
}

#[cfg(test)]
mod tests;
