//! Browsing tree snapshots without restoring them: the entries under a path (`tresor ls`), one
//! file's bytes (`tresor dump`), and what changed between two snapshots (`tresor diff`).

use std::cmp::Ordering;
use std::sync::Arc;

use serde::Serialize;

use tokio::runtime::Handle;

use super::payload::{pieces_of, PayloadIndex};
use crate::catalog::{CatalogReader, Entry, EntryKind};
use crate::error::{Error, Result};
use crate::id::ChunkRef;
use crate::pipeline;
use crate::repository::Repository;
use crate::snapshot::{Listed, RootFormat};

/// Calls `each` with every entry of the tree snapshot `snap` at or below `path` (relative, as
/// listed; `None` for the whole tree), in catalog order (sorted, depth first); `each` returns
/// `false` to stop. Blocking reads: call it off the runtime.
///
/// # Errors
/// [`Error::Config`] for a snapshot that is not a tree, [`Error::UnsafePath`] for a path that
/// would leave the tree, [`Error::PathNotFound`] when no entry has `path`, and
/// the catalog's read errors.
pub fn entries(
    repo: &Arc<Repository>,
    rt: &Handle,
    snap: &Listed,
    path: Option<&str>,
    mut each: impl FnMut(Entry) -> bool,
) -> Result<()> {
    if snap.snapshot.root_format != RootFormat::Tree {
        return Err(Error::Config(format!(
            "snapshot {} is not a tree: only a volume tree has paths to list",
            &snap.id[..8.min(snap.id.len())]
        )));
    }
    let sub = super::restore::selection(path)?;
    let mut reader = CatalogReader::new(snap.root_stream(repo, rt, u64::MAX)?, snap.id.clone());
    let mut found = sub.is_none();
    while let Some(entry) = reader.next_entry()? {
        if !super::restore::selected(&entry.path, &sub) {
            continue;
        }
        found = true;
        if !each(entry) {
            break;
        }
    }
    if !found {
        return Err(Error::PathNotFound {
            snapshot: snap.id[..8.min(snap.id.len())].to_string(),
            path: path.unwrap_or_default().to_string(),
        });
    }
    Ok(())
}

/// Chunks fetched ahead while a file is dumped.
const DUMP_AHEAD: usize = 8;

/// Writes the bytes of the file at `path` in tree snapshot `snap` to `out`, each chunk checked
/// as a restore checks it, and returns how many. Blocking reads: call it off the runtime.
///
/// # Errors
/// [`Error::PathNotFound`] when no entry has `path`, [`Error::Config`] when it is not a file
/// (a directory is restored with `restore volume --path`), [`Error::Corrupt`] for bad data,
/// [`Error::Io`] writing `out`.
pub fn dump(
    repo: &Arc<Repository>,
    rt: &Handle,
    snap: &Listed,
    path: &str,
    out: &mut impl std::io::Write,
) -> Result<u64> {
    let wanted = path.trim_matches('/');
    let mut found = None;
    entries(repo, rt, snap, Some(path), |e| {
        if e.path == wanted.as_bytes() {
            found = Some(e);
        }
        false
    })?;
    let entry = found.ok_or_else(|| Error::PathNotFound {
        snapshot: snap.id[..8.min(snap.id.len())].to_string(),
        path: path.to_string(),
    })?;
    if !matches!(entry.kind, EntryKind::File | EntryKind::Hardlink) {
        return Err(Error::Config(format!(
            "{path} is a {:?} entry, not a file: `tresor ls` shows it, `restore volume --path` restores it",
            entry.kind
        )
        .to_lowercase()));
    }
    // Each part of its content: a chunk, and the bytes of it that belong to the file.
    let parts: Vec<(ChunkRef, u32, u32)> = match &snap.snapshot.payload {
        Some(p) if entry.slice.is_some() => {
            let index = PayloadIndex::load(repo, rt, &snap.id, p)?;
            pieces_of(Some(&index), &snap.id, &entry)?
                .into_iter()
                .map(|piece| (piece.chunk, piece.skip, piece.take))
                .collect()
        }
        _ => pieces_of(None, &snap.id, &entry)?
            .into_iter()
            .map(|piece| (piece.chunk, piece.skip, piece.take))
            .chain(entry.content.iter().map(|&c| (c, 0, c.len)))
            .collect(),
    };
    let shown = entry.display_path();
    let mut pending = std::collections::VecDeque::new();
    let mut parts = parts.into_iter();
    let mut written = 0u64;
    loop {
        while pending.len() < DUMP_AHEAD {
            let Some((chunk, skip, take)) = parts.next() else {
                break;
            };
            pending.push_back((pipeline::fetch(repo, rt, chunk), chunk, skip, take));
        }
        let Some((fetch, chunk, skip, take)) = pending.pop_front() else {
            break;
        };
        let data = pipeline::wait(rt, fetch).map_err(|e| e.context(format!("dumping {shown}")))?;
        let bytes = data
            .get(skip as usize..skip as usize + take as usize)
            .ok_or_else(|| Error::Corrupt {
                object: format!("catalog entry {shown}"),
                reason: format!("its part of chunk {} is out of the chunk", chunk.id),
            })?;
        out.write_all(bytes)
            .map_err(|e| Error::io("(dump output)", e))?;
        written += u64::from(take);
    }
    if written != entry.size {
        return Err(Error::Corrupt {
            object: format!("catalog entry {shown}"),
            reason: format!(
                "content adds up to {written} bytes, the entry says {}",
                entry.size
            ),
        });
    }
    Ok(written)
}

/// How an entry differs between two snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    /// Its path (relative; `.` for the root).
    pub path: String,
    pub change: ChangeKind,
    /// With [`ChangeKind::Modified`]: its content (bytes, link target) differs.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub content: bool,
    /// With [`ChangeKind::Modified`]: the metadata that differs (`type`, `mode`, `owner`,
    /// `mtime`, `xattrs`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub metadata: Vec<&'static str>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Added,
    Removed,
    Modified,
}

/// The order of a catalog (a sorted depth-first walk): paths compared component by component,
/// so a directory comes before what it holds and siblings by name.
fn catalog_order(a: &[u8], b: &[u8]) -> Ordering {
    a.split(|&c| c == b'/').cmp(b.split(|&c| c == b'/'))
}

/// What differs between entries `a` (older) and `b` of the same path, if anything.
fn compare(a: &Entry, b: &Entry) -> Option<Change> {
    let mut metadata = Vec::new();
    if a.kind != b.kind {
        metadata.push("type");
    }
    if a.mode != b.mode {
        metadata.push("mode");
    }
    if (a.uid, a.gid) != (b.uid, b.gid) {
        metadata.push("owner");
    }
    if a.mtime_ns != b.mtime_ns {
        metadata.push("mtime");
    }
    if a.xattrs != b.xattrs {
        metadata.push("xattrs");
    }
    // A file's bytes: its content id where the payload holds it, else its chunk refs.
    let content = a.size != b.size
        || a.link != b.link
        || a.rdev != b.rdev
        || match (a.hash, b.hash) {
            (Some(x), Some(y)) => x != y,
            _ => a.content != b.content || a.slice.is_some() != b.slice.is_some(),
        };
    (content || !metadata.is_empty()).then(|| Change {
        path: b.display_path(),
        change: ChangeKind::Modified,
        content,
        metadata,
    })
}

/// Calls `each` with every difference from tree snapshot `a` to `b`, in catalog order: both
/// catalogs are read once, side by side. `each` returns `false` to stop.
///
/// # Errors
/// [`Error::Config`] when either is not a tree, and the catalogs' read errors.
pub fn diff(
    repo: &Arc<Repository>,
    rt: &Handle,
    a: &Listed,
    b: &Listed,
    mut each: impl FnMut(Change) -> bool,
) -> Result<()> {
    for snap in [a, b] {
        if snap.snapshot.root_format != RootFormat::Tree {
            return Err(Error::Config(format!(
                "snapshot {} is not a tree: only volume trees are compared",
                &snap.id[..8.min(snap.id.len())]
            )));
        }
    }
    let mut old = CatalogReader::new(a.root_stream(repo, rt, u64::MAX)?, a.id.clone());
    let mut new = CatalogReader::new(b.root_stream(repo, rt, u64::MAX)?, b.id.clone());
    let (mut x, mut y) = (old.next_entry()?, new.next_entry()?);
    loop {
        let change = match (&x, &y) {
            (None, None) => return Ok(()),
            (Some(e), Some(f)) if e.path == f.path => {
                let change = compare(e, f);
                (x, y) = (old.next_entry()?, new.next_entry()?);
                change
            }
            (Some(e), Some(f)) if catalog_order(&e.path, &f.path) == Ordering::Less => {
                let change = removed(e);
                x = old.next_entry()?;
                Some(change)
            }
            (Some(e), None) => {
                let change = removed(e);
                x = old.next_entry()?;
                Some(change)
            }
            (_, Some(f)) => {
                let change = Change {
                    path: f.display_path(),
                    change: ChangeKind::Added,
                    content: false,
                    metadata: Vec::new(),
                };
                y = new.next_entry()?;
                Some(change)
            }
        };
        if let Some(change) = change {
            if !each(change) {
                return Ok(());
            }
        }
    }
}

fn removed(e: &Entry) -> Change {
    Change {
        path: e.display_path(),
        change: ChangeKind::Removed,
        content: false,
        metadata: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_order_is_a_sorted_depth_first_walk() {
        let mut paths: Vec<&[u8]> = vec![b"b", b"a/z", b"a", b"a.txt", b"", b"a/b/c", b"a/b"];
        paths.sort_by(|a, b| catalog_order(a, b));
        assert_eq!(
            paths,
            [&b""[..], b"a", b"a/b", b"a/b/c", b"a/z", b"a.txt", b"b"]
        );
    }
}
