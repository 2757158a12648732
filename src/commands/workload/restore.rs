//! `restore workload`: the record placed and reviewed first ([`place`]: where each member goes,
//! the project as the twin runs it, what it asks of the host), the refusals checked, then the
//! steps applied in order (images, volumes, bind mounts, the project's files, `up`), and what
//! they made removed again when one gives up.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tokio::runtime::Handle;

use super::HEALTHY_TIMEOUT;
use crate::error::{Error, Result};
use crate::oci::registry::Registry;
use crate::oci::ImageTarget;
use crate::progress::Progress;
use crate::repository::Repository;
use crate::snapshot::{Kind, Listed, Snapshot};
use crate::volume::RestoreOptions;
use crate::workload::compose::{self, Compose};
use crate::workload::engine::Engine;
use crate::workload::{load_record, policy, Consistency, WorkloadRecord};

/// What [`restore`] does.
pub struct WorkloadRestore {
    /// `HOST[:PORT][/PREFIX]`: images go to `HOST/PREFIX/REPO`.
    pub registry: String,
    /// The new project's name [default: the original one].
    pub project: Option<String>,
    /// Where the rewritten compose file, `.env` and bind-mounted paths go.
    pub to: PathBuf,
    /// Start the project and wait until it is healthy.
    pub up: bool,
    /// Replace existing non-empty volumes, and restore as a project that exists (never as one
    /// that runs).
    pub force: bool,
    /// Only say what would be done: change nothing.
    pub dry_run: bool,
    /// The engine's API socket [default: as the docker CLI finds it].
    pub engine_socket: Option<PathBuf>,
    /// Grant what the project asks of the host (privileges, host namespaces and paths, the
    /// record's volume drivers and options, and with `up` a project from an unencrypted
    /// repository); without it such a restore is refused, naming each.
    pub allow_host_access: bool,
    /// A drill's twin, run beside the original on the same engine
    /// ([`compose::beside_original`]): the record's volume drivers and options are never
    /// reused, as they would reach the original's data.
    pub beside_original: bool,
    /// When the restore gives up, keep the volumes it made and the containers it started
    /// (for a look, or for a rerun to continue).
    pub keep_partial: bool,
}

impl WorkloadRestore {
    /// Whether the twin's volumes get the record's drivers and options.
    fn reuses_volume_options(&self) -> bool {
        self.allow_host_access && !self.beside_original
    }
}

/// One image of the report.
#[derive(Clone, Debug, Serialize)]
pub struct ImageOutcome {
    pub service: String,
    pub source: String,
    pub target: String,
    pub digest: String,
    /// Whether the target serves the image under the source digest (false in a dry run).
    pub digest_equal: bool,
    pub blobs: u64,
    /// Blobs the target had already (or, in a dry run, has).
    pub blobs_present: u64,
    /// Bytes uploaded (or, in a dry run, to upload).
    pub bytes_to_move: u64,
}

/// One volume or bind mount of the report.
#[derive(Clone, Debug, Serialize)]
pub struct VolumeOutcome {
    pub name: String,
    pub to: String,
    /// Whether the engine volume or directory existed before.
    pub existed: bool,
    pub files: u64,
    pub bytes: u64,
    pub chunks_verified: u64,
}

/// Milliseconds of each phase. The images and the volumes move at the same time: the recovery
/// time holds the longer of the two, not their sum.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Phases {
    /// Pushing the images to the target registry and, with `--up`, pulling them into the engine.
    pub images_ms: u64,
    /// Restoring the volumes and bind mounts.
    pub volumes_ms: u64,
    pub start_ms: u64,
    pub healthy_ms: u64,
    /// The recovery time: from the start of the restore until the project is healthy (or
    /// until its files are written, without `--up`).
    pub total_ms: u64,
}

/// The rehydration report.
#[derive(Clone, Debug, Serialize)]
pub struct WorkloadReport {
    /// Nothing was changed: the report is the plan.
    pub dry_run: bool,
    pub snapshot: String,
    /// How the snapshot's volumes were made consistent, how long the services were down for
    /// it, and whether every volume was copied quiesced ([`WorkloadRecord::is_consistent`]).
    pub consistency: Consistency,
    pub downtime_ms: u64,
    pub consistent: bool,
    pub project: String,
    pub compose_file: String,
    pub images: Vec<ImageOutcome>,
    pub volumes: Vec<VolumeOutcome>,
    pub started: bool,
    /// What the project was allowed of this host (`--allow-host-access`), one line each.
    pub host_access: Vec<String>,
    /// Where the twin differs from the original, one line each.
    pub notes: Vec<String>,
    pub phases: Phases,
    /// Empty when the twin is complete.
    pub missing: Vec<String>,
    pub complete: bool,
}

/// A member snapshot, by the id its workload record holds (one GET: no listing), of `kind`.
///
/// # Errors
/// Store errors; [`Error::Corrupt`] for a member of another kind.
fn member(repo: &Arc<Repository>, rt: &Handle, id: &str, kind: Kind) -> Result<Listed> {
    // The record is input: only a snapshot id may name a store key.
    if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::Corrupt {
            object: format!("member {id:?}"),
            reason: "a workload member must be a snapshot id (64 hex digits)".into(),
        });
    }
    let snapshot = rt.block_on(Snapshot::load(repo, id))?;
    if snapshot.kind != kind {
        return Err(Error::Corrupt {
            object: format!("snapshot {id}"),
            reason: format!(
                "a workload names it as a {kind:?} member; it is a {:?} snapshot",
                snapshot.kind
            ),
        });
    }
    Ok(Listed {
        id: id.to_string(),
        snapshot,
    })
}

/// `HOST/PREFIX/REPO` for image `source` (`[HOST/]REPO[:TAG|@DIGEST]`) under `registry`; a
/// source under `PREFIX/` already (a twin's own image, when a twin is restored again) keeps
/// a single prefix.
fn target_repository(registry: &str, source: &str) -> String {
    let without_host = match source.split_once('/') {
        Some((_, rest)) if crate::workload::engine::names_a_registry(source) => rest,
        _ => source,
    };
    let repo = without_host
        .split_once('@')
        .map_or(without_host, |(r, _)| r);
    let repo = match repo.rsplit_once(':') {
        Some((r, tag)) if !tag.contains('/') => r,
        _ => repo,
    };
    let registry = registry.trim_end_matches('/');
    let repo = match registry.split_once('/') {
        Some((_, prefix)) => repo
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('/'))
            .unwrap_or(repo),
        None => repo,
    };
    format!("{registry}/{repo}")
}

/// Where each member of a workload goes, and the project as the twin will run it: decided
/// from the record alone, before anything is written, so that the host-access review and a
/// dry run see exactly what the restore would do.
struct Placement {
    project: String,
    /// `--to`, absolute.
    to: PathBuf,
    /// Per service: the target repository and the pinned reference.
    images: Vec<(String, String)>,
    /// Per volume member: its engine volume name.
    engine_names: BTreeMap<String, String>,
    /// Per bind member: the directory under `--to` (`volumes` or `binds`) and its name there.
    binds: Vec<(&'static str, String)>,
    /// The compose project rewritten for the twin (`Null` for a workload given by hand).
    config: serde_yaml::Value,
    /// What the project asks of the host beyond its own containers and files.
    host_access: Vec<String>,
    /// What the twin does differently from the original, and why.
    notes: Vec<String>,
}

/// Plans the restore of `record` (see [`Placement`]), refusing a record that is not safe to
/// act on and, unless `what.allow_host_access`, a project that asks for access to the host.
fn place(
    repo: &Repository,
    snap: &Listed,
    record: &WorkloadRecord,
    what: &WorkloadRestore,
) -> Result<Placement> {
    let explicit = record.compose_files.is_empty();
    let config: serde_yaml::Value = if explicit {
        serde_yaml::Value::Null
    } else {
        serde_yaml::from_str(&record.config).map_err(|e| Error::Corrupt {
            object: format!("workload record of snapshot {}", snap.id),
            reason: format!("its compose project does not parse: {e}"),
        })?
    };
    policy::check_record(record, &config, &snap.id)?;
    let project = compose::normalize_name(what.project.as_deref().unwrap_or(&record.project));
    if !explicit && project.is_empty() {
        return Err(Error::Config(
            "the project name is empty once normalized: give --project".into(),
        ));
    }
    let to = std::path::absolute(&what.to).map_err(|e| Error::io(&what.to, e))?;
    let images: Vec<(String, String)> = record
        .services
        .iter()
        .map(|s| {
            let target_repo = target_repository(&what.registry, &s.image);
            let pinned = format!("{target_repo}@{}", s.digest);
            (target_repo, pinned)
        })
        .collect();
    let engine_names = record
        .volumes
        .iter()
        .map(|v| (v.key.clone(), format!("{project}_{}", v.key)))
        .collect::<BTreeMap<_, _>>();
    let binds: Vec<(&'static str, String)> = record
        .binds
        .iter()
        .enumerate()
        .map(|(i, b)| match &b.name {
            Some(name) => ("volumes", name.clone()),
            None => ("binds", i.to_string()),
        })
        .collect();
    let mut placement = Placement {
        project,
        to,
        images,
        engine_names,
        binds,
        config: serde_yaml::Value::Null,
        host_access: Vec::new(),
        notes: Vec::new(),
    };
    if explicit {
        return Ok(placement);
    }
    let rewritten_images = record
        .services
        .iter()
        .zip(&placement.images)
        .map(|(s, (_, pinned))| (s.name.clone(), pinned.clone()))
        .collect();
    let bind_paths: BTreeMap<PathBuf, PathBuf> = record
        .binds
        .iter()
        .zip(&placement.binds)
        .map(|(b, (dir, name))| (b.source.clone(), placement.to.join(dir).join(name)))
        .collect();
    placement.config = compose::rewrite(
        &config,
        &rewritten_images,
        &bind_paths,
        &placement.engine_names,
    );
    if what.beside_original {
        compose::beside_original(&mut placement.config);
    }
    let restored: Vec<PathBuf> = bind_paths.into_values().collect();
    placement.host_access = host_access(repo, record, what, &mut placement, &restored)?;
    Ok(placement)
}

/// What the twin would reach on the host beyond its own containers, volumes and the files
/// restored for it (`restored`), one line each, refused without `--allow-host-access`. A
/// volume driver or options not reused become a note of `placement`.
fn host_access(
    repo: &Repository,
    record: &WorkloadRecord,
    what: &WorkloadRestore,
    placement: &mut Placement,
    restored: &[PathBuf],
) -> Result<Vec<String>> {
    let volumes = placement.engine_names.keys().cloned().collect();
    let mut lines = policy::host_access(&placement.config, restored, &volumes);
    // The record's volume drivers and options reach host paths or remote shares (on the same
    // engine, the original's live directory): reused only with the grant; without it the
    // twin's volumes are plain local ones, and the report says so.
    for v in &record.volumes {
        if v.engine.driver != "local" || !v.engine.options.is_empty() {
            let line = format!(
                "volume {}: driver {} with options {}",
                v.key,
                v.engine.driver,
                policy::redacted(v.engine.options.keys().map(String::as_str))
            );
            if what.reuses_volume_options() {
                lines.push(format!("{line}, reused"));
            } else {
                let unless = if what.beside_original {
                    "a drill never reuses them"
                } else {
                    "--allow-host-access reuses them"
                };
                placement.notes.push(format!(
                    "{line}: restored as a plain local volume ({unless})"
                ));
            }
        }
    }
    if what.up && !repo.is_encrypted() {
        lines.push(
            "the repository is unencrypted: whoever may write its store could have written this project, its images and commands"
                .into(),
        );
    }
    if !lines.is_empty() && !what.allow_host_access {
        return Err(Error::HostAccess {
            project: placement.project.clone(),
            lines,
        });
    }
    Ok(lines)
}

/// `--to`, created 0700 when missing and opened once; everything below it is reached from this
/// descriptor. With `--up` it must be private: the compose tool reads the project from it by
/// path, so nobody else may be able to swap a file there.
fn open_target(to: &Path, up: bool) -> Result<std::os::fd::OwnedFd> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(to)
        .map_err(|e| Error::io(to, e))?;
    let fd = rustix::fs::open(
        to,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| Error::io(to, e.into()))?;
    let st = rustix::fs::fstat(&fd).map_err(|e| Error::io(to, e.into()))?;
    let others_write = st.st_mode & 0o022 != 0 || st.st_uid != nix::unistd::geteuid().as_raw();
    if up && others_write {
        return Err(Error::UnsafePath {
            path: to.display().to_string(),
            reason: "others may write in it, and with --up the compose tool reads the project from it by path; give a directory only you may write (or a new one: it is made 0700)",
        });
    }
    Ok(fd)
}

/// Restores workload snapshot `snap` as project `what.project`. Blocking.
///
/// Everything is placed and checked first (the record, host access, an existing project,
/// volumes that are not empty), then applied. A restore that gives up removes the volumes it
/// made and the containers it started (unless `what.keep_partial`); a volume an earlier run of
/// this restore made is taken up again, so a rerun continues.
///
/// # Errors
/// [`Error::UnsafeRecord`] and [`Error::HostAccess`] from the review of the record (before
/// anything is written); errors of the members' restores (named), of the engine and the
/// compose tool; a volume that exists and is not empty without `force`.
pub fn restore(
    repo: &Arc<Repository>,
    rt: &Handle,
    snap: &Listed,
    what: &WorkloadRestore,
    registry: &Registry,
) -> Result<WorkloadReport> {
    let started = Instant::now();
    let record = load_record(repo, rt, snap)?;
    let placement = place(repo, snap, &record, what)?;
    // A workload given by hand has no project to run: its images and volumes come back, and
    // no engine is needed.
    let explicit = record.compose_files.is_empty();
    if explicit && what.up {
        return Err(Error::Config(format!(
            "workload {} was given by --image and --volume: it has no compose project to start",
            snap.snapshot.name
        )));
    }
    let engine = if explicit {
        None
    } else {
        let engine = Engine::connect(rt, what.engine_socket.as_deref())?;
        // A dry run refuses what the real run would refuse.
        check_project(&engine, &placement.project, what.force)?;
        check_volumes(&engine, snap, &record, &placement, what.force)?;
        Some(engine)
    };
    let target = if what.dry_run {
        None
    } else {
        Some(open_target(&placement.to, what.up)?)
    };
    let mut apply = Apply {
        repo,
        rt,
        snap,
        record: &record,
        placement: &placement,
        what,
        engine: engine.as_ref(),
        quiet: Progress::new(false, "", None),
        missing: Default::default(),
        made: Default::default(),
        ran_up: false,
    };
    let applied = apply.run(registry, target, started);
    match applied {
        Err(e) if !what.dry_run && !what.keep_partial => Err(apply.undo(e)),
        other => other,
    }
}

/// Refuses to restore as project `project` when it exists (unless `force`) or runs (always):
/// a restore never writes under a live container.
fn check_project(engine: &Engine, project: &str, force: bool) -> Result<()> {
    let existing = engine.project_containers(project)?;
    if !existing.is_empty() && !force {
        return Err(Error::Config(format!(
            "a compose project named {project} exists on this engine; give another --project, or --force"
        )));
    }
    let mut live: Vec<&str> = existing
        .iter()
        .filter(|c| c.running)
        .map(|c| c.service.as_str())
        .collect();
    live.sort_unstable();
    if !live.is_empty() {
        return Err(Error::Config(format!(
            "project {project} is running (services {}): a restore never writes under a live container; stop it first (`docker-compose -p {project} down`) or give another --project",
            live.join(", ")
        )));
    }
    Ok(())
}

/// Refuses, before anything is written, a volume of the twin that exists and is not empty,
/// unless `force` or an earlier run of this restore (of this snapshot) made it.
fn check_volumes(
    engine: &Engine,
    snap: &Listed,
    record: &WorkloadRecord,
    placement: &Placement,
    force: bool,
) -> Result<()> {
    for v in &record.volumes {
        let name = &placement.engine_names[&v.key];
        let Some(existing) = engine.volume(name)? else {
            continue;
        };
        let empty = std::fs::read_dir(&existing.mountpoint)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty && !force && !existing.restored_from(&snap.id) {
            return Err(Error::Config(format!(
                "volume {name} exists and is not empty; give --force to replace its contents"
            )));
        }
    }
    Ok(())
}

/// Gives the restored bind-mounted file `name` in `dir` its recorded mode and owner, through a
/// descriptor opened without following a symlink. Setuid, setgid and sticky bits only when
/// `special` (a repository nobody without the key could have written), as for trees.
fn give_mode(
    dir: &std::os::fd::OwnedFd,
    name: &str,
    mode: &crate::workload::FileMode,
    special: bool,
    shown: &Path,
) -> Result<()> {
    use rustix::fs::{Gid, Mode, OFlags, Uid};
    let io = |e: rustix::io::Errno| Error::io(shown, e.into());
    let file = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    )
    .map_err(io)?;
    // The owner first: a change of owner clears the setuid and setgid bits.
    let (uid, gid) = (Uid::from_raw(mode.uid), Gid::from_raw(mode.gid));
    rustix::fs::fchown(&file, Some(uid), Some(gid)).map_err(io)?;
    let bits = mode.mode & if special { 0o7777 } else { 0o777 };
    rustix::fs::fchmod(&file, Mode::from_raw_mode(bits)).map_err(io)
}

/// One restore being applied: the steps in order, and what they made, for [`Apply::undo`].
struct Apply<'a> {
    repo: &'a Arc<Repository>,
    rt: &'a Handle,
    snap: &'a Listed,
    record: &'a WorkloadRecord,
    placement: &'a Placement,
    what: &'a WorkloadRestore,
    engine: Option<&'a Engine>,
    quiet: Progress,
    /// What could not be restored, named: the twin is not complete.
    missing: std::sync::Mutex<Vec<String>>,
    /// Engine volumes this run created.
    made: std::sync::Mutex<Vec<String>>,
    /// Whether this run asked the compose tool to start the project.
    ran_up: bool,
}

impl Apply<'_> {
    fn run(
        &mut self,
        registry: &Registry,
        target: Option<std::os::fd::OwnedFd>,
        started: Instant,
    ) -> Result<WorkloadReport> {
        let (what, placement, record) = (self.what, self.placement, self.record);
        let explicit = record.compose_files.is_empty();
        // The images (pushed, and with `up` pulled into the engine) and the volumes move at
        // once: the recovery waits for the slower of the two, not for their sum.
        let this = &*self;
        let (images, volumes) = std::thread::scope(|scope| {
            let images = scope.spawn(|| {
                let before = Instant::now();
                let images = this.images(registry)?;
                if what.up && !what.dry_run {
                    this.pull(&images);
                }
                Ok::<_, Error>((images, before.elapsed().as_millis() as u64))
            });
            let before = Instant::now();
            let volumes = this.volumes().and_then(|mut v| {
                v.extend(this.binds(target.as_ref())?);
                Ok((v, before.elapsed().as_millis() as u64))
            });
            (
                images.join().expect("the images step does not panic"),
                volumes,
            )
        });
        let (volumes, volumes_ms) = volumes?;
        let (images, images_ms) = images?;
        let compose_file = placement.to.join("compose.yaml");
        let mut report = WorkloadReport {
            dry_run: what.dry_run,
            snapshot: self.snap.id.clone(),
            consistency: record.consistency,
            downtime_ms: record.downtime_ms,
            consistent: record.is_consistent(),
            project: placement.project.clone(),
            compose_file: if explicit {
                String::new()
            } else {
                compose_file.display().to_string()
            },
            images,
            volumes,
            started: false,
            host_access: placement.host_access.clone(),
            notes: placement.notes.clone(),
            phases: Phases {
                images_ms,
                volumes_ms,
                ..Phases::default()
            },
            complete: false,
            missing: std::mem::take(&mut *self.missing.lock().expect("missing")),
        };
        let Some(target) = target.filter(|_| !explicit) else {
            report.phases.total_ms = started.elapsed().as_millis() as u64;
            report.complete = report.missing.is_empty() && !what.dry_run;
            if what.dry_run {
                report.phases = Phases::default();
            }
            return Ok(report);
        };
        self.write_project(&target, &compose_file)?;
        if what.up {
            let engine = self.engine.expect("a compose workload has an engine");
            let before = Instant::now();
            self.ran_up = true;
            Compose::find(what.engine_socket.as_deref())?.up(&compose_file, &placement.project)?;
            report.phases.start_ms = before.elapsed().as_millis() as u64;
            let before = Instant::now();
            engine.wait_healthy(&placement.project, HEALTHY_TIMEOUT)?;
            report.phases.healthy_ms = before.elapsed().as_millis() as u64;
            report.started = true;
        }
        report.phases.total_ms = started.elapsed().as_millis() as u64;
        report.complete = report.missing.is_empty();
        Ok(report)
    }

    /// The images into the target registry (in a dry run: what would move).
    fn images(&self, registry: &Registry) -> Result<Vec<ImageOutcome>> {
        let (repo, rt, what) = (self.repo, self.rt, self.what);
        let mut images: Vec<ImageOutcome> = Vec::new();
        for (s, (target_repo, pinned)) in self.record.services.iter().zip(&self.placement.images) {
            // Services sharing an image: it moves once, for the first of them.
            if let Some(done) = images.iter().find(|i| i.target == *pinned).cloned() {
                images.push(ImageOutcome {
                    service: s.name.clone(),
                    blobs_present: done.blobs,
                    bytes_to_move: 0,
                    ..done
                });
                continue;
            }
            let member = member(repo, rt, &s.snapshot, Kind::Image)?;
            let target = ImageTarget::parse(&format!("docker://{target_repo}"))?;
            let named = |e: Error| e.context(format!("service {} (image {})", s.name, s.image));
            let outcome = if what.dry_run {
                let ImageTarget::Registry { reference, .. } = &target else {
                    unreachable!("a docker:// target")
                };
                let blobs = crate::oci::load_record(repo, rt, &member)?.blobs;
                let mut present = 0;
                let mut to_move = 0;
                for b in &blobs {
                    // A registry that cannot answer is taken as not holding the blob.
                    if rt
                        .block_on(registry.has_blob(reference, &b.digest))
                        .unwrap_or(false)
                    {
                        present += 1;
                    } else {
                        to_move += b.size;
                    }
                }
                (false, blobs.len() as u64, present, to_move)
            } else {
                let report = crate::oci::restore(repo, rt, registry, &member, &target, &self.quiet)
                    .map_err(named)?;
                if !report.ok {
                    self.miss(format!("image of service {}: digests differ", s.name));
                }
                let blobs = report.blobs_pushed + report.blobs_skipped + report.blobs_mounted;
                (report.ok, blobs, report.blobs_skipped, report.bytes_pushed)
            };
            images.push(ImageOutcome {
                service: s.name.clone(),
                source: s.image.clone(),
                target: pinned.clone(),
                digest: s.digest.clone(),
                digest_equal: outcome.0,
                blobs: outcome.1,
                blobs_present: outcome.2,
                bytes_to_move: outcome.3,
            });
        }
        Ok(images)
    }

    /// Notes what could not be restored: the twin is not complete.
    fn miss(&self, what: String) {
        self.missing.lock().expect("missing").push(what);
    }

    /// Pulls the twin's images into the engine, so that `up` starts them without a pull; a
    /// pull that fails is left to the compose tool, which says why.
    fn pull(&self, images: &[ImageOutcome]) {
        let Some(engine) = self.engine else {
            return;
        };
        let mut targets: Vec<&str> = images.iter().map(|i| i.target.as_str()).collect();
        targets.sort_unstable();
        targets.dedup();
        for image in targets {
            if let Err(e) = engine.pull(image) {
                tracing::info!("{e}; the compose tool pulls it");
            }
        }
    }

    /// As `restore volume`: device nodes and setuid bits only from a repository that nobody
    /// without the key could have written.
    fn restore_options(&self) -> RestoreOptions {
        RestoreOptions {
            paths: Vec::new(),
            chown: true,
            special: self.repo.is_encrypted(),
        }
    }

    /// The named volumes into engine volumes, made for the twin when missing.
    fn volumes(&self) -> Result<Vec<VolumeOutcome>> {
        let (repo, rt, what) = (self.repo, self.rt, self.what);
        let mut volumes = Vec::new();
        for v in &self.record.volumes {
            let engine = self
                .engine
                .expect("named volumes come from a compose project");
            let name = &self.placement.engine_names[&v.key];
            let member = member(repo, rt, &v.snapshot, Kind::Volume)?;
            let existing = engine.volume(name)?;
            if what.dry_run {
                volumes.push(VolumeOutcome {
                    name: v.key.clone(),
                    to: format!("engine volume {name}"),
                    existed: existing.is_some(),
                    files: member.snapshot.summary.files,
                    bytes: member.snapshot.summary.logical_bytes,
                    chunks_verified: 0,
                });
                continue;
            }
            let info = match existing.clone() {
                Some(info) => info,
                None => {
                    // The record's driver and options reach host paths or remote shares:
                    // reused only when the operator allowed host access.
                    let like = if what.reuses_volume_options() {
                        v.engine.clone()
                    } else {
                        crate::workload::engine::VolumeInfo {
                            driver: "local".into(),
                            options: Default::default(),
                            ..v.engine.clone()
                        }
                    };
                    let made = engine.create_volume(
                        name,
                        &like,
                        &self.placement.project,
                        &v.key,
                        &self.snap.id,
                    )?;
                    self.made.lock().expect("made").push(name.clone());
                    made
                }
            };
            let report = crate::volume::restore(
                repo,
                rt,
                &member,
                Path::new(&info.mountpoint),
                &self.restore_options(),
                &self.quiet,
            )
            .map_err(|e| e.context(format!("volume {}", v.key)))?;
            for f in &report.failed {
                self.miss(format!("volume {}: {f}", v.key));
            }
            volumes.push(VolumeOutcome {
                name: v.key.clone(),
                to: format!("engine volume {name}"),
                existed: existing.is_some(),
                files: report.files,
                bytes: report.bytes_written,
                chunks_verified: report.chunks_verified,
            });
        }
        Ok(volumes)
    }

    /// The bind-mounted paths under `--to` (`target`; none in a dry run).
    fn binds(&self, target: Option<&std::os::fd::OwnedFd>) -> Result<Vec<VolumeOutcome>> {
        let (repo, rt, placement) = (self.repo, self.rt, self.placement);
        let mut volumes = Vec::new();
        for (b, (dir, name)) in self.record.binds.iter().zip(&placement.binds) {
            let to = placement.to.join(dir).join(name);
            let member = member(repo, rt, &b.snapshot, Kind::Volume)?;
            let shown_source = b.source.display().to_string();
            let Some(target) = target else {
                volumes.push(VolumeOutcome {
                    name: shown_source,
                    existed: to.exists(),
                    to: to.display().to_string(),
                    files: member.snapshot.summary.files,
                    bytes: member.snapshot.summary.logical_bytes,
                    chunks_verified: 0,
                });
                continue;
            };
            let parent = crate::volume::open_subdir(
                std::os::fd::AsFd::as_fd(target),
                std::ffi::OsStr::new(dir),
                &placement.to.join(dir),
            )?;
            let existed = rustix::fs::statat(
                &parent,
                name.as_str(),
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )
            .is_ok();
            let report = crate::volume::restore_in(
                repo,
                rt,
                &member,
                std::os::fd::AsFd::as_fd(&parent),
                std::ffi::OsStr::new(name),
                &to,
                &self.restore_options(),
                &self.quiet,
            )
            .map_err(|e| e.context(format!("bind mount {shown_source}")))?;
            if let Some(mode) = &b.file {
                let special = self.restore_options().special;
                give_mode(&parent, name, mode, special, &to)
                    .map_err(|e| e.context(format!("bind mount {shown_source}")))?;
            }
            for f in &report.failed {
                self.miss(format!("bind mount {shown_source}: {f}"));
            }
            volumes.push(VolumeOutcome {
                name: shown_source,
                to: to.display().to_string(),
                existed,
                files: report.files,
                bytes: report.bytes_written,
                chunks_verified: report.chunks_verified,
            });
        }
        Ok(volumes)
    }

    /// The twin's `compose.yaml` and `.env` in `--to` (`target`).
    fn write_project(&self, target: &std::os::fd::OwnedFd, compose_file: &Path) -> Result<()> {
        let placement = self.placement;
        let yaml = serde_yaml::to_string(&placement.config)
            .map_err(|e| Error::Config(format!("cannot print the compose project: {e}")))?;
        // Both hold the project's secrets (the compose tool interpolated them): private.
        let private = crate::localfile::PRIVATE;
        let dir = std::os::fd::AsFd::as_fd(target);
        crate::localfile::write_at(dir, "compose.yaml", private, yaml.as_bytes(), compose_file)?;
        let mut env = self
            .record
            .env_file
            .as_ref()
            .map(|e| e.bytes.clone())
            .unwrap_or_default();
        if !env.is_empty() && !env.ends_with(b"\n") {
            env.push(b'\n');
        }
        env.extend_from_slice(format!("COMPOSE_PROJECT_NAME={}\n", placement.project).as_bytes());
        crate::localfile::write_at(dir, ".env", private, &env, &placement.to.join(".env"))
    }

    /// After `error`: removes the containers this run started and the volumes it made, and
    /// says so in the error (files under `--to` stay: they are the operator's to look at).
    fn undo(&self, error: Error) -> Error {
        let Some(engine) = self.engine else {
            return error;
        };
        let project = &self.placement.project;
        let mut undone = Vec::new();
        let mut left = Vec::new();
        if self.ran_up {
            let compose_file = self.placement.to.join("compose.yaml");
            match Compose::find(self.what.engine_socket.as_deref())
                .and_then(|c| c.down(&compose_file, project))
            {
                Ok(()) => undone.push(format!("the containers of {project}")),
                Err(e) => left.push(format!("project {project} ({e})")),
            }
        }
        for v in self.made.lock().expect("made").iter() {
            match engine.remove_volume(v) {
                Ok(()) => undone.push(format!("volume {v}")),
                Err(e) => left.push(format!("volume {v} ({e})")),
            }
        }
        let mut said = String::new();
        if !undone.is_empty() {
            said = format!("removed what this restore made: {}", undone.join(", "));
        }
        if !left.is_empty() {
            said = format!("{said}; could not remove {}", left.join(", "));
        }
        if said.is_empty() {
            error
        } else {
            error.context(format!("{said} (--keep-partial keeps it)"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_go_under_the_target_registry_and_prefix() {
        let t = |r, s| target_repository(r, s);
        assert_eq!(
            t("127.0.0.1:6000/dr", "127.0.0.1:5000/shop/web:1"),
            "127.0.0.1:6000/dr/shop/web"
        );
        assert_eq!(
            t("reg.example/", "reg.old:5000/app@sha256:ab"),
            "reg.example/app"
        );
        assert_eq!(
            t("reg.example/dr", "shop-local/web:1"),
            "reg.example/dr/shop-local/web"
        );
        // A twin of a twin: one prefix.
        assert_eq!(
            t("127.0.0.1:7000/dr", "127.0.0.1:6000/dr/shop/web@sha256:ab"),
            "127.0.0.1:7000/dr/shop/web"
        );
        assert_eq!(
            t("reg.example/dr", "reg.old/drone/x:1"),
            "reg.example/dr/drone/x"
        );
    }
}
