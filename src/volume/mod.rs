//! Volume snapshots: directory trees and block images, backed up and restored.
//!
//! A directory becomes a tree snapshot ([`backup`] walks it; see [`crate::catalog`] for the
//! format); a block device or regular file (or any path with `block` set) becomes a block
//! snapshot of fixed-size chunks, where all-zero chunks are not stored. A tree backup reuses
//! the content refs of files unchanged since the newest snapshot of the same name and host, so
//! an incremental run reads only what changed.

mod backup;
pub mod browse;
mod filewriters;
mod fsmeta;
pub mod payload;
mod restore;
mod reuse;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tokio::runtime::Handle;

pub use restore::{open_subdir, RestoreOptions, RestoreReport};

use backup::Reference;
use payload::PayloadIndex;

use crate::catalog::{CatalogReader, PreviousCatalog};
use crate::error::{Error, Result};
use crate::gc::Session;
use crate::id::ChunkRef;
use crate::pipeline::{ChunkWriter, DEFAULT_IN_FLIGHT};
use crate::progress::Progress;
use crate::repository::Repository;
use crate::snapshot::{self, Kind, Listed, RootFormat, Snapshot, RECORD_VERSION};

/// What to back up.
#[derive(Clone, Debug)]
pub struct BackupOptions {
    pub name: String,
    pub path: PathBuf,
    pub host: String,
    pub tags: Vec<String>,
    /// Store the path as one byte stream even if it is a regular file (always for devices).
    pub block: bool,
    /// Abort on the first unreadable entry instead of recording it.
    pub strict: bool,
    /// Use the newest snapshot of this name and host to skip unchanged files.
    pub use_parent: bool,
}

/// Backs up a volume within backup `session` and writes its snapshot record, after every chunk
/// it references is stored. Blocking: call it from a thread that may block, with a handle to
/// the runtime. The caller ends the session ([`Session::finish`]).
///
/// # Errors
/// [`Error::Io`] when the source path cannot be read at all; store errors; with `strict`, the
/// first unreadable entry; [`Error::LeaseLost`] when the session lost touch with the store.
pub fn backup(
    session: &Arc<Session>,
    rt: &Handle,
    options: &BackupOptions,
    progress: &Progress,
) -> Result<Listed> {
    let started = Instant::now();
    let repo = session.repo();
    let source = std::fs::canonicalize(&options.path).map_err(|e| Error::io(&options.path, e))?;
    let md = std::fs::metadata(&source).map_err(|e| Error::io(&source, e))?;
    let writer = ChunkWriter::new(Arc::clone(session), rt.clone(), DEFAULT_IN_FLIGHT);
    let (root_format, root, payload, mut summary, errors, parent) = if md.is_dir() && !options.block
    {
        let format2 = repo.format() >= 2;
        let reference = if options.use_parent {
            reference(repo, rt, &options.name, &options.host, format2)?
        } else {
            None
        };
        let parent = reference
            .as_ref()
            .filter(|(_, r)| r.trusted)
            .map(|(p, _)| p.id.clone());
        let tree = backup::backup_tree(
            &writer,
            &source,
            reference.map(|(_, r)| r),
            format2,
            options.strict,
            progress,
        )?;
        (
            RootFormat::Tree,
            tree.catalog,
            tree.payload,
            tree.summary,
            tree.errors,
            parent,
        )
    } else if md.is_dir() {
        return Err(Error::Config(format!(
            "{} is a directory; --block needs a block device or image file",
            source.display()
        )));
    } else {
        let (root, summary) = backup::backup_block(&writer, &source, progress)?;
        (RootFormat::Block, root, None, summary, Vec::new(), None)
    };
    writer.flush()?;
    rt.block_on(repo.sync())?;
    summary.chunks = writer.stats().summary();
    summary.duration_ms = started.elapsed().as_millis() as u64;
    let snapshot = Snapshot {
        version: RECORD_VERSION,
        kind: Kind::Volume,
        name: options.name.clone(),
        source: source.display().to_string(),
        host: options.host.clone(),
        time: chrono::Utc::now(),
        tags: options.tags.clone(),
        partial: summary.errors > 0,
        root_format,
        root,
        payload,
        parent,
        summary,
        image: None,
        errors,
    };
    session.check_lease()?;
    let id = rt.block_on(snapshot.save(repo))?;
    Ok(Listed { id, snapshot })
}

/// The snapshot a tree backup builds on: the newest of this name and host (its unchanged files
/// are not read); failing that, in format 2, the newest of this name from any host (a file
/// with the same bytes reuses its slice of the payload, so a second host's first backup
/// stores only what differs).
fn reference(
    repo: &Arc<Repository>,
    rt: &Handle,
    name: &str,
    host: &str,
    format2: bool,
) -> Result<Option<(Listed, Reference)>> {
    let trees = |host: Option<&str>| -> Result<Option<Listed>> {
        Ok(rt
            .block_on(snapshot::latest(repo, Kind::Volume, name, host))?
            .filter(|p| p.snapshot.root_format == RootFormat::Tree))
    };
    let (snap, trusted) = match trees(Some(host))? {
        Some(p) => (p, true),
        None if format2 => match trees(None)? {
            Some(p) => (p, false),
            None => return Ok(None),
        },
        None => return Ok(None),
    };
    let stream = snap.root_stream(repo, rt, u64::MAX)?;
    let catalog = PreviousCatalog::new(CatalogReader::new(stream, snap.id.clone()))?;
    let payload = match &snap.snapshot.payload {
        Some(p) if p.within_budget() => Some(PayloadIndex::load(repo, rt, &snap.id, p)?),
        Some(p) => {
            tracing::info!(
                "snapshot {} keeps {} bytes of older chunks for its small files (over the \
                 padding budget): reading small files again",
                &snap.id[..8],
                p.padding
            );
            None
        }
        None => None,
    };
    Ok(Some((
        snap,
        Reference {
            catalog,
            payload,
            trusted,
        },
    )))
}

fn not_a_volume(snap: &Listed) -> Error {
    let kind = format!("{:?}", snap.snapshot.kind).to_lowercase();
    Error::Config(format!(
        "snapshot {} is a {kind} snapshot; use `restore {kind}`",
        &snap.id[..8]
    ))
}

/// Calls `f` with every data chunk ref of a volume snapshot and the path that uses it (empty for
/// a block image), reading its catalog or ref list (whose chunks are verified as they are read).
/// Blocking, like [`backup`].
///
/// # Errors
/// The first error reading the index (a missing or corrupt catalog chunk), or of `f`.
pub fn walk_refs(
    repo: &Arc<Repository>,
    rt: &Handle,
    snap: &Listed,
    mut f: impl FnMut(&[u8], &ChunkRef) -> Result<()>,
) -> Result<()> {
    let mut stream = snap.root_stream(repo, rt, u64::MAX)?;
    match snap.snapshot.root_format {
        RootFormat::Tree => {
            let payload = match &snap.snapshot.payload {
                Some(p) => Some(PayloadIndex::load(repo, rt, &snap.id, p)?),
                None => None,
            };
            let mut catalog = CatalogReader::new(stream, snap.id.clone());
            while let Some(entry) = catalog.next_entry()? {
                for r in &entry.content {
                    f(&entry.path, r)?;
                }
                for piece in payload::pieces_of(payload.as_ref(), &snap.id, &entry)? {
                    f(&entry.path, &piece.chunk)?;
                }
            }
        }
        RootFormat::Block => {
            let mut rec = [0u8; ChunkRef::ENCODED_LEN];
            while restore::read_record(&mut stream, &mut rec)? {
                f(b"", &ChunkRef::decode(&rec))?;
            }
        }
        RootFormat::Image | RootFormat::Workload => return Err(not_a_volume(snap)),
    }
    Ok(())
}

/// Restores a volume snapshot to `target`: a directory for trees, a file or block device for
/// block snapshots. Blocking, like [`backup`].
pub fn restore(
    repo: &Arc<Repository>,
    rt: &Handle,
    snap: &Listed,
    target: &std::path::Path,
    options: &RestoreOptions,
    progress: &Progress,
) -> Result<RestoreReport> {
    match snap.snapshot.root_format {
        RootFormat::Tree => restore::restore_tree(
            Arc::clone(repo),
            rt.clone(),
            snap,
            target,
            options,
            progress,
        ),
        RootFormat::Block if !options.paths.is_empty() => Err(Error::Config(
            "--path selects inside a tree; this is a block snapshot".into(),
        )),
        RootFormat::Block => {
            restore::restore_block(Arc::clone(repo), rt.clone(), snap, target, progress)
        }
        RootFormat::Image | RootFormat::Workload => Err(not_a_volume(snap)),
    }
}

/// Restores the volume snapshot `snap` as entry `name` of the open directory `dir` (a
/// directory for a tree, created 0700 when missing; a file for a block image, 0600), never
/// through a symlink: for targets below one the operator chose (a workload's
/// `DIR/volumes/NAME`). `shown` names it in errors.
///
/// # Errors
/// As [`restore`]; [`Error::UnsafePath`] when `name` is a symlink.
#[allow(clippy::too_many_arguments)]
pub fn restore_in(
    repo: &Arc<Repository>,
    rt: &Handle,
    snap: &Listed,
    dir: std::os::fd::BorrowedFd<'_>,
    name: &std::ffi::OsStr,
    shown: &std::path::Path,
    options: &RestoreOptions,
    progress: &Progress,
) -> Result<RestoreReport> {
    let (repo, rt) = (Arc::clone(repo), rt.clone());
    match snap.snapshot.root_format {
        RootFormat::Tree => {
            let root = restore::open_subdir(dir, name, shown)?;
            restore::restore_tree_at(repo, rt, snap, root, shown, options, progress)
        }
        RootFormat::Block => {
            let truncate = rustix::fs::OFlags::TRUNC;
            let file = restore::create_private(dir, name, truncate, shown)?;
            restore::write_block(repo, rt, snap, file, false, shown, progress)
        }
        RootFormat::Image | RootFormat::Workload => Err(not_a_volume(snap)),
    }
}
