//! The `tresor` command line: `main`, logging, exit codes, and dispatch to [`cli`].

mod cli;

use std::process::ExitCode;

use clap::Parser;
use cli::*;

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
    let json = wants_json(&cli);
    let code = match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            let error = e.chain().find_map(|c| c.downcast_ref::<tresor::Error>());
            if json && !verifying {
                // A script that asked for JSON gets its failure as JSON too (verify writes
                // its own report).
                let causes: Vec<String> = e.chain().skip(1).map(|c| c.to_string()).collect();
                let out = serde_json::json!({
                    "error": e.to_string(),
                    "kind": error.map(|e| e.kind().name()),
                    "causes": causes,
                    "hint": error.and_then(|e| e.hint()),
                });
                println!("{out}");
            }
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            if let Some(hint) = error.and_then(|e| e.hint()) {
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
    // fuser warns of the requests a read-only mount leaves unanswered and of an unmount
    // already done by `umount DIR`: not the user's concern.
    let default = match (verbose, agent) {
        (0, false) => "warn,fuser=error",
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

/// Whether the command was asked for JSON on stdout (its own `--json`).
fn wants_json(cli: &Cli) -> bool {
    match &cli.command {
        Command::Init(a) => a.out.json,
        Command::Backup(BackupCommand::Volume(a)) => a.out.json,
        Command::Backup(BackupCommand::Image(a)) => a.out.json,
        Command::Backup(BackupCommand::Workload(a)) => a.out.json,
        Command::Restore(RestoreCommand::Workload(a)) => a.out.json,
        Command::Restore(RestoreCommand::Image(a)) => a.out.json,
        Command::Ls(a) => a.out.json,
        Command::Diff(a) => a.out.json,
        Command::Find(a) => a.out.json,
        Command::Copy(a) => a.out.json,
        Command::Dump(_) | Command::Mount(_) => false,
        Command::Agent(_) | Command::Protect(_) => false,
        Command::Forget(a) => a.out.json,
        Command::Gc(a) => a.out.json,
        Command::Snapshots(a) => a.out.json,
        Command::Restore(RestoreCommand::Volume(a)) => a.out.json,
        Command::Key(
            KeyCommand::List(out)
            | KeyCommand::Remove { out, .. }
            | KeyCommand::UpgradeConfig { out, .. },
        ) => out.json,
        Command::Key(KeyCommand::Add(a) | KeyCommand::Passwd(a)) => a.out.json,
        Command::Verify(a) => a.json.is_some(),
        Command::Resume(out) => out.json,
        Command::Drill(DrillCommand::Workload(a)) => a.out.json,
        Command::Completions { .. } | Command::Man => false,
    }
}

async fn run(mut cli: Cli) -> anyhow::Result<ExitCode> {
    cli.global.json = wants_json(&cli);
    let g = &cli.global;
    match &cli.command {
        Command::Init(args) => cli::init::init(g, args).await,
        Command::Backup(BackupCommand::Volume(args)) => cli::backup::backup_volume(g, args).await,
        Command::Snapshots(args) => cli::snapshots::snapshots(g, args).await,
        Command::Restore(RestoreCommand::Volume(args)) => {
            cli::restore::restore_volume(g, args).await
        }
        Command::Key(cmd) => cli::key::key(g, cmd).await,
        Command::Verify(args) => cli::verify::verify(g, args).await,
        Command::Backup(BackupCommand::Image(args)) => cli::backup::backup_image(g, args).await,
        Command::Restore(RestoreCommand::Image(args)) => cli::restore::restore_image(g, args).await,
        Command::Backup(BackupCommand::Workload(args)) => {
            cli::workload::backup_workload(g, args).await
        }
        Command::Restore(RestoreCommand::Workload(args)) => {
            cli::workload::restore_workload(g, args).await
        }
        Command::Ls(args) => cli::browse::ls(g, args).await,
        Command::Find(args) => cli::browse::find(g, args).await,
        Command::Copy(args) => cli::copy::copy(g, args).await,
        Command::Diff(args) => cli::browse::diff(g, args).await,
        Command::Dump(args) => cli::browse::dump(g, args).await,
        Command::Mount(args) => cli::mount::mount(g, args).await,
        Command::Agent(args) => cli::agent::agent(args).await,
        Command::Forget(args) => cli::snapshots::forget(g, args).await,
        Command::Protect(args) => cli::snapshots::protect(g, args).await,
        Command::Gc(args) => cli::gc::gc(g, args).await,
        Command::Resume(_) => cli::resume(g).await,
        Command::Drill(cmd) => cli::drill::drill(g, cmd).await,
        Command::Completions { shell } => {
            // Into a buffer first: the generator panics on a write error (a closed pipe).
            let mut command = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut command, "tresor", &mut script);
            std::io::Write::write_all(&mut std::io::stdout(), &script)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => {
            let command = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(command).render(&mut std::io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
