//! Image references on the command line: `docker://HOST/REPO[:TAG|@DIGEST]` and `oci:DIR[:TAG]`.

use std::path::PathBuf;

use oci_client::Reference;

use crate::error::{Error, Result};

/// Where images come from.
#[derive(Clone, Debug)]
pub enum ImageSource {
    /// One image (`repo:tag` or `repo@digest`), or with `whole_repository`, every tag that the
    /// tag filter selects.
    Registry {
        reference: Reference,
        whole_repository: bool,
    },
    /// An OCI image layout directory: one image by name, or every named image.
    Layout { dir: PathBuf, tag: Option<String> },
}

/// Where images are restored to.
#[derive(Clone, Debug)]
pub enum ImageTarget {
    /// A registry repository, with an optional tag (else the source tag).
    Registry {
        reference: Reference,
        tag: Option<String>,
    },
    /// An OCI image layout directory, with an optional tag (else the source tag).
    Layout { dir: PathBuf, tag: Option<String> },
}

fn parse_docker(s: &str, what: &str) -> Result<(Reference, bool)> {
    let rest = s.strip_prefix("docker://").ok_or_else(|| {
        Error::Config(format!(
            "{what} {s:?}: use docker://HOST/REPO[:TAG|@sha256:...] or oci:DIR[:TAG]"
        ))
    })?;
    let last = rest.rsplit('/').next().unwrap_or("");
    let has_tag_or_digest = rest.contains('@') || last.contains(':');
    let reference: Reference = rest
        .parse()
        .map_err(|e| Error::Config(format!("{what} {s:?} is not an image reference: {e}")))?;
    let host = rest.split_once('/').map(|(h, _)| h);
    if !host.is_some_and(|h| h.contains('.') || h.contains(':') || h == "localhost") {
        return Err(Error::Config(format!(
            "{what} {s:?} names no registry host; write docker://HOST/REPO (tresor has no default registry)"
        )));
    }
    Ok((reference, !has_tag_or_digest))
}

impl ImageSource {
    /// The registry host (`host[:port]`), for registry sources.
    pub fn registry_host(&self) -> Option<&str> {
        match self {
            ImageSource::Registry { reference, .. } => Some(reference.registry()),
            ImageSource::Layout { .. } => None,
        }
    }

    /// Parses a source reference.
    ///
    /// # Errors
    /// [`Error::Config`] naming the reference.
    pub fn parse(s: &str) -> Result<ImageSource> {
        if s.starts_with("oci:") {
            let ImageTarget::Layout { dir, tag } = ImageTarget::parse(s)? else {
                unreachable!("oci: parses as a layout")
            };
            return Ok(ImageSource::Layout { dir, tag });
        }
        let (reference, whole_repository) = parse_docker(s, "image")?;
        Ok(ImageSource::Registry {
            reference,
            whole_repository,
        })
    }
}

impl ImageTarget {
    /// Parses a restore target.
    ///
    /// # Errors
    /// [`Error::Config`] naming the target.
    pub fn parse(s: &str) -> Result<ImageTarget> {
        if let Some(rest) = s.strip_prefix("oci:") {
            // A tag follows the last colon unless that colon is part of the path.
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((d, t)) if !t.contains('/') && !t.is_empty() => (d, Some(t.to_string())),
                _ => (rest, None),
            };
            return Ok(ImageTarget::Layout {
                dir: PathBuf::from(dir),
                tag,
            });
        }
        let (reference, bare) = parse_docker(s, "target")?;
        if reference.digest().is_some() {
            return Err(Error::Config(format!(
                "target {s:?}: a restore target names a repository and optionally a tag, not a digest"
            )));
        }
        let tag = (!bare)
            .then(|| reference.tag().map(str::to_string))
            .flatten();
        Ok(ImageTarget::Registry { reference, tag })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources_and_targets() {
        let ImageSource::Registry {
            reference,
            whole_repository,
        } = ImageSource::parse("docker://127.0.0.1:5000/team/app:v1").unwrap()
        else {
            panic!()
        };
        assert!(!whole_repository);
        assert_eq!(reference.registry(), "127.0.0.1:5000");
        assert_eq!(reference.repository(), "team/app");
        assert_eq!(reference.tag(), Some("v1"));
        let ImageSource::Registry {
            whole_repository, ..
        } = ImageSource::parse("docker://localhost:5000/app").unwrap()
        else {
            panic!()
        };
        assert!(whole_repository);
        assert!(ImageSource::parse("docker://app:v1").is_err());
        assert!(ImageSource::parse("app:v1").is_err());

        match ImageTarget::parse("oci:/tmp/layout:v2").unwrap() {
            ImageTarget::Layout { dir, tag } => {
                assert_eq!(dir, PathBuf::from("/tmp/layout"));
                assert_eq!(tag.as_deref(), Some("v2"));
            }
            _ => panic!(),
        }
        match ImageTarget::parse("docker://reg.example/app").unwrap() {
            ImageTarget::Registry { tag, .. } => assert_eq!(tag, None),
            _ => panic!(),
        }
        assert!(ImageTarget::parse("docker://reg.example/app@sha256:0000000000000000000000000000000000000000000000000000000000000000").is_err());
    }
}
