//! Node-to-node Raft RPCs over HTTP/1.1 (bincode bodies, `/raft/*` on each
//! node's one port), authenticated by the cluster secret; over TLS when the
//! nodes serve it ([`Scheme`]; the node builds the client with its
//! certificates).
//!
//! A peer that cannot be reached (connection refused or reset, a wrong
//! status) is reported to openraft as `Unreachable`, so it backs off (see
//! [`backoff()`]) instead of retrying hot. A peer that is reachable but slow
//! (the RPC outlived openraft's deadline, which for AppendEntries is one
//! heartbeat interval) is reported as `Timeout`: openraft retries without
//! backing off, because backing off would stop the heartbeats to a live but
//! busy follower and make it stand for election. Every successful answer from a peer is recorded in
//! [`PeerHealth`]: the leader's scheduler judges a node lost when it has not
//! answered for `node_timeout_ms`, by this clock and no other.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable};
use openraft::network::RPCTypes;
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::time::Instant;

use crate::codec;
use crate::job::NodeId;
use crate::TypeConfig;

/// Header carrying the cluster secret on every node-to-node request.
pub const SECRET_HEADER: &str = "x-raftgen-secret";
pub const PATH_APPEND: &str = "/raft/append";
pub const PATH_VOTE: &str = "/raft/vote";
pub const PATH_SNAPSHOT: &str = "/raft/snapshot";

/// When each peer last answered a Raft RPC (heartbeats included), on tokio's
/// clock: the wall clock in a node, simulated time in the chaos simulation,
/// which uses this same type to judge nodes lost.
#[derive(Clone, Default)]
pub struct PeerHealth(Arc<Mutex<Clocks>>);

#[derive(Default)]
struct Clocks {
    /// Last answer, or the last reset (a new leader's grace), per node.
    ack: BTreeMap<NodeId, Instant>,
    /// Last real answer per node (never reset).
    answered: BTreeMap<NodeId, Instant>,
}

impl PeerHealth {
    pub fn record_ack(&self, node: NodeId) {
        let now = Instant::now();
        let mut c = self.0.lock().expect("health lock");
        c.ack.insert(node, now);
        c.answered.insert(node, now);
    }

    /// When `node` last answered, or the last reset if later: what judges a
    /// node lost (a new leader first gives every node a full timeout).
    pub fn last_ack(&self, node: NodeId) -> Option<Instant> {
        self.0.lock().expect("health lock").ack.get(&node).copied()
    }

    /// When `node` really last answered (resets do not count): what judges
    /// a node declared lost to be back.
    pub fn last_answer(&self, node: NodeId) -> Option<Instant> {
        self.0.lock().expect("health lock").answered.get(&node).copied()
    }

    /// A new leader gives every node a full timeout before judging it: it
    /// resets every clock to now.
    pub fn reset_all(&self, nodes: impl IntoIterator<Item = NodeId>) {
        let now = Instant::now();
        let mut c = self.0.lock().expect("health lock");
        c.ack.clear();
        c.ack.extend(nodes.into_iter().map(|n| (n, now)));
    }
}

/// How every node of a cluster reaches the others' ports: all plain HTTP, or
/// all TLS. The membership stores bare `host:port` addresses; the scheme is
/// the node's own setting, added when a URL is made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Scheme {
    #[default]
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    /// The URL of `path` on the node at `addr` (`host:port`).
    pub fn url(self, addr: &str, path: &str) -> String {
        format!("{}://{addr}{path}", self.as_str())
    }
}

/// The HTTP client settings for Raft RPCs; the node adds its TLS settings
/// before building (see [`NetworkFactory::new`]).
pub fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_millis(500))
        .pool_idle_timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
}

/// Builds one [`PeerClient`] per target; connections are pooled by `reqwest`.
#[derive(Clone)]
pub struct NetworkFactory {
    id: NodeId,
    client: reqwest::Client,
    scheme: Scheme,
    secret: Arc<str>,
    health: PeerHealth,
    sent_bytes: Arc<AtomicU64>,
}

impl NetworkFactory {
    /// `client` is built from [`client_builder`]; `scheme` says how it reaches peers.
    pub fn new(id: NodeId, secret: &str, health: PeerHealth, client: reqwest::Client, scheme: Scheme) -> Self {
        NetworkFactory { id, client, scheme, secret: secret.into(), health, sent_bytes: Arc::default() }
    }

    /// Counts the bytes of every RPC body this node sends into `counter`
    /// (for `raftgen_peer_sent_bytes_total`).
    pub fn count_sent_bytes(mut self, counter: Arc<AtomicU64>) -> Self {
        self.sent_bytes = counter;
        self
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient {
            id: self.id,
            target,
            base: self.scheme.url(&node.addr, ""),
            client: self.client.clone(),
            secret: self.secret.clone(),
            health: self.health.clone(),
            sent_bytes: self.sent_bytes.clone(),
        }
    }
}

pub struct PeerClient {
    id: NodeId,
    target: NodeId,
    base: String,
    client: reqwest::Client,
    secret: Arc<str>,
    health: PeerHealth,
    sent_bytes: Arc<AtomicU64>,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

impl PeerClient {
    /// Sends one RPC and decodes the remote `Result`. Transport failures become
    /// `Unreachable`; a remote Raft error is passed on as `RemoteError`.
    async fn call<Req, Resp, E>(
        &self,
        action: RPCTypes,
        path: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RpcErr<E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let unreachable = |msg: String| RPCError::Unreachable(Unreachable::new(&std::io::Error::other(msg)));
        let failed = |e: reqwest::Error| {
            if e.is_timeout() {
                RPCError::Timeout(Timeout { action, id: self.id, target: self.target, timeout })
            } else {
                unreachable(format!("{path} to node {}: {e}", self.target))
            }
        };
        let body = codec::encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        self.sent_bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
        let resp = self
            .client
            .post(format!("{}{}", self.base, path))
            .header(SECRET_HEADER, &*self.secret)
            .timeout(timeout)
            .body(body)
            .send()
            .await
            .map_err(failed)?;
        if !resp.status().is_success() {
            return Err(unreachable(format!("{path} to node {}: HTTP {}", self.target, resp.status())));
        }
        let bytes = resp.bytes().await.map_err(failed)?;
        let result: Result<Resp, RaftError<NodeId, E>> =
            codec::decode(&bytes).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        self.health.record_ack(self.target);
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        self.call(RPCTypes::AppendEntries, PATH_APPEND, &rpc, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        self.call(RPCTypes::InstallSnapshot, PATH_SNAPSHOT, &rpc, option.hard_ttl()).await
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> Result<VoteResponse<NodeId>, RpcErr> {
        self.call(RPCTypes::Vote, PATH_VOTE, &rpc, option.hard_ttl()).await
    }

    fn backoff(&self) -> Backoff {
        backoff()
    }
}

/// Retry delays toward an unreachable peer: 25, 50, then 100 ms. Short enough
/// that a restarted node hears the leader well before its own election timeout
/// (150-200 ms by default) and does not start a disruptive election; long
/// enough not to retry hot.
pub fn backoff() -> Backoff {
    Backoff::new((0..).map(|i: u32| Duration::from_millis((25u64 << i.min(2)).min(100))))
}
