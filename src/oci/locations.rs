//! Where blobs were last seen on registries: the repositories of a registry that held a blob
//! when tresor fetched it, found it (HEAD) or put it there. A restore asks the target registry
//! to mount a blob from one of them before uploading it, so rehydrating many images that share
//! base layers uploads each layer once per registry, not once per repository. skopeo keeps the
//! same kind of blob info cache.
//!
//! Hints only: a stale entry costs one declined mount, a lost file costs uploads. The file
//! ([`FILE_NAME`] in the cache directory) is read once and written atomically by
//! [`Locations::save`]; two processes saving at once lose some of each other's hints, nothing
//! else.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::localfile::{write_atomically, PRIVATE};

/// The hint file's name in the cache directory.
pub const FILE_NAME: &str = "oci-blob-locations.json";

/// Repositories remembered per blob, newest first.
const PER_BLOB: usize = 4;
/// Blobs remembered per registry; beyond, arbitrary entries are forgotten.
const PER_REGISTRY: usize = 100_000;

/// registry → digest → repositories, newest first.
type Map = HashMap<String, HashMap<String, Vec<String>>>;

/// Known blob locations, shared by the tasks of one command.
#[derive(Default)]
pub struct Locations {
    file: Option<PathBuf>,
    map: Mutex<Map>,
}

impl Locations {
    /// The hints saved in `file`; none if it is unset, absent or unreadable (a broken hint
    /// file is logged and replaced on save, never an error).
    pub fn load(file: Option<PathBuf>) -> Locations {
        let map = file
            .as_ref()
            .and_then(|f| match std::fs::read(f) {
                Ok(bytes) => serde_json::from_slice(&bytes)
                    .map_err(|e| tracing::debug!("ignoring {}: {e}", f.display()))
                    .ok(),
                Err(_) => None,
            })
            .unwrap_or_default();
        Locations {
            file,
            map: Mutex::new(map),
        }
    }

    /// Notes that `repository` of `registry` holds `digest`.
    pub fn record(&self, registry: &str, digest: &str, repository: &str) {
        let mut map = self.map.lock().expect("locations lock");
        let blobs = map.entry(registry.to_string()).or_default();
        if blobs.len() >= PER_REGISTRY && !blobs.contains_key(digest) {
            if let Some(evict) = blobs.keys().next().cloned() {
                blobs.remove(&evict);
            }
        }
        let repos = blobs.entry(digest.to_string()).or_default();
        repos.retain(|r| r != repository);
        repos.insert(0, repository.to_string());
        repos.truncate(PER_BLOB);
    }

    /// Repositories of `registry` that held `digest`, newest first, other than `except`.
    pub fn candidates(&self, registry: &str, digest: &str, except: &str) -> Vec<String> {
        let map = self.map.lock().expect("locations lock");
        map.get(registry)
            .and_then(|blobs| blobs.get(digest))
            .map(|repos| repos.iter().filter(|r| *r != except).cloned().collect())
            .unwrap_or_default()
    }

    /// Writes the hints back to their file, if they have one.
    ///
    /// # Errors
    /// [`Error::Io`] when the cache directory cannot be written.
    pub fn save(&self) -> Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let json = serde_json::to_vec(&*self.map.lock().expect("locations lock"))
            .map_err(|e| Error::Config(format!("encoding blob locations: {e}")))?;
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        write_atomically(file, PRIVATE, &json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_first_bounded_and_saved() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cache/oci-blob-locations.json");
        let l = Locations::load(Some(file.clone()));
        for repo in ["a", "b", "c", "d", "e", "b"] {
            l.record("r.example", "sha256:1", repo);
        }
        assert_eq!(
            l.candidates("r.example", "sha256:1", "x"),
            ["b", "e", "d", "c"]
        );
        assert_eq!(l.candidates("r.example", "sha256:1", "b"), ["e", "d", "c"]);
        assert!(l.candidates("other.example", "sha256:1", "x").is_empty());
        l.save().unwrap();
        let again = Locations::load(Some(file.clone()));
        assert_eq!(
            again.candidates("r.example", "sha256:1", "x"),
            ["b", "e", "d", "c"]
        );
        std::fs::write(&file, b"{broken").unwrap();
        assert!(Locations::load(Some(file))
            .candidates("r.example", "sha256:1", "x")
            .is_empty());
    }
}
