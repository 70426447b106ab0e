//! OAuth2 client-credentials tokens for `http` profiles with an `[<profile>.oauth2]` section
//! (RFC 6749 §4.4), fetched with the `oauth2` crate and cached through the shared
//! [`TokenCache`](crate::connector::token::TokenCache).
//!
//! Invariants: one cache per credential — token URL, client id, client authentication, scopes,
//! audience and a SHA-256 of the client secret (never the secret itself) — shared by every profile
//! that names the same credential, so two profiles that differ only in their secret never share a
//! token, and a rotated secret loaded by a reload gets a cache of its own; tokens are [`Secret`]s and never logged; the token endpoint is
//! called without following redirects (the crate's advice, so a token request cannot be bounced
//! elsewhere) and its answer is read up to [`MAX_TOKEN_RESPONSE`] bytes. Endpoint errors are
//! classified as RFC 6749 §5.2 suggests: `invalid_client`, `unauthorized_client`, `invalid_scope`
//! (and the other standard errors, which are configuration problems too) or any other 4xx are
//! permanent `token-denied`; 5xx, 408, 429, network errors and unreadable answers retry as
//! `token-fetch`.

use crate::connector::codes;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use oauth2::basic::{BasicClient, BasicErrorResponseType};
use oauth2::{
    AsyncHttpClient, AuthType, ClientId, ClientSecret, HttpRequest, HttpResponse,
    RequestTokenError, Scope, TokenResponse, TokenUrl,
};
use serde::Deserialize;

use crate::connector::provider::{classify_transport, read_limited, retryable_status, truncate};
use crate::connector::redact::Redactor;
use crate::connector::token::{self, Token, TokenCache, TokenSource};
use crate::connector::DeliveryError;
use crate::settings::{Dur, Secret, SecretSource};

/// Bytes of a token endpoint answer that are read; a token response is a few KiB at most.
pub const MAX_TOKEN_RESPONSE: usize = 64 * 1024;

/// `[<profile>.oauth2]`: a client-credentials grant whose token goes out as
/// `Authorization: <auth_scheme> <access token>`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Config {
    /// The token endpoint. Required.
    pub token_url: String,
    /// The client id. Required.
    pub client_id: String,
    /// The client secret: inline…
    pub client_secret: Option<Secret>,
    /// …or from this environment variable…
    pub client_secret_env: Option<String>,
    /// …or from this file. One of the three is required.
    pub client_secret_file: Option<PathBuf>,
    /// Scopes requested (`scope`, space-separated on the wire). Default none.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Sent as the extra `audience` parameter (Auth0, Okta…). Default none.
    pub audience: Option<String>,
    /// Refresh at the latest after this long, even if the token says it lives longer. Default 55m.
    pub refresh_every: Option<Dur>,
    /// How the client authenticates: `basic` (HTTP Basic, RFC 6749 §2.3.1's recommendation) or
    /// `form` (`client_id` and `client_secret` in the body). Default `basic`.
    #[serde(default)]
    pub client_auth: ClientAuth,
}

/// How the client id and secret reach the token endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    #[default]
    Basic,
    Form,
}

/// The token cache of a profile's credential, or a message for the config error. The client
/// secret and the credential parts of the token URL are added to `redactor`.
pub fn cache_for(
    cfg: &OAuth2Config,
    timeout: Duration,
    redactor: &mut Redactor,
) -> Result<Arc<TokenCache>, String> {
    let token_url =
        TokenUrl::new(cfg.token_url.clone()).map_err(|e| format!("token_url: invalid URL: {e}"))?;
    if !matches!(token_url.url().scheme(), "http" | "https") {
        return Err("token_url: must be an http or https URL".into());
    }
    if cfg.client_id.is_empty() {
        return Err("client_id: must not be empty".into());
    }
    let secret = SecretSource::of(
        &cfg.client_secret,
        &cfg.client_secret_env,
        &cfg.client_secret_file,
    )
    .resolve("client_secret")?
    .ok_or("one of client_secret, client_secret_env, client_secret_file is required")?;
    redactor.add(secret.expose());
    redactor.add_url(token_url.url(), false);
    let http = crate::connector::provider::http_client_builder(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
    let max_age = cfg
        .refresh_every
        .map_or(Duration::from_secs(55 * 60), |d| d.0);
    // Everything that authenticates, and everything that makes another token (scopes, audience).
    let key = token::credential_key(
        "oauth2",
        &[
            cfg.token_url.as_str(),
            &cfg.client_id,
            match cfg.client_auth {
                ClientAuth::Basic => "basic",
                ClientAuth::Form => "form",
            },
            &cfg.scopes.join(" "),
            cfg.audience.as_deref().unwrap_or(""),
            secret.expose(),
        ],
    );
    let source = OAuth2Source {
        token_url,
        client_id: cfg.client_id.clone(),
        secret,
        scopes: cfg.scopes.clone(),
        audience: cfg.audience.clone(),
        auth: cfg.client_auth,
        http: TokenHttp(http),
        max_age,
    };
    Ok(token::shared(&key, move || {
        TokenCache::new(source).with_max_age(max_age)
    }))
}

/// Fetches client-credentials tokens.
struct OAuth2Source {
    token_url: TokenUrl,
    client_id: String,
    secret: Secret,
    scopes: Vec<String>,
    audience: Option<String>,
    auth: ClientAuth,
    http: TokenHttp,
    max_age: Duration,
}

#[async_trait]
impl TokenSource for OAuth2Source {
    async fn fetch(&self) -> Result<Token, DeliveryError> {
        let client = BasicClient::new(ClientId::new(self.client_id.clone()))
            .set_client_secret(ClientSecret::new(self.secret.expose().to_string()))
            .set_token_uri(self.token_url.clone())
            .set_auth_type(match self.auth {
                ClientAuth::Basic => AuthType::BasicAuth,
                ClientAuth::Form => AuthType::RequestBody,
            });
        let mut req = client
            .exchange_client_credentials()
            .add_scopes(self.scopes.iter().cloned().map(Scope::new));
        if let Some(aud) = &self.audience {
            req = req.add_extra_param("audience", aud.clone());
        }
        let resp = req.request_async(&self.http).await.map_err(classify)?;
        tracing::debug!(token_url = %crate::settings::redact_url(self.token_url.as_str()), client_id = %self.client_id, expires_in = ?resp.expires_in(), "fetched an OAuth2 token");
        Ok(Token {
            value: Secret::new(resp.access_token().secret().clone()),
            // No expires_in (it is only RECOMMENDED, RFC 6749 §5.1): live until refresh_every.
            expires_in: resp
                .expires_in()
                .unwrap_or(self.max_age + Duration::from_secs(60)),
        })
    }
}

/// The token endpoint's HTTP client: reqwest, with the answer read up to a limit and failures
/// that say nothing about the credential (5xx, 408, 429, other 4xx without an OAuth2 error body)
/// turned into errors of their own, so they can be classified by status.
struct TokenHttp(reqwest::Client);

#[derive(Debug, thiserror::Error)]
enum TokenHttpError {
    #[error("{}", .0.reason())]
    Transport(DeliveryError),
    #[error("the token endpoint answered HTTP {status}: {body}")]
    Unavailable { status: u16, body: String },
    #[error("the token endpoint answered HTTP {status}: {body}")]
    Rejected { status: u16, body: String },
    #[error("cannot make the token request: {0}")]
    Build(String),
}

impl<'c> AsyncHttpClient<'c> for TokenHttp {
    type Error = TokenHttpError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, TokenHttpError>> + Send + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(async move {
            let req = reqwest::Request::try_from(request)
                .map_err(|e| TokenHttpError::Build(e.without_url().to_string()))?;
            let resp = self
                .0
                .execute(req)
                .await
                .map_err(|e| TokenHttpError::Transport(classify_transport(&e)))?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let body = read_limited(resp, MAX_TOKEN_RESPONSE)
                .await
                .map_err(|e| TokenHttpError::Transport(classify_transport(&e)))?;
            let text = || truncate(&String::from_utf8_lossy(&body), 256).to_string();
            let code = status.as_u16();
            if retryable_status(status) {
                return Err(TokenHttpError::Unavailable {
                    status: code,
                    body: text(),
                });
            }
            // 501 is as final as a 4xx (the one status classifier says so).
            if (status.is_client_error() && !is_oauth_error(&body)) || status.is_server_error() {
                return Err(TokenHttpError::Rejected {
                    status: code,
                    body: text(),
                });
            }
            let mut out = oauth2::http::Response::builder().status(status);
            for (k, v) in &headers {
                out = out.header(k, v);
            }
            out.body(body)
                .map_err(|e| TokenHttpError::Build(e.to_string()))
        })
    }
}

/// Whether a body is an RFC 6749 §5.2 error response (`{"error": "..."}`).
fn is_oauth_error(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .is_some_and(|v| v.get("error").is_some_and(|e| e.is_string()))
}

type FetchError = RequestTokenError<TokenHttpError, oauth2::basic::BasicErrorResponse>;

fn classify(e: FetchError) -> DeliveryError {
    match e {
        RequestTokenError::ServerResponse(r) => {
            let what = match r.error_description() {
                Some(d) => format!("{}: {}", r.error(), truncate(d, 256)),
                None => r.error().to_string(),
            };
            let reason = format!("the token endpoint refused: {what}");
            match r.error() {
                BasicErrorResponseType::InvalidClient
                | BasicErrorResponseType::UnauthorizedClient
                | BasicErrorResponseType::InvalidScope
                | BasicErrorResponseType::InvalidGrant
                | BasicErrorResponseType::InvalidRequest
                | BasicErrorResponseType::UnsupportedGrantType => {
                    DeliveryError::permanent(codes::TOKEN_DENIED.code, reason)
                }
                // `temporarily_unavailable`, `server_error` and other extensions.
                BasicErrorResponseType::Extension(_) => {
                    DeliveryError::retry(codes::TOKEN_FETCH.code, reason)
                }
            }
        }
        RequestTokenError::Request(TokenHttpError::Rejected { status, body }) => {
            DeliveryError::permanent(
                codes::TOKEN_DENIED.code,
                format!("the token endpoint answered HTTP {status}: {body}"),
            )
            .with_status(status as i32)
        }
        RequestTokenError::Request(TokenHttpError::Unavailable { status, body }) => {
            DeliveryError::retry(
                codes::TOKEN_FETCH.code,
                format!("the token endpoint answered HTTP {status}: {body}"),
            )
            .with_status(status as i32)
        }
        RequestTokenError::Request(TokenHttpError::Transport(e)) => DeliveryError::retry(
            codes::TOKEN_FETCH.code,
            format!("token endpoint: {}", e.reason()),
        ),
        RequestTokenError::Request(e @ TokenHttpError::Build(_)) => {
            DeliveryError::permanent(codes::TOKEN_DENIED.code, e.to_string())
        }
        RequestTokenError::Parse(e, _) => DeliveryError::retry(
            codes::TOKEN_FETCH.code,
            format!("the token endpoint's answer is not a token response: {e}"),
        ),
        RequestTokenError::Other(m) => {
            DeliveryError::retry(codes::TOKEN_FETCH.code, format!("token endpoint: {m}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oauth2::basic::BasicErrorResponse;

    fn server(code: &str) -> FetchError {
        let r: BasicErrorResponse =
            serde_json::from_value(serde_json::json!({ "error": code })).unwrap();
        RequestTokenError::ServerResponse(r)
    }

    #[test]
    fn token_endpoint_errors_are_classified() {
        for c in ["invalid_client", "unauthorized_client", "invalid_scope"] {
            let e = classify(server(c));
            assert!(!e.is_retry(), "{c}");
            assert_eq!(e.code(), "token-denied");
            assert!(e.reason().contains(c));
        }
        let e = classify(server("temporarily_unavailable"));
        assert!(e.is_retry());
        assert_eq!(e.code(), "token-fetch");
        let e = classify(RequestTokenError::Request(TokenHttpError::Unavailable {
            status: 503,
            body: "busy".into(),
        }));
        assert!(e.is_retry());
        assert_eq!((e.code(), e.remote_status()), ("token-fetch", Some(503)));
        let e = classify(RequestTokenError::Request(TokenHttpError::Rejected {
            status: 404,
            body: "not found".into(),
        }));
        assert!(!e.is_retry());
        assert_eq!(e.code(), "token-denied");
    }

    #[test]
    fn oauth_error_bodies_are_recognised() {
        assert!(is_oauth_error(br#"{"error":"invalid_client"}"#));
        assert!(!is_oauth_error(b"<html>not found</html>"));
        assert!(!is_oauth_error(br#"{"message":"nope"}"#));
    }
}
