//! Pictures through chat providers (a rendered card, [`OutboxMessage::images`]): which picture a
//! message sends, the provider's size and type limits checked before any network call, the one
//! upload call (a one-file form → the provider's media id) and the media ids kept for retries.
//!
//! Each connector that sends pictures declares its [`Limits`] and calls [`picture`] first: a
//! picture over the limit fails with the permanent `image-too-large` (a type the provider does not
//! take with `bad-content`) and nothing is sent. Uploads go through [`upload`] with the
//! connector's own authenticated POST, so token refresh and error tables stay the connector's.
//!
//! Nothing doubled: a connector sends one message per outbox message — the picture (with the
//! text as its caption where the provider has captions) — so a failed send retried is at worst a
//! second upload. [`MediaIds`] keeps the media id of an upload whose send failed, so the retry
//! sends the very same request (which WeCom's duplicate check and DingTalk's same-content rule
//! recognise, should the failed send have gone through after all) and does not upload again.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
use uuid::Uuid;

use super::multipart::file_form;
use crate::connector::{codes, DeliveryError, Image, OutboxMessage};

/// PNG and JPEG: what every chat provider here takes (rendered cards are PNG).
pub const PNG_JPEG: &[&str] = &["image/png", "image/jpeg"];

/// What a provider takes as a picture.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The provider, for error texts (`WeCom`).
    pub provider: &'static str,
    /// The largest picture, in bytes (of the file, before any base64).
    pub max_bytes: usize,
    /// The media types it takes.
    pub types: &'static [&'static str],
}

/// The picture `msg` sends — its first image — checked against `limits`; `None` when the message
/// has none. Permanent errors, before any network call: `image-too-large`, and `bad-content`
/// for a type the provider does not take or an empty picture.
pub fn picture<'a>(
    msg: &'a OutboxMessage,
    limits: &Limits,
) -> Result<Option<&'a Image>, DeliveryError> {
    let Some(img) = msg.images.first() else {
        return Ok(None);
    };
    if img.bytes.is_empty() {
        return Err(DeliveryError::permanent(
            codes::BAD_CONTENT.code,
            format!("the picture {} is empty", img.file_name),
        ));
    }
    if !limits.types.contains(&img.mime.as_str()) {
        return Err(DeliveryError::permanent(
            codes::BAD_CONTENT.code,
            format!(
                "the picture {} is {}; {} takes {}",
                img.file_name,
                img.mime,
                limits.provider,
                limits.types.join(", ")
            ),
        ));
    }
    if img.bytes.len() > limits.max_bytes {
        return Err(DeliveryError::permanent(
            codes::IMAGE_TOO_LARGE.code,
            format!(
                "the picture {} is {} bytes; {} takes at most {}",
                img.file_name,
                img.bytes.len(),
                limits.provider,
                limits.max_bytes
            ),
        ));
    }
    Ok(Some(img))
}

/// The text that goes with a picture: the message's content (a card's `alt` text), trimmed;
/// `None` when there is none.
pub fn caption(msg: &OutboxMessage) -> Option<&str> {
    msg.content
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// Uploads `img` as the one file of a `multipart/form-data` body in `field` (its file name and
/// media type on the part) with the connector's `post` (content type, body → the provider's
/// checked JSON answer) and returns the media id at `pointer`. An answer without one is
/// `bad(reason)` (the connector's "bad response" code).
pub async fn upload<F, Fut>(
    img: &Image,
    field: &str,
    pointer: &str,
    post: F,
    bad: impl FnOnce(String) -> DeliveryError,
) -> Result<String, DeliveryError>
where
    F: FnOnce(String, Vec<u8>) -> Fut,
    Fut: Future<Output = Result<Value, DeliveryError>>,
{
    let (ct, body) = file_form(field, &img.file_name, &img.mime, &img.bytes);
    let v = post(ct, body).await?;
    v.pointer(pointer)
        .and_then(Value::as_str)
        .filter(|id| !id.is_empty())
        .map(str::to_string)
        .ok_or_else(|| bad(format!("the upload answered without {pointer}")))
}

/// At most this many media ids are kept (the oldest go first).
const CAPACITY: usize = 4096;

/// Media ids of pictures uploaded for messages not delivered yet, by message id, for at most
/// `ttl` (below the provider's media lifetime). In memory only: after a restart a retry uploads
/// again — a second upload, never a second message, since the send had failed.
#[derive(Debug)]
pub struct MediaIds {
    ttl: Duration,
    ids: Mutex<HashMap<Uuid, (String, Instant)>>,
}

impl MediaIds {
    pub fn new(ttl: Duration) -> Self {
        MediaIds {
            ttl,
            ids: Mutex::new(HashMap::new()),
        }
    }

    /// The media id kept for `message`, else the one `upload` returns (then kept).
    pub async fn get_or_upload(
        &self,
        message: Uuid,
        upload: impl Future<Output = Result<String, DeliveryError>>,
    ) -> Result<String, DeliveryError> {
        if let Some(id) = self.get(message) {
            return Ok(id);
        }
        let id = upload.await?;
        self.put(message, id.clone());
        Ok(id)
    }

    fn get(&self, message: Uuid) -> Option<String> {
        let ids = self.ids.lock().expect("media ids lock");
        ids.get(&message)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(id, _)| id.clone())
    }

    fn put(&self, message: Uuid, id: String) {
        let mut ids = self.ids.lock().expect("media ids lock");
        let ttl = self.ttl;
        ids.retain(|_, (_, at)| at.elapsed() < ttl);
        if ids.len() >= CAPACITY {
            if let Some(oldest) = ids.iter().min_by_key(|(_, (_, at))| *at).map(|(k, _)| *k) {
                ids.remove(&oldest);
            }
        }
        ids.insert(message, (id, Instant::now()));
    }

    /// Forgets `message`'s media id (it was delivered, or failed for good).
    pub fn forget(&self, message: Uuid) {
        self.ids.lock().expect("media ids lock").remove(&message);
    }

    /// How many media ids are kept (for tests).
    pub fn len(&self) -> usize {
        self.ids.lock().expect("media ids lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A file name's media type, for uploads of files the content carries (`report.pdf`).
pub fn mime_of(filename: &str) -> &'static str {
    let ext = filename
        .rsplit('.')
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "bmp" => "image/bmp",
        "amr" => "audio/amr",
        "mp3" => "audio/mpeg",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn msg(images: Vec<Image>) -> OutboxMessage {
        OutboxMessage {
            id: Uuid::new_v4(),
            code: "c".into(),
            agent_type: "x".into(),
            agent: "x.agent".into(),
            profile: "default".into(),
            address: None,
            subject: None,
            content: Some("  the alt text \n".into()),
            label: None,
            attempt: 1,
            max_attempts: None,
            priority: 0,
            created: chrono::Utc::now(),
            images: images.into_iter().map(Arc::new).collect(),
        }
    }

    fn png(n: usize) -> Image {
        Image {
            file_name: "card.png".into(),
            mime: "image/png".into(),
            width: 1,
            height: 1,
            bytes: vec![7u8; n].into(),
        }
    }

    const LIMITS: Limits = Limits {
        provider: "Test",
        max_bytes: 10,
        types: PNG_JPEG,
    };

    #[test]
    fn the_first_picture_within_the_limits() {
        assert!(picture(&msg(vec![]), &LIMITS).unwrap().is_none());
        let m = msg(vec![png(10)]);
        assert_eq!(picture(&m, &LIMITS).unwrap().unwrap().bytes.len(), 10);
        let e = picture(&msg(vec![png(11)]), &LIMITS).unwrap_err();
        assert_eq!(e.code(), "image-too-large");
        assert!(!e.is_retry());
        assert!(
            e.reason().contains("11 bytes; Test takes at most 10"),
            "{e}"
        );
        let mut gif = png(3);
        gif.mime = "image/gif".into();
        assert_eq!(
            picture(&msg(vec![gif]), &LIMITS).unwrap_err().code(),
            "bad-content"
        );
        assert_eq!(caption(&m), Some("the alt text"));
    }

    #[tokio::test]
    async fn uploads_read_the_media_id_and_ids_are_kept_until_forgotten() {
        let img = png(4);
        let id = upload(
            &img,
            "media",
            "/media_id",
            |ct, body| async move {
                assert!(ct.starts_with("multipart/form-data; boundary="));
                assert!(String::from_utf8_lossy(&body).contains("Content-Type: image/png"));
                Ok(serde_json::json!({"media_id": "M1"}))
            },
            |r| DeliveryError::retry("bad", r),
        )
        .await
        .unwrap();
        assert_eq!(id, "M1");
        let e = upload(
            &img,
            "media",
            "/media_id",
            |_, _| async { Ok(serde_json::json!({})) },
            |r| DeliveryError::retry("bad", r),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), "bad");

        let ids = MediaIds::new(Duration::from_secs(60));
        let m = Uuid::new_v4();
        let first = ids
            .get_or_upload(m, async { Ok("A".to_string()) })
            .await
            .unwrap();
        let again = ids
            .get_or_upload(m, async { panic!("uploaded twice") })
            .await
            .unwrap();
        assert_eq!((first.as_str(), again.as_str()), ("A", "A"));
        ids.forget(m);
        assert!(ids.is_empty());
        let expired = MediaIds::new(Duration::ZERO);
        expired.put(m, "old".into());
        let fresh = expired
            .get_or_upload(m, async { Ok("new".to_string()) })
            .await
            .unwrap();
        assert_eq!(fresh, "new");
    }
}
