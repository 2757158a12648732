//! `tresor mount`: the repository's snapshots as a read-only FUSE filesystem, to browse and
//! pick files without restoring (restic's and borg's `mount`).
//!
//! ```text
//! DIR/hosts/HOST/KIND/NAME/TIME/   one snapshot (NAME with `/` as %2F); NAME/latest -> TIME
//! DIR/ids/ID -> ../hosts/HOST/KIND/NAME/TIME
//! ```
//!
//! A snapshot directory is read on its first look, from its record in the store (checked as a
//! restore checks it, untrusted like everything read from the store):
//! - a volume tree is its tree, with modes, owners, times, xattrs, symlinks, hardlinks (one
//!   inode), fifos and device nodes (the mount is `nodev,nosuid`);
//! - a block image is one file, named after its source;
//! - an image is an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/`), which
//!   `skopeo copy oci:...` reads as it is;
//! - a workload is its compose files, the project as the compose tool printed it, and its
//!   members as symlinks into `ids/` (`services/`, `volumes/`, `binds/`).
//!
//! File bytes are fetched when read: every chunk checked against its id, a few fetched ahead,
//! the most recent kept in a bounded cache. Names that could leave their directory (`/`, `.`,
//! `..`, NUL) are left out with a warning, as a restore refuses them.

use std::collections::{HashMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyXattr, Request,
};
use tokio::runtime::Handle;
use tokio::sync::OnceCell;

use crate::catalog::{CatalogReader, Entry, EntryKind, Xattr};
use crate::error::{Error, Result};
use crate::id::{ChunkId, ChunkRef};
use crate::pipeline::{self, Piece};
use crate::repository::Repository;
use crate::snapshot::{Listed, RootFormat};
use crate::volume::payload::{file_pieces, PayloadIndex};

/// How long the kernel may keep an answer: a snapshot never changes once listed.
const TTL: Duration = Duration::from_secs(60);
/// Bytes of chunks kept after they were read, for the next reads of the same chunk (the kernel
/// reads 128 KiB at a time; a chunk is 1 MiB on average).
const CACHE_BYTES: u64 = 64 << 20;
/// Chunks of a file fetched ahead of the one read.
const AHEAD: usize = 4;
/// Threads answering the kernel: reads of several files at once.
const THREADS: usize = 4;

/// A mounted repository; [`Mounted::unmount`] ends it.
pub struct Mounted {
    session: fuser::BackgroundSession,
}

impl Mounted {
    /// Whether the filesystem was unmounted from outside (`umount DIR`).
    pub fn is_finished(&self) -> bool {
        self.session.guard.is_finished()
    }

    /// Unmounts and waits for the filesystem's threads.
    ///
    /// # Errors
    /// [`Error::Io`] when the kernel refuses (the mount point is busy).
    pub fn unmount(self, dir: &Path) -> Result<()> {
        let ended = if self.is_finished() {
            self.session.join()
        } else {
            self.session.umount_and_join()
        };
        match ended {
            // Unmounted from outside between the look and the call.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            other => other.map_err(|e| Error::io(dir, e)),
        }
    }
}

/// Mounts `snapshots` of `repo` read-only at `dir`, served from threads of their own (reads
/// go through `rt`) until [`Mounted::unmount`].
///
/// # Errors
/// [`Error::Io`] naming `dir` when the kernel refuses the mount (no `/dev/fuse`, not a
/// directory, no permission).
pub fn mount(
    repo: Arc<Repository>,
    rt: Handle,
    snapshots: Vec<Listed>,
    dir: &Path,
) -> Result<Mounted> {
    let fs = Tree::new(repo, rt, snapshots);
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::DefaultPermissions,
        MountOption::FSName("tresor".into()),
        MountOption::Subtype("tresor".into()),
    ];
    config.n_threads = Some(THREADS);
    let session = fuser::spawn_mount(fs, dir, &config).map_err(|e| Error::io(dir, e))?;
    Ok(Mounted { session })
}

/// One file, directory or other node.
struct Node {
    parent: u64,
    kind: FileType,
    perm: u16,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: SystemTime,
    rdev: u32,
    nlink: u32,
    body: Body,
}

enum Body {
    /// Children sorted by name; `pending` is a snapshot (an index into the list) whose
    /// contents are read on the first look.
    Dir {
        children: Vec<(OsString, u64)>,
        pending: Option<usize>,
    },
    Link(Vec<u8>),
    File(Arc<Content>),
    Other,
}

/// A file's bytes.
enum Content {
    Inline(Vec<u8>),
    /// Pieces of chunks, and where each piece ends in the file.
    Chunks {
        pieces: Vec<Piece>,
        ends: Vec<u64>,
    },
    /// A file whose pieces do not add up to its size: reads fail, naming it.
    Bad(String),
}

impl Content {
    fn chunks(pieces: Vec<Piece>, size: u64, shown: &str) -> Content {
        let mut end = 0u64;
        let ends: Vec<u64> = pieces
            .iter()
            .map(|&(_, _, take)| {
                end += u64::from(take);
                end
            })
            .collect();
        if end != size {
            return Content::Bad(format!(
                "{shown}: its content adds up to {end} bytes, its entry says {size}"
            ));
        }
        Content::Chunks { pieces, ends }
    }
}

/// The filesystem: every node by inode number (index + 1), filled as snapshots are looked at.
struct Tree {
    repo: Arc<Repository>,
    rt: Handle,
    snapshots: Vec<Listed>,
    nodes: RwLock<Vec<Node>>,
    xattrs: RwLock<HashMap<u64, Vec<Xattr>>>,
    /// Held while a snapshot is read into nodes, so two threads do not read the same one.
    loading: Mutex<()>,
    chunks: ChunkCache,
    owner: (u32, u32),
    /// The kernel sends no `open` or `release` once `open` answers ENOSYS.
    no_open: bool,
}

const ROOT: u64 = 1;

/// The place of node `ino` in the list (none for 0, which the kernel never sends).
fn node_at(ino: u64) -> usize {
    (ino as usize).wrapping_sub(1)
}

impl Tree {
    fn new(repo: Arc<Repository>, rt: Handle, snapshots: Vec<Listed>) -> Tree {
        let owner = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        let now = SystemTime::now();
        let mut b = Builder::new(ROOT, owner);
        let root = b.meta(FileType::Directory, now);
        b.make(ROOT, root);
        let hosts = b.child_dir(ROOT, OsStr::new("hosts"), now);
        let ids = b.child_dir(ROOT, OsStr::new("ids"), now);
        for (i, snap) in snapshots.iter().enumerate() {
            let s = &snap.snapshot;
            let time: SystemTime = s.time.into();
            let kind = format!("{:?}", s.kind).to_lowercase();
            let mut path = vec![encode(&s.host), kind, encode(&s.name)];
            let mut at = hosts;
            for part in &path {
                at = b.child_dir(at, OsStr::new(part), time);
            }
            let mut name = s.time.format("%Y-%m-%dT%H:%M:%SZ").to_string();
            if b.named.contains_key(&(at, OsString::from(&name))) {
                name = format!("{name}-{}", &snap.id[..8.min(snap.id.len())]);
            }
            let meta = b.meta(FileType::Directory, time);
            let dir = b.add(at, OsStr::new(&name), meta);
            b.set_body(
                dir,
                0,
                Body::Dir {
                    children: Vec::new(),
                    pending: Some(i),
                },
            );
            // Oldest first: the last one named is the newest.
            b.set_link(at, OsStr::new("latest"), name.as_bytes(), time);
            path.push(name);
            let target = format!("../hosts/{}", path.join("/"));
            b.set_link(ids, OsStr::new(&snap.id), target.as_bytes(), time);
        }
        Tree {
            repo,
            rt,
            snapshots,
            nodes: RwLock::new(b.finish()),
            xattrs: RwLock::new(HashMap::new()),
            loading: Mutex::new(()),
            chunks: ChunkCache::default(),
            owner,
            no_open: false,
        }
    }

    fn attr(&self, ino: u64) -> Option<(FileAttr, Duration)> {
        let nodes = self.nodes.read().expect("nodes lock");
        let n = nodes.get(usize::try_from(ino).ok()?.checked_sub(1)?)?;
        let ttl = match n.body {
            Body::Dir {
                pending: Some(_), ..
            } => Duration::ZERO,
            _ => TTL,
        };
        Some((
            FileAttr {
                ino: INodeNo(ino),
                size: n.size,
                blocks: n.size.div_ceil(512),
                atime: n.mtime,
                mtime: n.mtime,
                ctime: n.mtime,
                crtime: n.mtime,
                kind: n.kind,
                perm: n.perm,
                nlink: n.nlink,
                uid: n.uid,
                gid: n.gid,
                rdev: n.rdev,
                blksize: 4096,
                flags: 0,
            },
            ttl,
        ))
    }

    /// Reads the snapshot of directory `ino` into nodes if it was not yet.
    fn load(&self, ino: u64) -> std::result::Result<(), Errno> {
        let pending = |nodes: &Vec<Node>| match nodes.get(node_at(ino)).map(|n| &n.body) {
            Some(Body::Dir { pending, .. }) => Ok(*pending),
            Some(_) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        };
        if pending(&self.nodes.read().expect("nodes lock"))?.is_none() {
            return Ok(());
        }
        let _loading = self.loading.lock().expect("loading lock");
        let Some(i) = pending(&self.nodes.read().expect("nodes lock"))? else {
            return Ok(());
        };
        let snap = &self.snapshots[i];
        // Only loads add nodes, and they hold `loading`: the next number is stable.
        let base = self.nodes.read().expect("nodes lock").len() as u64 + 1;
        let mut b = Builder::new(base, self.owner);
        let loaded = Loaded::read(&self.repo, &self.rt, snap, ino, &mut b);
        let loaded = match loaded {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("snapshot {}: {e}", snap.id);
                return Err(Errno::EIO);
            }
        };
        // Its xattrs before its nodes: a node is never seen without them.
        self.xattrs
            .write()
            .expect("xattrs lock")
            .extend(loaded.xattrs);
        let mut nodes = self.nodes.write().expect("nodes lock");
        let mut new = b.finish();
        nodes.append(&mut new);
        let dir = &mut nodes[node_at(ino)];
        if let Some(root) = loaded.root {
            (dir.perm, dir.uid, dir.gid, dir.mtime) = (root.perm, root.uid, root.gid, root.mtime);
        }
        dir.body = Body::Dir {
            children: loaded.children,
            pending: None,
        };
        Ok(())
    }

    fn lookup_child(&self, parent: u64, name: &OsStr) -> std::result::Result<u64, Errno> {
        self.load(parent)?;
        let nodes = self.nodes.read().expect("nodes lock");
        match nodes.get(node_at(parent)).map(|n| &n.body) {
            Some(Body::Dir { children, .. }) => children
                .binary_search_by(|(n, _)| n.as_os_str().cmp(name))
                .map(|at| children[at].1)
                .map_err(|_| Errno::ENOENT),
            Some(_) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    /// Where node `ino` is below the mount point (its first name), for errors.
    fn path_of(&self, mut ino: u64) -> String {
        let nodes = self.nodes.read().expect("nodes lock");
        let mut names = Vec::new();
        while ino != ROOT {
            let Some(node) = nodes.get(node_at(ino)) else {
                break;
            };
            let name = match nodes.get(node_at(node.parent)).map(|p| &p.body) {
                Some(Body::Dir { children, .. }) => children.iter().find(|c| c.1 == ino),
                _ => None,
            };
            names.push(name.map_or_else(
                || format!("(inode {ino})"),
                |n| n.0.to_string_lossy().into_owned(),
            ));
            ino = node.parent;
        }
        names.reverse();
        names.join("/")
    }

    fn content(&self, ino: u64) -> std::result::Result<Arc<Content>, Errno> {
        let nodes = self.nodes.read().expect("nodes lock");
        match nodes.get(node_at(ino)).map(|n| &n.body) {
            Some(Body::File(c)) => Ok(Arc::clone(c)),
            Some(Body::Dir { .. }) => Err(Errno::EISDIR),
            Some(_) => Err(Errno::EINVAL),
            None => Err(Errno::ENOENT),
        }
    }

    /// `size` bytes of `content` from `offset` (fewer at its end).
    fn read_at(&self, content: &Content, offset: u64, size: u32) -> Result<Vec<u8>> {
        let (pieces, ends) = match content {
            Content::Inline(bytes) => {
                let from = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                let to = from.saturating_add(size as usize).min(bytes.len());
                return Ok(bytes[from..to].to_vec());
            }
            Content::Bad(why) => {
                return Err(Error::Corrupt {
                    object: "mounted file".into(),
                    reason: why.clone(),
                })
            }
            Content::Chunks { pieces, ends } => (pieces, ends),
        };
        let total = ends.last().copied().unwrap_or(0);
        let end = offset.saturating_add(u64::from(size)).min(total);
        let mut at = ends.partition_point(|&e| e <= offset);
        for &(chunk, _, _) in pieces.iter().skip(at + 1).take(AHEAD) {
            self.chunks.prefetch(&self.repo, &self.rt, chunk);
        }
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        let mut pos = offset;
        while pos < end {
            let (chunk, skip, take) = pieces[at];
            let start = ends[at] - u64::from(take);
            let bytes = self.chunks.get(&self.repo, &self.rt, chunk)?;
            let from = skip as usize + (pos - start) as usize;
            let to = skip as usize + (end.min(ends[at]) - start) as usize;
            let part = bytes.get(from..to).ok_or_else(|| Error::Corrupt {
                object: Repository::chunk_key(&chunk.id),
                reason: format!(
                    "a piece {skip}+{take} of it is named, it holds {} bytes",
                    bytes.len()
                ),
            })?;
            out.extend_from_slice(part);
            pos = end.min(ends[at]);
            at += 1;
        }
        Ok(out)
    }
}

/// What a snapshot directory holds once read.
struct Loaded {
    children: Vec<(OsString, u64)>,
    /// A tree's root entry: the directory takes its metadata.
    root: Option<Meta>,
    xattrs: Vec<(u64, Vec<Xattr>)>,
}

/// The metadata part of a node.
#[derive(Clone, Copy)]
struct Meta {
    kind: FileType,
    perm: u16,
    uid: u32,
    gid: u32,
    mtime: SystemTime,
}

impl Loaded {
    /// Reads snapshot `snap` (directory `dir`) into `b`.
    fn read(
        repo: &Arc<Repository>,
        rt: &Handle,
        snap: &Listed,
        dir: u64,
        b: &mut Builder,
    ) -> Result<Loaded> {
        let mut loaded = Loaded {
            children: Vec::new(),
            root: None,
            xattrs: Vec::new(),
        };
        let time: SystemTime = snap.snapshot.time.into();
        match snap.snapshot.root_format {
            RootFormat::Tree => read_tree(repo, rt, snap, dir, b, &mut loaded)?,
            RootFormat::Block => {
                let mut refs = Vec::new();
                crate::volume::walk_refs(repo, rt, snap, |_, r| {
                    refs.push((*r, 0, r.len));
                    Ok(())
                })?;
                let name = Path::new(&snap.snapshot.source)
                    .file_name()
                    .map_or_else(|| OsString::from("data"), OsStr::to_os_string);
                let size = refs.iter().map(|p| u64::from(p.2)).sum();
                let content = Content::chunks(refs, size, &snap.snapshot.source);
                b.stored(dir, &name, time, size, content);
            }
            RootFormat::Image => read_image(repo, rt, snap, dir, time, b)?,
            RootFormat::Workload => read_workload(repo, rt, snap, dir, time, b)?,
        }
        loaded.children = b.take_children(dir);
        Ok(loaded)
    }
}

/// A volume tree: its catalog, entry by entry, into nodes below `dir`.
fn read_tree(
    repo: &Arc<Repository>,
    rt: &Handle,
    snap: &Listed,
    dir: u64,
    b: &mut Builder,
    loaded: &mut Loaded,
) -> Result<()> {
    let index = match &snap.snapshot.payload {
        Some(p) => Some(PayloadIndex::load(repo, rt, &snap.id, p)?),
        None => None,
    };
    let mut reader = CatalogReader::new(snap.root_stream(repo, rt, u64::MAX)?, snap.id.clone());
    // Paths already read: a parent comes before what it holds, a file before its hardlinks.
    let mut by_path: HashMap<Vec<u8>, u64> = HashMap::new();
    while let Some(entry) = reader.next_entry()? {
        let meta = Meta {
            kind: file_type(entry.kind),
            perm: (entry.mode & 0o7777) as u16,
            uid: entry.uid,
            gid: entry.gid,
            mtime: time_of(entry.mtime_ns),
        };
        if entry.path.is_empty() {
            loaded.root = Some(meta);
            if !entry.xattrs.is_empty() {
                loaded.xattrs.push((dir, entry.xattrs));
            }
            continue;
        }
        if let Err(e) = crate::catalog::validate_path(&entry.path) {
            tracing::warn!("snapshot {}: left out: {e}", snap.id);
            continue;
        }
        let (parent_path, name) = match entry.path.iter().rposition(|&c| c == b'/') {
            Some(at) => (&entry.path[..at], &entry.path[at + 1..]),
            None => (&b""[..], &entry.path[..]),
        };
        let parent = if parent_path.is_empty() {
            Some(dir)
        } else {
            by_path.get(parent_path).copied()
        };
        let Some(parent) = parent.filter(|&p| p == dir || b.is_dir(p)) else {
            tracing::warn!(
                "snapshot {}: left out {}: its directory is not in the catalog",
                snap.id,
                entry.display_path()
            );
            continue;
        };
        let name = OsStr::from_bytes(name);
        let linked = match (&entry.kind, &entry.link) {
            (EntryKind::Hardlink, Some(to)) => by_path.get(to).copied().filter(|&i| b.is_file(i)),
            _ => None,
        };
        let ino = match linked {
            Some(ino) => {
                b.hardlink(parent, name, ino);
                ino
            }
            None => tree_node(index.as_ref(), snap, parent, name, meta, &entry, b)?,
        };
        if !entry.xattrs.is_empty() && linked.is_none() {
            loaded.xattrs.push((ino, entry.xattrs));
        }
        by_path.insert(entry.path, ino);
    }
    Ok(())
}

/// One catalog entry as a node under `parent`.
#[allow(clippy::too_many_arguments)]
fn tree_node(
    index: Option<&PayloadIndex>,
    snap: &Listed,
    parent: u64,
    name: &OsStr,
    mut meta: Meta,
    entry: &Entry,
    b: &mut Builder,
) -> Result<u64> {
    Ok(match entry.kind {
        EntryKind::Dir => b.add(parent, name, meta),
        EntryKind::File | EntryKind::Hardlink => {
            meta.kind = FileType::RegularFile;
            let pieces = file_pieces(index, &snap.id, entry)?;
            let content = Content::chunks(pieces, entry.size, &entry.display_path());
            b.file(parent, name, meta, entry.size, content)
        }
        EntryKind::Symlink => {
            let ino = b.add(parent, name, meta);
            let target = entry.link.clone().unwrap_or_default();
            b.set_body(ino, target.len() as u64, Body::Link(target));
            ino
        }
        EntryKind::Fifo | EntryKind::Socket | EntryKind::CharDevice | EntryKind::BlockDevice => {
            let ino = b.add(parent, name, meta);
            if let Some(n) = b.node(ino) {
                n.rdev = encode_dev(entry.rdev);
            }
            ino
        }
    })
}

/// An image snapshot as an OCI image layout.
fn read_image(
    repo: &Arc<Repository>,
    rt: &Handle,
    snap: &Listed,
    dir: u64,
    time: SystemTime,
    b: &mut Builder,
) -> Result<()> {
    let record = crate::oci::load_record(repo, rt, snap)?;
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec();
    b.inline(dir, OsStr::new("oci-layout"), time, layout);
    let top = record.manifests.iter().find(|m| m.digest == record.digest);
    let mut descriptor = serde_json::json!({
        "mediaType": top.map(|m| m.media_type.as_str()),
        "digest": record.digest,
        "size": top.map(|m| m.raw.len()),
    });
    if let Some(tag) = &record.tag {
        descriptor["annotations"] = serde_json::json!({ "org.opencontainers.image.ref.name": tag });
    }
    let index = serde_json::to_vec_pretty(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [descriptor],
    }))
    .expect("index serialises");
    b.inline(dir, OsStr::new("index.json"), time, index);
    let blobs = b.child_dir(dir, OsStr::new("blobs"), time);
    let sha = b.child_dir(blobs, OsStr::new("sha256"), time);
    let shown = |d: &str| format!("image snapshot {}: {d}", &snap.id[..8]);
    for m in &record.manifests {
        match crate::oci::check_digest(&m.digest) {
            Ok(hex) if !b.has(sha, OsStr::new(hex)) => {
                b.inline(sha, OsStr::new(hex), time, m.raw.clone());
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("{}: left out: {e}", shown(&m.digest)),
        }
    }
    for blob in &record.blobs {
        match crate::oci::check_digest(&blob.digest) {
            Ok(hex) if !b.has(sha, OsStr::new(hex)) => {
                let pieces = blob.refs.iter().map(|&r| (r, 0, r.len)).collect();
                let content = Content::chunks(pieces, blob.size, &shown(&blob.digest));
                b.stored(sha, OsStr::new(hex), time, blob.size, content);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("{}: left out: {e}", shown(&blob.digest)),
        }
    }
    Ok(())
}

/// A workload snapshot: its files, and its members as symlinks into `ids/`.
fn read_workload(
    repo: &Arc<Repository>,
    rt: &Handle,
    snap: &Listed,
    dir: u64,
    time: SystemTime,
    b: &mut Builder,
) -> Result<()> {
    let record = crate::workload::load_record(repo, rt, snap)?;
    let config = record.config.clone().into_bytes();
    b.inline(dir, OsStr::new("project.yaml"), time, config);
    let compose = b.child_dir(dir, OsStr::new("compose"), time);
    for kept in record.compose_files.iter().chain(&record.env_file) {
        let name = encode(&kept.name);
        b.inline(compose, OsStr::new(&name), time, kept.bytes.clone());
    }
    // From DIR/hosts/HOST/KIND/NAME/TIME/GROUP/ up to DIR.
    let member = |b: &mut Builder, group: &str, name: &str, id: &str| {
        if id.len() != 64 || !id.bytes().all(|c| c.is_ascii_hexdigit()) {
            tracing::warn!(
                "workload snapshot {}: left out member {name}: {id:?} is not a snapshot id",
                &snap.id[..8]
            );
            return;
        }
        let at = b.child_dir(dir, OsStr::new(group), time);
        let target = format!("../../../../../../ids/{id}");
        b.set_link(at, OsStr::new(&encode(name)), target.as_bytes(), time);
    };
    for s in &record.services {
        member(b, "services", &s.name, &s.snapshot);
    }
    for v in &record.volumes {
        member(b, "volumes", &v.key, &v.snapshot);
    }
    for bind in &record.binds {
        let name = bind
            .name
            .clone()
            .unwrap_or_else(|| bind.source.display().to_string());
        member(b, "binds", &name, &bind.snapshot);
    }
    Ok(())
}

/// Nodes being made, numbered from `base`, with the children of each directory (also of
/// directories made before, such as the snapshot directory being read).
struct Builder {
    base: u64,
    nodes: Vec<Node>,
    owner: (u32, u32),
    children: HashMap<u64, Vec<(OsString, u64)>>,
    named: HashMap<(u64, OsString), u64>,
}

impl Builder {
    fn new(base: u64, owner: (u32, u32)) -> Builder {
        Builder {
            base,
            nodes: Vec::new(),
            owner,
            children: HashMap::new(),
            named: HashMap::new(),
        }
    }

    fn meta(&self, kind: FileType, mtime: SystemTime) -> Meta {
        Meta {
            kind,
            perm: 0o555,
            uid: self.owner.0,
            gid: self.owner.1,
            mtime,
        }
    }

    fn node(&mut self, ino: u64) -> Option<&mut Node> {
        let at = usize::try_from(ino.checked_sub(self.base)?).ok()?;
        self.nodes.get_mut(at)
    }

    fn is_dir(&mut self, ino: u64) -> bool {
        self.node(ino)
            .is_some_and(|n| n.kind == FileType::Directory)
    }

    fn is_file(&mut self, ino: u64) -> bool {
        self.node(ino)
            .is_some_and(|n| n.kind == FileType::RegularFile)
    }

    fn has(&self, dir: u64, name: &OsStr) -> bool {
        self.named.contains_key(&(dir, name.to_os_string()))
    }

    /// A new node named `name` in `parent`. A second child of one name (a forged catalog) is
    /// made but left out of the directory.
    fn add(&mut self, parent: u64, name: &OsStr, m: Meta) -> u64 {
        let ino = self.make(parent, m);
        self.name(parent, name, ino);
        ino
    }

    /// A new node in no directory yet (the root is its own parent).
    fn make(&mut self, parent: u64, m: Meta) -> u64 {
        let body = if m.kind == FileType::Directory {
            Body::Dir {
                children: Vec::new(),
                pending: None,
            }
        } else {
            Body::Other
        };
        self.nodes.push(Node {
            parent,
            kind: m.kind,
            perm: m.perm,
            uid: m.uid,
            gid: m.gid,
            size: 0,
            mtime: m.mtime,
            rdev: 0,
            nlink: 1,
            body,
        });
        self.base + self.nodes.len() as u64 - 1
    }

    fn name(&mut self, parent: u64, name: &OsStr, ino: u64) {
        let key = (parent, name.to_os_string());
        if self.named.contains_key(&key) {
            tracing::warn!("a second entry named {name:?} in one directory is left out");
            return;
        }
        self.named.insert(key, ino);
        self.children
            .entry(parent)
            .or_default()
            .push((name.to_os_string(), ino));
    }

    /// The directory `name` in `parent`, made when missing.
    fn child_dir(&mut self, parent: u64, name: &OsStr, mtime: SystemTime) -> u64 {
        if let Some(&ino) = self.named.get(&(parent, name.to_os_string())) {
            return ino;
        }
        let meta = self.meta(FileType::Directory, mtime);
        self.add(parent, name, meta)
    }

    fn file(&mut self, parent: u64, name: &OsStr, meta: Meta, size: u64, c: Content) -> u64 {
        let ino = self.add(
            parent,
            name,
            Meta {
                kind: FileType::RegularFile,
                ..meta
            },
        );
        self.set_body(ino, size, Body::File(Arc::new(c)));
        ino
    }

    /// A read-only file that is part of what a snapshot records (a blob, a kept file).
    fn stored(&mut self, parent: u64, name: &OsStr, mtime: SystemTime, size: u64, c: Content) {
        let meta = Meta {
            perm: 0o444,
            ..self.meta(FileType::RegularFile, mtime)
        };
        self.file(parent, name, meta, size, c);
    }

    /// A read-only file of `bytes` held in memory (a record's part, a layout's index).
    fn inline(&mut self, parent: u64, name: &OsStr, mtime: SystemTime, bytes: Vec<u8>) {
        let size = bytes.len() as u64;
        self.stored(parent, name, mtime, size, Content::Inline(bytes));
    }

    fn set_body(&mut self, ino: u64, size: u64, body: Body) {
        if let Some(n) = self.node(ino) {
            (n.size, n.body) = (size, body);
        }
    }

    /// The symlink `name` in `parent` to `target`, replacing an earlier one of that name.
    fn set_link(&mut self, parent: u64, name: &OsStr, target: &[u8], mtime: SystemTime) {
        let ino = match self.named.get(&(parent, name.to_os_string())) {
            Some(&ino) => ino,
            None => {
                let meta = Meta {
                    perm: 0o777,
                    ..self.meta(FileType::Symlink, mtime)
                };
                self.add(parent, name, meta)
            }
        };
        if let Some(n) = self.node(ino) {
            n.mtime = mtime;
        }
        self.set_body(ino, target.len() as u64, Body::Link(target.to_vec()));
    }

    /// Another name of file `ino`.
    fn hardlink(&mut self, parent: u64, name: &OsStr, ino: u64) {
        if let Some(n) = self.node(ino) {
            n.nlink += 1;
        }
        self.name(parent, name, ino);
    }

    /// The children of `dir`, sorted by name.
    fn take_children(&mut self, dir: u64) -> Vec<(OsString, u64)> {
        let mut kids = self.children.remove(&dir).unwrap_or_default();
        kids.sort_unstable();
        kids
    }

    /// The nodes, each directory with its children.
    fn finish(mut self) -> Vec<Node> {
        let dirs: Vec<u64> = self.children.keys().copied().collect();
        for dir in dirs {
            let kids = self.take_children(dir);
            if let Some(Node {
                body: Body::Dir { children, .. },
                ..
            }) = self.node(dir)
            {
                *children = kids;
            }
        }
        self.nodes
    }
}

/// A snapshot's host or name as one file name: `%` and `/` escaped as `%25` and `%2F`, `.`
/// and `..` as `%2E` and `%2E%2E`, the empty name as `%`.
fn encode(s: &str) -> String {
    match s {
        "" => "%".into(),
        "." => "%2E".into(),
        ".." => "%2E%2E".into(),
        _ => s
            .replace('%', "%25")
            .replace('/', "%2F")
            .replace('\0', "%00"),
    }
}

fn file_type(kind: EntryKind) -> FileType {
    match kind {
        EntryKind::Dir => FileType::Directory,
        EntryKind::File | EntryKind::Hardlink => FileType::RegularFile,
        EntryKind::Symlink => FileType::Symlink,
        EntryKind::Fifo => FileType::NamedPipe,
        EntryKind::Socket => FileType::Socket,
        EntryKind::CharDevice => FileType::CharDevice,
        EntryKind::BlockDevice => FileType::BlockDevice,
    }
}

fn time_of(ns: i64) -> SystemTime {
    let d = Duration::from_nanos(ns.unsigned_abs());
    if ns >= 0 {
        SystemTime::UNIX_EPOCH + d
    } else {
        SystemTime::UNIX_EPOCH - d
    }
}

/// A device number as FUSE carries it (the kernel's `new_encode_dev`).
fn encode_dev(rdev: u64) -> u32 {
    let (major, minor) = (
        nix::sys::stat::major(rdev) as u32,
        nix::sys::stat::minor(rdev) as u32,
    );
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// Chunks read lately, and those being fetched, so that the kernel's 128 KiB reads of one
/// chunk fetch it once; at most [`CACHE_BYTES`], the oldest dropped first.
#[derive(Default)]
struct ChunkCache {
    slots: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    by_id: HashMap<ChunkId, Arc<OnceCell<Bytes>>>,
    order: VecDeque<(ChunkId, u64)>,
    bytes: u64,
}

impl ChunkCache {
    fn slot(&self, r: ChunkRef) -> (Arc<OnceCell<Bytes>>, bool) {
        let mut slots = self.slots.lock().expect("chunk cache lock");
        if let Some(slot) = slots.by_id.get(&r.id) {
            return (Arc::clone(slot), false);
        }
        let slot = Arc::new(OnceCell::new());
        slots.by_id.insert(r.id, Arc::clone(&slot));
        slots.order.push_back((r.id, u64::from(r.len)));
        slots.bytes += u64::from(r.len);
        while slots.bytes > CACHE_BYTES && slots.order.len() > 1 {
            let (old, len) = slots.order.pop_front().expect("not empty");
            slots.by_id.remove(&old);
            slots.bytes -= len;
        }
        (slot, true)
    }

    /// The chunk's bytes, checked against its id.
    fn get(&self, repo: &Arc<Repository>, rt: &Handle, r: ChunkRef) -> Result<Bytes> {
        let (slot, _) = self.slot(r);
        rt.block_on(slot.get_or_try_init(|| async {
            pipeline::fetch(repo, rt, r)
                .await
                .expect("fetch task panicked")
        }))
        .cloned()
    }

    /// Starts fetching a chunk that will be read soon; a failure is left for the read.
    fn prefetch(&self, repo: &Arc<Repository>, rt: &Handle, r: ChunkRef) {
        let (slot, new) = self.slot(r);
        if new {
            let fetch = pipeline::fetch(repo, rt, r);
            rt.spawn(async move {
                let _ = slot
                    .get_or_try_init(|| async { fetch.await.expect("fetch task panicked") })
                    .await;
            });
        }
    }
}

/// Each request to a FUSE file system is two context switches: reading many small files
/// (tar, rsync) is bound by their number. So a listing carries the attributes of its entries
/// (no lookup per file after it), and there is no open, release or flush per file. 44k small
/// files tarred through the mount: 9.1 s before, 3.8 s after (`docs/BENCHMARKS.md`).
fn fewer_requests(config: &mut fuser::KernelConfig) -> bool {
    use fuser::InitFlags;
    let _ = config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS);
    config
        .add_capabilities(InitFlags::FUSE_NO_OPEN_SUPPORT)
        .is_ok()
}

impl Filesystem for Tree {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        self.no_open = fewer_requests(config);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self
            .lookup_child(parent.0, name)
            .and_then(|ino| self.attr(ino).ok_or(Errno::ENOENT))
        {
            Ok((attr, ttl)) => reply.entry(&ttl, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Some((attr, ttl)) => reply.attr(&ttl, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let nodes = self.nodes.read().expect("nodes lock");
        match nodes.get(node_at(ino.0)).map(|n| &n.body) {
            Some(Body::Link(target)) => reply.data(target),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.content(ino.0) {
            Ok(_) if self.no_open => reply.error(Errno::ENOSYS),
            // The bytes never change: the kernel may keep them across opens.
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing is written: the kernel stops asking.
        reply.error(Errno::ENOSYS);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let content = match self.content(ino.0) {
            Ok(c) => c,
            Err(e) => return reply.error(e),
        };
        match self.read_at(&content, offset, size) {
            Ok(bytes) => reply.data(&bytes),
            Err(e) => {
                tracing::error!("reading {}: {e}", self.path_of(ino.0));
                reply.error(Errno::EIO)
            }
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.load(ino.0) {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if let Err(e) = self.load(ino.0) {
            return reply.error(e);
        }
        let nodes = self.nodes.read().expect("nodes lock");
        let Some(node) = nodes.get(node_at(ino.0)) else {
            return reply.error(Errno::ENOENT);
        };
        let Body::Dir { children, .. } = &node.body else {
            return reply.error(Errno::ENOTDIR);
        };
        let dots = [(ino.0, OsStr::new(".")), (node.parent, OsStr::new(".."))];
        let all = dots
            .into_iter()
            .chain(children.iter().map(|(name, i)| (*i, name.as_os_str())));
        for (at, (child, name)) in all.enumerate().skip(offset as usize) {
            let kind = nodes[node_at(child)].kind;
            if reply.add(INodeNo(child), at as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: fuser::ReplyDirectoryPlus,
    ) {
        if let Err(e) = self.load(ino.0) {
            return reply.error(e);
        }
        let listed: Vec<(u64, OsString)> = {
            let nodes = self.nodes.read().expect("nodes lock");
            let Some(node) = nodes.get(node_at(ino.0)) else {
                return reply.error(Errno::ENOENT);
            };
            let Body::Dir { children, .. } = &node.body else {
                return reply.error(Errno::ENOTDIR);
            };
            let dots = [
                (ino.0, OsString::from(".")),
                (node.parent, OsString::from("..")),
            ];
            dots.into_iter()
                .chain(children.iter().map(|(name, i)| (*i, name.clone())))
                .skip(offset as usize)
                .take(1024)
                .collect()
        };
        for (at, (child, name)) in listed.into_iter().enumerate() {
            let Some((attr, ttl)) = self.attr(child) else {
                continue;
            };
            let next = offset + at as u64 + 1;
            if reply.add(INodeNo(child), next, &name, &ttl, &attr, Generation(0)) {
                break;
            }
        }
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let xattrs = self.xattrs.read().expect("xattrs lock");
        let value = xattrs
            .get(&ino.0)
            .and_then(|all| all.iter().find(|x| x.name == name.as_bytes()))
            .map(|x| &x.value);
        match value {
            None => reply.error(Errno::NO_XATTR),
            Some(v) if size == 0 => reply.size(v.len() as u32),
            Some(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Some(v) => reply.data(v),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let xattrs = self.xattrs.read().expect("xattrs lock");
        let mut list = Vec::new();
        for x in xattrs.get(&ino.0).into_iter().flatten() {
            list.extend_from_slice(&x.name);
            list.push(0);
        }
        match size {
            0 => reply.size(list.len() as u32),
            s if list.len() > s as usize => reply.error(Errno::ERANGE),
            _ => reply.data(&list),
        }
    }
}
