//! Chunk refs sorted on disk: the chunks a set of snapshots references, as `verify` and `gc`
//! mark hold them, so their memory does not grow with the repository.
//!
//! A hash set of ten million referenced ids costs about 500 MiB. Here refs are gathered in a
//! bounded buffer; a full buffer is sorted, deduplicated and written to an unnamed scratch
//! file as a **run** of 36-byte refs ([`ChunkRef::encode`]). [`RefSorter::finish`] merges the
//! runs into one stream in id order, each id once. The chunk listings come in id order as well
//! (one prefix at a time, ascending), so a caller walks both side by side
//! ([`SortedRefs::advance_to`]) and learns which referenced chunks are missing and which stored
//! ones are unreferenced with constant memory: the buffer, one read buffer per run and the
//! heap that merges them. A counting sorter ([`RefSorter::counting`]) sums instead of
//! deduplicating: a restore counts with one how many places use each chunk.
//!
//! The scratch files are the process's own and unnamed: they vanish with it, killed or not.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::id::{ChunkId, ChunkRef};

/// Refs held in memory before a run is written: 9 MiB.
const BUFFER_REFS: usize = 1 << 18;
/// Read buffer of each run while merging.
const RUN_READ_BUFFER: usize = 64 * 1024;

/// Gathers refs in any order, in bounded memory.
pub struct RefSorter {
    dir: PathBuf,
    buffer: Vec<ChunkRef>,
    runs: Vec<File>,
    limit: usize,
    /// Whether refs with one id add their `len`s (counting) rather than keep one of them.
    sum: bool,
    /// The first failure to write a run: later refs are dropped and [`RefSorter::finish`]
    /// returns it, so callers push from inside walks without a way to stop them.
    failed: Option<Error>,
}

impl RefSorter {
    /// A sorter whose runs go to `dir` (the cache directory, which is on a disk the operator
    /// chose for tresor) or, without one, to the temporary directory.
    pub fn new(dir: Option<&Path>) -> RefSorter {
        RefSorter::with_limit(dir, BUFFER_REFS, false)
    }

    /// A sorter that counts: each id comes out once with the sum of the `len`s it was pushed
    /// with (push 1 per use to count uses).
    pub fn counting(dir: Option<&Path>) -> RefSorter {
        RefSorter::with_limit(dir, BUFFER_REFS, true)
    }

    fn with_limit(dir: Option<&Path>, limit: usize, sum: bool) -> RefSorter {
        RefSorter {
            dir: dir.map_or_else(std::env::temp_dir, Path::to_path_buf),
            buffer: Vec::new(),
            runs: Vec::new(),
            limit,
            sum,
            failed: None,
        }
    }

    /// Adds a ref; a full buffer becomes a run (a failure to write it is kept for
    /// [`RefSorter::finish`]).
    pub fn push(&mut self, r: ChunkRef) {
        if self.failed.is_some() {
            return;
        }
        self.buffer.push(r);
        if self.buffer.len() >= self.limit {
            if let Err(e) = self.spill() {
                self.buffer = Vec::new();
                self.failed = Some(e);
            }
        }
    }

    /// Takes over another sorter's refs (one gathered on another thread), and its failure.
    pub fn append(&mut self, other: RefSorter) {
        self.runs.extend(other.runs);
        self.failed = self.failed.take().or(other.failed);
        for r in other.buffer {
            self.push(r);
        }
    }

    fn spill(&mut self) -> Result<()> {
        sort_unique(&mut self.buffer, self.sum);
        let mut out = BufWriter::new(scratch_file(&self.dir)?);
        for r in self.buffer.drain(..) {
            out.write_all(&r.encode())
                .map_err(|e| Error::io(&self.dir, e))?;
        }
        let mut file = out
            .into_inner()
            .map_err(|e| Error::io(&self.dir, e.into_error()))?;
        file.rewind().map_err(|e| Error::io(&self.dir, e))?;
        self.runs.push(file);
        Ok(())
    }

    /// Every ref gathered, in id order, each id once.
    ///
    /// # Errors
    /// Writing or reading a run failed.
    pub fn finish(mut self) -> Result<SortedRefs> {
        #[cfg(feature = "scale-harness")]
        if !self.sum {
            for id in crate::store::padding::referenced() {
                self.push(ChunkRef { id, len: 1024 });
            }
        }
        if let Some(e) = self.failed {
            return Err(e);
        }
        sort_unique(&mut self.buffer, self.sum);
        let mut sources: Vec<Source> = self
            .runs
            .into_iter()
            .map(|f| {
                Source::Run(
                    BufReader::with_capacity(RUN_READ_BUFFER, f),
                    self.dir.clone(),
                )
            })
            .collect();
        sources.push(Source::Memory(self.buffer.into_iter()));
        let mut heap = BinaryHeap::with_capacity(sources.len());
        for (i, source) in sources.iter_mut().enumerate() {
            if let Some(r) = source.next()? {
                heap.push(Reverse(Head(r, i)));
            }
        }
        Ok(SortedRefs {
            sources,
            heap,
            sum: self.sum,
            peeked: None,
            count: 0,
        })
    }
}

/// Sorts by id and keeps each id once: the first ref, or one whose `len` is their sum.
/// An unnamed file in `dir`, made if missing.
fn scratch_file(dir: &Path) -> Result<File> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    tempfile::tempfile_in(dir).map_err(|e| Error::io(dir, e))
}

fn sort_unique(refs: &mut Vec<ChunkRef>, sum: bool) {
    refs.sort_unstable_by_key(|r| r.id);
    refs.dedup_by(|later, kept| {
        let same = later.id == kept.id;
        if same && sum {
            kept.len = kept.len.saturating_add(later.len);
        }
        same
    });
}

/// Where a merge reads refs from: a run, or the last buffer, never written.
enum Source {
    Run(BufReader<File>, PathBuf),
    Memory(std::vec::IntoIter<ChunkRef>),
}

impl Source {
    fn next(&mut self) -> Result<Option<ChunkRef>> {
        match self {
            Source::Memory(refs) => Ok(refs.next()),
            Source::Run(reader, dir) => {
                let mut b = [0u8; ChunkRef::ENCODED_LEN];
                match reader.read_exact(&mut b) {
                    Ok(()) => Ok(Some(ChunkRef::decode(&b))),
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
                    Err(e) => Err(Error::io(dir.as_path(), e)),
                }
            }
        }
    }
}

/// The next ref of a source, ordered by id (then source, so the order is total).
#[derive(PartialEq, Eq)]
struct Head(ChunkRef, usize);

impl Ord for Head {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.0.id, self.1).cmp(&(other.0.id, other.1))
    }
}

impl PartialOrd for Head {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// The refs of a [`RefSorter`], in id order, each id once.
pub struct SortedRefs {
    sources: Vec<Source>,
    heap: BinaryHeap<Reverse<Head>>,
    sum: bool,
    peeked: Option<ChunkRef>,
    count: u64,
}

impl SortedRefs {
    /// The next ref in id order; `None` after the last.
    ///
    /// # Errors
    /// Reading a run failed.
    pub fn next_ref(&mut self) -> Result<Option<ChunkRef>> {
        if let Some(r) = self.peeked.take() {
            return Ok(Some(r));
        }
        let Some(Reverse(Head(mut r, i))) = self.heap.pop() else {
            return Ok(None);
        };
        self.refill(i)?;
        // Each run holds an id once; other runs may hold it too.
        while let Some(Reverse(Head(same, j))) = self.heap.peek() {
            if same.id != r.id {
                break;
            }
            let (len, j) = (same.len, *j);
            self.heap.pop();
            self.refill(j)?;
            if self.sum {
                r.len = r.len.saturating_add(len);
            }
        }
        self.count += 1;
        Ok(Some(r))
    }

    fn refill(&mut self, source: usize) -> Result<()> {
        if let Some(next) = self.sources[source].next()? {
            self.heap.push(Reverse(Head(next, source)));
        }
        Ok(())
    }

    /// Walks up to `id`: every ref below it goes to `below`; the ref with this id, if any, is
    /// returned. Calls must come in increasing order of `id`.
    ///
    /// # Errors
    /// Reading a run failed.
    pub fn advance_to(
        &mut self,
        id: &ChunkId,
        mut below: impl FnMut(ChunkRef),
    ) -> Result<Option<ChunkRef>> {
        while let Some(r) = self.next_ref()? {
            match r.id.cmp(id) {
                std::cmp::Ordering::Less => below(r),
                std::cmp::Ordering::Equal => return Ok(Some(r)),
                std::cmp::Ordering::Greater => {
                    self.peeked = Some(r);
                    return Ok(None);
                }
            }
        }
        Ok(None)
    }

    /// Every ref not yet walked, to `f`; returns how many distinct refs there were in all.
    ///
    /// # Errors
    /// Reading a run failed.
    pub fn rest(mut self, mut f: impl FnMut(ChunkRef)) -> Result<u64> {
        while let Some(r) = self.next_ref()? {
            f(r);
        }
        Ok(self.count)
    }
}

/// Refs with their stored sizes, appended to an unnamed scratch file and read back once in the
/// order written: the chunks a pass will read, chosen by an earlier one, without holding them.
pub struct Spool {
    dir: PathBuf,
    out: BufWriter<File>,
    len: u64,
}

/// One entry: a ref, then its stored size.
const SPOOLED_LEN: usize = ChunkRef::ENCODED_LEN + 8;

impl Spool {
    /// An empty spool in `dir` (as [`RefSorter::new`]).
    ///
    /// # Errors
    /// The scratch file cannot be made.
    pub fn new(dir: Option<&Path>) -> Result<Spool> {
        let dir = dir.map_or_else(std::env::temp_dir, Path::to_path_buf);
        Ok(Spool {
            out: BufWriter::new(scratch_file(&dir)?),
            dir,
            len: 0,
        })
    }

    /// Appends a ref and its stored size.
    ///
    /// # Errors
    /// Writing failed.
    pub fn push(&mut self, r: ChunkRef, size: u64) -> Result<()> {
        self.out
            .write_all(&r.encode())
            .and_then(|()| self.out.write_all(&size.to_le_bytes()))
            .map_err(|e| Error::io(&self.dir, e))?;
        self.len += 1;
        Ok(())
    }

    /// How many entries were pushed.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was pushed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The entries, in the order pushed.
    ///
    /// # Errors
    /// Flushing the file failed; a read error ends the iteration with it.
    pub fn into_entries(self) -> Result<impl Iterator<Item = Result<(ChunkRef, u64)>>> {
        let dir = self.dir;
        let mut file = self
            .out
            .into_inner()
            .map_err(|e| Error::io(&dir, e.into_error()))?;
        file.rewind().map_err(|e| Error::io(&dir, e))?;
        let mut reader = BufReader::with_capacity(RUN_READ_BUFFER, file);
        Ok((0..self.len).map(move |_| {
            let mut b = [0u8; SPOOLED_LEN];
            reader.read_exact(&mut b).map_err(|e| Error::io(&dir, e))?;
            let r = ChunkRef::decode(b[..ChunkRef::ENCODED_LEN].try_into().expect("36 bytes"));
            let size = u64::from_le_bytes(b[ChunkRef::ENCODED_LEN..].try_into().expect("8 bytes"));
            Ok((r, size))
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rand::{Rng, SeedableRng};

    use super::*;

    #[test]
    fn merges_runs_into_one_sorted_set_and_joins_a_listing() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // Few distinct ids, pushed many times from two sorters: runs overlap and repeat.
        let ids: Vec<ChunkId> = (0..500u32).map(|i| ChunkId::of(&i.to_le_bytes())).collect();
        let mut want = BTreeMap::new();
        let mut a = RefSorter::with_limit(Some(dir.path()), 64, false);
        let mut b = RefSorter::with_limit(Some(dir.path()), 64, false);
        for n in 0..3000 {
            let id = ids[rng.gen_range(0..ids.len())];
            let r = ChunkRef {
                id,
                len: id.0[1].into(),
            };
            want.insert(id, r);
            let sorter = if n % 3 == 0 { &mut b } else { &mut a };
            sorter.push(r);
        }
        assert!(a.runs.len() > 10 && !b.runs.is_empty());
        a.append(b);
        // A "listing": every other wanted id, plus ids nobody references.
        let mut listing: Vec<ChunkId> = want.keys().step_by(2).copied().collect();
        listing.extend((0..50u32).map(|i| ChunkId::of(&(i + 10_000).to_le_bytes())));
        listing.sort();
        let mut sorted = a.finish().unwrap();
        let (mut missing, mut found, mut unreferenced) = (Vec::new(), Vec::new(), 0);
        for id in &listing {
            match sorted.advance_to(id, |r| missing.push(r)).unwrap() {
                Some(r) => found.push(r),
                None => unreferenced += 1,
            }
        }
        let count = sorted.rest(|r| missing.push(r)).unwrap();
        assert_eq!(count, want.len() as u64);
        assert_eq!(unreferenced, 50);
        let mut seen: Vec<ChunkRef> = [found.clone(), missing].concat();
        seen.sort_by_key(|r| r.id);
        assert_eq!(seen, want.values().copied().collect::<Vec<_>>());
        assert_eq!(found, want.values().step_by(2).copied().collect::<Vec<_>>());
    }

    #[test]
    fn a_counting_sorter_sums_uses_across_runs() {
        let dir = tempfile::tempdir().unwrap();
        let mut counting = RefSorter::with_limit(Some(dir.path()), 16, true);
        let mut want = BTreeMap::new();
        for n in 0..1000u32 {
            let id = ChunkId::of(&(n % 37 * n % 101).to_le_bytes());
            *want.entry(id).or_insert(0u32) += 1;
            counting.push(ChunkRef { id, len: 1 });
        }
        assert!(counting.runs.len() > 10);
        let mut got = BTreeMap::new();
        let count = counting
            .finish()
            .unwrap()
            .rest(|r| assert!(got.insert(r.id, r.len).is_none()))
            .unwrap();
        assert_eq!(got, want);
        assert_eq!(count, want.len() as u64);
    }
}
