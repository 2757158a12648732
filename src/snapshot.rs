//! Snapshot records: what was backed up, when, from where, and the root of its data.
//!
//! A record is JSON, immutable, and named by the BLAKE3 of its bytes. It is written last, after
//! every chunk it references is stored and synced (see [`crate::repository`]). Its `root` is a
//! ref list: for a tree, the chunks of its catalog ([`crate::catalog`]); for a block image,
//! the chunks of its binary ref list (36 bytes per data chunk, [`ChunkRef::encode`]).
//!
//! A snapshot is named on the command line by its id, a unique prefix of it (at least 4 hex
//! digits), or a volume name meaning the newest snapshot of that name.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::ChunkRef;
use crate::pipeline::{StreamReader, WriteSummary};
use crate::repository::Repository;
use crate::volume::payload::Payload;

/// Record format version.
pub const RECORD_VERSION: u32 = 1;

/// What a snapshot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Volume,
    Image,
    /// A compose workload: its record names the image and volume snapshots it is made of.
    Workload,
}

/// How the root ref list is to be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RootFormat {
    /// A catalog stream of tree entries.
    Tree,
    /// A binary list of data chunk refs making up one byte stream.
    Block,
    /// An OCI image record ([`crate::oci::ImageRecord`]).
    Image,
    /// A workload record ([`crate::workload::WorkloadRecord`]).
    Workload,
}

/// What an image snapshot shows in listings.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageInfo {
    /// Digest of the image manifest or index.
    pub digest: String,
    /// `os/arch[/variant]` of each platform kept.
    pub platforms: Vec<String>,
    pub manifests: u64,
    pub blobs: u64,
    /// Referrers kept (signatures, attestations, SBOMs).
    pub referrers: u64,
}

/// Sizes and counts of a backup run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Summary {
    /// Bytes of file or image data the snapshot describes.
    pub logical_bytes: u64,
    pub files: u64,
    pub dirs: u64,
    pub other_entries: u64,
    /// Files whose content was read (unchanged files are taken from the parent snapshot).
    pub files_read: u64,
    pub bytes_read: u64,
    pub errors: u64,
    pub duration_ms: u64,
    /// Chunk counts and sizes: new, deduplicated, all-zero.
    pub chunks: WriteSummary,
}

/// A snapshot record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub version: u32,
    pub kind: Kind,
    /// Volume name (or image reference).
    pub name: String,
    /// Where it came from: an absolute path, a device, a registry reference.
    pub source: String,
    pub host: String,
    pub time: DateTime<Utc>,
    pub tags: Vec<String>,
    /// Some entries could not be read and are missing.
    pub partial: bool,
    pub root_format: RootFormat,
    pub root: Vec<ChunkRef>,
    /// Format 2 trees: where small files keep their bytes ([`crate::volume::payload`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Payload>,
    /// The snapshot used to detect unchanged files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub summary: Summary,
    /// Image details, for image snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageInfo>,
    /// The first problems met (unreadable files), for the report.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// A record with its id.
#[derive(Clone, Debug, Serialize)]
pub struct Listed {
    pub id: String,
    #[serde(flatten)]
    pub snapshot: Snapshot,
}

impl Listed {
    /// Its root (a catalog, a ref list or a record) as a stream whose refs were checked
    /// ([`StreamReader::index`]): at most `max_len` bytes. Blocking reads.
    ///
    /// # Errors
    /// [`Error::Corrupt`] naming the snapshot.
    pub fn root_stream(
        &self,
        repo: &Arc<Repository>,
        rt: &tokio::runtime::Handle,
        max_len: u64,
    ) -> Result<StreamReader> {
        StreamReader::index(
            Arc::clone(repo),
            rt.clone(),
            &self.snapshot.root,
            &format!("snapshot {}", self.id),
            max_len,
        )
    }
}

impl Snapshot {
    /// The chunks of its index: the catalog or ref list `root`, and a payload's ref lists.
    pub fn index_refs(&self) -> impl Iterator<Item = &ChunkRef> {
        let payload = self
            .payload
            .iter()
            .flat_map(|p| p.fresh.iter().chain(&p.reused));
        self.root.iter().chain(payload)
    }

    /// Stores the record. Everything it references must be stored and synced already.
    pub async fn save(&self, repo: &Repository) -> Result<String> {
        let json = serde_json::to_vec(self).expect("snapshot serialises");
        repo.put_snapshot(&json).await
    }

    /// Loads and parses one record.
    ///
    /// # Errors
    /// [`Error::Corrupt`] naming the record when it does not parse.
    pub async fn load(repo: &Repository, id: &str) -> Result<Snapshot> {
        let bytes = repo.get_snapshot(id).await?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
            object: format!("snapshots/{id}"),
            reason: format!("record does not parse: {e}"),
        })
    }
}

/// Which snapshots to list.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub kind: Option<Kind>,
    pub name: Option<String>,
    pub host: Option<String>,
}

impl Filter {
    pub fn matches(&self, s: &Snapshot) -> bool {
        self.kind.is_none_or(|k| k == s.kind)
            && self.name.as_ref().is_none_or(|n| *n == s.name)
            && self.host.as_ref().is_none_or(|h| *h == s.host)
    }
}

/// Every snapshot record with its id, each loaded (16 at a time) or with the error that
/// stopped it, in no particular order.
pub async fn load_all(repo: &Arc<Repository>) -> Result<Vec<(String, Result<Snapshot>)>> {
    let ids = repo.list_snapshot_ids().await?;
    Ok(futures::stream::iter(ids)
        .map(|id| {
            let repo = Arc::clone(repo);
            async move {
                let s = Snapshot::load(&repo, &id).await;
                (id, s)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await)
}

/// Every snapshot matching `filter`, oldest first. Records that cannot be read are reported by
/// a warning and left out, so one damaged record does not hide the others.
pub async fn list(repo: &Arc<Repository>, filter: &Filter) -> Result<Vec<Listed>> {
    let loaded = load_all(repo).await?;
    let mut out = Vec::new();
    for (id, s) in loaded {
        match s {
            Ok(snapshot) if filter.matches(&snapshot) => out.push(Listed { id, snapshot }),
            Ok(_) => {}
            Err(e @ (Error::Corrupt { .. } | Error::Missing { .. })) => {
                tracing::warn!("skipping snapshot {id}: {e}")
            }
            Err(e) => return Err(e),
        }
    }
    out.sort_by(|a, b| (a.snapshot.time, &a.id).cmp(&(b.snapshot.time, &b.id)));
    Ok(out)
}

/// The one id of `ids` that `reference` names: a unique prefix of 4 or more hex digits, in
/// either case. `None` when it is no such prefix or matches nothing (it may be a name).
///
/// # Errors
/// [`Error::AmbiguousSnapshot`] when it matches several.
pub fn match_id<'a>(
    ids: impl IntoIterator<Item = &'a str>,
    reference: &str,
) -> Result<Option<&'a str>> {
    if reference.len() < 4 || !reference.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(None);
    }
    let lower = reference.to_ascii_lowercase();
    let matching: Vec<&str> = ids
        .into_iter()
        .filter(|id| id.starts_with(&lower))
        .collect();
    match matching.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one)),
        many => Err(Error::AmbiguousSnapshot {
            reference: reference.into(),
            matches: many.iter().map(|m| &m[..12]).collect::<Vec<_>>().join(", "),
        }),
    }
}

/// The snapshot `reference` names: an id or unique id prefix ([`match_id`]), else a name
/// (`docker://` optional for images) meaning its newest snapshot, of `kind` when given. The
/// one lookup every command uses.
///
/// # Errors
/// [`Error::SnapshotNotFound`], [`Error::AmbiguousSnapshot`], or the store's.
pub async fn resolve(
    repo: &Arc<Repository>,
    reference: &str,
    kind: Option<Kind>,
) -> Result<Listed> {
    let ids = repo.list_snapshot_ids().await?;
    if let Some(id) = match_id(ids.iter().map(String::as_str), reference)? {
        let snapshot = Snapshot::load(repo, id).await?;
        if let Some(wanted) = kind.filter(|k| *k != snapshot.kind) {
            // Bad input, not damage: the operator named a snapshot of another kind.
            let word = |k: Kind| match k {
                Kind::Image => "an image".to_string(),
                other => format!("a {}", format!("{other:?}").to_lowercase()),
            };
            return Err(Error::Config(format!(
                "snapshot {} is {} snapshot, not {} one (`tresor snapshots` shows each kind)",
                &id[..8.min(id.len())],
                word(snapshot.kind),
                word(wanted)
            )));
        }
        return Ok(Listed {
            id: id.to_string(),
            snapshot,
        });
    }
    let name = reference.strip_prefix("docker://").unwrap_or(reference);
    let filter = Filter {
        kind,
        name: Some(name.to_string()),
        host: None,
    };
    list(repo, &filter)
        .await?
        .pop()
        .ok_or_else(|| Error::SnapshotNotFound(reference.to_string()))
}

/// The newest snapshot of `kind` with this name, from `host` or from any host, if any.
pub async fn latest(
    repo: &Arc<Repository>,
    kind: Kind,
    name: &str,
    host: Option<&str>,
) -> Result<Option<Listed>> {
    let filter = Filter {
        kind: Some(kind),
        name: Some(name.to_string()),
        host: host.map(str::to_string),
    };
    Ok(list(repo, &filter).await?.pop())
}
