//! `[kafka]` in `conf/outboxd.toml`: the brokers, the topics the trigger consumes, and how it
//! fetches. The trigger is off unless the section is present.

use std::time::Duration;

use serde::Deserialize;

/// The Kafka trigger's settings (`[kafka]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port` (env `OUTBOXD_KAFKA_BROKERS`, comma-separated). Required.
    pub brokers: Vec<String>,
    /// Topic of enqueue requests: each record's value is the JSON body of
    /// `POST /api/v1/message/send`; record headers act as HTTP headers (`Idempotency-Key`).
    pub send_topic: Option<String>,
    /// Topic of task-run requests: `{"task": "<id or name>"}`, or the id or name as the value.
    pub task_topic: Option<String>,
    /// Refused records are also produced here (with an `outboxd-reason` header); they are always
    /// kept in `outbox.kafka_dead_letters`. Default: none.
    pub dead_letter_topic: Option<String>,
    /// The consumer group: the key of the offsets in `outbox.kafka_offsets`, so several groups
    /// (or several outboxd installations sharing a database) consume independently.
    /// Default `outboxd`.
    pub group: String,
    /// Where a partition this group never consumed starts: `earliest` (default: nothing already
    /// in the topic is missed) or `latest`.
    pub start: StartAt,
    /// Bytes per fetch (the broker may return one larger batch). Default 1 MiB.
    pub fetch_max_bytes: i32,
    /// How long the broker may hold a fetch waiting for records. Default 500ms.
    #[serde(with = "humantime_serde")]
    pub fetch_wait: Duration,
    /// Records per PostgreSQL transaction at most. Default 100.
    pub batch_records: usize,
    /// How often the topics' partitions are looked up again (new partitions start consuming).
    /// Default 30s.
    #[serde(with = "humantime_serde")]
    pub metadata_interval: Duration,
}

/// Where a partition without a committed offset starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartAt {
    Earliest,
    Latest,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: Vec::new(),
            send_topic: None,
            task_topic: None,
            dead_letter_topic: None,
            group: "outboxd".into(),
            start: StartAt::Earliest,
            fetch_max_bytes: 1 << 20,
            fetch_wait: Duration::from_millis(500),
            batch_records: 100,
            metadata_interval: Duration::from_secs(30),
        }
    }
}

impl KafkaConfig {
    /// Checks the values; the error names the key (under `kafka.`).
    pub fn check(&self) -> Result<(), (&'static str, &'static str)> {
        if self.brokers.is_empty() || self.brokers.iter().any(|b| b.trim().is_empty()) {
            return Err(("kafka.brokers", "must list at least one host:port"));
        }
        if self.send_topic.is_none() && self.task_topic.is_none() {
            return Err(("kafka.send_topic", "set send_topic or task_topic (or both)"));
        }
        let topics = [
            ("kafka.send_topic", &self.send_topic),
            ("kafka.task_topic", &self.task_topic),
            ("kafka.dead_letter_topic", &self.dead_letter_topic),
        ];
        for (key, t) in topics {
            if t.as_deref().is_some_and(|t| t.trim().is_empty()) {
                return Err((key, "must not be empty"));
            }
        }
        let named: Vec<&str> = topics.iter().filter_map(|(_, t)| t.as_deref()).collect();
        if (1..named.len()).any(|i| named[..i].contains(&named[i])) {
            return Err((
                "kafka.task_topic",
                "send_topic, task_topic and dead_letter_topic must be different topics",
            ));
        }
        if self.group.trim().is_empty() {
            return Err(("kafka.group", "must not be empty"));
        }
        if self.fetch_max_bytes < 1024 {
            return Err(("kafka.fetch_max_bytes", "must be at least 1024"));
        }
        if self.fetch_wait > Duration::from_secs(30) {
            return Err(("kafka.fetch_wait", "must be at most 30s"));
        }
        if self.batch_records == 0 || self.batch_records > 10_000 {
            return Err(("kafka.batch_records", "must be between 1 and 10000"));
        }
        if self.metadata_interval < Duration::from_millis(100) {
            return Err(("kafka.metadata_interval", "must be at least 100ms"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> KafkaConfig {
        toml::from_str(s).unwrap()
    }

    #[test]
    fn defaults_and_checks() {
        let c = parse(
            "brokers = [\"127.0.0.1:9092\"]\nsend_topic = \"outbox.send\"\nfetch_wait = \"50ms\"",
        );
        assert_eq!(c.group, "outboxd");
        assert_eq!(c.fetch_wait, Duration::from_millis(50));
        assert_eq!(c.start, StartAt::Earliest);
        assert!(c.check().is_ok());
        let none = parse("brokers = [\"k:9092\"]");
        assert_eq!(none.check().unwrap_err().0, "kafka.send_topic");
        let same = parse("brokers = [\"k:9092\"]\nsend_topic = \"a\"\ndead_letter_topic = \"a\"");
        assert_eq!(same.check().unwrap_err().0, "kafka.task_topic");
        let empty = parse("send_topic = \"a\"");
        assert_eq!(empty.check().unwrap_err().0, "kafka.brokers");
        assert!(toml::from_str::<KafkaConfig>("brokers = []\ncolour = 1").is_err());
    }
}
