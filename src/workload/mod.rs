//! Workload twins: a compose project backed up as one unit and brought up elsewhere.
//!
//! A workload snapshot's root is one CBOR [`WorkloadRecord`]: the compose files and `.env` as
//! bytes, the project as the compose tool normalized it, and its members: every service's
//! image (an image snapshot, by digest), every named volume (a tree snapshot, with the
//! engine's labels and driver options) and every bind-mounted host path (a tree snapshot).
//! Members are ordinary snapshots made first; the workload record is written last, and only
//! when every member succeeded, so nothing claims to be a complete twin that is not. The
//! operations are in [`crate::commands::workload`]; [`compose`] runs the compose tool and
//! [`engine`] speaks to the container engine.

pub mod compose;
pub mod engine;
pub mod export;
pub mod policy;

use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;

use crate::error::{Error, Result};
use crate::repository::Repository;
use crate::snapshot::Listed;

/// How the volumes of a workload are made consistent while they are copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// Stop the containers that mount them, copy, start them again (downtime recorded).
    Stop,
    /// Freeze those containers during the copy.
    Pause,
    /// Run commands inside services before the copy (a database dump into the volume, say)
    /// and after it; the copy is live otherwise.
    Exec,
    /// Copy live, recorded as such.
    None,
}

/// A service and its image.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceMember {
    pub name: String,
    /// The image reference in the compose file.
    pub image: String,
    /// The manifest digest backed up.
    pub digest: String,
    /// The image snapshot.
    pub snapshot: String,
}

/// A named volume of the project.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolumeMember {
    /// Its key in the compose file.
    pub key: String,
    pub engine: engine::VolumeInfo,
    /// The tree snapshot of its data.
    pub snapshot: String,
}

/// A host path bind-mounted by a service, or a volume given by hand (`--volume NAME=PATH`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BindMember {
    pub source: PathBuf,
    pub snapshot: String,
    /// The name of a volume given by hand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A bind-mounted file (not a directory): its snapshot is a block image of its bytes, and
    /// this its mode and owner, given back on restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileMode>,
}

/// The mode (permission bits, setuid, setgid, sticky) and owner of a bind-mounted file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMode {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// A file given to the compose tool, kept byte for byte.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeptFile {
    pub name: String,
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

/// The root of a workload snapshot. A workload given by hand has no compose files and an
/// empty project; its images are services named by their reference and its volumes are bind
/// members with a name.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkloadRecord {
    /// The compose project name.
    pub project: String,
    pub compose_files: Vec<KeptFile>,
    pub env_file: Option<KeptFile>,
    /// The project as the compose tool printed it (`config`).
    pub config: String,
    pub services: Vec<ServiceMember>,
    pub volumes: Vec<VolumeMember>,
    pub binds: Vec<BindMember>,
    pub consistency: Consistency,
    /// Volumes (by key) copied in another mode than the workload's.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub volume_consistency: std::collections::BTreeMap<String, Consistency>,
    /// From the start of the first volume copy to the end of the last.
    pub capture_started: DateTime<Utc>,
    pub capture_ended: DateTime<Utc>,
    /// How long containers were stopped or paused.
    pub downtime_ms: u64,
    /// Bind mounts that hold no data to copy (the engine socket, `/proc`, `/sys`, `/dev`, a
    /// device, `/` itself), each with why: left in the project as they are, so a restore lists
    /// them as host access.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
}

impl WorkloadRecord {
    /// Whether every volume was copied quiesced or after the services' own commands: the
    /// workload's mode is stop, pause or exec, or it is none and every volume has a mode of
    /// its own that is not none. Bind mounts take the workload's mode and are not counted.
    pub fn is_consistent(&self) -> bool {
        match self.consistency {
            Consistency::None => self.volumes.iter().all(|v| {
                self.volume_consistency
                    .get(&v.key)
                    .is_some_and(|m| *m != Consistency::None)
            }),
            _ => true,
        }
    }

    /// Every member snapshot's id, once (services sharing an image share its snapshot).
    pub fn members(&self) -> Vec<&str> {
        let services = self.services.iter().map(|s| s.snapshot.as_str());
        let volumes = self.volumes.iter().map(|v| v.snapshot.as_str());
        let binds = self.binds.iter().map(|b| b.snapshot.as_str());
        let mut ids: Vec<&str> = services.chain(volumes).chain(binds).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// The largest workload record read (compose files, `.env` and the project are a few KiB): a
/// record is decoded whole, and its size is the store's say.
const MAX_RECORD_LEN: u64 = 16 << 20;

/// Reads the record of workload snapshot `snap` (its chunks are checked on the way).
///
/// # Errors
/// Chunk read errors; [`Error::Corrupt`] when the record does not decode.
pub fn load_record(repo: &Arc<Repository>, rt: &Handle, snap: &Listed) -> Result<WorkloadRecord> {
    let stream = snap.root_stream(repo, rt, MAX_RECORD_LEN)?;
    ciborium::from_reader(stream).map_err(|e| match e {
        ciborium::de::Error::Io(io) => crate::pipeline::from_io(io),
        other => Error::Corrupt {
            object: format!("workload record of snapshot {}", snap.id),
            reason: other.to_string(),
        },
    })
}
