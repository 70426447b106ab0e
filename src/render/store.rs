//! The SQL calls behind `outboxd template …` and `outboxd render`: saving checks the syntax here,
//! in Rust, before `api.add_template` / `api.update_template` store it, and previews fetch the
//! source with `api.preview_template` and render it exactly as the daemon does.

use super::{check, Kind, RenderError, Template};
use crate::db::DbError;

/// Why a template could not be saved or previewed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Render(#[from] RenderError),
    #[error("{0}")]
    Db(#[from] DbError),
    #[error("ERR-400-040: template \"{0}\" not found")]
    NotFound(String),
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        StoreError::Db(e.into())
    }
}

/// What `outboxd template add` saves.
#[derive(Debug, Clone)]
pub struct NewTemplate {
    pub name: String,
    pub kind: Kind,
    pub subject: Option<String>,
    pub body: String,
    pub agent: Option<String>,
    pub profile: Option<String>,
    pub description: Option<String>,
}

/// Checks the syntax, then creates the template (version 1); returns its id.
pub async fn add(
    client: &tokio_postgres::Client,
    t: &NewTemplate,
) -> Result<uuid::Uuid, StoreError> {
    check(&t.name, t.kind, t.subject.as_deref(), &t.body)?;
    let row = client
        .query_one(
            "SELECT api.add_template($1, $2, $3, $4, $5, $6, $7)",
            &[
                &t.name,
                &t.kind.as_str(),
                &t.body,
                &t.subject,
                &t.agent,
                &t.profile,
                &t.description,
            ],
        )
        .await?;
    Ok(row.get(0))
}

/// Checks the syntax (with the stored kind), then adds the next version; returns its number.
/// `subject` None keeps the current subject.
pub async fn update(
    client: &tokio_postgres::Client,
    name: &str,
    subject: Option<&str>,
    body: &str,
) -> Result<i32, StoreError> {
    let current = get(client, name, None).await?;
    let kind = Kind::parse(&current.kind)?;
    check(name, kind, subject.or(current.subject.as_deref()), body)?;
    let row = client
        .query_one(
            "SELECT api.update_template($1, $2, $3)",
            &[&name, &body, &subject],
        )
        .await?;
    Ok(row.get(0))
}

/// One version of a template (the newest when `version` is None), through `api.template`.
pub async fn get(
    client: &tokio_postgres::Client,
    name: &str,
    version: Option<i32>,
) -> Result<Template, StoreError> {
    let row = client
        .query_opt(
            "SELECT name, kind, version, subject, body FROM api.template($1, $2)",
            &[&name, &version],
        )
        .await?
        .ok_or_else(|| StoreError::NotFound(name.to_string()))?;
    Ok(Template {
        name: row.get(0),
        kind: row.get(1),
        version: row.get(2),
        subject: row.get(3),
        body: row.get(4),
    })
}

/// The source a preview renders, through `api.preview_template` (which checks the variables).
pub async fn preview_source(
    client: &tokio_postgres::Client,
    name: &str,
    vars: &serde_json::Value,
) -> Result<Template, StoreError> {
    let row = client
        .query_one(
            "SELECT name, kind, version, subject, body FROM api.preview_template($1, $2)",
            &[&name, vars],
        )
        .await?;
    Ok(Template {
        name: row.get(0),
        kind: row.get(1),
        version: row.get(2),
        subject: row.get(3),
        body: row.get(4),
    })
}

/// `outboxd template list`: name, kind, agent, profile, newest version.
pub async fn list(client: &tokio_postgres::Client) -> Result<String, StoreError> {
    use std::fmt::Write as _;
    let rows = client
        .query(
            "SELECT name, kind, agent, profile, version FROM api.templates()",
            &[],
        )
        .await?;
    let mut out = String::new();
    for r in rows {
        let _ = writeln!(
            out,
            "{}\t{}\t{}\t{}\tv{}",
            r.get::<_, String>(0),
            r.get::<_, String>(1),
            r.get::<_, Option<String>>(2).unwrap_or_else(|| "-".into()),
            r.get::<_, Option<String>>(3).unwrap_or_else(|| "-".into()),
            r.get::<_, i32>(4)
        );
    }
    Ok(out)
}
