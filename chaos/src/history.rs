//! What a chaos run records, and what the checker reads: client operations with
//! their invocation and completion times, the nemesis's faults, every node's
//! own claims about leadership, and the final state of every replica.
//!
//! The process runner and the simulation both write these same records (one
//! JSON object per line), so one checker judges both. Times are milliseconds
//! since the run started, on whatever clock the run uses (wall clock for
//! processes, simulated time for the simulation).

use std::io::{BufRead, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// How an operation ended, in Jepsen's terms.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Outcome {
    /// It happened: for a submission, the cluster acknowledged the job.
    Ok,
    /// It certainly did not happen (a 4xx that rejects it).
    Fail { error: String },
    /// Unknown: a timeout or a dropped connection; it may or may not have happened.
    Info { error: String },
}

/// One line of the history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Record {
    /// One submission, with every retry of it: the client keeps the same
    /// idempotency key across retries, so `key` names the logical job.
    Submit {
        client: u32,
        key: String,
        /// The nodes it was sent to, in order (one per try).
        nodes: Vec<u64>,
        invoke_ms: u64,
        complete_ms: u64,
        outcome: Outcome,
        /// The job id the cluster answered with (on `Ok`).
        job: Option<String>,
    },
    /// A read of one job from one node (local, not linearizable).
    Poll {
        client: u32,
        job: String,
        node: u64,
        invoke_ms: u64,
        complete_ms: u64,
        /// `None` when the node did not know the job (yet) or did not answer.
        state: Option<String>,
        attempt: Option<u32>,
    },
    Cancel {
        client: u32,
        job: String,
        node: u64,
        invoke_ms: u64,
        complete_ms: u64,
        outcome: Outcome,
    },
    /// The nemesis began a fault. `fault` is its kind (e.g. `kill-leader`).
    FaultStart {
        at_ms: u64,
        id: u32,
        fault: String,
        nodes: Vec<u64>,
    },
    /// The nemesis ended a fault (healed the partition, resumed the process).
    FaultEnd {
        at_ms: u64,
        id: u32,
    },
    /// A node process (re)started from its data directory: observations of
    /// that node before this point are not compared with those after.
    NodeStart {
        at_ms: u64,
        node: u64,
    },
    /// What `node` said about itself: its term and the leader it knows.
    Leadership {
        at_ms: u64,
        node: u64,
        term: u64,
        leader: Option<u64>,
    },
}

impl Record {
    /// When the record's event finished (for ordering and time windows).
    pub fn at_ms(&self) -> u64 {
        match self {
            Record::Submit { complete_ms, .. }
            | Record::Poll { complete_ms, .. }
            | Record::Cancel { complete_ms, .. } => *complete_ms,
            Record::FaultStart { at_ms, .. }
            | Record::FaultEnd { at_ms, .. }
            | Record::NodeStart { at_ms, .. }
            | Record::Leadership { at_ms, .. } => *at_ms,
        }
    }
}

/// One job as one replica holds it at the end of the run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalJob {
    pub id: String,
    pub idempotency_key: Option<String>,
    pub state: String,
    pub attempt: u32,
    pub node: Option<u64>,
    /// The job's recorded transitions, by name (`submitted`, `assigned`,
    /// `started`, `requeued`, `succeeded`, `failed`, `cancelled`, ...).
    pub events: Vec<String>,
    /// sha256 (hex) of the result image, from the replica's metadata, while
    /// it keeps the result.
    pub image_sha256: Option<String>,
    /// What reading the image through this node gave once the cluster had
    /// healed: the sha256 (hex) of the bytes it answered, or `error: …`.
    /// Absent where the run did not read images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_read: Option<String>,
}

/// A replica's state after the run, taken once the cluster has healed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalNode {
    pub node: u64,
    pub last_applied: u64,
    pub jobs: Vec<FinalJob>,
    /// Every kept result's image was read through this node (`image_read`):
    /// the checker then requires each to be readable and byte-identical.
    #[serde(default)]
    pub images_read: bool,
}

/// Writes records as JSON lines.
pub fn write_jsonl<T: Serialize>(path: &Path, items: &[T]) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for item in items {
        serde_json::to_writer(&mut out, item)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// Reads JSON lines written by [`write_jsonl`]; blank lines are skipped.
pub fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path) -> std::io::Result<Vec<T>> {
    let file = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut out = Vec::new();
    for (n, line) in file.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let item = serde_json::from_str(&line)
            .map_err(|e| std::io::Error::other(format!("{}:{}: {e}", path.display(), n + 1)))?;
        out.push(item);
    }
    Ok(out)
}
