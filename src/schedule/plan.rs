//! When a task runs: its schedule in its time zone, and what the scheduler does with a task that
//! is due (pure functions, unit-tested; no clock, no database).
//!
//! Rules (the push platform's, see README "Tasks"):
//! - a schedule counts from its anchor (creation, or the last resume) and never catches up
//!   retroactively: "hourly at :45" starts in the hour *after* the anchor's hour (created at 5:25,
//!   first run 6:45), "daily at HH:MM" on the day after the anchor's day; a cron expression at its
//!   first occurrence after the anchor; "once" at its time;
//! - runs happen at occurrences within `[start_at, end_at]`;
//! - hourly and daily are the cron patterns `M * * * *` and `M H * * *`, evaluated by croner in
//!   the task's zone, so DST is handled as cron does: a fixed time that falls in the spring-forward
//!   gap runs at the first valid time after it, one that falls in the repeated autumn hour runs
//!   once (at its first occurrence); "hourly" runs every real hour (the repeated hour twice).
//! - after downtime (several due times have passed), `catch_up = once` runs one execution for all
//!   of them, `skip` runs none of those older than the grace period; either way the schedule then
//!   continues from the next occurrence after now.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Days, NaiveTime, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use croner::Cron;

/// Why a stored schedule cannot be used (the task is disabled with this as its last error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("unknown time zone \"{0}\" (an IANA name such as Europe/Berlin)")]
    Zone(String),
    #[error("cron expression \"{0}\": {1}")]
    Cron(String, String),
    #[error("schedule \"{0} {1}\" cannot be read")]
    Spec(String, String),
}

/// What repeats.
#[derive(Debug, Clone)]
pub enum Every {
    /// One run at this time.
    Once(DateTime<Utc>),
    /// Every hour at this minute.
    Hourly(u32),
    /// Every day at this local time.
    Daily(NaiveTime),
    Cron(Box<Cron>),
    /// Only `api.run_task`.
    Manual,
}

/// A task's schedule: what repeats, where, and between which times.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub every: Every,
    pub zone: Tz,
    pub start: Option<DateTime<Utc>>,
    pub end: Option<DateTime<Utc>>,
    /// The pattern croner evaluates (hourly, daily, cron).
    cron: Option<Cron>,
}

/// Parses a cron expression (five fields, or six with seconds; `@daily` and friends).
pub fn parse_cron(expr: &str) -> Result<Cron, PlanError> {
    Cron::from_str(expr).map_err(|e| PlanError::Cron(expr.to_string(), e.to_string()))
}

impl Schedule {
    /// A schedule as `outbox.tasks` stores it (`schedule_kind`, `schedule_spec`, `time_zone`).
    pub fn parse(
        kind: &str,
        spec: Option<&str>,
        zone: &str,
        start: Option<DateTime<Utc>>,
        end: Option<DateTime<Utc>>,
    ) -> Result<Schedule, PlanError> {
        let tz = Tz::from_str(zone).map_err(|_| PlanError::Zone(zone.to_string()))?;
        let spec_s = spec.unwrap_or("").trim();
        let bad = || PlanError::Spec(kind.to_string(), spec_s.to_string());
        let (every, cron) = match kind {
            "once" => {
                let local = chrono::NaiveDateTime::parse_from_str(spec_s, "%Y-%m-%d %H:%M:%S")
                    .or_else(|_| chrono::NaiveDateTime::parse_from_str(spec_s, "%Y-%m-%d %H:%M"))
                    .map_err(|_| bad())?;
                // A local time in the autumn overlap is its first occurrence; one in the spring
                // gap does not exist and runs when the gap ends (as PostgreSQL reads it too).
                let at = tz
                    .from_local_datetime(&local)
                    .earliest()
                    .or_else(|| {
                        tz.from_local_datetime(&(local + chrono::Duration::hours(1)))
                            .earliest()
                    })
                    .ok_or_else(bad)?;
                (Every::Once(at.with_timezone(&Utc)), None)
            }
            "hourly" => {
                let m: u32 = spec_s
                    .trim_start_matches(':')
                    .parse()
                    .ok()
                    .filter(|m| *m < 60)
                    .ok_or_else(bad)?;
                (Every::Hourly(m), Some(parse_cron(&format!("{m} * * * *"))?))
            }
            "daily" => {
                let t = NaiveTime::parse_from_str(spec_s, "%H:%M").map_err(|_| bad())?;
                let pattern = format!("{} {} * * *", t.minute(), t.hour());
                (Every::Daily(t), Some(parse_cron(&pattern)?))
            }
            "cron" => {
                let c = parse_cron(spec_s)?;
                (Every::Cron(Box::new(c.clone())), Some(c))
            }
            "manual" => (Every::Manual, None),
            _ => return Err(bad()),
        };
        Ok(Schedule {
            every,
            zone: tz,
            start,
            end,
            cron,
        })
    }

    /// The first due time of a schedule counted from `anchor` (creation or resume), or None
    /// when it has none (manual; once in the past; past the end).
    pub fn first(&self, anchor: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = anchor.with_timezone(&self.zone);
        // Where the search starts, and whether a match right there counts.
        let (from, inclusive) = match &self.every {
            Every::Manual => return None,
            Every::Once(at) => {
                return (*at > anchor).then_some(*at).filter(|t| self.within(*t));
            }
            Every::Hourly(_) => {
                // The start of the next hour (an instant: the local minutes and seconds off).
                let into_hour =
                    chrono::Duration::seconds(i64::from(local.minute() * 60 + local.second()))
                        + chrono::Duration::nanoseconds(i64::from(local.nanosecond()));
                (anchor - into_hour + chrono::Duration::hours(1), true)
            }
            Every::Daily(_) => {
                let day = local.date_naive().checked_add_days(Days::new(1))?;
                let midnight = day.and_hms_opt(0, 0, 0)?;
                // Midnight may not exist (a DST change at 00:00): the day starts at 01:00 then.
                let start = self
                    .zone
                    .from_local_datetime(&midnight)
                    .earliest()
                    .or_else(|| {
                        self.zone
                            .from_local_datetime(&(midnight + chrono::Duration::hours(1)))
                            .earliest()
                    })?;
                (start.with_timezone(&Utc), true)
            }
            Every::Cron(_) => (anchor, false),
        };
        let (from, inclusive) = match self.start {
            Some(s) if s > from => (s, true),
            _ => (from, inclusive),
        };
        self.search(from, inclusive)
    }

    /// The due time after `t` (strictly), or None (once, manual, past the end).
    pub fn after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self.start {
            Some(s) if s > t => self.search(s, true),
            _ => self.search(t, false),
        }
    }

    fn search(&self, from: DateTime<Utc>, inclusive: bool) -> Option<DateTime<Utc>> {
        let cron = self.cron.as_ref()?;
        let next = cron
            .find_next_occurrence(&from.with_timezone(&self.zone), inclusive)
            .ok()?
            .with_timezone(&Utc);
        self.within(next).then_some(next)
    }

    fn within(&self, t: DateTime<Utc>) -> bool {
        !matches!(self.start, Some(s) if t < s) && !matches!(self.end, Some(e) if t > e)
    }
}

/// What a task looks like to the scheduler (a row of `outbox.due_tasks`).
#[derive(Debug, Clone)]
pub struct DueTask {
    pub id: uuid::Uuid,
    pub name: String,
    pub catch_up_once: bool,
    pub planned_from: DateTime<Utc>,
    pub next_run_at: Option<DateTime<Utc>>,
}

/// What the scheduler does with a task it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing is due: set the next run (None: the schedule is over, finish the task).
    Wait { next: Option<DateTime<Utc>> },
    /// Start the execution for `due` (a catch-up when late) and set the next run; `skipped` due
    /// times were not run.
    Run {
        due: DateTime<Utc>,
        catch_up: bool,
        next: Option<DateTime<Utc>>,
        skipped: i32,
    },
    /// Every due time that passed is too old to run (catch_up = skip): set the next run.
    Skip {
        next: Option<DateTime<Utc>>,
        skipped: i32,
    },
}

/// At most this many missed due times are walked (an every-minute cron after a year down is
/// 525,600): past it the schedule restarts from now.
const MAX_MISSED_WALK: i32 = 100_000;

/// Decides what happens to `task` at `now`. `grace`: how late a due time may still run on time
/// (and, with catch_up = skip, at all).
pub fn decide(s: &Schedule, task: &DueTask, now: DateTime<Utc>, grace: Duration) -> Decision {
    let due = match task.next_run_at.or_else(|| s.first(task.planned_from)) {
        None => return Decision::Wait { next: None },
        Some(d) if d > now => return Decision::Wait { next: Some(d) },
        Some(d) => d,
    };
    // The newest due time that has passed, and how many passed before it.
    let mut latest = due;
    let mut missed = 0;
    let mut next = s.after(latest);
    while let Some(n) = next.filter(|n| *n <= now) {
        missed += 1;
        latest = n;
        if missed >= MAX_MISSED_WALK {
            next = s.after(now);
            break;
        }
        next = s.after(latest);
    }
    let grace = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX);
    let late = now - latest > grace;
    if late && !task.catch_up_once {
        return Decision::Skip {
            next,
            skipped: missed + 1,
        };
    }
    Decision::Run {
        due: latest,
        catch_up: late || missed > 0,
        next,
        skipped: missed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn sched(kind: &str, spec: &str, zone: &str) -> Schedule {
        Schedule::parse(kind, Some(spec), zone, None, None).unwrap()
    }

    #[test]
    fn hourly_starts_in_the_next_hour() {
        let s = sched("hourly", "45", "UTC");
        assert_eq!(
            s.first(utc("2026-12-02T05:25:00Z")),
            Some(utc("2026-12-02T06:45:00Z"))
        );
        assert_eq!(
            s.first(utc("2026-12-02T05:50:00Z")),
            Some(utc("2026-12-02T06:45:00Z"))
        );
        assert_eq!(
            s.after(utc("2026-12-02T06:45:00Z")),
            Some(utc("2026-12-02T07:45:00Z"))
        );
        // A zone with a half-hour offset: "the next hour" is the next local hour.
        let s = sched("hourly", ":15", "Asia/Kolkata");
        assert_eq!(
            s.first(utc("2026-12-02T05:25:00Z")), // 10:55 IST
            Some(utc("2026-12-02T05:45:00Z"))     // 11:15 IST
        );
    }

    #[test]
    fn daily_starts_on_the_next_day_and_keeps_local_time_across_dst() {
        let s = sched("daily", "09:30", "Europe/Berlin");
        // Created Saturday 28 March 2026 at 08:00 CET: first run Sunday 29 March, the day of the
        // change to summer time, 09:30 CEST (07:30 UTC), then 09:30 CEST every day.
        let first = s.first(utc("2026-03-28T07:00:00Z")).unwrap();
        assert_eq!(first, utc("2026-03-29T07:30:00Z"));
        assert_eq!(s.after(first), Some(utc("2026-03-30T07:30:00Z")));
        // And back: 09:30 CEST on 24 October, 09:30 CET (08:30 UTC) on 25 October.
        assert_eq!(
            s.after(utc("2026-10-24T07:30:00Z")),
            Some(utc("2026-10-25T08:30:00Z"))
        );
        // A time in the spring-forward gap runs when the gap ends, as cron does; one in the
        // repeated autumn hour runs once.
        let s = sched("daily", "02:30", "Europe/Berlin");
        assert_eq!(
            s.after(utc("2026-03-28T01:30:00Z")),
            Some(utc("2026-03-29T01:00:00Z")) // 03:00 CEST
        );
        let s = sched("daily", "01:30", "America/New_York");
        let a = s.after(utc("2026-11-01T04:00:00Z")).unwrap(); // 00:00 EDT
        assert_eq!(a, utc("2026-11-01T05:30:00Z")); // 01:30 EDT, the first of the two
        assert_eq!(s.after(a), Some(utc("2026-11-02T06:30:00Z"))); // 01:30 EST next day
    }

    #[test]
    fn cron_runs_at_its_next_occurrence_in_the_zone() {
        let s = sched("cron", "0 9 * * MON-FRI", "America/New_York");
        // Friday 4 December 2026, 10:00 EST: the next is Monday 7 December 09:00 EST.
        assert_eq!(
            s.first(utc("2026-12-04T15:00:00Z")),
            Some(utc("2026-12-07T14:00:00Z"))
        );
        assert!(matches!(
            Schedule::parse("cron", Some("61 * * * *"), "UTC", None, None),
            Err(PlanError::Cron(..))
        ));
        assert!(matches!(
            Schedule::parse("hourly", Some("5"), "Mars/Olympus", None, None),
            Err(PlanError::Zone(_))
        ));
    }

    #[test]
    fn once_runs_once_and_manual_never() {
        let s = sched("once", "2026-12-24 18:00:00", "Europe/Berlin");
        assert_eq!(
            s.first(utc("2026-12-02T00:00:00Z")),
            Some(utc("2026-12-24T17:00:00Z"))
        );
        assert_eq!(s.after(utc("2026-12-24T17:00:00Z")), None);
        // Resumed after its time: it does not run retroactively.
        assert_eq!(s.first(utc("2026-12-25T00:00:00Z")), None);
        assert_eq!(
            sched("manual", "", "UTC").first(utc("2026-12-02T00:00:00Z")),
            None
        );
    }

    #[test]
    fn start_and_end_bound_the_runs() {
        let s = Schedule::parse(
            "hourly",
            Some("0"),
            "UTC",
            Some(utc("2026-12-03T00:00:00Z")),
            Some(utc("2026-12-03T02:00:00Z")),
        )
        .unwrap();
        let first = s.first(utc("2026-12-02T05:25:00Z")).unwrap();
        assert_eq!(first, utc("2026-12-03T00:00:00Z"));
        let second = s.after(first).unwrap();
        let third = s.after(second).unwrap();
        assert_eq!(third, utc("2026-12-03T02:00:00Z"));
        assert_eq!(s.after(third), None);
    }

    fn task(next: Option<&str>, once: bool) -> DueTask {
        DueTask {
            id: uuid::Uuid::nil(),
            name: "t".into(),
            catch_up_once: once,
            planned_from: utc("2026-12-02T05:25:00Z"),
            next_run_at: next.map(utc),
        }
    }

    #[test]
    fn due_tasks_run_and_missed_ticks_follow_the_policy() {
        let s = sched("hourly", "45", "UTC");
        let g = Duration::from_secs(60);
        // Planned: nothing before 6:45.
        assert_eq!(
            decide(&s, &task(None, true), utc("2026-12-02T06:00:00Z"), g),
            Decision::Wait {
                next: Some(utc("2026-12-02T06:45:00Z"))
            }
        );
        // On time.
        assert_eq!(
            decide(
                &s,
                &task(Some("2026-12-02T06:45:00Z"), true),
                utc("2026-12-02T06:45:10Z"),
                g
            ),
            Decision::Run {
                due: utc("2026-12-02T06:45:00Z"),
                catch_up: false,
                next: Some(utc("2026-12-02T07:45:00Z")),
                skipped: 0
            }
        );
        // Down from 6:40 to 9:50: 6:45, 7:45, 8:45, 9:45 passed. once: one catch-up run for 9:45.
        let now = utc("2026-12-02T09:50:00Z");
        assert_eq!(
            decide(&s, &task(Some("2026-12-02T06:45:00Z"), true), now, g),
            Decision::Run {
                due: utc("2026-12-02T09:45:00Z"),
                catch_up: true,
                next: Some(utc("2026-12-02T10:45:00Z")),
                skipped: 3
            }
        );
        // skip: none of them (9:45 is 5 minutes late, past the grace of 1 minute).
        assert_eq!(
            decide(&s, &task(Some("2026-12-02T06:45:00Z"), false), now, g),
            Decision::Skip {
                next: Some(utc("2026-12-02T10:45:00Z")),
                skipped: 4
            }
        );
        // skip, but the newest is within the grace: it runs on time, the older are skipped.
        assert_eq!(
            decide(
                &s,
                &task(Some("2026-12-02T06:45:00Z"), false),
                utc("2026-12-02T09:45:30Z"),
                g
            ),
            Decision::Run {
                due: utc("2026-12-02T09:45:00Z"),
                catch_up: true,
                next: Some(utc("2026-12-02T10:45:00Z")),
                skipped: 3
            }
        );
    }
}
