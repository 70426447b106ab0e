//! Routing: (agent type code, agent code) → connector kind → the connector of the message's
//! profile.
//!
//! Built-in routes follow Apostol's MessageServer: `email.agent`/`smtp.agent` → smtp,
//! `api.agent`/`fcm.agent` → fcm, `m2m.agent` → m2m, `sba.agent` → sba, any other `api.agent` →
//! the generic http connector, `system.agent`/`file.agent` → file. `[routes]` in the main file adds
//! or overrides routes by agent code.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::config::{ConfigError, ProfileCommon, ProfileContext, Profiles};
use crate::connector::{Connector, DeliveryError, OutboxMessage};
use crate::dispatch::fallback::Fallback;
use crate::dispatch::ratelimit::RateWindow;

/// The built-in route of an agent, if any.
/// Each kind declares its agents in [`crate::connector::REGISTRY`].
pub fn builtin_route(agent_type: &str, agent: &str) -> Option<&'static str> {
    crate::connector::builtin_route(agent_type, agent)
}

/// A connector ready for one profile, with the profile's common settings.
#[derive(Clone)]
pub struct Route {
    pub connector: Arc<dyn Connector>,
    pub common: ProfileCommon,
    /// `<kind>/<profile>`: the name of its rate windows and of its attempts.
    pub profile: Arc<str>,
    /// Its rate windows (empty: unlimited, no round trip).
    pub rate_limits: Arc<[RateWindow]>,
    /// Its fallback profiles, if any (checked to exist when the router is built).
    pub fallback: Option<Arc<Fallback>>,
}

/// Every built connector, by kind and profile.
pub struct Router {
    routes: BTreeMap<String, String>,
    by_kind: HashMap<String, HashMap<String, Route>>,
}

impl Router {
    /// Builds every profile's connector; collects every problem instead of stopping at the first.
    pub fn build(
        routes: &BTreeMap<String, String>,
        profiles: &Profiles,
    ) -> Result<Router, Vec<ConfigError>> {
        let mut by_kind: HashMap<String, HashMap<String, Route>> = HashMap::new();
        let mut errors = Vec::new();
        for ((kind, name), p) in &profiles.map {
            match p
                .connector
                .build(&ProfileContext::new(p.source.clone(), name.clone()))
            {
                Ok(connector) => {
                    by_kind.entry(kind.clone()).or_default().insert(
                        name.clone(),
                        Route {
                            connector,
                            common: p.common.clone(),
                            profile: format!("{kind}/{name}").into(),
                            rate_limits: p.rate_limits.clone().into(),
                            fallback: p.fallback.clone().map(Arc::new),
                        },
                    );
                }
                // The context names the real file, so the error already does.
                Err(e) => errors.push(e),
            }
        }
        for ((kind, name), p) in &profiles.map {
            for f in p.fallback.iter().flat_map(|f| &f.profiles) {
                let known = f.split_once('/').is_some_and(|(k, n)| {
                    profiles.map.contains_key(&(k.to_string(), n.to_string()))
                });
                if !known || *f == format!("{kind}/{name}") {
                    errors.push(ConfigError::new(
                        &p.source,
                        Some(format!("{name}.fallback")),
                        if known {
                            format!("\"{f}\" is this profile itself")
                        } else {
                            format!("\"{f}\" is not a configured profile (write \"<kind>/<profile>\" of a profile in [connectors])")
                        },
                    ));
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Router {
            routes: routes.clone(),
            by_kind,
        })
    }

    /// The route of profile `<kind>/<name>` (a fallback).
    pub fn profile(&self, profile: &str) -> Option<&Route> {
        let (kind, name) = profile.split_once('/')?;
        self.by_kind.get(kind)?.get(name)
    }

    /// The connector of dingtalk profile `name`, if configured (the HTTP server's direct calls).
    pub fn dingtalk(&self, name: &str) -> Option<Arc<dyn Connector>> {
        let c = &self.by_kind.get("dingtalk")?.get(name)?.connector;
        c.as_any()?
            .downcast_ref::<crate::connector::dingtalk::DingtalkConnector>()
            .map(|_| c.clone())
    }

    /// Every built connector, for health checks.
    pub fn all(&self) -> impl Iterator<Item = &Route> {
        self.by_kind.values().flat_map(|m| m.values())
    }

    /// The connector for a message, or the permanent error that explains why there is none.
    pub fn resolve(&self, msg: &OutboxMessage) -> Result<&Route, DeliveryError> {
        let kind = self
            .routes
            .get(&msg.agent)
            .map(String::as_str)
            .or_else(|| builtin_route(&msg.agent_type, &msg.agent))
            .ok_or_else(|| {
                DeliveryError::permanent(
                    "unknown-agent",
                    format!(
                        "no connector handles agent {}/{} (add a route in [routes])",
                        msg.agent_type, msg.agent
                    ),
                )
            })?;
        let profiles = self.by_kind.get(kind).ok_or_else(|| {
            DeliveryError::permanent(
                "connector-not-configured",
                format!(
                    "agent {} routes to the {kind} connector, which has no configuration file",
                    msg.agent
                ),
            )
        })?;
        profiles.get(&msg.profile).ok_or_else(|| {
            let mut known: Vec<&str> = profiles.keys().map(String::as_str).collect();
            known.sort_unstable();
            DeliveryError::permanent(
                "unknown-profile",
                format!(
                    "{kind} has no profile \"{}\" (configured: {})",
                    msg.profile,
                    known.join(", ")
                ),
            )
        })
    }
}
