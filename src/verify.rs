//! Verification: prove that snapshots can be restored, and name the ones that cannot.
//!
//! A run is a series of passes, each a method of the run:
//! 1. **Structure**: every snapshot record is read and parsed, and every selected snapshot's
//!    index (catalog or block ref list) is read, which checks its chunks on the way. This gives
//!    the set of referenced data chunks.
//! 2. **Existence**: a listing of `chunks/` (one request per id prefix and page, not one per
//!    chunk) tells which referenced chunks are missing and which stored chunks nothing
//!    references.
//! 3. **Data**, with `read_data`: each selected chunk is downloaded, decompressed, decrypted and
//!    re-hashed once, however many snapshots use it, on all cores; nothing is written out.
//!    Index chunks the first pass read are not fetched again.
//! 4. **Images**, on a full read: every OCI blob is reassembled from its chunks (read in order,
//!    which checks each chunk too; several blobs at once) and checked against its sha256
//!    digest, and every stored manifest against its own: image chunks are read once, by this
//!    pass instead of the data pass.
//! 5. **Attribution**, only when something is broken: the indexes are walked again to name
//!    every snapshot and file that uses a bad chunk. Snapshots forgotten (and swept) since
//!    the structure pass leave the report first: their chunks being gone is no problem.
//! 6. **Record**: the report, and the run's record in `verify/`.
//!
//! Subsets and shards split the chunk id space deterministically: `--read-data-subset n/m`
//! reads the chunks whose first 8 id bytes are `n-1` modulo `m`, so `1/7` to `7/7` over a week
//! read every chunk exactly once; `--shard i/n` uses the next 8 bytes, so `n` hosts can share
//! one store's existence checks and reads. Chunk ids are (keyed) hashes, so both are uniform.
//!
//! Each run leaves a record in `verify/` so [`status`] can say when each snapshot was last
//! checked, and last fully read.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;

use crate::error::{Error, Result};
use crate::id::{ChunkId, ChunkRef};
use crate::pipeline;
use crate::progress::Progress;
use crate::refset::{RefSorter, Spool};
use crate::repository::Repository;
use crate::snapshot::{self, Filter, Listed};
use crate::volume;

/// Chunk reads in flight in the data pass, and their bytes at most: many small reads hide a
/// remote store's latency, the bytes bound memory when chunks are large.
const READ_CONCURRENCY: usize = 128;
const READ_KIB: u32 = 64 << 10;
/// Users of a bad chunk named in a report, per chunk.
const MAX_AFFECTED: usize = 100;

/// A deterministic share of the chunk id space: `n` of `m` (1-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub n: u32,
    pub m: u32,
}

impl Part {
    /// Parses `N/M` (1 <= N <= M) or, for subsets, `P%` (as `P`/100 in hundredths).
    ///
    /// ```
    /// use tresor::verify::Part;
    /// assert_eq!(Part::parse("3/7").unwrap(), Part { n: 3, m: 7 });
    /// assert!(Part::parse("8/7").is_err());
    /// assert!(Part::parse("5%").is_ok());
    /// ```
    ///
    /// # Errors
    /// [`Error::Config`] naming the bad value.
    pub fn parse(s: &str) -> Result<Part> {
        let bad = || {
            Error::Config(format!(
                "{s:?} is not a share: use N/M (like 3/7) or P% (like 5%)"
            ))
        };
        if let Some(p) = s.strip_suffix('%') {
            let pct: f64 = p.trim().parse().map_err(|_| bad())?;
            if !(0.0 < pct && pct <= 100.0) {
                return Err(bad());
            }
            return Ok(Part {
                n: 0,
                m: (pct * 100.0).round() as u32,
            });
        }
        let (n, m) = s.split_once('/').ok_or_else(bad)?;
        let (n, m): (u32, u32) = (
            n.trim().parse().map_err(|_| bad())?,
            m.trim().parse().map_err(|_| bad())?,
        );
        if n == 0 || m == 0 || n > m {
            return Err(bad());
        }
        Ok(Part { n, m })
    }

    /// Whether a 64-bit slice of a chunk id falls in this share. `n == 0` means a percentage
    /// (`m` in hundredths of a percent).
    fn contains(&self, x: u64) -> bool {
        if self.n == 0 {
            (x as u128 * 10_000) >> 64 < self.m as u128
        } else {
            x % self.m as u64 == (self.n - 1) as u64
        }
    }

    fn describe(&self) -> String {
        if self.n == 0 {
            format!("{}%", self.m as f64 / 100.0)
        } else {
            format!("{}/{}", self.n, self.m)
        }
    }
}

fn subset_key(id: &ChunkId) -> u64 {
    u64::from_le_bytes(id.0[..8].try_into().expect("8 bytes"))
}

/// Whether `id` is in `shard` (every id is when there is none).
fn in_shard(shard: Option<Part>, id: &ChunkId) -> bool {
    shard.is_none_or(|s| s.contains(shard_key(id)))
}

fn shard_key(id: &ChunkId) -> u64 {
    u64::from_le_bytes(id.0[8..16].try_into().expect("8 bytes"))
}

/// What to verify.
#[derive(Clone, Debug, Default)]
pub struct VerifyOptions {
    /// Read data: `None` checks existence only; `Some(None)` reads every chunk; `Some(Some(p))`
    /// reads the share `p`.
    pub read_data: Option<Option<Part>>,
    pub filter: Filter,
    /// Only these snapshots (ids, unique prefixes of 4+ hex digits, or names meaning their
    /// newest snapshot; see [`crate::snapshot::resolve`]); empty means all that match `filter`.
    pub snapshots: Vec<String>,
    pub since: Option<DateTime<Utc>>,
    pub shard: Option<Part>,
}

/// The class of a problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// A snapshot record cannot be read or parsed.
    UnreadableRecord,
    /// A snapshot's catalog or ref list cannot be read.
    UnreadableIndex,
    /// A referenced chunk is not in the store.
    MissingChunk,
    /// A referenced chunk does not decode or does not hash to its id.
    CorruptChunk,
    /// An OCI blob or manifest does not hash to its digest (checked on a full read).
    WrongDigest,
    /// A workload names a member snapshot that the repository does not have.
    MissingMember,
    /// A workload's member snapshot has a problem of its own.
    BrokenMember,
}

/// A snapshot and file that a problem affects.
#[derive(Clone, Debug, Serialize)]
pub struct Affected {
    pub snapshot: String,
    pub name: String,
    /// The file, for tree snapshots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// One problem found.
#[derive(Clone, Debug, Serialize)]
pub struct Problem {
    pub kind: ProblemKind,
    /// The store object at fault.
    pub object: String,
    pub reason: String,
    pub affects: Vec<Affected>,
    /// Uses beyond those listed in `affects`.
    pub more_affected: u64,
}

/// Result for one snapshot.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotStatus {
    pub id: String,
    pub kind: String,
    pub name: String,
    pub host: String,
    pub time: DateTime<Utc>,
    pub ok: bool,
}

/// Counters of a run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    pub snapshots_checked: u64,
    pub snapshots_ok: u64,
    pub snapshots_broken: u64,
    pub records_unreadable: u64,
    /// Referenced data and index chunks (in this shard).
    pub chunks_referenced: u64,
    pub chunks_missing: u64,
    pub chunks_read: u64,
    pub chunks_corrupt: u64,
    /// OCI blobs reassembled and checked against their sha256 digest.
    pub blobs_checked: u64,
    /// Stored (compressed, sealed) bytes read.
    pub bytes_read: u64,
    /// Stored chunks no snapshot references (only counted when every snapshot was selected).
    pub chunks_unreferenced: u64,
    pub bytes_unreferenced: u64,
}

/// The report of a run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub time: DateTime<Utc>,
    pub duration_ms: u64,
    pub repository: String,
    pub host: String,
    /// `none`, `all`, or the share read.
    pub read_data: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard: Option<String>,
    pub ok: bool,
    pub stats: Stats,
    pub snapshots: Vec<SnapshotStatus>,
    pub problems: Vec<Problem>,
}

impl Report {
    /// Whether chunks were found missing: a chunk cache listing them is then wrong, and is
    /// dropped ([`crate::cache::forget`]) so the next backup stores them again.
    pub fn chunks_missing(&self) -> bool {
        self.problems
            .iter()
            .any(|p| p.kind == ProblemKind::MissingChunk)
    }
}

/// The record kept in the store for `verify --status`.
#[derive(Debug, Serialize, Deserialize)]
struct RunRecord {
    time: DateTime<Utc>,
    host: String,
    read_data: String,
    shard: Option<String>,
    ok: Vec<String>,
    broken: Vec<String>,
}

/// Runs a verification. Blocking: call it from a thread that may block.
///
/// # Errors
/// Only when the run cannot happen (the store cannot be listed); problems in the data are in
/// the report.
pub fn verify(
    repo: &Arc<Repository>,
    rt: &Handle,
    scratch: Option<&Path>,
    options: &VerifyOptions,
    progress: &Progress,
) -> Result<Report> {
    let started = Instant::now();
    let time = Utc::now();
    let mut run = Run {
        repo,
        rt,
        options,
        progress,
        scratch,
        problems: Vec::new(),
        stats: Stats::default(),
        index_read: HashSet::new(),
        broken: HashSet::new(),
        bad: BTreeMap::new(),
        image_sizes: HashMap::new(),
    };
    let snaps = run.records()?;
    let all = snaps.clone();
    let mut selected = select(snaps, options)?;
    let workloads = run.members(&all, &mut selected);
    let referenced = run.structure(&selected);
    // On a full read, image blobs are read whole by their own pass (their sha256 needs the
    // bytes in order, and reading them checks their chunks too), so the data pass skips their
    // chunks rather than read them twice.
    let full_read = options.read_data == Some(None) && options.shard.is_none();
    let images = if full_read {
        run.image_records(&selected)
    } else {
        Vec::new()
    };
    let image_chunks: HashSet<ChunkId> = images
        .iter()
        .flat_map(|(_, record)| record.blobs.iter().flat_map(|b| &b.refs))
        .filter(|r| !r.is_zero())
        .map(|r| r.id)
        .collect();
    let to_read = run.existence(referenced, options.selects_all(), &image_chunks)?;
    if let Some(to_read) = to_read {
        run.data(to_read)?;
    }
    run.images(&images);
    drop(images);
    let forgotten = run.forgotten(&mut selected)?;
    run.attribution(&selected, forgotten);
    run.broken_members(&selected, &workloads);
    Ok(run.record(&selected, time, started))
}

impl VerifyOptions {
    /// Whether every snapshot is selected (only then are unreferenced chunks counted).
    fn selects_all(&self) -> bool {
        self.snapshots.is_empty()
            && self.since.is_none()
            && self.filter.kind.is_none()
            && self.filter.name.is_none()
            && self.filter.host.is_none()
    }

    /// How much data this run reads, as reports and records say it.
    fn read_desc(&self) -> String {
        match self.read_data {
            None => "none".to_string(),
            Some(None) => "all".to_string(),
            Some(Some(p)) => p.describe(),
        }
    }
}

/// One verification run: what the passes find, as they find it.
struct Run<'a> {
    repo: &'a Arc<Repository>,
    rt: &'a Handle,
    options: &'a VerifyOptions,
    progress: &'a Progress,
    /// Where the referenced set and the list of chunks to read are kept (see [`RefSorter`]).
    scratch: Option<&'a Path>,
    problems: Vec<Problem>,
    stats: Stats,
    /// Index chunks the structure pass fetched, decrypted and hashed already: the data pass
    /// counts them as read instead of fetching them again.
    index_read: HashSet<ChunkId>,
    /// Snapshots with a problem.
    broken: HashSet<String>,
    /// Chunks missing or unreadable, with why.
    bad: BTreeMap<ChunkId, (ProblemKind, String)>,
    /// The stored size of each image chunk, for the images pass (only on a full read).
    image_sizes: HashMap<ChunkId, u64>,
}

impl Run<'_> {
    fn in_shard(&self, id: &ChunkId) -> bool {
        in_shard(self.options.shard, id)
    }

    /// Structure, first half: every snapshot record read and parsed; an unreadable one is a
    /// problem, the others are returned.
    fn records(&mut self) -> Result<Vec<Listed>> {
        let loaded = self.rt.block_on(snapshot::load_all(self.repo))?;
        let mut snaps = Vec::new();
        for (id, s) in loaded {
            match s {
                Ok(snapshot) => snaps.push(Listed { id, snapshot }),
                Err(e @ (Error::Corrupt { .. } | Error::Missing { .. })) => {
                    self.stats.records_unreadable += 1;
                    self.problems.push(Problem {
                        kind: ProblemKind::UnreadableRecord,
                        object: format!("snapshots/{id}"),
                        reason: e.to_string(),
                        affects: vec![Affected {
                            snapshot: id,
                            name: "(unknown: the record is unreadable)".into(),
                            path: None,
                        }],
                        more_affected: 0,
                    });
                }
                Err(e) => return Err(e),
            }
        }
        Ok(snaps)
    }

    /// Workloads: each selected workload's members are selected too, so that verifying a twin
    /// checks all of it; a member the repository lacks is a problem. Returns each workload's
    /// members.
    fn members(
        &mut self,
        all: &[Listed],
        selected: &mut Vec<Listed>,
    ) -> Vec<(String, Vec<String>)> {
        let mut out = Vec::new();
        let workloads: Vec<Listed> = selected
            .iter()
            .filter(|s| s.snapshot.kind == crate::snapshot::Kind::Workload)
            .cloned()
            .collect();
        for w in workloads {
            // An unreadable record is reported by the structure pass.
            let Ok(record) = crate::workload::load_record(self.repo, self.rt, &w) else {
                continue;
            };
            let members: Vec<String> = record.members().into_iter().map(str::to_string).collect();
            for id in &members {
                match all.iter().find(|s| &s.id == id) {
                    Some(m) if !selected.iter().any(|s| &s.id == id) => selected.push(m.clone()),
                    Some(_) => {}
                    None => {
                        self.broken.insert(w.id.clone());
                        self.problems.push(Problem {
                            kind: ProblemKind::MissingMember,
                            object: format!("snapshot {id}"),
                            reason: "the workload names it as a member; the repository has no such snapshot".into(),
                            affects: vec![affected(&w, None)],
                            more_affected: 0,
                        });
                    }
                }
            }
            out.push((w.id, members));
        }
        out
    }

    /// Workloads, last: one whose member is broken is broken too.
    fn broken_members(&mut self, selected: &[Listed], workloads: &[(String, Vec<String>)]) {
        for (id, members) in workloads {
            let Some(w) = selected.iter().find(|s| &s.id == id) else {
                continue;
            };
            let broken: Vec<&String> = members
                .iter()
                .filter(|m| self.broken.contains(*m))
                .collect();
            for m in broken {
                self.broken.insert(id.clone());
                self.problems.push(Problem {
                    kind: ProblemKind::BrokenMember,
                    object: format!("snapshot {m}"),
                    reason: "a member of the workload cannot be restored whole".into(),
                    affects: vec![affected(w, None)],
                    more_affected: 0,
                });
            }
        }
    }

    /// Structure, second half: every selected snapshot's index (catalog, ref list or image
    /// record) read, which checks its chunks on the way, giving the referenced chunks (in this
    /// shard).
    fn structure(&mut self, selected: &[Listed]) -> RefSorter {
        let mut referenced = RefSorter::new(self.scratch);
        for snap in selected {
            for r in snap.snapshot.index_refs() {
                if !r.is_zero() && self.in_shard(&r.id) {
                    referenced.push(*r);
                }
            }
            let shard = self.options.shard;
            let walked = walk_refs(self.repo, self.rt, snap, |_, r| {
                if !r.is_zero() && in_shard(shard, &r.id) {
                    referenced.push(*r);
                }
                Ok(())
            });
            match walked {
                Ok(()) => {
                    let roots: Vec<ChunkId> = snap
                        .snapshot
                        .index_refs()
                        .filter(|r| !r.is_zero() && self.in_shard(&r.id))
                        .map(|r| r.id)
                        .collect();
                    self.index_read.extend(roots);
                }
                Err(e) => {
                    self.broken.insert(snap.id.clone());
                    self.problems.push(Problem {
                        kind: ProblemKind::UnreadableIndex,
                        object: format!("index of snapshot {}", snap.id),
                        reason: e.to_string(),
                        affects: vec![affected(snap, None)],
                        more_affected: 0,
                    });
                }
            }
        }
        referenced
    }

    /// The image records of the readable image snapshots, for the images pass.
    fn image_records<'s>(
        &self,
        selected: &'s [Listed],
    ) -> Vec<(&'s Listed, crate::oci::ImageRecord)> {
        selected
            .iter()
            .filter(|s| {
                s.snapshot.root_format == snapshot::RootFormat::Image
                    && !self.broken.contains(&s.id)
            })
            .filter_map(|s| Some((s, crate::oci::load_record(self.repo, self.rt, s).ok()?)))
            .collect()
    }

    /// Existence: a listing of `chunks/` says which referenced chunks are missing and, when
    /// every snapshot is selected, which stored ones nothing references. The listing comes one
    /// id prefix at a time, in id order, and is walked beside the referenced set in the same
    /// order, so memory holds neither whole. Returns the chunks the data pass reads, when it
    /// runs: the referenced ones stored and in its share, less image chunks (the images pass
    /// reads those) and index chunks the structure pass read already (counted as read here).
    ///
    /// # Errors
    /// The store cannot be listed; the scratch directory cannot be written or read.
    fn existence(
        &mut self,
        referenced: RefSorter,
        all_selected: bool,
        image_chunks: &HashSet<ChunkId>,
    ) -> Result<Option<Spool>> {
        let mut refs = referenced.finish()?;
        let read_data = self.options.read_data;
        let mut to_read = read_data.map(|_| Spool::new(self.scratch)).transpose()?;
        let (repo, rt, shard) = (self.repo, self.rt, self.options.shard);
        let missing = |bad: &mut BTreeMap<_, _>, r: ChunkRef| {
            bad.insert(
                r.id,
                (ProblemKind::MissingChunk, "missing from the store".into()),
            );
        };
        rt.block_on(async {
            let mut listings = std::pin::pin!(repo.chunk_listings());
            while let Some(listing) = listings.next().await {
                for chunk in listing? {
                    let Some(r) = refs.advance_to(&chunk.id, |r| missing(&mut self.bad, r))? else {
                        if all_selected && in_shard(shard, &chunk.id) {
                            self.stats.chunks_unreferenced += 1;
                            self.stats.bytes_unreferenced += chunk.size;
                        }
                        continue;
                    };
                    if image_chunks.contains(&r.id) {
                        self.image_sizes.insert(r.id, chunk.size);
                    } else if let (Some(spool), Some(part)) = (&mut to_read, read_data) {
                        let in_part = part.is_none_or(|p| p.contains(subset_key(&r.id)));
                        if !in_part {
                            continue;
                        }
                        if self.index_read.contains(&r.id) {
                            self.stats.chunks_read += 1;
                            self.stats.bytes_read += chunk.size;
                            self.progress.inc(chunk.size);
                        } else {
                            spool.push(r, chunk.size)?;
                        }
                    }
                }
            }
            Ok::<(), Error>(())
        })?;
        self.stats.chunks_referenced = refs.rest(|r| missing(&mut self.bad, r))?;
        self.stats.chunks_missing = self.bad.len() as u64;
        Ok(to_read)
    }

    /// Data: each chunk `to_read` names downloaded, decompressed, decrypted and re-hashed once,
    /// on all cores.
    ///
    /// # Errors
    /// Reading the list back from the scratch directory failed.
    fn data(&mut self, to_read: Spool) -> Result<()> {
        let read = AtomicU64::new(0);
        let bytes = AtomicU64::new(0);
        let corrupt = Mutex::new(Vec::new());
        let scratch_error = Mutex::new(None);
        let (repo, rt, progress) = (self.repo, self.rt, self.progress);
        let budget = Arc::new(tokio::sync::Semaphore::new(READ_KIB as usize));
        let entries = to_read.into_entries()?.map_while(|e| {
            e.map_err(|e| *scratch_error.lock().expect("lock") = Some(e))
                .ok()
        });
        rt.block_on(
            futures::stream::iter(entries)
                .map(|(r, size)| {
                    let budget = Arc::clone(&budget);
                    async move {
                        let kib = r.len.div_ceil(1024).clamp(1, READ_KIB);
                        let held = budget.acquire_many_owned(kib).await.expect("never closed");
                        let result = pipeline::fetch(repo, rt, r).await;
                        drop(held);
                        (r, size, result.expect("fetch task panicked"))
                    }
                })
                .buffer_unordered(READ_CONCURRENCY)
                .for_each(|(r, size, result)| {
                    read.fetch_add(1, Ordering::Relaxed);
                    bytes.fetch_add(size, Ordering::Relaxed);
                    progress.inc(size);
                    if let Err(e) = result {
                        corrupt.lock().expect("lock").push((r.id, e));
                    }
                    async {}
                }),
        );
        if let Some(e) = scratch_error.into_inner().expect("lock") {
            return Err(e);
        }
        self.stats.chunks_read += read.into_inner();
        self.stats.bytes_read += bytes.into_inner();
        for (id, e) in corrupt.into_inner().expect("lock") {
            record_unreadable(&mut self.bad, &mut self.stats, id, e);
        }
        Ok(())
    }

    /// Images, on a full read: every blob reassembled from its chunks must hash to its digest
    /// (blobs in parallel, each read in order), every stored manifest to its own.
    fn images(&mut self, images: &[(&Listed, crate::oci::ImageRecord)]) {
        let mut wrong: Vec<(String, String, Vec<&Listed>)> = Vec::new();
        let mut blobs: BTreeMap<&str, (&crate::oci::StoredBlob, Vec<&Listed>)> = BTreeMap::new();
        for (snap, record) in images {
            for m in &record.manifests {
                let actual = crate::oci::registry::sha256_digest(&m.raw);
                if actual != m.digest {
                    wrong.push((
                        format!("manifest {}", m.digest),
                        format!("stored bytes hash to {actual}"),
                        vec![*snap],
                    ));
                }
            }
            for blob in &record.blobs {
                // A blob with a chunk missing from the store is reported through that chunk.
                if blob.refs.iter().any(|r| self.bad.contains_key(&r.id)) {
                    continue;
                }
                blobs
                    .entry(&blob.digest)
                    .or_insert((blob, Vec::new()))
                    .1
                    .push(*snap);
            }
        }
        let blobs: Vec<_> = blobs.into_values().collect();
        let next = AtomicU64::new(0);
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
        let (repo, rt, progress) = (self.repo, self.rt, self.progress);
        let digests: Vec<std::result::Result<String, (ChunkId, Box<Error>)>> = {
            let results = Mutex::new(blobs.iter().map(|_| None).collect::<Vec<_>>());
            std::thread::scope(|scope| {
                for _ in 0..workers.min(blobs.len()) {
                    scope.spawn(|| loop {
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                        let Some((blob, _)) = blobs.get(i) else {
                            return;
                        };
                        let digest = crate::oci::blob_digest(repo, rt, blob, progress);
                        results.lock().expect("lock")[i] = Some(digest);
                    });
                }
            });
            results
                .into_inner()
                .expect("lock")
                .into_iter()
                .map(|d| d.expect("every blob checked"))
                .collect()
        };
        let mut image_read: HashSet<ChunkId> = HashSet::new();
        for ((blob, users), digest) in blobs.iter().zip(digests) {
            self.stats.blobs_checked += 1;
            match digest {
                Ok(actual) => {
                    image_read.extend(blob.refs.iter().filter(|r| !r.is_zero()).map(|r| r.id));
                    if actual != blob.digest {
                        wrong.push((
                            format!("blob {}", blob.digest),
                            format!("its chunks assemble to {actual}"),
                            users.clone(),
                        ));
                    }
                }
                Err((id, e)) => record_unreadable(&mut self.bad, &mut self.stats, id, *e),
            }
        }
        self.stats.chunks_read += image_read.len() as u64;
        self.stats.bytes_read += image_read
            .iter()
            .filter_map(|id| self.image_sizes.get(id))
            .sum::<u64>();
        for (object, reason, users) in wrong {
            self.broken.extend(users.iter().map(|s| s.id.clone()));
            self.problems.push(Problem {
                kind: ProblemKind::WrongDigest,
                object,
                reason,
                affects: users.iter().map(|s| affected(s, None)).collect(),
                more_affected: 0,
            });
        }
    }

    /// A snapshot forgotten, and its data swept by gc, since the structure pass read the list
    /// is no longer the repository's to restore: verification holds no session, so gc may run
    /// meanwhile (ARCHITECTURE.md, "What runs during what"). When chunks are missing, one
    /// listing tells which snapshots are gone; they leave `selected`. Returns how many.
    fn forgotten(&mut self, selected: &mut Vec<Listed>) -> Result<usize> {
        let missing = self
            .bad
            .values()
            .any(|(kind, _)| *kind == ProblemKind::MissingChunk);
        if !missing {
            return Ok(0);
        }
        let live: HashSet<String> = self
            .rt
            .block_on(self.repo.list_snapshot_ids())?
            .into_iter()
            .collect();
        let before = selected.len();
        selected.retain(|s| live.contains(&s.id));
        self.broken.retain(|id| live.contains(id));
        Ok(before - selected.len())
    }

    /// Attribution, only when something is broken: the indexes walked again to name every
    /// snapshot and file that uses a bad chunk. A missing chunk that no remaining snapshot
    /// uses, after some were forgotten meanwhile, is no problem.
    fn attribution(&mut self, selected: &[Listed], forgotten: usize) {
        if self.bad.is_empty() {
            return;
        }
        let mut users: BTreeMap<ChunkId, (Vec<Affected>, u64)> = BTreeMap::new();
        for snap in selected {
            let roots: Vec<ChunkId> = snap.snapshot.index_refs().map(|r| r.id).collect();
            for id in roots.iter().filter(|id| self.bad.contains_key(id)) {
                self.broken.insert(snap.id.clone());
                push_user(
                    users.entry(*id).or_default(),
                    affected(snap, Some("(index)".into())),
                );
            }
            let (bad, broken) = (&self.bad, &mut self.broken);
            let _ = walk_refs(self.repo, self.rt, snap, |path, r| {
                if bad.contains_key(&r.id) {
                    broken.insert(snap.id.clone());
                    let path = (!path.is_empty()
                        || snap.snapshot.root_format == snapshot::RootFormat::Tree)
                        .then(|| String::from_utf8_lossy(path).into_owned());
                    push_user(users.entry(r.id).or_default(), affected(snap, path));
                }
                Ok(())
            });
        }
        for (id, (kind, reason)) in std::mem::take(&mut self.bad) {
            let (affects, more_affected) = users.remove(&id).unwrap_or_default();
            if forgotten > 0 && kind == ProblemKind::MissingChunk && affects.is_empty() {
                self.stats.chunks_missing -= 1;
                continue;
            }
            self.problems.push(Problem {
                kind,
                object: Repository::chunk_key(&id),
                reason,
                affects,
                more_affected,
            });
        }
    }

    /// Record: the report, and the run's record in `verify/` for [`status`].
    fn record(mut self, selected: &[Listed], time: DateTime<Utc>, started: Instant) -> Report {
        let snapshots: Vec<SnapshotStatus> = selected
            .iter()
            .map(|s| SnapshotStatus {
                id: s.id.clone(),
                kind: format!("{:?}", s.snapshot.kind).to_lowercase(),
                name: s.snapshot.name.clone(),
                host: s.snapshot.host.clone(),
                time: s.snapshot.time,
                ok: !self.broken.contains(&s.id),
            })
            .collect();
        self.stats.snapshots_checked = snapshots.len() as u64;
        self.stats.snapshots_broken = snapshots.iter().filter(|s| !s.ok).count() as u64;
        self.stats.snapshots_ok = self.stats.snapshots_checked - self.stats.snapshots_broken;
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        let report = Report {
            time,
            duration_ms: started.elapsed().as_millis() as u64,
            repository: self.repo.store().url().to_string(),
            host: host.clone(),
            read_data: self.options.read_desc(),
            shard: self.options.shard.map(|s| s.describe()),
            ok: self.problems.is_empty(),
            stats: self.stats,
            snapshots,
            problems: self.problems,
        };
        let ids = |ok: bool| {
            report
                .snapshots
                .iter()
                .filter(|s| s.ok == ok)
                .map(|s| s.id.clone())
                .collect()
        };
        let record = RunRecord {
            time,
            host,
            read_data: report.read_data.clone(),
            shard: report.shard.clone(),
            ok: ids(true),
            broken: ids(false),
        };
        let json = serde_json::to_vec(&record).expect("record serialises");
        if let Err(e) = self.rt.block_on(self.repo.put_verify_record(time, &json)) {
            tracing::warn!("could not store the record of this verification run: {e}");
        }
        report
    }
}

/// Every data chunk ref of a snapshot with the file (or blob digest) that uses it (also what
/// `copy` copies).
pub(crate) fn walk_refs(
    repo: &Arc<Repository>,
    rt: &Handle,
    snap: &Listed,
    f: impl FnMut(&[u8], &ChunkRef) -> Result<()>,
) -> Result<()> {
    match snap.snapshot.root_format {
        snapshot::RootFormat::Image => crate::oci::walk_refs(repo, rt, snap, f),
        // The record is read (its chunks checked) for its members; they are snapshots of
        // their own, verified as such.
        snapshot::RootFormat::Workload => crate::workload::load_record(repo, rt, snap).map(drop),
        _ => volume::walk_refs(repo, rt, snap, f),
    }
}

/// Notes a chunk that could not be read back: missing, or corrupt (anything else a read of it
/// failed with).
fn record_unreadable(
    bad: &mut BTreeMap<ChunkId, (ProblemKind, String)>,
    stats: &mut Stats,
    id: ChunkId,
    e: Error,
) {
    let kind = match e {
        Error::Missing { .. } => ProblemKind::MissingChunk,
        _ => ProblemKind::CorruptChunk,
    };
    if kind == ProblemKind::CorruptChunk {
        stats.chunks_corrupt += 1;
    } else {
        stats.chunks_missing += 1;
    }
    bad.insert(id, (kind, e.to_string()));
}

fn affected(snap: &Listed, path: Option<String>) -> Affected {
    Affected {
        snapshot: snap.id.clone(),
        name: snap.snapshot.name.clone(),
        path,
    }
}

fn push_user(slot: &mut (Vec<Affected>, u64), a: Affected) {
    if slot.0.len() < MAX_AFFECTED {
        slot.0.push(a);
    } else {
        slot.1 += 1;
    }
}

fn select(snaps: Vec<Listed>, options: &VerifyOptions) -> Result<Vec<Listed>> {
    // Each wanted snapshot as `snapshot::resolve` reads a reference: an id prefix, or a name
    // meaning its newest snapshot.
    let mut wanted = std::collections::HashSet::new();
    for reference in &options.snapshots {
        let id = match crate::snapshot::match_id(snaps.iter().map(|s| s.id.as_str()), reference)? {
            Some(id) => id,
            None => {
                let name = reference.strip_prefix("docker://").unwrap_or(reference);
                snaps
                    .iter()
                    .filter(|s| s.snapshot.name == name)
                    .max_by_key(|s| (s.snapshot.time, &s.id))
                    .map(|s| s.id.as_str())
                    .ok_or_else(|| Error::SnapshotNotFound(reference.clone()))?
            }
        };
        wanted.insert(id.to_string());
    }
    let mut out: Vec<Listed> = snaps
        .into_iter()
        .filter(|s| options.filter.matches(&s.snapshot))
        .filter(|s| options.since.is_none_or(|t| s.snapshot.time >= t))
        .filter(|s| wanted.is_empty() || wanted.contains(&s.id))
        .collect();
    out.sort_by(|a, b| (a.snapshot.time, &a.id).cmp(&(b.snapshot.time, &b.id)));
    Ok(out)
}

/// When each current snapshot was last verified.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotHistory {
    pub id: String,
    pub name: String,
    pub time: DateTime<Utc>,
    /// Last run that checked it (any depth), and whether it was fine then.
    pub last_checked: Option<DateTime<Utc>>,
    pub last_result_ok: Option<bool>,
    /// Last run that read all its data in one go, unsharded, and found it fine.
    pub last_fully_verified: Option<DateTime<Utc>>,
}

/// Reads the run records and tells, for every snapshot, when it was last checked.
pub async fn status(repo: &Arc<Repository>) -> Result<Vec<SnapshotHistory>> {
    let records: Vec<RunRecord> = repo
        .verify_records()
        .await?
        .iter()
        .filter_map(|r| serde_json::from_slice(r).ok())
        .collect();
    let snaps = snapshot::list(repo, &Filter::default()).await?;
    Ok(snaps
        .into_iter()
        .map(|s| {
            let mut h = SnapshotHistory {
                id: s.id.clone(),
                name: s.snapshot.name.clone(),
                time: s.snapshot.time,
                last_checked: None,
                last_result_ok: None,
                last_fully_verified: None,
            };
            for r in &records {
                let ok = r.ok.contains(&s.id);
                if ok || r.broken.contains(&s.id) {
                    h.last_checked = Some(r.time);
                    h.last_result_ok = Some(ok);
                    if ok && r.read_data == "all" && r.shard.is_none() {
                        h.last_fully_verified = Some(r.time);
                    }
                }
            }
            h
        })
        .collect())
}

/// The report in Prometheus text format, for node_exporter's textfile collector.
pub fn metrics(report: &Report) -> String {
    let repo = report.repository.replace('\\', "\\\\").replace('"', "\\\"");
    let l = format!("repository=\"{repo}\"");
    let s = &report.stats;
    let mut out = String::new();
    let mut metric = |name: &str, help: &str, lines: Vec<(String, f64)>| {
        out.push_str(&format!(
            "# HELP tresor_verify_{name} {help}\n# TYPE tresor_verify_{name} gauge\n"
        ));
        for (labels, v) in lines {
            out.push_str(&format!("tresor_verify_{name}{{{labels}}} {v}\n"));
        }
    };
    metric(
        "last_run_timestamp_seconds",
        "When the last verification run started.",
        vec![(l.clone(), report.time.timestamp() as f64)],
    );
    metric(
        "duration_seconds",
        "How long the last run took.",
        vec![(l.clone(), report.duration_ms as f64 / 1000.0)],
    );
    metric(
        "success",
        "1 if the last run found no problem.",
        vec![(l.clone(), report.ok as u8 as f64)],
    );
    metric(
        "snapshots",
        "Snapshots checked by the last run, by result.",
        vec![
            (format!("{l},status=\"ok\""), s.snapshots_ok as f64),
            (format!("{l},status=\"broken\""), s.snapshots_broken as f64),
        ],
    );
    metric(
        "problems",
        "Problems found by the last run.",
        vec![(l.clone(), report.problems.len() as f64)],
    );
    metric(
        "chunks_referenced",
        "Chunks referenced by the checked snapshots.",
        vec![(l.clone(), s.chunks_referenced as f64)],
    );
    metric(
        "chunks_read",
        "Chunks read and re-hashed.",
        vec![(l.clone(), s.chunks_read as f64)],
    );
    metric(
        "bytes_read",
        "Stored bytes read.",
        vec![(l.clone(), s.bytes_read as f64)],
    );
    metric(
        "chunks_missing",
        "Referenced chunks missing from the store.",
        vec![(l.clone(), s.chunks_missing as f64)],
    );
    metric(
        "chunks_corrupt",
        "Chunks that failed their hash or authentication.",
        vec![(l, s.chunks_corrupt as f64)],
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_partition_the_id_space() {
        assert_eq!(Part::parse("3/7").unwrap(), Part { n: 3, m: 7 });
        assert!(
            Part::parse("0/7").is_err() && Part::parse("8/7").is_err() && Part::parse("x").is_err()
        );
        let parts: Vec<Part> = (1..=7).map(|n| Part { n, m: 7 }).collect();
        for i in 0..10_000u64 {
            let x = i.wrapping_mul(0x9e3779b97f4a7c15);
            assert_eq!(parts.iter().filter(|p| p.contains(x)).count(), 1);
        }
        let five = Part::parse("5%").unwrap();
        let hits = (0..100_000u64)
            .filter(|i| five.contains(i.wrapping_mul(0x9e3779b97f4a7c15)))
            .count();
        assert!((4_000..6_000).contains(&hits), "{hits}");
        assert!(Part::parse("100%").unwrap().contains(u64::MAX));
    }
}
