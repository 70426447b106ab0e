//! Aliyun's RPC signature v1 (providers.md §2.8, test vectors §3.4): parameters sorted by name,
//! names and values percent-encoded as Aliyun's POP wants, `METHOD&%2F&<encoded canonical
//! query>` signed with HMAC-SHA1 under `AccessKeySecret + "&"`, base64.

use std::collections::BTreeMap;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::connector::provider::sign;

/// Aliyun's `percentEncode`: UTF-8, RFC 3986 unreserved characters kept, everything else `%XY`
/// in upper case (so a space is `%20`, `*` is `%2A`, `~` stays).
const POP_UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

pub fn pop_encode(s: &str) -> String {
    utf8_percent_encode(s, POP_UNRESERVED).to_string()
}

/// `k1=v1&k2=v2…`, names sorted by byte order, names and values encoded, `Signature` left out.
pub fn canonical_query(params: &BTreeMap<String, String>) -> String {
    params
        .iter()
        .filter(|(k, _)| k.as_str() != "Signature")
        .map(|(k, v)| format!("{}={}", pop_encode(k), pop_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Signature v1: `Base64(HMAC-SHA1(secret + "&", METHOD&%2F&percentEncode(canonical query)))`.
pub fn signature_v1(method: &str, params: &BTreeMap<String, String>, secret: &str) -> String {
    let to_sign = format!(
        "{method}&{}&{}",
        pop_encode("/"),
        pop_encode(&canonical_query(params))
    );
    sign::hmac_sha1_base64(format!("{secret}&").as_bytes(), &[to_sign.as_bytes()])
}
