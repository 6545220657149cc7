//! What the simulated hosts and the driver share: the settings, the history
//! being written, every node's disk (which outlives crashes), and a handle on
//! each running node (so the driver can read its Raft metrics and state
//! directly, without going through the simulated network).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use raftgen_raft::command::ClusterConfig;

use super::runtime::SimRaft;
use super::store::{Disk, Store};
use crate::history::Record;

/// Every timing and limit of a simulated cluster, with its unit in its name.
/// Scaled from production's defaults to the simulated network (1-10 ms per
/// message, one connection per call) and to runs of a few simulated seconds.
#[derive(Clone, Debug)]
pub struct Params {
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Snapshot after this many applied entries, keeping this many behind it.
    pub snapshot_logs: u64,
    pub snapshot_keep_logs: u64,
    /// The leader re-queues the jobs of a node silent for this long.
    pub node_timeout_ms: u64,
    /// How long a node retries a client's submission or cancel.
    pub submit_timeout_ms: u64,
    /// How long an executor retries to report a start or a completion.
    pub report_timeout_ms: u64,
    /// Longest one forwarded write waits for the leader's answer.
    pub forward_timeout_ms: u64,
    /// Longest one local proposal waits to commit.
    pub propose_timeout_ms: u64,
    /// The scheduler's tick (it also runs on every applied entry).
    pub scheduler_tick_ms: u64,
    /// How often a node checks that its executor is registered.
    pub register_interval_ms: u64,
    /// Executor slots per node, and the simulated run time of one job.
    pub slots: u32,
    pub run_min_ms: u64,
    pub run_max_ms: u64,
    /// Cluster-wide limits the leader writes (small, so they matter).
    pub cluster: ClusterConfig,
    /// Size of each result image; 0: a 72-byte stand-in (enough for the
    /// checker, cheap for hundreds of seeds). The scale run sets it.
    pub image_bytes: usize,
    /// A node deletes a stored image no retained result keeps on it once it
    /// is this old (production's `--result-orphan-grace-ms`: at least the
    /// push and report timeouts together).
    pub orphan_grace_ms: u64,
    /// How often each node's janitor and the leader's repair look.
    pub janitor_interval_ms: u64,
    pub repair_tick_ms: u64,
    /// Repair copies in flight at once (the leader's).
    pub max_concurrent_copies: usize,
    /// The planted bug: report results before their copies are durable
    /// (production's `--unsafe-complete-before-durable`); the pushes follow
    /// `unsafe_delay_ms` later.
    pub unsafe_complete_before_durable: bool,
    pub unsafe_delay_ms: u64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            heartbeat_interval_ms: 50,
            election_timeout_min_ms: 150,
            election_timeout_max_ms: 300,
            snapshot_logs: 40,
            snapshot_keep_logs: 8,
            node_timeout_ms: 1_000,
            submit_timeout_ms: 4_000,
            report_timeout_ms: 20_000,
            forward_timeout_ms: 1_000,
            propose_timeout_ms: 2_000,
            scheduler_tick_ms: 100,
            register_interval_ms: 500,
            slots: 2,
            run_min_ms: 50,
            run_max_ms: 400,
            cluster: ClusterConfig {
                max_queue_depth: 10_000,
                max_results: 12,
                max_result_bytes: 1 << 20,
                max_finished_jobs: 100_000,
                max_attempts: 3,
                result_copies: 3,
                repair_delay_ms: 2_000,
            },
            image_bytes: 0,
            orphan_grace_ms: 40_000,
            janitor_interval_ms: 1_000,
            repair_tick_ms: 250,
            max_concurrent_copies: 4,
            unsafe_complete_before_durable: false,
            unsafe_delay_ms: 500,
        }
    }
}

impl Params {
    /// The scale run's settings (see `super::scale`): results of
    /// `image_bytes`, retention of 16 results, and snapshots every 100
    /// entries, so what a snapshot holds and costs shows.
    pub fn scale(image_bytes: usize) -> Params {
        let mut p = Params { image_bytes, snapshot_logs: 100, ..Params::default() };
        p.cluster.max_results = 16;
        p.cluster.max_result_bytes = 1 << 30;
        p
    }

    pub fn raft_config(&self) -> openraft::Config {
        openraft::Config {
            cluster_name: "raftgen-sim".into(),
            heartbeat_interval: self.heartbeat_interval_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            install_snapshot_timeout: 1_000,
            max_payload_entries: 16,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_logs),
            max_in_snapshot_log_to_keep: self.snapshot_keep_logs,
            ..Default::default()
        }
    }
}

/// What happened inside the storage and the nodes, for the report and for
/// the tests that make sure the paths under test were taken.
#[derive(Debug, Default)]
pub struct Counters {
    pub snapshots_built: AtomicU64,
    pub snapshots_installed: AtomicU64,
    /// Log truncations (a follower dropping entries a new leader overwrote).
    pub truncations: AtomicU64,
    /// Writes not yet flushed when their node crashed, lost with it.
    pub writes_lost: AtomicU64,
    /// Result copies repair made and recorded.
    pub repair_copies: AtomicU64,
    /// Bytes each node sent to other nodes (Raft calls, forwarded writes and
    /// the answers to theirs), for the scale run.
    pub sent_bytes: Mutex<BTreeMap<u64, u64>>,
}

/// What happened inside the storage during a run, read at its end.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SimStats {
    pub snapshots_built: u64,
    pub snapshots_installed: u64,
    pub truncations: u64,
    pub writes_lost: u64,
    pub repair_copies: u64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Node `node` sent `n` bytes to another node.
    pub fn sent(&self, node: u64, n: u64) {
        *self.sent_bytes.lock().expect("counter lock").entry(node).or_default() += n;
    }

    pub fn read(&self) -> SimStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SimStats {
            snapshots_built: get(&self.snapshots_built),
            snapshots_installed: get(&self.snapshots_installed),
            truncations: get(&self.truncations),
            writes_lost: get(&self.writes_lost),
            repair_copies: get(&self.repair_copies),
        }
    }
}

/// A running incarnation of a node, as the driver sees it.
#[derive(Clone)]
pub struct NodeHandle {
    pub raft: SimRaft,
    pub store: Store,
}

pub struct Shared {
    pub seed: u64,
    /// Every node, voters first.
    pub members: Vec<u64>,
    /// The nodes that vote (the first ones of `members`); the others join
    /// as learners once a leader is elected.
    pub voters: Vec<u64>,
    pub params: Params,
    history: Mutex<Vec<Record>>,
    disks: BTreeMap<u64, Arc<Mutex<Disk>>>,
    running: Mutex<BTreeMap<u64, NodeHandle>>,
    /// Chance, per thousand, that an executor run fails (the nemesis raises it).
    exec_fail_per_mille: AtomicU32,
    pub counters: Arc<Counters>,
    /// The final check's image reads: (node, job) to the sha256 (hex) of
    /// what the node served, or `error: …`.
    pub image_reads: Mutex<BTreeMap<(u64, String), String>>,
}

impl Shared {
    pub fn new(seed: u64, members: Vec<u64>, voters: usize, params: Params) -> Arc<Shared> {
        let disks = members.iter().map(|id| (*id, Arc::new(Mutex::new(Disk::default())))).collect();
        Arc::new(Shared {
            seed,
            voters: members[..voters.min(members.len())].to_vec(),
            members,
            params,
            history: Mutex::new(Vec::new()),
            disks,
            running: Mutex::new(BTreeMap::new()),
            exec_fail_per_mille: AtomicU32::new(0),
            counters: Arc::new(Counters::default()),
            image_reads: Mutex::new(BTreeMap::new()),
        })
    }

    pub fn record(&self, record: Record) {
        self.history.lock().expect("history lock").push(record);
    }

    pub fn take_history(&self) -> Vec<Record> {
        std::mem::take(&mut *self.history.lock().expect("history lock"))
    }

    pub fn disk(&self, id: u64) -> Arc<Mutex<Disk>> {
        self.disks[&id].clone()
    }

    pub fn set_running(&self, id: u64, handle: NodeHandle) {
        self.running.lock().expect("registry lock").insert(id, handle);
    }

    /// Forgets a crashed node's incarnation, counting the writes it had not
    /// flushed (they die with it).
    pub fn set_stopped(&self, id: u64) {
        if let Some(handle) = self.running.lock().expect("registry lock").remove(&id) {
            Counters::add(&self.counters.writes_lost, handle.store.unflushed_writes() as u64);
        }
    }

    pub fn running(&self) -> BTreeMap<u64, NodeHandle> {
        self.running.lock().expect("registry lock").clone()
    }

    pub fn exec_fail_per_mille(&self) -> u32 {
        self.exec_fail_per_mille.load(Ordering::Relaxed)
    }

    pub fn set_exec_fail_per_mille(&self, value: u32) {
        self.exec_fail_per_mille.store(value, Ordering::Relaxed);
    }
}

/// Simulated milliseconds since the simulation started (inside a host).
pub fn now_ms() -> u64 {
    turmoil::sim_elapsed().map_or(0, |d| d.as_millis() as u64)
}
