//! The executor a node hosts: turns one job into one PNG.
//!
//! Executors are synchronous and CPU/GPU-bound; the host runs them on a
//! blocking thread and passes a [`RunControl`] for progress and cancellation.
//! Only the test-pattern executor exists so far; it is a test double (see its
//! module) and must be chosen explicitly.

pub mod test_pattern;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Failed(String),
}

pub trait Executor: Send + Sync + 'static {
    /// A short name shown in `/v1/cluster` (e.g. `test-pattern`).
    fn name(&self) -> &str;
    /// Models this executor can run.
    fn models(&self) -> Vec<String>;
    /// Models currently loaded (for the scheduler's affinity).
    fn loaded_models(&self) -> Vec<String>;
    /// Runs one attempt to completion, returning PNG bytes. Blocking.
    fn generate(&self, job: &JobSpec, ctl: &RunControl) -> Result<Vec<u8>, ExecError>;
}

/// The executor of a node started with `--executor none`: it serves no model,
/// so the node takes part in consensus and the API but never runs a job.
pub struct NoExecutor;

impl Executor for NoExecutor {
    fn name(&self) -> &str {
        "none"
    }
    fn models(&self) -> Vec<String> {
        Vec::new()
    }
    fn loaded_models(&self) -> Vec<String> {
        Vec::new()
    }
    fn generate(&self, _job: &JobSpec, _ctl: &RunControl) -> Result<Vec<u8>, ExecError> {
        Err(ExecError::Failed("this node has no executor".into()))
    }
}
