//! The `file` connector: writes each delivered message as one JSON line to a spool file (or as one
//! `<id>.json` file in a spool directory). Needs no credentials; the default configuration and the
//! demo route `file.agent` here.
//!
//! Pictures (a rendered card, [`OutboxMessage::images`]) are written next to the spool as
//! `<message id>.<file name>` (`…/6f1c….card.png`) before the line, and the line's `images`
//! names each file, so a line never points at a file that is not there.
//!
//! Invariant: a line is written with one `write` call on a file opened for appending, under a
//! mutex, so lines of concurrent deliveries never interleave. The file stays open; a SIGHUP reload
//! builds a new connector, which reopens it (rotate the spool, then HUP).

use crate::connector::codes;
use std::path::PathBuf;

use async_trait::async_trait;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use super::{Connector, DeliveryError, OutboxMessage, Receipt};
use crate::settings::{ConfigError, Dur, ProfileContext};

/// A `file` profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Append JSON lines to this file (created with its directory if missing).
    pub path: Option<PathBuf>,
    /// Or: write one `<message id>.json` file per message into this directory.
    pub directory: Option<PathBuf>,
    /// Content must be JSON; it is embedded as a JSON value instead of a string. Default false.
    #[serde(default)]
    pub content_json: bool,
    /// fsync after each write. Default false.
    #[serde(default)]
    pub fsync: bool,
    /// Delivery timeout (common key, see conf/file.conf).
    pub timeout: Option<Dur>,
}

pub struct FileConnector {
    name: String,
    target: Target,
    content_json: bool,
    fsync: bool,
    /// The open spool file (lines mode), opened on first delivery.
    file: Mutex<Option<tokio::fs::File>>,
}

enum Target {
    Lines(PathBuf),
    Directory(PathBuf),
}

impl FileConnector {
    pub fn new(ctx: &ProfileContext, cfg: &FileConfig) -> Result<Self, ConfigError> {
        let profile = ctx.profile.as_str();
        let target =
            match (&cfg.path, &cfg.directory) {
                (Some(p), None) => Target::Lines(p.clone()),
                (None, Some(d)) => Target::Directory(d.clone()),
                _ => return Err(ctx.error(
                    "path",
                    "set exactly one of `path` (JSON lines) or `directory` (one file per message)",
                )),
            };
        Ok(FileConnector {
            name: format!("file/{profile}"),
            target,
            content_json: cfg.content_json,
            fsync: cfg.fsync,
            file: Mutex::new(None),
        })
    }

    /// The directory pictures go to: the spool file's, or the spool directory.
    fn image_dir(&self) -> PathBuf {
        match &self.target {
            Target::Lines(p) => p.parent().map(|d| d.to_path_buf()).unwrap_or_default(),
            Target::Directory(d) => d.clone(),
        }
    }

    /// Writes the message's pictures (each to a temporary name, then renamed, so a file is
    /// whole or absent) and returns what the line says about them.
    async fn write_images(&self, msg: &OutboxMessage) -> Result<serde_json::Value, DeliveryError> {
        let mut out = Vec::new();
        if msg.images.is_empty() {
            return Ok(serde_json::Value::Array(out));
        }
        let dir = self.image_dir();
        if !dir.as_os_str().is_empty() {
            tokio::fs::create_dir_all(&dir).await.map_err(io_error)?;
        }
        for img in &msg.images {
            // The file name comes from a template: keep only a plain last component.
            let name: String = img
                .file_name
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "._-".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            let path = dir.join(format!("{}.{}", msg.id, name.trim_start_matches('.')));
            let tmp = path.with_extension("part");
            tokio::fs::write(&tmp, &img.bytes).await.map_err(io_error)?;
            tokio::fs::rename(&tmp, &path).await.map_err(io_error)?;
            out.push(serde_json::json!({
                "file": path,
                "mime": img.mime,
                "width": img.width,
                "height": img.height,
                "bytes": img.bytes.len(),
            }));
        }
        Ok(serde_json::Value::Array(out))
    }

    fn record(&self, msg: &OutboxMessage) -> Result<serde_json::Value, DeliveryError> {
        let content = match (&msg.content, self.content_json) {
            (Some(c), true) => serde_json::from_str(c).map_err(|e| {
                DeliveryError::permanent(
                    codes::BAD_CONTENT.code,
                    format!("content is not JSON: {e}"),
                )
            })?,
            (c, _) => serde_json::Value::from(c.clone()),
        };
        Ok(serde_json::json!({
            "id": msg.id,
            "code": msg.code,
            "agent": msg.agent,
            "profile": msg.profile,
            "address": msg.address,
            "subject": msg.subject,
            "content": content,
            "attempt": msg.attempt,
            "created": msg.created,
            "delivered": chrono::Utc::now(),
        }))
    }
}

fn io_error(e: std::io::Error) -> DeliveryError {
    DeliveryError::retry(codes::FILE_IO.code, e.to_string())
}

#[async_trait]
impl Connector for FileConnector {
    fn name(&self) -> &str {
        &self.name
    }

    async fn deliver(&self, msg: &OutboxMessage) -> Result<Receipt, DeliveryError> {
        let mut record = self.record(msg)?;
        let images = self.write_images(msg).await?;
        if images.as_array().is_some_and(|a| !a.is_empty()) {
            record["images"] = images;
        }
        match &self.target {
            Target::Lines(path) => {
                let mut line = serde_json::to_vec(&record).expect("json value serializes");
                line.push(b'\n');
                let mut slot = self.file.lock().await;
                if slot.is_none() {
                    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                        tokio::fs::create_dir_all(dir).await.map_err(io_error)?;
                    }
                    let f = tokio::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .await
                        .map_err(io_error)?;
                    *slot = Some(f);
                }
                let f = slot.as_mut().expect("opened above");
                let written = async {
                    let offset = f.metadata().await?.len();
                    f.write_all(&line).await?;
                    if self.fsync {
                        f.sync_data().await?;
                    }
                    f.flush().await?;
                    Ok::<u64, std::io::Error>(offset)
                }
                .await;
                let offset = match written {
                    Ok(o) => o,
                    Err(e) => {
                        // Reopen next time: the file may have been removed or its disk replaced.
                        *slot = None;
                        return Err(io_error(e));
                    }
                };
                Ok(Receipt {
                    provider_id: Some(format!("{}#{offset}", path.display())),
                    ..Receipt::default()
                })
            }
            Target::Directory(dir) => {
                tokio::fs::create_dir_all(dir).await.map_err(io_error)?;
                let path = dir.join(format!("{}.json", msg.id));
                let body = serde_json::to_vec_pretty(&record).expect("json value serializes");
                tokio::fs::write(&path, body).await.map_err(io_error)?;
                Ok(Receipt {
                    provider_id: Some(path.display().to_string()),
                    ..Receipt::default()
                })
            }
        }
    }

    async fn healthcheck(&self) -> Result<(), DeliveryError> {
        let dir = match &self.target {
            Target::Lines(p) => p.parent().map(|p| p.to_path_buf()).unwrap_or_default(),
            Target::Directory(d) => d.clone(),
        };
        if dir.as_os_str().is_empty() || dir.exists() {
            return Ok(());
        }
        // The directory is created on first delivery; its nearest existing ancestor must be a
        // directory (a relative path's last ancestor is "", the working directory).
        match dir
            .ancestors()
            .map(|a| {
                if a.as_os_str().is_empty() {
                    std::path::Path::new(".")
                } else {
                    a
                }
            })
            .find(|a| a.exists())
        {
            Some(a) if a.is_dir() => Ok(()),
            _ => Err(DeliveryError::permanent(
                codes::FILE_IO.code,
                format!("cannot create {}", dir.display()),
            )),
        }
    }
}
