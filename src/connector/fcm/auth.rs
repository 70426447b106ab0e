//! The OAuth2 service-account JWT grant (RFC 7523) that gives the FCM connector its access
//! tokens: the key file, the signed assertion, and the token endpoint call. Errors are delivery
//! errors: `token-fetch` (retry) for transport failures and 408/429/5xx, `token-denied`
//! (permanent) for any other refusal, since an operator must fix the key or the account.

use crate::connector::codes;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{FcmConfig, MAX_RESPONSE_BYTES};
use crate::connector::provider::{parse_retry_after, read_limited, retryable_status, truncate};
use crate::connector::redact;
use crate::connector::token::{Token, TokenSource};
use crate::connector::DeliveryError;
use crate::settings::Secret;

const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// The fields of a service-account key file we use (Google's file has more; they are ignored).
#[derive(Debug, Deserialize)]
pub(super) struct ServiceAccountKey {
    #[serde(rename = "type")]
    pub(super) kind: Option<String>,
    pub(super) project_id: Option<String>,
    pub(super) private_key_id: Option<String>,
    pub(super) private_key: Secret,
    pub(super) client_email: String,
    pub(super) token_uri: Option<String>,
}

/// Reads and parses the key; checks the private key can sign.
pub(super) fn load_key(
    cfg: &FcmConfig,
) -> Result<(ServiceAccountKey, jsonwebtoken::EncodingKey), String> {
    let text = cfg.key_source().resolve("service_account")?.ok_or(
        "no service-account key: set service_account_file, service_account_env or service_account",
    )?;
    // serde_json's message gives line and column only, never the key's text.
    let key: ServiceAccountKey = serde_json::from_str(text.expose())
        .map_err(|e| format!("the service-account key is not valid key JSON: {e}"))?;
    if let Some(kind) = key.kind.as_deref().filter(|k| *k != "service_account") {
        return Err(format!(
            "the key is of type \"{kind}\", FCM needs a \"service_account\" key"
        ));
    }
    if key.client_email.trim().is_empty() {
        return Err("the service-account key has an empty client_email".into());
    }
    let signing = jsonwebtoken::EncodingKey::from_rsa_pem(key.private_key.expose().as_bytes())
        .map_err(|e| format!("private_key is not an RSA key in PEM: {e}"))?;
    // The PEM parser does not parse the RSA key itself: sign once so a broken key shows up in
    // check-config, not at the first send.
    sign_assertion(&key, &signing, "https://check.invalid/token")
        .map_err(|e| format!("private_key cannot sign: {e}"))?;
    Ok((key, signing))
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

/// The signed JWT of the service-account grant (RFC 7523; Google's header carries the key id).
fn sign_assertion(
    key: &ServiceAccountKey,
    signing: &jsonwebtoken::EncodingKey,
    token_uri: &str,
) -> Result<String, jsonwebtoken::errors::Error> {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = key.private_key_id.clone();
    let iat = chrono::Utc::now().timestamp().max(0) as u64;
    let claims = Claims {
        iss: &key.client_email,
        scope: SCOPE,
        aud: token_uri,
        iat,
        // Google's ceiling is one hour.
        exp: iat + 3600,
    };
    jsonwebtoken::encode(&header, &claims, signing)
}

/// Fetches access tokens with the JWT grant.
// Not yup-oauth2 (evaluated, v12): its JWT header has no `kid`, it keeps a cache of its own that
// ours would have to bypass, and it debug-logs the assertion and the token response via `log`.
pub(super) struct JwtGrant {
    pub(super) client: reqwest::Client,
    pub(super) key: ServiceAccountKey,
    pub(super) signing: jsonwebtoken::EncodingKey,
    pub(super) token_uri: String,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: Option<u64>,
}

#[async_trait]
impl TokenSource for JwtGrant {
    async fn fetch(&self) -> Result<Token, DeliveryError> {
        let assertion = sign_assertion(&self.key, &self.signing, &self.token_uri).map_err(|e| {
            DeliveryError::permanent(codes::BAD_CREDENTIALS.code, format!("cannot sign: {e}"))
        })?;
        let resp = self
            .client
            .post(&self.token_uri)
            .form(&[
                ("grant_type", GRANT_TYPE),
                ("assertion", assertion.as_str()),
            ])
            .send()
            .await
            .map_err(|e| token_transport(&e))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = read_limited(resp, MAX_RESPONSE_BYTES)
            .await
            .map_err(|e| token_transport(&e))?;
        let text = String::from_utf8_lossy(&bytes);
        if status.is_success() {
            let t: TokenResponse = serde_json::from_str(&text).map_err(|e| {
                DeliveryError::retry(
                    codes::TOKEN_FETCH.code,
                    format!("the token endpoint answered {status} without an access_token: {e}"),
                )
            })?;
            return Ok(Token {
                value: Secret::new(t.access_token),
                expires_in: Duration::from_secs(t.expires_in.unwrap_or(3600)),
            });
        }
        // RFC 6749 §5.2: {"error": "...", "error_description": "..."}.
        let why = serde_json::from_str::<Value>(&text)
            .ok()
            .map(|v| {
                let field = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                format!("{} {}", field("error"), field("error_description"))
            })
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| truncate(&text, 256).to_string());
        let reason = format!("the token endpoint answered {status}: {}", why.trim());
        if retryable_status(status) {
            Err(DeliveryError::retry(codes::TOKEN_FETCH.code, reason)
                .with_retry_after(parse_retry_after(&headers))
                .with_status(status.as_u16()))
        } else {
            // A deleted key, a disabled account, a wrong token_uri: an operator must act.
            Err(DeliveryError::permanent(codes::TOKEN_DENIED.code, reason)
                .with_status(status.as_u16()))
        }
    }
}

fn token_transport(e: &reqwest::Error) -> DeliveryError {
    let inner = redact::send_error(e);
    if !inner.is_retry() {
        // A token endpoint that redirects elsewhere: an operator must fix token_uri.
        return inner;
    }
    DeliveryError::retry(
        codes::TOKEN_FETCH.code,
        format!("token endpoint: {}: {}", inner.code(), inner.reason()),
    )
}
