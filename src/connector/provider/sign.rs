//! HMAC signing helpers (RFC 2104) for providers that sign requests: Standard Webhooks
//! (HMAC-SHA256 over `id.timestamp.body`), chat robots (HMAC-SHA256 of `timestamp\nsecret`,
//! base64), Aliyun's RPC signature v1 (HMAC-SHA1, base64). Keys stay in the caller's
//! [`Secret`](crate::settings::Secret); nothing here prints one.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// HMAC-SHA256 of the concatenation of `parts` under `key`.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// [`hmac_sha256`], standard base64 with padding.
pub fn hmac_sha256_base64(key: &[u8], parts: &[&[u8]]) -> String {
    B64.encode(hmac_sha256(key, parts))
}

/// HMAC-SHA1 of the concatenation of `parts` under `key`, standard base64 with padding. SHA-1
/// only because a provider's published recipe says so (Aliyun RPC v1); ring keeps it for such
/// legacy uses.
pub fn hmac_sha1_base64(key: &[u8], parts: &[&[u8]]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, key);
    let mut ctx = ring::hmac::Context::with_key(&key);
    for p in parts {
        ctx.update(p);
    }
    B64.encode(ctx.sign().as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_rfc_4231_test_case_2() {
        let mac = hmac_sha256(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn hmac_sha1_matches_rfc_2202_test_case_2() {
        // RFC 2202 §3: HMAC-SHA1("Jefe", "what do ya want for nothing?") =
        // effcdf6ae5eb2fa2d27416d5f184df9c259a7c79.
        assert_eq!(
            hmac_sha1_base64(b"Jefe", &[b"what do ya want ", b"for nothing?"]),
            "7/zfauXrL6LSdBbV8YTfnCWafHk="
        );
    }
}
