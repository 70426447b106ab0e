//! A fake Aliyun SMS API (dysmsapi, RPC style) on 127.0.0.1:0 (providers.md §2.8), checking
//! requests the way the service does:
//!
//! - the query is decoded as a servlet would (`+` is a space, `%XY` a byte); the signature v1 is
//!   recomputed from the received parameters (sorted, percent-encoded, `GET&%2F&…`, HMAC-SHA1
//!   under the known secret + `&`) by an implementation of its own, not the connector's. A wrong
//!   one is HTTP 400 `SignatureDoesNotMatch` whose message echoes the server's string to sign (as
//!   Aliyun does: it holds the AccessKeyId); an unknown AccessKeyId 404
//!   `InvalidAccessKeyId.NotFound`; a nonce seen before 400 `SignatureNonceUsed`; a timestamp not
//!   `yyyy-MM-ddTHH:mm:ssZ` or more than 15 minutes off 400 `InvalidTimeStamp.*`;
//!   `SignatureMethod`, `SignatureVersion`, `Version` and `Format` must be Aliyun's.
//! - `SendSms`: `PhoneNumbers` (digits, optional `+`), an approved `SignName`, a known
//!   `TemplateCode` whose variables `TemplateParam` (a JSON object of strings) must all fill,
//!   `OutId` under 256 characters; else HTTP 200 with the `isv.*` code. Accepted: recorded with a
//!   new `BizId` and the China-time date, answered `{"Code":"OK","Message":"OK","BizId","RequestId"}`.
//! - `QuerySendDetails`: `PhoneNumber`, `SendDate` (yyyyMMdd), `PageSize` (1–50), `CurrentPage`;
//!   answers the records of that number and date with the documented fields (no `BizId`).
//!
//! Scripted replies apply to SendSms requests in arrival order, after validation.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{json, Value};

/// What the next accepted-looking SendSms gets.
#[derive(Debug, Clone)]
pub enum Reply {
    /// HTTP 200 with this `Code` and `Message`; nothing recorded.
    Code(&'static str, &'static str),
    /// Recorded (the SMS goes), then never answered.
    AcceptThenHang,
    /// Never answered, nothing recorded (the request was lost before the service acted).
    HangBeforeRecord,
}

/// An SMS the double accepted.
#[derive(Debug, Clone)]
pub struct Sent {
    pub phone_numbers: String,
    pub sign_name: String,
    pub template_code: String,
    pub template_param: Option<Value>,
    pub out_id: Option<String>,
    pub biz_id: String,
    /// yyyyMMdd, China time.
    pub date: String,
}

#[derive(Default)]
struct State {
    key_id: String,
    secret: String,
    signs: Vec<String>,
    /// Template code → its variables.
    templates: HashMap<String, Vec<String>>,
    nonces: HashSet<String>,
    script: VecDeque<Reply>,
    sent: Vec<Sent>,
    send_requests: usize,
    queries: Vec<BTreeMap<String, String>>,
    signatures: Vec<String>,
    raw_queries: Vec<String>,
}

#[derive(Clone)]
pub struct AliyunDouble {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    state: Arc<Mutex<State>>,
    _shutdown: Arc<tokio::sync::oneshot::Sender<()>>,
}

/// Aliyun's percentEncode, written independently of the connector's.
fn pe(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Servlet-style decoding: `+` is a space.
fn decode(s: &str) -> String {
    let s = s.replace('+', " ");
    percent_encoding::percent_decode_str(&s)
        .decode_utf8_lossy()
        .into_owned()
}

fn string_to_sign(method: &str, params: &BTreeMap<String, String>) -> String {
    let canonical: Vec<String> = params
        .iter()
        .filter(|(k, _)| k.as_str() != "Signature")
        .map(|(k, v)| format!("{}={}", pe(k), pe(v)))
        .collect();
    format!("{method}&{}&{}", pe("/"), pe(&canonical.join("&")))
}

fn sign(secret: &str, text: &str) -> String {
    let key = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
        format!("{secret}&").as_bytes(),
    );
    base64::engine::general_purpose::STANDARD.encode(ring::hmac::sign(&key, text.as_bytes()))
}

fn china_date(t: chrono::DateTime<chrono::Utc>) -> String {
    t.with_timezone(&chrono::FixedOffset::east_opt(8 * 3600).unwrap())
        .format("%Y%m%d")
        .to_string()
}

fn answer(status: u16, code: &str, message: &str) -> Response {
    (
        StatusCode::from_u16(status).unwrap(),
        [("content-type", "application/json;charset=utf-8")],
        json!({"Code": code, "Message": message, "RequestId": uuid::Uuid::new_v4().to_string().to_uppercase()})
            .to_string(),
    )
        .into_response()
}

enum Outcome {
    Now(Response),
    Hang,
}

impl AliyunDouble {
    /// A double knowing one AccessKey pair, the sign `Shop` and the templates `SMS_100`
    /// (variable `code`) and `SMS_200` (no variables).
    pub async fn start(key_id: &str, secret: &str) -> AliyunDouble {
        let state = Arc::new(Mutex::new(State {
            key_id: key_id.into(),
            secret: secret.into(),
            signs: vec!["Shop".into()],
            templates: HashMap::from([
                ("SMS_100".to_string(), vec!["code".to_string()]),
                ("SMS_200".to_string(), vec![]),
            ]),
            ..State::default()
        }));
        let st = state.clone();
        let app = axum::Router::new().fallback(move |method: Method, uri: Uri| {
            let st = st.clone();
            async move {
                match handle(&st, &method, &uri) {
                    Outcome::Now(r) => r,
                    Outcome::Hang => {
                        std::future::pending::<()>().await;
                        unreachable!()
                    }
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tx = crate::common::serve_on(listener, app);
        AliyunDouble {
            url: format!("http://{addr}"),
            state,
            _shutdown: tx,
        }
    }

    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.state.lock().unwrap().script.extend(replies);
    }

    /// The SMS accepted (each one went to the phone).
    pub fn sent(&self) -> Vec<Sent> {
        self.state.lock().unwrap().sent.clone()
    }

    /// Every SendSms request that passed the signature check, accepted or not.
    pub fn send_requests(&self) -> usize {
        self.state.lock().unwrap().send_requests
    }

    /// The parameters of every QuerySendDetails that passed the signature check.
    pub fn queries(&self) -> Vec<BTreeMap<String, String>> {
        self.state.lock().unwrap().queries.clone()
    }

    /// Every `Signature` received.
    pub fn signatures(&self) -> Vec<String> {
        self.state.lock().unwrap().signatures.clone()
    }

    /// Every raw query string received.
    pub fn raw_queries(&self) -> Vec<String> {
        self.state.lock().unwrap().raw_queries.clone()
    }
}

fn handle(st: &Mutex<State>, method: &Method, uri: &Uri) -> Outcome {
    let mut s = st.lock().unwrap();
    let raw = uri.query().unwrap_or("").to_string();
    s.raw_queries.push(raw.clone());
    if uri.path() != "/" {
        return Outcome::Now(answer(404, "InvalidAction.NotFound", "no such path"));
    }
    let mut params = BTreeMap::new();
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if params.insert(decode(k), decode(v)).is_some() {
            return Outcome::Now(answer(400, "InvalidParameter", "a parameter is repeated"));
        }
    }
    if let Err(r) = verify(&mut s, method.as_str(), &params) {
        return Outcome::Now(r);
    }
    let p = |k: &str| params.get(k).cloned().unwrap_or_default();
    match p("Action").as_str() {
        "SendSms" => send_sms(&mut s, &params),
        "QuerySendDetails" => {
            s.queries.push(params.clone());
            Outcome::Now(query(&s, &params))
        }
        other => Outcome::Now(answer(
            404,
            "InvalidAction.NotFound",
            &format!("Specified api {other} is not found"),
        )),
    }
}

#[allow(clippy::result_large_err)] // a test double: the error is the answer itself
fn verify(s: &mut State, method: &str, params: &BTreeMap<String, String>) -> Result<(), Response> {
    let p = |k: &str| params.get(k).map(String::as_str);
    for k in [
        "AccessKeyId",
        "Action",
        "Signature",
        "SignatureMethod",
        "SignatureNonce",
        "SignatureVersion",
        "Timestamp",
        "Version",
    ] {
        if p(k).map_or(true, str::is_empty) {
            return Err(answer(
                400,
                &format!("Missing{k}"),
                &format!("{k} is mandatory"),
            ));
        }
    }
    if p("SignatureMethod") != Some("HMAC-SHA1") || p("SignatureVersion") != Some("1.0") {
        return Err(answer(400, "InvalidSignatureMethod", "HMAC-SHA1 1.0 only"));
    }
    if p("Version") != Some("2017-05-25") {
        return Err(answer(
            400,
            "InvalidVersion",
            "Specified parameter Version is not valid.",
        ));
    }
    if !matches!(p("Format"), None | Some("JSON") | Some("XML")) {
        return Err(answer(400, "InvalidParameter.Format", "JSON or XML"));
    }
    if p("AccessKeyId") != Some(s.key_id.as_str()) {
        return Err(answer(
            404,
            "InvalidAccessKeyId.NotFound",
            "Specified access key is not found.",
        ));
    }
    let Ok(ts) =
        chrono::NaiveDateTime::parse_from_str(p("Timestamp").unwrap(), "%Y-%m-%dT%H:%M:%SZ")
    else {
        return Err(answer(
            400,
            "InvalidTimeStamp.Format",
            "Specified time stamp or date value is not well formatted.",
        ));
    };
    let skew = (chrono::Utc::now().naive_utc() - ts).num_seconds().abs();
    if skew > 15 * 60 {
        return Err(answer(
            400,
            "InvalidTimeStamp.Expired",
            "Specified time stamp or date value is expired.",
        ));
    }
    let to_sign = string_to_sign(method, params);
    let got = p("Signature").unwrap().to_string();
    s.signatures.push(got.clone());
    if sign(&s.secret, &to_sign) != got {
        return Err(answer(
            400,
            "SignatureDoesNotMatch",
            &format!("Specified signature is not matched with our calculation. server string to sign is:{to_sign}"),
        ));
    }
    if !s.nonces.insert(p("SignatureNonce").unwrap().to_string()) {
        return Err(answer(
            400,
            "SignatureNonceUsed",
            "Specified signature nonce was used already.",
        ));
    }
    Ok(())
}

fn is_number(n: &str) -> bool {
    let d = n.strip_prefix('+').unwrap_or(n);
    !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())
}

fn send_sms(s: &mut State, params: &BTreeMap<String, String>) -> Outcome {
    s.send_requests += 1;
    let p = |k: &str| params.get(k).cloned().unwrap_or_default();
    let now = |r: Response| Outcome::Now(r);
    let numbers = p("PhoneNumbers");
    if numbers.is_empty() || !numbers.split(',').all(is_number) {
        return now(answer(200, "isv.MOBILE_NUMBER_ILLEGAL", "非法手机号"));
    }
    if !s.signs.contains(&p("SignName")) {
        return now(answer(
            200,
            "isv.SMS_SIGNATURE_ILLEGAL",
            "该账号下找不到对应签名",
        ));
    }
    let Some(vars) = s.templates.get(&p("TemplateCode")).cloned() else {
        return now(answer(
            200,
            "isv.SMS_TEMPLATE_ILLEGAL",
            "该账号下找不到对应模板",
        ));
    };
    let param = match params.get("TemplateParam") {
        None => None,
        Some(t) => match serde_json::from_str::<Value>(t) {
            Ok(Value::Object(m)) if m.values().all(Value::is_string) => Some(Value::Object(m)),
            _ => {
                return now(answer(
                    200,
                    "isv.INVALID_JSON_PARAM",
                    "JSON参数不合法，只接受字符串值",
                ))
            }
        },
    };
    if vars
        .iter()
        .any(|v| param.as_ref().and_then(|p| p.get(v)).is_none())
    {
        return now(answer(
            200,
            "isv.TEMPLATE_MISSING_PARAMETERS",
            "模板缺少变量",
        ));
    }
    if params
        .get("OutId")
        .is_some_and(|o| o.chars().count() >= 256)
    {
        return now(answer(200, "isv.INVALID_PARAMETERS", "OutId is too long"));
    }
    let reply = s.script.pop_front();
    if let Some(Reply::Code(code, message)) = reply {
        return now(answer(200, code, message));
    }
    if let Some(Reply::HangBeforeRecord) = reply {
        return Outcome::Hang;
    }
    let biz_id = format!("{}^{}", 900000 + s.sent.len(), s.sent.len());
    s.sent.push(Sent {
        phone_numbers: numbers,
        sign_name: p("SignName"),
        template_code: p("TemplateCode"),
        template_param: param,
        out_id: params.get("OutId").cloned(),
        biz_id: biz_id.clone(),
        date: china_date(chrono::Utc::now()),
    });
    if let Some(Reply::AcceptThenHang) = reply {
        return Outcome::Hang;
    }
    now((
        StatusCode::OK,
        json!({"Code": "OK", "Message": "OK", "BizId": biz_id, "RequestId": uuid::Uuid::new_v4().to_string()})
            .to_string(),
    )
        .into_response())
}

fn query(s: &State, params: &BTreeMap<String, String>) -> Response {
    let p = |k: &str| params.get(k).cloned().unwrap_or_default();
    let phone = p("PhoneNumber");
    let date = p("SendDate");
    if phone.is_empty() || !is_number(&phone) {
        return answer(200, "isv.MOBILE_NUMBER_ILLEGAL", "PhoneNumber");
    }
    if date.len() != 8 || chrono::NaiveDate::parse_from_str(&date, "%Y%m%d").is_err() {
        return answer(200, "isv.INVALID_PARAMETERS", "SendDate must be yyyyMMdd");
    }
    let size: usize = match p("PageSize").parse() {
        Ok(n) if (1..=50).contains(&n) => n,
        _ => return answer(200, "isv.INVALID_PARAMETERS", "PageSize must be 1-50"),
    };
    let page: usize = match p("CurrentPage").parse() {
        Ok(n) if n >= 1 => n,
        _ => return answer(200, "isv.INVALID_PARAMETERS", "CurrentPage"),
    };
    let all: Vec<&Sent> = s
        .sent
        .iter()
        .filter(|r| r.date == date && r.phone_numbers.split(',').any(|n| n == phone))
        .filter(|r| params.get("BizId").map_or(true, |b| *b == r.biz_id))
        .collect();
    let dtos: Vec<Value> = all
        .iter()
        .skip((page - 1) * size)
        .take(size)
        .map(|r| {
            json!({
                "PhoneNum": phone, "SendStatus": 3, "ErrCode": "DELIVERED",
                "TemplateCode": r.template_code, "Content": "【Shop】…",
                "SendDate": format!("{}-{}-{} 08:00:00", &r.date[..4], &r.date[4..6], &r.date[6..]),
                "ReceiveDate": "", "OutId": r.out_id.clone().unwrap_or_default(),
            })
        })
        .collect();
    (
        StatusCode::OK,
        json!({
            "Code": "OK", "Message": "OK", "RequestId": uuid::Uuid::new_v4().to_string(),
            "TotalCount": all.len(),
            "SmsSendDetailDTOs": {"SmsSendDetailDTO": dtos}
        })
        .to_string(),
    )
        .into_response()
}
