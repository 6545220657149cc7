//! The Raft log, vote and purge marker in sled, flushed before acknowledging.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, StorageError, StorageIOError, Vote};
use raftgen_raft::{codec, LogId, NodeId, TypeConfig};

type Entry = openraft::Entry<TypeConfig>;

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";

/// Log entries keyed by big-endian index (so sled's order is log order), plus a
/// `meta` tree for the vote, the committed id and the last purged id.
#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    flusher: crate::flusher::Flusher,
    logs: sled::Tree,
    meta: sled::Tree,
    /// The last committed log index, as openraft last reported it (see
    /// `save_committed`), shared with [`crate::StateView::committed_index`].
    committed: Arc<AtomicU64>,
}

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn read_err(subject: ErrorSubject<NodeId>, e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::new(subject, ErrorVerb::Read, openraft::AnyError::error(e.to_string())).into()
}

fn write_err(subject: ErrorSubject<NodeId>, e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::new(subject, ErrorVerb::Write, openraft::AnyError::error(e.to_string())).into()
}

impl LogStore {
    pub(crate) fn new(
        db: sled::Db,
        flusher: crate::flusher::Flusher,
        committed: Arc<AtomicU64>,
    ) -> Result<Self, std::io::Error> {
        let logs = db.open_tree("logs").map_err(crate::io_err)?;
        let meta = db.open_tree("meta").map_err(crate::io_err)?;
        let store = LogStore { db, flusher, logs, meta, committed };
        let persisted = store.get_meta::<Option<LogId>>(KEY_COMMITTED).map_err(crate::io_err)?.flatten();
        store.committed.store(persisted.map_or(0, |l| l.index), Ordering::Relaxed);
        Ok(store)
    }

    // openraft's own error type; boxing it here would only be unboxed again.
    #[allow(clippy::result_large_err)]
    fn get_meta<T: serde::de::DeserializeOwned>(&self, k: &[u8]) -> Result<Option<T>, StorageError<NodeId>> {
        match self.meta.get(k).map_err(|e| read_err(ErrorSubject::Store, e))? {
            Some(v) => codec::decode(&v).map(Some).map_err(|e| read_err(ErrorSubject::Store, e)),
            None => Ok(None),
        }
    }

    // openraft's own error type; boxing it here would only be unboxed again.
    #[allow(clippy::result_large_err)]
    fn put_meta<T: serde::Serialize>(&self, k: &[u8], v: &T) -> Result<(), StorageError<NodeId>> {
        let bytes = codec::encode(v).map_err(|e| write_err(ErrorSubject::Store, e))?;
        self.meta.insert(k, bytes).map_err(|e| write_err(ErrorSubject::Store, e))?;
        Ok(())
    }

    async fn flush(&self) -> Result<(), StorageError<NodeId>> {
        self.flusher.flush().await.map_err(|e| write_err(ErrorSubject::Logs, e))?;
        Ok(())
    }

    /// Bytes sled uses on disk (all trees).
    pub fn disk_bytes(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError<NodeId>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included(key(*i)),
            Bound::Excluded(i) => Bound::Excluded(key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for item in self.logs.range((Bound::Included(key(start)), end)) {
            let (_, v) = item.map_err(|e| read_err(ErrorSubject::Logs, e))?;
            out.push(codec::decode::<Entry>(&v).map_err(|e| read_err(ErrorSubject::Logs, e))?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let last_purged_log_id: Option<LogId> = self.get_meta(KEY_LAST_PURGED)?;
        let last = match self.logs.last().map_err(|e| read_err(ErrorSubject::Logs, e))? {
            Some((_, v)) => Some(codec::decode::<Entry>(&v).map_err(|e| read_err(ErrorSubject::Logs, e))?.log_id),
            None => None,
        };
        // A crash between the purge marker and the removal can leave entries at
        // or below the marker (all of them, when a snapshot purged past the
        // log's end): for Raft they are gone, and the log ends at the marker.
        let last = match (last, last_purged_log_id) {
            (Some(l), Some(p)) if l.index <= p.index => Some(p),
            (l, p) => l.or(p),
        };
        Ok(LogState { last_purged_log_id, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> LogStore {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.put_meta(KEY_VOTE, vote)?;
        self.flush().await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.get_meta(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError<NodeId>> {
        // Not flushed on purpose: it only shortens replay after a restart, and
        // the next flush (every append) makes it durable anyway.
        self.put_meta(KEY_COMMITTED, &committed)?;
        self.committed.store(committed.map_or(0, |l| l.index), Ordering::Relaxed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError<NodeId>> {
        Ok(self.get_meta::<Option<LogId>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for entry in entries {
            n += 1;
            let bytes = codec::encode(&entry).map_err(|e| write_err(ErrorSubject::Logs, e))?;
            batch.insert(&key(entry.log_id.index), bytes);
        }
        self.logs.apply_batch(batch).map_err(|e| write_err(ErrorSubject::Logs, e))?;
        tracing::trace!(entries = n, "append");
        // Group commit: one flush for the whole batch, then acknowledge.
        let flushed = self.flusher.flush().await;
        let failed = flushed.as_ref().err().map(|e| write_err(ErrorSubject::Logs, e));
        callback.log_io_completed(flushed);
        failed.map_or(Ok(()), Err)
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError<NodeId>> {
        let mut batch = sled::Batch::default();
        for item in self.logs.range(key(log_id.index)..) {
            let (k, _) = item.map_err(|e| read_err(ErrorSubject::Logs, e))?;
            batch.remove(k);
        }
        self.logs.apply_batch(batch).map_err(|e| write_err(ErrorSubject::Logs, e))?;
        self.flush().await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError<NodeId>> {
        // The marker first: a crash between the two leaves entries that are
        // merely unreachable, never a log whose start is unknown.
        self.put_meta(KEY_LAST_PURGED, &log_id)?;
        let mut batch = sled::Batch::default();
        for item in self.logs.range(..=key(log_id.index)) {
            let (k, _) = item.map_err(|e| read_err(ErrorSubject::Logs, e))?;
            batch.remove(k);
        }
        self.logs.apply_batch(batch).map_err(|e| write_err(ErrorSubject::Logs, e))?;
        self.flush().await
    }
}
