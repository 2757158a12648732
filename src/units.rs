//! Durations, sizes, points in time and shares as users write them, parsed in one place for
//! the CLI (as clap value parsers, so a bad value fails before anything runs) and `agent.toml`.
//! Errors are plain strings: the caller names the flag or key.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::verify::Part;

/// `30s`, `5m`, `2h`, `1d` (and `500ms`).
///
/// # Errors
/// A message naming the value and the units allowed.
pub fn duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 5m, 2h"))?;
    let secs = match unit.trim() {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" | "sec" => n,
        "m" | "min" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?} (use s, m, h or d)"
            ))
        }
    };
    Ok(Duration::from_secs(secs))
}

/// A [`duration`] as a calendar span (for retention).
///
/// # Errors
/// Those of [`duration`], or a span too long to represent.
pub fn span(s: &str) -> Result<chrono::Duration, String> {
    chrono::Duration::from_std(duration(s)?).map_err(|_| format!("{s:?} is too long"))
}

/// `4096`, `256KiB`, `1MiB`, `4M`.
///
/// # Errors
/// A message naming the value, or the unit that is unknown.
pub fn size(s: &str) -> Result<u32, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?} (use KiB, MiB or GiB)")),
    };
    u32::try_from(n * mult).map_err(|_| format!("{s:?} is too large"))
}

/// `2026-11-01`, RFC 3339, or an age such as `7d`, `12h`, `30m` before now.
///
/// # Errors
/// A message naming the forms allowed.
pub fn since(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).expect("midnight").and_utc());
    }
    let (num, unit) = s.split_at(s.len().saturating_sub(1));
    let n: i64 = num
        .parse()
        .map_err(|_| format!("{s:?}: use RFC 3339, YYYY-MM-DD or an age like 7d"))?;
    let age = match unit {
        "d" => chrono::Duration::days(n),
        "h" => chrono::Duration::hours(n),
        "m" => chrono::Duration::minutes(n),
        _ => return Err(format!("{s:?}: the age unit must be d, h or m")),
    };
    Ok(Utc::now() - age)
}

/// A share of the chunk space: `N/M` or `P%` (see [`Part`]).
///
/// # Errors
/// A message saying what a share looks like.
pub fn share(s: &str) -> Result<Part, String> {
    Part::parse(s).map_err(|e| e.to_string())
}

/// A shard `I/N` (a share that is not a percentage).
///
/// # Errors
/// As [`share`], and for a percentage.
pub fn shard(s: &str) -> Result<Part, String> {
    let p = share(s)?;
    if p.n == 0 {
        return Err(format!("{s:?}: a shard is I/N, not a percentage"));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_unit_and_each_refusal() {
        assert_eq!(duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(duration("500ms").unwrap(), Duration::from_millis(500));
        assert!(duration("5 parsecs").is_err());
        assert_eq!(size("256KiB").unwrap(), 256 << 10);
        assert!(size("5GiB").is_err(), "beyond u32");
        assert!(size("3 furlongs").is_err());
        assert!(since("2026-11-01").is_ok() && since("7d").is_ok() && since("7w").is_err());
        assert!(shard("2/4").is_ok() && shard("5%").is_err());
        assert_eq!(span("1d").unwrap(), chrono::Duration::days(1));
    }
}
