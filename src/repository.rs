//! A tresor repository: its layout on the store, its config, and checked chunk I/O.
//!
//! # Layout
//! ```text
//! config                  JSON (in an envelope): format version, repository id, chunker, compression
//! chunks/<2 hex>/<64 hex> one chunk: envelope around the (zstd-compressed) plaintext;
//!                         the key is the BLAKE3-256 of the plaintext
//! snapshots/<64 hex>      one snapshot record (JSON in an envelope); the key is the BLAKE3 of the record
//! ```
//! Everything a snapshot references (file contents, its catalog or block ref list) is made of
//! chunks, so a repository has exactly two kinds of data object.
//!
//! # Invariants
//! * Chunks are immutable and content-addressed: writing one again writes identical bytes, so
//!   racing writers are harmless and no conditional PUT is needed.
//! * A snapshot record is written last, after every chunk it references is stored and
//!   [`Store::sync`] has made them durable; a listed snapshot never points at something missing.
//! * Every chunk read back is decompressed with a size bound and re-hashed against its key.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::chunker::ChunkerParams;
use crate::codec;
use crate::error::{Error, Result};
use crate::id::ChunkId;
use crate::store::Store;

/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
const CONFIG_KEY: &str = "config";
/// Store prefix of chunk objects.
pub const CHUNKS_PREFIX: &str = "chunks";
/// Store prefix of snapshot records.
pub const SNAPSHOTS_PREFIX: &str = "snapshots";
const MAX_RECORD_LEN: usize = 64 << 20;

/// The repository's `config` object.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RepoConfig {
    pub version: u32,
    /// Random id, names the local cache.
    pub id: String,
    pub chunker: ChunkerParams,
    /// zstd level; `None` stores chunks uncompressed.
    pub compression_level: Option<i32>,
    pub created: chrono::DateTime<chrono::Utc>,
}

/// Options of [`Repository::init`].
#[derive(Clone, Debug)]
pub struct InitOptions {
    pub chunker: ChunkerParams,
    pub compression_level: Option<i32>,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            chunker: ChunkerParams::default(),
            compression_level: Some(3),
        }
    }
}

/// An open repository.
#[derive(Debug)]
pub struct Repository {
    store: Store,
    config: RepoConfig,
}

impl Repository {
    /// Creates a repository in `store`.
    ///
    /// # Errors
    /// [`Error::AlreadyInitialized`] if the store already holds a `config`; [`Error::Config`] for
    /// invalid chunker or compression settings.
    pub async fn init(store: Store, options: InitOptions) -> Result<Repository> {
        options.chunker.validate()?;
        if let Some(level) = options.compression_level {
            if !zstd::compression_level_range().contains(&level) {
                return Err(Error::Config(format!("zstd level {level} is out of range")));
            }
        }
        // A check-then-put: S3 stores such as Garage ignore conditional PUT, so two `init`s
        // racing on one empty prefix cannot be told apart here. Both would write a valid config;
        // the later one wins and the repository id of the earlier one is lost, costing only a
        // rebuilt local cache.
        if store.get_opt(CONFIG_KEY).await?.is_some() {
            return Err(Error::AlreadyInitialized {
                url: store.url().to_string(),
            });
        }
        let config = RepoConfig {
            version: FORMAT_VERSION,
            id: hex::encode(rand::random::<[u8; 16]>()),
            chunker: options.chunker,
            compression_level: options.compression_level,
            created: chrono::Utc::now(),
        };
        let json = serde_json::to_vec_pretty(&config).expect("config serialises");
        store
            .put(CONFIG_KEY, codec::encode(&json, None).into())
            .await?;
        store.sync().await?;
        Ok(Repository { store, config })
    }

    /// Opens the repository in `store`.
    ///
    /// # Errors
    /// [`Error::NotARepository`] when there is no config, [`Error::UnsupportedFormat`] for a newer
    /// format, [`Error::Corrupt`] when the config does not parse.
    pub async fn open(store: Store) -> Result<Repository> {
        let url = store.url().to_string();
        let raw = store
            .get_opt(CONFIG_KEY)
            .await?
            .ok_or_else(|| Error::NotARepository {
                url: url.clone(),
                reason: "it has no `config` object",
            })?;
        let json =
            codec::decode(CONFIG_KEY, &raw, MAX_RECORD_LEN).map_err(|_| Error::NotARepository {
                url: url.clone(),
                reason: "its `config` object is not a tresor config",
            })?;
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        let corrupt = |e: serde_json::Error| Error::Corrupt {
            object: format!("{url}/{CONFIG_KEY}"),
            reason: e.to_string(),
        };
        let v: Version = serde_json::from_slice(&json).map_err(corrupt)?;
        if v.version > FORMAT_VERSION {
            return Err(Error::UnsupportedFormat {
                url,
                found: v.version,
                supported: FORMAT_VERSION,
            });
        }
        let config: RepoConfig = serde_json::from_slice(&json).map_err(corrupt)?;
        config.chunker.validate()?;
        Ok(Repository { store, config })
    }

    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The store key of a chunk.
    pub fn chunk_key(id: &ChunkId) -> String {
        let hex = id.to_hex();
        format!("{CHUNKS_PREFIX}/{}/{hex}", &hex[..2])
    }

    /// The id a chunk of `data` gets in this repository.
    pub fn chunk_id(&self, data: &[u8]) -> ChunkId {
        ChunkId::of(data)
    }

    /// Compresses and wraps a chunk for storage (CPU work; run it off the async runtime).
    pub fn encode_chunk(&self, data: &[u8]) -> Bytes {
        codec::encode(data, self.config.compression_level).into()
    }

    /// Stores an encoded chunk. Idempotent: the same id always carries the same bytes.
    pub async fn put_chunk(&self, id: &ChunkId, encoded: Bytes) -> Result<()> {
        self.store.put(&Self::chunk_key(id), encoded).await
    }

    /// Fetches a chunk's stored bytes without decoding them.
    pub async fn get_chunk_raw(&self, id: &ChunkId) -> Result<Bytes> {
        self.store.get(&Self::chunk_key(id)).await
    }

    /// Decodes a fetched chunk and checks it against its id (CPU work; run it off the runtime).
    ///
    /// # Errors
    /// [`Error::Corrupt`] naming the chunk when it does not decode or its hash differs.
    pub fn decode_chunk(&self, id: &ChunkId, raw: &[u8]) -> Result<Bytes> {
        let key = Self::chunk_key(id);
        let data = codec::decode(&key, raw, self.config.chunker.max_size as usize)?;
        let actual = self.chunk_id(&data);
        if actual != *id {
            return Err(Error::Corrupt {
                object: key,
                reason: format!("content hashes to {actual}, not to its id"),
            });
        }
        Ok(data.into())
    }

    /// Lists the ids of every stored chunk.
    pub async fn list_chunks(&self) -> Result<Vec<ChunkId>> {
        let keys = self.store.list(CHUNKS_PREFIX).await?;
        Ok(keys
            .iter()
            .filter_map(|(k, _)| k.rsplit('/').next().and_then(ChunkId::from_hex))
            .collect())
    }

    /// Makes everything written so far durable; see [`Store::sync`].
    pub async fn sync(&self) -> Result<()> {
        self.store.sync().await
    }

    /// Writes a snapshot record (its serialised bytes) and returns its id. Callers must have
    /// stored and synced everything it references.
    pub async fn put_snapshot(&self, record: &[u8]) -> Result<String> {
        let id = blake3::hash(record).to_hex().to_string();
        let key = format!("{SNAPSHOTS_PREFIX}/{id}");
        self.store
            .put(&key, codec::encode(record, None).into())
            .await?;
        self.store.sync().await?;
        Ok(id)
    }

    /// Lists the ids of every snapshot record.
    pub async fn list_snapshot_ids(&self) -> Result<Vec<String>> {
        let keys = self.store.list(SNAPSHOTS_PREFIX).await?;
        Ok(keys
            .into_iter()
            .filter_map(|(k, _)| k.rsplit('/').next().map(str::to_string))
            .filter(|id| id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()))
            .collect())
    }

    /// Reads a snapshot record's bytes, checked against its id.
    ///
    /// # Errors
    /// [`Error::Missing`] or [`Error::Corrupt`] naming the record.
    pub async fn get_snapshot(&self, id: &str) -> Result<Vec<u8>> {
        let key = format!("{SNAPSHOTS_PREFIX}/{id}");
        let raw = self.store.get(&key).await?;
        let record = codec::decode(&key, &raw, MAX_RECORD_LEN)?;
        if blake3::hash(&record).to_hex().as_str() != id {
            return Err(Error::Corrupt {
                object: key,
                reason: "record does not hash to its id".into(),
            });
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreOptions;

    fn memory() -> Store {
        Store::open("memory://", &StoreOptions::default(), true).unwrap()
    }

    #[tokio::test]
    async fn init_refuses_twice_and_open_needs_config() {
        let store = memory();
        assert!(matches!(
            Repository::open(store.clone()).await,
            Err(Error::NotARepository { .. })
        ));
        Repository::init(store.clone(), InitOptions::default())
            .await
            .unwrap();
        assert!(matches!(
            Repository::init(store.clone(), InitOptions::default()).await,
            Err(Error::AlreadyInitialized { .. })
        ));
        let repo = Repository::open(store).await.unwrap();
        assert_eq!(repo.config().chunker, ChunkerParams::default());
    }

    #[tokio::test]
    async fn newer_format_is_refused() {
        let store = memory();
        let json = br#"{"version": 99}"#;
        store
            .put("config", codec::encode(json, None).into())
            .await
            .unwrap();
        let err = Repository::open(store).await.unwrap_err();
        assert!(
            matches!(err, Error::UnsupportedFormat { found: 99, .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn chunk_reads_are_checked() {
        let repo = Repository::init(memory(), InitOptions::default())
            .await
            .unwrap();
        let data = b"some chunk".repeat(100);
        let id = repo.chunk_id(&data);
        repo.put_chunk(&id, repo.encode_chunk(&data)).await.unwrap();
        let raw = repo.get_chunk_raw(&id).await.unwrap();
        assert_eq!(&repo.decode_chunk(&id, &raw).unwrap()[..], &data[..]);

        let other = repo.chunk_id(b"other");
        let err = repo.decode_chunk(&other, &raw).unwrap_err().to_string();
        assert!(err.contains(&other.to_hex()), "{err}");
        assert_eq!(repo.list_chunks().await.unwrap(), vec![id]);
    }

    #[tokio::test]
    async fn snapshot_records_are_checked() {
        let repo = Repository::init(memory(), InitOptions::default())
            .await
            .unwrap();
        let id = repo.put_snapshot(b"{}").await.unwrap();
        assert_eq!(repo.list_snapshot_ids().await.unwrap(), vec![id.clone()]);
        assert_eq!(repo.get_snapshot(&id).await.unwrap(), b"{}");
        let key = format!("snapshots/{id}");
        repo.store()
            .put(&key, codec::encode(b"[]", None).into())
            .await
            .unwrap();
        assert!(repo
            .get_snapshot(&id)
            .await
            .unwrap_err()
            .to_string()
            .contains(&key));
    }
}
