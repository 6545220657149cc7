//! The Raft core runs on a runtime of its own.
//!
//! openraft spawns its core, its replication streams and its state-machine
//! worker on whatever tokio runtime creates the `Raft`. On the node's main
//! runtime they would queue behind HTTP handlers, result transfers, PNG
//! checks and the executor host's tasks; a heartbeat that waits there for a
//! worker longer than the followers' election timeout (150-200 ms by
//! default) starts an election nobody needed. Here the `Raft` is created on
//! a dedicated multi-thread runtime (threads `raftgen-raft`, two of them so
//! a snapshot being built cannot hold up the heartbeats), at normal CPU
//! priority, while the executor's threads run niced
//! (`crate::executor::priority`).
//!
//! The handle's methods (`client_write`, `append_entries`, …) are channels
//! into the core, so every other task keeps calling them from the main
//! runtime. Dropping [`RaftRuntime`] stops its threads without waiting
//! (call `Raft::shutdown` first).

use std::future::Future;

use anyhow::Context;

const WORKER_THREADS: usize = 2;

pub struct RaftRuntime {
    runtime: Option<tokio::runtime::Runtime>,
}

impl RaftRuntime {
    pub fn start() -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKER_THREADS)
            .thread_name("raftgen-raft")
            .enable_all()
            .build()
            .context("starting the raft runtime")?;
        Ok(Self { runtime: Some(runtime) })
    }

    /// Runs `f` on the Raft runtime (whatever it spawns stays there) and
    /// waits for its output from the caller's runtime.
    pub async fn run<F>(&self, f: F) -> anyhow::Result<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let runtime = self.runtime.as_ref().context("the raft runtime has stopped")?;
        runtime.spawn(f).await.context("the raft runtime's task ended abnormally")
    }
}

impl Drop for RaftRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            // Dropping a runtime from async code would block (and panic).
            rt.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tasks_spawned_by_what_runs_there_stay_there() {
        let rt = RaftRuntime::start().unwrap();
        let name = rt
            .run(async { tokio::spawn(async { std::thread::current().name().map(str::to_string) }).await.unwrap() })
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("raftgen-raft"));
    }
}
