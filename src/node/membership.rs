//! Joining and leaving, run on the leader, and the cluster view.
//!
//! Up to [`MAX_VOTERS`] nodes vote; later nodes join as learners (they execute
//! jobs, they do not vote), so a large cluster keeps a small quorum. Leaving
//! drains first: the node takes no new jobs, finishes what it has, hands the
//! result copies it holds over to other nodes (it retires: the leader's
//! repair copies them elsewhere), all bounded by `drain_timeout_ms`, and only
//! then leaves the membership.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use openraft::{BasicNode, ChangeMembers};
use raftgen_raft::{Command, NodeId};
use serde_json::{json, Value};

use crate::http::ApiError;
use crate::node::app::App;
use crate::node::config::MAX_VOTERS;

/// A membership change Raft could not make now (another change in progress,
/// leadership moved, a write timed out): a transient server state, so 503
/// with `Retry-After` (a joining node retries; only a 4xx stops it).
fn raft_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "membership", e.to_string()).retry_after(1)
}

pub async fn add_node(app: &App, id: NodeId, addr: &str) -> Result<Value, ApiError> {
    if addr.is_empty() || addr.len() > 256 || addr.contains('/') {
        return Err(ApiError::field("addr", "must be host:port"));
    }
    let membership = app.raft.server_metrics().borrow().membership_config.membership().clone();
    match membership.get_node(&id) {
        Some(node) if node.addr != addr => {
            return Err(ApiError::field(
                "addr",
                format!("node {id} is already a member at {}; remove it first to change its address", node.addr),
            ));
        }
        Some(_) => {}
        None => {
            app.raft.add_learner(id, BasicNode { addr: addr.to_string() }, true).await.map_err(raft_error)?;
        }
    }
    let is_voter = membership.voter_ids().any(|v| v == id);
    let voters = membership.voter_ids().count();
    // A learner that finds no free voter seat now is promoted later by the
    // leader's voter keeper, when one frees up.
    let voter = is_voter || (voters < MAX_VOTERS && promote(app, id).await);
    let role = if voter { "voter" } else { "learner" };
    tracing::info!("node {id} at {addr} is a member ({role})");
    Ok(json!({ "id": id, "addr": addr, "role": role }))
}

pub async fn remove_node(app: &App, id: NodeId) -> Result<Value, ApiError> {
    let membership = app.raft.server_metrics().borrow().membership_config.membership().clone();
    if membership.get_node(&id).is_none() {
        return Err(ApiError::not_found("node"));
    }
    let is_voter = membership.voter_ids().any(|v| v == id);
    if is_voter && membership.voter_ids().count() == 1 {
        return Err(ApiError::field("id", "cannot remove the last voter"));
    }
    let timeout = app.settings.submit_timeout();
    // Drain: no new work, wait for the running jobs (bounded).
    let _ = app.write(Command::SetDraining { node: id, draining: true }, timeout).await;
    let started = Instant::now();
    let deadline = Instant::now() + Duration::from_millis(app.settings.drain_timeout_ms);
    let drained = tokio::time::timeout_at(deadline.into(), app.until_idle(id)).await.is_ok();
    // Its results: copies elsewhere first (the repair loop makes them).
    let _ = app.write(Command::Retire { node: id }, timeout).await;
    let handed_over = tokio::time::timeout_at(deadline.into(), until_handed_over(app, id)).await.is_ok();
    let change = if is_voter {
        ChangeMembers::RemoveVoters(BTreeSet::from([id]))
    } else {
        ChangeMembers::RemoveNodes(BTreeSet::from([id]))
    };
    app.raft.change_membership(change, false).await.map_err(raft_error)?;
    // Its unfinished jobs (if the drain timed out) go back to the queue.
    app.write(Command::ForgetNode { node: id }, timeout).await.map_err(raft_error)?;
    tracing::info!("node {id} left the cluster (drained: {drained}, results handed over: {handed_over})");
    if let Some(node) = membership.get_node(&id) {
        tell_left(app, id, &node.addr).await;
    }
    Ok(json!({
        "id": id,
        "removed": true,
        "drained": drained,
        "results_handed_over": handed_over,
        "drain_ms": started.elapsed().as_millis() as u64
    }))
}

/// Tells node `id` that it left, so that it stops (and records it: restarted,
/// it rejoins as a new member with `--join`, or says how to). Best effort: a
/// node that does not hear it keeps running outside the cluster until stopped.
async fn tell_left(app: &App, id: NodeId, addr: &str) {
    if id == app.id {
        if let Err(e) = crate::node::mark_left(app) {
            tracing::warn!("recording that this node left: {e}");
        }
        return;
    }
    let resp = app
        .client
        .post(app.scheme.url(addr, crate::http::internal::PATH_LEFT))
        .header(raftgen_raft::network::SECRET_HEADER, &*app.secret)
        .timeout(Duration::from_secs(2))
        .json(&json!({ "id": id }))
        .send()
        .await;
    match resp {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => tracing::warn!("node {id} at {addr} was not told it left: HTTP {}", r.status()),
        Err(e) => tracing::warn!("node {id} at {addr} was not told it left: {e}"),
    }
}

/// Resolves once no result depends on `node`'s copy (see
/// [`raftgen_raft::repair::needed_before_leaving`]).
async fn until_handed_over(app: &App, node: NodeId) {
    loop {
        let members: BTreeSet<NodeId> = app.members().into_keys().collect();
        let now = crate::node::results::object::now_ms();
        let needed = raftgen_raft::repair::needed_before_leaving(&app.view.read().jobs, &members, node, now);
        if needed == 0 {
            return;
        }
        tracing::debug!("node {node} leaving: {needed} result(s) still need copies elsewhere");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Makes `id` a voter, retrying for a while if another membership change is in
/// flight (two nodes joining at once). Returns whether it is a voter now.
async fn promote(app: &App, id: NodeId) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match app.raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false).await {
            Ok(_) => return true,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("promoting node {id}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                tracing::warn!("promoting node {id}: {e}");
                return false;
            }
        }
    }
}

/// Leader duty, run by the scheduler loop: while fewer than [`MAX_VOTERS`]
/// vote, promote the lowest-id learner that is healthy and caught up. This
/// repairs every path that can leave a voter seat empty: concurrent joins, a
/// leave, a leader that crashed between adding a learner and promoting it.
pub async fn keep_voters(app: &App, healthy: impl Fn(NodeId) -> bool) {
    let (membership, replication, last_log) = {
        let m = app.raft.metrics();
        let m = m.borrow();
        (m.membership_config.membership().clone(), m.replication.clone(), m.last_log_index.unwrap_or(0))
    };
    if membership.get_joint_config().len() > 1 || membership.voter_ids().count() >= MAX_VOTERS {
        return;
    }
    let caught_up = |id: &NodeId| {
        let matched = replication.as_ref().and_then(|r| r.get(id).cloned().flatten()).map_or(0, |l| l.index);
        matched + 100 >= last_log
    };
    if let Some(learner) = membership.learner_ids().filter(|id| healthy(*id) && caught_up(id)).min() {
        match app.raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([learner])), false).await {
            Ok(_) => tracing::info!("promoted learner {learner} to voter"),
            Err(e) => tracing::debug!("promoting learner {learner}: {e}"),
        }
    }
}

/// `GET /v1/cluster`: leader, term, members with role, health, slots, running.
pub fn cluster_view(app: &App) -> ClusterView {
    let metrics = app.raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let is_leader = metrics.current_leader == Some(app.id);
    let node_timeout = Duration::from_millis(app.settings.node_timeout_ms);
    let data = app.view.read();
    let nodes: BTreeMap<NodeId, &BasicNode> = membership.nodes().map(|(id, n)| (*id, n)).collect();
    let members = nodes
        .iter()
        .map(|(id, node)| {
            let healthy = if *id == app.id {
                Some(true)
            } else if is_leader {
                Some(app.health.last_ack(*id).is_some_and(|t| t.elapsed() < node_timeout))
            } else {
                None
            };
            let info = data.jobs.nodes().get(id);
            MemberView {
                id: *id,
                addr: node.addr.clone(),
                role: if voters.contains(id) { "voter" } else { "learner" },
                healthy,
                slots: info.map_or(0, |i| i.registration.slots),
                running: data.jobs.active_count(*id),
                draining: info.is_some_and(|i| i.draining),
                lost: data.jobs.lost_since(*id).is_some(),
                retiring: data.jobs.is_retiring(*id),
                executor: info.map(|i| i.registration.executor.clone()),
                models: info.map(|i| i.registration.model_names()).unwrap_or_default(),
                loaded_models: info.map(|i| i.registration.loaded_models.clone()).unwrap_or_default(),
                model_conflicts: info
                    .map(|i| i.registration.model_names().into_iter().filter(|m| !data.jobs.serves(*id, m)).collect())
                    .unwrap_or_default(),
                refused_models: info
                    .map(|i| {
                        i.registration
                            .refused_models
                            .iter()
                            .map(|r| RefusedModelView { name: r.name.clone(), reason: r.reason.clone() })
                            .collect()
                    })
                    .unwrap_or_default(),
            }
        })
        .collect();
    ClusterView {
        leader_id: metrics.current_leader,
        term: metrics.current_term,
        members,
        queue_depth: data.jobs.queue_depth(),
        model_hashes: data.jobs.model_hashes().clone(),
        answered_by: app.id,
        applied_index: metrics.last_applied.map(|l| l.index),
    }
}

/// The cluster as one node sees it (`GET /v1/cluster`).
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ClusterView {
    pub leader_id: Option<u64>,
    pub term: u64,
    pub members: Vec<MemberView>,
    /// Jobs waiting for a slot.
    pub queue_depth: usize,
    /// Model name to the content hash of its bytes, as the cluster knows them.
    pub model_hashes: BTreeMap<String, String>,
    /// The node that answered (a follower asks the leader, which knows health).
    pub answered_by: u64,
    pub applied_index: Option<u64>,
}

/// One member of the cluster.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct MemberView {
    pub id: u64,
    pub addr: String,
    /// `voter` or `learner`.
    pub role: &'static str,
    /// Whether the leader hears from it (`null` when a follower answered).
    pub healthy: Option<bool>,
    pub slots: u32,
    /// Jobs assigned to or running on it.
    pub running: usize,
    pub draining: bool,
    /// Declared lost by the leader (no answer for `--node-timeout-ms`): no
    /// new result copies go to it.
    pub lost: bool,
    /// Leaving: its result copies are being handed over.
    pub retiring: bool,
    pub executor: Option<String>,
    pub models: Vec<String>,
    pub loaded_models: Vec<String>,
    /// Models it advertises with other bytes than the cluster knows under
    /// the name: it gets none of their jobs.
    pub model_conflicts: Vec<String>,
    /// Model folders it found and does not serve, with the reason (failed
    /// validation at start or a rescan, or failed to load at run time).
    pub refused_models: Vec<RefusedModelView>,
}

/// A model folder a node does not serve, and why.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct RefusedModelView {
    pub name: String,
    pub reason: String,
}
