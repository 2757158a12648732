//! Retention: which snapshots a `forget` policy keeps, and removing the others.
//!
//! Snapshots are grouped by source (host, kind, name). In each group, a snapshot is kept if
//! any rule keeps it: the newest `last` ones; the newest snapshot of each of the newest
//! `hourly` hours, `daily` days, `weekly` ISO weeks, `monthly` months and `yearly` years that
//! have one; every snapshot taken within `within` of the group's newest one; every
//! protected snapshot; and every member of a workload snapshot that stays. The rest may be
//! forgotten. Buckets use UTC. [`apply`] is a pure
//! function of the snapshot list, so it is tested on dates alone; [`forget`] carries it out.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Datelike, Utc};
use serde::Serialize;

use std::sync::Arc;

use crate::error::Result;
use crate::repository::Repository;
use crate::snapshot::{Filter, Kind, Listed};

/// A retention policy. All zero / `None` keeps nothing (callers refuse such a policy).
#[derive(Clone, Debug, Default)]
pub struct Policy {
    pub last: usize,
    pub hourly: usize,
    pub daily: usize,
    pub weekly: usize,
    pub monthly: usize,
    pub yearly: usize,
    pub within: Option<chrono::Duration>,
}

impl Policy {
    /// Whether the policy keeps anything at all.
    pub fn is_empty(&self) -> bool {
        self.last + self.hourly + self.daily + self.weekly + self.monthly + self.yearly == 0
            && self.within.is_none()
    }
}

/// The decision for one snapshot.
#[derive(Clone, Debug, Serialize)]
pub struct Decision {
    pub id: String,
    pub time: DateTime<Utc>,
    pub keep: bool,
    /// Why it is kept (`last`, `daily`, `within`, `protected`, ...); empty when forgotten.
    pub reasons: Vec<&'static str>,
}

/// The decisions for one source.
#[derive(Clone, Debug, Serialize)]
pub struct Group {
    pub host: String,
    pub kind: Kind,
    pub name: String,
    /// Newest first.
    pub snapshots: Vec<Decision>,
}

/// Applies `policy` to the snapshots `filter` selects and, unless `dry_run`, removes the
/// snapshot records it does not keep (their data stays until `gc`). Returns the decisions and
/// how many were (or would be) removed.
///
/// # Errors
/// Store errors; [`crate::Error::DeleteRefused`] with an append-only credential, before
/// anything is removed.
pub async fn forget(
    repo: &Arc<Repository>,
    policy: &Policy,
    filter: &Filter,
    dry_run: bool,
) -> Result<(Vec<Group>, usize)> {
    let listed = crate::snapshot::list(repo, filter).await?;
    let protected = repo.protected_ids().await?;
    let mut groups = apply(policy, &listed, &protected);
    keep_workload_members(repo, &mut groups).await?;
    let mut removed = 0;
    for d in groups.iter().flat_map(|g| &g.snapshots).filter(|d| !d.keep) {
        if !dry_run {
            repo.delete_snapshot(&d.id).await?;
        }
        removed += 1;
    }
    Ok((groups, removed))
}

/// Maps a time to its hour, day, week, month or year.
/// Keeps every member of a workload snapshot that stays (whether or not `forget` selected the
/// workload): forgetting one would leave a twin that cannot be brought up.
async fn keep_workload_members(repo: &Arc<Repository>, groups: &mut [Group]) -> Result<()> {
    let leaving: HashSet<String> = groups
        .iter()
        .flat_map(|g| &g.snapshots)
        .filter(|d| !d.keep)
        .map(|d| d.id.clone())
        .collect();
    if leaving.is_empty() {
        return Ok(());
    }
    let workloads = Filter {
        kind: Some(Kind::Workload),
        ..Filter::default()
    };
    let mut members = HashSet::new();
    for w in crate::snapshot::list(repo, &workloads).await? {
        if leaving.contains(&w.id) {
            continue;
        }
        let (repo, rt) = (Arc::clone(repo), tokio::runtime::Handle::current());
        let record =
            tokio::task::spawn_blocking(move || crate::workload::load_record(&repo, &rt, &w))
                .await
                .expect("workload record reader panicked")?;
        members.extend(record.members().into_iter().map(str::to_string));
    }
    for d in groups.iter_mut().flat_map(|g| &mut g.snapshots) {
        if !d.keep && members.contains(&d.id) {
            d.keep = true;
            d.reasons.push("workload");
        }
    }
    Ok(())
}

type BucketOf = fn(&DateTime<Utc>) -> i64;

/// Applies `policy` to `snapshots`; `protected` ids are always kept.
pub fn apply(policy: &Policy, snapshots: &[Listed], protected: &HashSet<String>) -> Vec<Group> {
    let mut groups: BTreeMap<(String, String, String), Vec<&Listed>> = BTreeMap::new();
    for s in snapshots {
        let kind = format!("{:?}", s.snapshot.kind);
        groups
            .entry((s.snapshot.host.clone(), kind, s.snapshot.name.clone()))
            .or_default()
            .push(s);
    }
    groups
        .into_values()
        .map(|mut members| {
            members.sort_by(|a, b| (b.snapshot.time, &b.id).cmp(&(a.snapshot.time, &a.id)));
            let newest = members[0].snapshot.time;
            let mut decisions: Vec<Decision> = members
                .iter()
                .map(|s| Decision {
                    id: s.id.clone(),
                    time: s.snapshot.time,
                    keep: false,
                    reasons: Vec::new(),
                })
                .collect();
            let buckets: [(&'static str, usize, BucketOf); 5] = [
                ("hourly", policy.hourly, |t| t.timestamp().div_euclid(3600)),
                ("daily", policy.daily, |t| t.num_days_from_ce() as i64),
                ("weekly", policy.weekly, |t| {
                    let w = t.iso_week();
                    w.year() as i64 * 100 + w.week() as i64
                }),
                ("monthly", policy.monthly, |t| {
                    t.year() as i64 * 100 + t.month() as i64
                }),
                ("yearly", policy.yearly, |t| t.year() as i64),
            ];
            for (i, d) in decisions.iter_mut().enumerate() {
                if i < policy.last {
                    d.reasons.push("last");
                }
                if policy.within.is_some_and(|w| d.time >= newest - w) {
                    d.reasons.push("within");
                }
                if protected.contains(&d.id) {
                    d.reasons.push("protected");
                }
            }
            for (name, count, bucket) in buckets {
                let mut seen = Vec::new();
                for d in decisions.iter_mut() {
                    let b = bucket(&d.time);
                    if seen.len() < count && !seen.contains(&b) {
                        seen.push(b);
                        d.reasons.push(name);
                    }
                }
            }
            for d in &mut decisions {
                d.keep = !d.reasons.is_empty();
            }
            let first = members[0];
            Group {
                host: first.snapshot.host.clone(),
                kind: first.snapshot.kind,
                name: first.snapshot.name.clone(),
                snapshots: decisions,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{RootFormat, Snapshot, Summary, RECORD_VERSION};

    fn snap(id: &str, name: &str, time: &str) -> Listed {
        Listed {
            id: id.into(),
            snapshot: Snapshot {
                version: RECORD_VERSION,
                kind: Kind::Volume,
                name: name.into(),
                source: "/data".into(),
                host: "h".into(),
                time: DateTime::parse_from_rfc3339(time)
                    .unwrap()
                    .with_timezone(&Utc),
                tags: vec![],
                partial: false,
                root_format: RootFormat::Tree,
                root: vec![],
                payload: None,
                parent: None,
                summary: Summary::default(),
                image: None,
                errors: vec![],
            },
        }
    }

    fn kept(policy: &Policy, snaps: &[Listed], protected: &[&str]) -> Vec<String> {
        let protected = protected.iter().map(|s| s.to_string()).collect();
        let mut out: Vec<String> = apply(policy, snaps, &protected)
            .into_iter()
            .flat_map(|g| g.snapshots)
            .filter(|d| d.keep)
            .map(|d| d.id)
            .collect();
        out.sort();
        out
    }

    #[test]
    fn policies_keep_exactly_what_they_name() {
        // Two snapshots a day for ten days, plus one a month earlier and one a year earlier.
        let mut snaps = Vec::new();
        for day in 1..=10 {
            snaps.push(snap(
                &format!("d{day:02}a"),
                "v",
                &format!("2026-11-{day:02}T01:00:00Z"),
            ));
            snaps.push(snap(
                &format!("d{day:02}b"),
                "v",
                &format!("2026-11-{day:02}T13:00:00Z"),
            ));
        }
        snaps.push(snap("oct", "v", "2026-10-15T12:00:00Z"));
        snaps.push(snap("y2025", "v", "2025-06-01T12:00:00Z"));
        snaps.push(snap("other", "w", "2020-01-01T00:00:00Z"));
        let days = |n| Policy {
            daily: n,
            ..Policy::default()
        };
        let table: Vec<(Policy, Vec<&str>)> = vec![
            (
                Policy {
                    last: 3,
                    ..Policy::default()
                },
                vec!["d09b", "d10a", "d10b", "other"],
            ),
            (days(2), vec!["d09b", "d10b", "other"]),
            (
                Policy {
                    monthly: 2,
                    ..Policy::default()
                },
                vec!["d10b", "oct", "other"],
            ),
            (
                Policy {
                    yearly: 5,
                    ..Policy::default()
                },
                vec!["d10b", "other", "y2025"],
            ),
            // ISO weeks: Nov 9-10 are week 46, Nov 2-8 week 45, Nov 1 week 44.
            (
                Policy {
                    weekly: 3,
                    ..Policy::default()
                },
                vec!["d01b", "d08b", "d10b", "other"],
            ),
            (
                Policy {
                    hourly: 2,
                    ..Policy::default()
                },
                vec!["d10a", "d10b", "other"],
            ),
            (
                Policy {
                    within: Some(chrono::Duration::hours(36)),
                    ..Policy::default()
                },
                vec!["d09a", "d09b", "d10a", "d10b", "other"],
            ),
            (
                Policy {
                    last: 1,
                    daily: 1,
                    ..Policy::default()
                },
                vec!["d10b", "other"],
            ),
        ];
        for (policy, want) in table {
            assert_eq!(kept(&policy, &snaps, &[]), want, "{policy:?}");
        }
        assert_eq!(
            kept(
                &Policy {
                    last: 1,
                    ..Policy::default()
                },
                &snaps,
                &["y2025"]
            ),
            vec!["d10b", "other", "y2025"]
        );
        assert!(Policy::default().is_empty());
    }
}
