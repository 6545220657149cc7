//! raftgen's replicated core: the openraft type configuration, the job model,
//! result metadata, the deterministic job state machine, the scheduler's and
//! the result repair's pure decisions, the node-to-node network, and the one
//! codec they all share.
//!
//! Nothing in `job`, `result`, `command`, `state`, `schedule`, `placement`
//! or `repair` does I/O or reads a clock; that is what makes them replayable
//! and testable in isolation.

pub mod cache;
pub mod codec;
pub mod command;
pub mod job;
pub mod network;
pub mod placement;
pub mod repair;
pub mod result;
pub mod schedule;
pub mod state;

use std::io::Cursor;

pub use command::{Command, Request, Response};
pub use job::NodeId;

openraft::declare_raft_types!(
    /// raftgen's Raft types: our commands in, our responses out, snapshots in memory.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
