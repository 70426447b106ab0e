//! The Aliyun SMS connector (agent `aliyunsms.agent`): `SendSms` of Aliyun's Short Message
//! Service (dysmsapi, RPC style, `Version=2017-05-25`), a signed GET per message
//! (signature v1: HMAC-SHA1 of `GET&%2F&<percent-encoded sorted query>` under
//! `AccessKeySecret + "&"`). Facts: shared/providers.md §2.8, test vector §3.4.
//!
//! The message's `address` is `PhoneNumbers` (one number or several, comma-separated), its code
//! is `OutId`, and its content picks and fills the approved template:
//! `{"params": {"code": "1234"}, "template_code": "SMS_153055065", "sign_name": "阿里云"}`, where
//! `template_code` and `sign_name` default to the profile's and `params` (strings or numbers)
//! becomes the `TemplateParam` JSON string. `BizId` is stored as the provider id.
//!
//! SendSms is not idempotent: an attempt that timed out, lost its connection or got a 5xx may have
//! sent the SMS. The connector does not learn why an earlier attempt ended, and an attempt cut off
//! by a killed daemon (lease expired) or a shutdown (handed back) comes back with the *same*
//! attempt number, so the rule is: every attempt after the first, and by default the first too
//! (`check_first_attempt`), first asks `QuerySendDetails` for the first number's records of every
//! day since the message was created (newest first; `yyyyMMdd` in China time and in UTC, so an
//! attempt just before midnight is found whichever calendar the service keeps; at most the last 30
//! days, the API's limit) and looks for the message's `OutId`. Found: the message is done without
//! a second SendSms (a record carries no `BizId`, so the provider id stays empty unless the service
//! adds one). Not found: it is sent. A failed query fails the attempt as the query's error says,
//! and nothing is sent.
//!
//! Invariants: address, code and content are checked before any network call; `Code` other than
//! `OK` is an error whatever the HTTP status; the AccessKey id and secret and each request's
//! `Signature` (derived from the secret) are scrubbed from every text; transport errors lose their
//! URL (the query string carries the signature); requests never follow a redirect to another
//! origin.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Days, FixedOffset, NaiveDate, Utc};
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::provider::body::{BodyError, Class, ErrorTable, Field};
use super::provider::{
    classify_status, http_client_builder, json_scalar, kebab, read_response, retryable_status,
    truncate,
};
use super::redact::{self, Redactor};
use super::{codes, Connector, DeliveryError, OutboxMessage, Receipt};
use crate::settings::{ConfigError, ProfileContext};

mod config;
mod sign;

pub use config::AliyunSmsConfig;
use config::{load_keys, Keys};
pub use sign::{canonical_query, pop_encode, signature_v1};

const DEFAULT_ENDPOINT: &str = "https://dysmsapi.aliyuncs.com";
const DEFAULT_REGION: &str = "cn-hangzhou";
const API_VERSION: &str = "2017-05-25";
/// Enough for any answer; a larger body is cut, not buffered whole.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// `PhoneNumbers` takes at most 1000 numbers; `OutId` fewer than 256 characters.
const MAX_NUMBERS: usize = 1000;
const MAX_OUT_ID: usize = 255;
/// QuerySendDetails pages (`PageSize` 1–50); 20 pages are 1000 SMS to one number in one day.
const PAGE_SIZE: usize = 50;
const MAX_PAGES: usize = 20;
/// QuerySendDetails answers for the last 30 days only.
const QUERY_DAYS: u64 = 30;
/// Aliyun's default per-number cap is one SMS a minute (then 5 an hour, 10 a day).
const DEFAULT_LIMIT_BLOCK: Duration = Duration::from_secs(60);

/// Aliyun's codes and what they mean (providers.md §2.8). Not listed: `isp.*` retries, anything
/// else retries with a retryable HTTP status and is permanent otherwise (template, sign, number,
/// balance and credential errors: `isv.*`, `SignatureDoesNotMatch`, `InvalidAccessKeyId.*`).
const ERRORS: ErrorTable = ErrorTable {
    prefix: "aliyun",
    field: Field::Code {
        pointer: "/Code",
        success: &["OK"],
    },
    message: &["/Message"],
    codes: &[
        // Too fast: a per-number frequency cap (see `limit_block`).
        ("isv.BUSINESS_LIMIT_CONTROL", Class::Retry),
        ("isp.RAM_PERMISSION_DENY", Class::Permanent),
        ("isp.SYSTEM_ERROR", Class::Retry),
        ("isp.GATEWAY_ERROR", Class::Retry),
        // The next attempt signs with a new nonce and timestamp.
        ("SignatureNonceUsed", Class::Retry),
        ("InvalidTimeStamp.Expired", Class::Retry),
        ("Throttling", Class::Retry),
        ("Throttling.User", Class::Retry),
        ("Throttling.Api", Class::Retry),
        ("ServiceUnavailable", Class::Retry),
    ],
    default: Class::Permanent,
};

/// An Aliyun code as a kebab-case fragment, camel case split (`SignatureDoesNotMatch` →
/// `signature-does-not-match`, `isv.MOBILE_NUMBER_ILLEGAL` → `isv-mobile-number-illegal`).
fn code_fragment(code: &str) -> String {
    let mut out = String::with_capacity(code.len() + 8);
    let mut prev: Option<char> = None;
    for c in code.chars() {
        if c.is_ascii_uppercase() && prev.is_some_and(|p| p.is_ascii_lowercase()) {
            out.push('-');
        }
        out.push(c);
        prev = Some(c);
    }
    kebab(&out)
}

fn china() -> FixedOffset {
    FixedOffset::east_opt(8 * 3600).expect("UTC+8 is a valid offset")
}

/// The `SendDate`s to search for an earlier attempt: every day from `created` to `now` in China
/// time and in UTC, newest first, within the 30 days QuerySendDetails answers for.
fn send_dates(created: DateTime<Utc>, now: DateTime<Utc>) -> Vec<String> {
    let today = now.with_timezone(&china()).date_naive();
    let oldest = today - Days::new(QUERY_DAYS - 1);
    let mut days: Vec<NaiveDate> = Vec::new();
    for tz in [china(), FixedOffset::east_opt(0).expect("UTC")] {
        let mut d = created.min(now).with_timezone(&tz).date_naive().max(oldest);
        let last = now.with_timezone(&tz).date_naive();
        while d <= last {
            if !days.contains(&d) {
                days.push(d);
            }
            d = d.succ_opt().expect("a date before the end of time");
        }
    }
    days.sort_unstable_by(|a, b| b.cmp(a));
    days.iter()
        .map(|d| d.format("%Y%m%d").to_string())
        .collect()
}

/// How long `isv.BUSINESS_LIMIT_CONTROL` blocks: the window of the cap Aliyun names
/// (`触发分钟级流控` minute, `小时级` hour, `天级` day: until midnight China time), else `minute`.
fn limit_block(message: &str, minute: Duration, now: DateTime<Utc>) -> Duration {
    let m = message.to_ascii_lowercase();
    if message.contains("分钟") || m.contains("minute") {
        minute
    } else if message.contains("小时") || m.contains("hour") {
        Duration::from_secs(3600).max(minute)
    } else if message.contains("天级") || m.contains("day") {
        let local = now.with_timezone(&china());
        let midnight = (local.date_naive() + Days::new(1))
            .and_hms_opt(0, 0, 0)
            .expect("midnight exists")
            .and_local_timezone(china())
            .single()
            .expect("a fixed offset is unambiguous");
        (midnight - local).to_std().unwrap_or(minute).max(minute)
    } else {
        minute
    }
}

fn bad_content(reason: impl Into<String>) -> DeliveryError {
    DeliveryError::permanent(codes::BAD_CONTENT.code, reason)
}

/// Prefixes an error's reason (the error stays what it is).
fn in_context(e: DeliveryError, context: &str) -> DeliveryError {
    match e {
        DeliveryError::Retry {
            code,
            reason,
            retry_after,
            remote_status,
            too_fast,
        } => DeliveryError::Retry {
            code,
            reason: format!("{context}: {reason}"),
            retry_after,
            remote_status,
            too_fast,
        },
        DeliveryError::Permanent {
            code,
            reason,
            remote_status,
        } => DeliveryError::Permanent {
            code,
            reason: format!("{context}: {reason}"),
            remote_status,
        },
    }
}

/// The content of an `aliyunsms.agent` message.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Content {
    sign_name: Option<String>,
    template_code: Option<String>,
    params: Option<Map<String, Value>>,
}

/// One SMS, checked and ready to sign.
#[derive(Debug, PartialEq)]
struct Sms {
    phone_numbers: String,
    sign_name: String,
    template_code: String,
    template_param: Option<String>,
    out_id: String,
}

/// `PhoneNumbers`: numbers of digits with an optional leading `+`, comma-separated, at most 1000.
fn phone_numbers(address: &str) -> Result<String, DeliveryError> {
    let bad = |why: String| DeliveryError::permanent(codes::BAD_ADDRESS.code, why);
    let numbers: Vec<&str> = address.split(',').map(str::trim).collect();
    if numbers.len() > MAX_NUMBERS {
        return Err(bad(format!(
            "{} phone numbers; SendSms takes at most {MAX_NUMBERS}",
            numbers.len()
        )));
    }
    for n in &numbers {
        let digits = n.strip_prefix('+').unwrap_or(n);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(format!(
                "\"{}\" is not a phone number (digits, optionally after +)",
                truncate(n, 64)
            )));
        }
    }
    Ok(numbers.join(","))
}

/// `TemplateParam`: the params as a JSON object of strings (numbers and booleans as text).
fn template_param(params: Map<String, Value>) -> Result<Option<String>, DeliveryError> {
    if params.is_empty() {
        return Ok(None);
    }
    let mut out = Map::new();
    for (k, v) in params {
        let text = match v {
            Value::String(s) => s,
            Value::Number(_) | Value::Bool(_) => json_scalar(&v),
            _ => {
                return Err(bad_content(format!(
                    "params.{k} must be a string or a number (template variables are text)"
                )))
            }
        };
        out.insert(k, Value::String(text));
    }
    Ok(Some(Value::Object(out).to_string()))
}

pub struct AliyunSmsConnector {
    name: String,
    client: reqwest::Client,
    /// `<endpoint>/`: signature v1 signs the path `/`.
    url: url::Url,
    keys: Keys,
    cfg: AliyunSmsConfig,
    region: String,
    limit_block: Duration,
    redactor: Redactor,
}

impl AliyunSmsConnector {
    pub fn new(ctx: &ProfileContext, cfg: &AliyunSmsConfig) -> Result<Self, ConfigError> {
        let keys = load_keys(cfg).map_err(|(key, m)| ctx.error(key, m))?;
        let endpoint = cfg.endpoint.as_deref().unwrap_or(DEFAULT_ENDPOINT);
        let mut url = url::Url::parse(endpoint)
            .map_err(|e| ctx.error("endpoint", format!("invalid URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https")
            || !url.path().trim_matches('/').is_empty()
            || url.query().is_some()
        {
            return Err(ctx.error(
                "endpoint",
                "must be an http(s) base URL without a path or query (signature v1 signs `/`)",
            ));
        }
        url.set_path("/");
        for (key, v) in [
            ("sign_name", &cfg.sign_name),
            ("template_code", &cfg.template_code),
            ("region_id", &cfg.region_id),
        ] {
            if v.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return Err(ctx.error(key, "must not be empty (leave it out instead)"));
            }
        }
        let timeout = cfg.timeout.map_or(Duration::from_secs(10), |d| d.0);
        // The signed query never follows a redirect to another origin.
        let client = http_client_builder(timeout)
            .redirect(redact::same_origin_redirects())
            .build()
            .map_err(|e| ctx.error("endpoint", format!("cannot build the HTTP client: {e}")))?;
        let mut redactor = Redactor::new();
        redactor
            .add(keys.id.expose())
            .add(keys.secret.expose())
            .add_url(&url, false);
        Ok(AliyunSmsConnector {
            name: format!("aliyunsms/{}", ctx.profile),
            client,
            url,
            keys,
            cfg: cfg.clone(),
            region: cfg
                .region_id
                .clone()
                .unwrap_or_else(|| DEFAULT_REGION.into()),
            limit_block: cfg
                .business_limit_block
                .map_or(DEFAULT_LIMIT_BLOCK, |d| d.0),
            redactor,
        })
    }

    /// Checks the message as SendSms would, before anything is sent.
    fn prepare(&self, msg: &OutboxMessage) -> Result<Sms, DeliveryError> {
        let phone_numbers = phone_numbers(msg.address_required()?)?;
        if msg.code.chars().count() > MAX_OUT_ID {
            return Err(DeliveryError::permanent(
                codes::BAD_CODE.code,
                format!("the message code is longer than the {MAX_OUT_ID} characters of OutId"),
            ));
        }
        let content: Content = match msg.content.as_deref().map(str::trim) {
            None | Some("") => Content::default(),
            Some(c) => serde_json::from_str(c).map_err(|e| {
                bad_content(format!(
                    "content must be {{\"params\": {{…}}, \"template_code\"?, \"sign_name\"?}}: {e}"
                ))
            })?,
        };
        let pick = |own: Option<String>, profile: &Option<String>, what: &str| {
            own.or_else(|| profile.clone())
                .filter(|v| !v.trim().is_empty())
                .ok_or_else(|| {
                    bad_content(format!(
                        "no {what}: neither the content nor the profile names one"
                    ))
                })
        };
        Ok(Sms {
            phone_numbers,
            sign_name: pick(content.sign_name, &self.cfg.sign_name, "sign_name")?,
            template_code: pick(
                content.template_code,
                &self.cfg.template_code,
                "template_code",
            )?,
            template_param: template_param(content.params.unwrap_or_default())?,
            out_id: msg.code.clone(),
        })
    }

    /// One signed GET of `action`; the answer's status and JSON when its `Code` is `OK`.
    async fn call(
        &self,
        action: &str,
        api: &[(&str, &str)],
    ) -> Result<(StatusCode, Value), DeliveryError> {
        let nonce = uuid::Uuid::new_v4().to_string();
        let timestamp = Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
        let params: BTreeMap<String, String> = [
            ("AccessKeyId", self.keys.id.expose()),
            ("Action", action),
            ("Format", "JSON"),
            ("RegionId", &self.region),
            ("SignatureMethod", "HMAC-SHA1"),
            ("SignatureNonce", &nonce),
            ("SignatureVersion", "1.0"),
            ("Timestamp", &timestamp),
            ("Version", API_VERSION),
        ]
        .into_iter()
        .chain(api.iter().copied())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let signature = signature_v1("GET", &params, self.keys.secret.expose());
        let mut url = self.url.clone();
        url.set_query(Some(&format!(
            "{}&Signature={}",
            canonical_query(&params),
            pop_encode(&signature)
        )));
        // The signature is derived from the secret: scrubbed like it.
        let mut redactor = self.redactor.clone();
        redactor.add(&signature);
        let answer = async {
            let resp = self
                .client
                .get(url)
                .send()
                .await
                .map_err(|e| redact::send_error(&e))?;
            let (status, headers, text) = read_response(resp, MAX_RESPONSE_BYTES).await?;
            self.check(status, &headers, &text).map(|v| (status, v))
        };
        answer.await.map_err(|e| redactor.error(e))
    }

    /// `Ok` for `Code: OK` with a success status; otherwise the classified error.
    fn check(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        text: &str,
    ) -> Result<Value, DeliveryError> {
        let v = serde_json::from_str::<Value>(text).ok();
        match v.as_ref().map(|v| (v, ERRORS.find(v))) {
            Some((v, None)) if status.is_success() && v.get("Code").is_some() => Ok(v.clone()),
            Some((v, Some(e))) => Err(self.classify(status, v, e)),
            // Not Aliyun's JSON: the outcome is unknown (the next attempt queries first).
            _ if status.is_success() => Err(DeliveryError::retry(
                codes::ALIYUN_BAD_RESPONSE.code,
                format!("HTTP {}: {}", status.as_u16(), truncate(text, 256)),
            )
            .with_status(status.as_u16())),
            _ => Err(classify_status(status, text, headers)),
        }
    }

    fn classify(&self, status: StatusCode, v: &Value, mut e: BodyError) -> DeliveryError {
        let listed = ERRORS.codes.iter().any(|(c, _)| *c == e.code);
        if !listed && (e.code.starts_with("isp.") || retryable_status(status)) {
            e.class = Class::Retry;
        }
        let code = codes::family(codes::ALIYUN_ERROR, &code_fragment(&e.code));
        let request = v
            .get("RequestId")
            .map(|r| format!(" (RequestId {})", json_scalar(r)))
            .unwrap_or_default();
        let reason = format!("{}: {}{request}", e.code, truncate(&e.message, 256));
        let err = if e.code == "isv.BUSINESS_LIMIT_CONTROL" {
            let block = limit_block(&e.message, self.limit_block, Utc::now());
            DeliveryError::too_fast(code, reason, block)
        } else if e.class == Class::Retry {
            DeliveryError::retry(code, reason)
        } else {
            DeliveryError::permanent(code, reason)
        };
        err.with_status(status.as_u16())
    }

    /// Whether an earlier attempt of `msg` was sent: its `OutId` in QuerySendDetails.
    async fn earlier_send(
        &self,
        msg: &OutboxMessage,
        sms: &Sms,
    ) -> Result<Option<Receipt>, DeliveryError> {
        let phone = sms.phone_numbers.split(',').next().unwrap_or_default();
        let context = format!(
            "QuerySendDetails (checking whether an earlier attempt sent it; nothing sent) for attempt {}",
            msg.attempt
        );
        for date in send_dates(msg.created, Utc::now()) {
            for page in 1..=MAX_PAGES {
                let page_text = page.to_string();
                let (status, v) = self
                    .call(
                        "QuerySendDetails",
                        &[
                            ("PhoneNumber", phone),
                            ("SendDate", &date),
                            ("PageSize", "50"),
                            ("CurrentPage", &page_text),
                        ],
                    )
                    .await
                    .map_err(|e| in_context(e, &context))?;
                let records = v
                    .pointer("/SmsSendDetailDTOs/SmsSendDetailDTO")
                    .and_then(Value::as_array)
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                let found = records.iter().find(|r| {
                    r.get("OutId").map(json_scalar).as_deref() == Some(sms.out_id.as_str())
                });
                if let Some(r) = found {
                    tracing::info!(message_id = %msg.id, profile = %msg.profile, connector = %self.name, attempt = msg.attempt, send_date = %date, "an earlier attempt sent this SMS (its OutId is in QuerySendDetails): not sending it again");
                    return Ok(Some(Receipt {
                        provider_id: r.get("BizId").map(json_scalar).filter(|b| !b.is_empty()),
                        remote_status: Some(status.as_u16() as i32),
                        reply: None,
                    }));
                }
                let total = v
                    .get("TotalCount")
                    .map(json_scalar)
                    .and_then(|t| t.parse::<usize>().ok())
                    .unwrap_or(0);
                if records.len() < PAGE_SIZE || page * PAGE_SIZE >= total {
                    break;
                }
            }
        }
        tracing::debug!(message_id = %msg.id, profile = %msg.profile, connector = %self.name, attempt = msg.attempt, "no earlier attempt sent this SMS: sending it");
        Ok(None)
    }

    async fn deliver_inner(&self, msg: &OutboxMessage) -> Result<Receipt, DeliveryError> {
        let sms = self.prepare(msg)?;
        if msg.attempt > 1 || self.cfg.check_first_attempt.unwrap_or(true) {
            if let Some(receipt) = self.earlier_send(msg, &sms).await? {
                return Ok(receipt);
            }
        }
        let mut api = vec![
            ("PhoneNumbers", sms.phone_numbers.as_str()),
            ("SignName", sms.sign_name.as_str()),
            ("TemplateCode", sms.template_code.as_str()),
            ("OutId", sms.out_id.as_str()),
        ];
        if let Some(p) = &sms.template_param {
            api.push(("TemplateParam", p));
        }
        let (status, v) = self.call("SendSms", &api).await?;
        Ok(Receipt {
            provider_id: v.get("BizId").map(json_scalar).filter(|b| !b.is_empty()),
            remote_status: Some(status.as_u16() as i32),
            reply: None,
        })
    }
}

#[async_trait]
impl Connector for AliyunSmsConnector {
    fn name(&self) -> &str {
        &self.name
    }

    async fn deliver(&self, msg: &OutboxMessage) -> Result<Receipt, DeliveryError> {
        self.redactor.result(self.deliver_inner(msg).await)
    }

    /// Re-reads the AccessKey pair (env, files); sends nothing.
    async fn healthcheck(&self) -> Result<(), DeliveryError> {
        load_keys(&self.cfg).map(|_| ()).map_err(|(key, m)| {
            DeliveryError::permanent(codes::BAD_CREDENTIALS.code, format!("{key}: {m}"))
        })
    }
}

#[cfg(test)]
mod tests;
