//! Records sorted on disk: the chunks a set of snapshots references, as `verify`, `gc` mark and
//! `copy` hold them, and a restore's plan of recurring chunks, so their memory does not grow
//! with the repository.
//!
//! A hash set of ten million referenced ids costs about 500 MiB. Here records are gathered in a
//! bounded buffer (about 9 MiB); a full buffer is sorted by the record's key and written to an
//! unnamed scratch file as a **run** of fixed-size records ([`Record`]). [`Sorter::finish`]
//! merges the runs into one stream in key order. A sorter made with a way to combine records
//! of one key keeps each key once ([`RefSorter`] keeps the first ref of each id); without one,
//! every record comes out. The chunk listings come in id order as well (one prefix at a time,
//! ascending), so a caller walks both side by side ([`Sorted::advance_to`]) and learns which
//! referenced chunks are missing and which stored ones are unreferenced with constant memory:
//! the buffer, one read buffer per run and the heap that merges them.
//!
//! The scratch files are the process's own and unnamed: they vanish with it, killed or not.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::id::{ChunkId, ChunkRef};

/// Bytes of records held in memory before a run is written.
const BUFFER_BYTES: usize = 9 << 20;
/// Read buffer of each run while merging.
const RUN_READ_BUFFER: usize = 64 * 1024;
/// The longest encoded record.
const MAX_RECORD: usize = 64;

/// A fixed-size record a [`Sorter`] writes to its runs.
pub trait Record: Copy {
    /// Bytes of the encoded form, at most 64.
    const LEN: usize;
    /// What records are ordered by.
    type Key: Ord;
    /// This record's key.
    fn key(&self) -> Self::Key;
    /// Writes the record to `out`, [`Record::LEN`] bytes.
    fn encode(&self, out: &mut [u8]);
    /// Inverse of [`Record::encode`].
    fn decode(b: &[u8]) -> Self;
}

impl Record for ChunkRef {
    const LEN: usize = ChunkRef::ENCODED_LEN;
    type Key = ChunkId;

    fn key(&self) -> ChunkId {
        self.id
    }

    fn encode(&self, out: &mut [u8]) {
        out.copy_from_slice(&ChunkRef::encode(self));
    }

    fn decode(b: &[u8]) -> ChunkRef {
        ChunkRef::decode(b.try_into().expect("a ref is 36 bytes"))
    }
}

/// Folds a later record of the same key into the one kept.
pub type Combine<R> = fn(&mut R, &R);

/// Gathers records in any order, in bounded memory.
pub struct Sorter<R: Record> {
    dir: PathBuf,
    buffer: Vec<R>,
    runs: Vec<File>,
    limit: usize,
    /// How records of one key become one; `None` keeps them all.
    combine: Option<Combine<R>>,
    /// The first failure to write a run: later records are dropped and [`Sorter::finish`]
    /// returns it, so callers push from inside walks without a way to stop them.
    failed: Option<Error>,
}

impl<R: Record> Sorter<R> {
    /// A sorter whose runs go to `dir` (the cache directory, which is on a disk the operator
    /// chose for tresor) or, without one, to the temporary directory.
    pub fn new(dir: Option<&Path>, combine: Option<Combine<R>>) -> Sorter<R> {
        Sorter::with_limit(dir, BUFFER_BYTES / R::LEN, combine)
    }

    /// A sorter that writes a run every `limit` records (tests use small ones).
    pub fn with_limit(dir: Option<&Path>, limit: usize, combine: Option<Combine<R>>) -> Sorter<R> {
        assert!(
            R::LEN <= MAX_RECORD,
            "records are at most {MAX_RECORD} bytes"
        );
        Sorter {
            dir: dir.map_or_else(std::env::temp_dir, Path::to_path_buf),
            buffer: Vec::new(),
            runs: Vec::new(),
            limit: limit.max(1),
            combine,
            failed: None,
        }
    }

    /// Adds a record; a full buffer becomes a run (a failure to write it is kept for
    /// [`Sorter::finish`]).
    pub fn push(&mut self, r: R) {
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

    /// Takes over another sorter's records (one gathered on another thread), and its failure.
    pub fn append(&mut self, other: Sorter<R>) {
        self.runs.extend(other.runs);
        self.failed = self.failed.take().or(other.failed);
        for r in other.buffer {
            self.push(r);
        }
    }

    fn spill(&mut self) -> Result<()> {
        sort_buffer(&mut self.buffer, self.combine);
        let mut out = BufWriter::new(scratch_file(&self.dir)?);
        let mut b = [0u8; MAX_RECORD];
        for r in self.buffer.drain(..) {
            r.encode(&mut b[..R::LEN]);
            out.write_all(&b[..R::LEN])
                .map_err(|e| Error::io(&self.dir, e))?;
        }
        let mut file = out
            .into_inner()
            .map_err(|e| Error::io(&self.dir, e.into_error()))?;
        file.rewind().map_err(|e| Error::io(&self.dir, e))?;
        self.runs.push(file);
        Ok(())
    }

    /// Every record gathered, in key order (each key once when the sorter combines).
    ///
    /// # Errors
    /// Writing or reading a run failed.
    pub fn finish(mut self) -> Result<Sorted<R>> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        sort_buffer(&mut self.buffer, self.combine);
        let mut sources: Vec<Source<R>> = self
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
        Ok(Sorted {
            sources,
            heap,
            combine: self.combine,
            peeked: None,
            count: 0,
        })
    }
}

/// The chunks a set of snapshots references: refs sorted by id, each id once (the first ref
/// pushed with it).
pub struct RefSorter(Sorter<ChunkRef>);

/// The refs of a [`RefSorter`], in id order.
pub type SortedRefs = Sorted<ChunkRef>;

impl RefSorter {
    /// A sorter whose runs go to `dir`, as [`Sorter::new`].
    pub fn new(dir: Option<&Path>) -> RefSorter {
        RefSorter(Sorter::new(dir, Some(|_, _| {})))
    }

    /// Adds a ref.
    pub fn push(&mut self, r: ChunkRef) {
        self.0.push(r);
    }

    /// Takes over another sorter's refs, as [`Sorter::append`].
    pub fn append(&mut self, other: RefSorter) {
        self.0.append(other.0);
    }

    /// Every ref gathered, in id order, each id once.
    ///
    /// # Errors
    /// Writing or reading a run failed.
    pub fn finish(#[allow(unused_mut)] mut self) -> Result<SortedRefs> {
        #[cfg(feature = "scale-harness")]
        for id in crate::store::padding::referenced() {
            self.push(ChunkRef { id, len: 1024 });
        }
        self.0.finish()
    }
}

/// An unnamed file in `dir`, made if missing.
fn scratch_file(dir: &Path) -> Result<File> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    tempfile::tempfile_in(dir).map_err(|e| Error::io(dir, e))
}

/// Sorts by key and, with `combine`, keeps each key once.
fn sort_buffer<R: Record>(records: &mut Vec<R>, combine: Option<Combine<R>>) {
    records.sort_unstable_by_key(R::key);
    if let Some(combine) = combine {
        records.dedup_by(|later, kept| {
            let same = later.key() == kept.key();
            if same {
                combine(kept, later);
            }
            same
        });
    }
}

/// Where a merge reads records from: a run, or the last buffer, never written.
enum Source<R> {
    Run(BufReader<File>, PathBuf),
    Memory(std::vec::IntoIter<R>),
}

impl<R: Record> Source<R> {
    fn next(&mut self) -> Result<Option<R>> {
        match self {
            Source::Memory(records) => Ok(records.next()),
            Source::Run(reader, dir) => {
                let mut b = [0u8; MAX_RECORD];
                match reader.read_exact(&mut b[..R::LEN]) {
                    Ok(()) => Ok(Some(R::decode(&b[..R::LEN]))),
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
                    Err(e) => Err(Error::io(dir.as_path(), e)),
                }
            }
        }
    }
}

/// The next record of a source, ordered by key (then source, so the order is total and
/// records of one key come out in the order their runs were written).
struct Head<R>(R, usize);

impl<R: Record> Ord for Head<R> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.0.key(), self.1).cmp(&(other.0.key(), other.1))
    }
}

impl<R: Record> PartialOrd for Head<R> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl<R: Record> PartialEq for Head<R> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl<R: Record> Eq for Head<R> {}

/// The records of a [`Sorter`], in key order.
pub struct Sorted<R: Record> {
    sources: Vec<Source<R>>,
    heap: BinaryHeap<Reverse<Head<R>>>,
    combine: Option<Combine<R>>,
    peeked: Option<R>,
    count: u64,
}

impl<R: Record> Sorted<R> {
    /// The next record in key order; `None` after the last.
    ///
    /// # Errors
    /// Reading a run failed.
    pub fn next_record(&mut self) -> Result<Option<R>> {
        if let Some(r) = self.peeked.take() {
            return Ok(Some(r));
        }
        let Some(Reverse(Head(mut r, i))) = self.heap.pop() else {
            return Ok(None);
        };
        self.refill(i)?;
        // Each run holds a key once; other runs may hold it too.
        if let Some(combine) = self.combine {
            while let Some(Reverse(Head(same, j))) = self.heap.peek() {
                if same.key() != r.key() {
                    break;
                }
                combine(&mut r, same);
                let j = *j;
                self.heap.pop();
                self.refill(j)?;
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

    /// Walks up to `key`: every record below it goes to `below`; the record with this key, if
    /// any, is returned. Calls must come in increasing order of `key`.
    ///
    /// # Errors
    /// Reading a run failed.
    pub fn advance_to(&mut self, key: &R::Key, mut below: impl FnMut(R)) -> Result<Option<R>> {
        while let Some(r) = self.next_record()? {
            match r.key().cmp(key) {
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

    /// Every record not yet walked, to `f`; returns how many records came out in all.
    ///
    /// # Errors
    /// Reading a run failed.
    pub fn rest(mut self, mut f: impl FnMut(R)) -> Result<u64> {
        while let Some(r) = self.next_record()? {
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
    /// An empty spool in `dir` (as [`Sorter::new`]).
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
        let first = Some((|_, _| {}) as Combine<ChunkRef>);
        let mut a = Sorter::with_limit(Some(dir.path()), 64, first);
        let mut b = Sorter::with_limit(Some(dir.path()), 64, first);
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

    /// A record whose key is its first half: many records share a key.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
    struct Pair(u32, u32);

    impl Record for Pair {
        const LEN: usize = 8;
        type Key = u32;

        fn key(&self) -> u32 {
            self.0
        }

        fn encode(&self, out: &mut [u8]) {
            out[..4].copy_from_slice(&self.0.to_le_bytes());
            out[4..].copy_from_slice(&self.1.to_le_bytes());
        }

        fn decode(b: &[u8]) -> Pair {
            Pair(
                u32::from_le_bytes(b[..4].try_into().unwrap()),
                u32::from_le_bytes(b[4..].try_into().unwrap()),
            )
        }
    }

    /// Without a way to combine them, every record comes out, records of one key side by
    /// side; with one, each key once, folded across runs.
    #[test]
    fn keeps_every_record_or_combines_each_key_across_runs() {
        let dir = tempfile::tempdir().unwrap();
        let pushed: Vec<Pair> = (0..1000u32).map(|n| Pair(n % 37 * n % 101, n)).collect();
        let mut all = Sorter::with_limit(Some(dir.path()), 16, None);
        let sum: Combine<Pair> = |kept, later| kept.1 += later.1;
        let mut summing = Sorter::with_limit(Some(dir.path()), 16, Some(sum));
        for p in &pushed {
            all.push(*p);
            summing.push(*p);
        }
        assert!(all.runs.len() > 10 && summing.runs.len() > 10);

        let mut got = Vec::new();
        let count = all.finish().unwrap().rest(|p| got.push(p)).unwrap();
        assert_eq!(count, 1000);
        assert!(got.windows(2).all(|w| w[0].0 <= w[1].0), "in key order");
        let mut want = pushed.clone();
        want.sort();
        got.sort();
        assert_eq!(got, want);

        let mut sums = BTreeMap::new();
        for p in &pushed {
            *sums.entry(p.0).or_insert(0) += p.1;
        }
        let mut got = BTreeMap::new();
        let count = summing
            .finish()
            .unwrap()
            .rest(|p| assert!(got.insert(p.0, p.1).is_none(), "key {} twice", p.0))
            .unwrap();
        assert_eq!(got, sums);
        assert_eq!(count, sums.len() as u64);
    }
}
