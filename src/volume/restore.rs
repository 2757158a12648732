//! Restoring a tree or block snapshot.
//!
//! A reader thread streams the catalog and starts chunk fetches ahead through a bounded
//! channel; the writer thread (the caller's) creates entries and writes file contents in
//! catalog order. The channel's capacity bounds memory.
//!
//! The catalog is untrusted input, and the target may hold directories that other local users
//! own and can change while root restores (a home directory, a shared volume). So every path
//! is validated ([`catalog::validate_path`]) and nothing below the target is ever reached by
//! path: the target is opened once, each directory is opened from its parent's descriptor with
//! `openat(O_NOFOLLOW)` (created 0700 when missing) and held while the restore is inside it,
//! and every entry is made relative to that descriptor (`openat(O_EXCL|O_NOFOLLOW)`,
//! `symlinkat`, `mknodat`, `linkat`, `renameat`), its metadata set on its own descriptor. A
//! directory swapped for a symlink mid-restore then makes the restore fail, never write
//! elsewhere. Files are written under a temporary name and renamed into place once complete
//! and verified, so a failed restore never leaves a wrong file under its real name. A
//! directory gets its mode when the restore leaves it (its children are written), on the error
//! path too.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use crate::catalog::{self, CatalogReader, Entry, EntryKind, Stream};
use crate::error::{Error, Result};
use crate::id::ChunkRef;
use crate::pipeline;
use crate::progress::Progress;
use crate::repository::Repository;
use crate::snapshot::Listed;

use rustix::fs::{FileType, OFlags};

use super::filewriters::{self, FileWriters, Job, Pending};
use super::fsmeta::{self, Target};
use super::payload::{PayloadIndex, Piece};
use super::reuse::{self, Keep, Use};

/// Chunks fetched ahead of the writer, at most: enough requests in flight to hide a store's
/// latency when chunks are small (a tree of small files from S3: 24 in flight restored 7,911
/// files from Garage in 17.2 s, 256 in 2.9 s; `benches/store.sh` with `TREE=`).
const FETCH_AHEAD: usize = 256;
/// Bytes of chunks fetched ahead of the writer, at most: what bounds memory when chunks are
/// large.
const BYTES_AHEAD: u64 = 64 << 20;
/// Messages (entries and their parts) the reader may be ahead of the writer. Far more than
/// [`FETCH_AHEAD`]: in format 2 a hundred small files may share one payload chunk, and a queue
/// counted in entries would let only a few chunks be in flight (a 51,550-file tree behind
/// 20 ms per request restored in 5.6 s with 256 messages, against 2.7 s with no latency).
const MESSAGES_AHEAD: usize = 16 << 10;
/// Messages sent to the writer at once: one wake-up of the writer per batch, not per entry
/// (waking it cost a tenth of a restore of 131,296 small files).
const BATCH: usize = 256;

/// Chunks fetched and not yet written: the reader waits before a fetch that would pass
/// [`FETCH_AHEAD`] chunks or [`BYTES_AHEAD`] bytes (one chunk always goes, however large), the
/// writer gives them back.
#[derive(Default)]
struct Budget {
    state: std::sync::Mutex<InFlight>,
    changed: std::sync::Condvar,
}

#[derive(Default)]
struct InFlight {
    chunks: usize,
    bytes: u64,
    closed: bool,
}

impl Budget {
    /// Waits until a chunk of `n` bytes fits, calling `before_wait` once if it must wait;
    /// `false` once the writer has stopped.
    fn take(&self, n: u64, mut before_wait: impl FnMut()) -> bool {
        let mut state = self.state.lock().expect("budget lock");
        let mut waited = false;
        loop {
            if state.closed {
                return false;
            }
            let fits = state.chunks < FETCH_AHEAD && state.bytes + n <= BYTES_AHEAD;
            if state.chunks == 0 || fits {
                state.chunks += 1;
                state.bytes += n;
                return true;
            }
            if !waited {
                waited = true;
                drop(state);
                before_wait();
                state = self.state.lock().expect("budget lock");
                continue;
            }
            state = self.changed.wait(state).expect("budget lock");
        }
    }

    fn give(&self, n: u64) {
        let mut state = self.state.lock().expect("budget lock");
        state.chunks -= 1;
        state.bytes -= n;
        drop(state);
        self.changed.notify_all();
    }

    /// The writer stopped: the reader must not wait for it.
    fn close(&self) {
        self.state.lock().expect("budget lock").closed = true;
        self.changed.notify_all();
    }
}

/// What a restore did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RestoreReport {
    pub snapshot: String,
    pub target: String,
    pub files: u64,
    pub dirs: u64,
    pub other_entries: u64,
    pub bytes_written: u64,
    /// Stored chunks read and re-hashed.
    pub chunks_verified: u64,
    /// Entries not restored, or restored without setuid/setgid bits, with the reason.
    pub skipped: Vec<String>,
    /// Entries that could not be created (a name the target's file system refuses, a
    /// directory in the way, no permission), each with its error: the restore went on with the
    /// rest, and is partial.
    pub failed: Vec<String>,
    pub duration_ms: u64,
}

/// Restore options.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// Only these paths of the tree (relative, as listed in the snapshot) and what is below
    /// them; empty for the whole tree.
    pub paths: Vec<String>,
    /// Restore ownership (needs root).
    pub chown: bool,
    /// With `chown`: also restore device nodes and setuid/setgid bits. Only for snapshots
    /// nobody but a key holder could have written (see ARCHITECTURE.md, threat model).
    pub special: bool,
}

impl RestoreOptions {
    /// The paths of the tree `paths` select.
    ///
    /// # Errors
    /// [`Error::UnsafePath`] for a path that would leave the target.
    fn selection(&self) -> Result<Selection> {
        Selection::new(&self.paths)
    }
}

/// What part of a tree an operation takes: all of it, or the subtrees at some paths (stored,
/// relative form).
#[derive(Clone, Debug, Default)]
pub struct Selection(Vec<Vec<u8>>);

impl Selection {
    /// The subtrees at `paths` as an operator names them, checked like catalog paths; no path
    /// (or only the root) is the whole tree.
    ///
    /// # Errors
    /// [`Error::UnsafePath`] for a path that would leave the tree.
    pub fn new(paths: &[impl AsRef<str>]) -> Result<Selection> {
        let mut subtrees = Vec::new();
        for path in paths {
            let p = path.as_ref().trim_matches('/').as_bytes().to_vec();
            if p.is_empty() {
                return Ok(Selection::default());
            }
            catalog::validate_path(&p)?;
            subtrees.push(p);
        }
        Ok(Selection(subtrees))
    }

    /// Whether this is the whole tree.
    pub fn is_all(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `path` is one of the subtrees' roots or below one.
    pub fn contains(&self, path: &[u8]) -> bool {
        self.is_all()
            || self
                .0
                .iter()
                .any(|s| path.starts_with(s) && (path.len() == s.len() || path[s.len()] == b'/'))
    }
}

enum Msg {
    /// An entry, and how many [`Msg::Part`]s of its content follow it.
    Entry(Entry, usize),
    Part(Part),
    Failed(Error),
}

/// `take` bytes of a chunk from `skip` on: all of a file's own chunk, or its share of a
/// payload chunk.
struct Part {
    chunk: ChunkRef,
    data: Data,
    skip: u32,
    take: u32,
}

enum Data {
    /// All zeros: nothing to fetch.
    Zero,
    /// Being fetched; a payload chunk is kept for the files after this one that start in it,
    /// and a chunk later places use too is kept as the reuse plan says.
    Fetch(JoinHandle<Result<Bytes>>, Option<Stream>, Option<Keep>),
    /// A chunk fetched for an earlier place and kept ([`reuse`]); `last` when no later place
    /// uses it.
    Again(Option<Stream>, Keep, bool),
    /// The payload chunk kept from the last part of this stream.
    Kept(Stream),
}

/// Restores the tree snapshot `snap` into `target`.
///
/// # Errors
/// [`Error::UnsafePath`] for a catalog path that would leave the target; [`Error::Corrupt`] or
/// [`Error::Missing`] (in context naming the file) for bad chunks; I/O errors on the target.
pub fn restore_tree(
    repo: Arc<Repository>,
    rt: Handle,
    snap: &Listed,
    target: &Path,
    options: &RestoreOptions,
    progress: &Progress,
) -> Result<RestoreReport> {
    // A bad --path is refused before the target is made.
    options.selection()?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(NEW_DIR_MODE)
        .create(target)
        .map_err(|e| Error::io(target, e))?;
    // The target itself is the operator's choice and opened by path; nothing below it is.
    let root = rustix::fs::open(
        target,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(errno(target))?;
    restore_tree_at(repo, rt, snap, root, target, options, progress)
}

/// Restores into the open directory `root`, shown as `target`: the target [`restore_tree`]
/// opened by path, or one opened below another ([`super::restore_in`]).
pub(super) fn restore_tree_at(
    repo: Arc<Repository>,
    rt: Handle,
    snap: &Listed,
    root: OwnedFd,
    target: &Path,
    options: &RestoreOptions,
    progress: &Progress,
) -> Result<RestoreReport> {
    let sub = options.selection()?;
    let (tx, rx) = sync_channel(MESSAGES_AHEAD / BATCH);
    let budget = Arc::new(Budget::default());
    let reader = {
        let (repo, rt, snap, sub, budget) = (
            Arc::clone(&repo),
            rt.clone(),
            snap.clone(),
            sub.clone(),
            Arc::clone(&budget),
        );
        let scratch = root.try_clone().map_err(|e| Error::io(target, e))?;
        std::thread::spawn(move || read_catalog(repo, rt, &snap, sub, scratch, tx, &budget))
    };
    let mut writer = TreeWriter {
        target: target.to_path_buf(),
        sub,
        chown: options.chown,
        special: options.special,
        repo,
        rt,
        inbox: Inbox {
            rx,
            batch: Vec::new().into_iter(),
        },
        budget: Arc::clone(&budget),
        root: Arc::new(root),
        root_entry: None,
        open: Vec::new(),
        report: RestoreReport {
            snapshot: snap.id.clone(),
            target: target.display().to_string(),
            ..RestoreReport::default()
        },
        progress,
        parts: 0,
        kept: [None, None],
        reused: reuse::Kept::default(),
        writers: Some(FileWriters::start(options.chown)),
        root_pending: Arc::new(Pending::default()),
    };
    let result = writer.run();
    // Unblock the reader if the writer stopped early.
    budget.close();
    drop(writer.inbox);
    reader.join().expect("catalog reader panicked");
    result?;
    Ok(writer.report)
}

/// The parts of an entry's content, each with its payload chunk (stream, index) if it is one.
type Parts = Vec<(Part, Option<(Stream, usize)>)>;

/// Reads the selected entries of `snap` in catalog order with the parts of their content;
/// `each` returns `false` to stop.
fn each_entry(
    catalog: &mut impl BufRead,
    snap: &Listed,
    payload: Option<&PayloadIndex>,
    sub: &Selection,
    mut each: impl FnMut(Entry, Parts) -> bool,
) -> Result<()> {
    let mut reader = CatalogReader::new(catalog, snap.id.clone());
    while let Some(entry) = reader.next_entry()? {
        if !sub.contains(&entry.path) || (!sub.is_all() && entry.path.is_empty()) {
            continue;
        }
        let wants_content = match entry.kind {
            EntryKind::File => true,
            EntryKind::Hardlink => !entry.link.as_ref().is_some_and(|l| sub.contains(l)),
            _ => false,
        };
        let parts: Parts = match (wants_content, entry.slice) {
            (false, _) => Vec::new(),
            (true, None) => entry
                .content
                .iter()
                .map(|&chunk| (Part::whole(chunk), None))
                .collect(),
            (true, Some(_)) => super::payload::pieces_of(payload, &snap.id, &entry)
                .map_err(|e| e.context(format!("restoring {}", entry.display_path())))?
                .into_iter()
                .map(|p| (Part::of(&p), Some((p.stream, p.index))))
                .collect(),
        };
        if !each(entry, parts) {
            break;
        }
    }
    Ok(())
}

/// The restore's copy of the catalog, in errors.
const CATALOG_COPY: &str = "(restore catalog copy)";

/// Reads `inner` and writes what it reads to `copy`.
struct Tee<'a, R> {
    inner: R,
    copy: &'a File,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.copy
            .write_all(&buf[..n])
            .map_err(|e| std::io::Error::other(Error::io(CATALOG_COPY, e)))?;
        Ok(n)
    }
}

/// Which parts fetch their chunk: not a zero run, nor a file's start in the payload chunk the
/// file before it in the same stream ended in (the writer keeps that one).
#[derive(Default)]
struct Fetches {
    /// The payload chunk each stream's last fetched part used.
    last: [Option<usize>; 2],
}

impl Fetches {
    fn fetches(&mut self, part: &Part, place: Option<(Stream, usize)>) -> bool {
        match place {
            _ if part.chunk.is_zero() => false,
            Some((stream, index)) if self.last[stream as usize] == Some(index) => false,
            Some((stream, index)) => {
                self.last[stream as usize] = Some(index);
                true
            }
            None => true,
        }
    }
}

/// Reads the catalog of `snap` and sends its selected entries and their parts to the writer,
/// fetching ahead within `budget`. The catalog is fetched once into an unnamed file in
/// `scratch` (the target) and read from there twice ([`reuse`]).
fn read_catalog(
    repo: Arc<Repository>,
    rt: Handle,
    snap: &Listed,
    sub: Selection,
    scratch: OwnedFd,
    tx: SyncSender<Vec<Msg>>,
    budget: &Budget,
) {
    let read = || -> Result<()> {
        let catalog = reuse::unnamed_file(scratch.as_fd())?;
        let (payload, counter) = count_uses(&repo, &rt, snap, &sub, &catalog)?;
        let mut plan = counter.plan(!repo.store().is_local())?;
        let mut fetches = Fetches::default();
        let batch = std::cell::RefCell::new(Batch::new(&tx));
        let mut copy = &catalog;
        copy.seek(SeekFrom::Start(0))
            .map_err(|e| Error::io(CATALOG_COPY, e))?;
        let mut copy = BufReader::with_capacity(1 << 20, copy);
        // A failure to read the plan stops the walk, and is sent once the walk is done.
        let mut failed = None;
        let sent = each_entry(&mut copy, snap, payload.as_ref(), &sub, |entry, parts| {
            if !batch.borrow_mut().push(Msg::Entry(entry, parts.len())) {
                return false;
            }
            for (mut part, place) in parts {
                let stream = place.map(|p| p.0);
                part.data = if !fetches.fetches(&part, place) {
                    match stream {
                        Some(stream) if !part.chunk.is_zero() => Data::Kept(stream),
                        _ => Data::Zero,
                    }
                } else {
                    let step = match plan.at(&part.chunk) {
                        Ok(step) => step,
                        Err(e) => {
                            failed = Some(e);
                            return false;
                        }
                    };
                    match step {
                        Use::Again { keep, last } => Data::Again(stream, keep, last),
                        Use::Fetch(keep) => {
                            // The writer may be waiting for what is batched here.
                            let flush = || {
                                batch.borrow_mut().flush();
                            };
                            if !budget.take(part.chunk.len.into(), flush) {
                                return false;
                            }
                            Data::Fetch(pipeline::fetch(&repo, &rt, part.chunk), stream, keep)
                        }
                    }
                };
                if !batch.borrow_mut().push(Msg::Part(part)) {
                    return false;
                }
            }
            true
        });
        batch.borrow_mut().flush();
        failed.map_or(sent, Err)
    };
    if let Err(e) = read() {
        let _ = tx.send(vec![Msg::Failed(e)]);
    }
}

/// The first pass of [`read_catalog`]: the places that fetch a chunk (see `reuse`), counted
/// as the catalog arrives, and the catalog copied into `catalog` for the second pass. From a
/// remote store the payload's ref lists and the catalog's first chunks are fetched side by
/// side; the payload index is returned for the second pass.
fn count_uses(
    repo: &Arc<Repository>,
    rt: &Handle,
    snap: &Listed,
    sub: &Selection,
    catalog: &File,
) -> Result<(Option<PayloadIndex>, reuse::Counter)> {
    let mut stream = snap.root_stream(repo, rt, u64::MAX)?;
    std::thread::scope(|s| {
        let payload = s.spawn(|| match &snap.snapshot.payload {
            Some(p) => PayloadIndex::load(repo, rt, &snap.id, p).map(Some),
            None => Ok(None),
        });
        // Starts the catalog's fetches.
        stream.fill_buf().map_err(pipeline::from_io)?;
        let payload = payload.join().expect("payload index reader panicked")?;
        let mut counter = reuse::Counter::default();
        let mut fetches = Fetches::default();
        let tee = Tee {
            inner: stream,
            copy: catalog,
        };
        let mut tee = BufReader::with_capacity(1 << 20, tee);
        each_entry(&mut tee, snap, payload.as_ref(), sub, |_, parts| {
            for (part, place) in &parts {
                if fetches.fetches(part, *place) {
                    counter.fetch(&part.chunk);
                }
            }
            true
        })?;
        // Whatever follows the last entry is copied too.
        std::io::copy(&mut tee, &mut std::io::sink()).map_err(pipeline::from_io)?;
        Ok((payload, counter))
    })
}

/// Messages on their way to the writer, sent [`BATCH`] at a time.
struct Batch<'a> {
    tx: &'a SyncSender<Vec<Msg>>,
    msgs: Vec<Msg>,
}

impl<'a> Batch<'a> {
    fn new(tx: &'a SyncSender<Vec<Msg>>) -> Batch<'a> {
        Batch {
            tx,
            msgs: Vec::with_capacity(BATCH),
        }
    }

    /// `false` once the writer has stopped.
    fn push(&mut self, msg: Msg) -> bool {
        self.msgs.push(msg);
        self.msgs.len() < BATCH || self.flush()
    }

    /// Sends what is batched; `false` once the writer has stopped.
    fn flush(&mut self) -> bool {
        if self.msgs.is_empty() {
            return true;
        }
        let msgs = std::mem::replace(&mut self.msgs, Vec::with_capacity(BATCH));
        self.tx.send(msgs).is_ok()
    }
}

impl Part {
    /// All of a file's own chunk.
    fn whole(chunk: ChunkRef) -> Part {
        Part {
            chunk,
            data: Data::Zero,
            skip: 0,
            take: chunk.len,
        }
    }

    /// A file's share of a payload chunk.
    fn of(piece: &Piece) -> Part {
        Part {
            chunk: piece.chunk,
            data: Data::Zero,
            skip: piece.skip,
            take: piece.take,
        }
    }
}

/// The writer's end of the reader's batches.
struct Inbox {
    rx: Receiver<Vec<Msg>>,
    batch: std::vec::IntoIter<Msg>,
}

impl Inbox {
    /// The next message; `None` once the reader is done.
    fn recv(&mut self) -> Option<Msg> {
        loop {
            if let Some(msg) = self.batch.next() {
                return Some(msg);
            }
            self.batch = self.rx.recv().ok()?.into_iter();
        }
    }
}

/// A directory of the target held open while the restore is inside it.
struct OpenDir {
    /// Its name in its parent.
    name: Vec<u8>,
    /// Shared with the small files being made in it.
    fd: Arc<OwnedFd>,
    /// Its catalog entry, applied when the restore leaves it (its children are then written);
    /// `None` for a directory made only to hold a selected path.
    entry: Option<Entry>,
    /// Its files still being made by the small-file writers.
    pending: Arc<Pending>,
}

struct TreeWriter<'a> {
    target: PathBuf,
    sub: Selection,
    chown: bool,
    special: bool,
    repo: Arc<Repository>,
    rt: Handle,
    /// The reader's messages, in batches.
    inbox: Inbox,
    budget: Arc<Budget>,
    /// The target directory, opened once by path; everything below is reached from it.
    root: Arc<OwnedFd>,
    /// The root entry, applied to the target last.
    root_entry: Option<Entry>,
    /// The directories from the target down to the parent of the current entry.
    open: Vec<OpenDir>,
    report: RestoreReport,
    progress: &'a Progress,
    /// Parts of the current entry's content still to come.
    parts: usize,
    /// The payload chunk last fetched in each stream, for the files that start in it.
    kept: [Option<Bytes>; 2],
    /// Chunks later places use, kept since their fetch ([`reuse`]).
    reused: reuse::Kept,
    /// The threads that make small files ([`filewriters`]); `None` once stopped.
    writers: Option<FileWriters>,
    /// Files being made directly in the target.
    root_pending: Arc<Pending>,
}

/// Directories are made private and get their real mode once their children are written.
const NEW_DIR_MODE: u32 = 0o700;

fn errno(path: &Path) -> impl Fn(rustix::io::Errno) -> Error + '_ {
    move |e| Error::io(path, e.into())
}

impl TreeWriter<'_> {
    fn run(&mut self) -> Result<()> {
        let started = std::time::Instant::now();
        let result = self.entries();
        // Directories get their modes on the error path too, and a failure here comes second
        // to the one that stopped the restore.
        let left = self.leave_to(0);
        let done = self.writers.take().expect("writers run").stop();
        self.made(done);
        result?;
        left?;
        if let Some(e) = self.root_entry.take() {
            let mode = self.mode(&e);
            fsmeta::apply(
                Target::Open(self.root.as_fd()),
                &e,
                mode,
                self.chown,
                &self.target,
            )?;
        }
        self.report.duration_ms = started.elapsed().as_millis() as u64;
        Ok(())
    }

    /// Restores every entry. One that the target refuses (an I/O error on it) is listed in
    /// the report and the rest goes on, as restic does; bad data, an unsafe path or a failed
    /// read of the snapshot stops the restore.
    fn entries(&mut self) -> Result<()> {
        while let Some(msg) = self.inbox.recv() {
            match msg {
                Msg::Entry(e, parts) => {
                    let shown = e.display_path();
                    self.parts = parts;
                    if let Err(err) = self.entry(e) {
                        let err = err.context(format!("restoring {shown}"));
                        if err.kind() != crate::error::ErrorKind::Io {
                            return Err(err);
                        }
                        self.skip_parts()?;
                        tracing::warn!("{err}");
                        self.report.failed.push(err.to_string());
                    }
                    let done = self.writers().results(false);
                    self.made(done);
                }
                Msg::Failed(e) => return Err(e),
                Msg::Part(..) => unreachable!("parts follow their entry"),
            }
        }
        Ok(())
    }

    /// Consumes the parts of an entry that failed, keeping payload chunks for the files that
    /// start in them and chunks later places use.
    fn skip_parts(&mut self) -> Result<()> {
        while self.parts > 0 {
            self.parts -= 1;
            match self.inbox.recv() {
                Some(Msg::Part(part)) => {
                    // Bad data shows again where it is used next, or stops the restore there.
                    let _ = self.part_data(part, &[]);
                }
                Some(Msg::Failed(err)) => return Err(err),
                _ => unreachable!("a file's parts follow it"),
            }
        }
        Ok(())
    }

    /// The data of `part` (none for a zero run), fetched, kept or taken from what was kept;
    /// keeps it for later places as the part says. `path` names the entry in errors.
    fn part_data(&mut self, part: Part, path: &[u8]) -> Result<Option<Bytes>> {
        let shown = || String::from_utf8_lossy(path).into_owned();
        let (data, stream) = match part.data {
            Data::Zero => return Ok(None),
            Data::Fetch(h, stream, keep) => {
                let data = pipeline::wait(&self.rt, h);
                self.budget.give(part.chunk.len.into());
                let data = data?;
                self.report.chunks_verified += 1;
                if let Some(keep) = keep {
                    self.reused.keep(keep, &data, self.root.as_fd())?;
                }
                (data, stream)
            }
            Data::Again(stream, keep, last) => {
                match self.reused.take(keep, part.chunk.len, last)? {
                    Some(data) => (data, stream),
                    // Its first fetch was for an entry the target refused, and failed.
                    None => {
                        let data = pipeline::wait(
                            &self.rt,
                            pipeline::fetch(&self.repo, &self.rt, part.chunk),
                        )?;
                        self.report.chunks_verified += 1;
                        (data, stream)
                    }
                }
            }
            Data::Kept(stream) => {
                let data = self.kept[stream as usize]
                    .clone()
                    .ok_or_else(|| Error::Corrupt {
                        object: format!("catalog entry {}", shown()),
                        reason: "starts in a payload chunk that was never read".into(),
                    })?;
                return Ok(Some(data));
            }
        };
        if let Some(stream) = stream {
            self.kept[stream as usize] = Some(data.clone());
        }
        Ok(Some(data))
    }

    /// The mode to give `e`: setuid and setgid bits only where special files are allowed.
    fn mode(&mut self, e: &Entry) -> u32 {
        if self.chown && !self.special && e.mode & 0o6000 != 0 {
            self.report.skipped.push(format!(
                "{}: setuid/setgid bits withheld (give --restore-special to keep them)",
                e.display_path()
            ));
            return e.mode & !0o6000;
        }
        e.mode
    }

    /// Closes the open directories below depth `depth`, applying their entries, deepest first.
    /// Every one is closed even when one fails; the first failure is returned.
    fn leave_to(&mut self, depth: usize) -> Result<()> {
        let mut first = Ok(());
        while self.open.len() > depth {
            let dir = self.open.pop().expect("len > depth");
            // Every name made in it moves its mtime: its files first.
            dir.pending.wait();
            if let Some(e) = &dir.entry {
                let mode = self.mode(e);
                let shown = self.target.join(OsStr::from_bytes(&e.path));
                let applied =
                    fsmeta::apply(Target::Open(dir.fd.as_fd()), e, mode, self.chown, &shown);
                if first.is_ok() {
                    first = applied;
                }
            }
        }
        first
    }

    /// The directory `parent` (components below the target), opened from the ones already open,
    /// each component by `openat(O_NOFOLLOW)` and created 0700 when missing.
    fn enter(&mut self, parent: &[&[u8]]) -> Result<Arc<OwnedFd>> {
        let same = self
            .open
            .iter()
            .zip(parent)
            .take_while(|(d, c)| d.name.as_slice() == **c)
            .count();
        self.leave_to(same)?;
        for (depth, c) in parent.iter().enumerate().skip(same) {
            let shown = self
                .target
                .join(OsStr::from_bytes(&parent[..=depth].join(&b'/')));
            let fd = Arc::new(open_dir(self.dir(), c, false, &shown)?);
            self.open.push(OpenDir {
                name: c.to_vec(),
                fd,
                entry: None,
                pending: Arc::default(),
            });
        }
        Ok(Arc::clone(self.open.last().map_or(&self.root, |d| &d.fd)))
    }

    /// The innermost open directory.
    fn dir(&self) -> BorrowedFd<'_> {
        self.open.last().map_or(self.root.as_fd(), |d| d.fd.as_fd())
    }

    fn entry(&mut self, e: Entry) -> Result<()> {
        if e.path.is_empty() {
            if e.kind != EntryKind::Dir {
                return Err(Error::UnsafePath {
                    path: String::new(),
                    reason: "the root entry is not a directory",
                });
            }
            self.report.dirs += 1;
            self.root_entry = Some(e);
            return Ok(());
        }
        catalog::validate_path(&e.path)?;
        let shown = self.target.join(OsStr::from_bytes(&e.path));
        let mut components: Vec<&[u8]> = e.path.split(|b| *b == b'/').collect();
        let name = OsStr::from_bytes(components.pop().expect("validated path has a name"));
        // Hold the parent's descriptor apart from `self`, which the arms below borrow.
        let parent = self.enter(&components)?;
        match e.kind {
            EntryKind::Dir => {
                let fd = Arc::new(open_dir(parent.as_fd(), name.as_bytes(), true, &shown)?);
                self.report.dirs += 1;
                self.open.push(OpenDir {
                    name: name.as_bytes().to_vec(),
                    fd,
                    entry: Some(Entry {
                        content: Vec::new(),
                        ..e
                    }),
                    pending: Arc::default(),
                });
            }
            EntryKind::File => self.file(parent, name, &e, &shown)?,
            EntryKind::Hardlink => self.hardlink(parent, name, &e, &shown)?,
            EntryKind::Symlink => {
                let link = e.link.clone().unwrap_or_default();
                remove_existing(parent.as_fd(), name, &shown)?;
                rustix::fs::symlinkat(OsStr::from_bytes(&link), &parent, name)
                    .map_err(errno(&shown))?;
                let target = Target::Symlink {
                    dir: parent.as_fd(),
                    name,
                };
                fsmeta::apply(target, &e, e.mode, self.chown, &shown)?;
                self.report.other_entries += 1;
            }
            EntryKind::Fifo => self.node(parent.as_fd(), name, &e, &shown, FileType::Fifo)?,
            EntryKind::CharDevice if self.chown && self.special => {
                self.node(parent.as_fd(), name, &e, &shown, FileType::CharacterDevice)?
            }
            EntryKind::BlockDevice if self.chown && self.special => {
                self.node(parent.as_fd(), name, &e, &shown, FileType::BlockDevice)?
            }
            EntryKind::CharDevice | EntryKind::BlockDevice | EntryKind::Socket => {
                let why = if e.kind == EntryKind::Socket {
                    "sockets are recreated by the program that owns them"
                } else if self.chown {
                    "device nodes are restored only with --restore-special"
                } else {
                    "device nodes need root"
                };
                self.report
                    .skipped
                    .push(format!("{}: {why}", e.display_path()));
            }
        }
        Ok(())
    }

    /// A hardlink to an entry restored before, or (when the restore leaves that entry out) a
    /// file of its own.
    fn hardlink(&mut self, dir: Arc<OwnedFd>, name: &OsStr, e: &Entry, shown: &Path) -> Result<()> {
        let link = e.link.clone().unwrap_or_default();
        catalog::validate_path(&link)?;
        if !self.sub.contains(&link) {
            return self.file(dir, name, e, shown);
        }
        // The file it names may still be in the small-file writers' hands.
        let done = self.writers().results(true);
        self.made(done);
        let mut source: Vec<&[u8]> = link.split(|b| *b == b'/').collect();
        let source_name = OsStr::from_bytes(source.pop().expect("validated"));
        let mut source_dir = rustix::io::dup(&*self.root).map_err(errno(shown))?;
        let mut source_path = self.target.clone();
        for c in source {
            source_path.push(OsStr::from_bytes(c));
            source_dir = open_dir(source_dir.as_fd(), c, false, &source_path)?;
        }
        remove_existing(dir.as_fd(), name, shown)?;
        let no_follow = rustix::fs::AtFlags::empty();
        rustix::fs::linkat(&source_dir, source_name, &*dir, name, no_follow)
            .map_err(errno(shown))?;
        self.report.files += 1;
        Ok(())
    }

    /// A FIFO or a device node, made private and given its metadata through a descriptor: a
    /// FIFO opened non-blocking (its read end then waits for no writer), a device node never
    /// opened (that can have side effects, or fail without a driver) but held `O_PATH`.
    fn node(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        e: &Entry,
        shown: &Path,
        kind: FileType,
    ) -> Result<()> {
        remove_existing(dir, name, shown)?;
        let private = rustix::fs::Mode::from_raw_mode(0o600);
        rustix::fs::mknodat(dir, name, kind, private, e.rdev as _).map_err(errno(shown))?;
        let mode = self.mode(e);
        if kind == FileType::Fifo {
            let fd = open_made(dir, name, OFlags::RDONLY | OFlags::NONBLOCK, kind, shown)?;
            fsmeta::apply(Target::Open(fd.as_fd()), e, mode, self.chown, shown)?;
        } else {
            let fd = open_made(dir, name, OFlags::PATH, kind, shown)?;
            fsmeta::apply(Target::PathOnly(fd.as_fd()), e, mode, self.chown, shown)?;
        }
        self.report.other_entries += 1;
        Ok(())
    }

    /// Writes a file under a temporary name in `dir`, with its metadata, and renames it into
    /// place once complete and verified: a small one on the small-file writers, its bytes read
    /// here first ([`filewriters`]).
    fn file(&mut self, dir: Arc<OwnedFd>, name: &OsStr, e: &Entry, shown: &Path) -> Result<()> {
        let mode = self.mode(e);
        if e.size <= filewriters::SMALL_FILE {
            let mut bytes = Vec::with_capacity(e.size as usize);
            self.each_part(e, |data, take| {
                match data {
                    Some(data) => bytes.extend_from_slice(data),
                    None => bytes.resize(bytes.len() + take as usize, 0),
                }
                Ok(())
            })?;
            let pending = self.open.last().map_or(&self.root_pending, |d| &d.pending);
            let job = Job {
                dir,
                name: name.to_os_string(),
                entry: Entry {
                    content: Vec::new(),
                    ..e.clone()
                },
                mode,
                bytes,
                shown: shown.to_path_buf(),
                pending: Arc::clone(pending),
            };
            self.writers().send(job);
            return Ok(());
        }
        let chown = self.chown;
        let written = filewriters::put_file(dir.as_fd(), name, e, mode, chown, shown, |file| {
            self.each_part(e, |data, take| {
                match data {
                    Some(data) => file.write_all(data),
                    None => file.seek(SeekFrom::Current(take.into())).map(drop),
                }
                .map_err(|err| Error::io(shown, err))
            })?;
            // A file that ends in zeros ends in a hole the seek made.
            file.set_len(e.size).map_err(|err| Error::io(shown, err))?;
            Ok(e.size)
        })?;
        self.report.files += 1;
        self.report.bytes_written += written;
        Ok(())
    }

    /// Reads the parts of entry `e`'s content in order and gives each to `put`: its bytes, or
    /// `None` and the length of a run of zeros. Their lengths must add up to the entry's size:
    /// one part too many is refused before it is given.
    fn each_part(
        &mut self,
        e: &Entry,
        mut put: impl FnMut(Option<&[u8]>, u32) -> Result<()>,
    ) -> Result<()> {
        let wrong_size = |reason: String| Error::Corrupt {
            object: format!("catalog entry {}", e.display_path()),
            reason,
        };
        let mut written: u64 = 0;
        while self.parts > 0 {
            self.parts -= 1;
            let part = match self.inbox.recv() {
                Some(Msg::Part(part)) => part,
                Some(Msg::Failed(err)) => return Err(err),
                _ => unreachable!("a file's parts follow it"),
            };
            let (skip, take, chunk) = (part.skip, part.take, part.chunk);
            let data = self.part_data(part, &e.path)?;
            written += u64::from(take);
            if written > e.size {
                return Err(wrong_size(format!(
                    "content adds up to more than the {} bytes the entry says",
                    e.size
                )));
            }
            match data {
                None => put(None, take)?,
                Some(data) => {
                    let (skip, take) = (skip as usize, take as usize);
                    let bytes = data.get(skip..skip + take).ok_or_else(|| {
                        wrong_size(format!(
                            "its part of chunk {} is out of the chunk",
                            chunk.id
                        ))
                    })?;
                    put(Some(bytes), take as u32)?;
                }
            }
            self.progress.inc(take.into());
        }
        if written != e.size {
            return Err(wrong_size(format!(
                "content adds up to {written} bytes, the entry says {}",
                e.size
            )));
        }
        Ok(())
    }

    fn writers(&self) -> &FileWriters {
        self.writers.as_ref().expect("writers run until the end")
    }

    /// Counts the small files made, and lists those the target refused.
    fn made(&mut self, done: Vec<filewriters::Done>) {
        for (shown, made) in done {
            match made {
                Ok(size) => {
                    self.report.files += 1;
                    self.report.bytes_written += size;
                }
                Err(err) => {
                    let err = err.context(format!("restoring {shown}"));
                    tracing::warn!("{err}");
                    self.report.failed.push(err.to_string());
                }
            }
        }
    }
}

/// The directory `name` of `dir`, opened without following a symlink and created (0700) when
/// missing: for the directories a caller makes below a target it opened (a workload's
/// `DIR/volumes`).
///
/// # Errors
/// [`Error::UnsafePath`] when `name` is a symlink; [`Error::Io`] naming `shown`.
pub fn open_subdir(dir: BorrowedFd<'_>, name: &OsStr, shown: &Path) -> Result<OwnedFd> {
    open_dir(dir, name.as_bytes(), false, shown)
}

/// Opens the directory `name` in `dir` without following a symlink, creating it (0700) when
/// missing. With `replace` (a directory entry of the catalog) a non-directory in the way is
/// removed first; otherwise (a parent of an entry) a symlink there is refused.
fn open_dir(dir: BorrowedFd<'_>, name: &[u8], replace: bool, shown: &Path) -> Result<OwnedFd> {
    let name = OsStr::from_bytes(name);
    let open = || {
        rustix::fs::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
    };
    let mkdir =
        || match rustix::fs::mkdirat(dir, name, rustix::fs::Mode::from_raw_mode(NEW_DIR_MODE)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => Ok(()),
            Err(e) => Err(Error::io(shown, e.into())),
        };
    // Not a directory: a symlink (ELOOP, or ENOTDIR as O_DIRECTORY is checked first) or a file.
    let not_a_dir = || {
        let is_link = rustix::fs::statat(dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
            .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink);
        if is_link {
            Error::UnsafePath {
                path: shown.display().to_string(),
                reason:
                    "a parent directory is a symlink; writing through it could leave the target",
            }
        } else {
            Error::io(
                shown,
                std::io::Error::other("exists and is not a directory"),
            )
        }
    };
    match open() {
        Ok(fd) => return Ok(fd),
        Err(rustix::io::Errno::NOENT) => mkdir()?,
        Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) if replace => {
            remove_existing(dir, name, shown)?;
            mkdir()?;
        }
        Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => return Err(not_a_dir()),
        Err(e) => return Err(Error::io(shown, e.into())),
    }
    // Made just now; if someone swapped it for a symlink since, this fails rather than follows.
    open().map_err(|e| match e {
        rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => not_a_dir(),
        e => Error::io(shown, e.into()),
    })
}

/// Opens the node `name` just made in `dir` (never following a symlink) and checks that it is
/// still of the kind made, not something swapped in since.
fn open_made(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    flags: OFlags,
    kind: FileType,
    shown: &Path,
) -> Result<OwnedFd> {
    let fd = rustix::fs::openat(
        dir,
        name,
        flags | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY,
        rustix::fs::Mode::empty(),
    )
    .map_err(errno(shown))?;
    let stat = rustix::fs::fstat(&fd).map_err(errno(shown))?;
    if FileType::from_raw_mode(stat.st_mode) != kind {
        return Err(Error::UnsafePath {
            path: shown.display().to_string(),
            reason: "it was replaced while being restored",
        });
    }
    Ok(fd)
}

/// Removes a non-directory `name` in `dir` so a restored entry can take its place.
fn remove_existing(dir: BorrowedFd<'_>, name: &OsStr, shown: &Path) -> Result<()> {
    match rustix::fs::statat(dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => Err(Error::io(
            shown,
            std::io::Error::other("a directory is in the way"),
        )),
        Ok(_) => match rustix::fs::unlinkat(dir, name, rustix::fs::AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(Error::io(shown, e.into())),
        },
        Err(_) => Ok(()),
    }
}

/// Restores a block snapshot to `target`: a block device is overwritten in place, anything else
/// is created as a (sparse) file.
pub fn restore_block(
    repo: Arc<Repository>,
    rt: Handle,
    snap: &Listed,
    target: &Path,
    progress: &Progress,
) -> Result<RestoreReport> {
    let is_device = std::fs::metadata(target).is_ok_and(|m| m.file_type().is_block_device());
    let out = File::options()
        .write(true)
        .create(!is_device)
        .truncate(!is_device)
        // A block image holds a whole file system: private until someone chooses otherwise.
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(target)
        .map_err(|e| Error::io(target, e))?;
    write_block(repo, rt, snap, out, is_device, target, progress)
}

/// The file `name` of `dir`, opened for writing and created 0600, never through a symlink;
/// `how` adds `EXCL` (a new temporary file) or `TRUNC` (a target to replace).
pub(super) fn create_private(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    how: OFlags,
    shown: &Path,
) -> Result<File> {
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC | how;
    let fd = rustix::fs::openat(dir, name, flags, rustix::fs::Mode::from_raw_mode(0o600))
        .map_err(errno(shown))?;
    Ok(File::from(fd))
}

/// Writes the block snapshot `snap` into `out` (a device is written through, zeros included).
pub(super) fn write_block(
    repo: Arc<Repository>,
    rt: Handle,
    snap: &Listed,
    mut out: File,
    is_device: bool,
    target: &Path,
    progress: &Progress,
) -> Result<RestoreReport> {
    let started = std::time::Instant::now();
    let mut list = snap.root_stream(&repo, &rt, u64::MAX)?;
    let mut pending: VecDeque<(ChunkRef, Option<JoinHandle<Result<Bytes>>>)> = VecDeque::new();
    let mut report = RestoreReport {
        snapshot: snap.id.clone(),
        target: target.display().to_string(),
        files: 1,
        ..RestoreReport::default()
    };
    let mut more = true;
    let mut pending_bytes = 0u64;
    loop {
        while more && pending.len() < FETCH_AHEAD && pending_bytes < BYTES_AHEAD {
            let mut rec = [0u8; ChunkRef::ENCODED_LEN];
            match read_record(&mut list, &mut rec)? {
                false => more = false,
                true => {
                    let r = ChunkRef::decode(&rec);
                    let fetch = (!r.is_zero()).then(|| pipeline::fetch(&repo, &rt, r));
                    pending_bytes += if r.is_zero() { 0 } else { u64::from(r.len) };
                    pending.push_back((r, fetch));
                }
            }
        }
        let Some((r, fetch)) = pending.pop_front() else {
            break;
        };
        if fetch.is_some() {
            pending_bytes -= u64::from(r.len);
        }
        let offset = report.bytes_written;
        let context = || format!("restoring block image at offset {offset}");
        match fetch {
            Some(h) => {
                let data = pipeline::wait(&rt, h).map_err(|e| e.context(context()))?;
                out.write_all(&data).map_err(|e| Error::io(target, e))?;
                report.chunks_verified += 1;
            }
            None if is_device => {
                out.write_all(&vec![0u8; r.len as usize])
                    .map_err(|e| Error::io(target, e))?;
            }
            None => {
                out.seek(SeekFrom::Current(r.len as i64))
                    .map_err(|e| Error::io(target, e))?;
            }
        }
        report.bytes_written += r.len as u64;
        progress.inc(r.len as u64);
    }
    if !is_device {
        out.set_len(report.bytes_written)
            .map_err(|e| Error::io(target, e))?;
    }
    out.sync_all().map_err(|e| Error::io(target, e))?;
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// Reads one ref record; `false` at a clean end of the list.
pub(super) fn read_record(
    list: &mut impl std::io::BufRead,
    rec: &mut [u8; ChunkRef::ENCODED_LEN],
) -> Result<bool> {
    if list.fill_buf().map_err(pipeline::from_io)?.is_empty() {
        return Ok(false);
    }
    list.read_exact(rec).map_err(|e| {
        let err = pipeline::from_io(e);
        match err {
            Error::Io { .. } => Error::Corrupt {
                object: "block ref list".into(),
                reason: "ends in the middle of a record".into(),
            },
            other => other,
        }
    })?;
    Ok(true)
}
