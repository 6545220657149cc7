//! The node's shared context and its one write path.
//!
//! Every change to the job state goes through [`App::write`]: on the leader it
//! is proposed to Raft (after the leader stamps its clock and, for submissions
//! without one, a seed); on a follower it is forwarded to the leader over a
//! connection pool of our own. While there is no leader, or the leader changes
//! mid-request, the write is retried with backoff until it commits or its
//! deadline passes. Every command is idempotent under retry (submissions carry
//! their job id, completions their attempt), so a retry never doubles a job.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use raftgen_raft::network::PeerHealth;
use raftgen_raft::{Command, NodeId, Raft, Response};
use raftgen_storage::StateView;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::executor::Executor;
use crate::node::config::NodeSettings;

/// Internal endpoint where followers forward commands to the leader: a list
/// of commands in, a list of `Result<Committed, ForwardReject>` out (bincode).
pub const PATH_FORWARD: &str = "/raft/write";

/// Longest a node that forwarded a write waits for its own state machine to
/// apply it before answering. A client that submits through a follower and
/// then reads from it (the job, its event stream) expects to find what it
/// was told exists; past this bound the node answers anyway (the write is
/// committed, only this replica is behind).
const READ_YOUR_WRITES_MAX_MS: u64 = 2_000;

/// The node's shared context.
pub struct App {
    pub id: NodeId,
    /// `--data`: the node's data directory.
    pub data_dir: std::path::PathBuf,
    /// The address other nodes and clients reach this node at.
    pub addr: String,
    pub raft: Raft,
    pub view: StateView,
    pub settings: NodeSettings,
    pub health: PeerHealth,
    pub executor: Arc<dyn Executor>,
    /// Pool for forwarded writes and proxied reads (separate from Raft's).
    pub client: reqwest::Client,
    /// How `client` reaches other nodes: `http`, or `https` when this node serves TLS.
    pub scheme: raftgen_raft::network::Scheme,
    pub secret: Arc<str>,
    /// `--api-keys`: when set, the public API needs a key (see [`crate::http::auth`]).
    pub api_keys: Option<Arc<crate::http::auth::ApiKeys>>,
    /// Leader-side group commit of proposals.
    pub proposer: crate::node::proposer::Proposer,
    /// Follower-side batching of forwarded commands.
    pub forwarder: crate::node::forwarder::Forwarder,
    /// Keeps this node from standing for election while it receives a snapshot.
    pub snapshot_guard: crate::node::snapshot_guard::SnapshotGuard,
    /// Becomes true once, when the node starts shutting down.
    pub shutdown: watch::Receiver<bool>,
    /// What `/metrics` reports that only this node knows (timings, images).
    pub metrics: crate::metrics::NodeMetrics,
    /// Open live progress streams (`GET /v1/jobs/{id}/events`).
    pub event_streams: crate::http::events::Streams,
    /// Result images: this node's store, its cache of others', transfers.
    pub results: crate::node::results::Results,
}

/// A write that did not commit.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("no leader committed the write within {waited_ms} ms")]
    Timeout { waited_ms: u64 },
    #[error("{0}")]
    Fatal(String),
}

/// A committed command's response and the index of the log entry holding it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Committed {
    pub response: Response,
    pub index: u64,
}

/// The leader's answer to a forwarded command when it could not commit it.
#[derive(Debug, Serialize, Deserialize)]
pub enum ForwardReject {
    NotLeader { leader: Option<NodeId> },
    Fatal(String),
}

enum Attempt {
    Done(Committed),
    Retry,
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl App {
    /// Resolves once this node's applied state shows no assigned or running
    /// job on `node` (a drain's end, for a stop or a leave).
    pub async fn until_idle(&self, node: NodeId) {
        let mut applied = self.view.subscribe();
        let _ = applied.wait_for(|_| self.view.read().jobs.active_count(node) == 0).await;
    }

    pub fn leader(&self) -> Option<(NodeId, String)> {
        let m = self.raft.server_metrics();
        let m = m.borrow();
        let leader = m.current_leader?;
        let addr = m.membership_config.membership().get_node(&leader)?.addr.clone();
        Some((leader, addr))
    }

    /// Every member (voters and learners) with the address it is reached at.
    pub fn members(&self) -> std::collections::BTreeMap<NodeId, String> {
        let m = self.raft.server_metrics();
        let m = m.borrow();
        m.membership_config.membership().nodes().map(|(id, n)| (*id, n.addr.clone())).collect()
    }

    /// Whether this node is in the cluster's membership (voter or learner).
    pub fn is_member(&self) -> bool {
        self.raft.server_metrics().borrow().membership_config.membership().get_node(&self.id).is_some()
    }

    pub fn is_leader(&self) -> bool {
        self.raft.server_metrics().borrow().current_leader == Some(self.id)
    }

    /// Commits `cmd` through whichever node leads, retrying across leader
    /// changes until `timeout` has passed.
    pub async fn write(&self, cmd: Command, timeout: Duration) -> Result<Response, WriteError> {
        let started = Instant::now();
        let deadline = started + timeout;
        let mut server = self.raft.server_metrics();
        let mut delay = Duration::from_millis(5);
        loop {
            let leader = self.leader();
            let attempt = tokio::select! {
                a = self.try_once(leader.clone(), &cmd) => a,
                _ = leader_changed(&mut server, leader.as_ref().map(|l| l.0)) => Attempt::Retry,
                _ = tokio::time::sleep_until(deadline.into()) => Attempt::Retry,
            };
            match attempt {
                Attempt::Done(committed) => {
                    self.until_applied(committed.index, deadline).await;
                    return Ok(committed.response);
                }
                Attempt::Retry => {}
            }
            if *self.shutdown.borrow() {
                return Err(WriteError::Fatal("node is shutting down".into()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(WriteError::Timeout { waited_ms: started.elapsed().as_millis() as u64 });
            }
            let pause = delay.min(deadline - now);
            tokio::select! {
                _ = server.changed() => {}
                _ = tokio::time::sleep(pause) => {}
            }
            delay = (delay * 2).min(Duration::from_millis(100));
        }
    }

    /// Waits (bounded) until this node has applied log index `index`, so
    /// that a read here sees the write this node just made through the leader.
    async fn until_applied(&self, index: u64, deadline: Instant) {
        let wait =
            Duration::from_millis(READ_YOUR_WRITES_MAX_MS).min(deadline.saturating_duration_since(Instant::now()));
        let waited = self.raft.wait(Some(wait)).applied_index_at_least(Some(index), "read your writes").await;
        if let Err(e) = waited {
            tracing::debug!("log index {index} not applied here within {} ms: {e}", wait.as_millis());
        }
    }

    async fn try_once(&self, leader: Option<(NodeId, String)>, cmd: &Command) -> Attempt {
        match leader {
            None => Attempt::Retry,
            Some((id, _)) if id == self.id => match self.propose_local(cmd.clone()).await {
                Ok(resp) => Attempt::Done(resp),
                Err(ForwardReject::NotLeader { .. }) => Attempt::Retry,
                Err(ForwardReject::Fatal(e)) => {
                    tracing::warn!("proposal failed: {e}");
                    Attempt::Retry
                }
            },
            Some((id, addr)) => match self.forwarder.forward(&addr, cmd.clone()).await {
                Ok(Ok(resp)) => Attempt::Done(resp),
                Ok(Err(reject)) => {
                    tracing::debug!("leader {id} did not take the write: {reject:?}");
                    Attempt::Retry
                }
                Err(e) => {
                    tracing::debug!("forwarding to leader {id} at {addr}: {e}");
                    Attempt::Retry
                }
            },
        }
    }

    /// Proposes on this node (it must lead). The leader's clock and random
    /// choices enter the log here, never inside `apply`.
    pub async fn propose_local(&self, mut cmd: Command) -> Result<Committed, ForwardReject> {
        if !self.is_leader() {
            return Err(ForwardReject::NotLeader { leader: self.raft.server_metrics().borrow().current_leader });
        }
        if let Command::Submit { seed, request, .. } = &mut cmd {
            if seed.is_none() {
                *seed = Some(request.seed.unwrap_or_else(rand::random));
            }
        }
        // The proposer stamps the leader's clock on the entry (`Request::at_ms`).
        self.proposer.propose(cmd).await
    }
}

/// Resolves when the known leader is no longer `leader`.
async fn leader_changed(
    server: &mut watch::Receiver<openraft::metrics::RaftServerMetrics<NodeId, openraft::BasicNode>>,
    leader: Option<NodeId>,
) {
    loop {
        if server.borrow_and_update().current_leader != leader {
            return;
        }
        if server.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
