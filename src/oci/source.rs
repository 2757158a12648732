//! Where an image backup reads from: a registry repository or an OCI image layout directory.
//! Both give checked manifests by tag or digest, blobs as byte streams, tags and referrers.

use std::io::Read;
use std::path::PathBuf;

use bytes::Bytes;
use oci_client::Reference;
use tokio::runtime::Handle;

use super::check_digest;
use super::registry::{sha256_digest, BlobReader, Registry};
use crate::error::{Error, Result};

/// How a manifest is named.
pub enum By<'a> {
    Tag(&'a str),
    Digest(&'a str),
}

/// A repository to read an image from.
pub enum Source<'a> {
    Registry {
        registry: &'a Registry,
        /// Registry and repository; tag or digest are given per call.
        base: Reference,
    },
    Layout {
        dir: PathBuf,
    },
}

impl Source<'_> {
    /// `host/repo` or `oci:DIR`, for names and messages.
    pub fn repository(&self) -> String {
        match self {
            Source::Registry { base, .. } => format!("{}/{}", base.registry(), base.repository()),
            Source::Layout { dir } => format!("oci:{}", dir.display()),
        }
    }

    fn reference(&self, by: &By) -> Reference {
        let Source::Registry { base, .. } = self else {
            unreachable!("only registries have references")
        };
        match by {
            By::Tag(t) => Reference::with_tag(
                base.registry().into(),
                base.repository().into(),
                t.to_string(),
            ),
            By::Digest(d) => Reference::with_digest(
                base.registry().into(),
                base.repository().into(),
                d.to_string(),
            ),
        }
    }

    /// A manifest's raw bytes and digest, checked against each other.
    ///
    /// # Errors
    /// [`Error::DigestMismatch`] naming the repository and digest; access errors.
    pub fn manifest(&self, rt: &Handle, by: By) -> Result<(Vec<u8>, String)> {
        match self {
            Source::Registry { registry, .. } => {
                let (raw, digest) = rt.block_on(registry.manifest(&self.reference(&by)))?;
                Ok((raw.to_vec(), digest))
            }
            Source::Layout { dir } => {
                let digest = match by {
                    By::Digest(d) => d.to_string(),
                    By::Tag(t) => self
                        .layout_index()?
                        .into_iter()
                        .find(|(name, _)| name == t)
                        .map(|(_, d)| d)
                        .ok_or_else(|| {
                            Error::Config(format!(
                                "{} has no image named {t:?} in its index.json",
                                self.repository()
                            ))
                        })?,
                };
                let path = dir.join("blobs/sha256").join(check_digest(&digest)?);
                let raw = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
                let actual = sha256_digest(&raw);
                if actual != digest {
                    return Err(Error::DigestMismatch {
                        repository: self.repository(),
                        digest,
                        reason: format!("the manifest bytes hash to {actual}"),
                    });
                }
                Ok((raw, actual))
            }
        }
    }

    /// A blob's bytes as a stream; the caller checks size and digest.
    pub fn blob<'s>(&'s self, rt: &'s Handle, digest: &str) -> Result<Box<dyn Read + 's>> {
        match self {
            Source::Registry { registry, .. } => {
                let reader =
                    rt.block_on(registry.blob(&self.reference(&By::Digest(digest)), digest))?;
                Ok(Box::new(RegistryBlob {
                    rt,
                    reader,
                    current: Bytes::new(),
                }))
            }
            Source::Layout { dir } => {
                let path = dir.join("blobs/sha256").join(check_digest(digest)?);
                Ok(Box::new(
                    std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?,
                ))
            }
        }
    }

    /// Every tag (registry) or image name in index.json (layout).
    pub fn tags(&self, rt: &Handle) -> Result<Vec<String>> {
        match self {
            Source::Registry { registry, base } => rt.block_on(registry.tags(base)),
            Source::Layout { .. } => Ok(self.layout_index()?.into_iter().map(|(n, _)| n).collect()),
        }
    }

    /// Digests of manifests whose subject is `digest` (OCI 1.1 referrers API or its tag-schema
    /// fallback). Layouts list referrers through tags only.
    pub fn referrers(&self, rt: &Handle, digest: &str) -> Vec<String> {
        match self {
            Source::Registry { registry, .. } => {
                match rt.block_on(registry.referrers(&self.reference(&By::Digest(digest)))) {
                    Ok(digests) => digests,
                    Err(e) => {
                        tracing::debug!("no referrers of {digest}: {e}");
                        Vec::new()
                    }
                }
            }
            Source::Layout { .. } => Vec::new(),
        }
    }

    /// (name, digest) of every named entry of a layout's index.json.
    fn layout_index(&self) -> Result<Vec<(String, String)>> {
        let Source::Layout { dir } = self else {
            unreachable!("only layouts have an index.json")
        };
        let path = dir.join("index.json");
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let index: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
                object: path.display().to_string(),
                reason: e.to_string(),
            })?;
        Ok(index["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| {
                let name = m["annotations"]["org.opencontainers.image.ref.name"].as_str()?;
                Some((name.to_string(), m["digest"].as_str()?.to_string()))
            })
            .collect())
    }
}

/// A registry blob read as `std::io::Read` from a blocking thread.
struct RegistryBlob<'a> {
    rt: &'a Handle,
    reader: BlobReader<'a>,
    current: Bytes,
}

impl Read for RegistryBlob<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rt.block_on(self.reader.next()) {
                Ok(None) => return Ok(0),
                Ok(Some(b)) => self.current = b,
                Err(e) => return Err(std::io::Error::other(e)),
            }
        }
        let n = self.current.len().min(buf.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        let _ = self.current.split_to(n);
        Ok(n)
    }
}
