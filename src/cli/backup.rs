//! `tresor backup volume` and `tresor backup image`, and the registry flags they share with
//! `restore image`.

use clap::{Args, Subcommand};
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;
use tresor::commands;
use tresor::progress::Progress;
use tresor::volume::BackupOptions;

use super::*;

#[derive(Subcommand)]
pub(crate) enum BackupCommand {
    /// Back up a directory tree, or a block device / image file.
    Volume(BackupVolumeArgs),
    /// Back up OCI images (all platforms, signatures, SBOMs) from a registry.
    Image(BackupImageArgs),
    /// Back up a compose workload as one: its images, named volumes and bind mounts, compose
    /// files and .env, with its containers stopped (or paused) for a consistent copy.
    Workload(super::workload::BackupWorkloadArgs),
}

#[derive(Args)]
pub(crate) struct RegistryArgs {
    /// Speak plain HTTP to the registries named in this command (loopback, trusted networks).
    #[arg(long)]
    pub(crate) insecure: bool,
    /// Speak plain HTTP to this registry (HOST[:PORT], repeatable): for registries a compose
    /// file names rather than the command.
    #[arg(long, value_name = "HOST")]
    pub(crate) insecure_registry: Vec<String>,
    /// HOST=FILE: USER:PASSWORD in FILE, for that registry only (repeatable).
    #[arg(long, value_name = "HOST=FILE", value_parser = host_file_arg)]
    pub(crate) registry_creds: Vec<(String, PathBuf)>,
    /// USER:PASSWORD for the registries [default: docker config.json / containers auth.json].
    /// On the command line it is readable by every local user: prefer --creds-file or the
    /// environment variable.
    #[arg(long, env = "TRESOR_REGISTRY_CREDS", hide_env_values = true)]
    pub(crate) creds: Option<String>,
    /// A file holding USER:PASSWORD for the registries.
    #[arg(long, conflicts_with = "creds")]
    pub(crate) creds_file: Option<PathBuf>,
    /// Registry auth file (docker config.json or containers auth.json format).
    #[arg(long)]
    pub(crate) authfile: Option<PathBuf>,
    /// Extra CA certificates (PEM) to trust for registries.
    #[arg(long)]
    pub(crate) ca_file: Option<PathBuf>,
}

fn host_file_arg(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((host, file)) if !host.is_empty() && !file.is_empty() => {
            Ok((host.to_string(), PathBuf::from(file)))
        }
        _ => Err(format!(
            "{s:?}: write HOST=FILE, e.g. registry.example:5000=/etc/tresor/reg.creds"
        )),
    }
}

impl RegistryArgs {
    /// Refuses the flags that apply to every registry when the registries are not the ones
    /// the command names (a compose project's): plain HTTP or a password would reach hosts
    /// the operator never named.
    pub(crate) fn only_per_host(&self) -> tresor::Result<()> {
        if self.insecure || self.creds.is_some() || self.creds_file.is_some() {
            return Err(tresor::Error::Config(
                "the compose file names the registries: give --insecure-registry HOST and --registry-creds HOST=FILE (or --authfile) per registry instead of --insecure, --creds or --creds-file".into(),
            ));
        }
        Ok(())
    }

    pub(crate) fn registry(
        &self,
        g: &Global,
        hosts: &[&str],
    ) -> tresor::Result<tresor::oci::registry::Registry> {
        let mut insecure = self.insecure_registry.clone();
        if self.insecure {
            insecure.extend(hosts.iter().map(|h| h.to_string()));
        }
        let options = tresor::oci::registry::RegistryOptions {
            insecure,
            host_creds: self.registry_creds.clone(),
            creds: self.creds.clone(),
            creds_file: self.creds_file.clone(),
            auth_file: self.authfile.clone(),
            ca_file: self.ca_file.clone(),
            attempts: 5,
            locations: cache_dir(g).map(|d| d.join(tresor::oci::locations::FILE_NAME)),
        };
        tresor::oci::registry::Registry::new(&options)
    }
}

#[derive(Args)]
pub(crate) struct BackupImageArgs {
    #[command(flatten)]
    pub(crate) out: JsonFlag,
    /// docker://HOST/REPO:TAG, docker://HOST/REPO@sha256:..., docker://HOST/REPO (every tag),
    /// or an OCI image layout: oci:DIR:TAG, or oci:DIR (every named image).
    #[arg(required = true)]
    pub(crate) images: Vec<String>,
    #[command(flatten)]
    pub(crate) tag_policy: tresor::oci::TagPolicy,
    /// Keep only these platforms of an index (os/arch[/variant], repeatable) [default: all].
    #[arg(long)]
    pub(crate) platform: Vec<String>,
    /// Tag for the snapshots (repeatable).
    #[arg(long = "tag")]
    pub(crate) snapshot_tags: Vec<String>,
    /// Host name recorded in the snapshots [default: this host's name].
    #[arg(long)]
    pub(crate) host: Option<String>,
    #[command(flatten)]
    pub(crate) registry: RegistryArgs,
}

#[derive(Args)]
pub(crate) struct BackupVolumeArgs {
    #[command(flatten)]
    pub(crate) out: JsonFlag,
    /// Volume name; snapshots of one name form its history.
    pub(crate) name: String,
    /// Directory, block device or image file.
    pub(crate) path: PathBuf,
    /// Tag for the snapshot (repeatable).
    #[arg(long = "tag")]
    pub(crate) tags: Vec<String>,
    /// Store PATH as one byte stream (implied for devices and regular files).
    #[arg(long)]
    pub(crate) block: bool,
    /// Fail on the first unreadable file instead of recording a partial snapshot.
    #[arg(long)]
    pub(crate) strict: bool,
    /// Host name recorded in the snapshot [default: this host's name].
    #[arg(long)]
    pub(crate) host: Option<String>,
    /// Read every file, ignoring the previous snapshot and the chunk cache (chunks lost from
    /// the store are stored again).
    #[arg(long)]
    pub(crate) force: bool,
}

pub(crate) async fn backup_image(g: &Global, args: &BackupImageArgs) -> anyhow::Result<ExitCode> {
    let repo = open(g).await?;
    let rt = tokio::runtime::Handle::current();
    let cache = cache_dir(g);
    let command = format!("backup image {}", args.images.join(" "));
    let quiet = g.quiet;
    let host = args.host.clone().unwrap_or_else(host_name);
    let registry = |source: &tresor::oci::ImageSource| {
        args.registry
            .registry(g, &[source.registry_host().unwrap_or_default()])
    };
    let results = tokio::task::block_in_place(|| {
        let what = commands::backup::ImageBackup {
            images: &args.images,
            tag_policy: &args.tag_policy,
            platforms: &args.platform,
            host: &host,
            tags: &args.snapshot_tags,
            name: None,
        };
        commands::backup::images(
            &repo,
            &rt,
            cache.as_deref(),
            &what,
            &command,
            registry,
            |image| Progress::new(!quiet, &format!("backup {image}"), None),
        )
    })?;
    let mut all = Vec::new();
    let mut failed = 0;
    for (image, results) in results {
        if results.is_empty() {
            eprintln!("warning: {image}: no tag matched");
        }
        for (reference, result) in results {
            match result {
                Ok(listed) => {
                    let s = &listed.snapshot;
                    if !g.json {
                        let info = s.image.as_ref().expect("image snapshot");
                        println!(
                            "snapshot {} of image {} {}: {} manifests, {} blobs ({} fetched, {} new), {} referrers, platforms [{}]",
                            &listed.id[..8],
                            s.name,
                            info.digest,
                            info.manifests,
                            info.blobs,
                            human_bytes(s.summary.bytes_read),
                            human_bytes(s.summary.chunks.bytes_new),
                            info.referrers,
                            info.platforms.join(", ")
                        );
                    }
                    all.push(snapshot_json(&listed));
                }
                Err(e) => {
                    failed += 1;
                    eprintln!("error: image {reference}: {e}");
                    if let Some(hint) = e.hint() {
                        eprintln!("hint: {hint}");
                    }
                    all.push(json!({ "reference": reference, "error": e.to_string() }));
                }
            }
        }
    }
    if g.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    }
    Ok(if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

pub(crate) async fn backup_volume(g: &Global, args: &BackupVolumeArgs) -> anyhow::Result<ExitCode> {
    let repo = open(g).await?;
    let options = BackupOptions {
        name: args.name.clone(),
        path: args.path.clone(),
        host: args.host.clone().unwrap_or_else(host_name),
        tags: args.tags.clone(),
        block: args.block,
        strict: args.strict,
        use_parent: !args.force,
    };
    let progress = Progress::new(!g.quiet, &format!("backup {}", args.name), None);
    let rt = tokio::runtime::Handle::current();
    let (p, cache) = (progress.clone(), cache_dir(g));
    let command = format!("backup volume {}", args.name);
    let listed = tokio::task::spawn_blocking(move || {
        commands::backup::volume(&repo, &rt, cache.as_deref(), &options, &command, &p)
    })
    .await??;
    progress.finish();
    let s = &listed.snapshot;
    if g.json {
        println!("{}", serde_json::to_string_pretty(&snapshot_json(&listed))?);
    } else {
        let secs = s.summary.duration_ms as f64 / 1000.0;
        println!(
            "snapshot {} of volume {} saved: {} files, {} dirs, {} read, {} new ({} uploaded) in {:.1}s",
            &listed.id[..8],
            s.name,
            s.summary.files,
            s.summary.dirs,
            human_bytes(s.summary.bytes_read),
            human_bytes(s.summary.chunks.bytes_new),
            human_bytes(s.summary.chunks.bytes_uploaded),
            secs,
        );
        if s.partial {
            eprintln!(
                "warning: {} entries could not be read; the snapshot is partial",
                s.summary.errors
            );
        }
    }
    Ok(if s.partial {
        ExitCode::from(EXIT_PARTIAL)
    } else {
        ExitCode::SUCCESS
    })
}
