//! Rate limits per profile, shared by every daemon (issue 10): the profile keys `rate_limit` and
//! `rate_limit_per`, the platforms' built-in limits by kind, and the names of the windows
//! (`outbox.rate_windows` rows, `sql/013_rate_limits.sql`) a message counts against.
//!
//! A window is written `"<count>/<duration>"` (`"20/1m"`: at most 20 sends in any minute), with an
//! optional recipient key: `"1/1s per address"` (one window per message address: a Slack channel,
//! a Telegram chat) or `"20/1m per group"` (per address, only for addresses that are negative
//! numbers: Telegram group and channel chats). `rate_limit_per = "address"` keys every window that
//! names no key. `rate_limit = []` turns the kind's built-in limits off.
//!
//! Invariants: the state lives in PostgreSQL only (no per-process limiter could hold a limit for
//! four daemons); the window is exact (sliding, not fixed buckets); a profile without windows pays
//! nothing (no round trip).

use std::time::Duration;

/// Which sends share a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Per {
    /// Every send of the profile.
    Profile,
    /// One window per message address.
    Address,
    /// One window per address that is a negative number (a Telegram group or channel chat);
    /// other addresses are not counted in it.
    Group,
}

/// At most `count` sends in any `window` long interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateWindow {
    pub count: u32,
    pub window: Duration,
    pub per: Per,
}

/// The platforms' limits (`/work/shared/providers.md`), by kind name, as a profile of that kind
/// gets them unless it sets `rate_limit`.
pub const DEFAULTS: &[(&str, &[&str])] = &[
    ("dingbot", &["20/1m"]),
    ("feishu", &["100/1m", "5/1s"]),
    ("wecombot", &["20/1m"]),
    ("slack", &["1/1s per address"]),
    (
        "telegram",
        &["30/1s", "1/1s per address", "20/1m per group"],
    ),
];

/// The built-in windows of a kind (none for kinds without a table entry).
pub fn defaults(kind: &str) -> Vec<RateWindow> {
    DEFAULTS
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, w)| {
            w.iter()
                .map(|s| parse_window(s, Per::Profile).expect("the built-in limits parse"))
                .collect()
        })
        .unwrap_or_default()
}

/// Parses `"<count>/<duration>[ per address|group]"`; `default_per` applies when no key is named.
pub fn parse_window(s: &str, default_per: Per) -> Result<RateWindow, String> {
    let bad = || {
        format!(
            "\"{s}\" is not a rate window: write \"<count>/<duration>\", e.g. \"20/1m\", \
             \"5/1s\", optionally followed by \"per address\" or \"per group\""
        )
    };
    let (spec, per) = match s.trim().split_once(" per ") {
        Some((spec, key)) => (
            spec.trim(),
            match key.trim() {
                "address" => Per::Address,
                "group" => Per::Group,
                "profile" => Per::Profile,
                _ => return Err(bad()),
            },
        ),
        None => (s.trim(), default_per),
    };
    let (count, window) = spec.split_once('/').ok_or_else(bad)?;
    let count: u32 = count.trim().parse().map_err(|_| bad())?;
    let window = window.trim();
    // "20/min" and "5/s" read as "per one minute / second".
    let window = match window {
        "s" | "sec" => "1s",
        "m" | "min" => "1m",
        "h" | "hour" => "1h",
        w => w,
    };
    let window = humantime::parse_duration(window).map_err(|_| bad())?;
    if count == 0 {
        return Err(format!(
            "\"{s}\": the count must be at least 1 (to stop a profile, remove it)"
        ));
    }
    if window < Duration::from_millis(1) || window > Duration::from_secs(24 * 3600) {
        return Err(format!("\"{s}\": the window must be between 1ms and 24h"));
    }
    if count > 100_000 {
        return Err(format!("\"{s}\": at most 100000 sends per window"));
    }
    Ok(RateWindow { count, window, per })
}

/// A profile's `rate_limit` and `rate_limit_per` keys (as written; `None`: absent) → its windows.
/// `rate_limit_per` keys the profile's own windows that name no key; without `rate_limit` the
/// kind's built-in windows apply as they are. The error is (key, message).
pub fn from_keys(
    kind: &str,
    rate_limit: Option<Vec<String>>,
    per: Option<String>,
) -> Result<Vec<RateWindow>, (&'static str, String)> {
    let default_per = match per.as_deref() {
        None | Some("profile") => Per::Profile,
        Some("address") => Per::Address,
        Some(other) => {
            return Err((
                "rate_limit_per",
                format!("\"{other}\" is not a key: use \"address\" or \"profile\""),
            ))
        }
    };
    match rate_limit {
        Some(list) => list
            .iter()
            .map(|s| parse_window(s, default_per).map_err(|e| ("rate_limit", e)))
            .collect(),
        // The built-in windows name their own keys.
        None => Ok(defaults(kind)),
    }
}

/// One window a message counts against: its row name and its limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub name: String,
    pub window_ms: i32,
    pub count: i32,
    /// Keyed by the recipient (per address / group).
    pub keyed: bool,
}

/// The longest recipient key kept in a bucket name.
const MAX_KEY: usize = 200;

/// The windows `address` counts against in profile `profile` (`<kind>/<name>`).
pub fn buckets(profile: &str, windows: &[RateWindow], address: Option<&str>) -> Vec<Bucket> {
    let address = address.map(str::trim).unwrap_or("");
    let key: String = address.chars().take(MAX_KEY).collect();
    let is_group = address.starts_with('-') && address[1..].parse::<u64>().is_ok();
    windows
        .iter()
        .filter(|w| w.per != Per::Group || is_group)
        .map(|w| {
            let ms = w.window.as_millis().min(i32::MAX as u128) as i32;
            let keyed = w.per != Per::Profile;
            let mut name = format!("{profile} {}/{ms}ms", w.count);
            if keyed {
                name.push(' ');
                name.push_str(&key);
            }
            Bucket {
                name,
                window_ms: ms,
                count: w.count as i32,
                keyed,
            }
        })
        .collect()
}

/// The windows a "too fast" answer blocks: the message's recipient-keyed windows when it has any
/// (the platform throttled that chat), else every window of the profile it counted against.
pub fn blocked_by_too_fast(buckets: &[Bucket]) -> Vec<Bucket> {
    if buckets.iter().any(|b| b.keyed) {
        buckets.iter().filter(|b| b.keyed).cloned().collect()
    } else {
        buckets.to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_with_their_keys() {
        let w = parse_window("20/1m", Per::Profile).unwrap();
        assert_eq!(
            w,
            RateWindow {
                count: 20,
                window: Duration::from_secs(60),
                per: Per::Profile
            }
        );
        assert_eq!(
            parse_window("5/s", Per::Profile).unwrap().window,
            Duration::from_secs(1)
        );
        assert_eq!(
            parse_window("20/min", Per::Profile).unwrap().window,
            Duration::from_secs(60)
        );
        assert_eq!(
            parse_window(" 1/1s per address ", Per::Profile)
                .unwrap()
                .per,
            Per::Address
        );
        assert_eq!(
            parse_window("20/1m per group", Per::Profile).unwrap().per,
            Per::Group
        );
        assert_eq!(
            parse_window("3/250ms", Per::Address).unwrap().per,
            Per::Address
        );
        for bad in [
            "20",
            "x/1m",
            "20/soon",
            "0/1m",
            "20/1m per chat",
            "-1/1s",
            "5/0s",
            "5/2days",
        ] {
            assert!(parse_window(bad, Per::Profile).is_err(), "{bad}");
        }
    }

    #[test]
    fn kinds_get_their_platform_limits_unless_the_profile_says_otherwise() {
        let d = from_keys("dingbot", None, None).unwrap();
        assert_eq!(d, vec![parse_window("20/1m", Per::Profile).unwrap()]);
        assert_eq!(from_keys("feishu", None, None).unwrap().len(), 2);
        assert_eq!(from_keys("telegram", None, None).unwrap().len(), 3);
        assert!(from_keys("http", None, None).unwrap().is_empty());
        assert!(
            from_keys("dingbot", Some(vec![]), None).unwrap().is_empty(),
            "disabled"
        );
        let own = from_keys("slack", Some(vec!["2/1s".into()]), Some("address".into())).unwrap();
        assert_eq!(own[0].per, Per::Address);
        let e = from_keys("http", Some(vec!["fast".into()]), None).unwrap_err();
        assert_eq!(e.0, "rate_limit");
        assert_eq!(
            from_keys("http", None, Some("chat".into())).unwrap_err().0,
            "rate_limit_per"
        );
        for (kind, _) in DEFAULTS {
            assert!(!defaults(kind).is_empty());
        }
    }

    #[test]
    fn a_message_counts_against_its_profile_and_recipient_windows() {
        let tg = defaults("telegram");
        let names = |a: &str| -> Vec<String> {
            buckets("telegram/bot", &tg, Some(a))
                .into_iter()
                .map(|b| b.name)
                .collect()
        };
        assert_eq!(
            names("12345"),
            ["telegram/bot 30/1000ms", "telegram/bot 1/1000ms 12345"]
        );
        assert_eq!(
            names("-100777"),
            [
                "telegram/bot 30/1000ms",
                "telegram/bot 1/1000ms -100777",
                "telegram/bot 20/60000ms -100777"
            ]
        );
        let b = buckets("telegram/bot", &tg, Some("-5"));
        let blocked: Vec<String> = blocked_by_too_fast(&b)
            .into_iter()
            .map(|b| b.name)
            .collect();
        assert_eq!(
            blocked,
            ["telegram/bot 1/1000ms -5", "telegram/bot 20/60000ms -5"]
        );
        let ding = buckets("dingbot/ops", &defaults("dingbot"), None);
        assert_eq!(blocked_by_too_fast(&ding), ding);
        assert_eq!(ding[0].window_ms, 60_000);
        assert_eq!(ding[0].count, 20);
    }
}
