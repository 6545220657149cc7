//! Result copies: the pure decisions about where they go and when they are
//! missing, as functions of the replicated state and the leader's view of
//! node health (like [`crate::schedule::plan`] for jobs).
//!
//! - [`push_targets`]: where the node that made a result pushes its copies,
//!   and how many must be durable before it reports the result;
//! - [`liveness`]: which members the leader declares lost (or back);
//! - [`plan`]: which results are under-replicated, and which live holder
//!   copies each to which node; which have a copy too many;
//! - [`needed_before_leaving`]: results a leaving node must hand over first.
//!
//! A copy counts toward a result's `result_copies` while its holder is a
//! member that is neither retiring (leaving) nor declared lost for longer
//! than `repair_delay_ms`. The delay keeps a node that restarts or blips from
//! triggering a copy of everything it holds; a node declared lost gets no new
//! copies at once. Every decision here is re-checked by `apply` against the
//! state it lands on, so a plan made on stale state is harmless; the repair
//! loop (`src/node/results/repair.rs`) only executes them.

use std::collections::BTreeSet;

use crate::job::NodeId;
use crate::placement::rank;
use crate::result::{Location, ResultHash};
use crate::state::JobStateMachine;

/// One repair decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Repair {
    /// `to` fetches the result from `from`, verifies and stores it durably;
    /// then the leader records the new holder (`Command::ResultCopied`).
    Copy { sha256: ResultHash, bytes: u64, from: NodeId, to: NodeId },
    /// `node`'s copy is one too many (every copy that counts is live): the leader
    /// records it gone (`Command::ResultDropped`), then the node deletes it.
    Trim { sha256: ResultHash, node: NodeId },
}

/// Members that may hold a copy that counts: not retiring, not declared lost.
fn eligible(sm: &JobStateMachine, members: &BTreeSet<NodeId>) -> BTreeSet<NodeId> {
    members.iter().copied().filter(|n| !sm.is_retiring(*n) && sm.lost_since(*n).is_none()).collect()
}

/// Whether `node` is draining (stopping or leaving): its copies still count,
/// but it gets no new ones.
fn draining(sm: &JobStateMachine, node: NodeId) -> bool {
    sm.nodes().get(&node).is_some_and(|n| n.draining)
}

/// Whether `node`'s copy counts at `now_ms`.
fn counts(sm: &JobStateMachine, members: &BTreeSet<NodeId>, node: NodeId, now_ms: u64) -> bool {
    members.contains(&node)
        && !sm.is_retiring(node)
        && sm.lost_since(node).is_none_or(|since| now_ms.saturating_sub(since) < sm.config().repair_delay_ms)
}

/// Where the node `me` that made result `sha` pushes copies: the other
/// eligible members, best first, and how many copies in all (its own
/// included) must be durable before it reports the result: `result_copies`,
/// capped at the nodes that can hold one (members neither retiring, lost nor
/// draining). An unreachable candidate is skipped for the next one.
pub fn push_targets(
    sm: &JobStateMachine,
    members: &BTreeSet<NodeId>,
    me: NodeId,
    sha: &ResultHash,
) -> (Vec<NodeId>, usize) {
    let mut eligible = eligible(sm, members);
    eligible.remove(&me);
    // A draining node is stopping (SIGTERM) or leaving: no new copies.
    eligible.retain(|n| !draining(sm, *n));
    let copies = sm.config().result_copies.max(1) as usize;
    let required = copies.min(eligible.len() + 1);
    (rank(sha, eligible), required)
}

/// The members the leader (`leader`) should declare lost (`true`) or back
/// (`false`) now. `silent(n)`: `n` has not answered within the node timeout
/// (a new leader gives every node a full timeout first); `answered(n)`: `n`
/// really answered within it. Marks of nodes that left are cleared.
pub fn liveness(
    sm: &JobStateMachine,
    members: &BTreeSet<NodeId>,
    leader: NodeId,
    silent: impl Fn(NodeId) -> bool,
    answered: impl Fn(NodeId) -> bool,
) -> Vec<(NodeId, bool)> {
    let mut out = Vec::new();
    for &m in members {
        let lost = sm.lost_since(m).is_some();
        if m == leader {
            if lost {
                out.push((m, false));
            }
        } else if !lost && silent(m) {
            out.push((m, true));
        } else if lost && answered(m) {
            out.push((m, false));
        }
    }
    out.extend(sm.lost_nodes().filter(|n| !members.contains(n)).map(|n| (n, false)));
    out
}

/// What the leader should do about result copies now: at most `max`
/// decisions, skipping results in `busy` (copies in flight). `healthy(n)`:
/// the leader hears from `n`. Results are visited in hash order.
pub fn plan(
    sm: &JobStateMachine,
    members: &BTreeSet<NodeId>,
    healthy: impl Fn(NodeId) -> bool,
    now_ms: u64,
    busy: &BTreeSet<ResultHash>,
    max: usize,
) -> Vec<Repair> {
    let copies = sm.config().result_copies.max(1) as usize;
    let eligible = eligible(sm, members);
    let placeable: BTreeSet<NodeId> = eligible.iter().copied().filter(|n| healthy(*n) && !draining(sm, *n)).collect();
    let target = copies.min(eligible.len());
    let mut out = Vec::new();
    for (sha, blob) in sm.blobs() {
        if out.len() >= max {
            break;
        }
        let Location::Nodes(holders) = &blob.location else { continue };
        if busy.contains(sha) {
            continue;
        }
        let good = holders.iter().filter(|n| counts(sm, members, **n, now_ms)).count();
        if good < target {
            let sources = rank(sha, holders.iter().copied().filter(|n| members.contains(n) && healthy(*n)));
            let dests = rank(sha, placeable.iter().copied().filter(|n| !holders.contains(n)));
            if sources.is_empty() {
                continue;
            }
            for (i, to) in dests.into_iter().take(target - good).enumerate() {
                if out.len() >= max {
                    break;
                }
                out.push(Repair::Copy { sha256: *sha, bytes: blob.bytes, from: sources[i % sources.len()], to });
            }
        } else if good > copies {
            // Only while every copy that counts answers: one of them might be
            // the copy that counts tomorrow.
            let counting: Vec<NodeId> = holders.iter().copied().filter(|n| counts(sm, members, *n, now_ms)).collect();
            if counting.iter().all(|n| healthy(*n)) {
                let last = *rank(sha, counting).last().expect("more copies than wanted");
                out.push(Repair::Trim { sha256: *sha, node: last });
            }
        }
    }
    out
}

/// How many results `node` holds that lack enough counting copies on other
/// nodes: a leave waits for this to reach 0 (the node is retiring, so
/// [`plan`] copies them elsewhere meanwhile).
pub fn needed_before_leaving(sm: &JobStateMachine, members: &BTreeSet<NodeId>, node: NodeId, now_ms: u64) -> usize {
    let copies = sm.config().result_copies.max(1) as usize;
    let mut others = eligible(sm, members);
    others.remove(&node);
    let target = copies.min(others.len());
    sm.blobs()
        .filter_map(|(_, b)| b.location.nodes())
        .filter(|holders| holders.contains(&node))
        .filter(|holders| holders.iter().filter(|n| **n != node && counts(sm, members, **n, now_ms)).count() < target)
        .count()
}
