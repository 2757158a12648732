//! Garbage collection while backups keep running: the protocol, its records, and `tresor gc`.
//!
//! # The problem
//! Chunks are content-addressed and shared: a backup that meets a chunk already stored does not
//! upload it again, it only names it. `gc` deletes chunks no snapshot names. A backup still
//! running has named chunks no *published* snapshot names yet, and it may be about to name a
//! chunk that `gc` judges unreferenced. Deleting such a chunk loses data. The store offers no
//! help: no locks, no conditional PUT (Garage ignores `If-None-Match`), no atomic
//! read-and-delete, and a re-upload of a chunk lands on the very key a delete may be aimed at.
//!
//! # The design: two-phase deletion with writer sessions (kopia's and PBS's ideas, no lock)
//! 1. **Sessions.** Every backup first writes `sessions/<id>` and keeps rewriting it (a
//!    heartbeat every [`HEARTBEAT`]); it ends by rewriting it as ended (a PUT, never a delete,
//!    so append-only credentials suffice). Only *after* registering does it read the live gc
//!    plans, and it records their ids in its session object (`plans_seen`).
//! 2. **Mark** (`gc`, phase one). From every snapshot record `gc` computes the referenced chunks
//!    and OCI blob indexes, lists the store, and writes a **plan** `gc/plans/<id>`: everything
//!    unreferenced and older than the grace period. Nothing is deleted.
//! 3. **Writers avoid condemned chunks.** A session never deduplicates against a chunk of a plan
//!    it has seen: it stores the chunk again. Before that upload it *declares* the chunk
//!    (`rescued` in its session object), unless the plan's sweep has begun, in which case it
//!    waits for the sweep to end; the declaration must complete within half the plan's
//!    declaration window of that check, or the check is repeated.
//! 4. **Sweep** (`gc`, phase two, at least the grace period after the mark). A plan is swept
//!    only when every live session has seen it, so no live session can have deduplicated
//!    against its chunks unknowingly, and every session that could have has published or died.
//!    The sweep writes `gc/sweeping/<id>`, waits the declaration window, reads every session's
//!    rescued chunks, reads the snapshots published since the mark, and deletes the plan's blob
//!    indexes and then its chunks, keeping the rescued and newly referenced ones. Then it writes
//!    `gc/done/<id>` and removes the plan.
//!
//! Why no lost chunk: a session registered before the mark is waited for (its snapshot is then
//! visible to the sweep's second look, or it never publishes). A session registered after the
//! mark saw the plan, so every condemned chunk it uses it uploads after declaring; a declaration
//! either lands before the sweep reads sessions (the chunk is kept) or its check saw the sweep
//! marker (the session waits for the sweep to finish before uploading). The only clock
//! assumption is that a writer's declaration completes within half the declaration window after
//! its check, which the writer measures on its own monotonic clock and enforces by re-checking.
//!
//! **Liveness and leases.** A session whose object has not been rewritten for [`STALE_AFTER`]
//! (store clock) counts as dead. A session that could not rewrite it for [`LEASE`] (its own
//! monotonic clock; half of `STALE_AFTER`) refuses to publish its snapshot, so a dead-looking
//! session can never publish afterwards. A sweep refreshes its marker the same way and stops
//! deleting when it loses its lease; a session treats a stale marker as absent.
//!
//! **Caches.** The local chunk cache ([`crate::cache`]) records which sweeps it has seen
//! (`gc/done/*`); a new one makes the next backup rebuild it from a listing, so it never claims a
//! deleted chunk. Condemned chunks are removed from the in-memory set of every session.
//!
//! **Interruption.** Every step is idempotent: a mark that stops before writing its plan leaves
//! nothing; a sweep that stops leaves its marker and plan, and the next run sweeps again from the
//! start (markers older than [`STALE_AFTER`] are ignored by writers). Run one `gc` at a time per
//! repository, from the admin host that holds the deleting credential.

mod collect;
mod session;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use collect::{run, GcOptions, GcReport, PlanSummary, SweepSummary, Waiting};
pub use session::{Claim, Session};

use crate::error::{Error, Result};
use crate::id::ChunkId;
use crate::repository::{Repository, GC_PREFIX, SESSIONS_PREFIX};

/// How often a running session (or sweep) rewrites its object.
pub const HEARTBEAT: Duration = Duration::from_secs(60);
/// A session or sweep marker not rewritten for this long (store clock) counts as dead.
pub const STALE_AFTER: Duration = Duration::from_secs(15 * 60);
/// A session or sweep that could not rewrite its object for this long stops (its own clock).
pub const LEASE: Duration = Duration::from_secs(7 * 60 + 30);
/// Default time a sweep waits between writing its marker and reading declarations.
pub const DECLARE_WINDOW: Duration = Duration::from_secs(30);

fn plan_key(id: &str) -> String {
    format!("{GC_PREFIX}/plans/{id}")
}

fn sweeping_key(id: &str) -> String {
    format!("{GC_PREFIX}/sweeping/{id}")
}

fn done_key(id: &str) -> String {
    format!("{GC_PREFIX}/done/{id}")
}

/// When an object that others judge our liveness by (a session, a sweep marker) was last
/// rewritten successfully, on our own monotonic clock.
#[derive(Debug)]
struct Lease(std::sync::Mutex<std::time::Instant>);

impl Lease {
    /// A lease whose first write began at `began`.
    fn new(began: std::time::Instant) -> Lease {
        Lease(std::sync::Mutex::new(began))
    }

    /// Records a successful write that began at `began`.
    fn renewed(&self, began: std::time::Instant) {
        let mut last = self.0.lock().expect("lease lock");
        *last = (*last).max(began);
    }

    /// [`Error::LeaseLost`] for `holder` once no write succeeded for [`LEASE`]: others may then
    /// take it for dead.
    fn check(&self, holder: &str) -> Result<()> {
        let silent = self.0.lock().expect("lease lock").elapsed();
        if silent > LEASE {
            return Err(Error::LeaseLost {
                session: holder.to_string(),
                silent_secs: silent.as_secs(),
            });
        }
        Ok(())
    }
}

/// What one `gc` mark condemned (the object `gc/plans/<id>`, sealed CBOR).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub id: String,
    /// The marking host's clock, for display only.
    pub created: DateTime<Utc>,
    /// How long the sweep waits for declarations; writers declare within half of it.
    pub declare_window_ms: u64,
    /// Snapshot ids that existed at the mark; the sweep reads only the ones published since.
    pub snapshots: Vec<String>,
    /// Condemned chunk ids, 32 bytes each.
    #[serde(with = "serde_bytes")]
    pub chunks: Vec<u8>,
    /// Stored size of each condemned chunk, in the order of `chunks`.
    pub chunk_sizes: Vec<u32>,
    /// Store keys of condemned blob index objects.
    pub blob_indexes: Vec<String>,
}

impl Plan {
    /// The condemned chunk ids.
    pub fn chunk_ids(&self) -> impl Iterator<Item = ChunkId> + '_ {
        self.chunks
            .chunks_exact(32)
            .map(|c| ChunkId(c.try_into().expect("32 bytes")))
    }

    /// Stored bytes of the condemned chunks.
    pub fn chunk_bytes(&self) -> u64 {
        self.chunk_sizes.iter().map(|&s| u64::from(s)).sum()
    }

    fn declare_window(&self) -> Duration {
        Duration::from_millis(self.declare_window_ms)
    }

    async fn load(repo: &Repository, id: &str) -> Result<Option<Plan>> {
        let key = plan_key(id);
        let Some(bytes) = repo.get_record(&key).await? else {
            return Ok(None);
        };
        ciborium::from_reader(&bytes[..])
            .map(Some)
            .map_err(|e| Error::Corrupt {
                object: key,
                reason: format!("gc plan does not parse: {e}"),
            })
    }

    async fn save(&self, repo: &Repository) -> Result<()> {
        let mut bytes = Vec::new();
        ciborium::into_writer(self, &mut bytes).expect("plan serialises");
        repo.put_record(&plan_key(&self.id), &bytes).await
    }
}

/// The repository's gc state, from one listing of `gc/`.
#[derive(Debug, Default)]
pub struct GcState {
    /// Plans not yet swept, with the store time they were written, oldest first.
    pub live: BTreeMap<String, DateTime<Utc>>,
    /// Plans whose sweep has begun, with the marker's last refresh (store clock).
    pub sweeping: BTreeMap<String, DateTime<Utc>>,
    /// Swept plans.
    pub done: BTreeSet<String>,
}

impl GcState {
    /// Lists `gc/`.
    ///
    /// # Errors
    /// [`Error::Store`] when the listing fails.
    pub async fn load(repo: &Repository) -> Result<GcState> {
        let mut state = GcState::default();
        for obj in repo.store().list_modified(GC_PREFIX).await? {
            let mut parts = obj.key.rsplitn(3, '/');
            let (Some(id), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            match kind {
                "plans" => {
                    state.live.insert(id.to_string(), obj.modified);
                }
                "sweeping" => {
                    state.sweeping.insert(id.to_string(), obj.modified);
                }
                "done" => {
                    state.done.insert(id.to_string());
                }
                _ => {}
            }
        }
        state.live.retain(|id, _| !state.done.contains(id));
        Ok(state)
    }

    /// A short fingerprint of the swept plans: the chunk cache is valid only for the one it was
    /// saved under.
    pub fn done_fingerprint(&self) -> String {
        let mut h = blake3::Hasher::new();
        for id in &self.done {
            h.update(id.as_bytes());
            h.update(b"\n");
        }
        h.finalize().to_hex()[..16].to_string()
    }
}

/// A backup session's object (`sessions/<id>`, sealed JSON).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SessionRecord {
    pub host: String,
    pub pid: u32,
    /// What the session does, for `gc`'s messages ("backup volume etc").
    pub command: String,
    /// The writer's clock, for display only.
    pub started: DateTime<Utc>,
    pub ended: bool,
    /// Live plans the session read after registering.
    pub plans_seen: Vec<String>,
    /// Condemned chunks (hex ids) the session stores anyway.
    pub rescued: Vec<String>,
}

/// A session as `gc` sees it.
#[derive(Debug)]
struct SessionView {
    id: String,
    record: SessionRecord,
    /// Rewritten within [`STALE_AFTER`] of the store's `now`, and not ended.
    live: bool,
}

impl SessionView {
    fn describe(&self) -> String {
        format!(
            "{} ({} on {}, pid {}, started {})",
            self.id,
            self.record.command,
            self.record.host,
            self.record.pid,
            self.record.started.format("%Y-%m-%d %H:%M:%S UTC")
        )
    }
}

/// Every session object, judged against the store clock `now`. Unreadable ones are an error:
/// `gc` must not guess what a session relies on.
async fn load_sessions(repo: &Repository, now: DateTime<Utc>) -> Result<Vec<SessionView>> {
    let mut out = Vec::new();
    for obj in repo.store().list_modified(SESSIONS_PREFIX).await? {
        let Some(id) = obj.key.rsplit('/').next().map(str::to_string) else {
            continue;
        };
        let Some(bytes) = repo.get_record(&obj.key).await? else {
            continue;
        };
        let record: SessionRecord = serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
            object: obj.key.clone(),
            reason: format!("session record does not parse: {e}"),
        })?;
        let silent = (now - obj.modified).to_std().unwrap_or_default();
        out.push(SessionView {
            live: !record.ended && silent < STALE_AFTER,
            id,
            record,
        });
    }
    Ok(out)
}

/// Chunks declared by any session.
fn rescued(sessions: &[SessionView]) -> HashSet<ChunkId> {
    sessions
        .iter()
        .flat_map(|s| s.record.rescued.iter())
        .filter_map(|h| ChunkId::from_hex(h))
        .collect()
}
