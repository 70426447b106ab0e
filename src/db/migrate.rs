//! Database creation and migrations.
//!
//! The migrations are the numbered files of `sql/`, embedded at build time; each records itself in
//! `outbox.schema_migrations`, so `psql -f` and `outboxd migrate` can be mixed. Concurrent daemons
//! serialize on an advisory lock.

use std::str::FromStr;

use tokio_postgres::NoTls;

use super::DbError;

/// (version, name, SQL) of every migration, in order.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "outbox", include_str!("../../sql/001_outbox.sql")),
    (2, "api", include_str!("../../sql/002_api.sql")),
    (3, "fencing", include_str!("../../sql/003_fencing.sql")),
];

const LOCK_KEY: i64 = 0x6f7574626f78; // "outbox"

/// Creates the database named in `url` when it does not exist (connecting to `postgres` on the same
/// server to do so). Returns whether it was created.
pub async fn ensure_database(url: &str) -> Result<bool, DbError> {
    let cfg = tokio_postgres::Config::from_str(url).map_err(|e| DbError::Config(e.to_string()))?;
    match cfg.connect(NoTls).await {
        Ok((client, conn)) => {
            drop(client);
            drop(conn);
            Ok(false)
        }
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INVALID_CATALOG_NAME) => {
            let name = cfg
                .get_dbname()
                .ok_or_else(|| DbError::Config("the database URL names no database".into()))?
                .to_string();
            let mut admin = cfg.clone();
            admin.dbname("postgres");
            let (client, conn) = admin.connect(NoTls).await?;
            let task = tokio::spawn(conn);
            let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
            let created = match client.batch_execute(&sql).await {
                Ok(()) => true,
                Err(e)
                    if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) =>
                {
                    false
                }
                Err(e) => return Err(e.into()),
            };
            drop(client);
            let _ = task.await;
            Ok(created)
        }
        Err(e) => Err(e.into()),
    }
}

/// Applies pending migrations; returns the versions applied.
pub async fn migrate(client: &tokio_postgres::Client) -> Result<Vec<i32>, DbError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
        .await?;
    let result = apply(client).await;
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
        .await;
    let applied = result?;
    unlock?;
    Ok(applied)
}

async fn apply(client: &tokio_postgres::Client) -> Result<Vec<i32>, DbError> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('outbox.schema_migrations') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    let done: Vec<i32> = if exists {
        client
            .query("SELECT version FROM outbox.schema_migrations", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect()
    } else {
        Vec::new()
    };
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        tracing::info!(version, name, "applying migration");
        if let Err(e) = client.batch_execute(sql).await {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(e.into());
        }
        applied.push(*version);
    }
    Ok(applied)
}

/// Connects to `url`, creating the database first if asked, and migrates it.
pub async fn prepare_database(url: &str, create: bool) -> Result<Vec<i32>, DbError> {
    if create {
        ensure_database(url).await?;
    }
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    let task = tokio::spawn(conn);
    let r = migrate(&client).await;
    drop(client);
    let _ = task.await;
    r
}
