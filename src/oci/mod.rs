//! OCI images: backed up from registries, restored byte-identical into another registry or an
//! OCI image layout.
//!
//! # What an image snapshot holds
//! Its root is one CBOR [`ImageRecord`], chunked like any stream. Manifests and indexes are
//! kept as the raw bytes the registry served (never re-serialised), so every digest survives;
//! blobs (configs and layers) are streamed through the chunk pipeline while their sha256 and
//! size are checked, and listed with their chunk refs. Manifests are stored in push order:
//! children before the index that lists them, referrers (cosign `sha256-<digest>.sig/.att/.sbom`
//! tags, OCI 1.1 referrers and the referrers tag-schema index) after their subject.
//!
//! # Blob-level deduplication
//! After a blob is stored, a small sealed object `blobs/<id of its digest>` records its refs.
//! A later backup of any image that contains the same blob finds it there and does not fetch
//! the blob at all; an unchanged image costs only its manifest requests. Blob objects are
//! written after their chunks are stored and before the snapshot record.

mod backup;
pub mod locations;
pub mod reference;
pub mod registry;
mod restore;
mod source;
pub mod tags;

use std::sync::Arc;

/// Blobs moved at once between tresor and one registry, in a backup or a restore: enough to
/// overlap round trips and the registry's hashing, few enough to be a polite client.
const BLOB_CONCURRENCY: usize = 4;

use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;

pub use backup::{backup, ImageBackupOptions};
pub use reference::{ImageSource, ImageTarget};
pub use restore::{restore, ManifestCheck, RestoreReport};
pub use tags::{TagPolicy, TagSelector};

use crate::error::{Error, Result};
use crate::id::ChunkRef;
use crate::pipeline::StreamReader;
use crate::repository::Repository;
use crate::snapshot::Listed;

/// How a manifest relates to the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The manifest or index the reference points at.
    Image,
    /// A platform manifest listed by the image index.
    Child,
    /// A signature, attestation, SBOM or other artifact about another manifest.
    Referrer,
}

/// A manifest or index, byte for byte.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoredManifest {
    pub digest: String,
    pub media_type: String,
    #[serde(with = "serde_bytes")]
    pub raw: Vec<u8>,
    pub role: Role,
    /// Tags that pointed at it in the source (the image tag, cosign tags).
    #[serde(default)]
    pub tags: Vec<String>,
}

/// A config or layer blob.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoredBlob {
    pub digest: String,
    pub size: u64,
    pub refs: Vec<ChunkRef>,
}

/// The root of an image snapshot.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageRecord {
    /// `registry/repository`.
    pub repository: String,
    pub tag: Option<String>,
    /// Digest of the image manifest or index.
    pub digest: String,
    /// `os/arch[/variant]` of each platform manifest kept.
    pub platforms: Vec<String>,
    /// In push order; see the module docs.
    pub manifests: Vec<StoredManifest>,
    pub blobs: Vec<StoredBlob>,
}

/// The stored blob index object (`blobs/<id>`).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct BlobIndex {
    digest: String,
    size: u64,
    refs: Vec<ChunkRef>,
}

/// The largest image record read: a record is decoded whole, and its size is the store's say.
/// Every manifest of a large multi-platform index with its blob refs is well below it.
const MAX_RECORD_LEN: u64 = 64 << 20;

/// Reads the record of an image snapshot. Blocking.
///
/// # Errors
/// Chunk errors, or [`Error::Corrupt`] if the record does not decode.
pub fn load_record(repo: &Arc<Repository>, rt: &Handle, snap: &Listed) -> Result<ImageRecord> {
    let stream = snap.root_stream(repo, rt, MAX_RECORD_LEN)?;
    ciborium::from_reader(stream).map_err(|e| match e {
        ciborium::de::Error::Io(io) => crate::pipeline::from_io(io),
        other => Error::Corrupt {
            object: format!("image record of snapshot {}", snap.id),
            reason: other.to_string(),
        },
    })
}

/// Calls `f` with every blob chunk ref of an image snapshot and the blob's digest. Blocking.
pub fn walk_refs(
    repo: &Arc<Repository>,
    rt: &Handle,
    snap: &Listed,
    mut f: impl FnMut(&[u8], &ChunkRef) -> Result<()>,
) -> Result<()> {
    let record = load_record(repo, rt, snap)?;
    for blob in &record.blobs {
        for r in &blob.refs {
            f(blob.digest.as_bytes(), r)?;
        }
    }
    Ok(())
}

/// The sha256 digest of a stored blob, read in order from its chunks (a few fetched ahead, each
/// checked against its id on the way). `progress` counts the bytes. Blocking.
///
/// # Errors
/// The first chunk that cannot be read, with its error.
pub fn blob_digest(
    repo: &Arc<Repository>,
    rt: &Handle,
    blob: &StoredBlob,
    progress: &crate::progress::Progress,
) -> std::result::Result<String, (crate::id::ChunkId, Box<Error>)> {
    use sha2::Digest;
    let mut sha = sha2::Sha256::new();
    let mut refs = blob.refs.iter().copied();
    let mut ahead = std::collections::VecDeque::new();
    loop {
        while ahead.len() < 8 {
            let Some(r) = refs.next() else { break };
            ahead.push_back((r, crate::pipeline::fetch(repo, rt, r)));
        }
        let Some((r, handle)) = ahead.pop_front() else {
            return Ok(format!("sha256:{}", hex::encode(sha.finalize())));
        };
        let bytes = rt
            .block_on(handle)
            .expect("fetch task panicked")
            .map_err(|e| (r.id, Box::new(e)))?;
        progress.inc(bytes.len() as u64);
        sha.update(&bytes);
    }
}

/// Writes a stored blob to `out` from its (verified) chunks and returns its sha256 digest.
/// `out_path` names `out` in errors. Blocking.
pub(crate) fn copy_blob(
    repo: &Arc<Repository>,
    rt: &Handle,
    blob: &StoredBlob,
    out: &mut impl std::io::Write,
    out_path: &std::path::Path,
) -> Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut reader = StreamReader::new(Arc::clone(repo), rt.clone(), blob.refs.clone(), 8);
    let mut sha = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf).map_err(crate::pipeline::from_io)?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| Error::io(out_path, e))?;
    }
    Ok(format!("sha256:{}", hex::encode(sha.finalize())))
}

/// Media type of a manifest from its JSON: `mediaType`, or guessed from its shape.
pub(crate) fn media_type_of(raw: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(raw).unwrap_or_default();
    match v.get("mediaType").and_then(|m| m.as_str()) {
        Some(m) => m.to_string(),
        None if v.get("manifests").is_some() => "application/vnd.oci.image.index.v1+json".into(),
        None => "application/vnd.oci.image.manifest.v1+json".into(),
    }
}

/// Whether a media type is an index (several manifests).
pub(crate) fn is_index(media_type: &str) -> bool {
    media_type.contains("index") || media_type.contains("manifest.list")
}

/// Checks that a digest is `sha256:` and 64 hex digits, so it is safe as a file name.
pub fn check_digest(digest: &str) -> Result<&str> {
    let hex = digest.strip_prefix("sha256:").unwrap_or("");
    if hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        Ok(hex)
    } else {
        Err(Error::UnsafePath {
            path: digest.to_string(),
            reason: "not a sha256 digest",
        })
    }
}
