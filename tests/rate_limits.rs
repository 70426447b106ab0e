//! Rate limits shared by every daemon, and provider fallback (issue 10), against a real
//! PostgreSQL and a local counting HTTP server: four daemons (each with its own pool) flooding one
//! limited profile stay within the fleet-wide window while an unlimited profile keeps flowing;
//! over-limit messages are deferred uncharged; a 429 with Retry-After blocks the whole profile;
//! recipient-keyed windows are independent; a primary that keeps answering 503 falls back and the
//! attempt rows name the profile that delivered. The window arithmetic itself is driven with a
//! controllable clock (the `p_now` of `outbox.rate_take`).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use uuid::Uuid;

const T: Duration = Duration::from_secs(60);

/// What the counting server answers on a path.
#[derive(Clone, Copy)]
enum Answer {
    Ok,
    Unavailable,
    /// 429 with `Retry-After: <secs>` for the first `n` requests, then 200.
    TooFastFirst(u32, u64),
}

/// A local HTTP server that timestamps every request by path (its first segment).
#[derive(Clone)]
struct Counter {
    url: String,
    hits: Arc<Mutex<Vec<(String, String, Instant)>>>,
    _shutdown: Arc<tokio::sync::oneshot::Sender<()>>,
}

impl Counter {
    async fn start(answers: &[(&str, Answer)]) -> Counter {
        use axum::extract::State;
        use axum::http::{StatusCode, Uri};
        use axum::response::{IntoResponse, Response};
        type St = (
            Arc<Mutex<Vec<(String, String, Instant)>>>,
            Arc<Mutex<HashMap<String, (Answer, u32)>>>,
        );
        async fn handle(State((hits, answers)): State<St>, uri: Uri) -> Response {
            let now = Instant::now();
            let path = uri.path().trim_start_matches('/');
            let (first, rest) = path.split_once('/').unwrap_or((path, ""));
            hits.lock()
                .unwrap()
                .push((first.to_string(), rest.to_string(), now));
            let answer = {
                let mut a = answers.lock().unwrap();
                let entry = a.get_mut(first).expect("a known path");
                entry.1 += 1;
                match entry.0 {
                    Answer::TooFastFirst(n, secs) if entry.1 <= n => Some(secs),
                    Answer::TooFastFirst(..) | Answer::Ok => None,
                    Answer::Unavailable => Some(u64::MAX),
                }
            };
            match answer {
                None => (StatusCode::OK, "{\"id\":\"ok\"}").into_response(),
                Some(u64::MAX) => (StatusCode::SERVICE_UNAVAILABLE, "down").into_response(),
                Some(secs) => (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", secs.to_string())],
                    "slow down",
                )
                    .into_response(),
            }
        }
        let hits = Arc::new(Mutex::new(Vec::new()));
        let answers: HashMap<String, (Answer, u32)> = answers
            .iter()
            .map(|(p, a)| (p.to_string(), (*a, 0)))
            .collect();
        let app = axum::Router::new()
            .fallback(handle)
            .with_state((hits.clone(), Arc::new(Mutex::new(answers))));
        let (url, shutdown) = serve(app).await;
        Counter {
            url,
            hits,
            _shutdown: shutdown,
        }
    }

    /// Arrival times on `path` (optionally only those whose rest is `rest`), in order.
    fn times(&self, path: &str, rest: Option<&str>) -> Vec<Instant> {
        self.hits
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, r, _)| p == path && rest.map_or(true, |x| x == r))
            .map(|(_, _, t)| *t)
            .collect()
    }
}

/// The largest number of `times` (ascending) in any half-open interval of length `window`.
fn most_in_any_window(times: &[Instant], window: Duration) -> usize {
    let mut most = 0;
    for (i, t) in times.iter().enumerate() {
        let n = times[i..].iter().take_while(|u| **u - *t < window).count();
        most = most.max(n);
    }
    most
}

async fn enqueue(c: &tokio_postgres::Client, profile: &str, address: &str, n: usize) -> Vec<Uuid> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        ids.push(send(c, "http.agent", profile, address, &format!("{{\"n\":{i}}}")).await);
    }
    ids
}

async fn count_in(c: &tokio_postgres::Client, ids: &[Uuid], state: &str) -> i64 {
    c.query_one(
        "SELECT count(*) FROM outbox.live_messages WHERE id = ANY($1) AND state = $2",
        &[&ids, &state],
    )
    .await
    .unwrap()
    .get(0)
}

async fn wait_all(c: &tokio_postgres::Client, ids: &[Uuid], state: &str, timeout: Duration) {
    wait_for(
        timeout,
        &format!("{} messages to be {state}", ids.len()),
        || async { (count_in(c, ids, state).await == ids.len() as i64).then_some(()) },
    )
    .await
}

/// (a) + (b): four daemons, one database, one profile limited to 4 per 500 ms: the server sees
/// at most 4 in any 500 ms (a per-process limiter would allow 16), while 200 messages of an
/// unlimited profile, enqueued after the flood, are all delivered before the flood is. Every
/// limited message ends submitted with exactly one attempt, done: deferrals charge nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_daemons_hold_one_fleet_wide_limit_while_another_profile_flows() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let server = Counter::start(&[("limited", Answer::Ok), ("free", Answer::Ok)]).await;
    let conf = format!(
        "[limited]\nurl = \"{u}/limited\"\nrate_limit = [\"4/500ms\"]\ntimeout = \"2s\"\n\
         [free]\nurl = \"{u}/free\"\ntimeout = \"2s\"\n",
        u = server.url
    );
    let limited = enqueue(&c, "limited", "", 24).await;
    let free = enqueue(&c, "free", "", 200).await;
    let mut daemons = Vec::new();
    for i in 0..4 {
        let mut tc = TestConfig::new(&db, &[("http", &conf)]);
        tc.config.worker_id = Some(format!("fleet-{i}"));
        tc.config.poll_interval = Duration::from_millis(200);
        tc.config.concurrency = 16;
        daemons.push((Daemon::start(tc.config.clone()), tc));
    }
    wait_all(&c, &free, "submitted", T).await;
    let free_done = Instant::now();
    wait_all(&c, &limited, "submitted", T).await;
    let mut deferred = 0;
    for (d, _tc) in daemons {
        deferred += d.stop().await.deferred;
    }

    let times = server.times("limited", None);
    assert_eq!(times.len(), 24, "each limited message sent once");
    // The windows hold the slots the daemons were granted; arrivals add the jitter of a local
    // HTTP call (and at most RATE_LATE of a late reservation), allowed for by the 100 ms.
    let most = most_in_any_window(&times, Duration::from_millis(400));
    assert!(most <= 4, "at most 4 in any 400 ms window, saw {most}");
    let span = *times.last().unwrap() - times[0];
    assert!(
        span >= Duration::from_millis(2500 - 100),
        "24 messages at 4 per 500 ms need 2.5 s (5 more windows after the first), took {span:?}"
    );
    assert!(deferred > 0, "over-limit messages were deferred");
    let free_times = server.times("free", None);
    assert_eq!(free_times.len(), 200);
    assert!(
        free_done < *times.last().unwrap(),
        "the unlimited profile finished while the limited one was still waiting"
    );

    // (b) No attempt burnt: one attempt row each, done, attempts = 1.
    let rows = c
        .query(
            "SELECT m.attempts, count(a.id), bool_and(a.outcome = 'done'), min(a.profile) \
               FROM outbox.live_messages m JOIN outbox.attempts a ON a.message_id = m.id \
              WHERE m.id = ANY($1) GROUP BY m.id, m.attempts",
            &[&limited],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 24);
    for r in rows {
        assert_eq!(r.get::<_, i32>(0), 1, "attempts not charged by deferrals");
        assert_eq!(r.get::<_, i64>(1), 1, "one attempt row");
        assert!(r.get::<_, bool>(2), "done");
        assert_eq!(r.get::<_, String>(3), "http/limited");
    }
    let defers: i64 = c
        .query_one(
            "SELECT count(*) FROM outbox.history WHERE action = 'defer' AND message_id = ANY($1)",
            &[&limited],
        )
        .await
        .unwrap()
        .get(0);
    assert!(defers > 0, "deferrals are in the history");
}

/// (c) A 429 with Retry-After on one message blocks the whole profile: a second message sent
/// right after it does not reach the server before the block ends, and is not charged for the
/// wait; the throttled message retries after the block.
#[tokio::test]
async fn a_too_fast_answer_blocks_the_whole_profile() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let server = Counter::start(&[("throttled", Answer::TooFastFirst(1, 1))]).await;
    let conf = format!(
        "[throttled]\nurl = \"{u}/throttled\"\nrate_limit = [\"1000/1s\"]\nretry = [\"20ms\"]\n\
         timeout = \"2s\"\n",
        u = server.url
    );
    let tc = TestConfig::new(&db, &[("http", &conf)]);
    let d = Daemon::start(tc.config.clone());
    let first = enqueue(&c, "throttled", "/a", 1).await[0];
    wait_for(T, "the 429", || async {
        (server.times("throttled", None).len() == 1).then_some(())
    })
    .await;
    let refused_at = server.times("throttled", None)[0];
    // The block is in the database once the outcome is recorded.
    wait_for(T, "the block", || async {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM outbox.rate_windows WHERE blocked_until > now()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (n == 1).then_some(())
    })
    .await;
    let second = enqueue(&c, "throttled", "/b", 1).await[0];
    wait_state(&c, second, "submitted", T).await;
    wait_state(&c, first, "submitted", T).await;
    d.stop().await;

    let b = server.times("throttled", Some("b"));
    assert_eq!(b.len(), 1);
    assert!(
        b[0] - refused_at >= Duration::from_millis(950),
        "the second message waited for the block (1 s), arrived after {:?}",
        b[0] - refused_at
    );
    let second_attempts = attempts(&c, second).await;
    assert_eq!(second_attempts.len(), 1, "{second_attempts:?}");
    assert_eq!(second_attempts[0].1, "done");
    let att: i32 = c
        .query_one(
            "SELECT attempts FROM outbox.live_messages WHERE id = $1",
            &[&second],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(att, 1, "the wait for the block is not an attempt");
    let first_attempts = attempts(&c, first).await;
    assert_eq!(
        first_attempts
            .iter()
            .map(|a| (a.1.as_str(), a.2.as_deref()))
            .collect::<Vec<_>>(),
        [("retry", Some("http-429")), ("done", None)]
    );
}

/// (d) Recipient-keyed windows: 1 per 500 ms per address. Three messages to each of two
/// addresses: each address is paced on its own, and the two do not wait for each other.
#[tokio::test]
async fn recipient_keyed_windows_are_independent() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let server = Counter::start(&[("chat", Answer::Ok)]).await;
    let conf = format!(
        "[chat]\nurl = \"{u}/chat\"\nrate_limit = [\"1/500ms\"]\nrate_limit_per = \"address\"\n\
         timeout = \"2s\"\n",
        u = server.url
    );
    let mut ids = enqueue(&c, "chat", "/x", 3).await;
    ids.extend(enqueue(&c, "chat", "/y", 3).await);
    let tc = TestConfig::new(&db, &[("http", &conf)]);
    let d = Daemon::start(tc.config.clone());
    wait_all(&c, &ids, "submitted", T).await;
    d.stop().await;
    let x = server.times("chat", Some("x"));
    let y = server.times("chat", Some("y"));
    assert_eq!((x.len(), y.len()), (3, 3));
    for t in [&x, &y] {
        assert_eq!(
            most_in_any_window(t, Duration::from_millis(400)),
            1,
            "paced per address"
        );
    }
    let apart = if x[0] > y[0] {
        x[0] - y[0]
    } else {
        y[0] - x[0]
    };
    assert!(
        apart < Duration::from_millis(300),
        "the first of each address went out together ({apart:?} apart)"
    );
    let buckets: Vec<String> = c
        .query(
            "SELECT bucket FROM outbox.rate_windows ORDER BY bucket",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(buckets, ["http/chat 1/500ms /x", "http/chat 1/500ms /y"]);
}

/// (e) Fallback: a primary that keeps answering 503 hands the message to the secondary after two
/// attempts; another primary with only a failure window falls back once it has failed for longer
/// than the window. The attempt rows say which profile made each attempt.
#[tokio::test]
async fn a_failing_primary_falls_back_and_the_attempts_say_who_delivered() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let server = Counter::start(&[
        ("down", Answer::Unavailable),
        ("alsodown", Answer::Unavailable),
        ("backup", Answer::Ok),
    ])
    .await;
    let conf = format!(
        "[primary]\nurl = \"{u}/down\"\nretry = [\"20ms\"]\nmax_attempts = 5\ntimeout = \"2s\"\n\
         fallback = [\"http/secondary\"]\nfallback_attempts = 2\n\
         [windowed]\nurl = \"{u}/alsodown\"\nretry = [\"50ms\"]\nmax_attempts = 100\n\
         timeout = \"2s\"\nfallback = [\"http/secondary\"]\nfallback_after = \"300ms\"\n\
         [secondary]\nurl = \"{u}/backup\"\ntimeout = \"2s\"\n",
        u = server.url
    );
    let tc = TestConfig::new(&db, &[("http", &conf)]);
    let d = Daemon::start(tc.config.clone());
    let id = enqueue(&c, "primary", "", 1).await[0];
    wait_state(&c, id, "submitted", T).await;
    let windowed = enqueue(&c, "windowed", "", 1).await[0];
    wait_state(&c, windowed, "submitted", T).await;
    d.stop().await;

    let rows: Vec<(i32, String, Option<String>, Option<String>)> = c
        .query(
            "SELECT attempt, outcome, error_code, profile FROM api.message_attempt \
              WHERE message_id = $1 ORDER BY attempt",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let p = |s: &str| Some(s.to_string());
    assert_eq!(
        rows,
        [
            (1, "retry".into(), p("http-503"), p("http/primary")),
            (2, "retry".into(), p("http-503"), p("http/primary")),
            (3, "done".into(), None, p("http/secondary")),
        ]
    );

    let rows: Vec<(String, Option<String>)> = c
        .query(
            "SELECT outcome, profile FROM outbox.attempts WHERE message_id = $1 ORDER BY id",
            &[&windowed],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let (last, before) = rows.split_last().unwrap();
    assert_eq!(last, &("done".to_string(), p("http/secondary")));
    assert!(before.len() >= 2, "{rows:?}");
    assert!(before
        .iter()
        .all(|r| r == &("retry".to_string(), p("http/windowed"))));
    let waited_ms: f64 = c
        .query_one(
            "SELECT (extract(epoch FROM max(finished_at) - min(finished_at)) * 1000)::float8 \
               FROM outbox.attempts WHERE message_id = $1",
            &[&windowed],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        waited_ms >= 300.0,
        "the fallback came after the 300 ms window: {waited_ms} ms"
    );
    assert_eq!(server.times("backup", None).len(), 2, "one delivery each");
}

/// Claims one prepared message as `worker`; returns the claim id.
async fn claim_one(c: &tokio_postgres::Client, worker: &str) -> Uuid {
    let claim = Uuid::new_v4();
    let n = c
        .query(
            "SELECT id FROM outbox.claim($1, 1, 60000, $2)",
            &[&worker, &claim],
        )
        .await
        .unwrap()
        .len();
    assert_eq!(n, 1, "one message claimed");
    claim
}

/// `outbox.rate_take` at the fake time `t0 + at_ms` for message `id` under `claim`:
/// (result, wait in ms).
async fn take(
    c: &tokio_postgres::Client,
    id: Uuid,
    claim: Uuid,
    windows: &[(&str, i32, i32)],
    t0: chrono::DateTime<chrono::Utc>,
    at_ms: i64,
) -> (String, i32) {
    let names: Vec<&str> = windows.iter().map(|w| w.0).collect();
    let ms: Vec<i32> = windows.iter().map(|w| w.1).collect();
    let counts: Vec<i32> = windows.iter().map(|w| w.2).collect();
    let now = t0 + chrono::Duration::milliseconds(at_ms);
    let r = c
        .query_one(
            "SELECT result, wait_ms FROM outbox.rate_take('w', $1, $2, $3, $4, $5, 50, $6)",
            &[&id, &claim, &names, &ms, &counts, &now],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

/// Makes a deferred message due at once (the fake clock is ahead of the database's) and claims it.
async fn due_again(c: &tokio_postgres::Client, id: Uuid) -> Uuid {
    c.execute(
        "UPDATE outbox.messages SET next_attempt_at = now() WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap();
    claim_one(c, "w").await
}

/// The window arithmetic with a controllable clock: an exact sliding window, reservations that
/// are honoured when due and dropped when late, "too fast" blocks, and a busy recipient that does
/// not hold back the profile-wide window.
#[tokio::test]
async fn the_window_arithmetic_with_a_controllable_clock() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let t0 = chrono::Utc::now() + chrono::Duration::days(1);
    let w = [("p 2/1000ms", 1000, 2)];

    let a = send(&c, "file.agent", "default", "a", "x").await;
    let ca = claim_one(&c, "w").await;
    assert_eq!(take(&c, a, ca, &w, t0, 0).await, ("send".into(), 0));
    assert_eq!(take(&c, a, ca, &w, t0, 100).await, ("send".into(), 0));
    // The third in the same second waits for the first slot to leave the window.
    assert_eq!(take(&c, a, ca, &w, t0, 200).await, ("deferred".into(), 800));
    assert_eq!(state_of(&c, a).await, "prepared");
    let (attempts, rows): (i32, i64) = {
        let r = c
            .query_one(
                "SELECT attempts, (SELECT count(*) FROM outbox.attempts WHERE message_id = $1) \
                   FROM outbox.live_messages WHERE id = $1",
                &[&a],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((attempts, rows), (0, 0), "a deferral is not an attempt");
    // Claimed again at its slot: the reservation is its turn.
    let ca = due_again(&c, a).await;
    assert_eq!(take(&c, a, ca, &w, t0, 1000).await, ("send".into(), 0));
    // Another sender now waits behind the second slot (t0+100) and the reservation (t0+1000).
    let b = send(&c, "file.agent", "default", "b", "x").await;
    let cb = claim_one(&c, "w").await;
    assert_eq!(
        take(&c, b, cb, &w, t0, 1000).await,
        ("deferred".into(), 100)
    );
    // Claimed far too late: the reservation is dropped and a new turn taken (free by then).
    let cb = due_again(&c, b).await;
    assert_eq!(take(&c, b, cb, &w, t0, 5000).await, ("send".into(), 0));

    // "Too fast": blocked for 3 s from t0+6000; a reservation made before the block is void.
    let d = send(&c, "file.agent", "default", "d", "x").await;
    let cd = claim_one(&c, "w").await;
    assert_eq!(take(&c, d, cd, &w, t0, 6000).await, ("send".into(), 0));
    assert_eq!(take(&c, d, cd, &w, t0, 6010).await, ("send".into(), 0));
    assert_eq!(
        take(&c, d, cd, &w, t0, 6020).await,
        ("deferred".into(), 980)
    );
    let now = t0 + chrono::Duration::milliseconds(6030);
    c.execute(
        "SELECT outbox.rate_block(ARRAY['p 2/1000ms'], ARRAY[1000], ARRAY[2], 3000, $1)",
        &[&now],
    )
    .await
    .unwrap();
    let cd = due_again(&c, d).await;
    assert_eq!(
        take(&c, d, cd, &w, t0, 7000).await,
        ("deferred".into(), 2030)
    );

    // A busy recipient reserves only its own window: another recipient is not held back.
    let ws = |key: &'static str| [("q 10/1000ms", 1000, 10), (key, 1000, 1)];
    let x = send(&c, "file.agent", "default", "x", "x").await;
    let cx = claim_one(&c, "w").await;
    assert_eq!(
        take(&c, x, cx, &ws("q 1/1000ms x"), t0, 0).await,
        ("send".into(), 0)
    );
    assert_eq!(
        take(&c, x, cx, &ws("q 1/1000ms x"), t0, 10).await,
        ("deferred".into(), 990)
    );
    let y = send(&c, "file.agent", "default", "y", "x").await;
    let cy = claim_one(&c, "w").await;
    assert_eq!(
        take(&c, y, cy, &ws("q 1/1000ms y"), t0, 20).await,
        ("send".into(), 0)
    );
    let slots: i32 = c
        .query_one(
            "SELECT cardinality(slots) FROM outbox.rate_windows WHERE bucket = 'q 10/1000ms'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        slots, 2,
        "x's reservation is not in the profile-wide window"
    );
    // A claim that is no longer held gets no turn.
    let (n,): (i64,) = {
        let r = c
            .query_one(
                "SELECT count(*) FROM outbox.rate_take('other', $1, $2, ARRAY['q 10/1000ms'], \
                 ARRAY[1000], ARRAY[10], 50, NULL)",
                &[&y, &cy],
            )
            .await
            .unwrap();
        (r.get(0),)
    };
    assert_eq!(n, 0);
}

/// What the limiter costs: `outbox.rate_take` is one extra round trip per message of a limited
/// profile (profiles without limits pay nothing). Prints the figure; asserts nothing about speed.
#[tokio::test]
async fn what_the_limiter_costs_per_message() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let id = send(&c, "file.agent", "default", "a", "x").await;
    let claim = claim_one(&c, "w").await;
    // As the daemon's sessions run (its default synchronous_commit).
    c.batch_execute("SET synchronous_commit = off")
        .await
        .unwrap();
    let st = c
        .prepare("SELECT result, wait_ms FROM outbox.rate_take('w', $1, $2, $3, $4, $5, 50, NULL)")
        .await
        .unwrap();
    // A profile-wide and a per-recipient window, as Slack or Telegram profiles have, never full:
    // short windows (a few slots in each, as with 20/1m) and long ones (hundreds of slots).
    let n = 300;
    let mut figures = Vec::new();
    for (label, window, count) in [
        ("a few slots", 20i32, 1000i32),
        ("~300 slots", 60_000, 100_000),
    ] {
        let names = vec![
            format!("cost {count}/{window}ms"),
            format!("cost {count}/{window}ms key"),
        ];
        let ms = vec![window, window];
        let counts = vec![count, count];
        for _ in 0..20 {
            c.query_one(&st, &[&id, &claim, &names, &ms, &counts])
                .await
                .unwrap();
        }
        let started = Instant::now();
        for _ in 0..n {
            let r = c
                .query_one(&st, &[&id, &claim, &names, &ms, &counts])
                .await
                .unwrap();
            assert_eq!(r.get::<_, &str>(0), "send");
        }
        figures.push(format!("{:?} with {label}", started.elapsed() / n));
    }
    let plain = c.prepare("SELECT 1").await.unwrap();
    let started = Instant::now();
    for _ in 0..n {
        c.query_one(&plain, &[]).await.unwrap();
    }
    let trip = started.elapsed() / n;
    eprintln!(
        "rate_take with two windows: {} per message (a bare round trip: {trip:?}); \
         profiles without limits: no call",
        figures.join(", ")
    );
}

/// check-config's view: a bad window or key names the file and the profile's key; a fallback
/// that is no configured profile is refused when the router is built.
#[test]
fn bad_limits_and_fallbacks_name_the_file_and_key() {
    let errors = outboxd::config::parse_profiles(
        "http",
        "[a]\nurl = \"http://x\"\nrate_limit = [\"20 per minute\"]\n\
         [b]\nurl = \"http://x\"\nrate_limit_per = \"chat\"\n\
         [c]\nurl = \"http://x\"\nfallback_attempts = 2\n",
        "conf.d/http.conf",
    )
    .unwrap_err();
    let mut keys: Vec<(String, Option<String>)> = errors
        .iter()
        .map(|e| (e.file.clone(), e.key.clone()))
        .collect();
    keys.sort();
    let k = |s: &str| ("conf.d/http.conf".to_string(), Some(s.to_string()));
    assert_eq!(
        keys,
        [
            k("a.rate_limit"),
            k("b.rate_limit_per"),
            k("c.fallback_attempts")
        ]
    );
    assert!(
        errors[0].to_string().contains("20 per minute"),
        "{}",
        errors[0]
    );

    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("http.conf");
    std::fs::write(
        &conf,
        "[a]\nurl = \"http://x\"\nfallback = [\"sms/nowhere\"]\n\
         [b]\nurl = \"http://x\"\nrate_limit = [\"5/1s\", \"1/1s per address\"]\nfallback = [\"http/a\"]\n",
    )
    .unwrap();
    let cfg = outboxd::config::Config {
        connectors: [("http".to_string(), conf.clone())].into_iter().collect(),
        ..outboxd::config::Config::default()
    };
    let errors = outboxd::dispatch::build_router(&cfg)
        .err()
        .expect("refused");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].key.as_deref(), Some("a.fallback"));
    assert_eq!(errors[0].file, conf.display().to_string());
}
