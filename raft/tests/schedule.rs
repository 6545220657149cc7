//! The scheduler's pure decisions: `plan` on hand-built states, and a
//! randomized check that every plan is accepted by `apply` as a whole.

use std::collections::{BTreeMap, BTreeSet};

use raftgen_raft::command::{
    Assignment, ClusterConfig, Command, ModelInfo, NodeRegistration, Outcome, Request, Response,
};
use raftgen_raft::job::{JobId, JobRequest, JobState, NodeId};
use raftgen_raft::schedule::{plan, Plan, MAX_QUEUE_SCAN};
use raftgen_raft::state::JobStateMachine;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

struct Cluster {
    sm: JobStateMachine,
    index: u64,
}

impl Cluster {
    fn new() -> Self {
        Cluster { sm: JobStateMachine::new(ClusterConfig::default()), index: 0 }
    }

    fn apply(&mut self, cmd: Command) -> Response {
        self.index += 1;
        let resp = self.sm.apply(self.index, &Request { at_ms: self.index, cmd });
        self.sm.check_invariants().unwrap();
        resp
    }

    fn node(&mut self, node: NodeId, slots: u32, models: &[&str], loaded: &[&str]) {
        let info = NodeRegistration {
            slots,
            models: models.iter().map(|m| ModelInfo { name: m.to_string(), ..Default::default() }).collect(),
            loaded_models: loaded.iter().map(|m| m.to_string()).collect(),
            executor: "test-pattern".into(),
            refused_models: Vec::new(),
        };
        assert_eq!(self.apply(Command::RegisterNode { node, info }), Response::Ok);
    }

    fn job(&mut self, id: u128, model: &str, priority: i32) -> JobId {
        let request = JobRequest {
            prompt: format!("job {id}"),
            negative_prompt: String::new(),
            width: 64,
            height: 64,
            steps: 10,
            guidance: 5.0,
            seed: None,
            model: model.to_string(),
            priority,
            sampler: None,
            cache: true,
            webhook: None,
        };
        let resp = self.apply(Command::Submit { id: JobId(id), request, seed: Some(1), idempotency_key: None });
        assert!(matches!(resp, Response::Submitted { created: true, .. }), "{resp:?}");
        JobId(id)
    }

    /// Applies the plan's assignments; all of them must take effect.
    fn apply_plan(&mut self, p: &Plan) {
        if !p.requeue.is_empty() {
            let resp = self.apply(Command::Requeue { jobs: p.requeue.clone(), reason: "lost".into() });
            assert_eq!(resp, Response::Applied { count: p.requeue.len() as u32 });
        }
        if !p.assign.is_empty() {
            let resp = self.apply(Command::Assign { assignments: p.assign.clone() });
            assert_eq!(resp, Response::Applied { count: p.assign.len() as u32 }, "{p:?}");
        }
    }

    fn assign(&mut self, job: JobId, node: NodeId) {
        let attempt = self.sm.job(&job).unwrap().attempt + 1;
        let resp = self.apply(Command::Assign { assignments: vec![Assignment { job, node, attempt }] });
        assert_eq!(resp, Response::Applied { count: 1 });
    }
}

fn all_healthy(_: NodeId) -> bool {
    true
}

fn assigned(p: &Plan) -> Vec<(u128, NodeId)> {
    p.assign.iter().map(|a| (a.job.0, a.node)).collect()
}

#[test]
fn empty_state_plans_nothing() {
    let c = Cluster::new();
    assert_eq!(plan(&c.sm, all_healthy, 10), Plan::default());
    let mut c = Cluster::new();
    c.job(1, "m", 0);
    assert_eq!(plan(&c.sm, all_healthy, 10), Plan::default(), "no nodes");
}

#[test]
fn highest_priority_first_then_fifo() {
    let mut c = Cluster::new();
    c.node(1, 3, &["m"], &[]);
    for (id, prio) in [(1, 0), (2, 1), (3, 0), (4, 2), (5, 1)] {
        c.job(id, "m", prio);
    }
    let p = plan(&c.sm, all_healthy, 10);
    assert_eq!(assigned(&p), vec![(4, 1), (2, 1), (5, 1)], "three slots: the three most urgent");
    assert!(p.assign.iter().all(|a| a.attempt == 1));
    c.apply_plan(&p);
    assert_eq!(plan(&c.sm, all_healthy, 10), Plan::default(), "node full");
    c.node(1, 5, &["m"], &[]);
    assert_eq!(assigned(&plan(&c.sm, all_healthy, 10)), vec![(1, 1), (3, 1)]);
}

#[test]
fn slot_limits_are_respected_per_node() {
    let mut c = Cluster::new();
    c.node(1, 2, &["m"], &[]);
    c.node(2, 1, &["m"], &[]);
    for id in 1..=10 {
        c.job(id, "m", 0);
    }
    let first = c.sm.queued().next().unwrap().id;
    c.assign(first, 1);
    let p = plan(&c.sm, all_healthy, 100);
    let mut per_node: BTreeMap<NodeId, usize> = BTreeMap::new();
    for a in &p.assign {
        *per_node.entry(a.node).or_default() += 1;
    }
    assert_eq!(per_node, BTreeMap::from([(1, 1), (2, 1)]));
    c.apply_plan(&p);
    assert_eq!(c.sm.active_count(1), 2);
    assert_eq!(c.sm.active_count(2), 1);
    assert_eq!(plan(&c.sm, all_healthy, 100), Plan::default());
}

#[test]
fn draining_and_unhealthy_nodes_get_nothing() {
    let mut c = Cluster::new();
    c.node(1, 4, &["m"], &["m"]);
    c.node(2, 4, &["m"], &["m"]);
    c.node(3, 1, &["m"], &[]);
    for id in 1..=5 {
        c.job(id, "m", 0);
    }
    assert_eq!(c.apply(Command::SetDraining { node: 1, draining: true }), Response::Ok);
    let p = plan(&c.sm, |n| n != 2, 10);
    assert_eq!(assigned(&p), vec![(1, 3)], "only node 3 is healthy and not draining");
    assert!(p.requeue.is_empty());
    assert_eq!(plan(&c.sm, |n| n == 1, 10), Plan::default(), "the only healthy node is draining");
    assert_eq!(c.apply(Command::SetDraining { node: 1, draining: false }), Response::Ok);
    assert!(plan(&c.sm, all_healthy, 10).assign.iter().any(|a| a.node == 1));
}

#[test]
fn active_jobs_of_unhealthy_nodes_are_requeued_with_their_current_attempt() {
    let mut c = Cluster::new();
    c.node(1, 2, &["m"], &[]);
    c.node(2, 2, &["m"], &[]);
    let a = c.job(1, "m", 0);
    let b = c.job(2, "m", 0);
    let d = c.job(3, "m", 0);
    c.assign(a, 1);
    // b runs its second attempt on node 1.
    c.assign(b, 2);
    assert_eq!(c.apply(Command::Requeue { jobs: vec![(b, 1)], reason: "x".into() }), Response::Applied { count: 1 });
    c.assign(b, 1);
    c.apply(Command::Start { job: b, node: 1, attempt: 2 });
    c.assign(d, 2);

    let p = plan(&c.sm, |n| n != 1, 10);
    let requeue: BTreeSet<(JobId, u32)> = p.requeue.iter().copied().collect();
    assert_eq!(requeue, BTreeSet::from([(a, 1), (b, 2)]));
    assert!(p.assign.is_empty(), "nothing queued yet: {p:?}");
    c.apply_plan(&p);
    assert_eq!(c.sm.job(&a).unwrap().state, JobState::Queued);
    assert_eq!(c.sm.job(&b).unwrap().state, JobState::Queued);
    assert_eq!(c.sm.job(&d).unwrap().state, JobState::Assigned, "healthy node keeps its job");
    // Next tick: the re-queued jobs go to the healthy node, with the next attempt.
    let p = plan(&c.sm, |n| n != 1, 10);
    assert!(p.requeue.is_empty());
    assert_eq!(p.assign, vec![Assignment { job: a, node: 2, attempt: 2 }]);
    // All healthy: nothing is re-queued.
    assert!(plan(&c.sm, all_healthy, 10).requeue.is_empty());
}

#[test]
fn model_affinity_loaded_then_most_free_slots_then_lowest_id() {
    // Loaded beats free slots.
    let mut c = Cluster::new();
    c.node(1, 8, &["m"], &[]);
    c.node(2, 1, &["m"], &["m"]);
    c.job(1, "m", 0);
    assert_eq!(assigned(&plan(&c.sm, all_healthy, 10)), vec![(1, 2)]);

    // Same loadedness: most free slots (counting active jobs).
    let mut c = Cluster::new();
    c.node(1, 3, &["m"], &[]);
    c.node(2, 2, &["m"], &[]);
    let busy = c.job(1, "m", 0);
    c.assign(busy, 1);
    let second = c.job(2, "m", 0);
    c.assign(second, 1);
    c.job(3, "m", 0);
    assert_eq!(assigned(&plan(&c.sm, all_healthy, 10)), vec![(3, 2)], "node 2 has 2 free, node 1 has 1");

    // Ties: lowest id; and free slots are counted down within one plan.
    let mut c = Cluster::new();
    c.node(5, 2, &["m"], &[]);
    c.node(3, 2, &["m"], &[]);
    for id in 1..=4 {
        c.job(id, "m", 0);
    }
    assert_eq!(assigned(&plan(&c.sm, all_healthy, 10)), vec![(1, 3), (2, 5), (3, 3), (4, 5)]);

    // Loaded model is per job: the node with the job's model loaded wins.
    let mut c = Cluster::new();
    c.node(1, 2, &["a", "b"], &["a"]);
    c.node(2, 2, &["a", "b"], &["b"]);
    c.job(1, "b", 0);
    c.job(2, "a", 0);
    assert_eq!(assigned(&plan(&c.sm, all_healthy, 10)), vec![(1, 2), (2, 1)]);
}

#[test]
fn nodes_not_serving_the_model_are_skipped() {
    let mut c = Cluster::new();
    c.node(1, 4, &["a"], &["a"]);
    c.node(2, 1, &["b"], &[]);
    c.job(1, "c", 10); // nobody serves c: it must not block the others
    c.job(2, "b", 0);
    c.job(3, "b", 0);
    c.job(4, "a", 0);
    let p = plan(&c.sm, all_healthy, 10);
    assert_eq!(assigned(&p), vec![(2, 2), (4, 1)]);
    c.apply_plan(&p);
    assert_eq!(c.sm.job(&JobId(1)).unwrap().state, JobState::Queued);
    // A node that loads a model it does not serve still cannot take it.
    let mut c = Cluster::new();
    c.node(1, 1, &["a"], &["b"]);
    c.job(1, "b", 0);
    assert_eq!(plan(&c.sm, all_healthy, 10), Plan::default());
}

#[test]
fn max_assign_is_respected() {
    let mut c = Cluster::new();
    c.node(1, 10, &["m"], &[]);
    for id in 1..=6 {
        c.job(id, "m", 0);
    }
    assert!(plan(&c.sm, all_healthy, 0).assign.is_empty());
    assert_eq!(assigned(&plan(&c.sm, all_healthy, 2)), vec![(1, 1), (2, 1)]);
    assert_eq!(plan(&c.sm, all_healthy, 100).assign.len(), 6);
    // max_assign does not limit re-queues.
    c.apply_plan(&plan(&c.sm, all_healthy, 100));
    assert_eq!(plan(&c.sm, |_| false, 0).requeue.len(), 6);
}

#[test]
fn scan_is_bounded_to_max_queue_scan() {
    let mut c = Cluster::new();
    c.node(1, 1, &["m"], &[]);
    // Skip per-step invariant checks here: 10k submissions.
    let mut request = JobRequest {
        prompt: "p".into(),
        negative_prompt: String::new(),
        width: 64,
        height: 64,
        steps: 10,
        guidance: 5.0,
        seed: None,
        model: "nobody".into(),
        priority: 0,
        sampler: None,
        cache: true,
        webhook: None,
    };
    for id in 0..=MAX_QUEUE_SCAN as u128 {
        if id == MAX_QUEUE_SCAN as u128 {
            request.model = "m".into();
        }
        c.index += 1;
        let cmd = Command::Submit { id: JobId(id), request: request.clone(), seed: Some(1), idempotency_key: None };
        c.sm.apply(c.index, &Request { at_ms: 0, cmd });
    }
    c.sm.check_invariants().unwrap();
    assert!(plan(&c.sm, all_healthy, 10).assign.is_empty(), "the runnable job is beyond the scan window");
    // Once it is within the window (higher priority), it is found.
    request.priority = 1;
    c.index += 1;
    let cmd = Command::Submit { id: JobId(u128::MAX), request, seed: Some(1), idempotency_key: None };
    c.sm.apply(c.index, &Request { at_ms: 0, cmd });
    assert_eq!(assigned(&plan(&c.sm, all_healthy, 10)), vec![(u128::MAX, 1)]);
}

/// Random states: nodes, jobs, assignments, starts, completions, draining.
fn random_cluster(rng: &mut StdRng) -> Cluster {
    const MODELS: [&str; 3] = ["a", "b", "c"];
    let mut c = Cluster::new();
    for node in 1..=rng.gen_range(1..=5u64) {
        let models: Vec<&str> = MODELS.iter().copied().filter(|_| rng.gen_bool(0.6)).collect();
        let loaded: Vec<&str> = models.iter().copied().filter(|_| rng.gen_bool(0.4)).collect();
        c.node(node, rng.gen_range(0..=3), &models, &loaded);
    }
    let mut next_id = 1u128;
    for _ in 0..rng.gen_range(0..60) {
        match rng.gen_range(0..10) {
            0..=4 => {
                c.job(next_id, MODELS.choose(rng).unwrap(), rng.gen_range(-2..=2));
                next_id += 1;
            }
            5..=6 => {
                // A partial plan with random health, as a previous tick would.
                let down: NodeId = rng.gen_range(0..=6);
                let p = plan(&c.sm, |n| n != down, rng.gen_range(0..=3));
                let p = Plan { requeue: if rng.gen_bool(0.3) { p.requeue } else { Vec::new() }, assign: p.assign };
                c.apply_plan(&p);
            }
            7 => {
                let active: Vec<(JobId, NodeId, u32)> =
                    c.sm.nodes_with_active_jobs()
                        .flat_map(|n| c.sm.active_on(n).map(move |j| (j.id, n, j.attempt)))
                        .collect();
                if let Some((job, node, attempt)) = active.choose(rng).copied() {
                    let outcome = if rng.gen_bool(0.5) {
                        Outcome::Succeeded { result: meta(), model_hash: "h".into(), notes: Vec::new() }
                    } else {
                        Outcome::Failed { error: "x".into(), retryable: false }
                    };
                    assert_eq!(c.apply(Command::Complete { job, node, attempt, outcome }), Response::Ok);
                }
            }
            8 => {
                let node = rng.gen_range(1..=5);
                c.apply(Command::SetDraining { node, draining: rng.gen_bool(0.5) });
            }
            _ => {
                let node = rng.gen_range(1..=5);
                let models: Vec<&str> = MODELS.iter().copied().filter(|_| rng.gen_bool(0.6)).collect();
                let loaded: Vec<&str> = models.iter().copied().filter(|_| rng.gen_bool(0.4)).collect();
                // Slots may shrink below the active count: plan must cope.
                c.node(node, rng.gen_range(0..=3), &models, &loaded);
            }
        }
    }
    c
}

#[test]
fn randomized_plans_are_always_accepted_by_apply() {
    let mut assignments = 0;
    let mut requeues = 0;
    for seed in 0..300 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut c = random_cluster(&mut rng);
        let healthy: BTreeSet<NodeId> = (0..=6).filter(|_| rng.gen_bool(0.7)).collect();
        let max_assign = rng.gen_range(0..=8);
        let p = plan(&c.sm, |n| healthy.contains(&n), max_assign);
        let before = c.sm.clone();

        // Shape of the plan.
        assert!(p.assign.len() <= max_assign, "seed {seed}");
        let jobs: BTreeSet<JobId> = p.assign.iter().map(|a| a.job).collect();
        assert_eq!(jobs.len(), p.assign.len(), "seed {seed}: a job planned twice");
        for a in &p.assign {
            let job = before.job(&a.job).unwrap();
            let node = &before.nodes()[&a.node];
            assert_eq!(job.state, JobState::Queued, "seed {seed}");
            assert_eq!(a.attempt, job.attempt + 1, "seed {seed}");
            assert!(healthy.contains(&a.node) && !node.draining, "seed {seed}: {a:?}");
            assert!(node.registration.has_model(&job.request.model), "seed {seed}: {a:?}");
        }
        for (job, attempt) in &p.requeue {
            let j = before.job(job).unwrap();
            assert!(j.state.is_active() && j.attempt == *attempt, "seed {seed}");
            assert!(!healthy.contains(&j.node.unwrap()), "seed {seed}: requeue from a healthy node");
        }
        let expected_requeue: usize =
            before.nodes_with_active_jobs().filter(|n| !healthy.contains(n)).map(|n| before.active_count(n)).sum();
        assert_eq!(p.requeue.len(), expected_requeue, "seed {seed}: every lost attempt is re-queued");

        // apply accepts the whole plan (assignments first: they do not depend on the re-queues).
        if !p.assign.is_empty() {
            let resp = c.apply(Command::Assign { assignments: p.assign.clone() });
            assert_eq!(resp, Response::Applied { count: p.assign.len() as u32 }, "seed {seed}: {p:?}");
        }
        if !p.requeue.is_empty() {
            let resp = c.apply(Command::Requeue { jobs: p.requeue.clone(), reason: "lost".into() });
            assert_eq!(resp, Response::Applied { count: p.requeue.len() as u32 }, "seed {seed}");
        }
        assignments += p.assign.len();
        requeues += p.requeue.len();

        // Work-conserving: unless max_assign stopped it, no queued job is left
        // that a healthy, non-draining node serving its model has room for.
        // (Jobs re-queued by this very plan wait for the next tick.)
        if p.assign.len() < max_assign {
            for job in c.sm.queued().filter(|j| before.job(&j.id).unwrap().state == JobState::Queued) {
                for (id, info) in c.sm.nodes() {
                    let room = (info.registration.slots as usize).saturating_sub(c.sm.active_count(*id));
                    let eligible = healthy.contains(id)
                        && !info.draining
                        && info.registration.has_model(&job.request.model)
                        && room > 0;
                    assert!(!eligible, "seed {seed}: job {} left queued while node {id} has room", job.id);
                }
            }
        }
    }
    assert!(assignments > 200 && requeues > 50, "{assignments} assignments, {requeues} re-queues");
}

/// A result's metadata (the image is off the log), held by node 1.
fn meta() -> raftgen_raft::result::ResultMeta {
    raftgen_raft::result::ResultMeta {
        sha256: raftgen_raft::result::ResultHash::of(b"png"),
        bytes: 4,
        width: 64,
        height: 64,
        location: raftgen_raft::result::Location::Nodes(std::collections::BTreeSet::from([1])),
    }
}
