//! What a workload backup copies, found before the first byte is stored: each named volume on
//! the engine and where its data is read from, each bind-mounted path (and those that hold no
//! data), and the mode each mounting service is quiesced in. A wrong project name or a missing
//! path is bad input that leaves no member snapshot behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::ComposeOptions;
use crate::error::{Error, Result};
use crate::workload::compose::{Mount, Project};
use crate::workload::engine::{Engine, VolumeData, VolumeInfo};
use crate::workload::{policy, Consistency};

/// The members of a workload backup.
pub(super) struct Members {
    /// Each named volume: its key in the compose file, the engine's description, its source.
    pub volumes: Vec<(String, VolumeInfo, VolumeSource)>,
    /// The bind-mounted paths that hold data.
    pub binds: Vec<PathBuf>,
    /// The bind-mounted paths that do not, each with why.
    pub skipped: Vec<String>,
    /// Each service that mounts something, with the strictest mode of what it mounts.
    pub mounting: BTreeMap<String, Consistency>,
}

/// Finds the members of `project` (with `engine` for a compose project; none for a workload
/// given by hand).
///
/// # Errors
/// [`Error::Config`] for a volume the engine does not have or a `--volume-consistency` key
/// the project lacks; I/O errors naming a bind-mounted path that cannot be read.
pub(super) fn members(
    project: &Project,
    engine: Option<&Engine>,
    options: &ComposeOptions,
    consistency: Consistency,
) -> Result<Members> {
    for (key, _) in &options.volume_consistency {
        if !project.volumes.contains_key(key) {
            return Err(Error::Config(format!(
                "--volume-consistency {key}: the project has no volume {key}"
            )));
        }
    }
    // Each mounting service gets the strictest mode of what it mounts (a volume's own mode,
    // else the workload's): stop before pause before none.
    let mut volume_keys: Vec<String> = Vec::new();
    let mut bind_paths: Vec<PathBuf> = Vec::new();
    let mut mounting: BTreeMap<String, Consistency> = BTreeMap::new();
    for s in &project.services {
        for m in &s.mounts {
            let mode = match m {
                Mount::Volume { key, .. } => {
                    if !volume_keys.contains(key) {
                        volume_keys.push(key.clone());
                    }
                    options
                        .volume_consistency
                        .iter()
                        .find(|(k, _)| k == key)
                        .map_or(consistency, |(_, m)| *m)
                }
                Mount::Bind { source, .. } => {
                    if !bind_paths.contains(source) {
                        bind_paths.push(source.clone());
                    }
                    consistency
                }
            };
            let slot = mounting.entry(s.name.clone()).or_insert(mode);
            *slot = strictest(*slot, mode);
        }
    }
    let mut volumes = Vec::new();
    for key in &volume_keys {
        let engine_name = &project.volumes[key];
        let engine = engine.expect("named volumes come from a compose project");
        // Bad input, not the engine's fault: most often a wrong --project-name.
        let info = engine.volume(engine_name)?.ok_or_else(|| {
            Error::Config(format!(
                "volume {key}: the engine has no volume {engine_name} (project {}): check --project-name, or start the project once (`up`)",
                project.name
            ))
        })?;
        let source = volume_source(project, key, &info)?;
        volumes.push((key.clone(), info, source));
    }
    let mut skipped = Vec::new();
    let mut binds = Vec::new();
    for source in bind_paths {
        let meta = std::fs::metadata(&source).map_err(|e| {
            Error::io(&source, e).context(format!("bind mount {}", source.display()))
        })?;
        match not_data(&source, &meta) {
            Some(why) => {
                tracing::info!("bind mount {}: {why}; left as it is", source.display());
                skipped.push(format!("bind mount {}: {why}", source.display()));
            }
            None => binds.push(source),
        }
    }
    Ok(Members {
        volumes,
        binds,
        skipped,
        mounting,
    })
}

/// The stricter of two modes: stop, then pause, then none.
fn strictest(a: Consistency, b: Consistency) -> Consistency {
    let rank = |m| match m {
        Consistency::Stop => 3,
        Consistency::Pause => 2,
        Consistency::Exec | Consistency::None => 1,
    };
    if rank(b) > rank(a) {
        b
    } else {
        a
    }
}

/// Why a bind-mounted path holds no data a twin needs, if it does not: the engine's socket, a
/// device or FIFO, the kernel's file systems, the host's root. Copying them fails (a socket) or copies
/// the host (`/`); they stay in the project as they are.
fn not_data(source: &Path, meta: &std::fs::Metadata) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if source == Path::new("/") {
        Some("the host's root, not data")
    } else if ["/proc", "/sys", "/dev"]
        .iter()
        .any(|k| source.starts_with(k))
    {
        Some("a kernel file system, not data")
    } else if t.is_socket() {
        Some("a socket (an engine's or a daemon's), not data")
    } else if t.is_block_device() || t.is_char_device() || t.is_fifo() {
        Some("a device or a FIFO, not data")
    } else {
        None
    }
}

/// Where a volume's data is read from for the copy.
pub(super) enum VolumeSource {
    /// A directory of this host: the volume's mountpoint, or the directory it binds.
    Path(PathBuf),
    /// Its mountpoint while a helper container of this image mounts it.
    Helper(String),
}

/// Where the data of volume `key` (`info`) is read from, checked before anything is copied: a
/// volume with driver options may hold its data elsewhere, or only while it is mounted.
pub(super) fn volume_source(
    project: &Project,
    key: &str,
    info: &VolumeInfo,
) -> Result<VolumeSource> {
    match info.data() {
        VolumeData::Here => Ok(VolumeSource::Path(PathBuf::from(&info.mountpoint))),
        VolumeData::Device(dir) => match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => Ok(VolumeSource::Path(dir)),
            Ok(_) => Err(Error::Config(format!(
                "volume {key}: the directory it binds, {}, is not a directory",
                dir.display()
            ))),
            Err(e) => Err(Error::io(&dir, e).context(format!("volume {key} (the directory it binds)"))),
        },
        VolumeData::WhileMounted => project
            .services
            .iter()
            .filter(|s| {
                s.mounts
                    .iter()
                    .any(|m| matches!(m, Mount::Volume { key: k, .. } if k == key))
            })
            .find_map(|s| s.image.clone())
            .map(VolumeSource::Helper)
            .ok_or_else(|| {
                Error::Config(format!(
                    "volume {key}: driver {} with options {} holds its data only while mounted, and no service that mounts it names an image to mount it in for the copy",
                    info.driver,
                    policy::redacted(info.options.keys().map(String::as_str))
                ))
            }),
    }
}
