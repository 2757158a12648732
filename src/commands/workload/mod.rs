//! Workloads: `backup workload` (members first, the workload record last) here, and `restore
//! workload` (images into a registry, volumes into the engine, a rewritten compose file, and
//! the project started) in `restore.rs`, with the report that gives the recovery
//! time. See [`crate::workload`] for what a workload snapshot holds.

mod plan;
mod quiesce;
mod restore;

pub use restore::{restore, ImageOutcome, Phases, VolumeOutcome, WorkloadReport, WorkloadRestore};

use std::collections::BTreeMap;

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::runtime::Handle;

use crate::chunker::Mode;
use crate::error::{Error, Result};
use crate::gc::Session;
use crate::oci::registry::Registry;
use crate::oci::ImageSource;
use crate::pipeline::{ChunkWriter, StreamWriter, DEFAULT_IN_FLIGHT};
use crate::progress::Progress;
use crate::repository::Repository;
use crate::snapshot::{Kind, Listed, RootFormat, Snapshot, Summary, RECORD_VERSION};
use crate::volume::BackupOptions;
use crate::workload::compose::{self, Compose};
use crate::workload::engine::{Container, Engine};
use crate::workload::{
    load_record, BindMember, Consistency, FileMode, KeptFile, ServiceMember, VolumeMember,
    WorkloadRecord,
};

/// A host hook of a workload backup (an LVM, btrfs or ZFS snapshot, say), run by the front
/// end: the agent's hooks have a clean environment and a timeout.
pub type Hook<'a> = &'a (dyn Fn() -> Result<()> + Sync);

/// How a compose project is backed up as a workload: the flags of `backup workload` and the
/// keys of an agent job of `type = "workload"` alike, so that the two cannot disagree.
#[derive(Clone, Debug, Default, clap::Args, Deserialize)]
pub struct ComposeOptions {
    /// Compose file (repeatable, in order, as `docker compose -f`).
    #[arg(long = "compose", value_name = "FILE", required_unless_present_any = ["image", "volume"])]
    #[serde(default)]
    pub compose: Vec<PathBuf>,
    /// Env file for the compose tool [default: .env beside the first compose file].
    #[arg(long, value_name = "FILE")]
    #[serde(default)]
    pub env_file: Option<PathBuf>,
    /// Compose project name [default: as compose names it].
    #[arg(long = "project-name", value_name = "NAME")]
    #[serde(default)]
    pub project: Option<String>,
    /// How volumes are made consistent while copied [default: stop; none without --compose].
    #[arg(long, value_enum)]
    #[serde(default)]
    pub consistency: Option<Consistency>,
    /// KEY=MODE: a volume (its key in the compose file) copied in another mode than
    /// --consistency: stop, pause or none (repeatable; agent: `{ KEY = "MODE" }`).
    #[arg(long, value_name = "KEY=MODE", value_parser = parse_volume_mode)]
    #[serde(default, deserialize_with = "volume_modes")]
    pub volume_consistency: Vec<(String, Consistency)>,
    /// With --consistency exec: SERVICE=COMMAND run inside the service before the copy (a
    /// database dump into its volume, say); a failure fails the workload (repeatable).
    #[arg(long, value_name = "SERVICE=COMMAND", value_parser = parse_exec)]
    #[serde(default, deserialize_with = "execs")]
    pub exec_before: Vec<(String, String)>,
    /// With --consistency exec: SERVICE=COMMAND run after the copy, whatever happened.
    #[arg(long, value_name = "SERVICE=COMMAND", value_parser = parse_exec)]
    #[serde(default, deserialize_with = "execs")]
    pub exec_after: Vec<(String, String)>,
    /// The container engine's API socket, e.g. Podman's /run/podman/podman.sock [default:
    /// DOCKER_HOST, else /var/run/docker.sock].
    #[arg(long, value_name = "PATH")]
    #[serde(default)]
    pub engine_socket: Option<PathBuf>,
}

impl ComposeOptions {
    /// The workload's mode: as given, else stop for a compose project and none for one given
    /// by hand (it has no containers to stop).
    pub fn consistency(&self) -> Consistency {
        self.consistency.unwrap_or(if self.compose.is_empty() {
            Consistency::None
        } else {
            Consistency::Stop
        })
    }
}

/// `KEY=MODE`, a volume's own mode.
fn parse_volume_mode(s: &str) -> Result<(String, Consistency)> {
    use clap::ValueEnum;
    let bad = || Error::Config(format!("{s:?}: write KEY=MODE, e.g. cache=none"));
    let (key, mode) = s.split_once('=').ok_or_else(bad)?;
    let mode = Consistency::from_str(mode, true).map_err(|_| bad())?;
    Ok((key.to_string(), mode))
}

/// `volume_consistency = { KEY = "MODE" }` in `agent.toml`.
fn volume_modes<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<(String, Consistency)>, D::Error> {
    Ok(BTreeMap::<String, Consistency>::deserialize(d)?
        .into_iter()
        .collect())
}

/// `exec_before = ["SERVICE=COMMAND"]` in `agent.toml`, checked as the flag is.
fn execs<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<(String, String)>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| parse_exec(s).map_err(serde::de::Error::custom))
        .collect()
}

/// What [`backup`] backs up: a compose project, or (no compose files) images and paths given
/// by hand.
pub struct WorkloadBackup<'a> {
    pub name: String,
    /// The project and how to copy it; without compose files, the workload is `images` and
    /// `volumes`.
    pub options: ComposeOptions,
    /// Without compose files: image references (`HOST/REPO[:TAG|@DIGEST]`).
    pub images: Vec<String>,
    /// Without compose files: `(name, path)` of each volume, a directory or block device.
    pub volumes: Vec<(String, PathBuf)>,
    pub host: String,
    pub tags: Vec<String>,
    /// Run once the containers are stopped or paused, before the copy; failing skips it.
    pub pre: Option<Hook<'a>>,
    /// Run after the copy, whatever happened, before the containers start again.
    pub post: Option<Hook<'a>>,
}

/// Parses `SERVICE=COMMAND`, a command to exec in a service.
///
/// # Errors
/// [`Error::Config`] naming the value.
pub fn parse_exec(s: &str) -> Result<(String, String)> {
    match s.split_once('=') {
        Some((service, cmd)) if !service.is_empty() && !cmd.trim().is_empty() => {
            Ok((service.to_string(), cmd.to_string()))
        }
        _ => Err(Error::Config(format!(
            "{s:?}: write SERVICE=COMMAND, e.g. db=\"pg_dump -f /var/lib/postgresql/data/dump.sql\""
        ))),
    }
}

/// A private temporary directory (removed when dropped) beside the cache, or in the system's.
fn tempdir_for(cache_dir: Option<&Path>) -> Result<tempfile::TempDir> {
    let parent = cache_dir.map_or_else(std::env::temp_dir, Path::to_path_buf);
    tempfile::Builder::new()
        .prefix("tresor-export-")
        .tempdir_in(&parent)
        .map_err(|e| Error::io(&parent, e))
}

/// How long the containers may take to be healthy again.
pub(crate) const HEALTHY_TIMEOUT: Duration = Duration::from_secs(120);

fn kept(path: &Path) -> Result<KeptFile> {
    Ok(KeptFile {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        bytes: std::fs::read(path).map_err(|e| Error::io(path, e))?,
    })
}

/// Backs up a compose workload: its images, then its volumes and bind mounts under
/// `consistency`, then the workload record. Containers stopped or paused are started again
/// whatever happens. Blocking.
///
/// # Errors
/// The first member that failed, named; errors of the compose tool and the engine.
pub fn backup(
    repo: &Arc<Repository>,
    rt: &Handle,
    cache_dir: Option<&Path>,
    what: &WorkloadBackup<'_>,
    registry: impl Fn(&ImageSource) -> Result<Registry>,
) -> Result<Listed> {
    let started = Instant::now();
    let o = &what.options;
    let consistency = o.consistency();
    check_modes(what, consistency)?;
    let explicit = o.compose.is_empty();
    // The `.env` compose itself reads by default: the CLI and the agent keep the same one.
    let env_file = o.env_file.clone().or_else(|| {
        let beside = o.compose.first()?.parent()?.join(".env");
        beside.exists().then_some(beside)
    });
    // What a killed backup left stopped or paused comes back before anything else is
    // quiesced, and this run notes what it quiesces beside it.
    if !explicit {
        if let Some(dir) = cache_dir {
            rt.block_on(crate::workload::engine::resume_recorded(dir))?;
        }
        crate::workload::engine::keep_state(cache_dir);
    }
    let (project, engine) = if explicit {
        let project = crate::workload::compose::Project::explicit(
            &compose::normalize_name(&what.name),
            &what.images,
            &what.volumes,
        );
        (project, None)
    } else {
        let project = Compose::find(o.engine_socket.as_deref())?.config(
            &o.compose,
            env_file.as_deref(),
            o.project.as_deref(),
        )?;
        (
            project,
            Some(Engine::connect(rt, o.engine_socket.as_deref())?),
        )
    };
    let mut tags = what.tags.clone();
    tags.push(format!("workload:{}", what.name));
    let command = format!("backup workload {}", what.name);

    // Every member is found before the first byte is stored: a wrong project name or a
    // missing path leaves no member snapshot behind.
    let members = plan::members(&project, engine.as_ref(), o, consistency)?;
    // One session for every member and the record: gc keeps what any of them relies on
    // until the record is written, and sees one writer.
    let session = Arc::new(rt.block_on(Session::start(Arc::clone(repo), cache_dir, &command))?);
    let run = Run {
        rt,
        cache_dir,
        session: &session,
        what,
        engine: engine.as_ref(),
        tags,
        logical: std::cell::Cell::new(0),
    };
    let result = run.all(
        &project,
        &members,
        env_file.as_deref(),
        consistency,
        &registry,
        started,
    );
    rt.block_on(session.finish(result.is_ok()));
    result
}

impl Run<'_, '_> {
    /// The members (images first: they need no downtime; then the copy, with the containers
    /// quiesced), then the record.
    fn all(
        &self,
        project: &compose::Project,
        members: &plan::Members,
        env_file: Option<&Path>,
        consistency: Consistency,
        registry: &impl Fn(&ImageSource) -> Result<Registry>,
        started: Instant,
    ) -> Result<Listed> {
        let what = self.what;
        let o = &what.options;
        let services = self.images(project, registry)?;
        let containers = match self.engine {
            Some(engine) => containers(engine, project, &members.mounting)?,
            None => Vec::new(),
        };
        let copy = || {
            let pre = what.pre.map_or(Ok(()), |hook| hook());
            let copied = pre.and_then(|()| self.copy(members));
            let post = what.post.map_or(Ok(()), |hook| hook());
            copied.and_then(|c| post.map(|()| c))
        };
        let capture_started = chrono::Utc::now();
        let (copied, downtime) = match self.engine {
            None => (copy(), Duration::ZERO),
            Some(engine) => quiesce::around(engine, project, &containers, consistency, o, copy),
        };
        let capture_ended = chrono::Utc::now();
        let (volumes, binds) = copied?;

        let record = WorkloadRecord {
            project: project.name.clone(),
            compose_files: o.compose.iter().map(|f| kept(f)).collect::<Result<_>>()?,
            env_file: env_file.map(kept).transpose()?,
            config: serde_yaml::to_string(&project.config)
                .map_err(|e| Error::Config(format!("cannot print the compose project: {e}")))?,
            services,
            volumes,
            binds,
            consistency,
            volume_consistency: o.volume_consistency.iter().cloned().collect(),
            capture_started,
            capture_ended,
            downtime_ms: downtime.as_millis() as u64,
            skipped: members.skipped.clone(),
        };
        self.save(&record, started)
    }
}

/// Refuses modes that do not go together.
fn check_modes(what: &WorkloadBackup<'_>, consistency: Consistency) -> Result<()> {
    let o = &what.options;
    if consistency == Consistency::Exec && !o.volume_consistency.is_empty()
        || o.volume_consistency
            .iter()
            .any(|(_, m)| *m == Consistency::Exec)
    {
        return Err(Error::Config(
            "a volume's own consistency (stop, pause or none) goes with a workload in stop, pause or none mode".into(),
        ));
    }
    let has_exec = !o.exec_before.is_empty() || !o.exec_after.is_empty();
    if has_exec != (consistency == Consistency::Exec) {
        return Err(Error::Config(
            "commands to exec go with --consistency exec, and it needs at least one".into(),
        ));
    }
    let explicit = o.compose.is_empty();
    if explicit && (what.images.is_empty() && what.volumes.is_empty()) {
        return Err(Error::Config(
            "a workload is a compose project (--compose) or images and volumes (--image, --volume)"
                .into(),
        ));
    }
    if explicit && consistency != Consistency::None {
        return Err(Error::Config(
            "a workload given by --image and --volume has no containers to stop: its volumes are copied as they are (snapshot them in a pre hook)".into(),
        ));
    }
    Ok(())
}

/// The running containers of the services in `mounting`, in dependency order, with their mode.
fn containers(
    engine: &Engine,
    project: &compose::Project,
    mounting: &BTreeMap<String, Consistency>,
) -> Result<Vec<(Container, Consistency)>> {
    let all = engine.project_containers(&project.name)?;
    Ok(project
        .services
        .iter()
        .filter_map(|s| mounting.get(&s.name).map(|m| (s, *m)))
        .flat_map(|(s, m)| {
            all.iter()
                .filter(|c| c.service == s.name && c.running)
                .map(move |c| (c.clone(), m))
        })
        .collect())
}

/// One workload backup: what its members' backups share.
struct Run<'a, 'b> {
    rt: &'a Handle,
    /// Where exported images are laid out for their backup.
    cache_dir: Option<&'a Path>,
    /// The one session of the run.
    session: &'a Arc<Session>,
    what: &'a WorkloadBackup<'b>,
    engine: Option<&'a Engine>,
    /// The snapshots' tags, `workload:NAME` among them.
    tags: Vec<String>,
    /// The bytes the members describe, for the workload's summary.
    logical: std::cell::Cell<u64>,
}

impl Run<'_, '_> {
    /// Backs up every service's image (services sharing an image share its snapshot); an
    /// image only in the engine is exported into an OCI layout first, and its snapshot is
    /// named by its engine reference.
    fn images(
        &self,
        project: &compose::Project,
        registry: &impl Fn(&ImageSource) -> Result<Registry>,
    ) -> Result<Vec<ServiceMember>> {
        let exports = tempdir_for(self.cache_dir)?;
        let mut by_image = BTreeMap::new();
        for image in project.services.iter().filter_map(|s| s.image.as_ref()) {
            if by_image.contains_key(image) {
                continue;
            }
            let users: Vec<&str> = project
                .services
                .iter()
                .filter(|s| s.image.as_ref() == Some(image))
                .map(|s| s.name.as_str())
                .collect();
            let named =
                |e: Error| e.context(format!("service {} (image {image})", users.join(", ")));
            let snap = self.image(image, exports.path(), registry).map_err(named)?;
            self.logical
                .set(self.logical.get() + snap.snapshot.summary.logical_bytes);
            by_image.insert(image.clone(), snap);
        }
        let mut services = Vec::new();
        for s in &project.services {
            let Some(snap) = s.image.as_ref().and_then(|i| by_image.get(i)) else {
                continue;
            };
            services.push(ServiceMember {
                name: s.name.clone(),
                image: s.image.clone().unwrap_or_default(),
                digest: snap
                    .snapshot
                    .image
                    .as_ref()
                    .map(|i| i.digest.clone())
                    .unwrap_or_default(),
                snapshot: snap.id.clone(),
            });
        }
        Ok(services)
    }

    /// One image, from its registry or exported from the engine into `exports`.
    fn image(
        &self,
        image: &str,
        exports: &Path,
        registry: &impl Fn(&ImageSource) -> Result<Registry>,
    ) -> Result<Listed> {
        let only_here = match self.engine {
            Some(engine) => engine.image_only_here(image)?.then_some(engine),
            None => None,
        };
        let (reference, name) = if let Some(engine) = only_here {
            let dir = crate::workload::export::dir_for(exports, image);
            let archive = dir.with_extension("tar");
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            engine.export(image, &archive)?;
            let layout = crate::workload::export::to_layout(image, &archive, &dir)?;
            std::fs::remove_file(&archive).map_err(|e| Error::io(&archive, e))?;
            (layout, Some(format!("engine:{image}")))
        } else {
            (format!("docker://{image}"), None)
        };
        let options = crate::oci::ImageBackupOptions {
            source: ImageSource::parse(&reference)?,
            tag_policy: crate::oci::TagSelector::default(),
            platforms: Vec::new(),
            host: self.what.host.clone(),
            tags: self.tags.clone(),
            name,
        };
        let registry = registry(&options.source)?;
        let hidden = Progress::new(false, "", None);
        let results = crate::oci::backup(self.session, self.rt, &registry, &options, &hidden)?;
        let Some((_, result)) = results.into_iter().next() else {
            return Err(Error::Config("the registry has no such image".into()));
        };
        result
    }

    /// A tree (or a file, as a block image) as snapshot `name`.
    fn tree(&self, name: String, path: &Path) -> Result<Listed> {
        let options = BackupOptions {
            name,
            path: path.to_path_buf(),
            host: self.what.host.clone(),
            tags: self.tags.clone(),
            block: false,
            strict: true,
            use_parent: true,
        };
        let progress = Progress::new(false, "", None);
        let snap = crate::volume::backup(self.session, self.rt, &options, &progress)?;
        self.logical
            .set(self.logical.get() + snap.snapshot.summary.logical_bytes);
        Ok(snap)
    }

    /// The copy: every volume, then every bind-mounted path.
    fn copy(&self, members: &plan::Members) -> Result<(Vec<VolumeMember>, Vec<BindMember>)> {
        let name = &self.what.name;
        let mut volumes = Vec::new();
        for (key, info, source) in &members.volumes {
            let snapshot = format!("{name}/{key}");
            let snap = match source {
                plan::VolumeSource::Path(path) => self.tree(snapshot, path),
                plan::VolumeSource::Helper(image) => {
                    let engine = self
                        .engine
                        .expect("named volumes come from a compose project");
                    engine
                        .helper(&info.name, image)
                        .and_then(|h| self.tree(snapshot, Path::new(&h.mountpoint)))
                }
            }
            .map_err(|e| e.context(format!("volume {key}")))?;
            volumes.push(VolumeMember {
                key: key.clone(),
                engine: info.clone(),
                snapshot: snap.id,
            });
        }
        let mut binds = Vec::new();
        for source in &members.binds {
            binds.push(self.bind(source)?);
        }
        Ok((volumes, binds))
    }

    /// A bind-mounted path, or a volume given by hand.
    fn bind(&self, source: &Path) -> Result<BindMember> {
        let name = &self.what.name;
        let named = self.what.volumes.iter().find(|(_, p)| p == source);
        let (snapshot_name, shown) = match named {
            Some((n, _)) => (format!("{name}/{n}"), format!("volume {n}")),
            None => (
                format!("{name}/bind:{}", source.display()),
                format!("bind mount {}", source.display()),
            ),
        };
        let snap = self
            .tree(snapshot_name, source)
            .map_err(|e| e.context(shown.clone()))?;
        // A file comes back as a block image of its bytes: its mode and owner are kept here.
        let meta = std::fs::metadata(source).map_err(|e| Error::io(source, e).context(shown))?;
        let file = meta.is_file().then(|| {
            use std::os::unix::fs::MetadataExt;
            FileMode {
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
            }
        });
        Ok(BindMember {
            source: source.to_path_buf(),
            snapshot: snap.id,
            name: named.map(|(n, _)| n.clone()),
            file,
        })
    }
}

impl Run<'_, '_> {
    /// Stores the workload record and its snapshot record, last.
    fn save(&self, record: &WorkloadRecord, started: Instant) -> Result<Listed> {
        let (rt, what, session) = (self.rt, self.what, self.session);
        let repo = session.repo();
        let logical_bytes = self.logical.get();
        let writer = ChunkWriter::new(Arc::clone(session), rt.clone(), DEFAULT_IN_FLIGHT);
        let mut stream = StreamWriter::new(&writer, Mode::ContentDefined);
        ciborium::into_writer(record, &mut stream).map_err(|e| match e {
            ciborium::ser::Error::Io(io) => crate::pipeline::from_io(io),
            other => Error::Config(format!("cannot encode workload record: {other}")),
        })?;
        let (root, _) = stream.finish()?;
        writer.flush()?;
        rt.block_on(repo.sync())?;
        let summary = Summary {
            logical_bytes,
            files: record.members().len() as u64,
            chunks: writer.stats().summary(),
            duration_ms: started.elapsed().as_millis() as u64,
            ..Summary::default()
        };
        let snapshot = Snapshot {
            version: RECORD_VERSION,
            kind: Kind::Workload,
            name: what.name.clone(),
            source: format!("compose:{}", record.project),
            host: what.host.clone(),
            time: chrono::Utc::now(),
            tags: what.tags.clone(),
            partial: false,
            root_format: RootFormat::Workload,
            root,
            payload: None,
            parent: None,
            summary,
            image: None,
            errors: Vec::new(),
        };
        session.check_lease()?;
        let id = rt.block_on(snapshot.save(repo))?;
        Ok(Listed { id, snapshot })
    }
}

/// The newest workload snapshot named `name` whose volumes were all copied quiesced
/// (`restore workload --consistent`).
///
/// # Errors
/// [`Error::SnapshotNotFound`] when there is none; store and record errors.
pub fn newest_consistent(repo: &Arc<Repository>, rt: &Handle, name: &str) -> Result<Listed> {
    let filter = crate::snapshot::Filter {
        kind: Some(Kind::Workload),
        name: Some(name.to_string()),
        host: None,
    };
    let listed = rt.block_on(crate::snapshot::list(repo, &filter))?;
    for snap in listed.into_iter().rev() {
        if load_record(repo, rt, &snap)?.is_consistent() {
            return Ok(snap);
        }
    }
    Err(Error::SnapshotNotFound(format!(
        "{name} (no snapshot copied in stop, pause or exec mode)"
    )))
}
