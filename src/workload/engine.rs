//! The container engine, through its API (bollard): the containers of a compose project,
//! stopping and starting them, named volumes with their labels and driver options, health.
//! Docker Engine, or Podman's compatible API service, found as the docker CLI finds it
//! (`DOCKER_HOST`, else the local socket). Blocking calls, for the command layer's threads.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use bollard::models::{HealthStatusEnum, VolumeCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptions, InspectContainerOptions, ListContainersOptions, RemoveContainerOptions,
    StartContainerOptions, StopContainerOptions,
};
use bollard::Docker;
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;

use crate::error::{Error, Result};

/// The label compose puts on a project's containers and volumes.
pub const PROJECT_LABEL: &str = "com.docker.compose.project";
const SERVICE_LABEL: &str = "com.docker.compose.service";
const VOLUME_LABEL: &str = "com.docker.compose.volume";
/// The label of a volume `restore workload` made: the workload snapshot it restores.
const RESTORED_LABEL: &str = "org.tresor.restored-from";

/// A container a backup stopped or paused and has not yet started again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quiesced {
    pub id: String,
    /// Its compose service, for messages.
    pub service: String,
    pub paused: bool,
    /// The engine's socket (`None`: as the docker CLI finds it).
    pub socket: Option<std::path::PathBuf>,
    /// A helper container of this backup ([`Engine::helper`]), removed rather than started.
    #[serde(default)]
    pub helper: bool,
}

/// The containers this process stopped or paused and has not started again: whoever ends the
/// process early (SIGTERM) calls [`resume_all`] first. They are also kept in this process's
/// state file in the directory given to [`keep_state`] (written before each stop or pause), so
/// that what a SIGKILL, an OOM kill or a reboot left down is started again by the next run
/// ([`resume_recorded`]).
static QUIESCED: std::sync::Mutex<Vec<Quiesced>> = std::sync::Mutex::new(Vec::new());
/// Where [`QUIESCED`] is kept on disk, if anywhere.
static STATE: std::sync::Mutex<Option<std::path::PathBuf>> = std::sync::Mutex::new(None);
/// The socket the last [`Engine::connect`] used, for what it quiesces.
static SOCKET: std::sync::Mutex<Option<std::path::PathBuf>> = std::sync::Mutex::new(None);

/// The state file of process `pid` in the cache directory: one per process, so that a
/// backup never starts what another one, still running, has stopped for its copy.
fn state_file(dir: &Path, pid: u32) -> std::path::PathBuf {
    dir.join(format!("quiesced-{pid}.json"))
}

/// The process whose state file `name` is, if it is one.
fn state_owner(name: &std::ffi::OsStr) -> Option<u32> {
    name.to_str()?
        .strip_prefix("quiesced-")?
        .strip_suffix(".json")?
        .parse()
        .ok()
}

/// Keeps this process's list of quiesced containers in `dir` from now on (private, 0600).
pub fn keep_state(dir: Option<&Path>) {
    *STATE.lock().expect("state") = dir.map(|d| state_file(d, std::process::id()));
}

/// Writes `list` to the state file, or removes it when the list is empty.
fn save_state(list: &[Quiesced]) -> Result<()> {
    let Some(file) = STATE.lock().expect("state").clone() else {
        return Ok(());
    };
    if list.is_empty() {
        return match std::fs::remove_file(&file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&file, e)),
            _ => Ok(()),
        };
    }
    let json = serde_json::to_vec_pretty(list).expect("list serialises");
    crate::localfile::write_atomically(&file, crate::localfile::PRIVATE, &json)
}

/// Notes `c` as quiesced, on disk first: a container that cannot be noted is not stopped.
fn quiesced(c: &Container, paused: bool) -> Result<()> {
    noted(c, paused, false)
}

/// Notes `c` (a project's container, or a helper) in the list and its state file.
fn noted(c: &Container, paused: bool, helper: bool) -> Result<()> {
    let mut list = QUIESCED.lock().expect("quiesced list");
    list.push(Quiesced {
        id: c.id.clone(),
        service: c.service.clone(),
        paused,
        socket: SOCKET.lock().expect("socket").clone(),
        helper,
    });
    save_state(&list).map_err(|e| {
        // Not noted, so not quiesced: nothing to start again.
        list.pop();
        e.context(format!("noting service {} before quiescing it", c.service))
    })
}

fn resumed(id: &str) {
    let mut list = QUIESCED.lock().expect("quiesced list");
    list.retain(|q| q.id != id);
    if let Err(e) = save_state(&list) {
        tracing::warn!("cannot update the list of stopped containers: {e}");
    }
}

async fn docker_at(socket: Option<&Path>) -> std::result::Result<Docker, bollard::errors::Error> {
    let docker = match socket {
        Some(path) => {
            Docker::connect_with_socket(&path.to_string_lossy(), 120, bollard::API_DEFAULT_VERSION)
        }
        None => Docker::connect_with_defaults(),
    }?;
    docker.negotiate_version().await
}

/// Starts (or unpauses) `list`, last quiesced first (dependencies first); returns what came
/// back, and logs what could not.
async fn resume(list: Vec<Quiesced>, why: &str) -> Vec<Quiesced> {
    let mut back = Vec::new();
    for q in list.into_iter().rev() {
        let docker = match docker_at(q.socket.as_deref()).await {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(
                    "cannot reach the engine to start service {} again: {e}",
                    q.service
                );
                continue;
            }
        };
        let result = if q.helper {
            let force = RemoveContainerOptions {
                force: true,
                ..Default::default()
            };
            match docker.remove_container(&q.id, Some(force)).await {
                // Gone already.
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => Ok(()),
                other => other,
            }
        } else if q.paused {
            docker.unpause_container(&q.id).await
        } else {
            docker
                .start_container(&q.id, None::<StartContainerOptions>)
                .await
        };
        match result {
            // 304: running already; 409: unpausing one that is not paused.
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304 | 409,
                ..
            }) => {
                let done = if q.helper { "removed" } else { "started again" };
                tracing::warn!("service {} (container {}) {done}: {why}", q.service, q.id);
                back.push(q);
            }
            Err(e) => tracing::error!("service {} could not be started again: {e}", q.service),
        }
    }
    back
}

/// Starts (or unpauses) every container this process stopped (or paused) and has not yet
/// resumed. For the signal paths of the CLI and the agent; errors are logged.
pub async fn resume_all() {
    let list: Vec<Quiesced> = QUIESCED.lock().expect("quiesced list").clone();
    for q in resume(list, "the backup was stopped").await {
        resumed(&q.id);
    }
}

/// Starts again what the state files in `dir` of processes that no longer run name:
/// containers a backup stopped or paused and never started again, because it was killed
/// (SIGKILL, the OOM killer, a reboot). Run by every workload backup before it quiesces
/// anything, at agent start, and by `tresor resume` (the unit's `ExecStopPost=`). Returns the
/// services started again; what could not be is kept for the next try.
///
/// # Errors
/// [`Error::Io`] naming the directory or a file.
pub async fn resume_recorded(dir: &Path) -> Result<Vec<Quiesced>> {
    let mut back = Vec::new();
    for file in orphaned_state(dir)? {
        back.extend(resume_file(&file).await?);
    }
    Ok(back)
}

/// Whether state files of processes that no longer run are left in `dir`: containers that
/// could not be started again.
///
/// # Errors
/// [`Error::Io`] naming the directory.
pub fn resume_pending(dir: &Path) -> Result<bool> {
    Ok(!orphaned_state(dir)?.is_empty())
}

/// The state files in `dir` whose process no longer runs. A live process (this one, or a
/// backup running beside it) still owns what it stopped.
fn orphaned_state(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let Some(pid) = state_owner(&entry.file_name()) else {
            continue;
        };
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None)
            .map_or_else(|e| e != nix::errno::Errno::ESRCH, |()| true);
        if !alive {
            files.push(entry.path());
        }
    }
    Ok(files)
}

/// Starts again what the state file `file` names, and removes from it what came back.
async fn resume_file(file: &Path) -> Result<Vec<Quiesced>> {
    let bytes = std::fs::read(file).map_err(|e| Error::io(file, e))?;
    let list: Vec<Quiesced> = serde_json::from_slice(&bytes).map_err(|e| {
        let why = format!("{e}; start the containers it names by hand, then remove it");
        Error::io(file, std::io::Error::other(why))
    })?;
    let back = resume(list.clone(), "a backup that was killed had left it down").await;
    let left: Vec<Quiesced> = list.into_iter().filter(|q| !back.contains(q)).collect();
    if left.is_empty() {
        std::fs::remove_file(file).map_err(|e| Error::io(file, e))?;
    } else {
        let json = serde_json::to_vec_pretty(&left).expect("list serialises");
        crate::localfile::write_atomically(file, crate::localfile::PRIVATE, &json)?;
    }
    Ok(back)
}

/// The `DOCKER_HOST` of the engine that [`Engine::connect`] reaches with `socket`: the socket,
/// else `DOCKER_HOST` as bollard reads it, else the default socket. Given to the compose tool,
/// so that the containers it makes land on the engine tresor made the volumes on and waits on.
pub fn docker_host(socket: Option<&Path>) -> String {
    match socket {
        Some(path) => format!("unix://{}", path.display()),
        None => std::env::var("DOCKER_HOST")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unix:///var/run/docker.sock".into()),
    }
}

/// Whether `image` starts with a registry host, as the engine reads a reference: a first
/// component with a dot or a colon, or `localhost`.
pub fn names_a_registry(image: &str) -> bool {
    image
        .split_once('/')
        .is_some_and(|(host, _)| host.contains(['.', ':']) || host == "localhost")
}

/// A connection to the engine.
pub struct Engine {
    docker: Docker,
    rt: Handle,
}

/// A container of a project.
#[derive(Clone, Debug)]
pub struct Container {
    pub id: String,
    pub service: String,
    pub running: bool,
}

/// A named volume as the engine describes it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    pub driver: String,
    pub labels: HashMap<String, String>,
    pub options: HashMap<String, String>,
    /// Where its data is on this host (not recorded: it differs on the next host).
    #[serde(skip)]
    pub mountpoint: String,
}

/// Where the data of a named volume can be read on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolumeData {
    /// Its mountpoint, always: a plain local volume.
    Here,
    /// The host directory a local volume binds (`type=none,o=bind,device=DIR`, the usual way to
    /// put a volume on a chosen disk): its mountpoint is empty while no container mounts it.
    Device(std::path::PathBuf),
    /// Its mountpoint, only while a container mounts it: an NFS, CIFS or block-device volume of
    /// the local driver, or one of a volume plugin.
    WhileMounted,
}

impl VolumeInfo {
    /// Whether a restore of workload snapshot `snapshot` made this volume: a rerun of that
    /// restore continues in it.
    pub fn restored_from(&self, snapshot: &str) -> bool {
        self.labels.get(RESTORED_LABEL).map(String::as_str) == Some(snapshot)
    }

    /// Where this volume's data is to be read ([`VolumeData`]).
    pub fn data(&self) -> VolumeData {
        if self.driver == "local" && self.options.is_empty() {
            return VolumeData::Here;
        }
        let binds = self.driver == "local"
            && self
                .options
                .get("o")
                .is_some_and(|o| o.split(',').any(|f| f == "bind" || f == "rbind"));
        match self.options.get("device").map(std::path::PathBuf::from) {
            Some(dir) if binds && dir.is_absolute() => VolumeData::Device(dir),
            _ => VolumeData::WhileMounted,
        }
    }
}

/// A short-lived container that keeps a volume mounted, read-only, so that its data is at its
/// mountpoint for the copy; removed when dropped (and, after a SIGKILL, by the next run: it is
/// noted like a stopped container).
pub struct Helper<'e> {
    engine: &'e Engine,
    name: String,
    /// Where the volume's data is on this host while the helper runs.
    pub mountpoint: String,
}

impl Drop for Helper<'_> {
    fn drop(&mut self) {
        let force = RemoveContainerOptions {
            force: true,
            ..Default::default()
        };
        match self
            .engine
            .rt
            .block_on(self.engine.docker.remove_container(&self.name, Some(force)))
        {
            Ok(()) => resumed(&self.name),
            Err(e) => tracing::error!("cannot remove helper container {}: {e}", self.name),
        }
    }
}

fn engine_error(what: impl Into<String>) -> impl FnOnce(bollard::errors::Error) -> Error {
    let what = what.into();
    move |e| Error::Engine {
        what,
        reason: e.to_string(),
    }
}

impl Engine {
    /// Connects to the engine at `socket` (a Unix socket path, e.g. Podman's
    /// `/run/podman/podman.sock`), or where the docker CLI would (`DOCKER_HOST`, else the local
    /// socket), and agrees on an API version with it.
    ///
    /// # Errors
    /// [`Error::Engine`] when no engine answers.
    pub fn connect(rt: &Handle, socket: Option<&Path>) -> Result<Engine> {
        let docker = match socket {
            Some(path) => Docker::connect_with_socket(
                &path.to_string_lossy(),
                120,
                bollard::API_DEFAULT_VERSION,
            ),
            None => Docker::connect_with_defaults(),
        }
        .map_err(engine_error("connect"))?;
        // bollard speaks the newest API it knows; an older engine refuses that.
        let docker = rt
            .block_on(docker.negotiate_version())
            .map_err(engine_error("connect"))?;
        *SOCKET.lock().expect("socket") = socket.map(Path::to_path_buf);
        Ok(Engine {
            docker,
            rt: rt.clone(),
        })
    }

    /// The containers of compose project `project`, running or not.
    ///
    /// # Errors
    /// [`Error::Engine`].
    pub fn project_containers(&self, project: &str) -> Result<Vec<Container>> {
        let options = ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([(
                "label".to_string(),
                vec![format!("{PROJECT_LABEL}={project}")],
            )])),
            ..Default::default()
        };
        let list = self
            .rt
            .block_on(self.docker.list_containers(Some(options)))
            .map_err(engine_error(format!("listing the containers of {project}")))?;
        Ok(list
            .into_iter()
            .map(|c| Container {
                id: c.id.unwrap_or_default(),
                service: c
                    .labels
                    .unwrap_or_default()
                    .remove(SERVICE_LABEL)
                    .unwrap_or_default(),
                running: c.state.is_some_and(|s| s.to_string() == "running"),
            })
            .collect())
    }

    /// Stops a container: its stop signal, then SIGKILL after its stop timeout (compose's
    /// `stop_grace_period`).
    ///
    /// # Errors
    /// [`Error::Engine`].
    pub fn stop(&self, c: &Container) -> Result<()> {
        // Noted before the call, on disk too: a SIGTERM, or a SIGKILL and the next run, while
        // the engine stops it must start it again.
        quiesced(c, false)?;
        self.rt
            .block_on(
                self.docker
                    .stop_container(&c.id, None::<StopContainerOptions>),
            )
            .map_err(engine_error(format!("stopping service {}", c.service)))
    }

    /// Starts a container.
    ///
    /// # Errors
    /// [`Error::Engine`].
    pub fn start(&self, c: &Container) -> Result<()> {
        let started = self.rt.block_on(
            self.docker
                .start_container(&c.id, None::<StartContainerOptions>),
        );
        match started {
            // 304: running already (a signal path started it first).
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304, ..
            }) => {}
            Err(e) => return Err(engine_error(format!("starting service {}", c.service))(e)),
        }
        resumed(&c.id);
        Ok(())
    }

    /// Freezes a container's processes.
    ///
    /// # Errors
    /// [`Error::Engine`].
    pub fn pause(&self, c: &Container) -> Result<()> {
        quiesced(c, true)?;
        self.rt
            .block_on(self.docker.pause_container(&c.id))
            .map_err(engine_error(format!("pausing service {}", c.service)))
    }

    /// Thaws a paused container.
    ///
    /// # Errors
    /// [`Error::Engine`].
    pub fn unpause(&self, c: &Container) -> Result<()> {
        self.rt
            .block_on(self.docker.unpause_container(&c.id))
            .map_err(engine_error(format!("unpausing service {}", c.service)))?;
        resumed(&c.id);
        Ok(())
    }

    /// Runs `cmd` with `sh -c` inside a container, logging its output.
    ///
    /// # Errors
    /// [`Error::Engine`] naming the service and the command when it cannot run or exits
    /// non-zero.
    pub fn exec(&self, c: &Container, cmd: &str) -> Result<()> {
        let (code, _) = self.exec_output(c, cmd)?;
        match code {
            Some(0) => Ok(()),
            code => Err(Error::Engine {
                what: format!("exec in service {} ({cmd:?})", c.service),
                reason: format!(
                    "exited with {}",
                    code.map_or("no status".into(), |c| c.to_string())
                ),
            }),
        }
    }

    /// Runs `cmd` with `sh -c` inside a container; returns its exit status and its output
    /// (stdout and stderr, the last 4 KiB), which is logged too.
    ///
    /// # Errors
    /// [`Error::Engine`] naming the service and the command when it cannot run.
    pub fn exec_output(&self, c: &Container, cmd: &str) -> Result<(Option<i64>, String)> {
        use bollard::exec::{CreateExecOptions, StartExecResults};
        use futures::StreamExt;
        const KEPT: usize = 4096;
        let what = format!("exec in service {} ({cmd:?})", c.service);
        self.rt.block_on(async {
            let created = self
                .docker
                .create_exec(
                    &c.id,
                    CreateExecOptions {
                        cmd: Some(vec!["sh", "-c", cmd]),
                        attach_stdout: Some(true),
                        attach_stderr: Some(true),
                        ..Default::default()
                    },
                )
                .await
                .map_err(engine_error(what.clone()))?;
            let started = self
                .docker
                .start_exec(&created.id, None)
                .await
                .map_err(engine_error(what.clone()))?;
            // Bytes, cut at the end only: a cut may split a character, which the lossy
            // conversion shows as one replacement mark.
            let mut output: Vec<u8> = Vec::new();
            if let StartExecResults::Attached {
                output: mut lines, ..
            } = started
            {
                while let Some(line) = lines.next().await {
                    let line = line.map_err(engine_error(what.clone()))?.into_bytes();
                    let shown = String::from_utf8_lossy(&line);
                    tracing::info!(service = %c.service, "exec: {}", shown.trim_end());
                    output.extend_from_slice(&line);
                    if output.len() > 2 * KEPT {
                        output.drain(..output.len() - KEPT);
                    }
                }
            }
            if output.len() > KEPT {
                output.drain(..output.len() - KEPT);
            }
            let output = String::from_utf8_lossy(&output).into_owned();
            let inspected = self
                .docker
                .inspect_exec(&created.id)
                .await
                .map_err(engine_error(what.clone()))?;
            Ok((inspected.exit_code, output))
        })
    }

    /// Pulls `image` (`REPO@DIGEST` or `REPO:TAG`) into the engine, as the compose tool would
    /// before it starts a service: done while the volumes restore, it is no longer on the
    /// recovery's path. Anonymous: a registry that asks for credentials leaves the pull to the
    /// compose tool (with the engine's own login).
    ///
    /// # Errors
    /// [`Error::Engine`] naming the image.
    pub fn pull(&self, image: &str) -> Result<()> {
        use futures::StreamExt;
        let (repo, tag) = match image.split_once('@') {
            Some((repo, digest)) => (repo, digest),
            None => match image.rsplit_once(':') {
                Some((repo, tag)) if !tag.contains('/') => (repo, tag),
                _ => (image, "latest"),
            },
        };
        let options = bollard::query_parameters::CreateImageOptions {
            from_image: Some(repo.into()),
            tag: Some(tag.into()),
            ..Default::default()
        };
        self.rt.block_on(async {
            let mut progress = self.docker.create_image(Some(options), None, None);
            while let Some(step) = progress.next().await {
                step.map_err(engine_error(format!("pulling image {image}")))?;
            }
            Ok(())
        })
    }

    /// The named volumes compose project `project` owns (by its label), which tresor labels
    /// so on the volumes it restores.
    ///
    /// # Errors
    /// [`Error::Engine`].
    pub fn project_volumes(&self, project: &str) -> Result<Vec<String>> {
        let options = bollard::query_parameters::ListVolumesOptions {
            filters: Some(HashMap::from([(
                "label".to_string(),
                vec![format!("{PROJECT_LABEL}={project}")],
            )])),
        };
        let list = self
            .rt
            .block_on(self.docker.list_volumes(Some(options)))
            .map_err(engine_error(format!("listing the volumes of {project}")))?;
        Ok(list
            .volumes
            .unwrap_or_default()
            .into_iter()
            .map(|v| v.name)
            .collect())
    }

    /// Removes volume `name`; one that is gone already is no error.
    ///
    /// # Errors
    /// [`Error::Engine`] (a volume in use, say).
    pub fn remove_volume(&self, name: &str) -> Result<()> {
        let removed = self.rt.block_on(
            self.docker
                .remove_volume(name, None::<bollard::query_parameters::RemoveVolumeOptions>),
        );
        match removed {
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(e) => Err(engine_error(format!("removing volume {name}"))(e)),
        }
    }

    /// Removes the reference `image` from the engine (the image itself only when nothing
    /// else names it); one that is gone already is no error.
    ///
    /// # Errors
    /// [`Error::Engine`] (an image a container uses, say).
    pub fn remove_image(&self, image: &str) -> Result<()> {
        let removed = self.rt.block_on(self.docker.remove_image(
            image,
            None::<bollard::query_parameters::RemoveImageOptions>,
            None,
        ));
        match removed {
            Ok(_)
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(e) => Err(engine_error(format!("removing image {image}"))(e)),
        }
    }

    /// Whether `image` is to be taken from the engine: built or loaded here, never pushed or
    /// pulled (no repository digest), named without a registry host, which no registry serves
    /// to tresor, or named `localhost/…` (no port), Podman's name for what it built. An image the engine does not have is not "only" here.
    ///
    /// # Errors
    /// [`Error::Engine`] for anything but "no such image".
    pub fn image_only_here(&self, image: &str) -> Result<bool> {
        match self.rt.block_on(self.docker.inspect_image(image)) {
            // Pushed somewhere, but named without a registry host: tresor has no default
            // registry to fetch it from, and the engine holds it (a pull by digest of the same
            // image elsewhere gives it repo digests).
            // Podman names what it builds `localhost/NAME` (and gives it repo digests of that
            // name): no registry serves it.
            Ok(i) => Ok(i.repo_digests.unwrap_or_default().is_empty()
                || !names_a_registry(image)
                || image.starts_with("localhost/")),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(false),
            Err(e) => Err(engine_error(format!("inspecting image {image}"))(e)),
        }
    }

    /// Writes the engine's export of `image` (`docker save` format) to `file`.
    ///
    /// # Errors
    /// [`Error::Engine`]; I/O errors on `file`.
    pub fn export(&self, image: &str, file: &Path) -> Result<()> {
        use futures::StreamExt;
        let mut out = std::fs::File::create(file).map_err(|e| Error::io(file, e))?;
        self.rt.block_on(async {
            let mut stream = self.docker.export_image(image);
            while let Some(bytes) = stream.next().await {
                let bytes = bytes.map_err(engine_error(format!("exporting image {image}")))?;
                std::io::Write::write_all(&mut out, &bytes).map_err(|e| Error::io(file, e))?;
            }
            Ok(())
        })
    }

    /// A named volume, if it exists.
    ///
    /// # Errors
    /// [`Error::Engine`] for anything but "no such volume".
    pub fn volume(&self, name: &str) -> Result<Option<VolumeInfo>> {
        match self.rt.block_on(self.docker.inspect_volume(name)) {
            Ok(v) => Ok(Some(VolumeInfo {
                name: v.name,
                driver: v.driver,
                labels: v.labels,
                options: v.options,
                mountpoint: v.mountpoint,
            })),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(engine_error(format!("inspecting volume {name}"))(e)),
        }
    }

    /// Creates volume `name` like `like` (driver, options, labels), labelled as volume `key`
    /// of compose project `project` so that compose adopts it, and as restored from workload
    /// snapshot `snapshot` ([`VolumeInfo::restored_from`]).
    ///
    /// # Errors
    /// [`Error::Engine`].
    pub fn create_volume(
        &self,
        name: &str,
        like: &VolumeInfo,
        project: &str,
        key: &str,
        snapshot: &str,
    ) -> Result<VolumeInfo> {
        let mut labels = like.labels.clone();
        labels.insert(PROJECT_LABEL.into(), project.into());
        labels.insert(VOLUME_LABEL.into(), key.into());
        labels.insert(RESTORED_LABEL.into(), snapshot.into());
        let request = VolumeCreateRequest {
            name: Some(name.into()),
            driver: Some(like.driver.clone()),
            driver_opts: Some(like.options.clone()),
            labels: Some(labels),
            ..Default::default()
        };
        self.rt
            .block_on(self.docker.create_volume(request))
            .map_err(engine_error(format!("creating volume {name}")))?;
        self.volume(name)?.ok_or_else(|| Error::Engine {
            what: format!("creating volume {name}"),
            reason: "the engine does not list it after creating it".into(),
        })
    }

    /// Mounts volume `volume` read-only in a helper container of `image` (an image of a
    /// service that mounts it, so the engine has it) that runs `sleep` with no network, until
    /// the helper is dropped.
    ///
    /// # Errors
    /// [`Error::Engine`] naming the volume: the image is not here or has no `sleep`, the
    /// engine cannot mount the volume, or the volume has no mountpoint on this host.
    pub fn helper(&self, volume: &str, image: &str) -> Result<Helper<'_>> {
        use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountType};
        let what = format!("helper container mounting volume {volume} (image {image})");
        let name = format!(
            "tresor-helper-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        let container = Container {
            id: name.clone(),
            service: format!("helper of volume {volume}"),
            running: false,
        };
        // Noted before it exists: a SIGKILL between the two leaves nothing unnoted.
        noted(&container, false, true)?;
        let body = ContainerCreateBody {
            image: Some(image.into()),
            // A week: a helper whose backup was killed and never rerun does not stay forever.
            entrypoint: Some(vec!["sleep".into(), "604800".into()]),
            cmd: Some(Vec::new()),
            labels: Some(HashMap::from([("org.tresor.helper".into(), volume.into())])),
            network_disabled: Some(true),
            host_config: Some(HostConfig {
                mounts: Some(vec![Mount {
                    target: Some("/tresor/volume".into()),
                    source: Some(volume.into()),
                    typ: Some(MountType::VOLUME),
                    read_only: Some(true),
                    ..Default::default()
                }]),
                network_mode: Some("none".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptions {
            name: Some(name.clone()),
            ..Default::default()
        };
        let created = self
            .rt
            .block_on(self.docker.create_container(Some(options), body));
        if let Err(e) = created {
            resumed(&name);
            return Err(engine_error(what)(e));
        }
        // From here on, dropping it removes it.
        let mut helper = Helper {
            engine: self,
            name,
            mountpoint: String::new(),
        };
        self.rt
            .block_on(
                self.docker
                    .start_container(&helper.name, None::<StartContainerOptions>),
            )
            .map_err(|e| Error::Engine {
                what: what.clone(),
                reason: format!("{e} (the volume's image needs a `sleep` program)"),
            })?;
        helper.mountpoint = self
            .volume(volume)?
            .map(|v| v.mountpoint)
            .filter(|m| !m.is_empty())
            .ok_or_else(|| Error::Engine {
                what,
                reason: "the engine gives no mountpoint for it on this host".into(),
            })?;
        Ok(helper)
    }

    /// Whether container `c` runs and, if it has a healthcheck, is healthy.
    ///
    /// # Errors
    /// [`Error::Engine`], naming the service when it is unhealthy.
    fn ready(&self, c: &Container) -> Result<bool> {
        let inspected = self
            .rt
            .block_on(
                self.docker
                    .inspect_container(&c.id, None::<InspectContainerOptions>),
            )
            .map_err(engine_error(format!("inspecting service {}", c.service)))?;
        let state = inspected.state.unwrap_or_default();
        let health = state.health.and_then(|h| h.status);
        match (state.running.unwrap_or(false), health) {
            // No healthcheck: no health, or (Podman) an empty status.
            (
                true,
                None
                | Some(HealthStatusEnum::EMPTY | HealthStatusEnum::NONE | HealthStatusEnum::HEALTHY),
            ) => Ok(true),
            (_, Some(HealthStatusEnum::UNHEALTHY)) => Err(Error::Engine {
                what: format!("service {}", c.service),
                reason: "is unhealthy".into(),
            }),
            _ => Ok(false),
        }
    }

    /// Waits until container `c` runs and is healthy, as compose waits for a dependency
    /// before it starts what depends on it.
    ///
    /// # Errors
    /// [`Error::Engine`] naming the service when it is unhealthy, or not ready at `timeout`.
    pub fn wait_ready(&self, c: &Container, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        while !self.ready(c)? {
            if started.elapsed() > timeout {
                return Err(Error::Engine {
                    what: format!("service {}", c.service),
                    reason: format!("not running and healthy after {} s", timeout.as_secs()),
                });
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(())
    }

    /// Waits until every container of `project` runs and those with a healthcheck are healthy.
    ///
    /// # Errors
    /// [`Error::Engine`] naming the services still not there at `timeout`, or one that is
    /// unhealthy or exited.
    pub fn wait_healthy(&self, project: &str, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            let containers = self.project_containers(project)?;
            if containers.is_empty() {
                return Err(Error::Engine {
                    what: format!("project {project}"),
                    reason: "has no container on this engine (did the compose tool start it on another?)"
                        .into(),
                });
            }
            let mut waiting = Vec::new();
            for c in containers {
                if !self.ready(&c)? {
                    waiting.push(c.service);
                }
            }
            if waiting.is_empty() {
                return Ok(());
            }
            if started.elapsed() > timeout {
                return Err(Error::Engine {
                    what: format!("project {project}"),
                    reason: format!(
                        "not running and healthy after {} s: {}",
                        timeout.as_secs(),
                        waiting.join(", ")
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}
