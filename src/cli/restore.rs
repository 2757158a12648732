//! `tresor restore volume` and `tresor restore image`.

use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tresor::progress::Progress;
use tresor::snapshot::{self, Kind};
use tresor::volume::{self, RestoreOptions};

use super::*;

#[derive(Subcommand)]
pub(crate) enum RestoreCommand {
    /// Restore a volume snapshot into a directory (trees) or a file or device (block images).
    Volume(RestoreVolumeArgs),
    /// Restore an image snapshot into a registry or an OCI layout, with the same digests.
    Image(RestoreImageArgs),
    /// Bring a workload up elsewhere: images into a registry, volumes into the engine, a
    /// rewritten compose file, and (--up) the project started and healthy.
    Workload(super::workload::RestoreWorkloadArgs),
}

#[derive(Args)]
pub(crate) struct RestoreImageArgs {
    #[command(flatten)]
    pub(crate) out: JsonFlag,
    /// Snapshot id, unique id prefix, or the source reference (its newest snapshot).
    pub(crate) snapshot: String,
    /// docker://HOST/REPO[:TAG] or oci:DIR[:TAG] [tag default: the source tag].
    #[arg(long)]
    pub(crate) to: String,
    #[command(flatten)]
    pub(crate) registry: RegistryArgs,
}

#[derive(Args)]
pub(crate) struct RestoreVolumeArgs {
    #[command(flatten)]
    pub(crate) out: JsonFlag,
    /// Snapshot id, unique id prefix, or volume name (its newest snapshot).
    pub(crate) snapshot: String,
    /// Target directory, file or block device.
    #[arg(long)]
    pub(crate) to: PathBuf,
    /// Restore only this path of the tree (as stored, relative to the volume root) and what
    /// is below it (repeatable).
    #[arg(long, visible_alias = "include")]
    pub(crate) path: Vec<String>,
    /// As root, also restore device nodes and setuid/setgid bits from an unencrypted
    /// repository (whoever may write its store could have forged them). Encrypted repositories
    /// restore them always: only a key holder can write a snapshot there.
    #[arg(long)]
    pub(crate) restore_special: bool,
}

pub(crate) async fn restore_image(g: &Global, args: &RestoreImageArgs) -> anyhow::Result<ExitCode> {
    use tresor::oci::ImageTarget;
    let repo = open(g).await?;
    let snap = snapshot::resolve(&repo, &args.snapshot, Some(Kind::Image)).await?;
    let target = ImageTarget::parse(&args.to)?;
    let host = match &target {
        ImageTarget::Registry { reference, .. } => reference.registry().to_string(),
        ImageTarget::Layout { .. } => String::new(),
    };
    let registry = args.registry.registry(g, &[host.as_str()])?;
    let progress = Progress::new(
        !g.quiet,
        &format!("restore {}", &snap.id[..8]),
        Some(snap.snapshot.summary.logical_bytes),
    );
    let rt = tokio::runtime::Handle::current();
    let p = progress.clone();
    let report = tokio::task::spawn_blocking(move || {
        tresor::oci::restore(&repo, &rt, &registry, &snap, &target, &p)
    })
    .await??;
    progress.finish();
    if g.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "restored snapshot {} to {}: {} blobs pushed ({}), {} mounted, {} already there, {} manifests in {:.1}s",
            &report.snapshot[..8],
            report.target,
            report.blobs_pushed,
            human_bytes(report.bytes_pushed),
            report.blobs_mounted,
            report.blobs_skipped,
            report.manifests.len(),
            report.duration_ms as f64 / 1000.0
        );
        for m in &report.manifests {
            println!(
                "  {} {:<8} {} {}",
                if m.matched { "ok      " } else { "MISMATCH" },
                format!("{:?}", m.role).to_lowercase(),
                m.digest,
                m.tags.join(",")
            );
        }
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub(crate) async fn restore_volume(
    g: &Global,
    args: &RestoreVolumeArgs,
) -> anyhow::Result<ExitCode> {
    let repo = open(g).await?;
    let snap = snapshot::resolve(&repo, &args.snapshot, Some(Kind::Volume)).await?;
    let options = RestoreOptions {
        paths: args.path.clone(),
        chown: nix::unistd::geteuid().is_root(),
        special: args.restore_special || repo.is_encrypted(),
    };
    let progress = Progress::new(
        !g.quiet,
        &format!("restore {}", &snap.id[..8]),
        Some(snap.snapshot.summary.logical_bytes),
    );
    let rt = tokio::runtime::Handle::current();
    let (p, to) = (progress.clone(), args.to.clone());
    let report =
        tokio::task::spawn_blocking(move || volume::restore(&repo, &rt, &snap, &to, &options, &p))
            .await??;
    progress.finish();
    if g.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "restored snapshot {} to {}: {} files, {} dirs, {} written, {} chunks verified in {:.1}s",
            &report.snapshot[..8],
            report.target,
            report.files,
            report.dirs,
            human_bytes(report.bytes_written),
            report.chunks_verified,
            report.duration_ms as f64 / 1000.0
        );
        for s in &report.skipped {
            eprintln!("skipped: {s}");
        }
        for f in &report.failed {
            eprintln!("FAILED: {f}");
        }
    }
    Ok(if report.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_PARTIAL)
    })
}
