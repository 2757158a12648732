//! `tresor gc`: condemn unreferenced data, delete what an earlier run condemned.

use clap::Args;
use std::process::ExitCode;
use tresor::units;

use super::*;

#[derive(Args)]
pub(crate) struct GcArgs {
    #[command(flatten)]
    pub(crate) out: JsonFlag,
    /// Data younger than this is never condemned, and what a run condemns is deleted by the
    /// first run at least this much later (0s: in the same run, once no older backup runs).
    #[arg(long, default_value = "1h", value_parser = units::duration)]
    pub(crate) grace: std::time::Duration,
    /// Report what would be condemned and deleted; change nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// How long a sweep waits for running backups to declare chunks they reuse.
    #[arg(long, default_value = "30s", hide = true, value_parser = units::duration)]
    pub(crate) declare_window: std::time::Duration,
}

pub(crate) async fn gc(g: &Global, args: &GcArgs) -> anyhow::Result<ExitCode> {
    let options = tresor::gc::GcOptions {
        grace: args.grace,
        dry_run: args.dry_run,
        declare_window: args.declare_window,
    };
    let repo = open(g).await?;
    let rt = tokio::runtime::Handle::current();
    let scratch = cache_dir(g);
    let report = tokio::task::spawn_blocking(move || {
        tresor::gc::run(&repo, &rt, scratch.as_deref(), &options)
    })
    .await??;
    if g.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    let deleted = if report.dry_run {
        "would delete"
    } else {
        "deleted"
    };
    println!(
        "{} snapshots use {} of {} stored chunks ({})",
        report.snapshots,
        report.chunks_referenced,
        report.chunks_stored,
        human_bytes(report.bytes_stored)
    );
    match &report.condemned {
        Some(p) => println!(
            "{}condemned {} chunks ({}) and {} blob indexes in plan {}",
            if report.dry_run { "would have " } else { "" },
            p.chunks,
            human_bytes(p.bytes),
            p.blob_indexes,
            p.id
        ),
        None => println!("nothing new to condemn"),
    }
    for s in &report.swept {
        println!(
            "plan {}: {deleted} {} chunks ({}) and {} blob indexes; kept {} that running backups reuse and {} that newer snapshots use",
            s.plan,
            s.chunks_deleted,
            human_bytes(s.bytes_freed),
            s.blob_indexes_deleted,
            s.kept_rescued,
            s.kept_referenced
        );
    }
    for w in &report.waiting {
        println!("plan {} waits: {}", w.plan, w.reason);
        for s in &w.sessions {
            println!("  {s}");
        }
    }
    if report.sessions_removed > 0 {
        println!(
            "removed {} ended backup session records",
            report.sessions_removed
        );
    }
    Ok(ExitCode::SUCCESS)
}
