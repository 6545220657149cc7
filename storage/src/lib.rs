//! sled-backed openraft storage for raftgen: a Raft log that is on disk before
//! it is acknowledged, and a job state machine that is made durable by
//! snapshots (and rebuilt by replaying the log after the last one).
//!
//! Durability contract (see README, "Durability"):
//! - `append` calls the `LogFlushed` callback only after a sled `flush()` of the
//!   whole batch (group commit: one flush per batch, not per entry, and one
//!   flush for all batches and votes that wait at the same time: see `flusher`);
//! - `save_vote`, `truncate` and `purge` return only after a flush;
//! - `last_purged_log_id` is persisted before the entries are removed;
//! - the state machine and its applied log id live in one in-memory value that
//!   is swapped atomically, and are persisted together as one snapshot record.
//!
//! One sled database holds everything, so one flush covers log, vote and
//! snapshot alike.

mod flusher;
mod log_store;
mod state_machine;

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

pub use log_store::LogStore;
pub use state_machine::{SmData, StateMachineStore, StateView};

/// Opens (or creates) the node's data directory.
pub fn open(dir: &Path) -> Result<(LogStore, StateMachineStore), std::io::Error> {
    std::fs::create_dir_all(dir)?;
    let db = sled::Config::new()
        .path(dir.join("sled"))
        .cache_capacity(64 << 20)
        .flush_every_ms(Some(500))
        .open()
        .map_err(std::io::Error::other)?;
    let flusher = flusher::Flusher::start(db.clone())?;
    // The last committed index: written by the log store when openraft
    // commits, read through the state machine's `StateView` (metrics).
    let committed = Arc::new(AtomicU64::new(0));
    let log = LogStore::new(db.clone(), flusher.clone(), committed.clone())?;
    let sm = StateMachineStore::new(db, flusher, committed)?;
    Ok((log, sm))
}

pub(crate) fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}
