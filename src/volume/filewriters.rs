//! Small files of a restore written on threads of their own: a tree of many small files is
//! bound by the system calls that make each one (create, write, owner, mode, times, rename),
//! not by its bytes, so the restore's writer thread reads the catalog and the chunks and hands
//! each small file, its bytes copied out, to a few threads that make it
//! (`benches/repeated.sh`).
//!
//! A directory's metadata (its mtime above all, which every name made in it moves) is applied
//! when the restore leaves it, so each open directory counts the files still being made in it
//! ([`Pending`]) and the writer waits for them first. A hardlink waits for every file, so the
//! file it names is in place.

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;

use rustix::fs::OFlags;

use super::fsmeta::{self, Target};
use crate::catalog::Entry;
use crate::error::{Error, Result};

/// Files at most this large go to the threads; their bytes are copied out of the chunks, so
/// the queue holds at most [`QUEUED`] times this.
pub(super) const SMALL_FILE: u64 = 256 << 10;
/// Threads making small files.
const THREADS: usize = 2;
/// Small files handed over and not yet taken by a thread.
const QUEUED: usize = 128;

/// Files being made in one directory.
#[derive(Default)]
pub(super) struct Pending {
    count: Mutex<usize>,
    done: Condvar,
}

impl Pending {
    fn add(&self) {
        *self.count.lock().expect("pending lock") += 1;
    }

    fn finish(&self) {
        let mut count = self.count.lock().expect("pending lock");
        *count -= 1;
        if *count == 0 {
            self.done.notify_all();
        }
    }

    /// Waits until every file counted is made (or failed).
    pub(super) fn wait(&self) {
        let mut count = self.count.lock().expect("pending lock");
        while *count > 0 {
            count = self.done.wait(count).expect("pending lock");
        }
    }
}

/// One small file to make: `bytes` are all of it.
pub(super) struct Job {
    /// Its directory.
    pub(super) dir: Arc<OwnedFd>,
    pub(super) name: OsString,
    /// Its metadata (its content refs are not needed).
    pub(super) entry: Entry,
    pub(super) mode: u32,
    pub(super) bytes: Vec<u8>,
    /// Its path under the target, for errors.
    pub(super) shown: PathBuf,
    /// The count of its directory.
    pub(super) pending: Arc<Pending>,
}

/// What a thread made of a job: the entry's path (as shown) and its size, or the error the
/// report lists.
pub(super) type Done = (String, Result<u64>);

/// The threads, their queue and their results.
pub(super) struct FileWriters {
    jobs: Option<SyncSender<Job>>,
    done: Receiver<Done>,
    threads: Vec<JoinHandle<()>>,
    /// Every job not yet done.
    all: Arc<Pending>,
}

impl FileWriters {
    pub(super) fn start(chown: bool) -> FileWriters {
        let (jobs, queue) = sync_channel::<Job>(QUEUED);
        let queue = Arc::new(Mutex::new(queue));
        let (report, done) = channel();
        let all = Arc::new(Pending::default());
        let threads = (0..THREADS)
            .map(|_| {
                let (queue, report, all) = (Arc::clone(&queue), report.clone(), Arc::clone(&all));
                std::thread::spawn(move || work(&queue, &report, &all, chown))
            })
            .collect();
        FileWriters {
            jobs: Some(jobs),
            done,
            threads,
            all,
        }
    }

    /// Hands a file over; the results come from [`FileWriters::results`].
    pub(super) fn send(&self, job: Job) {
        job.pending.add();
        self.all.add();
        let jobs = self.jobs.as_ref().expect("writers not stopped");
        if let Err(unsent) = jobs.send(job) {
            // Only when every thread is gone, which a panic alone does.
            let job = unsent.0;
            job.pending.finish();
            self.all.finish();
            panic!(
                "the small-file writers stopped ({})",
                job.entry.display_path()
            );
        }
    }

    /// The results in so far; with `all`, after waiting for every file handed over.
    pub(super) fn results(&self, all: bool) -> Vec<Done> {
        if all {
            self.all.wait();
        }
        self.done.try_iter().collect()
    }

    /// Waits for every file, stops the threads and gives the last results.
    pub(super) fn stop(mut self) -> Vec<Done> {
        self.jobs = None;
        for t in self.threads.drain(..) {
            t.join().expect("small-file writer panicked");
        }
        self.done.try_iter().collect()
    }
}

fn work(queue: &Mutex<Receiver<Job>>, report: &Sender<Done>, all: &Pending, chown: bool) {
    loop {
        let job = match queue.lock().expect("queue lock").recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        let shown = &job.shown;
        let made = put_file(
            job.dir.as_fd(),
            &job.name,
            &job.entry,
            job.mode,
            chown,
            shown,
            |file| {
                file.write_all(&job.bytes)
                    .map_err(|e| Error::io(shown, e))?;
                Ok(job.bytes.len() as u64)
            },
        );
        let _ = report.send((job.entry.display_path(), made));
        job.pending.finish();
        all.finish();
    }
}

/// Makes file `name` in `dir`: created private and unnamed (`O_TMPFILE`), filled by `write`
/// (which returns its size), given `entry`'s metadata with `mode`, then linked in under its
/// name; a file system without `O_TMPFILE` gets a temporary name instead, removed when a step
/// fails. A wrong file never has the real name, and a restore killed part-way leaves no
/// half-written file behind under any name.
pub(super) fn put_file(
    dir: BorrowedFd<'_>,
    name: &std::ffi::OsStr,
    entry: &Entry,
    mode: u32,
    chown: bool,
    shown: &Path,
    write: impl FnOnce(&mut File) -> Result<u64>,
) -> Result<u64> {
    let (mut file, naming) = match unnamed(dir) {
        Some((file, how)) => (file, Naming::Link(how)),
        None => {
            let tmp = OsString::from(crate::localfile::temp_name());
            let file = super::restore::create_private(dir, &tmp, OFlags::EXCL, shown)?;
            (file, Naming::Rename(tmp))
        }
    };
    let result = write(&mut file).and_then(|size| {
        fsmeta::apply(Target::Open(file.as_fd()), entry, mode, chown, shown)?;
        match &naming {
            Naming::Link(how) => link_in(*how, &file, dir, name, shown)?,
            Naming::Rename(tmp) => rename(dir, tmp, name, shown)?,
        }
        Ok(size)
    });
    if let (Err(_), Naming::Rename(tmp)) = (&result, &naming) {
        let _ = rustix::fs::unlinkat(dir, tmp, rustix::fs::AtFlags::empty());
    }
    result
}

/// How a file being made gets its name.
enum Naming {
    /// It has none yet and is linked in.
    Link(Linking),
    /// It has this temporary name and is renamed.
    Rename(OsString),
}

/// How this process gives an unnamed file a name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Linking {
    /// `linkat(AT_EMPTY_PATH)` on its descriptor: needs `CAP_DAC_READ_SEARCH` (root), or a
    /// kernel that lets the file's opener do it.
    Descriptor,
    /// `linkat` of `/proc/self/fd/N`, following it: needs `/proc`.
    Proc,
}

/// How unnamed files get a name here, found at the first one; `None` when neither way works.
static LINKING: OnceLock<Option<Linking>> = OnceLock::new();

/// A new private file in `dir` with no name and how it will get one, or `None` where its file
/// system cannot make one or this process cannot name it.
fn unnamed(dir: BorrowedFd<'_>) -> Option<(File, Linking)> {
    let flags = OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC;
    let file = rustix::fs::openat(dir, ".", flags, rustix::fs::Mode::from_raw_mode(0o600))
        .ok()
        .map(File::from)?;
    let how = (*LINKING.get_or_init(|| {
        // A link to "." fails on the name (EEXIST) only once the file was found, and with
        // ENOENT when it was not (no capability, no /proc): a probe that names nothing.
        [Linking::Descriptor, Linking::Proc]
            .into_iter()
            .find(|how| link(*how, &file, dir, ".".as_ref()) == Err(rustix::io::Errno::EXIST))
    }))?;
    Some((file, how))
}

/// Gives the unnamed `file` the name `name` in `dir`. A link cannot replace a name, so where
/// `name` is taken (a restore run again over its own work) the file is linked under a
/// temporary name and renamed over it.
fn link_in(
    how: Linking,
    file: &File,
    dir: BorrowedFd<'_>,
    name: &std::ffi::OsStr,
    shown: &Path,
) -> Result<()> {
    match link(how, file, dir, name) {
        Err(rustix::io::Errno::EXIST) => {}
        done => return done.map_err(|e| Error::io(shown, e.into())),
    }
    let tmp = OsString::from(crate::localfile::temp_name());
    link(how, file, dir, &tmp).map_err(|e| Error::io(shown, e.into()))?;
    let renamed = rename(dir, &tmp, name, shown);
    if renamed.is_err() {
        let _ = rustix::fs::unlinkat(dir, &tmp, rustix::fs::AtFlags::empty());
    }
    renamed
}

/// Links the unnamed `file` as `name` in `dir`.
fn link(
    how: Linking,
    file: &File,
    dir: BorrowedFd<'_>,
    name: &std::ffi::OsStr,
) -> rustix::io::Result<()> {
    use rustix::fs::{linkat, AtFlags, CWD};
    match how {
        Linking::Descriptor => linkat(file, "", dir, name, AtFlags::EMPTY_PATH),
        Linking::Proc => {
            let proc = format!("/proc/self/fd/{}", file.as_raw_fd());
            linkat(CWD, &proc, dir, name, AtFlags::SYMLINK_FOLLOW)
        }
    }
}

/// Renames `from` to `to` in `dir`, replacing what `to` names.
fn rename(
    dir: BorrowedFd<'_>,
    from: &std::ffi::OsStr,
    to: &std::ffi::OsStr,
    shown: &Path,
) -> Result<()> {
    rustix::fs::renameat(dir, from, dir, to).map_err(|e| Error::io(shown, e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// The names in `dir`, sorted.
    fn names_in(dir: &Path) -> Vec<OsString> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    }

    /// A file gets its name only complete, with its metadata, over a name already there too,
    /// linked the way the probe found; a failed write leaves no name at all.
    #[test]
    fn a_file_is_named_only_when_made() {
        let dir = tempfile::tempdir().unwrap();
        let fd = File::open(dir.path()).unwrap();
        let name = std::ffi::OsStr::new("f");
        let entry = Entry {
            mode: 0o640,
            mtime_ns: 1_500_000_000_123_456_789,
            ..crate::catalog::test_entry("f")
        };
        let names = || names_in(dir.path());
        for bytes in ["first", "again"] {
            let before = names();
            let size = put_file(fd.as_fd(), name, &entry, 0o640, false, dir.path(), |f| {
                // No name, temporary or not, while the file is written.
                assert_eq!(names(), before);
                f.write_all(bytes.as_bytes()).unwrap();
                Ok(5)
            })
            .unwrap();
            assert_eq!(size, 5);
            assert_eq!(
                std::fs::read(dir.path().join("f")).unwrap(),
                bytes.as_bytes()
            );
            assert_eq!(names(), ["f"]);
            let md = std::fs::metadata(dir.path().join("f")).unwrap();
            assert_eq!((md.mode() & 0o7777, md.mtime_nsec()), (0o640, 123_456_789));
        }
        let failed = put_file(
            fd.as_fd(),
            "g".as_ref(),
            &entry,
            0o640,
            false,
            dir.path(),
            |f| {
                f.write_all(b"half").unwrap();
                Err(Error::io(dir.path(), std::io::ErrorKind::Other.into()))
            },
        );
        assert!(failed.is_err());
        assert_eq!(names(), ["f"]);
    }

    /// Both ways of naming an unnamed file name it, over a name already there too, and the
    /// probe finds a way without naming anything.
    #[test]
    fn both_ways_name_an_unnamed_file_and_the_probe_names_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let fd = File::open(dir.path()).unwrap();
        let (_, found) = unnamed(fd.as_fd()).expect("this file system makes unnamed files");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        if nix::unistd::geteuid().is_root() {
            assert_eq!(found, Linking::Descriptor);
        }
        for (how, name) in [(Linking::Descriptor, "a"), (Linking::Proc, "b")] {
            if how == Linking::Descriptor && found != how {
                continue;
            }
            for bytes in [b"one", b"two"] {
                let (mut file, _) = unnamed(fd.as_fd()).unwrap();
                file.write_all(bytes).unwrap();
                link_in(how, &file, fd.as_fd(), name.as_ref(), dir.path()).unwrap();
                assert_eq!(std::fs::read(dir.path().join(name)).unwrap(), bytes);
            }
        }
        assert_eq!(
            names_in(dir.path()),
            ["a", "b"][usize::from(found != Linking::Descriptor)..]
        );
    }
}
