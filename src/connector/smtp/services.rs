//! Well-known SMTP services: the presets behind `service = "QQ"`, in the schema of nodemailer's
//! `lib/well-known/services.json` (`host`, `port`, `secure`, `requireTLS`, `ignoreTLS`,
//! `authMethod`, `aliases`, `domains`), so that profiles written for Apostol/nodemailer deployments
//! keep working.
//!
//! Invariants: lookup is nodemailer's: the part after the last `@` (an e-mail address works as a
//! key), keep only `[a-zA-Z0-9.-]`, lower-case; names, aliases and domains are all indexed and a
//! later entry wins a clash. The table is parsed leniently, as nodemailer's JavaScript is: a port
//! may be a string (`qiye.aliyun`), and `host` or `port` may be missing (`Maildev`, `hot.ee`).

use std::collections::HashMap;
use std::sync::OnceLock;

use serde::{Deserialize, Deserializer};

/// The built-in table (nodemailer's schema; entries are in nodemailer's order so clashes resolve
/// the same way).
const SERVICES_JSON: &str = r#"{
"1und1":       {"host": "smtp.1und1.de", "port": 465, "secure": true, "authMethod": "LOGIN"},
"126":         {"host": "smtp.126.com", "port": 465, "secure": true},
"163":         {"host": "smtp.163.com", "port": 465, "secure": true},
"Aliyun":      {"domains": ["aliyun.com"], "host": "smtp.aliyun.com", "port": 465, "secure": true},
"AliyunQiye":  {"host": "smtp.qiye.aliyun.com", "port": 465, "secure": true},
"AOL":         {"domains": ["aol.com"], "host": "smtp.aol.com", "port": 587},
"Aruba":       {"domains": ["aruba.it", "pec.aruba.it"], "aliases": ["Aruba PEC"], "host": "smtps.aruba.it", "port": 465, "secure": true, "authMethod": "LOGIN"},
"Bluewin":     {"domains": ["bluewin.ch"], "host": "smtpauths.bluewin.ch", "port": 465},
"BOL":         {"domains": ["bol.com.br"], "host": "smtp.bol.com.br", "port": 587, "requireTLS": true},
"DebugMail":   {"host": "debugmail.io", "port": 25},
"Disroot":     {"domains": ["disroot.org"], "host": "smtp.disroot.org", "port": 587, "secure": true, "authMethod": "LOGIN"},
"DynectEmail": {"aliases": ["Dynect"], "host": "smtp.dynect.net", "port": 25},
"ElasticEmail": {"aliases": ["Elastic Email"], "host": "smtp.elasticemail.com", "port": 465, "secure": true},
"Ethereal":    {"aliases": ["ethereal.email"], "host": "smtp.ethereal.email", "port": 587},
"FastMail":    {"domains": ["fastmail.fm"], "host": "smtp.fastmail.com", "port": 465, "secure": true},
"Feishu Mail": {"aliases": ["Feishu", "FeishuMail"], "domains": ["www.feishu.cn"], "host": "smtp.feishu.cn", "port": 465, "secure": true},
"Forward Email": {"aliases": ["FE", "ForwardEmail"], "domains": ["forwardemail.net"], "host": "smtp.forwardemail.net", "port": 465, "secure": true},
"GandiMail":   {"aliases": ["Gandi", "Gandi Mail"], "host": "mail.gandi.net", "port": 587},
"Gmail":       {"aliases": ["Google Mail"], "domains": ["gmail.com", "googlemail.com"], "host": "smtp.gmail.com", "port": 465, "secure": true},
"GMX":         {"domains": ["gmx.com", "gmx.net", "gmx.de"], "host": "mail.gmx.com", "port": 587},
"Godaddy":     {"host": "smtpout.secureserver.net", "port": 25},
"GodaddyAsia": {"host": "smtp.asia.secureserver.net", "port": 25},
"GodaddyEurope": {"host": "smtp.europe.secureserver.net", "port": 25},
"hot.ee":      {"host": "mail.hot.ee"},
"Hotmail":     {"aliases": ["Outlook", "Outlook.com", "Hotmail.com"], "domains": ["hotmail.com", "outlook.com"], "host": "smtp-mail.outlook.com", "port": 587},
"iCloud":      {"aliases": ["Me", "Mac"], "domains": ["me.com", "mac.com"], "host": "smtp.mail.me.com", "port": 587},
"Infomaniak":  {"domains": ["ik.me", "ikmail.com", "etik.com"], "host": "mail.infomaniak.com", "port": 587},
"KolabNow":    {"domains": ["kolabnow.com"], "aliases": ["Kolab"], "host": "smtp.kolabnow.com", "port": 465, "secure": true, "authMethod": "LOGIN"},
"Loopia":      {"host": "mailcluster.loopia.se", "port": 465},
"mail.ee":     {"host": "smtp.mail.ee"},
"Mail.ru":     {"host": "smtp.mail.ru", "port": 465, "secure": true},
"Mailcatch.app": {"host": "sandbox-smtp.mailcatch.app", "port": 2525},
"Maildev":     {"port": 1025, "ignoreTLS": true},
"MailerSend":  {"host": "smtp.mailersend.net", "port": 587},
"Mailgun":     {"host": "smtp.mailgun.org", "port": 465, "secure": true},
"Mailjet":     {"host": "in.mailjet.com", "port": 587},
"Mailosaur":   {"host": "mailosaur.io", "port": 25},
"Mailtrap":    {"host": "live.smtp.mailtrap.io", "port": 587},
"Mandrill":    {"host": "smtp.mandrillapp.com", "port": 587},
"Naver":       {"host": "smtp.naver.com", "port": 587},
"One":         {"host": "send.one.com", "port": 465, "secure": true},
"OpenMailBox": {"aliases": ["OMB", "openmailbox.org"], "host": "smtp.openmailbox.org", "port": 465, "secure": true},
"Outlook365":  {"host": "smtp.office365.com", "port": 587, "secure": false},
"Postmark":    {"aliases": ["PostmarkApp"], "host": "smtp.postmarkapp.com", "port": 2525},
"Proton":      {"aliases": ["ProtonMail", "Proton.me", "Protonmail.com", "Protonmail.ch"], "domains": ["proton.me", "protonmail.com", "pm.me", "protonmail.ch"], "host": "smtp.protonmail.ch", "port": 587, "requireTLS": true},
"qiye.aliyun": {"host": "smtp.mxhichina.com", "port": "465", "secure": true},
"QQ":          {"domains": ["qq.com"], "host": "smtp.qq.com", "port": 465, "secure": true},
"QQex":        {"aliases": ["QQ Enterprise"], "domains": ["exmail.qq.com"], "host": "smtp.exmail.qq.com", "port": 465, "secure": true},
"Resend":      {"host": "smtp.resend.com", "port": 465, "secure": true},
"Runbox":      {"domains": ["runbox.com"], "host": "smtp.runbox.com", "port": 465, "secure": true},
"SendCloud":   {"host": "smtp.sendcloud.net", "port": 2525},
"SendGrid":    {"host": "smtp.sendgrid.net", "port": 587},
"SendinBlue":  {"aliases": ["Brevo"], "host": "smtp-relay.brevo.com", "port": 587},
"SendPulse":   {"host": "smtp-pulse.com", "port": 465, "secure": true},
"SES":         {"host": "email-smtp.us-east-1.amazonaws.com", "port": 465, "secure": true},
"SES-AP-NORTHEAST-1": {"host": "email-smtp.ap-northeast-1.amazonaws.com", "port": 465, "secure": true},
"SES-AP-NORTHEAST-2": {"host": "email-smtp.ap-northeast-2.amazonaws.com", "port": 465, "secure": true},
"SES-AP-NORTHEAST-3": {"host": "email-smtp.ap-northeast-3.amazonaws.com", "port": 465, "secure": true},
"SES-AP-SOUTH-1": {"host": "email-smtp.ap-south-1.amazonaws.com", "port": 465, "secure": true},
"SES-AP-SOUTHEAST-1": {"host": "email-smtp.ap-southeast-1.amazonaws.com", "port": 465, "secure": true},
"SES-AP-SOUTHEAST-2": {"host": "email-smtp.ap-southeast-2.amazonaws.com", "port": 465, "secure": true},
"SES-CA-CENTRAL-1": {"host": "email-smtp.ca-central-1.amazonaws.com", "port": 465, "secure": true},
"SES-EU-CENTRAL-1": {"host": "email-smtp.eu-central-1.amazonaws.com", "port": 465, "secure": true},
"SES-EU-NORTH-1": {"host": "email-smtp.eu-north-1.amazonaws.com", "port": 465, "secure": true},
"SES-EU-WEST-1": {"host": "email-smtp.eu-west-1.amazonaws.com", "port": 465, "secure": true},
"SES-EU-WEST-2": {"host": "email-smtp.eu-west-2.amazonaws.com", "port": 465, "secure": true},
"SES-EU-WEST-3": {"host": "email-smtp.eu-west-3.amazonaws.com", "port": 465, "secure": true},
"SES-SA-EAST-1": {"host": "email-smtp.sa-east-1.amazonaws.com", "port": 465, "secure": true},
"SES-US-EAST-1": {"host": "email-smtp.us-east-1.amazonaws.com", "port": 465, "secure": true},
"SES-US-EAST-2": {"host": "email-smtp.us-east-2.amazonaws.com", "port": 465, "secure": true},
"SES-US-GOV-EAST-1": {"host": "email-smtp.us-gov-east-1.amazonaws.com", "port": 465, "secure": true},
"SES-US-GOV-WEST-1": {"host": "email-smtp.us-gov-west-1.amazonaws.com", "port": 465, "secure": true},
"SES-US-WEST-1": {"host": "email-smtp.us-west-1.amazonaws.com", "port": 465, "secure": true},
"SES-US-WEST-2": {"host": "email-smtp.us-west-2.amazonaws.com", "port": 465, "secure": true},
"Seznam":      {"aliases": ["Seznam Email"], "domains": ["seznam.cz", "email.cz", "post.cz", "spoluzaci.cz"], "host": "smtp.seznam.cz", "port": 465, "secure": true},
"SMTP2GO":     {"host": "mail.smtp2go.com", "port": 2525},
"Sparkpost":   {"aliases": ["SparkPost", "SparkPost Mail"], "domains": ["sparkpost.com"], "host": "smtp.sparkpostmail.com", "port": 587, "secure": false},
"Tipimail":    {"host": "smtp.tipimail.com", "port": 587},
"Tutanota":    {"domains": ["tutanota.com", "tuta.com", "tutanota.de", "tuta.io"], "host": "smtp.tutanota.com", "port": 465, "secure": true},
"Yahoo":       {"domains": ["yahoo.com"], "host": "smtp.mail.yahoo.com", "port": 465, "secure": true},
"Yandex":      {"domains": ["yandex.ru"], "host": "smtp.yandex.ru", "port": 465, "secure": true},
"Zimbra":      {"aliases": ["Zimbra Collaboration"], "host": "smtp.zimbra.com", "port": 587, "requireTLS": true},
"Zoho":        {"host": "smtp.zoho.com", "port": 465, "secure": true, "authMethod": "LOGIN"}
}"#;

/// One well-known service, as nodemailer describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    /// The entry's name in the table (filled in after parsing).
    #[serde(skip)]
    pub name: String,
    pub host: Option<String>,
    #[serde(default, deserialize_with = "lenient_port")]
    pub port: Option<u16>,
    /// Implicit TLS (SMTPS, usually port 465).
    #[serde(default)]
    pub secure: bool,
    /// STARTTLS is mandatory.
    #[serde(default, rename = "requireTLS")]
    pub require_tls: bool,
    /// Never STARTTLS, even when offered.
    #[serde(default, rename = "ignoreTLS")]
    pub ignore_tls: bool,
    /// Preferred SASL mechanism (`"LOGIN"`).
    pub auth_method: Option<String>,
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub domains: Vec<String>,
}

/// A port written as a number or as a string of digits (nodemailer's `qiye.aliyun` has `"465"`).
fn lenient_port<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Port {
        Number(u16),
        Text(String),
    }
    match Option::<Port>::deserialize(d)? {
        None => Ok(None),
        Some(Port::Number(n)) => Ok(Some(n)),
        Some(Port::Text(s)) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("invalid port \"{s}\""))),
    }
}

/// nodemailer's `normalizeKey`: `key.split('@').pop()`, then `replace(/[^a-zA-Z0-9.-]/g, '')`,
/// lower-cased.
pub fn normalize_key(key: &str) -> String {
    let tail = key.rsplit('@').next().unwrap_or("");
    tail.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

struct Table {
    /// Entries in table order, for listing.
    names: Vec<String>,
    /// Normalised name, alias or domain → entry.
    index: HashMap<String, Service>,
}

fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| {
        // serde_json keeps insertion order only with `preserve_order`; parse as a sequence of
        // pairs instead so that "a later entry wins" matches nodemailer without that feature.
        let entries: Vec<(String, Service)> = parse_ordered(SERVICES_JSON);
        let mut index = HashMap::new();
        let mut names = Vec::new();
        for (name, mut svc) in entries {
            svc.name = name.clone();
            let keys: Vec<String> = std::iter::once(&name)
                .chain(&svc.aliases)
                .chain(&svc.domains)
                .map(|k| normalize_key(k))
                .collect();
            for k in keys {
                index.insert(k, svc.clone());
            }
            names.push(name);
        }
        Table { names, index }
    })
}

/// Parses a JSON object into its (key, value) pairs in document order.
fn parse_ordered(json: &str) -> Vec<(String, Service)> {
    struct Ordered(Vec<(String, Service)>);
    impl<'de> Deserialize<'de> for Ordered {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Ordered;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("an object of services")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<Ordered, A::Error> {
                    let mut out = Vec::new();
                    while let Some((k, v)) = map.next_entry::<String, Service>()? {
                        out.push((k, v));
                    }
                    Ok(Ordered(out))
                }
            }
            d.deserialize_map(V)
        }
    }
    serde_json::from_str::<Ordered>(json)
        .expect("the built-in service table is valid")
        .0
}

/// The service for a name, alias or e-mail domain (or an address at that domain), if any.
pub fn lookup(key: &str) -> Option<&'static Service> {
    table().index.get(&normalize_key(key))
}

/// The names of every built-in service, in table order (for error messages).
pub fn names() -> &'static [String] {
    &table().names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_parses_and_indexes_every_entry() {
        assert!(names().len() > 80, "{}", names().len());
        for n in names() {
            assert!(lookup(n).is_some(), "{n}");
        }
    }

    #[test]
    fn normalisation_follows_nodemailer() {
        assert_eq!(normalize_key("Feishu Mail"), "feishumail");
        assert_eq!(normalize_key("someone@QQ.com"), "qq.com");
        assert_eq!(normalize_key("a@b@Mail.ru"), "mail.ru");
        assert_eq!(normalize_key("SES-EU-WEST-1"), "ses-eu-west-1");
        assert_eq!(normalize_key("飞书 Feishu!"), "feishu");
    }
}
