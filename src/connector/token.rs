//! A shared access-token cache for connectors whose provider hands out expiring tokens (FCM,
//! OAuth2 client-credentials profiles, WeChat/WeCom/DingTalk…).
//!
//! Invariants: at most one refresh per credential is in flight (callers wait on the same mutex and
//! reuse its result); a token is refreshed `early` before it expires — at most 60 s and at most
//! 10 % of its lifetime, so a token that lives 60 s or less is still reused — and at the latest
//! every `max_age` (55 minutes by default, as Apostol does); [`TokenCache::invalidate`] forces a refresh
//! when a provider reports the token invalid, but only if the token it saw is still the cached one
//! (so N concurrent 401s cause one refresh, not N). Tokens are [`Secret`]s and never logged, and
//! [`TokenCache::redact`] scrubs the last tokens handed out from a delivery's texts (a provider
//! that echoes the bearer token in an error body).
//! Caches are shared per credential across profiles through [`shared`], keyed by
//! [`credential_key`]: everything that authenticates, the secret included but only as a hash.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::redact::Redactor;
use super::{DeliveryError, Receipt};
use crate::settings::Secret;

/// How many of the latest tokens [`TokenCache::redact`] scrubs: the current one and the one it
/// replaced (still in flight in deliveries that started before the refresh).
const RECENT: usize = 2;

/// A fetched token and how long the provider says it lives.
#[derive(Clone, Debug)]
pub struct Token {
    pub value: Secret,
    pub expires_in: Duration,
}

/// Where tokens come from (a token endpoint call).
#[async_trait]
pub trait TokenSource: Send + Sync {
    /// Fetches a new token. Errors are delivery errors (`token-fetch` retry, `token-denied`
    /// permanent, …) so that the message's attempt records why.
    async fn fetch(&self) -> Result<Token, DeliveryError>;
}

struct Cached {
    value: Secret,
    refresh_at: Instant,
}

/// Caches one credential's token.
pub struct TokenCache {
    source: Box<dyn TokenSource>,
    max_age: Duration,
    early: Duration,
    state: tokio::sync::Mutex<Option<Cached>>,
    recent: Mutex<Vec<Secret>>,
}

impl TokenCache {
    /// `max_age`: refresh at the latest after this long (55 min by default); `early`: refresh at
    /// most this long before the provider's expiry (default 60 s; see [`refresh_after`]).
    pub fn new(source: impl TokenSource + 'static) -> TokenCache {
        TokenCache {
            source: Box::new(source),
            max_age: Duration::from_secs(55 * 60),
            early: Duration::from_secs(60),
            state: tokio::sync::Mutex::new(None),
            recent: Mutex::new(Vec::new()),
        }
    }

    pub fn with_max_age(mut self, max_age: Duration) -> Self {
        self.max_age = max_age;
        self
    }

    pub fn with_early(mut self, early: Duration) -> Self {
        self.early = early;
        self
    }

    /// A valid token, fetching one if none is cached or the cached one is due for refresh.
    pub async fn get(&self) -> Result<Secret, DeliveryError> {
        let mut state = self.state.lock().await;
        if let Some(c) = state.as_ref() {
            if Instant::now() < c.refresh_at {
                return Ok(c.value.clone());
            }
        }
        let token = self.source.fetch().await?;
        let life = refresh_after(token.expires_in, self.early).min(self.max_age);
        *state = Some(Cached {
            value: token.value.clone(),
            refresh_at: Instant::now() + life,
        });
        let mut recent = self.recent.lock().expect("recent tokens");
        recent.push(token.value.clone());
        let excess = recent.len().saturating_sub(RECENT);
        recent.drain(..excess);
        Ok(token.value)
    }

    /// A delivery's result with the latest tokens scrubbed from its texts.
    pub fn redact(&self, r: Result<Receipt, DeliveryError>) -> Result<Receipt, DeliveryError> {
        let mut redactor = Redactor::new();
        for t in self.recent.lock().expect("recent tokens").iter() {
            redactor.add(t.expose());
        }
        redactor.result(r)
    }

    /// Drops `stale` if it is still the cached token, so the next `get` fetches a new one.
    pub async fn invalidate(&self, stale: &Secret) {
        let mut state = self.state.lock().await;
        if state.as_ref().is_some_and(|c| &c.value == stale) {
            *state = None;
        }
    }
}

/// How long a token that lives `expires_in` is used: until `early` before its expiry, but the
/// margin is at most 10 % of the lifetime, so a short-lived token (60 s or less, as some providers
/// hand out) is reused for most of its life instead of being fetched for every message.
pub fn refresh_after(expires_in: Duration, early: Duration) -> Duration {
    expires_in.saturating_sub(early.min(expires_in / 10))
}

/// The registry key of a credential: `kind` and a SHA-256 over every part (each length-prefixed,
/// so parts cannot run into each other). Secrets go in as parts and never appear in the key.
pub fn credential_key(kind: &str, parts: &[&str]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
    }
    let digest: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    format!("{kind}:{digest}")
}

/// The process-wide cache for credential `key` (e.g. `fcm:<client_email>`), created by `make` when
/// no live one exists. Profiles that share a credential share its token.
pub fn shared(key: &str, make: impl FnOnce() -> TokenCache) -> Arc<TokenCache> {
    static REGISTRY: OnceLock<Mutex<HashMap<String, Weak<TokenCache>>>> = OnceLock::new();
    let mut map = REGISTRY
        .get_or_init(Default::default)
        .lock()
        .expect("token registry");
    if let Some(c) = map.get(key).and_then(Weak::upgrade) {
        return c;
    }
    map.retain(|_, w| w.strong_count() > 0);
    let c = Arc::new(make());
    map.insert(key.to_string(), Arc::downgrade(&c));
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    struct Counter(Arc<AtomicU32>, Duration);

    #[async_trait]
    impl TokenSource for Counter {
        async fn fetch(&self) -> Result<Token, DeliveryError> {
            let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(Token {
                value: Secret::new(format!("t{n}")),
                expires_in: self.1,
            })
        }
    }

    #[tokio::test]
    async fn one_fetch_for_concurrent_callers_and_one_refresh_per_invalidation() {
        let n = Arc::new(AtomicU32::new(0));
        let cache = Arc::new(TokenCache::new(Counter(
            n.clone(),
            Duration::from_secs(3600),
        )));
        let gets: Vec<_> = (0..10)
            .map(|_| {
                let c = cache.clone();
                tokio::spawn(async move { c.get().await.unwrap() })
            })
            .collect();
        for g in gets {
            assert_eq!(g.await.unwrap().expose(), "t1");
        }
        assert_eq!(n.load(Ordering::SeqCst), 1);
        let stale = Secret::new("t1");
        cache.invalidate(&stale).await;
        cache.invalidate(&stale).await; // a second report of the same stale token changes nothing
        assert_eq!(cache.get().await.unwrap().expose(), "t2");
        cache.invalidate(&stale).await;
        assert_eq!(cache.get().await.unwrap().expose(), "t2");
        assert_eq!(n.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn the_refresh_margin_is_at_most_a_tenth_of_the_lifetime() {
        let s = Duration::from_secs;
        let early = s(60);
        assert_eq!(refresh_after(s(3600), early), s(3540));
        assert_eq!(refresh_after(s(600), early), s(540));
        assert_eq!(refresh_after(s(60), early), s(54));
        assert_eq!(refresh_after(s(30), early), s(27));
        assert_eq!(refresh_after(s(1), early), Duration::from_millis(900));
        assert_eq!(refresh_after(Duration::ZERO, early), Duration::ZERO);
    }

    #[test]
    fn credential_keys_differ_by_every_part_and_hide_the_secret() {
        let a = credential_key("oauth2", &["https://t", "client", "secret-one"]);
        let b = credential_key("oauth2", &["https://t", "client", "secret-two"]);
        let c = credential_key("oauth2", &["https://t", "clientsecret-one", ""]);
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            a,
            credential_key("oauth2", &["https://t", "client", "secret-one"])
        );
        assert!(!a.contains("secret-one") && a.starts_with("oauth2:"), "{a}");
    }

    struct Long(AtomicU32);

    #[async_trait]
    impl TokenSource for Long {
        async fn fetch(&self) -> Result<Token, DeliveryError> {
            let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
            Ok(Token {
                value: Secret::new(format!("token-{n}")),
                expires_in: Duration::ZERO,
            })
        }
    }

    #[tokio::test]
    async fn the_latest_tokens_are_scrubbed_from_texts() {
        let cache = TokenCache::new(Long(AtomicU32::new(0)));
        for _ in 0..3 {
            cache.get().await.unwrap();
        }
        let e = DeliveryError::retry("http-401", "Bearer token-3, Bearer token-2, old token-1");
        let e = cache.redact(Err(e)).unwrap_err();
        assert_eq!(e.reason(), "Bearer ***, Bearer ***, old token-1");
    }

    #[tokio::test]
    async fn a_60_second_token_is_reused() {
        let n = Arc::new(AtomicU32::new(0));
        let cache = TokenCache::new(Counter(n.clone(), Duration::from_secs(60)));
        for _ in 0..5 {
            assert_eq!(cache.get().await.unwrap().expose(), "t1");
        }
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn refreshes_early_and_at_max_age() {
        let n = Arc::new(AtomicU32::new(0));
        // expires_in 0: every get refreshes.
        let cache = TokenCache::new(Counter(n.clone(), Duration::ZERO));
        cache.get().await.unwrap();
        assert_eq!(cache.get().await.unwrap().expose(), "t2");
        let m = Arc::new(AtomicU32::new(0));
        let cache = TokenCache::new(Counter(m.clone(), Duration::from_secs(7200)))
            .with_max_age(Duration::ZERO);
        cache.get().await.unwrap();
        cache.get().await.unwrap();
        assert_eq!(m.load(Ordering::SeqCst), 2);
    }
}
