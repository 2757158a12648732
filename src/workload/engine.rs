//! The container engine, through its API (bollard): the containers of a compose project,
//! stopping and starting them, named volumes with their labels and driver options, health.
//! Docker Engine, or Podman's compatible API service, found as the docker CLI finds it
//! (`DOCKER_HOST`, else the local socket). Blocking calls, for the command layer's threads.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::models::{HealthStatusEnum, VolumeCreateRequest};
use bollard::query_parameters::{
    InspectContainerOptions, ListContainersOptions, StartContainerOptions, StopContainerOptions,
};
use bollard::Docker;
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;

use crate::error::{Error, Result};

/// The label compose puts on a project's containers and volumes.
pub const PROJECT_LABEL: &str = "com.docker.compose.project";
const SERVICE_LABEL: &str = "com.docker.compose.service";
const VOLUME_LABEL: &str = "com.docker.compose.volume";

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

fn engine_error(what: impl Into<String>) -> impl FnOnce(bollard::errors::Error) -> Error {
    let what = what.into();
    move |e| Error::Engine {
        what,
        reason: e.to_string(),
    }
}

impl Engine {
    /// Connects to the engine and agrees on an API version with it.
    ///
    /// # Errors
    /// [`Error::Engine`] when no engine answers.
    pub fn connect(rt: &Handle) -> Result<Engine> {
        let docker = Docker::connect_with_defaults().map_err(engine_error("connect"))?;
        // bollard speaks the newest API it knows; an older engine refuses that.
        let docker = rt
            .block_on(docker.negotiate_version())
            .map_err(engine_error("connect"))?;
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

    /// Stops a container (SIGTERM, then SIGKILL after 10 s).
    ///
    /// # Errors
    /// [`Error::Engine`].
    pub fn stop(&self, c: &Container) -> Result<()> {
        let options = StopContainerOptions {
            t: Some(10),
            ..Default::default()
        };
        self.rt
            .block_on(self.docker.stop_container(&c.id, Some(options)))
            .map_err(engine_error(format!("stopping service {}", c.service)))
    }

    /// Starts a container.
    ///
    /// # Errors
    /// [`Error::Engine`].
    pub fn start(&self, c: &Container) -> Result<()> {
        self.rt
            .block_on(
                self.docker
                    .start_container(&c.id, None::<StartContainerOptions>),
            )
            .map_err(engine_error(format!("starting service {}", c.service)))
    }

    /// Freezes a container's processes.
    ///
    /// # Errors
    /// [`Error::Engine`].
    pub fn pause(&self, c: &Container) -> Result<()> {
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
            .map_err(engine_error(format!("unpausing service {}", c.service)))
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
    /// of compose project `project` so that compose adopts it.
    ///
    /// # Errors
    /// [`Error::Engine`].
    pub fn create_volume(
        &self,
        name: &str,
        like: &VolumeInfo,
        project: &str,
        key: &str,
    ) -> Result<VolumeInfo> {
        let mut labels = like.labels.clone();
        labels.insert(PROJECT_LABEL.into(), project.into());
        labels.insert(VOLUME_LABEL.into(), key.into());
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

    /// Waits until every container of `project` runs and those with a healthcheck are healthy.
    ///
    /// # Errors
    /// [`Error::Engine`] naming the services still not there at `timeout`, or one that is
    /// unhealthy or exited.
    pub fn wait_healthy(&self, project: &str, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            let mut waiting = Vec::new();
            for c in self.project_containers(project)? {
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
                    (true, None | Some(HealthStatusEnum::NONE | HealthStatusEnum::HEALTHY)) => {}
                    (_, Some(HealthStatusEnum::UNHEALTHY)) => {
                        return Err(Error::Engine {
                            what: format!("service {}", c.service),
                            reason: "is unhealthy".into(),
                        })
                    }
                    _ => waiting.push(c.service),
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
