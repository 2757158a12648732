//! A tresor repository: its layout on the store, its config, and checked chunk I/O.
//!
//! # Layout
//! ```text
//! config                  JSON (in an envelope, never encrypted): format version, repository id,
//!                         chunker, compression, cipher, and in an encrypted repository a MAC
//!                         over all of them under a key derived from the master key
//! keys/<64 hex>           a key slot (encrypted repositories): the master key sealed under a
//!                         passphrase or key file, see [`crate::crypto`]
//! chunks/<2 hex>/<64 hex> one chunk: envelope around the (zstd-compressed, sealed) plaintext;
//!                         the key is the (keyed) BLAKE3-256 of the plaintext
//! blobs/<64 hex>          an OCI blob's chunk refs (sealed JSON); the key is the (keyed) BLAKE3
//!                         of the blob's digest
//! protected/<64 hex>      empty: the snapshot of that id is protected from `forget`
//! snapshots/<64 hex>      one snapshot record (JSON in an envelope, sealed); the key is the
//!                         (keyed) BLAKE3 of the record
//! verify/<time>-<rand>    the record of one verification run (sealed JSON)
//! sessions/<time>-<rand>  a running or ended backup session (sealed JSON), see crate::gc::session
//! gc/plans/<id>           chunks and blob indexes condemned by a `gc` run (sealed CBOR)
//! gc/sweeping/<id>        empty: a `gc` run is deleting what plan <id> condemned
//! gc/done/<id>            empty: plan <id> is swept; see [`crate::gc`]
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
use crate::crypto::{Cipher, KeySlot, MasterKey, Secret};
use crate::error::{Error, Result};
use crate::id::ChunkId;
use crate::store::Store;

/// The format version this build writes for new repositories, and the newest it reads.
/// Version 2 added the payload of tree snapshots ([`crate::volume::payload`]); a version-1
/// repository is still read and written as version 1.
pub const FORMAT_VERSION: u32 = 2;
const CONFIG_KEY: &str = "config";
/// Store prefix of chunk objects.
pub const CHUNKS_PREFIX: &str = "chunks";
/// Store prefix of key slots.
pub const KEYS_PREFIX: &str = "keys";
/// Store prefix of blob index objects (OCI blob digest -> chunk refs).
pub const BLOBS_PREFIX: &str = "blobs";
/// Store prefix of protection markers (`protected/<snapshot id>`, empty objects).
pub const PROTECTED_PREFIX: &str = "protected";
/// Store prefix of verification run records.
pub const VERIFY_PREFIX: &str = "verify";
/// Store prefix of snapshot records.
pub const SNAPSHOTS_PREFIX: &str = "snapshots";
/// Store prefix of backup session records.
pub const SESSIONS_PREFIX: &str = "sessions";
/// Store prefix of garbage collection plans and their markers.
pub const GC_PREFIX: &str = "gc";
const MAX_RECORD_LEN: usize = 64 << 20;
/// Chunk prefixes listed at once by [`Repository::chunk_listings`].
const LIST_AHEAD: usize = 8;

/// A chunk object as a listing shows it.
#[derive(Clone, Copy, Debug)]
pub struct StoredChunk {
    pub id: ChunkId,
    /// Its stored (encoded) size.
    pub size: u64,
    /// When it was last written (store clock).
    pub modified: chrono::DateTime<chrono::Utc>,
}

/// Reads and parses the `config` of the repository in `store`: a tresor config, of a format
/// this build reads, with a well-formed id and chunker.
async fn read_config(store: &Store) -> Result<RepoConfig> {
    let url = store.url();
    let raw = store
        .get_opt(CONFIG_KEY)
        .await?
        .ok_or_else(|| Error::NotARepository {
            url: url.to_string(),
            reason: "it has no `config` object",
        })?;
    let json = codec::decode(CONFIG_KEY, &raw, MAX_RECORD_LEN, None).map_err(|_| {
        Error::NotARepository {
            url: url.to_string(),
            reason: "its `config` object is not a tresor config",
        }
    })?;
    #[derive(Deserialize)]
    struct Version {
        version: u32,
    }
    let corrupt = |reason: String| Error::Corrupt {
        object: format!("{url}/{CONFIG_KEY}"),
        reason,
    };
    let v: Version = serde_json::from_slice(&json).map_err(|e| corrupt(e.to_string()))?;
    if v.version > FORMAT_VERSION {
        return Err(Error::UnsupportedFormat {
            url: url.to_string(),
            found: v.version,
            supported: FORMAT_VERSION,
        });
    }
    let config: RepoConfig = serde_json::from_slice(&json).map_err(|e| corrupt(e.to_string()))?;
    // The id names a directory of the cache: nothing but what `init` makes may go there.
    if config.id.len() != 32 || !config.id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(corrupt(format!(
            "repository id {:?} is not 32 hex digits",
            config.id
        )));
    }
    config.chunker.validate()?;
    Ok(config)
}

/// A unique object name that sorts by `time`.
pub fn time_name(time: chrono::DateTime<chrono::Utc>) -> String {
    format!(
        "{}-{}",
        time.format("%Y%m%dT%H%M%S%.6fZ"),
        hex::encode(rand::random::<[u8; 4]>())
    )
}

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
    /// The cipher of an encrypted repository ([`Cipher::name`]); absent when unencrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<String>,
    /// Hex of [`MasterKey::config_mac`] over this config without the MAC (encrypted
    /// repositories): whoever may write the store but holds no key cannot change a field, such
    /// as `encryption`, without the next open noticing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl RepoConfig {
    /// BLAKE3 of the whole config as parsed (its MAC included), remembered by each host that
    /// opens the repository ([`crate::cache::Identity`]).
    pub fn fingerprint(&self) -> String {
        let json = serde_json::to_vec(self).expect("config serialises");
        blake3::hash(&json).to_hex().to_string()
    }

    /// The bytes the MAC covers: the config's fields as parsed, without the MAC.
    fn canonical(&self) -> Vec<u8> {
        let unsigned = RepoConfig {
            mac: None,
            ..self.clone()
        };
        serde_json::to_vec(&unsigned).expect("config serialises")
    }

    fn sign(&mut self, key: &MasterKey) {
        self.mac = Some(key.config_mac(&self.canonical()).to_hex().to_string());
    }

    fn mac_is_valid(&self, key: &MasterKey) -> bool {
        // blake3::Hash compares in constant time.
        let expected = key.config_mac(&self.canonical());
        self.mac
            .as_deref()
            .and_then(|m| blake3::Hash::from_hex(m).ok())
            .is_some_and(|m| m == expected)
    }
}

/// How [`Repository::open`] gets in: the secret the user gave (flags, environment, systemd
/// credentials), and the cache directory where the repository's identity is remembered.
#[derive(Default)]
pub struct OpenOptions<'a> {
    /// The passphrase or key file given for this repository, if any. A repository whose config
    /// claims to be unencrypted is refused when one is given.
    pub secret: Option<Secret>,
    /// Where [`crate::cache::Identities`] are kept; `None` remembers nothing.
    pub cache_dir: Option<&'a std::path::Path>,
    /// The operator says the repository is unencrypted (`--expect-unencrypted`). Without it, a
    /// config that claims no encryption is believed only on a host that remembers the
    /// repository as unencrypted: a fresh host is not talked out of encryption by the store.
    pub expect_unencrypted: bool,
    /// Sign an encrypted config that has no MAC (`tresor key upgrade-config`, the owner's
    /// explicit step for a repository made before configs were authenticated). Without it such
    /// a config is refused.
    pub upgrade_config: bool,
}

/// Why a host would believe a config that claims no encryption.
#[derive(Clone, Copy)]
enum Trust {
    /// This host opened the repository before, unencrypted (its config unchanged since).
    Remembered,
    /// The operator said so (`expect_unencrypted`), on a host that never opened it.
    Told,
    /// Nobody vouches for it.
    Not,
}

/// Options of [`Repository::init`].
#[derive(Clone, Debug)]
pub struct InitOptions {
    pub chunker: ChunkerParams,
    pub compression_level: Option<i32>,
    /// The cipher of an encrypted repository; `None` picks [`Cipher::preferred`].
    pub cipher: Option<Cipher>,
    /// A repository whose chunk ids (and chunker) the new one shares, so that `tresor copy`
    /// moves chunks between them unchanged and backups into either dedupe alike. Its
    /// encryption key is not shared.
    pub same_ids_as: Option<std::sync::Arc<Repository>>,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            chunker: ChunkerParams::default(),
            compression_level: Some(3),
            cipher: None,
            same_ids_as: None,
        }
    }
}

/// An open repository.
#[derive(Debug)]
pub struct Repository {
    store: Store,
    config: RepoConfig,
    key: Option<MasterKey>,
    /// The key slot that opened the repository.
    slot: Option<String>,
}

impl Repository {
    /// Creates a repository in `store`, encrypted with a new master key in a first key slot
    /// opened by `secret`, or unencrypted when `secret` is `None`.
    ///
    /// # Errors
    /// [`Error::AlreadyInitialized`] if the store already holds a `config`; [`Error::Config`] for
    /// invalid chunker or compression settings.
    pub async fn init(
        store: Store,
        mut options: InitOptions,
        secret: Option<&Secret>,
    ) -> Result<Repository> {
        if let Some(other) = &options.same_ids_as {
            if other.is_encrypted() != secret.is_some() {
                return Err(Error::Config(format!(
                    "{} is {}encrypted: a repository sharing its chunk ids must be too",
                    other.store().url(),
                    if other.is_encrypted() { "" } else { "not " }
                )));
            }
            options.chunker = other.config().chunker;
        }
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
        let cipher = options.cipher.unwrap_or_else(Cipher::preferred);
        let config = RepoConfig {
            version: FORMAT_VERSION,
            id: hex::encode(rand::random::<[u8; 16]>()),
            chunker: options.chunker,
            compression_level: options.compression_level,
            created: chrono::Utc::now(),
            encryption: secret.map(|_| cipher.name().to_string()),
            mac: None,
        };
        let mut repo = Repository {
            store,
            config,
            key: None,
            slot: None,
        };
        if let Some(secret) = secret {
            let key = match options.same_ids_as.as_ref().and_then(|o| o.key.as_ref()) {
                Some(other) => other.sharing_ids(cipher),
                None => MasterKey::generate(cipher),
            };
            repo.config.sign(&key);
            repo.key = Some(key);
            repo.slot = Some(repo.add_key(secret).await?);
        }
        // The config goes last: a repository without one is not a repository yet.
        let json = serde_json::to_vec_pretty(&repo.config).expect("config serialises");
        repo.store
            .put(CONFIG_KEY, codec::encode(&json, None, None).into())
            .await?;
        repo.store.sync().await?;
        Ok(repo)
    }

    /// Opens the repository in `store`. An encrypted repository is unlocked with
    /// `options.secret`, or else with what `ask` returns (a prompt), and its config's MAC is
    /// checked. A config that claims no encryption is refused when a secret was given or the
    /// store holds key slots, and the repository's id and encryption are checked against what
    /// the cache directory remembers of this store URL, so that whoever may write the store
    /// cannot switch encryption off or swap the repository.
    ///
    /// A config that claims no encryption is believed only when this host remembers the
    /// repository as unencrypted or the operator said so (`expect_unencrypted`), and never
    /// while the store holds sealed objects. An encrypted config without a MAC is signed only
    /// with `upgrade_config` (and never when the cache remembers it with one: then it was
    /// removed).
    ///
    /// # Errors
    /// [`Error::NotARepository`] when there is no config, [`Error::UnsupportedFormat`] for a newer
    /// format, [`Error::Corrupt`] when the config does not parse, [`Error::Tampered`] for the
    /// checks above, [`Error::WrongKey`] when no key slot opens with the secret, and whatever
    /// `ask` returns.
    pub async fn open(
        store: Store,
        options: OpenOptions<'_>,
        ask: impl FnOnce() -> Result<Secret>,
    ) -> Result<Repository> {
        let url = store.url().to_string();
        let config = read_config(&store).await?;
        let mut identities = crate::cache::Identities::load(options.cache_dir)?;
        let remembered = identities.get(&url).cloned();
        if let Some(known) = &remembered {
            known.check(&url, &config)?;
        }
        let mut repo = Repository {
            store,
            config,
            key: None,
            slot: None,
        };
        match repo.config.encryption.clone() {
            None => {
                let trust = match (&remembered, options.expect_unencrypted) {
                    (Some(_), _) => Trust::Remembered,
                    (None, true) => Trust::Told,
                    (None, false) => Trust::Not,
                };
                repo.check_unencrypted(options.secret.is_some(), trust)
                    .await?;
            }
            Some(name) => {
                let secret = match options.secret {
                    Some(s) => s,
                    None => ask()?,
                };
                let authenticated = remembered.is_some_and(|k| k.authenticated);
                repo.unlock_config(&name, &secret, authenticated, options.upgrade_config)
                    .await?;
            }
        }
        identities.remember(&url, &repo.config)?;
        Ok(repo)
    }

    /// The config of the repository in `store`, parsed but neither authenticated nor checked
    /// against this host's memory: for showing it (`key upgrade-config --dry-run`).
    ///
    /// # Errors
    /// As [`Repository::open`] before any check.
    pub async fn peek_config(store: &Store) -> Result<RepoConfig> {
        read_config(store).await
    }

    fn tampered(&self, reason: String) -> Error {
        Error::Tampered {
            url: self.store.url().to_string(),
            reason,
        }
    }

    /// A config that claims no encryption is believed only if no secret was given for the
    /// repository, the store holds no key slot and no MAC, and this host remembers it as
    /// unencrypted or the operator said it is (`trust`); in the second case, the first time,
    /// no sampled object may be sealed.
    async fn check_unencrypted(&self, secret_given: bool, trust: Trust) -> Result<()> {
        if secret_given {
            return Err(self.tampered(
                "its config says it is unencrypted, but a password or key file was given for it"
                    .into(),
            ));
        }
        let slots = self.store.list(KEYS_PREFIX).await?.len();
        let mac = self.config.mac.is_some();
        if slots > 0 || mac {
            let and_mac = if mac { " and the config a MAC" } else { "" };
            return Err(self.tampered(format!(
                "its config says it is unencrypted, but the store holds {slots} key slot(s){and_mac}"
            )));
        }
        match trust {
            Trust::Remembered => Ok(()),
            Trust::Not => Err(Error::UnencryptedUnconfirmed {
                url: self.store.url().to_string(),
            }),
            Trust::Told => match self.sealed_object().await? {
                Some(key) => Err(self.tampered(format!(
                    "its config says it is unencrypted, but {key} is sealed"
                ))),
                None => Ok(()),
            },
        }
    }

    /// A sealed object among a sample of the store (a few snapshot records and session
    /// records, and the chunks of one of the 256 prefixes), if there is one: a repository
    /// whose encryption was stripped from its config still holds them, and plaintext must
    /// never be added beside them. Checked when a host first trusts an unencrypted config.
    async fn sealed_object(&self) -> Result<Option<String>> {
        const SAMPLE: usize = 4;
        for prefix in [SNAPSHOTS_PREFIX, SESSIONS_PREFIX, "chunks/00"] {
            let mut keys = self.store.list(prefix).await?;
            keys.sort();
            for (key, _) in keys.into_iter().take(SAMPLE) {
                if let Some(raw) = self.store.get_opt(&key).await? {
                    if codec::is_sealed(&raw) {
                        return Ok(Some(key));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Unlocks the master key with `secret` and checks the config's MAC with it. A config
    /// without one (an older tresor wrote it) gets one with `upgrade` (the owner's explicit
    /// `key upgrade-config`), unless this host saw it `authenticated`; otherwise it is refused:
    /// whoever may write the store could have stripped the MAC to change a field.
    async fn unlock_config(
        &mut self,
        cipher: &str,
        secret: &Secret,
        authenticated: bool,
        upgrade: bool,
    ) -> Result<()> {
        let url = self.store.url().to_string();
        let Some(cipher) = Cipher::from_name(cipher) else {
            return Err(Error::UnsupportedFormat {
                url,
                found: self.config.version,
                supported: FORMAT_VERSION,
            }
            .context(format!("unknown cipher {cipher:?}")));
        };
        let (slot, key) = self.unlock(secret).await?;
        let key = key.with_cipher(cipher);
        if self.config.mac.is_none() && !authenticated {
            if !upgrade {
                return Err(self.tampered(
                    "its config has no MAC; if an older tresor made it, check its fields \
                     (`tresor key upgrade-config --dry-run`) and sign them with `tresor key upgrade-config`"
                        .into(),
                ));
            }
            tracing::warn!("the config of {url} has no MAC: signing its fields as they are");
            self.config.sign(&key);
            let json = serde_json::to_vec_pretty(&self.config).expect("config serialises");
            self.store
                .put(CONFIG_KEY, codec::encode(&json, None, None).into())
                .await?;
        } else if !self.config.mac_is_valid(&key) {
            return Err(
                self.tampered("its MAC does not match its fields (changed or removed)".into())
            );
        }
        self.key = Some(key);
        self.slot = Some(slot);
        Ok(())
    }

    async fn unlock(&self, secret: &Secret) -> Result<(String, MasterKey)> {
        for (id, slot) in self.list_keys().await? {
            let object = format!("{KEYS_PREFIX}/{id}");
            if let Some(key) = slot.unwrap(secret, &object)? {
                return Ok((id, key));
            }
        }
        Err(Error::WrongKey {
            url: self.store.url().to_string(),
        })
    }

    /// Whether chunks and records are encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.key.is_some()
    }

    /// The id of the key slot that opened the repository, if encrypted.
    pub fn key_slot(&self) -> Option<&str> {
        self.slot.as_deref()
    }

    /// Adds a key slot opened by `secret` and returns its id.
    ///
    /// # Errors
    /// [`Error::Config`] if the repository is not encrypted.
    pub async fn add_key(&self, secret: &Secret) -> Result<String> {
        let key = self.key.as_ref().ok_or_else(|| {
            Error::Config("the repository is not encrypted; it has no keys".into())
        })?;
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        let slot = KeySlot::wrap(key, secret, &host)?;
        let json = serde_json::to_vec_pretty(&slot).expect("slot serialises");
        let id = blake3::hash(&json).to_hex().to_string();
        self.store
            .put(
                &format!("{KEYS_PREFIX}/{id}"),
                codec::encode(&json, None, None).into(),
            )
            .await?;
        self.store.sync().await?;
        Ok(id)
    }

    /// Every key slot, by id.
    pub async fn list_keys(&self) -> Result<Vec<(String, KeySlot)>> {
        let mut out = Vec::new();
        for (key, _) in self.store.list(KEYS_PREFIX).await? {
            let id = key.rsplit('/').next().unwrap_or_default().to_string();
            let raw = self.store.get(&key).await?;
            let json = codec::decode(&key, &raw, MAX_RECORD_LEN, None)?;
            let slot: KeySlot = serde_json::from_slice(&json).map_err(|e| Error::Corrupt {
                object: key.clone(),
                reason: format!("key slot does not parse: {e}"),
            })?;
            out.push((id, slot));
        }
        out.sort_by(|a, b| (a.1.created, &a.0).cmp(&(b.1.created, &b.0)));
        Ok(out)
    }

    /// Removes a key slot. The slot that opened the repository and the last slot cannot be
    /// removed, so the repository never locks itself out.
    ///
    /// # Errors
    /// [`Error::Config`] for those two cases or an unknown id.
    pub async fn remove_key(&self, id: &str) -> Result<()> {
        let keys = self.list_keys().await?;
        let matching: Vec<&String> = keys
            .iter()
            .map(|(k, _)| k)
            .filter(|k| k.starts_with(id))
            .collect();
        let [found] = matching.as_slice() else {
            return Err(Error::Config(format!(
                "{id:?} names {} key slots, not one",
                matching.len()
            )));
        };
        if Some(found.as_str()) == self.key_slot() {
            return Err(Error::Config(format!(
                "key slot {} opened this repository; open it with another key to remove this one",
                &found[..8]
            )));
        }
        if keys.len() == 1 {
            return Err(Error::Config("refusing to remove the last key slot".into()));
        }
        self.store.delete(&format!("{KEYS_PREFIX}/{found}")).await
    }

    /// Replaces the key slot that opened the repository by a new one opened by `secret`
    /// (`key passwd`). The new slot is stored before the old one is deleted.
    /// Returns the new and the old slot ids.
    pub async fn replace_key(&self, secret: &Secret) -> Result<(String, String)> {
        let old = self
            .key_slot()
            .ok_or_else(|| Error::Config("the repository is not encrypted; it has no keys".into()))?
            .to_string();
        let new = self.add_key(secret).await?;
        self.store.delete(&format!("{KEYS_PREFIX}/{old}")).await?;
        Ok((new, old))
    }

    /// Seed of the chunker's gear table (0 in an unencrypted repository).
    pub fn chunker_seed(&self) -> u64 {
        self.key.as_ref().map_or(0, MasterKey::chunker_seed)
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

    /// The repository's format version: 1 stores every file as its own chunk stream, 2 keeps
    /// small files in the payload of their snapshot.
    pub fn format(&self) -> u32 {
        self.config.version
    }

    /// The id a chunk of `data` gets in this repository.
    pub fn chunk_id(&self, data: &[u8]) -> ChunkId {
        match &self.key {
            Some(k) => k.chunk_id(data),
            None => ChunkId::of(data),
        }
    }

    /// Compresses, seals and wraps a chunk for storage (CPU work; run it off the async runtime).
    pub fn encode_chunk(&self, id: &ChunkId, data: &[u8]) -> Bytes {
        let key = Self::chunk_key(id);
        let seal = self.key.as_ref().map(|k| (k, key.as_str()));
        codec::encode(data, self.config.compression_level, seal).into()
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
        let data = codec::decode(
            &key,
            raw,
            self.config.chunker.max_size as usize,
            self.key.as_ref(),
        )?;
        let actual = self.chunk_id(&data);
        if actual != *id {
            return Err(Error::Corrupt {
                object: key,
                reason: format!("content hashes to {actual}, not to its id"),
            });
        }
        Ok(data.into())
    }

    /// The stored chunks whose id begins with the byte `prefix` (`chunks/<2 hex>/`), with
    /// their sizes and times, in id order and each once (a store may list a key twice, and a
    /// walk beside a sorted set must not miss that one is referenced).
    pub async fn list_chunk_prefix(&self, prefix: u8) -> Result<Vec<StoredChunk>> {
        let listed = self
            .store
            .list_modified(&format!("{CHUNKS_PREFIX}/{prefix:02x}"))
            .await?;
        // Only objects at their id's own key count: one a store put elsewhere under this
        // prefix would claim a chunk whose key holds nothing (and break the sorted order the
        // chunk cache is built in).
        let mut chunks: Vec<StoredChunk> = listed
            .into_iter()
            .filter_map(|l| {
                let id = ChunkId::from_hex(l.key.rsplit('/').next()?)?;
                (l.key == Self::chunk_key(&id)).then_some(StoredChunk {
                    id,
                    size: l.size,
                    modified: l.modified,
                })
            })
            .collect();
        chunks.sort_unstable_by_key(|c| c.id);
        chunks.dedup_by_key(|c| c.id);
        Ok(chunks)
    }

    /// Every stored chunk, listed one id prefix at a time (in increasing order of prefix, so in
    /// id order throughout, each once; see [`Repository::list_chunk_prefix`]): the
    /// 256 prefixes split the chunks evenly, so a caller that handles each listing before the
    /// next holds 1/256 of the repository's listing at a time, not all of it (a few prefixes
    /// are listed ahead to hide a remote store's latency).
    pub fn chunk_listings(&self) -> impl futures::Stream<Item = Result<Vec<StoredChunk>>> + '_ {
        use futures::StreamExt;
        futures::stream::iter(0..=u8::MAX)
            .map(|prefix| self.list_chunk_prefix(prefix))
            .buffered(LIST_AHEAD)
    }

    /// Makes everything written so far durable; see [`Store::sync`].
    pub async fn sync(&self) -> Result<()> {
        self.store.sync().await
    }

    /// Writes a snapshot record (its serialised bytes) and returns its id. Callers must have
    /// stored and synced everything it references.
    pub async fn put_snapshot(&self, record: &[u8]) -> Result<String> {
        let id = self.chunk_id(record).to_hex();
        let key = format!("{SNAPSHOTS_PREFIX}/{id}");
        let seal = self.key.as_ref().map(|k| (k, key.as_str()));
        let encoded = codec::encode(record, self.config.compression_level, seal);
        self.store.put(&key, encoded.into()).await?;
        self.store.sync().await?;
        Ok(id)
    }

    /// Deletes a snapshot record (the data it used stays until garbage collection).
    pub async fn delete_snapshot(&self, id: &str) -> Result<()> {
        self.store.delete(&format!("{SNAPSHOTS_PREFIX}/{id}")).await
    }

    /// Marks a snapshot as protected from `forget`, or removes the mark.
    pub async fn set_protected(&self, id: &str, protected: bool) -> Result<()> {
        let key = format!("{PROTECTED_PREFIX}/{id}");
        if protected {
            self.store.put(&key, Bytes::new()).await
        } else {
            self.store.delete(&key).await
        }
    }

    /// Ids of protected snapshots.
    pub async fn protected_ids(&self) -> Result<std::collections::HashSet<String>> {
        Ok(self
            .store
            .list(PROTECTED_PREFIX)
            .await?
            .into_iter()
            .filter_map(|(k, _)| k.rsplit('/').next().map(str::to_string))
            .collect())
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

    /// Writes a small record object (a session, a gc plan), sealed in an encrypted repository.
    pub async fn put_record(&self, key: &str, record: &[u8]) -> Result<()> {
        let seal = self.key.as_ref().map(|k| (k, key));
        let encoded = codec::encode(record, self.config.compression_level, seal);
        self.store.put(key, encoded.into()).await
    }

    /// Reads a record written by [`Repository::put_record`]; `None` if it does not exist.
    ///
    /// # Errors
    /// [`Error::Corrupt`] naming the object when it does not open or decode.
    pub async fn get_record(&self, key: &str) -> Result<Option<Vec<u8>>> {
        match self.store.get_opt(key).await? {
            Some(raw) => codec::decode(key, &raw, MAX_RECORD_LEN, self.key.as_ref()).map(Some),
            None => Ok(None),
        }
    }

    /// The store key of an OCI blob's index object.
    pub fn blob_index_key(&self, digest: &str) -> String {
        format!(
            "{BLOBS_PREFIX}/{}",
            self.chunk_id(digest.as_bytes()).to_hex()
        )
    }

    /// Stores the index object of an OCI blob (its chunk refs), sealed. Callers must have stored
    /// and synced its chunks.
    pub async fn put_blob_index(&self, digest: &str, record: &[u8]) -> Result<()> {
        self.put_record(&self.blob_index_key(digest), record).await
    }

    /// The index object of an OCI blob, if one is stored and readable. A damaged one reads as
    /// absent (the blob is then fetched again), with a warning.
    pub async fn get_blob_index(&self, digest: &str) -> Result<Option<Vec<u8>>> {
        let key = self.blob_index_key(digest);
        let Some(raw) = self.store.get_opt(&key).await? else {
            return Ok(None);
        };
        match codec::decode(&key, &raw, MAX_RECORD_LEN, self.key.as_ref()) {
            Ok(record) => Ok(Some(record)),
            Err(e) => {
                tracing::warn!("ignoring blob index of {digest}: {e}");
                Ok(None)
            }
        }
    }

    /// Stores the record of a verification run (sealed like snapshot records) under a name that
    /// sorts by time.
    pub async fn put_verify_record(
        &self,
        time: chrono::DateTime<chrono::Utc>,
        record: &[u8],
    ) -> Result<()> {
        let key = format!("{VERIFY_PREFIX}/{}", time_name(time));
        self.put_record(&key, record).await
    }

    /// Every verification run record, oldest first. Unreadable records are skipped with a
    /// warning: they only feed `verify --status`.
    pub async fn verify_records(&self) -> Result<Vec<Vec<u8>>> {
        let mut keys: Vec<String> = self
            .store
            .list(VERIFY_PREFIX)
            .await?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        keys.sort();
        let mut out = Vec::new();
        for key in keys {
            let raw = self.store.get(&key).await?;
            match codec::decode(&key, &raw, MAX_RECORD_LEN, self.key.as_ref()) {
                Ok(record) => out.push(record),
                Err(e) => tracing::warn!("skipping verification record: {e}"),
            }
        }
        Ok(out)
    }

    /// Reads a snapshot record's bytes, checked against its id.
    ///
    /// # Errors
    /// [`Error::Missing`] or [`Error::Corrupt`] naming the record.
    pub async fn get_snapshot(&self, id: &str) -> Result<Vec<u8>> {
        let key = format!("{SNAPSHOTS_PREFIX}/{id}");
        let raw = self.store.get(&key).await?;
        let record = codec::decode(&key, &raw, MAX_RECORD_LEN, self.key.as_ref())?;
        if self.chunk_id(&record).to_hex() != id {
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

    fn no_secret() -> Result<Secret> {
        panic!("an unencrypted repository asked for a key")
    }

    fn given(secret: Secret) -> OpenOptions<'static> {
        OpenOptions {
            secret: Some(secret),
            ..OpenOptions::default()
        }
    }

    fn key_file(s: &str) -> Secret {
        Secret::KeyFile(zeroize::Zeroizing::new(s.as_bytes().to_vec()))
    }

    #[tokio::test]
    async fn key_slots_open_remove_and_refuse() {
        let store = memory();
        let repo = Repository::init(
            store.clone(),
            InitOptions::default(),
            Some(&key_file("one")),
        )
        .await
        .unwrap();
        let first = repo.key_slot().unwrap().to_string();
        repo.add_key(&key_file("two")).await.unwrap();
        let data = b"encrypted chunk".repeat(10);
        let id = repo.chunk_id(&data);
        assert_ne!(id, ChunkId::of(&data));
        repo.put_chunk(&id, repo.encode_chunk(&id, &data))
            .await
            .unwrap();

        let by_two = Repository::open(store.clone(), given(key_file("two")), no_secret)
            .await
            .unwrap();
        let raw = by_two.get_chunk_raw(&id).await.unwrap();
        assert_eq!(&by_two.decode_chunk(&id, &raw).unwrap()[..], &data[..]);
        assert!(by_two.remove_key(by_two.key_slot().unwrap()).await.is_err());
        by_two.remove_key(&first[..8]).await.unwrap();
        assert!(matches!(
            Repository::open(store.clone(), given(key_file("one")), no_secret).await,
            Err(Error::WrongKey { .. })
        ));
        let two = Repository::open(store, given(key_file("two")), no_secret)
            .await
            .unwrap();
        assert!(two.remove_key(two.key_slot().unwrap()).await.is_err());
    }

    #[tokio::test]
    async fn repositories_of_either_cipher_open_and_read_both() {
        let store = memory();
        let repo = Repository::init(store.clone(), InitOptions::default(), Some(&key_file("k")))
            .await
            .unwrap();
        let first = b"sealed with the preferred cipher".to_vec();
        let first_id = repo.chunk_id(&first);
        repo.put_chunk(&first_id, repo.encode_chunk(&first_id, &first))
            .await
            .unwrap();
        // The same repository as an older build (or a CPU without AES) writes it.
        let mut config = repo.config().clone();
        config.encryption = Some(Cipher::XChaCha20Poly1305.name().into());
        config.sign(repo.key.as_ref().unwrap());
        let json = serde_json::to_vec(&config).unwrap();
        store
            .put(CONFIG_KEY, codec::encode(&json, None, None).into())
            .await
            .unwrap();
        let chacha = Repository::open(store.clone(), given(key_file("k")), no_secret)
            .await
            .unwrap();
        let second = b"sealed with xchacha20".to_vec();
        let second_id = chacha.chunk_id(&second);
        let raw = chacha.encode_chunk(&second_id, &second);
        assert_eq!(raw[6], Cipher::XChaCha20Poly1305.scheme());
        chacha.put_chunk(&second_id, raw).await.unwrap();
        for (id, data) in [(first_id, &first), (second_id, &second)] {
            let raw = chacha.get_chunk_raw(&id).await.unwrap();
            assert_eq!(&chacha.decode_chunk(&id, &raw).unwrap()[..], &data[..]);
        }
    }

    fn memory() -> Store {
        Store::open("memory://", &StoreOptions::default(), true).unwrap()
    }

    #[tokio::test]
    async fn init_refuses_twice_and_open_needs_config() {
        let store = memory();
        assert!(matches!(
            Repository::open(store.clone(), OpenOptions::default(), no_secret).await,
            Err(Error::NotARepository { .. })
        ));
        Repository::init(store.clone(), InitOptions::default(), None)
            .await
            .unwrap();
        assert!(matches!(
            Repository::init(store.clone(), InitOptions::default(), None).await,
            Err(Error::AlreadyInitialized { .. })
        ));
        let repo = Repository::open(store, unencrypted(), no_secret)
            .await
            .unwrap();
        assert_eq!(repo.config().chunker, ChunkerParams::default());
    }

    /// As a host that was told the repository is unencrypted (`--expect-unencrypted`).
    fn unencrypted() -> OpenOptions<'static> {
        OpenOptions {
            expect_unencrypted: true,
            ..OpenOptions::default()
        }
    }

    #[tokio::test]
    async fn a_fresh_host_is_not_talked_out_of_encryption() {
        let store = encrypted().await;
        let repo = Repository::open(store.clone(), given(key_file("k")), no_secret)
            .await
            .unwrap();
        repo.put_snapshot(b"{}").await.unwrap();
        // The store operator strips encryption, the MAC and every key slot.
        edit_config(&store, |c| {
            let c = c.as_object_mut().unwrap();
            c.remove("encryption");
            c.remove("mac");
        })
        .await;
        for (key, _) in store.list(KEYS_PREFIX).await.unwrap() {
            store.delete(&key).await.unwrap();
        }
        // A host with no memory of it, given no secret, does not take the store's word.
        let err = Repository::open(store.clone(), OpenOptions::default(), no_secret)
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::UnencryptedUnconfirmed { .. }) && err.hint().is_some(),
            "{err}"
        );
        // Told it is unencrypted, it still finds the sealed records.
        assert_tampered(
            Repository::open(store, unencrypted(), no_secret).await,
            "is sealed",
        );
    }

    #[tokio::test]
    async fn a_remembered_unencrypted_config_may_not_change() {
        let cache = tempfile::tempdir().unwrap();
        let options = || OpenOptions {
            cache_dir: Some(cache.path()),
            expect_unencrypted: true,
            ..OpenOptions::default()
        };
        let store = memory();
        Repository::init(store.clone(), InitOptions::default(), None)
            .await
            .unwrap();
        Repository::open(store.clone(), options(), no_secret)
            .await
            .unwrap();
        edit_config(&store, |c| c["compression_level"] = serde_json::Value::Null).await;
        assert_tampered(
            Repository::open(store, options(), no_secret).await,
            "changed since this host last opened it",
        );
    }

    #[tokio::test]
    async fn newer_format_is_refused() {
        let store = memory();
        let json = br#"{"version": 99}"#;
        store
            .put("config", codec::encode(json, None, None).into())
            .await
            .unwrap();
        let err = Repository::open(store, OpenOptions::default(), no_secret)
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::UnsupportedFormat { found: 99, .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn chunk_reads_are_checked() {
        let repo = Repository::init(memory(), InitOptions::default(), None)
            .await
            .unwrap();
        let data = b"some chunk".repeat(100);
        let id = repo.chunk_id(&data);
        repo.put_chunk(&id, repo.encode_chunk(&id, &data))
            .await
            .unwrap();
        let raw = repo.get_chunk_raw(&id).await.unwrap();
        assert_eq!(&repo.decode_chunk(&id, &raw).unwrap()[..], &data[..]);

        let other = repo.chunk_id(b"other");
        let err = repo.decode_chunk(&other, &raw).unwrap_err().to_string();
        assert!(err.contains(&other.to_hex()), "{err}");
        // A copy under another prefix's directory is not taken for a stored chunk.
        let misplaced = format!("{CHUNKS_PREFIX}/{:02x}/{}", id.0[0] ^ 1, id.to_hex());
        repo.store().put(&misplaced, raw.clone()).await.unwrap();
        for prefix in [id.0[0], id.0[0] ^ 1] {
            let listed = repo.list_chunk_prefix(prefix).await.unwrap();
            let expected = if prefix == id.0[0] { vec![id] } else { vec![] };
            assert_eq!(listed.iter().map(|c| c.id).collect::<Vec<_>>(), expected);
        }
    }

    #[tokio::test]
    async fn snapshot_records_are_checked() {
        let repo = Repository::init(memory(), InitOptions::default(), None)
            .await
            .unwrap();
        let id = repo.put_snapshot(b"{}").await.unwrap();
        assert_eq!(repo.list_snapshot_ids().await.unwrap(), vec![id.clone()]);
        assert_eq!(repo.get_snapshot(&id).await.unwrap(), b"{}");
        let key = format!("snapshots/{id}");
        repo.store()
            .put(&key, codec::encode(b"[]", None, None).into())
            .await
            .unwrap();
        assert!(repo
            .get_snapshot(&id)
            .await
            .unwrap_err()
            .to_string()
            .contains(&key));
    }

    /// Rewrites the config object as a store operator could.
    async fn edit_config(store: &Store, edit: impl FnOnce(&mut serde_json::Value)) {
        let raw = store.get(CONFIG_KEY).await.unwrap();
        let json = codec::decode(CONFIG_KEY, &raw, MAX_RECORD_LEN, None).unwrap();
        let mut value: serde_json::Value = serde_json::from_slice(&json).unwrap();
        edit(&mut value);
        let json = serde_json::to_vec(&value).unwrap();
        store
            .put(CONFIG_KEY, codec::encode(&json, None, None).into())
            .await
            .unwrap();
    }

    async fn encrypted() -> Store {
        let store = memory();
        Repository::init(store.clone(), InitOptions::default(), Some(&key_file("k")))
            .await
            .unwrap();
        store
    }

    fn assert_tampered(result: Result<Repository>, words: &str) {
        match result {
            Err(e @ Error::Tampered { .. }) => assert!(e.to_string().contains(words), "{e}"),
            other => panic!("expected a refusal naming {words:?}, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn encryption_cannot_be_switched_off_by_editing_config() {
        let store = encrypted().await;
        edit_config(&store, |c| {
            c.as_object_mut().unwrap().remove("encryption");
        })
        .await;
        // With the secret, as the agent and the CLI open it.
        assert_tampered(
            Repository::open(store.clone(), given(key_file("k")), no_secret).await,
            "a password or key file was given",
        );
        // Without: the key slots still say it is encrypted.
        assert_tampered(
            Repository::open(store.clone(), OpenOptions::default(), no_secret).await,
            "1 key slot",
        );
        // Without the MAC as well.
        edit_config(&store, |c| {
            c.as_object_mut().unwrap().remove("mac");
        })
        .await;
        assert_tampered(
            Repository::open(store, OpenOptions::default(), no_secret).await,
            "1 key slot",
        );
    }

    #[tokio::test]
    async fn every_config_field_is_authenticated() {
        let edits: [(&str, serde_json::Value); 5] = [
            ("compression_level", serde_json::json!(19)),
            ("id", serde_json::json!("00112233445566778899aabbccddeeff")),
            ("created", serde_json::json!("2001-01-01T00:00:00Z")),
            (
                "encryption",
                serde_json::json!(Cipher::XChaCha20Poly1305.name()),
            ),
            (
                "chunker",
                serde_json::json!({"min_size": 65536, "avg_size": 131072, "max_size": 1048576}),
            ),
        ];
        for (field, value) in edits {
            let store = encrypted().await;
            edit_config(&store, |c| {
                // Another cipher than the one chosen at init, whichever that was.
                let value = match (field, c[field].as_str()) {
                    ("encryption", Some(n)) if n == value.as_str().unwrap() => {
                        serde_json::json!(Cipher::Aes256Gcm.name())
                    }
                    _ => value,
                };
                c[field] = value;
            })
            .await;
            assert_tampered(
                Repository::open(store, given(key_file("k")), no_secret).await,
                "MAC does not match",
            );
        }
    }

    #[tokio::test]
    async fn the_cache_remembers_each_repository() {
        let cache = tempfile::tempdir().unwrap();
        let options = || OpenOptions {
            secret: Some(key_file("k")),
            cache_dir: Some(cache.path()),
            ..OpenOptions::default()
        };
        let store = encrypted().await;
        Repository::open(store.clone(), options(), no_secret)
            .await
            .unwrap();
        // A MAC removed is refused once the host has seen it.
        edit_config(&store, |c| {
            c.as_object_mut().unwrap().remove("mac");
        })
        .await;
        assert_tampered(
            Repository::open(store.clone(), options(), no_secret).await,
            "changed since this host last opened it",
        );
        // Another repository (a new id) at the same URL, encrypted or not, is refused.
        let other = memory();
        Repository::init(other.clone(), InitOptions::default(), None)
            .await
            .unwrap();
        let json = other.get(CONFIG_KEY).await.unwrap();
        store.put(CONFIG_KEY, json).await.unwrap();
        assert_tampered(
            Repository::open(store, options(), no_secret).await,
            "this host knew it as",
        );
    }

    #[tokio::test]
    async fn a_config_without_mac_is_signed_only_by_the_owners_upgrade() {
        let store = encrypted().await;
        // Stripped and changed: every host refuses it, the one that made it included.
        edit_config(&store, |c| {
            c.as_object_mut().unwrap().remove("mac");
            c["compression_level"] = serde_json::Value::Null;
        })
        .await;
        assert_tampered(
            Repository::open(store.clone(), given(key_file("k")), no_secret).await,
            "has no MAC",
        );
        let upgrade = OpenOptions {
            upgrade_config: true,
            ..given(key_file("k"))
        };
        let repo = Repository::open(store.clone(), upgrade, no_secret)
            .await
            .unwrap();
        assert!(repo.config().mac.is_some());
        assert_eq!(repo.config().compression_level, None, "signed as shown");
        edit_config(&store, |c| c["compression_level"] = serde_json::json!(1)).await;
        assert_tampered(
            Repository::open(store, given(key_file("k")), no_secret).await,
            "MAC does not match",
        );
    }

    #[tokio::test]
    async fn a_repository_id_that_is_no_id_is_refused() {
        let store = memory();
        Repository::init(store.clone(), InitOptions::default(), None)
            .await
            .unwrap();
        edit_config(&store, |c| c["id"] = serde_json::json!("/etc/cron.d")).await;
        let err = Repository::open(store, unencrypted(), no_secret)
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::Corrupt { .. }) && err.to_string().contains("32 hex"),
            "{err}"
        );
    }
}
