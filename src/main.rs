//! The `tresor` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use zeroize::Zeroizing;

use tresor::chunker::ChunkerParams;
use tresor::commands::{self, open::Access};
use tresor::crypto::Secret;
use tresor::localfile::{write_atomically, SHARED};
use tresor::progress::Progress;
use tresor::repository::{InitOptions, Repository};
use tresor::snapshot::{self, Filter, Kind, Listed};
use tresor::store::StoreOptions;
use tresor::units;
use tresor::volume::{self, BackupOptions, RestoreOptions};

/// Exit code of a backup that completed but could not read every file (as restic does), or
/// of an operation some of whose parts failed.
const EXIT_PARTIAL: u8 = 3;

/// The exit code of a failed command, by the kind of its error (README, "Exit codes"):
/// `verify` says 2 for any run that could not happen, whatever stopped it.
fn exit_code(e: &anyhow::Error, verifying: bool) -> ExitCode {
    use tresor::ErrorKind;
    if verifying {
        return ExitCode::from(EXIT_VERIFY_FAILED);
    }
    let kind = e
        .chain()
        .find_map(|c| c.downcast_ref::<tresor::Error>())
        .map(tresor::Error::kind);
    ExitCode::from(match kind {
        Some(ErrorKind::Config | ErrorKind::NotFound) => 2,
        Some(ErrorKind::Partial) => EXIT_PARTIAL,
        Some(ErrorKind::Integrity) => 4,
        Some(ErrorKind::Unsafe) => 5,
        Some(ErrorKind::Stopped) => 143,
        Some(ErrorKind::Repository | ErrorKind::Store | ErrorKind::Io) | None => 1,
    })
}

/// Digital-twin backups of container workloads: OCI images and volumes, deduplicated into a
/// sovereign object store, restorable elsewhere byte for byte.
#[derive(Parser)]
#[command(name = "tresor", version, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Global {
    /// Repository URL: file:///PATH or s3://BUCKET/PREFIX.
    #[arg(long, short = 'r', env = "TRESOR_REPO", global = true)]
    repo: Option<String>,
    /// S3 endpoint, e.g. http://127.0.0.1:3900 for Garage (default: AWS_ENDPOINT_URL or AWS).
    #[arg(long, env = "TRESOR_S3_ENDPOINT", global = true)]
    s3_endpoint: Option<String>,
    /// S3 region (default: AWS_REGION).
    #[arg(long, env = "TRESOR_S3_REGION", global = true)]
    s3_region: Option<String>,
    /// Allow plain HTTP to the S3 endpoint (loopback or trusted networks only).
    #[arg(long, env = "TRESOR_S3_ALLOW_HTTP", global = true)]
    s3_allow_http: bool,
    /// Directory of the local chunk cache [default: $CACHE_DIRECTORY, $XDG_CACHE_HOME/tresor or ~/.cache/tresor].
    #[arg(long, env = "TRESOR_CACHE_DIR", global = true)]
    cache_dir: Option<PathBuf>,
    /// File whose first line is the repository password.
    #[arg(long, env = "TRESOR_PASSWORD_FILE", global = true)]
    password_file: Option<PathBuf>,
    /// Key file that opens the repository (`init` creates it when missing).
    #[arg(long, env = "TRESOR_KEY_FILE", global = true)]
    key_file: Option<PathBuf>,
    /// Keep no local cache (every run lists the store).
    #[arg(long, global = true)]
    no_cache: bool,
    /// Set from the subcommand's own `--json`.
    #[arg(skip)]
    json: bool,
    /// No progress bar.
    #[arg(long, short = 'q', global = true)]
    quiet: bool,
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(long, short = 'v', action = clap::ArgAction::Count, global = true)]
    verbose: u8,
}

#[derive(Subcommand)]
enum Command {
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
    /// List the manifests and blobs of an image snapshot.
    Ls(LsArgs),
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
}

#[derive(Args)]
struct VerifyArgs {
    /// Read, decrypt and re-hash every referenced chunk (default: check that they exist).
    #[arg(long)]
    read_data: bool,
    /// Read only a deterministic share: N/M (1/7 to 7/7 over a week read everything once) or P%.
    #[arg(long, value_name = "SHARE", conflicts_with = "read_data", value_parser = units::share)]
    read_data_subset: Option<tresor::verify::Part>,
    /// Only this snapshot (id, unique prefix of 4+ hex digits, or name meaning its newest;
    /// repeatable).
    #[arg(long = "snapshot", value_name = "ID")]
    snapshots: Vec<String>,
    #[arg(long, value_enum)]
    kind: Option<Kind>,
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    host: Option<String>,
    /// Only snapshots taken since then: RFC 3339, YYYY-MM-DD, or an age like 7d or 12h.
    #[arg(long, value_parser = units::since)]
    since: Option<chrono::DateTime<chrono::Utc>>,
    /// Check only shard I of N of the chunk space, so N hosts can verify one store together.
    #[arg(long, value_name = "I/N", value_parser = units::shard)]
    shard: Option<tresor::verify::Part>,
    /// Write the JSON report to FILE (stdout when FILE is left out).
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "-")]
    json: Option<PathBuf>,
    /// Write Prometheus metrics to FILE (for node_exporter's textfile collector).
    #[arg(long, value_name = "FILE")]
    metrics: Option<PathBuf>,
    /// Show when each snapshot was last checked and last fully verified, instead of verifying.
    #[arg(long)]
    status: bool,
}

/// `--json` of commands that print a result.
#[derive(Args)]
struct JsonFlag {
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum KeyCommand {
    /// List key slots.
    List(JsonFlag),
    /// Add a key slot (a passphrase or a key file) that opens the repository too.
    Add(NewKeyArgs),
    /// Remove a key slot (not the one used now, nor the last).
    Remove {
        /// Slot id or unique prefix, as `key list` shows it.
        id: String,
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Replace the passphrase or key file used now by a new one.
    Passwd(NewKeyArgs),
}

#[derive(Args)]
struct NewKeyArgs {
    #[command(flatten)]
    out: JsonFlag,
    /// File whose first line is the new password [default: TRESOR_NEW_PASSWORD, or a prompt].
    #[arg(long, conflicts_with = "new_key_file")]
    new_password_file: Option<PathBuf>,
    /// New key file (created with a random key when missing).
    #[arg(long)]
    new_key_file: Option<PathBuf>,
}

/// Whether `init` encrypts.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Encryption {
    /// AES-256-GCM or XChaCha20-Poly1305 (see --cipher), keyed BLAKE3 chunk ids.
    On,
    /// No encryption (for stores already encrypted at rest by other means).
    None,
}

#[derive(Args)]
struct InitArgs {
    #[command(flatten)]
    out: JsonFlag,
    /// Minimum chunk size (bytes, or with KiB/MiB).
    #[arg(long, default_value = "256KiB", value_parser = units::size)]
    chunk_min: u32,
    /// Average chunk size.
    #[arg(long, default_value = "1MiB", value_parser = units::size)]
    chunk_avg: u32,
    /// Maximum chunk size.
    #[arg(long, default_value = "4MiB", value_parser = units::size)]
    chunk_max: u32,
    /// zstd level (1-22), or "none".
    #[arg(long, default_value = "3")]
    compression: String,
    /// Client-side encryption; the password or key file comes from --password-file,
    /// TRESOR_PASSWORD, --key-file, systemd credentials or a prompt.
    #[arg(long, value_enum, default_value = "on", num_args = 0..=1, default_missing_value = "on")]
    encryption: Encryption,
    /// The cipher [default: AES-256-GCM where the CPU has AES instructions, else
    /// XChaCha20-Poly1305]. Both are always readable.
    #[arg(long, value_enum)]
    cipher: Option<CipherArg>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CipherArg {
    Aes256gcm,
    Xchacha20poly1305,
}

#[derive(Subcommand)]
enum BackupCommand {
    /// Back up a directory tree, or a block device / image file.
    Volume(BackupVolumeArgs),
    /// Back up OCI images (all platforms, signatures, SBOMs) from a registry.
    Image(BackupImageArgs),
}

#[derive(Args)]
struct RegistryArgs {
    /// Speak plain HTTP to the registries named in this command (loopback, trusted networks).
    #[arg(long)]
    insecure: bool,
    /// USER:PASSWORD for the registries [default: docker config.json / containers auth.json].
    /// On the command line it is readable by every local user: prefer --creds-file or the
    /// environment variable.
    #[arg(long, env = "TRESOR_REGISTRY_CREDS", hide_env_values = true)]
    creds: Option<String>,
    /// A file holding USER:PASSWORD for the registries.
    #[arg(long, conflicts_with = "creds")]
    creds_file: Option<PathBuf>,
    /// Registry auth file (docker config.json or containers auth.json format).
    #[arg(long)]
    authfile: Option<PathBuf>,
    /// Extra CA certificates (PEM) to trust for registries.
    #[arg(long)]
    ca_file: Option<PathBuf>,
}

impl RegistryArgs {
    fn registry(
        &self,
        g: &Global,
        hosts: &[&str],
    ) -> tresor::Result<tresor::oci::registry::Registry> {
        let options = tresor::oci::registry::RegistryOptions {
            insecure: if self.insecure {
                hosts.iter().map(|h| h.to_string()).collect()
            } else {
                Vec::new()
            },
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
struct BackupImageArgs {
    #[command(flatten)]
    out: JsonFlag,
    /// docker://HOST/REPO:TAG, docker://HOST/REPO@sha256:..., docker://HOST/REPO (every tag),
    /// or an OCI image layout: oci:DIR:TAG, or oci:DIR (every named image).
    #[arg(required = true)]
    images: Vec<String>,
    /// With a whole repository: only tags matching this regular expression.
    #[arg(long, value_name = "REGEX")]
    tags: Option<String>,
    /// Keep only these platforms of an index (os/arch[/variant], repeatable) [default: all].
    #[arg(long)]
    platform: Vec<String>,
    /// Tag for the snapshots (repeatable).
    #[arg(long = "tag")]
    snapshot_tags: Vec<String>,
    /// Host name recorded in the snapshots [default: this host's name].
    #[arg(long)]
    host: Option<String>,
    #[command(flatten)]
    registry: RegistryArgs,
}

#[derive(Args)]
struct BackupVolumeArgs {
    #[command(flatten)]
    out: JsonFlag,
    /// Volume name; snapshots of one name form its history.
    name: String,
    /// Directory, block device or image file.
    path: PathBuf,
    /// Tag for the snapshot (repeatable).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Store PATH as one byte stream (implied for devices and regular files).
    #[arg(long)]
    block: bool,
    /// Fail on the first unreadable file instead of recording a partial snapshot.
    #[arg(long)]
    strict: bool,
    /// Host name recorded in the snapshot [default: this host's name].
    #[arg(long)]
    host: Option<String>,
    /// Read every file, ignoring the previous snapshot.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct SnapshotsArgs {
    #[command(flatten)]
    out: JsonFlag,
    #[arg(long, value_enum)]
    kind: Option<Kind>,
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    host: Option<String>,
}

#[derive(Subcommand)]
enum RestoreCommand {
    /// Restore a volume snapshot into a directory (trees) or a file or device (block images).
    Volume(RestoreVolumeArgs),
    /// Restore an image snapshot into a registry or an OCI layout, with the same digests.
    Image(RestoreImageArgs),
}

#[derive(Args)]
struct RestoreImageArgs {
    #[command(flatten)]
    out: JsonFlag,
    /// Snapshot id, unique id prefix, or the source reference (its newest snapshot).
    snapshot: String,
    /// docker://HOST/REPO[:TAG] or oci:DIR[:TAG] [tag default: the source tag].
    #[arg(long)]
    to: String,
    #[command(flatten)]
    registry: RegistryArgs,
}

#[derive(Args)]
struct AgentArgs {
    /// The agent's configuration.
    #[arg(long, default_value = "/etc/tresor/agent.toml")]
    config: PathBuf,
    /// Run every job once and exit: 0 if all succeeded, 1 if one failed.
    #[arg(long)]
    once: bool,
    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,
    /// Log lines for the journal (human) or for collectors (json).
    #[arg(long, value_enum, default_value = "human")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Args)]
struct GcArgs {
    #[command(flatten)]
    out: JsonFlag,
    /// Data younger than this is never condemned, and what a run condemns is deleted by the
    /// first run at least this much later (0s: in the same run, once no older backup runs).
    #[arg(long, default_value = "1h", value_parser = units::duration)]
    grace: std::time::Duration,
    /// Report what would be condemned and deleted; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// How long a sweep waits for running backups to declare chunks they reuse.
    #[arg(long, default_value = "30s", hide = true, value_parser = units::duration)]
    declare_window: std::time::Duration,
}

#[derive(Args)]
struct ForgetArgs {
    #[command(flatten)]
    out: JsonFlag,
    /// Keep the newest N snapshots.
    #[arg(long, default_value_t = 0)]
    keep_last: usize,
    /// Keep the newest snapshot of each of the last N hours that have one.
    #[arg(long, default_value_t = 0)]
    keep_hourly: usize,
    #[arg(long, default_value_t = 0)]
    keep_daily: usize,
    #[arg(long, default_value_t = 0)]
    keep_weekly: usize,
    #[arg(long, default_value_t = 0)]
    keep_monthly: usize,
    #[arg(long, default_value_t = 0)]
    keep_yearly: usize,
    /// Keep everything taken within this long of the newest snapshot (30d, 12h).
    #[arg(long, value_parser = units::span)]
    keep_within: Option<chrono::Duration>,
    #[arg(long, value_enum)]
    kind: Option<Kind>,
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    host: Option<String>,
    /// Show what would go, remove nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Args)]
struct ProtectArgs {
    /// Snapshot id, unique id prefix (4+ hex digits), or name (its newest snapshot).
    snapshot: String,
    /// Lift the protection.
    #[arg(long)]
    remove: bool,
}

#[derive(Args)]
struct LsArgs {
    #[command(flatten)]
    out: JsonFlag,
    /// Image snapshot id, unique prefix, or source reference.
    snapshot: String,
}

#[derive(Args)]
struct RestoreVolumeArgs {
    #[command(flatten)]
    out: JsonFlag,
    /// Snapshot id, unique id prefix, or volume name (its newest snapshot).
    snapshot: String,
    /// Target directory, file or block device.
    #[arg(long)]
    to: PathBuf,
    /// Restore only this path of the tree (as stored, relative to the volume root).
    #[arg(long)]
    path: Option<String>,
    /// As root, also restore device nodes and setuid/setgid bits from an unencrypted
    /// repository (whoever may write its store could have forged them). Encrypted repositories
    /// restore them always: only a key holder can write a snapshot there.
    #[arg(long)]
    restore_special: bool,
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    let (agent, json_logs) = match &cli.command {
        Command::Agent(a) => (true, a.log_format == LogFormat::Json),
        _ => (false, false),
    };
    let verifying = matches!(cli.command, Command::Verify(_));
    init_logging(cli.global.verbose, agent, json_logs);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            if let Some(hint) = e.downcast_ref::<tresor::Error>().and_then(|e| e.hint()) {
                eprintln!("hint: {hint}");
            }
            exit_code(&e, verifying)
        }
    };
    // A job thread still running (the agent was stopped; its hooks are being killed) must not
    // hold the exit: everything tresor writes is safe to abandon at any point.
    rt.shutdown_timeout(std::time::Duration::from_secs(3));
    code
}

/// Chunk buffers are 0.25-4 MiB. glibc serves such sizes with a fresh mmap each time, so every
/// chunk costs page faults and an munmap; keeping them on the heap lets freed buffers be reused.
/// Measured: restore of a 2 GiB tree spends 15% of its time in page faults without this.
///
/// Each heap arena then keeps its freed buffers, and glibc makes up to 8 arenas per core as
/// the tokio, rayon and fetch threads allocate: one arena per core keeps the reuse and bounds
/// what is kept. Measured on 2 cores (benches/e2e.sh, benches/oci.sh), same throughput: peak
/// RSS of a restore 170 -> 87 MiB, of verify --read-data 165 -> 80 MiB, of a 2 GiB image
/// layer backup 190-250 -> 120-153 MiB.
fn tune_allocator() {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
    // SAFETY: mallopt only adjusts allocator thresholds; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
        libc::mallopt(libc::M_ARENA_MAX, cores as libc::c_int);
    }
}

/// Logs go to stderr (the journal, for the agent): warnings by default, info for the agent.
fn init_logging(verbose: u8, agent: bool, json: bool) {
    let default = match (verbose, agent) {
        (0, false) => "warn",
        (0, true) => "tresor=info,warn",
        (1, _) => "tresor=debug,info",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only for a person at a terminal: the journal and pipes get plain lines.
    use std::io::IsTerminal;
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(mut cli: Cli) -> anyhow::Result<ExitCode> {
    cli.global.json = match &cli.command {
        Command::Init(a) => a.out.json,
        Command::Backup(BackupCommand::Volume(a)) => a.out.json,
        Command::Backup(BackupCommand::Image(a)) => a.out.json,
        Command::Restore(RestoreCommand::Image(a)) => a.out.json,
        Command::Ls(a) => a.out.json,
        Command::Agent(_) | Command::Protect(_) => false,
        Command::Forget(a) => a.out.json,
        Command::Gc(a) => a.out.json,
        Command::Snapshots(a) => a.out.json,
        Command::Restore(RestoreCommand::Volume(a)) => a.out.json,
        Command::Key(KeyCommand::List(out) | KeyCommand::Remove { out, .. }) => out.json,
        Command::Key(KeyCommand::Add(a) | KeyCommand::Passwd(a)) => a.out.json,
        Command::Verify(a) => a.json.is_some(),
    };
    let g = &cli.global;
    match &cli.command {
        Command::Init(args) => init(g, args).await,
        Command::Backup(BackupCommand::Volume(args)) => backup_volume(g, args).await,
        Command::Snapshots(args) => snapshots(g, args).await,
        Command::Restore(RestoreCommand::Volume(args)) => restore_volume(g, args).await,
        Command::Key(cmd) => key(g, cmd).await,
        Command::Verify(args) => verify(g, args).await,
        Command::Backup(BackupCommand::Image(args)) => backup_image(g, args).await,
        Command::Restore(RestoreCommand::Image(args)) => restore_image(g, args).await,
        Command::Ls(args) => ls(g, args).await,
        Command::Agent(args) => agent(args).await,
        Command::Forget(args) => forget(g, args).await,
        Command::Protect(args) => protect(g, args).await,
        Command::Gc(args) => gc(g, args).await,
    }
}

async fn gc(g: &Global, args: &GcArgs) -> anyhow::Result<ExitCode> {
    let options = tresor::gc::GcOptions {
        grace: args.grace,
        dry_run: args.dry_run,
        declare_window: args.declare_window,
    };
    let repo = open(g).await?;
    let rt = tokio::runtime::Handle::current();
    let report =
        tokio::task::spawn_blocking(move || tresor::gc::run(&repo, &rt, &options)).await??;
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

async fn forget(g: &Global, args: &ForgetArgs) -> anyhow::Result<ExitCode> {
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
    let filter = Filter {
        kind: args.kind,
        name: args.name.clone(),
        host: args.host.clone(),
    };
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

async fn protect(g: &Global, args: &ProtectArgs) -> anyhow::Result<ExitCode> {
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

async fn agent(args: &AgentArgs) -> anyhow::Result<ExitCode> {
    if args.check_config {
        let config = tresor::agent::check_config(&args.config)?;
        println!(
            "{}: valid, {} jobs",
            args.config.display(),
            config.jobs.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    if args.once {
        let failed = tresor::agent::run_once(&args.config).await?;
        if failed > 0 {
            eprintln!("{failed} job(s) failed");
            return Ok(ExitCode::FAILURE);
        }
        return Ok(ExitCode::SUCCESS);
    }
    tresor::agent::run_service(&args.config).await?;
    Ok(ExitCode::SUCCESS)
}

async fn backup_image(g: &Global, args: &BackupImageArgs) -> anyhow::Result<ExitCode> {
    let tag_filter = args
        .tags
        .as_deref()
        .map(regex::Regex::new)
        .transpose()
        .context("--tags is not a valid regular expression")?;
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
            tag_filter,
            platforms: &args.platform,
            host: &host,
            tags: &args.snapshot_tags,
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

async fn restore_image(g: &Global, args: &RestoreImageArgs) -> anyhow::Result<ExitCode> {
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

async fn ls(g: &Global, args: &LsArgs) -> anyhow::Result<ExitCode> {
    let repo = open(g).await?;
    let snap = snapshot::resolve(&repo, &args.snapshot, Some(Kind::Image)).await?;
    let rt = tokio::runtime::Handle::current();
    let record =
        tokio::task::spawn_blocking(move || tresor::oci::load_record(&repo, &rt, &snap)).await??;
    if g.json {
        let manifests: Vec<_> = record
            .manifests
            .iter()
            .map(|m| json!({"digest": m.digest, "media_type": m.media_type, "size": m.raw.len(), "role": m.role, "tags": m.tags}))
            .collect();
        let blobs: Vec<_> = record
            .blobs
            .iter()
            .map(|b| json!({"digest": b.digest, "size": b.size, "chunks": b.refs.len()}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "repository": record.repository, "tag": record.tag, "digest": record.digest,
                "platforms": record.platforms, "manifests": manifests, "blobs": blobs,
            }))?
        );
    } else {
        println!(
            "{}:{} {}",
            record.repository,
            record.tag.as_deref().unwrap_or("-"),
            record.digest
        );
        for m in &record.manifests {
            println!(
                "manifest {:<8} {} {:>10} {} {}",
                format!("{:?}", m.role).to_lowercase(),
                m.digest,
                m.raw.len(),
                m.media_type,
                m.tags.join(",")
            );
        }
        for b in &record.blobs {
            println!("blob              {} {:>10}", b.digest, b.size);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Exit code of `verify` when it found problems; 2 (could not run) is any error.
const EXIT_VERIFY_PROBLEMS: u8 = 1;
const EXIT_VERIFY_FAILED: u8 = 2;

async fn verify(g: &Global, args: &VerifyArgs) -> anyhow::Result<ExitCode> {
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
        filter: Filter {
            kind: args.kind,
            name: args.name.clone(),
            host: args.host.clone(),
        },
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

fn print_verify_summary(report: &tresor::verify::Report) {
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

/// `-` is stdout; anything else a file written atomically.
fn write_json(path: Option<&std::path::Path>, value: &serde_json::Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    match path {
        None => println!("{text}"),
        Some(p) if p == std::path::Path::new("-") => println!("{text}"),
        Some(p) => write_atomically(p, SHARED, text.as_bytes())?,
    }
    Ok(())
}

/// Where the repository is and how to unlock it, from the global flags and the environment.
fn access(g: &Global) -> anyhow::Result<Access> {
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
    })
}

async fn open(g: &Global) -> anyhow::Result<Arc<Repository>> {
    let access = access(g)?;
    Ok(access.open(|| ask_secret(&access.url, false)).await?)
}

/// A password asked on the terminal (twice with `create`), or an error saying how to give one.
fn ask_secret(url: &str, create: bool) -> tresor::Result<Secret> {
    prompt(&format!("password for {url}"), create).ok_or_else(|| {
        tresor::Error::Config(format!(
            "{url} is encrypted: give --password-file, TRESOR_PASSWORD or --key-file \
             (or run on a terminal to be asked)"
        ))
    })
}

/// A new key file, made by `init` or `key add`, announced: without a copy the data is lost.
fn key_file(path: &std::path::Path, create: bool) -> tresor::Result<Secret> {
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
fn prompt(what: &str, twice: bool) -> Option<Secret> {
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

/// The secret of a new key slot, from the `key add`/`key passwd` options.
fn new_secret(args: &NewKeyArgs) -> anyhow::Result<Secret> {
    if let Some(path) = &args.new_key_file {
        return Ok(key_file(path, true)?);
    }
    if let Some(path) = &args.new_password_file {
        return Ok(Secret::from_password_file(path)?);
    }
    if let Ok(p) = std::env::var("TRESOR_NEW_PASSWORD") {
        return Ok(Secret::Passphrase(Zeroizing::new(p)));
    }
    prompt("new password", true).context(
        "give --new-password-file, --new-key-file or TRESOR_NEW_PASSWORD (or run on a terminal)",
    )
}

async fn key(g: &Global, cmd: &KeyCommand) -> anyhow::Result<ExitCode> {
    let repo = open(g).await?;
    anyhow::ensure!(
        repo.is_encrypted(),
        "{} is not encrypted; it has no keys",
        repo.store().url()
    );
    match cmd {
        KeyCommand::List(_) => {
            let keys = repo.list_keys().await?;
            if g.json {
                let all: Vec<_> = keys
                    .iter()
                    .map(|(id, slot)| {
                        json!({
                            "id": id,
                            "kind": slot.kind,
                            "created": slot.created.to_rfc3339(),
                            "host": slot.host,
                            "current": Some(id.as_str()) == repo.key_slot(),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                println!("{:<10} {:<11} {:<20} host", "id", "kind", "created");
                for (id, slot) in &keys {
                    let current = if Some(id.as_str()) == repo.key_slot() {
                        " (current)"
                    } else {
                        ""
                    };
                    println!(
                        "{:<10} {:<11} {:<20} {}{current}",
                        &id[..8],
                        format!("{:?}", slot.kind).to_lowercase(),
                        slot.created.format("%Y-%m-%d %H:%M:%S"),
                        slot.host
                    );
                }
            }
        }
        KeyCommand::Add(args) => {
            let id = repo.add_key(&new_secret(args)?).await?;
            report(
                g,
                json!({ "added": id }),
                &format!("added key slot {}", &id[..8]),
            )?;
        }
        KeyCommand::Remove { id, .. } => {
            repo.remove_key(id).await?;
            report(
                g,
                json!({ "removed": id }),
                &format!("removed key slot {id}"),
            )?;
        }
        KeyCommand::Passwd(args) => {
            let (id, old) = repo.replace_key(&new_secret(args)?).await?;
            report(
                g,
                json!({ "added": id, "removed": old }),
                &format!("replaced key slot {} by {}", &old[..8], &id[..8]),
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn report(g: &Global, value: serde_json::Value, text: &str) -> anyhow::Result<()> {
    if g.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!("{text}");
    }
    Ok(())
}

fn cache_dir(g: &Global) -> Option<PathBuf> {
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

async fn init(g: &Global, args: &InitArgs) -> anyhow::Result<ExitCode> {
    let compression_level =
        match args.compression.as_str() {
            "none" => None,
            level => Some(level.parse().with_context(|| {
                format!("--compression {level:?}: give a zstd level or \"none\"")
            })?),
        };
    let options = InitOptions {
        chunker: ChunkerParams {
            min_size: args.chunk_min,
            avg_size: args.chunk_avg,
            max_size: args.chunk_max,
        },
        compression_level,
        cipher: args.cipher.map(|c| match c {
            CipherArg::Aes256gcm => tresor::crypto::Cipher::Aes256Gcm,
            CipherArg::Xchacha20poly1305 => tresor::crypto::Cipher::XChaCha20Poly1305,
        }),
    };
    let access = access(g)?;
    let encrypted = args.encryption == Encryption::On;
    let new_key_file = g.key_file.as_ref().filter(|p| encrypted && !p.exists());
    let repo = access
        .init(options, encrypted, || ask_secret(&access.url, true))
        .await?;
    if let Some(path) = new_key_file {
        eprintln!(
            "created key file {}: keep a copy somewhere safe, without it the data is lost",
            path.display()
        );
    }
    if g.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "url": repo.store().url(),
                "config": repo.config(),
            }))?
        );
    } else {
        println!(
            "created tresor repository {} at {}",
            repo.config().id,
            repo.store().url()
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn backup_volume(g: &Global, args: &BackupVolumeArgs) -> anyhow::Result<ExitCode> {
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

async fn snapshots(g: &Global, args: &SnapshotsArgs) -> anyhow::Result<ExitCode> {
    let repo = open(g).await?;
    let filter = Filter {
        kind: args.kind,
        name: args.name.clone(),
        host: args.host.clone(),
    };
    let listed = snapshot::list(&repo, &filter).await?;
    if g.json {
        let all: Vec<_> = listed.iter().map(snapshot_json).collect();
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
            if s.partial { "partial" } else { "" },
        );
    }
    println!("{} snapshots", listed.len());
    Ok(ExitCode::SUCCESS)
}

async fn restore_volume(g: &Global, args: &RestoreVolumeArgs) -> anyhow::Result<ExitCode> {
    let repo = open(g).await?;
    let snap = snapshot::resolve(&repo, &args.snapshot, Some(Kind::Volume)).await?;
    let options = RestoreOptions {
        subpath: args.path.clone(),
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
    }
    Ok(ExitCode::SUCCESS)
}

/// The JSON view of a snapshot in listings: everything but the root ref list.
fn snapshot_json(l: &Listed) -> serde_json::Value {
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
        "image": s.image,
        "errors": s.errors,
    })
}

fn host_name() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

fn human_bytes(n: u64) -> String {
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
