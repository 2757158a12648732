//! An image that exists only in the engine (built, never pushed) has no registry to be copied
//! from: the engine's export (`docker save`: `manifest.json`, the config JSON, one
//! uncompressed `layer.tar` per layer) is turned into an OCI image layout, which the image
//! backup reads like any other. The layers stay uncompressed tars
//! (`application/vnd.oci.image.layer.v1.tar`, their digests the engine's diff ids), so the
//! image's content is exactly the engine's; its manifest is new, and so is its digest.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::localfile::{write_atomically, SHARED};

/// The tag the layout gives an exported image: its own (`web:1` gives `1`), else `latest`,
/// so that its twin in the target registry is found under the tag the project used.
fn own_tag(image: &str) -> &str {
    let name = image.split_once('@').map_or(image, |(n, _)| n);
    match name.rsplit_once(':') {
        Some((_, tag)) if !tag.contains('/') => tag,
        _ => "latest",
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SavedImage {
    config: String,
    layers: Vec<String>,
}

fn bad(image: &str, reason: impl Into<String>) -> Error {
    Error::Engine {
        what: format!("exporting image {image}"),
        reason: reason.into(),
    }
}

/// Reads the engine's export of `image` from `archive` (a `docker save` tar) into an OCI layout
/// at `dir`; returns the layout reference (`oci:DIR:TAG`, the image's own tag).
///
/// # Errors
/// [`Error::Engine`] for an archive that is not an image export; I/O errors.
pub fn to_layout(image: &str, archive: &Path, dir: &Path) -> Result<String> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(|e| Error::io(&blobs, e))?;
    let file = std::fs::File::open(archive).map_err(|e| Error::io(archive, e))?;
    let mut tar = tar::Archive::new(file);
    // Path in the archive -> (digest, size); symlinked duplicates resolved afterwards.
    let mut stored: HashMap<String, (String, u64)> = HashMap::new();
    let mut links: Vec<(String, String)> = Vec::new();
    let mut manifest: Option<Vec<SavedImage>> = None;
    for entry in tar.entries().map_err(|e| Error::io(archive, e))? {
        let mut entry = entry.map_err(|e| Error::io(archive, e))?;
        let path = entry
            .path()
            .map_err(|e| Error::io(archive, e))?
            .to_string_lossy()
            .into_owned();
        if entry.header().entry_type().is_symlink() {
            if let Ok(Some(target)) = entry.link_name() {
                let base = Path::new(&path).parent().unwrap_or(Path::new(""));
                let target = normalize(&base.join(target));
                links.push((path, target));
            }
            continue;
        }
        if !entry.header().entry_type().is_file() {
            continue;
        }
        if path == "manifest.json" {
            let mut json = Vec::new();
            entry
                .read_to_end(&mut json)
                .map_err(|e| Error::io(archive, e))?;
            manifest = Some(
                serde_json::from_slice(&json)
                    .map_err(|e| bad(image, format!("manifest.json: {e}")))?,
            );
            continue;
        }
        // Every other file may be a blob (layers, the config); hash it on the way.
        let tmp = blobs.join(".incoming");
        let mut out = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = entry.read(&mut buf).map_err(|e| Error::io(archive, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(|e| Error::io(&tmp, e))?;
            size += n as u64;
        }
        let hex = hex::encode(hasher.finalize());
        let dest = blobs.join(&hex);
        std::fs::rename(&tmp, &dest).map_err(|e| Error::io(&dest, e))?;
        stored.insert(path, (format!("sha256:{hex}"), size));
    }
    for (link, target) in links {
        if let Some(found) = stored.get(&target).cloned() {
            stored.insert(link, found);
        }
    }
    let saved = manifest
        .and_then(|m| m.into_iter().next())
        .ok_or_else(|| bad(image, "the export has no manifest.json entry"))?;
    let blob = |path: &str| {
        stored
            .get(path)
            .cloned()
            .ok_or_else(|| bad(image, format!("the export lacks {path}")))
    };
    let (config_digest, config_size) = blob(&saved.config)?;
    let mut layers = Vec::new();
    for l in &saved.layers {
        let (digest, size) = blob(l)?;
        layers.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": digest,
            "size": size,
        }));
    }
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": layers,
    }))
    .expect("manifest serialises");
    let hex = hex::encode(Sha256::digest(&manifest));
    write_atomically(&blobs.join(&hex), SHARED, &manifest)?;
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{hex}"),
            "size": manifest.len(),
            "annotations": { "org.opencontainers.image.ref.name": own_tag(image) },
        }],
    }))
    .expect("index serialises");
    write_atomically(&dir.join("index.json"), SHARED, &index)?;
    write_atomically(
        &dir.join("oci-layout"),
        SHARED,
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    Ok(format!("oci:{}:{}", dir.display(), own_tag(image)))
}

/// `a/b/../c` -> `a/c`, for symlinks inside the archive.
fn normalize(path: &Path) -> String {
    let mut parts: Vec<String> = Vec::new();
    for c in path.components() {
        match c {
            std::path::Component::ParentDir => {
                parts.pop();
            }
            std::path::Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            _ => {}
        }
    }
    parts.join("/")
}

/// A directory for the export of `image` under `parent`.
pub fn dir_for(parent: &Path, image: &str) -> PathBuf {
    parent.join(hex::encode(&Sha256::digest(image.as_bytes())[..8]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_export_keeps_the_images_own_tag() {
        assert_eq!(own_tag("shop-local/web:1"), "1");
        assert_eq!(own_tag("127.0.0.1:5000/shop/web"), "latest");
        assert_eq!(own_tag("localhost/web:2.1@sha256:ab"), "2.1");
    }
}
