//! End-to-end tests of the `sba` connector (Sberbank acquiring) through the daemon, against the
//! fake gateway in `common/sba_double.rs`.

mod common;

use std::time::Duration;

use common::sba_double::{SbaDouble, SbaTrouble};
use common::*;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(20);
const RETURN_URL: &str = "https://shop.example/paid";

/// An sba.conf profile against the double, with fast retries.
fn profile(name: &str, base: &str, extra: &str) -> String {
    format!(
        "[{name}]\nbase_url = \"{base}\"\nretry = [\"20ms\", \"20ms\", \"20ms\"]\ntimeout = \"5s\"\n{extra}\n"
    )
}

fn merchant(name: &str, base: &str) -> String {
    profile(
        name,
        base,
        &format!("user_name = \"shop-api\"\npassword = \"pw\"\nreturn_url = \"{RETURN_URL}\""),
    )
}

fn start(db: &TestDb, conf: &str) -> (TestConfig, Daemon) {
    let mut tc = TestConfig::new(db, &[("sba", conf)]);
    // Due retries are picked up by the poll.
    tc.config.poll_interval = Duration::from_millis(50);
    let d = Daemon::start(tc.config.clone());
    (tc, d)
}

async fn row(c: &tokio_postgres::Client, id: Uuid) -> (String, Option<String>) {
    let r = c
        .query_one(
            "SELECT code, provider_message_id FROM outbox.live_messages WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

/// The inbox replies whose parent is `id`, as JSON.
async fn replies(c: &tokio_postgres::Client, id: Uuid) -> Vec<serde_json::Value> {
    c.query(
        "SELECT content FROM outbox.live_messages WHERE class = 'inbox' AND parent = $1",
        &[&id],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| serde_json::from_str(r.get::<_, &str>(0)).unwrap())
    .collect()
}

/// Enqueues with an explicit code (Apostol's add_outbox + submit), as an application does when it
/// wants its own idempotency key.
async fn send_with_code(c: &tokio_postgres::Client, code: &str, content: &str) -> Uuid {
    let id: Uuid = c
        .query_one(
            "SELECT api.add_outbox(NULL, 'sba.agent', $1, 'default', '/payment/rest/register.do', \
             'payment', $2)",
            &[&code, &content],
        )
        .await
        .unwrap()
        .get(0);
    c.query_one("SELECT api.execute_object_action($1, 'submit')", &[&id])
        .await
        .unwrap();
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_delivers_stores_the_order_id_and_the_reply_as_inbox() {
    let db = TestDb::new().await;
    let sba = SbaDouble::start("shop-api", "pw", "merchant-token").await;
    let conf = [
        merchant("default", &sba.base),
        profile("tok", &sba.base, "token = \"merchant-token\""),
    ]
    .join("\n");
    let (_tc, daemon) = start(&db, &conf);
    let c = db.client().await;

    // Apostol's form body; returnUrl comes from the profile.
    let form = "amount=12345&currency=643&description=Order+%E2%84%961";
    let a = send(
        &c,
        "sba.agent",
        "default",
        "/payment/rest/register.do",
        form,
    )
    .await;
    wait_state(&c, a, "submitted", WAIT).await;
    let (code, provider_id) = row(&c, a).await;
    assert_eq!(code.len(), 64, "Apostol-style random code");
    let number = &code[..32];
    let order = sba
        .order(number)
        .expect("registered under the code's first 32 hex digits");
    assert_eq!(order.amount, 12345);
    assert_eq!(provider_id.as_deref(), Some(order.order_id.as_str()));
    assert_eq!(
        attempts(&c, a).await,
        vec![(1, "done".into(), None, Some(200))]
    );
    let r = replies(&c, a).await;
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["orderId"], order.order_id.as_str());
    assert!(r[0]["formUrl"]
        .as_str()
        .unwrap()
        .ends_with(&format!("mdOrder={}", order.order_id)));
    let req = &sba.calls("register.do")[0];
    assert_eq!(req.content_type, "application/x-www-form-urlencoded");
    assert_eq!(req.params["userName"], "shop-api");
    assert_eq!(req.params["password"], "pw");
    assert_eq!(req.params["orderNumber"], number);
    assert_eq!(req.params["returnUrl"], RETURN_URL);
    assert_eq!(req.params["description"], "Order №1");
    assert_eq!(req.params["currency"], "643");

    // JSON content, token auth, URLs from the content, a nested JSON parameter, smuggled
    // credentials replaced, no address (the default path).
    let json = r#"{"amount": 500, "returnUrl": "https://shop.example/custom",
        "failUrl": "https://shop.example/failed", "jsonParams": {"email": "a@b.example"},
        "userName": "smuggled", "password": "smuggled"}"#;
    let b = send(&c, "sba.agent", "tok", "", json).await;
    wait_state(&c, b, "submitted", WAIT).await;
    let req = &sba.calls("register.do")[1];
    assert_eq!(req.params["token"], "merchant-token");
    assert!(!req.params.contains_key("userName") && !req.params.contains_key("password"));
    assert_eq!(req.params["amount"], "500");
    assert_eq!(req.params["returnUrl"], "https://shop.example/custom");
    assert_eq!(req.params["failUrl"], "https://shop.example/failed");
    assert_eq!(req.params["jsonParams"], r#"{"email":"a@b.example"}"#);
    let (code_b, id_b) = row(&c, b).await;
    assert_eq!(id_b, sba.order(&code_b[..32]).map(|o| o.order_id));
    assert_eq!(replies(&c, b).await.len(), 1);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_errors_fail_with_their_code_and_bad_requests_never_leave() {
    let db = TestDb::new().await;
    let sba = SbaDouble::start("shop-api", "pw", "").await;
    let conf = [
        merchant("default", &sba.base),
        profile(
            "wrong",
            &sba.base,
            &format!("user_name = \"shop-api\"\npassword = \"old\"\nreturn_url = \"{RETURN_URL}\""),
        ),
        profile(
            "noreturn",
            &sba.base,
            "user_name = \"shop-api\"\npassword = \"pw\"",
        ),
    ]
    .join("\n");
    let (_tc, daemon) = start(&db, &conf);
    let c = db.client().await;
    let path = "/payment/rest/register.do";
    let cases = [
        // (profile, address, content, code, remote status, reaches the gateway)
        ("wrong", path, "amount=100", "sba-5", Some(200), true),
        ("default", path, "amount=12.50", "bad-content", None, false),
        (
            "default",
            path,
            "description=no+amount",
            "bad-content",
            None,
            false,
        ),
        (
            "default",
            path,
            "amount=100&returnUrl=%2Frelative",
            "bad-content",
            None,
            false,
        ),
        ("noreturn", path, "amount=100", "bad-content", None, false),
        (
            "default",
            "https://evil.example/register.do",
            "amount=100",
            "bad-address",
            None,
            false,
        ),
        ("default", path, "{not json", "bad-content", None, false),
    ];
    let mut ids = Vec::new();
    for (p, address, content, ..) in cases {
        ids.push(send(&c, "sba.agent", p, address, content).await);
    }
    for (id, (p, _, content, code, status, _)) in ids.iter().zip(cases) {
        wait_state(&c, *id, "failed", WAIT).await;
        assert_eq!(
            attempts(&c, *id).await,
            vec![(1, "failed".into(), Some(code.into()), status)],
            "{p}: {content}"
        );
        assert!(replies(&c, *id).await.is_empty());
    }
    let reached = cases.iter().filter(|c| c.5).count();
    assert_eq!(sba.requests().len(), reached);
    assert_eq!(sba.order_count(), 0);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_error_and_5xx_are_retried_until_the_gateway_recovers() {
    let db = TestDb::new().await;
    let sba = SbaDouble::start("shop-api", "pw", "").await;
    sba.script(&[SbaTrouble::SystemError, SbaTrouble::Status(503)]);
    let (_tc, daemon) = start(&db, &merchant("default", &sba.base));
    let c = db.client().await;
    let id = send(
        &c,
        "sba.agent",
        "default",
        "/payment/rest/register.do",
        "amount=700",
    )
    .await;
    wait_state(&c, id, "submitted", WAIT).await;
    assert_eq!(
        attempts(&c, id).await,
        vec![
            (1, "retry".into(), Some("sba-7".into()), Some(200)),
            (2, "retry".into(), Some("http-503".into()), Some(503)),
            (3, "done".into(), None, Some(200)),
        ]
    );
    let calls = sba.calls("register.do");
    assert_eq!(calls.len(), 3);
    // Every attempt used the same order number.
    assert!(calls
        .iter()
        .all(|r| r.params["orderNumber"] == calls[0].params["orderNumber"]));
    assert_eq!(sba.order_count(), 1);
    let (_, provider_id) = row(&c, id).await;
    assert_eq!(
        provider_id,
        sba.order(&calls[0].params["orderNumber"])
            .map(|o| o.order_id)
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_response_is_recovered_on_retry_with_the_existing_order() {
    let db = TestDb::new().await;
    let sba = SbaDouble::start("shop-api", "pw", "").await;
    // The first register goes through, but its answer never arrives.
    sba.script(&[SbaTrouble::LoseResponse]);
    let (_tc, daemon) = start(&db, &merchant("default", &sba.base));
    let c = db.client().await;
    let id = send(
        &c,
        "sba.agent",
        "default",
        "/payment/rest/register.do",
        "amount=4200",
    )
    .await;
    wait_state(&c, id, "submitted", WAIT).await;
    assert_eq!(
        attempts(&c, id).await,
        vec![
            (1, "retry".into(), Some("http-503".into()), Some(503)),
            (2, "done".into(), None, Some(200)),
        ]
    );
    let (code, provider_id) = row(&c, id).await;
    let order = sba.order(&code[..32]).unwrap();
    assert_eq!(provider_id.as_deref(), Some(order.order_id.as_str()));
    assert_eq!(sba.order_count(), 1, "no second order");
    let registers = sba.calls("register.do");
    assert_eq!(registers.len(), 2);
    assert!(registers[1].response.contains("\"errorCode\":\"1\""));
    let lookups = sba.calls("getOrderStatusExtended.do");
    assert_eq!(lookups.len(), 1);
    assert_eq!(lookups[0].params["orderNumber"], &code[..32]);
    assert_eq!(lookups[0].params["userName"], "shop-api");
    let r = replies(&c, id).await;
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["orderId"], order.order_id.as_str());
    assert_eq!(r[0]["recovered"], true);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_registered_before_a_crash_makes_the_message_done_with_its_id() {
    let db = TestDb::new().await;
    let sba = SbaDouble::start("shop-api", "pw", "").await;
    // An earlier run registered these, then died before recording the outcome.
    let ours = sba.seed("ORDER-2024-0001", 9900);
    sba.seed("ORDER-2024-0002", 100);
    let (_tc, daemon) = start(&db, &merchant("default", &sba.base));
    let c = db.client().await;
    let same = send_with_code(&c, "ORDER-2024-0001", "amount=9900").await;
    // Same number, different amount: someone else's order, not ours.
    let other = send_with_code(&c, "ORDER-2024-0002", "amount=200").await;
    wait_state(&c, same, "submitted", WAIT).await;
    assert_eq!(
        attempts(&c, same).await,
        vec![(1, "done".into(), None, Some(200))]
    );
    assert_eq!(row(&c, same).await.1, Some(ours.clone()));
    assert_eq!(replies(&c, same).await[0]["orderId"], ours.as_str());
    wait_state(&c, other, "failed", WAIT).await;
    assert_eq!(
        attempts(&c, other).await,
        vec![(1, "failed".into(), Some("sba-1".into()), Some(200))]
    );
    assert_eq!(sba.order_count(), 2);
    assert_eq!(sba.calls("getOrderStatusExtended.do").len(), 2);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_the_profile_does_not_list_are_never_called() {
    let db = TestDb::new().await;
    let gw = SbaDouble::start("shop-api", "pw", "").await;
    let conf = format!(
        "{}{}methods = [\"register.do\", \"refund.do\"]\n",
        merchant("default", &gw.base),
        merchant("refunds", &gw.base)
    );
    let (_tc, daemon) = start(&db, &conf);
    let c = db.client().await;
    let refund = "orderId=6a1e&amount=100";
    let mut denied = Vec::new();
    for address in [
        "/payment/rest/refund.do",
        "reverse.do",
        "/payment/rest/refund.do/../register.do",
        "/payment/rest/%72efund.do",
    ] {
        denied.push(send(&c, "sba.agent", "default", address, refund).await);
    }
    // The default list has the register and its status call.
    let status = send(
        &c,
        "sba.agent",
        "default",
        "getOrderStatusExtended.do",
        "orderNumber=none",
    )
    .await;
    // A profile that lists refund.do may call it.
    let listed = send(&c, "sba.agent", "refunds", "refund.do", refund).await;
    for id in &denied {
        wait_state(&c, *id, "failed", WAIT).await;
        let att = attempts(&c, *id).await;
        assert_eq!(
            att,
            [(1, "failed".into(), Some("method-denied".into()), None)],
            "{id}"
        );
    }
    wait_state(&c, listed, "submitted", WAIT).await;
    wait_state(&c, status, "failed", WAIT).await;
    daemon.stop().await;
    assert_eq!(
        attempts(&c, status).await[0].2.as_deref(),
        Some("sba-6"),
        "sent: the gateway does not know the order"
    );
    let refunds = gw.calls("refund.do");
    assert_eq!(refunds.len(), 1, "only the listed one: {refunds:?}");
    assert!(gw.calls("reverse.do").is_empty());
    assert!(gw.calls("register.do").is_empty());
    let text: String = c
        .query_one(
            "SELECT error_text FROM outbox.attempts WHERE message_id = $1",
            &[&denied[0]],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        text.contains("refund.do") && text.contains("register.do"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_merchant_password_never_follows_a_redirect_to_another_origin() {
    let db = TestDb::new().await;
    let gw = SbaDouble::start("shop-api", "pw", "").await;
    // Another origin (same address, other port) that would register the order.
    let elsewhere = SbaDouble::start("shop-api", "pw", "").await;
    gw.redirect_to(&elsewhere.base);
    let (_tc, daemon) = start(&db, &merchant("default", &gw.base));
    let c = db.client().await;
    let id = send(&c, "sba.agent", "default", "", "amount=100").await;
    wait_state(&c, id, "failed", WAIT).await;
    daemon.stop().await;
    assert_eq!(
        attempts(&c, id).await,
        [(1, "failed".into(), Some("redirect-denied".into()), None)]
    );
    assert!(
        elsewhere.requests().is_empty(),
        "{:?}",
        elsewhere.requests()
    );
}
