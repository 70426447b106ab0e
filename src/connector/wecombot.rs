//! The WeCom group robot (群机器人) webhook connector (agent `wecombot.agent`;
//! shared/providers.md §2.3): `POST <base_url>/cgi-bin/webhook/send?key=<key>`, where the key is
//! the robot's only credential. The message's content is the robot message; its address is not
//! used:
//!
//! ```json
//! {"msgtype": "text", "text": {"content": "disk full", "mentioned_list": ["wangqing", "@all"],
//!                              "mentioned_mobile_list": ["13800001111"]}}
//! {"msgtype": "markdown", "markdown": {"content": "**disk** full <@wangqing>"}}
//! {"msgtype": "image", "image": {"base64": "<the image, base64>"}}
//! {"msgtype": "news", "news": {"articles": [{"title": "…", "description": "…", "url": "…",
//!                                            "picurl": "…"}]}}
//! ```
//!
//! **Picture cards**: a message with a picture ([`OutboxMessage::images`], a rendered card) is sent
//! as one `msgtype: image` message carrying the picture inline (`image.base64` + `image.md5` of
//! the raw bytes; the robot has no upload for images). JPG/PNG up to 2 MB before base64 (WeCom's
//! robot doc); larger is `image-too-large` before any call. The content (the card's alt text) is
//! not sent as a second message: the robot's image has no caption, the text is drawn on the card,
//! and a second send could double the picture when the text failed and the message was retried.
//!
//! For an image the connector adds `md5`: the hex MD5 of the decoded bytes, as WeCom checks it
//! (an `md5` given in the content must match). Text content is at most 2048 bytes.
//!
//! Invariants: the content is checked before the call (`bad-content`); errors come from the body
//! (`errcode`): 45009 is "too fast" (the robot takes about 20 messages a minute: retried after a
//! minute, the profile held back), -1 (`wecombot-busy`) retries, others (93000 bad key, 40008 bad
//! message type…) fail; the key is scrubbed from every text and transport errors lose their URL.
//! The robot returns no message id.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::codes;
use super::provider::body::{Class, ErrorTable};
use super::provider::media::{self, Limits, PNG_JPEG};
use super::provider::read_response;
use super::redact::{self, Redactor};
use super::wechat::{
    answer, bad_content, base_url, client, required_secret, ERRCODE, MAX_RESPONSE_BYTES,
};
use super::wecom::without_whitespace;
use super::{Connector, DeliveryError, OutboxMessage, Receipt};
use crate::settings::{ConfigError, Dur, ProfileContext, Secret, SecretSource};

const DEFAULT_BASE_URL: &str = "https://qyapi.weixin.qq.com";
const MAX_TEXT_BYTES: usize = 2048;
/// The robot's image: JPG/PNG, at most 2 MB before base64.
const PICTURES: Limits = Limits {
    provider: "the WeCom robot",
    max_bytes: 2 * 1024 * 1024,
    types: PNG_JPEG,
};
/// How long a 45009 holds the profile back: the robot's limit is per minute.
const TOO_FAST_BLOCK: Duration = Duration::from_secs(60);

/// A `wecombot` profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WecombotConfig {
    /// The robot's webhook key (the `key=` of its URL), inline (avoid)…
    pub key: Option<Secret>,
    /// …or the name of an environment variable holding it…
    pub key_env: Option<String>,
    /// …or the path of a file holding it. One of the three is required.
    pub key_file: Option<PathBuf>,
    /// Base URL of the API. Default `https://qyapi.weixin.qq.com`.
    pub base_url: Option<String>,
    /// Request timeout (common key). Default 30s.
    pub timeout: Option<Dur>,
}

pub struct WecombotConnector {
    name: String,
    client: reqwest::Client,
    url: String,
    key: Secret,
    redactor: Redactor,
}

/// The robot's `errcode`s (providers.md §2.3).
const ERRORS: ErrorTable = ErrorTable {
    prefix: "wecombot",
    field: ERRCODE,
    message: &["/errmsg"],
    codes: &[("-1", Class::Retry), ("45009", Class::Retry)],
    default: Class::Permanent,
};

impl WecombotConnector {
    pub fn new(ctx: &ProfileContext, cfg: &WecombotConfig) -> Result<Self, ConfigError> {
        let key = required_secret(
            ctx,
            "key",
            SecretSource::of(&cfg.key, &cfg.key_env, &cfg.key_file),
        )?;
        let base = base_url(ctx, &cfg.base_url, DEFAULT_BASE_URL)?;
        let mut redactor = Redactor::new();
        redactor.add(key.expose());
        Ok(WecombotConnector {
            name: format!("wecombot/{}", ctx.profile),
            client: client(ctx, cfg.timeout)?,
            url: format!("{base}/cgi-bin/webhook/send"),
            key,
            redactor,
        })
    }
}

fn md5_hex(bytes: &[u8]) -> String {
    use md5::{Digest, Md5};
    Md5::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn strings(v: Option<&Value>, path: &str) -> Result<Option<Value>, DeliveryError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
            Ok(Some(Value::Array(a.clone())))
        }
        Some(_) => Err(bad_content(format!("{path} must be an array of strings"))),
    }
}

fn text_of(part: &Map<String, Value>, path: &str) -> Result<String, DeliveryError> {
    let t = part
        .get("content")
        .and_then(Value::as_str)
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| bad_content(format!("{path}.content is required (a string)")))?;
    Ok(t.to_string())
}

/// The webhook body of a content (see the module doc).
fn build_body(content: &str) -> Result<Value, DeliveryError> {
    let v: Value = serde_json::from_str(content)
        .map_err(|e| bad_content(format!("content is not JSON: {e}")))?;
    let msgtype = v
        .get("msgtype")
        .and_then(Value::as_str)
        .ok_or_else(|| bad_content("content has no msgtype"))?;
    if let Some(k) = v
        .as_object()
        .and_then(|o| o.keys().find(|k| *k != "msgtype" && *k != msgtype))
    {
        return Err(bad_content(format!(
            "unknown field \"{k}\" for msgtype {msgtype}"
        )));
    }
    let part = v
        .get(msgtype)
        .and_then(Value::as_object)
        .ok_or_else(|| bad_content(format!("msgtype {msgtype} needs a \"{msgtype}\" object")))?;
    let part = match msgtype {
        "text" => {
            let text = text_of(part, "text")?;
            if text.len() > MAX_TEXT_BYTES {
                return Err(bad_content(format!(
                    "text.content is {} bytes; the robot takes at most {MAX_TEXT_BYTES}",
                    text.len()
                )));
            }
            let mut out = json!({ "content": text });
            for k in ["mentioned_list", "mentioned_mobile_list"] {
                if let Some(list) = strings(part.get(k), &format!("text.{k}"))? {
                    out[k] = list;
                }
            }
            out
        }
        "markdown" => json!({ "content": text_of(part, "markdown")? }),
        "image" => {
            let data = without_whitespace(
                part.get("base64")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad_content("image.base64 is required"))?,
            );
            let bytes = B64
                .decode(&data)
                .map_err(|e| bad_content(format!("image.base64 is not base64: {e}")))?;
            if bytes.is_empty() {
                return Err(bad_content("image.base64 is empty"));
            }
            let md5 = md5_hex(&bytes);
            if bytes.len() > PICTURES.max_bytes {
                return Err(DeliveryError::permanent(
                    codes::IMAGE_TOO_LARGE.code,
                    format!(
                        "image is {} bytes; the WeCom robot takes at most {}",
                        bytes.len(),
                        PICTURES.max_bytes
                    ),
                ));
            }
            if let Some(given) = part.get("md5").and_then(Value::as_str) {
                if !given.eq_ignore_ascii_case(&md5) {
                    return Err(bad_content(format!(
                        "image.md5 {given} is not the MD5 of the image ({md5})"
                    )));
                }
            }
            json!({ "base64": data, "md5": md5 })
        }
        "news" => {
            let articles = part
                .get("articles")
                .and_then(Value::as_array)
                .filter(|a| !a.is_empty())
                .ok_or_else(|| bad_content("news.articles must be a non-empty array"))?;
            for (i, a) in articles.iter().enumerate() {
                for k in ["title", "url"] {
                    if !a.get(k).is_some_and(Value::is_string) {
                        return Err(bad_content(format!("news.articles[{i}].{k} is required")));
                    }
                }
            }
            json!({ "articles": articles })
        }
        other => {
            return Err(bad_content(format!(
                "msgtype {other} is not supported (text, markdown, image, news)"
            )))
        }
    };
    let mut body = json!({ "msgtype": msgtype });
    body[msgtype] = part;
    Ok(body)
}

#[async_trait]
impl Connector for WecombotConnector {
    fn name(&self) -> &str {
        &self.name
    }

    async fn deliver(&self, msg: &OutboxMessage) -> Result<Receipt, DeliveryError> {
        self.redactor.result(self.deliver_inner(msg).await)
    }
}

impl WecombotConnector {
    async fn deliver_inner(&self, msg: &OutboxMessage) -> Result<Receipt, DeliveryError> {
        let body = match media::picture(msg, &PICTURES)? {
            Some(img) => json!({"msgtype": "image", "image": {
                "base64": B64.encode(&img.bytes), "md5": md5_hex(&img.bytes)}}),
            None => build_body(msg.content_required()?)?,
        };
        let resp = self
            .client
            .post(&self.url)
            .query(&[("key", self.key.expose())])
            .json(&body)
            .send()
            .await
            .map_err(|e| redact::send_error(&e))?;
        let (status, headers, text) = read_response(resp, MAX_RESPONSE_BYTES).await?;
        answer(
            status,
            &headers,
            &text,
            &ERRORS,
            codes::WECOMBOT_BAD_RESPONSE,
        )
        .map_err(|e| {
            if e.code() == codes::family(codes::WECOMBOT_ERROR, "45009") {
                DeliveryError::too_fast(e.code(), e.reason(), TOO_FAST_BLOCK).with_status(200u16)
            } else {
                e
            }
        })?;
        Ok(Receipt {
            provider_id: None,
            remote_status: Some(status.as_u16().into()),
            reply: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderMap;
    use reqwest::StatusCode;

    #[test]
    fn image_bodies_carry_the_md5_of_the_raw_bytes() {
        let b = build_body(r#"{"msgtype":"image","image":{"base64":"aGVsbG8="}}"#).unwrap();
        // md5("hello")
        assert_eq!(
            b,
            json!({"msgtype":"image","image":{"base64":"aGVsbG8=","md5":"5d41402abc4b2a76b9719d911017c592"}})
        );
        // PostgreSQL's encode() breaks lines: they are removed.
        let wrapped = build_body(r#"{"msgtype":"image","image":{"base64":"aGVs\nbG8="}}"#).unwrap();
        assert_eq!(wrapped, b);
        let e = build_body(r#"{"msgtype":"image","image":{"base64":"aGVsbG8=","md5":"00"}}"#)
            .unwrap_err();
        assert_eq!(e.code(), "bad-content");
    }

    #[test]
    fn text_markdown_and_news() {
        let b = build_body(
            r#"{"msgtype":"text","text":{"content":"hi","mentioned_list":["@all"],"mentioned_mobile_list":["13800001111"]}}"#,
        )
        .unwrap();
        assert_eq!(
            b,
            json!({"msgtype":"text","text":{"content":"hi","mentioned_list":["@all"],
                   "mentioned_mobile_list":["13800001111"]}})
        );
        let b = build_body(r#"{"msgtype":"markdown","markdown":{"content":"**x**"}}"#).unwrap();
        assert_eq!(b["markdown"]["content"], "**x**");
        let b = build_body(
            r#"{"msgtype":"news","news":{"articles":[{"title":"T","url":"https://u"}]}}"#,
        )
        .unwrap();
        assert_eq!(b["news"]["articles"][0]["title"], "T");
        for bad in [
            "x",
            r#"{"msgtype":"file","file":{"media_id":"m"}}"#,
            r#"{"msgtype":"text","text":{"content":"hi","mentioned_list":"a"}}"#,
            r#"{"msgtype":"text","text":{"content":"hi"},"extra":1}"#,
            r#"{"msgtype":"news","news":{"articles":[]}}"#,
            r#"{"msgtype":"image","image":{"base64":"!!"}}"#,
        ] {
            assert_eq!(build_body(bad).unwrap_err().code(), "bad-content", "{bad}");
        }
    }

    #[test]
    fn errcodes() {
        let h = HeaderMap::new();
        let ok = StatusCode::OK;
        let bad = codes::WECOMBOT_BAD_RESPONSE;
        assert!(answer(ok, &h, r#"{"errcode":0,"errmsg":"ok"}"#, &ERRORS, bad).is_ok());
        let e = answer(
            ok,
            &h,
            r#"{"errcode":93000,"errmsg":"invalid webhook url"}"#,
            &ERRORS,
            bad,
        )
        .unwrap_err();
        assert_eq!((e.code(), e.is_retry()), ("wecombot-93000", false));
        let e = answer(
            ok,
            &h,
            r#"{"errcode":45009,"errmsg":"too fast"}"#,
            &ERRORS,
            bad,
        )
        .unwrap_err();
        assert_eq!((e.code(), e.is_retry()), ("wecombot-45009", true));
    }

    #[test]
    fn the_example_profile_parses() {
        let text = include_str!("../../conf/wecombot.conf");
        let profiles =
            crate::config::parse_profiles("wecombot", text, "conf/wecombot.conf").unwrap();
        assert_eq!(profiles.len(), 1);
    }
}
