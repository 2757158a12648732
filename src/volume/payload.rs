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

use std::sync::Arc;

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

/// One payload stream's chunks with where each ends, for finding a slice's chunks.
#[derive(Default)]
struct StreamIndex {
    refs: Vec<ChunkRef>,
    ends: Vec<u64>,
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
    /// the chunker's maximum, adding up to `len`.
    fn read(
        mut list: impl std::io::BufRead,
        len: u64,
        most: u64,
        chunker: &ChunkerParams,
    ) -> Result<Self> {
        let corrupt = |reason: String| Error::Corrupt {
            object: "payload ref list".into(),
            reason,
        };
        let mut index = StreamIndex::default();
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
            if index.refs.len() as u64 >= most {
                return Err(corrupt(format!(
                    "holds more than the {most} chunks a stream of {len} bytes can have"
                )));
            }
            end += u64::from(r.len);
            index.refs.push(r);
            index.ends.push(end);
        }
        if end != len {
            return Err(corrupt(format!(
                "its chunks add up to {end} bytes, the record says {len}"
            )));
        }
        Ok(index)
    }
}

/// Both payload streams of one snapshot, held in memory (44 bytes per chunk) to map slices to
/// chunks.
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
        let most = |len, stream| StreamIndex::most_refs(len, stream, chunker);
        let (fresh_len, reused_len) = (payload.fresh_len, payload.reused_len);
        Ok(PayloadIndex {
            fresh: StreamIndex::read(fresh, fresh_len, most(fresh_len, Stream::Fresh), chunker)?,
            reused: StreamIndex::read(
                reused,
                reused_len,
                most(reused_len, Stream::Reused),
                chunker,
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
        if end.is_none_or(|end| end > stream.ends.last().copied().unwrap_or(0)) {
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
        // The first chunk ending after `at`.
        let mut index = stream.ends.partition_point(|&e| e <= at);
        while left > 0 {
            let chunk = stream.refs[index];
            let start = stream.ends[index] - u64::from(chunk.len);
            let skip = (at - start) as u32;
            let take = (u64::from(chunk.len - skip)).min(left) as u32;
            pieces.push(Piece {
                stream: slice.stream,
                index,
                chunk,
                skip,
                take,
            });
            at += u64::from(take);
            left -= u64::from(take);
            index += 1;
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

    fn index(lens: &[u32]) -> PayloadIndex {
        let mut fresh = StreamIndex::default();
        let mut end = 0;
        for (i, &len) in lens.iter().enumerate() {
            end += u64::from(len);
            fresh.refs.push(ChunkRef {
                id: ChunkId([i as u8 + 1; 32]),
                len,
            });
            fresh.ends.push(end);
        }
        PayloadIndex {
            fresh,
            reused: StreamIndex::default(),
            snapshot: "s1".into(),
        }
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
