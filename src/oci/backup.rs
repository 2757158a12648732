//! Backing up images from a registry or an OCI image layout.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use std::io::Read;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::runtime::Handle;

use super::registry::Registry;
use super::source::{By, Source};
use super::BLOB_CONCURRENCY;
use super::{
    check_digest, is_index, media_type_of, BlobIndex, ImageRecord, ImageSource, Role, StoredBlob,
    StoredManifest,
};
use crate::chunker::Mode;
use crate::error::{Error, Result};
use crate::gc::Session;
use crate::id::ChunkRef;
use crate::pipeline::{ChunkWriter, StreamWriter, DEFAULT_IN_FLIGHT};
use crate::progress::Progress;
use crate::repository::Repository;
use crate::snapshot::{ImageInfo, Kind, Listed, RootFormat, Snapshot, Summary, RECORD_VERSION};

/// What to back up.
#[derive(Clone, Debug)]
pub struct ImageBackupOptions {
    pub source: ImageSource,
    /// For a whole repository: the tags to take.
    pub tag_policy: super::TagSelector,
    /// Platforms (`os/arch[/variant]`) to keep from an index; empty keeps all.
    pub platforms: Vec<String>,
    pub host: String,
    /// Tags of the snapshots.
    pub tags: Vec<String>,
    /// The snapshot's name, instead of the reference shown (an image exported from the engine
    /// into a temporary layout is named by its engine reference).
    pub name: Option<String>,
}

/// Backs up every image the source names within backup `session`: one snapshot per image
/// reference. Each result says which reference it is for; one failing image does not stop the
/// others. Blocking. The caller ends the session ([`Session::finish`]).
///
/// # Errors
/// Only when the source cannot be enumerated (tags cannot be listed).
pub fn backup(
    session: &Arc<Session>,
    rt: &Handle,
    registry: &Registry,
    options: &ImageBackupOptions,
    progress: &Progress,
) -> Result<Vec<(String, Result<Listed>)>> {
    let (source, selector): (Source, Option<(By, String)>) = match &options.source {
        ImageSource::Registry {
            reference,
            whole_repository,
        } => {
            let source = Source::Registry {
                registry,
                base: reference.clone(),
            };
            let one = (!whole_repository).then(|| match (reference.digest(), reference.tag()) {
                (Some(d), _) => (By::Digest(d), reference.whole()),
                (None, t) => (By::Tag(t.unwrap_or("latest")), reference.whole()),
            });
            (source, one)
        }
        ImageSource::Layout { dir, tag } => {
            let source = Source::Layout { dir: dir.clone() };
            let one = tag
                .as_deref()
                .map(|t| (By::Tag(t), format!("oci:{}:{t}", dir.display())));
            (source, one)
        }
    };
    let names: Vec<(String, String)> = match selector {
        Some((By::Digest(d), shown)) => vec![(format!("@{d}"), shown)],
        Some((By::Tag(t), shown)) => vec![(t.to_string(), shown)],
        None => options
            .tag_policy
            .select(
                source
                    .tags(rt)?
                    .into_iter()
                    .filter(|t| !t.starts_with("sha256-"))
                    .collect(),
            )
            .into_iter()
            .map(|t| {
                let shown = format!("{}:{t}", source.repository());
                (t, shown)
            })
            .collect(),
    };
    let mut out = Vec::new();
    for (name, shown) in names {
        let by = match name.strip_prefix('@') {
            Some(d) => By::Digest(d),
            None => By::Tag(&name),
        };
        let result = backup_one(session, rt, &source, by, &shown, options, progress);
        if let Err(e) = &result {
            tracing::warn!("image {shown}: {e}");
        }
        out.push((shown, result));
    }
    registry.save_locations();
    Ok(out)
}

#[derive(Deserialize)]
struct Descriptor {
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    os: String,
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

impl Platform {
    fn name(&self) -> String {
        match &self.variant {
            Some(v) => format!("{}/{}/{v}", self.os, self.architecture),
            None => format!("{}/{}", self.os, self.architecture),
        }
    }
}

#[derive(Deserialize)]
struct ManifestJson {
    #[serde(default)]
    manifests: Vec<Descriptor>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    blobs: Vec<Descriptor>,
}

struct Run<'a> {
    repo: &'a Arc<Repository>,
    rt: &'a Handle,
    source: &'a Source<'a>,
    writer: ChunkWriter,
    platforms: &'a [String],
    progress: &'a Progress,
    manifests: Vec<StoredManifest>,
    blobs: Vec<StoredBlob>,
    seen_blobs: HashSet<String>,
    new_indexes: Vec<BlobIndex>,
    kept_platforms: Vec<String>,
    summary: Summary,
}

#[allow(clippy::too_many_arguments)]
fn backup_one(
    session: &Arc<Session>,
    rt: &Handle,
    source: &Source,
    by: By,
    shown: &str,
    options: &ImageBackupOptions,
    progress: &Progress,
) -> Result<Listed> {
    let started = Instant::now();
    let repo = session.repo();
    let mut run = Run {
        repo,
        rt,
        source,
        writer: ChunkWriter::new(Arc::clone(session), rt.clone(), DEFAULT_IN_FLIGHT),
        platforms: &options.platforms,
        progress,
        manifests: Vec::new(),
        blobs: Vec::new(),
        seen_blobs: HashSet::new(),
        new_indexes: Vec::new(),
        kept_platforms: Vec::new(),
        summary: Summary::default(),
    };
    let tag = match by {
        By::Tag(t) => Some(t.to_string()),
        By::Digest(_) => None,
    };
    let (raw, digest) = source.manifest(rt, by)?;
    run.visit(
        raw,
        digest.clone(),
        Role::Image,
        tag.iter().cloned().collect(),
    )?;
    run.referrers()?;

    // Chunks, then blob indexes, then the record's own chunks, then the snapshot.
    run.writer.flush()?;
    rt.block_on(repo.sync())?;
    for index in &run.new_indexes {
        let json = serde_json::to_vec(index).expect("blob index serialises");
        rt.block_on(repo.put_blob_index(&index.digest, &json))?;
    }
    let record = ImageRecord {
        repository: source.repository(),
        tag: tag.clone(),
        digest: digest.clone(),
        platforms: run.kept_platforms.clone(),
        manifests: std::mem::take(&mut run.manifests),
        blobs: std::mem::take(&mut run.blobs),
    };
    let mut stream = StreamWriter::new(&run.writer, Mode::ContentDefined);
    ciborium::into_writer(&record, &mut stream).map_err(|e| match e {
        ciborium::ser::Error::Io(io) => crate::pipeline::from_io(io),
        other => Error::Config(format!("cannot encode image record: {other}")),
    })?;
    let (root, _) = stream.finish()?;
    run.writer.flush()?;
    rt.block_on(repo.sync())?;

    let mut summary = run.summary;
    summary.logical_bytes = record.blobs.iter().map(|b| b.size).sum::<u64>()
        + record
            .manifests
            .iter()
            .map(|m| m.raw.len() as u64)
            .sum::<u64>();
    summary.files = record.blobs.len() as u64;
    summary.chunks = run.writer.stats().summary();
    summary.duration_ms = started.elapsed().as_millis() as u64;
    let snapshot = Snapshot {
        version: RECORD_VERSION,
        kind: Kind::Image,
        name: options.name.clone().unwrap_or_else(|| shown.to_string()),
        source: match source {
            Source::Registry { .. } => format!("docker://{shown}"),
            Source::Layout { .. } => shown.to_string(),
        },
        host: options.host.clone(),
        time: chrono::Utc::now(),
        tags: options.tags.clone(),
        partial: false,
        root_format: RootFormat::Image,
        root,
        payload: None,
        parent: None,
        summary,
        image: Some(ImageInfo {
            digest: record.digest.clone(),
            platforms: record.platforms.clone(),
            manifests: record.manifests.len() as u64,
            blobs: record.blobs.len() as u64,
            referrers: record
                .manifests
                .iter()
                .filter(|m| m.role == Role::Referrer)
                .count() as u64,
        }),
        errors: Vec::new(),
    };
    session.check_lease()?;
    let id = rt.block_on(snapshot.save(repo))?;
    Ok(Listed { id, snapshot })
}

impl Run<'_> {
    fn mismatch(&self, digest: &str, reason: String) -> Error {
        Error::DigestMismatch {
            repository: self.source.repository(),
            digest: digest.to_string(),
            reason,
        }
    }

    /// Stores a manifest and everything below it; children and blobs first.
    fn visit(&mut self, raw: Vec<u8>, digest: String, role: Role, tags: Vec<String>) -> Result<()> {
        if let Some(m) = self.manifests.iter_mut().find(|m| m.digest == digest) {
            m.tags.extend(tags);
            return Ok(());
        }
        let media_type = media_type_of(&raw);
        let parsed: ManifestJson = serde_json::from_slice(&raw)
            .map_err(|e| self.mismatch(&digest, format!("the manifest is not valid JSON: {e}")))?;
        if is_index(&media_type) {
            for child in &parsed.manifests {
                let platform = child.platform.as_ref().map(Platform::name);
                if role == Role::Image && !self.platforms.is_empty() {
                    if let Some(p) = &platform {
                        let wanted = self
                            .platforms
                            .iter()
                            .any(|w| p == w || p.starts_with(&format!("{w}/")));
                        if !wanted {
                            continue;
                        }
                    }
                }
                check_digest(&child.digest)?;
                let (child_raw, child_digest) =
                    self.source.manifest(self.rt, By::Digest(&child.digest))?;
                if role == Role::Image {
                    if let Some(p) = platform {
                        self.kept_platforms.push(p);
                    }
                }
                let child_role = if role == Role::Image {
                    Role::Child
                } else {
                    role
                };
                self.visit(child_raw, child_digest, child_role, Vec::new())?;
            }
        } else {
            let descriptors = parsed
                .config
                .iter()
                .chain(&parsed.layers)
                .chain(&parsed.blobs);
            let mut missing = Vec::new();
            for d in descriptors {
                if !self.reuse_blob(&d.digest, d.size)? {
                    missing.push((d.digest.clone(), d.size));
                }
            }
            self.fetch_blobs(&missing)?;
        }
        self.manifests.push(StoredManifest {
            digest,
            media_type,
            raw,
            role,
            tags,
        });
        Ok(())
    }

    /// Signatures, attestations and SBOMs of every manifest kept so far: cosign-style
    /// `sha256-<hex>[.sig|.att|.sbom]` tags (which also covers the referrers tag schema) and the
    /// OCI 1.1 referrers API.
    fn referrers(&mut self) -> Result<()> {
        let subjects: Vec<String> = self
            .manifests
            .iter()
            .filter(|m| m.role != Role::Referrer)
            .map(|m| m.digest.clone())
            .collect();
        let tags = match self.source.tags(self.rt) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(
                    "cannot list the tags of {} to find signatures: {e}",
                    self.source.repository()
                );
                Vec::new()
            }
        };
        for subject in &subjects {
            let prefix = subject.replacen(':', "-", 1);
            for tag in tags.iter().filter(|t| t.starts_with(&prefix)) {
                let (raw, digest) = self.source.manifest(self.rt, By::Tag(tag))?;
                self.visit(raw, digest, Role::Referrer, vec![tag.clone()])?;
            }
            for digest in self.source.referrers(self.rt, subject) {
                if self.manifests.iter().any(|m| m.digest == digest) {
                    continue;
                }
                check_digest(&digest)?;
                let (raw, digest) = self.source.manifest(self.rt, By::Digest(&digest))?;
                self.visit(raw, digest, Role::Referrer, Vec::new())?;
            }
        }
        Ok(())
    }

    /// Takes a blob from this run or an earlier backup (its blob index) when possible;
    /// `false` means it must be fetched.
    fn reuse_blob(&mut self, digest: &str, size: u64) -> Result<bool> {
        check_digest(digest)?;
        if !self.seen_blobs.insert(digest.to_string()) {
            return Ok(true);
        }
        if let Some(json) = self.rt.block_on(self.repo.get_blob_index(digest))? {
            if let Ok(index) = serde_json::from_slice::<BlobIndex>(&json) {
                let key = self.repo.blob_index_key(digest);
                if index.digest == digest
                    && index.size == size
                    && self.writer.session().index_usable(&key, &index.refs)
                {
                    self.blobs.push(StoredBlob {
                        digest: index.digest,
                        size,
                        refs: index.refs,
                    });
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Fetches and stores `blobs`, up to [`BLOB_CONCURRENCY`] at a time (one registry per
    /// run, so this bounds the load on it). Transient registry trouble is retried where it
    /// happens (the registry client retries requests and resumes broken downloads); the first
    /// failure stops the image: no new blob is started after it.
    fn fetch_blobs(&mut self, blobs: &[(String, u64)]) -> Result<()> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let next = AtomicUsize::new(0);
        let (source, rt, writer, progress) = (self.source, self.rt, &self.writer, self.progress);
        let fetch =
            |digest: &str, size: u64| fetch_blob(source, rt, writer, progress, digest, size);
        let mut results: Vec<(usize, Result<Fetched>)> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..BLOB_CONCURRENCY.min(blobs.len()))
                .map(|_| {
                    scope.spawn(|| {
                        let mut out = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some((digest, size)) = blobs.get(i) else {
                                return out;
                            };
                            let result = fetch(digest, *size);
                            if result.is_err() {
                                next.store(blobs.len(), Ordering::Relaxed);
                            }
                            out.push((i, result));
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().expect("blob fetch thread panicked"))
                .collect()
        });
        results.sort_by_key(|(i, _)| *i);
        for (i, result) in results {
            let (refs, len) = result?;
            let (digest, size) = &blobs[i];
            self.summary.files_read += 1;
            self.summary.bytes_read += len;
            self.new_indexes.push(BlobIndex {
                digest: digest.clone(),
                size: *size,
                refs: refs.clone(),
            });
            self.blobs.push(StoredBlob {
                digest: digest.clone(),
                size: *size,
                refs,
            });
        }
        Ok(())
    }
}

/// A fetched blob: its chunk refs and its length.
type Fetched = (Vec<ChunkRef>, u64);

/// Streams one blob from `source` through the chunk pipeline while checking its size and
/// sha256 against its descriptor.
fn fetch_blob(
    source: &Source,
    rt: &Handle,
    writer: &ChunkWriter,
    progress: &Progress,
    digest: &str,
    size: u64,
) -> Result<Fetched> {
    let mismatch = |reason: String| Error::DigestMismatch {
        repository: source.repository(),
        digest: digest.to_string(),
        reason,
    };
    let mut reader = source.blob(rt, digest)?;
    let mut sha = Sha256::new();
    let mut sw = StreamWriter::new(writer, Mode::ContentDefined);
    let mut buf = vec![0u8; 1 << 20];
    let mut n: u64 = 0;
    loop {
        let got = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(got) => got,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(crate::pipeline::from_io(e)),
        };
        n += got as u64;
        if n > size {
            return Err(mismatch(format!(
                "more than the {size} bytes its descriptor says"
            )));
        }
        sha.update(&buf[..got]);
        sw.write_all(&buf[..got])?;
        progress.inc(got as u64);
    }
    if n != size {
        return Err(mismatch(format!("{n} bytes, its descriptor says {size}")));
    }
    let actual = format!("sha256:{}", hex::encode(sha.finalize()));
    if actual != digest {
        return Err(mismatch(format!("the bytes hash to {actual}")));
    }
    sw.finish()
}
