//! Durations written as humantime strings (`"5s"`, `"1m 30s"`, `"250ms"`).

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A duration in config files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(Dur)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration \"{s}\": {e}")))
    }
}
