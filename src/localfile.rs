//! Local files that readers must never see half written (reports, metrics, layout indexes and
//! blobs, cache files), and the one way tresor makes a temporary file.
//!
//! tresor often runs as root in directories others may write to (a metrics directory, an OCI
//! layout target, a cache). A predictable temporary name opened with `O_CREAT` would follow a
//! symlink planted there and make root overwrite its target, so every temporary file is made
//! by [`create_temp`]: a random name, `O_EXCL | O_NOFOLLOW`, and the mode given from the start.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Mode of files meant for other readers too (metrics, reports, layout blobs).
pub const SHARED: u32 = 0o644;
/// Mode of files only their owner may read (caches, state).
pub const PRIVATE: u32 = 0o600;

/// A random name for a temporary file: short, so that it fits in a directory whatever the name
/// of the file it becomes (a legal name may take all of `NAME_MAX`, 255 bytes).
pub fn temp_name() -> String {
    format!(".tresor-tmp-{}", hex::encode(rand::random::<[u8; 8]>()))
}

/// A new, empty file beside `path` under a random name, created exclusively (never through a
/// symlink or over an existing file) with `mode` (less the umask).
///
/// # Errors
/// [`Error::Io`] naming the temporary path.
pub fn create_temp(path: &Path, mode: u32) -> Result<(File, PathBuf)> {
    let tmp = path.with_file_name(temp_name());
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)
        .map_err(|e| Error::io(&tmp, e))?;
    Ok((file, tmp))
}

/// Fills a [`create_temp`] file with `fill` and renames it over `path` (a symlink at `path` is
/// replaced, not followed), so a reader sees the old contents or the new, never a mix. The
/// temporary file is removed on failure.
///
/// # Errors
/// What `fill` returns, or [`Error::Io`] naming `path`.
pub fn replace_with(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> Result<()>,
) -> Result<()> {
    let (mut file, tmp) = create_temp(path, mode)?;
    let result =
        fill(&mut file).and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes `data` to `path` atomically with [`replace_with`].
///
/// # Errors
/// [`Error::Io`] naming `path`.
pub fn write_atomically(path: &Path, mode: u32, data: &[u8]) -> Result<()> {
    replace_with(path, mode, |f| {
        f.write_all(data).map_err(|e| Error::io(path, e))
    })
}

/// Writes `data` as the file `name` of the open directory `dir` (a temporary file made with
/// `O_EXCL | O_NOFOLLOW` and `mode`, renamed into place): below a directory others may write
/// in, nothing is reached by path. `shown` names the file in errors.
///
/// # Errors
/// [`Error::Io`] naming `shown`.
pub fn write_at(
    dir: std::os::fd::BorrowedFd<'_>,
    name: &str,
    mode: u32,
    data: &[u8],
    shown: &Path,
) -> Result<()> {
    use rustix::fs::{AtFlags, Mode, OFlags};
    let io = |e: rustix::io::Errno| Error::io(shown, e.into());
    let tmp = temp_name();
    let fd = rustix::fs::openat(
        dir,
        tmp.as_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
    )
    .map_err(io)?;
    let mut file = File::from(fd);
    let result = file
        .write_all(data)
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io(shown, e))
        .and_then(|()| rustix::fs::renameat(dir, tmp.as_str(), dir, name).map_err(io));
    if result.is_err() {
        let _ = rustix::fs::unlinkat(dir, tmp.as_str(), AtFlags::empty());
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlink_at_the_target_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let target = dir.path().join("metrics.prom");
        std::os::unix::fs::symlink(&victim, &target).unwrap();
        write_atomically(&target, SHARED, b"new").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        assert!(!std::fs::symlink_metadata(&target).unwrap().is_symlink());
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 2, "no temporary file left: {names:?}");
    }
}
