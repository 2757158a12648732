//! Restoring a tree or block snapshot.
//!
//! A reader thread streams the catalog and starts chunk fetches ahead through a bounded
//! channel; the writer thread (the caller's) creates entries and writes file contents in
//! catalog order. The channel's capacity bounds memory.
//!
//! The catalog is untrusted input. Every path is validated ([`catalog::validate_path`]), every
//! parent directory is checked to be a real directory and not a symlink before anything is
//! created in it, files are opened with `O_NOFOLLOW` under a temporary name and renamed into
//! place once complete and verified, so a failed restore never leaves a wrong file under its
//! real name.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use crate::catalog::{self, CatalogReader, Entry, EntryKind};
use crate::error::{Error, Result};
use crate::id::ChunkRef;
use crate::pipeline::{self, StreamReader};
use crate::progress::Progress;
use crate::repository::Repository;
use crate::snapshot::Listed;

use super::fsmeta;

/// Chunks fetched ahead of the writer.
const FETCH_AHEAD: usize = 24;

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
    /// Entries not restored (sockets; devices without root), with the reason.
    pub skipped: Vec<String>,
    pub duration_ms: u64,
}

/// Restore options.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// Only this path of the tree (relative, as listed in the snapshot) and what is below it.
    pub subpath: Option<String>,
    /// Restore ownership (needs root).
    pub chown: bool,
}

enum Msg {
    Entry(Entry),
    Chunk(ChunkRef, Option<JoinHandle<Result<Bytes>>>),
    Failed(Error),
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
    let sub: Option<Vec<u8>> = options
        .subpath
        .as_deref()
        .map(|s| s.trim_matches('/').as_bytes().to_vec())
        .filter(|s| !s.is_empty());
    if let Some(s) = &sub {
        catalog::validate_path(s)?;
    }
    std::fs::create_dir_all(target).map_err(|e| Error::io(target, e))?;
    let (tx, rx) = sync_channel(FETCH_AHEAD);
    let reader = {
        let (repo, rt, root, id, sub) = (
            Arc::clone(&repo),
            rt.clone(),
            snap.snapshot.root.clone(),
            snap.id.clone(),
            sub.clone(),
        );
        std::thread::spawn(move || read_catalog(repo, rt, root, id, sub, tx))
    };
    let mut writer = TreeWriter {
        target: target.to_path_buf(),
        sub,
        chown: options.chown,
        rt,
        rx,
        dirs: Vec::new(),
        checked_parent: None,
        report: RestoreReport {
            snapshot: snap.id.clone(),
            target: target.display().to_string(),
            ..RestoreReport::default()
        },
        progress,
        tmp_seq: 0,
    };
    let result = writer.run();
    // Unblock the reader if the writer stopped early.
    drop(writer.rx);
    reader.join().expect("catalog reader panicked");
    result?;
    Ok(writer.report)
}

fn selected(path: &[u8], sub: &Option<Vec<u8>>) -> bool {
    match sub {
        None => true,
        Some(s) => path.starts_with(s) && (path.len() == s.len() || path[s.len()] == b'/'),
    }
}

fn read_catalog(
    repo: Arc<Repository>,
    rt: Handle,
    root: Vec<ChunkRef>,
    id: String,
    sub: Option<Vec<u8>>,
    tx: SyncSender<Msg>,
) {
    let stream = StreamReader::new(Arc::clone(&repo), rt.clone(), root, 4);
    let mut reader = CatalogReader::new(stream, id);
    loop {
        let entry = match reader.next_entry() {
            Ok(Some(e)) => e,
            Ok(None) => return,
            Err(e) => {
                let _ = tx.send(Msg::Failed(e));
                return;
            }
        };
        if !selected(&entry.path, &sub) || (sub.is_some() && entry.path.is_empty()) {
            continue;
        }
        let wants_content = match entry.kind {
            EntryKind::File => true,
            EntryKind::Hardlink => !entry.link.as_ref().is_some_and(|l| selected(l, &sub)),
            _ => false,
        };
        let content = if wants_content {
            entry.content.clone()
        } else {
            Vec::new()
        };
        if tx.send(Msg::Entry(entry)).is_err() {
            return;
        }
        for r in content {
            let fetch = (!r.is_zero()).then(|| pipeline::fetch(&repo, &rt, r));
            if tx.send(Msg::Chunk(r, fetch)).is_err() {
                return;
            }
        }
    }
}

struct TreeWriter<'a> {
    target: PathBuf,
    sub: Option<Vec<u8>>,
    chown: bool,
    rt: Handle,
    rx: Receiver<Msg>,
    /// Directories whose metadata is applied at the end, children first.
    dirs: Vec<(PathBuf, Entry)>,
    checked_parent: Option<PathBuf>,
    report: RestoreReport,
    progress: &'a Progress,
    tmp_seq: u64,
}

impl TreeWriter<'_> {
    fn run(&mut self) -> Result<()> {
        let started = std::time::Instant::now();
        while let Ok(msg) = self.rx.recv() {
            match msg {
                Msg::Entry(e) => {
                    let shown = e.display_path();
                    self.entry(e)
                        .map_err(|err| err.context(format!("restoring {shown}")))?
                }
                Msg::Failed(e) => return Err(e),
                Msg::Chunk(..) => unreachable!("chunks follow their entry"),
            }
        }
        while let Some((path, entry)) = self.dirs.pop() {
            fsmeta::apply(&path, &entry, self.chown)?;
        }
        self.report.duration_ms = started.elapsed().as_millis() as u64;
        Ok(())
    }

    fn entry(&mut self, e: Entry) -> Result<()> {
        let dest = if e.path.is_empty() {
            if e.kind != EntryKind::Dir {
                return Err(Error::UnsafePath {
                    path: String::new(),
                    reason: "the root entry is not a directory",
                });
            }
            self.target.clone()
        } else {
            catalog::validate_path(&e.path)?;
            let dest = self.target.join(OsStr::from_bytes(&e.path));
            self.check_parent(&dest)?;
            dest
        };
        match e.kind {
            EntryKind::Dir => {
                if !e.path.is_empty() {
                    match std::fs::symlink_metadata(&dest) {
                        Ok(md) if md.is_dir() => {}
                        Ok(_) => {
                            remove_existing(&dest)?;
                            create_dir(&dest)?;
                        }
                        Err(_) => create_dir(&dest)?,
                    }
                }
                self.report.dirs += 1;
                self.dirs.push((
                    dest,
                    Entry {
                        content: Vec::new(),
                        ..e
                    },
                ));
            }
            EntryKind::File => self.file(&dest, &e)?,
            EntryKind::Hardlink => {
                let link = e.link.clone().unwrap_or_default();
                catalog::validate_path(&link)?;
                if selected(&link, &self.sub) {
                    let source = self.target.join(OsStr::from_bytes(&link));
                    self.check_parent(&source)?;
                    remove_existing(&dest)?;
                    std::fs::hard_link(&source, &dest).map_err(|err| Error::io(&dest, err))?;
                    self.report.files += 1;
                } else {
                    self.file(&dest, &e)?;
                }
            }
            EntryKind::Symlink => {
                let link = e.link.clone().unwrap_or_default();
                remove_existing(&dest)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&link), &dest)
                    .map_err(|err| Error::io(&dest, err))?;
                fsmeta::apply(
                    &dest,
                    &Entry {
                        xattrs: Vec::new(),
                        ..e
                    },
                    self.chown,
                )?;
                self.report.other_entries += 1;
            }
            EntryKind::Fifo => {
                remove_existing(&dest)?;
                nix::unistd::mkfifo(&dest, nix::sys::stat::Mode::from_bits_truncate(0o600))
                    .map_err(|err| Error::io(&dest, err.into()))?;
                fsmeta::apply(&dest, &e, self.chown)?;
                self.report.other_entries += 1;
            }
            EntryKind::CharDevice | EntryKind::BlockDevice if self.chown => {
                remove_existing(&dest)?;
                let kind = if e.kind == EntryKind::CharDevice {
                    nix::sys::stat::SFlag::S_IFCHR
                } else {
                    nix::sys::stat::SFlag::S_IFBLK
                };
                nix::sys::stat::mknod(
                    &dest,
                    kind,
                    nix::sys::stat::Mode::from_bits_truncate(0o600),
                    e.rdev as libc::dev_t,
                )
                .map_err(|err| Error::io(&dest, err.into()))?;
                fsmeta::apply(&dest, &e, self.chown)?;
                self.report.other_entries += 1;
            }
            EntryKind::CharDevice | EntryKind::BlockDevice | EntryKind::Socket => {
                let why = if e.kind == EntryKind::Socket {
                    "sockets are recreated by the program that owns them"
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

    /// Makes sure every directory between the target and `dest` is a real directory (creating
    /// missing ones), so nothing is ever written through a symlink.
    fn check_parent(&mut self, dest: &Path) -> Result<()> {
        let parent = dest.parent().expect("dest is below the target");
        if self.checked_parent.as_deref() == Some(parent) {
            return Ok(());
        }
        let rel = parent
            .strip_prefix(&self.target)
            .expect("dest is below the target");
        let mut dir = self.target.clone();
        for c in rel.components() {
            dir.push(c);
            match std::fs::symlink_metadata(&dir) {
                Ok(md) if md.is_dir() => {}
                Ok(md) if md.file_type().is_symlink() => return Err(Error::UnsafePath {
                    path: dir.display().to_string(),
                    reason:
                        "a parent directory is a symlink; writing through it could leave the target",
                }),
                Ok(_) => {
                    return Err(Error::io(
                        &dir,
                        std::io::Error::other("exists and is not a directory"),
                    ))
                }
                Err(_) => create_dir(&dir)?,
            }
        }
        self.checked_parent = Some(parent.to_path_buf());
        Ok(())
    }

    fn file(&mut self, dest: &Path, e: &Entry) -> Result<()> {
        self.tmp_seq += 1;
        let name = dest.file_name().expect("validated path has a name");
        let mut tmp_name = b".".to_vec();
        tmp_name.extend_from_slice(name.as_bytes());
        tmp_name.extend_from_slice(
            format!(".tresor-{}-{}", std::process::id(), self.tmp_seq).as_bytes(),
        );
        let tmp = dest.with_file_name(OsStr::from_bytes(&tmp_name));
        let result = self.write_file(&tmp, e).and_then(|()| {
            fsmeta::apply(&tmp, e, self.chown)?;
            std::fs::rename(&tmp, dest).map_err(|err| Error::io(dest, err))
        });
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result?;
        self.report.files += 1;
        Ok(())
    }

    fn write_file(&mut self, tmp: &Path, e: &Entry) -> Result<()> {
        let mut file = File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(tmp)
            .map_err(|err| Error::io(tmp, err))?;
        let mut written: u64 = 0;
        for _ in 0..e.content.len() {
            let (r, fetch) = match self.rx.recv() {
                Ok(Msg::Chunk(r, fetch)) => (r, fetch),
                Ok(Msg::Failed(err)) => return Err(err),
                _ => unreachable!("a file's chunks follow it"),
            };
            match fetch {
                None => {
                    file.seek(SeekFrom::Current(r.len as i64))
                        .map_err(|err| Error::io(tmp, err))?;
                }
                Some(h) => {
                    let data = pipeline::wait(&self.rt, h)?;
                    file.write_all(&data).map_err(|err| Error::io(tmp, err))?;
                    self.report.chunks_verified += 1;
                }
            }
            written += r.len as u64;
            self.progress.inc(r.len as u64);
        }
        if written != e.size {
            return Err(Error::Corrupt {
                object: format!("catalog entry {}", e.display_path()),
                reason: format!(
                    "content adds up to {written} bytes, the entry says {}",
                    e.size
                ),
            });
        }
        file.set_len(written).map_err(|err| Error::io(tmp, err))?;
        self.report.bytes_written += written;
        Ok(())
    }
}

fn create_dir(dir: &Path) -> Result<()> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(Error::io(dir, e)),
    }
}

/// Removes a non-directory at `path` so a restored entry can take its place.
fn remove_existing(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => Err(Error::io(
            path,
            std::io::Error::other("a directory is in the way"),
        )),
        Ok(_) => std::fs::remove_file(path).map_err(|e| Error::io(path, e)),
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
    let started = std::time::Instant::now();
    let is_device = std::fs::metadata(target).is_ok_and(|m| m.file_type().is_block_device());
    let mut out = File::options()
        .write(true)
        .create(!is_device)
        .truncate(!is_device)
        .custom_flags(libc::O_NOFOLLOW)
        .open(target)
        .map_err(|e| Error::io(target, e))?;
    let mut list = StreamReader::new(Arc::clone(&repo), rt.clone(), snap.snapshot.root.clone(), 2);
    let mut pending: VecDeque<(ChunkRef, Option<JoinHandle<Result<Bytes>>>)> = VecDeque::new();
    let mut report = RestoreReport {
        snapshot: snap.id.clone(),
        target: target.display().to_string(),
        files: 1,
        ..RestoreReport::default()
    };
    let mut more = true;
    loop {
        while more && pending.len() < FETCH_AHEAD {
            let mut rec = [0u8; ChunkRef::ENCODED_LEN];
            match read_record(&mut list, &mut rec)? {
                false => more = false,
                true => {
                    let r = ChunkRef::decode(&rec);
                    pending.push_back((r, (!r.is_zero()).then(|| pipeline::fetch(&repo, &rt, r))));
                }
            }
        }
        let Some((r, fetch)) = pending.pop_front() else {
            break;
        };
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
    list: &mut StreamReader,
    rec: &mut [u8; ChunkRef::ENCODED_LEN],
) -> Result<bool> {
    if list.at_end()? {
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
