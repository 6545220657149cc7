//! The leader's scheduler loop: gathers inputs (the applied state and the
//! health clock), asks the pure [`plan`](raftgen_raft::schedule::plan) what to
//! do, and proposes it as log entries. It runs on every node and acts only
//! while the node leads; a new leader first gives every node a full
//! `node_timeout_ms` before judging it lost. The same judgement is recorded
//! in the state ([`liveness`](raftgen_raft::repair::liveness): `SetLost`), so
//! every node places new result copies away from a lost node and repair
//! knows since when it is gone.

use std::sync::Arc;
use std::time::Duration;

use raftgen_raft::schedule::plan;
use raftgen_raft::Command;

use crate::node::app::App;
use crate::node::config::MAX_ASSIGN_PER_ENTRY;

/// How often the scheduler looks even when nothing was applied (health checks).
const TICK_MS: u64 = 100;

pub async fn run(app: Arc<App>) {
    let mut applied = app.view.subscribe();
    let mut shutdown = app.shutdown.clone();
    let mut led_term: Option<u64> = None;
    let mut last_membership_check = std::time::Instant::now();
    let node_timeout = Duration::from_millis(app.settings.node_timeout_ms);
    loop {
        tokio::select! {
            _ = applied.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(TICK_MS)) => {}
            _ = shutdown.changed() => return,
        }
        let (leader, term, members) = {
            let m = app.raft.metrics();
            let m = m.borrow();
            let members: Vec<u64> = m.membership_config.membership().nodes().map(|(id, _)| *id).collect();
            (m.current_leader, m.current_term, members)
        };
        if leader != Some(app.id) {
            led_term = None;
            continue;
        }
        if led_term != Some(term) {
            // New leadership: every node gets a full timeout from now.
            app.health.reset_all(members.iter().copied());
            led_term = Some(term);
            if app.view.read().jobs.config() != &app.settings.cluster {
                let cmd = Command::Configure(app.settings.cluster);
                if let Err(e) = app.propose_local(cmd).await {
                    tracing::debug!("configure: {e:?}");
                }
            }
        }
        let healthy = |node: u64| -> bool {
            node == app.id
                || (members.contains(&node) && app.health.last_ack(node).is_some_and(|t| t.elapsed() < node_timeout))
        };
        if last_membership_check.elapsed() >= Duration::from_millis(TICK_MS) {
            last_membership_check = std::time::Instant::now();
            crate::node::membership::keep_voters(&app, &healthy).await;
        }
        let marks = {
            let ids: std::collections::BTreeSet<u64> = members.iter().copied().collect();
            let answered = |n: u64| app.health.last_answer(n).is_some_and(|t| t.elapsed() < node_timeout);
            // Silent: heard from (or given the new leader's grace) too long
            // ago. A member never heard from since this node leads (one that
            // just joined) is not judged yet.
            let silent = |n: u64| app.health.last_ack(n).is_some_and(|t| t.elapsed() >= node_timeout);
            raftgen_raft::repair::liveness(&app.view.read().jobs, &ids, app.id, silent, answered)
        };
        for (node, lost) in marks {
            if lost {
                tracing::warn!("declaring node {node} lost: no answer for {} ms", node_timeout.as_millis());
            } else {
                tracing::info!("node {node} is back");
            }
            if let Err(e) = app.propose_local(Command::SetLost { node, lost }).await {
                tracing::debug!("marking node {node}: {e:?}");
            }
        }
        let decision = plan(&app.view.read().jobs, healthy, MAX_ASSIGN_PER_ENTRY);
        if !decision.requeue.is_empty() {
            tracing::warn!("re-queueing {} job(s) from lost nodes", decision.requeue.len());
            let cmd = Command::Requeue { jobs: decision.requeue, reason: "node stopped answering".into() };
            if let Err(e) = app.propose_local(cmd).await {
                tracing::debug!("requeue: {e:?}");
            }
        }
        if !decision.assign.is_empty() {
            if let Err(e) = app.propose_local(Command::Assign { assignments: decision.assign }).await {
                tracing::debug!("assign: {e:?}");
            }
        }
    }
}
