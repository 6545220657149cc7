//! Elections off while a snapshot is being received.
//!
//! openraft 0.9 streams a snapshot to a lagging follower from the same loop
//! that sends it heartbeats, and has no pre-vote. A follower installing a large
//! snapshot therefore hears nothing for a while, its election timer fires, and
//! its higher term makes the leader step down; the next leader starts the
//! snapshot again: a livelock. A node receiving snapshot chunks knows a leader
//! is alive, so it does not stand for election until `grace` after the last
//! chunk was handled.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use raftgen_raft::Raft;

#[derive(Clone)]
pub struct SnapshotGuard {
    inner: Arc<Inner>,
}

struct Inner {
    raft: Raft,
    grace: Duration,
    receiving: AtomicUsize,
    generation: AtomicU64,
}

/// Held while one snapshot chunk is being handled.
pub struct Receiving {
    inner: Arc<Inner>,
}

impl SnapshotGuard {
    pub fn new(raft: Raft, grace: Duration) -> Self {
        SnapshotGuard {
            inner: Arc::new(Inner { raft, grace, receiving: AtomicUsize::new(0), generation: AtomicU64::new(0) }),
        }
    }

    pub fn enter(&self) -> Receiving {
        self.inner.receiving.fetch_add(1, Ordering::SeqCst);
        self.inner.generation.fetch_add(1, Ordering::SeqCst);
        self.inner.raft.runtime_config().elect(false);
        Receiving { inner: self.inner.clone() }
    }
}

impl Drop for Receiving {
    fn drop(&mut self) {
        self.inner.receiving.fetch_sub(1, Ordering::SeqCst);
        let generation = self.inner.generation.load(Ordering::SeqCst);
        let inner = self.inner.clone();
        tokio::spawn(async move {
            tokio::time::sleep(inner.grace).await;
            // Re-enable only if no chunk arrived since.
            if inner.receiving.load(Ordering::SeqCst) == 0 && inner.generation.load(Ordering::SeqCst) == generation {
                inner.raft.runtime_config().elect(true);
            }
        });
    }
}
