//! outboxd delivers messages that applications write into a PostgreSQL outbox.
//!
//! Module map (the data path): [`config`] (files, env, validation, redaction) → [`db`] (pool,
//! listener, migrations, outbox queries) → [`dispatch`] (claim loop, routing, retry schedule, lease
//! heartbeat) → [`render`] (templated messages rendered before delivery) → [`connector`] (the trait and one
//! file per connector). [`apostol`] is the drop-in mode that serves an Apostol database instead;
//! [`schedule`] runs scheduled send tasks; [`kafka`] is the Kafka trigger (enqueue and task-run
//! requests consumed from topics). [`ops`] holds the operator
//! commands, [`server`] the HTTP server (health, status, metrics, REST enqueue), [`metrics`] the
//! Prometheus names, [`telemetry`] the logging setup, [`shutdown`] the signals, [`systemd`] the notify protocol.
#![forbid(unsafe_code)]

pub mod apostol;
pub mod config;
pub mod connector;
pub mod db;
pub mod dispatch;
pub mod kafka;
pub mod metrics;
pub mod ops;
pub mod render;
pub mod schedule;
pub mod server;
pub mod settings;
pub mod shutdown;
pub mod systemd;
pub mod telemetry;

pub use dispatch::{run, Controls, RunReport};
