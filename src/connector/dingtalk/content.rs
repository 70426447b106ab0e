//! What a dingtalk message says: its recipients (the address) and its `msg` (the content), with
//! the inline media to upload first. Checked before any network call.

use base64::Engine;
use serde_json::{json, Value};

use crate::connector::{codes, DeliveryError};

/// Where a message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recipients {
    /// `chat/send` into this chat.
    Chat(String),
    /// A work notification.
    Notice {
        users: Vec<String>,
        depts: Vec<String>,
        all: bool,
    },
}

fn bad_address(reason: impl Into<String>) -> DeliveryError {
    DeliveryError::permanent(codes::BAD_ADDRESS.code, reason)
}

pub(super) fn bad_content(reason: impl Into<String>) -> DeliveryError {
    DeliveryError::permanent(codes::BAD_CONTENT.code, reason)
}

/// Parses an address (see the module docs).
pub fn parse_address(address: &str) -> Result<Recipients, DeliveryError> {
    let address = address.trim();
    if let Some(chat) = address.strip_prefix("chat:") {
        let chat = chat.trim();
        if chat.is_empty() || chat.contains([';', ',']) {
            return Err(bad_address("chat:<chatid> names one chat"));
        }
        return Ok(Recipients::Chat(chat.to_string()));
    }
    let (mut users, mut depts, mut all) = (Vec::new(), Vec::new(), false);
    let list = |s: &str| -> Vec<String> {
        s.split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(str::to_string)
            .collect()
    };
    for part in address.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        if part == "all" {
            all = true;
        } else if let Some(d) = part.strip_prefix("depts:").or(part.strip_prefix("dept:")) {
            let d = list(d);
            if let Some(x) = d.iter().find(|x| !x.bytes().all(|b| b.is_ascii_digit())) {
                return Err(bad_address(format!(
                    "department id \"{x}\" is not a number"
                )));
            }
            depts.extend(d);
        } else if part.starts_with("chat:") {
            return Err(bad_address(
                "chat:<chatid> cannot be combined with other recipients",
            ));
        } else {
            users.extend(list(part.strip_prefix("users:").unwrap_or(part)));
        }
    }
    if users.is_empty() && depts.is_empty() && !all {
        return Err(bad_address(
            "no recipient: give users:<ids>, depts:<ids>, all or chat:<chatid>",
        ));
    }
    Ok(Recipients::Notice { users, depts, all })
}

/// A media part to upload before sending: (msgtype, its bytes, file name).
pub(super) struct Upload {
    pub(super) kind: String,
    pub(super) data: Vec<u8>,
    pub(super) filename: String,
}

/// The `msg` of a content, and the media it carries inline (to upload first).
pub(super) fn prepare_msg(content: &str) -> Result<(Value, Option<Upload>), DeliveryError> {
    let msg = match serde_json::from_str::<Value>(content) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            return Ok((
                json!({"msgtype": "text", "text": {"content": content}}),
                None,
            ))
        }
    };
    let msgtype = msg
        .get("msgtype")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| bad_content("content has no \"msgtype\""))?
        .to_string();
    if !msg.get(&msgtype).is_some_and(Value::is_object) {
        return Err(bad_content(format!(
            "msgtype {msgtype} needs a \"{msgtype}\" object"
        )));
    }
    if msgtype == "text"
        && !msg
            .pointer("/text/content")
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty())
    {
        return Err(bad_content("text.content must be a non-empty string"));
    }
    let mut upload = None;
    if matches!(msgtype.as_str(), "image" | "file" | "voice") {
        let part = &msg[&msgtype];
        match (part.get("media_id"), part.get("base64")) {
            (Some(_), None) => {}
            (None, Some(b64)) => {
                let data = b64
                    .as_str()
                    .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
                    .filter(|d| !d.is_empty())
                    .ok_or_else(|| bad_content(format!("{msgtype}.base64 is not base64")))?;
                let default = if msgtype == "image" {
                    "image.png"
                } else {
                    "file"
                };
                let filename = part
                    .get("filename")
                    .and_then(Value::as_str)
                    .unwrap_or(default)
                    .to_string();
                upload = Some(Upload {
                    kind: msgtype.clone(),
                    data,
                    filename,
                });
            }
            _ => {
                return Err(bad_content(format!(
                    "{msgtype} needs exactly one of media_id and base64"
                )))
            }
        }
    }
    Ok((msg, upload))
}
