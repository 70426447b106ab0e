//! Unit tests of the wechat connector: body builder, error tables, configuration.

use super::*;

#[test]
fn the_body_has_the_recipient_the_code_and_the_template() {
    let content = r##"{"template_id":"T1","url":"https://e.example/d",
        "miniprogram":{"appid":"wxmini","pagepath":"index?x=1"},
        "data":{"keyword1":{"value":"巧克力","color":"#173177"},"amount01":"¥100"}}"##;
    let b = build_body("oOPENID", "code-1", content).unwrap();
    assert_eq!(
        b,
        json!({
            "touser": "oOPENID",
            "template_id": "T1",
            "client_msg_id": "code-1",
            "url": "https://e.example/d",
            "miniprogram": {"appid": "wxmini", "pagepath": "index?x=1"},
            "data": {"keyword1": {"value": "巧克力", "color": "#173177"},
                     "amount01": {"value": "¥100"}},
        })
    );
    let plain = build_body("o", "c", r#"{"template_id":"T","data":{"k":"v"}}"#).unwrap();
    assert!(plain.get("url").is_none() && plain.get("miniprogram").is_none());
}

#[test]
fn malformed_content_is_bad_content() {
    for content in [
        "not json",
        r#"{"data":{"k":"v"}}"#,
        r#"{"template_id":"T","data":{}}"#,
        r#"{"template_id":"T","data":{"k":3}}"#,
        r#"{"template_id":"T","data":{"k":"v"},"touser":"x"}"#,
        r#"{"template_id":"T","data":{"k":"v"},"miniprogram":{"pagepath":"p"}}"#,
    ] {
        let e = build_body("o", "c", content).unwrap_err();
        assert_eq!(e.code(), "bad-content", "{content}");
    }
}

#[test]
fn errcodes_are_classified_as_providers_md_says() {
    let ok = StatusCode::OK;
    let h = HeaderMap::new();
    let bad = codes::WECHAT_BAD_RESPONSE;
    let v = answer(
        ok,
        &h,
        r#"{"errcode":0,"errmsg":"ok","msgid":200228332}"#,
        &SEND_ERRORS,
        bad,
    )
    .unwrap();
    assert_eq!(json_scalar(&v["msgid"]), "200228332");
    for (errcode, code, retry) in [
        ("-1", "wechat-busy", true),
        ("45009", "wechat-45009", true),
        ("43004", "wechat-43004", false),
        ("40003", "wechat-40003", false),
        ("40037", "wechat-40037", false),
        ("47003", "wechat-47003", false),
        ("99999", "wechat-99999", false),
        ("40001", "token-invalid", true),
        ("42001", "token-invalid", true),
    ] {
        let body = format!(r#"{{"errcode":{errcode},"errmsg":"x"}}"#);
        let e = answer(ok, &h, &body, &SEND_ERRORS, bad).unwrap_err();
        assert_eq!((e.code(), e.is_retry()), (code, retry), "{errcode}");
        assert_eq!(e.remote_status(), Some(200));
    }
    for token_invalid in ["40001", "40014", "42001"] {
        let a = (ok, h.clone(), format!(r#"{{"errcode":{token_invalid}}}"#));
        assert!(token_rejected(&SEND_ERRORS, &a).is_some());
    }
    assert!(token_rejected(
        &SEND_ERRORS,
        &(ok, h.clone(), r#"{"errcode":43004}"#.into())
    )
    .is_none());
    let e = answer(ok, &h, "<html>", &SEND_ERRORS, bad).unwrap_err();
    assert_eq!((e.code(), e.is_retry()), ("wechat-bad-response", true));
    let e = answer(StatusCode::BAD_GATEWAY, &h, "", &SEND_ERRORS, bad).unwrap_err();
    assert_eq!((e.code(), e.is_retry()), ("http-502", true));
}

#[test]
fn token_answers_and_refusals() {
    let h = HeaderMap::new();
    let t = token_from_json(
        StatusCode::OK,
        &h,
        r#"{"access_token":"AT","expires_in":7000}"#,
        &TOKEN_ERRORS,
        TOKEN_LIFE,
    )
    .unwrap();
    assert_eq!(
        (t.value.expose(), t.expires_in),
        ("AT", Duration::from_secs(7000))
    );
    let e = token_from_json(
        StatusCode::OK,
        &h,
        r#"{"errcode":40013,"errmsg":"invalid appid"}"#,
        &TOKEN_ERRORS,
        TOKEN_LIFE,
    )
    .unwrap_err();
    assert_eq!((e.code(), e.is_retry()), ("token-denied", false));
    let e = token_from_json(
        StatusCode::OK,
        &h,
        r#"{"errcode":-1,"errmsg":"busy"}"#,
        &TOKEN_ERRORS,
        TOKEN_LIFE,
    )
    .unwrap_err();
    assert_eq!((e.code(), e.is_retry()), ("token-fetch", true));
    let e = token_from_json(
        StatusCode::SERVICE_UNAVAILABLE,
        &h,
        "",
        &TOKEN_ERRORS,
        TOKEN_LIFE,
    )
    .unwrap_err();
    assert_eq!((e.code(), e.is_retry()), ("token-fetch", true));
}

#[test]
fn config_errors_name_the_key() {
    let ctx = ProfileContext::new("conf/wechat.conf", "oa");
    let cfg: WechatConfig = toml::from_str("appid = \"wx1\"").unwrap();
    let e = WechatConnector::new(&ctx, &cfg).err().unwrap();
    assert_eq!(e.key.as_deref(), Some("oa.secret"));
    let cfg: WechatConfig =
        toml::from_str("appid = \"wx1\"\nsecret = \"s3cret\"\nbase_url = \"ftp://x\"").unwrap();
    let e = WechatConnector::new(&ctx, &cfg).err().unwrap();
    assert_eq!(e.key.as_deref(), Some("oa.base_url"));
}

#[test]
fn the_example_profile_parses() {
    let text = include_str!("../../../conf/wechat.conf");
    let profiles = crate::config::parse_profiles("wechat", text, "conf/wechat.conf").unwrap();
    assert_eq!(profiles.len(), 1);
}
