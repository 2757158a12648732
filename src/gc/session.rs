//! The writer's side of the gc protocol: a backup session (see the [module docs](super)).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::task::AbortHandle;

use super::{done_key, sweeping_key, GcState, Lease, Plan, SessionRecord, HEARTBEAT, STALE_AFTER};
use crate::cache::KnownChunks;
use crate::error::Result;
use crate::id::{ChunkId, ChunkRef};
use crate::repository::{time_name, Repository, SESSIONS_PREFIX};

/// How often a session waiting for a sweep looks again.
const SWEEP_POLL: Duration = Duration::from_secs(2);

/// What a session may do with a chunk it is about to store.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// Stored already (or being stored by this session): name it, do not upload.
    Known,
    /// Not stored: upload it.
    New,
    /// Condemned by a plan this session has seen: call [`Session::rescue`], then upload it.
    Condemned,
}

struct Inner {
    repo: Arc<Repository>,
    key: String,
    /// Serialises writes of the session object, so a heartbeat never overwrites a newer
    /// declaration with an older state.
    record: tokio::sync::Mutex<SessionRecord>,
    last_write: Lease,
}

impl Inner {
    async fn write(&self, record: &SessionRecord) -> Result<()> {
        let began = Instant::now();
        let json = serde_json::to_vec(record).expect("session record serialises");
        self.repo.put_record(&self.key, &json).await?;
        self.last_write.renewed(began);
        Ok(())
    }
}

/// Condemned chunks and blob indexes of every live plan, with the plan that condemned them.
type Condemned = (HashMap<ChunkId, Arc<Plan>>, HashMap<String, Arc<Plan>>);

/// Reads the live plans (recording their ids in `record`) and the chunk cache without their
/// condemned chunks.
async fn read_plans(
    repo: &Arc<Repository>,
    cache_dir: Option<&Path>,
    record: &mut SessionRecord,
) -> Result<(Condemned, KnownChunks)> {
    let state = GcState::load(repo).await?;
    let (mut condemned, mut condemned_indexes): Condemned = Default::default();
    for id in state.live.keys() {
        let Some(plan) = Plan::load(repo, id).await? else {
            continue;
        };
        let plan = Arc::new(plan);
        condemned.extend(plan.chunk_ids().map(|c| (c, Arc::clone(&plan))));
        condemned_indexes.extend(
            plan.blob_indexes
                .iter()
                .map(|k| (k.clone(), Arc::clone(&plan))),
        );
        record.plans_seen.push(id.clone());
    }
    let known = KnownChunks::load(repo, cache_dir, &state.done_fingerprint()).await?;
    for id in condemned.keys() {
        known.remove(id);
    }
    Ok(((condemned, condemned_indexes), known))
}

/// A registered backup session: the chunk cache of one backup run, the plans it must respect,
/// and the heartbeat that keeps `gc` from deleting what it relies on.
pub struct Session {
    inner: Arc<Inner>,
    id: String,
    known: KnownChunks,
    /// Chunks of live plans seen at registration, with their plan.
    condemned: HashMap<ChunkId, Arc<Plan>>,
    condemned_indexes: HashMap<String, Arc<Plan>>,
    heartbeat: AbortHandle,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Session({})", self.id)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

impl Session {
    /// Registers a session for `command`, then reads the live gc plans and the chunk cache
    /// (from `cache_dir`, rebuilt from a listing when a sweep happened since it was saved).
    /// Starts the heartbeat on the current runtime.
    ///
    /// # Errors
    /// Store errors writing the session object or reading plans, and [`crate::Error::Corrupt`] for a
    /// plan that does not open (a backup must not guess what is condemned).
    pub async fn start(
        repo: Arc<Repository>,
        cache_dir: Option<&Path>,
        command: &str,
    ) -> Result<Session> {
        let started = Utc::now();
        let id = time_name(started);
        let mut record = SessionRecord {
            host: gethostname::gethostname().to_string_lossy().into_owned(),
            pid: std::process::id(),
            command: command.to_string(),
            started,
            ended: false,
            plans_seen: Vec::new(),
            rescued: Vec::new(),
        };
        let inner = Arc::new(Inner {
            repo: Arc::clone(&repo),
            key: format!("{SESSIONS_PREFIX}/{id}"),
            record: tokio::sync::Mutex::new(record.clone()),
            last_write: Lease::new(Instant::now()),
        });
        // Registering comes before reading the plans: a plan written after this read is then
        // swept only once this session has ended.
        inner.write(&record).await?;
        let ((condemned, condemned_indexes), known) =
            match read_plans(&repo, cache_dir, &mut record).await {
                Ok(read) => read,
                Err(e) => {
                    // Ended, so that gc need not wait for a session that never ran.
                    record.ended = true;
                    let _ = inner.write(&record).await;
                    return Err(e);
                }
            };
        if !record.plans_seen.is_empty() {
            let mut stored = inner.record.lock().await;
            *stored = record;
            inner.write(&stored).await?;
        }
        let beat = Arc::clone(&inner);
        let heartbeat = tokio::spawn(async move {
            loop {
                tokio::time::sleep(HEARTBEAT).await;
                let record = beat.record.lock().await;
                if let Err(e) = beat.write(&record).await {
                    tracing::warn!("session heartbeat failed (retrying in a minute): {e}");
                }
            }
        })
        .abort_handle();
        Ok(Session {
            inner,
            id,
            known,
            condemned,
            condemned_indexes,
            heartbeat,
        })
    }

    /// The session id (`sessions/<id>`).
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn repo(&self) -> &Arc<Repository> {
        &self.inner.repo
    }

    /// Decides what to do with chunk `id`, and counts it as known from now on.
    pub fn claim(&self, id: ChunkId) -> Claim {
        if !self.known.insert(id) {
            Claim::Known
        } else if self.condemned.contains_key(&id) {
            Claim::Condemned
        } else {
            Claim::New
        }
    }

    /// Undoes a claim whose upload failed.
    pub fn unclaim(&self, id: &ChunkId) {
        self.known.remove(id);
    }

    /// Whether refs taken from elsewhere (a parent snapshot's unchanged file) may be named
    /// without storing their data: none of them is condemned. Otherwise the data must be read
    /// again, so that its chunks go through [`Session::claim`].
    pub fn refs_usable(&self, refs: &[ChunkRef]) -> bool {
        refs.iter().all(|r| !self.condemned.contains_key(&r.id))
    }

    /// Like [`Session::refs_usable`] for refs read from the blob index at `index_key`, which
    /// must not be condemned either. Otherwise the blob must be fetched again.
    pub fn index_usable(&self, index_key: &str, refs: &[ChunkRef]) -> bool {
        !self.condemned_indexes.contains_key(index_key) && self.refs_usable(refs)
    }

    /// Makes it safe to upload condemned chunk `id`: declares it in the session object before
    /// the plan's sweep reads declarations, or waits until that sweep has finished.
    ///
    /// # Errors
    /// Store errors reading markers or writing the session object.
    pub async fn rescue(&self, id: &ChunkId) -> Result<()> {
        let Some(plan) = self.condemned.get(id) else {
            return Ok(());
        };
        let store = self.inner.repo.store();
        let budget = plan.declare_window() / 2;
        let mut waiting = false;
        loop {
            if store.get_opt(&done_key(&plan.id)).await?.is_some() {
                return Ok(());
            }
            let checked = Instant::now();
            if self.sweep_running(&plan.id).await? {
                if !waiting {
                    tracing::info!(
                        "chunk {id} was condemned by gc plan {}, which is being swept; waiting for the sweep to finish",
                        plan.id
                    );
                    waiting = true;
                }
                tokio::time::sleep(SWEEP_POLL).await;
                continue;
            }
            let mut record = self.inner.record.lock().await;
            record.rescued.push(id.to_hex());
            self.inner.write(&record).await?;
            drop(record);
            if checked.elapsed() < budget {
                return Ok(());
            }
            tracing::warn!(
                "declaring chunk {id} took longer than {} s; checking gc plan {} again",
                budget.as_secs(),
                plan.id
            );
        }
    }

    /// Whether a sweep of `plan` holds a fresh marker: one rewritten within [`STALE_AFTER`] of
    /// this session's own last write (both store clock).
    async fn sweep_running(&self, plan: &str) -> Result<bool> {
        let store = self.inner.repo.store();
        let Some(marker) = store.modified(&sweeping_key(plan)).await? else {
            return Ok(false);
        };
        let now = store.modified(&self.inner.key).await?.unwrap_or(marker);
        Ok((now - marker).to_std().unwrap_or_default() < STALE_AFTER)
    }

    /// Checks that the session still holds its lease; call it right before publishing a
    /// snapshot.
    ///
    /// # Errors
    /// [`crate::Error::LeaseLost`] when the session object could not be rewritten for [`super::LEASE`]:
    /// `gc` may already treat the session as dead and delete what it relies on.
    pub fn check_lease(&self) -> Result<()> {
        self.inner.last_write.check(&self.id)
    }

    /// Saves the ids this session stored so far to the chunk cache, so that a run killed later
    /// does not store them again. Only when every chunk claimed so far is durable (after a
    /// sync), as `copy` is after each snapshot it publishes.
    ///
    /// # Errors
    /// Those of [`crate::cache::KnownChunks::save`]; the saved cache is then as before.
    pub fn save_cache(&self) -> Result<()> {
        self.known.save()
    }

    /// Ends the session: saves the chunk cache when `succeeded`, and marks the session object
    /// ended (a PUT, so append-only credentials suffice) so `gc` need not wait for it.
    pub async fn finish(&self, succeeded: bool) {
        self.heartbeat.abort();
        if succeeded {
            if let Err(e) = self.known.save() {
                tracing::warn!("could not save the chunk cache: {e}");
            }
        }
        let mut record = self.inner.record.lock().await;
        record.ended = true;
        if let Err(e) = self.inner.write(&record).await {
            tracing::warn!(
                "could not mark session {} ended; gc will wait until it looks dead: {e}",
                self.id
            );
        }
    }
}
