//! File system metadata: reading it into catalog entries, and applying it on restore through
//! descriptors, never by path (see [`crate::volume::restore`]).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::Metadata;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use crate::catalog::{Entry, EntryKind, Xattr};
use crate::error::{Error, Result};

/// Looks up user and group names, once per id.
#[derive(Default)]
pub struct Names {
    users: HashMap<u32, Option<String>>,
    groups: HashMap<u32, Option<String>>,
}

impl Names {
    fn user(&mut self, uid: u32) -> Option<String> {
        self.users
            .entry(uid)
            .or_insert_with(|| {
                nix::unistd::User::from_uid(uid.into())
                    .ok()
                    .flatten()
                    .map(|u| u.name)
            })
            .clone()
    }

    fn group(&mut self, gid: u32) -> Option<String> {
        self.groups
            .entry(gid)
            .or_insert_with(|| {
                nix::unistd::Group::from_gid(gid.into())
                    .ok()
                    .flatten()
                    .map(|g| g.name)
            })
            .clone()
    }
}

/// The kind of catalog entry for a file type, if tresor stores it.
pub fn kind_of(md: &Metadata) -> EntryKind {
    let t = md.file_type();
    if t.is_dir() {
        EntryKind::Dir
    } else if t.is_symlink() {
        EntryKind::Symlink
    } else if t.is_fifo() {
        EntryKind::Fifo
    } else if t.is_socket() {
        EntryKind::Socket
    } else if t.is_char_device() {
        EntryKind::CharDevice
    } else if t.is_block_device() {
        EntryKind::BlockDevice
    } else {
        EntryKind::File
    }
}

/// A catalog entry for `path` (relative) from its `lstat` metadata; no content, link or xattrs.
pub fn entry_from(path: Vec<u8>, md: &Metadata, names: &mut Names) -> Entry {
    let kind = kind_of(md);
    Entry {
        path,
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        user: names.user(md.uid()),
        group: names.group(md.gid()),
        mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
        ctime_ns: md.ctime() * 1_000_000_000 + md.ctime_nsec(),
        ino: md.ino(),
        size: if kind == EntryKind::File {
            md.size()
        } else {
            0
        },
        link: None,
        rdev: if matches!(kind, EntryKind::CharDevice | EntryKind::BlockDevice) {
            md.rdev()
        } else {
            0
        },
        xattrs: Vec::new(),
        content: Vec::new(),
        slice: None,
        hash: None,
    }
}

/// Extended attributes of `path` (not following symlinks). A file system without xattr support
/// has none.
pub fn read_xattrs(path: &Path) -> Result<Vec<Xattr>> {
    let names = match xattr::list(path) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut out = Vec::new();
    for name in names {
        if let Some(value) = xattr::get(path, &name).map_err(|e| Error::io(path, e))? {
            out.push(Xattr {
                name: name.as_bytes().to_vec(),
                value,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// How [`apply`] reaches the object whose metadata it sets.
#[derive(Clone, Copy)]
pub enum Target<'a> {
    /// A descriptor open on a regular file, a directory or a FIFO.
    Open(BorrowedFd<'a>),
    /// An `O_PATH` descriptor (device nodes, which are not opened: that can have side effects
    /// or fail without a driver); reached through its `/proc/self/fd` link, which names the
    /// node itself and is not a path anyone else can change.
    PathOnly(BorrowedFd<'a>),
    /// A symlink `name` in the directory `dir`, never followed.
    Symlink {
        dir: BorrowedFd<'a>,
        name: &'a OsStr,
    },
}

/// Applies ownership (when `chown` is set), xattrs, `mode` and the mtime of `entry` to
/// `target`, through descriptors only. `shown` names it in errors.
pub fn apply(
    target: Target<'_>,
    entry: &Entry,
    mode: u32,
    chown: bool,
    shown: &Path,
) -> Result<()> {
    use rustix::fs::{AtFlags, Gid, Mode, Timespec, Timestamps, Uid, CWD};
    let io = |e: rustix::io::Errno| Error::io(shown, e.into());
    let mtime = Timespec {
        tv_sec: entry.mtime_ns.div_euclid(1_000_000_000),
        tv_nsec: entry.mtime_ns.rem_euclid(1_000_000_000) as _,
    };
    let times = Timestamps {
        last_access: mtime,
        last_modification: mtime,
    };
    let (uid, gid) = (
        Some(Uid::from_raw(entry.uid)),
        Some(Gid::from_raw(entry.gid)),
    );
    let mode = Mode::from_raw_mode(mode);
    match target {
        Target::Symlink { dir, name } => {
            if chown {
                rustix::fs::chownat(dir, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW).map_err(io)?;
            }
            rustix::fs::utimensat(dir, name, &times, AtFlags::SYMLINK_NOFOLLOW).map_err(io)
        }
        Target::Open(fd) => {
            // Ownership first: chown clears setuid/setgid bits that chmod then sets.
            if chown {
                rustix::fs::fchown(fd, uid, gid).map_err(io)?;
            }
            for x in &entry.xattrs {
                let set = rustix::fs::fsetxattr(
                    fd,
                    OsStr::from_bytes(&x.name),
                    &x.value,
                    rustix::fs::XattrFlags::empty(),
                );
                xattr_result(set, &x.name, chown).map_err(io)?;
            }
            rustix::fs::fchmod(fd, mode).map_err(io)?;
            rustix::fs::futimens(fd, &times).map_err(io)
        }
        Target::PathOnly(fd) => {
            let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
            if chown {
                rustix::fs::chownat(fd, "", uid, gid, AtFlags::EMPTY_PATH).map_err(io)?;
            }
            for x in &entry.xattrs {
                let set = rustix::fs::setxattr(
                    &link,
                    OsStr::from_bytes(&x.name),
                    &x.value,
                    rustix::fs::XattrFlags::empty(),
                );
                xattr_result(set, &x.name, chown).map_err(io)?;
            }
            rustix::fs::chmodat(CWD, &link, mode, AtFlags::empty()).map_err(io)?;
            rustix::fs::utimensat(CWD, &link, &times, AtFlags::empty()).map_err(io)
        }
    }
}

/// security.* and trusted.* xattrs need privileges; a user restore goes on without them.
fn xattr_result(set: rustix::io::Result<()>, name: &[u8], chown: bool) -> rustix::io::Result<()> {
    match set {
        Err(_) if !chown && (name.starts_with(b"security.") || name.starts_with(b"trusted.")) => {
            Ok(())
        }
        other => other,
    }
}
