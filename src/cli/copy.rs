//! `tresor copy`: snapshots into a second repository (`tresor::commands::copy`).

use clap::Args;
use std::process::ExitCode;
use tresor::commands::copy::CopyOptions;
use tresor::progress::Progress;

use super::*;

#[derive(Args)]
pub(crate) struct CopyArgs {
    #[command(flatten)]
    pub(crate) out: JsonFlag,
    #[command(flatten)]
    pub(crate) options: CopyOptions,
}

pub(crate) async fn copy(g: &Global, args: &CopyArgs) -> anyhow::Result<ExitCode> {
    let source_access = access(g)?;
    let source = source_access
        .open(|| ask_secret(&source_access.url, false))
        .await?;
    let target_access = args.options.target(&source_access);
    let target = target_access
        .open(|| ask_secret(&target_access.url, false))
        .await?;
    let options = args.options.clone();
    let progress = Progress::new(!g.quiet && !options.dry_run, "copy", None);
    let (rt, cache, p) = (
        tokio::runtime::Handle::current(),
        cache_dir(g),
        progress.clone(),
    );
    let report = tokio::task::spawn_blocking(move || {
        tresor::commands::copy::copy(&source, &target, &rt, cache.as_deref(), &options, &p)
    })
    .await??;
    progress.finish();
    if g.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if report.dry_run {
        println!(
            "would copy {} snapshots ({} there already): {}",
            report.copied.len(),
            report.present,
            report.copied.join(" ")
        );
    } else {
        println!(
            "copied {} snapshots ({} chunks, {} new to the target; {} chunks it had); {} there already",
            report.copied.len(),
            report.chunks_copied,
            human_bytes(report.bytes_copied),
            report.chunks_present,
            report.present
        );
        for (id, why) in &report.failed {
            eprintln!("FAILED: snapshot {id}: {why}");
        }
    }
    Ok(if report.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_PARTIAL)
    })
}
