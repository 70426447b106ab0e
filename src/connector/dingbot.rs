//! The `dingbot` connector (agent `dingbot.agent`): a DingTalk custom robot (自定义机器人) webhook,
//! `POST <endpoint>/robot/send?access_token=…`, signed when the profile has a `secret` ("加签":
//! `timestamp` in milliseconds and `sign = urlencode(base64(HMAC-SHA256(secret, timestamp + "\n" +
//! secret)))`, both in the query string). Facts: shared/providers.md §2.4.
//!
//! The content is the robot's JSON body (`{"msgtype":"text","text":{…},"at":{…}}`; msgtypes
//! `text`, `markdown`, `link`, `actionCard`, `feedCard`), checked before any call: a content that
//! is not JSON is sent as a `text` message. The address is not used (a robot posts into its one
//! group); `at.isAtAll`, `at.atMobiles` and `at.atUserIds` pass through as written.
//!
//! Classification (HTTP 200 with `errcode`): `0` is done; `130101` (more than 20 messages a
//! minute) is "too fast": the robot is blocked for 10 minutes, so the error carries that block
//! ([`DeliveryError::too_fast`]) and the fleet's limiter holds the profile back; `-1` (busy) and a
//! `310000` saying `invalid timestamp` (clock skew) retry; `310000` otherwise (keyword, signature,
//! IP allow-list), `300001` (no such token) and unknown codes are permanent. A timeout after the
//! request left is retried (the robot has no idempotency key: a duplicate is possible, table 3.3
//! "ambiguous").
//!
//! Invariants: the access token, the secret and the per-request `sign` are scrubbed from every
//! text a delivery produces; transport errors lose their URL.
//!
//! Picture cards are not sent as pictures: the robot shows a picture only by URL (`markdown`
//! `![](url)`, `link.picUrl`; providers.md §2.4), and outboxd has no public URL for a rendered
//! card, so a card message's picture is ignored and its content delivered as usual.

use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Value};

use super::provider::body::{BodyError, Class, ErrorTable, Field};
use super::provider::{classify_status, read_response, sign, truncate};
use super::redact::{self, Redactor};
use super::{codes, Connector, DeliveryError, OutboxMessage, Receipt};
use crate::settings::{ConfigError, Dur, ProfileContext, Secret, SecretSource};

/// DingTalk's API host.
pub const DEFAULT_ENDPOINT: &str = "https://oapi.dingtalk.com";
/// How long DingTalk blocks a robot that sent more than 20 messages in a minute (130101).
pub const TOO_FAST_BLOCK: Duration = Duration::from_secs(600);
const MAX_RESPONSE_BYTES: usize = 16 * 1024;

/// The robot's `errcode`s (providers.md §2.4). 130101 and 310000 are decided in
/// [`classify`] (too fast; clock skew).
pub const ERRORS: ErrorTable = ErrorTable {
    prefix: "dingbot",
    field: Field::Code {
        pointer: "/errcode",
        success: &["0"],
    },
    message: &["/errmsg"],
    codes: &[
        ("-1", Class::Retry),
        ("130101", Class::Retry),
        ("310000", Class::Permanent),
        ("300001", Class::Permanent),
    ],
    default: Class::Permanent,
};

/// A `dingbot` profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DingbotConfig {
    /// The robot's `access_token` (the query parameter of its webhook URL): inline…
    pub access_token: Option<Secret>,
    /// …or from this environment variable…
    pub access_token_env: Option<String>,
    /// …or from this file. One of the three is required.
    pub access_token_file: Option<std::path::PathBuf>,
    /// The signing secret (`SEC…`) when the robot has "加签" on: inline…
    pub secret: Option<Secret>,
    /// …or from this environment variable…
    pub secret_env: Option<String>,
    /// …or from this file. None of the three: requests are not signed.
    pub secret_file: Option<std::path::PathBuf>,
    /// Base URL; requests go to `<endpoint>/robot/send`. Default `https://oapi.dingtalk.com`.
    pub endpoint: Option<String>,
    /// Request timeout (common key). Default 30s.
    pub timeout: Option<Dur>,
}

pub struct DingbotConnector {
    name: String,
    client: reqwest::Client,
    url: url::Url,
    secret: Option<Secret>,
    redactor: Redactor,
}

impl DingbotConnector {
    pub fn new(ctx: &ProfileContext, cfg: &DingbotConfig) -> Result<Self, ConfigError> {
        let token = SecretSource::of(
            &cfg.access_token,
            &cfg.access_token_env,
            &cfg.access_token_file,
        )
        .resolve("access_token")
        .map_err(|m| ctx.error("access_token", m))?
        .filter(|t| !t.expose().trim().is_empty())
        .ok_or_else(|| {
            ctx.error(
                "access_token",
                "required (access_token, access_token_env or access_token_file)",
            )
        })?;
        let secret = SecretSource::of(&cfg.secret, &cfg.secret_env, &cfg.secret_file)
            .resolve("secret")
            .map_err(|m| ctx.error("secret", m))?;
        let endpoint = cfg.endpoint.as_deref().unwrap_or(DEFAULT_ENDPOINT);
        let mut url = url::Url::parse(&format!("{}/robot/send", endpoint.trim_end_matches('/')))
            .map_err(|e| ctx.error("endpoint", format!("invalid URL: {e}")))?;
        url.query_pairs_mut()
            .append_pair("access_token", token.expose());
        let timeout = cfg.timeout.map_or(Duration::from_secs(30), |d| d.0);
        let client = super::provider::http_client_builder(timeout)
            .redirect(redact::same_origin_redirects())
            .build()
            .map_err(|e| ctx.error("endpoint", format!("cannot build the HTTP client: {e}")))?;
        let mut redactor = Redactor::new();
        redactor.add(token.expose());
        if let Some(s) = &secret {
            redactor.add(s.expose());
        }
        Ok(DingbotConnector {
            name: format!("dingbot/{}", ctx.profile),
            client,
            url,
            secret,
            redactor,
        })
    }
}

/// `timestamp=<ms>&sign=<urlencoded base64>`: the signed query of providers.md §2.4 (the
/// form encoding of `append_pair` is Python's `quote_plus`).
pub fn signed_query(secret: &str, timestamp_ms: i64) -> (String, String) {
    let ts = timestamp_ms.to_string();
    let sign = sign::hmac_sha256_base64(
        secret.as_bytes(),
        &[ts.as_bytes(), b"\n", secret.as_bytes()],
    );
    let query = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("timestamp", &ts)
        .append_pair("sign", &sign)
        .finish();
    (query, sign)
}

fn bad_content(reason: impl Into<String>) -> DeliveryError {
    DeliveryError::permanent(codes::BAD_CONTENT.code, reason)
}

/// Non-empty string fields `keys` of `obj.<part>`.
fn require(body: &Value, part: &str, keys: &[&str]) -> Result<(), DeliveryError> {
    let obj = body
        .get(part)
        .and_then(Value::as_object)
        .ok_or_else(|| bad_content(format!("msgtype {part} needs a \"{part}\" object")))?;
    for k in keys {
        if !obj
            .get(*k)
            .and_then(Value::as_str)
            .is_some_and(|s| !s.trim().is_empty())
        {
            return Err(bad_content(format!(
                "{part}.{k} must be a non-empty string"
            )));
        }
    }
    Ok(())
}

/// The body to post: the content checked as the robot checks it (plain text becomes a `text`
/// message).
pub fn prepare_body(content: &str) -> Result<Value, DeliveryError> {
    let body = match serde_json::from_str::<Value>(content) {
        Ok(v @ Value::Object(_)) => v,
        _ => return Ok(json!({"msgtype": "text", "text": {"content": content}})),
    };
    let msgtype = body
        .get("msgtype")
        .and_then(Value::as_str)
        .ok_or_else(|| bad_content("content has no \"msgtype\""))?;
    match msgtype {
        "text" => require(&body, "text", &["content"])?,
        "markdown" => require(&body, "markdown", &["title", "text"])?,
        "link" => require(&body, "link", &["title", "text", "messageUrl"])?,
        "actionCard" => {
            require(&body, "actionCard", &["title", "text"])?;
            let card = &body["actionCard"];
            let single = card.get("singleTitle").is_some() || card.get("singleURL").is_some();
            if single {
                require(&body, "actionCard", &["singleTitle", "singleURL"])?;
            } else if !card
                .get("btns")
                .and_then(Value::as_array)
                .is_some_and(|b| !b.is_empty())
            {
                return Err(bad_content(
                    "actionCard needs singleTitle + singleURL or a non-empty btns list",
                ));
            }
        }
        "feedCard" => {
            if !body
                .pointer("/feedCard/links")
                .and_then(Value::as_array)
                .is_some_and(|l| !l.is_empty())
            {
                return Err(bad_content("feedCard.links must be a non-empty list"));
            }
        }
        other => {
            return Err(bad_content(format!(
                "msgtype \"{other}\" is not one of text, markdown, link, actionCard, feedCard"
            )))
        }
    }
    if let Some(at) = body.get("at") {
        let ok = at.as_object().is_some_and(|a| {
            a.get("isAtAll").map_or(true, Value::is_boolean)
                && ["atMobiles", "atUserIds"].iter().all(|k| {
                    a.get(*k).map_or(true, |v| {
                        v.as_array().is_some_and(|l| l.iter().all(Value::is_string))
                    })
                })
        });
        if !ok {
            return Err(bad_content(
                "at must be {\"isAtAll\": bool, \"atMobiles\": [strings], \"atUserIds\": [strings]}",
            ));
        }
    }
    Ok(body)
}

/// The error of a body that reports one (providers.md §2.4; see the module docs).
pub fn classify(e: &BodyError) -> DeliveryError {
    let err = ERRORS.error(e);
    match e.code.as_str() {
        "130101" => DeliveryError::too_fast(err.code(), err.reason(), TOO_FAST_BLOCK),
        // The documented text of a clock skew; a keyword, signature or IP error never says it.
        "310000" if e.message.to_ascii_lowercase().contains("invalid timestamp") => {
            DeliveryError::retry(err.code(), err.reason())
        }
        _ => err,
    }
}

#[async_trait]
impl Connector for DingbotConnector {
    fn name(&self) -> &str {
        &self.name
    }

    async fn deliver(&self, msg: &OutboxMessage) -> Result<Receipt, DeliveryError> {
        let mut redactor = self.redactor.clone();
        let r = self.deliver_inner(msg, &mut redactor).await;
        redactor.result(r)
    }
}

impl DingbotConnector {
    async fn deliver_inner(
        &self,
        msg: &OutboxMessage,
        redactor: &mut Redactor,
    ) -> Result<Receipt, DeliveryError> {
        let body = prepare_body(msg.content_required()?)?;
        let mut url = self.url.clone();
        if let Some(secret) = &self.secret {
            let (query, sign) =
                signed_query(secret.expose(), chrono::Utc::now().timestamp_millis());
            redactor.add(&sign);
            let q = format!("{}&{query}", url.query().unwrap_or_default());
            url.set_query(Some(&q));
        }
        let resp = self
            .client
            .post(url)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/json; charset=utf-8",
            )
            .body(serde_json::to_vec(&body).expect("a JSON value serializes"))
            .send()
            .await
            .map_err(|e| redact::send_error(&e))?;
        let (status, headers, text) = read_response(resp, MAX_RESPONSE_BYTES).await?;
        if !status.is_success() {
            return Err(classify_status(status, &text, &headers));
        }
        let v: Value = serde_json::from_str(&text).map_err(|_| {
            DeliveryError::retry(
                codes::DINGTALK_BAD_RESPONSE.code,
                format!(
                    "the robot answered something that is not JSON: {}",
                    truncate(&text, 256)
                ),
            )
        })?;
        if let Some(e) = ERRORS.find(&v) {
            return Err(classify(&e).with_status(status.as_u16()));
        }
        Ok(Receipt {
            provider_id: None,
            remote_status: Some(status.as_u16() as i32),
            reply: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_reproduces_the_test_vector() {
        // providers.md §3.4: secret SECtest, ts 1700000000000.
        let (query, _) = signed_query("SECtest", 1_700_000_000_000);
        assert_eq!(
            query,
            "timestamp=1700000000000&sign=aZLLrriXgn05YbwaGR7knYsLeJADjr9NwLaNNKpxh4g%3D"
        );
    }

    #[test]
    fn bodies_are_checked_per_msgtype() {
        assert_eq!(
            prepare_body("plain words").unwrap(),
            json!({"msgtype": "text", "text": {"content": "plain words"}})
        );
        for ok in [
            json!({"msgtype":"text","text":{"content":"x"},"at":{"isAtAll":true,"atMobiles":["138"],"atUserIds":["u"]}}),
            json!({"msgtype":"markdown","markdown":{"title":"t","text":"### x"}}),
            json!({"msgtype":"link","link":{"title":"t","text":"x","messageUrl":"https://e"}}),
            json!({"msgtype":"actionCard","actionCard":{"title":"t","text":"x","singleTitle":"go","singleURL":"https://e"}}),
            json!({"msgtype":"actionCard","actionCard":{"title":"t","text":"x","btns":[{"title":"a","actionURL":"https://e"}]}}),
        ] {
            assert_eq!(prepare_body(&ok.to_string()).unwrap(), ok);
        }
        for bad in [
            json!({"text":{"content":"x"}}),
            json!({"msgtype":"text","text":{}}),
            json!({"msgtype":"markdown","markdown":{"title":"t"}}),
            json!({"msgtype":"link","link":{"title":"t","text":"x"}}),
            json!({"msgtype":"actionCard","actionCard":{"title":"t","text":"x"}}),
            json!({"msgtype":"image"}),
            json!({"msgtype":"text","text":{"content":"x"},"at":{"atMobiles":"138"}}),
        ] {
            let e = prepare_body(&bad.to_string()).unwrap_err();
            assert_eq!(e.code(), "bad-content", "{bad}");
        }
    }

    #[test]
    fn errcodes_are_classified() {
        let find = |b: &str| ERRORS.find(&serde_json::from_str(b).unwrap());
        assert!(find(r#"{"errcode":0,"errmsg":"ok"}"#).is_none());
        let e = classify(&find(r#"{"errcode":130101,"errmsg":"send too fast"}"#).unwrap());
        assert_eq!(
            e,
            DeliveryError::too_fast("dingbot-130101", "send too fast", TOO_FAST_BLOCK)
        );
        let e = classify(&find(r#"{"errcode":310000,"errmsg":"sign not match"}"#).unwrap());
        assert!(!e.is_retry() && e.code() == "dingbot-310000");
        let e = classify(&find(r#"{"errcode":310000,"errmsg":"invalid timestamp"}"#).unwrap());
        assert!(e.is_retry());
        assert!(classify(&find(r#"{"errcode":-1,"errmsg":"busy"}"#).unwrap()).is_retry());
        let e = classify(&find(r#"{"errcode":300001,"errmsg":"token is not exist"}"#).unwrap());
        assert!(!e.is_retry());
    }
}
