//! Unit tests of the dingtalk connector: addresses, contents, error classes.

use super::content::prepare_msg;
use super::*;

#[test]
fn addresses_name_users_departments_everyone_or_a_chat() {
    assert_eq!(
        parse_address("chat:chat123").unwrap(),
        Recipients::Chat("chat123".into())
    );
    assert_eq!(
        parse_address("zhangsan, lisi").unwrap(),
        Recipients::Notice {
            users: vec!["zhangsan".into(), "lisi".into()],
            depts: vec![],
            all: false
        }
    );
    assert_eq!(
        parse_address("users:a;depts:1,2;all").unwrap(),
        Recipients::Notice {
            users: vec!["a".into()],
            depts: vec!["1".into(), "2".into()],
            all: true
        }
    );
    for bad in ["", " ; ", "depts:x", "chat:", "a;chat:c", "users:"] {
        assert_eq!(
            parse_address(bad).unwrap_err().code(),
            "bad-address",
            "{bad}"
        );
    }
}

#[test]
fn contents_are_msgs_and_inline_media_is_uploaded() {
    let (m, u) = prepare_msg("hello").unwrap();
    assert_eq!(m, json!({"msgtype":"text","text":{"content":"hello"}}));
    assert!(u.is_none());
    let (_, u) =
        prepare_msg(r#"{"msgtype":"image","image":{"base64":"UE5H","filename":"c.png"}}"#).unwrap();
    let u = u.unwrap();
    assert_eq!((u.kind.as_str(), u.data.as_slice()), ("image", &b"PNG"[..]));
    let (_, u) = prepare_msg(r#"{"msgtype":"image","image":{"media_id":"@x"}}"#).unwrap();
    assert!(u.is_none());
    for bad in [
        r#"{"text":{"content":"x"}}"#,
        r#"{"msgtype":"text","text":{}}"#,
        r#"{"msgtype":"markdown"}"#,
        r#"{"msgtype":"image","image":{"base64":"%%%"}}"#,
        r#"{"msgtype":"image","image":{}}"#,
    ] {
        assert_eq!(
            prepare_msg(bad).err().unwrap().code(),
            "bad-content",
            "{bad}"
        );
    }
}

#[test]
fn token_errors_are_the_refresh_signal() {
    let v = |s: &str| serde_json::from_str::<Value>(s).unwrap();
    for c in ["40001", "40014", "42001"] {
        let e = ERRORS
            .find(&v(&format!(r#"{{"errcode":{c},"errmsg":"x"}}"#)))
            .unwrap();
        assert_eq!(e.class, Class::TokenInvalid, "{c}");
    }
    let e = ERRORS
        .find(&v(r#"{"errcode":143106,"errmsg":"dup"}"#))
        .unwrap();
    assert!(!ERRORS.error(&e).is_retry());
    assert_eq!(ERRORS.error(&e).code(), "dingtalk-143106");
}
