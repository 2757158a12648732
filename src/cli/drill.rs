//! `tresor drill workload`: the front end of [`tresor::commands::drill`].

use clap::{Args, Subcommand};
use std::process::ExitCode;
use tresor::commands::drill::{DrillOptions, DrillReport};

use super::backup::RegistryArgs;
use super::*;

/// Exit code of a drill that ran and whose twin did not come up or failed a probe.
pub(crate) const EXIT_DRILL_FAILED: u8 = 6;

#[derive(Subcommand)]
pub(crate) enum DrillCommand {
    /// Bring a workload's newest twin up beside the original as a throwaway project, wait
    /// until it is healthy, run the probes, report the recovery time, and remove it; exit 0
    /// when it came up and every probe passed, 6 when not.
    Workload(DrillWorkloadArgs),
}

#[derive(Args)]
pub(crate) struct DrillWorkloadArgs {
    #[command(flatten)]
    pub(crate) out: JsonFlag,
    #[command(flatten)]
    pub(crate) drill: DrillOptions,
    #[command(flatten)]
    pub(crate) registry: RegistryArgs,
}

pub(crate) async fn drill(g: &Global, cmd: &DrillCommand) -> anyhow::Result<ExitCode> {
    let DrillCommand::Workload(args) = cmd;
    let repo = open(g).await?;
    let host = args.drill.registry.split('/').next().unwrap_or_default();
    let registry = args.registry.registry(g, &[host])?;
    let rt = tokio::runtime::Handle::current();
    let cache = cache_dir(g);
    let report = tokio::task::block_in_place(|| {
        tresor::commands::drill::drill(&repo, &rt, cache.as_deref(), &args.drill, &registry)
    })?;
    if g.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DRILL_FAILED)
    })
}

fn print_report(report: &DrillReport) {
    if let Some(r) = &report.restore {
        println!(
            "snapshot {} ({:?}, downtime {:.1}s) as project {}",
            &r.snapshot[..8.min(r.snapshot.len())],
            r.consistency,
            r.downtime_ms as f64 / 1000.0,
            report.project
        );
        println!("{}", super::workload::phases_line(&r.phases));
        for line in &r.notes {
            println!("note: {line}");
        }
    }
    for p in &report.probes {
        println!(
            "probe {} {:?}: {} ({:.1}s){}",
            p.service,
            p.command,
            if p.ok { "passed" } else { "FAILED" },
            p.ms as f64 / 1000.0,
            match p.output.trim() {
                "" => String::new(),
                out => format!("\n  {}", out.replace('\n', "\n  ")),
            }
        );
    }
    if let Some(e) = &report.error {
        println!("the twin did not come up: {e}");
    }
    for l in &report.left {
        println!("left: {l}");
    }
    println!(
        "drill {}: workload {} in {:.1}s",
        if report.ok { "passed" } else { "FAILED" },
        report.workload,
        report.total_ms as f64 / 1000.0
    );
}
