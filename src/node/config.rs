//! Node settings: every limit and timeout, with its unit in its name.

use std::time::Duration;

use raftgen_raft::command::ClusterConfig;

#[derive(Clone, Debug)]
pub struct NodeSettings {
    /// Executor slots this node offers (0: consensus and API only).
    pub slots: u32,
    /// A node that has not answered the leader's Raft RPCs for this long is
    /// considered lost and its unfinished jobs are re-queued.
    pub node_timeout_ms: u64,
    /// How long a node keeps retrying a client's submission across leader
    /// changes before answering 503 (with the job id).
    pub submit_timeout_ms: u64,
    /// How long a synchronous request (`POST /v1/images/generations`,
    /// `POST /sdapi/v1/txt2img`) waits for its jobs before answering 408 with
    /// their ids (the jobs go on; see `crate::http::sync`).
    pub sync_timeout_ms: u64,
    /// How long an executor keeps retrying to report a finished job.
    pub report_timeout_ms: u64,
    /// How long a leave waits for the node's running jobs before removing it.
    pub drain_timeout_ms: u64,
    /// Longest one job (one attempt) may run on this node's executor before
    /// it is stopped and the job fails (see `crate::node::host`).
    pub job_timeout_ms: u64,
    /// How long a stopping node (SIGTERM) waits for its running jobs before
    /// handing them back to the queue.
    pub shutdown_timeout_ms: u64,
    /// Largest accepted JSON body on the public API.
    pub max_body_bytes: usize,
    /// Most `GET /v1/jobs/{id}/events` streams open on this node at once.
    pub max_event_streams: usize,
    /// Longest one event stream stays open (a client then reconnects).
    pub event_stream_max_ms: u64,
    /// Snapshot once this many bytes of commands were applied since the last one.
    pub snapshot_max_bytes: u64,
    /// Snapshot once this many log entries were applied since the last one.
    pub snapshot_logs: u64,
    /// Log entries kept behind a snapshot, so a follower that lags a little
    /// catches up from the log instead of a snapshot.
    pub snapshot_keep_logs: u64,
    /// How far the log is synced before a write is acknowledged.
    pub durability: raftgen_storage::Durability,
    /// Cluster-wide limits this node writes to the log when it leads.
    pub cluster: ClusterConfig,
    /// Webhook deliveries, made by this node while it leads.
    pub webhook: WebhookSettings,
    /// Where result images live and how they move (see `crate::node::results`).
    pub results: crate::node::results::ResultSettings,
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
}

impl NodeSettings {
    pub fn submit_timeout(&self) -> Duration {
        Duration::from_millis(self.submit_timeout_ms)
    }

    pub fn sync_timeout(&self) -> Duration {
        Duration::from_millis(self.sync_timeout_ms)
    }

    pub fn report_timeout(&self) -> Duration {
        Duration::from_millis(self.report_timeout_ms)
    }

    pub fn job_timeout(&self) -> Duration {
        Duration::from_millis(self.job_timeout_ms)
    }

    pub fn raft_config(&self) -> openraft::Config {
        openraft::Config {
            cluster_name: "raftgen".into(),
            heartbeat_interval: self.heartbeat_interval_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            install_snapshot_timeout: 5_000,
            // Each entry is already a batch of commands of at most
            // `proposer::MAX_BATCH_BYTES` (64 KiB), and no entry carries an image
            // (see `raftgen_raft::result`): 16 entries keep an AppendEntries
            // under 1 MiB, well inside openraft's deadline of one heartbeat
            // interval even on a busy machine.
            max_payload_entries: 16,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_logs),
            max_in_snapshot_log_to_keep: self.snapshot_keep_logs,
            ..Default::default()
        }
    }
}

/// How the leader delivers webhooks (see `crate::node::webhook`).
#[derive(Clone)]
pub struct WebhookSettings {
    /// HMAC-SHA256 key of the `X-Raftgen-Signature` header; `None`: the
    /// cluster secret. Every node should have the same one, since any node may
    /// come to lead.
    pub secret: Option<std::sync::Arc<str>>,
    /// Longest one delivery try may take (connecting, sending, the answer's status).
    pub timeout_ms: u64,
    /// Tries per job before it gives up (clamped to `MAX_WEBHOOK_ATTEMPTS`).
    pub max_attempts: u32,
    /// Deliveries in flight at once.
    pub max_concurrent: usize,
}

impl std::fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSettings")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("timeout_ms", &self.timeout_ms)
            .field("max_attempts", &self.max_attempts)
            .field("max_concurrent", &self.max_concurrent)
            .finish()
    }
}

/// Longest a single forwarded membership call may take.
pub const MEMBERSHIP_TIMEOUT_MS: u64 = 60_000;
/// Most jobs listed by one `GET /v1/jobs`.
pub const MAX_LIST_LIMIT: usize = 1_000;
/// Most assignments proposed in one log entry.
pub const MAX_ASSIGN_PER_ENTRY: usize = 256;
/// Voters beyond this join as learners.
pub const MAX_VOTERS: usize = 5;
