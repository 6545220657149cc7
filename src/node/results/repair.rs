//! The leader's repair loop: executes [`raftgen_raft::repair::plan`].
//!
//! While this node leads it asks the pure plan, a few times a second, which
//! results lack copies (a holder left, retired, or was declared lost more
//! than `repair_delay_ms` ago) and which have one too many; it has the chosen
//! node fetch each missing copy from a live holder (`POST
//! /raft/results/{sha}/copy?from=N`: the node fetches, checks the hash,
//! syncs, answers), then records the new holder through the log
//! (`ResultCopied`). Copies start no faster than `--repair-max-mbps`
//! (cluster-wide: only the leader starts them), at most
//! [`MAX_CONCURRENT_COPIES`] at a time, so repair never starves the jobs'
//! own traffic. A copy that fails is simply planned again later.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raftgen_raft::job::NodeId;
use raftgen_raft::network::SECRET_HEADER;
use raftgen_raft::repair::{plan, Repair};
use raftgen_raft::result::ResultHash;
use raftgen_raft::Command;
use tokio::task::JoinSet;

use super::object::now_ms;
use super::peer_path;
use crate::node::app::App;

/// How often the loop plans.
const TICK_MS: u64 = 250;
/// Copies in flight at once, and decisions taken from one plan.
pub const MAX_CONCURRENT_COPIES: usize = 4;
const MAX_PLAN: usize = 64;

/// Bytes per second, with one second of burst; one item larger than the
/// burst may go once the bucket is full (it leaves a debt).
pub struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(bytes_per_s: u64) -> Self {
        TokenBucket { rate: bytes_per_s.max(1) as f64, tokens: bytes_per_s.max(1) as f64, last: Instant::now() }
    }

    /// Takes `bytes` if they fit now.
    pub fn take(&mut self, bytes: u64, now: Instant) -> bool {
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.rate);
        self.last = now;
        if self.tokens >= (bytes as f64).min(self.rate) {
            self.tokens -= bytes as f64;
            true
        } else {
            false
        }
    }
}

pub async fn run(app: Arc<App>) {
    let mut shutdown = app.shutdown.clone();
    let mut copies: JoinSet<(ResultHash, NodeId, Result<(), String>)> = JoinSet::new();
    let mut busy: BTreeSet<ResultHash> = BTreeSet::new();
    let mut bucket = TokenBucket::new(app.results.settings.repair_max_bytes_per_s);
    let node_timeout = Duration::from_millis(app.settings.node_timeout_ms);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(TICK_MS)) => {}
            Some(done) = copies.join_next(), if !copies.is_empty() => {
                if let Ok((sha, to, result)) = done {
                    busy.remove(&sha);
                    match result {
                        Ok(()) => {
                            let cmd = Command::ResultCopied { sha256: sha, node: to };
                            if let Err(e) = app.propose_local(cmd).await {
                                tracing::debug!("recording the copy of {sha} on node {to}: {e:?}");
                            }
                        }
                        Err(e) => tracing::warn!("repair copy of {sha} to node {to}: {e}"),
                    }
                }
                continue;
            }
            _ = shutdown.changed() => return,
        }
        if !app.is_leader() {
            continue;
        }
        let members: BTreeMap<NodeId, String> = app.members();
        let ids: BTreeSet<NodeId> = members.keys().copied().collect();
        let healthy = |n: NodeId| {
            n == app.id || (ids.contains(&n) && app.health.last_ack(n).is_some_and(|t| t.elapsed() < node_timeout))
        };
        let decisions = plan(&app.view.read().jobs, &ids, healthy, now_ms(), &busy, MAX_PLAN);
        for d in decisions {
            match d {
                Repair::Copy { sha256, bytes, from, to } => {
                    if copies.len() >= MAX_CONCURRENT_COPIES || busy.contains(&sha256) {
                        continue;
                    }
                    if !bucket.take(bytes, Instant::now()) {
                        break;
                    }
                    let Some(addr) = members.get(&to).cloned() else { continue };
                    busy.insert(sha256);
                    let app = app.clone();
                    copies.spawn(async move {
                        let result = ask_copy(&app, &addr, &sha256, from).await;
                        (sha256, to, result)
                    });
                }
                Repair::Trim { sha256, node } => {
                    let cmd = Command::ResultDropped { sha256, node, lost: false };
                    if let Err(e) = app.propose_local(cmd).await {
                        tracing::debug!("trimming the copy of {sha256} on node {node}: {e:?}");
                    }
                }
            }
        }
    }
}

/// Asks the node at `addr` to fetch `sha` from node `from` and store it.
async fn ask_copy(app: &App, addr: &str, sha: &ResultHash, from: NodeId) -> Result<(), String> {
    let url = app.scheme.url(addr, &format!("{}/copy?from={from}", peer_path(sha)));
    let resp = app
        .client
        .post(url)
        .header(SECRET_HEADER, &*app.secret)
        .timeout(Duration::from_millis(2 * app.results.settings.transfer_timeout_ms))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    match resp.status() {
        s if s.is_success() => Ok(()),
        s => Err(format!("HTTP {s}: {}", resp.text().await.unwrap_or_default())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_bounds_the_rate_and_lets_a_big_item_through_once_full() {
        let start = Instant::now();
        let mut b = TokenBucket { rate: 1_000.0, tokens: 1_000.0, last: start };
        assert!(b.take(600, start));
        assert!(!b.take(600, start), "400 left");
        assert!(b.take(600, start + Duration::from_millis(200)), "600 after 200 ms");
        // An item larger than a second's worth goes once the bucket is full,
        // and leaves a debt that later items wait out.
        let later = start + Duration::from_secs(10);
        assert!(b.take(5_000, later));
        assert!(!b.take(1, later + Duration::from_secs(3)));
        assert!(b.take(1, later + Duration::from_millis(4_100)));
    }
}
