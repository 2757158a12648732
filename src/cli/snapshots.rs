//! Looking at snapshots and deciding which stay: `snapshots`, `protect`, `forget`.

use clap::Args;
use serde_json::json;
use std::process::ExitCode;
use tresor::snapshot::{self, Kind};
use tresor::units;

use super::*;

#[derive(Args)]
pub(crate) struct SnapshotsArgs {
    #[command(flatten)]
    pub(crate) out: JsonFlag,
    #[command(flatten)]
    pub(crate) filter: FilterArgs,
}

pub(crate) async fn snapshots(g: &Global, args: &SnapshotsArgs) -> anyhow::Result<ExitCode> {
    let repo = open(g).await?;
    let filter = args.filter.to_filter();
    let listed = snapshot::list(&repo, &filter).await?;
    // A workload's consistency is in its record: read for workloads only (a few).
    let rt = tokio::runtime::Handle::current();
    let workload = |l: &tresor::snapshot::Listed| {
        (l.snapshot.kind == Kind::Workload)
            .then(|| {
                tokio::task::block_in_place(|| tresor::workload::load_record(&repo, &rt, l)).ok()
            })
            .flatten()
    };
    if g.json {
        let mut all = Vec::new();
        for l in &listed {
            let mut out = snapshot_json(l);
            if let Some(r) = workload(l) {
                out["consistency"] = json!(r.consistency);
                out["downtime_ms"] = json!(r.downtime_ms);
                out["consistent"] = json!(r.is_consistent());
            }
            all.push(out);
        }
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<10} {:<20} {:<12} {:<7} {:<20} {:>10} {:>10}  flags",
        "id", "time", "host", "kind", "name", "size", "new"
    );
    for l in &listed {
        let s = &l.snapshot;
        println!(
            "{:<10} {:<20} {:<12} {:<7} {:<20} {:>10} {:>10}  {}",
            &l.id[..8],
            s.time.format("%Y-%m-%d %H:%M:%S"),
            s.host,
            format!("{:?}", s.kind).to_lowercase(),
            s.name,
            human_bytes(s.summary.logical_bytes),
            human_bytes(s.summary.chunks.bytes_new),
            match workload(l) {
                Some(r) => format!(
                    "{:?} {:.1}s{}",
                    r.consistency,
                    r.downtime_ms as f64 / 1000.0,
                    if r.is_consistent() { "" } else { " live" }
                )
                .to_lowercase(),
                None if s.partial => "partial".into(),
                None => String::new(),
            },
        );
    }
    println!("{} snapshots", listed.len());
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub(crate) struct ProtectArgs {
    /// Snapshot id, unique id prefix (4+ hex digits), or name (its newest snapshot).
    pub(crate) snapshot: String,
    /// Lift the protection.
    #[arg(long)]
    pub(crate) remove: bool,
}

pub(crate) async fn protect(g: &Global, args: &ProtectArgs) -> anyhow::Result<ExitCode> {
    let repo = open(g).await?;
    let id = snapshot::resolve(&repo, &args.snapshot, None).await?.id;
    repo.set_protected(&id, !args.remove).await?;
    let state = if args.remove {
        "no longer protected"
    } else {
        "protected from forget"
    };
    println!("snapshot {} is {state}", &id[..8]);
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub(crate) struct ForgetArgs {
    #[command(flatten)]
    pub(crate) out: JsonFlag,
    /// Keep the newest N snapshots.
    #[arg(long, default_value_t = 0)]
    pub(crate) keep_last: usize,
    /// Keep the newest snapshot of each of the last N hours that have one.
    #[arg(long, default_value_t = 0)]
    pub(crate) keep_hourly: usize,
    #[arg(long, default_value_t = 0)]
    pub(crate) keep_daily: usize,
    #[arg(long, default_value_t = 0)]
    pub(crate) keep_weekly: usize,
    #[arg(long, default_value_t = 0)]
    pub(crate) keep_monthly: usize,
    #[arg(long, default_value_t = 0)]
    pub(crate) keep_yearly: usize,
    /// Keep everything taken within this long of the newest snapshot (30d, 12h).
    #[arg(long, value_parser = units::span)]
    pub(crate) keep_within: Option<chrono::Duration>,
    #[command(flatten)]
    pub(crate) filter: FilterArgs,
    /// Show what would go, remove nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
}

pub(crate) async fn forget(g: &Global, args: &ForgetArgs) -> anyhow::Result<ExitCode> {
    use tresor::retention::Policy;
    let within = args.keep_within;
    let policy = Policy {
        last: args.keep_last,
        hourly: args.keep_hourly,
        daily: args.keep_daily,
        weekly: args.keep_weekly,
        monthly: args.keep_monthly,
        yearly: args.keep_yearly,
        within,
    };
    anyhow::ensure!(
        !policy.is_empty(),
        "give at least one --keep-* rule; forget never removes every snapshot of a source"
    );
    let repo = open(g).await?;
    let filter = args.filter.to_filter();
    let (groups, removed) =
        tresor::retention::forget(&repo, &policy, &filter, args.dry_run).await?;
    if g.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({ "dry_run": args.dry_run, "removed": removed, "groups": groups })
            )?
        );
    } else {
        for group in &groups {
            println!("{} {:?} {}:", group.host, group.kind, group.name);
            for d in &group.snapshots {
                let what = if d.keep {
                    format!("keep   ({})", d.reasons.join(", "))
                } else if args.dry_run {
                    "would remove".to_string()
                } else {
                    "removed".to_string()
                };
                println!(
                    "  {} {}  {what}",
                    &d.id[..8],
                    d.time.format("%Y-%m-%d %H:%M:%S")
                );
            }
        }
        let verb = if args.dry_run {
            "would remove"
        } else {
            "removed"
        };
        println!("{verb} {removed} snapshots; `tresor gc` frees the data only they used");
    }
    Ok(ExitCode::SUCCESS)
}
