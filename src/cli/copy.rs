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
    /// Snapshot ids, unique prefixes or names (their newest snapshot) [default: every snapshot
    /// the filter selects]. A workload brings its members.
    pub(crate) snapshots: Vec<String>,
    #[command(flatten)]
    pub(crate) filter: FilterArgs,
    /// The target repository (made with `init --same-chunker-as` the source when encrypted).
    #[arg(long, value_name = "URL")]
    pub(crate) to_repo: String,
    /// Key file of the target repository.
    #[arg(long)]
    pub(crate) to_key_file: Option<std::path::PathBuf>,
    /// Password file of the target repository.
    #[arg(long)]
    pub(crate) to_password_file: Option<std::path::PathBuf>,
    /// S3 endpoint of the target [default: the source's].
    #[arg(long)]
    pub(crate) to_s3_endpoint: Option<String>,
    /// Print which snapshots would be copied (after the same checks); copy nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
}

pub(crate) async fn copy(g: &Global, args: &CopyArgs) -> anyhow::Result<ExitCode> {
    let source = open(g).await?;
    let target = open_other(
        g,
        &args.to_repo,
        args.to_key_file.as_deref(),
        args.to_password_file.as_deref(),
        args.to_s3_endpoint.as_deref(),
    )
    .await?;
    let options = CopyOptions {
        snapshots: args.snapshots.clone(),
        filter: args.filter.to_filter(),
        dry_run: args.dry_run,
    };
    let progress = Progress::new(!g.quiet, "copy", None);
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
