//! The DingTalk message center's endpoints (`/v1/dd/*`) and `?wait=` with a real client against a
//! running daemon, its HTTP server, PostgreSQL and the DingTalk double
//! (tests/common/dingtalk_double.rs), which checks the access token, the agent_id, the field names
//! and answers DingTalk's error bodies.

mod common;
#[path = "common/dingtalk_double.rs"]
mod double;

use std::time::{Duration, Instant};

use common::*;
use double::*;
use outboxd::config::Secret;
use serde_json::{json, Value};
use uuid::Uuid;

const TOKEN: &str = "dd-center-token-0123456789";
const T: Duration = Duration::from_secs(15);

struct Center {
    _tc: TestConfig,
    daemon: Daemon,
    base: String,
    http: reqwest::Client,
    dd: DingtalkDouble,
}

async fn start(db: &TestDb) -> Center {
    let dd = DingtalkDouble::start().await;
    let conf = format!(
        "[default]\nappkey = \"{APP_KEY}\"\nappsecret = \"{APP_SECRET}\"\nagent_id = {AGENT_ID}\n\
         endpoint = \"{}\"\nresult_polls = []\nretry = [\"20ms\"]\ntimeout = \"5s\"\n",
        dd.url
    );
    let mut tc = TestConfig::new(db, &[("dingtalk", &conf)]);
    tc.config.http_listen = Some("127.0.0.1:0".parse().unwrap());
    tc.config.api_tokens = vec![Secret::new(TOKEN)];
    // As the daemon's role, as in production: the grants of sql/018 are what the server uses.
    tc.config.session_role = Some("outboxd_daemon".into());
    let daemon = Daemon::start(tc.config.clone().with_session_role());
    let controls = daemon.controls.clone();
    let addr = wait_for(Duration::from_secs(10), "the HTTP server to listen", || {
        let c = controls.clone();
        async move { c.http_addr.get().copied() }
    })
    .await;
    Center {
        _tc: tc,
        daemon,
        base: format!("http://{addr}"),
        http: reqwest::Client::new(),
        dd,
    }
}

impl Center {
    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.post_raw(path, Some(TOKEN), &body.to_string()).await
    }

    async fn post_raw(&self, path: &str, token: Option<&str>, body: &str) -> (u16, Value) {
        let mut req = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    async fn post_form(&self, path: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }
}

/// The center's success envelope; its `data`.
fn success(st: u16, v: &Value) -> Value {
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        (&v["id"], &v["ok"], &v["code"], &v["msg"], &v["count"]),
        (&json!(1), &json!(1), &json!(0), &json!(""), &json!(0)),
        "{v}"
    );
    v["data"].clone()
}

/// The center's failure envelope: code 1, `msg` mentioning `what`, `data` a string; its `data`.
fn failure(st: u16, v: &Value, status: u16, what: &str) -> String {
    assert_eq!(st, status, "{v}");
    assert_eq!(
        (&v["id"], &v["ok"], &v["code"], &v["count"]),
        (&json!(0), &json!(0), &json!(1), &json!(0)),
        "{v}"
    );
    assert!(v["msg"].as_str().unwrap().contains(what), "{what}: {v}");
    v["data"].as_str().expect("data is a string").to_string()
}

fn id_of(data: &Value) -> Uuid {
    data["id"].as_str().unwrap().parse().unwrap()
}

async fn messages(c: &tokio_postgres::Client) -> i64 {
    c.query_one("SELECT count(*) FROM outbox.live_messages", &[])
        .await
        .unwrap()
        .get(0)
}

/// (kind, request, result, error_code, error_text) of every recorded direct call, oldest first.
async fn calls(
    c: &tokio_postgres::Client,
) -> Vec<(
    String,
    Value,
    Option<String>,
    Option<String>,
    Option<String>,
)> {
    c.query(
        "SELECT kind, request, result, error_code, error_text FROM api.dingtalk_calls() ORDER BY id",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
    .collect()
}

const TEXT: &str = r#"{"msgtype":"text","text":{"content":"机房温度过高 / server room too hot"}}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_notifications_and_chat_messages_go_through_the_outbox() {
    let db = TestDb::new().await;
    let s = start(&db).await;
    let c = db.client().await;
    let msg: Value = serde_json::from_str(TEXT).unwrap();

    // DingTalk's own form: comma-separated lists; the answer carries the message id at once.
    let (st, v) = s
        .post(
            "/v1/dd/topapi/message",
            json!({"agent_id": AGENT_ID, "userid_list": "u1,u2", "dept_id_list": "7", "msg": msg}),
        )
        .await;
    let data = success(st, &v);
    let id = id_of(&data);
    assert_eq!(data.as_object().unwrap().len(), 1, "{data}");
    wait_state(&c, id, "submitted", T).await;
    let sent = s.dd.calls("/topapi/message/corpconversation/asyncsend_v2");
    assert_eq!(sent.len(), 1);
    let b = &sent[0].body;
    assert_eq!(b["agent_id"], AGENT_ID);
    assert_eq!(b["userid_list"], "u1,u2");
    assert_eq!(b["dept_id_list"], "7");
    assert_eq!(b["msg"], msg);
    assert!(b.get("to_all_user").is_none(), "{b}");

    // Arrays and ?wait=: the outcome, with DingTalk's task_id.
    let t0 = Instant::now();
    let (st, v) = s
        .post(
            "/v1/dd/topapi/message?wait=5s",
            json!({"userid_list": ["u3"], "dept_id_list": [8, 9], "to_all_user": true, "msg": msg}),
        )
        .await;
    let waited = t0.elapsed();
    let data = success(st, &v);
    assert_eq!(data["state"], "submitted", "{data}");
    let sent = s.dd.calls("/topapi/message/corpconversation/asyncsend_v2");
    assert_eq!(sent.len(), 2);
    assert_eq!(data["task_id"], sent[1].answer["task_id"].to_string());
    assert_eq!(data["provider_id"], data["task_id"]);
    let b = &sent[1].body;
    assert_eq!(
        (&b["userid_list"], &b["dept_id_list"], &b["to_all_user"]),
        (&json!("u3"), &json!("8,9"), &json!(true))
    );
    assert_eq!(state_of(&c, id_of(&data)).await, "submitted");
    println!("topapi/message?wait=5s answered submitted in {waited:?}");

    // chat/create is a direct call; the chat then takes chat/send through the outbox.
    let (st, v) = s
        .post(
            "/v1/dd/chat/create",
            json!({"name": "值班群 on-call", "owner": "u1", "useridlist": ["u1", "u2"]}),
        )
        .await;
    let chatid = success(st, &v)["chatid"].as_str().unwrap().to_string();
    let created = s.dd.calls("/chat/create");
    assert_eq!(created.len(), 1);
    assert_eq!(
        created[0].body,
        json!({"name": "值班群 on-call", "owner": "u1", "useridlist": ["u1", "u2"]})
    );
    assert_eq!(created[0].answer["chatid"], chatid.as_str());
    assert_eq!(
        calls(&c).await,
        vec![(
            "chat/create".to_string(),
            json!({"name": "值班群 on-call", "owner": "u1", "useridlist": ["u1", "u2"]}),
            Some(chatid.clone()),
            None,
            None
        )]
    );
    // … and the chat is one of api.dingtalk_chats(), as if `outboxd dingtalk chat-create` made it.
    let chat = c
        .query_one(
            "SELECT name, owner, userids, state, chatid FROM api.dingtalk_chats()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(chat.get::<_, String>(0), "值班群 on-call");
    assert_eq!(chat.get::<_, String>(1), "u1");
    assert_eq!(chat.get::<_, Vec<String>>(2), vec!["u1", "u2"]);
    assert_eq!(chat.get::<_, String>(3), "created");
    assert_eq!(chat.get::<_, Option<String>>(4), Some(chatid.clone()));

    let (st, v) = s
        .post(
            "/v1/dd/chat/send?wait=5s",
            json!({"chatid": chatid, "msg": msg}),
        )
        .await;
    let data = success(st, &v);
    assert_eq!(data["state"], "submitted", "{data}");
    let sends = s.dd.calls("/chat/send");
    assert_eq!(sends.len(), 1);
    assert_eq!(sends[0].body, json!({"chatid": chatid, "msg": msg}));
    assert_eq!(data["messageId"], sends[0].answer["messageId"]);

    // A chat DingTalk does not know: ?wait= answers the failed outcome with DingTalk's errcode.
    let (st, v) = s
        .post(
            "/v1/dd/chat/send?wait=5s",
            json!({"chatid": "chat-nobody-knows", "msg": msg}),
        )
        .await;
    let data = failure(st, &v, 502, "dingtalk-34019");
    assert_eq!(data, "[34019] chatid不存在");
    let failed: Uuid = c
        .query_one(
            "SELECT id FROM outbox.live_messages WHERE address = 'chat:chat-nobody-knows'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(state_of(&c, failed).await, "failed");
    assert!(v["msg"].as_str().unwrap().contains(&failed.to_string()));
    assert_eq!(messages(&c).await, 4);
    s.daemon.stop().await;
}

/// A multipart form as DingTalk's clients post it: `type` and the file `media`.
fn form(kind: &str, filename: &str, bytes: &[u8]) -> (String, Vec<u8>) {
    let boundary = "dd-center-boundary-5e2a";
    let mut b = Vec::new();
    b.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"type\"\r\n\r\n{kind}\r\n")
            .as_bytes(),
    );
    b.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"media\"; filename=\"{filename}\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    b.extend_from_slice(bytes);
    b.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_is_uploaded_from_a_form_or_base64_and_recorded() {
    let db = TestDb::new().await;
    let s = start(&db).await;
    let c = db.client().await;
    // DingTalk checks an image's type by its first bytes: a PNG signature, then filler.
    let png: Vec<u8> = b"\x89PNG\r\n\x1a\n"
        .iter()
        .copied()
        .chain((0..=255u8).cycle())
        .take(3000)
        .collect();

    let (ct, body) = form("image", "chart.png", &png);
    let (st, v) = s.post_form("/v1/dd/media/upload", &ct, body).await;
    let data = success(st, &v);
    let media_id = data["media_id"].as_str().unwrap().to_string();
    assert_eq!(data["type"], "image");
    let ups = s.dd.calls("/media/upload");
    assert_eq!(ups.len(), 1);
    assert_eq!(ups[0].query["type"], "image");
    assert_eq!(ups[0].media.as_deref(), Some(png.as_slice()), "the bytes");
    assert_eq!(ups[0].answer["media_id"], media_id.as_str());

    // The JSON form; the type from the query.
    use base64::Engine;
    let doc = b"%PDF-1.4 quarterly report".to_vec();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&doc);
    let (st, v) = s
        .post(
            "/v1/dd/media/upload?type=file",
            json!({"media": {"base64": b64, "filename": "report.pdf"}}),
        )
        .await;
    let file_id = success(st, &v)["media_id"].as_str().unwrap().to_string();
    let ups = s.dd.calls("/media/upload");
    assert_eq!(ups[1].query["type"], "file");
    assert_eq!(ups[1].media.as_deref(), Some(doc.as_slice()));

    // The uploaded image is then sendable by media_id (DingTalk's double checks it knows it).
    let (st, v) = s
        .post(
            "/v1/dd/topapi/message?wait=5s",
            json!({"userid_list": "u1", "msg": {"msgtype": "image", "image": {"media_id": media_id}}}),
        )
        .await;
    assert_eq!(success(st, &v)["state"], "submitted", "{v}");

    let rec = calls(&c).await;
    assert_eq!(rec.len(), 2);
    assert_eq!(rec[0].0, "media/upload");
    assert_eq!(rec[0].1["filename"], "chart.png");
    assert_eq!(rec[0].1["bytes"], 3000);
    assert_eq!(rec[0].1["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(rec[0].2.as_deref(), Some(media_id.as_str()));
    assert_eq!(rec[1].1["type"], "file");
    assert_eq!(rec[1].2.as_deref(), Some(file_id.as_str()));
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_kind_answers_in_the_centers_envelope() {
    let db = TestDb::new().await;
    let s = start(&db).await;
    let c = db.client().await;
    let msg: Value = serde_json::from_str(TEXT).unwrap();

    let (st, v) = s.post("/v1/dd/topapi/message", json!({"msg": msg})).await;
    assert_eq!(
        failure(st, &v, 400, "recipient"),
        "[40002] a field is missing, unknown, of the wrong type or out of range"
    );
    let (st, v) = s
        .post(
            "/v1/dd/topapi/message",
            json!({"userid_list": "", "dept_id_list": [], "to_all_user": false, "msg": msg}),
        )
        .await;
    failure(st, &v, 400, "recipient");
    let (st, v) = s
        .post("/v1/dd/topapi/message", json!({"userid_list": "u1"}))
        .await;
    failure(st, &v, 400, "msg");
    let (st, v) = s
        .post_raw("/v1/dd/chat/send", Some(TOKEN), "{\"chatid\": ")
        .await;
    assert!(failure(st, &v, 400, "JSON").starts_with("[40001] "));
    for path in [
        "/v1/dd/topapi/message",
        "/v1/dd/chat/send",
        "/v1/dd/chat/create",
        "/v1/dd/media/upload",
    ] {
        let (st, v) = s.post_raw(path, None, "{}").await;
        assert_eq!(
            failure(st, &v, 401, "Bearer"),
            "[40101] missing or wrong bearer token"
        );
        let (st, v) = s.post_raw(path, Some("wrong-token-0123456789"), "{}").await;
        failure(st, &v, 401, "not valid");
    }
    let (st, v) = s
        .post(
            "/v1/dd/topapi/message?profile=nope",
            json!({"userid_list": "u1", "msg": msg}),
        )
        .await;
    assert!(failure(st, &v, 400, "\"nope\"").starts_with("[40004] "));
    let (st, v) = s
        .post("/v1/dd/chat/create", json!({"name": "x", "owner": "u1"}))
        .await;
    failure(st, &v, 400, "useridlist");
    let (st, v) = s
        .post(
            "/v1/dd/media/upload",
            json!({"type": "sticker", "media": {"base64": "AAAA"}}),
        )
        .await;
    failure(st, &v, 400, "type");
    let (st, v) = s
        .post(
            "/v1/dd/topapi/message?wait=soon",
            json!({"userid_list": "u1", "msg": msg}),
        )
        .await;
    failure(st, &v, 400, "wait");
    assert_eq!(
        messages(&c).await,
        0,
        "no refused request enqueued anything"
    );
    assert!(
        s.dd.calls("/chat/create").is_empty() && s.dd.calls("/media/upload").is_empty(),
        "no refused request reached DingTalk"
    );

    // DingTalk refuses a direct call: its errcode and errmsg in data, and the call recorded.
    s.dd.fail_next("/chat/create", 33012, "无效的userid");
    let (st, v) = s
        .post(
            "/v1/dd/chat/create",
            json!({"name": "ops", "owner": "nobody", "useridlist": "nobody,u2"}),
        )
        .await;
    assert_eq!(
        failure(st, &v, 502, "chat/create failed"),
        "[33012] 无效的userid"
    );
    assert_eq!(
        s.dd.calls("/chat/create")[0].body["useridlist"],
        json!(["nobody", "u2"])
    );
    s.dd.fail_next("/media/upload", 40004, "不合法的媒体文件类型");
    let (ct, body) = form("voice", "a.amr", b"#!AMR\n....");
    let (st, v) = s.post_form("/v1/dd/media/upload", &ct, body).await;
    assert_eq!(
        failure(st, &v, 502, "media/upload failed"),
        "[40004] 不合法的媒体文件类型"
    );
    let rec = calls(&c).await;
    assert_eq!(rec.len(), 2);
    assert_eq!(
        (
            rec[0].2.as_deref(),
            rec[0].3.as_deref(),
            rec[0].4.as_deref()
        ),
        (None, Some("dingtalk-33012"), Some("无效的userid"))
    );
    assert_eq!(rec[1].3.as_deref(), Some("dingtalk-40004"));
    // Nothing secret was recorded or answered.
    let all = format!("{rec:?}");
    assert!(
        !all.contains(APP_SECRET) && !all.contains("app-token-"),
        "{all}"
    );

    // The REST send's own failures keep their codes; /v1/dd's method errors are the center's.
    let r = s
        .http
        .get(format!("{}/v1/dd/chat/send", s.base))
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    failure(st, &r.json().await.unwrap(), 405, "POST");
    let (st, v) = s.post("/v1/dd/topapi/nothing", json!({})).await;
    assert!(failure(st, &v, 404, "no such endpoint").starts_with("[40401] "));
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_send_waits_for_the_outcome_or_answers_the_state() {
    let db = TestDb::new().await;
    let s = start(&db).await;
    let c = db.client().await;
    let path = "/api/v1/message/send?wait=5s";

    let (st, v) = s
        .post(
            path,
            json!({"agent": "dingtalk.agent", "address": "users:u1", "content": TEXT}),
        )
        .await;
    assert_eq!(
        (st, &v["ok"], &v["code"]),
        (200, &json!(1), &json!(0)),
        "{v}"
    );
    assert_eq!(v["data"]["state"], "submitted", "{v}");
    let sent = s.dd.calls("/topapi/message/corpconversation/asyncsend_v2");
    assert_eq!(
        v["data"]["provider_id"],
        sent[0].answer["task_id"].to_string()
    );

    // Failed: the REST code for a provider refusal, and the stable code with the text in data.
    let (st, v) = s
        .post(
            path,
            json!({"agent": "dingtalk.agent", "address": "chat:chat-unknown", "content": TEXT}),
        )
        .await;
    assert_eq!(
        (st, &v["ok"], &v["code"]),
        (502, &json!(0), &json!(50201)),
        "{v}"
    );
    assert_eq!(v["data"], "[dingtalk-34019] chatid不存在");

    // Not due before the wait ends: the state it is in, after about the wait.
    let later = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let t0 = Instant::now();
    let (st, v) = s
        .post(
            "/api/v1/message/send?wait=600ms",
            json!({"agent": "dingtalk.agent", "address": "users:u1", "content": TEXT, "send_at": later}),
        )
        .await;
    let took = t0.elapsed();
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["data"]["state"], "prepared", "{v}");
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let id: Uuid = v["data"]["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(state_of(&c, id).await, "prepared");
    // Without wait the answer is what it always was.
    let (st, v) = s
        .post(
            "/api/v1/message/send",
            json!({"agent": "dingtalk.agent", "address": "users:u2", "content": TEXT}),
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(v["data"].as_object().unwrap().len(), 1, "{v}");
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_describes_the_dd_endpoints_as_they_answer() {
    let db = TestDb::new().await;
    let s = start(&db).await;
    let doc: Value = s
        .http
        .get(format!("{}/api/v1/openapi.json", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let schemas = &doc["components"]["schemas"];
    // A full body of each send and of chat/create is accepted; each required field is refused
    // when missing (400, code 1, msg naming it).
    let msg: Value = serde_json::from_str(TEXT).unwrap();
    let bodies = [
        (
            "/v1/dd/topapi/message",
            "DdTopapiMessage",
            json!({"userid_list": "u1", "dept_id_list": [7], "to_all_user": false, "agent_id": AGENT_ID, "msg": msg}),
        ),
        (
            "/v1/dd/chat/create",
            "DdChatCreate",
            json!({"name": "n", "owner": "u1", "useridlist": "u1,u2"}),
        ),
    ];
    for (path, schema, full) in bodies {
        assert!(doc["paths"][path]["post"].is_object(), "{path}");
        let props = schemas[schema]["properties"].as_object().unwrap();
        for k in full.as_object().unwrap().keys() {
            assert!(props.contains_key(k), "{schema} lacks {k}");
        }
        let (st, v) = s.post(path, full.clone()).await;
        success(st, &v);
        for req in schemas[schema]["required"].as_array().unwrap() {
            let req = req.as_str().unwrap();
            let mut b = full.clone();
            b.as_object_mut().unwrap().remove(req);
            let (st, v) = s.post(path, b).await;
            failure(st, &v, 400, req);
        }
    }
    let chat = &schemas["DdChatSend"]["required"];
    assert_eq!(chat, &json!(["chatid", "msg"]));
    for p in ["/v1/dd/chat/send", "/v1/dd/media/upload"] {
        assert!(doc["paths"][p]["post"].is_object(), "{p}");
    }
    let wait = doc["paths"]["/api/v1/message/send"]["post"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "wait");
    assert!(wait, "the REST send documents ?wait=");
    let codes: Vec<u64> = doc["x-error-codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["code"].as_u64().unwrap())
        .collect();
    assert!(
        codes.contains(&40004) && codes.contains(&50201),
        "{codes:?}"
    );
    s.daemon.stop().await;
}
