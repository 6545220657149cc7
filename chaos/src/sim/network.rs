//! The simulated nodes' network: length-prefixed bincode frames over turmoil's
//! simulated TCP, one connection per call.
//!
//! Why one connection per call: turmoil's TCP does not retransmit, so a
//! segment lost to a (random or explicit) partition leaves that connection
//! waiting forever. A fresh connection per call makes a lost message cost one
//! call (bounded by its deadline), never a stuck link.
//!
//! Errors are mapped to openraft the way `raftgen_raft::network` maps HTTP
//! errors: a peer that cannot be reached (connection refused, reset, closed) is
//! `Unreachable`, so openraft backs off ([`backoff`] is production's); a call
//! that outlived its deadline is `Timeout`, which openraft retries without
//! backing off. Every successful answer is recorded in [`PeerHealth`], by the
//! node's simulated clock (production's `PeerHealth`, which runs on tokio's
//! clock): the leader's scheduler judges health by it.

use std::time::Duration;

use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Timeout, Unreachable};
use openraft::network::{Backoff, RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::BasicNode;
use raftgen_raft::job::{JobId, JobRequest};
use raftgen_raft::result::ResultHash;
use raftgen_raft::{codec, Command, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use turmoil::net::TcpStream;

pub use raftgen_raft::network::PeerHealth;

use super::runtime::SimTypeConfig;

/// The port every simulated node listens on.
pub const PORT: u16 = 9000;
/// Largest frame read; a larger length prefix is a protocol error. Large
/// enough for AppendEntries of 16 entries carrying results of a few MB (the
/// scale run's `before` figures, when Complete carried the image).
pub const MAX_FRAME_BYTES: usize = 256 << 20;

/// The turmoil host name (and DNS name) of node `id`.
pub fn host_name(id: u64) -> String {
    format!("node{id}")
}

/// The address other nodes and clients reach node `id` at.
pub fn node_addr(id: u64) -> String {
    format!("{}:{PORT}", host_name(id))
}

/// One call, as sent on a connection.
#[derive(Serialize, Deserialize)]
pub enum Call {
    Append(AppendEntriesRequest<SimTypeConfig>),
    Vote(VoteRequest<u64>),
    Snapshot(InstallSnapshotRequest<SimTypeConfig>),
    /// A write forwarded to the node that leads (production's `/raft/write`).
    /// Answered with `Result<Response, ForwardReject>`.
    Forward(Command),
    /// A client operation (production's public API). Answered with [`ClientReply`].
    Client(ClientOp),
    /// A copy of a result pushed by the node that made it (production's
    /// `PUT /raft/results/{sha}`): answered `Ok` once checked and synced.
    PushResult {
        sha: ResultHash,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// This node's copy of a result, for a reader or a repair (`GET
    /// /raft/results/{sha}`): answered `Option<ByteBuf>`.
    FetchResult {
        sha: ResultHash,
    },
    /// The leader's repair: fetch `sha` from `from` and sync it here
    /// (`POST /raft/results/{sha}/copy`): answered `Result<(), String>`.
    CopyFrom {
        sha: ResultHash,
        from: u64,
    },
}

/// The leader's answer to a forwarded command when it could not commit it.
#[derive(Debug, Serialize, Deserialize)]
pub enum ForwardReject {
    NotLeader { leader: Option<u64> },
    Fatal(String),
}

/// What a client asks a node.
#[derive(Debug, Serialize, Deserialize)]
pub enum ClientOp {
    /// Submit a job; the node commits it through the leader (with retries).
    Submit {
        key: String,
        request: JobRequest,
    },
    /// Read one job from the node's own applied state.
    Poll {
        job: JobId,
    },
    Cancel {
        job: JobId,
    },
    /// Read a job's result image through the node (`GET /v1/jobs/{id}/image`).
    ReadImage {
        job: JobId,
    },
}

/// What a node answers a client.
#[derive(Debug, Serialize, Deserialize)]
pub enum ClientReply {
    Submitted {
        job: JobId,
        created: bool,
    },
    /// The cluster refused the operation (a 4xx in production).
    Rejected(String),
    /// The node could not get an answer in time (a 503): it may still happen.
    Unavailable(String),
    /// A poll's answer: `None` when the node does not know the job.
    Job {
        state: Option<(String, u32)>,
    },
    Cancelled,
    /// A read's answer: the sha256 (hex) of the bytes served, or why none.
    Image(Result<String, String>),
}

/// Why a call got no answer.
#[derive(Debug)]
pub enum CallError {
    /// No connection, or it broke before the answer: the peer may or may not
    /// have acted on the call (it did not if the connection was refused).
    Unreachable(String),
    /// The deadline passed first.
    Timeout,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unreachable(e) => write!(f, "unreachable: {e}"),
            CallError::Timeout => write!(f, "timed out"),
        }
    }
}

pub async fn write_frame(stream: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(bytes.len()).map_err(|_| std::io::Error::other("frame too large"))?;
    stream.write_all(&len.to_be_bytes()).await?;
    stream.write_all(bytes).await?;
    stream.flush().await
}

pub async fn read_frame(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(std::io::Error::other(format!("frame of {len} bytes exceeds {MAX_FRAME_BYTES}")));
    }
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Sends `call` to `addr` on a fresh connection and decodes the answer.
pub async fn call<T: DeserializeOwned>(addr: &str, call: &Call, timeout: Duration) -> Result<T, CallError> {
    call_counted(addr, call, timeout, |_| {}).await
}

/// [`call`], telling `sent` how many bytes the request took.
pub async fn call_counted<T: DeserializeOwned>(
    addr: &str,
    call: &Call,
    timeout: Duration,
    sent: impl FnOnce(u64),
) -> Result<T, CallError> {
    let body = codec::encode(call).map_err(|e| CallError::Unreachable(e.to_string()))?;
    sent(body.len() as u64 + 4);
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| CallError::Unreachable(e.to_string()))?;
        write_frame(&mut stream, &body).await.map_err(|e| CallError::Unreachable(e.to_string()))?;
        let answer = read_frame(&mut stream).await.map_err(|e| CallError::Unreachable(e.to_string()))?;
        codec::decode(&answer).map_err(|e| CallError::Unreachable(e.to_string()))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(CallError::Timeout),
    }
}

/// openraft's connection factory for one node.
#[derive(Clone)]
pub struct Network {
    pub id: u64,
    pub health: PeerHealth,
    pub counters: std::sync::Arc<super::world::Counters>,
}

impl RaftNetworkFactory<SimTypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> PeerClient {
        PeerClient {
            id: self.id,
            target,
            addr: node.addr.clone(),
            health: self.health.clone(),
            counters: self.counters.clone(),
        }
    }
}

pub struct PeerClient {
    id: u64,
    target: u64,
    addr: String,
    health: PeerHealth,
    counters: std::sync::Arc<super::world::Counters>,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<u64, BasicNode, RaftError<u64, E>>;

impl PeerClient {
    async fn raft_call<Resp, E>(&self, action: RPCTypes, call: Call, timeout: Duration) -> Result<Resp, RpcErr<E>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let sent = |n| self.counters.sent(self.id, n);
        let result: Result<Resp, RaftError<u64, E>> = match call_counted(&self.addr, &call, timeout, sent).await {
            Ok(r) => r,
            Err(CallError::Timeout) => {
                return Err(RPCError::Timeout(Timeout { action, id: self.id, target: self.target, timeout }))
            }
            Err(CallError::Unreachable(e)) => {
                let e = std::io::Error::other(format!("{action:?} to node {}: {e}", self.target));
                return Err(RPCError::Unreachable(Unreachable::new(&e)));
            }
        };
        self.health.record_ack(self.target);
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<SimTypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<SimTypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RpcErr> {
        self.raft_call(RPCTypes::AppendEntries, Call::Append(rpc), option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<SimTypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RpcErr<InstallSnapshotError>> {
        self.raft_call(RPCTypes::InstallSnapshot, Call::Snapshot(rpc), option.hard_ttl()).await
    }

    async fn vote(&mut self, rpc: VoteRequest<u64>, option: RPCOption) -> Result<VoteResponse<u64>, RpcErr> {
        self.raft_call(RPCTypes::Vote, Call::Vote(rpc), option.hard_ttl()).await
    }

    fn backoff(&self) -> Backoff {
        backoff()
    }
}

/// Production's retry delays toward an unreachable peer (25, 50, then 100 ms).
pub fn backoff() -> Backoff {
    raftgen_raft::network::backoff()
}

/// Encodes a reply; a value that cannot be encoded is a bug, reported as such.
pub fn encode_reply<T: Serialize>(value: &T) -> Vec<u8> {
    codec::encode(value).expect("encoding a reply")
}

/// A forwarded write's answer, as the wire carries it.
pub type Forwarded = Result<Response, ForwardReject>;
