//! Standard Webhooks request signing (<https://www.standardwebhooks.com/>, as Svix does it):
//! `webhook-id`, `webhook-timestamp` (Unix seconds) and
//! `webhook-signature: v1,<base64(HMAC-SHA256(key, "<id>.<timestamp>.<body>"))>`, where the key is
//! the base64 text after the `whsec_` prefix of the secret.
//!
//! Invariant: the id is the message code, so it is the same on every attempt and receivers can use
//! it as their de-duplication key; the timestamp (and so the signature) is fresh on every attempt,
//! because receivers reject timestamps more than a few minutes off.

use crate::connector::provider::sign::hmac_sha256_base64;
use crate::settings::Secret;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

/// A decoded signing key.
#[derive(Clone)]
pub struct Signer {
    key: Secret,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(***)")
    }
}

impl Signer {
    /// From a `whsec_<base64>` secret (the prefix is optional).
    pub fn new(secret: &Secret) -> Result<Signer, String> {
        let text = secret.expose().trim();
        let b64 = text.strip_prefix("whsec_").unwrap_or(text);
        let key = B64
            .decode(b64)
            .map_err(|_| "the signing secret is not whsec_<base64 key>".to_string())?;
        if key.is_empty() {
            return Err("the signing secret is empty".into());
        }
        // The key is kept as base64 text so it stays a `Secret` (never printed).
        Ok(Signer {
            key: Secret::new(B64.encode(key)),
        })
    }

    /// `v1,<base64 signature>` of `id.timestamp.body`.
    pub fn signature(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let key = B64
            .decode(self.key.expose())
            .expect("key was encoded by new");
        let ts = timestamp.to_string();
        let parts: [&[u8]; 5] = [id.as_bytes(), b".", ts.as_bytes(), b".", body];
        format!("v1,{}", hmac_sha256_base64(&key, &parts))
    }

    /// The three headers for one attempt, signed now.
    pub fn headers(&self, id: &str, body: &[u8]) -> [(&'static str, String); 3] {
        let ts = chrono::Utc::now().timestamp();
        [
            ("webhook-id", id.to_string()),
            ("webhook-timestamp", ts.to_string()),
            ("webhook-signature", self.signature(id, ts, body)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_published_standard_webhooks_vector() {
        // providers.md 3.4, the vector published with the spec's libraries.
        let s = Signer::new(&Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")).unwrap();
        assert_eq!(
            s.signature(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        // Without the prefix, the same key.
        let bare = Signer::new(&Secret::new("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")).unwrap();
        assert_eq!(
            bare.signature(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn bad_secrets_are_refused_and_never_printed() {
        assert!(Signer::new(&Secret::new("whsec_not base64!")).is_err());
        assert!(Signer::new(&Secret::new("whsec_")).is_err());
        let s = Signer::new(&Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")).unwrap();
        assert_eq!(format!("{s:?}"), "Signer(***)");
    }
}
