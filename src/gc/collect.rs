//! `tresor gc`: mark what no snapshot references, sweep what earlier marks condemned.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;
use tokio::runtime::Handle;

use super::{
    done_key, load_sessions, plan_key, rescued, sweeping_key, GcState, Lease, Plan, SessionView,
    HEARTBEAT,
};
use crate::error::{Error, Result};
use crate::id::ChunkId;
use crate::refset::RefSorter;
use crate::repository::{time_name, Repository, BLOBS_PREFIX, GC_PREFIX, SESSIONS_PREFIX};
use crate::snapshot::{Listed, RootFormat, Snapshot};

/// Keys deleted per request (S3 `DeleteObjects` takes up to 1000); the sweep checks its lease
/// between batches.
const DELETE_BATCH: usize = 1000;

/// Options of [`run`].
#[derive(Clone, Debug)]
pub struct GcOptions {
    /// Objects younger than this are not condemned, and a plan is swept no sooner than this
    /// after it was written.
    pub grace: Duration,
    /// Report what would be condemned and deleted; write and delete nothing.
    pub dry_run: bool,
    /// How long a sweep waits for writers' declarations (see [`super::DECLARE_WINDOW`]).
    pub declare_window: Duration,
}

/// What a plan condemned.
#[derive(Debug, Serialize)]
pub struct PlanSummary {
    pub id: String,
    pub chunks: u64,
    pub bytes: u64,
    pub blob_indexes: u64,
}

/// What a sweep deleted (or, in a dry run, would delete).
#[derive(Debug, Default, Serialize)]
pub struct SweepSummary {
    pub plan: String,
    pub chunks_deleted: u64,
    pub bytes_freed: u64,
    pub blob_indexes_deleted: u64,
    /// Condemned chunks a running backup declared it stores again.
    pub kept_rescued: u64,
    /// Condemned chunks that snapshots published since the mark use.
    pub kept_referenced: u64,
}

/// A plan that could not be swept yet, and why.
#[derive(Debug, Serialize)]
pub struct Waiting {
    pub plan: String,
    pub reason: String,
    /// Live sessions that registered before the plan was written.
    pub sessions: Vec<String>,
}

/// The outcome of a gc run.
#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub snapshots: u64,
    pub chunks_stored: u64,
    pub bytes_stored: u64,
    pub chunks_referenced: u64,
    /// The plan this run wrote (or would write).
    pub condemned: Option<PlanSummary>,
    pub swept: Vec<SweepSummary>,
    pub waiting: Vec<Waiting>,
    /// Ended or dead session objects removed.
    pub sessions_removed: u64,
}

/// Runs garbage collection once: marks what no snapshot references into a new plan, then
/// sweeps every plan that is at least `grace` old and seen by every live backup session. Safe
/// while other hosts back up; see the [module docs](super). Blocking.
///
/// # Errors
/// [`Error::DeleteRefused`] up front when the credential may not delete; an unreadable
/// snapshot record or index stops the run before anything is condemned or deleted (gc must
/// not guess what a snapshot uses); store errors.
pub fn run(
    repo: &Arc<Repository>,
    rt: &Handle,
    scratch: Option<&Path>,
    options: &GcOptions,
) -> Result<GcReport> {
    let mut report = GcReport {
        dry_run: options.dry_run,
        ..GcReport::default()
    };
    let now = if options.dry_run {
        Utc::now()
    } else {
        rt.block_on(store_clock(repo))?
    };
    let mut plans = live_plans(repo, rt)?;

    tracing::info!("gc: reading every snapshot's index");
    let snaps = load_snapshots(repo, rt, None)?;
    report.snapshots = snaps.len() as u64;
    let referenced = referenced(repo, rt, scratch, &snaps)?;

    tracing::info!("gc: listing chunks and blob indexes");
    let cutoff = now - chrono::Duration::from_std(options.grace).unwrap_or(chrono::Duration::MAX);
    let mut plan = Plan {
        id: time_name(Utc::now()),
        created: Utc::now(),
        declare_window_ms: options.declare_window.as_millis() as u64,
        snapshots: snaps.iter().map(|s| s.id.clone()).collect(),
        chunks: Vec::new(),
        chunk_sizes: Vec::new(),
        blob_indexes: Vec::new(),
    };
    condemn(repo, rt, referenced, &plans, cutoff, &mut plan, &mut report)?;
    if !plan.chunks.is_empty() || !plan.blob_indexes.is_empty() {
        report.condemned = Some(PlanSummary {
            id: plan.id.clone(),
            chunks: plan.chunk_sizes.len() as u64,
            bytes: plan.chunk_bytes(),
            blob_indexes: plan.blob_indexes.len() as u64,
        });
        if !options.dry_run {
            rt.block_on(plan.save(repo))?;
            let written = rt
                .block_on(repo.store().modified(&plan_key(&plan.id)))?
                .unwrap_or(now);
            tracing::info!(
                "gc: plan {} condemns {} chunks ({} bytes) and {} blob indexes",
                plan.id,
                plan.chunk_sizes.len(),
                plan.chunk_bytes(),
                plan.blob_indexes.len()
            );
            plans.push((plan, written));
        }
    }

    for (plan, written) in &plans {
        let age = (now - *written).to_std().unwrap_or_default();
        if age < options.grace {
            report.waiting.push(Waiting {
                plan: plan.id.clone(),
                reason: format!(
                    "younger than the grace period ({} s left)",
                    (options.grace - age).as_secs()
                ),
                sessions: Vec::new(),
            });
            continue;
        }
        sweep(repo, rt, scratch, plan, options, &mut report)?;
    }
    if !options.dry_run {
        report.sessions_removed = rt.block_on(remove_old_sessions(repo, now))?;
    }
    Ok(report)
}

/// The plans saved by earlier runs and not yet swept, each with when it was written.
fn live_plans(repo: &Repository, rt: &Handle) -> Result<Vec<(Plan, DateTime<Utc>)>> {
    let state = rt.block_on(GcState::load(repo))?;
    let mut plans = Vec::new();
    for (id, written) in &state.live {
        match rt.block_on(Plan::load(repo, id))? {
            Some(plan) => plans.push((plan, *written)),
            None => tracing::warn!("gc plan {id} vanished while listing; skipping it"),
        }
    }
    Ok(plans)
}

/// Fills `plan` with the chunks and blob indexes written before `cutoff` that no snapshot
/// references and no plan of `earlier` condemns already, and counts what is stored in
/// `report`. One id prefix at a time, in id order, beside the referenced set in the same
/// order: memory holds the plan, neither the listing nor the referenced set.
fn condemn(
    repo: &Repository,
    rt: &Handle,
    referenced: Referenced,
    earlier: &[(Plan, DateTime<Utc>)],
    cutoff: DateTime<Utc>,
    plan: &mut Plan,
    report: &mut GcReport,
) -> Result<()> {
    let mut referenced_chunks = referenced.chunks.finish()?;
    let condemned_before: HashSet<ChunkId> =
        earlier.iter().flat_map(|(p, _)| p.chunk_ids()).collect();
    let indexes_before: HashSet<&str> = earlier
        .iter()
        .flat_map(|(p, _)| p.blob_indexes.iter().map(String::as_str))
        .collect();
    rt.block_on(async {
        let mut listings = std::pin::pin!(repo.chunk_listings());
        while let Some(listing) = listings.next().await {
            for chunk in listing? {
                report.chunks_stored += 1;
                report.bytes_stored += chunk.size;
                let used = referenced_chunks.advance_to(&chunk.id, drop)?.is_some();
                if chunk.modified <= cutoff && !used && !condemned_before.contains(&chunk.id) {
                    plan.chunks.extend_from_slice(&chunk.id.0);
                    plan.chunk_sizes.push(chunk.size as u32);
                }
            }
        }
        Ok::<(), Error>(())
    })?;
    report.chunks_referenced = referenced_chunks.rest(drop)?;
    for obj in rt.block_on(repo.store().list_modified(BLOBS_PREFIX))? {
        if obj.modified <= cutoff
            && !referenced.indexes.contains(&obj.key)
            && !indexes_before.contains(obj.key.as_str())
        {
            plan.blob_indexes.push(obj.key);
        }
    }
    Ok(())
}

/// The store's clock, read from a probe object that is then deleted: this also proves, before
/// anything is condemned, that the credential may delete. The time comes from a listing, like
/// the chunk times it is compared with (a HEAD's `Last-Modified` has whole seconds only).
async fn store_clock(repo: &Repository) -> Result<DateTime<Utc>> {
    let dir = format!("{GC_PREFIX}/probe");
    let key = format!("{dir}/{}", hex::encode(rand::random::<[u8; 8]>()));
    repo.store().put(&key, Bytes::new()).await?;
    let listed = repo.store().list_modified(&dir).await?;
    repo.store().delete(&key).await?;
    Ok(listed
        .into_iter()
        .find(|o| o.key == key)
        .map_or_else(Utc::now, |o| o.modified))
}

/// Snapshot records, all of them or those not in `except`. Any unreadable one is an error.
fn load_snapshots(
    repo: &Arc<Repository>,
    rt: &Handle,
    except: Option<&HashSet<&str>>,
) -> Result<Vec<Listed>> {
    let ids = rt.block_on(repo.list_snapshot_ids())?;
    let ids: Vec<String> = ids
        .into_iter()
        .filter(|id| except.is_none_or(|e| !e.contains(id.as_str())))
        .collect();
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        match rt.block_on(Snapshot::load(repo, &id)) {
            Ok(snapshot) => out.push(Listed { id, snapshot }),
            // Forgotten while we listed: it no longer protects anything.
            Err(Error::Missing { .. }) => {}
            Err(e) => return Err(unreadable(&id, e)),
        }
    }
    Ok(out)
}

fn unreadable(id: &str, e: Error) -> Error {
    e.context(format!(
        "gc stops: snapshot {id} cannot be read, so what it uses is unknown; nothing was deleted (run `tresor verify`, then repair or forget it)"
    ))
}

/// Chunks and blob index keys that snapshots use.
struct Referenced {
    chunks: RefSorter,
    indexes: HashSet<String>,
}

impl Referenced {
    fn new(scratch: Option<&Path>) -> Referenced {
        Referenced {
            chunks: RefSorter::new(scratch),
            indexes: HashSet::new(),
        }
    }
}

/// Everything `snaps` reference: root and data chunks, and the blob indexes of image blobs.
/// A few snapshots are read at once, on plain threads: reading blocks on the runtime and on
/// rayon, so it must not run on either.
fn referenced(
    repo: &Arc<Repository>,
    rt: &Handle,
    scratch: Option<&Path>,
    snaps: &[Listed],
) -> Result<Referenced> {
    const READERS: usize = 4;
    let next = std::sync::atomic::AtomicUsize::new(0);
    let parts: Vec<Result<Referenced>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..READERS.min(snaps.len()))
            .map(|_| {
                scope.spawn(|| {
                    let mut r = Referenced::new(scratch);
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(snap) = snaps.get(i) else {
                            return Ok(r);
                        };
                        add_refs(repo, rt, snap, &mut r).map_err(|e| unreadable(&snap.id, e))?;
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("snapshot reader panicked"))
            .collect()
    });
    let mut all = Referenced::new(scratch);
    for part in parts {
        let part = part?;
        all.chunks.append(part.chunks);
        all.indexes.extend(part.indexes);
    }
    Ok(all)
}

/// Adds what `snap` references to `r`.
fn add_refs(repo: &Arc<Repository>, rt: &Handle, snap: &Listed, r: &mut Referenced) -> Result<()> {
    for c in snap.snapshot.index_refs().filter(|c| !c.is_zero()) {
        r.chunks.push(*c);
    }
    match snap.snapshot.root_format {
        RootFormat::Image => {
            for blob in &crate::oci::load_record(repo, rt, snap)?.blobs {
                r.indexes.insert(repo.blob_index_key(&blob.digest));
                for c in blob.refs.iter().filter(|c| !c.is_zero()) {
                    r.chunks.push(*c);
                }
            }
            Ok(())
        }
        // Its members are snapshots of their own; the record is all its root holds.
        RootFormat::Workload => Ok(()),
        _ => crate::volume::walk_refs(repo, rt, snap, |_, c| {
            if !c.is_zero() {
                r.chunks.push(*c);
            }
            Ok(())
        }),
    }
}

/// Live sessions that have not seen plan `id`: they may rely on its chunks unknowingly.
fn blockers(sessions: &[SessionView], id: &str) -> Vec<String> {
    sessions
        .iter()
        .filter(|s| s.live && !s.record.plans_seen.iter().any(|p| p == id))
        .map(SessionView::describe)
        .collect()
}

/// The sweep marker of a plan, kept fresh by a background task while the sweep runs.
struct Marker<'a> {
    repo: &'a Repository,
    rt: &'a Handle,
    key: String,
    last_write: Arc<Lease>,
    refresh: tokio::task::AbortHandle,
}

impl<'a> Marker<'a> {
    fn start(repo: &'a Arc<Repository>, rt: &'a Handle, plan: &str) -> Result<Marker<'a>> {
        let key = sweeping_key(plan);
        let began = Instant::now();
        rt.block_on(repo.store().put(&key, Bytes::new()))?;
        let last_write = Arc::new(Lease::new(began));
        let (r, k, l) = (Arc::clone(repo), key.clone(), Arc::clone(&last_write));
        let refresh = rt
            .spawn(async move {
                loop {
                    tokio::time::sleep(HEARTBEAT).await;
                    let began = Instant::now();
                    match r.store().put(&k, Bytes::new()).await {
                        Ok(()) => l.renewed(began),
                        Err(e) => tracing::warn!("could not refresh sweep marker {k}: {e}"),
                    }
                }
            })
            .abort_handle();
        Ok(Marker {
            repo,
            rt,
            key,
            last_write,
            refresh,
        })
    }

    /// Errors once the marker could not be refreshed for [`LEASE`]: writers may then take
    /// the sweep for dead and upload chunks it is about to delete.
    fn check_lease(&self) -> Result<()> {
        self.last_write.check(&format!("sweep {}", self.key))
    }

    fn remove(self) -> Result<()> {
        self.refresh.abort();
        self.rt.block_on(self.repo.store().delete(&self.key))
    }
}

impl Drop for Marker<'_> {
    fn drop(&mut self) {
        self.refresh.abort();
    }
}

fn sweep(
    repo: &Arc<Repository>,
    rt: &Handle,
    scratch: Option<&Path>,
    plan: &Plan,
    options: &GcOptions,
    report: &mut GcReport,
) -> Result<()> {
    let store_now = |rt: &Handle| -> Result<DateTime<Utc>> {
        if options.dry_run {
            Ok(Utc::now())
        } else {
            rt.block_on(store_clock(repo))
        }
    };
    let waiting = |sessions: Vec<String>| Waiting {
        plan: plan.id.clone(),
        reason: "backup sessions that started before the plan are still running".into(),
        sessions,
    };
    let sessions = rt.block_on(load_sessions(repo, store_now(rt)?))?;
    let blocked = blockers(&sessions, &plan.id);
    if !blocked.is_empty() {
        report.waiting.push(waiting(blocked));
        return Ok(());
    }
    let marker = if options.dry_run {
        None
    } else {
        tracing::info!(
            "gc: sweeping plan {}; waiting {} s for running backups to declare chunks they reuse",
            plan.id,
            plan.declare_window().as_secs()
        );
        let marker = Marker::start(repo, rt, &plan.id)?;
        std::thread::sleep(plan.declare_window());
        Some(marker)
    };
    let sessions = rt.block_on(load_sessions(repo, store_now(rt)?))?;
    let blocked = blockers(&sessions, &plan.id);
    if !blocked.is_empty() {
        if let Some(m) = marker {
            m.remove()?;
        }
        report.waiting.push(waiting(blocked));
        return Ok(());
    }
    let known: HashSet<&str> = plan.snapshots.iter().map(String::as_str).collect();
    let deletions = load_snapshots(repo, rt, Some(&known))
        .and_then(|newer| referenced(repo, rt, scratch, &newer))
        .and_then(|newer| deletions(plan, &rescued(&sessions), newer));
    let (indexes, chunks, summary) = match deletions {
        Ok(d) => d,
        Err(e) => {
            // Nothing is deleted yet: take the marker down so backups need not wait for it.
            if let Some(m) = marker {
                m.remove()?;
            }
            return Err(e);
        }
    };
    let Some(marker) = marker else {
        report.swept.push(summary);
        return Ok(());
    };
    // Indexes first: an index must never name chunks that are gone.
    marker.check_lease()?;
    rt.block_on(repo.store().delete_many(indexes))?;
    let total = chunks.len();
    for (n, batch) in chunks.chunks(DELETE_BATCH).enumerate() {
        marker.check_lease()?;
        rt.block_on(repo.store().delete_many(batch.to_vec()))?;
        tracing::info!(
            "gc: plan {}: deleted {} of {total} chunks",
            plan.id,
            (n * DELETE_BATCH + batch.len()).min(total)
        );
    }
    rt.block_on(repo.store().put(&done_key(&plan.id), Bytes::new()))?;
    marker.remove()?;
    rt.block_on(repo.store().delete(&plan_key(&plan.id)))?;
    report.swept.push(summary);
    Ok(())
}

/// What a sweep of `plan` deletes: the blob index keys and chunk keys it condemned, less those
/// a running backup rescued and those snapshots published since the mark (`newer`) use.
fn deletions(
    plan: &Plan,
    rescued: &HashSet<ChunkId>,
    newer: Referenced,
) -> Result<(Vec<String>, Vec<String>, SweepSummary)> {
    let mut summary = SweepSummary {
        plan: plan.id.clone(),
        ..SweepSummary::default()
    };
    let indexes: Vec<String> = plan
        .blob_indexes
        .iter()
        .filter(|k| !newer.indexes.contains(*k))
        .cloned()
        .collect();
    // In id order, to walk beside the newer snapshots' referenced set.
    let mut condemned: Vec<(ChunkId, u32)> = plan
        .chunk_ids()
        .zip(plan.chunk_sizes.iter().copied())
        .collect();
    condemned.sort_unstable_by_key(|c| c.0);
    condemned.dedup_by_key(|c| c.0);
    let mut used = newer.chunks.finish()?;
    let mut chunks = Vec::new();
    for (id, size) in condemned {
        let referenced = used.advance_to(&id, drop)?.is_some();
        if rescued.contains(&id) {
            summary.kept_rescued += 1;
        } else if referenced {
            summary.kept_referenced += 1;
        } else {
            chunks.push(Repository::chunk_key(&id));
            summary.bytes_freed += u64::from(size);
        }
    }
    summary.blob_indexes_deleted = indexes.len() as u64;
    summary.chunks_deleted = chunks.len() as u64;
    Ok((indexes, chunks, summary))
}

/// Deletes session objects that ended, or that have been silent for [`super::STALE_AFTER`].
async fn remove_old_sessions(repo: &Repository, now: DateTime<Utc>) -> Result<u64> {
    let sessions = load_sessions(repo, now).await?;
    let mut removed = 0;
    for s in sessions.iter().filter(|s| !s.live) {
        repo.store()
            .delete(&format!("{SESSIONS_PREFIX}/{}", s.id))
            .await?;
        removed += 1;
    }
    Ok(removed)
}
