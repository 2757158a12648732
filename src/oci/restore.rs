//! Restoring image snapshots into a registry or an OCI image layout.
//!
//! Order matters to registries and to anyone pulling while a restore runs: blobs first (those
//! the target has are skipped), then manifests by digest in stored order (children before
//! their index, referrers after their subject), tags last. Every manifest is checked against
//! its digest before it is pushed, and pulled back afterwards to prove the target serves the
//! same bytes.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use oci_client::Reference;
use serde::Serialize;
use tokio::runtime::Handle;

use super::registry::{sha256_digest, Registry};
use super::{
    check_digest, load_record, ImageRecord, ImageTarget, Role, StoredBlob, BLOB_CONCURRENCY,
};
use crate::error::{Error, Result};
use crate::localfile::{replace_with, write_atomically, SHARED};
use crate::pipeline;
use crate::progress::Progress;
use crate::repository::Repository;
use crate::snapshot::Listed;

/// One manifest of a restore and whether the target serves it under the source digest.
#[derive(Clone, Debug, Serialize)]
pub struct ManifestCheck {
    pub digest: String,
    pub media_type: String,
    pub role: Role,
    pub tags: Vec<String>,
    pub matched: bool,
}

/// What an image restore did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RestoreReport {
    pub snapshot: String,
    pub target: String,
    pub blobs_pushed: u64,
    /// Blobs the target already had.
    pub blobs_skipped: u64,
    /// Blobs linked from the source repository on the same registry (no upload).
    pub blobs_mounted: u64,
    pub bytes_pushed: u64,
    pub manifests: Vec<ManifestCheck>,
    /// Whether every manifest matched.
    pub ok: bool,
    pub duration_ms: u64,
}

/// Restores an image snapshot to `target`. Blocking.
///
/// # Errors
/// [`Error::Corrupt`] for stored data that fails its hash or digest, registry and I/O errors.
pub fn restore(
    repo: &Arc<Repository>,
    rt: &Handle,
    registry: &Registry,
    snap: &Listed,
    target: &ImageTarget,
    progress: &Progress,
) -> Result<RestoreReport> {
    let started = Instant::now();
    let record = load_record(repo, rt, snap)?;
    for m in &record.manifests {
        check_digest(&m.digest)?;
        if sha256_digest(&m.raw) != m.digest {
            return Err(Error::Corrupt {
                object: format!("manifest {} in snapshot {}", m.digest, snap.id),
                reason: "stored bytes do not hash to the digest".into(),
            });
        }
    }
    for b in &record.blobs {
        check_digest(&b.digest)?;
    }
    let mut report = RestoreReport {
        snapshot: snap.id.clone(),
        ..RestoreReport::default()
    };
    match target {
        ImageTarget::Registry { reference, tag } => {
            report.target = format!(
                "docker://{}/{}",
                reference.registry(),
                reference.repository()
            );
            let pushed = to_registry(
                repo,
                rt,
                registry,
                &record,
                reference,
                tag.as_deref(),
                progress,
                &mut report,
            );
            registry.save_locations();
            pushed?
        }
        ImageTarget::Layout { dir, tag } => {
            report.target = format!("oci:{}", dir.display());
            to_layout(
                repo,
                rt,
                &record,
                dir,
                tag.as_deref(),
                progress,
                &mut report,
            )?
        }
    }
    report.ok = report.manifests.iter().all(|m| m.matched);
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// The tags to push a manifest under: the image's own tag is replaced by the target tag.
fn tags_for(
    record: &ImageRecord,
    m: &super::StoredManifest,
    target_tag: Option<&str>,
) -> Vec<String> {
    if m.role == Role::Image {
        match target_tag.or(record.tag.as_deref()) {
            Some(t) => vec![t.to_string()],
            None => Vec::new(),
        }
    } else {
        m.tags.clone()
    }
}

#[allow(clippy::too_many_arguments)]
fn to_registry(
    repo: &Arc<Repository>,
    rt: &Handle,
    registry: &Registry,
    record: &ImageRecord,
    target: &Reference,
    tag: Option<&str>,
    progress: &Progress,
    report: &mut RestoreReport,
) -> Result<()> {
    let at = |digest: &str| {
        Reference::with_digest(
            target.registry().into(),
            target.repository().into(),
            digest.into(),
        )
    };
    // On the registry the image came from, the source repository is the first place to mount
    // a blob from; then the repositories tresor saw holding it there before.
    let source_repository = record
        .repository
        .split_once('/')
        .filter(|(host, repository)| {
            *host == target.registry() && *repository != target.repository()
        })
        .map(|(_, repository)| repository);
    let mount_candidates = |digest: &str| {
        let mut from: Vec<String> = source_repository.map(str::to_string).into_iter().collect();
        for known in registry
            .locations
            .candidates(target.registry(), digest, target.repository())
        {
            if !from.contains(&known) {
                from.push(known);
            }
        }
        from.truncate(MOUNT_TRIES);
        from
    };
    let mounted = |r: &Reference, digest: &str| {
        let (r, digest, from) = (r.clone(), digest.to_string(), mount_candidates(digest));
        async move {
            for repository in &from {
                if registry.mount_blob(&r, &digest, repository).await {
                    return true;
                }
            }
            false
        }
    };
    // Blobs go up a few at a time; the first failure drops the uploads still running.
    let (at, mounted) = (&at, &mounted);
    let placed: Vec<(u64, Placed)> = rt.block_on(
        futures::stream::iter(&record.blobs)
            .map(|blob| async move {
                let r = at(&blob.digest);
                let placed = if registry.has_blob(&r, &blob.digest).await? {
                    Placed::Skipped
                } else if mounted(&r, &blob.digest).await {
                    Placed::Mounted
                } else {
                    let (repo, rt, refs) = (Arc::clone(repo), rt.clone(), blob.refs.clone());
                    let make = move || chunk_stream(Arc::clone(&repo), rt.clone(), refs.clone());
                    registry
                        .push_blob(&r, &blob.digest, blob.size, make)
                        .await
                        .map_err(|e| e.context(format!("pushing blob {}", blob.digest)))?;
                    Placed::Pushed
                };
                progress.inc(blob.size);
                Ok::<_, Error>((blob.size, placed))
            })
            .buffer_unordered(BLOB_CONCURRENCY)
            .try_collect(),
    )?;
    for (size, how) in placed {
        match how {
            Placed::Skipped => report.blobs_skipped += 1,
            Placed::Mounted => report.blobs_mounted += 1,
            Placed::Pushed => {
                report.blobs_pushed += 1;
                report.bytes_pushed += size;
            }
        }
    }
    for m in &record.manifests {
        let raw = Bytes::from(m.raw.clone());
        rt.block_on(registry.push_manifest(&at(&m.digest), &raw, &m.media_type))?;
    }
    for m in &record.manifests {
        let raw = Bytes::from(m.raw.clone());
        for t in tags_for(record, m, tag) {
            let tagged =
                Reference::with_tag(target.registry().into(), target.repository().into(), t);
            rt.block_on(registry.push_manifest(&tagged, &raw, &m.media_type))?;
        }
    }
    for m in &record.manifests {
        let matched = match rt.block_on(registry.manifest(&at(&m.digest))) {
            Ok((back, digest)) => digest == m.digest && back[..] == m.raw[..],
            Err(e) => {
                tracing::warn!("checking {} on the target: {e}", m.digest);
                false
            }
        };
        report.manifests.push(ManifestCheck {
            digest: m.digest.clone(),
            media_type: m.media_type.clone(),
            role: m.role,
            tags: tags_for(record, m, tag),
            matched,
        });
    }
    Ok(())
}

/// Repositories a blob is asked to be mounted from before it is uploaded.
const MOUNT_TRIES: usize = 3;

/// What became of one blob on the target registry.
enum Placed {
    /// The target had it.
    Skipped,
    /// Linked from another repository of the registry.
    Mounted,
    /// Uploaded.
    Pushed,
}

/// A blob's chunks as a byte stream for upload, fetched (and verified) a few ahead.
fn chunk_stream(
    repo: Arc<Repository>,
    rt: Handle,
    refs: Vec<crate::id::ChunkRef>,
) -> impl futures::Stream<Item = Result<Bytes>> + Send + 'static {
    futures::stream::iter(refs)
        .map(move |r| pipeline::fetch(&repo, &rt, r))
        .buffered(4)
        .map(|joined| joined.expect("fetch task panicked"))
}

fn to_layout(
    repo: &Arc<Repository>,
    rt: &Handle,
    record: &ImageRecord,
    dir: &Path,
    tag: Option<&str>,
    progress: &Progress,
    report: &mut RestoreReport,
) -> Result<()> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(|e| Error::io(&blobs, e))?;
    let layout_file = dir.join("oci-layout");
    if !layout_file.exists() {
        write_atomically(&layout_file, SHARED, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    }
    for blob in &record.blobs {
        let path = blobs.join(check_digest(&blob.digest)?);
        // A blob already in the layout is kept only when its bytes have the digest: a file of
        // the right size is not proof (a truncated copy, or one planted by another user).
        if holds_blob(&path, blob.size, &blob.digest) {
            report.blobs_skipped += 1;
        } else {
            write_blob(repo, rt, blob, &path)?;
            report.blobs_pushed += 1;
            report.bytes_pushed += blob.size;
        }
        progress.inc(blob.size);
    }
    for m in &record.manifests {
        let path = blobs.join(check_digest(&m.digest)?);
        write_atomically(&path, SHARED, &m.raw)?;
    }
    // index.json: keep what is there, replace entries of the same name.
    let index_path = dir.join("index.json");
    let mut index: serde_json::Value = match std::fs::read(&index_path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| Error::Corrupt {
            object: index_path.display().to_string(),
            reason: e.to_string(),
        })?,
        Err(_) => serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [],
        }),
    };
    let entries = index["manifests"]
        .as_array_mut()
        .ok_or_else(|| Error::Corrupt {
            object: index_path.display().to_string(),
            reason: "no manifests array".into(),
        })?;
    for m in &record.manifests {
        let names = tags_for(record, m, tag);
        if m.role == Role::Child {
            continue;
        }
        let mut descriptor = serde_json::json!({
            "mediaType": m.media_type,
            "digest": m.digest,
            "size": m.raw.len(),
        });
        if let Some(name) = names.first() {
            descriptor["annotations"] =
                serde_json::json!({ "org.opencontainers.image.ref.name": name });
            entries.retain(|e| {
                e["annotations"]["org.opencontainers.image.ref.name"].as_str() != Some(name)
            });
        } else {
            entries.retain(|e| e["digest"].as_str() != Some(&m.digest));
        }
        entries.push(descriptor);
    }
    let text = serde_json::to_vec_pretty(&index).expect("index serialises");
    write_atomically(&index_path, SHARED, &text)?;
    for m in &record.manifests {
        let on_disk = std::fs::read(blobs.join(check_digest(&m.digest)?)).unwrap_or_default();
        report.manifests.push(ManifestCheck {
            digest: m.digest.clone(),
            media_type: m.media_type.clone(),
            role: m.role,
            tags: tags_for(record, m, tag),
            matched: sha256_digest(&on_disk) == m.digest,
        });
    }
    Ok(())
}

/// Writes a blob from its chunks, checking its sha256 before renaming it into place.
fn write_blob(repo: &Arc<Repository>, rt: &Handle, blob: &StoredBlob, path: &Path) -> Result<()> {
    replace_with(path, SHARED, |out| {
        let actual = super::copy_blob(repo, rt, blob, out, path)?;
        if actual != blob.digest {
            return Err(Error::Corrupt {
                object: format!("blob {}", blob.digest),
                reason: format!("its chunks assemble to {actual}"),
            });
        }
        out.sync_all().map_err(|e| Error::io(path, e))
    })
}

/// Whether the regular file at `path` (not a symlink) has `size` bytes hashing to `digest`.
fn holds_blob(path: &Path, size: u64, digest: &str) -> bool {
    use sha2::Digest;
    let Ok(mut file) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    else {
        return false;
    };
    if !file
        .metadata()
        .is_ok_and(|m| m.is_file() && m.len() == size)
    {
        return false;
    }
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher).is_ok()
        && format!("sha256:{}", hex::encode(hasher.finalize())) == digest
}
