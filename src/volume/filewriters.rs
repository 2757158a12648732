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
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
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

/// Makes file `name` in `dir`: created private under a temporary name, filled by `write`
/// (which returns its size), given `entry`'s metadata with `mode`, then renamed into place;
/// the temporary file is removed when a step fails, so a wrong file never has the real name.
pub(super) fn put_file(
    dir: BorrowedFd<'_>,
    name: &std::ffi::OsStr,
    entry: &Entry,
    mode: u32,
    chown: bool,
    shown: &Path,
    write: impl FnOnce(&mut File) -> Result<u64>,
) -> Result<u64> {
    let tmp_name = crate::localfile::temp_name();
    let tmp = std::ffi::OsStr::new(&tmp_name);
    let mut file = super::restore::create_private(dir, tmp, OFlags::EXCL, shown)?;
    let result = write(&mut file).and_then(|size| {
        fsmeta::apply(Target::Open(file.as_fd()), entry, mode, chown, shown)?;
        rustix::fs::renameat(dir, tmp, dir, name).map_err(|e| Error::io(shown, e.into()))?;
        Ok(size)
    });
    if result.is_err() {
        let _ = rustix::fs::unlinkat(dir, tmp, rustix::fs::AtFlags::empty());
    }
    result
}
