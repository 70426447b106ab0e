//! "200 with an error body": providers that answer HTTP 200 and say in the body that the call
//! failed (`errcode` ≠ 0, `ok: false` with `error`, `Code` ≠ `OK`, `errorCode` ≠ 0). A connector
//! declares where its code lives and its own error table; [`ErrorTable::check`] turns a body into
//! `Ok(())` or the classified [`DeliveryError`] (`<prefix>-<code in kebab case>`).

use serde_json::Value;

use super::{json_scalar, kebab, truncate};
use crate::connector::DeliveryError;

/// What a provider's error code means for the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Transient: try again later.
    Retry,
    /// Final: the message fails.
    Permanent,
    /// The access token was rejected: refresh it and resend once (see [`super::token`]); a
    /// second time it is a retryable `token-invalid`.
    TokenInvalid,
}

/// Where a body says whether the call failed.
#[derive(Debug, Clone, Copy)]
pub enum Field {
    /// The code at a JSON pointer; absent or one of `success` is a success (`/errcode` with `0`,
    /// `/Code` with `OK`, `/errorCode` with `0`).
    Code {
        pointer: &'static str,
        success: &'static [&'static str],
    },
    /// A boolean at `ok` (`false` is a failure) and the code at `code` (Slack: `/ok`, `/error`).
    OkFlag {
        ok: &'static str,
        code: &'static str,
    },
}

/// A provider's body-level error table.
#[derive(Debug, Clone, Copy)]
pub struct ErrorTable {
    /// Prefix of the stable codes (`sba` → `sba-7`).
    pub prefix: &'static str,
    pub field: Field,
    /// JSON pointers tried in order for the human-readable message.
    pub message: &'static [&'static str],
    /// Known codes and their class; a code not listed gets `default`.
    pub codes: &'static [(&'static str, Class)],
    pub default: Class,
}

/// A failure read from a body: the provider's code, its class and its message.
#[derive(Debug, Clone, PartialEq)]
pub struct BodyError {
    pub code: String,
    pub class: Class,
    pub message: String,
}

impl ErrorTable {
    /// The failure a parsed body reports, `None` when it reports none.
    pub fn find(&self, v: &Value) -> Option<BodyError> {
        let code = match self.field {
            Field::Code { pointer, success } => {
                let code = json_scalar(v.pointer(pointer)?).trim().to_string();
                if code.is_empty() || success.contains(&code.as_str()) {
                    return None;
                }
                code
            }
            Field::OkFlag { ok, code } => {
                if v.pointer(ok).and_then(Value::as_bool) != Some(false) {
                    return None;
                }
                v.pointer(code)
                    .map(json_scalar)
                    .unwrap_or_else(|| "unknown".into())
            }
        };
        let class = self
            .codes
            .iter()
            .find(|(c, _)| *c == code)
            .map_or(self.default, |(_, k)| *k);
        let message = self
            .message
            .iter()
            .find_map(|p| v.pointer(p).and_then(Value::as_str))
            .unwrap_or("(no message)")
            .to_string();
        Some(BodyError {
            code,
            class,
            message,
        })
    }

    /// The stable code of a provider code: `<prefix>-<kebab>`.
    pub fn stable_code(&self, code: &str) -> String {
        format!("{}-{}", self.prefix, kebab(code))
    }

    /// The [`DeliveryError`] of a failure (a [`Class::TokenInvalid`] one is a retryable
    /// `token-invalid`).
    pub fn error(&self, e: &BodyError) -> DeliveryError {
        let reason = truncate(&e.message, 256).to_string();
        match e.class {
            Class::Retry => DeliveryError::retry(self.stable_code(&e.code), reason),
            Class::Permanent => DeliveryError::permanent(self.stable_code(&e.code), reason),
            Class::TokenInvalid => DeliveryError::retry(
                crate::connector::codes::TOKEN_INVALID.code,
                format!("{}: {reason}", e.code),
            ),
        }
    }

    /// `Ok(())` for a body that reports no failure (or is not JSON), else the classified error.
    pub fn check(&self, body: &str) -> Result<(), DeliveryError> {
        let Ok(v) = serde_json::from_str::<Value>(body) else {
            return Ok(());
        };
        match self.find(&v) {
            None => Ok(()),
            Some(e) => Err(self.error(&e)),
        }
    }

    /// Whether a body carries one of the table's token-invalid codes (the signal for
    /// [`super::token::call_with_token`]).
    pub fn is_token_invalid(&self, body: &str) -> bool {
        serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|v| self.find(&v))
            .is_some_and(|e| e.class == Class::TokenInvalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WECHAT_LIKE: ErrorTable = ErrorTable {
        prefix: "wx",
        field: Field::Code {
            pointer: "/errcode",
            success: &["0"],
        },
        message: &["/errmsg"],
        codes: &[
            ("40001", Class::TokenInvalid),
            ("45009", Class::Retry),
            ("43004", Class::Permanent),
        ],
        default: Class::Permanent,
    };

    const SLACK_LIKE: ErrorTable = ErrorTable {
        prefix: "slack",
        field: Field::OkFlag {
            ok: "/ok",
            code: "/error",
        },
        message: &["/error"],
        codes: &[("ratelimited", Class::Retry)],
        default: Class::Permanent,
    };

    #[test]
    fn code_fields_are_read_and_classified_by_the_table() {
        assert_eq!(WECHAT_LIKE.check(r#"{"errcode":0,"errmsg":"ok"}"#), Ok(()));
        assert_eq!(WECHAT_LIKE.check(r#"{"msgid":1}"#), Ok(()));
        assert_eq!(WECHAT_LIKE.check("not json"), Ok(()));
        let e = WECHAT_LIKE
            .check(r#"{"errcode":45009,"errmsg":"too fast"}"#)
            .unwrap_err();
        assert_eq!(e, DeliveryError::retry("wx-45009", "too fast"));
        let e = WECHAT_LIKE.check(r#"{"errcode":43004,"errmsg":"unfollowed"}"#);
        assert!(matches!(e, Err(DeliveryError::Permanent { code, .. }) if code == "wx-43004"));
        let e = WECHAT_LIKE
            .check(r#"{"errcode":1,"errmsg":"?"}"#)
            .unwrap_err();
        assert!(!e.is_retry(), "unknown codes take the default");
        let e = WECHAT_LIKE.check(r#"{"errcode":40001,"errmsg":"invalid credential"}"#);
        assert_eq!(e.unwrap_err().code(), "token-invalid");
        assert!(WECHAT_LIKE.is_token_invalid(r#"{"errcode":40001}"#));
        assert!(!WECHAT_LIKE.is_token_invalid(r#"{"errcode":45009}"#));
    }

    #[test]
    fn ok_flags_are_read_and_classified_by_the_table() {
        assert_eq!(SLACK_LIKE.check(r#"{"ok":true}"#), Ok(()));
        let e = SLACK_LIKE
            .check(r#"{"ok":false,"error":"ratelimited"}"#)
            .unwrap_err();
        assert_eq!(e, DeliveryError::retry("slack-ratelimited", "ratelimited"));
        let e = SLACK_LIKE
            .check(r#"{"ok":false,"error":"channel_not_found"}"#)
            .unwrap_err();
        assert_eq!(e.code(), "slack-channel-not-found");
        assert!(!e.is_retry());
    }
}
