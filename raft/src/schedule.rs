//! The leader's scheduling decisions, as a pure function of the replicated state
//! and the leader's view of node health.
//!
//! The scheduler loop (in the `raftgen` binary) only gathers inputs, calls
//! [`plan`], and proposes the result as log entries. Because the decision is
//! pure, it is tested here exhaustively, and `apply` re-checks every decision
//! against the state it lands on, so a plan made on stale state is harmless.

use std::collections::BTreeMap;

use crate::command::Assignment;
use crate::job::{JobId, NodeId};
use crate::state::JobStateMachine;

/// How many queued jobs one plan looks at, so a huge queue of jobs that no node
/// can run does not make every tick scan it all.
pub const MAX_QUEUE_SCAN: usize = 10_000;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Active attempts on nodes the leader considers lost: put back in the queue.
    pub requeue: Vec<(JobId, u32)>,
    /// Queued jobs to start on a node.
    pub assign: Vec<Assignment>,
}

/// Decides what the leader should propose now.
///
/// - every active attempt on a node for which `healthy(node)` is false is re-queued;
/// - queued jobs are taken highest priority first, FIFO within a priority, and
///   each goes to a healthy, non-draining node that serves its model and has a
///   free slot, preferring a node with the model already loaded, then the node
///   with the most free slots, then the lowest id (deterministic);
/// - at most `max_assign` assignments.
pub fn plan(sm: &JobStateMachine, healthy: impl Fn(NodeId) -> bool, max_assign: usize) -> Plan {
    let mut out = Plan::default();
    for node in sm.nodes_with_active_jobs() {
        if !healthy(node) {
            out.requeue.extend(sm.active_on(node).map(|j| (j.id, j.attempt)));
        }
    }

    let mut free: BTreeMap<NodeId, u32> = sm
        .nodes()
        .iter()
        .filter(|(id, info)| !info.draining && healthy(**id))
        .map(|(id, info)| (*id, info.registration.slots.saturating_sub(sm.active_count(*id) as u32)))
        .filter(|(_, free)| *free > 0)
        .collect();

    for job in sm.queued().take(MAX_QUEUE_SCAN) {
        if free.is_empty() || out.assign.len() >= max_assign {
            break;
        }
        let model = &job.request.model;
        let best = free
            .iter()
            .filter(|(id, _)| sm.serves(**id, model))
            .max_by_key(|(id, slots)| {
                let loaded = sm.nodes()[*id].registration.loaded_models.contains(model);
                (loaded, **slots, std::cmp::Reverse(**id))
            })
            .map(|(id, _)| *id);
        if let Some(node) = best {
            out.assign.push(Assignment { job: job.id, node, attempt: job.attempt + 1 });
            let slots = free.get_mut(&node).expect("chosen from free");
            *slots -= 1;
            if *slots == 0 {
                free.remove(&node);
            }
        }
    }
    out
}
