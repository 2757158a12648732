//! The object store backend: `file://`, `s3://` and `memory://` behind one small API.
//!
//! Keys are `/`-separated strings relative to the repository root (for `s3://BUCKET/PREFIX` the
//! prefix is applied here, so the layers above never see it). The store promises only what every
//! S3 implementation keeps: a PUT is atomic and durable once it returns, GET returns whole
//! objects, LIST is unordered. It relies on no conditional PUT (Garage ignores `If-None-Match`).
//!
//! The local filesystem store writes each object to a staging file and renames it into place,
//! but does not fsync. [`Store::sync`] is the barrier that makes every object written so far
//! durable (one `syncfs(2)` of the repository's filesystem); callers use it before writing an
//! object that references others, so a power cut can never leave a record pointing at data that
//! never reached the disk.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as StorePath;
use object_store::prefix::PrefixStore;
use object_store::{BackoffConfig, ClientConfigKey, ObjectStore, ObjectStoreExt, RetryConfig};

use crate::error::{Error, Result};

/// Settings for `s3://` stores that are not part of the URL. Unset fields fall back to the usual
/// `AWS_*` environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// `AWS_ENDPOINT_URL`, `AWS_REGION`); plain HTTP and certificate checks are never taken from
/// the environment (`AWS_ALLOW_HTTP`, `AWS_ALLOW_INVALID_CERTIFICATES` are overridden).
#[derive(Clone, Debug, Default)]
pub struct StoreOptions {
    /// Endpoint such as `http://127.0.0.1:3900` for Garage, MinIO or Ceph RGW.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Allow plain HTTP (only sensible on loopback or a trusted network).
    pub allow_http: bool,
    /// Access key id and secret; the CLI leaves them to `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY`, library users (and tests) may set them here.
    pub credentials: Option<(String, String)>,
}

/// One object of a listing.
#[derive(Clone, Debug)]
pub struct Listing {
    pub key: String,
    pub size: u64,
    pub modified: chrono::DateTime<chrono::Utc>,
}

/// A repository's object store.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    url: String,
    local_root: Option<PathBuf>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

impl Store {
    /// Opens the store named by `url`: `file:///ABS/PATH` (or a plain path), `s3://BUCKET[/PREFIX]`,
    /// or `memory://` (a fresh in-process store, for tests).
    ///
    /// For `file://` the directory is created when `create` is set.
    ///
    /// # Errors
    /// [`Error::Config`] for an unknown scheme or unusable settings.
    pub fn open(url: &str, options: &StoreOptions, create: bool) -> Result<Store> {
        if url == "memory://" {
            return Ok(Store {
                inner: Arc::new(InMemory::new()),
                url: url.to_string(),
                local_root: None,
            });
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            return Self::open_s3(url, rest, options);
        }
        let path = match url.strip_prefix("file://") {
            Some(p) => PathBuf::from(p),
            None if !url.contains("://") => PathBuf::from(url),
            None => {
                return Err(Error::Config(format!(
                    "unsupported repository URL {url:?}: use file:///PATH, s3://BUCKET/PREFIX or memory://"
                )))
            }
        };
        if create {
            // Private: an unencrypted repository holds the data in clear, an encrypted one its
            // key slots (open to offline guessing). Objects inside inherit no access from it.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&path)
                .map_err(|e| Error::io(&path, e))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::io(&path, e))?;
        } else if !path.is_dir() {
            return Err(Error::NotARepository {
                url: url.to_string(),
                reason: "no such directory",
            });
        }
        let path = std::fs::canonicalize(&path).map_err(|e| Error::io(&path, e))?;
        let local = LocalFileSystem::new_with_prefix(&path).map_err(|e| Error::Store {
            op: "open",
            key: path.display().to_string(),
            source: e,
        })?;
        Ok(Store {
            inner: Arc::new(local),
            url: format!("file://{}", path.display()),
            local_root: Some(path),
        })
    }

    fn open_s3(url: &str, rest: &str, options: &StoreOptions) -> Result<Store> {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(Error::Config(format!("{url:?} names no bucket")));
        }
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_virtual_hosted_style_request(false)
            .with_retry(retry_config());
        if let Some(endpoint) = &options.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(region) = &options.region {
            builder = builder.with_region(region);
        }
        // Set whatever the environment said: AWS_ALLOW_HTTP or AWS_ALLOW_INVALID_CERTIFICATES
        // must not loosen transport security behind the operator's back.
        builder = builder.with_allow_http(options.allow_http).with_config(
            AmazonS3ConfigKey::Client(ClientConfigKey::AllowInvalidCertificates),
            "false",
        );
        if let Some((id, secret)) = &options.credentials {
            builder = builder
                .with_access_key_id(id)
                .with_secret_access_key(secret);
        }
        let s3 = builder
            .build()
            .map_err(|e| Error::Config(format!("s3 store {url}: {e}")))?;
        let prefix = prefix.trim_matches('/');
        let inner: Arc<dyn ObjectStore> = if prefix.is_empty() {
            Arc::new(s3)
        } else {
            Arc::new(PrefixStore::new(s3, prefix))
        };
        Ok(Store {
            inner,
            url: url.to_string(),
            local_root: None,
        })
    }

    /// This store with its backend wrapped by `wrap`: how tests put a fault-injecting layer
    /// (an append-only credential, failing requests) in front of a real store.
    pub fn wrapped(
        &self,
        wrap: impl FnOnce(Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore>,
    ) -> Store {
        Store {
            inner: wrap(Arc::clone(&self.inner)),
            url: self.url.clone(),
            local_root: self.local_root.clone(),
        }
    }

    /// Whether it is a `file://` store, on this host's own disk.
    pub fn is_local(&self) -> bool {
        self.local_root.is_some()
    }

    /// The normalised URL, for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Reads a whole object.
    ///
    /// # Errors
    /// [`Error::Missing`] when the key does not exist, [`Error::Store`] otherwise.
    pub async fn get(&self, key: &str) -> Result<Bytes> {
        let result = self.inner.get(&StorePath::from(key)).await;
        let get = result.map_err(|e| store_err("get", key, e))?;
        get.bytes().await.map_err(|e| store_err("get", key, e))
    }

    /// Like [`Store::get`], with `None` for a missing object.
    pub async fn get_opt(&self, key: &str) -> Result<Option<Bytes>> {
        match self.get(key).await {
            Ok(b) => Ok(Some(b)),
            Err(Error::Missing { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes a whole object, replacing any object of that key.
    pub async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        self.inner
            .put(&StorePath::from(key), data.into())
            .await
            .map(|_| ())
            .map_err(|e| store_err("put", key, e))
    }

    /// Deletes an object; deleting a missing object is not an error.
    ///
    /// # Errors
    /// [`Error::DeleteRefused`] when the credential may not delete (an append-only agent),
    /// [`Error::Store`] otherwise.
    pub async fn delete(&self, key: &str) -> Result<()> {
        match self.inner.delete(&StorePath::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(delete_err(key, e)),
        }
    }

    /// Deletes many objects (S3 `DeleteObjects`, up to 1000 keys a request) and returns how
    /// many; missing objects count as deleted.
    ///
    /// # Errors
    /// As [`Store::delete`], for the first key that fails; keys before it may be deleted.
    pub async fn delete_many(&self, keys: Vec<String>) -> Result<u64> {
        let paths = futures::stream::iter(keys.into_iter().map(|k| Ok(StorePath::from(k))));
        let mut results = self.inner.delete_stream(Box::pin(paths));
        let mut n = 0;
        while let Some(result) = results.next().await {
            match result {
                Ok(_) => {}
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    let key = match &e {
                        object_store::Error::PermissionDenied { path, .. } => path.clone(),
                        _ => "(one of many)".to_string(),
                    };
                    return Err(delete_err(&key, e));
                }
            }
            n += 1;
        }
        Ok(n)
    }

    /// The store's clock: the modification time of `key`, or `None` if it does not exist.
    pub async fn modified(&self, key: &str) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
        match self.inner.head(&StorePath::from(key)).await {
            Ok(meta) => Ok(Some(meta.last_modified)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_err("head", key, e)),
        }
    }

    /// Like [`Store::list`], with each object's modification time (the store's clock).
    pub async fn list_modified(&self, prefix: &str) -> Result<Vec<Listing>> {
        let path = StorePath::from(prefix);
        let listed: Vec<Listing> = self
            .inner
            .list(Some(&path))
            .map_ok(|meta| Listing {
                key: meta.location.to_string(),
                size: meta.size,
                modified: meta.last_modified,
            })
            .try_collect()
            .await
            .map_err(|e| store_err("list", prefix, e))?;
        #[cfg(feature = "scale-harness")]
        let listed = [listed, padding::listing(prefix)].concat();
        Ok(listed)
    }

    /// Lists every key under `prefix` (recursively) with its size, in no particular order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let path = StorePath::from(prefix);
        self.inner
            .list(Some(&path))
            .map_ok(|meta| (meta.location.to_string(), meta.size))
            .try_collect()
            .await
            .map_err(|e| store_err("list", prefix, e))
    }

    /// Makes every object written so far durable (see the module docs). A no-op for remote stores,
    /// whose PUT is durable once it returns.
    pub async fn sync(&self) -> Result<()> {
        let Some(root) = self.local_root.clone() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || {
            let dir = std::fs::File::open(&root).map_err(|e| Error::io(&root, e))?;
            nix::unistd::syncfs(&dir).map_err(|e| Error::io(&root, e.into()))
        })
        .await
        .expect("syncfs task panicked")
    }
}

/// The scale harness (`--features scale-harness`, never in a release): listings of `chunks/`
/// answer `TRESOR_SCALE_PAD_CHUNKS` more chunk objects than the store holds, generated, so that
/// `benches/scale.sh` measures memory and time at millions of chunks without storing them.
/// They are written "now", so `gc` never condemns them; nothing reads them. With
/// `TRESOR_SCALE_PAD_REFERENCED=1` the referenced sets of `verify` and `gc` hold them too (as if
/// snapshots used them), so the bench measures those sets at millions of chunks as well; every
/// [`crate::refset::RefSorter`] that deduplicates gets them, so a `copy` would fail on them.
#[cfg(feature = "scale-harness")]
pub(crate) mod padding {
    use super::Listing;

    fn count() -> u64 {
        static COUNT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        *COUNT.get_or_init(|| {
            std::env::var("TRESOR_SCALE_PAD_CHUNKS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        })
    }

    fn id(i: u64) -> crate::id::ChunkId {
        let mut id = *blake3::hash(&i.to_le_bytes()).as_bytes();
        id[0] = (i % 256) as u8;
        crate::id::ChunkId(id)
    }

    /// The generated ids, when `TRESOR_SCALE_PAD_REFERENCED=1` says snapshots reference them.
    pub(crate) fn referenced() -> impl Iterator<Item = crate::id::ChunkId> {
        let on = std::env::var("TRESOR_SCALE_PAD_REFERENCED").is_ok_and(|v| v == "1");
        (0..if on { count() } else { 0 }).map(id)
    }

    /// The generated chunk objects under `prefix` (`chunks` or `chunks/<2 hex>`): chunk `i`
    /// has an id whose first byte is `i % 256`, the rest a hash of `i`.
    pub(super) fn listing(prefix: &str) -> Vec<Listing> {
        let first: Option<u8> = match prefix.trim_end_matches('/') {
            "chunks" => None,
            p => match p.strip_prefix("chunks/").map(|h| u8::from_str_radix(h, 16)) {
                Some(Ok(byte)) => Some(byte),
                _ => return Vec::new(),
            },
        };
        let (start, step) = first.map_or((0, 1), |b| (u64::from(b), 256));
        let now = chrono::Utc::now();
        (start..count())
            .step_by(step)
            .map(|i| {
                let hex = id(i).to_hex();
                Listing {
                    key: format!("chunks/{}/{hex}", &hex[..2]),
                    size: 1 << 20,
                    modified: now,
                }
            })
            .collect()
    }
}

fn delete_err(key: &str, e: object_store::Error) -> Error {
    match e {
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => Error::DeleteRefused {
            key: key.to_string(),
        },
        e => store_err("delete", key, e),
    }
}

fn store_err(op: &'static str, key: &str, e: object_store::Error) -> Error {
    match e {
        object_store::Error::NotFound { .. } => Error::Missing {
            key: key.to_string(),
        },
        source => Error::Store {
            op,
            key: key.to_string(),
            source,
        },
    }
}

/// Retries with exponential backoff on 5xx, 429 and connection errors: 10 tries within 3 minutes,
/// object_store's default, with a first pause of 100 ms growing to 15 s.
fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(15),
            base: 2.0,
        },
        max_retries: 10,
        retry_timeout: Duration::from_secs(180),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_store_round_trip_and_missing() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/repo", dir.path().display());
        let store = Store::open(&url, &StoreOptions::default(), true).unwrap();
        store.put("a/b", Bytes::from_static(b"x")).await.unwrap();
        assert_eq!(store.get("a/b").await.unwrap(), Bytes::from_static(b"x"));
        assert!(matches!(store.get("a/c").await, Err(Error::Missing { key }) if key == "a/c"));
        assert_eq!(store.list("a").await.unwrap(), vec![("a/b".to_string(), 1)]);
        store.sync().await.unwrap();
        store.delete("a/b").await.unwrap();
        store.delete("a/b").await.unwrap();
        assert!(store.get_opt("a/b").await.unwrap().is_none());
    }

    #[test]
    fn rejects_unknown_scheme() {
        let err = Store::open("ftp://x", &StoreOptions::default(), false).unwrap_err();
        assert!(err.to_string().contains("ftp://x"));
    }
}
