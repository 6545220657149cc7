//! Commands: every change to the job state is one of these, committed through
//! Raft and applied in log order on every node.
//!
//! A command carries everything `apply` needs to be deterministic: the leader's
//! clock (`at_ms`) and any random choice (the seed) are fields filled in by the
//! leader before it proposes the entry, never read inside `apply`.

use serde::{Deserialize, Serialize};

use crate::job::{Delivery, FieldError, Job, JobId, JobRequest, JobState, NodeId};
use crate::result::{ResultHash, ResultMeta};

/// The log payload: a command plus the leader's wall clock when it proposed it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub at_ms: u64,
    pub cmd: Command,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// A new job. `id` is chosen by the receiving node and makes retries of the
    /// same forwarded submission idempotent; `seed` is filled by the leader.
    Submit {
        id: JobId,
        request: JobRequest,
        seed: Option<u64>,
        idempotency_key: Option<String>,
    },
    /// Scheduler decision: queued jobs to nodes; `attempt` must be the job's
    /// current attempt + 1, so a decision made on stale state is rejected.
    Assign {
        assignments: Vec<Assignment>,
    },
    /// The executing node began the attempt.
    Start {
        job: JobId,
        node: NodeId,
        attempt: u32,
    },
    /// The executing node reports progress of the attempt.
    Progress {
        job: JobId,
        node: NodeId,
        attempt: u32,
        step: u32,
        steps: u32,
    },
    /// The executing node finished the attempt. Fenced by `attempt`.
    Complete {
        job: JobId,
        node: NodeId,
        attempt: u32,
        outcome: Outcome,
    },
    /// Scheduler decision: the node of these attempts is considered lost.
    Requeue {
        jobs: Vec<(JobId, u32)>,
        reason: String,
    },
    Cancel {
        job: JobId,
    },
    /// A node announces its executor: slots and the models it serves.
    RegisterNode {
        node: NodeId,
        info: NodeRegistration,
    },
    /// A draining node takes no new jobs (it finishes the ones it has).
    SetDraining {
        node: NodeId,
        draining: bool,
    },
    /// The node left the membership; forget its executor.
    ForgetNode {
        node: NodeId,
    },
    /// Cluster-wide limits, written by the leader.
    Configure(ClusterConfig),
    /// The outcome of one webhook delivery try for a finished job. After
    /// `max_attempts` failed tries (the delivering node's setting, clamped to
    /// [`MAX_WEBHOOK_ATTEMPTS`](crate::job::MAX_WEBHOOK_ATTEMPTS)) the job gives
    /// up; a record of a try already recorded is acknowledged and ignored.
    WebhookDelivery {
        job: JobId,
        delivery: Delivery,
        max_attempts: u32,
    },
    /// Several commands in one log entry, applied in order (the leader's group
    /// commit). At most [`MAX_BATCH_COMMANDS`]; batches do not nest.
    Batch(Vec<Command>),
    /// Repair made a durable copy of a result on `node` (see
    /// [`crate::repair`]). A result no longer kept is ignored (the copy is
    /// then an orphan, which the node deletes).
    ResultCopied {
        sha256: ResultHash,
        node: NodeId,
    },
    /// `node` no longer holds a copy: it lost it (`lost`: its disk no longer
    /// has it; recorded whatever else holds it), or repair trimmed a copy too
    /// many (recorded only while another holder not declared lost remains).
    ResultDropped {
        sha256: ResultHash,
        node: NodeId,
        lost: bool,
    },
    /// The leader declares `node` lost (it stopped answering) or back. A lost
    /// node gets no new copies, and after `repair_delay_ms` its copies no
    /// longer count (repair makes others). The command's clock says since when.
    SetLost {
        node: NodeId,
        lost: bool,
    },
    /// `node` is leaving the cluster: its copies no longer count and it gets
    /// no new ones, so repair hands them over before it goes. `ForgetNode`
    /// clears the mark.
    Retire {
        node: NodeId,
    },
    /// The leader deleted these queued object-store keys (by queue position).
    ObjectsDeleted {
        seqs: Vec<u64>,
    },
}

/// Most commands in one [`Command::Batch`]. A job's submission order is
/// `log index * MAX_BATCH_COMMANDS + position in the batch`.
pub const MAX_BATCH_COMMANDS: usize = 1024;

impl Command {
    /// Encoded size, roughly (an upper bound for the common commands), for
    /// batching: the strings a command carries, plus a fixed part.
    pub fn approx_bytes(&self) -> u64 {
        let len = |s: &str| s.len() as u64;
        match self {
            Command::Submit { request: r, idempotency_key, .. } => {
                128 + len(&r.prompt)
                    + len(&r.negative_prompt)
                    + len(&r.model)
                    + r.sampler.as_deref().map_or(0, len)
                    + r.webhook.as_deref().map_or(0, len)
                    + idempotency_key.as_deref().map_or(0, len)
            }
            Command::Complete { outcome: Outcome::Succeeded { result, model_hash, notes }, .. } => {
                let holders = result.location.nodes().map_or(0, |n| 8 * n.len() as u64);
                let key = match &result.location {
                    crate::result::Location::Object(k) => len(k),
                    crate::result::Location::Nodes(_) => 0,
                };
                192 + holders + key + len(model_hash) + notes.iter().map(|n| len(n)).sum::<u64>()
            }
            Command::Complete { outcome: Outcome::Failed { error, .. } | Outcome::Unavailable { error }, .. } => {
                128 + len(error)
            }
            Command::Assign { assignments } => 32 + 24 * assignments.len() as u64,
            Command::Requeue { jobs, reason } => 32 + 24 * jobs.len() as u64 + len(reason),
            Command::RegisterNode { info, .. } => {
                256 + info.models.iter().map(|m| 256 + len(&m.name) + len(&m.hash)).sum::<u64>()
                    + info.refused_models.iter().map(|r| 16 + len(&r.name) + len(&r.reason)).sum::<u64>()
            }
            Command::ObjectsDeleted { seqs } => 16 + 8 * seqs.len() as u64,
            Command::Batch(cmds) => cmds.iter().map(Command::approx_bytes).sum(),
            _ => 128,
        }
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub job: JobId,
    pub node: NodeId,
    pub attempt: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The result image: its hash, size and where its bytes are durable
    /// (never the bytes themselves, see [`crate::result`]).
    Succeeded {
        result: ResultMeta,
        /// Content hash of the model that made the image.
        model_hash: String,
        /// Things the job should say about its run (e.g. a truncated prompt).
        notes: Vec<String>,
    },
    Failed {
        error: String,
        /// A transient failure (the executor broke, not the input): the job
        /// is queued again while it has attempts left.
        retryable: bool,
    },
    /// The node cannot run the job's model at all, found only when it tried
    /// (a model folder that passed validation but failed to load). Not the
    /// job's fault: it is queued again without spending one of its
    /// `max_attempts` (at most [`crate::state::MAX_UNCOUNTED_ATTEMPTS`]
    /// times), and the node stops advertising the model.
    Unavailable { error: String },
}

/// What a node says about one model it serves: its identity (content hash)
/// and the request limits the API enforces for it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    /// sha256 of the weight files, hex. Nodes serving one name must agree.
    pub hash: String,
    pub family: String,
    /// Width and height must be multiples of this.
    pub pixel_multiple: u32,
    /// Prompt tokens the text encoder takes; longer prompts are truncated.
    pub max_prompt_tokens: u32,
    pub default_side_px: u32,
    pub default_steps: u32,
    /// Guidance scale × 100 (kept integral so registrations compare exactly).
    pub default_guidance_centi: u32,
    pub default_sampler: String,
    pub samplers: Vec<String>,
}

/// A model folder a node found and does not serve, and why (one line, for
/// people: `/v1/cluster`, `GET /v1/models` and a submission naming it say it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedModel {
    pub name: String,
    pub reason: String,
}

/// Refused model folders one registration lists (the rest are in the node's log).
pub const MAX_REFUSED_MODELS: usize = 64;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRegistration {
    pub slots: u32,
    /// Models this node's executor can run, with their hashes and limits.
    pub models: Vec<ModelInfo>,
    /// Models currently loaded in memory (scheduling affinity).
    pub loaded_models: Vec<String>,
    /// The executor's name, e.g. `test-pattern`.
    pub executor: String,
    /// Model folders this node found and does not serve, with the reason.
    pub refused_models: Vec<RefusedModel>,
}

/// Limits that every replica must agree on, so they live in the state.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    /// Submissions beyond this many queued jobs are rejected.
    pub max_queue_depth: u64,
    /// Result images kept; the oldest are evicted beyond it.
    pub max_results: u64,
    /// Total bytes of result images kept; the oldest are evicted beyond it.
    pub max_result_bytes: u64,
    /// Finished job records kept; the oldest are forgotten beyond it (with
    /// their idempotency keys).
    pub max_finished_jobs: u64,
    /// Assignments per job before a lost node or a retryable executor
    /// failure makes the job fail instead of being re-queued again.
    pub max_attempts: u32,
    /// Durable copies of each result kept on the nodes' embedded stores
    /// (capped at the nodes that can hold one); a result survives the loss
    /// of `result_copies - 1` of its holders.
    pub result_copies: u32,
    /// How long a node declared lost keeps counting as a holder before
    /// repair copies its results elsewhere.
    pub repair_delay_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            max_queue_depth: 100_000,
            max_results: 10_000,
            max_result_bytes: 1 << 30,
            max_finished_jobs: 100_000,
            max_attempts: 5,
            result_copies: 3,
            repair_delay_ms: 60_000,
        }
    }
}

/// What `apply` answers for one command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// `created` is false when an idempotent retry found the existing job.
    Submitted {
        job: Box<Job>,
        created: bool,
    },
    /// Per-decision results for `Assign`/`Requeue`: how many took effect.
    Applied {
        count: u32,
    },
    /// Accepted (or an idempotent repeat of an accepted command).
    Ok,
    /// One response per command of a [`Command::Batch`], in order.
    Batch(Vec<Response>),
    Rejected(Rejection),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rejection {
    Invalid(FieldError),
    QueueFull {
        max_queue_depth: u64,
    },
    /// The idempotency key was used before for a different request.
    IdempotencyKeyReused {
        job: JobId,
    },
    UnknownJob,
    /// The attempt is not the current one, or the job is not active on that node.
    StaleAttempt {
        current_attempt: u32,
        state: JobState,
    },
    /// The job is already terminal.
    NotCancellable {
        state: JobState,
    },
    UnknownNode,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::Invalid(e) => write!(f, "invalid {e}"),
            Rejection::QueueFull { max_queue_depth } => write!(f, "queue full ({max_queue_depth} jobs queued)"),
            Rejection::IdempotencyKeyReused { job } => {
                write!(f, "idempotency key already used by job {job} for a different request")
            }
            Rejection::UnknownJob => write!(f, "no such job"),
            Rejection::StaleAttempt { current_attempt, state } => {
                write!(f, "stale attempt (current attempt {current_attempt}, state {})", state.as_str())
            }
            Rejection::NotCancellable { state } => write!(f, "job already {}", state.as_str()),
            Rejection::UnknownNode => write!(f, "unknown node"),
        }
    }
}

impl NodeRegistration {
    pub fn info(&self, model: &str) -> Option<&ModelInfo> {
        self.models.iter().find(|m| m.name == model)
    }

    pub fn has_model(&self, model: &str) -> bool {
        self.info(model).is_some()
    }

    pub fn model_names(&self) -> Vec<String> {
        self.models.iter().map(|m| m.name.clone()).collect()
    }
}
