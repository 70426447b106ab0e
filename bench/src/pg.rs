//! PostgreSQL helpers: one fresh database per scenario (created from the admin URL, dropped
//! afterwards), bulk enqueue for outboxd and for graphile-worker, and server facts for the report.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_postgres::{Client, NoTls};

/// Connects and drives the connection on the current runtime.
pub async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connect to {url}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// A database of its own for one scenario; `drop_now` removes it.
pub struct BenchDb {
    pub name: String,
    pub url: String,
    admin: String,
}

impl BenchDb {
    /// Creates `outboxd_bench_<tag>` (dropping a leftover of the same name first; the prefix is
    /// `BENCH_DB_PREFIX` when set, so that two runs on one PostgreSQL do not drop each other's).
    pub async fn create(admin: &str, tag: &str) -> anyhow::Result<BenchDb> {
        let prefix = std::env::var("BENCH_DB_PREFIX").unwrap_or_else(|_| "outboxd_bench".into());
        let name = format!("{prefix}_{tag}");
        let c = connect(admin).await?;
        c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await?;
        c.batch_execute(&format!("CREATE DATABASE {name}")).await?;
        let mut u = url::Url::parse(admin)?;
        u.set_path(&format!("/{name}"));
        Ok(BenchDb {
            name,
            url: u.to_string(),
            admin: admin.to_string(),
        })
    }

    /// Creates the database and applies the migrations of the outboxd binary under test
    /// (`outboxd migrate`), so the SQL measured is the SQL that binary ships.
    pub async fn outbox(
        admin: &str,
        tag: &str,
        outboxd: &Path,
        work: &Path,
    ) -> anyhow::Result<BenchDb> {
        let db = Self::create(admin, tag).await?;
        std::fs::create_dir_all(work)?;
        let conf = work.join(format!("migrate-{tag}.toml"));
        std::fs::write(
            &conf,
            format!("database_url = \"{}\"\ncreate_database = false\n", db.url),
        )?;
        let out = std::process::Command::new(outboxd)
            .arg("--config")
            .arg(&conf)
            .arg("migrate")
            .env_remove("DATABASE_URL")
            .output()
            .with_context(|| format!("run {} migrate", outboxd.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "outboxd migrate failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(db)
    }

    pub async fn client(&self) -> anyhow::Result<Client> {
        connect(&self.url).await
    }

    pub async fn drop_now(self) -> anyhow::Result<()> {
        let c = connect(&self.admin).await?;
        c.batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .await?;
        Ok(())
    }

    /// Committed + rolled back transactions of this database so far (pg_stat_database), read
    /// from the admin database so the reading itself is not counted.
    pub async fn xacts(&self) -> anyhow::Result<i64> {
        let c = connect(&self.admin).await?;
        let row = c
            .query_one(
                "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database WHERE datname = $1",
                &[&self.name],
            )
            .await?;
        Ok(row.get(0))
    }
}

/// The body every benchmark message carries (both systems).
pub fn body_sql(n: &str) -> String {
    format!("json_build_object('n', {n}, 'text', 'benchmark message')::text")
}

/// Enqueues `count` http messages (codes `bench-<from>`…) for outboxd in one INSERT, directly as
/// prepared: the statement trigger writes history and sends one NOTIFY. Returns the time it took.
/// With `smtp`, the messages are mails for smtp.agent (JSON form, `bench-<n>` in the text).
pub async fn enqueue_outbox(
    c: &Client,
    from: u64,
    count: u64,
    smtp: bool,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    insert_outbox(c, from, count, smtp).await?;
    // Fresh statistics, as an operator would have after autovacuum.
    c.batch_execute("ANALYZE outbox.messages, outbox.queue")
        .await?;
    Ok(t.elapsed())
}

/// The INSERT of [`enqueue_outbox`] without its ANALYZE (the backlog scenario enqueues in chunks
/// and analyzes once per step).
pub async fn insert_outbox(c: &Client, from: u64, count: u64, smtp: bool) -> anyhow::Result<()> {
    let (agent, address, content) = if smtp {
        (
            "smtp.agent",
            "user@example.com",
            "json_build_object('subject', 'benchmark', 'text', 'benchmark message bench-' || g)::text"
                .to_string(),
        )
    } else {
        ("http.agent", "/sink", body_sql("g"))
    };
    let sql = format!(
        "INSERT INTO outbox.messages (agent_id, code, profile, address, content, state)
         SELECT (SELECT id FROM outbox.agents WHERE code = '{agent}'), 'bench-' || g, 'default',
                '{address}', {content}, 'prepared'
           FROM generate_series({from}::bigint, {}::bigint) g",
        from + count - 1
    );
    c.batch_execute(&sql).await?;
    Ok(())
}

/// Bytes on disk of every table of schema `outbox` with its indexes and TOAST (whatever tables the
/// schema under test has: messages, history, queue…).
pub async fn outbox_schema_bytes(c: &Client) -> anyhow::Result<i64> {
    Ok(c.query_one(
        "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = 'outbox' AND c.relkind IN ('r', 'p', 'm')",
        &[],
    )
    .await?
    .get(0))
}

/// Messages still to deliver (outboxd): prepared or sending, the rows of its queue.
pub async fn outbox_remaining(c: &Client) -> anyhow::Result<i64> {
    Ok(c.query_one("SELECT count(*) FROM outbox.queue", &[])
        .await?
        .get(0))
}

/// Enqueues `count` jobs of task `post` for graphile-worker in one statement (`add_jobs`).
pub async fn enqueue_graphile(c: &Client, from: u64, count: u64) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let sql = format!(
        "SELECT count(*) FROM graphile_worker.add_jobs(ARRAY(
             SELECT ROW('post', {}::json, NULL, NULL, NULL, NULL, NULL, NULL)::graphile_worker.job_spec
               FROM generate_series({from}::bigint, {}::bigint) g))",
        body_sql("g"),
        from + count - 1
    );
    c.batch_execute(&sql).await?;
    c.batch_execute("ANALYZE graphile_worker._private_jobs")
        .await?;
    Ok(t.elapsed())
}

/// Jobs not yet completed (graphile-worker deletes a job when it completes).
pub async fn graphile_remaining(c: &Client) -> anyhow::Result<i64> {
    Ok(
        c.query_one("SELECT count(*) FROM graphile_worker._private_jobs", &[])
            .await?
            .get(0),
    )
}

/// `PostgreSQL 15.x` and the settings that matter to these figures.
pub async fn server_facts(admin: &str) -> anyhow::Result<serde_json::Value> {
    let c = connect(admin).await?;
    let mut facts = serde_json::Map::new();
    for (k, sql) in [
        ("version", "SHOW server_version"),
        ("shared_buffers", "SHOW shared_buffers"),
        ("synchronous_commit", "SHOW synchronous_commit"),
        ("fsync", "SHOW fsync"),
        ("max_connections", "SHOW max_connections"),
        ("shared_preload_libraries", "SHOW shared_preload_libraries"),
    ] {
        let v: String = c.query_one(sql, &[]).await?.get(0);
        facts.insert(k.into(), v.into());
    }
    Ok(facts.into())
}

/// One row of pg_stat_user_functions.
pub struct FunctionStat {
    pub name: String,
    pub calls: i64,
    pub total_ms: f64,
    pub self_ms: f64,
}

/// Calls and times of the PL/pgSQL functions run in this database (needs `track_functions`).
pub async fn function_stats(c: &Client) -> anyhow::Result<Vec<FunctionStat>> {
    let rows = c
        .query(
            "SELECT schemaname || '.' || funcname, calls, total_time, self_time
               FROM pg_stat_user_functions ORDER BY total_time DESC",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| FunctionStat {
            name: r.get(0),
            calls: r.get(1),
            total_ms: r.get(2),
            self_ms: r.get(3),
        })
        .collect())
}
