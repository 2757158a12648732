//! The command line: the flags every command shares (`Global`), the commands, and what they
//! share: opening the repository, asking for a password, printing results. One file per
//! command family; each parses its flags into the options of [`tresor::commands`] (or the
//! library) and prints what comes back.

pub(crate) mod agent;
pub(crate) mod backup;
pub(crate) mod browse;
pub(crate) mod copy;
pub(crate) mod drill;
pub(crate) mod gc;
pub(crate) mod init;
pub(crate) mod key;
pub(crate) mod mount;
pub(crate) mod restore;
pub(crate) mod snapshots;
pub(crate) mod verify;
pub(crate) mod workload;

pub(crate) use agent::{AgentArgs, LogFormat};
pub(crate) use backup::{BackupCommand, RegistryArgs};
pub(crate) use browse::{DiffArgs, DumpArgs, FindArgs, LsArgs};
pub(crate) use copy::CopyArgs;
pub(crate) use drill::DrillCommand;
pub(crate) use gc::GcArgs;
pub(crate) use init::InitArgs;
pub(crate) use key::KeyCommand;
pub(crate) use restore::RestoreCommand;
pub(crate) use snapshots::{ForgetArgs, ProtectArgs, SnapshotsArgs};
pub(crate) use verify::{VerifyArgs, EXIT_VERIFY_FAILED};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;
use tresor::commands::open::Access;
use tresor::crypto::Secret;
use tresor::localfile::{write_atomically, SHARED};
use tresor::repository::Repository;
use tresor::snapshot::Listed;
use tresor::store::StoreOptions;
use zeroize::Zeroizing;

/// Exit code of a backup that completed but could not read every file (as restic does), or
/// of an operation some of whose parts failed.
pub(crate) const EXIT_PARTIAL: u8 = 3;

/// `tresor --version`: with the repository formats this build reads and the one `init`
/// writes, which a packager or an operator choosing a binary for a DR host needs (a unit test
/// holds it to [`tresor::repository::FORMAT_VERSION`]).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (reads repository formats 1 and 2; init writes format 2)"
);

/// Digital-twin backups of container workloads: OCI images and volumes, deduplicated into a
/// sovereign object store, restorable elsewhere byte for byte.
#[derive(Parser)]
#[command(name = "tresor", version = VERSION, propagate_version = true)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) global: Global,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Args)]
pub(crate) struct Global {
    /// Repository URL: file:///PATH or s3://BUCKET/PREFIX.
    #[arg(long, short = 'r', env = "TRESOR_REPO", global = true)]
    pub(crate) repo: Option<String>,
    /// S3 endpoint, e.g. http://127.0.0.1:3900 for Garage (default: AWS_ENDPOINT_URL or AWS).
    #[arg(long, env = "TRESOR_S3_ENDPOINT", global = true)]
    pub(crate) s3_endpoint: Option<String>,
    /// S3 region (default: AWS_REGION).
    #[arg(long, env = "TRESOR_S3_REGION", global = true)]
    pub(crate) s3_region: Option<String>,
    /// Allow plain HTTP to the S3 endpoint (loopback or trusted networks only).
    #[arg(long, env = "TRESOR_S3_ALLOW_HTTP", global = true)]
    pub(crate) s3_allow_http: bool,
    /// Directory of the local chunk cache [default: $CACHE_DIRECTORY, $XDG_CACHE_HOME/tresor or ~/.cache/tresor].
    #[arg(long, env = "TRESOR_CACHE_DIR", global = true)]
    pub(crate) cache_dir: Option<PathBuf>,
    /// File whose first line is the repository password.
    #[arg(long, env = "TRESOR_PASSWORD_FILE", global = true)]
    pub(crate) password_file: Option<PathBuf>,
    /// Key file that opens the repository (`init` creates it when missing).
    #[arg(long, env = "TRESOR_KEY_FILE", global = true)]
    pub(crate) key_file: Option<PathBuf>,
    /// Keep no local cache (every run lists the store).
    #[arg(long, global = true)]
    pub(crate) no_cache: bool,
    /// The repository is unencrypted (made with `init --encryption none`): needed on a host
    /// that has not opened it before, so the store alone cannot switch encryption off.
    #[arg(long, env = "TRESOR_EXPECT_UNENCRYPTED", global = true)]
    pub(crate) expect_unencrypted: bool,
    /// Set from the subcommand's own `--json`.
    #[arg(skip)]
    pub(crate) json: bool,
    /// No progress bar.
    #[arg(long, short = 'q', global = true)]
    pub(crate) quiet: bool,
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(long, short = 'v', action = clap::ArgAction::Count, global = true)]
    pub(crate) verbose: u8,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Create a new repository.
    Init(InitArgs),
    /// Back up a volume or OCI images.
    #[command(subcommand)]
    Backup(BackupCommand),
    /// List snapshots, oldest first.
    Snapshots(SnapshotsArgs),
    /// Restore a snapshot.
    #[command(subcommand)]
    Restore(RestoreCommand),
    /// Manage the key slots of an encrypted repository.
    #[command(subcommand)]
    Key(KeyCommand),
    /// List a volume tree's entries (below PATH), or an image snapshot's manifests and blobs
    Ls(LsArgs),
    /// What changed from one volume tree snapshot to another: added, removed, modified entries
    Diff(DiffArgs),
    /// Copy snapshots (workloads with their members) into a second repository
    Copy(CopyArgs),
    /// Volume tree entries whose name (or path) matches a pattern, across snapshots
    Find(FindArgs),
    /// Write a file of a volume tree snapshot to stdout, or a directory as a tar stream
    Dump(DumpArgs),
    /// Mount the snapshots read-only at DIR (FUSE) until Ctrl-C or SIGTERM: by host, kind,
    /// name and time; volume trees, images as OCI layouts, workloads with their members
    Mount(mount::MountArgs),
    /// Run the jobs of an agent.toml on their schedules (the systemd service).
    Agent(AgentArgs),
    /// Remove snapshots that a retention policy does not keep, per source (host, kind, name).
    Forget(ForgetArgs),
    /// Protect a snapshot from `forget` (or lift the protection with --remove).
    Protect(ProtectArgs),
    /// Delete chunks and blob indexes no snapshot uses, safely while other hosts back up:
    /// condemn now, delete on a run at least --grace later.
    Gc(GcArgs),
    /// Check that snapshots can be restored; exit 0 if all is well, 1 on problems, 2 if the
    /// check could not run.
    Verify(VerifyArgs),
    /// Prove a workload's twin comes up: restore it beside the original, probe it, remove it.
    #[command(subcommand)]
    Drill(DrillCommand),
    /// Print the shell completion script for SHELL (bash, zsh, fish, elvish, powershell), e.g.
    /// `tresor completions bash > /etc/bash_completion.d/tresor`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `tresor man > /usr/local/share/man/man1/tresor.1`.
    Man,
    /// Start again the containers a killed workload backup left stopped or paused (its
    /// quiesced-PID.json in the cache directory names them); the agent unit's ExecStopPost=.
    Resume(JsonFlag),
}

/// Which snapshots a command takes: every flag given must match.
#[derive(Args)]
pub(crate) struct FilterArgs {
    /// Only snapshots of this kind.
    #[arg(long, value_enum)]
    pub(crate) kind: Option<tresor::snapshot::Kind>,
    /// Only snapshots of this name (a volume's name, or an image reference).
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// Only snapshots taken on this host.
    #[arg(long)]
    pub(crate) host: Option<String>,
}

impl FilterArgs {
    pub(crate) fn to_filter(&self) -> tresor::snapshot::Filter {
        tresor::snapshot::Filter {
            kind: self.kind,
            name: self.name.clone(),
            host: self.host.clone(),
        }
    }
}

/// `--json` of commands that print a result.
#[derive(Args)]
pub(crate) struct JsonFlag {
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

/// `-` is stdout; anything else a file written atomically.
pub(crate) fn write_json(
    path: Option<&std::path::Path>,
    value: &serde_json::Value,
) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    match path {
        None => println!("{text}"),
        Some(p) if p == std::path::Path::new("-") => println!("{text}"),
        Some(p) => write_atomically(p, SHARED, text.as_bytes())?,
    }
    Ok(())
}

/// Where the repository is and how to unlock it, from the global flags and the environment.
pub(crate) fn access(g: &Global) -> anyhow::Result<Access> {
    let url = g
        .repo
        .clone()
        .context("no repository given: use --repo URL or set TRESOR_REPO")?;
    Ok(Access {
        url,
        store: StoreOptions {
            endpoint: g.s3_endpoint.clone(),
            region: g.s3_region.clone(),
            allow_http: g.s3_allow_http,
            credentials: None,
        },
        key_file: g.key_file.clone(),
        password_file: g.password_file.clone(),
        password: std::env::var("TRESOR_PASSWORD").ok().map(Zeroizing::new),
        credentials: std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
        cache_dir: cache_dir(g),
        expect_unencrypted: g.expect_unencrypted,
    })
}

pub(crate) async fn open(g: &Global) -> anyhow::Result<Arc<Repository>> {
    let access = access(g)?;
    Ok(access.open(|| ask_secret(&access.url, false)).await?)
}

/// A password asked on the terminal (twice with `create`), or an error saying how to give one.
pub(crate) fn ask_secret(url: &str, create: bool) -> tresor::Result<Secret> {
    prompt(&format!("password for {url}"), create).ok_or_else(|| {
        tresor::Error::Config(format!(
            "{url} is encrypted: give --password-file, TRESOR_PASSWORD or --key-file \
             (or run on a terminal to be asked)"
        ))
    })
}

/// A new key file, made by `init` or `key add`, announced: without a copy the data is lost.
pub(crate) fn key_file(path: &std::path::Path, create: bool) -> tresor::Result<Secret> {
    let existed = path.exists();
    let secret = Secret::from_key_file(path, create)?;
    if !existed {
        eprintln!(
            "created key file {}: keep a copy somewhere safe, without it the data is lost",
            path.display()
        );
    }
    Ok(secret)
}

/// Asks for a password on the terminal; `None` when stdin is not one.
pub(crate) fn prompt(what: &str, twice: bool) -> Option<Secret> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        return None;
    }
    loop {
        let first = Zeroizing::new(rpassword::prompt_password(format!("{what}: ")).ok()?);
        if !twice {
            return Some(Secret::Passphrase(first));
        }
        let second = Zeroizing::new(rpassword::prompt_password("again: ").ok()?);
        if first == second && !first.is_empty() {
            return Some(Secret::Passphrase(first));
        }
        eprintln!("the passwords differ or are empty; try again");
    }
}

pub(crate) fn report(g: &Global, value: serde_json::Value, text: &str) -> anyhow::Result<()> {
    if g.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!("{text}");
    }
    Ok(())
}

pub(crate) fn cache_dir(g: &Global) -> Option<PathBuf> {
    if g.no_cache {
        return None;
    }
    let env = |k| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    g.cache_dir
        .clone()
        .or_else(|| env("CACHE_DIRECTORY"))
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("tresor")))
        .or_else(|| env("HOME").map(|h| h.join(".cache/tresor")))
}

/// The JSON view of a snapshot in listings: everything but the root ref list.
pub(crate) fn snapshot_json(l: &Listed) -> serde_json::Value {
    let s = &l.snapshot;
    json!({
        "id": l.id,
        "short_id": &l.id[..8],
        "time": s.time.to_rfc3339(),
        "kind": s.kind,
        "name": s.name,
        "source": s.source,
        "host": s.host,
        "tags": s.tags,
        "partial": s.partial,
        "format": s.root_format,
        "parent": s.parent,
        "logical_bytes": s.summary.logical_bytes,
        "new_bytes": s.summary.chunks.bytes_new,
        "stored_bytes": s.summary.chunks.bytes_uploaded,
        "summary": s.summary,
        "payload": s.payload.as_ref().map(|p| json!({
            "fresh_bytes": p.fresh_len,
            "reused_bytes": p.reused_len,
            "padding_bytes": p.padding,
        })),
        "image": s.image,
        "errors": s.errors,
    })
}

pub(crate) fn host_name() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// `tresor resume`: what the state file of the cache directory names, started again.
pub(crate) async fn resume(g: &Global) -> anyhow::Result<std::process::ExitCode> {
    let Some(dir) = cache_dir(g) else {
        anyhow::bail!("no cache directory (--no-cache): there is no list of stopped containers");
    };
    let back = tresor::workload::engine::resume_recorded(&dir).await?;
    // What could not be started again stays in the state files of dead processes.
    let left = tresor::workload::engine::resume_pending(&dir)?;
    if g.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "resumed": back, "left": left }))?
        );
    } else {
        for q in &back {
            println!(
                "{} service {} (container {})",
                if q.paused { "unpaused" } else { "started" },
                q.service,
                &q.id[..12.min(q.id.len())]
            );
        }
        if back.is_empty() && !left {
            println!("nothing to resume");
        }
    }
    Ok(if left {
        eprintln!(
            "some containers could not be started again: quiesced-*.json in {} names them",
            dir.display()
        );
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_version_names_the_formats_this_build_reads_and_writes() {
        let newest = tresor::repository::FORMAT_VERSION;
        assert!(super::VERSION.contains(&format!("formats 1 and {newest};")));
        assert!(super::VERSION.ends_with(&format!("init writes format {newest})")));
    }
}
