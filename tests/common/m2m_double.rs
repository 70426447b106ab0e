//! A fake MTS Communicator on 127.0.0.1:0, checking requests the way the real service would
//! (providers.md §2.9).
//!
//! - `POST /m2m/m2m_api.asmx`: the M2M XML API. SOAP 1.1 (`text/xml` + `SOAPAction`) or SOAP 1.2
//!   (`application/soap+xml`, optional `action`); the envelope namespace must match the binding, the
//!   operation must be `SendMessage` in `http://mcommunicator.ru/M2M`. Auth: `Authorization: Bearer
//!   <token>`, or `login` + `password` = hex MD5 of the account password. Checks as the service does:
//!   `INCORRECT_PASSWORD`, `MSID_FORMAT_ERROR` (digits, 11–15), `EMPTY_MESSAGE_NOT_ALLOWED`,
//!   `MAX_LENGTH_EXCEEDED` (> 1000 characters). Answers `SendMessageResponse/SendMessageResult`
//!   (an increasing id) or a SOAP fault with HTTP 500, as ASMX does.
//! - `POST /http-api/v1/messages`: the omnichannel API; `Authorization: Basic <token>` and the JSON
//!   shape `{"options":{"from":{"sms_address"}},"messages":[{"to":[{"msisdn"}],"content":{"short_text"}}]}`.
//!
//! Scripted trouble is keyed by msid (so concurrent messages cannot steal each other's script):
//! queued answers are used first, then a standing fault if any, then the normal answer.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use quick_xml::events::Event;
use quick_xml::name::ResolveResult;
use quick_xml::reader::NsReader;

pub const M2M_NS: &str = "http://mcommunicator.ru/M2M";
pub const SOAP11_NS: &str = "http://schemas.xmlsoap.org/soap/envelope/";
pub const SOAP12_NS: &str = "http://www.w3.org/2003/05/soap-envelope";

/// A scripted answer.
#[derive(Debug, Clone)]
pub enum Trouble {
    /// A SOAP fault with this fault string.
    Fault(&'static str),
    /// This HTTP status with a plain body.
    Status(u16),
}

/// One request as the double understood it.
#[derive(Debug, Clone)]
pub struct M2mRequest {
    pub path: String,
    pub headers: BTreeMap<String, String>,
    pub body: String,
    /// "1.1" or "1.2" (SOAP), "json" (omnichannel).
    pub binding: String,
    /// Operation fields (`msid`, `message`, `naming`, `login`, `password`) or, for omnichannel,
    /// `msid`, `message`, `naming`.
    pub fields: BTreeMap<String, String>,
    /// "ok <id>", "fault <string>", "status <n>".
    pub outcome: String,
}

#[derive(Default)]
struct State {
    login: String,
    password: String,
    token: String,
    next_id: i64,
    queued: HashMap<String, VecDeque<Trouble>>,
    standing: HashMap<String, &'static str>,
    requests: Vec<M2mRequest>,
}

#[derive(Clone)]
pub struct M2mDouble {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    state: Arc<Mutex<State>>,
    _shutdown: Arc<tokio::sync::oneshot::Sender<()>>,
}

impl M2mDouble {
    /// An account with this login, password (plain) and API token.
    pub async fn start(login: &str, password: &str, token: &str) -> M2mDouble {
        let state = Arc::new(Mutex::new(State {
            login: login.into(),
            password: password.into(),
            token: token.into(),
            next_id: 1_000_000_001,
            ..State::default()
        }));
        let st = state.clone();
        let app = axum::Router::new().fallback(
            move |method: axum::http::Method,
                  uri: axum::http::Uri,
                  headers: HeaderMap,
                  body: String| {
                let st = st.clone();
                async move {
                    if method != axum::http::Method::POST {
                        return (StatusCode::METHOD_NOT_ALLOWED, "POST only").into_response();
                    }
                    match uri.path() {
                        "/m2m/m2m_api.asmx" => soap(&st, &headers, body),
                        "/http-api/v1/messages" => omnichannel(&st, &headers, body),
                        _ => (StatusCode::NOT_FOUND, "no such endpoint").into_response(),
                    }
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tx = super::serve_on(listener, app);
        M2mDouble {
            base: format!("http://{addr}"),
            state,
            _shutdown: tx,
        }
    }

    pub fn soap_url(&self) -> String {
        format!("{}/m2m/m2m_api.asmx", self.base)
    }

    pub fn omnichannel_url(&self) -> String {
        format!("{}/http-api/v1/messages", self.base)
    }

    /// The next requests for `msid` meet these troubles, in order.
    pub fn queue(&self, msid: &str, troubles: &[Trouble]) {
        self.state
            .lock()
            .unwrap()
            .queued
            .entry(msid.into())
            .or_default()
            .extend(troubles.iter().cloned());
    }

    /// Every request for `msid` gets this fault (a standing condition: blacklist, unknown subscriber).
    pub fn always_fault(&self, msid: &str, fault: &'static str) {
        self.state
            .lock()
            .unwrap()
            .standing
            .insert(msid.into(), fault);
    }

    pub fn requests(&self) -> Vec<M2mRequest> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn count(&self) -> usize {
        self.state.lock().unwrap().requests.len()
    }
}

fn md5_hex(s: &str) -> String {
    use md5::{Digest, Md5};
    Md5::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn header_map(h: &HeaderMap) -> BTreeMap<String, String> {
    h.iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect()
}

/// What the double reads from an envelope.
struct Parsed {
    root_ns: Option<String>,
    root: String,
    body_ns: Option<String>,
    op_ns: Option<String>,
    op: Option<String>,
    fields: BTreeMap<String, String>,
}

/// Parses envelope → Body → operation → fields (text with references resolved).
fn parse_envelope(xml: &str) -> Result<Parsed, String> {
    let mut r = NsReader::from_str(xml);
    let mut depth = 0usize;
    let mut p = Parsed {
        root_ns: None,
        root: String::new(),
        body_ns: None,
        op_ns: None,
        op: None,
        fields: BTreeMap::new(),
    };
    let mut field: Option<String> = None;
    loop {
        let (ns, ev) = r.read_resolved_event().map_err(|e| e.to_string())?;
        let ns = match ns {
            ResolveResult::Bound(n) => Some(String::from_utf8_lossy(n.as_ref()).into_owned()),
            _ => None,
        };
        match ev {
            Event::Start(ref s) | Event::Empty(ref s) => {
                let name = String::from_utf8_lossy(s.local_name().as_ref()).into_owned();
                match depth {
                    0 => {
                        p.root = name;
                        p.root_ns = ns;
                    }
                    1 if name == "Body" => p.body_ns = ns,
                    2 if p.op.is_none() => {
                        p.op = Some(name);
                        p.op_ns = ns;
                    }
                    3 => {
                        p.fields.insert(name.clone(), String::new());
                        field = Some(name);
                    }
                    _ => {}
                }
                if matches!(ev, Event::Start(_)) {
                    depth += 1;
                } else if depth == 3 {
                    field = None;
                }
            }
            Event::End(_) => {
                depth -= 1;
                if depth == 3 {
                    field = None;
                }
            }
            Event::Text(t) => {
                if let Some(f) = &field {
                    let s = t.xml10_content().map_err(|e| e.to_string())?;
                    p.fields.get_mut(f).unwrap().push_str(&s);
                }
            }
            Event::GeneralRef(g) => {
                if let Some(f) = &field {
                    let s = match g.resolve_char_ref().map_err(|e| e.to_string())? {
                        Some(c) => c.to_string(),
                        None => {
                            let n = g.decode().map_err(|e| e.to_string())?;
                            quick_xml::escape::resolve_predefined_entity(&n)
                                .ok_or(format!("unknown entity {n}"))?
                                .to_string()
                        }
                    };
                    p.fields.get_mut(f).unwrap().push_str(&s);
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if depth != 0 || p.root.is_empty() {
        return Err("unbalanced document".into());
    }
    Ok(p)
}

fn soap_ok(version: &str, id: i64) -> Response {
    let (prefix, ns, ct) = soap_consts(version);
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?><{prefix}:Envelope \
         xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" \
         xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\" xmlns:{prefix}=\"{ns}\"><{prefix}:Body>\
         <SendMessageResponse xmlns=\"{M2M_NS}\"><SendMessageResult>{id}</SendMessageResult>\
         </SendMessageResponse></{prefix}:Body></{prefix}:Envelope>"
    );
    (StatusCode::OK, [("content-type", ct)], xml).into_response()
}

/// A fault as ASMX writes it: HTTP 500; SOAP 1.1 wraps the MTS string in its usual prose.
fn soap_fault(version: &str, fault: &str) -> Response {
    let (prefix, ns, ct) = soap_consts(version);
    let inner = if version == "1.1" {
        format!(
            "<faultcode>{prefix}:Server</faultcode><faultstring>Server was unable to process \
             request. ---&gt; {fault}</faultstring><detail />"
        )
    } else {
        format!(
            "<{prefix}:Code><{prefix}:Value>{prefix}:Receiver</{prefix}:Value></{prefix}:Code>\
             <{prefix}:Reason><{prefix}:Text xml:lang=\"en\">{fault}</{prefix}:Text></{prefix}:Reason>\
             <{prefix}:Detail />"
        )
    };
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?><{prefix}:Envelope xmlns:{prefix}=\"{ns}\">\
         <{prefix}:Body><{prefix}:Fault>{inner}</{prefix}:Fault></{prefix}:Body></{prefix}:Envelope>"
    );
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        [("content-type", ct)],
        xml,
    )
        .into_response()
}

fn soap_consts(version: &str) -> (&'static str, &'static str, &'static str) {
    if version == "1.1" {
        ("soap", SOAP11_NS, "text/xml; charset=utf-8")
    } else {
        ("soap", SOAP12_NS, "application/soap+xml; charset=utf-8")
    }
}

fn soap(st: &Arc<Mutex<State>>, headers: &HeaderMap, body: String) -> Response {
    let mut s = st.lock().unwrap();
    let mut req = M2mRequest {
        path: "/m2m/m2m_api.asmx".into(),
        headers: header_map(headers),
        body: body.clone(),
        binding: String::new(),
        fields: BTreeMap::new(),
        outcome: String::new(),
    };
    let (status_or_fault, response) = soap_answer(&mut s, headers, &body, &mut req);
    req.outcome = status_or_fault;
    s.requests.push(req);
    response
}

fn soap_answer(
    s: &mut State,
    headers: &HeaderMap,
    body: &str,
    req: &mut M2mRequest,
) -> (String, Response) {
    let reject = |code: StatusCode, why: String| {
        (
            format!("status {}", code.as_u16()),
            (code, why).into_response(),
        )
    };
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media = ct.to_ascii_lowercase();
    let (version, env_ns) = if media.starts_with("text/xml") {
        ("1.1", SOAP11_NS)
    } else if media.starts_with("application/soap+xml") {
        ("1.2", SOAP12_NS)
    } else {
        return reject(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content type {ct}"),
        );
    };
    req.binding = version.into();
    let action = if version == "1.1" {
        match headers.get("soapaction").and_then(|v| v.to_str().ok()) {
            Some(a) => Some(a.trim_matches('"').to_string()),
            None => return reject(StatusCode::BAD_REQUEST, "SOAPAction header missing".into()),
        }
    } else {
        ct.split(';')
            .map(str::trim)
            .find_map(|p| p.strip_prefix("action="))
            .map(|a| a.trim_matches('"').to_string())
    };
    let p = match parse_envelope(body) {
        Ok(p) => p,
        Err(e) => return reject(StatusCode::BAD_REQUEST, format!("bad XML: {e}")),
    };
    req.fields = p.fields.clone();
    if p.root != "Envelope"
        || p.root_ns.as_deref() != Some(env_ns)
        || p.body_ns.as_deref() != Some(env_ns)
    {
        return (
            "fault VersionMismatch".into(),
            soap_fault(version, "VersionMismatch"),
        );
    }
    if p.op.as_deref() != Some("SendMessage") || p.op_ns.as_deref() != Some(M2M_NS) {
        return (
            "fault unknown operation".into(),
            soap_fault(version, "unknown operation"),
        );
    }
    if let Some(a) = action {
        // The action is compared case-sensitively, as ASMX routes on it.
        if a != format!("{M2M_NS}/SendMessage") {
            return (
                "fault bad action".into(),
                soap_fault(version, &format!("bad action {a}")),
            );
        }
    }
    let field = |k: &str| p.fields.get(k).cloned().unwrap_or_default();
    let authorised = match headers.get("authorization").and_then(|v| v.to_str().ok()) {
        Some(h) => h == format!("Bearer {}", s.token),
        None => field("login") == s.login && field("password") == md5_hex(&s.password),
    };
    let fault = |f: &'static str| (format!("fault {f}"), soap_fault(version, f));
    if !authorised {
        return fault("INCORRECT_PASSWORD");
    }
    let msid = field("msid");
    if !(11..=15).contains(&msid.len()) || !msid.bytes().all(|b| b.is_ascii_digit()) {
        return fault("MSID_FORMAT_ERROR");
    }
    let text = field("message");
    if text.trim().is_empty() {
        return fault("EMPTY_MESSAGE_NOT_ALLOWED");
    }
    if text.chars().count() > 1000 {
        return fault("MAX_LENGTH_EXCEEDED");
    }
    if let Some(t) = s.queued.get_mut(&msid).and_then(VecDeque::pop_front) {
        return match t {
            Trouble::Fault(f) => fault(f),
            Trouble::Status(n) => reject(StatusCode::from_u16(n).unwrap(), "scripted".into()),
        };
    }
    if let Some(f) = s.standing.get(&msid) {
        return fault(f);
    }
    let id = s.next_id;
    s.next_id += 1;
    (format!("ok {id}"), soap_ok(version, id))
}

fn omnichannel(st: &Arc<Mutex<State>>, headers: &HeaderMap, body: String) -> Response {
    let mut s = st.lock().unwrap();
    let mut req = M2mRequest {
        path: "/http-api/v1/messages".into(),
        headers: header_map(headers),
        body: body.clone(),
        binding: "json".into(),
        fields: BTreeMap::new(),
        outcome: String::new(),
    };
    let (outcome, response) = omnichannel_answer(&mut s, headers, &body, &mut req);
    req.outcome = outcome;
    s.requests.push(req);
    response
}

fn omnichannel_answer(
    s: &mut State,
    headers: &HeaderMap,
    body: &str,
    req: &mut M2mRequest,
) -> (String, Response) {
    let reject = |code: StatusCode, why: &str| {
        (
            format!("status {}", code.as_u16()),
            (code, serde_json::json!({"error": why}).to_string()).into_response(),
        )
    };
    if headers.get("authorization").and_then(|v| v.to_str().ok())
        != Some(format!("Basic {}", s.token).as_str())
    {
        return reject(StatusCode::UNAUTHORIZED, "bad token");
    }
    let json_ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/json"));
    if !json_ct {
        return reject(StatusCode::UNSUPPORTED_MEDIA_TYPE, "JSON only");
    }
    let Ok(v) = serde_json::from_str::<serde_json::Value>(body) else {
        return reject(StatusCode::BAD_REQUEST, "not JSON");
    };
    let keys: Vec<&String> = v
        .as_object()
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    if keys.len() != 2 {
        return reject(
            StatusCode::BAD_REQUEST,
            "expected exactly options and messages",
        );
    }
    let Some(naming) = v
        .pointer("/options/from/sms_address")
        .and_then(|x| x.as_str())
    else {
        return reject(StatusCode::BAD_REQUEST, "options.from.sms_address missing");
    };
    let Some(msgs) = v
        .get("messages")
        .and_then(|m| m.as_array())
        .filter(|m| !m.is_empty())
    else {
        return reject(StatusCode::BAD_REQUEST, "messages missing");
    };
    let m = &msgs[0];
    let Some(msid) = m.pointer("/to/0/msisdn").and_then(|x| x.as_str()) else {
        return reject(StatusCode::BAD_REQUEST, "messages[].to[].msisdn missing");
    };
    let Some(text) = m.pointer("/content/short_text").and_then(|x| x.as_str()) else {
        return reject(
            StatusCode::BAD_REQUEST,
            "messages[].content.short_text missing",
        );
    };
    req.fields = [("msid", msid), ("message", text), ("naming", naming)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if naming.is_empty() || !msid.bytes().all(|b| b.is_ascii_digit()) || text.is_empty() {
        return reject(StatusCode::BAD_REQUEST, "bad values");
    }
    if let Some(Trouble::Status(n)) = s.queued.get_mut(msid).and_then(VecDeque::pop_front) {
        return reject(StatusCode::from_u16(n).unwrap(), "scripted");
    }
    let id = s.next_id;
    s.next_id += 1;
    let internal = format!("omni-{id}");
    (
        format!("ok {internal}"),
        (
            StatusCode::OK,
            [("content-type", "application/json")],
            serde_json::json!({"messages": [{"internal_id": internal, "msisdn": msid}]})
                .to_string(),
        )
            .into_response(),
    )
}
