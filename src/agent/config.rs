//! `agent.toml`: the repository, registries, jobs and their schedules, metrics.
//!
//! Unknown keys, wrong types and bad schedules are errors that name the file, the line and the
//! key (`toml`'s spans). Secrets are never inline: the config names files, and systemd
//! credentials (`$CREDENTIALS_DIRECTORY/tresor-key-file`, `tresor-password`) are used when it
//! names none.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::schedule::Schedule;
use crate::error::{Error, Result};

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub repository: RepositoryConfig,
    #[serde(default)]
    pub registries: BTreeMap<String, RegistryConfig>,
    #[serde(default, rename = "job")]
    pub jobs: Vec<JobConfig>,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// The chunk cache (default: systemd's `$CACHE_DIRECTORY`, else /var/cache/tresor). Losing
    /// it costs one listing of the store.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryConfig {
    /// `file:///PATH` or `s3://BUCKET/PREFIX`.
    pub url: String,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub s3_endpoint: Option<String>,
    #[serde(default)]
    pub s3_region: Option<String>,
    #[serde(default)]
    pub s3_allow_http: bool,
    /// The repository is unencrypted (`init --encryption none`); see `--expect-unencrypted`.
    #[serde(default)]
    pub expect_unencrypted: bool,
}

/// Settings of one registry host (`host[:port]`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    #[serde(default)]
    pub insecure: bool,
    #[serde(default)]
    pub auth_file: Option<PathBuf>,
    /// A file holding `USER:PASSWORD` for this registry (overrides `auth_file`).
    #[serde(default)]
    pub creds_file: Option<PathBuf>,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// What a job does.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum JobKind {
    /// A directory tree or block device, with optional hooks.
    Volume {
        path: PathBuf,
        #[serde(default)]
        block: bool,
        #[serde(default)]
        strict: bool,
        /// Shell command run before (e.g. make an LVM/btrfs/ZFS snapshot); failing skips the job.
        #[serde(default)]
        pre: Option<String>,
        /// Shell command run after, whatever happened (e.g. remove the snapshot).
        #[serde(default)]
        post: Option<String>,
        /// How long each hook may run before it is killed (default 5m).
        #[serde(default)]
        hook_timeout: Option<String>,
    },
    /// Image references or whole repositories.
    Image {
        images: Vec<String>,
        /// Which tags of a whole repository (`tresor backup image --tags ...`).
        #[serde(default)]
        tag_policy: crate::oci::TagPolicy,
        #[serde(default)]
        platforms: Vec<String>,
    },
    /// A service as one unit: a compose project (`compose`), backed up with `tresor backup
    /// workload`; or, the older form, other jobs taken together (`jobs`), tagged alike.
    Workload(WorkloadJob),
    /// Retention of this host's snapshots, by the rules of `tresor forget` (at least one).
    Forget {
        #[serde(default)]
        keep_last: usize,
        #[serde(default)]
        keep_hourly: usize,
        #[serde(default)]
        keep_daily: usize,
        #[serde(default)]
        keep_weekly: usize,
        #[serde(default)]
        keep_monthly: usize,
        #[serde(default)]
        keep_yearly: usize,
        #[serde(default)]
        keep_within: Option<String>,
    },
    /// Garbage collection (`tresor gc`), on the admin host whose credential may delete.
    Gc {
        #[serde(default)]
        grace: Option<String>,
        /// How long a sweep waits for running backups to declare chunks they store again.
        #[serde(default)]
        declare_window: Option<String>,
    },
    /// A drill of a workload's newest twin beside the original (`tresor drill workload`).
    Drill(crate::commands::drill::DrillOptions),
    /// Snapshots into a second repository (`tresor copy`; its flags as keys).
    Copy(crate::commands::copy::CopyOptions),
    /// A verification run.
    Verify {
        #[serde(default)]
        read_data: bool,
        #[serde(default)]
        read_data_subset: Option<String>,
        #[serde(default)]
        metrics_file: Option<PathBuf>,
    },
}

/// A `workload` job: the options of `tresor backup workload` (the same type, so the two
/// cannot disagree), or other jobs taken together; host hooks run while the containers are
/// stopped or paused.
#[derive(Clone, Debug, Deserialize)]
pub struct WorkloadJob {
    #[serde(default)]
    pub jobs: Vec<String>,
    #[serde(flatten)]
    pub project: crate::commands::workload::ComposeOptions,
    /// Shell command run once the containers are stopped or paused, before the copy.
    #[serde(default)]
    pub pre: Option<String>,
    /// Shell command run after the copy, whatever happened, before they start again.
    #[serde(default)]
    pub post: Option<String>,
    #[serde(default)]
    pub hook_timeout: Option<String>,
    /// Keys no field took (serde cannot deny unknown keys beside a flattened part): refused
    /// by [`AgentConfig::parse`], named.
    #[serde(flatten)]
    unknown: BTreeMap<String, toml::Value>,
}

impl JobKind {
    /// The retention policy of a `forget` job.
    ///
    /// # Errors
    /// The offending key and why: a bad `keep_within`, or no rule at all.
    pub fn policy(&self) -> std::result::Result<crate::retention::Policy, (&'static str, String)> {
        let JobKind::Forget {
            keep_last,
            keep_hourly,
            keep_daily,
            keep_weekly,
            keep_monthly,
            keep_yearly,
            keep_within,
        } = self
        else {
            return Err(("type", "not a forget job".into()));
        };
        let within = keep_within
            .as_deref()
            .map(crate::units::span)
            .transpose()
            .map_err(|e| ("keep_within", e))?;
        let policy = crate::retention::Policy {
            last: *keep_last,
            hourly: *keep_hourly,
            daily: *keep_daily,
            weekly: *keep_weekly,
            monthly: *keep_monthly,
            yearly: *keep_yearly,
            within,
        };
        if policy.is_empty() {
            return Err((
                "keep_last",
                "a forget job needs at least one keep_* rule; it never removes every snapshot"
                    .into(),
            ));
        }
        Ok(policy)
    }
}

/// One `[[job]]`. Unknown keys are caught by the job type's own list (serde cannot deny them
/// on a struct with a flattened part).
#[derive(Clone, Debug, Deserialize)]
pub struct JobConfig {
    pub name: String,
    #[serde(flatten)]
    pub kind: JobKind,
    /// `hourly`, `daily`, `weekly`, `monthly`, `*-*-* HH:MM[:SS]`, `every 30m`; none: only with `--once`
    /// or as part of a workload.
    #[serde(default)]
    pub schedule: Option<String>,
    /// Random delay added to each start, like systemd's RandomizedDelaySec (`5m`, `30s`).
    #[serde(default)]
    pub randomized_delay: Option<String>,
    /// Snapshot tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Attempts after a failure, with doubling delays from `retry_delay` (default 30s).
    #[serde(default = "default_retries")]
    pub retries: u32,
    #[serde(default)]
    pub retry_delay: Option<String>,
}

fn default_retries() -> u32 {
    2
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Prometheus textfile written after every job (node_exporter's textfile collector).
    #[serde(default)]
    pub textfile: Option<PathBuf>,
    /// Address to serve the same metrics on, `GET /metrics` (e.g. `127.0.0.1:9436`); read
    /// when the agent starts (a reload keeps the address it has).
    #[serde(default)]
    pub listen: Option<std::net::SocketAddr>,
}

impl AgentConfig {
    /// Reads and checks a config file.
    ///
    /// # Errors
    /// [`Error::Config`] naming the file, line and key of the first problem.
    pub fn load(path: &Path) -> Result<AgentConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        AgentConfig::parse(&text, path)
    }

    /// Parses and checks config text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<AgentConfig> {
        let config: AgentConfig = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| format!(" line {}", text[..s.start].matches('\n').count() + 1))
                .unwrap_or_default();
            Error::Config(format!("{}{line}: {}", path.display(), e.message().trim()))
        })?;
        config.check(text, path)?;
        Ok(config)
    }

    fn check(&self, text: &str, path: &Path) -> Result<()> {
        let at = |name: &str, key: &str, msg: String| {
            let needle = format!("\"{name}\"");
            let line = text
                .lines()
                .position(|l| l.contains(&needle))
                .map(|n| format!(" line {}", n + 1))
                .unwrap_or_default();
            Error::Config(format!(
                "{}{line}: job {name:?}, key `{key}`: {msg}",
                path.display()
            ))
        };
        let mut names = std::collections::HashSet::new();
        for job in &self.jobs {
            if !names.insert(job.name.as_str()) {
                return Err(at(&job.name, "name", "another job has this name".into()));
            }
            if let Some(s) = &job.schedule {
                Schedule::parse(s).map_err(|e| at(&job.name, "schedule", e))?;
            }
            for (key, value) in [
                ("randomized_delay", &job.randomized_delay),
                ("retry_delay", &job.retry_delay),
            ] {
                if let Some(v) = value {
                    crate::units::duration(v).map_err(|e| at(&job.name, key, e))?;
                }
            }
            match &job.kind {
                JobKind::Workload(w) => {
                    if let Some(key) = w.unknown.keys().next() {
                        return Err(at(&job.name, key, "unknown key".into()));
                    }
                    let (jobs, compose) = (&w.jobs, &w.project.compose);
                    if jobs.is_empty() == compose.is_empty() {
                        return Err(at(
                            &job.name,
                            "compose",
                            "give either `compose` (a compose project) or `jobs` (other jobs)"
                                .to_string(),
                        ));
                    }
                    for member in jobs {
                        match self.jobs.iter().find(|j| &j.name == member) {
                            None => {
                                return Err(at(
                                    &job.name,
                                    "jobs",
                                    format!("no job is named {member:?}"),
                                ))
                            }
                            Some(j) if matches!(j.kind, JobKind::Workload(_)) => {
                                return Err(at(
                                    &job.name,
                                    "jobs",
                                    format!("{member:?} is a workload itself"),
                                ))
                            }
                            Some(_) => {}
                        }
                    }
                }
                JobKind::Image { tag_policy, .. } => {
                    tag_policy.compile().map_err(|e| {
                        let why = match e {
                            Error::Config(why) => why,
                            e => e.to_string(),
                        };
                        at(&job.name, "tag_policy", why)
                    })?;
                }
                JobKind::Verify {
                    read_data_subset: Some(s),
                    ..
                } => {
                    crate::units::share(s).map_err(|e| at(&job.name, "read_data_subset", e))?;
                }
                JobKind::Forget { .. } => {
                    job.kind
                        .policy()
                        .map_err(|(field, e)| at(&job.name, field, e))?;
                }
                JobKind::Volume {
                    hook_timeout: Some(v),
                    ..
                } => {
                    crate::units::duration(v).map_err(|e| at(&job.name, "hook_timeout", e))?;
                }
                JobKind::Gc {
                    grace,
                    declare_window,
                } => {
                    for (field, value) in [("grace", grace), ("declare_window", declare_window)] {
                        if let Some(v) = value {
                            crate::units::duration(v).map_err(|e| at(&job.name, field, e))?;
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The job of that name.
    pub fn job(&self, name: &str) -> Option<&JobConfig> {
        self.jobs.iter().find(|j| j.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AgentConfig> {
        AgentConfig::parse(text, Path::new("/etc/tresor/agent.toml"))
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let err = parse("[repository]\nurl = \"file:///r\"\nsurprise = 1\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("agent.toml line 3") && err.contains("surprise"),
            "{err}"
        );
        let err = parse("[repository]\nurl = \"file:///r\"\n[[job]]\nname = \"a\"\ntype = \"volume\"\npath = \"/x\"\nschedule = \"fortnightly\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 4") && err.contains("schedule") && err.contains("fortnightly"),
            "{err}"
        );
        let err = parse("[repository]\nurl = 5\n").unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        let err = parse("[repository]\nurl = \"x\"\n[[job]]\nname = \"w\"\ntype = \"workload\"\njobs = [\"nope\"]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope"), "{err}");
        for body in ["", "jobs = [\"v\"]\ncompose = [\"/c.yaml\"]\n"] {
            let err = parse(&format!(
                "[repository]\nurl = \"x\"\n[[job]]\nname = \"w\"\ntype = \"workload\"\n{body}"
            ))
            .unwrap_err()
            .to_string();
            assert!(err.contains("either `compose`"), "{err}");
        }
        let err = parse("[repository]\nurl = \"x\"\n[[job]]\nname = \"v\"\ntype = \"volume\"\npath = \"/x\"\npaht = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("paht"), "{err}");
        let err = parse("[repository]\nurl = \"x\"\n[[job]]\nname = \"d\"\ntype = \"drill\"\nworkload = \"shop\"\nregistry = \"r:5000/drill\"\nprobes = [\"db=true\"]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("probes"), "{err}");
    }

    #[test]
    fn a_workload_job_takes_the_options_of_the_backup_command() {
        let head = "[repository]\nurl = \"x\"\n[[job]]\nname = \"w\"\ntype = \"workload\"\ncompose = [\"/c.yaml\"]\n";
        let config = parse(&format!(
            "{head}project = \"shop\"\nvolume_consistency = {{ cache = \"none\" }}\nexec_before = [\"db=pg_dump -f /d\"]\npre = \"true\"\n"
        ))
        .unwrap();
        let JobKind::Workload(w) = &config.jobs[0].kind else {
            panic!("not a workload")
        };
        let o = &w.project;
        assert_eq!(o.project.as_deref(), Some("shop"));
        assert_eq!(o.consistency(), crate::workload::Consistency::Stop);
        assert_eq!(
            o.volume_consistency,
            [("cache".to_string(), crate::workload::Consistency::None)]
        );
        assert_eq!(
            o.exec_before,
            [("db".to_string(), "pg_dump -f /d".to_string())]
        );
        assert_eq!(w.pre.as_deref(), Some("true"));
        let err = parse(&format!("{head}consistensy = \"stop\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("consistensy") && err.contains("line 4"),
            "{err}"
        );
        let err = parse(&format!("{head}exec_before = [\"no equals sign\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("SERVICE=COMMAND"), "{err}");
    }

    #[test]
    fn a_drill_job_takes_the_options_of_the_drill_command() {
        let config = parse("[repository]\nurl = \"x\"\n[[job]]\nname = \"d\"\ntype = \"drill\"\nschedule = \"weekly\"\nworkload = \"shop\"\nregistry = \"r:5000/drill\"\nprobe = [\"db=true\"]\nconsistent = true\n")
            .unwrap();
        let JobKind::Drill(d) = &config.jobs[0].kind else {
            panic!("not a drill: {:?}", config.jobs[0].kind)
        };
        assert_eq!(
            (
                d.workload.as_str(),
                d.registry.as_str(),
                d.probe.as_slice(),
                d.consistent
            ),
            ("shop", "r:5000/drill", &["db=true".to_string()][..], true)
        );
        assert_eq!(config.jobs[0].schedule.as_deref(), Some("weekly"));
    }
}
