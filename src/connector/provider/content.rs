//! Message contents of the chat platforms: a JSON object of the platform's fields, or plain text
//! that becomes the text field; and the checks a body builder makes before anything is sent, so a
//! malformed message fails with `bad-content` (or `bad-address`) instead of a provider's 400.
//!
//! Invariant: a content whose first non-blank character is `{` is meant as JSON and must parse as
//! an object; anything else is text, sent as it is.

use serde_json::{Map, Value};

use super::json_scalar;
use crate::connector::{codes, DeliveryError};

/// A `bad-content` permanent error.
pub fn bad_content(reason: impl Into<String>) -> DeliveryError {
    DeliveryError::permanent(codes::BAD_CONTENT.code, reason)
}

/// The content as a JSON object; plain text as `{text_key: content}`.
pub fn object_or_text(content: &str, text_key: &str) -> Result<Map<String, Value>, DeliveryError> {
    if !content.trim_start().starts_with('{') {
        let mut m = Map::new();
        m.insert(text_key.into(), Value::String(content.into()));
        return Ok(m);
    }
    match serde_json::from_str::<Value>(content) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(bad_content("content must be a JSON object or plain text")),
        Err(e) => Err(bad_content(format!("content is not valid JSON: {e}"))),
    }
}

/// What a JSON value is, for error texts.
pub fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Checks that `key`, when present, is a non-empty string (`required`: that it is present).
pub fn check_string(
    m: &Map<String, Value>,
    key: &str,
    required: bool,
) -> Result<(), DeliveryError> {
    match m.get(key) {
        None if !required => Ok(()),
        None => Err(bad_content(format!("content has no \"{key}\""))),
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(()),
        Some(Value::String(_)) => Err(bad_content(format!("\"{key}\" is empty"))),
        Some(v) => Err(bad_content(format!(
            "\"{key}\" must be a string, not {}",
            json_kind(v)
        ))),
    }
}

/// Checks that `key`, when present, has the JSON type `want` tests for (`what` names it).
pub fn check_type(
    m: &Map<String, Value>,
    key: &str,
    want: fn(&Value) -> bool,
    what: &str,
) -> Result<(), DeliveryError> {
    match m.get(key) {
        Some(v) if !want(v) => Err(bad_content(format!(
            "\"{key}\" must be {what}, not {}",
            json_kind(v)
        ))),
        _ => Ok(()),
    }
}

/// Sets the recipient field `key` from the message's address: a content that names another
/// recipient there is refused (the address is the one place a recipient is written).
pub fn set_recipient(
    m: &mut Map<String, Value>,
    key: &str,
    address: Value,
) -> Result<(), DeliveryError> {
    if let Some(v) = m.get(key) {
        // `"42"` and `42` name the same chat.
        if json_scalar(v) != json_scalar(&address) {
            return Err(bad_content(format!(
                "content names \"{key}\" {v}, the message's address says {address}: leave it out \
                 of the content"
            )));
        }
    }
    m.insert(key.into(), address);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn text_or_a_json_object() {
        assert_eq!(
            Value::Object(object_or_text("hello {x}", "text").unwrap()),
            json!({"text": "hello {x}"})
        );
        assert_eq!(
            Value::Object(object_or_text(" {\"a\":1}", "text").unwrap()),
            json!({"a": 1})
        );
        let e = object_or_text("{broken", "text").unwrap_err();
        assert_eq!(e.code(), "bad-content");
        assert!(!e.is_retry());
    }

    #[test]
    fn fields_are_checked() {
        let m = object_or_text(r#"{"text":"", "n": 1, "blocks": {}}"#, "text").unwrap();
        assert!(check_string(&m, "text", true).is_err());
        assert!(check_string(&m, "n", false).is_err());
        assert!(check_string(&m, "absent", false).is_ok());
        assert!(check_string(&m, "absent", true).is_err());
        assert!(check_type(&m, "blocks", Value::is_array, "an array").is_err());
        assert!(check_type(&m, "n", Value::is_number, "a number").is_ok());
    }

    #[test]
    fn the_address_is_the_recipient() {
        let mut m = object_or_text(r#"{"chat_id":"42"}"#, "text").unwrap();
        set_recipient(&mut m, "chat_id", json!(42)).unwrap();
        assert_eq!(m["chat_id"], json!(42));
        let mut m = object_or_text(r#"{"channel":"C1"}"#, "text").unwrap();
        let e = set_recipient(&mut m, "channel", json!("C2")).unwrap_err();
        assert_eq!(e.code(), "bad-content");
    }
}
