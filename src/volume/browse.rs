//! Browsing tree snapshots without restoring them: the entries under a path (`tresor ls`),
//! the entries whose names match a pattern (`tresor find`), a file's bytes or a directory as a
//! tar stream (`tresor dump`), and what changed between two snapshots (`tresor diff`).

use std::cmp::Ordering;
use std::sync::Arc;

use serde::Serialize;

use tokio::runtime::Handle;

use super::payload::{file_pieces, PayloadIndex};
use super::restore::Selection;
use crate::catalog::{CatalogReader, Entry, EntryKind};
use crate::error::{Error, Result};
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
    let sub = Selection::new(&Vec::from_iter(path))?;
    let mut reader = CatalogReader::new(snap.root_stream(repo, rt, u64::MAX)?, snap.id.clone());
    let mut found = sub.is_all();
    while let Some(entry) = reader.next_entry()? {
        if !sub.contains(&entry.path) {
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

/// The kind of the entry at `path` in tree snapshot `snap`.
///
/// # Errors
/// Those of [`entries`].
pub fn kind_of(
    repo: &Arc<Repository>,
    rt: &Handle,
    snap: &Listed,
    path: &str,
) -> Result<EntryKind> {
    let mut kind = EntryKind::Dir;
    // The path's own entry comes first, before what is below it.
    entries(repo, rt, snap, Some(path), |e| {
        kind = e.kind;
        false
    })?;
    Ok(kind)
}

/// A shell-style pattern for `tresor find`: `*` and `?` within one path component, `[...]`
/// (`[!...]` negated) a character class, `**` any number of components. Without a `/` it
/// matches an entry's last component (its name), with one its whole path (relative, as
/// listed; a leading `/` is ignored).
pub struct Pattern {
    regex: regex::bytes::Regex,
    whole_path: bool,
}

impl Pattern {
    /// # Errors
    /// [`Error::Config`] for an unclosed `[`.
    pub fn new(glob: &str) -> Result<Pattern> {
        let glob = glob.trim_start_matches('/');
        let bad = |why: &str| Error::Config(format!("find pattern {glob:?}: {why}"));
        let mut re = String::from("(?s-u)^");
        let mut chars = glob.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '*' if chars.peek() == Some(&'*') => {
                    chars.next();
                    if chars.peek() == Some(&'/') {
                        chars.next();
                        re.push_str("(?:.*/)?");
                    } else {
                        re.push_str(".*");
                    }
                }
                '*' => re.push_str("[^/]*"),
                '?' => re.push_str("[^/]"),
                '[' => {
                    re.push('[');
                    if chars.peek() == Some(&'!') {
                        chars.next();
                        re.push('^');
                    }
                    let mut closed = false;
                    let mut first = true;
                    for c in chars.by_ref() {
                        if c == ']' && !first {
                            closed = true;
                            break;
                        }
                        first = false;
                        if matches!(c, '\\' | '[' | ']' | '&' | '~' | '^') {
                            re.push('\\');
                        }
                        re.push(c);
                    }
                    if !closed {
                        return Err(bad("a `[` is not closed"));
                    }
                    re.push(']');
                }
                c => re.push_str(&regex::escape(&c.to_string())),
            }
        }
        re.push('$');
        let regex = regex::bytes::Regex::new(&re).map_err(|e| bad(&e.to_string()))?;
        Ok(Pattern {
            regex,
            whole_path: glob.contains('/'),
        })
    }

    /// Whether the entry at `path` matches.
    pub fn matches(&self, path: &[u8]) -> bool {
        let target = if self.whole_path {
            path
        } else {
            path.rsplit(|&c| c == b'/').next().unwrap_or(path)
        };
        self.regex.is_match(target)
    }
}

/// Calls `each` with every entry of the tree snapshot `snap` whose path matches `pattern`, in
/// catalog order; `each` returns `false` to stop. Blocking reads: call it off the runtime.
///
/// # Errors
/// Those of [`entries`].
pub fn find(
    repo: &Arc<Repository>,
    rt: &Handle,
    snap: &Listed,
    pattern: &Pattern,
    mut each: impl FnMut(Entry) -> bool,
) -> Result<()> {
    entries(repo, rt, snap, None, |e| {
        !pattern.matches(&e.path) || e.path.is_empty() || each(e)
    })
}

/// Chunks fetched ahead while a file is dumped.
const DUMP_AHEAD: usize = 8;

/// Writes the bytes of the file at `path` in tree snapshot `snap` to `out`, each chunk checked
/// as a restore checks it, and returns how many. Blocking reads: call it off the runtime.
///
/// # Errors
/// [`Error::PathNotFound`] when no entry has `path`, [`Error::Config`] when it is not a file
/// (a directory is dumped by [`dump_tar`]), [`Error::Corrupt`] for bad data,
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
            "{path} is a {:?} entry, not a file: `tresor ls` shows it, `tresor dump --tar` writes it as a tar stream",
            entry.kind
        )
        .to_lowercase()));
    }
    let index = match &snap.snapshot.payload {
        Some(p) if entry.slice.is_some() => Some(PayloadIndex::load(repo, rt, &snap.id, p)?),
        _ => None,
    };
    let mut content = Content::new(repo, rt, index.as_ref(), snap, &entry)?;
    std::io::copy(&mut content, out).map_err(output_error)
}

/// An error of a copy into the dump's output: the library's own when reading failed, else
/// the output's.
fn output_error(e: std::io::Error) -> Error {
    if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
        pipeline::from_io(e)
    } else {
        Error::io("(dump output)", e)
    }
}

/// A file entry's content as a reader: its payload slice or its own chunks, fetched ahead and
/// checked; exactly the size the entry says, or an error (a tar header promised that size).
struct Content {
    stream: pipeline::StreamReader,
    left: u64,
    size: u64,
    shown: String,
}

impl Content {
    fn new(
        repo: &Arc<Repository>,
        rt: &Handle,
        index: Option<&PayloadIndex>,
        snap: &Listed,
        entry: &Entry,
    ) -> Result<Content> {
        let pieces = file_pieces(index, &snap.id, entry)?;
        Ok(Content {
            stream: pipeline::StreamReader::pieces(
                Arc::clone(repo),
                rt.clone(),
                pieces.into_iter(),
                DUMP_AHEAD,
            ),
            left: entry.size,
            size: entry.size,
            shown: entry.display_path(),
        })
    }

    fn wrong_size(&self) -> std::io::Error {
        std::io::Error::other(Error::Corrupt {
            object: format!("catalog entry {}", self.shown),
            reason: format!(
                "its content does not add up to the {} bytes the entry says",
                self.size
            ),
        })
    }
}

impl std::io::Read for Content {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::io::BufRead;
        if self.left == 0 {
            return if self.stream.fill_buf()?.is_empty() {
                Ok(0)
            } else {
                Err(self.wrong_size())
            };
        }
        let max = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.stream.read(&mut buf[..max])?;
        if n == 0 {
            return Err(self.wrong_size());
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// What [`dump_tar`] wrote.
#[derive(Debug, Default, Serialize)]
pub struct TarSummary {
    pub entries: u64,
    pub bytes: u64,
    /// Entries a tar stream cannot hold (sockets) or that were withheld (device nodes without
    /// `special`), by path.
    pub skipped: Vec<String>,
}

/// Writes the entries of tree snapshot `snap` at or below `path` to `out` as a tar stream
/// (POSIX with GNU long names, xattrs as `SCHILY.xattr` PAX records), named as stored, so the
/// stream unpacks like `tar -C ROOT -c PATH` would have packed it. Each chunk is checked as a
/// restore checks it. A hardlink to a file outside `path` is written as a copy of it. Without
/// `special` (as a restore: an unencrypted repository, no `--restore-special`) setuid and
/// setgid bits are cleared and device nodes left out. Blocking: call it off the runtime.
///
/// # Errors
/// Those of [`entries`], [`Error::Corrupt`] for bad data, [`Error::Io`] writing `out`.
pub fn dump_tar(
    repo: &Arc<Repository>,
    rt: &Handle,
    snap: &Listed,
    path: Option<&str>,
    special: bool,
    out: impl std::io::Write,
) -> Result<TarSummary> {
    let index = match &snap.snapshot.payload {
        Some(p) => Some(PayloadIndex::load(repo, rt, &snap.id, p)?),
        None => None,
    };
    let sub = Selection::new(&Vec::from_iter(path))?;
    let mut tar = tar::Builder::new(out);
    let mut summary = TarSummary::default();
    let mut failed = None;
    let content = |entry: &Entry| Content::new(repo, rt, index.as_ref(), snap, entry);
    entries(repo, rt, snap, path, |entry| {
        let written = tar_entry(&mut tar, &sub, special, &entry, content);
        match written {
            Ok(true) => {
                summary.entries += 1;
                summary.bytes += entry.size;
            }
            Ok(false) => summary.skipped.push(entry.display_path()),
            Err(e) => failed = Some(e),
        }
        failed.is_none()
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    tar.into_inner()
        .and_then(|mut out| out.flush())
        .map_err(|e| Error::io("(dump output)", e))?;
    Ok(summary)
}

/// One entry into the tar stream (a file's bytes read from `content`); `false` when it has no
/// place there.
fn tar_entry<W: std::io::Write>(
    tar: &mut tar::Builder<W>,
    sub: &Selection,
    special: bool,
    entry: &Entry,
    content: impl Fn(&Entry) -> Result<Content>,
) -> Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    use tar::EntryType;
    let io = output_error;
    let name = if entry.path.is_empty() {
        std::path::Path::new(".")
    } else {
        std::path::Path::new(std::ffi::OsStr::from_bytes(&entry.path))
    };
    let mut header = tar::Header::new_gnu();
    let mode = if special {
        entry.mode
    } else {
        entry.mode & !0o6000
    };
    header.set_mode(mode & 0o7777);
    header.set_uid(entry.uid.into());
    header.set_gid(entry.gid.into());
    header.set_mtime(entry.mtime_ns.div_euclid(1_000_000_000).max(0) as u64);
    header.set_size(0);
    // Names that do not fit the header's fields are left out; the ids are there.
    let _ = entry.user.as_deref().map(|u| header.set_username(u));
    let _ = entry.group.as_deref().map(|g| header.set_groupname(g));
    // PAX records: the mtime to the nanosecond (the header holds seconds), and the xattrs.
    let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
    let nanos = entry.mtime_ns.rem_euclid(1_000_000_000);
    if nanos != 0 {
        let secs = entry.mtime_ns.div_euclid(1_000_000_000);
        pax.push(("mtime".into(), format!("{secs}.{nanos:09}").into_bytes()));
    }
    for x in &entry.xattrs {
        if let Ok(name) = std::str::from_utf8(&x.name) {
            pax.push((format!("SCHILY.xattr.{name}"), x.value.clone()));
        }
    }
    if !pax.is_empty() {
        tar.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
            .map_err(io)?;
    }
    let link = entry.link.as_deref().map(std::ffi::OsStr::from_bytes);
    match entry.kind {
        EntryKind::Dir => {
            header.set_entry_type(EntryType::Directory);
            tar.append_data(&mut header, name, std::io::empty())
                .map_err(io)?;
        }
        EntryKind::Symlink => {
            header.set_entry_type(EntryType::Symlink);
            tar.append_link(&mut header, name, link.unwrap_or_default())
                .map_err(io)?;
        }
        EntryKind::Hardlink if entry.link.as_ref().is_some_and(|l| sub.contains(l)) => {
            header.set_entry_type(EntryType::Link);
            tar.append_link(&mut header, name, link.unwrap_or_default())
                .map_err(io)?;
        }
        EntryKind::File | EntryKind::Hardlink => {
            header.set_entry_type(EntryType::Regular);
            header.set_size(entry.size);
            tar.append_data(&mut header, name, content(entry)?)
                .map_err(output_error)?;
        }
        EntryKind::Fifo => {
            header.set_entry_type(EntryType::Fifo);
            tar.append_data(&mut header, name, std::io::empty())
                .map_err(io)?;
        }
        EntryKind::CharDevice | EntryKind::BlockDevice if special => {
            header.set_entry_type(if entry.kind == EntryKind::CharDevice {
                EntryType::Char
            } else {
                EntryType::Block
            });
            let (major, minor) = (
                nix::sys::stat::major(entry.rdev),
                nix::sys::stat::minor(entry.rdev),
            );
            header.set_device_major(major as u32).map_err(io)?;
            header.set_device_minor(minor as u32).map_err(io)?;
            tar.append_data(&mut header, name, std::io::empty())
                .map_err(io)?;
        }
        EntryKind::CharDevice | EntryKind::BlockDevice | EntryKind::Socket => return Ok(false),
    }
    Ok(true)
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

    #[test]
    fn find_patterns_match_names_or_whole_paths() {
        let yes = |glob: &str, path: &[u8]| Pattern::new(glob).unwrap().matches(path);
        assert!(yes("*.conf", b"etc/nginx/nginx.conf"));
        assert!(!yes("*.conf", b"etc/nginx.conf.d/x"));
        assert!(yes("pg_*", b"var/lib/postgresql/pg_wal"));
        assert!(yes("?.txt", b"d/a.txt") && !yes("?.txt", b"d/ab.txt"));
        assert!(yes("[ab]*", b"x/beta") && !yes("[!ab]*", b"x/beta"));
        assert!(yes("etc/*/nginx.conf", b"etc/nginx/nginx.conf"));
        assert!(!yes("etc/*", b"etc/nginx/nginx.conf"));
        assert!(yes("/etc/**", b"etc/nginx/nginx.conf"));
        assert!(yes("**/base/*", b"var/lib/postgresql/15/main/base/1"));
        assert!(yes("a.b", b"a.b") && !yes("a.b", b"axb"));
        assert!(yes("bad-*", b"bad-utf8-\xff\xfe"));
        assert!(Pattern::new("[oops").is_err());
    }
}
