//! The SQL surface against a real PostgreSQL: the state machine (every allowed and forbidden
//! transition), history, NOTIFY, idempotent send, Apostol's return shapes, and the hot path.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use serde_json::Value;
use uuid::Uuid;

const STATES: &[&str] = &[
    "created",
    "prepared",
    "sending",
    "submitted",
    "failed",
    "deleted",
];
const ACTIONS: &[&str] = &[
    "submit", "send", "done", "fail", "cancel", "repeat", "delete", "restore",
];

/// The state machine of the issue, exactly.
fn allowed(state: &str, action: &str) -> Option<&'static str> {
    Some(match (state, action) {
        ("created", "submit") => "prepared",
        ("created", "delete") => "deleted",
        ("prepared", "send") => "sending",
        ("prepared", "done") => "submitted",
        ("prepared", "fail") => "failed",
        ("prepared", "cancel") => "created",
        ("sending", "done") => "submitted",
        ("sending", "fail") => "failed",
        ("sending", "delete") => "deleted",
        ("submitted", "repeat") => "prepared",
        ("submitted", "delete") => "deleted",
        ("failed", "repeat") => "prepared",
        ("failed", "delete") => "deleted",
        ("deleted", "restore") => "created",
        _ => return None,
    })
}

async fn act(c: &tokio_postgres::Client, id: Uuid, action: &str) -> Result<Value, String> {
    c.query_one("SELECT api.execute_object_action($1, $2)", &[&id, &action])
        .await
        .map(|r| r.get(0))
        .map_err(|e| {
            e.as_db_error()
                .map(|d| d.message().to_string())
                .unwrap_or(e.to_string())
        })
}

/// A message driven into `state` through allowed actions.
async fn message_in(c: &tokio_postgres::Client, state: &str) -> Uuid {
    let id: Uuid = c
        .query_one(
            "SELECT api.add_outbox(NULL, 'file.agent'::text, NULL, 'default', 'a@b', 's', 'c')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let path: &[&str] = match state {
        "created" => &[],
        "prepared" => &["submit"],
        "sending" => &["submit", "send"],
        "submitted" => &["submit", "send", "done"],
        "failed" => &["submit", "send", "fail"],
        "deleted" => &["delete"],
        _ => unreachable!(),
    };
    for a in path {
        act(c, id, a).await.unwrap();
    }
    assert_eq!(state_of(c, id).await, state);
    id
}

#[tokio::test]
async fn every_allowed_and_forbidden_transition() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let mut checked = 0;
    for state in STATES {
        for action in ACTIONS {
            let id = message_in(&c, state).await;
            let r = act(&c, id, action).await;
            match allowed(state, action) {
                Some(to) => {
                    let v = r.unwrap_or_else(|e| panic!("{state} --{action}--> should work: {e}"));
                    assert_eq!(v["newstate"]["code"], *to, "{state} --{action}-->");
                    assert_eq!(v["action"]["code"], *action);
                    assert_eq!(v["object"], id.to_string());
                    assert!(v["method"].is_string() && v["newstate"]["id"].is_string());
                    assert_eq!(state_of(&c, id).await, to);
                    let h = c
                        .query_one(
                            "SELECT old_state, new_state, action, changed_by FROM api.message_history \
                             WHERE message_id = $1 ORDER BY changed_at DESC, old_state IS NULL LIMIT 1",
                            &[&id],
                        )
                        .await
                        .unwrap();
                    let (old, new, a, by): (Option<String>, String, String, String) =
                        (h.get(0), h.get(1), h.get(2), h.get(3));
                    assert_eq!(
                        (old.as_deref(), new.as_str(), a.as_str()),
                        (Some(*state), to, *action)
                    );
                    assert_eq!(by, "postgres");
                }
                None => {
                    let e = r.expect_err(&format!("{state} --{action}--> must be refused"));
                    assert!(e.starts_with("ERR-400-032"), "{state} --{action}-->: {e}");
                    assert!(
                        e.contains(state) && e.contains(action),
                        "error names state and action: {e}"
                    );
                    assert_eq!(state_of(&c, id).await, *state, "state unchanged");
                }
            }
            checked += 1;
        }
    }
    assert_eq!(checked, STATES.len() * ACTIONS.len());
}

#[tokio::test]
async fn unknown_and_internal_actions_are_refused_with_their_own_code() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let id = message_in(&c, "sending").await;
    for a in ["bogus", "retry", "reclaim", "release"] {
        let e = act(&c, id, a).await.unwrap_err();
        assert!(e.starts_with("ERR-400-029"), "{a}: {e}");
    }
    let e = act(&c, Uuid::new_v4(), "submit").await.unwrap_err();
    assert!(e.starts_with("ERR-400-030"), "{e}");
    // A raw UPDATE that skips the machine is refused by the trigger, too.
    let created = message_in(&c, "created").await;
    let e = c
        .execute(
            "UPDATE outbox.messages SET state = 'submitted' WHERE id = $1",
            &[&created],
        )
        .await
        .unwrap_err();
    assert!(
        e.as_db_error()
            .unwrap()
            .message()
            .starts_with("ERR-400-032"),
        "{e}"
    );
}

#[tokio::test]
async fn send_message_is_idempotent_per_agent_and_code() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let q =
        "SELECT id FROM api.send_message(NULL, $1::text, 'default', 'a@b', 's', $2, pCode => $3)";
    let a: Uuid = c
        .query_one(q, &[&"file.agent", &"one", &"order-42"])
        .await
        .unwrap()
        .get(0);
    let b: Uuid = c
        .query_one(q, &[&"file.agent", &"two", &"order-42"])
        .await
        .unwrap()
        .get(0);
    let other: Uuid = c
        .query_one(q, &[&"http.agent", &"{}", &"order-42"])
        .await
        .unwrap()
        .get(0);
    assert_eq!(a, b, "same agent and code: the existing message");
    assert_ne!(a, other, "the code is unique per agent only");
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM outbox.live_messages WHERE code = 'order-42'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    let content: String = c
        .query_one("SELECT content FROM api.get_service_message($1)", &[&a])
        .await
        .unwrap()
        .get(0);
    assert_eq!(content, "one", "the duplicate did not overwrite the first");
    // Without a code: a random 64-hex code each time.
    let r = send(&c, "file.agent", "default", "a", "c").await;
    let code: String = c
        .query_one("SELECT code FROM outbox.live_messages WHERE id = $1", &[&r])
        .await
        .unwrap()
        .get(0);
    assert!(
        code.len() == 64 && code.chars().all(|ch| ch.is_ascii_hexdigit()),
        "{code}"
    );
}

#[tokio::test]
async fn service_message_has_apostol_columns_and_outbox_orders_by_priority_then_age() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let agent: Uuid = c
        .query_one(
            "SELECT id FROM outbox.agents WHERE code = 'smtp.agent'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // Apostol's signature with a uuid agent, and the label/description defaults.
    let low: Uuid = c
        .query_one(
            "SELECT id FROM api.send_message(NULL, $1::uuid, 'noreply@example.com', 'to@example.com', 'Hi', 'Body')",
            &[&agent],
        )
        .await
        .unwrap()
        .get(0);
    let high: Uuid = c
        .query_one(
            "SELECT id FROM api.send_message(NULL, 'smtp.agent', 'p', 'to', 'Hi', 'Body', pPriority => 5)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let rows = c
        .query("SELECT id FROM api.outbox('prepared')", &[])
        .await
        .unwrap();
    let ids: Vec<Uuid> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, vec![high, low]);
    let r = c
        .query_one(
            "SELECT id, object, agenttypecode, agentcode, statecode, statetypecode, profile, address, \
                    subject, content, code, label, created, priority FROM api.get_service_message($1)",
            &[&low],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, Uuid>("object"), low);
    assert_eq!(r.get::<_, String>("agenttypecode"), "email.agent");
    assert_eq!(r.get::<_, String>("agentcode"), "smtp.agent");
    assert_eq!(r.get::<_, String>("statecode"), "prepared");
    assert_eq!(r.get::<_, String>("statetypecode"), "enabled");
    assert_eq!(r.get::<_, String>("profile"), "noreply@example.com");
    // set_object_label reports instead of raising.
    let l = c
        .query_one(
            "SELECT id, result, message FROM api.set_object_label($1, 'L1')",
            &[&low],
        )
        .await
        .unwrap();
    assert!(l.get::<_, bool>(1));
    let missing = c
        .query_one(
            "SELECT result, message FROM api.set_object_label($1, 'x')",
            &[&Uuid::new_v4()],
        )
        .await
        .unwrap();
    assert!(!missing.get::<_, bool>(0));
    assert!(missing.get::<_, String>(1).starts_with("ERR-400-030"));
    // add_inbox stores a reply under its outbox message.
    let inbox: Uuid = c
        .query_one(
            "SELECT api.add_inbox($1, 'smtp.agent'::text, NULL, 'p', 'from', 'Re: Hi', 'reply')",
            &[&low],
        )
        .await
        .unwrap()
        .get(0);
    let p = c
        .query_one(
            "SELECT parent, classcode FROM api.service_message WHERE id = $1",
            &[&inbox],
        )
        .await
        .unwrap();
    assert_eq!(p.get::<_, Uuid>(0), low);
    assert_eq!(p.get::<_, String>(1), "inbox");
    // An unknown agent is a clear error.
    let e = c
        .query_one(
            "SELECT id FROM api.send_message(NULL, 'nope.agent', 'p', 'a', 's', 'c')",
            &[],
        )
        .await
        .unwrap_err();
    assert!(
        e.as_db_error()
            .unwrap()
            .message()
            .starts_with("ERR-400-031"),
        "{e}"
    );
}

/// A LISTEN connection collecting `outbox` payloads.
async fn listener(
    db: &TestDb,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let (client, mut conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut s = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = s.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send(n.payload().to_string());
            }
        }
    });
    client.batch_execute("LISTEN outbox").await.unwrap();
    (client, rx)
}

#[tokio::test]
async fn notify_carries_the_bare_uuid_on_submit_and_repeat_only() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let (_l, mut rx) = listener(&db).await;
    let id = message_in(&c, "prepared").await; // create (no notify) + submit (notify)
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, id.to_string());
    act(&c, id, "send").await.unwrap();
    act(&c, id, "fail").await.unwrap();
    act(&c, id, "repeat").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        got,
        id.to_string(),
        "send and fail do not notify; repeat does"
    );
    // A bulk insert of prepared messages sends one notification, not one per row.
    c.batch_execute(
        "INSERT INTO outbox.messages (agent_id, content, state) \
         SELECT (SELECT id FROM outbox.agents WHERE code = 'file.agent'), 'x', 'prepared' \
           FROM generate_series(1, 1000)",
    )
    .await
    .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(Uuid::parse_str(&first).is_ok());
    // Flush: a marker notification proves nothing else was queued before it.
    let marker = message_in(&c, "prepared").await;
    let next = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        next,
        marker.to_string(),
        "exactly one notification for the bulk insert"
    );
}

#[tokio::test]
async fn hot_path_claims_skip_locked_and_ignores_stale_outcomes() {
    let db = TestDb::new().await;
    let c = db.client().await;
    for _ in 0..10 {
        message_in(&c, "prepared").await;
    }
    // A message scheduled for later is not due.
    let later: Uuid = c
        .query_one(
            "SELECT id FROM api.send_message(NULL, 'file.agent', 'default', 'a', 's', 'c', pSendAt => now() + interval '1 hour')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // Two workers claim concurrently inside open transactions: no overlap.
    let claim_w1 = Uuid::new_v4();
    let c2 = db.client().await;
    c.batch_execute("BEGIN").await.unwrap();
    c2.batch_execute("BEGIN").await.unwrap();
    let a: Vec<Uuid> = c
        .query(
            "SELECT id FROM outbox.claim('w1', 6, 60000, $1)",
            &[&claim_w1],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let b: Vec<Uuid> = c2
        .query(
            "SELECT id FROM outbox.claim('w2', 6, 60000, gen_random_uuid())",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    c.batch_execute("COMMIT").await.unwrap();
    c2.batch_execute("COMMIT").await.unwrap();
    assert_eq!(a.len(), 6);
    assert_eq!(
        b.len(),
        4,
        "SKIP LOCKED: the second worker gets the rest, not the scheduled one"
    );
    assert!(a.iter().all(|x| !b.contains(x)));
    assert!(!a.contains(&later) && !b.contains(&later));
    // w2 reports an outcome for a message w1 holds (with w1's claim id, even): stale, no state
    // change.
    let stolen = a[0];
    let result: String = c
        .query_one(
            "SELECT result FROM outbox.record_outcomes('w2', ARRAY[$1::uuid], ARRAY[$2::uuid], ARRAY[1], \
             ARRAY['done'], ARRAY[NULL], ARRAY[NULL], ARRAY[200], ARRAY['p'], ARRAY[1], ARRAY[NULL::int], ARRAY[NULL])",
            &[&stolen, &claim_w1],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(result, "stale");
    assert_eq!(state_of(&c, stolen).await, "sending");
    // Leases: extend only what you hold; expired ones are reclaimed as interrupted attempts.
    let held: i64 = c
        .query_one(
            "SELECT count(*) FROM outbox.extend_leases('w1', $1, array_fill($2::uuid, ARRAY[cardinality($1::uuid[])]), 1)",
            &[&a, &claim_w1],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(held, 6);
    wait_for(Duration::from_secs(5), "reclaim", || async {
        let n: i32 = c
            .query_one("SELECT outbox.reclaim_expired('w3')", &[])
            .await
            .unwrap()
            .get(0);
        (n > 0).then_some(n)
    })
    .await;
    assert_eq!(state_of(&c, stolen).await, "prepared");
    let r = c
        .query_one(
            "SELECT m.attempts, t.outcome, t.error_code, t.worker FROM outbox.live_messages m \
             JOIN outbox.attempts t ON t.message_id = m.id WHERE m.id = $1 AND t.outcome = 'interrupted'",
            &[&stolen],
        )
        .await
        .unwrap();
    assert_eq!(
        r.get::<_, i32>(0),
        0,
        "an interrupted attempt does not count"
    );
    assert_eq!(r.get::<_, String>(2), "lease-expired");
    assert_eq!(r.get::<_, String>(3), "w1");
    assert_eq!(
        history_actions(&c, stolen).await,
        ["create", "submit", "send", "reclaim"]
    );
}

#[tokio::test]
async fn migrations_apply_once() {
    let db = TestDb::new().await;
    let again = outboxd::db::migrate::prepare_database(&db.url, false)
        .await
        .unwrap();
    assert!(again.is_empty(), "already applied: {again:?}");
    let c = db.client().await;
    let n: i64 = c
        .query_one("SELECT count(*) FROM outbox.schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n as usize, outboxd::db::migrate::MIGRATIONS.len());
}

/// Migration 19: the recording step is planned per call with the arrays' real lengths; a
/// generic plan joined the batch as a nested loop over every message in flight (issue 9). A
/// later migration that re-creates the function must keep the setting.
#[tokio::test]
async fn record_outcomes_is_planned_for_each_batch() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let config: Vec<String> = c
        .query_one(
            "SELECT coalesce(proconfig, '{}') FROM pg_proc \
              WHERE oid = 'outbox.record_outcomes(text, uuid[], uuid[], integer[], text[], text[], \
                            text[], integer[], text[], integer[], integer[], text[], text[])'::regprocedure",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        config
            .iter()
            .any(|s| s == "plan_cache_mode=force_custom_plan"),
        "{config:?}"
    );
    assert!(
        config
            .iter()
            .any(|s| s.starts_with("search_path=pg_catalog")),
        "{config:?}"
    );
}

#[tokio::test]
async fn purge_removes_old_finished_messages_with_their_logs_and_replies() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let done = message_in(&c, "submitted").await;
    let failed = message_in(&c, "failed").await;
    let waiting = message_in(&c, "prepared").await;
    c.query_one(
        "SELECT api.add_inbox($1, 'file.agent'::text, NULL, 'default', 'a', 's', 'reply')",
        &[&done],
    )
    .await
    .unwrap();
    // Nothing is old enough yet.
    let n: i32 = c
        .query_one("SELECT outbox.purge('1 hour')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    let n: i32 = c
        .query_one("SELECT outbox.purge('0 seconds')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    for (table, col) in [
        ("outbox.messages", "id"),
        ("outbox.history", "message_id"),
        ("outbox.attempts", "message_id"),
    ] {
        let left: i64 = c
            .query_one(
                &format!("SELECT count(*) FROM {table} WHERE {col} = ANY ($1)"),
                &[&vec![done, failed]],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(left, 0, "{table}");
    }
    let replies: i64 = c
        .query_one(
            "SELECT count(*) FROM outbox.live_messages WHERE class = 'inbox'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(replies, 0);
    assert_eq!(
        state_of(&c, waiting).await,
        "prepared",
        "unfinished messages stay"
    );
}

#[tokio::test]
async fn a_message_whose_lease_expires_five_times_fails_instead_of_looping() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let id = message_in(&c, "prepared").await;
    for round in 1..=5 {
        let claimed = c
            .query(
                "SELECT id FROM outbox.claim('crashy', 1, 1, gen_random_uuid())",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1, "round {round}: claimable again");
        wait_for(Duration::from_secs(5), "the lease to expire", || async {
            let n: i32 = c
                .query_one("SELECT outbox.reclaim_expired('reaper')", &[])
                .await
                .unwrap()
                .get(0);
            (n == 1).then_some(())
        })
        .await;
        let expect = if round < 5 { "prepared" } else { "failed" };
        assert_eq!(state_of(&c, id).await, expect, "round {round}");
    }
    let a = attempts(&c, id).await;
    assert_eq!(a.len(), 5);
    assert!(a[..4].iter().all(|x| x.1 == "interrupted"));
    assert_eq!(
        (a[4].1.as_str(), a[4].2.as_deref()),
        ("failed", Some("lease-expired"))
    );
}

/// Waits until every lease of `ids` has run out (by the database's clock).
async fn leases_expired(c: &tokio_postgres::Client, ids: &[Uuid]) {
    wait_for(Duration::from_secs(5), "the leases to expire", || async {
        let live: i64 = c
            .query_one(
                "SELECT count(*) FROM outbox.live_messages \
                  WHERE id = ANY ($1) AND lease_expires_at >= clock_timestamp()",
                &[&ids],
            )
            .await
            .unwrap()
            .get(0);
        (live == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_claim_hands_back_the_expired_leases_it_meets_and_claims_them_again() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(message_in(&c, "prepared").await);
    }
    let first: Vec<Uuid> = c
        .query(
            "SELECT id FROM outbox.claim('w1', 2, 1, gen_random_uuid())",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(first.len(), 2);
    leases_expired(&c, &first).await;
    // No reclaim_expired: w2's claim meets w1's expired leases on its way and takes them too.
    let second: Vec<(Uuid, i32, bool)> = c
        .query(
            "SELECT id, attempts, reclaimed FROM outbox.claim('w2', 10, 60000, gen_random_uuid())",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(second.len(), 3, "all three, the expired two included");
    for (id, attempts, reclaimed) in &second {
        assert_eq!(*attempts, 1, "the interrupted attempt does not count");
        assert_eq!(
            *reclaimed,
            first.contains(id),
            "reclaimed says which were handed back"
        );
    }
    for id in &first {
        let r = c
            .query_one(
                "SELECT m.state, m.lease_owner, t.outcome, t.error_code, t.worker \
                   FROM outbox.live_messages m JOIN outbox.attempts t ON t.message_id = m.id \
                  WHERE m.id = $1",
                &[id],
            )
            .await
            .unwrap();
        assert_eq!(r.get::<_, String>(0), "sending");
        assert_eq!(r.get::<_, String>(1), "w2");
        assert_eq!(r.get::<_, String>(2), "interrupted");
        assert_eq!(r.get::<_, String>(3), "lease-expired");
        assert_eq!(r.get::<_, String>(4), "w1");
        assert_eq!(
            history_actions(&c, *id).await,
            ["create", "submit", "send", "reclaim"]
        );
    }
    let untouched = ids.iter().find(|id| !first.contains(id)).unwrap();
    assert!(attempts(&c, *untouched).await.is_empty());
}

#[tokio::test]
async fn a_claim_fails_a_message_whose_lease_it_finds_expired_the_fifth_time() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let id = message_in(&c, "prepared").await;
    for round in 1..=6 {
        let claimed: Vec<bool> = c
            .query(
                "SELECT reclaimed FROM outbox.claim('crashy', 1, 1, gen_random_uuid())",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        if round == 6 {
            assert!(
                claimed.is_empty(),
                "the 5th expired lease failed the message"
            );
            break;
        }
        assert_eq!(claimed, [round > 1], "round {round}");
        leases_expired(&c, &[id]).await;
    }
    assert_eq!(state_of(&c, id).await, "failed");
    let a = attempts(&c, id).await;
    assert_eq!(a.len(), 5);
    assert!(a[..4].iter().all(|x| x.1 == "interrupted"));
    assert_eq!(
        (a[4].1.as_str(), a[4].2.as_deref()),
        ("failed", Some("lease-expired"))
    );
}

/// Ids `outbox.claim` returns for `worker` now.
async fn claim_ids(c: &tokio_postgres::Client, worker: &str) -> Vec<Uuid> {
    c.query(
        "SELECT id FROM outbox.claim($1, 100, 60000, $2)",
        &[&worker, &Uuid::new_v4()],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[tokio::test]
async fn a_direct_insert_with_a_future_send_at_is_not_due_before_it() {
    let db = TestDb::new().await;
    let c = db.client().await;
    // A bulk enqueue as a DBA writes it, straight into the table.
    let insert = |send_at: &'static str| {
        let c = &c;
        async move {
            c.query_one(
                &format!(
                    "INSERT INTO outbox.messages (agent_id, content, state, send_at) \
                     SELECT id, 'x', 'prepared', {send_at} FROM outbox.agents \
                      WHERE code = 'file.agent' RETURNING id"
                ),
                &[],
            )
            .await
            .unwrap()
            .get::<_, Uuid>(0)
        }
    };
    let later = insert("now() + interval '1.5 seconds'").await;
    let now = insert("NULL").await;
    let past = insert("now() - interval '1 hour'").await;
    let first = claim_ids(&c, "w").await;
    assert!(first.contains(&now) && first.contains(&past), "{first:?}");
    assert!(
        !first.contains(&later),
        "a prepared message inserted with a future send_at was claimed at once"
    );
    // Due once send_at has passed, not before.
    wait_for(Duration::from_secs(10), "the scheduled message", || async {
        claim_ids(&c, "w").await.contains(&later).then_some(())
    })
    .await;
    let on_time: bool = c
        .query_one(
            "SELECT updated_at >= send_at FROM outbox.live_messages WHERE id = $1",
            &[&later],
        )
        .await
        .unwrap()
        .get(0);
    assert!(on_time, "claimed before its send_at");
    // Postponing by UPDATE of send_at postpones the next attempt too.
    let moved = insert("NULL").await;
    c.execute(
        "UPDATE outbox.messages SET send_at = now() + interval '1 hour' WHERE id = $1",
        &[&moved],
    )
    .await
    .unwrap();
    assert!(!claim_ids(&c, "w").await.contains(&moved));
}

#[tokio::test]
async fn public_actions_never_touch_inbox_messages() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let parent = message_in(&c, "submitted").await;
    let reply: Uuid = c
        .query_one(
            "SELECT api.add_inbox($1, 'file.agent'::text, NULL, 'default', 'from', 'Re', 'reply')",
            &[&parent],
        )
        .await
        .unwrap()
        .get(0);
    for action in ACTIONS {
        let e = act(&c, reply, action)
            .await
            .expect_err(&format!("{action} on an inbox message must be refused"));
        assert!(e.starts_with("ERR-400-030"), "{action}: {e}");
    }
    assert_eq!(state_of(&c, reply).await, "created");
    assert!(!claim_ids(&c, "w").await.contains(&reply));
}

/// Migration 25: a new message's id is a version 7 uuid (RFC 9562) whose first 48 bits are the
/// Unix milliseconds of its making, and its default code starts with such a uuid, so messages
/// made close together sit together in every index keyed by them.
#[tokio::test]
async fn new_messages_get_time_ordered_ids_and_codes() {
    let db = TestDb::new().await;
    let c = db.client().await;
    let before = server_ms(&c).await;
    let mut made = Vec::new();
    for _ in 0..3 {
        made.push(send(&c, "file.agent", "default", "a", "c").await);
    }
    let after = server_ms(&c).await;
    let ms_of = |hex: &str| i64::from_str_radix(&hex[..12], 16).unwrap();
    let mut last = before;
    for id in &made {
        assert_eq!(id.get_version_num(), 7, "{id}");
        assert_eq!(id.get_variant(), uuid::Variant::RFC4122, "{id}");
        let t = ms_of(&id.simple().to_string());
        assert!(last <= t && t <= after, "{id}: {t} not in {last}..={after}");
        last = t;
        let code: String = c
            .query_one("SELECT code FROM outbox.messages WHERE id = $1", &[id])
            .await
            .unwrap()
            .get(0);
        assert_eq!(code.len(), 64, "{code}");
        let code_ms = ms_of(&code);
        assert!(
            before <= code_ms && code_ms <= after,
            "{code}: {code_ms} not in {before}..={after}"
        );
        assert_eq!(&code[12..13], "7", "{code}: a version 7 uuid first");
    }
    // An id the application brings is kept as it is.
    let own = Uuid::new_v4();
    c.execute(
        "INSERT INTO outbox.messages (id, agent_id, address, content)
         SELECT $1, id, 'a', 'c' FROM outbox.agents WHERE code = 'file.agent'",
        &[&own],
    )
    .await
    .unwrap();
    let code: String = c
        .query_one("SELECT code FROM outbox.messages WHERE id = $1", &[&own])
        .await
        .unwrap()
        .get(0);
    // The column's default (the expression, not the api's call) makes the same kind of code.
    assert_eq!(code.len(), 64, "{code}");
    assert_eq!(&code[12..13], "7", "{code}");
    let code_ms = ms_of(&code);
    let now = server_ms(&c).await;
    assert!(after <= code_ms && code_ms <= now, "{code}");
}

/// The server's clock in Unix milliseconds, as outbox.uuid_v7() reads it.
async fn server_ms(c: &tokio_postgres::Client) -> i64 {
    c.query_one(
        "SELECT floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}
