//! Keeping credentials where they belong, for every HTTP-based connector: a [`Redactor`] that
//! replaces a profile's secrets (tokens, passwords, signing keys, the credential parts of its URLs)
//! by `***` in every text a delivery produces, transport errors that lose their URL
//! ([`transport_error`]), and a redirect policy that never carries credentials to another origin
//! ([`same_origin_redirects`]).
//!
//! Invariants: a connector builds its `Redactor` from everything that authenticates it and passes
//! every result of `deliver` through [`Redactor::result`], so error texts (`outbox.attempts`,
//! logs, `status`) and replies (inbox) never hold a secret, whatever a provider echoes; reqwest's
//! `Display` includes the request URL (which may carry Telegram's `/bot<token>/`, DingTalk's
//! `?access_token=`…), so no `reqwest::Error` is formatted except by [`transport_error`], which
//! drops it (as [`reqwest::Error::without_url`] does, but from a reference).
//! An origin is scheme, host and port (two `127.0.0.1:0` listeners are two origins).

use crate::connector::codes;
use std::borrow::Cow;

use super::{DeliveryError, Receipt};
use crate::settings::is_credential_param;

/// Secrets shorter than this are not searched for in texts (replacing every `1` of a text would
/// hide more than it protects); configuration checks keep real credentials longer than that.
const MIN_SCRUBBED: usize = 4;

/// The secrets of one profile, scrubbed from every text the profile's deliveries produce.
#[derive(Clone, Default)]
pub struct Redactor {
    /// Longest first, so a secret that contains another is replaced whole.
    secrets: Vec<String>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor({} secrets)", self.secrets.len())
    }
}

impl Redactor {
    pub fn new() -> Redactor {
        Redactor::default()
    }

    /// Adds a secret, with the forms it takes on the wire (percent- and form-encoded).
    pub fn add(&mut self, secret: &str) -> &mut Self {
        let forms = [
            secret.to_string(),
            url::form_urlencoded::byte_serialize(secret.as_bytes()).collect::<String>(),
            percent_encode(secret),
        ];
        for f in forms {
            if f.len() >= MIN_SCRUBBED && !self.secrets.contains(&f) {
                self.secrets.push(f);
            }
        }
        self.secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        self
    }

    /// Adds the credential parts of `url`: its password, the values of credential query
    /// parameters ([`is_credential_param`]), Telegram-style `bot<id>:<token>` path segments and,
    /// when `whole_path` (the profile says its URL is secret), its whole path and query.
    pub fn add_url(&mut self, url: &url::Url, whole_path: bool) -> &mut Self {
        if let Some(p) = url.password() {
            self.add(p);
            self.add(&percent_decode(p));
        }
        for (k, v) in url.query_pairs() {
            if is_credential_param(&k) {
                self.add(&v);
            }
        }
        for seg in url.path_segments().into_iter().flatten() {
            if is_bot_token(seg) {
                self.add(seg);
                self.add(&seg[3..]);
            }
        }
        if whole_path {
            let path = url.path().trim_matches('/');
            if !path.is_empty() {
                self.add(path);
            }
            if let Some(q) = url.query().filter(|q| !q.is_empty()) {
                self.add(q);
            }
        }
        self
    }

    /// `text` with every secret replaced by `***`.
    pub fn text<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for s in &self.secrets {
            if out.contains(s.as_str()) {
                out = Cow::Owned(out.replace(s.as_str(), "***"));
            }
        }
        out
    }

    /// The error with its reason scrubbed.
    pub fn error(&self, mut e: DeliveryError) -> DeliveryError {
        match &mut e {
            DeliveryError::Retry { reason, .. } | DeliveryError::Permanent { reason, .. } => {
                if let Cow::Owned(r) = self.text(reason) {
                    *reason = r;
                }
            }
        }
        e
    }

    /// A delivery's result with its error text, reply and provider id scrubbed.
    pub fn result(&self, r: Result<Receipt, DeliveryError>) -> Result<Receipt, DeliveryError> {
        match r {
            Ok(mut receipt) => {
                for field in [&mut receipt.reply, &mut receipt.provider_id] {
                    if let Some(t) = field.as_mut() {
                        if let Cow::Owned(s) = self.text(t) {
                            *t = s;
                        }
                    }
                }
                Ok(receipt)
            }
            Err(e) => Err(self.error(e)),
        }
    }
}

/// `bot123456:AA…`: a Telegram bot token as a path segment.
fn is_bot_token(seg: &str) -> bool {
    seg.strip_prefix("bot").is_some_and(|rest| {
        rest.split_once(':').is_some_and(|(id, tok)| {
            !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) && !tok.is_empty()
        })
    })
}

fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `%XX` escapes decoded (a URL's password is kept encoded by the parser).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, ..) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A transport failure (no status), always retryable, classified as `timeout`, `connect` or
/// `network`, with reqwest's text and its cause chain but never the URL.
pub fn transport_error(e: &reqwest::Error) -> DeliveryError {
    let code = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else {
        "network"
    };
    // reqwest's Display ends in ` for url (<url>)` and omits the cause; the chain says what
    // happened.
    let mut reason = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        reason.push_str(": ");
        reason.push_str(&s.to_string());
        src = s.source();
    }
    if let Some(u) = e.url() {
        reason = reason
            .replace(&format!(" for url ({u})"), "")
            .replace(u.as_str(), &origin(u));
    }
    DeliveryError::retry(code, reason)
}

/// A redirect the policy refused because it would carry credentials to another origin.
#[derive(Debug, Clone, thiserror::Error)]
#[error("redirect to {to} refused: credentials are only sent to {from}")]
pub struct RedirectRefused {
    /// `scheme://host:port` of the refused target (no path: it may carry a secret).
    pub to: String,
    pub from: String,
}

/// `scheme://host:port` of a URL.
pub fn origin(u: &url::Url) -> String {
    format!(
        "{}://{}:{}",
        u.scheme(),
        u.host_str().unwrap_or(""),
        u.port_or_known_default().unwrap_or(0)
    )
}

/// The origin check of a redirect from `from` to `to` for a request that carries credentials:
/// same scheme, host and port (so neither another host nor a downgrade from https to http).
pub fn check_same_origin(from: &url::Url, to: &url::Url) -> Result<(), RedirectRefused> {
    if origin(from) == origin(to) {
        Ok(())
    } else {
        Err(RedirectRefused {
            to: origin(to),
            from: origin(from),
        })
    }
}

/// The redirect policy of connectors that send credentials (sba, m2m, fcm): up to 10 redirects
/// within the origin of the request; a redirect to another origin is an error, found in the chain
/// by [`redirect_refused`].
pub fn same_origin_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let first = attempt.previous().first().cloned();
        if attempt.previous().len() >= 10 {
            return attempt.error("too many redirects");
        }
        match first.map(|f| check_same_origin(&f, attempt.url())) {
            Some(Err(refused)) => attempt.error(refused),
            _ => attempt.follow(),
        }
    })
}

/// The [`RedirectRefused`] in a reqwest error's chain, if the redirect policy refused.
pub fn redirect_refused(e: &reqwest::Error) -> Option<&RedirectRefused> {
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(r) = s.downcast_ref::<RedirectRefused>() {
            return Some(r);
        }
        src = s.source();
    }
    None
}

/// A failed send of a connector that sends credentials: a refused redirect is permanent
/// (`redirect-denied`: the endpoint moved to another origin, an operator must look), anything else
/// a transport error.
pub fn send_error(e: &reqwest::Error) -> DeliveryError {
    match redirect_refused(e) {
        Some(r) => DeliveryError::permanent(codes::REDIRECT_DENIED.code, r.to_string()),
        None => transport_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_their_encodings_are_scrubbed() {
        let mut r = Redactor::new();
        r.add("s3cr+t/value").add("ab");
        let t = "form password=s3cr%2Bt%2Fvalue raw s3cr+t/value path s3cr%2Bt%2Fvalue ab";
        assert_eq!(
            r.text(t),
            "form password=*** raw *** path *** ab",
            "short secrets are not searched for"
        );
        assert!(matches!(r.text("nothing here"), Cow::Borrowed(_)));
    }

    #[test]
    fn credential_parts_of_urls_are_found() {
        let u = url::Url::parse(
            "https://u:pw-secret@api.example/bot123:AAtok/send?access_token=tk-1&key=k-22&lang=en",
        )
        .unwrap();
        let mut r = Redactor::new();
        r.add_url(&u, false);
        let t = r.text(u.as_str()).into_owned();
        for s in ["pw-secret", "AAtok", "tk-1", "k-22"] {
            assert!(!t.contains(s), "{s} in {t}");
        }
        assert!(t.contains("lang=en"), "{t}");
        let hook = url::Url::parse("https://hooks.example/services/T0/B0/XyZsecret").unwrap();
        let mut r = Redactor::new();
        r.add_url(&hook, true);
        assert_eq!(
            r.text("POST https://hooks.example/services/T0/B0/XyZsecret failed"),
            "POST https://hooks.example/*** failed"
        );
    }

    #[tokio::test]
    async fn transport_errors_lose_their_url() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/bot1:Tok3n/x?access_token=Qs3cret");
        let e = reqwest::Client::new().get(&url).send().await.unwrap_err();
        assert!(
            e.to_string().contains("Tok3n"),
            "reqwest's own text has it: {e}"
        );
        let d = transport_error(&e);
        assert_eq!(d.code(), "connect");
        assert!(
            !d.reason().contains("Tok3n") && !d.reason().contains("Qs3cret"),
            "{}",
            d.reason()
        );
        assert!(
            d.reason().starts_with("error sending request: "),
            "{}",
            d.reason()
        );
    }

    #[test]
    fn origins_are_scheme_host_and_port() {
        let u = |s: &str| url::Url::parse(s).unwrap();
        assert!(
            check_same_origin(&u("https://a.example/x"), &u("https://a.example:443/y")).is_ok()
        );
        assert!(check_same_origin(&u("https://a.example/"), &u("http://a.example/")).is_err());
        assert!(check_same_origin(&u("http://127.0.0.1:1/"), &u("http://127.0.0.1:2/")).is_err());
        let e = check_same_origin(&u("https://a.example/"), &u("https://b.example/p?token=x"))
            .unwrap_err();
        assert!(!e.to_string().contains("token"), "{e}");
    }
}
