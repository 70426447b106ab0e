//! Doubles for protected generic APIs, on 127.0.0.1:0: an OAuth2 token endpoint (RFC 6749 §4.4
//! client credentials) that issues tokens it can revoke, and an API that checks what a real one
//! would — the bearer token against the token endpoint's live tokens, the Standard Webhooks
//! signature recomputed from the raw body — and can answer with retries, redirects or huge bodies.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use futures::StreamExt as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{serve, Received};

/// How the token endpoint answers a request whose credentials are right.
#[derive(Debug, Clone)]
pub enum TokenMode {
    Issue,
    /// This status with a non-OAuth body (an outage).
    Fail(u16),
}

/// What the token endpoint saw in one request.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    /// `basic` or `form`.
    pub client_auth: String,
    pub form: BTreeMap<String, String>,
}

#[derive(Default)]
struct TokenState {
    client_id: String,
    client_secret: String,
    scope: Option<String>,
    audience: Option<String>,
    mode: Option<TokenMode>,
    delay: Duration,
    expires_in: u64,
    issued: u64,
    live: HashSet<String>,
    requests: Vec<TokenRequest>,
}

/// An OAuth2 token endpoint at `<url>/oauth/token`.
#[derive(Clone)]
pub struct TokenServer {
    pub url: String,
    state: Arc<Mutex<TokenState>>,
    _shutdown: Arc<tokio::sync::oneshot::Sender<()>>,
}

impl TokenServer {
    /// Issues tokens to `client_id`/`client_secret` when the request asks for exactly `scope`
    /// (space-separated, any order) and `audience`.
    pub async fn start(
        client_id: &str,
        client_secret: &str,
        scope: Option<&str>,
        audience: Option<&str>,
    ) -> TokenServer {
        let state = Arc::new(Mutex::new(TokenState {
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            scope: scope.map(Into::into),
            audience: audience.map(Into::into),
            mode: Some(TokenMode::Issue),
            expires_in: 3600,
            ..Default::default()
        }));
        let app = axum::Router::new()
            .route("/oauth/token", axum::routing::post(token))
            .with_state(state.clone());
        let (url, tx) = serve(app).await;
        TokenServer {
            url,
            state,
            _shutdown: tx,
        }
    }

    pub fn token_url(&self) -> String {
        format!("{}/oauth/token", self.url)
    }

    pub fn set_mode(&self, m: TokenMode) {
        self.state.lock().unwrap().mode = Some(m);
    }

    /// Each token request waits this long before it is answered.
    pub fn set_delay(&self, d: Duration) {
        self.state.lock().unwrap().delay = d;
    }

    /// From now on only `secret` authenticates the client (a rotated secret).
    pub fn set_client_secret(&self, secret: &str) {
        self.state.lock().unwrap().client_secret = secret.into();
    }

    /// The `expires_in` of the tokens issued from now on (default 3600).
    pub fn set_expires_in(&self, secs: u64) {
        self.state.lock().unwrap().expires_in = secs;
    }

    /// Revokes every token issued so far (the API answers 401 to them from now on).
    pub fn revoke_all(&self) {
        self.state.lock().unwrap().live.clear();
    }

    pub fn is_live(&self, token: &str) -> bool {
        self.state.lock().unwrap().live.contains(token)
    }

    /// Requests that reached the endpoint (including refused ones).
    pub fn hits(&self) -> usize {
        self.state.lock().unwrap().requests.len()
    }

    pub fn requests(&self) -> Vec<TokenRequest> {
        self.state.lock().unwrap().requests.clone()
    }
}

fn oauth_error(status: StatusCode, code: &str) -> Response {
    (
        status,
        [("cache-control", "no-store")],
        axum::Json(serde_json::json!({ "error": code, "error_description": format!("test double: {code}") })),
    )
        .into_response()
}

/// `application/x-www-form-urlencoded` decoding, as RFC 6749 §2.3.1 uses inside Basic too.
fn form_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

async fn token(
    State(state): State<Arc<Mutex<TokenState>>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let form: BTreeMap<String, String> = url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let basic = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| B64.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| {
            s.split_once(':')
                .map(|(i, p)| (form_decode(i), form_decode(p)))
        });
    let (client_auth, creds) = match basic {
        Some(c) => ("basic", Some(c)),
        None => (
            "form",
            form.get("client_id")
                .zip(form.get("client_secret"))
                .map(|(i, s)| (i.clone(), s.clone())),
        ),
    };
    let delay = {
        let mut st = state.lock().unwrap();
        st.requests.push(TokenRequest {
            client_auth: client_auth.into(),
            form: form.clone(),
        });
        st.delay
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut st = state.lock().unwrap();
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type");
    }
    if creds != Some((st.client_id.clone(), st.client_secret.clone())) {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client");
    }
    let words = |s: Option<&String>| -> Vec<String> {
        let mut v: Vec<String> = s
            .map(|s| s.split(' ').map(Into::into).collect())
            .unwrap_or_default();
        v.sort();
        v
    };
    if words(form.get("scope")) != words(st.scope.as_ref()) {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_scope");
    }
    if form.get("audience") != st.audience.as_ref() {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
    }
    match st.mode.clone().unwrap_or(TokenMode::Issue) {
        TokenMode::Fail(s) => {
            (StatusCode::from_u16(s).unwrap(), "upstream unavailable").into_response()
        }
        TokenMode::Issue => {
            st.issued += 1;
            let t = format!("tok-{}-{}", st.issued, uuid::Uuid::new_v4().simple());
            st.live.insert(t.clone());
            (
                [("cache-control", "no-store")],
                axum::Json(serde_json::json!({
                    "access_token": t,
                    "token_type": "Bearer",
                    "expires_in": st.expires_in,
                })),
            )
                .into_response()
        }
    }
}

/// How the API answers a request that passed its checks.
#[derive(Debug, Clone)]
pub enum Answer {
    /// 200 `{"id":"<n>"}`.
    Ok,
    /// This status with a body of `bytes` bytes of `x`.
    Big { status: u16, bytes: usize },
    /// 200 with a body that does not end (bounded at a few GB, so the double stops by itself).
    Endless,
    /// 200 with NUL bytes in the body.
    Nul,
    /// 307 to `to` for requests to the path `from`; 200 to the others.
    Redirect { from: String, to: String },
}

/// One request the API got, and what it made of it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub req: Received,
    pub status: u16,
    /// The signature checked out (None: the API checks no signatures).
    pub signature_ok: Option<bool>,
}

struct ApiState {
    tokens: Option<TokenServer>,
    signing_key: Option<Vec<u8>>,
    fail_next: usize,
    answer: Answer,
    seen: Vec<Seen>,
}

/// A generic API that checks bearer tokens and/or Standard Webhooks signatures.
#[derive(Clone)]
pub struct Api {
    pub url: String,
    state: Arc<Mutex<ApiState>>,
    _shutdown: Arc<tokio::sync::oneshot::Sender<()>>,
}

impl Api {
    /// `tokens`: accept only `Bearer <live token>`; `signing_secret`: the `whsec_` secret whose
    /// signature every request must carry.
    pub async fn start(tokens: Option<&TokenServer>, signing_secret: Option<&str>) -> Api {
        let state = Arc::new(Mutex::new(ApiState {
            tokens: tokens.cloned(),
            signing_key: signing_secret
                .map(|s| B64.decode(s.trim_start_matches("whsec_")).unwrap()),
            fail_next: 0,
            answer: Answer::Ok,
            seen: Vec::new(),
        }));
        let app = axum::Router::new().fallback(api).with_state(state.clone());
        let (url, tx) = serve(app).await;
        Api {
            url,
            state,
            _shutdown: tx,
        }
    }

    /// From now on only signatures made with `secret` (`whsec_…`) check out (a rotated secret).
    pub fn set_signing_secret(&self, secret: &str) {
        self.state.lock().unwrap().signing_key =
            Some(B64.decode(secret.trim_start_matches("whsec_")).unwrap());
    }

    pub fn set_answer(&self, a: Answer) {
        self.state.lock().unwrap().answer = a;
    }

    /// The next `n` requests that pass the checks get 503.
    pub fn fail_next(&self, n: usize) {
        self.state.lock().unwrap().fail_next = n;
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    pub fn count(&self) -> usize {
        self.state.lock().unwrap().seen.len()
    }

    pub fn port(&self) -> u16 {
        self.url.rsplit(':').next().unwrap().parse().unwrap()
    }
}

/// Standard Webhooks verification, as a receiver does it: timestamp within 5 minutes, any of the
/// space-separated `v1,` signatures matching HMAC-SHA256(key, id.ts.body), compared in constant
/// time.
fn verify(key: &[u8], headers: &HeaderMap, body: &str) -> bool {
    let get = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let (Some(id), Some(ts), Some(sigs)) = (
        get("webhook-id"),
        get("webhook-timestamp"),
        get("webhook-signature"),
    ) else {
        return false;
    };
    let Ok(t) = ts.parse::<i64>() else {
        return false;
    };
    if (chrono::Utc::now().timestamp() - t).abs() > 300 {
        return false;
    }
    sigs.split(' ').any(|s| {
        let Some(b64) = s.strip_prefix("v1,") else {
            return false;
        };
        let Ok(sig) = B64.decode(b64) else {
            return false;
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
        mac.update(format!("{id}.{ts}.{body}").as_bytes());
        mac.verify_slice(&sig).is_ok()
    })
}

async fn api(
    State(state): State<Arc<Mutex<ApiState>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: String,
) -> Response {
    let req = Received {
        method: method.to_string(),
        path: uri.path().to_string(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect(),
        body: body.clone(),
    };
    let mut st = state.lock().unwrap();
    let token_ok = match &st.tokens {
        None => true,
        Some(ts) => headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| ts.is_live(t)),
    };
    let signature_ok = st.signing_key.as_ref().map(|k| verify(k, &headers, &body));
    let (status, resp) = if !token_ok {
        (
            401,
            (
                StatusCode::UNAUTHORIZED,
                [("www-authenticate", "Bearer error=\"invalid_token\"")],
                "{\"error\":\"invalid_token\"}",
            )
                .into_response(),
        )
    } else if signature_ok == Some(false) {
        (
            400,
            (StatusCode::BAD_REQUEST, "{\"error\":\"bad signature\"}").into_response(),
        )
    } else if st.fail_next > 0 {
        st.fail_next -= 1;
        (
            503,
            (StatusCode::SERVICE_UNAVAILABLE, "{\"error\":\"busy\"}").into_response(),
        )
    } else {
        match st.answer.clone() {
            Answer::Ok => (
                200,
                (
                    StatusCode::OK,
                    format!("{{\"id\":\"{}\"}}", st.seen.len() + 1),
                )
                    .into_response(),
            ),
            Answer::Big { status, bytes } => (
                status,
                (StatusCode::from_u16(status).unwrap(), vec![b'x'; bytes]).into_response(),
            ),
            Answer::Endless => {
                let chunk = Bytes::from(vec![b'y'; 64 * 1024]);
                let stream = futures::stream::repeat(chunk)
                    .take(100_000)
                    .map(Ok::<_, std::io::Error>);
                (
                    200,
                    (StatusCode::OK, Body::from_stream(stream)).into_response(),
                )
            }
            Answer::Nul => (200, (StatusCode::OK, "a\0b").into_response()),
            Answer::Redirect { from, to } if from == uri.path() => (
                307,
                (StatusCode::TEMPORARY_REDIRECT, [("location", to)], "").into_response(),
            ),
            Answer::Redirect { .. } => (200, (StatusCode::OK, "{}").into_response()),
        }
    };
    st.seen.push(Seen {
        req,
        status,
        signature_ok,
    });
    resp
}

/// Asks the daemon to reload its profiles (as SIGHUP does) and waits until the reload is in: the
/// new files add the http profile `probe`, and messages to it fail with `unknown-profile` until
/// the daemon knows it.
pub async fn reload_until_profile(
    controls: &outboxd::Controls,
    c: &tokio_postgres::Client,
    probe: &str,
    timeout: Duration,
) {
    controls.reload.notify_one();
    super::wait_for(
        timeout,
        &format!("the reload that adds profile {probe}"),
        || async {
            let id = super::send(c, "http.agent", probe, "/probe", "{}").await;
            let state = super::wait_for(timeout, "the probe's outcome", || async {
                let s = super::state_of(c, id).await;
                matches!(s.as_str(), "submitted" | "failed").then_some(s)
            })
            .await;
            (state == "submitted").then_some(())
        },
    )
    .await
}

/// A server on 127.0.0.1:0 (another origin than every other double) that answers every request
/// with `307 Location: <to><path and query>`, as a provider that moved would; returns its base URL
/// and the number of requests it answered.
pub async fn redirector(
    to: &str,
) -> (
    String,
    Arc<std::sync::atomic::AtomicUsize>,
    Arc<tokio::sync::oneshot::Sender<()>>,
) {
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (to, h) = (to.to_string(), hits.clone());
    let app = axum::Router::new().fallback(move |uri: Uri| {
        let location = format!(
            "{to}{}",
            uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
        );
        h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move { (StatusCode::TEMPORARY_REDIRECT, [("location", location)], "").into_response() }
    });
    let (url, tx) = serve(app).await;
    (url, hits, tx)
}
