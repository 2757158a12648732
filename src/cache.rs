//! The local cache of chunk ids known to be in the repository.
//!
//! Deduplication asks "is this chunk stored already?" once per chunk; asking the store would cost
//! a request per chunk. Instead the set of stored ids is kept on disk in
//! `CACHE_DIR/<repository id>/` as a [`ChunkIndex`] (memory does not grow with the repository),
//! and rebuilt from a listing of `chunks/`, one id prefix at a time, when it is missing or
//! damaged. Without a cache directory it is built in a temporary directory for the run. Losing
//! the cache costs only that listing.
//!
//! The ids a run stores are added to the index only after the backup's chunks are all stored,
//! so it never claims a chunk whose upload failed. They are held in memory while the run lasts
//! (added when their upload starts, so a chunk seen twice in one run is uploaded once): a run's
//! memory grows with what it stores, not with what the repository holds.
//!
//! `gc` deletes chunks, so the cache is saved with a fingerprint of the sweeps the repository had
//! finished when it was built (in its manifest); when the repository's fingerprint differs
//! the cache is rebuilt from a listing (see [`crate::gc`]). A cache that may be wrong is dropped
//! with [`forget`]: `backup --force` does so, and so does a `verify` that found chunks missing,
//! so a repository whose chunks were lost heals with the next backup.
//!
//! A cache that claims a chunk the store lacks makes backups skip storing it: silent loss. So
//! the cache directory must be the user's own and closed to others ([`private_dir`]), and it
//! also remembers each repository's identity ([`Identities`]), so a store whose config was
//! swapped or edited is noticed.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::chunkindex::ChunkIndex;
use crate::error::{Error, Result};
use crate::id::ChunkId;
use crate::localfile::{write_atomically, PRIVATE};
use crate::repository::{RepoConfig, Repository};

const IDENTITIES_FILE: &str = "repositories.json";

/// Creates `dir` (and missing parents) mode 0700, and checks that it is a directory of the
/// user running tresor that nobody else may write to; one it owns that others may read is
/// closed (0700).
///
/// # Errors
/// [`Error::UnsafePath`] for a symlink, another owner, or a directory others may write to;
/// [`Error::Io`] when it cannot be created.
pub fn private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(dir, e))?;
    let meta = std::fs::symlink_metadata(dir).map_err(|e| Error::io(dir, e))?;
    let unsafe_dir = |reason| Error::UnsafePath {
        path: dir.display().to_string(),
        reason,
    };
    if !meta.is_dir() {
        return Err(unsafe_dir(
            "the cache directory is a symlink or not a directory",
        ));
    }
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(unsafe_dir(
            "the cache directory belongs to another user; give one of your own (--cache-dir)",
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(unsafe_dir(
            "the cache directory is writable by other users, who could make backups skip chunks; chmod 700 it",
        ));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(dir, e))?;
    }
    Ok(())
}

/// Drops the chunk cache of `repo`, so the next backup lists the store again.
///
/// # Errors
/// [`Error::Io`] when the cache file exists and cannot be removed.
pub fn forget(repo: &Repository, cache_dir: Option<&Path>) -> Result<()> {
    match cache_dir {
        Some(dir) => ChunkIndex::forget(&dir.join(&repo.config().id)),
        None => Ok(()),
    }
}

/// What this host remembers of a repository it opened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub id: String,
    pub encrypted: bool,
    /// Its config carried a MAC.
    pub authenticated: bool,
    /// [`RepoConfig::fingerprint`] of its whole config as last opened (absent in files of an
    /// older tresor): a repository's config never changes after `init` but for the owner's
    /// `key upgrade-config`, so any other change is someone else's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
}

impl Identity {
    /// Refuses `config` at `url` when its id, encryption or any field differs from this
    /// identity.
    ///
    /// # Errors
    /// [`Error::Tampered`] saying what changed.
    pub fn check(&self, url: &str, config: &RepoConfig) -> Result<()> {
        let word = |encrypted: bool| {
            if encrypted {
                "encrypted"
            } else {
                "unencrypted"
            }
        };
        let encrypted = config.encryption.is_some();
        let reason = if self.id != config.id {
            format!("its id is {}, this host knew it as {}", config.id, self.id)
        } else if self.encrypted != encrypted {
            format!(
                "this host knew it as {}, its config now says {}",
                word(self.encrypted),
                word(encrypted)
            )
        } else if self
            .config
            .as_ref()
            .is_some_and(|known| *known != config.fingerprint())
        {
            "its config changed since this host last opened it (chunker, compression, format or MAC)"
                .to_string()
        } else {
            return Ok(());
        };
        Err(Error::Tampered {
            url: url.to_string(),
            reason,
        })
    }
}

/// Each repository URL this host opened, with its [`Identity`] (`repositories.json` in the
/// cache directory). [`Repository::open`] refuses a repository that differs from it.
#[derive(Debug, Default)]
pub struct Identities {
    file: Option<PathBuf>,
    known: BTreeMap<String, Identity>,
}

impl Identities {
    /// Reads the identities kept in `cache_dir` (none when it is `None` or holds none yet).
    ///
    /// # Errors
    /// [`Error::UnsafePath`] for a cache directory others control (see [`private_dir`]),
    /// [`Error::Corrupt`] naming a file that does not parse.
    pub fn load(cache_dir: Option<&Path>) -> Result<Identities> {
        let Some(dir) = cache_dir else {
            return Ok(Identities::default());
        };
        private_dir(dir)?;
        let file = dir.join(IDENTITIES_FILE);
        let known = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
                object: file.display().to_string(),
                reason: format!("{e}; remove the file to forget every repository's identity"),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(Error::io(file, e)),
        };
        Ok(Identities {
            file: Some(file),
            known,
        })
    }

    /// The identity remembered for `url`.
    pub fn get(&self, url: &str) -> Option<&Identity> {
        self.known.get(url)
    }

    /// Remembers `config` as the identity of `url` (written only when it is new or changed).
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be written.
    pub fn remember(&mut self, url: &str, config: &RepoConfig) -> Result<()> {
        let identity = Identity {
            id: config.id.clone(),
            encrypted: config.encryption.is_some(),
            authenticated: config.mac.is_some(),
            config: Some(config.fingerprint()),
        };
        let Some(file) = &self.file else {
            return Ok(());
        };
        if self.known.get(url) == Some(&identity) {
            return Ok(());
        }
        self.known.insert(url.to_string(), identity);
        let json = serde_json::to_vec_pretty(&self.known).expect("identities serialise");
        write_atomically(file, PRIVATE, &json)
    }
}

/// Ids of chunks stored in a repository; see the module docs.
#[derive(Debug)]
pub struct KnownChunks {
    /// The ids known when the run began, on disk.
    saved: std::sync::RwLock<ChunkIndex>,
    /// Ids claimed during this run.
    added: Mutex<HashSet<ChunkId>>,
    /// Ids this run must not take as stored although `saved` holds them (condemned by a gc
    /// plan); never saved, as every session reads the live plans again.
    removed: Mutex<HashSet<ChunkId>>,
    /// Without a cache directory, the index lives here for the run only.
    scratch: Option<tempfile::TempDir>,
}

impl KnownChunks {
    /// Loads the cache of `repo` from `cache_dir` if it was saved under the gc fingerprint `gc`,
    /// or lists the store into a new one. With `cache_dir` unset the index is built in a
    /// temporary directory and dropped after the run.
    ///
    /// # Errors
    /// [`Error::UnsafePath`] for a cache directory others control, store errors listing, and
    /// [`Error::Io`] writing the index.
    pub async fn load(
        repo: &Repository,
        cache_dir: Option<&Path>,
        gc: &str,
    ) -> Result<KnownChunks> {
        let (dir, scratch) = match cache_dir {
            Some(d) => {
                let dir = d.join(&repo.config().id);
                private_dir(&dir)?;
                (dir, None)
            }
            None => {
                let scratch = tempfile::Builder::new()
                    .prefix("tresor-known-chunks-")
                    .tempdir()
                    .map_err(|e| Error::io(std::env::temp_dir(), e))?;
                (scratch.path().to_path_buf(), Some(scratch))
            }
        };
        let saved = match ChunkIndex::open(&dir, gc) {
            Some(saved) => saved,
            None => rebuild(repo, &dir, gc).await?,
        };
        Ok(KnownChunks {
            saved: std::sync::RwLock::new(saved),
            added: Mutex::default(),
            removed: Mutex::default(),
            scratch,
        })
    }

    /// Records `id` as stored; returns `false` if it was known already.
    pub fn insert(&self, id: ChunkId) -> bool {
        if self.added.lock().expect("cache lock").contains(&id) {
            return false;
        }
        let removed = self.removed.lock().expect("cache lock").contains(&id);
        // A cache that cannot be read claims nothing: the chunk is stored again.
        let saved = !removed
            && self
                .saved
                .read()
                .expect("cache lock")
                .contains(&id)
                .unwrap_or_else(|e| {
                    tracing::warn!("chunk cache: {e}; storing the chunk again");
                    false
                });
        // Two threads may race for the same new id: only one inserts it.
        !saved && self.added.lock().expect("cache lock").insert(id)
    }

    /// Forgets `id` (its upload failed, or `gc` condemned it).
    pub fn remove(&self, id: &ChunkId) {
        self.added.lock().expect("cache lock").remove(id);
        self.removed.lock().expect("cache lock").insert(*id);
    }

    /// Adds the ids this run stored to the saved index (see [`ChunkIndex::add`]).
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Corrupt`] from the index; the saved cache is then as before.
    pub fn save(&self) -> Result<()> {
        if self.scratch.is_some() {
            // Nobody reads a scratch index after the run.
            return Ok(());
        }
        let mut ids: Vec<ChunkId> = self.added.lock().expect("cache lock").drain().collect();
        ids.sort_unstable();
        self.saved.write().expect("cache lock").add(&ids)
    }
}

/// Lists the store's chunks, one id prefix at a time, into a new index in `dir`: memory holds a
/// few prefixes' listings, not the repository's.
async fn rebuild(repo: &Repository, dir: &Path, gc: &str) -> Result<ChunkIndex> {
    let mut writer = ChunkIndex::writer(dir)?;
    let mut listings = std::pin::pin!(repo.chunk_listings());
    while let Some(listing) = listings.next().await {
        for chunk in listing? {
            writer.push(chunk.id)?;
        }
    }
    ChunkIndex::create(dir, gc, writer)
}
