//! Unit tests of the FCM connector: content checks, error classification, profile keys.

use super::*;
use reqwest::header::{HeaderValue, RETRY_AFTER};

fn fcm_error(code: u16, status: &str, error_code: Option<&str>) -> String {
    let details = error_code.map_or(String::new(), |c| {
        format!(
            r#","details":[{{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"{c}"}}]"#
        )
    });
    format!(r#"{{"error":{{"code":{code},"message":"m","status":"{status}"{details}}}}}"#)
}

#[test]
fn errors_are_classified_from_error_code_then_status() {
    let mut h = HeaderMap::new();
    h.insert(RETRY_AFTER, HeaderValue::from_static("61"));
    let cases = [
        (
            404,
            "NOT_FOUND",
            Some("UNREGISTERED"),
            false,
            "fcm-unregistered",
        ),
        (
            400,
            "INVALID_ARGUMENT",
            Some("INVALID_ARGUMENT"),
            false,
            "fcm-invalid-argument",
        ),
        (
            403,
            "PERMISSION_DENIED",
            Some("SENDER_ID_MISMATCH"),
            false,
            "fcm-sender-id-mismatch",
        ),
        (
            401,
            "UNAUTHENTICATED",
            Some("THIRD_PARTY_AUTH_ERROR"),
            false,
            "fcm-third-party-auth-error",
        ),
        (
            429,
            "RESOURCE_EXHAUSTED",
            Some("QUOTA_EXCEEDED"),
            true,
            "fcm-quota-exceeded",
        ),
        (
            503,
            "UNAVAILABLE",
            Some("UNAVAILABLE"),
            true,
            "fcm-unavailable",
        ),
        (500, "INTERNAL", Some("INTERNAL"), true, "fcm-internal"),
        // No FcmError: the status decides.
        (503, "UNAVAILABLE", None, true, "fcm-unavailable"),
        (404, "NOT_FOUND", None, false, "fcm-not-found"),
        // errorCode wins over a contradicting status.
        (
            500,
            "INTERNAL",
            Some("UNREGISTERED"),
            false,
            "fcm-unregistered",
        ),
    ];
    for (http, status, code, retry, want) in cases {
        let e = classify(
            StatusCode::from_u16(http).unwrap(),
            &h,
            &fcm_error(http, status, code),
        );
        assert_eq!(e.code(), want, "{http} {status} {code:?}");
        assert_eq!(e.is_retry(), retry, "{want}");
        assert_eq!(e.remote_status(), Some(http as i32));
        if let DeliveryError::Retry { retry_after, .. } = &e {
            assert_eq!(*retry_after, Some(Duration::from_secs(61)), "{want}");
        }
    }
    // Not an FCM error body: the house HTTP classification.
    let e = classify(StatusCode::BAD_GATEWAY, &h, "<html>");
    assert_eq!((e.code(), e.is_retry()), ("http-502", true));
}

#[test]
fn only_a_401_without_fcm_error_means_a_stale_token() {
    let u = StatusCode::UNAUTHORIZED;
    assert!(is_stale_token(u, &fcm_error(401, "UNAUTHENTICATED", None)));
    assert!(is_stale_token(u, "not json"));
    assert!(!is_stale_token(
        u,
        &fcm_error(401, "UNAUTHENTICATED", Some("THIRD_PARTY_AUTH_ERROR"))
    ));
    assert!(!is_stale_token(StatusCode::FORBIDDEN, "{}"));
}

#[test]
fn content_is_checked_and_the_address_fills_the_token() {
    let b = prepare_body(
        r#"{"message":{"notification":{"title":"t"}}}"#,
        Some(" dev-1 "),
    )
    .unwrap();
    assert_eq!(b["message"]["token"], "dev-1");
    let b = prepare_body(
        r#"{"validate_only":true,"message":{"topic":"news","data":{"a":"1"}}}"#,
        Some("ignored"),
    )
    .unwrap();
    assert_eq!(b["message"].get("token"), None);
    assert_eq!(b["validate_only"], true);
    let bad = |content: &str, addr: Option<&str>| prepare_body(content, addr).unwrap_err();
    for (content, needle) in [
        ("{not json", "not valid JSON"),
        ("[]", "JSON object"),
        (r#"{"msg":{}}"#, "unknown field \"msg\""),
        (r#"{"message":{"token":"a","topic":"b"}}"#, "token, topic"),
        (r#"{"message":{"token":""}}"#, "non-empty"),
        (
            r#"{"message":{"token":"a","data":{"n":42}}}"#,
            "message.data.n is a number",
        ),
        (
            r#"{"message":{"token":"a","data":["x"]}}"#,
            "object of strings",
        ),
        (
            r#"{"message":{"token":"a","android":{"data":{"b":true}}}}"#,
            "android.data.b",
        ),
        (
            r#"{"validate_only":"yes","message":{"token":"a"}}"#,
            "validate_only",
        ),
    ] {
        let e = bad(content, Some("x"));
        assert_eq!(e.code(), "bad-content", "{content}");
        assert!(!e.is_retry());
        assert!(e.reason().contains(needle), "{content}: {}", e.reason());
    }
    assert_eq!(bad(r#"{"message":{}}"#, None).code(), "bad-address");
    assert_eq!(
        bad(r#"{"message":{"topic":null}}"#, Some(" ")).code(),
        "bad-address"
    );
}

#[test]
fn profiles_reject_unknown_keys() {
    let t: toml::Table = "service_account_file = \"k.json\"\nproject = \"p\""
        .parse()
        .unwrap();
    let e = toml::Value::Table(t).try_into::<FcmConfig>().unwrap_err();
    assert!(e.to_string().contains("unknown field `project`"), "{e}");
}
