//! A set of chunk ids kept on disk, for the chunk cache: memory does not grow with it.
//!
//! A repository of 10 TiB holds about ten million chunks; a hash set of their ids costs 1-3 GiB
//! of memory on a host that should give a backup agent a few hundred MiB (restic's and kopia's
//! indexes hit this wall). So the set lives in a directory as a few **runs**: files of sorted
//! ids, each with a small table that says where each id prefix starts. A lookup reads one
//! table entry from memory and one bucket of about 128 ids (4 KiB) from the file,
//! for each run; the page cache, not the process, holds what is hot. Memory per run is the
//! table: at most 2^16 offsets (512 KiB), whatever the number of ids.
//!
//! **Adding** writes the new ids as a new run; runs are merged (a streaming merge, never a
//! rewrite of everything on every save) when the newest is at least a quarter of the one before
//! it, or when there are more than six, so each id is rewritten a logarithmic number of
//! times. **Which runs make the set** is said by one manifest file, replaced atomically after
//! the runs it names are written and synced; runs it no longer names are deleted after it. A
//! crash at any point leaves the old manifest with its runs or the new one with its runs, never
//! a mix; a run left by a crash is deleted by a later open.
//!
//! **Damage** (a truncated run, a table that does not match its checksum, a manifest that does
//! not parse or names a missing run) makes [`ChunkIndex::open`] return nothing, and the caller
//! rebuilds the set from a listing. The ids of a run are checked against their checksum when
//! a merge reads them. A damaged id can only make a lookup miss (the chunk is stored again) or
//! name an id no chunk has; see [`crate::cache`] for why the directory must be private.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::ChunkId;
use crate::localfile::{replace_with, PRIVATE};

const MAGIC: &[u8; 8] = b"TRSRKC01";
/// Count (8), table bits (4), padding (4), the ids' BLAKE3 (32), the table's BLAKE3 (32).
const FOOTER: usize = 80;
/// Ids per table bucket the table aims at: one bucket is one 4 KiB read.
const BUCKET_IDS: u64 = 128;
/// Finest table: 2^16 buckets, so a run's table is at most 512 KiB in memory.
const MAX_BITS: u32 = 16;
/// Runs beyond this are merged whatever their sizes: each lookup reads one bucket per run.
const MAX_RUNS: usize = 6;
const MANIFEST: &str = "known-chunks.manifest";
const MANIFEST_VERSION: u32 = 1;
const RUN_PREFIX: &str = "known-chunks-";
const RUN_SUFFIX: &str = ".run";
/// A run file the manifest does not name is deleted by an open once it is this old: younger
/// ones may be another process's save in progress.
const ORPHAN_AGE: Duration = Duration::from_secs(3600);

/// Which runs make the set, and the gc fingerprint it is valid for.
#[derive(Serialize, Deserialize)]
struct Manifest {
    version: u32,
    gc: String,
    runs: Vec<String>,
}

/// One run: a file of sorted ids and, in memory, where each bucket of ids starts.
struct Run {
    name: String,
    file: File,
    count: u64,
    bits: u32,
    /// `2^bits + 1` offsets (in ids): bucket `b` is `starts[b]..starts[b + 1]`.
    starts: Vec<u64>,
}

/// A set of chunk ids on disk; see the module docs.
pub struct ChunkIndex {
    dir: PathBuf,
    gc: String,
    runs: Vec<Run>,
}

impl std::fmt::Debug for ChunkIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkIndex({}, {} ids)", self.dir.display(), self.len())
    }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> Error {
    Error::Corrupt {
        object: path.display().to_string(),
        reason: reason.into(),
    }
}

/// The table bucket of `id` in a table of `bits` bits.
fn bucket(id: &ChunkId, bits: u32) -> usize {
    if bits == 0 {
        return 0;
    }
    let top = u64::from_be_bytes(id.0[..8].try_into().expect("8 bytes"));
    (top >> (64 - bits)) as usize
}

/// The coarsest table whose buckets hold about [`BUCKET_IDS`] ids.
fn table_bits(count: u64) -> u32 {
    let mut bits = 0;
    while bits < MAX_BITS && count >> bits > BUCKET_IDS {
        bits += 1;
    }
    bits
}

fn table_bytes(starts: &[u64]) -> Vec<u8> {
    starts.iter().flat_map(|s| s.to_le_bytes()).collect()
}

fn table_hash(starts: &[u64], count: u64, bits: u32, ids_hash: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&table_bytes(starts));
    h.update(&count.to_le_bytes());
    h.update(&bits.to_le_bytes());
    h.update(ids_hash);
    *h.finalize().as_bytes()
}

/// Writes a run from ids given in strictly increasing order.
pub struct RunWriter {
    dir: PathBuf,
    name: String,
    out: BufWriter<File>,
    ids: blake3::Hasher,
    /// Ids per 2^16 bucket; coarser tables are sums of these.
    fine: Vec<u64>,
    count: u64,
    last: Option<ChunkId>,
}

impl RunWriter {
    fn new(dir: &Path) -> Result<RunWriter> {
        let name = format!(
            "{RUN_PREFIX}{}{RUN_SUFFIX}",
            hex::encode(rand::random::<[u8; 8]>())
        );
        let path = dir.join(&name);
        // A fresh random name: never through a symlink or over another file.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(PRIVATE)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(MAGIC).map_err(|e| Error::io(&path, e))?;
        Ok(RunWriter {
            dir: dir.to_path_buf(),
            name,
            out,
            ids: blake3::Hasher::new(),
            fine: vec![0; 1 << MAX_BITS],
            count: 0,
            last: None,
        })
    }

    fn path(&self) -> PathBuf {
        self.dir.join(&self.name)
    }

    /// Appends `id`, which must be greater than every id before it.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be written; [`Error::Corrupt`] for an id out of order
    /// (a damaged run being merged).
    pub fn push(&mut self, id: ChunkId) -> Result<()> {
        if self.last.is_some_and(|last| last >= id) {
            return Err(corrupt(&self.path(), "ids out of order"));
        }
        self.out
            .write_all(&id.0)
            .map_err(|e| Error::io(self.path(), e))?;
        self.ids.update(&id.0);
        self.fine[bucket(&id, MAX_BITS)] += 1;
        self.count += 1;
        self.last = Some(id);
        Ok(())
    }

    /// Writes the table and footer and syncs the file.
    fn finish(self) -> Result<Run> {
        let path = self.path();
        let bits = table_bits(self.count);
        let per = 1usize << (MAX_BITS - bits);
        let mut starts = Vec::with_capacity((1 << bits) + 1);
        let mut at = 0;
        starts.push(0);
        for group in self.fine.chunks(per) {
            at += group.iter().sum::<u64>();
            starts.push(at);
        }
        let ids_hash = *self.ids.finalize().as_bytes();
        let mut out = self.out;
        let io = |e| Error::io(&path, e);
        out.write_all(&table_bytes(&starts)).map_err(io)?;
        out.write_all(&self.count.to_le_bytes()).map_err(io)?;
        out.write_all(&bits.to_le_bytes()).map_err(io)?;
        out.write_all(&[0; 4]).map_err(io)?;
        out.write_all(&ids_hash).map_err(io)?;
        out.write_all(&table_hash(&starts, self.count, bits, &ids_hash))
            .map_err(io)?;
        let file = out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        Ok(Run {
            name: self.name,
            file,
            count: self.count,
            bits,
            starts,
        })
    }
}

impl Run {
    /// Opens and checks a run: its length, table and footer (not its ids: see the module docs).
    fn open(dir: &Path, name: &str) -> Result<Run> {
        let path = dir.join(name);
        if !name.starts_with(RUN_PREFIX) || name.contains('/') {
            return Err(corrupt(&path, "not a run file name"));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        if len < (MAGIC.len() + FOOTER) as u64 {
            return Err(corrupt(&path, "truncated"));
        }
        let mut footer = [0u8; FOOTER];
        file.read_exact_at(&mut footer, len - FOOTER as u64)
            .map_err(|e| Error::io(&path, e))?;
        let count = u64::from_le_bytes(footer[..8].try_into().expect("8 bytes"));
        let bits = u32::from_le_bytes(footer[8..12].try_into().expect("4 bytes"));
        if bits > MAX_BITS {
            return Err(corrupt(&path, "bad table size"));
        }
        let table_len = ((1u64 << bits) + 1) * 8;
        let expected = count
            .checked_mul(32)
            .and_then(|n| n.checked_add(MAGIC.len() as u64 + table_len + FOOTER as u64));
        if expected != Some(len) {
            return Err(corrupt(&path, "its length does not match its count"));
        }
        let mut magic = [0u8; 8];
        file.read_exact_at(&mut magic, 0)
            .map_err(|e| Error::io(&path, e))?;
        let mut table = vec![0u8; table_len as usize];
        file.read_exact_at(&mut table, len - FOOTER as u64 - table_len)
            .map_err(|e| Error::io(&path, e))?;
        let starts: Vec<u64> = table
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect();
        let ids_hash: [u8; 32] = footer[16..48].try_into().expect("32 bytes");
        if &magic != MAGIC
            || footer[48..] != table_hash(&starts, count, bits, &ids_hash)
            || starts[0] != 0
            || starts[starts.len() - 1] != count
            || starts.windows(2).any(|w| w[0] > w[1])
        {
            return Err(corrupt(&path, "its table does not match its checksum"));
        }
        Ok(Run {
            name: name.to_string(),
            file,
            count,
            bits,
            starts,
        })
    }

    fn contains(&self, dir: &Path, id: &ChunkId) -> Result<bool> {
        let b = bucket(id, self.bits);
        let (lo, hi) = (self.starts[b], self.starts[b + 1]);
        if lo == hi {
            return Ok(false);
        }
        let mut buf = vec![0u8; ((hi - lo) * 32) as usize];
        self.file
            .read_exact_at(&mut buf, MAGIC.len() as u64 + lo * 32)
            .map_err(|e| Error::io(dir.join(&self.name), e))?;
        let (mut lo, mut hi) = (0, buf.len() / 32);
        while lo < hi {
            let mid = (lo + hi) / 2;
            match buf[mid * 32..mid * 32 + 32].cmp(&id.0[..]) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Ok(true),
            }
        }
        Ok(false)
    }

    /// Its ids in order, checked against their checksum once all are read.
    fn ids(&self, dir: &Path) -> Result<RunIds> {
        let mut file = self.file.try_clone().map_err(|e| Error::io(dir, e))?;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(MAGIC.len() as u64))
            .map_err(|e| Error::io(dir.join(&self.name), e))?;
        let mut footer = [0u8; 32];
        let len = MAGIC.len() as u64 + self.count * 32 + ((1u64 << self.bits) + 1) * 8;
        self.file
            .read_exact_at(&mut footer, len + 16)
            .map_err(|e| Error::io(dir.join(&self.name), e))?;
        Ok(RunIds {
            path: dir.join(&self.name),
            reader: BufReader::with_capacity(1 << 20, file),
            left: self.count,
            hasher: blake3::Hasher::new(),
            expected: footer,
        })
    }
}

/// A run's ids, read in order.
struct RunIds {
    path: PathBuf,
    reader: BufReader<File>,
    left: u64,
    hasher: blake3::Hasher,
    expected: [u8; 32],
}

impl RunIds {
    fn next(&mut self) -> Result<Option<ChunkId>> {
        if self.left == 0 {
            return Ok(None);
        }
        let mut id = [0u8; 32];
        self.reader
            .read_exact(&mut id)
            .map_err(|e| Error::io(&self.path, e))?;
        self.hasher.update(&id);
        self.left -= 1;
        if self.left == 0 && *self.hasher.finalize().as_bytes() != self.expected {
            return Err(corrupt(&self.path, "its ids do not match their checksum"));
        }
        Ok(Some(ChunkId(id)))
    }
}

impl ChunkIndex {
    /// Opens the set kept in `dir` if it is valid for the gc fingerprint `gc`; nothing when it
    /// is missing, of another fingerprint, or damaged (logged). Deletes run files a crash left.
    pub fn open(dir: &Path, gc: &str) -> Option<ChunkIndex> {
        let manifest = dir.join(MANIFEST);
        let bytes = match std::fs::read(&manifest) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!("chunk cache {}: {e}; rebuilding it", manifest.display());
                return None;
            }
        };
        let opened = serde_json::from_slice::<Manifest>(&bytes)
            .map_err(|e| corrupt(&manifest, e.to_string()))
            .and_then(|m| {
                if m.version != MANIFEST_VERSION {
                    return Err(corrupt(&manifest, format!("version {}", m.version)));
                }
                let runs = m
                    .runs
                    .iter()
                    .map(|name| Run::open(dir, name))
                    .collect::<Result<Vec<_>>>()?;
                Ok((m.gc, runs))
            });
        let (saved_gc, runs) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                tracing::warn!("chunk cache is damaged ({e}); rebuilding it from the store");
                return None;
            }
        };
        let index = ChunkIndex {
            dir: dir.to_path_buf(),
            gc: saved_gc,
            runs,
        };
        index.remove_orphans();
        (index.gc == gc).then_some(index)
    }

    /// A writer for a new set valid for the gc fingerprint `gc`: push every id in increasing
    /// order, then [`ChunkIndex::create`].
    ///
    /// # Errors
    /// [`Error::Io`] when the run file cannot be created.
    pub fn writer(dir: &Path) -> Result<RunWriter> {
        RunWriter::new(dir)
    }

    /// Makes the ids pushed to `writer` the whole set kept in `dir`, valid for `gc`.
    ///
    /// # Errors
    /// [`Error::Io`] when the run or the manifest cannot be written.
    pub fn create(dir: &Path, gc: &str, writer: RunWriter) -> Result<ChunkIndex> {
        let run = writer.finish()?;
        let index = ChunkIndex {
            dir: dir.to_path_buf(),
            gc: gc.to_string(),
            runs: vec![run],
        };
        index.write_manifest()?;
        index.remove_orphans();
        Ok(index)
    }

    /// Whether `id` is in the set.
    ///
    /// # Errors
    /// [`Error::Io`] when a run cannot be read.
    pub fn contains(&self, id: &ChunkId) -> Result<bool> {
        for run in self.runs.iter().rev() {
            if run.contains(&self.dir, id)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Number of ids (an id in two runs, saved by two processes at once, counts twice).
    pub fn len(&self) -> u64 {
        self.runs.iter().map(|r| r.count).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds `ids` (sorted, no duplicates) as a new run, merges runs as the module docs say, and
    /// makes the result the saved set.
    ///
    /// # Errors
    /// [`Error::Io`] writing runs or the manifest; [`Error::Corrupt`] when a run being merged
    /// is damaged (the saved set is then left as it was).
    pub fn add(&mut self, ids: &[ChunkId]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut writer = RunWriter::new(&self.dir)?;
        for id in ids {
            writer.push(*id)?;
        }
        let mut runs = std::mem::take(&mut self.runs);
        let mut replaced = Vec::new();
        runs.push(writer.finish()?);
        let merged = self.compact(&mut runs, &mut replaced);
        self.runs = runs;
        let result = merged.and_then(|()| self.write_manifest());
        // Runs merged away are deleted once the manifest no longer names them; on failure the
        // old manifest still names them, and the new runs are orphans for a later open.
        if result.is_ok() {
            for name in replaced {
                let _ = std::fs::remove_file(self.dir.join(name));
            }
        }
        result
    }

    /// Merges the newest runs while the newest is at least a quarter of the one before it, or
    /// there are more than [`MAX_RUNS`]. Names of runs merged away go to `replaced`.
    fn compact(&self, runs: &mut Vec<Run>, replaced: &mut Vec<String>) -> Result<()> {
        while runs.len() >= 2 {
            let n = runs.len();
            if n <= MAX_RUNS && runs[n - 1].count * 4 < runs[n - 2].count {
                break;
            }
            let newer = runs.pop().expect("two runs");
            let older = runs.pop().expect("two runs");
            let merged = match merge(&self.dir, &older, &newer) {
                Ok(merged) => merged,
                Err(e) => {
                    runs.push(older);
                    runs.push(newer);
                    return Err(e);
                }
            };
            for run in [older, newer] {
                if !runs.iter().any(|r| r.name == run.name) {
                    replaced.push(run.name);
                }
            }
            runs.push(merged);
        }
        Ok(())
    }

    fn write_manifest(&self) -> Result<()> {
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            gc: self.gc.clone(),
            runs: self.runs.iter().map(|r| r.name.clone()).collect(),
        };
        let json = serde_json::to_vec(&manifest).expect("manifest serialises");
        let path = self.dir.join(MANIFEST);
        replace_with(&path, PRIVATE, |f| {
            f.write_all(&json).map_err(|e| Error::io(&path, e))?;
            f.sync_all().map_err(|e| Error::io(&path, e))
        })?;
        // The rename itself reaches the disk with the directory.
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Deletes run files the manifest does not name and older than [`ORPHAN_AGE`], and the
    /// files of the cache format before runs.
    fn remove_orphans(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let old = SystemTime::now() - ORPHAN_AGE;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let legacy = name == "known-chunks" || name == "known-chunks.gc";
            let orphan = name.starts_with(RUN_PREFIX)
                && name.ends_with(RUN_SUFFIX)
                && !self.runs.iter().any(|r| r.name == name)
                && entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t < old);
            if legacy || orphan {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Forgets the set kept in `dir`, so the next open finds nothing.
    ///
    /// # Errors
    /// [`Error::Io`] when the manifest exists and cannot be removed.
    pub fn forget(dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(path, e)),
            _ => Ok(()),
        }
    }
}

/// One run with the ids of both, each once.
fn merge(dir: &Path, older: &Run, newer: &Run) -> Result<Run> {
    let mut out = RunWriter::new(dir)?;
    let result = (|| {
        let (mut a, mut b) = (older.ids(dir)?, newer.ids(dir)?);
        let (mut x, mut y) = (a.next()?, b.next()?);
        loop {
            match (x, y) {
                (None, None) => return Ok(()),
                (Some(i), Some(j)) if i == j => {
                    out.push(i)?;
                    (x, y) = (a.next()?, b.next()?);
                }
                (Some(i), Some(j)) if i < j => {
                    out.push(i)?;
                    x = a.next()?;
                }
                (Some(i), None) => {
                    out.push(i)?;
                    x = a.next()?;
                }
                (_, Some(j)) => {
                    out.push(j)?;
                    y = b.next()?;
                }
            }
        }
    })();
    match result {
        Ok(()) => out.finish(),
        Err(e) => {
            let _ = std::fs::remove_file(out.path());
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeSet;

    fn random_id(rng: &mut impl Rng) -> ChunkId {
        ChunkId(rng.gen())
    }

    fn create(dir: &Path, gc: &str, ids: &BTreeSet<ChunkId>) -> ChunkIndex {
        let mut w = ChunkIndex::writer(dir).unwrap();
        for id in ids {
            w.push(*id).unwrap();
        }
        ChunkIndex::create(dir, gc, w).unwrap()
    }

    fn run_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(RUN_SUFFIX))
            .collect();
        names.sort();
        names
    }

    /// Random inserts in batches of random sizes (many merges), random lookups of members and
    /// non-members, each checked against a plain set, and the set reopened from disk after
    /// every batch.
    #[test]
    fn agrees_with_a_plain_set() {
        for seed in 0..6u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let dir = tempfile::tempdir().unwrap();
            let mut plain = BTreeSet::new();
            for _ in 0..rng.gen_range(0..300) {
                plain.insert(random_id(&mut rng));
            }
            let mut index = create(dir.path(), "gc1", &plain);
            for _ in 0..rng.gen_range(1..25) {
                let n = [0, 1, 7, 100, 2000][rng.gen_range(0..5)];
                let mut batch: Vec<ChunkId> = (0..n).map(|_| random_id(&mut rng)).collect();
                // Some ids again, as two processes saving at once would.
                batch.extend(plain.iter().take(rng.gen_range(0..3)).copied());
                batch.sort_unstable();
                batch.dedup();
                index.add(&batch).unwrap();
                plain.extend(batch);
                index = ChunkIndex::open(dir.path(), "gc1").expect("reopens");
                assert!(index.runs.len() <= MAX_RUNS, "seed {seed}: too many runs");
                for id in plain.iter().step_by(7) {
                    assert!(
                        index.contains(id).unwrap(),
                        "seed {seed}: member {id} missed"
                    );
                }
                for _ in 0..200 {
                    let id = random_id(&mut rng);
                    assert_eq!(index.contains(&id).unwrap(), plain.contains(&id));
                }
            }
            // A full merge holds each id once.
            let mut runs = std::mem::take(&mut index.runs);
            while runs.len() > 1 {
                let newer = runs.pop().unwrap();
                let older = runs.pop().unwrap();
                runs.push(merge(dir.path(), &older, &newer).unwrap());
            }
            assert_eq!(
                runs.iter().map(|r| r.count).sum::<u64>(),
                plain.len() as u64
            );
            assert!(ChunkIndex::open(dir.path(), "gc2").is_none(), "another gc");
        }
    }

    /// The files of `dir`, by name.
    fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        out.sort();
        out
    }

    /// A crash while merging leaves one of the states a save passes through on disk: new runs
    /// written but not yet named, or the manifest replaced but old runs not yet deleted. Each
    /// opens as the old set or the new one, never a mix; leftovers go once old enough.
    #[test]
    fn a_crash_while_merging_leaves_the_old_set_or_the_new() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let dir = tempfile::tempdir().unwrap();
        let old: BTreeSet<ChunkId> = (0..1000).map(|_| random_id(&mut rng)).collect();
        let mut index = create(dir.path(), "gc", &old);
        let before = files(dir.path());
        let mut added: Vec<ChunkId> = (0..900).map(|_| random_id(&mut rng)).collect();
        added.sort_unstable();
        index.add(&added).unwrap();
        assert_eq!(index.runs.len(), 1, "900 * 4 >= 1000: merged into one run");
        let after = files(dir.path());
        let new_runs: Vec<&(String, Vec<u8>)> = after
            .iter()
            .filter(|(n, _)| n.ends_with(RUN_SUFFIX))
            .collect();
        assert!(
            before
                .iter()
                .all(|(n, _)| n == MANIFEST || !after.iter().any(|(m, _)| m == n)),
            "the merged-away runs are deleted"
        );
        let manifest = |state: &[(String, Vec<u8>)]| {
            state.iter().find(|(n, _)| n == MANIFEST).unwrap().1.clone()
        };
        let is_old = |index: &ChunkIndex| {
            old.iter().all(|id| index.contains(id).unwrap())
                && added.iter().all(|id| !index.contains(id).unwrap())
        };
        let is_new = |index: &ChunkIndex| {
            old.iter()
                .chain(&added)
                .all(|id| index.contains(id).unwrap())
        };

        for manifest_replaced in [false, true] {
            let crashed = tempfile::tempdir().unwrap();
            for (name, bytes) in before.iter().chain(new_runs.iter().copied()) {
                std::fs::write(crashed.path().join(name), bytes).unwrap();
            }
            let chosen = if manifest_replaced {
                manifest(&after)
            } else {
                manifest(&before)
            };
            std::fs::write(crashed.path().join(MANIFEST), chosen).unwrap();
            let reopened = ChunkIndex::open(crashed.path(), "gc").expect("opens");
            assert!(
                if manifest_replaced {
                    is_new(&reopened)
                } else {
                    is_old(&reopened)
                },
                "manifest replaced: {manifest_replaced}"
            );
            // The runs it does not name stay while young (a save in progress), then go.
            assert_eq!(
                run_files(crashed.path()).len(),
                before.len() - 1 + new_runs.len()
            );
            for name in run_files(crashed.path()) {
                let f = File::options()
                    .write(true)
                    .open(crashed.path().join(name))
                    .unwrap();
                f.set_modified(SystemTime::now() - 2 * ORPHAN_AGE).unwrap();
            }
            drop(ChunkIndex::open(crashed.path(), "gc").unwrap());
            let mut named: Vec<String> = reopened.runs.iter().map(|r| r.name.clone()).collect();
            named.sort();
            assert_eq!(run_files(crashed.path()), named);
        }
    }

    /// Damage of each kind makes the set unopenable (so it is rebuilt), never wrong.
    #[test]
    fn a_damaged_set_is_not_opened() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let ids: BTreeSet<ChunkId> = (0..5000).map(|_| random_id(&mut rng)).collect();
        type Harm = fn(&Path, &str);
        let damage: [(&str, Harm); 5] = [
            ("truncated run", |dir, run| {
                let f = File::options().write(true).open(dir.join(run)).unwrap();
                let len = f.metadata().unwrap().len();
                f.set_len(len - 40).unwrap();
            }),
            ("flipped table byte", |dir, run| {
                let path = dir.join(run);
                let mut bytes = std::fs::read(&path).unwrap();
                let at = bytes.len() - FOOTER - 100;
                bytes[at] ^= 1;
                std::fs::write(path, bytes).unwrap();
            }),
            ("missing run", |dir, run| {
                std::fs::remove_file(dir.join(run)).unwrap();
            }),
            ("garbled manifest", |dir, _| {
                std::fs::write(dir.join(MANIFEST), b"{\"version\":1,").unwrap();
            }),
            ("empty manifest", |dir, _| {
                std::fs::write(dir.join(MANIFEST), b"").unwrap();
            }),
        ];
        for (what, harm) in damage {
            let dir = tempfile::tempdir().unwrap();
            drop(create(dir.path(), "gc", &ids));
            let run = run_files(dir.path()).pop().unwrap();
            harm(dir.path(), &run);
            assert!(ChunkIndex::open(dir.path(), "gc").is_none(), "{what}");
        }
        // A flipped id is caught when a merge reads it, and the saved set stays as it was.
        let dir = tempfile::tempdir().unwrap();
        let mut index = create(dir.path(), "gc", &ids);
        let run = run_files(dir.path()).pop().unwrap();
        let path = dir.path().join(&run);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[MAGIC.len() + 32 * 10 + 5] ^= 0x40;
        std::fs::write(&path, bytes).unwrap();
        let mut index2 = ChunkIndex::open(dir.path(), "gc").expect("table intact");
        drop(std::mem::take(&mut index.runs));
        let more: Vec<ChunkId> = (0..4000).map(|_| random_id(&mut rng)).collect();
        let mut more = more;
        more.sort_unstable();
        let err = index2.add(&more).unwrap_err();
        assert!(
            err.to_string().contains("checksum") || err.to_string().contains("order"),
            "{err}"
        );
        let saved = ChunkIndex::open(dir.path(), "gc").expect("the old manifest");
        assert_eq!(saved.runs.len(), 1);
        assert_eq!(saved.runs[0].name, run);
    }
}
