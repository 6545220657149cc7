//! Graceful shutdown: what a node does between SIGTERM (or Ctrl-C) and exit.
//!
//! A stop is routine (a restart, a rolling update, a machine going down for
//! maintenance), so it must cost no job and as little time as possible:
//!
//! 1. The node marks itself draining in the replicated state: the leader's
//!    scheduler assigns it nothing more, and its `/readyz` answers 503 so a
//!    load balancer stops sending it clients. It keeps serving the API and
//!    taking part in Raft meanwhile.
//! 2. It lets its running jobs finish, for at most `shutdown_timeout_ms`
//!    (a second signal cuts the wait short).
//! 3. It hands back the jobs still unfinished (a `Requeue` command), so other
//!    nodes run them now instead of after the node-loss timeout.
//!
//! Then the caller (`node::run`) stops the HTTP server and Raft. The node stays
//! a member: a restarted node clears its own draining mark (see
//! `host::register`) and takes jobs again. Leaving the cluster for good is
//! `raftgen leave`, which drains the same way and then removes the node.

use std::sync::Arc;
use std::time::{Duration, Instant};

use raftgen_raft::job::JobId;
use raftgen_raft::Command;

use crate::node::app::App;

/// Longest wait for each of the drain's two writes (mark draining, hand back).
const MAX_DRAIN_WRITE_MS: u64 = 3_000;

/// Resolves when the node should stop serving: after a stop signal and the
/// drain it starts.
pub async fn on_signal(app: Arc<App>) {
    stop_signal().await;
    drain(&app).await;
}

/// SIGTERM or SIGINT.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!("no SIGTERM handler ({e}); stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn drain(app: &App) {
    let started = Instant::now();
    let timeout = Duration::from_millis(app.settings.shutdown_timeout_ms);
    let running = app.view.read().jobs.active_count(app.id);
    if !app.is_member() {
        tracing::info!("stopping (not a member: nothing to drain)");
        return;
    }
    tracing::info!("stopping: draining, {running} job(s) running, waiting up to {} ms", timeout.as_millis());
    // Short: without a leader (the rest of the cluster already stopped) nothing
    // is assigned to us anyway, and a stop must not hang on a lost quorum.
    let write_timeout = timeout.min(Duration::from_millis(MAX_DRAIN_WRITE_MS));
    if let Err(e) = app.write(Command::SetDraining { node: app.id, draining: true }, write_timeout).await {
        tracing::warn!("could not mark this node draining: {e}");
    }
    let finished = tokio::select! {
        r = tokio::time::timeout(timeout, app.until_idle(app.id)) => r.is_ok(),
        _ = stop_signal() => {
            tracing::info!("second stop signal: not waiting for running jobs");
            false
        }
    };
    if finished {
        tracing::info!("drained in {} ms", started.elapsed().as_millis());
        return;
    }
    let left: Vec<(JobId, u32)> = app.view.read().jobs.active_on(app.id).map(|j| (j.id, j.attempt)).collect();
    if left.is_empty() {
        return;
    }
    let n = left.len();
    let cmd = Command::Requeue { jobs: left, reason: format!("node {} shut down before the job finished", app.id) };
    match app.write(cmd, write_timeout).await {
        Ok(_) => tracing::info!("handed {n} unfinished job(s) back to the queue"),
        // They are re-queued by the leader once this node is judged lost.
        Err(e) => tracing::warn!("could not hand back {n} unfinished job(s): {e}"),
    }
}
