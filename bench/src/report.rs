//! Collects figures as table rows and as JSON; prints the table and writes
//! `bench/results/<timestamp>.json`.

use std::time::Duration;

use serde_json::{json, Map, Value};

/// One line of the printed table.
pub struct Row {
    pub section: String,
    pub what: String,
    pub value: String,
    /// Target or comparison, when there is one.
    pub note: String,
}

#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub figures: Map<String, Value>,
}

impl Report {
    pub fn row(
        &mut self,
        section: &str,
        what: &str,
        value: impl Into<String>,
        note: impl Into<String>,
    ) {
        let row = Row {
            section: section.into(),
            what: what.into(),
            value: value.into(),
            note: note.into(),
        };
        println!(
            "  [{}] {}: {} {}",
            row.section, row.what, row.value, row.note
        );
        self.rows.push(row);
    }

    /// Stores `value` under `section.key` in the JSON figures.
    pub fn set(&mut self, section: &str, key: &str, value: Value) {
        let entry = self
            .figures
            .entry(section.to_string())
            .or_insert_with(|| json!({}));
        if let Value::Object(m) = entry {
            m.insert(key.to_string(), value);
        }
    }

    pub fn print(&self) {
        let w0 = self.rows.iter().map(|r| r.section.len()).max().unwrap_or(0);
        let w1 = self.rows.iter().map(|r| r.what.len()).max().unwrap_or(0);
        let w2 = self.rows.iter().map(|r| r.value.len()).max().unwrap_or(0);
        let line = "-".repeat(w0 + w1 + w2 + 40);
        println!("{line}");
        let mut last = "";
        for r in &self.rows {
            let section = if r.section == last { "" } else { &r.section };
            last = &r.section;
            println!(
                "{section:<w0$} | {:<w1$} | {:>w2$} | {}",
                r.what, r.value, r.note
            );
        }
        println!("{line}");
    }
}

/// Latency percentiles of a sample, in ms.
pub struct Percentiles {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(samples: &mut [Duration]) -> Option<Percentiles> {
        if samples.is_empty() {
            return None;
        }
        samples.sort();
        let at = |q: f64| {
            let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[i].as_secs_f64() * 1e3
        };
        Some(Percentiles {
            n: samples.len(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: samples[samples.len() - 1].as_secs_f64() * 1e3,
        })
    }

    pub fn show(&self) -> String {
        format!(
            "p50 {:.2} / p90 {:.2} / p99 {:.2} / max {:.2} ms",
            self.p50, self.p90, self.p99, self.max
        )
    }

    pub fn json(&self) -> Value {
        json!({"n": self.n, "p50_ms": self.p50, "p90_ms": self.p90, "p99_ms": self.p99, "max_ms": self.max})
    }
}

/// `12345.6` → `"12,346"`.
pub fn thousands(x: f64) -> String {
    let s = format!("{:.0}", x);
    let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let p = Percentiles::of(&mut v).unwrap();
        assert_eq!((p.p50, p.p90, p.p99, p.max), (50.0, 90.0, 99.0, 100.0));
    }

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
    }
}
