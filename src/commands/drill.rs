//! `tresor drill workload`: proves that a workload's newest twin comes up, on this engine,
//! beside the live original. It restores the twin as a throwaway project (a fresh name, a
//! scratch directory, no published host port, no reused volume options), waits until it is
//! healthy, runs the operator's probes in its services, reports the recovery time per phase,
//! and removes everything it made. The agent runs it as a `drill` job.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;

use crate::commands::workload::{restore, WorkloadReport, WorkloadRestore};
use crate::error::{Error, ErrorKind, Result};
use crate::oci::registry::Registry;
use crate::repository::Repository;
use crate::snapshot::{Kind, Listed};
use crate::workload::compose::{self, Compose};
use crate::workload::engine::Engine;

/// What [`drill`] does: the flags of `tresor drill workload` and the keys of an agent job of
/// `type = "drill"` alike.
#[derive(Clone, Debug, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillOptions {
    /// The workload (its name): its newest snapshot is drilled.
    #[arg(value_name = "NAME")]
    pub workload: String,
    /// The registry the twin's images are pushed to and pulled from, as HOST, HOST:PORT or
    /// HOST:PORT/PREFIX (images go to PREFIX/REPO; a prefix of its own keeps drills apart from
    /// production repositories).
    #[arg(long)]
    pub registry: String,
    /// SERVICE=COMMAND run with `sh -c` in the twin's service once it is healthy (a row
    /// count, say); a non-zero exit fails the drill (repeatable).
    #[arg(long = "probe", value_name = "SERVICE=COMMAND")]
    #[serde(default)]
    pub probe: Vec<String>,
    /// Drill the newest snapshot whose volumes were all copied quiesced, not simply the newest.
    #[arg(long)]
    #[serde(default)]
    pub consistent: bool,
    /// Leave the drill's project, volumes, images and directory in place (for a look).
    #[arg(long)]
    #[serde(default)]
    pub keep: bool,
    /// The container engine's API socket [default: DOCKER_HOST, else /var/run/docker.sock].
    #[arg(long, value_name = "PATH")]
    #[serde(default)]
    pub engine_socket: Option<PathBuf>,
    /// Grant what the project asks of this host, as `restore workload --allow-host-access`
    /// (the record's volume options are never reused by a drill).
    #[arg(long)]
    #[serde(default)]
    pub allow_host_access: bool,
    /// Write the drill's result in Prometheus text format here (node_exporter's textfile
    /// collector): `tresor_drill_success`, `tresor_drill_recovery_seconds`, per phase.
    #[arg(long, value_name = "PATH")]
    #[serde(default)]
    pub metrics_file: Option<PathBuf>,
}

/// One probe of the report.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeOutcome {
    pub service: String,
    pub command: String,
    pub ok: bool,
    /// Its exit status (none when it could not run).
    pub exit_code: Option<i64>,
    /// What it printed (the last 4 KiB), or why it could not run.
    pub output: String,
    pub ms: u64,
}

/// What a drill found.
#[derive(Clone, Debug, Serialize)]
pub struct DrillReport {
    pub workload: String,
    /// The throwaway project the twin ran as.
    pub project: String,
    /// The restore of the twin: the snapshot, its consistency, images, volumes and the
    /// recovery time per phase. None when it failed before it had anything to report.
    pub restore: Option<WorkloadReport>,
    pub probes: Vec<ProbeOutcome>,
    /// The twin came up healthy and every probe passed.
    pub ok: bool,
    /// Why the twin did not come up, when it did not.
    pub error: Option<String>,
    /// What the drill made and could not remove (empty after a clean drill, or with `keep`).
    pub left: Vec<String>,
    pub total_ms: u64,
}

impl DrillReport {
    /// Why the drill failed, in a line: the restore's error, else the failed probes.
    pub fn failure(&self) -> String {
        if let Some(e) = &self.error {
            return format!("the twin did not come up: {e}");
        }
        let failed: Vec<String> = self
            .probes
            .iter()
            .filter(|p| !p.ok)
            .map(|p| format!("probe {} {:?}", p.service, p.command))
            .collect();
        format!("failed {}", failed.join(", "))
    }

    /// The report in Prometheus text format, for node_exporter's textfile collector.
    pub fn metrics(&self) -> String {
        let workload = self.workload.replace('\\', "\\\\").replace('"', "\\\"");
        let l = format!("workload=\"{workload}\"");
        let phases = self
            .restore
            .as_ref()
            .map(|r| r.phases.clone())
            .unwrap_or_default();
        let mut out = String::new();
        let mut metric = |name: &str, help: &str, lines: Vec<(String, f64)>| {
            out.push_str(&format!(
                "# HELP tresor_drill_{name} {help}\n# TYPE tresor_drill_{name} gauge\n"
            ));
            for (labels, v) in lines {
                out.push_str(&format!("tresor_drill_{name}{{{labels}}} {v}\n"));
            }
        };
        metric(
            "last_run_timestamp_seconds",
            "When the last drill ended.",
            vec![(l.clone(), chrono::Utc::now().timestamp() as f64)],
        );
        metric(
            "success",
            "1 if the last drill's twin came up healthy and passed every probe.",
            vec![(l.clone(), f64::from(u8::from(self.ok)))],
        );
        metric(
            "recovery_seconds",
            "The last drill's recovery time: from the start of the restore until the twin was healthy.",
            vec![(l.clone(), phases.total_ms as f64 / 1000.0)],
        );
        metric(
            "phase_seconds",
            "The last drill's recovery time by phase.",
            [
                ("images", phases.images_ms),
                ("volumes", phases.volumes_ms),
                ("start", phases.start_ms),
                ("healthy", phases.healthy_ms),
            ]
            .iter()
            .map(|(phase, ms)| (format!("{l},phase=\"{phase}\""), *ms as f64 / 1000.0))
            .collect(),
        );
        let failed = self.probes.iter().filter(|p| !p.ok).count();
        metric(
            "probes_failed",
            "Probes that failed in the last drill.",
            vec![(l, failed as f64)],
        );
        out
    }
}

/// Drills the newest snapshot of workload `what.workload`. Blocking.
///
/// Returns the report also when the twin failed (`ok` false: it did not come up, or a probe
/// failed); everything the drill made is removed either way unless `what.keep`.
///
/// # Errors
/// Before the twin is made: bad probes, no such workload, a record refused as unsafe or
/// asking for host access, a project that exists. Store errors.
pub fn drill(
    repo: &Arc<Repository>,
    rt: &Handle,
    cache_dir: Option<&Path>,
    what: &DrillOptions,
    registry: &Registry,
) -> Result<DrillReport> {
    let started = Instant::now();
    let probes = what
        .probe
        .iter()
        .map(|p| super::workload::parse_exec(p).map_err(|e| e.context("--probe")))
        .collect::<Result<Vec<_>>>()?;
    let snap = newest(repo, rt, what)?;
    let project = compose::normalize_name(&format!(
        "{}-drill-{:08x}",
        what.workload,
        rand::random::<u32>()
    ));
    let scratch = scratch_dir(cache_dir)?;
    let to = scratch.path().join("twin");
    let restoring = WorkloadRestore {
        registry: what.registry.clone(),
        project: Some(project.clone()),
        to: to.clone(),
        up: true,
        force: false,
        dry_run: false,
        engine_socket: what.engine_socket.clone(),
        allow_host_access: what.allow_host_access,
        beside_original: true,
        // The drill removes its twin itself, whether it came up or not (`remove_twin`): the
        // restore's own undo would do the same work first.
        keep_partial: true,
    };
    let restored = restore(repo, rt, &snap, &restoring, registry);
    let mut report = DrillReport {
        workload: what.workload.clone(),
        project: project.clone(),
        restore: None,
        probes: Vec::new(),
        ok: false,
        error: None,
        left: Vec::new(),
        total_ms: 0,
    };
    let engine = Engine::connect(rt, what.engine_socket.as_deref())?;
    match restored {
        Ok(twin) => {
            report.probes = probes
                .iter()
                .map(|(service, cmd)| probe(&engine, &project, service, cmd))
                .collect();
            report.ok = twin.complete && report.probes.iter().all(|p| p.ok);
            if !twin.complete {
                report.error = Some(format!(
                    "the twin is incomplete: {}",
                    twin.missing.join("; ")
                ));
            }
            report.restore = Some(twin);
        }
        // Refused before anything was made: the drill could not run, which is not a twin
        // that failed to come up.
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::Config | ErrorKind::NotFound | ErrorKind::Unsafe
            ) =>
        {
            return Err(e);
        }
        Err(e) => report.error = Some(e.to_string()),
    }
    if what.keep {
        // Kept for a look: the directory too.
        let kept = scratch.keep();
        report.left.push(format!("directory {}", kept.display()));
    } else {
        report.left = remove_twin(&engine, what, &project, &to, report.restore.as_ref());
    }
    report.total_ms = started.elapsed().as_millis() as u64;
    if let Some(path) = &what.metrics_file {
        let metrics = report.metrics();
        crate::localfile::write_atomically(path, crate::localfile::SHARED, metrics.as_bytes())?;
    }
    Ok(report)
}

/// The snapshot to drill: the newest of the workload, or its newest quiesced one.
fn newest(repo: &Arc<Repository>, rt: &Handle, what: &DrillOptions) -> Result<Listed> {
    if what.consistent {
        super::workload::newest_consistent(repo, rt, &what.workload)
    } else {
        rt.block_on(crate::snapshot::resolve(
            repo,
            &what.workload,
            Some(Kind::Workload),
        ))
    }
}

/// A private scratch directory (0700, removed when dropped) beside the cache, or in the
/// system's temporary directory.
fn scratch_dir(cache_dir: Option<&Path>) -> Result<tempfile::TempDir> {
    let parent = cache_dir.map_or_else(std::env::temp_dir, Path::to_path_buf);
    tempfile::Builder::new()
        .prefix("tresor-drill-")
        .tempdir_in(&parent)
        .map_err(|e| Error::io(&parent, e))
}

/// Runs one probe in the twin's running container of `service`.
fn probe(engine: &Engine, project: &str, service: &str, cmd: &str) -> ProbeOutcome {
    let started = Instant::now();
    let ran = engine.project_containers(project).and_then(|all| {
        let c = all
            .iter()
            .find(|c| c.service == service && c.running)
            .ok_or_else(|| Error::Config(format!("the twin has no running service {service}")))?;
        engine.exec_output(c, cmd)
    });
    let (exit_code, output) = match ran {
        Ok((code, output)) => (code, output),
        Err(e) => (None, e.to_string()),
    };
    ProbeOutcome {
        service: service.into(),
        command: cmd.into(),
        ok: exit_code == Some(0),
        exit_code,
        output,
        ms: started.elapsed().as_millis() as u64,
    }
}

/// Removes the drill's project: its containers and networks, the volumes restored for it, the
/// image references it pulled. Returns what could not be removed, named.
fn remove_twin(
    engine: &Engine,
    what: &DrillOptions,
    project: &str,
    to: &Path,
    restored: Option<&WorkloadReport>,
) -> Vec<String> {
    let mut left = Vec::new();
    let compose_file = to.join("compose.yaml");
    if compose_file.exists() {
        let down = Compose::find(what.engine_socket.as_deref())
            .and_then(|c| c.down(&compose_file, project));
        if let Err(e) = down {
            left.push(format!("project {project}: {e}"));
        }
    }
    match engine.project_volumes(project) {
        Ok(volumes) => {
            for v in volumes {
                if let Err(e) = engine.remove_volume(&v) {
                    left.push(format!("volume {v}: {e}"));
                }
            }
        }
        Err(e) => left.push(format!("the volumes of {project}: {e}")),
    }
    let images = restored.map(|r| r.images.as_slice()).unwrap_or_default();
    let mut pulled: Vec<&str> = images.iter().map(|i| i.target.as_str()).collect();
    pulled.sort_unstable();
    pulled.dedup();
    for image in pulled {
        if let Err(e) = engine.remove_image(image) {
            left.push(format!("image {image}: {e}"));
        }
    }
    left
}
