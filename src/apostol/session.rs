//! Talking to the Apostol database as MessageServer does: log in with the bot's OAuth2 client
//! (`api.login`), take the bot's session (`api.get_sessions`), sign the login session out, and
//! start every statement batch — one transaction here — with `SELECT * FROM api.authorize(…)`.
//!
//! Invariants: the client secret goes to the database as a bound parameter only, never into a
//! log line or an error text. A batch whose `authorize` answers `authorized = false` (the session
//! expired or was closed) logs in again and runs once more; the session is also renewed every
//! `relogin_every` (24 h, as MessageServer).

use std::time::Instant;

use tokio_postgres::types::ToSql;
use tokio_postgres::Row;
use uuid::Uuid;

use crate::apostol::config::ApostolConfig;
use crate::db::{Db, DbError};

/// A statement parameter.
#[derive(Debug, Clone)]
pub enum Param {
    Uuid(Uuid),
    Text(Option<String>),
}

impl Param {
    fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Param::Uuid(u) => u,
            Param::Text(t) => t,
        }
    }
}

/// One statement of a batch.
#[derive(Debug, Clone)]
pub struct Stmt {
    pub sql: &'static str,
    pub params: Vec<Param>,
}

impl Stmt {
    pub fn new(sql: &'static str, params: Vec<Param>) -> Stmt {
        Stmt { sql, params }
    }
}

/// Why a batch failed.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("{0}")]
    Db(#[from] DbError),
    #[error("api.authorize refused the bot session right after a fresh login: {0}")]
    Unauthorized(String),
    #[error("api.login did not return a session")]
    NoSession,
}

impl BatchError {
    /// The platform's stable error code (`ERR-400-032`…) that the failing statement raised.
    pub fn apostol_code(&self) -> Option<String> {
        let BatchError::Db(DbError::Query(e)) = self else {
            return None;
        };
        let msg = e.as_db_error()?.message();
        let code = msg.split([':', ' ']).next()?;
        (code.starts_with("ERR-") && code.len() >= 11).then(|| code.to_string())
    }
}

struct Current {
    bot: String,
    since: Instant,
}

/// The bot's session, shared by every batch.
pub struct Session {
    db: Db,
    cfg: ApostolConfig,
    current: tokio::sync::Mutex<Option<Current>>,
    logins: std::sync::atomic::AtomicU64,
}

const AUTHORIZE: &str = "SELECT * FROM api.authorize($1::text)";

impl Session {
    pub fn new(db: Db, cfg: ApostolConfig) -> Session {
        Session {
            db,
            cfg,
            current: tokio::sync::Mutex::new(None),
            logins: Default::default(),
        }
    }

    /// How many times the daemon logged in.
    pub fn logins(&self) -> u64 {
        self.logins.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs `stmts` in one transaction that starts with `api.authorize`; the rows of each.
    pub async fn batch(
        &self,
        what: &'static str,
        stmts: &[Stmt],
    ) -> Result<Vec<Vec<Row>>, BatchError> {
        let mut refused: Option<String> = None;
        loop {
            let bot = self.bot(refused.as_deref()).await?;
            match self.try_batch(what, &bot, stmts).await? {
                Some(rows) => return Ok(rows),
                None if refused.is_some() => return Err(BatchError::Unauthorized(what.into())),
                None => {
                    tracing::info!(
                        call = what,
                        "the bot session is no longer authorized; logging in again"
                    );
                    refused = Some(bot);
                }
            }
        }
    }

    /// `None` when `authorize` said no.
    async fn try_batch(
        &self,
        what: &'static str,
        bot: &str,
        stmts: &[Stmt],
    ) -> Result<Option<Vec<Vec<Row>>>, BatchError> {
        Ok(self
            .db
            .timed(what, async {
                let mut conn = self.db.pool().get().await?;
                let tx = conn.transaction().await?;
                let auth = tx.query_one(AUTHORIZE, &[&bot]).await?;
                let authorized: bool = auth.try_get("authorized").unwrap_or(false);
                if !authorized {
                    let message: Option<String> = auth.try_get("message").ok().flatten();
                    tracing::debug!(
                        call = what,
                        message = message.as_deref().unwrap_or(""),
                        "api.authorize: not authorized"
                    );
                    // Nothing else ran; committing keeps whatever the platform records about it.
                    tx.commit().await?;
                    return Ok(None);
                }
                let mut out = Vec::with_capacity(stmts.len());
                for s in stmts {
                    let params: Vec<&(dyn ToSql + Sync)> =
                        s.params.iter().map(Param::as_sql).collect();
                    out.push(tx.query(s.sql, &params).await?);
                }
                tx.commit().await?;
                Ok(Some(out))
            })
            .await?)
    }

    /// The bot session: the current one, or a fresh login when there is none, it is older than
    /// `relogin_every`, or it is the one `authorize` just `refused` (batches that saw the same
    /// refusal at once log in only once: the later ones find the new session).
    async fn bot(&self, refused: Option<&str>) -> Result<String, BatchError> {
        let mut current = self.current.lock().await;
        if let Some(c) = current.as_ref() {
            if Some(c.bot.as_str()) != refused && c.since.elapsed() < self.cfg.relogin_every {
                return Ok(c.bot.clone());
            }
        }
        let bot = self.login().await?;
        *current = Some(Current {
            bot: bot.clone(),
            since: Instant::now(),
        });
        Ok(bot)
    }

    /// `api.login` → `api.get_sessions` in one transaction, then `api.signout` of the login
    /// session (best effort: it expires anyway).
    async fn login(&self) -> Result<String, BatchError> {
        // The host is an inet; an IP address (checked at configuration) is safe as a literal and
        // lets PostgreSQL pick the type the function declares.
        let host = self.cfg.host.to_string();
        let login_sql = format!("SELECT * FROM api.login($1::text, $2::text, $3::text, '{host}')");
        let sessions_sql = format!("SELECT * FROM api.get_sessions($1::text, $2::text, '{host}')");
        let (login, bot) = self
            .db
            .timed("api.login", async {
                let mut conn = self.db.pool().get().await?;
                let tx = conn.transaction().await?;
                let row = tx
                    .query_opt(
                        &login_sql,
                        &[
                            &self.cfg.client_id,
                            &self.cfg.client_secret.expose(),
                            &self.cfg.agent,
                        ],
                    )
                    .await?;
                let login: Option<String> = row.and_then(|r| r.try_get("session").ok().flatten());
                let bot = tx
                    .query(&sessions_sql, &[&self.cfg.username, &self.cfg.agent])
                    .await?
                    .first()
                    .and_then(|r| r.try_get::<_, Option<String>>(0).ok().flatten());
                tx.commit().await?;
                Ok((login, bot))
            })
            .await?;
        let bot = bot.ok_or(BatchError::NoSession)?;
        self.logins
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(username = %self.cfg.username, "logged in to the Apostol database");
        if let Some(login) = login.filter(|l| *l != bot) {
            let signout = self
                .db
                .timed("api.signout", async {
                    let conn = self.db.pool().get().await?;
                    conn.query("SELECT * FROM api.signout($1::text)", &[&login])
                        .await?;
                    Ok(())
                })
                .await;
            if let Err(e) = signout {
                tracing::warn!(error = %e, "api.signout of the login session failed; it expires by itself");
            }
        }
        Ok(bot)
    }
}
