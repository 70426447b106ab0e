//! Unit tests of the wecom connector: body builder, error tables, configuration.

use super::*;
use reqwest::header::HeaderMap;
use reqwest::StatusCode;

#[test]
fn text_to_the_address_or_to_the_contents_recipients() {
    let (b, up) = build_body(r#"{"msgtype":"text","text":{"content":"hi"}}"#, Some("a|b")).unwrap();
    assert_eq!(
        b,
        json!({"msgtype":"text","text":{"content":"hi"},"touser":"a|b"})
    );
    assert_eq!(up, None);
    let (b, _) = build_body(
        r#"{"msgtype":"markdown","markdown":{"content":"**x**"},"touser":["u1","u2"],
            "toparty":"2|3","totag":[7],"safe":1}"#,
        Some("ignored"),
    )
    .unwrap();
    assert_eq!(
        b,
        json!({"msgtype":"markdown","markdown":{"content":"**x**"},"touser":"u1|u2",
               "toparty":"2|3","totag":"7","safe":1})
    );
    let (b, _) = build_body(
        r#"{"msgtype":"text","text":{"content":"hi"}}"#,
        Some("@all"),
    )
    .unwrap();
    assert_eq!(b["touser"], "@all");
}

#[test]
fn textcards_and_files() {
    let (b, _) = build_body(
        r#"{"msgtype":"textcard","textcard":{"title":"T","description":"D","url":"https://u","btntxt":"More"},"toparty":"1"}"#,
        None,
    )
    .unwrap();
    assert_eq!(
        b["textcard"],
        json!({"title":"T","description":"D","url":"https://u","btntxt":"More"})
    );
    let (b, up) = build_body(
        r#"{"msgtype":"file","file":{"base64":"aGVsbG8=","filename":"a.txt"}}"#,
        Some("u"),
    )
    .unwrap();
    assert_eq!(
        up,
        Some(Upload {
            kind: "file",
            filename: "a.txt".into(),
            bytes: b"hello".to_vec()
        })
    );
    assert_eq!(b["file"], json!({}));
    let (b, up) = build_body(
        r#"{"msgtype":"image","image":{"media_id":"M1"}}"#,
        Some("u"),
    )
    .unwrap();
    assert_eq!((b["image"].clone(), up), (json!({"media_id":"M1"}), None));
}

#[test]
fn bad_contents_and_missing_recipients() {
    for (content, code) in [
        ("hello", "bad-content"),
        (r#"{"text":{"content":"x"}}"#, "bad-content"),
        (r#"{"msgtype":"news","news":{}}"#, "bad-content"),
        (r#"{"msgtype":"text","text":{}}"#, "bad-content"),
        (
            r#"{"msgtype":"text","text":{"content":"x"},"agentid":1}"#,
            "bad-content",
        ),
        (
            r#"{"msgtype":"image","image":{"base64":"%%%","filename":"a"}}"#,
            "bad-content",
        ),
        (
            r#"{"msgtype":"file","file":{"base64":"aGk="}}"#,
            "bad-content",
        ),
        (
            r#"{"msgtype":"text","text":{"content":"x"}}"#,
            "bad-address",
        ),
    ] {
        let e = build_body(content, Some(" ")).unwrap_err();
        assert_eq!(e.code(), code, "{content}");
    }
    let long = format!(
        r#"{{"msgtype":"text","text":{{"content":"{}"}}}}"#,
        "x".repeat(2049)
    );
    assert_eq!(
        build_body(&long, Some("u")).unwrap_err().code(),
        "bad-content"
    );
}

#[test]
fn partial_deliveries_keep_the_lists_and_45009_is_too_fast() {
    let v = json!({"errcode":0,"errmsg":"ok","invaliduser":"u9","invalidparty":"",
                   "unlicenseduser":"u8","msgid":"M"});
    assert_eq!(
        invalid_recipients(&v).unwrap(),
        r#"{"invaliduser":"u9","unlicenseduser":"u8"}"#
    );
    assert_eq!(
        invalid_recipients(&json!({"errcode":0,"invaliduser":""})),
        None
    );
    let h = HeaderMap::new();
    let ok = StatusCode::OK;
    let bad = codes::WECOM_BAD_RESPONSE;
    let e = too_fast(
        answer(
            ok,
            &h,
            r#"{"errcode":45009,"errmsg":"freq"}"#,
            &SEND_ERRORS,
            bad,
        )
        .unwrap_err(),
    );
    assert_eq!(
        e,
        DeliveryError::too_fast("wecom-45009", "freq", TOO_FAST_BLOCK).with_status(200u16)
    );
    for (errcode, code, retry) in [
        ("81013", "wecom-81013", false),
        ("60020", "wecom-60020", false),
        ("-1", "wecom-busy", true),
        ("40014", "token-invalid", true),
    ] {
        let body = format!(r#"{{"errcode":{errcode},"errmsg":"x"}}"#);
        let e = too_fast(answer(ok, &h, &body, &SEND_ERRORS, bad).unwrap_err());
        assert_eq!((e.code(), e.is_retry()), (code, retry), "{errcode}");
    }
}

#[test]
fn the_duplicate_check_interval_is_bounded() {
    let ctx = ProfileContext::new("conf/wecom.conf", "app");
    let cfg: WecomConfig = toml::from_str(
        "corpid = \"ww1\"\ncorpsecret = \"sekrit\"\nagentid = 1\nduplicate_check_interval = \"5h\"",
    )
    .unwrap();
    let e = WecomConnector::new(&ctx, &cfg).err().unwrap();
    assert_eq!(e.key.as_deref(), Some("app.duplicate_check_interval"));
}

#[test]
fn the_example_profile_parses() {
    let text = include_str!("../../../conf/wecom.conf");
    let profiles = crate::config::parse_profiles("wecom", text, "conf/wecom.conf").unwrap();
    assert_eq!(profiles.len(), 1);
}
