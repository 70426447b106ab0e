//! What a scenario costs the PostgreSQL server: CPU time of the postgres processes (from /proc)
//! and WAL bytes (`pg_current_wal_lsn()` difference), read around a measured window.
//!
//! Two CPU figures, because the server is shared (other databases, other users of the machine):
//! - **server**: the postmaster's own utime+stime, its cutime+cstime (every child that exited and was
//!   reaped, backends included) and the utime+stime of its live children, as a difference between
//!   the start and the end of the window — everything PostgreSQL did meanwhile, whoever asked;
//! - **database**: the backends whose process title names the scenario's database (the system's
//!   connections, pgbench's, autovacuum workers on it), sampled during the window so that a backend
//!   which exits is counted up to its last sample. The benchmark's own connection is left out.
//!
//! WAL is server-wide only: PostgreSQL does not split it by database.

use std::collections::HashMap;

use tokio_postgres::Client;

/// Clock ticks per second of /proc's utime/stime (USER_HZ; 100 on Linux).
const TICKS: f64 = 100.0;

/// The postmaster's pid: the parent of one of its backends (ours).
pub async fn postmaster_pid(admin: &Client) -> anyhow::Result<u32> {
    let backend: i32 = admin
        .query_one("SELECT pg_backend_pid()", &[])
        .await?
        .get(0);
    let stat = Stat::read(backend as u32).ok_or_else(|| {
        anyhow::anyhow!("cannot read /proc/{backend}/stat (is PostgreSQL local?)")
    })?;
    Ok(stat.ppid)
}

/// The fields of /proc/<pid>/stat used here.
struct Stat {
    ppid: u32,
    /// utime + stime, ticks.
    own: u64,
    /// cutime + cstime (reaped children), ticks.
    children: u64,
}

impl Stat {
    fn read(pid: u32) -> Option<Stat> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // After the parenthesised command name: state (3), ppid (4), … utime (14), stime (15),
        // cutime (16), cstime (17); `f[0]` is field 3.
        let rest = &text[text.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
        Some(Stat {
            ppid: n(1)? as u32,
            own: n(11)? + n(12)?,
            children: n(13)? + n(14)?,
        })
    }
}

/// One reading of the whole server: (postmaster tree ticks, live children as pid → (ticks, title)).
fn read_tree(postmaster: u32) -> (u64, HashMap<u32, (u64, String)>) {
    let mut total = Stat::read(postmaster).map_or(0, |s| s.own + s.children);
    let mut live = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return (total, live);
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Some(s) = Stat::read(pid) else { continue };
        if s.ppid != postmaster {
            continue;
        }
        total += s.own;
        let title = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        live.insert(pid, (s.own, title));
    }
    (total, live)
}

/// A window being measured: [`Meter::start`], [`Meter::sample`] as often as convenient (every
/// ~50 ms in the burn-down loop), [`Meter::finish`].
pub struct Meter {
    postmaster: u32,
    database: String,
    exclude: Vec<u32>,
    tree_start: u64,
    /// pid → (ticks at start or 0 if it started later, ticks at its last sample).
    backends: HashMap<u32, (u64, u64)>,
    wal_start: String,
}

/// The cost of a window.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Cost {
    pub server_cpu_s: f64,
    pub database_cpu_s: f64,
    pub wal_bytes: f64,
}

impl Cost {
    /// Per message: (server CPU µs, database CPU µs, WAL bytes).
    pub fn per(&self, messages: u64) -> (f64, f64, f64) {
        let n = messages.max(1) as f64;
        (
            self.server_cpu_s * 1e6 / n,
            self.database_cpu_s * 1e6 / n,
            self.wal_bytes / n,
        )
    }

    pub fn json(&self, messages: u64) -> serde_json::Value {
        let (s, d, w) = self.per(messages);
        serde_json::json!({"server_cpu_s": self.server_cpu_s, "database_cpu_s": self.database_cpu_s,
            "wal_bytes": self.wal_bytes, "server_cpu_us_per_msg": s,
            "database_cpu_us_per_msg": d, "wal_bytes_per_msg": w})
    }

    /// `PG CPU 21 µs/msg (db 18), WAL 745 B/msg`.
    pub fn show(&self, messages: u64) -> String {
        let (s, d, w) = self.per(messages);
        format!("PG CPU {s:.0} µs/msg (its db's backends {d:.0}), WAL {w:.0} B/msg")
    }
}

impl Meter {
    /// `exclude`: backends of the benchmark's own connections to `database`.
    pub async fn start(
        admin: &Client,
        postmaster: u32,
        database: &str,
        exclude: Vec<u32>,
    ) -> anyhow::Result<Meter> {
        let wal_start: String = admin
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await?
            .get(0);
        let (tree_start, _) = read_tree(postmaster);
        let mut m = Meter {
            postmaster,
            database: database.to_string(),
            exclude,
            tree_start,
            backends: HashMap::new(),
            wal_start,
        };
        m.sample_at_start();
        Ok(m)
    }

    fn ours(&self, pid: u32, title: &str) -> bool {
        // "postgres: 15/main: <user> <database> <host>(<port>) <state>", NUL-terminated.
        !self.exclude.contains(&pid) && title.split([' ', '\0']).any(|w| w == self.database)
    }

    fn sample_at_start(&mut self) {
        let (_, live) = read_tree(self.postmaster);
        for (pid, (ticks, title)) in live {
            if self.ours(pid, &title) {
                self.backends.insert(pid, (ticks, ticks));
            }
        }
    }

    /// Reads the database's live backends.
    pub fn sample(&mut self) {
        let (_, live) = read_tree(self.postmaster);
        for (pid, (ticks, title)) in live {
            if self.ours(pid, &title) {
                self.backends.entry(pid).or_insert((0, 0)).1 = ticks;
            }
        }
    }

    pub async fn finish(mut self, admin: &Client) -> anyhow::Result<Cost> {
        self.sample();
        let (tree_end, _) = read_tree(self.postmaster);
        let wal: f64 = admin
            .query_one(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::float8",
                &[&self.wal_start],
            )
            .await?
            .get(0);
        let db: u64 = self
            .backends
            .values()
            .map(|(a, b)| b.saturating_sub(*a))
            .sum();
        Ok(Cost {
            server_cpu_s: tree_end.saturating_sub(self.tree_start) as f64 / TICKS,
            database_cpu_s: db as f64 / TICKS,
            wal_bytes: wal,
        })
    }
}

/// The backend pid of a connection.
pub async fn backend_pid(c: &Client) -> anyhow::Result<u32> {
    let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    Ok(pid as u32)
}
