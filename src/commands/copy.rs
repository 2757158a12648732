//! `tresor copy`: snapshots into a second repository (a second sovereign site), as PBS sync
//! jobs and `restic copy` do.
//!
//! The target must name chunks as the source does: both unencrypted, or the target made with
//! `init --same-chunker-as SOURCE`, which shares the source's id key (and chunker) but has its
//! own encryption key. Then a chunk keeps its id and a snapshot record its id, and copying is:
//! for each snapshot the target lacks (a workload's members before the workload), every chunk
//! it references that the target lacks is fetched, checked against its id, sealed under the
//! target's key, checked to open again, and stored; then, with everything it references
//! durable, the record, and the chunk cache learns the chunks. A snapshot copied already is
//! skipped whole (a second copy moves nothing), so a copy interrupted and run again goes on
//! where it stopped; only the chunks of the snapshot it was copying are stored again.
//!
//! The target side runs in a backup session ([`Session`]), so a `gc` of the target never
//! deletes a chunk the copy relies on (ARCHITECTURE.md, "Garbage collection while backups
//! run"); chunks the target's gc has condemned are rescued as a backup rescues them. A `gc` of
//! the source may delete the chunks of a snapshot forgotten there meanwhile: that snapshot then
//! fails to copy, by name, and nothing is published for it.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;

use super::open::Access;
use crate::error::{Error, Result};
use crate::gc::{Claim, Session};
use crate::id::ChunkRef;
use crate::progress::Progress;
use crate::refset::RefSorter;
use crate::repository::Repository;
use crate::snapshot::{self, Filter, Kind, Listed};

/// Chunks copied at once, and their plaintext KiB at most: many small requests hide both
/// stores' latency, the bytes bound memory (each chunk is held fetched, opened and sealed).
const COPY_CONCURRENCY: usize = 32;
const COPY_KIB: u32 = 16 << 10;

/// Which snapshots to copy, and where: the flags of `tresor copy` and an agent job of
/// `type = "copy"` alike.
#[derive(Clone, Debug, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyOptions {
    /// Snapshot ids, unique prefixes or names (their newest snapshot) [default: every snapshot
    /// the filter selects]. A workload brings its members.
    #[serde(default)]
    pub snapshots: Vec<String>,
    /// Only snapshots of this kind.
    #[arg(long, value_enum)]
    #[serde(default)]
    pub kind: Option<Kind>,
    /// Only snapshots of this name.
    #[arg(long)]
    #[serde(default)]
    pub name: Option<String>,
    /// Only snapshots taken on this host.
    #[arg(long)]
    #[serde(default)]
    pub host: Option<String>,
    /// The target repository (made with `init --same-chunker-as` the source when encrypted).
    #[arg(long, value_name = "URL")]
    pub to_repo: String,
    /// Key file of the target repository.
    #[arg(long)]
    #[serde(default)]
    pub to_key_file: Option<PathBuf>,
    /// Password file of the target repository.
    #[arg(long)]
    #[serde(default)]
    pub to_password_file: Option<PathBuf>,
    /// S3 endpoint of the target [default: the source's].
    #[arg(long)]
    #[serde(default)]
    pub to_s3_endpoint: Option<String>,
    /// Print which snapshots would be copied (after the same checks); copy nothing.
    #[arg(long)]
    #[serde(default)]
    pub dry_run: bool,
}

impl CopyOptions {
    /// How to open the target, given how the source was opened.
    pub fn target(&self, source: &Access) -> Access {
        source.other(
            &self.to_repo,
            self.to_key_file.as_deref(),
            self.to_password_file.as_deref(),
            self.to_s3_endpoint.as_deref(),
        )
    }

    fn filter(&self) -> Filter {
        Filter {
            kind: self.kind,
            name: self.name.clone(),
            host: self.host.clone(),
        }
    }
}

/// What a copy did.
#[derive(Debug, Default, Serialize)]
pub struct CopyReport {
    pub dry_run: bool,
    /// Snapshots copied (or, in a dry run, to copy), by id, in the order published.
    pub copied: Vec<String>,
    /// Snapshots the target had already.
    pub present: u64,
    /// Snapshots that could not be copied, with why.
    pub failed: BTreeMap<String, String>,
    pub chunks_copied: u64,
    /// Plaintext bytes of the chunks copied.
    pub bytes_copied: u64,
    /// Chunks the target had already.
    pub chunks_present: u64,
}

/// Copies the snapshots `options` selects from `source` to `target`. Blocking.
///
/// # Errors
/// [`Error::Config`] when the two repositories name chunks differently or the selection names
/// nothing; store errors listing either side. A snapshot that fails to copy is in the report.
pub fn copy(
    source: &Arc<Repository>,
    target: &Arc<Repository>,
    rt: &Handle,
    cache_dir: Option<&Path>,
    options: &CopyOptions,
    progress: &Progress,
) -> Result<CopyReport> {
    same_ids(source, target)?;
    let selected = selection(source, rt, options)?;
    let present: HashSet<String> = rt
        .block_on(target.list_snapshot_ids())?
        .into_iter()
        .collect();
    let mut report = CopyReport {
        dry_run: options.dry_run,
        ..CopyReport::default()
    };
    let todo: Vec<&Listed> = selected
        .snapshots
        .iter()
        .filter(|s| {
            let had = present.contains(&s.id);
            report.present += u64::from(had);
            !had
        })
        .collect();
    if options.dry_run || todo.is_empty() {
        report.copied = todo.into_iter().map(|s| s.id.clone()).collect();
        return Ok(report);
    }
    let command = format!(
        "copy {} snapshots from {}",
        todo.len(),
        source.store().url()
    );
    let session = Arc::new(rt.block_on(Session::start(Arc::clone(target), cache_dir, &command))?);
    for snap in &todo {
        let result = members_copied(&selected, snap, &report)
            .and_then(|()| copy_one(source, &session, rt, snap, &mut report, progress, cache_dir));
        match result {
            Ok(()) => report.copied.push(snap.id.clone()),
            Err(e) => {
                tracing::warn!("snapshot {}: {e}", snap.id);
                report.failed.insert(snap.id.clone(), e.to_string());
            }
        }
    }
    rt.block_on(session.finish(report.failed.is_empty()));
    Ok(report)
}

/// Refuses two repositories that name chunks differently: copying between them would need
/// every index rewritten.
fn same_ids(source: &Repository, target: &Repository) -> Result<()> {
    let probe = b"tresor copy: do both repositories name chunks alike?";
    if source.chunk_id(probe) != target.chunk_id(probe) {
        return Err(Error::Config(format!(
            "{} names chunks differently from {}: make the target with `tresor init \
             --same-chunker-as {}` (it shares the chunk id key, not the encryption key)",
            target.store().url(),
            source.store().url(),
            source.store().url()
        )));
    }
    if target.format() < source.format() {
        return Err(Error::Config(format!(
            "{} has repository format {}, older than the source's {}",
            target.store().url(),
            target.format(),
            source.format()
        )));
    }
    Ok(())
}

/// Snapshots in the order they are copied, with each workload's members.
struct Selected {
    snapshots: Vec<Listed>,
    members: BTreeMap<String, Vec<String>>,
}

/// The selected snapshots, each workload's members (ahead of it) with it. Blocking.
fn selection(source: &Arc<Repository>, rt: &Handle, options: &CopyOptions) -> Result<Selected> {
    let all = rt.block_on(snapshot::list(source, &Filter::default()))?;
    let mut chosen: Vec<Listed> = if options.snapshots.is_empty() {
        let filter = options.filter();
        all.iter()
            .filter(|s| filter.matches(&s.snapshot))
            .cloned()
            .collect()
    } else {
        let resolve = |r: &String| rt.block_on(snapshot::resolve(source, r, None));
        options
            .snapshots
            .iter()
            .map(resolve)
            .collect::<Result<_>>()?
    };
    if chosen.is_empty() {
        return Err(Error::Config("no snapshot matches the selection".into()));
    }
    // Members first: a workload in the target never names a snapshot it lacks.
    chosen.sort_by_key(|s| (s.snapshot.kind == Kind::Workload, s.snapshot.time));
    let mut ids: HashSet<String> = chosen.iter().map(|s| s.id.clone()).collect();
    let mut snapshots = Vec::new();
    let mut members = BTreeMap::new();
    for w in chosen.iter().filter(|s| s.snapshot.kind == Kind::Workload) {
        let record = crate::workload::load_record(source, rt, w)?;
        for id in record.members() {
            if ids.insert(id.to_string()) {
                let m = all
                    .iter()
                    .find(|s| s.id == id)
                    .ok_or_else(|| Error::Missing {
                        key: format!("snapshots/{id} (a member of workload {})", w.id),
                    })?;
                snapshots.push(m.clone());
            }
        }
        let names = record.members().into_iter().map(str::to_string).collect();
        members.insert(w.id.clone(), names);
    }
    snapshots.extend(chosen);
    Ok(Selected { snapshots, members })
}

/// Refuses a workload one of whose members failed to copy: the target would name a snapshot
/// it lacks.
fn members_copied(selected: &Selected, snap: &Listed, report: &CopyReport) -> Result<()> {
    let members = selected.members.get(&snap.id).into_iter().flatten();
    match members.into_iter().find(|m| report.failed.contains_key(*m)) {
        Some(m) => Err(Error::Config(format!(
            "its member snapshot {m} failed to copy"
        ))),
        None => Ok(()),
    }
}

/// Copies one snapshot: its chunks the target lacks, then (all durable) its record. Its refs
/// are sorted on disk ([`RefSorter`], runs in `scratch`) and claimed in id order as the copies
/// go, so memory does not grow with the snapshot.
fn copy_one(
    source: &Arc<Repository>,
    session: &Arc<Session>,
    rt: &Handle,
    snap: &Listed,
    report: &mut CopyReport,
    progress: &Progress,
    scratch: Option<&Path>,
) -> Result<()> {
    let mut refs = RefSorter::new(scratch);
    for r in snap.snapshot.index_refs().filter(|r| !r.is_zero()) {
        refs.push(*r);
    }
    crate::verify::walk_refs(source, rt, snap, |_, r| {
        if !r.is_zero() {
            refs.push(*r);
        }
        Ok(())
    })?;
    let mut refs = refs.finish()?;
    let (mut present, mut read_failed) = (0, None);
    let new = std::iter::from_fn(|| loop {
        let r = match refs.next_record() {
            Ok(r) => r?,
            Err(e) => {
                read_failed = Some(e);
                return None;
            }
        };
        match session.claim(r.id) {
            Claim::Known => present += 1,
            Claim::New => return Some((r, false)),
            Claim::Condemned => return Some((r, true)),
        }
    });
    let target = session.repo();
    let budget = Arc::new(tokio::sync::Semaphore::new(COPY_KIB as usize));
    let mut copies = futures::stream::iter(new)
        .map(|(r, condemned)| {
            let budget = Arc::clone(&budget);
            async move {
                let kib = r.len.div_ceil(1024).clamp(1, COPY_KIB);
                let held = budget.acquire_many_owned(kib).await.expect("never closed");
                let copied = copy_chunk(source, session, r, condemned).await;
                drop(held);
                if copied.is_err() {
                    session.unclaim(&r.id);
                }
                copied
            }
        })
        .buffer_unordered(COPY_CONCURRENCY);
    // Every chunk stored counts, even when another one failed.
    let mut failed = None;
    rt.block_on(async {
        while let Some(done) = copies.next().await {
            match done {
                Ok(n) => {
                    progress.inc(n);
                    report.chunks_copied += 1;
                    report.bytes_copied += n;
                }
                Err(e) => failed = failed.take().or(Some(e)),
            }
        }
    });
    drop(copies);
    report.chunks_present += present;
    if let Some(e) = read_failed.or(failed) {
        return Err(e);
    }
    rt.block_on(target.sync())?;
    session.check_lease()?;
    let record = rt.block_on(source.get_snapshot(&snap.id))?;
    let id = rt.block_on(target.put_snapshot(&record))?;
    if id != snap.id {
        // Cannot happen when `same_ids` held; a record under another id would be a new one.
        return Err(Error::Corrupt {
            object: format!("snapshots/{}", snap.id),
            reason: format!("its copy hashes to {id}"),
        });
    }
    // Everything claimed is durable now: a copy killed later skips these chunks.
    if let Err(e) = session.save_cache() {
        tracing::warn!("could not save the chunk cache: {e}");
    }
    Ok(())
}

/// One chunk: fetched and checked as a restore does ([`crate::pipeline::fetch`]), sealed for
/// the target, checked to open there, stored. Returns its plaintext length.
async fn copy_chunk(
    source: &Arc<Repository>,
    session: &Session,
    r: ChunkRef,
    condemned: bool,
) -> Result<u64> {
    let target = Arc::clone(session.repo());
    let data = crate::pipeline::fetch(source, &Handle::current(), r)
        .await
        .expect("fetch task panicked")?;
    let id = r.id;
    let checked = tokio::task::spawn_blocking(move || -> Result<bytes::Bytes> {
        let encoded = target.encode_chunk(&id, &data);
        target.decode_chunk(&id, &encoded)?;
        Ok(encoded)
    })
    .await
    .expect("chunk sealing panicked")?;
    if condemned {
        session.rescue(&r.id).await?;
    }
    session.repo().put_chunk(&r.id, checked).await?;
    Ok(u64::from(r.len))
}
