//! The payload of a format-2 tree snapshot: where files smaller than an average chunk keep
//! their bytes, so that a tree of small files is stored in few, chunk-sized objects.
//!
//! A backup appends each small file it reads to the **fresh** stream, chunked as one
//! content-defined stream; the catalog entry records the file's offset there ([`Slice`]). A
//! file that did not change keeps its bytes where they are: the chunks of the previous
//! snapshot's payload holding it are appended, whole, to the **reused** stream (once for a run
//! of files sharing a chunk), and the entry points into that. No unchanged file is opened, and
//! no forced cut breaks the fresh stream's chunking.
//!
//! Each stream is stored as a binary ref list (36 bytes per chunk, like a block image's),
//! whose own refs the snapshot record holds ([`Payload`]). The bytes of reused chunks that no
//! file of the snapshot uses are its *padding*: they keep older chunks alive. When the
//! parent's padding passes [`PADDING_BUDGET`] of its payload, the next backup reads its small
//! files again instead, which lets gc free those chunks once the older snapshots are
//! forgotten (ARCHITECTURE.md, "Repository format 2").

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;

use crate::catalog::{Slice, Stream};
use crate::chunker::{ChunkerParams, Mode};
use crate::error::{Error, Result};
use crate::gc::Session;
use crate::id::ChunkRef;
use crate::pipeline::{ChunkWriter, StreamReader, StreamWriter};
use crate::repository::Repository;

/// Padding allowed, as a fraction of a snapshot's payload, before small files are read again.
pub const PADDING_BUDGET: f64 = 0.1;

/// The payload streams of a snapshot, in its record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    /// Refs of the fresh stream's ref list.
    pub fresh: Vec<ChunkRef>,
    pub fresh_len: u64,
    /// Refs of the reused stream's ref list.
    pub reused: Vec<ChunkRef>,
    pub reused_len: u64,
    /// Bytes of reused chunks that no file of this snapshot uses.
    pub padding: u64,
}

impl Payload {
    /// Whether a backup on top of this snapshot may keep reusing its payload chunks.
    pub fn within_budget(&self) -> bool {
        (self.padding as f64) <= PADDING_BUDGET * (self.fresh_len + self.reused_len) as f64
    }
}

/// Stores `refs` as a binary ref list and returns the list's own refs.
pub(super) fn store_ref_list(writer: &ChunkWriter, refs: &[ChunkRef]) -> Result<Vec<ChunkRef>> {
    let mut list = StreamWriter::new(writer, Mode::ContentDefined);
    for r in refs {
        list.write_all(&r.encode())?;
    }
    Ok(list.finish()?.0)
}

/// One chunk's part in a file: `take` bytes from `skip` on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub stream: Stream,
    /// The chunk's place in its stream, telling apart two uses of one chunk.
    pub index: usize,
    pub chunk: ChunkRef,
    pub skip: u32,
    pub take: u32,
}

/// Chunks shorter than the chunker's minimum that a reused stream may hold: the last chunk of
/// each earlier backup's fresh stream (65,536 nightly backups is 179 years), 2.9 MB of index.
const REUSED_SHORT_CHUNKS: u64 = 1 << 16;

/// Refs per page of a stream's index. A stream of at most one page (4 GiB of small files at
/// 1 MiB chunks) is held in memory; a longer one is written to an unnamed scratch file in the
/// temporary directory and read back a page at a time, so memory does not grow with the
/// stream: 8 bytes per page in memory, and the last page read.
const PAGE_REFS: usize = 4096;

/// Consecutive refs of a stream with where each ends.
#[derive(Default)]
struct Page {
    /// The place in the stream of the first.
    first: usize,
    refs: Vec<ChunkRef>,
    ends: Vec<u64>,
}

/// One payload stream's chunks with where each ends, for finding a slice's chunks.
struct StreamIndex {
    /// Where each page's last chunk ends.
    page_ends: Vec<u64>,
    /// The pages past the first, 36 bytes per ref, when there are any.
    file: Option<File>,
    /// The page last read (the only one when there is no file). Slices come in stream order
    /// from a catalog read in order, so this is nearly always the page wanted.
    page: Mutex<Arc<Page>>,
    page_refs: usize,
    /// Refs in the stream.
    count: usize,
}

impl StreamIndex {
    /// The most refs a list of a stream of `len` bytes may hold. The record that declares
    /// `len` is untrusted, so the list is checked against it before anything is allocated: a
    /// fresh stream's chunks are at least the chunker's minimum but the last, so it holds at
    /// most `len / min + 1` refs; a reused stream's come whole from earlier fresh streams,
    /// each of which may add its short last chunk: [`REUSED_SHORT_CHUNKS`] more.
    fn most_refs(len: u64, stream: Stream, chunker: &ChunkerParams) -> u64 {
        let short = match stream {
            Stream::Fresh => 1,
            Stream::Reused => REUSED_SHORT_CHUNKS,
        };
        len / u64::from(chunker.min_size) + short
    }

    /// Reads a ref list of a stream of `len` bytes: at most `most` refs, none empty, none over
    /// the chunker's maximum, adding up to `len`. Pages hold `page_refs` refs.
    fn read(
        mut list: impl std::io::BufRead,
        len: u64,
        most: u64,
        chunker: &ChunkerParams,
        page_refs: usize,
    ) -> Result<Self> {
        let corrupt = |reason: String| Error::Corrupt {
            object: "payload ref list".into(),
            reason,
        };
        let mut index = StreamIndex {
            page_ends: Vec::new(),
            file: None,
            page: Mutex::default(),
            page_refs,
            count: 0,
        };
        let mut page = Page::default();
        let mut end = 0u64;
        let mut rec = [0u8; ChunkRef::ENCODED_LEN];
        while super::restore::read_record(&mut list, &mut rec)? {
            let r = ChunkRef::decode(&rec);
            if r.len == 0 || r.len > chunker.max_size {
                return Err(corrupt(format!(
                    "holds a chunk of {} bytes, outside the chunker's 1..={}",
                    r.len, chunker.max_size
                )));
            }
            if index.count as u64 >= most {
                return Err(corrupt(format!(
                    "holds more than the {most} chunks a stream of {len} bytes can have"
                )));
            }
            if page.refs.len() == page_refs {
                index.write_page(&page)?;
                page = Page {
                    first: page.first + page_refs,
                    ..Page::default()
                };
            }
            end += u64::from(r.len);
            index.count += 1;
            page.refs.push(r);
            page.ends.push(end);
        }
        if end != len {
            return Err(corrupt(format!(
                "its chunks add up to {end} bytes, the record says {len}"
            )));
        }
        match index.file {
            Some(_) if !page.refs.is_empty() => index.write_page(&page)?,
            Some(_) => {}
            None => index.page_ends.push(end),
        }
        index.page = Mutex::new(Arc::new(page));
        Ok(index)
    }

    /// Ends a full page: its end is kept, its refs go to the scratch file.
    fn write_page(&mut self, page: &Page) -> Result<()> {
        let file = match &mut self.file {
            Some(f) => f,
            None => self
                .file
                .insert(tempfile::tempfile().map_err(|e| Error::io(std::env::temp_dir(), e))?),
        };
        let mut out = std::io::BufWriter::new(file);
        for r in &page.refs {
            out.write_all(&r.encode()).map_err(scratch_error)?;
        }
        out.flush().map_err(scratch_error)?;
        self.page_ends.push(*page.ends.last().expect("a full page"));
        Ok(())
    }

    /// Where the stream ends.
    fn end(&self) -> u64 {
        self.page_ends.last().copied().unwrap_or(0)
    }

    /// The page holding the first chunk that ends after `at` (which is below the stream's
    /// end).
    fn page_at(&self, at: u64) -> Result<Arc<Page>> {
        let mut held = self.page.lock().expect("payload page lock");
        let Some(file) = &self.file else {
            return Ok(Arc::clone(&held));
        };
        let wanted = self.page_ends.partition_point(|&e| e <= at);
        let page_refs = self.page_refs;
        if held.first == wanted * page_refs {
            return Ok(Arc::clone(&held));
        }
        let start = if wanted == 0 {
            0
        } else {
            self.page_ends[wanted - 1]
        };
        let first = wanted * page_refs;
        let mut bytes = vec![0u8; page_refs.min(self.count - first) * ChunkRef::ENCODED_LEN];
        file.read_exact_at(&mut bytes, (first * ChunkRef::ENCODED_LEN) as u64)
            .map_err(scratch_error)?;
        let mut page = Page {
            first,
            ..Page::default()
        };
        let mut end = start;
        for rec in bytes.chunks_exact(ChunkRef::ENCODED_LEN) {
            let r = ChunkRef::decode(rec.try_into().expect("a record"));
            end += u64::from(r.len);
            page.refs.push(r);
            page.ends.push(end);
        }
        *held = Arc::new(page);
        Ok(Arc::clone(&held))
    }
}

fn scratch_error(e: std::io::Error) -> Error {
    Error::io("(payload index scratch file)", e)
}

/// Both payload streams of one snapshot, to map slices to chunks: in memory up to a page of
/// refs each (4,096), in a scratch file beyond.
pub struct PayloadIndex {
    fresh: StreamIndex,
    reused: StreamIndex,
    /// The snapshot, for errors.
    snapshot: String,
}

impl PayloadIndex {
    /// Reads the ref lists of `payload`, the payload of snapshot `snapshot`, each checked
    /// against its declared length before a byte of it is fetched.
    ///
    /// # Errors
    /// Errors reading the lists; [`Error::Corrupt`] when a list disagrees with the record.
    pub fn load(
        repo: &Arc<Repository>,
        rt: &Handle,
        snapshot: &str,
        payload: &Payload,
    ) -> Result<Self> {
        let chunker = repo.config().chunker;
        let list = |root: &[ChunkRef], len: u64, stream: Stream| {
            let most = StreamIndex::most_refs(len, stream, &chunker);
            let bytes = most.saturating_mul(ChunkRef::ENCODED_LEN as u64);
            StreamReader::index(
                Arc::clone(repo),
                rt.clone(),
                root,
                "payload ref list",
                bytes,
            )
        };
        let context = |e: Error| e.context(format!("reading the payload of snapshot {snapshot}"));
        let fresh = list(&payload.fresh, payload.fresh_len, Stream::Fresh).map_err(context)?;
        let reused = list(&payload.reused, payload.reused_len, Stream::Reused).map_err(context)?;
        Self::read(fresh, reused, payload, &chunker, snapshot).map_err(context)
    }

    /// Parses the ref lists `fresh` and `reused` of `payload` (their lengths are its say).
    ///
    /// # Errors
    /// [`Error::Corrupt`] when a list disagrees with the record or the chunker.
    pub fn read(
        fresh: impl std::io::BufRead,
        reused: impl std::io::BufRead,
        payload: &Payload,
        chunker: &ChunkerParams,
        snapshot: &str,
    ) -> Result<Self> {
        Self::read_paged(fresh, reused, payload, chunker, snapshot, PAGE_REFS)
    }

    /// [`PayloadIndex::read`] with pages of `page_refs` refs.
    fn read_paged(
        fresh: impl std::io::BufRead,
        reused: impl std::io::BufRead,
        payload: &Payload,
        chunker: &ChunkerParams,
        snapshot: &str,
        page_refs: usize,
    ) -> Result<Self> {
        let most = |len, stream| StreamIndex::most_refs(len, stream, chunker);
        let (fresh_len, reused_len) = (payload.fresh_len, payload.reused_len);
        Ok(PayloadIndex {
            fresh: StreamIndex::read(
                fresh,
                fresh_len,
                most(fresh_len, Stream::Fresh),
                chunker,
                page_refs,
            )?,
            reused: StreamIndex::read(
                reused,
                reused_len,
                most(reused_len, Stream::Reused),
                chunker,
                page_refs,
            )?,
            snapshot: snapshot.to_string(),
        })
    }

    /// The chunks holding `size` bytes at `slice`, in order.
    ///
    /// # Errors
    /// [`Error::Corrupt`] when the slice reaches past its stream's end.
    pub fn pieces(&self, slice: Slice, size: u64) -> Result<Vec<Piece>> {
        let stream = match slice.stream {
            Stream::Fresh => &self.fresh,
            Stream::Reused => &self.reused,
        };
        let end = slice.offset.checked_add(size);
        if end.is_none_or(|end| end > stream.end()) {
            return Err(Error::Corrupt {
                object: format!("catalog of snapshot {}", self.snapshot),
                reason: format!(
                    "a slice of {size} bytes at {} passes the end of the {:?} payload",
                    slice.offset, slice.stream
                ),
            });
        }
        let mut pieces = Vec::new();
        let (mut at, mut left) = (slice.offset, size);
        while left > 0 {
            let page = stream.page_at(at)?;
            // The first chunk ending after `at`.
            let mut i = page.ends.partition_point(|&e| e <= at);
            if i == page.refs.len() {
                // Only a scratch file changed under the restore gets here; never loop on it.
                return Err(scratch_error(std::io::Error::other(format!(
                    "its page from chunk {} does not hold offset {at}",
                    page.first
                ))));
            }
            while left > 0 && i < page.refs.len() {
                let chunk = page.refs[i];
                let start = page.ends[i] - u64::from(chunk.len);
                let skip = (at - start) as u32;
                let take = (u64::from(chunk.len - skip)).min(left) as u32;
                pieces.push(Piece {
                    stream: slice.stream,
                    index: page.first + i,
                    chunk,
                    skip,
                    take,
                });
                at += u64::from(take);
                left -= u64::from(take);
                i += 1;
            }
        }
        Ok(pieces)
    }
}

/// The payload chunks holding `entry`'s bytes (none for an entry without a slice), from the
/// payload index of snapshot `snapshot`, if it has one.
///
/// # Errors
/// [`Error::Corrupt`] for a slice outside the payload, or in a snapshot without one.
pub fn pieces_of(
    index: Option<&PayloadIndex>,
    snapshot: &str,
    entry: &crate::catalog::Entry,
) -> Result<Vec<Piece>> {
    match (entry.slice, index) {
        (None, _) => Ok(Vec::new()),
        (Some(slice), Some(index)) => index.pieces(slice, entry.size),
        (Some(_), None) => Err(Error::Corrupt {
            object: format!("catalog of snapshot {snapshot}"),
            reason: format!(
                "{} is in a payload, and the snapshot has none",
                entry.display_path()
            ),
        }),
    }
}

/// All of a file entry's bytes as pieces of chunks to read in order: its payload slice
/// ([`pieces_of`]), then its own chunks. For readers that fetch pieces (`dump`, `mount`).
///
/// # Errors
/// Those of [`pieces_of`].
pub fn file_pieces(
    index: Option<&PayloadIndex>,
    snapshot: &str,
    entry: &crate::catalog::Entry,
) -> Result<Vec<crate::pipeline::Piece>> {
    Ok(pieces_of(index, snapshot, entry)?
        .into_iter()
        .map(|p| (p.chunk, p.skip, p.take))
        .chain(entry.content.iter().map(|&c| (c, 0, c.len)))
        .collect())
}

/// Writes the payload of a new snapshot.
pub struct PayloadWriter<'a> {
    fresh: StreamWriter<'a>,
    reused: Vec<ChunkRef>,
    reused_len: u64,
    /// The previous snapshot's chunk last appended to `reused` (stream, index), with its
    /// offset there: the next unchanged file often starts in it.
    last: Option<(Stream, usize, u64)>,
    /// Bytes of `reused` that files use.
    used: u64,
}

impl<'a> PayloadWriter<'a> {
    pub fn new(writer: &'a ChunkWriter) -> Self {
        PayloadWriter {
            fresh: StreamWriter::new(writer, Mode::ContentDefined),
            reused: Vec::new(),
            reused_len: 0,
            last: None,
            used: 0,
        }
    }

    /// Appends a file's bytes to the fresh stream.
    pub fn append(&mut self, data: &[u8]) -> Result<Slice> {
        let offset = self.fresh.written();
        self.fresh.write_all(data)?;
        Ok(Slice {
            stream: Stream::Fresh,
            offset,
        })
    }

    /// Takes a file's `size` bytes at `slice` of the previous snapshot (`previous`) without
    /// reading it. `None` when a gc run condemned one of its chunks: the file must be read.
    ///
    /// # Errors
    /// [`Error::Corrupt`] for a slice outside the previous payload.
    pub fn reuse(
        &mut self,
        previous: &PayloadIndex,
        slice: Slice,
        size: u64,
        session: &Session,
    ) -> Result<Option<Slice>> {
        let pieces = previous.pieces(slice, size)?;
        let refs: Vec<ChunkRef> = pieces.iter().map(|p| p.chunk).collect();
        let Some(first) = pieces.first() else {
            return Ok(None);
        };
        if !session.refs_usable(&refs) {
            return Ok(None);
        }
        let (start, new) = match self.last {
            Some((stream, index, offset)) if stream == first.stream && index == first.index => {
                (offset, &pieces[1..])
            }
            _ => (self.reused_len, &pieces[..]),
        };
        for p in new {
            self.last = Some((p.stream, p.index, self.reused_len));
            self.reused.push(p.chunk);
            self.reused_len += u64::from(p.chunk.len);
        }
        self.used += size;
        Ok(Some(Slice {
            stream: Stream::Reused,
            offset: start + u64::from(first.skip),
        }))
    }

    /// Ends both streams and stores their ref lists.
    pub fn finish(self, writer: &ChunkWriter) -> Result<Payload> {
        let (fresh, fresh_len) = self.fresh.finish()?;
        Ok(Payload {
            fresh: store_ref_list(writer, &fresh)?,
            fresh_len,
            reused: store_ref_list(writer, &self.reused)?,
            reused_len: self.reused_len,
            padding: self.reused_len.saturating_sub(self.used),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::ChunkId;

    /// Chunk sizes that the tiny test chunks fit.
    const CHUNKER: ChunkerParams = ChunkerParams {
        min_size: 1,
        avg_size: 2,
        max_size: 1 << 20,
    };

    fn paged(lens: &[u32], page_refs: usize) -> PayloadIndex {
        let list: Vec<u8> = lens
            .iter()
            .enumerate()
            .flat_map(|(i, &len)| {
                let id = ChunkId(blake3::hash(&i.to_le_bytes()).into());
                ChunkRef { id, len }.encode()
            })
            .collect();
        let payload = Payload {
            fresh_len: lens.iter().map(|&l| u64::from(l)).sum(),
            ..Payload::default()
        };
        PayloadIndex::read_paged(&list[..], &[][..], &payload, &CHUNKER, "s1", page_refs).unwrap()
    }

    fn index(lens: &[u32]) -> PayloadIndex {
        paged(lens, PAGE_REFS)
    }

    fn at(offset: u64) -> Slice {
        Slice {
            stream: Stream::Fresh,
            offset,
        }
    }

    #[test]
    fn a_slice_maps_to_the_chunks_that_hold_it() {
        let index = index(&[100, 50, 200]);
        let parts = |offset, size| -> Vec<(usize, u32, u32)> {
            index
                .pieces(at(offset), size)
                .unwrap()
                .iter()
                .map(|p| (p.index, p.skip, p.take))
                .collect()
        };
        assert_eq!(parts(0, 100), [(0, 0, 100)]);
        assert_eq!(parts(100, 10), [(1, 0, 10)]);
        assert_eq!(parts(90, 70), [(0, 90, 10), (1, 0, 50), (2, 0, 10)]);
        assert_eq!(parts(340, 10), [(2, 190, 10)]);
    }

    #[test]
    fn a_slice_past_the_end_is_corrupt_and_named() {
        let index = index(&[100]);
        for (offset, size) in [(95, 10), (u64::MAX, 2), (0, 101)] {
            let err = index.pieces(at(offset), size).unwrap_err();
            assert!(matches!(err, Error::Corrupt { .. }), "{err}");
            assert!(err.to_string().contains("s1"), "{err}");
        }
        let reused = Slice {
            stream: Stream::Reused,
            offset: 0,
        };
        assert!(index.pieces(reused, 1).is_err());
    }

    /// Pages in a scratch file give the pieces that one page in memory gives, for slices
    /// read in stream order and in any order, crossing pages or not.
    #[test]
    fn a_paged_index_agrees_with_one_in_memory() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(19);
        let lens: Vec<u32> = (0..500).map(|_| rng.gen_range(1..300)).collect();
        let end: u64 = lens.iter().map(|&l| u64::from(l)).sum();
        let whole = index(&lens);
        assert!(whole.fresh.file.is_none());
        let mut slices: Vec<(u64, u64)> = (0..2000)
            .map(|_| {
                let offset = rng.gen_range(0..end);
                (offset, rng.gen_range(0..=(end - offset).min(700)))
            })
            .collect();
        for page_refs in [1, 7, 64, 500] {
            let paged = paged(&lens, page_refs);
            assert_eq!(paged.fresh.file.is_some(), page_refs < lens.len());
            slices.sort_unstable();
            let mut ordered = true;
            for _ in 0..2 {
                for &(offset, size) in &slices {
                    assert_eq!(
                        paged.pieces(at(offset), size).unwrap(),
                        whole.pieces(at(offset), size).unwrap(),
                        "{size} bytes at {offset}, pages of {page_refs}, ordered: {ordered}"
                    );
                }
                slices.sort_unstable_by_key(|&(offset, size)| (offset * 7919 + size) % 1009);
                ordered = false;
            }
            assert!(paged.pieces(at(end - 1), 2).is_err());
        }
    }

    #[test]
    fn the_padding_budget_is_a_tenth_of_the_payload() {
        let payload = |padding| Payload {
            fresh_len: 600,
            reused_len: 400,
            padding,
            ..Payload::default()
        };
        assert!(payload(100).within_budget());
        assert!(!payload(101).within_budget());
    }
}
