//! The agent: runs the jobs of `agent.toml` on their schedules, as a systemd service.
//!
//! One job runs at a time, so a job is never started twice. A failed job is retried with
//! doubling delays and reported; it never stops the others. The agent tells systemd when it is
//! ready, what it is doing (`STATUS=`) and that it is alive (watchdog). SIGHUP reloads the
//! config, keeping the old one if the new one is invalid. SIGTERM stops it: a running job gets
//! [`STOP_GRACE`] to finish, then the process exits anyway, which is safe at any point because
//! a snapshot record is only written once everything it references is stored.

pub mod config;
pub mod hook;
mod notify;
pub mod schedule;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Local};
use tokio::runtime::Handle;
use tokio::signal::unix::{signal, SignalKind};

use crate::crypto::Secret;
use crate::error::{Error, Result};
use crate::gc::Session;
use crate::localfile::{write_atomically, SHARED};
use crate::progress::Progress;
use crate::repository::{OpenOptions, Repository};
use crate::store::{Store, StoreOptions};
use config::{AgentConfig, JobConfig, JobKind};
use notify::notify;
use schedule::Schedule;

/// How long a running job may go on after SIGTERM.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// What one job run did.
#[derive(Clone, Debug, Default)]
struct Outcome {
    snapshots: Vec<String>,
    bytes_read: u64,
    bytes_new: u64,
}

/// Per-job figures for the metrics file.
#[derive(Clone, Debug, Default)]
struct JobMetrics {
    last_success: Option<i64>,
    last_duration: f64,
    last_ok: bool,
    failures: u64,
    bytes_read: u64,
    bytes_new: u64,
}

/// Everything a job needs.
struct Context {
    config: AgentConfig,
    repo: Arc<Repository>,
    cache_dir: PathBuf,
    metrics: Mutex<BTreeMap<String, JobMetrics>>,
}

fn env_dir(var: &str, fallback: &str) -> PathBuf {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(fallback))
}

impl Context {
    async fn new(config: AgentConfig) -> Result<Context> {
        let r = &config.repository;
        let store = Store::open(
            &r.url,
            &StoreOptions {
                endpoint: r.s3_endpoint.clone(),
                region: r.s3_region.clone(),
                allow_http: r.s3_allow_http,
                credentials: None,
            },
            false,
        )?;
        let cache_dir = config
            .cache_dir
            .clone()
            .unwrap_or_else(|| env_dir("CACHE_DIRECTORY", "/var/cache/tresor"));
        let options = OpenOptions {
            secret: secret(r.key_file.as_deref(), r.password_file.as_deref())?,
            cache_dir: Some(&cache_dir),
        };
        let repo = Repository::open(store, options, || {
            Err(Error::Config(
                "the repository is encrypted: set repository.key_file or password_file, or \
                 pass the systemd credential tresor-key-file / tresor-password"
                    .into(),
            ))
        })
        .await?;
        Ok(Context {
            config,
            repo: Arc::new(repo),
            cache_dir,
            metrics: Mutex::new(BTreeMap::new()),
        })
    }
}

/// The secret from the config's files, else from systemd credentials, if any is given.
fn secret(key_file: Option<&Path>, password_file: Option<&Path>) -> Result<Option<Secret>> {
    if let Some(k) = key_file {
        return Secret::from_key_file(k, false).map(Some);
    }
    if let Some(p) = password_file {
        return Secret::from_password_file(p).map(Some);
    }
    if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from) {
        if dir.join("tresor-key-file").is_file() {
            return Secret::from_key_file(&dir.join("tresor-key-file"), false).map(Some);
        }
        if dir.join("tresor-password").is_file() {
            return Secret::from_password_file(&dir.join("tresor-password")).map(Some);
        }
    }
    Ok(None)
}

/// Checks a config file, for `--check-config`.
pub fn check_config(path: &Path) -> Result<AgentConfig> {
    AgentConfig::load(path)
}

/// Runs every job once (workload members as part of their workload) and returns how many
/// failed. SIGTERM stops it like the service.
pub async fn run_once(path: &Path) -> Result<usize> {
    let ctx = Arc::new(Context::new(AgentConfig::load(path)?).await?);
    let members: Vec<String> = ctx
        .config
        .jobs
        .iter()
        .filter_map(|j| match &j.kind {
            JobKind::Workload { jobs } => Some(jobs.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    let mut sigterm = signal(SignalKind::terminate()).map_err(|e| Error::io("signal", e))?;
    let mut failed = 0;
    for job in ctx
        .config
        .jobs
        .iter()
        .filter(|j| !members.contains(&j.name))
    {
        let (c, name) = (Arc::clone(&ctx), job.name.clone());
        let rt = Handle::current();
        let mut handle = tokio::task::spawn_blocking(move || run_with_retries(&c, &rt, &name));
        tokio::select! {
            ok = &mut handle => if !ok.expect("job thread panicked") { failed += 1 },
            _ = sigterm.recv() => {
                tracing::warn!("SIGTERM: stopping within {STOP_GRACE:?}");
                stop_job(handle).await;
                return Err(Error::Config("stopped by SIGTERM".into()));
            }
        }
    }
    Ok(failed)
}

/// Gives a running job [`STOP_GRACE`] to finish, then kills its hooks, so that it returns and
/// the agent can exit.
async fn stop_job(handle: tokio::task::JoinHandle<bool>) {
    if tokio::time::timeout(STOP_GRACE, handle).await.is_err() {
        hook::stop_all();
    }
}

/// Runs the agent as a service until SIGTERM.
pub async fn run_service(path: &Path) -> Result<()> {
    let mut ctx = Arc::new(Context::new(AgentConfig::load(path)?).await?);
    let mut sigterm = signal(SignalKind::terminate()).map_err(|e| Error::io("signal", e))?;
    let mut sighup = signal(SignalKind::hangup()).map_err(|e| Error::io("signal", e))?;
    if let Some(every) = notify::watchdog_interval() {
        tokio::spawn(async move {
            loop {
                notify("WATCHDOG=1");
                tokio::time::sleep(every).await;
            }
        });
    }
    let mut next = plan(&ctx.config, Local::now(), &BTreeMap::new());
    notify("READY=1\nSTATUS=idle");
    tracing::info!("agent ready with {} jobs", ctx.config.jobs.len());
    loop {
        let due = next
            .iter()
            .min_by_key(|(_, t)| **t)
            .map(|(n, t)| (n.clone(), *t));
        let wait = due
            .as_ref()
            .map(|(_, t)| (*t - Local::now()).to_std().unwrap_or_default())
            .unwrap_or(Duration::from_secs(3600));
        if let Some((name, at)) = &due {
            notify(&format!(
                "STATUS=idle; next: {name} at {}",
                at.format("%Y-%m-%d %H:%M:%S")
            ));
        }
        tokio::select! {
            _ = tokio::time::sleep(wait), if due.is_some() => {
                let (name, _) = due.expect("guarded");
                notify(&format!("STATUS=running {name}"));
                let started = Local::now();
                let (c, n) = (Arc::clone(&ctx), name.clone());
                let rt = Handle::current();
                let mut handle = tokio::task::spawn_blocking(move || run_with_retries(&c, &rt, &n));
                tokio::select! {
                    _ = &mut handle => {}
                    _ = sigterm.recv() => {
                        notify(&format!("STOPPING=1\nSTATUS=stopping; {name} gets {STOP_GRACE:?}"));
                        tracing::info!("SIGTERM while {name} runs: stopping within {STOP_GRACE:?}");
                        stop_job(handle).await;
                        return Ok(());
                    }
                }
                let mut last = BTreeMap::new();
                last.insert(name.clone(), started);
                let again = plan(&ctx.config, Local::now(), &last);
                if let Some(t) = again.get(&name) {
                    next.insert(name, *t);
                }
            }
            _ = sigterm.recv() => {
                notify("STOPPING=1");
                tracing::info!("SIGTERM: stopping");
                return Ok(());
            }
            _ = sighup.recv() => {
                notify("RELOADING=1");
                match AgentConfig::load(path) {
                    Ok(config) => match Context::new(config).await {
                        Ok(new) => {
                            ctx = Arc::new(new);
                            next = plan(&ctx.config, Local::now(), &BTreeMap::new());
                            tracing::info!("configuration reloaded: {} jobs", ctx.config.jobs.len());
                        }
                        Err(e) => tracing::error!("reload failed, keeping the previous configuration: {e}"),
                    },
                    Err(e) => tracing::error!("reload failed, keeping the previous configuration: {e}"),
                }
                notify("READY=1");
            }
        }
    }
}

/// Next start of every scheduled job: after its last start if known, else after `now`, plus
/// its randomised delay.
fn plan(
    config: &AgentConfig,
    now: DateTime<Local>,
    last: &BTreeMap<String, DateTime<Local>>,
) -> BTreeMap<String, DateTime<Local>> {
    let mut out = BTreeMap::new();
    for job in &config.jobs {
        let Some(s) = job
            .schedule
            .as_deref()
            .and_then(|s| Schedule::parse(s).ok())
        else {
            continue;
        };
        let base = last.get(&job.name).copied().unwrap_or(now);
        let mut at = s.next(base);
        while at <= now {
            at = s.next(at);
        }
        if let Some(delay) = job
            .randomized_delay
            .as_deref()
            .and_then(|d| config::parse_duration(d).ok())
        {
            let secs = delay.as_secs();
            if secs > 0 {
                at += chrono::Duration::seconds((rand::random::<u64>() % secs) as i64);
            }
        }
        out.insert(job.name.clone(), at);
    }
    out
}

/// Runs a job, retrying failures; records metrics. Returns whether it finally succeeded.
fn run_with_retries(ctx: &Context, rt: &Handle, name: &str) -> bool {
    let job = ctx.config.job(name).expect("planned jobs exist").clone();
    let mut delay = job
        .retry_delay
        .as_deref()
        .and_then(|d| config::parse_duration(d).ok())
        .unwrap_or(Duration::from_secs(30));
    let started = Instant::now();
    let mut attempt = 0;
    let result = loop {
        attempt += 1;
        tracing::info!(job = name, attempt, "job starting");
        match run_job(ctx, rt, &job, &job.tags) {
            Ok(outcome) => break Ok(outcome),
            Err(e) if attempt <= job.retries => {
                tracing::warn!(job = name, "job failed: {e}; retrying in {delay:?}");
                std::thread::sleep(delay);
                delay *= 2;
            }
            Err(e) => break Err(e),
        }
    };
    let mut metrics = ctx.metrics.lock().expect("metrics lock");
    let m = metrics.entry(name.to_string()).or_default();
    m.last_duration = started.elapsed().as_secs_f64();
    let ok = match result {
        Ok(outcome) => {
            tracing::info!(job = name, snapshots = ?outcome.snapshots, "job succeeded");
            m.last_ok = true;
            m.last_success = Some(chrono::Utc::now().timestamp());
            m.bytes_read = outcome.bytes_read;
            m.bytes_new = outcome.bytes_new;
            true
        }
        Err(e) => {
            tracing::error!(job = name, "job failed: {e}");
            m.last_ok = false;
            m.failures += 1;
            false
        }
    };
    if let Some(path) = &ctx.config.metrics.textfile {
        if let Err(e) = write_metrics(path, &metrics) {
            tracing::warn!("cannot write metrics to {}: {e}", path.display());
        }
    }
    ok
}

/// One attempt at a job.
/// What an image job backs up.
struct ImageJob<'a> {
    images: &'a [String],
    tags_regex: Option<&'a str>,
    platforms: &'a [String],
    /// This agent's host name, recorded in the snapshots.
    host: &'a str,
    tags: &'a [String],
}

/// Backs up every image of an image job within `session`: the snapshots made, and the images
/// that failed.
fn image_job(
    ctx: &Context,
    rt: &Handle,
    session: &Arc<Session>,
    job: &ImageJob,
) -> Result<(Vec<crate::snapshot::Listed>, Vec<String>)> {
    let filter = job
        .tags_regex
        .map(regex::Regex::new)
        .transpose()
        .map_err(|e| Error::Config(e.to_string()))?;
    let mut listed = Vec::new();
    let mut failures = Vec::new();
    for image in job.images {
        let source = crate::oci::ImageSource::parse(image)?;
        let registry_host = source.registry_host().unwrap_or_default().to_string();
        let host_cfg = ctx
            .config
            .registries
            .get(&registry_host)
            .cloned()
            .unwrap_or_default();
        let registry =
            crate::oci::registry::Registry::new(&crate::oci::registry::RegistryOptions {
                insecure: if host_cfg.insecure {
                    vec![registry_host.clone()]
                } else {
                    Vec::new()
                },
                creds: None,
                creds_file: host_cfg.creds_file.clone(),
                auth_file: host_cfg.auth_file.clone(),
                ca_file: host_cfg.ca_file.clone(),
                attempts: 5,
                locations: Some(ctx.cache_dir.join(crate::oci::locations::FILE_NAME)),
            })?;
        let options = crate::oci::ImageBackupOptions {
            source,
            tag_filter: filter.clone(),
            platforms: job.platforms.to_vec(),
            host: job.host.to_string(),
            tags: job.tags.to_vec(),
        };
        for (reference, result) in
            crate::oci::backup(session, rt, &registry, &options, &Progress::hidden())?
        {
            match result {
                Ok(l) => listed.push(l),
                Err(e) => failures.push(format!("{reference}: {e}")),
            }
        }
    }
    Ok((listed, failures))
}

fn run_job(ctx: &Context, rt: &Handle, job: &JobConfig, tags: &[String]) -> Result<Outcome> {
    let repo = &ctx.repo;
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let mut outcome = Outcome::default();
    match &job.kind {
        JobKind::Volume {
            path,
            block,
            strict,
            pre,
            post,
            hook_timeout,
        } => {
            let timeout = duration(job, "hook_timeout", hook_timeout, hook::DEFAULT_TIMEOUT)?;
            let hook = |which, cmd: &String| hook::run(&job.name, which, cmd, timeout);
            // The post hook runs whatever happened, so a snapshot made by the pre hook is
            // always removed.
            let pre_result = pre.as_ref().map(|cmd| hook("pre", cmd)).unwrap_or(Ok(()));
            let result = pre_result
                .map_err(|e| e.context(format!("job {}: pre hook failed; job skipped", job.name)))
                .and_then(|()| {
                    let session = Arc::new(rt.block_on(Session::start(
                        Arc::clone(repo),
                        Some(&ctx.cache_dir),
                        &format!("agent job {}", job.name),
                    ))?);
                    let options = crate::volume::BackupOptions {
                        name: job.name.clone(),
                        path: path.clone(),
                        host: host.clone(),
                        tags: tags.to_vec(),
                        block: *block,
                        strict: *strict,
                        use_parent: true,
                    };
                    let result = crate::volume::backup(&session, rt, &options, &Progress::hidden());
                    rt.block_on(session.finish(result.is_ok()));
                    result
                });
            let post_result = post.as_ref().map(|cmd| hook("post", cmd));
            let listed = result?;
            if let Some(Err(e)) = post_result {
                return Err(e.context(format!("job {}: post hook failed", job.name)));
            }
            outcome.bytes_read = listed.snapshot.summary.bytes_read;
            outcome.bytes_new = listed.snapshot.summary.chunks.bytes_new;
            outcome.snapshots.push(listed.id);
        }
        JobKind::Image {
            images,
            tags_regex,
            platforms,
        } => {
            let session = Arc::new(rt.block_on(Session::start(
                Arc::clone(repo),
                Some(&ctx.cache_dir),
                &format!("agent job {}", job.name),
            ))?);
            let what = ImageJob {
                images,
                tags_regex: tags_regex.as_deref(),
                platforms,
                host: &host,
                tags,
            };
            let result = image_job(ctx, rt, &session, &what);
            rt.block_on(session.finish(result.as_ref().is_ok_and(|(_, f)| f.is_empty())));
            let (listed, failures) = result?;
            for l in listed {
                outcome.bytes_read += l.snapshot.summary.bytes_read;
                outcome.bytes_new += l.snapshot.summary.chunks.bytes_new;
                outcome.snapshots.push(l.id);
            }
            if !failures.is_empty() {
                return Err(Error::Config(format!(
                    "job {}: {}",
                    job.name,
                    failures.join("; ")
                )));
            }
        }
        JobKind::Workload { jobs } => {
            let mut member_tags = tags.to_vec();
            member_tags.push(format!("workload:{}", job.name));
            for member in jobs {
                let m = ctx.config.job(member).expect("checked at load");
                let mut all = m.tags.clone();
                all.extend(member_tags.iter().cloned());
                let o = run_job(ctx, rt, m, &all)
                    .map_err(|e| e.context(format!("workload {}", job.name)))?;
                outcome.snapshots.extend(o.snapshots);
                outcome.bytes_read += o.bytes_read;
                outcome.bytes_new += o.bytes_new;
            }
        }
        JobKind::Forget { .. } => {
            let policy = job
                .kind
                .policy()
                .map_err(|(field, e)| Error::Config(format!("job {}: {field}: {e}", job.name)))?;
            let filter = crate::snapshot::Filter {
                host: Some(host.clone()),
                ..Default::default()
            };
            let (_, removed) =
                rt.block_on(crate::retention::forget(repo, &policy, &filter, false))?;
            tracing::info!(job = %job.name, "forgot {removed} snapshots of host {host}");
        }
        JobKind::Gc {
            grace,
            declare_window,
        } => {
            let options = crate::gc::GcOptions {
                grace: duration(job, "grace", grace, std::time::Duration::from_secs(3600))?,
                dry_run: false,
                declare_window: duration(
                    job,
                    "declare_window",
                    declare_window,
                    crate::gc::DECLARE_WINDOW,
                )?,
            };
            let report = crate::gc::run(repo, rt, &options)?;
            let freed: u64 = report.swept.iter().map(|s| s.bytes_freed).sum();
            tracing::info!(
                job = %job.name,
                "gc: {} plans swept, {freed} bytes freed, {} plans waiting",
                report.swept.len(),
                report.waiting.len()
            );
        }
        JobKind::Verify {
            read_data,
            read_data_subset,
            metrics_file,
        } => {
            let read = match (read_data_subset, read_data) {
                (Some(s), _) => Some(Some(crate::verify::Part::parse(s)?)),
                (None, true) => Some(None),
                (None, false) => None,
            };
            let options = crate::verify::VerifyOptions {
                read_data: read,
                ..Default::default()
            };
            let report = crate::verify::verify(repo, rt, &options, &Progress::hidden())?;
            if report.chunks_missing() {
                crate::cache::forget(repo, Some(&ctx.cache_dir))?;
            }
            if let Some(path) = metrics_file {
                write_atomically(path, SHARED, crate::verify::metrics(&report).as_bytes())?;
            }
            outcome.bytes_read = report.stats.bytes_read;
            if !report.ok {
                let broken: Vec<&str> = report
                    .snapshots
                    .iter()
                    .filter(|s| !s.ok)
                    .map(|s| s.id.as_str())
                    .collect();
                return Err(Error::Config(format!(
                    "verification found {} problems; broken snapshots: {}",
                    report.problems.len(),
                    broken.join(", ")
                )));
            }
        }
    }
    Ok(outcome)
}

/// A job's duration setting, or `default` when unset.
fn duration(
    job: &JobConfig,
    field: &str,
    v: &Option<String>,
    default: Duration,
) -> Result<Duration> {
    match v {
        Some(v) => config::parse_duration(v)
            .map_err(|e| Error::Config(format!("job {}: {field}: {e}", job.name))),
        None => Ok(default),
    }
}

fn write_metrics(path: &Path, metrics: &BTreeMap<String, JobMetrics>) -> Result<()> {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, value: &dyn Fn(&JobMetrics) -> Option<f64>| {
        out.push_str(&format!(
            "# HELP tresor_job_{name} {help}\n# TYPE tresor_job_{name} gauge\n"
        ));
        for (job, m) in metrics {
            if let Some(v) = value(m) {
                let job = job.replace('\\', "\\\\").replace('"', "\\\"");
                out.push_str(&format!("tresor_job_{name}{{job=\"{job}\"}} {v}\n"));
            }
        }
    };
    gauge(
        "last_success_timestamp_seconds",
        "When the job last succeeded.",
        &|m| m.last_success.map(|t| t as f64),
    );
    gauge(
        "last_duration_seconds",
        "How long the last run took, retries included.",
        &|m| Some(m.last_duration),
    );
    gauge("last_run_ok", "1 if the last run succeeded.", &|m| {
        Some(m.last_ok as u8 as f64)
    });
    gauge("failures", "Failed runs since the agent started.", &|m| {
        Some(m.failures as f64)
    });
    gauge(
        "bytes_read",
        "Bytes read by the last successful run.",
        &|m| Some(m.bytes_read as f64),
    );
    gauge(
        "bytes_new",
        "New bytes stored by the last successful run.",
        &|m| Some(m.bytes_new as f64),
    );
    gauge(
        "dedup_ratio",
        "Share of the bytes read that were already stored.",
        &|m| (m.bytes_read > 0).then(|| 1.0 - m.bytes_new as f64 / m.bytes_read as f64),
    );
    write_atomically(path, SHARED, out.as_bytes())
}
