//! In-memory openraft storage for the simulation, with a disk that can lose
//! what was not flushed.
//!
//! Why not sled: a simulated crash must drop exactly the writes that were not
//! yet durable, at a simulated instant, and replay identically for a seed. So
//! a node's storage is two layers:
//!
//! - [`Disk`]: what survived the last flush. The simulation owns it (one per
//!   node, outside the turmoil host), so it outlives a crash of the host;
//! - a cache (what reads see) plus a queue of writes not yet flushed, owned by
//!   the running incarnation and lost with it.
//!
//! A flush takes simulated time and then moves every queued write to the disk,
//! in order (like sled, whose log makes writes durable in the order they were
//! made). The contract is the one `raftgen-storage` keeps on sled: `append`
//! calls the `LogFlushed` callback only after a flush covering its entries;
//! `save_vote`, `truncate` and `purge` return only after a flush; the purge
//! marker is written with the purge; a snapshot is flushed before
//! `build_snapshot`/`install_snapshot` return; `save_committed` is not flushed
//! on its own. The state machine itself is volatile: after a restart it is the
//! last flushed snapshot, and openraft replays the log from there.
//!
//! Result images have the embedded store's contract (`src/node/results/
//! store.rs`): a blob written is readable at once but durable only once
//! synced (`put_blob` with `sync`, which takes a flush delay), and a crash
//! loses every blob not synced yet. Unlike the log, a blob is synced only on
//! its own (an fsync of one file makes no other file durable).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::Duration;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, RaftSnapshotBuilder, StorageError,
    StorageIOError, Vote,
};
use raftgen_raft::command::ClusterConfig;
use raftgen_raft::result::ResultHash;
use raftgen_raft::state::JobStateMachine;
use raftgen_raft::{codec, Response};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::runtime::{self, Entry, LogId, SimTypeConfig, StoredMembership};
use super::world::Counters;

type Meta = SnapshotMeta<u64, openraft::BasicNode>;

/// Longest one simulated flush takes, in simulated milliseconds (uniform from 0).
const MAX_FLUSH_DELAY_MS: u64 = 10;

/// Everything a snapshot holds, swapped as one value (as in `raftgen-storage`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SmData {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    pub jobs: JobStateMachine,
}

#[derive(Clone)]
struct StoredSnapshot {
    meta: Meta,
    data: Vec<u8>,
}

/// One node's durable state: what its last flush wrote.
#[derive(Clone, Default)]
pub struct Disk {
    vote: Option<Vote<u64>>,
    committed: Option<LogId>,
    last_purged: Option<LogId>,
    log: BTreeMap<u64, Entry>,
    snapshot: Option<StoredSnapshot>,
    /// Bytes every flush wrote to this disk so far (encoded log entries,
    /// votes, snapshots, synced result images), for the scale run.
    bytes_written: u64,
    /// Synced result images, with when they were last written (simulated ms).
    blobs: BTreeMap<ResultHash, (Vec<u8>, u64)>,
}

impl Disk {
    /// Log entries held, for the report (the log must stay bounded).
    pub fn log_len(&self) -> usize {
        self.log.len()
    }

    /// Bytes flushed to this disk since the run began.
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// Bytes of the stored snapshot's data (0 before the first).
    pub fn snapshot_bytes(&self) -> u64 {
        self.snapshot.as_ref().map_or(0, |s| s.data.len() as u64)
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Vote(v) => self.vote = Some(v),
            Op::Committed(c) => self.committed = c,
            Op::Append(entries) => {
                for e in entries {
                    self.log.insert(e.log_id.index, e);
                }
            }
            Op::Truncate(index) => {
                self.log.split_off(&index);
            }
            Op::Purge(log_id) => {
                self.last_purged = Some(log_id);
                self.log = self.log.split_off(&(log_id.index + 1));
            }
            Op::Snapshot(s) => self.snapshot = Some(s),
        }
    }
}

/// A write not yet flushed.
#[derive(Clone)]
enum Op {
    Vote(Vote<u64>),
    Committed(Option<LogId>),
    Append(Vec<Entry>),
    Truncate(u64),
    Purge(LogId),
    Snapshot(StoredSnapshot),
}

struct Inner {
    /// Durable: shared with the simulation, survives the host.
    disk: Arc<Mutex<Disk>>,
    /// What reads see: the disk plus every write not yet flushed.
    cache: Mutex<Disk>,
    /// Writes not yet flushed, oldest first, with their encoded size.
    pending: Mutex<Vec<(Op, u64)>>,
    /// Result images written but not synced (lost with the incarnation).
    blobs_pending: Mutex<BTreeMap<ResultHash, (Vec<u8>, u64)>>,
    sm: RwLock<SmData>,
    /// One wake-up per task that waits for applied entries, in subscription
    /// order (see [`Applied`]).
    watchers: Mutex<Vec<Arc<Notify>>>,
    snapshot_counter: AtomicU64,
    counters: Arc<Counters>,
}

/// Wakes one task whenever entries were applied (or a snapshot installed).
///
/// Why not a `tokio::sync::watch` channel: tokio registers each waiter of a
/// watch channel in one of eight lists picked at random (a generator seeded
/// from the OS unless tokio is built with `--cfg tokio_unstable`) and wakes
/// the lists in order, so tasks waiting on one channel wake in a random order
/// and the simulation would not replay. Here every waiter has its own
/// `Notify`, woken in subscription order; a wake-up that finds the task busy
/// is kept for its next wait, so none is missed.
pub struct Applied(Arc<Notify>);

impl Applied {
    pub async fn changed(&self) {
        self.0.notified().await
    }
}

/// A node's storage, for one incarnation of the node. Cloning shares it.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

fn io_err(subject: ErrorSubject<u64>, verb: ErrorVerb, e: impl std::fmt::Display) -> StorageError<u64> {
    StorageIOError::new(subject, verb, openraft::AnyError::error(e.to_string())).into()
}

impl Store {
    /// Opens what `disk` holds, as a restarted process would: the log and vote
    /// as flushed, the state machine as of the last flushed snapshot.
    pub fn open(disk: Arc<Mutex<Disk>>, counters: Arc<Counters>) -> Result<Store, String> {
        let durable = disk.lock().expect("disk lock").clone();
        let sm = match &durable.snapshot {
            Some(s) => {
                let data: SmData = codec::decode(&s.data).map_err(|e| e.to_string())?;
                data.jobs.check_invariants()?;
                data
            }
            None => SmData { jobs: JobStateMachine::new(ClusterConfig::default()), ..Default::default() },
        };
        Ok(Store {
            inner: Arc::new(Inner {
                disk,
                cache: Mutex::new(durable),
                pending: Mutex::new(Vec::new()),
                blobs_pending: Mutex::new(BTreeMap::new()),
                sm: RwLock::new(sm),
                watchers: Mutex::new(Vec::new()),
                snapshot_counter: AtomicU64::new(0),
                counters,
            }),
        })
    }

    /// The applied state, under a shared lock: keep the guard short.
    pub fn read(&self) -> RwLockReadGuard<'_, SmData> {
        self.inner.sm.read().expect("state lock")
    }

    /// Wake-ups on every change to the applied state, for one task.
    pub fn subscribe(&self) -> Applied {
        let notify = Arc::new(Notify::new());
        self.inner.watchers.lock().expect("watchers lock").push(notify.clone());
        Applied(notify)
    }

    fn notify_applied(&self) {
        for w in self.inner.watchers.lock().expect("watchers lock").iter() {
            w.notify_one();
        }
    }

    /// Writes made but not flushed yet (result images not synced included).
    pub fn unflushed_writes(&self) -> usize {
        self.inner.pending.lock().expect("pending lock").len()
            + self.inner.blobs_pending.lock().expect("blob lock").len()
    }

    /// The last committed log index openraft told this node (0 before any).
    pub fn committed_index(&self) -> u64 {
        self.inner.cache.lock().expect("cache lock").committed.map_or(0, |l| l.index)
    }

    /// Writes a result image at simulated time `now_ms`; with `sync`, waits a
    /// flush delay and makes it durable (the embedded store's write, fsync,
    /// rename). Without, it is lost if the node crashes before a later sync
    /// of the same image.
    pub async fn put_blob(&self, sha: ResultHash, bytes: Vec<u8>, now_ms: u64, sync: bool) {
        if !sync {
            self.inner.blobs_pending.lock().expect("blob lock").insert(sha, (bytes, now_ms));
            return;
        }
        self.inner.blobs_pending.lock().expect("blob lock").insert(sha, (bytes, now_ms));
        tokio::time::sleep(Duration::from_millis(runtime::gen_range(0..MAX_FLUSH_DELAY_MS + 1))).await;
        if let Some(blob) = self.inner.blobs_pending.lock().expect("blob lock").remove(&sha) {
            let mut disk = self.inner.disk.lock().expect("disk lock");
            disk.bytes_written += blob.0.len() as u64;
            disk.blobs.insert(sha, blob);
        }
    }

    /// A result image held here (synced or not).
    pub fn get_blob(&self, sha: &ResultHash) -> Option<Vec<u8>> {
        if let Some((b, _)) = self.inner.blobs_pending.lock().expect("blob lock").get(sha) {
            return Some(b.clone());
        }
        self.inner.disk.lock().expect("disk lock").blobs.get(sha).map(|(b, _)| b.clone())
    }

    /// Every image held, with when it was last written.
    pub fn blobs(&self) -> BTreeMap<ResultHash, u64> {
        let mut out: BTreeMap<ResultHash, u64> =
            self.inner.disk.lock().expect("disk lock").blobs.iter().map(|(h, (_, t))| (*h, *t)).collect();
        for (h, (_, t)) in self.inner.blobs_pending.lock().expect("blob lock").iter() {
            out.insert(*h, *t);
        }
        out
    }

    pub fn delete_blob(&self, sha: &ResultHash) {
        self.inner.blobs_pending.lock().expect("blob lock").remove(sha);
        self.inner.disk.lock().expect("disk lock").blobs.remove(sha);
    }

    /// Records a write: visible to reads now, durable after the next flush.
    fn write(&self, op: Op) {
        let bytes = op_bytes(&op);
        self.inner.cache.lock().expect("cache lock").apply(op.clone());
        self.inner.pending.lock().expect("pending lock").push((op, bytes));
    }

    /// Waits a simulated flush delay, then makes every write made so far
    /// durable. A crash during the wait loses them.
    async fn flush(&self) {
        tokio::time::sleep(Duration::from_millis(runtime::gen_range(0..MAX_FLUSH_DELAY_MS + 1))).await;
        let ops = std::mem::take(&mut *self.inner.pending.lock().expect("pending lock"));
        let mut disk = self.inner.disk.lock().expect("disk lock");
        for (op, bytes) in ops {
            disk.bytes_written += bytes;
            disk.apply(op);
        }
    }

    /// Stores a snapshot and flushes. A built snapshot (`replace_newer` false)
    /// older than the stored one is not written: an install overtook the build.
    async fn persist(&self, stored: StoredSnapshot, replace_newer: bool) {
        {
            let cache = self.inner.cache.lock().expect("cache lock");
            let current = cache.snapshot.as_ref().and_then(|s| s.meta.last_log_id);
            if !replace_newer && current > stored.meta.last_log_id {
                return;
            }
        }
        self.write(Op::Snapshot(stored));
        self.flush().await;
    }
}

/// What a write costs the disk: its encoded size (a log entry as the log
/// stores it, a snapshot's data and metadata).
fn op_bytes(op: &Op) -> u64 {
    let len = |r: Result<Vec<u8>, codec::CodecError>| r.map_or(0, |b| b.len() as u64);
    match op {
        Op::Vote(v) => len(codec::encode(v)),
        Op::Committed(c) => len(codec::encode(c)),
        Op::Append(entries) => entries.iter().map(|e| len(codec::encode(e))).sum(),
        Op::Truncate(_) => 8,
        Op::Purge(l) => len(codec::encode(l)),
        Op::Snapshot(s) => s.data.len() as u64 + len(codec::encode(&s.meta)),
    }
}

impl RaftLogReader<SimTypeConfig> for Store {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError<u64>> {
        let start = match range.start_bound() {
            Bound::Included(i) => Bound::Included(*i),
            Bound::Excluded(i) => Bound::Excluded(*i),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included(*i),
            Bound::Excluded(i) => Bound::Excluded(*i),
            Bound::Unbounded => Bound::Unbounded,
        };
        let cache = self.inner.cache.lock().expect("cache lock");
        Ok(cache.log.range((start, end)).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<SimTypeConfig> for Store {
    type LogReader = Store;

    async fn get_log_state(&mut self) -> Result<LogState<SimTypeConfig>, StorageError<u64>> {
        let cache = self.inner.cache.lock().expect("cache lock");
        let last = cache.log.last_key_value().map(|(_, e)| e.log_id).or(cache.last_purged);
        Ok(LogState { last_purged_log_id: cache.last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Store {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError<u64>> {
        self.write(Op::Vote(*vote));
        self.flush().await;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError<u64>> {
        Ok(self.inner.cache.lock().expect("cache lock").vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError<u64>> {
        // Not flushed on its own, as on sled: the next flush carries it.
        self.write(Op::Committed(committed));
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError<u64>> {
        Ok(self.inner.cache.lock().expect("cache lock").committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<SimTypeConfig>) -> Result<(), StorageError<u64>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.write(Op::Append(entries.into_iter().collect()));
        self.flush().await;
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError<u64>> {
        Counters::add(&self.inner.counters.truncations, 1);
        self.write(Op::Truncate(log_id.index));
        self.flush().await;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError<u64>> {
        self.write(Op::Purge(log_id));
        self.flush().await;
        Ok(())
    }
}

impl RaftSnapshotBuilder<SimTypeConfig> for Store {
    async fn build_snapshot(&mut self) -> Result<Snapshot<SimTypeConfig>, StorageError<u64>> {
        let (meta, data) = {
            let sm = self.read();
            let n = self.inner.snapshot_counter.fetch_add(1, Ordering::Relaxed);
            let id = match sm.last_applied {
                Some(l) => format!("{}-{}-{n}", l.leader_id, l.index),
                None => format!("none-{n}"),
            };
            let meta = Meta { last_log_id: sm.last_applied, last_membership: sm.membership.clone(), snapshot_id: id };
            let data = codec::encode(&*sm).map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Read, e))?;
            (meta, data)
        };
        Counters::add(&self.inner.counters.snapshots_built, 1);
        self.persist(StoredSnapshot { meta: meta.clone(), data: data.clone() }, false).await;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<SimTypeConfig> for Store {
    type SnapshotBuilder = Store;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError<u64>> {
        let sm = self.read();
        Ok((sm.last_applied, sm.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError<u64>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        {
            let mut sm = self.inner.sm.write().expect("state lock");
            for entry in entries {
                sm.last_applied = Some(entry.log_id);
                out.push(match entry.payload {
                    EntryPayload::Blank => Response::Ok,
                    // The real, pure state machine: the thing under test.
                    EntryPayload::Normal(ref req) => sm.jobs.apply(entry.log_id.index, req),
                    EntryPayload::Membership(ref m) => {
                        sm.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                        Response::Ok
                    }
                });
            }
        }
        self.notify_applied();
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Store {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<u64>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(&mut self, meta: &Meta, snapshot: Box<Cursor<Vec<u8>>>) -> Result<(), StorageError<u64>> {
        let bytes = snapshot.into_inner();
        let new: SmData = codec::decode(&bytes).map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Read, e))?;
        new.jobs.check_invariants().map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Read, e))?;
        Counters::add(&self.inner.counters.snapshots_installed, 1);
        // Durable first, then visible: a crash in between replays to the same state.
        self.persist(StoredSnapshot { meta: meta.clone(), data: bytes }, true).await;
        *self.inner.sm.write().expect("state lock") = new;
        self.notify_applied();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<SimTypeConfig>>, StorageError<u64>> {
        let cache = self.inner.cache.lock().expect("cache lock");
        Ok(cache
            .snapshot
            .as_ref()
            .map(|s| Snapshot { meta: s.meta.clone(), snapshot: Box::new(Cursor::new(s.data.clone())) }))
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Waker};

    use openraft::CommittedLeaderId;
    use raftgen_raft::job::JobId;
    use raftgen_raft::Command;

    use super::*;

    fn paused_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().expect("runtime")
    }

    /// Polls `f` once: a write that is waiting for its flush.
    fn poll_once<F: Future>(f: F) {
        let mut f = pin!(f);
        let _ = f.as_mut().poll(&mut Context::from_waker(Waker::noop()));
    }

    fn entry(index: u64, cmd: Command) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(raftgen_raft::Request { at_ms: index, cmd }),
        }
    }

    #[test]
    fn a_crash_keeps_only_what_was_flushed() {
        let rt = paused_runtime();
        let disk = Arc::new(Mutex::new(Disk::default()));
        let counters = Arc::new(Counters::default());
        rt.block_on(async {
            let mut store = Store::open(disk.clone(), counters.clone()).expect("open");
            store.save_vote(&Vote::new(1, 1)).await.expect("vote");
            // A second vote whose flush never completes: the process dies first.
            poll_once(store.save_vote(&Vote::new(2, 2)));
            assert_eq!(store.read_vote().await.expect("read"), Some(Vote::new(2, 2)), "reads see the cache");
            assert_eq!(store.unflushed_writes(), 1);
        });
        let mut reopened = Store::open(disk, counters).expect("reopen");
        let vote = rt.block_on(reopened.read_vote()).expect("read");
        assert_eq!(vote, Some(Vote::new(1, 1)), "only the flushed vote survives");
    }

    #[test]
    fn a_restart_rebuilds_the_state_machine_from_the_last_snapshot() {
        let rt = paused_runtime();
        let disk = Arc::new(Mutex::new(Disk::default()));
        let counters = Arc::new(Counters::default());
        let register = Command::RegisterNode { node: 1, info: crate::sim::node::registration(2) };
        let configure = Command::Configure(ClusterConfig { max_attempts: 2, ..ClusterConfig::default() });
        rt.block_on(async {
            let mut store = Store::open(disk.clone(), counters.clone()).expect("open");
            store.apply([entry(1, register)]).await.expect("apply");
            store.build_snapshot().await.expect("snapshot");
            // Applied after the snapshot: volatile, replayed from the log by openraft.
            store.apply([entry(2, configure)]).await.expect("apply");
            assert_eq!(store.read().jobs.config().max_attempts, 2);
        });
        let reopened = Store::open(disk, counters.clone()).expect("reopen");
        let sm = reopened.read();
        assert_eq!(sm.last_applied.map(|l| l.index), Some(1));
        assert!(sm.jobs.nodes().contains_key(&1));
        assert_eq!(sm.jobs.config().max_attempts, ClusterConfig::default().max_attempts);
        assert_eq!(counters.read().snapshots_built, 1);
    }

    #[test]
    fn purge_and_truncate_reach_the_disk_together_with_the_marker() {
        let rt = paused_runtime();
        let disk = Arc::new(Mutex::new(Disk::default()));
        let counters = Arc::new(Counters::default());
        rt.block_on(async {
            let store = Store::open(disk.clone(), counters.clone()).expect("open");
            let entries: Vec<Entry> = (1..=6).map(|i| entry(i, Command::Cancel { job: JobId(i as u128) })).collect();
            store.write(Op::Append(entries));
            store.flush().await;
            let mut s = store.clone();
            s.purge(LogId::new(CommittedLeaderId::new(1, 1), 2)).await.expect("purge");
            s.truncate(LogId::new(CommittedLeaderId::new(1, 1), 5)).await.expect("truncate");
        });
        let mut reopened = Store::open(disk, counters).expect("reopen");
        let state = rt.block_on(reopened.get_log_state()).expect("state");
        assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(2));
        assert_eq!(state.last_log_id.map(|l| l.index), Some(4));
        let left = rt.block_on(reopened.try_get_log_entries(0..100)).expect("read");
        assert_eq!(left.iter().map(|e| e.log_id.index).collect::<Vec<_>>(), vec![3, 4]);
    }
}
