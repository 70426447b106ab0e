//! Every stable error code outboxd stores in `outbox.attempts.error_code`, declared once with its
//! class and one line of meaning. Connectors use these constants (or, for a family such as
//! `http-<status>`, build the code from the family's prefix); the README's error-code table is
//! checked against [`ALL`] by a test, so the two cannot drift apart.

/// What a code means for the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Always retried (back to prepared, due after the next delay or the provider's hint).
    Retry,
    /// Always final (the message fails at once).
    Permanent,
    /// Depends on the case (a family whose members differ, or a code the context decides).
    Either,
}

impl Class {
    /// The word the README uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Retry => "retry",
            Class::Permanent => "permanent",
            Class::Either => "either",
        }
    }
}

/// One stable code. A family is written with a placeholder (`http-<status>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Code {
    pub code: &'static str,
    pub class: Class,
    pub meaning: &'static str,
}

macro_rules! codes {
    ($($name:ident = $code:literal, $class:ident, $meaning:literal;)*) => {
        $(
            #[doc = $meaning]
            pub const $name: Code = Code { code: $code, class: Class::$class, meaning: $meaning };
        )*
        /// Every stable code, in the README's order.
        pub const ALL: &[Code] = &[$($name),*];
    };
}

codes! {
    // Common to every connector, or the dispatcher's own.
    UNKNOWN_AGENT = "unknown-agent", Permanent, "no route leads from the message's agent to a connector kind";
    UNKNOWN_PROFILE = "unknown-profile", Permanent, "the routed kind has no profile of the message's name";
    CONNECTOR_NOT_CONFIGURED = "connector-not-configured", Permanent, "the routed kind is not enabled in `[connectors]`";
    CONNECTOR_PANIC = "connector-panic", Retry, "the connector panicked while delivering";
    BAD_CONTENT = "bad-content", Permanent, "the content is missing or not what the connector accepts";
    BAD_ADDRESS = "bad-address", Permanent, "the address is missing or not what the connector accepts";
    BAD_CODE = "bad-code", Permanent, "the message code cannot be sent as a header value";
    BAD_CREDENTIALS = "bad-credentials", Permanent, "the profile's credential cannot be loaded or used";
    CONTENT_TOO_LARGE = "content-too-large", Permanent, "the content is larger than the profile's `max_content_bytes`";
    TIMEOUT = "timeout", Retry, "the provider did not answer within the profile's `timeout`";
    CONNECT = "connect", Retry, "the connection to the provider could not be made";
    NETWORK = "network", Retry, "the connection failed during the exchange";
    REDIRECT_DENIED = "redirect-denied", Permanent, "the provider redirected to another origin or from https to http";
    // Written by the claim and release functions in SQL, not by a connector.
    LEASE_EXPIRED = "lease-expired", Either, "a claim's lease ran out without an outcome (retried; the fifth such expiry fails the message)";
    SHUTDOWN = "shutdown", Retry, "the daemon stopped before the delivery started and handed the message back";
    // Messages built from a template (rendered by the daemon before the connector is called).
    TEMPLATE_MISSING_VAR = "template-missing-var", Permanent, "a variable the template uses is missing; `error_text` names it";
    TEMPLATE_SYNTAX = "template-syntax", Permanent, "the stored template does not parse (saved with plain SQL), or uses an unknown filter";
    TEMPLATE_RENDER = "template-render", Permanent, "the template failed while rendering (a filter given the wrong type…)";
    TEMPLATE_UNSUPPORTED = "template-unsupported", Permanent, "the template's kind has no renderer";
    // Tokens (OAuth2, FCM, and the chat platforms' app tokens).
    TOKEN_FETCH = "token-fetch", Retry, "the token endpoint could not be reached or was unavailable";
    TOKEN_DENIED = "token-denied", Permanent, "the token endpoint refused the credential";
    TOKEN_INVALID = "token-invalid", Retry, "the provider rejected a freshly fetched token";
    // file
    FILE_IO = "file-io", Either, "the file could not be written (retry); the directory is missing (permanent, at `check-config`)";
    // http
    HTTP_STATUS = "http-<status>", Either, "the HTTP status: 408, 429, 5xx except 501 retry; other statuses are permanent";
    HOST_DENIED = "host-denied", Permanent, "the URL's host is not allowed by the profile's allowlist";
    // smtp
    SMTP_4XX = "smtp-4xx", Retry, "the SMTP server answered a transient 4xx reply";
    SMTP_5XX = "smtp-5xx", Permanent, "the SMTP server answered a permanent 5xx reply";
    SMTP_CONNECT = "smtp-connect", Retry, "the SMTP server could not be reached";
    SMTP_TLS = "smtp-tls", Retry, "the TLS handshake with the SMTP server failed";
    SMTP_NETWORK = "smtp-network", Retry, "the SMTP connection failed during the exchange";
    SMTP_PROTOCOL = "smtp-protocol", Retry, "the SMTP server answered something that is not SMTP";
    SMTP_CLIENT = "smtp-client", Permanent, "the SMTP client refused the message or the session (lettre client error)";
    SMTP_SHUTDOWN = "smtp-shutdown", Retry, "the daemon stopped while the mail waited for a connection";
    // fcm
    FCM_ERROR = "fcm-<error>", Either, "FCM's `errorCode` or RPC status in kebab case: quota and availability retry, the rest is permanent";
    // m2m
    M2M_FAULT_NAME = "m2m-<fault>", Either, "an MTS M2M fault string in kebab case: `m2m-system-failure` retries, the others are permanent";
    M2M_FAULT = "m2m-fault", Either, "an unknown SOAP fault: `Client`/`Sender` faults are permanent, others retry";
    M2M_BAD_RESPONSE = "m2m-bad-response", Retry, "M2M answered something that is not a known answer";
    // sba
    SBA_ERROR = "sba-<errorCode>", Either, "Sberbank's `errorCode`: 7 (system error) retries, the others are permanent";
    SBA_BAD_RESPONSE = "sba-bad-response", Retry, "Sberbank answered `register.do` without an `orderId`";
    METHOD_DENIED = "method-denied", Permanent, "the Sberbank method is not in the profile's `methods`";
    // wechat
    WECHAT_ERROR = "wechat-<errcode>", Either, "WeChat's `errcode` (-1 is written `busy`): -1 and 45009 retry; 43004 (not following), 40003, 40037, 47003 and the others are permanent";
    WECHAT_BAD_RESPONSE = "wechat-bad-response", Retry, "WeChat answered HTTP 200 with a body that is not its JSON answer";
    // wecom
    WECOM_ERROR = "wecom-<errcode>", Either, "WeCom's `errcode` (-1 is written `busy`): -1 retries, 45009 (too fast) retries after a minute; 81013 (every recipient invalid), 60020, 48001 and the others are permanent";
    WECOM_BAD_RESPONSE = "wecom-bad-response", Retry, "WeCom answered HTTP 200 with a body that is not its JSON answer, or an upload without `media_id`";
    // wecombot
    WECOMBOT_ERROR = "wecombot-<errcode>", Either, "the WeCom robot's `errcode` (-1 is written `busy`): -1 retries, 45009 (too fast) retries after a minute; 93000 (bad key) and the others are permanent";
    WECOMBOT_BAD_RESPONSE = "wecombot-bad-response", Retry, "the WeCom robot answered HTTP 200 with a body that is not its JSON answer";
    // slack, feishu, telegram
    SLACK_ERROR = "slack-<error>", Either, "Slack's `error` in kebab case (Web API `ok:false`, or a webhook's plain-text answer): `slack-ratelimited` (also HTTP 429), `slack-internal-error` and `slack-fatal-error` retry; the others, `slack-invalid-auth` and `slack-token-revoked` included, are permanent";
    FEISHU_ERROR = "feishu-<code>", Either, "Feishu's body `code`: 11232 (flow control) and 2200 (internal error) retry; the others (19021 signature or timestamp, 9499 bad request…) are permanent";
    TELEGRAM_ERROR = "telegram-<error_code>", Either, "Telegram's `error_code`: 429 (too many requests, retried after `retry_after`) and 5xx retry; the others (403 blocked, 400 chat not found, 401 bad token…) are permanent";
    // dingbot
    DINGBOT_ERROR = "dingbot-<errcode>", Either, "the DingTalk robot's `errcode`: 130101 (too fast: blocked for 10 minutes), -1 and a 310000 about the timestamp retry; the others (310000 keyword, signature or IP, 300001 token) are permanent";
    // dingtalk
    DINGTALK_ERROR = "dingtalk-<errcode>", Either, "a DingTalk app API `errcode`: 143103/143104 (too fast), -1 and 1430003 retry; the others (143105 daily cap, 143106 duplicate, 1430000 no recipient…) are permanent";
    DINGTALK_BAD_RESPONSE = "dingtalk-bad-response", Retry, "DingTalk answered something that is not JSON, or an upload or chat creation without its id";
    // aliyunsms
    ALIYUN_ERROR = "aliyun-<code>", Either, "Aliyun's `Code` in kebab case, camel case split (`isv.MOBILE_NUMBER_ILLEGAL` → `aliyun-isv-mobile-number-illegal`): `isp.*` except `isp.RAM_PERMISSION_DENY`, throttling, nonce and clock errors and 5xx retry, the rest (template, sign, number, balance, credentials) are permanent";
    ALIYUN_LIMIT = "aliyun-isv-business-limit-control", Retry, "too fast: Aliyun's per-number frequency cap; held back for the cap's window (minute: `business_limit_block`, default 1m; hour; day)";
    ALIYUN_SIGNATURE = "aliyun-signature-does-not-match", Permanent, "Aliyun computed another signature: the profile's `access_key_secret` is wrong";
    ALIYUN_BAD_RESPONSE = "aliyun-bad-response", Retry, "Aliyun answered something that is not its JSON (the SMS may have gone: the next attempt checks `QuerySendDetails` first)";
    // Rate limits (the dispatcher's).
    RATE_LIMIT_UNAVAILABLE = "rate-limit-unavailable", Retry, "the rate limiter's database call failed; the message was not sent";
    // Picture cards (templates of kind image, rendered by the daemon before the connector).
    CARD_SPEC = "card-spec", Permanent, "the picture card's spec is not valid, or names a font the daemon does not have";
    CARD_BACKGROUND = "card-background", Permanent, "the picture card's background image is missing or does not decode";
    CARD_STORE = "card-store", Retry, "the rendered picture could not be stored with the message";
    IMAGE_TOO_LARGE = "image-too-large", Permanent, "the message's picture is larger than the chat provider takes (checked before any network call)";
}

/// The code of a family member: the family's prefix (up to `-<`) and `rest`
/// (`family(HTTP_STATUS, "503")` → `http-503`).
pub fn family(f: Code, rest: &str) -> String {
    let prefix = f.code.split("-<").next().unwrap_or(f.code);
    format!("{prefix}-{rest}")
}

/// The declared code a stored code belongs to (itself, or its family).
pub fn lookup(code: &str) -> Option<&'static Code> {
    ALL.iter().find(|c| c.code == code).or_else(|| {
        ALL.iter()
            .filter(|c| c.code.contains("-<"))
            .find(|c| code.starts_with(&family(**c, "")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The codes in the first column of the README's "Error codes" table, with their class.
    fn readme_table() -> Vec<(String, String, String)> {
        let readme = include_str!("../../README.md");
        let start = readme
            .find("\n### Error codes\n")
            .expect("README has an Error codes section");
        readme[start..]
            .lines()
            .skip_while(|l| !l.starts_with("| code |"))
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(|l| {
                let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
                (
                    cells[0].trim_matches('`').to_string(),
                    cells[1].to_string(),
                    cells[2].to_string(),
                )
            })
            .collect()
    }

    #[test]
    fn the_readme_lists_exactly_the_declared_codes() {
        let table = readme_table();
        let listed: Vec<&str> = table.iter().map(|(c, ..)| c.as_str()).collect();
        let declared: Vec<&str> = ALL.iter().map(|c| c.code).collect();
        assert_eq!(
            listed, declared,
            "README error-code table vs connector::codes::ALL"
        );
        for ((code, class, meaning), c) in table.iter().zip(ALL) {
            assert_eq!(class, c.class.as_str(), "class of {code}");
            assert_eq!(meaning, c.meaning, "meaning of {code}");
        }
    }

    #[test]
    fn the_connectors_table_names_declared_codes_only() {
        let readme = include_str!("../../README.md");
        let start = readme.find("| kind | agent |").expect("connectors table");
        for line in readme[start..]
            .lines()
            .skip(2)
            .take_while(|l| l.starts_with('|'))
        {
            let last = line.trim_end_matches('|').rsplit('|').next().unwrap();
            for code in last.split('`').skip(1).step_by(2) {
                assert!(lookup(code).is_some(), "{code} in the connectors table");
            }
        }
    }

    #[test]
    fn codes_are_unique_kebab_case_and_families_resolve() {
        let mut seen = BTreeSet::new();
        for c in ALL {
            assert!(seen.insert(c.code), "{} twice", c.code);
            let plain = c.code.split("-<").next().unwrap();
            assert!(
                plain
                    .chars()
                    .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-'),
                "{}",
                c.code
            );
        }
        assert_eq!(family(HTTP_STATUS, "503"), "http-503");
        assert_eq!(lookup("http-503"), Some(&HTTP_STATUS));
        assert_eq!(lookup("m2m-system-failure"), Some(&M2M_FAULT_NAME));
        assert_eq!(lookup("m2m-fault"), Some(&M2M_FAULT));
        assert_eq!(lookup("token-invalid"), Some(&TOKEN_INVALID));
        assert_eq!(lookup("nope"), None);
    }
}
