//! The three forms an SMTP message's `content` may take, and how each becomes the bytes sent after
//! DATA. See `### SMTP content forms` in the README and conf/smtp.conf.
//!
//! 1. A complete RFC 5322 message (Apostol builds MIME in SQL): sent as is, only bare LFs become
//!    CRLF (RFC 5321 §2.3.8 forbids bare LF).
//! 2. A JSON object with at least one known key (`text`, `html`, `subject`, `to`, `cc`, `bcc`,
//!    `reply_to`, `headers`): a MIME message is built from it.
//! 3. Anything else: the body, HTML when it starts with a tag (then sent as text + HTML
//!    alternative), plain text otherwise, with the message's `subject`.
//!
//! Invariants: detection never fails, building may: a JSON form that does not match its schema is
//! `bad-content`, an address that does not parse is `bad-address`, both permanent.

use crate::connector::codes;
use std::collections::BTreeMap;

use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, Mailboxes, MultiPart, SinglePart};
use lettre::Message;
use serde::Deserialize;

use crate::connector::DeliveryError;

/// Keys whose presence marks a JSON object as the JSON form.
pub const JSON_KEYS: &[&str] = &[
    "text", "html", "subject", "to", "cc", "bcc", "reply_to", "headers",
];

/// Header names whose presence at the top marks content as a complete RFC 5322 message.
const MESSAGE_HEADERS: &[&str] = &[
    "from",
    "to",
    "cc",
    "bcc",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "reply-to",
    "sender",
    "return-path",
    "received",
    "in-reply-to",
    "references",
];

/// Headers the JSON form may not set: the connector writes them itself.
const RESERVED_HEADERS: &[&str] = &[
    "from",
    "to",
    "cc",
    "bcc",
    "subject",
    "reply-to",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
];

/// The detected form of a content.
#[derive(Debug, Clone, PartialEq)]
pub enum Form<'a> {
    /// A complete RFC 5322 message.
    Raw(&'a str),
    /// The JSON form (parsed, not yet checked against the schema).
    Json(serde_json::Value),
    /// A JSON-looking text that failed to parse but names known keys: most likely a broken form.
    BrokenJson(String),
    /// A plain text or HTML body.
    Body(&'a str),
}

/// Decides which form `content` is in.
pub fn detect(content: &str) -> Form<'_> {
    let trimmed = content.trim_start();
    if trimmed.starts_with('{') {
        match serde_json::from_str::<serde_json::Value>(content) {
            Ok(v @ serde_json::Value::Object(_)) => {
                let known = v
                    .as_object()
                    .is_some_and(|o| o.keys().any(|k| JSON_KEYS.contains(&k.as_str())));
                if known {
                    return Form::Json(v);
                }
            }
            Ok(_) => {}
            Err(e) => {
                // A text that merely starts with "{" is a body; one that quotes our keys was meant
                // as the JSON form and must not go out as literal JSON.
                let meant = JSON_KEYS
                    .iter()
                    .any(|k| trimmed.contains(&format!("\"{k}\"")));
                if meant {
                    return Form::BrokenJson(e.to_string());
                }
            }
        }
    }
    if is_rfc5322(content) {
        return Form::Raw(content);
    }
    Form::Body(content)
}

/// True when `content` opens with a header section (field lines and folded continuations) that
/// ends at a blank line and contains at least one header a message has.
pub fn is_rfc5322(content: &str) -> bool {
    let mut saw_known = false;
    let mut saw_field = false;
    for line in content.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            return saw_field && saw_known;
        }
        if line.starts_with([' ', '\t']) {
            // Folded continuation of the previous field (RFC 5322 §2.2.3).
            if !saw_field {
                return false;
            }
            continue;
        }
        let Some((name, _)) = line.split_once(':') else {
            return false;
        };
        // field-name = 1*ftext, printable US-ASCII except ":" (RFC 5322 §3.6.8).
        if name.is_empty() || !name.bytes().all(|b| (33..=126).contains(&b)) {
            return false;
        }
        saw_field = true;
        saw_known |= MESSAGE_HEADERS.contains(&name.to_ascii_lowercase().as_str());
    }
    false
}

/// A raw message as sent: bare LF become CRLF, and one final CRLF is dropped because the client
/// writes `CRLF . CRLF` after the data (RFC 5321 §4.1.1.4), so the server stores exactly `content`.
pub fn raw_bytes(content: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 64);
    let mut prev = 0u8;
    for &b in content.as_bytes() {
        if b == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        prev = b;
    }
    if out.ends_with(b"\r\n") {
        out.truncate(out.len() - 2);
    }
    out
}

/// The value of the first `name:` header of a raw message (unfolded), if any.
pub fn raw_header(content: &str, name: &str) -> Option<String> {
    let mut value: Option<String> = None;
    for line in content.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            if let Some(v) = value.as_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
            continue;
        }
        if value.is_some() {
            break;
        }
        if let Some((n, v)) = line.split_once(':') {
            if n.trim().eq_ignore_ascii_case(name) {
                value = Some(v.trim().to_string());
            }
        }
    }
    value.map(|v| v.trim().to_string())
}

/// Recipients written as one comma-separated string or as a list of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Recipients {
    One(String),
    Many(Vec<String>),
}

impl Recipients {
    fn parse(&self, key: &str) -> Result<Vec<Mailbox>, DeliveryError> {
        match self {
            Recipients::One(s) => parse_mailboxes(s, key),
            Recipients::Many(list) => {
                let mut out = Vec::new();
                for s in list {
                    out.extend(parse_mailboxes(s, key)?);
                }
                Ok(out)
            }
        }
    }
}

/// The JSON form. Unknown keys are rejected so a typo (`"bbc"`) does not silently drop recipients.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonForm {
    /// Overrides the message's `subject` column.
    pub subject: Option<String>,
    /// Plain-text body.
    pub text: Option<String>,
    /// HTML body; with `text`, both go out as multipart/alternative.
    pub html: Option<String>,
    /// More `To:` recipients, on top of the message's `address`.
    pub to: Option<Recipients>,
    pub cc: Option<Recipients>,
    /// Envelope-only recipients: never written into the headers.
    pub bcc: Option<Recipients>,
    pub reply_to: Option<Recipients>,
    /// Extra header fields (`X-…`, `List-Unsubscribe`, `In-Reply-To`, …).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// Parses a comma-separated address list (`a@x, "Name" <b@y>`); empty items are skipped.
pub fn parse_mailboxes(s: &str, key: &str) -> Result<Vec<Mailbox>, DeliveryError> {
    // RFC 5322 lists use ","; Apostol users also write ";".
    let s = s.trim().trim_end_matches([',', ';']);
    if s.is_empty() {
        return Ok(Vec::new());
    }
    let parsed = s.parse::<Mailboxes>().or_else(|_| {
        let normalised = s.replace(';', ",");
        normalised.parse::<Mailboxes>()
    });
    parsed.map(|m| m.into_iter().collect()).map_err(|_| {
        DeliveryError::permanent(
            codes::BAD_ADDRESS.code,
            format!("{key}: invalid address list \"{s}\""),
        )
    })
}

/// What a built message needs besides its body.
pub struct Envelope<'a> {
    pub from: &'a Mailbox,
    pub to: Vec<Mailbox>,
    pub subject: Option<&'a str>,
    pub message_id: String,
}

/// A message ready to send: bytes after DATA and the recipients the envelope must carry besides
/// the `to` ones.
pub struct Built {
    pub bytes: Vec<u8>,
    pub to: Vec<Mailbox>,
    pub extra_rcpt: Vec<Mailbox>,
}

/// Builds a MIME message from the JSON form.
pub fn build_json(v: serde_json::Value, env: Envelope<'_>) -> Result<Built, DeliveryError> {
    let form: JsonForm = serde_json::from_value(v).map_err(|e| {
        DeliveryError::permanent(
            codes::BAD_CONTENT.code,
            format!("invalid JSON content form: {e}"),
        )
    })?;
    if form.text.is_none() && form.html.is_none() {
        return Err(DeliveryError::permanent(
            codes::BAD_CONTENT.code,
            "the JSON content form needs \"text\" or \"html\"",
        ));
    }
    let mut to = env.to;
    if let Some(r) = &form.to {
        to.extend(r.parse("to")?);
    }
    let cc = form.cc.as_ref().map(|r| r.parse("cc")).transpose()?;
    let bcc = form.bcc.as_ref().map(|r| r.parse("bcc")).transpose()?;
    let reply_to = form
        .reply_to
        .as_ref()
        .map(|r| r.parse("reply_to"))
        .transpose()?;
    let mut extra = Vec::new();
    let mut b = Message::builder()
        .from(env.from.clone())
        .subject(form.subject.as_deref().or(env.subject).unwrap_or(""))
        .message_id(Some(env.message_id));
    for m in &to {
        b = b.to(m.clone());
    }
    for m in cc.into_iter().flatten() {
        extra.push(m.clone());
        b = b.cc(m);
    }
    extra.extend(bcc.into_iter().flatten());
    for m in reply_to.into_iter().flatten() {
        b = b.reply_to(m);
    }
    for (k, v) in &form.headers {
        if RESERVED_HEADERS.contains(&k.to_ascii_lowercase().as_str()) {
            return Err(DeliveryError::permanent(
                codes::BAD_CONTENT.code,
                format!("headers: \"{k}\" is set by the connector (use the matching key)"),
            ));
        }
        if v.contains(['\r', '\n']) {
            return Err(DeliveryError::permanent(
                codes::BAD_CONTENT.code,
                format!("headers: the value of \"{k}\" contains a line break"),
            ));
        }
        let name = HeaderName::new_from_ascii(k.clone()).map_err(|_| {
            DeliveryError::permanent(
                codes::BAD_CONTENT.code,
                format!("headers: invalid name \"{k}\""),
            )
        })?;
        b = b.raw_header(HeaderValue::new(name, v.clone()));
    }
    let message = match (form.text, form.html) {
        (Some(t), Some(h)) => b.multipart(MultiPart::alternative_plain_html(t, h)),
        (Some(t), None) => b.singlepart(SinglePart::plain(t)),
        (None, Some(h)) => b.multipart(MultiPart::alternative_plain_html(html_to_text(&h), h)),
        (None, None) => unreachable!("checked above"),
    };
    finish(message, to, extra)
}

/// Builds a MIME message from a plain text or HTML body.
pub fn build_body(body: &str, env: Envelope<'_>) -> Result<Built, DeliveryError> {
    let mut b = Message::builder()
        .from(env.from.clone())
        .subject(env.subject.unwrap_or(""))
        .message_id(Some(env.message_id));
    for m in &env.to {
        b = b.to(m.clone());
    }
    let message = if looks_like_html(body) {
        b.multipart(MultiPart::alternative_plain_html(
            html_to_text(body),
            body.to_string(),
        ))
    } else {
        b.singlepart(SinglePart::plain(body.to_string()))
    };
    finish(message, env.to, Vec::new())
}

/// Builds a mail that shows pictures (a rendered card): `multipart/mixed` of a
/// `multipart/related` (the text, an HTML part showing each picture inline by `cid:`, and the
/// pictures) and each picture again as an attachment, for clients that hide inline parts.
pub fn build_with_images(
    text: &str,
    images: &[std::sync::Arc<crate::connector::Image>],
    env: Envelope<'_>,
) -> Result<Built, DeliveryError> {
    use lettre::message::{header::ContentType, Attachment};
    let mut b = Message::builder()
        .from(env.from.clone())
        .subject(env.subject.unwrap_or(""))
        .message_id(Some(env.message_id.clone()));
    for m in &env.to {
        b = b.to(m.clone());
    }
    // The Content-ID of picture i: unique per message (`card1.<message id>`).
    let id = env.message_id.trim_matches(['<', '>']);
    let cid = |i: usize| format!("card{}.{id}", i + 1);
    let content_type = |mime: &str| {
        ContentType::parse(mime).map_err(|_| {
            DeliveryError::permanent(
                codes::BAD_CONTENT.code,
                format!("bad image type \"{mime}\""),
            )
        })
    };
    let alt = escape_html(text.lines().next().unwrap_or(""));
    let mut html = String::from("<!DOCTYPE html>\n<html><body>\n");
    for (i, img) in images.iter().enumerate() {
        html.push_str(&format!(
            "<p><img src=\"cid:{}\" width=\"{}\" height=\"{}\" alt=\"{alt}\" style=\"max-width:100%;height:auto\"></p>\n",
            cid(i),
            img.width,
            img.height
        ));
    }
    for line in text.lines() {
        html.push_str(&format!("<p>{}</p>\n", escape_html(line)));
    }
    html.push_str("</body></html>\n");
    let mut related =
        MultiPart::related().multipart(MultiPart::alternative_plain_html(text.to_string(), html));
    for (i, img) in images.iter().enumerate() {
        related = related.singlepart(
            Attachment::new_inline(cid(i)).body(img.bytes.to_vec(), content_type(&img.mime)?),
        );
    }
    let mut mixed = MultiPart::mixed().multipart(related);
    for img in images {
        mixed = mixed.singlepart(
            Attachment::new(img.file_name.clone())
                .body(img.bytes.to_vec(), content_type(&img.mime)?),
        );
    }
    finish(b.multipart(mixed), env.to, Vec::new())
}

fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn finish(
    message: Result<Message, lettre::error::Error>,
    to: Vec<Mailbox>,
    extra_rcpt: Vec<Mailbox>,
) -> Result<Built, DeliveryError> {
    let message = message.map_err(|e| {
        DeliveryError::permanent(
            codes::BAD_CONTENT.code,
            format!("cannot build the message: {e}"),
        )
    })?;
    Ok(Built {
        bytes: message.formatted(),
        to,
        extra_rcpt,
    })
}

/// A body is HTML when it starts with a tag or a doctype.
pub fn looks_like_html(body: &str) -> bool {
    let t = body.trim_start();
    t.starts_with('<') && t.contains('>') && {
        let head = t[..t.len().min(64)].to_ascii_lowercase();
        head.starts_with("<!doctype")
            || head.starts_with("<html")
            || head.starts_with("<!--")
            || t.contains("</")
            || t.contains("/>")
            || head.starts_with("<br")
    }
}

/// A readable plain-text alternative of an HTML body: tags dropped, block ends become line
/// breaks, the common entities decoded. Mail clients that can render HTML never show it.
pub fn html_to_text(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut rest = html;
    while let Some(start) = rest.find('<') {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find('>') else {
            out.push_str(&rest[start..]);
            rest = "";
            break;
        };
        let tag = rest[start + 1..start + end].trim().to_ascii_lowercase();
        let name: String = tag
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        let skip_to = |closing: &str, from: &str| -> usize {
            from.to_ascii_lowercase()
                .find(closing)
                .map_or(from.len(), |i| i + closing.len())
        };
        rest = &rest[start + end + 1..];
        match name.as_str() {
            "br" | "p" | "div" | "tr" | "li" | "h1" | "h2" | "h3" | "h4" | "h5" | "h6"
                if !out.ends_with('\n') && !out.is_empty() =>
            {
                out.push('\n');
            }
            "style" | "script" | "head" if !tag.starts_with('/') => {
                let n = skip_to(&format!("</{name}>"), rest);
                rest = &rest[n..];
            }
            _ => {}
        }
    }
    out.push_str(rest);
    let decoded = out
        .replace("&nbsp;", " ")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&");
    decoded
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_messages_are_recognised() {
        assert!(is_rfc5322("From: a@b.c\r\nSubject: hi\r\n\r\nbody"));
        assert!(is_rfc5322(
            "MIME-Version: 1.0\nContent-Type: text/plain;\n charset=utf-8\n\nbody"
        ));
        assert!(is_rfc5322("X-Custom: 1\nSubject: s\n\n"));
        // Prose that happens to contain a colon, or headers without a blank line, is a body.
        assert!(!is_rfc5322("Note: the meeting moved\n\nSee you"));
        assert!(!is_rfc5322("Subject: hi"));
        assert!(!is_rfc5322("Dear customer,\nSubject: x\n\nbody"));
        assert!(!is_rfc5322("\nFrom: a@b.c\n\n"));
    }

    #[test]
    fn forms_are_detected() {
        assert!(matches!(detect("{\"text\": \"hi\"}"), Form::Json(_)));
        assert!(matches!(
            detect(" {\"html\": \"<b>x</b>\", \"cc\": []}"),
            Form::Json(_)
        ));
        // JSON without our keys is a body (someone mailing a JSON document).
        assert!(matches!(detect("{\"order\": 1}"), Form::Body(_)));
        assert!(matches!(detect("{\"text\": \"hi\""), Form::BrokenJson(_)));
        assert!(matches!(detect("{ not json at all"), Form::Body(_)));
        assert!(matches!(detect("From: a@b.c\n\nhi"), Form::Raw(_)));
        assert!(matches!(detect("hello"), Form::Body(_)));
    }

    #[test]
    fn raw_bytes_normalise_line_ends_and_drop_the_final_crlf() {
        assert_eq!(raw_bytes("a\nb\r\nc\n"), b"a\r\nb\r\nc".to_vec());
        assert_eq!(raw_bytes("a\r\n\r\n"), b"a\r\n".to_vec());
        assert_eq!(raw_bytes("a"), b"a".to_vec());
    }

    #[test]
    fn raw_header_unfolds() {
        let m = "Subject: a\r\nMessage-ID:\r\n <x@y>\r\nTo: z@w\r\n\r\nMessage-ID: body";
        assert_eq!(raw_header(m, "message-id").as_deref(), Some("<x@y>"));
        assert_eq!(raw_header(m, "cc"), None);
    }

    #[test]
    fn address_lists_parse_or_fail_as_bad_address() {
        let l = parse_mailboxes("a@x.org, \"Doe, J\" <j@y.org>; c@z.org", "address").unwrap();
        assert_eq!(l.len(), 3);
        assert_eq!(l[1].name.as_deref(), Some("Doe, J"));
        let e = parse_mailboxes("not an address", "address").unwrap_err();
        assert_eq!(e.code(), "bad-address");
        assert!(!e.is_retry());
    }

    #[test]
    fn html_becomes_readable_text() {
        let t = html_to_text(
            "<html><head><style>p{}</style></head><body><p>Hello &amp; welcome</p>\
             <p>Line<br>two</p></body></html>",
        );
        assert_eq!(t, "Hello & welcome\nLine\ntwo");
        assert!(looks_like_html("<p>x</p>"));
        assert!(!looks_like_html("<3 you"));
        assert!(!looks_like_html("plain"));
    }
}
