//! Job schedules: a useful subset of systemd calendar expressions, and intervals.

use chrono::{DateTime, Datelike, Duration, Local, NaiveTime, TimeZone, Timelike};

/// When a job runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// Every day at this local time (`daily` is 00:00, `*-*-* 02:30`).
    Daily(NaiveTime),
    /// At minute 0 of every hour.
    Hourly,
    /// Mondays at 00:00.
    Weekly,
    /// The first of the month at 00:00.
    Monthly,
    /// Every interval, counted from the previous start (`every 30m`).
    Every(std::time::Duration),
}

impl Schedule {
    /// Parses `hourly`, `daily`, `weekly`, `monthly`, `*-*-* HH:MM[:SS]` or `every DURATION`.
    ///
    /// # Errors
    /// A message saying what is accepted.
    pub fn parse(s: &str) -> Result<Schedule, String> {
        let s = s.trim();
        let bad = || {
            format!("{s:?} is not a schedule: use hourly, daily, weekly, monthly, \"*-*-* HH:MM\" or \"every 30m\"")
        };
        match s {
            "hourly" => return Ok(Schedule::Hourly),
            "daily" => return Ok(Schedule::Daily(NaiveTime::MIN)),
            "weekly" => return Ok(Schedule::Weekly),
            "monthly" => return Ok(Schedule::Monthly),
            _ => {}
        }
        if let Some(d) = s.strip_prefix("every ") {
            let d = crate::units::duration(d).map_err(|_| bad())?;
            if d.is_zero() {
                return Err(bad());
            }
            return Ok(Schedule::Every(d));
        }
        if let Some(t) = s.strip_prefix("*-*-* ") {
            let time = NaiveTime::parse_from_str(t, "%H:%M:%S")
                .or_else(|_| NaiveTime::parse_from_str(t, "%H:%M"))
                .map_err(|_| bad())?;
            return Ok(Schedule::Daily(time));
        }
        Err(bad())
    }

    /// The first start strictly after `after` (the previous start, or the agent's start).
    pub fn next(&self, after: DateTime<Local>) -> DateTime<Local> {
        match self {
            Schedule::Every(d) => after + Duration::from_std(*d).expect("sane interval"),
            Schedule::Hourly => {
                let top = after
                    .with_minute(0)
                    .and_then(|t| t.with_second(0))
                    .and_then(|t| t.with_nanosecond(0));
                top.expect("valid time") + Duration::hours(1)
            }
            Schedule::Daily(time) => {
                let today = local(after.date_naive().and_time(*time));
                if today > after {
                    today
                } else {
                    local((after.date_naive() + Duration::days(1)).and_time(*time))
                }
            }
            Schedule::Weekly => {
                let days = 7 - after.weekday().num_days_from_monday() as i64;
                local((after.date_naive() + Duration::days(days)).and_time(NaiveTime::MIN))
            }
            Schedule::Monthly => {
                let (y, m) = if after.month() == 12 {
                    (after.year() + 1, 1)
                } else {
                    (after.year(), after.month() + 1)
                };
                local(
                    chrono::NaiveDate::from_ymd_opt(y, m, 1)
                        .expect("valid date")
                        .and_time(NaiveTime::MIN),
                )
            }
        }
    }
}

/// A local time; in a DST gap the later of the candidates, skipping forward an hour if none.
fn local(naive: chrono::NaiveDateTime) -> DateTime<Local> {
    Local
        .from_local_datetime(&naive)
        .latest()
        .or_else(|| {
            Local
                .from_local_datetime(&(naive + Duration::hours(1)))
                .latest()
        })
        .expect("a local time exists within an hour")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_computes_next_starts() {
        let t = local(
            chrono::NaiveDate::from_ymd_opt(2026, 11, 23)
                .unwrap()
                .and_hms_opt(10, 15, 0)
                .unwrap(),
        );
        assert_eq!(Schedule::parse("hourly").unwrap().next(t).hour(), 11);
        let at = Schedule::parse("*-*-* 02:30").unwrap().next(t);
        assert_eq!((at.day(), at.hour(), at.minute()), (24, 2, 30));
        let at = Schedule::parse("*-*-* 23:00:00").unwrap().next(t);
        assert_eq!((at.day(), at.hour()), (23, 23));
        assert_eq!(
            Schedule::parse("weekly").unwrap().next(t).weekday(),
            chrono::Weekday::Mon
        );
        assert_eq!(Schedule::parse("monthly").unwrap().next(t).day(), 1);
        assert_eq!(
            Schedule::parse("every 90s").unwrap().next(t) - t,
            Duration::seconds(90)
        );
        assert!(Schedule::parse("every 0s").is_err());
        assert!(Schedule::parse("fortnightly")
            .unwrap_err()
            .contains("fortnightly"));
    }
}
