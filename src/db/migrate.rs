//! Database creation and migrations.
//!
//! The migrations are the numbered files of `sql/`, embedded at build time; each records itself in
//! `outbox.schema_migrations`, so `psql -f` and `outboxd migrate` can be mixed. Concurrent daemons
//! serialize on an advisory lock.
//!
//! Migrations run as the connecting user, never as a `session_role` (`-c role=…`) in the URL: they
//! create the roles (migration 4) and hand the objects to `outboxd_owner`, which the daemon's role
//! cannot do, and on a fresh server that role does not exist yet.

use super::DbError;

/// (version, name, SQL) of every migration, in order.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "outbox", include_str!("../../sql/001_outbox.sql")),
    (2, "api", include_str!("../../sql/002_api.sql")),
    (3, "fencing", include_str!("../../sql/003_fencing.sql")),
    (4, "roles", include_str!("../../sql/004_roles.sql")),
    (5, "retention", include_str!("../../sql/005_retention.sql")),
    (6, "apostol", include_str!("../../sql/006_apostol.sql")),
    (7, "templates", include_str!("../../sql/007_templates.sql")),
    (
        8,
        "chat_agents",
        include_str!("../../sql/008_chat_agents.sql"),
    ),
    (
        9,
        "wechat_wecom",
        include_str!("../../sql/009_wechat_wecom.sql"),
    ),
    (10, "dingtalk", include_str!("../../sql/010_dingtalk.sql")),
    (11, "chat_send", include_str!("../../sql/011_chat_send.sql")),
    (
        12,
        "aliyun_sms",
        include_str!("../../sql/012_aliyun_sms.sql"),
    ),
    (
        13,
        "rate_limits",
        include_str!("../../sql/013_rate_limits.sql"),
    ),
    (14, "cards", include_str!("../../sql/014_cards.sql")),
    (15, "tasks", include_str!("../../sql/015_tasks.sql")),
    (16, "kafka", include_str!("../../sql/016_kafka.sql")),
    (
        17,
        "card_media",
        include_str!("../../sql/017_card_media.sql"),
    ),
    (18, "dd_center", include_str!("../../sql/018_dd_center.sql")),
    (19, "hot_path", include_str!("../../sql/019_hot_path.sql")),
    (20, "queue", include_str!("../../sql/020_queue.sql")),
    (
        21,
        "task_wakeups",
        include_str!("../../sql/021_task_wakeups.sql"),
    ),
    (
        22,
        "log_partitions",
        include_str!("../../sql/022_log_partitions.sql"),
    ),
    (
        23,
        "write_once",
        include_str!("../../sql/023_write_once.sql"),
    ),
    (24, "hot_claim", include_str!("../../sql/024_hot_claim.sql")),
    (
        25,
        "time_ordered_ids",
        include_str!("../../sql/025_time_ordered_ids.sql"),
    ),
];

const LOCK_KEY: i64 = 0x6f7574626f78; // "outbox"

/// Creates the database named in `url` when it does not exist (connecting to `postgres` on the same
/// server to do so, with the same TLS settings). Returns whether it was created.
pub async fn ensure_database(url: &str) -> Result<bool, DbError> {
    let target = as_connecting_user(url)?;
    let cfg = &target.config;
    match target.connect().await {
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
            let mut admin = target.clone();
            admin.config.dbname("postgres");
            let (client, conn) = admin.connect().await?;
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
    // The logs' weekly partitions for the weeks ahead (sql/022); idempotent and cheap.
    client
        .execute("SELECT outbox.ensure_log_partitions(4)", &[])
        .await?;
    Ok(applied)
}

/// Connects to `url`, creating the database first if asked, and migrates it.
pub async fn prepare_database(url: &str, create: bool) -> Result<Vec<i32>, DbError> {
    if create {
        ensure_database(url).await?;
    }
    let (client, conn) = as_connecting_user(url)?.connect().await?;
    let task = tokio::spawn(conn);
    let r = migrate(&client).await;
    drop(client);
    let _ = task.await;
    r
}

/// The connection settings of `url` without any `role` startup option (`-c role=…`, `-crole=…`,
/// `--role=…`): the session stays the connecting user.
fn as_connecting_user(url: &str) -> Result<super::tls::Target, DbError> {
    let mut target = super::tls::target(url)?;
    if let Some(options) = target.config.get_options() {
        let kept = without_role(options);
        target.config.options(&kept);
    }
    Ok(target)
}

/// `options` (space-separated, `\` escapes the next character) minus the settings of `role`.
fn without_role(options: &str) -> String {
    let mut words: Vec<String> = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                word.push(c);
                if let Some(n) = chars.next() {
                    word.push(n);
                }
            }
            c if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let is_role = |w: &str| w.starts_with("role=");
    let mut kept: Vec<String> = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let w = words[i].as_str();
        if w == "-c" && words.get(i + 1).is_some_and(|n| is_role(n)) {
            i += 2;
            continue;
        }
        if w.strip_prefix("-c").is_some_and(is_role) || w.strip_prefix("--").is_some_and(is_role) {
            i += 1;
            continue;
        }
        kept.push(words[i].clone());
        i += 1;
    }
    kept.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_drop_the_session_role() {
        assert_eq!(without_role("-c role=outboxd_daemon"), "");
        assert_eq!(
            without_role("-c synchronous_commit=off  -crole=x --role=y -c work_mem=8MB"),
            "-c synchronous_commit=off -c work_mem=8MB"
        );
        assert_eq!(
            without_role("-c application_name=a\\ b -c role=r"),
            "-c application_name=a\\ b"
        );
        let url = crate::db::with_session_role("postgres://u@h/db?sslmode=disable", "r");
        assert_eq!(
            as_connecting_user(&url).unwrap().config.get_options(),
            Some("")
        );
    }
}
