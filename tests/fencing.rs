//! Fencing and the accounting of claims (issue 8), against a real PostgreSQL: every claim carries
//! a claim id that heartbeats, outcomes and hand-backs must present; a stale outcome changes
//! nothing; outcomes are never dropped on transient errors (nor handed back on TERM while pending);
//! an orphaned claim (its call failed on the client, committed on the server) is handed back
//! uncharged; the five-expiry rule counts real expiries since the last `repeat`; the claim takes
//! only outbox rows.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

const T: Duration = Duration::from_secs(20);

/// A prepared outbox message for the file agent (the SQL tests never deliver it).
async fn prepared(c: &tokio_postgres::Client) -> Uuid {
    send(c, "file.agent", "default", "a", "c").await
}

async fn claim(
    c: &tokio_postgres::Client,
    worker: &str,
    lease_ms: i32,
    claim_id: Uuid,
) -> Vec<Uuid> {
    c.query(
        "SELECT id FROM outbox.claim($1, 10, $2, $3)",
        &[&worker, &lease_ms, &claim_id],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Records one outcome for (id, claim_id) as `worker`; returns the result word.
async fn record(
    c: &tokio_postgres::Client,
    worker: &str,
    id: Uuid,
    claim_id: Uuid,
    outcome: &str,
) -> String {
    c.query_one(
        "SELECT result FROM outbox.record_outcomes($1, ARRAY[$2::uuid], ARRAY[$3::uuid], ARRAY[1], \
         ARRAY[$4::text], ARRAY[NULL], ARRAY[NULL], ARRAY[200], ARRAY[NULL], ARRAY[1], \
         ARRAY[NULL::int], ARRAY[NULL])",
        &[&worker, &id, &claim_id, &outcome],
    )
    .await
    .unwrap()
    .get(0)
}

async fn reclaim_until_one(c: &tokio_postgres::Client) {
    wait_for(Duration::from_secs(5), "the lease to expire", || async {
        let n: i32 = c
            .query_one("SELECT outbox.reclaim_expired('reaper')", &[])
            .await
            .unwrap()
            .get(0);
        (n == 1).then_some(())
    })
    .await;
}

async fn history(c: &tokio_postgres::Client, id: Uuid) -> Vec<String> {
    history_actions(c, id).await
}

#[tokio::test]
async fn the_claim_takes_only_outbox_rows() {
    let db = TestDb::new().await;
    let c = db.client().await;
    // An inbox row that someone made prepared (a direct INSERT, as a bulk import would).
    let inbox: Uuid = c
        .query_one(
            "INSERT INTO outbox.messages (class, agent_id, state) \
             SELECT 'inbox', id, 'prepared' FROM outbox.agents WHERE code = 'file.agent' RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let out = prepared(&c).await;
    let got = claim(&c, "w", 60000, Uuid::new_v4()).await;
    assert_eq!(got, vec![out], "only the outbox message is claimed");
    assert_eq!(state_of(&c, inbox).await, "prepared");
}

#[tokio::test]
async fn a_stale_claim_can_neither_finalise_extend_nor_release_a_newer_claim_of_the_same_worker() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let id = prepared(&c).await;
    let old = Uuid::new_v4();
    assert_eq!(claim(&c, "w", 1, old).await, vec![id]);
    reclaim_until_one(&c).await;
    // Claimed again by the same worker name: only the claim id tells the claims apart.
    let new = Uuid::new_v4();
    assert_eq!(claim(&c, "w", 60000, new).await, vec![id]);

    assert_eq!(record(&c, "w", id, old, "done").await, "stale");
    assert_eq!(
        state_of(&c, id).await,
        "sending",
        "the newer claim still holds it"
    );
    let held: i64 = c
        .query_one(
            "SELECT count(*) FROM outbox.extend_leases('w', ARRAY[$1::uuid], ARRAY[$2::uuid], 1)",
            &[&id, &old],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(held, 0, "the old claim's heartbeat extends nothing");
    let released: i32 = c
        .query_one(
            "SELECT outbox.release('w', ARRAY[$1::uuid], ARRAY[$2::uuid], 0)",
            &[&id, &old],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(released, 0, "nor does it hand the message back");
    let claim_id: Uuid = c
        .query_one(
            "SELECT claim_id FROM outbox.live_messages WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(claim_id, new);
    // One attempt row per delivery: the reclaim's row stands for the old claim's delivery.
    let a = attempts(&c, id).await;
    assert_eq!(a.len(), 1, "{a:?}");
    assert_eq!(a[0].2.as_deref(), Some("lease-expired"));

    // The newer claim's outcome applies, once: a retried call is a duplicate, not a second row.
    assert_eq!(record(&c, "w", id, new, "done").await, "recorded");
    assert_eq!(record(&c, "w", id, new, "done").await, "duplicate");
    assert_eq!(state_of(&c, id).await, "submitted");
    let a = attempts(&c, id).await;
    assert_eq!(a.len(), 2, "{a:?}");
    assert_eq!(a[1].1, "done");
}

#[tokio::test]
async fn a_stale_outcome_of_a_claim_without_an_attempt_row_gets_one_marked_stale() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let id = prepared(&c).await;
    let claim_id = Uuid::new_v4();
    assert_eq!(claim(&c, "w", 60000, claim_id).await, vec![id]);
    // An operator deletes the message while it is being delivered.
    c.query_one("SELECT api.execute_object_action($1, 'delete')", &[&id])
        .await
        .unwrap();
    assert_eq!(record(&c, "w", id, claim_id, "done").await, "stale");
    assert_eq!(state_of(&c, id).await, "deleted");
    let text: String = c
        .query_one(
            "SELECT error_text FROM outbox.attempts WHERE message_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(text.starts_with("stale:"), "{text}");
    // Recording it again writes nothing more.
    assert_eq!(record(&c, "w", id, claim_id, "done").await, "stale");
    assert_eq!(attempts(&c, id).await.len(), 1);
}

#[tokio::test]
async fn an_orphaned_claim_is_handed_back_without_an_attempt_and_its_id_claims_nothing_later() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let id = prepared(&c).await;
    let orphan = Uuid::new_v4();
    assert_eq!(claim(&c, "w", 60000, orphan).await, vec![id]);
    let n: i32 = c
        .query_one("SELECT outbox.release_claim('w', $1)", &[&orphan])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    assert_eq!(state_of(&c, id).await, "prepared");
    assert!(attempts(&c, id).await.is_empty(), "no attempt was made");
    let tries: i32 = c
        .query_one(
            "SELECT attempts FROM outbox.live_messages WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tries, 0);
    assert_eq!(
        history(&c, id).await,
        ["create", "submit", "send", "release"]
    );
    // The same claim call reaching the server late claims nothing; a new one does.
    assert!(claim(&c, "w", 60000, orphan).await.is_empty());
    assert_eq!(claim(&c, "w", 60000, Uuid::new_v4()).await, vec![id]);
}

#[tokio::test]
async fn the_five_expiry_rule_counts_real_expiries_since_the_last_repeat() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let id = prepared(&c).await;
    let expire = |round: u32| {
        let c = &c;
        async move {
            assert_eq!(
                claim(c, "crashy", 1, Uuid::new_v4()).await,
                vec![id],
                "round {round}"
            );
            reclaim_until_one(c).await;
        }
    };
    for round in 1..=5 {
        expire(round).await;
    }
    assert_eq!(state_of(&c, id).await, "failed");
    c.query_one("SELECT api.execute_object_action($1, 'repeat')", &[&id])
        .await
        .unwrap();
    // Orphaned claims handed back do not count either.
    for _ in 0..5 {
        let orphan = Uuid::new_v4();
        assert_eq!(claim(&c, "w", 60000, orphan).await, vec![id]);
        c.query_one("SELECT outbox.release_claim('w', $1)", &[&orphan])
            .await
            .unwrap();
    }
    for round in 1..=4 {
        expire(round).await;
        assert_eq!(
            state_of(&c, id).await,
            "prepared",
            "after repeat, round {round}"
        );
    }
    expire(5).await;
    assert_eq!(
        state_of(&c, id).await,
        "failed",
        "the 5th expiry since the repeat"
    );
}

// ------------------------------------------------------------------------------------------------
// The daemon
// ------------------------------------------------------------------------------------------------

fn http_daemon(db: &TestDb, rx: &Receiver) -> TestConfig {
    TestConfig::new(db, &[("http", &http_conf(&rx.url, ""))])
}

/// A message created, then (after `before_submit`) submitted.
async fn submit_after(
    c: &tokio_postgres::Client,
    before_submit: impl std::future::Future<Output = Uuid>,
) -> Uuid {
    let id = before_submit.await;
    c.query_one("SELECT api.execute_object_action($1, 'submit')", &[&id])
        .await
        .unwrap();
    id
}

async fn created_http(c: &tokio_postgres::Client) -> Uuid {
    c.query_one(
        "SELECT api.add_outbox(NULL, 'http.agent'::text, NULL, 'default', '/m', 's', '{}')",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Makes the statements that write an attempt row of message `id` fail: the n-th such statement
/// raises the SQLSTATE that `plan` (an SQL expression of `n`) gives, or succeeds when it gives
/// NULL. A sequence counts them (nextval survives the rollback of the failing statement). All names
/// are schema-qualified: the hot path may run with a pinned search_path.
async fn fail_attempt_writes(c: &tokio_postgres::Client, id: Uuid, plan: &str) {
    c.batch_execute(&format!(
        "CREATE SEQUENCE public.fault_calls;
         CREATE FUNCTION public.fault() RETURNS trigger LANGUAGE plpgsql AS $$
         DECLARE
             n bigint;
             v_code text;
         BEGIN
             IF EXISTS (SELECT 1 FROM new_rows r WHERE r.message_id = '{id}'::uuid) THEN
                 n := nextval('public.fault_calls');
                 v_code := {plan};
                 IF v_code IS NOT NULL THEN
                     RAISE EXCEPTION 'injected fault % (%)', n, v_code USING ERRCODE = v_code;
                 END IF;
             END IF;
             RETURN NULL;
         END
         $$;
         -- The hot path runs as outboxd_owner (SECURITY DEFINER): the fault runs as the test's
         -- superuser, who owns the sequence.
         ALTER FUNCTION public.fault() SECURITY DEFINER;
         CREATE TRIGGER fault AFTER INSERT ON outbox.attempts REFERENCING NEW TABLE AS new_rows
             FOR EACH STATEMENT EXECUTE FUNCTION public.fault();"
    ))
    .await
    .unwrap();
}

/// How many attempt writes of the faulty message were tried.
async fn fault_calls(c: &tokio_postgres::Client) -> i64 {
    c.query_one(
        "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM public.fault_calls",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_whose_lease_was_lost_during_a_stall_does_not_finalise_the_next_claim() {
    let db = TestDb::new().await;
    let rx = Receiver::start(Behaviour::Delay(Duration::from_millis(1000))).await;
    let mut tc = http_daemon(&db, &rx);
    tc.config.worker_id = Some("w-fence".into());
    tc.config.lease = Duration::from_secs(3);
    tc.config.db_timeout = Duration::from_millis(500);
    let d = Daemon::start(tc.config.clone());
    let c = db.client().await;
    let mut stall = db.client().await;
    wait_listening(&c, T).await;
    let id = send(&c, "http.agent", "default", "/x", "{}").await;
    wait_for(T, "the delivery to start", || async {
        (rx.count() == 1).then_some(())
    })
    .await;

    // A stall: this transaction holds the message's queue row (where its lease is), so the
    // heartbeat and the recording of the outcome wait (time out, are retried) ...
    let tx = stall.transaction().await.unwrap();
    let state: String = tx
        .query_one(
            "SELECT CASE WHEN leased THEN 'sending' ELSE 'prepared' END FROM outbox.queue \
             WHERE message_id = $1 FOR UPDATE",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(state, "sending", "locked before the outcome was recorded");
    wait_for(T, "the outcome to wait for the row", || async {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock' AND query LIKE '%record_outcomes%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (n > 0).then_some(())
    })
    .await;
    // ... until the lease has expired; then the message is reclaimed and claimed again under
    // the same worker name, as the daemon itself could have done.
    wait_for(T, "the lease to expire", || async {
        let expired: bool = tx
            .query_one(
                "SELECT lease_expires_at < clock_timestamp() FROM outbox.live_messages WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap()
            .get(0);
        expired.then_some(())
    })
    .await;
    // The lease has expired by the clock, but this transaction's now() (which the reclaim compares
    // with) is older: date the expiry back to it.
    tx.execute(
        "UPDATE outbox.messages SET lease_expires_at = now() - interval '1 millisecond' WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap();
    let n: i32 = tx
        .query_one("SELECT outbox.reclaim_expired('reaper')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let newer = Uuid::new_v4();
    let again = tx
        .query(
            "SELECT id FROM outbox.claim('w-fence', 10, 60000, $1)",
            &[&newer],
        )
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    tx.commit().await.unwrap();

    // The old claim's outcome (done) arrives now: stale, it changes nothing.
    let report = d.stop().await;
    assert_eq!(report.stale, 1, "{report:?}");
    assert_eq!(report.delivered, 0, "{report:?}");
    let r = c
        .query_one(
            "SELECT state, claim_id, lease_owner FROM outbox.live_messages WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(
        r.get::<_, String>(0),
        "sending",
        "the newer claim still holds it"
    );
    assert_eq!(r.get::<_, Uuid>(1), newer);
    assert_eq!(r.get::<_, String>(2), "w-fence");
    let a = attempts(&c, id).await;
    assert_eq!(
        a.iter().map(|x| x.1.as_str()).collect::<Vec<_>>(),
        ["interrupted"],
        "one delivery, one attempt row (the reclaim's): {a:?}"
    );
    assert_eq!(rx.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_one_by_one_fallback_retries_transient_errors_instead_of_dropping_the_outcome() {
    let db = TestDb::new().await;
    let rx = Receiver::start(Behaviour::Ok("{\"id\":\"p1\"}".into())).await;
    let mut tc = http_daemon(&db, &rx);
    tc.config.lease = Duration::from_secs(3);
    tc.config.poll_interval = Duration::from_millis(100);
    let c = db.client().await;
    // The batch fails with a data error (so the recorder goes one by one), then the single
    // statement fails twice with a serialization failure, then it works.
    let id = submit_after(&c, async {
        let id = created_http(&c).await;
        fail_attempt_writes(
            &c,
            id,
            "CASE WHEN n = 1 THEN '22021' WHEN n <= 3 THEN '40001' END",
        )
        .await;
        id
    })
    .await;
    let d = Daemon::start(tc.config.clone());
    wait_state(&c, id, "submitted", T).await;
    let report = d.stop().await;
    assert!(fault_calls(&c).await >= 4, "the faults were hit");
    assert_eq!(
        rx.count(),
        1,
        "delivered once, not again after a dropped outcome"
    );
    let a = attempts(&c, id).await;
    assert_eq!(a, [(1, "done".to_string(), None, Some(200))]);
    assert_eq!(report.delivered, 1, "{report:?}");
    let provider: Option<String> = c
        .query_one(
            "SELECT provider_message_id FROM outbox.live_messages WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        provider.as_deref(),
        Some("p1"),
        "a transient error does not cost the provider's texts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn term_records_a_finished_delivery_before_handing_anything_back() {
    let db = TestDb::new().await;
    let rx = Receiver::start(Behaviour::Ok("{}".into())).await;
    let mut tc = http_daemon(&db, &rx);
    tc.config.grace_period = Duration::from_millis(100);
    tc.config.db_timeout = Duration::from_secs(1);
    tc.config.lease = Duration::from_secs(10);
    let c = db.client().await;
    // Recording this message's outcome fails transiently six times (about 3 s of backoff): longer
    // than the grace period plus a DB timeout, shorter than a lease.
    let id = submit_after(&c, async {
        let id = created_http(&c).await;
        fail_attempt_writes(&c, id, "CASE WHEN n <= 6 THEN '40001' END").await;
        id
    })
    .await;
    let d = Daemon::start(tc.config.clone());
    wait_for(T, "the outcome to be pending", || async {
        (fault_calls(&c).await >= 1).then_some(())
    })
    .await;
    let report = d.stop().await;
    assert_eq!(report.released, 0, "{report:?}");
    assert_eq!(report.delivered, 1, "{report:?}");
    assert_eq!(state_of(&c, id).await, "submitted");
    assert_eq!(attempts(&c, id).await.len(), 1);
    assert_eq!(rx.count(), 1);
}

/// A TCP proxy on 127.0.0.1:0 in front of PostgreSQL whose server-to-client direction can be
/// paused: requests still reach the server and run there, their answers wait (a network stall
/// between a commit and its acknowledgement). Only connections opened before the pause stall: the
/// daemon closes a connection whose call it abandoned and opens a new one, which must get through.
async fn stall_proxy(target: String) -> (u16, tokio::sync::watch::Sender<bool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (pause, paused) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                continue;
            };
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut cr, &mut sw).await;
                let _ = sw.shutdown().await;
            });
            let mut paused = paused.clone();
            let opened_during_pause = *paused.borrow_and_update();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let n = match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    while !opened_during_pause && *paused.borrow_and_update() {
                        if paused.changed().await.is_err() {
                            return;
                        }
                    }
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (port, pause)
}

/// Whether one of the daemon's pool connections has sent a statement matching `pattern` (a Parse
/// shows in pg_stat_activity even while its answer waits in the paused proxy).
async fn daemon_ran(c: &tokio_postgres::Client, pattern: &str) -> Option<()> {
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = 'outboxd' AND query LIKE $1",
            &[&pattern],
        )
        .await
        .unwrap()
        .get(0);
    (n > 0).then_some(())
}

/// A daemon whose pool goes through a [`stall_proxy`] (its LISTEN connection does not), with one
/// pooled connection, so that every call after a stall goes where the claim went (a new
/// connection could not even log in through a paused proxy). Returns once it has claimed once,
/// with the proxy's pause switch.
async fn daemon_behind_proxy(
    db: &TestDb,
    rx: &Receiver,
    db_timeout: Duration,
) -> (Daemon, tokio::sync::watch::Sender<bool>) {
    let mut tc = http_daemon(db, rx);
    let direct = url::Url::parse(&db.url).unwrap();
    let target = format!(
        "{}:{}",
        direct.host_str().unwrap(),
        direct.port().unwrap_or(5432)
    );
    let (port, pause) = stall_proxy(target).await;
    let mut proxied = direct.clone();
    proxied.set_host(Some("127.0.0.1")).unwrap();
    proxied.set_port(Some(port)).unwrap();
    tc.config.database_url = outboxd::config::Secret::new(proxied.to_string());
    tc.config.listen_url = Some(outboxd::config::Secret::new(db.url.clone()));
    tc.config.db_timeout = db_timeout;
    // The NOTIFY wakes the claim: no poll (and so no reclaim call) may take the stalled
    // connection first, or the claim would run on a fresh, unstalled one.
    tc.config.poll_interval = Duration::from_secs(3600);
    tc.config.pool_size = 1;
    let d = Daemon::start(tc.config.clone());
    let c = db.client().await;
    wait_listening(&c, T).await;
    // One message through the whole path first: the claim statement is then prepared on the
    // one pooled connection (a Parse would stall with its answer), and the claim loop is waiting
    // for the next NOTIFY, not in the middle of a call whose answer the pause would hold.
    let warm = send(&c, "http.agent", "default", "/warm-up", "{}").await;
    wait_state(&c, warm, "submitted", T).await;
    wait_for(T, "the daemon's connections to be idle", || async {
        let busy: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND application_name = 'outboxd' AND state <> 'idle'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (busy == 0).then_some(())
    })
    .await;
    assert_eq!(rx.count(), 1, "the warm-up message");
    (d, pause)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_timed_out_but_committed_is_handed_back_uncharged() {
    let db = TestDb::new().await;
    let rx = Receiver::start(Behaviour::Ok("{}".into())).await;
    // Long enough that no call times out under load before the pause (a connection opened during
    // the pause is not stalled), short enough for the claim to time out soon after it.
    let (d, pause) = daemon_behind_proxy(&db, &rx, Duration::from_millis(1500)).await;
    let c = db.client().await;

    pause.send_replace(true);
    let id = send(&c, "http.agent", "default", "/x", "{}").await;
    wait_for(T, "the claim to commit unacknowledged", || async {
        (state_of(&c, id).await == "sending").then_some(())
    })
    .await;
    // The daemon gave up waiting for the claim's answer, closed that connection and handed the
    // claim back over a new one (the history shows the hand-back).
    wait_for(T, "the daemon to hand the claim back", || async {
        history(&c, id)
            .await
            .iter()
            .any(|a| a == "release")
            .then_some(())
    })
    .await;
    pause.send_replace(false);

    wait_state(&c, id, "submitted", T).await;
    assert!(
        history(&c, id).await.iter().any(|a| a == "release"),
        "{:?}",
        history(&c, id).await
    );
    let report = d.stop().await;
    assert_eq!(rx.count(), 2, "the warm-up and this one, delivered once");
    let a = attempts(&c, id).await;
    assert_eq!(
        a.iter().map(|x| x.1.as_str()).collect::<Vec<_>>(),
        ["done"],
        "no lease-expired attempt for a claim no delivery started: {a:?}"
    );
    assert_eq!(report.delivered, 2, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn term_during_a_claim_call_hands_back_what_it_may_have_claimed() {
    let db = TestDb::new().await;
    let rx = Receiver::start(Behaviour::Ok("{}".into())).await;
    // A DB timeout longer than the test: the stop, not a timeout, ends the claim call.
    let (d, pause) = daemon_behind_proxy(&db, &rx, Duration::from_secs(60)).await;
    let c = db.client().await;

    pause.send_replace(true);
    let id = send(&c, "http.agent", "default", "/x", "{}").await;
    wait_for(T, "the claim to commit unacknowledged", || async {
        (state_of(&c, id).await == "sending").then_some(())
    })
    .await;
    let stopping = tokio::spawn(d.stop());
    wait_for(T, "the daemon to hand the claim back", || {
        daemon_ran(&c, "%outbox.release_claim(%")
    })
    .await;
    pause.send_replace(false);
    let report = stopping.await.unwrap();

    assert_eq!(report.orphaned, 1, "{report:?}");
    assert_eq!(state_of(&c, id).await, "prepared");
    assert!(attempts(&c, id).await.is_empty());
    assert_eq!(rx.count(), 1, "only the warm-up message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_daemon_reclaiming_and_claiming_again_keeps_the_two_claims_apart() {
    let db = TestDb::new().await;
    // Every delivery takes longer than a lease: only the heartbeat keeps a claim alive.
    let rx = Receiver::start(Behaviour::Delay(Duration::from_millis(4000))).await;
    let mut tc = TestConfig::new(&db, &[("http", &http_conf(&rx.url, "timeout = \"10s\""))]);
    tc.config.lease = Duration::from_millis(1500);
    tc.config.poll_interval = Duration::from_millis(100);
    let c = db.client().await;
    // A stalled heartbeat: while public.stall has a row, extending a lease fails.
    c.batch_execute(
        "CREATE TABLE public.stall ();
         INSERT INTO public.stall DEFAULT VALUES;
         CREATE FUNCTION public.stall_heartbeat() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF EXISTS (SELECT 1 FROM public.stall) THEN
                 RAISE EXCEPTION 'injected heartbeat stall' USING ERRCODE = 'lock_not_available';
             END IF;
             RETURN NEW;
         END
         $$;
         -- Runs inside the SECURITY DEFINER hot path: as its owner, the test's superuser.
         ALTER FUNCTION public.stall_heartbeat() SECURITY DEFINER;
         CREATE TRIGGER stall_heartbeat BEFORE UPDATE ON outbox.queue FOR EACH ROW
             WHEN (OLD.leased AND NEW.leased)
             EXECUTE FUNCTION public.stall_heartbeat();",
    )
    .await
    .unwrap();
    let d = Daemon::start(tc.config.clone());
    wait_listening(&c, T).await;
    let id = send(&c, "http.agent", "default", "/x", "{}").await;
    // The first claim's lease expires; the daemon itself reclaims the message and claims it again
    // while the first delivery is still running.
    wait_for(T, "a second delivery of the message", || async {
        (rx.count() == 2).then_some(())
    })
    .await;
    c.batch_execute("DELETE FROM public.stall").await.unwrap();
    // The first delivery's outcome arrives, stale; the second claim keeps its heartbeat and is not
    // reclaimed although its delivery outlasts a lease.
    wait_state(&c, id, "submitted", T).await;
    let report = d.stop().await;
    assert_eq!(rx.count(), 2, "no third delivery");
    let a = attempts(&c, id).await;
    assert_eq!(
        a.iter()
            .map(|x| (x.1.as_str(), x.2.as_deref()))
            .collect::<Vec<_>>(),
        [("interrupted", Some("lease-expired")), ("done", None)],
        "two deliveries, two attempt rows"
    );
    assert_eq!(report.stale, 1, "{report:?}");
    assert_eq!(report.delivered, 1, "{report:?}");
}
