//! Unit tests of the m2m connector: phone and text checks, envelope building and detection,
//! fault classification, configuration.

use super::soap::*;
use super::*;

#[test]
fn the_example_profiles_parse() {
    let text = include_str!("../../../conf/m2m.conf");
    let profiles = crate::config::parse_profiles("m2m", text, "m2m.conf").unwrap();
    assert_eq!(profiles.len(), 2);
}

#[test]
fn md5_is_lower_hex() {
    assert_eq!(md5_hex("password"), "5f4dcc3b5aa765d61d8327deb882cf99");
}

#[test]
fn phones_are_normalised_or_rejected() {
    for (input, want) in [
        ("+7 (900) 123-45-67", "79001234567"),
        ("89001234567", "79001234567"),
        ("9001234567", "79001234567"),
        ("375291234567", "375291234567"),
    ] {
        assert_eq!(normalise_msid(input, "7").unwrap(), want, "{input}");
    }
    for bad in [
        "",
        "abc",
        "+7 900 123 45 6x",
        "12345",
        "7900123456789012",
        "7900,79001",
    ] {
        let e = normalise_msid(bad, "7").unwrap_err();
        assert_eq!(e.code(), "bad-address", "{bad}");
        assert!(!e.is_retry());
    }
    assert!(normalise_msid("9001234567", "").is_err());
}

#[test]
fn text_is_checked() {
    assert!(check_text("привет").is_ok());
    assert_eq!(check_text(" ").unwrap_err().code(), "bad-content");
    assert!(check_text(&"я".repeat(1000)).is_ok());
    assert_eq!(
        check_text(&"я".repeat(1001)).unwrap_err().code(),
        "bad-content"
    );
    assert_eq!(check_text("a\u{1}b").unwrap_err().code(), "bad-content");
}

#[test]
fn envelopes_are_detected_with_their_version() {
    let e12 = format!(
        "<?xml version=\"1.0\"?>\n<soap12:Envelope xmlns:soap12=\"{SOAP12_NS}\"><soap12:Body>\
         <SendMessages xmlns=\"{M2M_NS}\"/></soap12:Body></soap12:Envelope>"
    );
    assert_eq!(
        detect_envelope(&e12).unwrap(),
        Some(Envelope {
            version: SoapVersion::V12,
            operation: "SendMessages".into()
        })
    );
    let e11 = format!(
        "<Envelope xmlns=\"{SOAP11_NS}\"><Body><SendMessage xmlns=\"{M2M_NS}\"/></Body></Envelope>"
    );
    assert_eq!(
        detect_envelope(&e11).unwrap().unwrap().version,
        SoapVersion::V11
    );
    assert_eq!(detect_envelope("Hello <b>you</b>").unwrap(), None);
    assert_eq!(detect_envelope("<b>Envelope</b>").unwrap(), None);
    let broken = format!("<soap:Envelope xmlns:soap=\"{SOAP11_NS}\"><soap:Body>");
    assert_eq!(detect_envelope(&broken).unwrap_err().code(), "bad-content");
}

#[test]
fn built_envelope_escapes_text_and_parses_back() {
    let cfg: M2mConfig = toml::from_str(
        "login = \"acme\"\npassword = \"secret\"\nnaming = \"A&B\"\nsoap_version = \"1.1\"",
    )
    .unwrap();
    let c = M2mConnector::new(&ProfileContext::new("m2m.conf", "default"), &cfg).unwrap();
    let text = "1 < 2 & \"q\" 'a' ]]> \r\nend";
    let xml = c.envelope("79001234567", text);
    let els = parse_elements(&xml).unwrap();
    let get = |n: &str| els.iter().find(|e| e.name == n).unwrap();
    assert_eq!(get("Envelope").ns.as_deref(), Some(SOAP11_NS));
    assert_eq!(get("SendMessage").ns.as_deref(), Some(M2M_NS));
    assert_eq!(get("message").text, text);
    assert_eq!(get("naming").text, "A&B");
    assert_eq!(get("password").text, md5_hex("secret"));
    assert_eq!(
        detect_envelope(&xml).unwrap().unwrap().operation,
        "SendMessage"
    );
}

#[test]
fn faults_are_classified_by_their_string() {
    let fault = |code: &str, reason: &str| Fault {
        code: code.into(),
        reason: reason.into(),
        all_text: format!("{code} {reason}"),
    };
    let e = classify_fault(&fault("soap:Server", "SYSTEM_FAILURE"));
    assert!(e.is_retry());
    assert_eq!(e.code(), "m2m-system-failure");
    let e = classify_fault(&fault(
        "soap:Server",
        "Server was unable to process request. ---> INCORRECT_PASSWORD",
    ));
    assert!(!e.is_retry());
    assert_eq!(e.code(), "m2m-incorrect-password");
    for (name, retry) in FAULTS {
        let e = classify_fault(&fault("soap:Server", name));
        assert_eq!(e.is_retry(), *retry, "{name}");
        assert_eq!(e.code(), fault_code(name));
    }
    assert_eq!(
        classify_fault(&fault("soap:Server", "MSIDS_ARE_IN_BLACKLIST")).code(),
        "m2m-msids-are-in-blacklist"
    );
    assert!(classify_fault(&fault("soap:Server", "boom")).is_retry());
    assert!(!classify_fault(&fault("soap12:Sender", "boom")).is_retry());
}

#[test]
fn soap12_fault_is_found() {
    let xml = format!(
        "<s:Envelope xmlns:s=\"{SOAP12_NS}\"><s:Body><s:Fault><s:Code><s:Value>s:Receiver</s:Value>\
         </s:Code><s:Reason><s:Text xml:lang=\"en\">NO_SUCH_SUBSCRIBER</s:Text></s:Reason>\
         </s:Fault></s:Body></s:Envelope>"
    );
    let f = find_fault(&parse_elements(&xml).unwrap()).unwrap();
    assert_eq!(f.code, "s:Receiver");
    assert_eq!(f.reason, "NO_SUCH_SUBSCRIBER");
    assert_eq!(classify_fault(&f).code(), "m2m-no-such-subscriber");
}

#[test]
fn config_needs_one_kind_of_credentials() {
    let parse = |s: &str| {
        M2mConnector::new(
            &ProfileContext::new("m2m.conf", "p"),
            &toml::from_str::<M2mConfig>(s).unwrap(),
        )
    };
    assert!(parse("token = \"t\"").is_ok());
    assert!(parse("login = \"l\"\npassword = \"p\"").is_ok());
    assert!(parse("login = \"l\"").is_err());
    assert!(parse("login = \"l\"\npassword = \"p\"\ntoken = \"t\"").is_err());
    assert!(parse("api = \"omnichannel\"\ntoken = \"t\"").is_err()); // no naming
    assert!(parse("api = \"omnichannel\"\ntoken = \"t\"\nnaming = \"ACME\"").is_ok());
    assert!(parse("password_is_md5 = true\nlogin = \"l\"\npassword = \"xyz\"").is_err());
    assert!(toml::from_str::<M2mConfig>("tokn = \"t\"").is_err());
}
