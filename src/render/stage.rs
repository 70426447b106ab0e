//! The dispatcher's render step: a claimed message built from a template gets its subject and
//! content (and, for a picture card, its image) before the connector sees it.
//!
//! Picture cards: the first attempt renders the card (on a blocking thread: it is CPU work) and
//! stores the PNG in `outbox.message_images`; every later attempt (a retry, a reclaim after a
//! crash) sends the stored picture, so what a recipient gets never changes once rendered. A
//! `db:` background is read once per process and kept decoded ([`Cards`]).

use std::sync::Arc;

use super::card::{BackgroundRef, CardSpec, Cards};
use super::{text, Job, Kind};
use crate::connector::{codes, DeliveryError, Image, OutboxMessage};
use crate::db::{Db, DbError};

const STORED: &str = "SELECT file_name, mime, width, height, bytes FROM outbox.message_images \
                      WHERE message_id = $1";
const STORE: &str = "INSERT INTO outbox.message_images \
                     (message_id, file_name, mime, width, height, bytes) \
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (message_id) DO NOTHING";
const BACKGROUND: &str = "SELECT bytes FROM outbox.card_backgrounds WHERE name = $1";

/// Renders `job` into `msg`. A render error is permanent (it would fail the same way again); a
/// database error reading or storing a picture is `card-store`, retried.
pub async fn prepare(
    cards: &Arc<Cards>,
    db: &Db,
    msg: &mut OutboxMessage,
    job: Job,
) -> Result<(), DeliveryError> {
    if Kind::parse(&job.template.kind)? != Kind::Image {
        let r = super::render(&job)?;
        if r.subject.is_some() {
            msg.subject = r.subject;
        }
        msg.content = Some(r.content);
        return Ok(());
    }
    let t = &job.template;
    if let Some(s) = &t.subject {
        msg.subject = Some(text::render(&t.name, "subject", Kind::Text, s, &job.vars)?);
    }
    let id = msg.id;
    let stored = db
        .timed("stored card", async {
            let c = db.pool().get().await?;
            let st = c.prepare_cached(STORED).await?;
            Ok::<_, DbError>(c.query_opt(&st, &[&id]).await?)
        })
        .await
        .map_err(store_error)?;
    if let Some(r) = stored {
        // Rendered before: send that picture; only its text is rendered again.
        let spec = CardSpec::parse(&t.name, &t.body)?;
        msg.content = Some(cards.alt(&t.name, &spec, &job.vars)?);
        let bytes: Vec<u8> = r.get(4);
        msg.images = vec![Arc::new(Image {
            file_name: r.get(0),
            mime: r.get(1),
            width: r.get::<_, i32>(2) as u32,
            height: r.get::<_, i32>(3) as u32,
            bytes: bytes.into(),
        })];
        return Ok(());
    }
    let spec = CardSpec::parse(&t.name, &t.body)?;
    let mut background = None;
    if let Ok(Some(BackgroundRef::Db(name))) = spec.background_ref() {
        if !cards.has_background(&spec, &BackgroundRef::Db(name.clone())) {
            background = db
                .timed("card background", async {
                    let c = db.pool().get().await?;
                    let st = c.prepare_cached(BACKGROUND).await?;
                    Ok::<_, DbError>(c.query_opt(&st, &[&name]).await?.map(|r| r.get(0)))
                })
                .await
                .map_err(store_error)?;
        }
    }
    let (cards2, job2) = (Arc::clone(cards), job.clone());
    let (alt, image) =
        tokio::task::spawn_blocking(move || cards2.render(&job2.template, &job2.vars, background))
            .await
            .map_err(|e| {
                DeliveryError::permanent(
                    codes::CARD_SPEC.code,
                    format!("the card renderer failed: {e}"),
                )
            })??;
    let image = Arc::new(image);
    let img = Arc::clone(&image);
    db.timed("store card", async {
        let c = db.pool().get().await?;
        let st = c.prepare_cached(STORE).await?;
        c.execute(
            &st,
            &[
                &id,
                &img.file_name,
                &img.mime,
                &(img.width as i32),
                &(img.height as i32),
                &img.bytes.as_ref(),
            ],
        )
        .await?;
        Ok::<_, DbError>(())
    })
    .await
    .map_err(store_error)?;
    msg.content = Some(alt);
    msg.images = vec![image];
    Ok(())
}

fn store_error(e: DbError) -> DeliveryError {
    DeliveryError::retry(codes::CARD_STORE.code, format!("picture card: {e}"))
}
