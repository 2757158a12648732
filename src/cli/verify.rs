//! `tresor verify`: its flags, and the summary a person reads.

use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;
use tresor::commands;
use tresor::localfile::{write_atomically, SHARED};
use tresor::progress::Progress;
use tresor::units;

use super::*;

#[derive(Args)]
pub(crate) struct VerifyArgs {
    /// Read, decrypt and re-hash every referenced chunk (default: check that they exist).
    #[arg(long)]
    pub(crate) read_data: bool,
    /// Read only a deterministic share: N/M (1/7 to 7/7 over a week read everything once) or P%.
    #[arg(long, value_name = "SHARE", conflicts_with = "read_data", value_parser = units::share)]
    pub(crate) read_data_subset: Option<tresor::verify::Part>,
    /// Only this snapshot (id, unique prefix of 4+ hex digits, or name meaning its newest;
    /// repeatable).
    #[arg(long = "snapshot", value_name = "ID")]
    pub(crate) snapshots: Vec<String>,
    #[command(flatten)]
    pub(crate) filter: FilterArgs,
    /// Only snapshots taken since then: RFC 3339, YYYY-MM-DD, or an age like 7d or 12h.
    #[arg(long, value_parser = units::since)]
    pub(crate) since: Option<chrono::DateTime<chrono::Utc>>,
    /// Check only shard I of N of the chunk space, so N hosts can verify one store together.
    #[arg(long, value_name = "I/N", value_parser = units::shard)]
    pub(crate) shard: Option<tresor::verify::Part>,
    /// Write the JSON report to FILE (stdout when FILE is left out).
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "-")]
    pub(crate) json: Option<PathBuf>,
    /// Write Prometheus metrics to FILE (for node_exporter's textfile collector).
    #[arg(long, value_name = "FILE")]
    pub(crate) metrics: Option<PathBuf>,
    /// Show when each snapshot was last checked and last fully verified, instead of verifying.
    #[arg(long)]
    pub(crate) status: bool,
}

/// Exit code of `verify` when it found problems; 2 (could not run) is any error.
pub(crate) const EXIT_VERIFY_PROBLEMS: u8 = 1;

pub(crate) const EXIT_VERIFY_FAILED: u8 = 2;

pub(crate) async fn verify(g: &Global, args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    use tresor::verify::{self, VerifyOptions};
    let repo = open(g).await?;
    if args.status {
        let history = verify::status(&repo).await?;
        if g.json {
            write_json(args.json.as_deref(), &serde_json::to_value(&history)?)?;
        } else {
            println!(
                "{:<10} {:<20} {:<20} {:<8} {:<20} name",
                "id", "taken", "last checked", "result", "last full read"
            );
            let t = |t: Option<chrono::DateTime<chrono::Utc>>| {
                t.map_or("never".to_string(), |t| {
                    t.format("%Y-%m-%d %H:%M:%S").to_string()
                })
            };
            for h in &history {
                let result = match h.last_result_ok {
                    Some(true) => "ok",
                    Some(false) => "BROKEN",
                    None => "-",
                };
                println!(
                    "{:<10} {:<20} {:<20} {:<8} {:<20} {}",
                    &h.id[..8],
                    h.time.format("%Y-%m-%d %H:%M:%S"),
                    t(h.last_checked),
                    result,
                    t(h.last_fully_verified),
                    h.name
                );
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let read_data = match (args.read_data_subset, args.read_data) {
        (Some(share), _) => Some(Some(share)),
        (None, true) => Some(None),
        (None, false) => None,
    };
    let shard = args.shard;
    let options = VerifyOptions {
        read_data,
        filter: args.filter.to_filter(),
        snapshots: args.snapshots.clone(),
        since: args.since,
        shard,
    };
    let progress = Progress::new(!g.quiet && read_data.is_some(), "verify", None);
    let rt = tokio::runtime::Handle::current();
    let p = progress.clone();
    let cache = cache_dir(g);
    let report = tokio::task::spawn_blocking(move || {
        commands::verify::verify(&repo, &rt, cache.as_deref(), &options, &p)
    })
    .await??;
    progress.finish();
    if let Some(path) = &args.metrics {
        write_atomically(path, SHARED, verify::metrics(&report).as_bytes())?;
    }
    if let Some(path) = &args.json {
        write_json(Some(path), &serde_json::to_value(&report)?)?;
    }
    if args.json.as_deref() != Some(std::path::Path::new("-")) {
        print_verify_summary(&report);
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_VERIFY_PROBLEMS)
    })
}

pub(crate) fn print_verify_summary(report: &tresor::verify::Report) {
    let s = &report.stats;
    let verdict = if report.ok {
        "all restorable".to_string()
    } else {
        format!("{} BROKEN", s.snapshots_broken)
    };
    println!(
        "verified {} snapshots (read data: {}{}): {} ok, {verdict}",
        s.snapshots_checked,
        report.read_data,
        report
            .shard
            .as_ref()
            .map(|s| format!(", shard {s}"))
            .unwrap_or_default(),
        s.snapshots_ok,
    );
    println!(
        "chunks: {} referenced, {} missing, {} read ({}), {} corrupt; {} unreferenced ({}); {:.1}s",
        s.chunks_referenced,
        s.chunks_missing,
        s.chunks_read,
        human_bytes(s.bytes_read),
        s.chunks_corrupt,
        s.chunks_unreferenced,
        human_bytes(s.bytes_unreferenced),
        report.duration_ms as f64 / 1000.0
    );
    for p in &report.problems {
        println!("PROBLEM {:?} {}: {}", p.kind, p.object, p.reason);
        for a in &p.affects {
            match &a.path {
                Some(path) => println!(
                    "    used by snapshot {} ({}) file {path}",
                    &a.snapshot[..8],
                    a.name
                ),
                None => println!("    used by snapshot {} ({})", &a.snapshot[..8], a.name),
            }
        }
        if p.more_affected > 0 {
            println!("    and {} more uses", p.more_affected);
        }
    }
    for snap in report.snapshots.iter().filter(|s| !s.ok) {
        println!(
            "BROKEN snapshot {} {} {} from {} at {}",
            &snap.id[..8],
            snap.kind,
            snap.name,
            snap.host,
            snap.time.to_rfc3339()
        );
    }
}
