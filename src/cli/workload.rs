//! `tresor backup workload` and `tresor restore workload`.

use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;
use tresor::commands::workload::{ComposeOptions, WorkloadBackup, WorkloadReport, WorkloadRestore};
use tresor::snapshot::{self, Kind};

use super::backup::RegistryArgs;
use super::*;

#[derive(Args)]
pub(crate) struct BackupWorkloadArgs {
    #[command(flatten)]
    pub(crate) out: JsonFlag,
    /// Workload name; snapshots of one name form its history.
    pub(crate) name: String,
    #[command(flatten)]
    pub(crate) options: ComposeOptions,
    /// Without --compose: an image of the workload, HOST/REPO[:TAG|@DIGEST] (repeatable).
    #[arg(long, conflicts_with = "compose")]
    pub(crate) image: Vec<String>,
    /// Without --compose: a volume of the workload, NAME=PATH (a directory or block device;
    /// repeatable).
    #[arg(long, value_name = "NAME=PATH", value_parser = volume_arg, conflicts_with = "compose")]
    pub(crate) volume: Vec<(String, PathBuf)>,
    /// Tag for the snapshots (repeatable).
    #[arg(long = "tag")]
    pub(crate) tags: Vec<String>,
    /// Host name recorded in the snapshots [default: this host's name].
    #[arg(long)]
    pub(crate) host: Option<String>,
    #[command(flatten)]
    pub(crate) registry: RegistryArgs,
}

#[derive(Args)]
pub(crate) struct RestoreWorkloadArgs {
    #[command(flatten)]
    pub(crate) out: JsonFlag,
    /// Snapshot id, unique id prefix, or workload name (its newest snapshot).
    pub(crate) snapshot: String,
    /// HOST[:PORT][/PREFIX]: the registry the images go to, as PREFIX/REPO.
    #[arg(long = "registry")]
    pub(crate) target_registry: String,
    /// Name of the new compose project [default: the original one].
    #[arg(long)]
    pub(crate) project: Option<String>,
    /// Directory for the rewritten compose.yaml, .env and bind-mounted paths.
    #[arg(long)]
    pub(crate) to: PathBuf,
    /// Start the project and wait until every service runs and is healthy.
    #[arg(long)]
    pub(crate) up: bool,
    /// Replace the contents of volumes that exist and are not empty, and restore as a project
    /// that exists (never as one that runs).
    #[arg(long)]
    pub(crate) force: bool,
    /// Print the plan (what goes where, bytes to move, blobs the target has, volumes that
    /// exist) and change nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// The container engine's API socket, e.g. Podman's /run/podman/podman.sock [default:
    /// DOCKER_HOST, else /var/run/docker.sock].
    #[arg(long, value_name = "PATH")]
    pub(crate) engine_socket: Option<PathBuf>,
    /// By name, take the newest snapshot whose volumes were all copied quiesced (stop, pause
    /// or exec mode), not simply the newest.
    #[arg(long)]
    pub(crate) consistent: bool,
    /// Grant what the project asks of this host: privileges, host namespaces, bind mounts of
    /// host paths, the engine socket, volume drivers and options from the record, and with
    /// --up a project from an unencrypted repository. Without it such a restore is refused,
    /// naming each (--dry-run prints them).
    #[arg(long)]
    pub(crate) allow_host_access: bool,
    /// When the restore gives up, keep the volumes it made and the containers it started
    /// (a rerun continues in volumes a restore of the same snapshot made).
    #[arg(long)]
    pub(crate) keep_partial: bool,
    #[command(flatten)]
    pub(crate) registry: RegistryArgs,
}

fn volume_arg(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => {
            Ok((name.to_string(), PathBuf::from(path)))
        }
        _ => Err(format!("{s:?}: write NAME=PATH, e.g. data=/srv/app/data")),
    }
}

pub(crate) async fn backup_workload(
    g: &Global,
    args: &BackupWorkloadArgs,
) -> anyhow::Result<ExitCode> {
    if !args.options.compose.is_empty() {
        args.registry.only_per_host()?;
    }
    let repo = open(g).await?;
    let rt = tokio::runtime::Handle::current();
    let cache = cache_dir(g);
    let what = WorkloadBackup {
        name: args.name.clone(),
        options: args.options.clone(),
        images: args.image.clone(),
        volumes: args.volume.clone(),
        host: args.host.clone().unwrap_or_else(host_name),
        tags: args.tags.clone(),
        pre: None,
        post: None,
    };
    // SIGTERM or Ctrl-C while containers are stopped or paused: start them again, then exit
    // as stopped (the snapshots made so far stay; no workload record claims a twin).
    let guard = tokio::spawn(async {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        eprintln!("{name}: starting the workload's containers again, then stopping");
        tresor::workload::engine::resume_all().await;
        std::process::exit(143);
    });
    let registry = |source: &tresor::oci::ImageSource| {
        args.registry
            .registry(g, &[source.registry_host().unwrap_or_default()])
    };
    let listed = tokio::task::block_in_place(|| {
        tresor::commands::workload::backup(&repo, &rt, cache.as_deref(), &what, registry)
    });
    guard.abort();
    let listed = listed?;
    let record =
        tokio::task::block_in_place(|| tresor::workload::load_record(&repo, &rt, &listed))?;
    if g.json {
        let mut out = snapshot_json(&listed);
        out["workload"] = serde_json::to_value(&record)?;
        // The files' bytes are in the snapshot; the report names them.
        out["workload"]["compose_files"] = serde_json::json!(record
            .compose_files
            .iter()
            .map(|f| &f.name)
            .collect::<Vec<_>>());
        out["workload"]["env_file"] = serde_json::json!(record.env_file.as_ref().map(|f| &f.name));
        out["workload"]["config"] = serde_json::Value::Null;
        // Driver options carry passwords and addresses (CIFS, NFS): names only.
        for (i, v) in record.volumes.iter().enumerate() {
            out["workload"]["volumes"][i]["engine"]["options"] = serde_json::json!(
                tresor::workload::policy::redacted(v.engine.options.keys().map(String::as_str),)
            );
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "snapshot {} of workload {} (project {}) saved: {} images, {} volumes, {} bind mounts; consistency {:?}, downtime {:.1}s",
            &listed.id[..8],
            listed.snapshot.name,
            record.project,
            record.services.len(),
            record.volumes.len(),
            record.binds.len(),
            record.consistency,
            record.downtime_ms as f64 / 1000.0
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn restore_workload(
    g: &Global,
    args: &RestoreWorkloadArgs,
) -> anyhow::Result<ExitCode> {
    let repo = open(g).await?;
    let snap = if args.consistent {
        let rt = tokio::runtime::Handle::current();
        tokio::task::block_in_place(|| {
            tresor::commands::workload::newest_consistent(&repo, &rt, &args.snapshot)
        })?
    } else {
        snapshot::resolve(&repo, &args.snapshot, Some(Kind::Workload)).await?
    };
    let host = args.target_registry.split('/').next().unwrap_or_default();
    let registry = args.registry.registry(g, &[host])?;
    let what = WorkloadRestore {
        registry: args.target_registry.clone(),
        project: args.project.clone(),
        to: args.to.clone(),
        up: args.up,
        force: args.force,
        dry_run: args.dry_run,
        engine_socket: args.engine_socket.clone(),
        allow_host_access: args.allow_host_access,
        beside_original: false,
        keep_partial: args.keep_partial,
    };
    let rt = tokio::runtime::Handle::current();
    let report = tokio::task::block_in_place(|| {
        tresor::commands::workload::restore(&repo, &rt, &snap, &what, &registry)
    })?;
    for line in &report.host_access {
        eprintln!("host access granted: {line}");
    }
    for line in &report.notes {
        eprintln!("note: {line}");
    }
    eprintln!(
        "snapshot {}: consistency {:?}, downtime {:.1}s{}",
        &report.snapshot[..8],
        report.consistency,
        report.downtime_ms as f64 / 1000.0,
        if report.consistent {
            ""
        } else {
            " (volumes copied live: give --consistent for the newest quiesced one)"
        }
    );
    if g.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if report.dry_run {
        print_restore_plan(&report);
    } else {
        print_restored(&report);
    }
    Ok(if report.complete || report.dry_run {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What `restore workload --dry-run` would do, for a person.
fn print_restore_plan(report: &WorkloadReport) {
    println!(
        "plan (nothing changed): project {} from {}",
        report.project, report.compose_file
    );
    for i in &report.images {
        println!(
            "image  {:<12} {} -> {}: {} blobs, {} there already, {} to upload",
            i.service,
            i.source,
            i.target,
            i.blobs,
            i.blobs_present,
            human_bytes(i.bytes_to_move)
        );
    }
    for v in &report.volumes {
        println!(
            "volume {:<12} -> {}{}: {} files, {}",
            v.name,
            v.to,
            if v.existed { " (exists)" } else { "" },
            v.files,
            human_bytes(v.bytes)
        );
    }
}

/// What `restore workload` did, for a person.
fn print_restored(report: &WorkloadReport) {
    for i in &report.images {
        println!(
            "image  {:<12} {} -> {} {}",
            i.service,
            i.source,
            i.target,
            if i.digest_equal {
                "digest equal"
            } else {
                "DIGEST DIFFERS"
            }
        );
    }
    for v in &report.volumes {
        println!(
            "volume {:<12} -> {}: {} files, {}, {} chunks verified",
            v.name,
            v.to,
            v.files,
            human_bytes(v.bytes),
            v.chunks_verified
        );
    }
    println!("{}", phases_line(&report.phases));
    if report.complete {
        println!(
            "twin complete: project {} from {}",
            report.project, report.compose_file
        );
    } else {
        println!("twin INCOMPLETE: {}", report.missing.join("; "));
    }
}

/// The recovery time and its phases, in a line (`restore workload`, `drill workload`).
pub(crate) fn phases_line(p: &tresor::commands::workload::Phases) -> String {
    let s = |ms: u64| ms as f64 / 1000.0;
    format!(
        "phases: images {:.1}s and volumes {:.1}s at once, start {:.1}s, healthy {:.1}s; recovery time {:.1}s",
        s(p.images_ms),
        s(p.volumes_ms),
        s(p.start_ms),
        s(p.healthy_ms),
        s(p.total_ms)
    )
}
