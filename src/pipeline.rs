//! The chunk pipeline: bytes in, chunk refs out (and back).
//!
//! Writing: the caller's thread chunks and hashes (BLAKE3 runs at several GB/s on one core) and
//! drops chunks already known or all-zero; each new chunk is compressed on the rayon pool and
//! uploaded on the tokio runtime. A byte budget bounds the data in flight, so memory stays flat
//! however large the source is: when the budget is spent, the caller's thread waits.
//! [`ChunkWriter::flush`] waits for every upload and reports the first failure.
//!
//! Reading: [`fetch`] downloads a chunk on the runtime and decodes and re-hashes it on rayon;
//! [`StreamReader`] reads a ref list as one byte stream with a window of chunks fetched ahead.
//!
//! The API is blocking (it is called from walker and writer threads) and drives async work
//! through a runtime [`Handle`]; never call it from inside an async task.

use std::collections::VecDeque;
use std::io::{self, BufRead, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use bytes::Bytes;
use serde::Serialize;
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::chunker::{Chunker, Mode};
use crate::error::{Error, Result};
use crate::gc::{Claim, Session};
use crate::id::{is_all_zero, ChunkRef};
use crate::repository::Repository;

/// Bytes of chunk data allowed in flight (read but not yet stored) by default.
pub const DEFAULT_IN_FLIGHT: usize = 64 << 20;
/// Concurrent store requests per pipeline, within the bytes in flight: small objects to a
/// store far away need many at once (7,911 small files to Garage behind 20 ms: 8.7 s with 16,
/// 2.9 s with 128; `LATENCY_MS=20 TREE=... benches/store.sh`).
const MAX_REQUESTS: usize = 128;

/// Counters of a [`ChunkWriter`], in plaintext bytes unless named otherwise.
#[derive(Debug, Default)]
pub struct WriteStats {
    pub chunks_new: AtomicU64,
    pub bytes_new: AtomicU64,
    /// Encoded (compressed) bytes uploaded.
    pub bytes_uploaded: AtomicU64,
    pub chunks_dedup: AtomicU64,
    pub bytes_dedup: AtomicU64,
    pub bytes_zero: AtomicU64,
}

/// A plain copy of [`WriteStats`].
#[derive(Clone, Copy, Debug, Default, Serialize, serde::Deserialize)]
pub struct WriteSummary {
    pub chunks_new: u64,
    pub bytes_new: u64,
    pub bytes_uploaded: u64,
    pub chunks_dedup: u64,
    pub bytes_dedup: u64,
    pub bytes_zero: u64,
}

impl WriteStats {
    pub fn summary(&self) -> WriteSummary {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        WriteSummary {
            chunks_new: g(&self.chunks_new),
            bytes_new: g(&self.bytes_new),
            bytes_uploaded: g(&self.bytes_uploaded),
            chunks_dedup: g(&self.chunks_dedup),
            bytes_dedup: g(&self.bytes_dedup),
            bytes_zero: g(&self.bytes_zero),
        }
    }
}

/// Counts bytes in flight and makes writers wait while the budget is spent.
#[derive(Debug)]
struct Budget {
    limit: usize,
    used: Mutex<usize>,
    changed: Condvar,
}

impl Budget {
    fn acquire(&self, n: usize) {
        let mut used = self.used.lock().expect("budget lock");
        // A chunk larger than the whole budget still goes, alone.
        while *used > 0 && *used + n > self.limit {
            used = self.changed.wait(used).expect("budget lock");
        }
        *used += n;
    }

    fn release(&self, n: usize) {
        *self.used.lock().expect("budget lock") -= n;
        self.changed.notify_all();
    }

    fn wait_idle(&self) {
        let mut used = self.used.lock().expect("budget lock");
        while *used > 0 {
            used = self.changed.wait(used).expect("budget lock");
        }
    }
}

struct Shared {
    repo: Arc<Repository>,
    session: Arc<Session>,
    budget: Budget,
    requests: Arc<Semaphore>,
    failure: Mutex<Option<Error>>,
    stats: WriteStats,
}

/// Stores chunks with deduplication, parallel compression and bounded memory.
#[derive(Clone)]
pub struct ChunkWriter {
    shared: Arc<Shared>,
    rt: Handle,
}

impl ChunkWriter {
    /// A writer storing the chunks of backup `session`.
    pub fn new(session: Arc<Session>, rt: Handle, in_flight: usize) -> Self {
        ChunkWriter {
            shared: Arc::new(Shared {
                repo: Arc::clone(session.repo()),
                session,
                budget: Budget {
                    limit: in_flight,
                    used: Mutex::new(0),
                    changed: Condvar::new(),
                },
                requests: Arc::new(Semaphore::new(MAX_REQUESTS)),
                failure: Mutex::new(None),
                stats: WriteStats::default(),
            }),
            rt,
        }
    }

    pub fn repo(&self) -> &Arc<Repository> {
        &self.shared.repo
    }

    /// The backup session this writer stores for.
    pub fn session(&self) -> &Arc<Session> {
        &self.shared.session
    }

    pub fn stats(&self) -> &WriteStats {
        &self.shared.stats
    }

    /// Stores one chunk (unless known or all-zero) and returns its ref at once; the upload
    /// finishes in the background. Blocks while the in-flight budget is spent.
    ///
    /// # Errors
    /// The first failure of an earlier background upload.
    pub fn write(&self, data: Bytes) -> Result<ChunkRef> {
        self.check_failure()?;
        let shared = &self.shared;
        let len = data.len();
        let len32 = u32::try_from(len).expect("chunks are below 4 GiB");
        if is_all_zero(&data) {
            shared
                .stats
                .bytes_zero
                .fetch_add(len as u64, Ordering::Relaxed);
            return Ok(ChunkRef::zero(len32));
        }
        let id = shared.repo.chunk_id(&data);
        let claim = shared.session.claim(id);
        if claim == Claim::Known {
            shared.stats.chunks_dedup.fetch_add(1, Ordering::Relaxed);
            shared
                .stats
                .bytes_dedup
                .fetch_add(len as u64, Ordering::Relaxed);
            return Ok(ChunkRef { id, len: len32 });
        }
        shared.budget.acquire(len);
        // A chunk is a slice of the chunker's buffer (four maximum-size chunks and more):
        // waiting for compression it would keep that whole buffer alive, and the budget, which
        // counts the chunk, would bound nothing (a 1.4 GB first backup peaked anywhere from
        // 225 to 315 MiB). An exact copy is what waits.
        let data = Bytes::copy_from_slice(&data);
        let shared = Arc::clone(shared);
        let rt = self.rt.clone();
        rayon::spawn(move || {
            let encoded = shared.repo.encode_chunk(&id, &data);
            drop(data);
            rt.spawn(async move {
                let uploaded = encoded.len() as u64;
                let permit = shared.requests.clone().acquire_owned().await;
                let result = match claim {
                    Claim::Condemned => match shared.session.rescue(&id).await {
                        Ok(()) => shared.repo.put_chunk(&id, encoded).await,
                        Err(e) => Err(e),
                    },
                    _ => shared.repo.put_chunk(&id, encoded).await,
                };
                drop(permit);
                match result {
                    Ok(()) => {
                        let s = &shared.stats;
                        s.chunks_new.fetch_add(1, Ordering::Relaxed);
                        s.bytes_new.fetch_add(len as u64, Ordering::Relaxed);
                        s.bytes_uploaded.fetch_add(uploaded, Ordering::Relaxed);
                    }
                    Err(e) => {
                        shared.session.unclaim(&id);
                        shared
                            .failure
                            .lock()
                            .expect("failure lock")
                            .get_or_insert(e);
                    }
                }
                shared.budget.release(len);
            });
        });
        Ok(ChunkRef { id, len: len32 })
    }

    /// Waits until every chunk written so far is stored.
    ///
    /// # Errors
    /// The first upload failure.
    pub fn flush(&self) -> Result<()> {
        self.shared.budget.wait_idle();
        self.check_failure()
    }

    fn check_failure(&self) -> Result<()> {
        match self.shared.failure.lock().expect("failure lock").take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Chunks a byte stream written to it and collects the refs, in order.
pub struct StreamWriter<'a> {
    writer: &'a ChunkWriter,
    chunker: Chunker,
    refs: Vec<ChunkRef>,
    len: u64,
}

impl<'a> StreamWriter<'a> {
    pub fn new(writer: &'a ChunkWriter, mode: Mode) -> Self {
        StreamWriter {
            chunker: Chunker::new(
                writer.repo().config().chunker,
                mode,
                writer.repo().chunker_seed(),
            ),
            writer,
            refs: Vec::new(),
            len: 0,
        }
    }

    /// Adds bytes to the stream.
    pub fn write_all(&mut self, data: &[u8]) -> Result<()> {
        self.len += data.len() as u64;
        let (writer, refs) = (self.writer, &mut self.refs);
        self.chunker
            .push(data, &mut |chunk| writer.write(chunk).map(|r| refs.push(r)))
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.len
    }

    /// Ends the stream and returns its refs and length. The chunks may still be uploading:
    /// see [`ChunkWriter::flush`].
    pub fn finish(mut self) -> Result<(Vec<ChunkRef>, u64)> {
        let (writer, refs) = (self.writer, &mut self.refs);
        self.chunker
            .finish(&mut |chunk| writer.write(chunk).map(|r| refs.push(r)))?;
        Ok((self.refs, self.len))
    }
}

impl io::Write for StreamWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf).map_err(io::Error::other)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Starts fetching a chunk: download on the runtime, decode and re-hash on rayon.
/// A zero ref yields zeros without touching the store.
pub fn fetch(repo: &Arc<Repository>, rt: &Handle, r: ChunkRef) -> JoinHandle<Result<Bytes>> {
    let repo = Arc::clone(repo);
    rt.spawn(async move {
        if r.is_zero() {
            return Ok(Bytes::from(vec![0u8; r.len as usize]));
        }
        let raw = repo.get_chunk_raw(&r.id).await?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        rayon::spawn(move || {
            let _ = tx.send(repo.decode_chunk(&r.id, &raw));
        });
        let data = rx.await.expect("decode task dropped")?;
        if data.len() != r.len as usize {
            return Err(Error::Corrupt {
                object: Repository::chunk_key(&r.id),
                reason: format!("holds {} bytes, its reference says {}", data.len(), r.len),
            });
        }
        Ok(data)
    })
}

/// Waits for a fetch started by [`fetch`], from a blocking thread.
pub fn wait(rt: &Handle, handle: JoinHandle<Result<Bytes>>) -> Result<Bytes> {
    rt.block_on(handle).expect("fetch task panicked")
}

/// `take` bytes of a chunk from `skip` on: one piece of a stream that uses parts of chunks (a
/// file held in a payload chunk); a whole chunk is `(r, 0, r.len)`.
pub type Piece = (ChunkRef, u32, u32);

/// Reads a ref list (or pieces of chunks) as one byte stream, fetching `window` chunks ahead.
/// A run of zeros (a ref with the all-zero id) is read from a shared zero page, never
/// allocated at its length.
pub struct StreamReader {
    repo: Arc<Repository>,
    rt: Handle,
    pieces: Box<dyn Iterator<Item = Piece> + Send>,
    pending: VecDeque<Pending>,
    window: usize,
    current: Bytes,
    /// Zeros of the current zero run still to read.
    zeros: u64,
}

enum Pending {
    Fetch(JoinHandle<Result<Bytes>>, Piece),
    Zeros(u32),
}

/// What a zero run is read from.
static ZERO_PAGE: [u8; 64 << 10] = [0; 64 << 10];

impl StreamReader {
    pub fn new(repo: Arc<Repository>, rt: Handle, refs: Vec<ChunkRef>, window: usize) -> Self {
        let pieces = refs.into_iter().map(|r| (r, 0, r.len));
        StreamReader::pieces(repo, rt, pieces, window)
    }

    /// A stream of pieces of chunks; a piece out of its chunk is [`Error::Corrupt`] when read.
    pub fn pieces(
        repo: Arc<Repository>,
        rt: Handle,
        pieces: impl Iterator<Item = Piece> + Send + 'static,
        window: usize,
    ) -> Self {
        StreamReader {
            repo,
            rt,
            pieces: Box::new(pieces),
            pending: VecDeque::new(),
            window: window.max(1),
            current: Bytes::new(),
            zeros: 0,
        }
    }

    /// A stream of index data (a catalog, a ref list, a record) of `object`, whose refs come
    /// from a snapshot record and are checked before a byte is fetched: index data is never a
    /// zero run nor an empty chunk (a forged record could otherwise make a reader materialize
    /// gigabytes of zeros), and it holds at most `max_len` bytes.
    ///
    /// # Errors
    /// [`Error::Corrupt`] naming `object`.
    pub fn index(
        repo: Arc<Repository>,
        rt: Handle,
        refs: &[ChunkRef],
        object: &str,
        max_len: u64,
    ) -> Result<Self> {
        let corrupt = |reason: String| Error::Corrupt {
            object: object.to_string(),
            reason,
        };
        if refs.iter().any(|r| r.is_zero() || r.len == 0) {
            return Err(corrupt(
                "its index refers to a zero run or an empty chunk; no tresor writes that".into(),
            ));
        }
        let len: u64 = refs.iter().map(|r| u64::from(r.len)).sum();
        if len > max_len {
            return Err(corrupt(format!(
                "its index is {len} bytes, more than the {max_len} such an index may hold"
            )));
        }
        Ok(StreamReader::new(repo, rt, refs.to_vec(), 4))
    }

    /// Whether the stream is exhausted.
    pub fn at_end(&mut self) -> Result<bool> {
        Ok(self.fill_buf().map_err(from_io)?.is_empty())
    }
}

impl BufRead for StreamReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.current.is_empty() && self.zeros == 0 {
            while self.pending.len() < self.window {
                match self.pieces.next() {
                    Some((r, _, take)) if r.is_zero() => {
                        self.pending.push_back(Pending::Zeros(take));
                    }
                    Some(piece) => {
                        let h = fetch(&self.repo, &self.rt, piece.0);
                        self.pending.push_back(Pending::Fetch(h, piece));
                    }
                    None => break,
                }
            }
            match self.pending.pop_front() {
                Some(Pending::Fetch(h, (r, skip, take))) => {
                    let data = wait(&self.rt, h).map_err(io::Error::other)?;
                    let (skip, take) = (skip as usize, take as usize);
                    if skip + take > data.len() {
                        return Err(io::Error::other(Error::Corrupt {
                            object: Repository::chunk_key(&r.id),
                            reason: format!(
                                "a piece of {take} bytes at {skip} is out of its {} bytes",
                                data.len()
                            ),
                        }));
                    }
                    self.current = data.slice(skip..skip + take);
                }
                Some(Pending::Zeros(n)) => self.zeros = u64::from(n),
                None => break,
            }
        }
        if self.current.is_empty() && self.zeros > 0 {
            let n = self.zeros.min(ZERO_PAGE.len() as u64) as usize;
            return Ok(&ZERO_PAGE[..n]);
        }
        Ok(&self.current)
    }

    fn consume(&mut self, amt: usize) {
        if self.current.is_empty() {
            self.zeros -= amt as u64;
        } else {
            let _ = self.current.split_to(amt);
        }
    }
}

impl Read for StreamReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

/// Recovers a library error carried through `std::io`.
pub fn from_io(e: io::Error) -> Error {
    if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
        *e.into_inner()
            .expect("checked")
            .downcast::<Error>()
            .expect("checked")
    } else {
        Error::io("<stream>", e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repository::InitOptions;
    use crate::store::{Store, StoreOptions};

    #[test]
    fn write_then_read_back_with_dedup_and_zeros() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let store = Store::open("memory://", &StoreOptions::default(), true).unwrap();
        let repo = Arc::new(
            rt.block_on(Repository::init(store, InitOptions::default(), None))
                .unwrap(),
        );
        let session = Arc::new(
            rt.block_on(Session::start(repo.clone(), None, "test"))
                .unwrap(),
        );
        let writer = ChunkWriter::new(session, rt.handle().clone(), 8 << 20);

        let mut data: Vec<u8> = (0..6_000_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
            .collect();
        data.extend(std::iter::repeat_n(0u8, 9 << 20));
        let mut sw = StreamWriter::new(&writer, Mode::ContentDefined);
        for piece in data.chunks(100_000) {
            sw.write_all(piece).unwrap();
        }
        let (refs, len) = sw.finish().unwrap();
        writer.flush().unwrap();
        assert_eq!(len, data.len() as u64);
        assert!(refs.iter().any(|r| r.is_zero()));
        let stats = writer.stats().summary();
        assert!(stats.bytes_zero >= 4 << 20, "{stats:?}");
        assert_eq!(
            stats.bytes_new + stats.bytes_zero + stats.bytes_dedup,
            data.len() as u64
        );

        let mut again = StreamWriter::new(&writer, Mode::ContentDefined);
        again.write_all(&data).unwrap();
        let (refs2, _) = again.finish().unwrap();
        writer.flush().unwrap();
        assert_eq!(refs, refs2);
        assert_eq!(writer.stats().summary().chunks_new, stats.chunks_new);

        let handle = rt.handle().clone();
        let back = std::thread::spawn(move || {
            let mut out = Vec::new();
            StreamReader::new(repo, handle, refs, 4)
                .read_to_end(&mut out)
                .unwrap();
            out
        })
        .join()
        .unwrap();
        assert!(back == data);
    }
}
