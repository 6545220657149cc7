//! Result copies: the state machine's bookkeeping of where images are
//! (content-addressed blobs, holders, the object-store deletion queue) and the
//! pure repair decisions (`push_targets`, `liveness`, `plan`,
//! `needed_before_leaving`), on hand-built states and in a randomized
//! convergence check: applying every plan, with nodes failing, coming back,
//! retiring and leaving, never leaves a result with fewer counting copies
//! than it can have, and ends with exactly the target.

use std::collections::{BTreeMap, BTreeSet};

use raftgen_raft::command::{
    Assignment, ClusterConfig, Command, ModelInfo, NodeRegistration, Outcome, Request, Response,
};
use raftgen_raft::job::{JobId, JobRequest, NodeId};
use raftgen_raft::placement::rank;
use raftgen_raft::repair::{liveness, needed_before_leaving, plan, push_targets, Repair};
use raftgen_raft::result::{Location, ResultHash, ResultMeta};
use raftgen_raft::state::JobStateMachine;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// The leader's clock in these tests: `Request::at_ms` of every command.
const T0: u64 = 1_000_000;

struct Cluster {
    sm: JobStateMachine,
    index: u64,
    now_ms: u64,
}

impl Cluster {
    fn new(config: ClusterConfig) -> Self {
        Cluster { sm: JobStateMachine::new(config), index: 0, now_ms: T0 }
    }

    fn apply(&mut self, cmd: Command) -> Response {
        self.index += 1;
        let resp = self.sm.apply(self.index, &Request { at_ms: self.now_ms, cmd });
        if let Err(e) = self.sm.check_invariants() {
            panic!("invariants broken after {}: {e}", self.index);
        }
        resp
    }

    fn register(&mut self, node: NodeId) {
        let info = NodeRegistration {
            slots: 4,
            models: vec![ModelInfo { name: "m".into(), ..Default::default() }],
            loaded_models: Vec::new(),
            executor: "test-pattern".into(),
            refused_models: Vec::new(),
        };
        assert_eq!(self.apply(Command::RegisterNode { node, info }), Response::Ok);
    }

    /// Runs job `id` on `node` to success with an image named by `content`,
    /// held at `location`.
    fn result(&mut self, id: u128, node: NodeId, content: &str, location: Location, seed: Option<u64>) -> JobId {
        let request = JobRequest {
            prompt: format!("job {content}"),
            negative_prompt: String::new(),
            width: 64,
            height: 64,
            steps: 1,
            guidance: 1.0,
            seed,
            model: "m".into(),
            priority: 0,
            sampler: None,
            cache: true,
            webhook: None,
        };
        let job = JobId(id);
        let resp = self.apply(Command::Submit { id: job, request, seed: Some(7), idempotency_key: None });
        assert!(matches!(resp, Response::Submitted { created: true, .. }), "{resp:?}");
        let attempt = 1;
        let assign = Command::Assign { assignments: vec![Assignment { job, node, attempt }] };
        assert_eq!(self.apply(assign), Response::Applied { count: 1 });
        let result = meta(content, location);
        let outcome = Outcome::Succeeded { result, model_hash: String::new(), notes: Vec::new() };
        assert_eq!(self.apply(Command::Complete { job, node, attempt, outcome }), Response::Ok);
        job
    }

    fn holders(&self, content: &str) -> Option<BTreeSet<NodeId>> {
        self.sm.blob(&sha(content)).and_then(|b| b.location.nodes().cloned())
    }
}

fn sha(content: &str) -> ResultHash {
    ResultHash::of(content.as_bytes())
}

fn meta(content: &str, location: Location) -> ResultMeta {
    ResultMeta { sha256: sha(content), bytes: 100, width: 64, height: 64, location }
}

fn nodes(ids: &[NodeId]) -> Location {
    Location::Nodes(ids.iter().copied().collect())
}

fn members(ids: impl IntoIterator<Item = NodeId>) -> BTreeSet<NodeId> {
    ids.into_iter().collect()
}

fn config(copies: u32) -> ClusterConfig {
    ClusterConfig { result_copies: copies, repair_delay_ms: 10_000, ..ClusterConfig::default() }
}

// ---------------------------------------------------------------------------
// The state machine's bookkeeping
// ---------------------------------------------------------------------------

#[test]
fn jobs_with_the_same_image_share_one_blob_and_it_leaves_with_the_last() {
    let mut c = Cluster::new(ClusterConfig { max_results: 2, ..config(3) });
    c.register(1);
    c.result(1, 1, "same", nodes(&[1, 2]), None);
    c.result(2, 1, "same", nodes(&[1, 3]), None);
    // One blob, two references, holders united.
    assert_eq!(c.sm.blob(&sha("same")).unwrap().refs, 2);
    assert_eq!(c.holders("same"), Some(members([1, 2, 3])));
    assert_eq!(c.sm.result_bytes(), 200, "retention counts each result");
    c.result(3, 1, "other", nodes(&[1]), None); // evicts job 1's result
    assert_eq!(c.sm.blob(&sha("same")).unwrap().refs, 1);
    c.result(4, 1, "third", nodes(&[1]), None); // evicts job 2's: the blob goes
    assert!(c.sm.blob(&sha("same")).is_none());
    assert_eq!(c.sm.blobs().count(), 2);
}

#[test]
fn a_cache_hit_names_the_stored_image_without_copying_it() {
    let mut c = Cluster::new(config(3));
    c.register(1);
    let first = c.result(1, 1, "seeded", nodes(&[1, 2]), Some(7));
    let request = c.sm.job(&first).unwrap().request.clone();
    let resp = c.apply(Command::Submit { id: JobId(2), request, seed: Some(7), idempotency_key: None });
    let Response::Submitted { job, .. } = resp else { panic!("{resp:?}") };
    assert_eq!(job.result.map(|r| r.sha256), Some(sha("seeded")), "{job:?}");
    assert_eq!(c.sm.image(&JobId(2)).map(|i| i.0), Some(sha("seeded")));
    assert_eq!(c.sm.blob(&sha("seeded")).unwrap().refs, 2);
}

#[test]
fn invalid_metadata_fails_the_job_instead_of_entering_the_state() {
    let mut c = Cluster::new(config(3));
    c.register(1);
    let request = JobRequest {
        prompt: "p".into(),
        negative_prompt: String::new(),
        width: 64,
        height: 64,
        steps: 1,
        guidance: 1.0,
        seed: None,
        model: "m".into(),
        priority: 0,
        sampler: None,
        cache: true,
        webhook: None,
    };
    c.apply(Command::Submit { id: JobId(1), request, seed: Some(1), idempotency_key: None });
    c.apply(Command::Assign { assignments: vec![Assignment { job: JobId(1), node: 1, attempt: 1 }] });
    let bad = ResultMeta { location: Location::Nodes(BTreeSet::new()), ..meta("x", nodes(&[1])) };
    let outcome = Outcome::Succeeded { result: bad, model_hash: String::new(), notes: Vec::new() };
    assert_eq!(c.apply(Command::Complete { job: JobId(1), node: 1, attempt: 1, outcome }), Response::Ok);
    let job = c.sm.job(&JobId(1)).unwrap();
    assert_eq!(job.state.as_str(), "failed");
    assert!(job.error.as_deref().unwrap().contains("held by 0 nodes"), "{:?}", job.error);
    assert_eq!(c.sm.blobs().count(), 0);
}

#[test]
fn copies_drops_and_departures_change_the_holders() {
    let mut c = Cluster::new(config(3));
    c.register(1);
    c.result(1, 1, "a", nodes(&[1, 2]), None);
    c.apply(Command::ResultCopied { sha256: sha("a"), node: 3 });
    assert_eq!(c.holders("a"), Some(members([1, 2, 3])));
    // A copy of an image nobody keeps is ignored.
    c.apply(Command::ResultCopied { sha256: sha("gone"), node: 3 });
    assert!(c.sm.blob(&sha("gone")).is_none());
    // A trim needs another holder that is not declared lost.
    c.apply(Command::SetLost { node: 2, lost: true });
    c.apply(Command::SetLost { node: 3, lost: true });
    c.apply(Command::ResultDropped { sha256: sha("a"), node: 1, lost: false });
    assert_eq!(c.holders("a"), Some(members([1, 2, 3])), "the only live holder is never trimmed");
    c.apply(Command::SetLost { node: 3, lost: false });
    c.apply(Command::ResultDropped { sha256: sha("a"), node: 1, lost: false });
    assert_eq!(c.holders("a"), Some(members([2, 3])));
    // A loss is a fact: recorded even for the last holder.
    c.apply(Command::ResultDropped { sha256: sha("a"), node: 3, lost: true });
    c.apply(Command::ResultDropped { sha256: sha("a"), node: 2, lost: true });
    assert_eq!(c.holders("a"), Some(BTreeSet::new()));
    // A node that leaves takes its copies and marks with it.
    c.result(2, 1, "b", nodes(&[1, 2, 4]), None);
    c.apply(Command::Retire { node: 4 });
    assert!(c.sm.is_retiring(4) && c.sm.lost_since(2).is_some());
    c.apply(Command::ForgetNode { node: 4 });
    c.apply(Command::ForgetNode { node: 2 });
    assert_eq!(c.holders("b"), Some(members([1])));
    assert!(!c.sm.is_retiring(4) && c.sm.lost_since(2).is_none());
}

#[test]
fn lost_marks_keep_their_first_time() {
    let mut c = Cluster::new(config(3));
    c.apply(Command::SetLost { node: 5, lost: true });
    c.now_ms += 500;
    c.apply(Command::SetLost { node: 5, lost: true });
    assert_eq!(c.sm.lost_since(5), Some(T0));
}

#[test]
fn object_keys_no_result_names_are_queued_for_deletion() {
    let mut c = Cluster::new(ClusterConfig { max_results: 1, ..config(3) });
    c.register(1);
    c.result(1, 1, "img", Location::Object("p/img.1-1.png".into()), None);
    // The same image uploaded again under another key: the first key stays.
    c.result(2, 1, "img", Location::Object("p/img.2-1.png".into()), None);
    let queued: Vec<String> = c.sm.object_deletions().map(|(_, k)| k.to_string()).collect();
    assert_eq!(queued, vec!["p/img.2-1.png".to_string()]);
    assert_eq!(c.sm.blob(&sha("img")).unwrap().location, Location::Object("p/img.1-1.png".into()));
    // max_results 1 evicted job 1 when job 2 came: job 2 still names the image.
    c.result(3, 1, "new", Location::Object("p/new.3-1.png".into()), None);
    let queued: Vec<(u64, String)> = c.sm.object_deletions().map(|(s, k)| (s, k.to_string())).collect();
    assert_eq!(queued.iter().map(|q| q.1.as_str()).collect::<Vec<_>>(), vec!["p/img.2-1.png", "p/img.1-1.png"]);
    c.apply(Command::ObjectsDeleted { seqs: vec![queued[0].0, 999] });
    assert_eq!(c.sm.object_deletions().map(|(_, k)| k.to_string()).collect::<Vec<_>>(), vec!["p/img.1-1.png"]);
}

#[test]
fn an_object_store_location_outlives_node_copies_of_the_same_image() {
    let mut c = Cluster::new(config(3));
    c.register(1);
    c.result(1, 1, "img", nodes(&[1, 2]), None);
    c.result(2, 1, "img", Location::Object("k.png".into()), None);
    assert_eq!(c.sm.blob(&sha("img")).unwrap().location, Location::Object("k.png".into()));
    c.result(3, 1, "img", nodes(&[3]), None);
    assert_eq!(c.sm.blob(&sha("img")).unwrap().location, Location::Object("k.png".into()));
}

// ---------------------------------------------------------------------------
// Placement of new copies
// ---------------------------------------------------------------------------

#[test]
fn push_targets_skip_lost_and_retiring_nodes_and_cap_the_copies() {
    let mut c = Cluster::new(config(3));
    let all = members(1..=6);
    let s = sha("x");
    let (targets, required) = push_targets(&c.sm, &all, 1, &s);
    assert_eq!(required, 3);
    assert_eq!(targets, rank(&s, 2..=6), "every other member, ranked");
    c.apply(Command::SetLost { node: 2, lost: true });
    c.apply(Command::Retire { node: 3 });
    let (targets, required) = push_targets(&c.sm, &all, 1, &s);
    assert_eq!(required, 3);
    assert_eq!(targets, rank(&s, [4, 5, 6]));
    // A draining node (stopping on SIGTERM, or leaving) gets no new copies.
    c.register(5);
    assert_eq!(c.apply(Command::SetDraining { node: 5, draining: true }), Response::Ok);
    let (targets, required) = push_targets(&c.sm, &all, 1, &s);
    assert_eq!((targets, required), (rank(&s, [4, 6]), 3));
    let (targets, required) = push_targets(&c.sm, &members([1, 4, 5]), 1, &s);
    assert_eq!((targets, required), (vec![4], 2), "a 3-node cluster with one stopping makes 2 copies");
    assert_eq!(c.apply(Command::SetDraining { node: 5, draining: false }), Response::Ok);
    // Capped at the nodes that can hold a copy.
    let (targets, required) = push_targets(&c.sm, &members([1, 2, 3, 4]), 1, &s);
    assert_eq!((targets, required), (vec![4], 2));
    let (targets, required) = push_targets(&c.sm, &members([1]), 1, &s);
    assert_eq!((targets, required), (vec![], 1));
    // One copy configured: no pushes needed.
    let c1 = Cluster::new(config(1));
    assert_eq!(push_targets(&c1.sm, &all, 1, &s).1, 1);
}

#[test]
fn liveness_marks_silent_members_and_clears_the_rest() {
    let mut c = Cluster::new(config(3));
    let m = members(1..=4);
    let marks = liveness(&c.sm, &m, 1, |n| n == 3, |_| false);
    assert_eq!(marks, vec![(3, true)]);
    c.apply(Command::SetLost { node: 3, lost: true });
    c.apply(Command::SetLost { node: 1, lost: true }); // was lost, now leads
    c.apply(Command::SetLost { node: 9, lost: true }); // left the cluster
    assert_eq!(liveness(&c.sm, &m, 1, |n| n == 3, |_| false), vec![(1, false), (9, false)]);
    // A new leader's grace (not silent) does not bring a node back; an answer does.
    assert_eq!(liveness(&c.sm, &m, 2, |_| false, |_| false), vec![(9, false)]);
    assert!(liveness(&c.sm, &m, 2, |_| false, |n| n == 3).contains(&(3, false)));
}

// ---------------------------------------------------------------------------
// Repair plans
// ---------------------------------------------------------------------------

fn all_healthy(_: NodeId) -> bool {
    true
}

#[test]
fn a_fully_replicated_cluster_needs_nothing() {
    let mut c = Cluster::new(config(3));
    c.register(1);
    c.result(1, 1, "a", nodes(&[1, 2, 3]), None);
    c.result(2, 1, "b", nodes(&[2, 3, 4]), None);
    assert_eq!(plan(&c.sm, &members(1..=5), all_healthy, c.now_ms, &BTreeSet::new(), 100), vec![]);
}

#[test]
fn a_departed_holder_is_replaced_from_a_live_one() {
    let mut c = Cluster::new(config(3));
    c.register(1);
    c.result(1, 1, "a", nodes(&[1, 2, 3]), None);
    c.apply(Command::ForgetNode { node: 3 });
    let m = members([1, 2, 4, 5]);
    let p = plan(&c.sm, &m, all_healthy, c.now_ms, &BTreeSet::new(), 100);
    let to = rank(&sha("a"), [4, 5])[0];
    let from = rank(&sha("a"), [1, 2])[0];
    assert_eq!(p, vec![Repair::Copy { sha256: sha("a"), bytes: 100, from, to }]);
    // In flight: not planned again.
    assert_eq!(plan(&c.sm, &m, all_healthy, c.now_ms, &BTreeSet::from([sha("a")]), 100), vec![]);
    c.apply(Command::ResultCopied { sha256: sha("a"), node: to });
    assert_eq!(plan(&c.sm, &m, all_healthy, c.now_ms, &BTreeSet::new(), 100), vec![]);
}

#[test]
fn a_lost_holder_counts_until_the_repair_delay_has_passed() {
    let mut c = Cluster::new(config(3));
    c.register(1);
    c.result(1, 1, "a", nodes(&[1, 2, 3]), None);
    c.apply(Command::SetLost { node: 3, lost: true });
    let m = members(1..=4);
    let unhealthy3 = |n: NodeId| n != 3;
    assert_eq!(plan(&c.sm, &m, unhealthy3, T0 + 9_999, &BTreeSet::new(), 100), vec![]);
    let p = plan(&c.sm, &m, unhealthy3, T0 + 10_000, &BTreeSet::new(), 100);
    assert!(matches!(p.as_slice(), [Repair::Copy { to: 4, from, .. }] if *from == 1 || *from == 2), "{p:?}");
    // The lost node comes back after the copy: one copy too many, trimmed
    // once every holder is live again (the lowest ranked).
    c.apply(Command::ResultCopied { sha256: sha("a"), node: 4 });
    assert_eq!(plan(&c.sm, &m, unhealthy3, T0 + 20_000, &BTreeSet::new(), 100), vec![]);
    c.apply(Command::SetLost { node: 3, lost: false });
    let p = plan(&c.sm, &m, all_healthy, T0 + 20_000, &BTreeSet::new(), 100);
    let last = *rank(&sha("a"), 1..=4).last().unwrap();
    assert_eq!(p, vec![Repair::Trim { sha256: sha("a"), node: last }]);
    // Not while a holder is unhealthy: that copy may be the one that counts.
    assert_eq!(plan(&c.sm, &m, |n| n != last % 4 + 1, T0 + 20_000, &BTreeSet::new(), 100), vec![]);
}

#[test]
fn nothing_is_planned_without_a_live_source_or_a_free_node() {
    let mut c = Cluster::new(config(3));
    c.register(1);
    c.result(1, 1, "a", nodes(&[1]), None);
    // The only holder does not answer: nothing to copy from.
    assert_eq!(plan(&c.sm, &members(1..=3), |n| n != 1, c.now_ms, &BTreeSet::new(), 100), vec![]);
    // Every member already holds it: nowhere to copy to (2 nodes, target 2).
    c.result(2, 1, "b", nodes(&[1, 2]), None);
    let p = plan(&c.sm, &members([1, 2]), all_healthy, c.now_ms, &BTreeSet::new(), 100);
    assert_eq!(p, vec![Repair::Copy { sha256: sha("a"), bytes: 100, from: 1, to: 2 }]);
}

#[test]
fn a_leaving_node_hands_its_copies_over_first() {
    let mut c = Cluster::new(config(2));
    c.register(1);
    c.result(1, 1, "a", nodes(&[1, 2]), None);
    c.result(2, 1, "b", nodes(&[2, 3]), None);
    c.result(3, 1, "c", nodes(&[1, 3]), None);
    let m = members(1..=4);
    assert_eq!(needed_before_leaving(&c.sm, &m, 2, c.now_ms), 2);
    c.apply(Command::Retire { node: 2 });
    let p = plan(&c.sm, &m, all_healthy, c.now_ms, &BTreeSet::new(), 100);
    assert_eq!(p.len(), 2, "{p:?}");
    for r in &p {
        let Repair::Copy { sha256, to, from, .. } = r else { panic!("{r:?}") };
        assert_ne!(*to, 2, "no copy goes to a retiring node");
        assert!(c.holders(["a", "b"].into_iter().find(|x| sha(x) == *sha256).unwrap()).unwrap().contains(from));
        c.apply(Command::ResultCopied { sha256: *sha256, node: *to });
    }
    assert_eq!(needed_before_leaving(&c.sm, &m, 2, c.now_ms), 0);
    assert_eq!(plan(&c.sm, &m, all_healthy, c.now_ms, &BTreeSet::new(), 100), vec![]);
}

#[test]
fn plans_respect_their_bound() {
    let mut c = Cluster::new(config(3));
    c.register(1);
    for i in 0..10 {
        c.result(i, 1, &format!("r{i}"), nodes(&[1]), None);
    }
    assert_eq!(plan(&c.sm, &members(1..=5), all_healthy, c.now_ms, &BTreeSet::new(), 7).len(), 7);
    assert_eq!(plan(&c.sm, &members(1..=5), all_healthy, c.now_ms, &BTreeSet::new(), 100).len(), 20);
}

/// Counting copies of every result, as `plan` counts them.
fn counting(sm: &JobStateMachine, m: &BTreeSet<NodeId>, now: u64) -> BTreeMap<ResultHash, usize> {
    sm.blobs()
        .filter_map(|(s, b)| Some((*s, b.location.nodes()?)))
        .map(|(s, h)| {
            let n = h
                .iter()
                .filter(|n| {
                    m.contains(n)
                        && !sm.is_retiring(**n)
                        && sm.lost_since(**n).is_none_or(|t| now.saturating_sub(t) < sm.config().repair_delay_ms)
                })
                .count();
            (s, n)
        })
        .collect()
}

/// Random failures, returns, retirements and departures, with the plan
/// applied after each: no result ever loses a counting copy to a plan, and
/// once the cluster is quiet every result has exactly its target.
#[test]
fn randomized_repair_converges_and_never_drops_a_needed_copy() {
    for seed in 0..200 {
        let mut r = StdRng::seed_from_u64(seed);
        let copies = r.gen_range(1..=4);
        let mut c = Cluster::new(config(copies));
        c.register(1);
        let mut m: BTreeSet<NodeId> = (1..=r.gen_range(2..=8)).collect();
        let mut down: BTreeSet<NodeId> = BTreeSet::new();
        for i in 0..r.gen_range(1..12u128) {
            let ids: Vec<NodeId> = m.iter().copied().collect();
            let k = r.gen_range(1..=ids.len().min(copies as usize));
            let holders: Vec<NodeId> = ids.choose_multiple(&mut r, k).copied().collect();
            c.result(i + 1, 1, &format!("s{seed}-{i}"), nodes(&holders), None);
        }
        let mut next_node = 100;
        for step in 0..60 {
            c.now_ms += r.gen_range(0..4_000);
            match r.gen_range(0..10) {
                0 if m.len() > 1 => {
                    let n = *m.iter().copied().collect::<Vec<_>>().choose(&mut r).unwrap();
                    down.insert(n);
                }
                1 => {
                    if let Some(n) = down.iter().next().copied() {
                        down.remove(&n);
                    }
                }
                2 if m.len() > 2 => {
                    let n = *m.iter().copied().collect::<Vec<_>>().choose(&mut r).unwrap();
                    c.apply(Command::Retire { node: n });
                }
                3 if m.len() > 2 => {
                    // A departure: only once its copies are handed over.
                    let n = *m.iter().copied().collect::<Vec<_>>().choose(&mut r).unwrap();
                    if c.sm.is_retiring(n) && needed_before_leaving(&c.sm, &m, n, c.now_ms) == 0 {
                        m.remove(&n);
                        down.remove(&n);
                        c.apply(Command::ForgetNode { node: n });
                    }
                }
                4 => {
                    m.insert(next_node);
                    next_node += 1;
                }
                _ => {}
            }
            let leader = *m.iter().find(|n| !down.contains(n)).unwrap_or(m.iter().next().unwrap());
            for (node, lost) in liveness(&c.sm, &m, leader, |n| down.contains(&n), |n| !down.contains(&n)) {
                c.apply(Command::SetLost { node, lost });
            }
            let before = counting(&c.sm, &m, c.now_ms);
            for d in plan(&c.sm, &m, |n| !down.contains(&n), c.now_ms, &BTreeSet::new(), 1_000) {
                match d {
                    Repair::Copy { sha256, from, to, .. } => {
                        assert!(!down.contains(&from) && !down.contains(&to), "seed {seed} step {step}: {d:?}");
                        c.apply(Command::ResultCopied { sha256, node: to });
                    }
                    Repair::Trim { sha256, node } => {
                        c.apply(Command::ResultDropped { sha256, node, lost: false });
                    }
                }
            }
            let after = counting(&c.sm, &m, c.now_ms);
            for (s, n) in &before {
                let kept = (*n).min(copies as usize);
                assert!(after[s] >= kept, "seed {seed} step {step}: {s:?} went from {n} to {}", after[s]);
            }
        }
        // Quiet: everyone back and answering, time passes, plan to a fixpoint.
        down.clear();
        c.now_ms += 1_000_000;
        let leader = *m.iter().next().unwrap();
        for (node, lost) in liveness(&c.sm, &m, leader, |_| false, |_| true) {
            c.apply(Command::SetLost { node, lost });
        }
        for _ in 0..50 {
            let p = plan(&c.sm, &m, all_healthy, c.now_ms, &BTreeSet::new(), 1_000);
            if p.is_empty() {
                break;
            }
            for d in p {
                match d {
                    Repair::Copy { sha256, to, .. } => c.apply(Command::ResultCopied { sha256, node: to }),
                    Repair::Trim { sha256, node } => c.apply(Command::ResultDropped { sha256, node, lost: false }),
                };
            }
        }
        let eligible = m.iter().filter(|n| !c.sm.is_retiring(**n)).count();
        let target = (copies as usize).min(eligible);
        for (s, n) in counting(&c.sm, &m, c.now_ms) {
            let holders = c.sm.blob(&s).unwrap().location.nodes().unwrap().len();
            // A result whose every holder was lost for good cannot be repaired.
            if holders > 0 {
                assert_eq!(n, target, "seed {seed}: {s:?} ends with {n} counting copies, target {target}");
            }
        }
    }
}
