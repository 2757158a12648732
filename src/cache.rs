//! The local cache of chunk ids known to be in the repository.
//!
//! Deduplication asks "is this chunk stored already?" once per chunk; asking the store would cost
//! a request per chunk. Instead the set of stored ids is kept in
//! `CACHE_DIR/<repository id>/known-chunks` (32 raw bytes per id) and rebuilt from one listing
//! of `chunks/` when the file is missing or unreadable. Losing the cache costs only that listing.
//!
//! The cache is saved only after a backup's chunks are all stored, so it never claims a chunk
//! whose upload failed. Ids are added to the in-memory set when their upload starts, so a chunk
//! seen twice in one run is uploaded once.
//!
//! `gc` deletes chunks, so the cache is saved with a fingerprint of the sweeps the repository had
//! finished when the backup began (`known-chunks.gc`); when the repository's fingerprint differs
//! the cache is rebuilt from a listing (see [`crate::gc`]).

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::id::ChunkId;
use crate::repository::Repository;

const FILE_NAME: &str = "known-chunks";
const GC_FILE_NAME: &str = "known-chunks.gc";

/// Ids of chunks stored in a repository; see the module docs.
#[derive(Debug)]
pub struct KnownChunks {
    set: Mutex<HashSet<ChunkId>>,
    file: Option<PathBuf>,
    /// The gc fingerprint the set is valid for.
    gc: String,
}

impl KnownChunks {
    /// Loads the cache of `repo` from `cache_dir` if it was saved under the gc fingerprint `gc`,
    /// or lists the store. With `cache_dir` unset nothing is read or saved on disk.
    pub async fn load(
        repo: &Repository,
        cache_dir: Option<&Path>,
        gc: &str,
    ) -> Result<KnownChunks> {
        let file = cache_dir.map(|d| d.join(&repo.config().id).join(FILE_NAME));
        let cached = file.as_deref().filter(|f| {
            std::fs::read_to_string(f.with_file_name(GC_FILE_NAME)).is_ok_and(|saved| saved == gc)
        });
        let set = match cached.and_then(read_cache_file) {
            Some(set) => set,
            None => repo.list_chunks().await?.into_iter().collect(),
        };
        Ok(KnownChunks {
            set: Mutex::new(set),
            file,
            gc: gc.to_string(),
        })
    }

    /// Records `id` as stored; returns `false` if it was known already.
    pub fn insert(&self, id: ChunkId) -> bool {
        self.set.lock().expect("cache lock").insert(id)
    }

    /// Forgets `id` (its upload failed, or `gc` condemned it).
    pub fn remove(&self, id: &ChunkId) {
        self.set.lock().expect("cache lock").remove(id);
    }

    /// Number of known chunks.
    pub fn len(&self) -> usize {
        self.set.lock().expect("cache lock").len()
    }

    /// Whether no chunk is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the cache file (atomically: a temporary file renamed into place).
    pub fn save(&self) -> Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let dir = file.parent().expect("cache file has a directory");
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let tmp = file.with_extension(format!("tmp{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
            for id in self.set.lock().expect("cache lock").iter() {
                out.write_all(&id.0)?;
            }
            out.into_inner().map_err(|e| e.into_error())?;
            std::fs::rename(&tmp, file)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(file, e)
        })?;
        let gc_file = file.with_file_name(GC_FILE_NAME);
        crate::localfile::write_atomically(&gc_file, self.gc.as_bytes())
    }
}

fn read_cache_file(path: &Path) -> Option<HashSet<ChunkId>> {
    let bytes = std::fs::read(path).ok()?;
    if bytes.len() % 32 != 0 {
        tracing::warn!(cache = %path.display(), "chunk cache is damaged; rebuilding it from the store");
        return None;
    }
    Some(
        bytes
            .chunks_exact(32)
            .map(|c| ChunkId(c.try_into().expect("32 bytes")))
            .collect(),
    )
}
