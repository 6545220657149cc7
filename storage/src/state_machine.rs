//! The job state machine behind openraft's `RaftStateMachine`, plus a cheap
//! read handle ([`StateView`]) for the HTTP API, the scheduler and the executor
//! host.
//!
//! The state lives in memory as one [`SmData`] value (state + applied log id +
//! membership), changed only under a write lock, so `apply` and the applied id
//! move together. It is made durable by snapshots written to sled (flushed);
//! after a restart openraft replays the log from the snapshot's last id up to
//! the persisted committed id. Logs are only purged up to a snapshot, so the
//! replay always finds what it needs.

use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder, StorageError, StorageIOError};
use raftgen_raft::state::JobStateMachine;
use raftgen_raft::{codec, LogId, NodeId, Response, StoredMembership, TypeConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

type Entry = openraft::Entry<TypeConfig>;
type Meta = SnapshotMeta<NodeId, openraft::BasicNode>;

/// The stored snapshot: its metadata (bincode) and its data (raw bytes, so
/// serving it to a lagging follower is a copy, not a decode), written together
/// in one sled batch.
const KEY_SNAPSHOT_META: &[u8] = b"meta";
const KEY_SNAPSHOT_DATA: &[u8] = b"data";

/// Everything a snapshot holds, swapped as one value.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SmData {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    pub jobs: JobStateMachine,
}

struct StoredSnapshot {
    meta: Meta,
    data: Vec<u8>,
}

fn read_stored(tree: &sled::Tree) -> Result<Option<StoredSnapshot>, String> {
    let meta = tree.get(KEY_SNAPSHOT_META).map_err(|e| e.to_string())?;
    let data = tree.get(KEY_SNAPSHOT_DATA).map_err(|e| e.to_string())?;
    match (meta, data) {
        (Some(meta), Some(data)) => {
            let meta: Meta = codec::decode(&meta).map_err(|e| e.to_string())?;
            Ok(Some(StoredSnapshot { meta, data: data.to_vec() }))
        }
        (None, None) => Ok(None),
        _ => Err("snapshot metadata and data do not match".into()),
    }
}

struct Shared {
    db: sled::Db,
    flusher: crate::flusher::Flusher,
    snapshots: sled::Tree,
    data: RwLock<SmData>,
    /// The last applied log index, for anyone waiting on a change.
    applied: watch::Sender<u64>,
    /// The last committed log index (written by the log store).
    committed: Arc<AtomicU64>,
    /// Bytes of entries applied since the last snapshot (snapshot-by-size).
    bytes_since_snapshot: AtomicU64,
    snapshot_counter: AtomicU64,
    /// Bytes of the snapshot stored in sled (its data), for the metrics.
    snapshot_bytes: AtomicU64,
    /// The last log id of the snapshot stored in sled. openraft builds snapshots
    /// in a task of their own, so a build that read the state before an install
    /// can finish after it: it must not replace the newer snapshot on disk.
    persisted: Mutex<Option<LogId>>,
}

/// openraft's handle on the state machine.
#[derive(Clone)]
pub struct StateMachineStore {
    shared: Arc<Shared>,
}

/// A read-only handle on the applied state, for the rest of the node.
#[derive(Clone)]
pub struct StateView {
    shared: Arc<Shared>,
}

fn sm_err(verb: ErrorVerb, e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::new(ErrorSubject::StateMachine, verb, openraft::AnyError::error(e.to_string())).into()
}

impl StateMachineStore {
    pub(crate) fn new(
        db: sled::Db,
        flusher: crate::flusher::Flusher,
        committed: Arc<AtomicU64>,
    ) -> Result<Self, std::io::Error> {
        let snapshots = db.open_tree("snapshot").map_err(crate::io_err)?;
        let (data, persisted, stored_bytes) = match read_stored(&snapshots).map_err(crate::io_err)? {
            Some(stored) => {
                let data: SmData = codec::decode(&stored.data).map_err(crate::io_err)?;
                data.jobs.check_invariants().map_err(crate::io_err)?;
                (data, stored.meta.last_log_id, stored.data.len() as u64)
            }
            None => (SmData::default(), None, 0),
        };
        let (applied, _) = watch::channel(data.last_applied.map_or(0, |l| l.index));
        Ok(StateMachineStore {
            shared: Arc::new(Shared {
                db,
                flusher,
                snapshots,
                data: RwLock::new(data),
                applied,
                committed,
                bytes_since_snapshot: AtomicU64::new(0),
                snapshot_counter: AtomicU64::new(0),
                snapshot_bytes: AtomicU64::new(stored_bytes),
                persisted: Mutex::new(persisted),
            }),
        })
    }

    pub fn view(&self) -> StateView {
        StateView { shared: self.shared.clone() }
    }

    /// Stores the snapshot and flushes. A built snapshot (`replace_newer` false)
    /// older than the stored one is not written: an install overtook the build.
    async fn persist(&self, stored: &StoredSnapshot, replace_newer: bool) -> Result<(), StorageError<NodeId>> {
        let meta = codec::encode(&stored.meta).map_err(|e| sm_err(ErrorVerb::Write, e))?;
        let mut batch = sled::Batch::default();
        batch.insert(KEY_SNAPSHOT_META, meta);
        batch.insert(KEY_SNAPSHOT_DATA, stored.data.as_slice());
        {
            let mut persisted = self.shared.persisted.lock().expect("snapshot lock poisoned");
            if !replace_newer && *persisted > stored.meta.last_log_id {
                return Ok(());
            }
            self.shared.snapshots.apply_batch(batch).map_err(|e| sm_err(ErrorVerb::Write, e))?;
            *persisted = stored.meta.last_log_id;
            self.shared.snapshot_bytes.store(stored.data.len() as u64, Ordering::Relaxed);
        }
        self.shared.flusher.flush().await.map_err(|e| sm_err(ErrorVerb::Write, e))?;
        Ok(())
    }
}

impl StateView {
    /// Reads the applied state under a shared lock. Keep `f` short: applies wait.
    pub fn read(&self) -> RwLockReadGuard<'_, SmData> {
        self.shared.data.read().expect("state lock poisoned")
    }

    /// Changes to the last applied log index.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.applied.subscribe()
    }

    /// The last applied log index (0 before the first).
    pub fn applied_index(&self) -> u64 {
        *self.shared.applied.borrow()
    }

    /// The last log index this node knows to be committed (0 before the
    /// first). It runs ahead of [`Self::applied_index`] while entries wait
    /// to be applied, e.g. during the replay after a restart.
    pub fn committed_index(&self) -> u64 {
        self.shared.committed.load(Ordering::Relaxed)
    }

    pub fn bytes_since_snapshot(&self) -> u64 {
        self.shared.bytes_since_snapshot.load(Ordering::Relaxed)
    }

    /// Bytes of the stored snapshot's data (0 before the first).
    pub fn snapshot_bytes(&self) -> u64 {
        self.shared.snapshot_bytes.load(Ordering::Relaxed)
    }

    /// Bytes sled uses on disk (log, vote and snapshot together).
    pub fn disk_bytes(&self) -> u64 {
        self.shared.db.size_on_disk().unwrap_or(0)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let (meta, data) = {
            let data = self.shared.data.read().expect("state lock poisoned");
            let n = self.shared.snapshot_counter.fetch_add(1, Ordering::Relaxed);
            let id = match data.last_applied {
                Some(l) => format!("{}-{}-{n}", l.leader_id, l.index),
                None => format!("none-{n}"),
            };
            let meta =
                Meta { last_log_id: data.last_applied, last_membership: data.membership.clone(), snapshot_id: id };
            (meta, codec::encode(&*data).map_err(|e| sm_err(ErrorVerb::Read, e))?)
        };
        self.shared.bytes_since_snapshot.store(0, Ordering::Relaxed);
        let stored = StoredSnapshot { meta: meta.clone(), data };
        self.persist(&stored, false).await?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(stored.data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError<NodeId>> {
        let data = self.shared.data.read().expect("state lock poisoned");
        Ok((data.last_applied, data.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let mut out = Vec::new();
        let mut bytes = 0u64;
        let last = {
            let mut data = self.shared.data.write().expect("state lock poisoned");
            for entry in entries {
                data.last_applied = Some(entry.log_id);
                out.push(match entry.payload {
                    EntryPayload::Blank => Response::Ok,
                    EntryPayload::Normal(ref req) => {
                        bytes += req.cmd.approx_bytes();
                        data.jobs.apply(entry.log_id.index, req)
                    }
                    EntryPayload::Membership(ref m) => {
                        data.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                        Response::Ok
                    }
                });
            }
            data.last_applied.map_or(0, |l| l.index)
        };
        self.shared.bytes_since_snapshot.fetch_add(bytes, Ordering::Relaxed);
        self.shared.applied.send_replace(last);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let bytes = snapshot.into_inner();
        let new: SmData = codec::decode(&bytes).map_err(|e| sm_err(ErrorVerb::Read, e))?;
        new.jobs.check_invariants().map_err(|e| sm_err(ErrorVerb::Read, e))?;
        // Durable first, then visible: a crash in between replays to the same state.
        self.persist(&StoredSnapshot { meta: meta.clone(), data: bytes }, true).await?;
        let last = new.last_applied.map_or(0, |l| l.index);
        *self.shared.data.write().expect("state lock poisoned") = new;
        self.shared.bytes_since_snapshot.store(0, Ordering::Relaxed);
        self.shared.applied.send_replace(last);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let Some(stored) = read_stored(&self.shared.snapshots).map_err(|e| sm_err(ErrorVerb::Read, e))? else {
            return Ok(None);
        };
        Ok(Some(Snapshot { meta: stored.meta, snapshot: Box::new(Cursor::new(stored.data)) }))
    }
}
