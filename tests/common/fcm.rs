//! In-process doubles of Google's OAuth2 token endpoint and FCM HTTP v1, on 127.0.0.1:0, that
//! check what they receive the way the real services do (shared/providers.md §2.7):
//!
//! - `POST /token`: a form with `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer` and an
//!   `assertion` whose RS256 signature is verified against the test key's public half, header
//!   `kid` = the key id, claims `iss` = client_email, `scope` ∋ firebase.messaging, `aud` =
//!   token_uri, `exp` ≤ `iat` + 3600. Issues random opaque tokens.
//! - `POST /v1/projects/{id}/messages:send`: the bearer must be an issued, unrevoked token (else
//!   401 UNAUTHENTICATED without FcmError, as Google answers); the body must have exactly one
//!   target and string data values (else 400 INVALID_ARGUMENT); then answers per a script, by
//!   default success with a `name`.
//!
//! The RSA key is generated once per test binary (2048 bits: ring refuses smaller keys).

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// The test service account's key pair, as PEM.
pub struct TestKey {
    pub private_pem: String,
    pub public_pem: String,
}

fn generate() -> TestKey {
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    let key = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).expect("RSA key");
    TestKey {
        private_pem: key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string(),
        public_pem: key
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap(),
    }
}

/// The service account's key: the token endpoint knows its public half.
pub fn test_key() -> &'static TestKey {
    static KEY: OnceLock<TestKey> = OnceLock::new();
    KEY.get_or_init(generate)
}

/// Another key, unknown to the token endpoint.
pub fn impostor_key() -> &'static TestKey {
    static KEY: OnceLock<TestKey> = OnceLock::new();
    KEY.get_or_init(generate)
}

/// How the send endpoint answers a well-formed, authorised request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// 200 `{"name": "projects/<id>/messages/<n>"}`.
    Ok,
    /// An FCM error: HTTP status, `error.status`, optional `details[].errorCode`, optional
    /// `Retry-After` seconds.
    Error {
        http: u16,
        status: &'static str,
        error_code: Option<&'static str>,
        retry_after: Option<u64>,
    },
}

/// One request the send endpoint got.
#[derive(Debug, Clone)]
pub struct Sent {
    pub at: Instant,
    pub bearer: String,
    pub body: Value,
    /// The HTTP status it was answered with.
    pub answered: u16,
}

struct St {
    project_id: String,
    client_email: String,
    key_id: String,
    token_uri: String,
    decoding: jsonwebtoken::DecodingKey,
    /// Issued tokens → still valid.
    tokens: Mutex<HashMap<String, bool>>,
    token_requests: AtomicUsize,
    token_rejections: Mutex<Vec<String>>,
    token_delay: Mutex<Duration>,
    reject_every_token: AtomicBool,
    script: Mutex<VecDeque<Reply>>,
    sent: Mutex<Vec<Sent>>,
    next_id: AtomicUsize,
}

/// Both doubles on one local server.
pub struct FcmDouble {
    /// FCM base URL (the profile's `endpoint`).
    pub url: String,
    pub token_uri: String,
    pub project_id: String,
    pub client_email: String,
    pub key_id: String,
    st: Arc<St>,
    _shutdown: Arc<tokio::sync::oneshot::Sender<()>>,
}

impl FcmDouble {
    pub async fn start() -> FcmDouble {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let token_uri = format!("{url}/token");
        // A unique account per double: token caches are shared per account across the process.
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let st = Arc::new(St {
            project_id: format!("proj-{}", &tag[..8]),
            client_email: format!("outboxd-{tag}@proj.iam.gserviceaccount.com"),
            key_id: format!("kid-{tag}"),
            token_uri: token_uri.clone(),
            decoding: jsonwebtoken::DecodingKey::from_rsa_pem(test_key().public_pem.as_bytes())
                .unwrap(),
            tokens: Default::default(),
            token_requests: Default::default(),
            token_rejections: Default::default(),
            token_delay: Mutex::new(Duration::ZERO),
            reject_every_token: Default::default(),
            script: Default::default(),
            sent: Default::default(),
            next_id: Default::default(),
        });
        let app = axum::Router::new()
            .route("/token", axum::routing::post(token))
            .fallback(send)
            .with_state(st.clone());
        let tx = crate::common::serve_on(listener, app);
        FcmDouble {
            url,
            token_uri,
            project_id: st.project_id.clone(),
            client_email: st.client_email.clone(),
            key_id: st.key_id.clone(),
            st,
            _shutdown: tx,
        }
    }

    /// The service-account key file's JSON, as Firebase hands it out, with `token_uri` here.
    pub fn service_account_json(&self) -> String {
        self.service_account_json_with(&test_key().private_pem)
    }

    /// The same file with another private key in it.
    pub fn service_account_json_with(&self, private_pem: &str) -> String {
        json!({
            "type": "service_account",
            "project_id": self.project_id,
            "private_key_id": self.key_id,
            "private_key": private_pem,
            "client_email": self.client_email,
            "client_id": "1234567890",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": "https://www.googleapis.com/robot/v1/metadata/x509/x",
            "universe_domain": "googleapis.com"
        })
        .to_string()
    }

    /// Writes the key file into `dir`.
    pub fn write_key(&self, dir: &Path) -> PathBuf {
        let p = dir.join("service-account.json");
        std::fs::write(&p, self.service_account_json()).unwrap();
        p
    }

    /// Answers of the next sends, in order; afterwards `Reply::Ok`.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.st.script.lock().unwrap().extend(replies);
    }

    /// Every token issued so far stops being accepted (as when it expires or is revoked).
    pub fn revoke_tokens(&self) {
        for valid in self.st.tokens.lock().unwrap().values_mut() {
            *valid = false;
        }
    }

    /// From now on no token is accepted, not even a fresh one.
    pub fn reject_every_token(&self) {
        self.st.reject_every_token.store(true, Ordering::SeqCst);
    }

    /// The token endpoint waits this long before answering.
    pub fn set_token_delay(&self, d: Duration) {
        *self.st.token_delay.lock().unwrap() = d;
    }

    pub fn token_requests(&self) -> usize {
        self.st.token_requests.load(Ordering::SeqCst)
    }

    /// Why token requests were refused (empty when every assertion was valid).
    pub fn token_rejections(&self) -> Vec<String> {
        self.st.token_rejections.lock().unwrap().clone()
    }

    pub fn sent(&self) -> Vec<Sent> {
        self.st.sent.lock().unwrap().clone()
    }
}

fn form_field(body: &str, name: &str) -> Option<String> {
    url::form_urlencoded::parse(body.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// Checks a token request as Google does; `Err` says why it is refused.
fn check_grant(st: &St, headers: &HeaderMap, body: &str) -> Result<(), String> {
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("application/x-www-form-urlencoded") {
        return Err(format!("content-type {ct:?}"));
    }
    if form_field(body, "grant_type").as_deref() != Some(GRANT_TYPE) {
        return Err("grant_type".into());
    }
    let assertion = form_field(body, "assertion").ok_or("no assertion")?;
    let header = jsonwebtoken::decode_header(&assertion).map_err(|e| format!("header: {e}"))?;
    if header.alg != jsonwebtoken::Algorithm::RS256 {
        return Err(format!("alg {:?}", header.alg));
    }
    if header.kid.as_deref() != Some(st.key_id.as_str()) {
        return Err(format!("kid {:?}", header.kid));
    }
    if header.typ.as_deref() != Some("JWT") {
        return Err(format!("typ {:?}", header.typ));
    }
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    v.set_audience(&[&st.token_uri]);
    v.set_issuer(&[&st.client_email]);
    v.set_required_spec_claims(&["exp", "iat", "aud", "iss"]);
    let claims = jsonwebtoken::decode::<Value>(&assertion, &st.decoding, &v)
        .map_err(|e| format!("signature or claims: {e}"))?
        .claims;
    let scope = claims["scope"].as_str().unwrap_or("");
    if !scope.split(' ').any(|s| s == SCOPE) {
        return Err(format!("scope {scope:?}"));
    }
    let (iat, exp) = (
        claims["iat"].as_i64().ok_or("iat")?,
        claims["exp"].as_i64().ok_or("exp")?,
    );
    let now = chrono::Utc::now().timestamp();
    if (iat - now).abs() > 300 {
        return Err(format!("iat {iat} is {}s from now", iat - now));
    }
    if exp <= iat || exp > iat + 3600 {
        return Err(format!("exp - iat = {}", exp - iat));
    }
    Ok(())
}

async fn token(State(st): State<Arc<St>>, headers: HeaderMap, body: String) -> Response {
    st.token_requests.fetch_add(1, Ordering::SeqCst);
    let delay = *st.token_delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match check_grant(&st, &headers, &body) {
        Ok(()) => {
            let t = format!("ya29.test-{}", uuid::Uuid::new_v4().simple());
            st.tokens.lock().unwrap().insert(t.clone(), true);
            axum::Json(json!({"access_token": t, "expires_in": 3599, "token_type": "Bearer"}))
                .into_response()
        }
        Err(why) => {
            st.token_rejections.lock().unwrap().push(why.clone());
            (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({"error": "invalid_grant", "error_description": why})),
            )
                .into_response()
        }
    }
}

fn fcm_error(
    http: u16,
    status: &str,
    error_code: Option<&str>,
    message: &str,
    retry_after: Option<u64>,
) -> Response {
    let mut error = json!({"code": http, "message": message, "status": status});
    if let Some(c) = error_code {
        error["details"] = json!([{
            "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
            "errorCode": c
        }]);
    }
    let mut r = (
        StatusCode::from_u16(http).unwrap(),
        axum::Json(json!({ "error": error })),
    )
        .into_response();
    if let Some(s) = retry_after {
        r.headers_mut()
            .insert("retry-after", s.to_string().parse().unwrap());
    }
    r
}

/// What FCM would say about the body, if it is invalid.
fn check_body(body: &Value) -> Result<(), String> {
    let m = body["message"].as_object().ok_or("no message")?;
    let targets = ["token", "topic", "condition"]
        .iter()
        .filter(|t| m.get(**t).and_then(Value::as_str).is_some())
        .count();
    if targets != 1 {
        return Err(format!("{targets} targets"));
    }
    if let Some(data) = m.get("data") {
        for (i, (_, v)) in data.as_object().ok_or("data")?.iter().enumerate() {
            if !v.is_string() {
                return Err(format!(
                    "Invalid value at 'message.data[{i}].value' (TYPE_STRING)"
                ));
            }
        }
    }
    Ok(())
}

async fn send(State(st): State<Arc<St>>, uri: Uri, headers: HeaderMap, body: String) -> Response {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_string();
    let parsed: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let response = answer(&st, &uri, &bearer, &parsed);
    st.sent.lock().unwrap().push(Sent {
        at: Instant::now(),
        bearer,
        body: parsed,
        answered: response.status().as_u16(),
    });
    response
}

fn answer(st: &St, uri: &Uri, bearer: &str, body: &Value) -> Response {
    let project = uri
        .path()
        .strip_prefix("/v1/projects/")
        .and_then(|p| p.strip_suffix("/messages:send"));
    if project != Some(st.project_id.as_str()) {
        return fcm_error(
            404,
            "NOT_FOUND",
            None,
            "Requested entity was not found.",
            None,
        );
    }
    let valid = st.tokens.lock().unwrap().get(bearer).copied() == Some(true);
    if !valid || st.reject_every_token.load(Ordering::SeqCst) {
        return fcm_error(
            401,
            "UNAUTHENTICATED",
            None,
            "Request had invalid authentication credentials. Expected OAuth 2 access token, \
             login cookie or other valid authentication credential.",
            None,
        );
    }
    if let Err(why) = check_body(body) {
        return fcm_error(
            400,
            "INVALID_ARGUMENT",
            Some("INVALID_ARGUMENT"),
            &why,
            None,
        );
    }
    match st.script.lock().unwrap().pop_front().unwrap_or(Reply::Ok) {
        Reply::Ok => {
            let n = st.next_id.fetch_add(1, Ordering::SeqCst);
            let name = if body["validate_only"] == true {
                format!("projects/{}/messages/fake_message_id", st.project_id)
            } else {
                format!("projects/{}/messages/0:{n}%31bd1c9631bd1c96", st.project_id)
            };
            axum::Json(json!({ "name": name })).into_response()
        }
        Reply::Error {
            http,
            status,
            error_code,
            retry_after,
        } => fcm_error(http, status, error_code, "scripted error", retry_after),
    }
}
