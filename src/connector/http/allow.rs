//! The host allowlist of an `http` profile: which hosts a request may reach, so that a row in the
//! outbox cannot make the daemon call internal services (SSRF).
//!
//! The rule (documented in `conf/http.conf`):
//! 1. The profile's own host (the host of `url`, any port) is always admitted: the operator wrote it.
//! 2. Any other host (from an absolute `address`, which needs `allow_absolute_address`, or from a
//!    redirect) is admitted when `allowed_hosts` is set only if it matches the list (a name, a
//!    `*.suffix` wildcard, an IP address or a CIDR that the resolved address is in); when the list is
//!    empty, only if it resolves to public addresses, or to any address with `allow_private`.
//!
//! Invariant: the check is made where the connection is made. Names are checked by [`Guard`], the
//! client's DNS resolver, which drops every resolved address the policy refuses, so DNS rebinding
//! between a check and the connect cannot slip past it; IP-literal hosts (which never reach a
//! resolver) are checked by [`Policy::check_url`] before each request and each redirect.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// A request the policy refused. Travels inside reqwest's error chain (resolver or redirect
/// policy); [`is_denied`] finds it there.
#[derive(Debug, Clone, thiserror::Error)]
#[error("host {host} is not allowed: {why}")]
pub struct HostDenied {
    pub host: String,
    pub why: &'static str,
}

/// An `allowed_hosts` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    /// An exact host name (lower case, no trailing dot).
    Name(String),
    /// `*.corp.example`: any name ending in `.corp.example` (not `corp.example` itself).
    Suffix(String),
    /// An address range; a bare address is a /32 or /128.
    Net(Cidr),
}

/// An IPv4 or IPv6 network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.parse::<u8>().ok().filter(|&p| p <= max)?,
            None => max,
        };
        Some(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// The allowlist of one profile.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// The profile's own host, always admitted.
    base_host: String,
    allow_private: bool,
    entries: Vec<Entry>,
    /// Hosts of the proxies from the environment (`HTTP_PROXY`…): reqwest resolves those instead
    /// of the target, and they are the operator's.
    proxy_hosts: Vec<String>,
}

impl Policy {
    /// `allowed_hosts` entries are names, `*.suffix` wildcards, IP addresses or CIDRs.
    pub fn new(base: &url::Url, allow_private: bool, allowed: &[String]) -> Result<Policy, String> {
        let mut entries = Vec::new();
        for raw in allowed {
            let s = raw.trim().to_ascii_lowercase();
            let e = if let Some(net) = Cidr::parse(&s) {
                Entry::Net(net)
            } else if s.contains('/') {
                return Err(format!("\"{raw}\" is not a valid CIDR"));
            } else if let Some(suffix) = s.strip_prefix("*.") {
                if suffix.is_empty() || suffix.contains('*') {
                    return Err(format!("\"{raw}\": a wildcard is written *.example.com"));
                }
                Entry::Suffix(format!(".{}", suffix.trim_end_matches('.')))
            } else if s.is_empty() || s.contains('*') || s.contains(':') {
                return Err(format!(
                    "\"{raw}\" is not a host name, *.suffix, IP address or CIDR"
                ));
            } else {
                Entry::Name(s.trim_end_matches('.').to_string())
            };
            entries.push(e);
        }
        let proxy_hosts = [
            "HTTP_PROXY",
            "http_proxy",
            "HTTPS_PROXY",
            "https_proxy",
            "ALL_PROXY",
            "all_proxy",
        ]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .filter_map(|v| url::Url::parse(&v).ok())
        .filter_map(|u| u.host_str().map(normalize))
        .collect();
        Ok(Policy {
            base_host: base.host_str().map(normalize).unwrap_or_default(),
            allow_private,
            entries,
            proxy_hosts,
        })
    }

    /// Whether a name is admitted whatever it resolves to: the profile's own host, a proxy, or a
    /// name on the list.
    fn trusts_name(&self, host: &str) -> bool {
        let host = normalize(host);
        host == self.base_host
            || self.proxy_hosts.contains(&host)
            || self.entries.iter().any(|e| match e {
                Entry::Name(n) => *n == host,
                Entry::Suffix(s) => host.ends_with(s.as_str()),
                Entry::Net(_) => false,
            })
    }

    /// Whether a resolved (or literal) address of a host that is not trusted by name is admitted.
    pub fn admits_addr(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        if self
            .entries
            .iter()
            .any(|e| matches!(e, Entry::Net(n) if n.contains(ip)))
        {
            return true;
        }
        if !self.entries.is_empty() {
            return false; // the list is the whole policy
        }
        self.allow_private || is_public(ip)
    }

    /// The checks that can be made on the URL alone: scheme, and IP-literal hosts (which reqwest
    /// connects to without asking the resolver). Names are checked by the resolver at connect time.
    pub fn check_url(&self, url: &url::Url) -> Result<(), HostDenied> {
        let host = url.host_str().unwrap_or_default().to_string();
        let deny = |why| {
            Err(HostDenied {
                host: host.clone(),
                why,
            })
        };
        if !matches!(url.scheme(), "http" | "https") {
            return deny("only http and https URLs are allowed");
        }
        let ip = match url.host() {
            None => return deny("the URL has no host"),
            Some(url::Host::Domain(_)) => return Ok(()),
            Some(url::Host::Ipv4(a)) => IpAddr::V4(a),
            Some(url::Host::Ipv6(a)) => IpAddr::V6(a),
        };
        if self.trusts_name(&host) || self.admits_addr(ip) {
            Ok(())
        } else {
            deny("the address is private, loopback, link-local or otherwise not public, or not on the allowlist")
        }
    }

    /// The addresses of `host` the policy admits, or why none is.
    pub fn filter(
        &self,
        host: &str,
        addrs: Vec<SocketAddr>,
    ) -> Result<Vec<SocketAddr>, HostDenied> {
        if self.trusts_name(host) {
            return Ok(addrs);
        }
        let kept: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|a| self.admits_addr(a.ip()))
            .collect();
        if kept.is_empty() {
            Err(HostDenied {
                host: host.to_string(),
                why: "it resolves only to private, loopback, link-local or otherwise non-public addresses, or is not on the allowlist",
            })
        } else {
            Ok(kept)
        }
    }
}

/// The DNS resolver of an `http` profile's client: the system resolver, filtered by the policy.
pub struct Guard(pub Arc<Policy>);

impl Resolve for Guard {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.0.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept = policy.filter(&host, addrs)?;
            Ok(Box::new(kept.into_iter()) as Addrs)
        })
    }
}

/// The [`HostDenied`] somewhere in an error's source chain, if any.
pub fn is_denied<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a HostDenied> {
    let mut cur: Option<&'a (dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(d) = err.downcast_ref::<HostDenied>() {
            return Some(d);
        }
        cur = err.source();
    }
    None
}

fn normalize(host: &str) -> String {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are their IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// Whether an address is globally routable. Deny-list after RFC 6890 (special-purpose address
/// registries); IPv6 forms that embed an IPv4 address (mapped, compatible, NAT64, 6to4) are judged
/// by that address.
pub fn is_public(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(a) => is_public_v4(a),
        IpAddr::V6(a) => is_public_v6(a),
    }
}

fn is_public_v4(a: Ipv4Addr) -> bool {
    let o = a.octets();
    !(a.is_unspecified()
        || o[0] == 0 // 0.0.0.0/8 "this network"
        || a.is_loopback()
        || a.is_private()
        || a.is_link_local()
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64.0.0/10 shared address space (CGNAT)
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0.0/24 IETF protocol assignments
        || a.is_documentation()
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18.0.0/15 benchmarking
        || a.is_multicast()
        || o[0] >= 240) // 240.0.0.0/4 reserved, and the broadcast address
}

fn is_public_v6(a: Ipv6Addr) -> bool {
    let s = a.segments();
    let embedded_v4 = |hi: u32| Ipv4Addr::from((u128::from(a) & 0xffff_ffff) as u32 | hi);
    if a.is_unspecified() || a.is_loopback() || a.is_multicast() {
        return false;
    }
    // ::/96 IPv4-compatible (deprecated) and 64:ff9b::/96 NAT64: judged by the IPv4 address.
    if s[..6] == [0; 6] || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return is_public_v4(embedded_v4(0));
    }
    // 2002::/16 6to4: the IPv4 address is in segments 1 and 2.
    if s[0] == 0x2002 {
        return is_public_v4(Ipv4Addr::from(((s[1] as u32) << 16) | s[2] as u32));
    }
    !((s[0] & 0xfe00) == 0xfc00 // fc00::/7 unique local
        || (s[0] & 0xffc0) == 0xfe80 // fe80::/10 link-local
        || (s[0] & 0xffc0) == 0xfec0 // fec0::/10 site-local (deprecated)
        || (s[0] == 0x2001 && s[1] == 0x0db8) // 2001:db8::/32 documentation
        || (s[0] == 0x0100 && s[1..4] == [0, 0, 0])) // 100::/64 discard
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn policy(base: &str, allow_private: bool, list: &[&str]) -> Policy {
        let list: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        Policy::new(&url::Url::parse(base).unwrap(), allow_private, &list).unwrap()
    }

    #[test]
    fn private_and_special_addresses_are_not_public() {
        for a in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "127.255.0.9",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "192.0.0.8",
            "192.0.2.1",
            "198.18.0.1",
            "224.0.0.1",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
            "2002:a00:1::1",
        ] {
            assert!(!is_public(ip(a)), "{a} must not be public");
        }
        for a in [
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "93.184.216.34",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::",
        ] {
            assert!(is_public(ip(a)), "{a} must be public");
        }
    }

    #[test]
    fn cidrs_match_v4_v6_and_mapped_addresses() {
        let n = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(n.contains(ip("10.200.0.1")));
        assert!(n.contains(ip("::ffff:10.0.0.1")));
        assert!(!n.contains(ip("11.0.0.1")));
        let n = Cidr::parse("fd00::/8").unwrap();
        assert!(n.contains(ip("fd12::1")));
        assert!(!n.contains(ip("fe80::1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("1.2.3.4")));
        assert_eq!(Cidr::parse("10.0.0.1").unwrap().prefix, 32);
        assert!(Cidr::parse("10.0.0.0/33").is_none());
        assert!(Cidr::parse("api.example.com").is_none());
    }

    #[test]
    fn literal_hosts_are_checked_on_the_url() {
        let p = policy("http://127.0.0.1:8080/", false, &[]);
        let url = |s: &str| url::Url::parse(s).unwrap();
        // The profile's own host is the operator's.
        assert!(p.check_url(&url("http://127.0.0.1:9999/x")).is_ok());
        for bad in [
            "http://10.0.0.1/",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]:8080/",
            "http://[::ffff:127.0.0.2]/",
            "http://[::ffff:7f00:2]/",
            "http://0x7f.0.0.2/", // the URL parser normalizes odd IPv4 forms
            "http://2130706434/",
            "http://0/",
            "file:///etc/passwd",
        ] {
            assert!(p.check_url(&url(bad)).is_err(), "{bad} must be denied");
        }
        assert!(p.check_url(&url("http://8.8.8.8/")).is_ok());
        // Names are left to the resolver.
        assert!(p.check_url(&url("http://internal.example/")).is_ok());
        let open = policy("http://127.0.0.1:8080/", true, &[]);
        assert!(open.check_url(&url("http://10.0.0.1/")).is_ok());
    }

    #[test]
    fn the_resolver_filter_applies_the_list_and_the_private_ranges() {
        let sa = |s: &str| SocketAddr::new(ip(s), 0);
        let p = policy("https://api.example.com/", false, &[]);
        // The base host is trusted whatever it resolves to.
        assert_eq!(
            p.filter("API.example.com.", vec![sa("10.0.0.1")]).unwrap(),
            vec![sa("10.0.0.1")]
        );
        // Another host: private addresses are dropped; none left = denied.
        assert_eq!(
            p.filter("evil.example", vec![sa("127.0.0.1"), sa("8.8.8.8")])
                .unwrap(),
            vec![sa("8.8.8.8")]
        );
        assert!(p
            .filter("evil.example", vec![sa("127.0.0.1"), sa("::1")])
            .is_err());
        // With a list: names, wildcards and CIDRs admit; everything else is denied, public or not.
        let p = policy(
            "https://api.example.com/",
            false,
            &["hooks.example.org", "*.corp.example", "10.0.0.0/8"],
        );
        assert!(p
            .filter("hooks.example.org", vec![sa("192.168.0.1")])
            .is_ok());
        assert!(p.filter("a.b.corp.example", vec![sa("127.0.0.1")]).is_ok());
        assert!(p.filter("corp.example", vec![sa("8.8.8.8")]).is_err());
        assert!(p.filter("xcorp.example", vec![sa("8.8.8.8")]).is_err());
        assert_eq!(
            p.filter("db.internal", vec![sa("10.1.1.1"), sa("127.0.0.1")])
                .unwrap(),
            vec![sa("10.1.1.1")]
        );
        assert!(p.filter("public.example", vec![sa("8.8.8.8")]).is_err());
        // allow_private admits everything when there is no list.
        let p = policy("https://api.example.com/", true, &[]);
        assert!(p.filter("localhost", vec![sa("127.0.0.1")]).is_ok());
    }

    #[test]
    fn bad_entries_are_config_errors() {
        let base = url::Url::parse("http://h/").unwrap();
        for bad in ["10.0.0.0/40", "*.", "a*b.example", "", "foo/bar"] {
            assert!(
                Policy::new(&base, false, &[bad.to_string()]).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn denial_is_found_in_an_error_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] HostDenied);
        let e = Outer(HostDenied {
            host: "h".into(),
            why: "x",
        });
        assert_eq!(is_denied(&e).unwrap().host, "h");
    }
}
