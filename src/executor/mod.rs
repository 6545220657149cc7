//! The executor a node hosts: turns jobs into PNGs.
//!
//! Executors are synchronous and CPU/GPU-bound; the host runs them on a
//! blocking thread and passes a [`RunControl`] per job for progress and
//! cancellation. Jobs with the same [`Executor::batch_key`] may be handed over
//! together and run as one batch. The real executor is [`diffusion`]; the
//! test-pattern one is a test double (see its module) chosen only explicitly.

pub mod device;
pub mod diffusion;
pub mod png;
pub mod priority;
pub mod test_pattern;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use raftgen_raft::command::{ModelInfo, RefusedModel};
use raftgen_raft::job::{JobId, JobRequest};

/// What an executor gets for one attempt.
#[derive(Clone, Debug)]
pub struct JobSpec {
    pub id: JobId,
    pub attempt: u32,
    pub request: JobRequest,
    /// The seed recorded in the log (the request's or the leader's).
    pub seed: u64,
}

/// Progress reporting and cancellation for one running attempt.
pub struct RunControl {
    cancelled: Arc<AtomicBool>,
    progress: Box<dyn Fn(u32, u32) + Send + Sync>,
}

impl RunControl {
    pub fn new(cancelled: Arc<AtomicBool>, progress: Box<dyn Fn(u32, u32) + Send + Sync>) -> Self {
        RunControl { cancelled, progress }
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// Reports that `step` of `steps` is done.
    pub fn progress(&self, step: u32, steps: u32) {
        (self.progress)(step, steps)
    }
}

/// What a rescan of the model folders found.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Rescan {
    pub served: Vec<String>,
    pub refused: Vec<RefusedModel>,
    /// Served now, not before.
    pub added: Vec<String>,
    /// Served before, not now.
    pub removed: Vec<String>,
}

/// Why an attempt produced no image. The host reports `Invalid` as a final
/// failure, `Failed` as a retryable one (the job is queued again while it
/// has attempts left, see `ClusterConfig::max_attempts`) and `Unavailable`
/// as one that spends no attempt.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ExecError {
    /// The attempt is no longer current (cancelled, re-queued, timed out).
    #[error("cancelled")]
    Cancelled,
    /// The job cannot run as asked: bad input for the model, or a model this
    /// node cannot hold. Running it again would fail the same way.
    #[error("{0}")]
    Invalid(String),
    /// The executor broke (an internal error, out of memory, I/O, a crash):
    /// another attempt may well succeed.
    #[error("{0}")]
    Failed(String),
    /// This node cannot run the job's model at all (its folder passed
    /// validation but failed to load): another node may. The executor stops
    /// advertising the model; the job is queued again without spending an
    /// attempt ([`raftgen_raft::command::Outcome::Unavailable`]).
    #[error("{0}")]
    Unavailable(String),
}

impl ExecError {
    /// Whether another attempt of the job may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ExecError::Failed(_))
    }
}

/// A finished image and what the cluster records with it.
#[derive(Clone, Debug)]
pub struct JobOutput {
    pub png: Vec<u8>,
    /// Content hash of the model that made it.
    pub model_hash: String,
    /// Things to tell the user about the run (e.g. a truncated prompt).
    pub notes: Vec<String>,
}

pub trait Executor: Send + Sync + 'static {
    /// A short name shown in `/v1/cluster` (e.g. `diffusion`).
    fn name(&self) -> &str;
    /// Models this executor can run, with their hashes and limits.
    fn models(&self) -> Vec<ModelInfo>;
    /// Models currently loaded (for the scheduler's affinity).
    fn loaded_models(&self) -> Vec<String>;
    /// Model folders found and not served, with the reason.
    fn refused_models(&self) -> Vec<RefusedModel> {
        Vec::new()
    }
    /// Reads the model folders again (`SIGHUP`, `POST /v1/models/rescan`).
    fn rescan(&self) -> anyhow::Result<Rescan> {
        anyhow::bail!("the {} executor has no model folders to rescan", self.name())
    }
    /// Where it computes (`cpu`, `cuda:0`), for the start-up log and `/metrics`.
    fn device(&self) -> String {
        "cpu".into()
    }
    /// In which precision (`f32`, `f16`, ...; `none` for executors that run
    /// no model), for the start-up log and `/metrics`.
    fn dtype(&self) -> String {
        "none".into()
    }
    /// How long the last load of each model took on this node (for
    /// `/metrics`); empty for executors that load nothing.
    fn model_load_times(&self) -> Vec<(String, Duration)> {
        Vec::new()
    }
    /// How many batches may run at once (the host also caps jobs at `--slots`).
    fn lanes(&self) -> usize {
        usize::MAX
    }
    /// Jobs with equal keys may run as one batch; `None`: always alone.
    fn batch_key(&self, _job: &JobSpec) -> Option<String> {
        None
    }
    /// Most jobs in one batch.
    fn max_batch(&self) -> usize {
        1
    }
    /// Runs a batch of attempts (one per entry) to completion. Blocking.
    fn generate_batch(&self, jobs: &[(JobSpec, RunControl)]) -> Vec<Result<JobOutput, ExecError>>;
}

/// The executor of a node started with `--executor none`: it serves no model,
/// so the node takes part in consensus and the API but never runs a job.
pub struct NoExecutor;

impl Executor for NoExecutor {
    fn name(&self) -> &str {
        "none"
    }
    fn models(&self) -> Vec<ModelInfo> {
        Vec::new()
    }
    fn loaded_models(&self) -> Vec<String> {
        Vec::new()
    }
    fn generate_batch(&self, jobs: &[(JobSpec, RunControl)]) -> Vec<Result<JobOutput, ExecError>> {
        jobs.iter().map(|_| Err(ExecError::Invalid("this node has no executor".into()))).collect()
    }
}
