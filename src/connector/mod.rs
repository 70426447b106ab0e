//! Connectors: the `Connector` trait, the message a connector sees, the typed delivery error, the
//! registry of kinds (`kinds!`: each kind declared once with its config, constructor and agents)
//! and the one explicit `match` that builds a connector from its configuration.
//!
//! Invariants: a connector never touches the database; it turns one [`OutboxMessage`] into one
//! provider call and says how it went, as a [`Receipt`] or a [`DeliveryError`] whose variant decides
//! retry vs failed and whose `code` is the stable string stored in `outbox.attempts.error_code`.
//! One connector object exists per (kind, profile), so per-profile state (clients, pools, token
//! caches) lives in the object.

pub mod aliyunsms;
pub mod codes;
pub mod dingbot;
pub mod dingtalk;
pub mod fcm;
pub mod feishu;
pub mod file;
pub mod http;
pub mod m2m;
pub mod provider;
pub mod redact;
pub mod sba;
pub mod slack;
pub mod smtp;
pub mod telegram;
pub mod token;
pub mod wechat;
pub mod wecom;
pub mod wecombot;

use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use uuid::Uuid;

use crate::settings::{ConfigError, ProfileContext};

/// A claimed message, as the hot path returns it (`outbox.claim`).
#[derive(Debug, Clone)]
pub struct OutboxMessage {
    pub id: Uuid,
    /// Idempotency key: unique per agent; sent to providers that accept one.
    pub code: String,
    pub agent_type: String,
    pub agent: String,
    pub profile: String,
    pub address: Option<String>,
    pub subject: Option<String>,
    pub content: Option<String>,
    pub label: Option<String>,
    /// 1 for the first delivery attempt.
    pub attempt: i32,
    pub max_attempts: Option<i32>,
    pub priority: i32,
    pub created: chrono::DateTime<chrono::Utc>,
    /// Pictures that go with the message: the rendered card of a template of kind `image`
    /// (stored in `outbox.message_images`). Connectors that take images attach them; the others
    /// ignore them. Empty for every other message.
    pub images: Vec<std::sync::Arc<Image>>,
}

/// A picture attached to a message (a rendered card).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// The attachment's file name (`card.png`).
    pub file_name: String,
    /// `image/png`.
    pub mime: String,
    pub width: u32,
    pub height: u32,
    pub bytes: bytes::Bytes,
}

impl OutboxMessage {
    /// The content, or a `bad-content` permanent error when the message has none.
    pub fn content_required(&self) -> Result<&str, DeliveryError> {
        self.content.as_deref().ok_or_else(|| {
            DeliveryError::permanent(codes::BAD_CONTENT.code, "the message has no content")
        })
    }

    /// The address, or a `bad-address` permanent error when the message has none.
    pub fn address_required(&self) -> Result<&str, DeliveryError> {
        match self.address.as_deref() {
            Some(a) if !a.trim().is_empty() => Ok(a),
            _ => Err(DeliveryError::permanent(
                codes::BAD_ADDRESS.code,
                "the message has no address",
            )),
        }
    }
}

/// What a successful delivery produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Receipt {
    /// The provider's id for the message (FCM `name`, SMTP queue id, HTTP `id`…).
    pub provider_id: Option<String>,
    /// HTTP status or SMTP reply code.
    pub remote_status: Option<i32>,
    /// A reply to store as an inbox message whose parent is the outbox message.
    pub reply: Option<String>,
}

/// Why a delivery did not succeed. The variant decides what happens next; `code` is a stable
/// kebab-case string (`http-503`, `smtp-4xx`, `token-invalid`, `bad-content`, `unknown-profile`…).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeliveryError {
    /// Transient: back to prepared, due after the profile's next retry delay (or `retry_after`).
    #[error("{code}: {reason}")]
    Retry {
        code: String,
        reason: String,
        retry_after: Option<Duration>,
        remote_status: Option<i32>,
        /// The platform said "too fast" ([`DeliveryError::too_fast`]): the dispatcher blocks the
        /// profile's rate windows for `retry_after`, not only this message.
        too_fast: bool,
    },
    /// Final: the message goes to failed at once.
    #[error("{code}: {reason}")]
    Permanent {
        code: String,
        reason: String,
        remote_status: Option<i32>,
    },
}

impl DeliveryError {
    pub fn retry(code: impl Into<String>, reason: impl Into<String>) -> Self {
        DeliveryError::Retry {
            code: code.into(),
            reason: reason.into(),
            retry_after: None,
            remote_status: None,
            too_fast: false,
        }
    }

    pub fn permanent(code: impl Into<String>, reason: impl Into<String>) -> Self {
        DeliveryError::Permanent {
            code: code.into(),
            reason: reason.into(),
            remote_status: None,
        }
    }

    /// The platform said "too fast" (DingTalk 130101, WeCom 45009, Feishu 11232, Slack
    /// `ratelimited`, Telegram 429): a retry not before `block`. The rate limiter holds the whole
    /// profile (not only this message) back by `block`, as the platform does.
    pub fn too_fast(code: impl Into<String>, reason: impl Into<String>, block: Duration) -> Self {
        DeliveryError::retry(code, reason)
            .with_retry_after(Some(block))
            .marked_too_fast()
    }

    /// Marks a retry as the platform's "too fast" (an HTTP 429 without a block time: the
    /// dispatcher then blocks the profile until the message's own retry).
    pub fn marked_too_fast(mut self) -> Self {
        if let DeliveryError::Retry { too_fast, .. } = &mut self {
            *too_fast = true;
        }
        self
    }

    /// Whether the platform said "too fast" (see [`DeliveryError::too_fast`]).
    pub fn is_too_fast(&self) -> bool {
        matches!(self, DeliveryError::Retry { too_fast: true, .. })
    }

    /// Sets the remote status (HTTP status, SMTP reply code).
    pub fn with_status(mut self, status: impl Into<i32>) -> Self {
        let s = Some(status.into());
        match &mut self {
            DeliveryError::Retry { remote_status, .. } => *remote_status = s,
            DeliveryError::Permanent { remote_status, .. } => *remote_status = s,
        }
        self
    }

    /// Sets the provider's hint for the next attempt (Retry only).
    pub fn with_retry_after(mut self, after: Option<Duration>) -> Self {
        if let DeliveryError::Retry { retry_after, .. } = &mut self {
            *retry_after = after;
        }
        self
    }

    pub fn code(&self) -> &str {
        match self {
            DeliveryError::Retry { code, .. } | DeliveryError::Permanent { code, .. } => code,
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            DeliveryError::Retry { reason, .. } | DeliveryError::Permanent { reason, .. } => reason,
        }
    }

    pub fn remote_status(&self) -> Option<i32> {
        match self {
            DeliveryError::Retry { remote_status, .. }
            | DeliveryError::Permanent { remote_status, .. } => *remote_status,
        }
    }

    pub fn is_retry(&self) -> bool {
        matches!(self, DeliveryError::Retry { .. })
    }
}

/// The error of a delivery whose provider call did not answer within the profile's `timeout`.
pub fn timed_out(timeout: Duration) -> DeliveryError {
    DeliveryError::retry(codes::TIMEOUT.code, format!("no answer within {timeout:?}"))
}

/// A delivery channel for one profile.
#[async_trait]
pub trait Connector: Send + Sync {
    /// `<kind>/<profile>`, for logs.
    fn name(&self) -> &str;
    async fn deliver(&self, msg: &OutboxMessage) -> Result<Receipt, DeliveryError>;
    /// What the dispatcher calls: [`deliver`](Connector::deliver) with its provider call bounded
    /// by `timeout` (the profile's), failing with [`timed_out`] after it.
    ///
    /// A connector that keeps per-profile capacity (the smtp connector's `pool_size` connection
    /// slots) overrides this to wait for a slot *first*, unbounded, and start the clock only
    /// once it holds one: queueing behind other deliveries of the profile is not the provider
    /// being slow, and must not turn a message the provider would accept into a `timeout`
    /// (issue 8). That wait is bounded by the others' timeouts, and the lease heartbeat covers it.
    ///
    /// Dropping the returned future (the timeout, a shutdown past the grace period) aborts the
    /// provider call: nothing it started may complete later behind the daemon's back, and a
    /// connection left mid-exchange is closed, never reused. The default gets that from `deliver`
    /// running inside this future (reqwest drops a connection whose request is cancelled).
    async fn deliver_within(
        &self,
        msg: &OutboxMessage,
        timeout: Duration,
    ) -> Result<Receipt, DeliveryError> {
        tokio::time::timeout(timeout, self.deliver(msg))
            .await
            .unwrap_or_else(|_| Err(timed_out(timeout)))
    }
    /// Cheap self-check run by `check-config` (must not send anything).
    async fn healthcheck(&self) -> Result<(), DeliveryError> {
        Ok(())
    }
    /// The connector as its concrete type, for the few callers that use more than `deliver`
    /// (the HTTP server's `/v1/dd/chat/create` calls the dingtalk connector's `create_chat`).
    /// `None` unless the connector opts in.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
}

/// Parses one profile table; the error is (key path, message).
pub type ParseProfile = fn(toml::Table) -> Result<ConnectorConfig, (Option<String>, String)>;

/// One connector kind, declared once in [`kinds!`]: its name (as written in `[connectors]`), its
/// built-in agents, how to parse a profile of it and how to build its connector.
pub struct KindSpec {
    pub name: &'static str,
    /// Built-in routes as (agent type, agent); `"*"` as agent: any agent of that type not routed
    /// more specifically.
    pub agents: &'static [(&'static str, &'static str)],
    /// Parses one profile table (see [`ConnectorConfig::from_table`]).
    pub parse: ParseProfile,
}

// STYLE asks for one explicit `match` over the kinds; this macro writes the enum, the table of
// kinds and the one `match` of `build` from a single list, so a kind is declared on one line.
macro_rules! kinds {
    ($($variant:ident = $name:literal, $module:ident :: $config:ident => $connector:ident,
        agents [$(($ty:literal, $agent:literal)),*];)*) => {
        /// The configuration of one profile of one connector kind. The kind comes from the name
        /// the main configuration gives the connector's `.conf` file (`[connectors] http =
        /// "http.conf"`).
        #[derive(Debug, Clone, Deserialize)]
        #[serde(tag = "kind", rename_all = "lowercase")]
        #[allow(clippy::large_enum_variant)] // parsed once per profile: size does not matter
        pub enum ConnectorConfig {
            $($variant($module::$config),)*
        }

        /// Every connector kind outboxd knows.
        pub const REGISTRY: &[KindSpec] = &[$(KindSpec {
            name: $name,
            agents: &[$(($ty, $agent)),*],
            // Each kind is deserialized directly (not through the tagged enum, whose buffering
            // loses the path), so errors name the exact key.
            parse: |t| crate::settings::deserialize_table(t).map(ConnectorConfig::$variant),
        }),*];

        impl ConnectorConfig {
            /// Builds the connector. This is the one place that knows every kind.
            pub fn build(
                &self,
                ctx: &ProfileContext,
            ) -> Result<std::sync::Arc<dyn Connector>, ConfigError> {
                Ok(match self {
                    $(ConnectorConfig::$variant(c) => {
                        std::sync::Arc::new($module::$connector::new(ctx, c)?)
                    })*
                })
            }
        }
    };
}

kinds! {
    File = "file", file::FileConfig => FileConnector, agents [("system.agent", "file.agent")];
    Http = "http", http::HttpConfig => HttpConnector, agents [("api.agent", "*")];
    Fcm = "fcm", fcm::FcmConfig => FcmConnector, agents [("api.agent", "fcm.agent")];
    M2m = "m2m", m2m::M2mConfig => M2mConnector, agents [("api.agent", "m2m.agent")];
    Sba = "sba", sba::SbaConfig => SbaConnector, agents [("api.agent", "sba.agent")];
    Smtp = "smtp", smtp::SmtpConfig => SmtpConnector, agents [("email.agent", "smtp.agent")];
    Wechat = "wechat", wechat::WechatConfig => WechatConnector, agents [("api.agent", "wechat.agent")];
    Wecom = "wecom", wecom::WecomConfig => WecomConnector, agents [("api.agent", "wecom.agent")];
    Wecombot = "wecombot", wecombot::WecombotConfig => WecombotConnector, agents [("api.agent", "wecombot.agent")];
    Slack = "slack", slack::SlackConfig => SlackConnector, agents [("api.agent", "slack.agent")];
    Feishu = "feishu", feishu::FeishuConfig => FeishuConnector, agents [("api.agent", "feishu.agent")];
    Telegram = "telegram", telegram::TelegramConfig => TelegramConnector, agents [("api.agent", "telegram.agent")];
    Dingbot = "dingbot", dingbot::DingbotConfig => DingbotConnector, agents [("api.agent", "dingbot.agent")];
    Dingtalk = "dingtalk", dingtalk::DingtalkConfig => DingtalkConnector, agents [("api.agent", "dingtalk.agent")];
    AliyunSms = "aliyunsms", aliyunsms::AliyunSmsConfig => AliyunSmsConnector, agents [("api.agent", "aliyunsms.agent")];
}

/// The kind of a name written in `[connectors]`.
pub fn kind(name: &str) -> Option<&'static KindSpec> {
    REGISTRY.iter().find(|k| k.name == name)
}

/// Connector kinds outboxd knows, as written in `[connectors]`.
pub fn kind_names() -> impl Iterator<Item = &'static str> {
    REGISTRY.iter().map(|k| k.name)
}

/// The kind an agent is routed to by default: an exact (agent type, agent) entry first, then an
/// agent type's `"*"` entry.
pub fn builtin_route(agent_type: &str, agent: &str) -> Option<&'static str> {
    let find = |want: &str| {
        REGISTRY.iter().find_map(|k| {
            k.agents
                .iter()
                .any(|(t, a)| *t == agent_type && *a == want)
                .then_some(k.name)
        })
    };
    find(agent).or_else(|| find("*"))
}

impl ConnectorConfig {
    /// Parses one profile table of a `<kind>.conf` file; errors name the exact key.
    pub fn from_table(
        kind_name: &str,
        table: toml::Table,
    ) -> Result<Self, (Option<String>, String)> {
        match kind(kind_name) {
            Some(k) => (k.parse)(table),
            None => Err((
                None,
                format!(
                    "unknown connector kind \"{kind_name}\" (known: {})",
                    kind_names().collect::<Vec<_>>().join(", ")
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_keeps_the_built_in_routes_and_kinds() {
        assert_eq!(
            kind_names().collect::<Vec<_>>(),
            [
                "file",
                "http",
                "fcm",
                "m2m",
                "sba",
                "smtp",
                "wechat",
                "wecom",
                "wecombot",
                "slack",
                "feishu",
                "telegram",
                "dingbot",
                "dingtalk",
                "aliyunsms"
            ]
        );
        for (ty, agent, want) in [
            ("email.agent", "smtp.agent", Some("smtp")),
            ("api.agent", "fcm.agent", Some("fcm")),
            ("api.agent", "m2m.agent", Some("m2m")),
            ("api.agent", "sba.agent", Some("sba")),
            ("api.agent", "wechat.agent", Some("wechat")),
            ("api.agent", "wecom.agent", Some("wecom")),
            ("api.agent", "wecombot.agent", Some("wecombot")),
            ("api.agent", "slack.agent", Some("slack")),
            ("api.agent", "feishu.agent", Some("feishu")),
            ("api.agent", "telegram.agent", Some("telegram")),
            ("api.agent", "dingbot.agent", Some("dingbot")),
            ("api.agent", "dingtalk.agent", Some("dingtalk")),
            ("api.agent", "aliyunsms.agent", Some("aliyunsms")),
            ("api.agent", "anything.agent", Some("http")),
            ("system.agent", "file.agent", Some("file")),
            ("system.agent", "other.agent", None),
            ("email.agent", "other.agent", None),
        ] {
            assert_eq!(builtin_route(ty, agent), want, "{ty}/{agent}");
        }
        let e = ConnectorConfig::from_table("nope", toml::Table::new()).unwrap_err();
        assert_eq!(
            e.1,
            "unknown connector kind \"nope\" (known: file, http, fcm, m2m, sba, smtp, wechat, wecom, wecombot, slack, feishu, telegram, dingbot, dingtalk, aliyunsms)"
        );
    }

    #[test]
    fn build_errors_name_the_file_and_key_of_the_context() {
        let cfg = ConnectorConfig::from_table("file", toml::Table::new()).unwrap();
        let e = cfg
            .build(&ProfileContext::new("conf.d/ops.conf", "audit"))
            .err()
            .expect("neither path nor directory");
        assert_eq!(e.file, "conf.d/ops.conf");
        assert_eq!(e.key.as_deref(), Some("audit.path"));
    }
}
