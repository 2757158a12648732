//! `tresor agent`: the service, or every job once.

use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub(crate) struct AgentArgs {
    /// The agent's configuration.
    #[arg(long, default_value = "/etc/tresor/agent.toml")]
    pub(crate) config: PathBuf,
    /// Run every job once and exit: 0 if all succeeded, 1 if one failed.
    #[arg(long)]
    pub(crate) once: bool,
    /// Check the configuration and exit.
    #[arg(long)]
    pub(crate) check_config: bool,
    /// Log lines for the journal (human) or for collectors (json).
    #[arg(long, value_enum, default_value = "human")]
    pub(crate) log_format: LogFormat,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    Human,
    Json,
}

pub(crate) async fn agent(args: &AgentArgs) -> anyhow::Result<ExitCode> {
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
