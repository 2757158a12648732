//! File system metadata: reading it into catalog entries, and applying it on restore.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
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

/// Applies ownership (when `chown` is set), xattrs, mode and times of `entry` to `path`,
/// never following a symlink at `path`.
pub fn apply(path: &Path, entry: &Entry, chown: bool) -> Result<()> {
    let io = |e| Error::io(path, e);
    // Ownership first: chown clears setuid/setgid bits that chmod then sets.
    if chown {
        std::os::unix::fs::lchown(path, Some(entry.uid), Some(entry.gid)).map_err(io)?;
    }
    for x in &entry.xattrs {
        let name = OsStr::from_bytes(&x.name);
        if let Err(e) = xattr::set(path, name, &x.value) {
            // security.* and trusted.* need privileges; a user restore goes on without them.
            let privileged = x.name.starts_with(b"security.") || x.name.starts_with(b"trusted.");
            if !privileged || chown {
                return Err(io(e));
            }
        }
    }
    if entry.kind != EntryKind::Symlink {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(entry.mode)).map_err(io)?;
    }
    let mtime = filetime::FileTime::from_unix_time(
        entry.mtime_ns.div_euclid(1_000_000_000),
        entry.mtime_ns.rem_euclid(1_000_000_000) as u32,
    );
    filetime::set_symlink_file_times(path, mtime, mtime).map_err(io)
}
