//! Keeping every node's result store in step with the replicated state.
//!
//! Retention is decided in `apply` (count and bytes, like every other
//! replicated decision); what it evicts must then leave the disks. Every
//! node, a few times a minute, once it has applied everything it knows to be
//! committed (a node that lags must not act on an old state):
//!
//! - deletes the images it holds that no retained result lists it as a
//!   holder of (evicted, trimmed by repair, or orphans: pushed for a job
//!   that was never reported), once they are older than
//!   `--result-orphan-grace-ms`. The grace keeps a copy that was just
//!   pushed, for a job not reported yet, and an image written again after
//!   it was evicted (images are named by content);
//! - reports the images the state says it holds but it does not (a disk
//!   replaced, a file damaged and deleted): `ResultDropped { lost: true }`,
//!   so the leader's repair makes a new copy elsewhere. The state is read
//!   before the store, and a node is listed only once its copy is durable,
//!   so a copy in flight is never reported lost.
//!
//! On the leader, with an object store: deletes the keys the state queued
//! (`ObjectsDeleted` clears them from the queue) and, every
//! `sweep_interval_ms`, lists the prefix and deletes uploads that no result
//! names and that are older than the grace (an executor that died between
//! upload and report).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use raftgen_raft::result::{Location, ResultHash};
use raftgen_raft::Command;

use super::object::now_ms;
use crate::node::app::App;

/// How often the janitor looks.
const TICK_MS: u64 = 2_000;
/// Most deletions and loss reports per look (the rest wait for the next).
const MAX_DELETIONS_PER_TICK: usize = 2_000;
const MAX_LOSS_REPORTS_PER_TICK: usize = 256;
/// Most queued object deletions handled per look, and objects one sweep lists.
const MAX_OBJECT_DELETIONS_PER_TICK: usize = 256;
const MAX_SWEEP_OBJECTS: usize = 1_000_000;
/// The first sweep after a node starts leading waits this long.
const FIRST_SWEEP_DELAY_MS: u64 = 60_000;

/// Whether this node's applied state is current enough to act on: it is a
/// member, knows a leader, and has applied all it knows to be committed.
fn caught_up(app: &App) -> bool {
    app.is_member() && app.leader().is_some() && app.view.applied_index() >= app.view.committed_index()
}

pub async fn run(app: Arc<App>) {
    let mut shutdown = app.shutdown.clone();
    let mut next_sweep: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(TICK_MS)) => {}
            _ = shutdown.changed() => return,
        }
        if !caught_up(&app) {
            continue;
        }
        tidy_local(&app).await;
        if app.is_leader() && app.results.object.is_some() {
            delete_queued_objects(&app).await;
            let now = Instant::now();
            let due = next_sweep.get_or_insert(now + Duration::from_millis(FIRST_SWEEP_DELAY_MS));
            if now >= *due {
                sweep_objects(&app).await;
                next_sweep = Some(now + Duration::from_millis(app.results.settings.sweep_interval_ms));
            }
        } else {
            next_sweep = None;
        }
    }
}

/// Deletes what this node need not hold; reports what it should but does not.
async fn tidy_local(app: &App) {
    let mine: BTreeSet<ResultHash> = {
        let data = app.view.read();
        data.jobs
            .blobs()
            .filter(|(_, b)| b.location.nodes().is_some_and(|h| h.contains(&app.id)))
            .map(|(sha, _)| *sha)
            .collect()
    };
    let held = app.results.local.list();
    let grace = Duration::from_millis(app.results.settings.orphan_grace_ms);
    let now = SystemTime::now();
    let stale: Vec<ResultHash> = held
        .iter()
        .filter(|(sha, h)| !mine.contains(sha) && now.duration_since(h.touched).is_ok_and(|age| age >= grace))
        .map(|(sha, _)| *sha)
        .take(MAX_DELETIONS_PER_TICK)
        .collect();
    if !stale.is_empty() {
        let local = app.results.local.clone();
        let n = stale.len();
        let deleted = tokio::task::spawn_blocking(move || {
            stale
                .iter()
                .filter(|sha| local.remove(sha).map_err(|e| tracing::warn!("deleting {sha}: {e}")).is_ok())
                .count()
        })
        .await
        .unwrap_or(0);
        tracing::debug!("deleted {deleted} of {n} result image(s) no retained job keeps here");
    }
    let held: BTreeSet<ResultHash> = held.into_iter().map(|(sha, _)| sha).collect();
    let lost: Vec<ResultHash> =
        mine.iter().filter(|sha| !held.contains(sha)).take(MAX_LOSS_REPORTS_PER_TICK).copied().collect();
    for sha in lost {
        // Looked up again: a copy stored since the listing is not lost.
        if app.results.local.contains(&sha) {
            continue;
        }
        tracing::warn!("result {sha} is listed here but this node has no copy: reporting it lost");
        let cmd = Command::ResultDropped { sha256: sha, node: app.id, lost: true };
        if let Err(e) = app.write(cmd, Duration::from_millis(TICK_MS)).await {
            tracing::debug!("reporting result {sha} lost: {e}");
        }
    }
}

async fn delete_queued_objects(app: &App) {
    let Some(object) = &app.results.object else { return };
    let queued: Vec<(u64, String)> = {
        let data = app.view.read();
        data.jobs.object_deletions().take(MAX_OBJECT_DELETIONS_PER_TICK).map(|(s, k)| (s, k.to_string())).collect()
    };
    if queued.is_empty() {
        return;
    }
    let mut done = Vec::new();
    for (seq, key) in queued {
        match object.delete(&key).await {
            Ok(()) => done.push(seq),
            Err(e) => {
                tracing::warn!("deleting {key} from {}: {e:#}", object.url);
                break;
            }
        }
    }
    if !done.is_empty() {
        let n = done.len();
        if let Err(e) = app.propose_local(Command::ObjectsDeleted { seqs: done }).await {
            tracing::debug!("recording {n} object deletion(s): {e:?}");
        }
    }
}

async fn sweep_objects(app: &App) {
    let Some(object) = &app.results.object else { return };
    let listed = match object.list(MAX_SWEEP_OBJECTS).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("listing {} for orphans: {e:#}", object.url);
            return;
        }
    };
    let named: BTreeSet<String> = {
        let data = app.view.read();
        let keys = data.jobs.blobs().filter_map(|(_, b)| match &b.location {
            Location::Object(k) => Some(k.clone()),
            Location::Nodes(_) => None,
        });
        keys.chain(data.jobs.object_deletions().map(|(_, k)| k.to_string())).collect()
    };
    let cutoff = now_ms().saturating_sub(app.results.settings.orphan_grace_ms);
    let mut deleted = 0;
    for l in listed.iter().filter(|l| !named.contains(&l.key) && l.modified_ms < cutoff) {
        match object.delete(&l.key).await {
            Ok(()) => deleted += 1,
            Err(e) => tracing::warn!("deleting orphan {} from {}: {e:#}", l.key, object.url),
        }
    }
    if deleted > 0 {
        tracing::info!("swept {deleted} orphaned result upload(s) from {}", object.url);
    }
}
