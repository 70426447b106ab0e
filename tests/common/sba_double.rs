//! A fake Sberbank acquiring gateway on 127.0.0.1:0 (providers.md §2.10).
//!
//! - `POST /payment/rest/register.do` (form-encoded): `userName` + `password` (or `token`) must
//!   match the merchant, else errorCode 5; `orderNumber` (1–32 characters), `amount` (1–12 digits)
//!   and `returnUrl` are required (errorCode 4 when missing); `amount` must be digits and
//!   `returnUrl`/`failUrl` absolute http(s) URLs (errorCode 5 otherwise); an `orderNumber` already
//!   registered for the merchant gives errorCode 1. Success: `{"orderId","formUrl"}`. Every error is
//!   HTTP 200 with `errorCode` as a string, as the real gateway answers.
//! - `POST /payment/rest/getOrderStatusExtended.do`: by `orderNumber` or `orderId`; answers the
//!   documented shape with the order id in `attributes[name=mdOrder]`, or errorCode 6 when unknown.
//!
//! - `POST /payment/rest/refund.do` and `reverse.do`: authorised requests succeed
//!   (`{"errorCode":"0"}`), so a call the daemon should never make would go through.
//!
//! Scripted trouble applies to register requests in arrival order; [`SbaDouble::redirect_to`]
//! makes every request answer 307 to another server (a gateway that "moved").

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// A scripted answer to the next register.
#[derive(Debug, Clone)]
pub enum SbaTrouble {
    /// `{"errorCode":"7"}` (system error), nothing registered.
    SystemError,
    /// This HTTP status, nothing registered.
    Status(u16),
    /// The order is registered, but the answer is lost (HTTP 503), as after a crash or a cut
    /// connection.
    LoseResponse,
}

/// One request the double got.
#[derive(Debug, Clone)]
pub struct SbaRequest {
    pub path: String,
    pub content_type: String,
    pub params: BTreeMap<String, String>,
    /// Parameter names in the order they came, duplicates included.
    pub names: Vec<String>,
    pub response: String,
}

#[derive(Debug, Clone)]
pub struct Order {
    pub order_id: String,
    pub amount: u64,
}

#[derive(Default)]
struct State {
    user: String,
    password: String,
    token: String,
    orders: HashMap<String, Order>,
    script: VecDeque<SbaTrouble>,
    requests: Vec<SbaRequest>,
    redirect: Option<String>,
}

#[derive(Clone)]
pub struct SbaDouble {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    state: Arc<Mutex<State>>,
    _shutdown: Arc<tokio::sync::oneshot::Sender<()>>,
}

impl SbaDouble {
    pub async fn start(user: &str, password: &str, token: &str) -> SbaDouble {
        let state = Arc::new(Mutex::new(State {
            user: user.into(),
            password: password.into(),
            token: token.into(),
            ..State::default()
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let base = format!("http://{addr}");
        let st = state.clone();
        let b = base.clone();
        let app = axum::Router::new().fallback(
            move |method: axum::http::Method,
                  uri: axum::http::Uri,
                  headers: HeaderMap,
                  body: String| {
                let st = st.clone();
                let base = b.clone();
                async move {
                    if method != axum::http::Method::POST {
                        return (StatusCode::METHOD_NOT_ALLOWED, "POST only").into_response();
                    }
                    handle(&st, &base, uri.path(), &headers, &body)
                }
            },
        );
        let tx = super::serve_on(listener, app);
        SbaDouble {
            base,
            state,
            _shutdown: tx,
        }
    }

    /// Every request from now on answers `307 Location: <base><path>`.
    pub fn redirect_to(&self, base: &str) {
        self.state.lock().unwrap().redirect = Some(base.into());
    }

    pub fn script(&self, troubles: &[SbaTrouble]) {
        self.state
            .lock()
            .unwrap()
            .script
            .extend(troubles.iter().cloned());
    }

    /// Registers an order directly (as an earlier run of the daemon would have); returns its id.
    pub fn seed(&self, order_number: &str, amount: u64) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        self.state.lock().unwrap().orders.insert(
            order_number.into(),
            Order {
                order_id: id.clone(),
                amount,
            },
        );
        id
    }

    pub fn order(&self, order_number: &str) -> Option<Order> {
        self.state.lock().unwrap().orders.get(order_number).cloned()
    }

    pub fn order_count(&self) -> usize {
        self.state.lock().unwrap().orders.len()
    }

    pub fn requests(&self) -> Vec<SbaRequest> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Requests to paths ending with `method` (`register.do`).
    pub fn calls(&self, method: &str) -> Vec<SbaRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.path.ends_with(method))
            .collect()
    }
}

fn err(code: &str, message: &str) -> (StatusCode, String) {
    (
        StatusCode::OK,
        json!({"errorCode": code, "errorMessage": message}).to_string(),
    )
}

fn absolute(u: &str) -> bool {
    url::Url::parse(u).is_ok_and(|p| matches!(p.scheme(), "http" | "https") && p.has_host())
}

fn handle(
    st: &Arc<Mutex<State>>,
    base: &str,
    path: &str,
    headers: &HeaderMap,
    body: &str,
) -> Response {
    let mut s = st.lock().unwrap();
    if let Some(to) = &s.redirect {
        let location = format!("{to}{path}");
        return (StatusCode::TEMPORARY_REDIRECT, [("location", location)], "").into_response();
    }
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(body.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let params: BTreeMap<String, String> = pairs.iter().cloned().collect();
    let (status, text) = if !content_type.starts_with("application/x-www-form-urlencoded") {
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, "form only".to_string())
    } else if pairs.len() != params.len() {
        err("5", "Параметр передан более одного раза")
    } else {
        match path {
            "/payment/rest/register.do" => register(&mut s, base, &params),
            "/payment/rest/getOrderStatusExtended.do" => status(&s, &params),
            "/payment/rest/refund.do" | "/payment/rest/reverse.do" if authorised(&s, &params) => (
                StatusCode::OK,
                json!({"errorCode": "0", "errorMessage": "Успешно"}).to_string(),
            ),
            _ => (StatusCode::NOT_FOUND, "no such method".into()),
        }
    };
    s.requests.push(SbaRequest {
        path: path.into(),
        content_type,
        params,
        names: pairs.into_iter().map(|(k, _)| k).collect(),
        response: format!("{} {text}", status.as_u16()),
    });
    (status, [("content-type", "application/json")], text).into_response()
}

fn authorised(s: &State, p: &BTreeMap<String, String>) -> bool {
    match (p.get("userName"), p.get("password"), p.get("token")) {
        (Some(u), Some(pw), None) => *u == s.user && *pw == s.password,
        (None, None, Some(t)) => !s.token.is_empty() && *t == s.token,
        _ => false,
    }
}

fn register(s: &mut State, base: &str, p: &BTreeMap<String, String>) -> (StatusCode, String) {
    if !authorised(s, p) {
        return err("5", "Доступ запрещён");
    }
    let (Some(number), Some(amount), Some(return_url)) =
        (p.get("orderNumber"), p.get("amount"), p.get("returnUrl"))
    else {
        return err("4", "Не указан обязательный параметр");
    };
    if number.is_empty() || number.chars().count() > 32 {
        return err("5", "Неверный номер заказа");
    }
    if amount.is_empty() || amount.len() > 12 || !amount.bytes().all(|b| b.is_ascii_digit()) {
        return err("5", "Неверная сумма");
    }
    if !absolute(return_url) || p.get("failUrl").is_some_and(|u| !absolute(u)) {
        return err("5", "Неверный URL");
    }
    let trouble = s.script.pop_front();
    match trouble {
        Some(SbaTrouble::SystemError) => return err("7", "Системная ошибка"),
        Some(SbaTrouble::Status(n)) => {
            return (StatusCode::from_u16(n).unwrap(), "unavailable".into())
        }
        _ => {}
    }
    if s.orders.contains_key(number) {
        return err("1", "Заказ с таким номером уже обработан");
    }
    let order_id = uuid::Uuid::new_v4().to_string();
    s.orders.insert(
        number.clone(),
        Order {
            order_id: order_id.clone(),
            amount: amount.parse().unwrap(),
        },
    );
    if let Some(SbaTrouble::LoseResponse) = trouble {
        return (StatusCode::SERVICE_UNAVAILABLE, "connection lost".into());
    }
    (
        StatusCode::OK,
        json!({
            "orderId": order_id,
            "formUrl": format!("{base}/payment/merchants/test/payment_ru.html?mdOrder={order_id}"),
        })
        .to_string(),
    )
}

fn status(s: &State, p: &BTreeMap<String, String>) -> (StatusCode, String) {
    if !authorised(s, p) {
        return err("5", "Доступ запрещён");
    }
    let found = match (p.get("orderNumber"), p.get("orderId")) {
        (Some(n), _) => s.orders.get(n).map(|o| (n.clone(), o)),
        (None, Some(id)) => s
            .orders
            .iter()
            .find(|(_, o)| o.order_id == *id)
            .map(|(n, o)| (n.clone(), o)),
        _ => return err("4", "Не указан номер заказа"),
    };
    match found {
        None => err("6", "Заказ не найден"),
        Some((number, o)) => (
            StatusCode::OK,
            json!({
                "errorCode": "0",
                "errorMessage": "Успешно",
                "orderNumber": number,
                "orderStatus": 0,
                "actionCode": -100,
                "actionCodeDescription": "",
                "amount": o.amount,
                "currency": "643",
                "date": 1_700_000_000_000u64,
                "attributes": [{"name": "mdOrder", "value": o.order_id}],
            })
            .to_string(),
        ),
    }
}
