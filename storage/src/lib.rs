//! sled-backed openraft storage for raftgen: a Raft log that is on disk before
//! it is acknowledged, and a job state machine that is made durable by
//! snapshots (and rebuilt by replaying the log after the last one).
//!
//! Durability contract (see README, "Durability"):
//! - `append` calls the `LogFlushed` callback only after a sled `flush()` of the
//!   whole batch followed by `syncfs` on the database's filesystem (group
//!   commit: one flush and one sync per batch, not per entry, and one for all
//!   batches and votes that wait at the same time: see `flusher`);
//! - `save_vote`, `truncate` and `purge` return only after the same;
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

/// How far a flush goes before a write is acknowledged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// sled's `flush()`, then `syncfs` on the filesystem that holds the
    /// database: its data, the files sled creates (blobs, snapshots) and their
    /// metadata reach stable storage, disk caches included, before the
    /// answer. Survives a power loss. The default.
    #[default]
    Sync,
    /// sled's `flush()` only (`pwrite` + `sync_file_range`, which flushes
    /// neither the disk's cache nor file metadata); sled's own thread syncs
    /// every 500 ms. Survives a crash of the process, not a power loss or
    /// kernel crash of a majority of nodes within that window
    /// (`--unsafe-no-fsync`; `tests/powerloss.rs` shows the loss).
    UnsafeFlushOnly,
}

/// Opens (or creates) the node's data directory, with [`Durability::Sync`].
pub fn open(dir: &Path) -> Result<(LogStore, StateMachineStore), std::io::Error> {
    open_with(dir, Durability::Sync)
}

/// Opens (or creates) the node's data directory.
pub fn open_with(dir: &Path, durability: Durability) -> Result<(LogStore, StateMachineStore), std::io::Error> {
    std::fs::create_dir_all(dir)?;
    let db = sled::Config::new()
        .path(dir.join("sled"))
        .cache_capacity(64 << 20)
        .flush_every_ms(Some(500))
        .open()
        .map_err(std::io::Error::other)?;
    let sync = match durability {
        Durability::Sync => Some(std::fs::File::open(dir.join("sled"))?),
        Durability::UnsafeFlushOnly => None,
    };
    let flusher = flusher::Flusher::start(db.clone(), sync)?;
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
