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
    /// How long an executor keeps retrying to report a finished job.
    pub report_timeout_ms: u64,
    /// How long a leave waits for the node's running jobs before removing it.
    pub drain_timeout_ms: u64,
    /// Largest accepted JSON body on the public API.
    pub max_body_bytes: usize,
    /// Snapshot once this many bytes of commands were applied since the last one.
    pub snapshot_max_bytes: u64,
    /// Snapshot once this many log entries were applied since the last one.
    pub snapshot_logs: u64,
    /// Log entries kept behind a snapshot, so a follower that lags a little
    /// catches up from the log instead of a snapshot.
    pub snapshot_keep_logs: u64,
    /// Cluster-wide limits this node writes to the log when it leads.
    pub cluster: ClusterConfig,
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
}

impl NodeSettings {
    pub fn submit_timeout(&self) -> Duration {
        Duration::from_millis(self.submit_timeout_ms)
    }

    pub fn report_timeout(&self) -> Duration {
        Duration::from_millis(self.report_timeout_ms)
    }

    pub fn raft_config(&self) -> openraft::Config {
        openraft::Config {
            cluster_name: "raftgen".into(),
            heartbeat_interval: self.heartbeat_interval_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            install_snapshot_timeout: 5_000,
            // Each entry is already a batch of up to 1,024 commands (see
            // `proposer`); keeping RPCs small keeps them inside openraft's
            // AppendEntries deadline of one heartbeat interval.
            max_payload_entries: 16,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_logs),
            max_in_snapshot_log_to_keep: self.snapshot_keep_logs,
            ..Default::default()
        }
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
