//! The catalog: a directory tree as one stream of entries.
//!
//! A tree snapshot stores its metadata as a sequence of CBOR-encoded [`Entry`] values in
//! depth-first order with the children of each directory sorted by name bytes, which is the
//! same as ordering paths component by component ([`path_cmp`]). The first entry is the root
//! directory, with an empty path. The stream is chunked like any other data, so an unchanged
//! part of a tree deduplicates against the previous snapshot's catalog.
//!
//! The sorted order lets a backup walk the previous catalog beside the file system (a merge
//! join, [`PreviousCatalog`]) to find unchanged files in constant memory, and lets a restore
//! stream entries without holding the tree.
//!
//! Paths come from the store and are untrusted: [`validate_path`] refuses anything that could
//! leave the restore target.

use std::cmp::Ordering;
use std::io::BufRead;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::{ChunkId, ChunkRef};

/// What an entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    Dir,
    File,
    Symlink,
    /// Another name of an earlier file entry (`link` holds that entry's path).
    Hardlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

/// One node of a tree snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Relative path, components joined by `/`; empty for the root.
    #[serde(with = "serde_bytes")]
    pub path: Vec<u8>,
    pub kind: EntryKind,
    /// Permission bits including setuid/setgid/sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Change time and inode: only used to detect unchanged files on the next backup.
    pub ctime_ns: i64,
    pub ino: u64,
    /// File size in bytes (0 for non-files).
    pub size: u64,
    /// Symlink target, or for a hardlink the path of the entry it links to.
    #[serde(default, with = "serde_bytes", skip_serializing_if = "Option::is_none")]
    pub link: Option<Vec<u8>>,
    /// Device number of character and block devices.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rdev: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xattrs: Vec<Xattr>,
    /// File content (also kept on hardlinks, so a partial restore can write them alone): the
    /// file's own chunk stream. Empty for a format-2 file held in the payload ([`Entry::slice`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub content: Vec<ChunkRef>,
    /// Format 2: where a file smaller than an average chunk has its `size` bytes in the
    /// snapshot's payload streams ([`crate::volume::payload`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slice: Option<Slice>,
    /// Format 2: the content id of a file held in the payload, so that a file with the same
    /// bytes (touched, or on another host) reuses its slice instead of being stored again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<ChunkId>,
}

/// Which of a snapshot's two payload streams a [`Slice`] is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// The bytes this backup read and appended, chunked as one content-defined stream.
    Fresh,
    /// Whole chunks of earlier snapshots' payloads, taken again for files that did not change.
    Reused,
}

/// A file's place in a payload stream: its bytes start `offset` bytes into the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slice {
    pub stream: Stream,
    pub offset: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// An extended attribute.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

impl Entry {
    /// The path as text, for messages (lossy for non-UTF-8 names).
    pub fn display_path(&self) -> String {
        if self.path.is_empty() {
            ".".into()
        } else {
            String::from_utf8_lossy(&self.path).into_owned()
        }
    }
}

/// Orders paths component by component: the depth-first order of a sorted walk.
pub fn path_cmp(a: &[u8], b: &[u8]) -> Ordering {
    if a.is_empty() || b.is_empty() {
        return a.len().cmp(&b.len());
    }
    a.split(|c| *c == b'/').cmp(b.split(|c| *c == b'/'))
}

/// Checks that a stored path stays inside the restore target: relative, no empty, `.` or `..`
/// component, no NUL.
///
/// # Errors
/// [`Error::UnsafePath`] saying why.
pub fn validate_path(path: &[u8]) -> Result<()> {
    let unsafe_path = |reason| Error::UnsafePath {
        path: String::from_utf8_lossy(path).into_owned(),
        reason,
    };
    if path.first() == Some(&b'/') {
        return Err(unsafe_path("absolute path"));
    }
    if path.contains(&0) {
        return Err(unsafe_path("NUL byte in path"));
    }
    for c in path.split(|c| *c == b'/') {
        match c {
            b"" => return Err(unsafe_path("empty path component")),
            b"." | b".." => return Err(unsafe_path("`.` or `..` component")),
            _ => {}
        }
    }
    Ok(())
}

/// Appends one entry to a catalog stream.
pub fn write_entry(out: &mut impl std::io::Write, entry: &Entry) -> Result<()> {
    ciborium::into_writer(entry, out).map_err(|e| match e {
        ciborium::ser::Error::Io(io) => crate::pipeline::from_io(io),
        other => Error::Config(format!("cannot encode catalog entry: {other}")),
    })
}

/// Reads catalog entries one at a time.
pub struct CatalogReader<R: BufRead> {
    inner: R,
    object: String,
    count: u64,
}

impl<R: BufRead> CatalogReader<R> {
    /// `object` names the catalog in errors (usually the snapshot id).
    pub fn new(inner: R, object: impl Into<String>) -> Self {
        CatalogReader {
            inner,
            object: object.into(),
            count: 0,
        }
    }

    /// The next entry, or `None` at the end of the catalog.
    ///
    /// # Errors
    /// [`Error::Corrupt`] naming the catalog and entry number when it does not decode; errors of
    /// the underlying chunk reads.
    pub fn next_entry(&mut self) -> Result<Option<Entry>> {
        let at_end = self
            .inner
            .fill_buf()
            .map_err(crate::pipeline::from_io)?
            .is_empty();
        if at_end {
            return Ok(None);
        }
        self.count += 1;
        ciborium::from_reader(&mut self.inner)
            .map(Some)
            .map_err(|e| match e {
                ciborium::de::Error::Io(io) => crate::pipeline::from_io(io),
                other => Error::Corrupt {
                    object: format!("catalog of snapshot {}", self.object),
                    reason: format!("entry {} does not decode: {other}", self.count),
                },
            })
    }
}

/// The previous snapshot's catalog, walked in step with a new backup.
pub struct PreviousCatalog<R: BufRead> {
    reader: CatalogReader<R>,
    peeked: Option<Entry>,
}

impl<R: BufRead> PreviousCatalog<R> {
    pub fn new(mut reader: CatalogReader<R>) -> Result<Self> {
        let peeked = reader.next_entry()?;
        Ok(PreviousCatalog { reader, peeked })
    }

    /// The previous entry at `path`, if any. Calls must come in catalog order.
    pub fn find(&mut self, path: &[u8]) -> Result<Option<Entry>> {
        while let Some(e) = &self.peeked {
            match path_cmp(&e.path, path) {
                Ordering::Less => self.peeked = self.reader.next_entry()?,
                Ordering::Equal => {
                    let found = self.peeked.take();
                    self.peeked = self.reader.next_entry()?;
                    return Ok(found);
                }
                Ordering::Greater => return Ok(None),
            }
        }
        Ok(None)
    }
}

/// A file entry with every field set, for tests.
#[cfg(test)]
pub(crate) fn test_entry(path: &str) -> Entry {
    Entry {
        path: path.as_bytes().to_vec(),
        kind: EntryKind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        user: None,
        group: None,
        mtime_ns: 1,
        ctime_ns: 2,
        ino: 3,
        size: 4,
        link: None,
        rdev: 0,
        xattrs: vec![],
        content: vec![],
        slice: None,
        hash: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn component_order_differs_from_byte_order() {
        assert_eq!(path_cmp(b"a/c", b"a-b"), Ordering::Less);
        assert_eq!(path_cmp(b"", b"a"), Ordering::Less);
        assert_eq!(path_cmp(b"a", b"a/b"), Ordering::Less);
        assert_eq!(path_cmp(b"a/b", b"a/b"), Ordering::Equal);
    }

    #[test]
    fn validation_refuses_escapes() {
        for bad in [
            &b"/etc/passwd"[..],
            b"../x",
            b"a/../../x",
            b"a//b",
            b"a/./b",
            b"a\0b",
        ] {
            assert!(
                validate_path(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(validate_path(b"a/b c/\xff\xfe").is_ok());
    }

    #[test]
    fn stream_round_trip_and_merge_join() {
        let mut buf = Vec::new();
        let paths = ["", "a", "a/c", "a-b", "z"];
        for p in paths {
            write_entry(&mut buf, &test_entry(p)).unwrap();
        }
        let mut r = CatalogReader::new(&buf[..], "s");
        for p in paths {
            assert_eq!(r.next_entry().unwrap().unwrap().path, p.as_bytes());
        }
        assert!(r.next_entry().unwrap().is_none());

        let mut prev = PreviousCatalog::new(CatalogReader::new(&buf[..], "s")).unwrap();
        assert!(prev.find(b"a").unwrap().is_some());
        assert!(prev.find(b"a/b").unwrap().is_none());
        assert!(prev.find(b"a-b").unwrap().is_some());
        assert!(prev.find(b"y").unwrap().is_none());
        assert!(prev.find(b"z").unwrap().is_some());

        let err = CatalogReader::new(&b"\xff\xff"[..], "snap1")
            .next_entry()
            .unwrap_err();
        assert!(err.to_string().contains("snap1"), "{err}");
    }
}
