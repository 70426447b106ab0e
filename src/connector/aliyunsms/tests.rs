use super::*;
use chrono::TimeZone;

fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The official SendSms example (providers.md §3.4).
fn official_send_sms(id: &str) -> BTreeMap<String, String> {
    params(&[
        ("AccessKeyId", id),
        ("Action", "SendSms"),
        ("Format", "XML"),
        ("OutId", "123"),
        ("PhoneNumbers", "15300000001"),
        ("RegionId", "cn-hangzhou"),
        ("SignName", "阿里云短信测试专用"),
        ("SignatureMethod", "HMAC-SHA1"),
        ("SignatureNonce", "45e25e9b-0a6f-4070-8c85-2956eda1b466"),
        ("SignatureVersion", "1.0"),
        ("TemplateCode", "SMS_71390007"),
        ("TemplateParam", r#"{"customer":"test"}"#),
        ("Timestamp", "2017-07-12T02:42:19Z"),
        ("Version", "2017-05-25"),
    ])
}

#[test]
fn reproduces_the_official_send_sms_vector() {
    let sig = signature_v1("GET", &official_send_sms("testId"), "testSecret");
    assert_eq!(sig, "zJDF+Lrzhj/ThnlvIToysFRq6t4=");
    assert_eq!(pop_encode(&sig), "zJDF%2BLrzhj%2FThnlvIToysFRq6t4%3D");
    // Case matters (providers.md): the lower-case pair gives another signature.
    let sig = signature_v1("GET", &official_send_sms("testid"), "testsecret");
    assert_eq!(sig, "LxugEBqtL8lacmz/6I2QOoMzw+Y=");
    // A Signature already among the parameters is not signed.
    let mut p = official_send_sms("testId");
    p.insert("Signature".into(), "x".into());
    assert_eq!(
        signature_v1("GET", &p, "testSecret"),
        "zJDF+Lrzhj/ThnlvIToysFRq6t4="
    );
}

#[test]
fn reproduces_the_describe_regions_vector() {
    let p = params(&[
        ("Format", "XML"),
        ("AccessKeyId", "testid"),
        ("Action", "DescribeRegions"),
        ("SignatureMethod", "HMAC-SHA1"),
        ("SignatureNonce", "3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf"),
        ("SignatureVersion", "1.0"),
        ("Version", "2014-05-26"),
        ("Timestamp", "2016-02-23T12:46:24Z"),
    ]);
    assert_eq!(
        signature_v1("GET", &p, "testsecret"),
        "OLeaidS1JvxuMvnyHOwuJ+uX5qY="
    );
}

#[test]
fn percent_encoding_follows_pop_rules() {
    assert_eq!(pop_encode("a b*c~d-_.e"), "a%20b%2Ac~d-_.e");
    assert_eq!(pop_encode("+/=&"), "%2B%2F%3D%26");
    assert_eq!(pop_encode("中"), "%E4%B8%AD");
    assert_eq!(
        canonical_query(&params(&[("b", "2 3"), ("a", "{\"x\":1}"), ("B", "")])),
        "B=&a=%7B%22x%22%3A1%7D&b=2%203",
        "sorted by byte order, upper case first"
    );
}

#[test]
fn codes_become_kebab_case_with_camel_case_split() {
    for (code, want) in [
        ("isv.BUSINESS_LIMIT_CONTROL", "isv-business-limit-control"),
        ("isv.MOBILE_NUMBER_ILLEGAL", "isv-mobile-number-illegal"),
        ("SignatureDoesNotMatch", "signature-does-not-match"),
        (
            "InvalidAccessKeyId.NotFound",
            "invalid-access-key-id-not-found",
        ),
        ("isp.SYSTEM_ERROR", "isp-system-error"),
    ] {
        assert_eq!(code_fragment(code), want, "{code}");
    }
}

#[test]
fn send_dates_cover_every_day_since_creation_in_both_calendars() {
    let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
    // Created and retried within one minute, just after midnight China time (16:00 UTC): the
    // China date is the 2nd, the UTC date still the 1st.
    assert_eq!(
        send_dates(at("2026-12-01T16:00:10Z"), at("2026-12-01T16:00:50Z")),
        ["20261202", "20261201"]
    );
    // Just before midnight China time, retried after it.
    assert_eq!(
        send_dates(at("2026-12-01T15:59:50Z"), at("2026-12-01T16:00:20Z")),
        ["20261202", "20261201"]
    );
    // The same day in both calendars: one query.
    assert_eq!(
        send_dates(at("2026-12-01T01:00:00Z"), at("2026-12-01T02:00:00Z")),
        ["20261201"]
    );
    // Two days later: every day in between.
    assert_eq!(
        send_dates(at("2026-12-01T01:00:00Z"), at("2026-12-03T01:00:00Z")),
        ["20261203", "20261202", "20261201"]
    );
    // Never older than the 30 days the API answers for (China time).
    let d = send_dates(at("2026-01-01T00:00:00Z"), at("2026-12-01T02:00:00Z"));
    assert_eq!(d.len(), 30);
    assert_eq!((d[0].as_str(), d[29].as_str()), ("20261201", "20261102"));
    // A creation time after `now` (clocks differ) still queries today.
    assert_eq!(
        send_dates(at("2026-12-01T03:00:00Z"), at("2026-12-01T02:00:00Z")),
        ["20261201"]
    );
}

#[test]
fn the_business_limit_block_follows_the_named_cap() {
    let now = Utc.with_ymd_and_hms(2026, 12, 1, 15, 0, 0).unwrap(); // 23:00 in China
    let m = Duration::from_secs(60);
    assert_eq!(limit_block("触发分钟级流控Permits:1", m, now), m);
    assert_eq!(
        limit_block("触发小时级流控Permits:5", m, now),
        Duration::from_secs(3600)
    );
    assert_eq!(
        limit_block("触发天级流控Permits:10", m, now),
        Duration::from_secs(3600),
        "until midnight China time"
    );
    assert_eq!(limit_block("", m, now), m);
}

fn connector(extra: &str) -> AliyunSmsConnector {
    let text = format!(
        "access_key_id = \"testId\"\naccess_key_secret = \"testSecret\"\n\
         endpoint = \"http://127.0.0.1:9\"\n{extra}"
    );
    let cfg: AliyunSmsConfig = toml::from_str(&text).unwrap();
    AliyunSmsConnector::new(&ProfileContext::new("aliyunsms.conf", "default"), &cfg).unwrap()
}

fn message(address: &str, content: Option<&str>) -> OutboxMessage {
    OutboxMessage {
        id: uuid::Uuid::nil(),
        code: "code-1".into(),
        agent_type: "api.agent".into(),
        agent: "aliyunsms.agent".into(),
        profile: "default".into(),
        address: Some(address.into()),
        subject: None,
        content: content.map(str::to_string),
        label: None,
        attempt: 1,
        max_attempts: None,
        priority: 0,
        created: Utc::now(),
        images: Vec::new(),
    }
}

#[test]
fn content_picks_the_template_and_the_profile_fills_the_defaults() {
    let c = connector("sign_name = \"Shop\"\ntemplate_code = \"SMS_1\"\n");
    let sms = c
        .prepare(&message(
            " 13800000000 , +8613900000000",
            Some(r#"{"params": {"code": 1234, "name": "李"}}"#),
        ))
        .unwrap();
    assert_eq!(
        sms,
        Sms {
            phone_numbers: "13800000000,+8613900000000".into(),
            sign_name: "Shop".into(),
            template_code: "SMS_1".into(),
            template_param: Some(r#"{"code":"1234","name":"李"}"#.into()),
            out_id: "code-1".into(),
        }
    );
    let sms = c
        .prepare(&message(
            "13800000000",
            Some(r#"{"sign_name": "Other", "template_code": "SMS_2"}"#),
        ))
        .unwrap();
    assert_eq!(
        (sms.sign_name.as_str(), sms.template_code.as_str()),
        ("Other", "SMS_2")
    );
    assert_eq!(sms.template_param, None);
    assert!(c.prepare(&message("13800000000", None)).is_ok());
}

#[test]
fn bad_messages_fail_before_anything_is_sent() {
    let c = connector("");
    let code = |address: &str, content: Option<&str>| {
        let e = c.prepare(&message(address, content)).unwrap_err();
        assert!(!e.is_retry());
        e.code().to_string()
    };
    let full = Some(r#"{"sign_name": "S", "template_code": "SMS_1"}"#);
    assert_eq!(code("", full), "bad-address");
    assert_eq!(code("138-0000", full), "bad-address");
    assert_eq!(code("1,,2", full), "bad-address");
    assert_eq!(
        code("13800000000", None),
        "bad-content",
        "no template anywhere"
    );
    assert_eq!(code("13800000000", Some("not json")), "bad-content");
    assert_eq!(
        code(
            "13800000000",
            Some(r#"{"template_code": "SMS_1", "sign_name": "S", "x": 1}"#)
        ),
        "bad-content"
    );
    assert_eq!(
        code(
            "13800000000",
            Some(r#"{"template_code": "SMS_1", "sign_name": "S", "params": {"a": {"b": 1}}}"#)
        ),
        "bad-content"
    );
    let mut long = message("13800000000", full);
    long.code = "x".repeat(256);
    assert_eq!(c.prepare(&long).unwrap_err().code(), "bad-code");
}

#[test]
fn answers_are_classified_from_the_code() {
    let c = connector("business_limit_block = \"5s\"\n");
    let h = HeaderMap::new();
    let ok = StatusCode::OK;
    let body = |code: &str| format!(r#"{{"Code":"{code}","Message":"m","RequestId":"R1"}}"#);
    assert!(c
        .check(ok, &h, r#"{"Code":"OK","Message":"OK","BizId":"9^0"}"#)
        .is_ok());
    let e = c
        .check(ok, &h, &body("isv.BUSINESS_LIMIT_CONTROL"))
        .unwrap_err();
    assert_eq!(
        e,
        DeliveryError::too_fast(
            "aliyun-isv-business-limit-control",
            "isv.BUSINESS_LIMIT_CONTROL: m (RequestId R1)",
            Duration::from_secs(5)
        )
        .with_status(200u16)
    );
    for (status, code, retry) in [
        (200, "isp.SYSTEM_ERROR", true),
        (200, "isp.SOMETHING_NEW", true),
        (200, "isp.RAM_PERMISSION_DENY", false),
        (200, "isv.MOBILE_NUMBER_ILLEGAL", false),
        (200, "isv.TEMPLATE_MISSING_PARAMETERS", false),
        (200, "isv.SMS_SIGNATURE_ILLEGAL", false),
        (400, "SignatureDoesNotMatch", false),
        (404, "InvalidAccessKeyId.NotFound", false),
        (400, "SignatureNonceUsed", true),
        (503, "ServiceUnavailable", true),
        (500, "UnknownError", true),
    ] {
        let st = StatusCode::from_u16(status).unwrap();
        let e = c.check(st, &h, &body(code)).unwrap_err();
        assert_eq!(e.is_retry(), retry, "{code}");
        assert_eq!(e.code(), format!("aliyun-{}", code_fragment(code)));
        assert_eq!(e.remote_status(), Some(status as i32));
        assert!(codes::lookup(e.code()).is_some(), "{code} is declared");
    }
    // Not Aliyun's JSON: unknown outcome (retry); an error status without a Code: the status.
    let e = c.check(ok, &h, "<html>").unwrap_err();
    assert_eq!((e.code(), e.is_retry()), ("aliyun-bad-response", true));
    assert_eq!(
        c.check(ok, &h, "{}").unwrap_err().code(),
        "aliyun-bad-response"
    );
    let e = c.check(StatusCode::BAD_GATEWAY, &h, "gateway").unwrap_err();
    assert_eq!((e.code(), e.is_retry()), ("http-502", true));
}

#[test]
fn config_errors_name_the_key() {
    let cfg: AliyunSmsConfig = toml::from_str("access_key_id = \"testId\"\n").unwrap();
    let e = AliyunSmsConnector::new(&ProfileContext::new("a.conf", "p"), &cfg)
        .err()
        .unwrap();
    assert_eq!(e.key.as_deref(), Some("p.access_key_secret"));
    let cfg: AliyunSmsConfig = toml::from_str(
        "access_key_id = \"testId\"\naccess_key_secret = \"s3cret\"\nendpoint = \"http://h/x\"\n",
    )
    .unwrap();
    let e = AliyunSmsConnector::new(&ProfileContext::new("a.conf", "p"), &cfg)
        .err()
        .unwrap();
    assert_eq!(e.key.as_deref(), Some("p.endpoint"));
}
