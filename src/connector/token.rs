//! A shared access-token cache for connectors whose provider hands out expiring tokens (FCM,
//! OAuth2 client-credentials profiles, WeChat/WeCom/DingTalk…).
//!
//! Invariants: at most one refresh per credential is in flight (callers wait on the same mutex and
//! reuse its result); a token is refreshed `early` before it expires and at the latest every
//! `max_age` (55 minutes by default, as Apostol does); [`TokenCache::invalidate`] forces a refresh
//! when a provider reports the token invalid, but only if the token it saw is still the cached one
//! (so N concurrent 401s cause one refresh, not N). Tokens are [`Secret`]s and never logged.
//! Caches are shared per credential across profiles through [`shared`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::DeliveryError;
use crate::config::Secret;

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
}

impl TokenCache {
    /// `max_age`: refresh at the latest after this long (55 min by default); `early`: refresh this
    /// long before the provider's expiry (default 60 s).
    pub fn new(source: impl TokenSource + 'static) -> TokenCache {
        TokenCache {
            source: Box::new(source),
            max_age: Duration::from_secs(55 * 60),
            early: Duration::from_secs(60),
            state: tokio::sync::Mutex::new(None),
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
        let life = token
            .expires_in
            .saturating_sub(self.early)
            .min(self.max_age);
        *state = Some(Cached {
            value: token.value.clone(),
            refresh_at: Instant::now() + life,
        });
        Ok(token.value)
    }

    /// Drops `stale` if it is still the cached token, so the next `get` fetches a new one.
    pub async fn invalidate(&self, stale: &Secret) {
        let mut state = self.state.lock().await;
        if state.as_ref().is_some_and(|c| &c.value == stale) {
            *state = None;
        }
    }
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

    #[tokio::test]
    async fn refreshes_early_and_at_max_age() {
        let n = Arc::new(AtomicU32::new(0));
        // expires_in 1s with early 1s: every get refreshes.
        let cache = TokenCache::new(Counter(n.clone(), Duration::from_secs(1)))
            .with_early(Duration::from_secs(1));
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
