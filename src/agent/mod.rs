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
mod metrics;
mod notify;
pub mod schedule;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Local};
use tokio::runtime::Handle;
use tokio::signal::unix::{signal, SignalKind};

use crate::commands::{self, open::Access};
use crate::error::{Error, Result};
use crate::localfile::{write_atomically, SHARED};
use crate::oci::registry::{Registry, RegistryOptions};
use crate::progress::Progress;
use crate::repository::Repository;
use crate::store::StoreOptions;
use config::{AgentConfig, JobConfig, JobKind};
use metrics::Metrics;
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

impl Outcome {
    /// Counts a snapshot made.
    fn add(&mut self, listed: &crate::snapshot::Listed) {
        self.bytes_read += listed.snapshot.summary.bytes_read;
        self.bytes_new += listed.snapshot.summary.chunks.bytes_new;
        self.snapshots.push(listed.id.clone());
    }
}

/// Everything a job needs.
struct Context {
    config: AgentConfig,
    /// How the repository was opened (a copy job opens its target alike).
    access: Access,
    repo: Arc<Repository>,
    cache_dir: PathBuf,
    metrics: Arc<Metrics>,
}

fn env_dir(var: &str, fallback: &str) -> PathBuf {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(fallback))
}

impl Context {
    /// The context of `config`; `metrics` outlive it (a reload keeps them).
    async fn new(config: AgentConfig, metrics: Arc<Metrics>) -> Result<Context> {
        let r = &config.repository;
        let cache_dir = config
            .cache_dir
            .clone()
            .unwrap_or_else(|| env_dir("CACHE_DIRECTORY", "/var/cache/tresor"));
        let access = Access {
            url: r.url.clone(),
            store: StoreOptions {
                endpoint: r.s3_endpoint.clone(),
                region: r.s3_region.clone(),
                allow_http: r.s3_allow_http,
                credentials: None,
            },
            key_file: r.key_file.clone(),
            password_file: r.password_file.clone(),
            password: None,
            credentials: std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
            cache_dir: Some(cache_dir.clone()),
            expect_unencrypted: r.expect_unencrypted,
        };
        // A workload job that was killed (SIGKILL, OOM, reboot) may have left containers down.
        if let Err(e) = crate::workload::engine::resume_recorded(&cache_dir).await {
            tracing::error!("{e}");
        }
        let repo = access
            .open(|| {
                Err(Error::Config(
                    "the repository is encrypted: set repository.key_file or password_file, \
                     or pass the systemd credential tresor-key-file / tresor-password"
                        .into(),
                ))
            })
            .await?;
        Ok(Context {
            config,
            access,
            repo,
            cache_dir,
            metrics,
        })
    }
}

/// Checks a config file, for `--check-config`.
pub fn check_config(path: &Path) -> Result<AgentConfig> {
    AgentConfig::load(path)
}

/// Runs every job once (workload members as part of their workload) and returns how many
/// failed. SIGTERM stops it like the service.
pub async fn run_once(path: &Path) -> Result<usize> {
    let ctx = Arc::new(Context::new(AgentConfig::load(path)?, Arc::default()).await?);
    let members: Vec<String> = ctx
        .config
        .jobs
        .iter()
        .filter_map(|j| match &j.kind {
            JobKind::Workload(w) => Some(w.jobs.clone()),
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
                return Err(Error::Stopped { signal: "SIGTERM" });
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
    // A workload job that did not finish may have left its containers stopped or paused.
    crate::workload::engine::resume_all().await;
}

/// Runs the agent as a service until SIGTERM.
pub async fn run_service(path: &Path) -> Result<()> {
    let metrics: Arc<Metrics> = Arc::default();
    let mut ctx = Arc::new(Context::new(AgentConfig::load(path)?, Arc::clone(&metrics)).await?);
    if let Some(addr) = ctx.config.metrics.listen {
        metrics::serve(addr, Arc::clone(&metrics)).await?;
    }
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
                    Ok(config) => match Context::new(config, Arc::clone(&metrics)).await {
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
            .and_then(|d| crate::units::duration(d).ok())
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
        .and_then(|d| crate::units::duration(d).ok())
        .unwrap_or(Duration::from_secs(30));
    let started = Instant::now();
    let mut attempt = 0;
    let result = loop {
        attempt += 1;
        tracing::info!(job = name, attempt, "job starting");
        match run_job(ctx, rt, &job, &job.tags) {
            Ok(outcome) => break Ok(outcome),
            // Only what may go away by itself is tried again: a 503, a reset, a timeout; never
            // a bad regex, a missing manifest, a refused delete or a corrupt chunk.
            Err(e) if attempt <= job.retries && e.is_retryable() => {
                tracing::warn!(job = name, "job failed: {e}; retrying in {delay:?}");
                std::thread::sleep(delay);
                delay *= 2;
            }
            Err(e) => break Err(e),
        }
    };
    let mut jobs = ctx.metrics.jobs.lock().expect("metrics lock");
    let m = jobs.entry(name.to_string()).or_default();
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
            *m.failures_by_kind.entry(e.kind().name()).or_default() += 1;
            false
        }
    };
    if let Some(path) = &ctx.config.metrics.textfile {
        if let Err(e) = write_atomically(path, SHARED, metrics::render(&jobs).as_bytes()) {
            tracing::warn!("cannot write metrics to {}: {e}", path.display());
        }
    }
    ok
}

/// The registry client for `source`, with this agent's settings for its host.
fn registry_for(ctx: &Context, source: &crate::oci::ImageSource) -> Result<Registry> {
    registry_at(ctx, source.registry_host().unwrap_or_default())
}

/// The registry client for `host`, with this agent's settings for it.
fn registry_at(ctx: &Context, host: &str) -> Result<Registry> {
    let host = host.to_string();
    let settings = ctx
        .config
        .registries
        .get(&host)
        .cloned()
        .unwrap_or_default();
    Registry::new(&RegistryOptions {
        insecure: if settings.insecure {
            vec![host]
        } else {
            Vec::new()
        },
        creds: None,
        host_creds: Vec::new(),
        creds_file: settings.creds_file,
        auth_file: settings.auth_file,
        ca_file: settings.ca_file,
        attempts: 5,
        locations: Some(ctx.cache_dir.join(crate::oci::locations::FILE_NAME)),
    })
}

/// Runs one job (a workload: its members) once, with `tags` on the snapshots it makes.
fn run_job(ctx: &Context, rt: &Handle, job: &JobConfig, tags: &[String]) -> Result<Outcome> {
    let run = Run {
        ctx,
        rt,
        job,
        tags,
        host: gethostname::gethostname().to_string_lossy().into_owned(),
    };
    match &job.kind {
        JobKind::Volume {
            path,
            block,
            strict,
            pre,
            post,
            hook_timeout,
        } => {
            let hooks = [pre.as_deref(), post.as_deref()];
            run.volume(path, *block, *strict, hooks, hook_timeout)
        }
        JobKind::Image {
            images,
            tag_policy,
            platforms,
        } => run.images(images, tag_policy, platforms),
        JobKind::Workload(w) if w.project.compose.is_empty() => run.workload(&w.jobs),
        JobKind::Workload(w) => run.compose_workload(w),
        JobKind::Forget { .. } => run.forget(),
        JobKind::Gc {
            grace,
            declare_window,
        } => run.gc(grace, declare_window),
        JobKind::Drill(options) => run.drill(options),
        JobKind::Copy(options) => run.copy(options),
        JobKind::Verify {
            read_data,
            read_data_subset,
            metrics_file,
        } => run.verify(
            *read_data,
            read_data_subset.as_deref(),
            metrics_file.as_deref(),
        ),
    }
}

/// One run of one job: a function per job kind.
struct Run<'a> {
    ctx: &'a Context,
    rt: &'a Handle,
    job: &'a JobConfig,
    tags: &'a [String],
    /// This agent's host name, recorded in the snapshots.
    host: String,
}

impl Run<'_> {
    fn command(&self) -> String {
        format!("agent job {}", self.job.name)
    }

    /// A volume, between its pre and post hooks; the post hook runs whatever happened, so a
    /// snapshot made by the pre hook is always removed.
    fn volume(
        &self,
        path: &Path,
        block: bool,
        strict: bool,
        [pre, post]: [Option<&str>; 2],
        hook_timeout: &Option<String>,
    ) -> Result<Outcome> {
        let job = self.job;
        let timeout = duration(job, "hook_timeout", hook_timeout, hook::DEFAULT_TIMEOUT)?;
        let hook = |which, cmd: &str| hook::run(&job.name, which, cmd, timeout);
        let pre_result = pre.map(|cmd| hook("pre", cmd)).unwrap_or(Ok(()));
        let result = pre_result
            .map_err(|e| e.context(format!("job {}: pre hook failed; job skipped", job.name)))
            .and_then(|()| {
                let options = crate::volume::BackupOptions {
                    name: job.name.clone(),
                    path: path.to_path_buf(),
                    host: self.host.clone(),
                    tags: self.tags.to_vec(),
                    block,
                    strict,
                    use_parent: true,
                };
                let cache = Some(self.ctx.cache_dir.as_path());
                let hidden = Progress::hidden();
                let repo = &self.ctx.repo;
                commands::backup::volume(repo, self.rt, cache, &options, &self.command(), &hidden)
            });
        let post_result = post.map(|cmd| hook("post", cmd));
        let listed = result?;
        if let Some(Err(e)) = post_result {
            return Err(e.context(format!("job {}: post hook failed", job.name)));
        }
        let mut outcome = Outcome::default();
        outcome.add(&listed);
        Ok(outcome)
    }

    /// A compose project as one workload snapshot (see [`commands::workload::backup`]); the
    /// hooks run while its containers are stopped or paused.
    fn compose_workload(&self, w: &crate::agent::config::WorkloadJob) -> Result<Outcome> {
        let job = self.job;
        let (pre, post) = (w.pre.as_deref(), w.post.as_deref());
        let timeout = duration(job, "hook_timeout", &w.hook_timeout, hook::DEFAULT_TIMEOUT)?;
        let pre_hook = pre.map(|cmd| move || hook::run(&job.name, "pre", cmd, timeout));
        let post_hook = post.map(|cmd| move || hook::run(&job.name, "post", cmd, timeout));
        let what = commands::workload::WorkloadBackup {
            name: job.name.clone(),
            options: w.project.clone(),
            images: Vec::new(),
            volumes: Vec::new(),
            host: self.host.clone(),
            tags: self.tags.to_vec(),
            pre: pre_hook.as_ref().map(|h| h as commands::workload::Hook<'_>),
            post: post_hook
                .as_ref()
                .map(|h| h as commands::workload::Hook<'_>),
        };
        let listed = commands::workload::backup(
            &self.ctx.repo,
            self.rt,
            Some(&self.ctx.cache_dir),
            &what,
            |source| registry_for(self.ctx, source),
        )
        .map_err(|e| e.context(format!("job {}", job.name)))?;
        let mut outcome = Outcome::default();
        outcome.add(&listed);
        Ok(outcome)
    }

    /// Images in one session. One image that failed alone keeps its own error (and kind);
    /// several, or some among successes, make a partial failure.
    fn images(
        &self,
        images: &[String],
        tag_policy: &crate::oci::TagPolicy,
        platforms: &[String],
    ) -> Result<Outcome> {
        let job = self.job;
        let what = commands::backup::ImageBackup {
            images,
            tag_policy,
            platforms,
            host: &self.host,
            tags: self.tags,
            name: None,
        };
        let results = commands::backup::images(
            &self.ctx.repo,
            self.rt,
            Some(&self.ctx.cache_dir),
            &what,
            &self.command(),
            |source| registry_for(self.ctx, source),
            |_| Progress::hidden(),
        )?;
        let mut outcome = Outcome::default();
        let mut failures = Vec::new();
        for (reference, result) in results.into_iter().flat_map(|(_, r)| r) {
            match result {
                Ok(l) => outcome.add(&l),
                Err(e) => failures.push((reference, e)),
            }
        }
        if outcome.snapshots.is_empty() && failures.len() == 1 {
            let (reference, e) = failures.pop().expect("one");
            return Err(e.context(format!("job {}: image {reference}", job.name)));
        }
        if !failures.is_empty() {
            return Err(Error::Partial {
                what: format!("job {}", job.name),
                total: outcome.snapshots.len() + failures.len(),
                transient: failures.iter().all(|(_, e)| e.is_retryable()),
                failures: failures.iter().map(|(r, e)| format!("{r}: {e}")).collect(),
            });
        }
        Ok(outcome)
    }

    /// The member jobs, each with the workload's tag.
    fn workload(&self, jobs: &[String]) -> Result<Outcome> {
        let mut member_tags = self.tags.to_vec();
        member_tags.push(format!("workload:{}", self.job.name));
        let mut outcome = Outcome::default();
        for member in jobs {
            let m = self.ctx.config.job(member).expect("checked at load");
            let mut all = m.tags.clone();
            all.extend(member_tags.iter().cloned());
            let o = run_job(self.ctx, self.rt, m, &all)
                .map_err(|e| e.context(format!("workload {}", self.job.name)))?;
            outcome.snapshots.extend(o.snapshots);
            outcome.bytes_read += o.bytes_read;
            outcome.bytes_new += o.bytes_new;
        }
        Ok(outcome)
    }

    /// Retention of this host's snapshots.
    fn forget(&self) -> Result<Outcome> {
        let job = self.job;
        let policy = job
            .kind
            .policy()
            .map_err(|(field, e)| Error::Config(format!("job {}: {field}: {e}", job.name)))?;
        let filter = crate::snapshot::Filter {
            host: Some(self.host.clone()),
            ..Default::default()
        };
        let forget = crate::retention::forget(&self.ctx.repo, &policy, &filter, false);
        let (_, removed) = self.rt.block_on(forget)?;
        tracing::info!(job = %job.name, "forgot {removed} snapshots of host {}", self.host);
        Ok(Outcome::default())
    }

    fn gc(&self, grace: &Option<String>, declare_window: &Option<String>) -> Result<Outcome> {
        let job = self.job;
        let options = crate::gc::GcOptions {
            grace: duration(job, "grace", grace, Duration::from_secs(3600))?,
            dry_run: false,
            declare_window: duration(
                job,
                "declare_window",
                declare_window,
                crate::gc::DECLARE_WINDOW,
            )?,
        };
        let scratch = Some(self.ctx.cache_dir.as_path());
        let report = crate::gc::run(&self.ctx.repo, self.rt, scratch, &options)?;
        let freed: u64 = report.swept.iter().map(|s| s.bytes_freed).sum();
        tracing::info!(
            job = %job.name,
            "gc: {} plans swept, {freed} bytes freed, {} plans waiting",
            report.swept.len(),
            report.waiting.len()
        );
        Ok(Outcome::default())
    }

    /// A copy into a second repository; a snapshot that failed to copy fails the job.
    fn copy(&self, options: &commands::copy::CopyOptions) -> Result<Outcome> {
        let job = self.job;
        let target = options.target(&self.ctx.access);
        let target = self.rt.block_on(target.open(|| {
            Err(Error::Config(format!(
                "job {}: the target is encrypted: set to_key_file or to_password_file",
                job.name
            )))
        }))?;
        let cache = Some(self.ctx.cache_dir.as_path());
        let hidden = Progress::hidden();
        let report =
            commands::copy::copy(&self.ctx.repo, &target, self.rt, cache, options, &hidden)?;
        tracing::info!(
            job = %job.name,
            "copy: {} snapshots copied ({} chunks, {} bytes), {} there already",
            report.copied.len(),
            report.chunks_copied,
            report.bytes_copied,
            report.present
        );
        if !report.failed.is_empty() {
            return Err(Error::Partial {
                what: format!("job {}", job.name),
                total: report.copied.len() + report.failed.len(),
                transient: false,
                failures: report
                    .failed
                    .iter()
                    .map(|(id, why)| format!("{id}: {why}"))
                    .collect(),
            });
        }
        Ok(Outcome::default())
    }

    /// A drill; a twin that did not come up or failed a probe fails the job.
    fn drill(&self, options: &commands::drill::DrillOptions) -> Result<Outcome> {
        let host = options.registry.split('/').next().unwrap_or_default();
        let registry = registry_at(self.ctx, host)?;
        let cache = Some(self.ctx.cache_dir.as_path());
        let report = commands::drill::drill(&self.ctx.repo, self.rt, cache, options, &registry)?;
        if !report.ok {
            return Err(Error::DrillFailed {
                workload: options.workload.clone(),
                reason: report.failure(),
            });
        }
        Ok(Outcome::default())
    }

    fn verify(
        &self,
        read_data: bool,
        read_data_subset: Option<&str>,
        metrics_file: Option<&Path>,
    ) -> Result<Outcome> {
        let job = self.job;
        let read = match (read_data_subset, read_data) {
            (Some(s), _) => Some(Some(crate::units::share(s).map_err(|e| {
                Error::Config(format!("job {}: read_data_subset: {e}", job.name))
            })?)),
            (None, true) => Some(None),
            (None, false) => None,
        };
        let options = crate::verify::VerifyOptions {
            read_data: read,
            ..Default::default()
        };
        let cache = Some(self.ctx.cache_dir.as_path());
        let hidden = Progress::hidden();
        let report = commands::verify::verify(&self.ctx.repo, self.rt, cache, &options, &hidden)?;
        if let Some(path) = metrics_file {
            write_atomically(path, SHARED, crate::verify::metrics(&report).as_bytes())?;
        }
        if !report.ok {
            return Err(Error::VerifyFailed {
                problems: report.problems.len(),
                broken: report
                    .snapshots
                    .iter()
                    .filter(|s| !s.ok)
                    .map(|s| s.id.clone())
                    .collect(),
            });
        }
        Ok(Outcome {
            bytes_read: report.stats.bytes_read,
            ..Outcome::default()
        })
    }
}

/// A job's duration setting, or `default` when unset.
fn duration(
    job: &JobConfig,
    field: &str,
    v: &Option<String>,
    default: Duration,
) -> Result<Duration> {
    match v {
        Some(v) => crate::units::duration(v)
            .map_err(|e| Error::Config(format!("job {}: {field}: {e}", job.name))),
        None => Ok(default),
    }
}
