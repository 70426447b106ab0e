//! Unit tests of the sba connector: order numbers, error shapes, content, paths, configuration.

use super::*;

#[test]
fn the_example_profiles_parse() {
    let text = include_str!("../../../conf/sba.conf");
    let profiles = crate::config::parse_profiles("sba", text, "sba.conf").unwrap();
    assert_eq!(profiles.len(), 1);
}

#[test]
fn order_numbers_are_stable_and_short() {
    assert_eq!(order_number("A-17"), "A-17");
    let hex = "0123456789abcdef".repeat(4);
    assert_eq!(order_number(&hex), &hex[..32]);
    let long = "order for customer 42 placed on the first of May";
    let n = order_number(long);
    assert_eq!(n.len(), 32);
    assert_eq!(n, order_number(long));
    assert_ne!(
        n,
        order_number("order for customer 43 placed on the first of May")
    );
    assert_eq!(order_number("заказ").len(), 32);
}

#[test]
fn errors_are_read_from_every_shape() {
    let e = |s: &str| sber_error(&serde_json::from_str(s).unwrap());
    assert_eq!(e(r#"{"orderId":"x","formUrl":"y"}"#), None);
    assert_eq!(e(r#"{"errorCode":"0","orderId":"x"}"#), None);
    assert_eq!(e(r#"{"errorCode":0}"#), None);
    assert_eq!(
        e(r#"{"errorCode":"1","errorMessage":"used"}"#),
        Some(("1".into(), "used".into()))
    );
    assert_eq!(
        e(r#"{"ErrorCode":5,"ErrorMessage":"denied"}"#),
        Some(("5".into(), "denied".into()))
    );
    assert_eq!(
        e(r#"{"error":{"code":"7","message":"system"}}"#),
        Some(("7".into(), "system".into()))
    );
}

#[test]
fn content_is_form_or_json() {
    assert_eq!(
        parse_params("amount=100&returnUrl=https%3A%2F%2Fa.b%2Fok&description=a+b").unwrap(),
        vec![
            ("amount".into(), "100".into()),
            ("returnUrl".into(), "https://a.b/ok".into()),
            ("description".into(), "a b".into()),
        ]
    );
    let p = parse_params(r#"{"amount":100,"jsonParams":{"k":"v"},"x":null}"#).unwrap();
    assert_eq!(
        p,
        vec![
            ("amount".into(), "100".into()),
            ("jsonParams".into(), r#"{"k":"v"}"#.into()),
        ]
    );
    assert_eq!(parse_params("{oops").unwrap_err().code(), "bad-content");
}

#[test]
fn paths_are_paths() {
    assert_eq!(request_path(None).unwrap(), DEFAULT_PATH);
    assert_eq!(
        request_path(Some("registerPreAuth.do")).unwrap(),
        "/payment/rest/registerPreAuth.do"
    );
    assert_eq!(
        request_path(Some("/payment/rest/register.do")).unwrap(),
        DEFAULT_PATH
    );
    assert_eq!(
        request_path(Some("https://evil.example/x"))
            .unwrap_err()
            .code(),
        "bad-address"
    );
    assert_eq!(
        sibling_path("/payment/rest/register.do", "getOrderStatusExtended.do"),
        "/payment/rest/getOrderStatusExtended.do"
    );
}

#[test]
fn config_picks_the_host_and_needs_credentials() {
    let build = |s: &str| {
        SbaConnector::new(
            &ProfileContext::new("sba.conf", "p"),
            &toml::from_str::<SbaConfig>(s).unwrap(),
        )
    };
    assert_eq!(build("token = \"t\"").unwrap().base, PRODUCTION_URL);
    assert_eq!(build("token = \"t\"\ntest = true").unwrap().base, TEST_URL);
    assert_eq!(
        build("token = \"t\"\ntest = true\nbase_url = \"http://127.0.0.1:1/\"")
            .unwrap()
            .base,
        "http://127.0.0.1:1"
    );
    assert!(build("user_name = \"u\"\npassword = \"p\"").is_ok());
    assert!(build("user_name = \"u\"").is_err());
    assert!(build("user_name = \"u\"\npassword = \"p\"\ntoken = \"t\"").is_err());
    assert!(build("token = \"t\"\nreturn_url = \"/relative\"").is_err());
    assert!(toml::from_str::<SbaConfig>("userName = \"u\"").is_err());
}

#[test]
fn only_listed_methods_pass_and_the_list_is_checked() {
    let build = |extra: &str| {
        let cfg: SbaConfig = toml::from_str(&format!(
            "base_url = \"https://gw.example\"\ntoken = \"tok-secret\"\n{extra}"
        ))
        .unwrap();
        SbaConnector::new(&ProfileContext::new("sba.conf", "p"), &cfg)
    };
    let c = build("").unwrap();
    let ok = |p: &str| c.check_method(p).is_ok();
    assert!(ok("/payment/rest/register.do"));
    assert!(ok("/payment/rest/REGISTER.do"));
    assert!(ok("/payment/rest/getOrderStatusExtended.do"));
    for denied in [
        "/payment/rest/refund.do",
        "/payment/rest/reverse.do",
        "/payment/rest/registerPreAuth.do",
        "/payment/rest/refund.do/register.do",
        "/payment/rest/../rest/register.do",
        "/payment/rest/%72egister.do",
        "/payment/rest/register.do;x",
    ] {
        let e = c.check_method(denied).unwrap_err();
        assert_eq!(
            (e.code(), e.is_retry()),
            ("method-denied", false),
            "{denied}"
        );
    }
    let c = build("methods = [\"registerPreAuth.do\"]").unwrap();
    assert!(c.check_method("/payment/rest/registerPreAuth.do").is_ok());
    assert!(c.check_method("/payment/rest/register.do").is_err());
    let e = build("methods = [\"refund.do?x=1\"]").err().unwrap();
    assert_eq!(e.key.as_deref(), Some("p.methods"));
}
