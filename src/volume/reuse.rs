//! Chunks a tree restore uses in more than one place, fetched once.
//!
//! A tree whose directories repeat (copies of a library, the same layer unpacked twice, a
//! database's identical pages) names one chunk from many files. The restore writes in catalog
//! order, so without a plan each place fetches, decrypts and checks the chunk again: from a
//! remote store that is a request per place. The restore therefore reads the catalog twice
//! (fetched once, into an [`unnamed_file`]): the first pass numbers the places that fetch a
//! chunk ([`Counter`]), the second restores and keeps each chunk used in more than one place
//! from its first fetch until its last use. The reader decides where each is kept ([`Plan`]):
//! in memory up to [`MEMORY`] bytes, beyond that, from a remote store, in a spill file
//! (unnamed, on the target's file system when it allows `O_TMPFILE`, else in the temporary
//! directory), so the bound holds however many chunks recur. From a local store a chunk
//! beyond the bound is read again instead: the repository is a file on a local disk like the
//! spill file would be, and reading it again runs on all cores ahead of the writer, while the
//! spill file is written and read by the writer itself.
//! The writer holds them ([`Kept`]); a chunk that is not there when a later place needs it
//! (its first fetch failed on an entry the target refused) is fetched again.
//!
//! **Memory.** Nothing here is held per chunk. The places are sorted on disk
//! ([`Sorter`]) by chunk, then place: a walk in that order finds each recurring chunk's first,
//! later and last places, gives the chunk a number and a **slot** in the spill file (the sum
//! of the lengths of the recurring chunks before it, rounded up to 4 KiB blocks, so the file
//! is sparse and needs no map),
//! and writes one [`Step`] per such place to a second sort, by place. The second pass reads
//! the steps in place order beside its own places. In memory stay the chunks kept in memory
//! (at most [`MEMORY`] bytes, each counted with [`KEPT_OVERHEAD`] for its
//! bookkeeping, so their maps stay within the bound too), and the writer's bitmap of the chunks in the spill file (one bit per recurring
//! chunk). A chunk's bytes in the spill file are freed (a hole punched) at its last use.
//! A chunk is its id and its length: a forged catalog that names one id with two lengths
//! makes two chunks, and the fetch of the wrong one fails on its length.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::FileExt;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::id::{ChunkId, ChunkRef};
use crate::refset::{Record, Sorted, Sorter};

/// Bytes of recurring chunks kept in memory; more go to the spill file.
pub const MEMORY: u64 = 64 << 20;
/// What a chunk kept in memory costs beyond its bytes (its buffer's header and its entries in
/// the reader's and the writer's maps), counted against [`MEMORY`] with them: so the bound
/// holds, and bounds how many are kept, when a catalog names tiny chunks.
pub const KEPT_OVERHEAD: u64 = 128;

/// Spill file slots start at multiples of this.
const BLOCK: u64 = 4096;

/// A place that fetches a chunk, numbered in catalog order.
#[derive(Clone, Copy)]
struct Place {
    chunk: ChunkRef,
    at: u64,
}

impl Place {
    fn same_chunk(&self, other: &Place) -> bool {
        self.chunk == other.chunk
    }
}

impl Record for Place {
    const LEN: usize = ChunkRef::ENCODED_LEN + 8;
    type Key = (ChunkId, u32, u64);

    fn key(&self) -> Self::Key {
        (self.chunk.id, self.chunk.len, self.at)
    }

    fn encode(&self, out: &mut [u8]) {
        out[..ChunkRef::ENCODED_LEN].copy_from_slice(&self.chunk.encode());
        out[ChunkRef::ENCODED_LEN..].copy_from_slice(&self.at.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Place {
        let (chunk, at) = b.split_at(ChunkRef::ENCODED_LEN);
        Place {
            chunk: ChunkRef::decode(chunk.try_into().expect("36 bytes")),
            at: u64::from_le_bytes(at.try_into().expect("8 bytes")),
        }
    }
}

/// A recurring chunk: its number (in the order of the walk) and where it goes in the spill
/// file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub chunk: u64,
    pub offset: u64,
}

/// Which use of its chunk a place is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Turn {
    First,
    Again,
    Last,
}

/// What the plan says of one place that fetches a recurring chunk.
#[derive(Clone, Copy)]
struct Step {
    at: u64,
    slot: Slot,
    turn: Turn,
}

impl Record for Step {
    const LEN: usize = 25;
    type Key = u64;

    fn key(&self) -> u64 {
        self.at
    }

    fn encode(&self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.at.to_le_bytes());
        out[8..16].copy_from_slice(&self.slot.chunk.to_le_bytes());
        out[16..24].copy_from_slice(&self.slot.offset.to_le_bytes());
        out[24] = self.turn as u8;
    }

    fn decode(b: &[u8]) -> Step {
        let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Step {
            at: word(0),
            slot: Slot {
                chunk: word(8),
                offset: word(16),
            },
            turn: match b[24] {
                0 => Turn::First,
                1 => Turn::Again,
                last => {
                    // The restore's own file, written by `encode`.
                    debug_assert_eq!(last, Turn::Last as u8);
                    Turn::Last
                }
            },
        }
    }
}

/// Numbers the places that fetch a chunk, in catalog order.
pub struct Counter {
    places: Sorter<Place>,
    next: u64,
    /// Where [`Counter::plan`] sorts its steps.
    steps: Sorter<Step>,
}

impl Default for Counter {
    fn default() -> Counter {
        Counter {
            places: Sorter::new(None, None),
            next: 0,
            steps: Sorter::new(None, None),
        }
    }
}

impl Counter {
    /// The next place fetches `chunk`.
    pub fn fetch(&mut self, chunk: &ChunkRef) {
        self.places.push(Place {
            chunk: *chunk,
            at: self.next,
        });
        self.next += 1;
    }

    /// The plan for the restore: the uses of chunks fetched by more than one place, kept
    /// beyond the memory bound only with `spill`.
    ///
    /// # Errors
    /// Writing or reading the sorted places or steps in the temporary directory failed.
    pub fn plan(self, spill: bool) -> Result<Plan> {
        let mut steps = self.steps;
        let mut places = self.places.finish()?;
        // The place before, and the slot of its chunk when an earlier place uses it too.
        let mut before: Option<(Place, Option<Slot>)> = None;
        let (mut chunks, mut offset) = (0u64, 0u64);
        while let Some(place) = places.next_record()? {
            before = match before {
                Some((prev, slot)) if prev.same_chunk(&place) => {
                    let (slot, turn) = match slot {
                        Some(slot) => (slot, Turn::Again),
                        None => {
                            let slot = Slot {
                                chunk: chunks,
                                offset,
                            };
                            chunks += 1;
                            // Slots start on a block, so a chunk's last use frees its
                            // blocks whole.
                            offset = offset
                                .checked_add(u64::from(place.chunk.len).next_multiple_of(BLOCK))
                                .ok_or_else(|| Error::Corrupt {
                                    object: "(restore plan)".into(),
                                    reason: "the recurring chunks pass 2^64 bytes".into(),
                                })?;
                            (slot, Turn::First)
                        }
                    };
                    steps.push(Step {
                        at: prev.at,
                        slot,
                        turn,
                    });
                    Some((place, Some(slot)))
                }
                Some((prev, slot)) => {
                    push_last(&mut steps, prev, slot);
                    Some((place, None))
                }
                None => Some((place, None)),
            };
        }
        if let Some((prev, slot)) = before {
            push_last(&mut steps, prev, slot);
        }
        let mut steps = steps.finish()?;
        Ok(Plan {
            next: steps.next_record()?,
            steps,
            at: 0,
            in_memory: HashSet::new(),
            memory: 0,
            bound: MEMORY,
            spill,
        })
    }
}

/// The last place of a chunk, when earlier places use it too.
fn push_last(steps: &mut Sorter<Step>, place: Place, slot: Option<Slot>) {
    if let Some(slot) = slot {
        steps.push(Step {
            at: place.at,
            slot,
            turn: Turn::Last,
        });
    }
}

/// Where the writer keeps a chunk that later places use: in memory by its number, or in its
/// slot of the spill file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    Memory(u64),
    Spill(Slot),
}

/// What one place that needs a chunk does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    /// Fetch it, and keep it (where) when later places use it too.
    Fetch(Option<Keep>),
    /// Take it from where the writer kept it; `last` when no later place uses it.
    Again { keep: Keep, last: bool },
}

/// The reader's side: the steps of the places still to come, and the chunks kept in memory.
pub struct Plan {
    steps: Sorted<Step>,
    /// The step of the next place that has one.
    next: Option<Step>,
    /// The number of the next place.
    at: u64,
    /// The numbers of the chunks kept in memory; each counts its length and
    /// [`KEPT_OVERHEAD`] against the bound.
    in_memory: HashSet<u64>,
    /// Bytes counted against [`MEMORY`] now (as the reader sees it: the writer frees them
    /// when it reaches their last use, a little later).
    memory: u64,
    /// [`MEMORY`] (tests lower it).
    bound: u64,
    /// Whether chunks beyond the memory bound go to the spill file, or are fetched again.
    spill: bool,
}

impl Plan {
    /// What the next place that fetches `chunk` does.
    ///
    /// # Errors
    /// Reading the sorted steps failed.
    pub fn at(&mut self, chunk: &ChunkRef) -> Result<Use> {
        let at = self.at;
        self.at += 1;
        let step = match self.next {
            Some(step) if step.at == at => step,
            _ => return Ok(Use::Fetch(None)),
        };
        self.next = self.steps.next_record()?;
        let last = step.turn == Turn::Last;
        if step.turn == Turn::First {
            return Ok(Use::Fetch(self.room(step.slot, chunk.len)));
        }
        if self.in_memory.contains(&step.slot.chunk) {
            // Every place of a chunk names its length: the charge is the one counted.
            if last {
                self.in_memory.remove(&step.slot.chunk);
                self.memory -= charge(chunk.len);
            }
            return Ok(Use::Again {
                keep: Keep::Memory(step.slot.chunk),
                last,
            });
        }
        if self.spill {
            return Ok(Use::Again {
                keep: Keep::Spill(step.slot),
                last,
            });
        }
        // Not kept (no room when it was last fetched): fetched here, and kept if a later
        // place needs it and there is room now.
        Ok(Use::Fetch(if last {
            None
        } else {
            self.room(step.slot, chunk.len)
        }))
    }

    /// Where a chunk of `len` bytes fetched now is kept: in memory when there is room, else
    /// in the spill file when there is one.
    fn room(&mut self, slot: Slot, len: u32) -> Option<Keep> {
        if self.memory + charge(len) <= self.bound {
            self.memory += charge(len);
            self.in_memory.insert(slot.chunk);
            Some(Keep::Memory(slot.chunk))
        } else if self.spill {
            Some(Keep::Spill(slot))
        } else {
            None
        }
    }
}

/// What a chunk of `len` bytes kept in memory counts against the bound.
fn charge(len: u32) -> u64 {
    u64::from(len) + KEPT_OVERHEAD
}

/// The writer's side: the recurring chunks fetched so far.
#[derive(Default)]
pub struct Kept {
    memory: HashMap<u64, Bytes>,
    spill: Option<File>,
    /// The chunks in the spill file, by number.
    spilled: Bitmap,
}

impl Kept {
    /// Keeps `data` as the plan said; `dir` is where a spill file is made.
    ///
    /// # Errors
    /// [`Error::Io`] when the spill file cannot be made or written.
    pub fn keep(&mut self, keep: Keep, data: &Bytes, dir: BorrowedFd<'_>) -> Result<()> {
        match keep {
            Keep::Memory(chunk) => {
                self.memory.insert(chunk, data.clone());
            }
            Keep::Spill(slot) => {
                let file = match &self.spill {
                    Some(f) => f,
                    None => self.spill.insert(unnamed_file(dir)?),
                };
                file.write_all_at(data, slot.offset)
                    .map_err(|e| Error::io(SPILL_FILE, e))?;
                self.spilled.set(slot.chunk, true);
            }
        }
        Ok(())
    }

    /// The kept data of a chunk of `len` bytes, dropped when this is its `last` use; `None`
    /// when it was never kept.
    ///
    /// # Errors
    /// [`Error::Io`] when the spill file cannot be read.
    pub fn take(&mut self, keep: Keep, len: u32, last: bool) -> Result<Option<Bytes>> {
        match keep {
            Keep::Memory(chunk) if last => Ok(self.memory.remove(&chunk)),
            Keep::Memory(chunk) => Ok(self.memory.get(&chunk).cloned()),
            Keep::Spill(slot) => {
                let Some(file) = self.spill.as_ref().filter(|_| self.spilled.get(slot.chunk))
                else {
                    return Ok(None);
                };
                let data = read_spilled(file, slot.offset, len as usize)?;
                if last {
                    self.spilled.set(slot.chunk, false);
                    // Frees the disk space; a file system that cannot punch holes keeps it
                    // until the restore ends.
                    let _ = rustix::fs::fallocate(
                        file,
                        rustix::fs::FallocateFlags::PUNCH_HOLE
                            | rustix::fs::FallocateFlags::KEEP_SIZE,
                        slot.offset,
                        u64::from(len).next_multiple_of(BLOCK),
                    );
                }
                Ok(Some(data.into()))
            }
        }
    }
}

/// One bit per number, grown as numbers come.
#[derive(Default)]
struct Bitmap(Vec<u64>);

impl Bitmap {
    fn get(&self, n: u64) -> bool {
        let (word, bit) = Bitmap::place(n);
        self.0.get(word).is_some_and(|w| w & bit != 0)
    }

    fn set(&mut self, n: u64, on: bool) {
        let (word, bit) = Bitmap::place(n);
        if self.0.len() <= word {
            self.0.resize(word + 1, 0);
        }
        if on {
            self.0[word] |= bit;
        } else {
            self.0[word] &= !bit;
        }
    }

    /// The word and bit of `n`.
    fn place(n: u64) -> (usize, u64) {
        ((n / 64) as usize, 1 << (n % 64))
    }
}

/// The spill file, in errors.
const SPILL_FILE: &str = "(restore spill file)";

/// `len` bytes of the spill file at `offset`, read into memory that is not zeroed first (a
/// restore reads back hundreds of megabytes so).
fn read_spilled(file: &File, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        let at = offset + buf.len() as u64;
        let n = rustix::io::pread(file, rustix::buffer::spare_capacity(&mut buf), at)
            .map_err(|e| Error::io(SPILL_FILE, e.into()))?;
        if n == 0 {
            return Err(Error::io(
                SPILL_FILE,
                std::io::ErrorKind::UnexpectedEof.into(),
            ));
        }
    }
    // The capacity may pass `len`, and the read with it.
    buf.truncate(len);
    Ok(buf)
}

/// An unnamed file on `dir`'s file system (gone when closed, so a killed restore leaves
/// nothing), or in the temporary directory where that file system has no `O_TMPFILE`.
///
/// # Errors
/// [`Error::Io`] when neither can be made.
pub fn unnamed_file(dir: BorrowedFd<'_>) -> Result<File> {
    use rustix::fs::{Mode, OFlags};
    match rustix::fs::openat(
        dir,
        ".",
        OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    ) {
        Ok(fd) => Ok(File::from(fd)),
        Err(_) => tempfile::tempfile().map_err(|e| Error::io(std::env::temp_dir(), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;

    use rand::{Rng, SeedableRng};

    fn chunk(n: u8, len: u32) -> ChunkRef {
        ChunkRef {
            id: ChunkId([n; 32]),
            len,
        }
    }

    fn plan_of(places: &[ChunkRef], spill: bool, limit: usize, bound: u64) -> Plan {
        let dir = Some(std::env::temp_dir());
        let mut counter = Counter {
            places: Sorter::with_limit(dir.as_deref(), limit, None),
            next: 0,
            steps: Sorter::with_limit(dir.as_deref(), limit, None),
        };
        places.iter().for_each(|c| counter.fetch(c));
        let mut plan = counter.plan(spill).unwrap();
        plan.bound = bound;
        plan
    }

    /// Each recurring chunk gets a slot in id order, the memory bound holds, a chunk that
    /// does not fit is spilled (or, without a spill file, fetched again), and the last use of
    /// each is marked.
    #[test]
    fn each_place_gets_its_step() {
        let big = (MEMORY / 3) as u32 + 1;
        let places = [
            chunk(1, big),
            chunk(2, big),
            chunk(3, big), // does not fit beside 1 and 2: spilled
            chunk(4, 10),  // used once: not kept
            chunk(1, big),
            chunk(3, big),
            chunk(2, big),
            chunk(1, big),
            chunk(3, big),
        ];
        let next = u64::from(big).next_multiple_of(BLOCK);
        // Chunk 3's slot follows those of 1 and 2, each rounded up to a block.
        let s3 = Slot {
            chunk: 2,
            offset: 2 * next,
        };
        let mut plan = plan_of(&places, false, 1 << 20, MEMORY);
        let uses: Vec<Use> = places.iter().map(|c| plan.at(c).unwrap()).collect();
        assert_eq!(uses[2], Use::Fetch(None));
        assert_eq!(uses[5], Use::Fetch(None));
        assert_eq!(uses[8], Use::Fetch(None));
        let mut plan = plan_of(&places, true, 2, MEMORY);
        let uses: Vec<Use> = places.iter().map(|c| plan.at(c).unwrap()).collect();
        let again = |keep, last| Use::Again { keep, last };
        assert_eq!(
            uses,
            [
                Use::Fetch(Some(Keep::Memory(0))),
                Use::Fetch(Some(Keep::Memory(1))),
                Use::Fetch(Some(Keep::Spill(s3))),
                Use::Fetch(None),
                again(Keep::Memory(0), false),
                again(Keep::Spill(s3), false),
                again(Keep::Memory(1), true),
                again(Keep::Memory(0), true),
                again(Keep::Spill(s3), true),
            ]
        );
        assert_eq!(plan.memory, 0);
        assert!(plan.in_memory.is_empty() && plan.next.is_none());
    }

    /// The bytes of chunk `c` in these tests.
    fn data_of(c: &ChunkRef) -> Bytes {
        (0..c.len).map(|i| (i as u8) ^ c.id.0[0]).collect()
    }

    /// A restore's reader and writer, run on random places with plans sorted through runs of
    /// a few records: every place gets its chunk's bytes; with a spill file each chunk is
    /// fetched once, unless its first fetch was lost (an entry the target refused), and then
    /// it is fetched again; memory stays within the bound; at the end nothing is held and the
    /// spill file's space is freed. One id named with two lengths is two chunks.
    #[test]
    fn a_restore_gets_every_chunk_right_and_fetches_each_once() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(19);
        let chunks: Vec<ChunkRef> = (0..120u32)
            .map(|n| ChunkRef {
                id: ChunkId::of(&(n % 100).to_le_bytes()),
                len: rng.gen_range(1..9000),
            })
            .collect();
        let places: Vec<ChunkRef> = (0..3000)
            .map(|_| chunks[rng.gen_range(0..chunks.len())])
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let fd = File::open(dir.path()).unwrap();
        for (spill, lose) in [(true, false), (true, true), (false, false)] {
            let bound = 60_000;
            let mut plan = plan_of(&places, spill, 7, bound);
            let mut kept = Kept::default();
            let mut fetched = BTreeMap::new();
            let mut lost = 0;
            let mut fetch = |c: &ChunkRef| {
                *fetched.entry((c.id, c.len)).or_insert(0) += 1;
                data_of(c)
            };
            for c in &places {
                let data = match plan.at(c).unwrap() {
                    Use::Fetch(keep) => {
                        let data = fetch(c);
                        if let Some(keep) = keep {
                            if lose && rng.gen_ratio(1, 20) {
                                lost += 1;
                            } else {
                                kept.keep(keep, &data, fd.as_fd()).unwrap();
                            }
                        }
                        data
                    }
                    Use::Again { keep, last } => match kept.take(keep, c.len, last).unwrap() {
                        Some(data) => data,
                        None => {
                            assert!(lose, "{c:?} was kept but is gone");
                            fetch(c)
                        }
                    },
                };
                assert_eq!(data, data_of(c));
                assert!(plan.memory <= bound);
            }
            let distinct: std::collections::BTreeSet<_> =
                places.iter().map(|c| (c.id, c.len)).collect();
            assert_eq!(fetched.len(), distinct.len());
            if spill && !lose {
                assert!(fetched.values().all(|n| *n == 1), "{fetched:?}");
            }
            if lose {
                assert!(lost > 0 && fetched.values().any(|n| *n > 1));
            }
            if !spill {
                assert!(kept.spill.is_none());
                assert!(fetched.values().any(|n| *n > 1), "the bound was never hit");
            }
            assert!(plan.in_memory.is_empty() && plan.memory == 0);
            assert!(kept.memory.is_empty() && kept.spilled.0.iter().all(|w| *w == 0));
            if let Some(file) = &kept.spill {
                assert!(file.metadata().unwrap().len() > 0);
                assert_eq!(file.metadata().unwrap().blocks(), 0, "holes punched");
            }
        }
        // The spill file has no name in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
