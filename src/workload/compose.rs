//! A compose project as the compose tool itself normalizes it: `docker compose config` (or the
//! older `docker-compose config`) applies interpolation, `.env`, profiles and `extends`, and
//! prints the result, which is read here. Nothing of the YAML is interpreted by hand but the
//! few fields a twin needs (images, mounts, dependencies, volumes); the rest is kept as the
//! tool printed it and written back, with the images and paths rewritten, on restore.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml::Value;

use crate::error::{Error, Result};

/// The compose tool found on this host, and the environment it runs with.
#[derive(Clone, Debug)]
pub struct Compose {
    program: Vec<String>,
    env: Vec<(String, std::ffi::OsString)>,
}

/// Variables of tresor's environment the compose tool may see: what it needs to run and find
/// its plugins and registry logins. Nothing else: compose ranks the environment above the
/// project's `.env`, so an agent's own secrets (`AWS_SECRET_ACCESS_KEY`, `TRESOR_*`) would
/// otherwise replace the project's values and be recorded in its twin.
fn allowed(name: &str) -> bool {
    matches!(
        name,
        "PATH"
            | "HOME"
            | "LANG"
            | "LC_ALL"
            | "DOCKER_CONFIG"
            | "DOCKER_CERT_PATH"
            | "DOCKER_TLS_VERIFY"
    ) || name.starts_with("COMPOSE_")
}

/// The compose tool's environment: [`allowed`] variables, and `DOCKER_HOST` naming the engine
/// tresor's own client speaks to (`socket`, else as it found it), so that both reach one engine.
fn environment(socket: Option<&Path>) -> Vec<(String, std::ffi::OsString)> {
    let mut env: Vec<(String, std::ffi::OsString)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v)))
        .filter(|(k, _)| allowed(k))
        .collect();
    env.push((
        "DOCKER_HOST".into(),
        super::engine::docker_host(socket).into(),
    ));
    env
}

/// A normalized compose project.
#[derive(Clone, Debug)]
pub struct Project {
    pub name: String,
    /// The tool's output, parsed.
    pub config: Value,
    /// Services in dependency order (a service after those it depends on).
    pub services: Vec<Service>,
    /// Top-level named volumes: the key in the file -> the engine's volume name.
    pub volumes: BTreeMap<String, String>,
}

#[derive(Clone, Debug)]
pub struct Service {
    pub name: String,
    pub image: Option<String>,
    pub depends_on: Vec<String>,
    pub mounts: Vec<Mount>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mount {
    /// A named volume of the project, by its key in the file.
    Volume { key: String, target: String },
    /// A host path.
    Bind { source: PathBuf, target: String },
}

fn tool_error(what: &str, reason: impl Into<String>) -> Error {
    Error::Engine {
        what: what.to_string(),
        reason: reason.into(),
    }
}

impl Compose {
    /// `docker compose` (v2) where the plugin is installed, else `docker-compose`, speaking
    /// to the engine at `socket` (else the one the environment names).
    ///
    /// # Errors
    /// [`Error::Engine`] when neither runs.
    pub fn find(socket: Option<&Path>) -> Result<Compose> {
        let env = environment(socket);
        for program in [&["docker", "compose"][..], &["docker-compose"][..]] {
            let compose = Compose {
                program: program.iter().map(|s| s.to_string()).collect(),
                env: env.clone(),
            };
            let works = compose
                .tool()
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success());
            if works {
                return Ok(compose);
            }
        }
        Err(tool_error(
            "compose",
            "neither `docker compose` nor `docker-compose` runs on this host",
        ))
    }

    /// The tool with its environment and nothing else.
    fn tool(&self) -> Command {
        let mut cmd = Command::new(&self.program[0]);
        cmd.args(&self.program[1..])
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    fn command(&self, files: &[PathBuf], env_file: Option<&Path>, project: &str) -> Command {
        let mut cmd = self.tool();
        for f in files {
            cmd.arg("-f").arg(f);
        }
        if let Some(e) = env_file {
            cmd.arg("--env-file").arg(e);
        }
        cmd.arg("-p").arg(project);
        cmd
    }

    fn run(&self, mut cmd: Command, what: &str) -> Result<Vec<u8>> {
        let out = cmd.output().map_err(|e| tool_error(what, e.to_string()))?;
        if !out.status.success() {
            return Err(tool_error(
                what,
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        Ok(out.stdout)
    }

    /// Normalizes the project of `files`.
    ///
    /// # Errors
    /// [`Error::Engine`] with the tool's message when it refuses the files; [`Error::Config`]
    /// for output that is not a compose project.
    pub fn config(
        &self,
        files: &[PathBuf],
        env_file: Option<&Path>,
        project: Option<&str>,
    ) -> Result<Project> {
        let name = match project {
            Some(p) => normalize_name(p),
            None => default_name(files)?,
        };
        let mut cmd = self.command(files, env_file, &name);
        cmd.arg("config");
        let out = self.run(cmd, "compose config")?;
        let config: Value = serde_yaml::from_slice(&out)
            .map_err(|e| Error::Config(format!("compose config printed no project: {e}")))?;
        Project::from_config(name, config)
    }

    /// Starts the project of `file` in the background (`up -d`).
    ///
    /// # Errors
    /// [`Error::Engine`] with the tool's message.
    pub fn up(&self, file: &Path, project: &str) -> Result<()> {
        let mut cmd = self.command(&[file.to_path_buf()], None, project);
        cmd.args(["up", "-d"]);
        self.run(cmd, "compose up").map(drop)
    }

    /// Stops and removes the containers and networks of project `project` of `file` (`down`):
    /// a throwaway project (a drill's, or one a failed restore started), so its containers get
    /// two seconds to stop, not their grace period.
    ///
    /// # Errors
    /// [`Error::Engine`] with the tool's message.
    pub fn down(&self, file: &Path, project: &str) -> Result<()> {
        let mut cmd = self.command(&[file.to_path_buf()], None, project);
        cmd.args(["down", "--remove-orphans", "-t", "2"]);
        self.run(cmd, "compose down").map(drop)
    }
}

/// The twin `config` made to run beside its original on the same engine, for a drill: no
/// published host port (the engine picks a free one for each), no fixed container name, and
/// networks named by the drill's project, not the original's.
pub fn beside_original(config: &mut Value) {
    if let Some(map) = config.get_mut("services").and_then(Value::as_mapping_mut) {
        for def in map.values_mut().filter_map(Value::as_mapping_mut) {
            def.remove("container_name");
            let Some(ports) = def.get_mut("ports").and_then(Value::as_sequence_mut) else {
                continue;
            };
            for port in ports.iter_mut() {
                match port {
                    // `[HOST_IP:][HOST_PORT:]CONTAINER_PORT[/PROTOCOL]`: the container's port only.
                    Value::String(s) => *s = s.rsplit(':').next().unwrap_or_default().into(),
                    Value::Number(_) => {}
                    Value::Mapping(m) => {
                        m.remove("published");
                        m.remove("host_ip");
                    }
                    _ => {}
                }
            }
        }
    }
    if let Some(map) = config.get_mut("networks").and_then(Value::as_mapping_mut) {
        for def in map.values_mut().filter_map(Value::as_mapping_mut) {
            let external = def
                .get("external")
                .is_some_and(|e| e.as_bool() != Some(false));
            if !external {
                def.remove("name");
            }
        }
    }
}

/// Compose's rule for project names: lower case, only `a-z0-9_-`.
pub fn normalize_name(name: &str) -> String {
    name.to_lowercase()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .collect()
}

/// The name compose gives a project by default: `COMPOSE_PROJECT_NAME`, else the name of the
/// first file's directory.
fn default_name(files: &[PathBuf]) -> Result<String> {
    if let Ok(name) = std::env::var("COMPOSE_PROJECT_NAME") {
        return Ok(normalize_name(&name));
    }
    let first = files
        .first()
        .ok_or_else(|| Error::Config("a workload needs at least one --compose file".into()))?;
    let dir = std::fs::canonicalize(first)
        .map_err(|e| Error::io(first, e))?
        .parent()
        .and_then(|d| d.file_name())
        .map(|d| d.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(normalize_name(&dir))
}

fn str_of(v: &Value) -> Option<String> {
    v.as_str().map(str::to_string)
}

impl Project {
    /// The project the compose tool printed as `config`, named `name`.
    ///
    /// # Errors
    /// [`Error::Config`] for a project without services or with a dependency cycle.
    pub fn from_config(name: String, config: Value) -> Result<Project> {
        let mut volumes = BTreeMap::new();
        if let Some(map) = config.get("volumes").and_then(Value::as_mapping) {
            for (key, def) in map {
                let key = str_of(key).unwrap_or_default();
                let external = def
                    .get("external")
                    .is_some_and(|e| e.as_bool().unwrap_or(false) || e.get("name").is_some());
                let engine_name = def
                    .get("name")
                    .and_then(str_of)
                    .or_else(|| {
                        def.get("external")
                            .and_then(|e| e.get("name"))
                            .and_then(str_of)
                    })
                    .unwrap_or_else(|| {
                        if external {
                            key.clone()
                        } else {
                            format!("{name}_{key}")
                        }
                    });
                volumes.insert(key, engine_name);
            }
        }
        let mut services = Vec::new();
        let Some(map) = config.get("services").and_then(Value::as_mapping) else {
            return Err(Error::Config("the compose project has no services".into()));
        };
        for (sname, def) in map {
            let sname = str_of(sname).unwrap_or_default();
            let depends_on = match def.get("depends_on") {
                Some(Value::Sequence(s)) => s.iter().filter_map(str_of).collect(),
                Some(Value::Mapping(m)) => m.keys().filter_map(str_of).collect(),
                _ => Vec::new(),
            };
            let mut mounts = Vec::new();
            for m in def
                .get("volumes")
                .and_then(Value::as_sequence)
                .into_iter()
                .flatten()
            {
                if let Some(mount) = parse_mount(m, &volumes) {
                    mounts.push(mount);
                }
            }
            services.push(Service {
                name: sname,
                image: def.get("image").and_then(str_of),
                depends_on,
                mounts,
            });
        }
        let services = dependency_order(services)?;
        Ok(Project {
            name,
            config,
            services,
            volumes,
        })
    }
}

impl Project {
    /// The project of a workload given by hand (`--image`, `--volume NAME=PATH`): a service
    /// per image, named by it, and the paths as bind mounts of no service, each with its name
    /// as the target.
    pub fn explicit(name: &str, images: &[String], volumes: &[(String, PathBuf)]) -> Project {
        let mut services: Vec<Service> = images
            .iter()
            .map(|i| Service {
                name: i.clone(),
                image: Some(i.clone()),
                depends_on: Vec::new(),
                mounts: Vec::new(),
            })
            .collect();
        services.push(Service {
            name: String::new(),
            image: None,
            depends_on: Vec::new(),
            mounts: volumes
                .iter()
                .map(|(n, p)| Mount::Bind {
                    source: p.clone(),
                    target: n.clone(),
                })
                .collect(),
        });
        Project {
            name: name.to_string(),
            config: Value::Null,
            services,
            volumes: BTreeMap::new(),
        }
    }
}

/// A service's mount in the short (`SRC:TARGET[:MODE]`) or long (`type:`) form; `None` for
/// anonymous volumes and tmpfs, which hold nothing to keep.
fn parse_mount(m: &Value, volumes: &BTreeMap<String, String>) -> Option<Mount> {
    let (kind, source, target) = match m {
        Value::String(s) => {
            let mut parts = s.splitn(3, ':');
            let source = parts.next()?.to_string();
            let target = parts.next()?.to_string();
            let kind = if source.starts_with('/') || source.starts_with('.') {
                "bind"
            } else {
                "volume"
            };
            (kind.to_string(), source, target)
        }
        Value::Mapping(_) => (
            m.get("type").and_then(str_of)?,
            m.get("source").and_then(str_of)?,
            m.get("target").and_then(str_of)?,
        ),
        _ => return None,
    };
    match kind.as_str() {
        "volume" if volumes.contains_key(&source) => Some(Mount::Volume {
            key: source,
            target,
        }),
        "bind" => Some(Mount::Bind {
            source: PathBuf::from(source),
            target,
        }),
        _ => None,
    }
}

/// Services sorted so that each comes after those it depends on (ties by name).
fn dependency_order(mut services: Vec<Service>) -> Result<Vec<Service>> {
    services.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out: Vec<Service> = Vec::new();
    while !services.is_empty() {
        let ready = services.iter().position(|s| {
            s.depends_on
                .iter()
                .all(|d| out.iter().any(|o| &o.name == d))
        });
        match ready {
            Some(i) => out.push(services.remove(i)),
            None => {
                let names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
                return Err(Error::Config(format!(
                    "the services {} depend on each other in a cycle (or on a missing service)",
                    names.join(", ")
                )));
            }
        }
    }
    Ok(out)
}

/// The project rewritten for a twin: each service's image replaced by `images[service]` (its
/// `build` dropped), each
/// bind mount's source by `binds[old source]`, and each named volume given its engine name
/// in `volumes` (the volumes restored for the new project).
pub fn rewrite(
    config: &Value,
    images: &BTreeMap<String, String>,
    binds: &BTreeMap<PathBuf, PathBuf>,
    volumes: &BTreeMap<String, String>,
) -> Value {
    let mut config = config.clone();
    if let Some(map) = config.get_mut("services").and_then(Value::as_mapping_mut) {
        for (sname, def) in map.iter_mut() {
            let Some(sname) = sname.as_str() else {
                continue;
            };
            if let (Some(image), Some(def)) = (images.get(sname), def.as_mapping_mut()) {
                def.insert("image".into(), Value::String(image.clone()));
                // The image comes from the repository: nothing is built on the twin's host.
                def.remove("build");
            }
            let Some(mounts) = def.get_mut("volumes").and_then(Value::as_sequence_mut) else {
                continue;
            };
            for m in mounts.iter_mut() {
                rewrite_bind(m, binds);
            }
        }
    }
    if let Some(map) = config.get_mut("volumes").and_then(Value::as_mapping_mut) {
        for (key, def) in map.iter_mut() {
            let Some(engine_name) = key.as_str().and_then(|k| volumes.get(k)) else {
                continue;
            };
            // The restored volume exists already, labelled as this project's: compose takes it
            // as its own (so `down -v` removes it, as it would the original's), by its name,
            // with no driver or options of the record.
            let mut fresh = serde_yaml::Mapping::new();
            fresh.insert("name".into(), Value::String(engine_name.clone()));
            *def = Value::Mapping(fresh);
        }
    }
    config
}

fn rewrite_bind(m: &mut Value, binds: &BTreeMap<PathBuf, PathBuf>) {
    match m {
        Value::String(s) => {
            let mut parts: Vec<String> = s.splitn(3, ':').map(str::to_string).collect();
            if let Some(new) = parts.first().and_then(|p| binds.get(Path::new(p))) {
                parts[0] = new.display().to_string();
                *s = parts.join(":");
            }
        }
        Value::Mapping(map) => {
            let source = map.get("source").and_then(Value::as_str).map(PathBuf::from);
            if let Some(new) = source.and_then(|p| binds.get(&p)) {
                map.insert("source".into(), Value::String(new.display().to_string()));
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = r#"
services:
  web:
    depends_on:
    - db
    image: 127.0.0.1:5000/shop/web:1
    volumes:
    - /srv/site:/www:ro
    - data:/data:rw
  db:
    image: 127.0.0.1:5000/shop/db:1
    volumes:
    - type: volume
      source: dbdata
      target: /var/lib/db
    - /tmp
version: '3.7'
volumes:
  data: {}
  dbdata:
    name: shop-db
"#;

    #[test]
    fn a_drill_twin_publishes_no_host_port_and_names_no_container() {
        let mut config: Value = serde_yaml::from_str(
            "services:\n  web:\n    container_name: shop-web\n    ports:\n    - 127.0.0.1:8080:80/tcp\n    - target: 443\n      published: \"8443\"\n      host_ip: 0.0.0.0\nnetworks:\n  front:\n    name: shop-front\n  shared:\n    external: true\n    name: corp\n",
        )
        .unwrap();
        beside_original(&mut config);
        let web = &config["services"]["web"];
        assert!(web.get("container_name").is_none());
        assert_eq!(web["ports"][0], Value::String("80/tcp".into()));
        assert_eq!(web["ports"][1].get("published"), None);
        assert_eq!(web["ports"][1]["target"], 443);
        assert_eq!(config["networks"]["front"].get("name"), None);
        assert_eq!(config["networks"]["shared"]["name"], "corp");
    }

    #[test]
    fn a_normalized_project_gives_order_mounts_and_volume_names() {
        let config: Value = serde_yaml::from_str(V1).unwrap();
        let p = Project::from_config("shop".into(), config).unwrap();
        let names: Vec<&str> = p.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["db", "web"]);
        assert_eq!(p.volumes["data"], "shop_data");
        assert_eq!(p.volumes["dbdata"], "shop-db");
        assert_eq!(
            p.services[1].mounts,
            [
                Mount::Bind {
                    source: "/srv/site".into(),
                    target: "/www".into()
                },
                Mount::Volume {
                    key: "data".into(),
                    target: "/data".into()
                }
            ]
        );
        assert_eq!(
            p.services[0].mounts.len(),
            1,
            "the anonymous volume is left out"
        );
    }

    #[test]
    fn a_rewrite_changes_images_binds_and_volumes_only() {
        let config: Value = serde_yaml::from_str(V1).unwrap();
        let images = BTreeMap::from([("web".to_string(), "dr/web@sha256:ab".to_string())]);
        let binds = BTreeMap::from([(PathBuf::from("/srv/site"), PathBuf::from("/new/site"))]);
        let volumes = BTreeMap::from([("data".to_string(), "dr_data".to_string())]);
        let out = rewrite(&config, &images, &binds, &volumes);
        let web = &out["services"]["web"];
        assert_eq!(web["image"], "dr/web@sha256:ab");
        assert_eq!(web["volumes"][0], "/new/site:/www:ro");
        assert_eq!(web["volumes"][1], "data:/data:rw");
        assert_eq!(out["services"]["db"]["image"], "127.0.0.1:5000/shop/db:1");
        assert_eq!(out["volumes"]["data"]["name"], "dr_data");
        assert_eq!(out["volumes"]["data"].get("external"), None);
        assert_eq!(out["version"], "3.7");
    }

    #[test]
    fn a_dependency_cycle_is_named() {
        let config: Value = serde_yaml::from_str(
            "services:\n  a:\n    depends_on: [b]\n  b:\n    depends_on: [a]\n",
        )
        .unwrap();
        let err = Project::from_config("p".into(), config).unwrap_err();
        assert!(err.to_string().contains("a, b"), "{err}");
    }
}
