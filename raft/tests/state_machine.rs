//! The job state machine, tested from the outside: randomized command sequences
//! checked after every step (against `check_invariants` and against what the
//! public API shows), replay determinism, and targeted cases for every rule.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use raftgen_raft::codec;
use raftgen_raft::command::{
    Assignment, ClusterConfig, Command, ModelInfo, NodeRegistration, Outcome, Rejection, Request, Response,
};
use raftgen_raft::job::{
    EventKind, FieldError, Job, JobId, JobRequest, JobState, NodeId, MAX_ERROR_CHARS, MAX_EVENTS_PER_JOB,
    MAX_IDEMPOTENCY_KEY_BYTES, MAX_IMAGE_BYTES, MAX_PROMPT_CHARS,
};
use raftgen_raft::result::{Location, ResultHash, ResultMeta};
use raftgen_raft::schedule;
use raftgen_raft::state::{JobCounts, JobStateMachine};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn request(prompt: &str, model: &str, priority: i32) -> JobRequest {
    JobRequest {
        prompt: prompt.to_string(),
        negative_prompt: String::new(),
        width: 64,
        height: 64,
        steps: 20,
        guidance: 7.5,
        seed: None,
        model: model.to_string(),
        priority,
        sampler: None,
        cache: true,
        webhook: None,
    }
}

/// A model as an executor without weights (the test pattern) advertises it.
fn model(name: &str) -> ModelInfo {
    ModelInfo { name: name.to_string(), ..Default::default() }
}

fn registration(slots: u32, models: &[&str]) -> NodeRegistration {
    NodeRegistration {
        slots,
        models: models.iter().map(|m| model(m)).collect(),
        loaded_models: Vec::new(),
        executor: "test-pattern".into(),
        refused_models: Vec::new(),
    }
}

fn all_jobs(sm: &JobStateMachine) -> BTreeMap<JobId, Job> {
    sm.recent_jobs(None, usize::MAX).into_iter().map(|j| (j.id, j.clone())).collect()
}

/// A state machine plus the log index, checking the invariants after each apply.
struct Harness {
    sm: JobStateMachine,
    index: u64,
}

impl Harness {
    fn new(config: ClusterConfig) -> Self {
        Harness { sm: JobStateMachine::new(config), index: 0 }
    }

    fn apply(&mut self, cmd: Command) -> Response {
        self.index += 1;
        let resp = self.sm.apply(self.index, &Request { at_ms: 1_000 + self.index, cmd });
        if let Err(e) = self.sm.check_invariants() {
            panic!("invariants broken after index {}: {e}", self.index);
        }
        resp
    }

    fn submit(&mut self, id: u128, req: JobRequest, key: Option<&str>) -> Response {
        self.apply(Command::Submit {
            id: JobId(id),
            request: req,
            seed: Some(42),
            idempotency_key: key.map(Into::into),
        })
    }

    fn submit_ok(&mut self, id: u128, req: JobRequest) -> JobId {
        match self.submit(id, req, None) {
            Response::Submitted { job, created: true } => job.id,
            other => panic!("submit {id}: {other:?}"),
        }
    }

    fn register(&mut self, node: NodeId, slots: u32, models: &[&str]) {
        assert_eq!(self.apply(Command::RegisterNode { node, info: registration(slots, models) }), Response::Ok);
    }

    fn assign(&mut self, job: JobId, node: NodeId, attempt: u32) -> u32 {
        match self.apply(Command::Assign { assignments: vec![Assignment { job, node, attempt }] }) {
            Response::Applied { count } => count,
            other => panic!("assign: {other:?}"),
        }
    }

    fn complete(&mut self, job: JobId, node: NodeId, attempt: u32, outcome: Outcome) -> Response {
        self.apply(Command::Complete { job, node, attempt, outcome })
    }

    fn requeue(&mut self, job: JobId, attempt: u32) -> u32 {
        match self.apply(Command::Requeue { jobs: vec![(job, attempt)], reason: "node lost".into() }) {
            Response::Applied { count } => count,
            other => panic!("requeue: {other:?}"),
        }
    }

    fn job(&self, id: JobId) -> &Job {
        self.sm.job(&id).unwrap_or_else(|| panic!("job {id} is unknown"))
    }
}

/// The metadata of an image of `len` bytes of `fill` (its hash stands for
/// those bytes), held by node 1.
fn meta(len: usize, fill: u8) -> ResultMeta {
    ResultMeta {
        sha256: image_hash(len, fill),
        bytes: len as u64,
        width: 64,
        height: 64,
        location: Location::Nodes(BTreeSet::from([1])),
    }
}

fn image_hash(len: usize, fill: u8) -> ResultHash {
    ResultHash::of(format!("{len} bytes of {fill}").as_bytes())
}

fn png(len: usize, fill: u8) -> Outcome {
    Outcome::Succeeded { result: meta(len, fill), model_hash: "h".into(), notes: Vec::new() }
}

fn failed(msg: &str) -> Outcome {
    Outcome::Failed { error: msg.to_string(), retryable: false }
}

fn count_events(job: &Job, pred: impl Fn(&EventKind) -> bool) -> usize {
    job.history.iter().filter(|e| pred(&e.kind)).count()
}

// ---------------------------------------------------------------------------
// Randomized: command generator
// ---------------------------------------------------------------------------

const MODELS: [&str; 3] = ["m1", "m2", "m3"];
const PROMPTS: [&str; 2] = ["a cat", "a dog"];
const KEYS: [&str; 6] = ["k1", "k2", "k3", "k4", "k5", "k6"];
/// Registered nodes are 1..=4; 0 and 5 are never registered.
const NODES: [NodeId; 4] = [1, 2, 3, 4];

struct Gen {
    rng: StdRng,
    /// Every job id ever proposed (some forgotten, some never accepted).
    ids: Vec<JobId>,
    /// The slots the generator last registered per node; they never shrink
    /// while the node is known, so "active <= slots" must always hold.
    slots: BTreeMap<NodeId, u32>,
    /// Set when the last command is an `Assign` taken from a fresh plan.
    planned: Option<usize>,
}

impl Gen {
    fn new(seed: u64) -> Self {
        Gen { rng: StdRng::seed_from_u64(seed), ids: Vec::new(), slots: BTreeMap::new(), planned: None }
    }

    fn small_config(&mut self) -> ClusterConfig {
        let r = &mut self.rng;
        ClusterConfig {
            max_queue_depth: r.gen_range(3..=30),
            max_results: r.gen_range(0..=5),
            max_result_bytes: r.gen_range(0..=400),
            max_finished_jobs: r.gen_range(0..=12),
            max_attempts: r.gen_range(1..=4),
            ..ClusterConfig::default()
        }
    }

    fn valid_request(&mut self) -> JobRequest {
        let r = &mut self.rng;
        JobRequest {
            prompt: PROMPTS.choose(r).unwrap().to_string(),
            negative_prompt: String::new(),
            width: 64,
            height: *[64, 128].choose(r).unwrap(),
            steps: 20,
            guidance: 7.5,
            seed: if r.gen_bool(0.5) { None } else { Some(7) },
            model: MODELS.choose(r).unwrap().to_string(),
            priority: r.gen_range(-1..=1),
            sampler: None,
            cache: r.gen_bool(0.8),
            webhook: None,
        }
    }

    fn invalid_request(&mut self) -> JobRequest {
        let mut req = self.valid_request();
        match self.rng.gen_range(0..12) {
            0 => req.prompt = String::new(),
            1 => req.prompt = "   ".into(),
            2 => req.width = 0,
            3 => req.width = 12,
            4 => req.height = 4096,
            5 => req.steps = 0,
            6 => req.steps = 10_000,
            7 => req.guidance = f32::NAN,
            8 => req.guidance = -1.0,
            9 => req.model = String::new(),
            10 => req.priority = 1_000,
            _ => req.prompt = "x".repeat(MAX_PROMPT_CHARS + 1),
        }
        req
    }

    fn node(&mut self) -> NodeId {
        // Mostly real nodes, sometimes one that was never registered.
        if self.rng.gen_bool(0.9) {
            *NODES.choose(&mut self.rng).unwrap()
        } else {
            *[0, 5].choose(&mut self.rng).unwrap()
        }
    }

    fn job_id(&mut self, sm: &JobStateMachine) -> JobId {
        let jobs: Vec<JobId> = sm.recent_jobs(None, usize::MAX).iter().map(|j| j.id).collect();
        let r = self.rng.gen_range(0..10);
        if r < 7 && !jobs.is_empty() {
            *jobs.choose(&mut self.rng).unwrap()
        } else if r < 9 && !self.ids.is_empty() {
            *self.ids.choose(&mut self.rng).unwrap()
        } else {
            JobId(self.rng.gen())
        }
    }

    fn active(&self, sm: &JobStateMachine) -> Vec<(JobId, NodeId, u32)> {
        sm.nodes_with_active_jobs().flat_map(|n| sm.active_on(n).map(move |j| (j.id, n, j.attempt))).collect()
    }

    fn outcome(&mut self) -> Outcome {
        match self.rng.gen_range(0..10) {
            0..=5 => {
                // Sometimes empty (invalid metadata: the job fails).
                let len = self.rng.gen_range(0..=120);
                let fill = self.rng.gen_range(0..4);
                // Mostly the hash the nodes registered (so the cache can hit),
                // sometimes other bytes.
                let model_hash = if self.rng.gen_bool(0.9) { String::new() } else { "other".into() };
                Outcome::Succeeded { result: meta(len, fill), model_hash, notes: Vec::new() }
            }
            6..=7 => failed("bad input"),
            _ => Outcome::Failed { error: "executor crashed".into(), retryable: true },
        }
    }

    /// (job, node, attempt) for a job-targeted command: the current attempt of
    /// an active job most of the time, otherwise something stale or random.
    fn target(&mut self, sm: &JobStateMachine) -> (JobId, NodeId, u32) {
        let active = self.active(sm);
        let r = self.rng.gen_range(0..10);
        if r < 6 && !active.is_empty() {
            *active.choose(&mut self.rng).unwrap()
        } else if r < 8 && !active.is_empty() {
            // Stale: previous attempt, or the right attempt from another node.
            let (job, node, attempt) = *active.choose(&mut self.rng).unwrap();
            if self.rng.gen_bool(0.5) {
                (job, node, attempt.saturating_sub(1))
            } else {
                (job, self.node(), attempt)
            }
        } else {
            // Any job at its recorded coordinates (queued, terminal, gave up, ...)
            // or a random one.
            let job = self.job_id(sm);
            match sm.job(&job) {
                Some(j) if self.rng.gen_bool(0.7) => (job, j.node.unwrap_or_else(|| self.node()), j.attempt),
                _ => (job, self.node(), self.rng.gen_range(0..4)),
            }
        }
    }

    fn command(&mut self, sm: &JobStateMachine) -> Command {
        self.planned = None;
        match self.rng.gen_range(0..100) {
            0..=24 => self.submit(sm),
            25..=29 => {
                let node = *NODES.choose(&mut self.rng).unwrap();
                let min = self.slots.get(&node).copied().unwrap_or(1);
                let slots = self.rng.gen_range(min..=3.max(min));
                self.slots.insert(node, slots);
                let models: Vec<ModelInfo> =
                    MODELS.iter().filter(|_| self.rng.gen_bool(0.6)).map(|m| model(m)).collect();
                let loaded = models.iter().filter(|_| self.rng.gen_bool(0.5)).map(|m| m.name.clone()).collect();
                Command::RegisterNode {
                    node,
                    info: NodeRegistration {
                        slots,
                        models,
                        loaded_models: loaded,
                        executor: "test".into(),
                        refused_models: Vec::new(),
                    },
                }
            }
            30..=44 => {
                if self.rng.gen_bool(0.7) {
                    let down: NodeId = self.rng.gen_range(0..=6);
                    let max = self.rng.gen_range(1..=4);
                    let plan = schedule::plan(sm, |n| n != down, max);
                    if !plan.assign.is_empty() {
                        self.planned = Some(plan.assign.len());
                        return Command::Assign { assignments: plan.assign };
                    }
                }
                let n = self.rng.gen_range(1..=3);
                let assignments = (0..n)
                    .map(|_| {
                        let job = self.job_id(sm);
                        let base = sm.job(&job).map_or(0, |j| j.attempt);
                        let attempt = base + self.rng.gen_range(0..=2);
                        Assignment { job, node: self.node(), attempt }
                    })
                    .collect();
                Command::Assign { assignments }
            }
            45..=52 => {
                let (job, node, attempt) = self.target(sm);
                Command::Start { job, node, attempt }
            }
            53..=56 => {
                let (job, node, attempt) = self.target(sm);
                let steps = self.rng.gen_range(1..=30);
                let step = self.rng.gen_range(0..=40);
                Command::Progress { job, node, attempt, step, steps }
            }
            57..=71 => {
                let (job, node, attempt) = self.target(sm);
                let outcome = self.outcome();
                Command::Complete { job, node, attempt, outcome }
            }
            72..=78 => {
                if self.rng.gen_bool(0.3) {
                    let down = *NODES.choose(&mut self.rng).unwrap();
                    let plan = schedule::plan(sm, |n| n != down, 0);
                    if !plan.requeue.is_empty() {
                        return Command::Requeue { jobs: plan.requeue, reason: format!("node {down} lost") };
                    }
                }
                let n = self.rng.gen_range(1..=3);
                let jobs = (0..n)
                    .map(|_| {
                        let (job, _, attempt) = self.target(sm);
                        (job, attempt)
                    })
                    .collect();
                Command::Requeue { jobs, reason: "node lost".into() }
            }
            79..=84 => Command::Cancel { job: self.job_id(sm) },
            85..=89 => Command::SetDraining { node: self.node(), draining: self.rng.gen_bool(0.4) },
            90..=91 => {
                let node = self.node();
                self.slots.remove(&node);
                Command::ForgetNode { node }
            }
            92..=94 => {
                // Where images are: repair's copies and trims, losses, marks.
                let blobs: Vec<ResultHash> = sm.blobs().map(|(s, _)| *s).collect();
                let sha256 = match blobs.choose(&mut self.rng) {
                    Some(s) if self.rng.gen_bool(0.9) => *s,
                    _ => image_hash(self.rng.gen_range(1..10), 9),
                };
                let node = self.node();
                match self.rng.gen_range(0..5) {
                    0 => Command::ResultCopied { sha256, node },
                    1 => Command::ResultDropped { sha256, node, lost: self.rng.gen_bool(0.5) },
                    2 => Command::SetLost { node, lost: self.rng.gen_bool(0.6) },
                    3 => Command::Retire { node },
                    _ => Command::ObjectsDeleted { seqs: vec![self.rng.gen_range(0..4)] },
                }
            }
            _ => Command::Configure(self.small_config()),
        }
    }

    fn submit(&mut self, sm: &JobStateMachine) -> Command {
        let key = match self.rng.gen_range(0..10) {
            0..=4 => None,
            5 => Some(if self.rng.gen_bool(0.5) { String::new() } else { "k".repeat(MAX_IDEMPOTENCY_KEY_BYTES + 1) }),
            _ => Some(KEYS.choose(&mut self.rng).unwrap().to_string()),
        };
        let existing = key
            .as_ref()
            .and_then(|k| sm.recent_jobs(None, usize::MAX).into_iter().find(|j| j.idempotency_key.as_ref() == Some(k)));
        let succeeded = sm.recent_jobs(Some(JobState::Succeeded), usize::MAX);
        let request = match existing {
            // A retry with the same key and request (the common client retry).
            Some(j) if self.rng.gen_bool(0.5) => j.request.clone(),
            _ if self.rng.gen_bool(0.08) => self.invalid_request(),
            // The same request as a finished job (the result cache's case).
            _ if !succeeded.is_empty() && self.rng.gen_bool(0.3) => {
                succeeded[self.rng.gen_range(0..succeeded.len())].request.clone()
            }
            _ => self.valid_request(),
        };
        let id = if !self.ids.is_empty() && self.rng.gen_bool(0.2) {
            *self.ids.choose(&mut self.rng).unwrap()
        } else {
            let id = JobId(self.rng.gen());
            self.ids.push(id);
            id
        };
        // The leader fills the request's seed when it has one (mostly, here).
        let seed = match request.seed {
            Some(s) if self.rng.gen_bool(0.85) => Some(s),
            _ if self.rng.gen_bool(0.8) => Some(self.rng.gen()),
            _ => None,
        };
        Command::Submit { id, request, seed, idempotency_key: key }
    }
}

// ---------------------------------------------------------------------------
// Randomized: the outside observer
// ---------------------------------------------------------------------------

/// What the observer remembers across steps.
#[derive(Default)]
struct Observer {
    /// Incarnation of each job id (a forgotten id can be submitted again).
    generation: HashMap<JobId, u32>,
    /// Completions accepted so far: (job, incarnation, node, attempt).
    accepted: HashSet<(JobId, u32, NodeId, u32)>,
    /// Transitions into Succeeded/Failed per job incarnation.
    finals: HashMap<(JobId, u32), u32>,
}

/// The stored results that answer `request` run with `seed`, found by
/// comparing jobs (not through the state machine's cache keys).
fn cache_sources(sm: &JobStateMachine, request: &JobRequest, seed: Option<u64>) -> Vec<JobId> {
    let (Some(seed), Some(hash), true) = (seed, sm.model_hashes().get(&request.model), request.cache) else {
        return Vec::new();
    };
    if request.seed.is_none() {
        return Vec::new();
    }
    let same = |r: &JobRequest| {
        r.seed.is_some()
            && r.model == request.model
            && r.prompt == request.prompt
            && r.negative_prompt == request.negative_prompt
            && (r.width, r.height, r.steps) == (request.width, request.height, request.steps)
            && r.guidance.to_bits() == request.guidance.to_bits()
            && r.sampler == request.sampler
    };
    sm.recent_jobs(Some(JobState::Succeeded), usize::MAX)
        .into_iter()
        .filter(|j| same(&j.request) && j.seed == seed && j.model_hash.as_ref() == Some(hash))
        .filter(|j| sm.image(&j.id).is_some())
        .map(|j| j.id)
        .collect()
}

fn key_ok(key: &Option<String>) -> bool {
    key.as_ref().is_none_or(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY_BYTES)
}

fn allowed_transition(from: JobState, to: JobState) -> bool {
    use JobState::*;
    from == to
        || matches!(
            (from, to),
            (Queued, Assigned)
                | (Queued, Cancelled)
                | (Assigned, Running)
                | (Assigned | Running, Queued | Succeeded | Failed | Cancelled)
        )
}

/// Only retention may touch a job the command did not name: evict its image.
fn only_retention_changed(before: &Job, after: &Job) -> bool {
    if before == after {
        return true;
    }
    let mut b = before.clone();
    b.result_evicted = true;
    b.history.push(after.history.last().cloned().unwrap_or_else(|| panic!("empty history")));
    !before.result_evicted && after.history.last().map(|e| &e.kind) == Some(&EventKind::ResultEvicted) && b == *after
}

impl Observer {
    /// Checks what the public API shows about one state, independent of history.
    fn check_views(&self, sm: &JobStateMachine) -> Result<(), String> {
        let jobs = sm.recent_jobs(None, usize::MAX);
        if jobs.len() != sm.job_count() {
            return Err(format!("recent_jobs lists {} of {} jobs", jobs.len(), sm.job_count()));
        }
        if jobs.windows(2).any(|w| w[0].seq <= w[1].seq) {
            return Err("recent_jobs is not newest first".into());
        }
        // Exactly one state per job: each job is listed under exactly one state.
        let mut listed: HashMap<JobId, usize> = HashMap::new();
        for st in JobState::ALL {
            for j in sm.recent_jobs(Some(st), usize::MAX) {
                if j.state != st {
                    return Err(format!("{} listed under {st:?} but is {:?}", j.id, j.state));
                }
                *listed.entry(j.id).or_default() += 1;
            }
        }
        if listed.len() != jobs.len() || listed.values().any(|n| *n != 1) {
            return Err("a job is not listed under exactly one state".into());
        }
        // The queue: exactly the queued jobs, highest priority first, then FIFO.
        let queued: Vec<&Job> = sm.queued().collect();
        let n_queued = jobs.iter().filter(|j| j.state == JobState::Queued).count();
        if queued.len() != n_queued
            || sm.queue_depth() != n_queued
            || queued.iter().any(|j| j.state != JobState::Queued)
        {
            return Err(format!("queue lists {} jobs, {n_queued} are queued", queued.len()));
        }
        if queued.windows(2).any(|w| (-w[0].request.priority, w[0].seq) >= (-w[1].request.priority, w[1].seq)) {
            return Err("queue is not in priority/FIFO order".into());
        }
        // At most one current attempt: an active job is on exactly one node's list, its own.
        let mut on_nodes: HashMap<JobId, Vec<NodeId>> = HashMap::new();
        for node in sm.nodes_with_active_jobs() {
            if !sm.nodes().contains_key(&node) {
                return Err(format!("node {node} holds active jobs but is not registered"));
            }
            let active: Vec<&Job> = sm.active_on(node).collect();
            if active.len() != sm.active_count(node) {
                return Err(format!("node {node}: active_on and active_count disagree"));
            }
            for j in active {
                on_nodes.entry(j.id).or_default().push(node);
            }
            // The generator never shrinks a node's slots while it holds jobs.
            let slots = sm.nodes()[&node].registration.slots as usize;
            if sm.active_count(node) > slots {
                return Err(format!("node {node}: {} active jobs on {slots} slots", sm.active_count(node)));
            }
        }
        let mut image_bytes = 0;
        let mut images = 0;
        let mut terminal = 0;
        for j in &jobs {
            let nodes = on_nodes.get(&j.id).cloned().unwrap_or_default();
            if j.state.is_active() {
                if j.node.is_none() || nodes != vec![j.node.unwrap()] {
                    return Err(format!("{}: active with node {:?} but listed on {nodes:?}", j.id, j.node));
                }
            } else if !nodes.is_empty() {
                return Err(format!("{}: {:?} but listed active on {nodes:?}", j.id, j.state));
            }
            if j.state == JobState::Queued && j.node.is_some() {
                return Err(format!("{}: queued with a node", j.id));
            }
            if j.history.first().map(|e| &e.kind) != Some(&EventKind::Submitted)
                || count_events(j, |k| *k == EventKind::Submitted) != 1
            {
                return Err(format!("{}: history does not start with exactly one Submitted", j.id));
            }
            let assigned: Vec<(NodeId, u32)> = j
                .history
                .iter()
                .filter_map(|e| match e.kind {
                    EventKind::Assigned { node, attempt } => Some((node, attempt)),
                    _ => None,
                })
                .collect();
            let expected: Vec<u32> = (1..=j.attempt).collect();
            if assigned.iter().map(|a| a.1).collect::<Vec<_>>() != expected {
                return Err(format!("{}: attempt {} but assignments {assigned:?}", j.id, j.attempt));
            }
            if j.state.is_active() && assigned.last().map(|a| a.0) != j.node {
                return Err(format!("{}: active on {:?} but last assigned to {assigned:?}", j.id, j.node));
            }
            let successes = count_events(j, |k| matches!(k, EventKind::Succeeded { .. } | EventKind::CacheHit { .. }));
            let failures = count_events(j, |k| matches!(k, EventKind::Failed { .. }));
            let cancels = count_events(j, |k| *k == EventKind::Cancelled);
            let expect = |st: JobState| usize::from(j.state == st);
            if successes != expect(JobState::Succeeded)
                || failures != expect(JobState::Failed)
                || cancels != expect(JobState::Cancelled)
            {
                return Err(format!("{}: {:?} with {successes}/{failures}/{cancels} terminal events", j.id, j.state));
            }
            let image = sm.image(&j.id);
            if j.state == JobState::Succeeded {
                let Some(result) = j.result else {
                    return Err(format!("{}: succeeded without size", j.id));
                };
                match image {
                    Some((sha, _)) if !j.result_evicted && sha == result.sha256 => {}
                    None if j.result_evicted => {}
                    _ => return Err(format!("{}: image {:?} but evicted={}", j.id, image, j.result_evicted)),
                }
                let evictions = count_events(j, |k| *k == EventKind::ResultEvicted);
                if evictions != usize::from(j.result_evicted) {
                    return Err(format!("{}: {evictions} eviction events, evicted={}", j.id, j.result_evicted));
                }
            } else if image.is_some() || j.result_evicted || j.result.is_some() {
                return Err(format!("{}: {:?} with a result", j.id, j.state));
            }
            if image.is_some() {
                image_bytes += j.result.map_or(0, |r| r.bytes);
                images += 1;
            }
            if j.state.is_terminal() {
                terminal += 1;
                if j.finished_at_ms.is_none() {
                    return Err(format!("{}: terminal without finish time", j.id));
                }
            }
            if j.history.len() > MAX_EVENTS_PER_JOB + 32 {
                return Err(format!("{}: {} events", j.id, j.history.len()));
            }
        }
        let cfg = sm.config();
        if image_bytes != sm.result_bytes() {
            return Err(format!("images hold {image_bytes} bytes, result_bytes says {}", sm.result_bytes()));
        }
        if images > cfg.max_results || image_bytes > cfg.max_result_bytes || terminal > cfg.max_finished_jobs {
            return Err(format!("retention exceeded: {images} images, {image_bytes} bytes, {terminal} finished"));
        }
        Ok(())
    }

    fn generation(&self, id: JobId) -> u32 {
        self.generation.get(&id).copied().unwrap_or(0)
    }

    /// Checks one step: the transition of every job, and the response.
    fn check_step(
        &mut self,
        index: u64,
        before: &JobStateMachine,
        cmd: &Command,
        resp: &Response,
        after: &JobStateMachine,
    ) -> Result<(), String> {
        self.check_views(after)?;
        let b = all_jobs(before);
        let a = all_jobs(after);

        // Which jobs the command names (others may only lose their image or be forgotten).
        let named: BTreeSet<JobId> = match cmd {
            Command::Submit { id, .. } => [*id].into(),
            Command::Assign { assignments } => assignments.iter().map(|x| x.job).collect(),
            Command::Start { job, .. }
            | Command::Progress { job, .. }
            | Command::Complete { job, .. }
            | Command::Cancel { job } => [*job].into(),
            Command::Requeue { jobs, .. } => jobs.iter().map(|x| x.0).collect(),
            Command::ForgetNode { node } => before.active_on(*node).map(|j| j.id).collect(),
            _ => BTreeSet::new(),
        };

        // Jobs that vanished were terminal, and took their idempotency key with them.
        for (id, job) in &b {
            if !a.contains_key(id) {
                // Finished (by a command naming it) and forgotten in the same step is fine.
                if !job.state.is_terminal() && !named.contains(id) {
                    return Err(format!("{id} vanished while {:?}", job.state));
                }
                if let Some(k) = &job.idempotency_key {
                    if a.values().any(|j| j.idempotency_key.as_ref() == Some(k)) {
                        return Err(format!("key {k} of forgotten {id} is still in use"));
                    }
                }
            }
        }

        let mut finished_now: Vec<JobId> = Vec::new();
        let mut assigned_now: Vec<JobId> = Vec::new();
        let mut requeued_now: Vec<JobId> = Vec::new();
        for (id, job) in &a {
            let Some(prev) = b.get(id) else {
                // New job: only from this Submit.
                let created = matches!(resp, Response::Submitted { created: true, job } if job.id == *id);
                let kinds: Vec<&EventKind> = job.history.iter().map(|e| &e.kind).collect();
                let fresh = job.state == JobState::Queued && kinds.len() == 1;
                // Answered from the cache: succeeded at once (its image maybe
                // already evicted by retention in the same step).
                let cached = job.state == JobState::Succeeded
                    && matches!(
                        kinds[..],
                        [EventKind::Submitted, EventKind::CacheHit { .. }]
                            | [EventKind::Submitted, EventKind::CacheHit { .. }, EventKind::ResultEvicted]
                    );
                if !created || job.attempt != 0 || !(fresh || cached) {
                    return Err(format!("{id} appeared: {:?} after {resp:?}", job.state));
                }
                if job.seq != index * raftgen_raft::command::MAX_BATCH_COMMANDS as u64 {
                    return Err(format!("{id}: seq {} for index {index}", job.seq));
                }
                *self.generation.entry(*id).or_default() += 1;
                continue;
            };
            if !job.history.starts_with(&prev.history) {
                return Err(format!("{id}: history rewritten"));
            }
            if !named.contains(id) && !only_retention_changed(prev, job) {
                return Err(format!("{id}: changed by a command that does not name it"));
            }
            if !allowed_transition(prev.state, job.state) {
                return Err(format!("{id}: {:?} -> {:?}", prev.state, job.state));
            }
            let new = &job.history[prev.history.len()..];
            if job.request != prev.request || job.seq != prev.seq || job.seed != prev.seed {
                return Err(format!("{id}: request, seq or seed changed"));
            }
            match (prev.state, job.state) {
                (from, to) if from == to && (job.attempt != prev.attempt || job.node != prev.node) => {
                    return Err(format!("{id}: attempt/node changed while staying {from:?}"));
                }
                (from, to) if from == to => {}
                (JobState::Queued, JobState::Assigned) => {
                    let ev = EventKind::Assigned { node: job.node.unwrap(), attempt: prev.attempt + 1 };
                    if job.attempt != prev.attempt + 1 || new.iter().map(|e| &e.kind).collect::<Vec<_>>() != [&ev] {
                        return Err(format!("{id}: assigned with events {new:?}"));
                    }
                    assigned_now.push(*id);
                }
                (_, JobState::Queued) => {
                    // Re-queued (node lost), or its attempt failed worth retrying.
                    let ok = new.len() == 1
                        && match &new[0].kind {
                            EventKind::Requeued { node, attempt, .. } => {
                                Some(*node) == prev.node && *attempt == prev.attempt
                            }
                            EventKind::AttemptFailed { node, attempt, .. } => {
                                matches!(cmd, Command::Complete { .. })
                                    && Some(*node) == prev.node
                                    && *attempt == prev.attempt
                            }
                            _ => false,
                        };
                    if !ok || job.attempt != prev.attempt {
                        return Err(format!("{id}: back to queued with events {new:?}"));
                    }
                    requeued_now.push(*id);
                }
                (_, to @ (JobState::Succeeded | JobState::Failed)) => {
                    let g = self.generation(*id);
                    let n = self.finals.entry((*id, g)).or_default();
                    *n += 1;
                    if *n > 1 {
                        return Err(format!("{id}: completed twice"));
                    }
                    finished_now.push(*id);
                    if to == JobState::Succeeded
                        && !new
                            .iter()
                            .any(|e| e.kind == EventKind::Succeeded { node: prev.node.unwrap(), attempt: prev.attempt })
                    {
                        return Err(format!("{id}: succeeded with events {new:?}"));
                    }
                }
                _ => {}
            }
            if prev.result_evicted && !job.result_evicted {
                return Err(format!("{id}: evicted image came back"));
            }
        }

        // The counts move with the jobs: one `submitted` per created job, one
        // terminal count per job that ended in this step. A job that ended and
        // was forgotten in the same step is only known to have ended.
        let mut expect: BTreeMap<String, JobCounts> = before.counts().clone();
        if let Response::Submitted { job, created: true } = resp {
            let c = expect.entry(job.request.model.clone()).or_default();
            c.submitted += 1;
            if job.state == JobState::Succeeded {
                c.succeeded += 1;
                c.cache_hits += 1;
            }
        }
        for (id, job) in &a {
            if !job.state.is_terminal() || b.get(id).is_none_or(|p| p.state.is_terminal()) {
                continue;
            }
            let c = expect.entry(job.request.model.clone()).or_default();
            match job.state {
                JobState::Succeeded => c.succeeded += 1,
                JobState::Failed => c.failed += 1,
                _ => c.cancelled += 1,
            }
        }
        let mut gone: BTreeMap<&str, u64> = BTreeMap::new();
        for (id, job) in &b {
            if !a.contains_key(id) && !job.state.is_terminal() {
                *gone.entry(job.request.model.as_str()).or_default() += 1;
            }
        }
        let ended = |c: &JobCounts| c.succeeded + c.failed + c.cancelled;
        if expect.keys().ne(after.counts().keys()) {
            return Err(format!("count keys {:?}, expected {:?}", after.counts().keys(), expect.keys()));
        }
        for (model, got) in after.counts() {
            let want = expect[model];
            let gone = gone.get(model.as_str()).copied().unwrap_or(0);
            let ok = if gone == 0 {
                *got == want
            } else {
                got.submitted == want.submitted && ended(got) == ended(&want) + gone
            };
            if !ok {
                return Err(format!("model {model}: counts {got:?}, expected {want:?} (+{gone} ended and forgotten)"));
            }
        }

        // The response, checked against the state before.
        let unchanged = || -> Result<(), String> {
            if before == after {
                Ok(())
            } else {
                Err(format!("{resp:?} but the state changed"))
            }
        };
        match cmd {
            Command::Batch(_) => {
                return Err("the random driver applies commands one by one; batches have their own test".into())
            }
            Command::WebhookDelivery { .. } => {
                return Err("the random driver sends no webhook records; they have their own tests".into())
            }
            Command::Submit { id, request, seed, idempotency_key } => {
                let by_key =
                    idempotency_key.as_ref().and_then(|k| b.values().find(|j| j.idempotency_key.as_ref() == Some(k)));
                let expect_invalid = request
                    .validate()
                    .err()
                    .or_else(|| (!key_ok(idempotency_key)).then(|| FieldError::new("Idempotency-Key", "bad")));
                match (resp, expect_invalid, by_key) {
                    (Response::Rejected(Rejection::Invalid(e)), Some(expected), _) => {
                        if e.field != expected.field {
                            return Err(format!("rejected field {} expected {}", e.field, expected.field));
                        }
                        unchanged()?;
                    }
                    (_, Some(e), _) => return Err(format!("invalid ({e}) but {resp:?}")),
                    (Response::Submitted { job, created: false }, None, Some(existing))
                        if existing.request == *request =>
                    {
                        if **job != *existing {
                            return Err("key retry returned another job".into());
                        }
                        unchanged()?;
                    }
                    (Response::Rejected(Rejection::IdempotencyKeyReused { job }), None, Some(existing))
                        if existing.request != *request =>
                    {
                        if *job != existing.id {
                            return Err("key reuse names another job".into());
                        }
                        unchanged()?;
                    }
                    (_, None, Some(_)) => return Err(format!("key exists but {resp:?}")),
                    (Response::Submitted { job, created: false }, None, None) if b.contains_key(id) => {
                        if **job != b[id] {
                            return Err("id retry returned another job".into());
                        }
                        unchanged()?;
                    }
                    (_, None, None) if b.contains_key(id) => return Err(format!("id exists but {resp:?}")),
                    (Response::Rejected(Rejection::QueueFull { .. }), None, None) => {
                        if (before.queue_depth() as u64) < before.config().max_queue_depth {
                            return Err("queue full with room left".into());
                        }
                        let sources = cache_sources(before, request, seed.or(request.seed));
                        if !sources.is_empty() {
                            return Err(format!("queue full, though {sources:?} answer it from the cache"));
                        }
                        unchanged()?;
                    }
                    (Response::Submitted { job, created: true }, None, None) => {
                        let sources = cache_sources(before, request, seed.or(request.seed));
                        let hit = job.history.iter().find_map(|e| match e.kind {
                            EventKind::CacheHit { source } => Some(source),
                            _ => None,
                        });
                        match hit {
                            None if !sources.is_empty() => {
                                return Err(format!("ran again, though {sources:?} answer it from the cache"));
                            }
                            None if (before.queue_depth() as u64) >= before.config().max_queue_depth => {
                                return Err("accepted beyond the queue depth".into());
                            }
                            None => {}
                            Some(source) => {
                                if !sources.contains(&source) {
                                    return Err(format!("served from {source}; the answers are {sources:?}"));
                                }
                                let image = before.image(&source).unwrap().0;
                                let source_job = before.job(&source).unwrap();
                                if job.state != JobState::Succeeded
                                    || job.result != source_job.result
                                    || job.result.map(|r| r.sha256) != Some(image)
                                    || job.model_hash != source_job.model_hash
                                    || after.image(id).is_some_and(|i| i.0 != image)
                                {
                                    return Err(format!("cache hit {job:?} does not carry {source}'s result"));
                                }
                            }
                        }
                        // A job answered from the cache may be forgotten by
                        // retention in the same step.
                        let stored_or_forgotten = match a.get(id) {
                            Some(stored) => stored == &**job,
                            None => hit.is_some(),
                        };
                        if !stored_or_forgotten || job.idempotency_key != *idempotency_key {
                            return Err("created job differs from the stored one".into());
                        }
                        if let Some(s) = seed.or(request.seed) {
                            if job.seed != s {
                                return Err(format!("seed {} expected {s}", job.seed));
                            }
                        }
                    }
                    _ => return Err(format!("unexpected {resp:?}")),
                }
            }
            Command::Assign { assignments } => {
                let Response::Applied { count } = resp else {
                    return Err(format!("assign: {resp:?}"));
                };
                if *count as usize != assigned_now.len() {
                    return Err(format!("assign counted {count}, {} jobs were assigned", assigned_now.len()));
                }
                for id in &assigned_now {
                    let j = &a[id];
                    let asg = Assignment { job: *id, node: j.node.unwrap(), attempt: j.attempt };
                    if !assignments.contains(&asg) {
                        return Err(format!("{id} assigned as {asg:?}, not asked"));
                    }
                    let info = &before.nodes()[&asg.node];
                    if info.draining || !info.registration.has_model(&j.request.model) {
                        return Err(format!("{id} assigned to draining or unsuitable node {}", asg.node));
                    }
                }
                if !finished_now.is_empty() || !requeued_now.is_empty() {
                    return Err("assign finished or requeued jobs".into());
                }
            }
            Command::Start { job, node, attempt } => {
                let prev = b.get(job);
                let current = prev.is_some_and(|p| p.node == Some(*node) && p.attempt == *attempt);
                match (resp, prev) {
                    (Response::Rejected(Rejection::UnknownJob), None) => unchanged()?,
                    (Response::Ok, Some(p)) if current && p.state == JobState::Assigned => {
                        let j = &a[job];
                        if j.state != JobState::Running || j.started_at_ms.is_none() {
                            return Err(format!("start left {:?}", j.state));
                        }
                    }
                    (Response::Ok, Some(p)) if current && p.state == JobState::Running => unchanged()?,
                    (Response::Rejected(Rejection::StaleAttempt { current_attempt, state }), Some(p))
                        if !(current && p.state.is_active()) =>
                    {
                        if *current_attempt != p.attempt || *state != p.state {
                            return Err(format!("stale answer {resp:?} for {:?}/{}", p.state, p.attempt));
                        }
                        unchanged()?;
                    }
                    _ => return Err(format!("start: {resp:?} for {:?}", prev.map(|p| (p.state, p.node, p.attempt)))),
                }
            }
            Command::Progress { job, node, attempt, step, steps } => {
                let prev = b.get(job);
                let current = prev
                    .is_some_and(|p| p.state == JobState::Running && p.node == Some(*node) && p.attempt == *attempt);
                match (resp, prev) {
                    (Response::Rejected(Rejection::UnknownJob), None) => unchanged()?,
                    (Response::Ok, Some(p)) if current => {
                        let mut expect = p.clone();
                        expect.progress.step = (*step).min(*steps);
                        expect.progress.steps = *steps;
                        if a[job] != expect {
                            return Err("progress changed more than progress".into());
                        }
                    }
                    (Response::Rejected(Rejection::StaleAttempt { .. }), Some(_)) if !current => unchanged()?,
                    _ => return Err(format!("progress: {resp:?}")),
                }
            }
            Command::Complete { job, node, attempt, outcome } => {
                let prev = b.get(job);
                let key = (*job, self.generation(*job), *node, *attempt);
                let current =
                    prev.is_some_and(|p| p.state.is_active() && p.node == Some(*node) && p.attempt == *attempt);
                match (resp, prev) {
                    (Response::Rejected(Rejection::UnknownJob), None) => unchanged()?,
                    (Response::Ok, Some(p)) if current => {
                        let max_attempts = before.config().max_attempts;
                        let expected = match outcome {
                            Outcome::Succeeded { result, .. }
                                if result.bytes > 0 && result.bytes <= MAX_IMAGE_BYTES as u64 =>
                            {
                                JobState::Succeeded
                            }
                            Outcome::Failed { retryable: true, .. } if p.attempt < max_attempts => JobState::Queued,
                            _ => JobState::Failed,
                        };
                        match a.get(job) {
                            Some(j) if j.state != expected => {
                                return Err(format!("accepted completion left {:?}, expected {expected:?}", j.state));
                            }
                            Some(j)
                                if matches!(outcome, Outcome::Failed { retryable: true, .. })
                                    && expected == JobState::Failed
                                    && !j.error.as_ref().is_some_and(|e| e.starts_with("gave up after")) =>
                            {
                                return Err(format!("gave up with error {:?}", j.error));
                            }
                            None if expected == JobState::Queued => return Err("a re-queued job was forgotten".into()),
                            _ => {}
                        }
                        if !a.contains_key(job) {
                            // Finished and forgotten in the same step: count it here.
                            let n = self.finals.entry((*job, key.1)).or_default();
                            *n += 1;
                            if *n > 1 {
                                return Err(format!("{job}: completed twice"));
                            }
                        }
                        self.accepted.insert(key);
                    }
                    (Response::Ok, Some(p)) => {
                        // Only an exact repeat of an accepted completion may be answered Ok.
                        if !self.accepted.contains(&key) {
                            return Err(format!(
                                "completion ({node}, {attempt}) answered Ok but never accepted; job {:?} on {:?} attempt {}",
                                p.state, p.node, p.attempt
                            ));
                        }
                        unchanged()?;
                    }
                    (Response::Rejected(Rejection::StaleAttempt { current_attempt, state }), Some(p)) if !current => {
                        if self.accepted.contains(&key) {
                            return Err("a repeat of an accepted completion was rejected".into());
                        }
                        if *current_attempt != p.attempt || *state != p.state {
                            return Err(format!("stale answer {resp:?} for {:?}/{}", p.state, p.attempt));
                        }
                        let j = &a[job];
                        let new = &j.history[p.history.len()..];
                        let expect_event = p.history.len() < MAX_EVENTS_PER_JOB;
                        let ok = match new {
                            [] => !expect_event,
                            [e] => {
                                expect_event
                                    && matches!(&e.kind, EventKind::CompletionRejected { node: n, attempt: t, .. }
                                        if n == node && t == attempt)
                            }
                            _ => false,
                        };
                        if !ok || j.state != p.state || j.attempt != p.attempt {
                            return Err(format!("stale completion recorded {new:?}"));
                        }
                    }
                    _ => {
                        return Err(format!("complete: {resp:?} for {:?}", prev.map(|p| (p.state, p.node, p.attempt))))
                    }
                }
            }
            Command::Requeue { jobs, .. } => {
                let mut expected = BTreeSet::new();
                for (job, attempt) in jobs {
                    if b.get(job).is_some_and(|p| p.state.is_active() && p.attempt == *attempt) {
                        expected.insert(*job);
                    }
                }
                if *resp != (Response::Applied { count: expected.len() as u32 }) {
                    return Err(format!("requeue of {expected:?}: {resp:?}"));
                }
                for id in &expected {
                    let p = &b[id];
                    match a.get(id).map(|j| j.state) {
                        Some(JobState::Queued) if p.attempt < before.config().max_attempts => {}
                        Some(JobState::Failed) | None if p.attempt >= before.config().max_attempts => {}
                        other => return Err(format!("{id}: requeued attempt {} ended {other:?}", p.attempt)),
                    }
                }
            }
            Command::Cancel { job } => match (resp, b.get(job)) {
                (Response::Rejected(Rejection::UnknownJob), None) => unchanged()?,
                (Response::Ok, Some(p)) if p.state == JobState::Cancelled => unchanged()?,
                (Response::Ok, Some(p)) if !p.state.is_terminal() => {
                    if a.get(job).is_some_and(|j| j.state != JobState::Cancelled) {
                        return Err("cancel did not cancel".into());
                    }
                }
                (Response::Rejected(Rejection::NotCancellable { state }), Some(p))
                    if p.state.is_terminal() && p.state != JobState::Cancelled && *state == p.state =>
                {
                    unchanged()?
                }
                _ => return Err(format!("cancel: {resp:?}")),
            },
            Command::RegisterNode { node, info } => {
                if *resp != Response::Ok || after.nodes().get(node).map(|n| &n.registration) != Some(info) {
                    return Err(format!("register: {resp:?}"));
                }
            }
            Command::SetDraining { node, draining } => match before.nodes().get(node) {
                Some(_) if *resp == Response::Ok && after.nodes()[node].draining == *draining => {}
                None if *resp == Response::Rejected(Rejection::UnknownNode) => unchanged()?,
                _ => return Err(format!("draining: {resp:?}")),
            },
            Command::ForgetNode { node } => {
                if *resp != Response::Ok || after.nodes().contains_key(node) || after.active_count(*node) != 0 {
                    return Err(format!("forget: {resp:?}"));
                }
                for id in &named {
                    if a.get(id).is_some_and(|j| !matches!(j.state, JobState::Queued | JobState::Failed)) {
                        return Err(format!("{id} stranded on the forgotten node"));
                    }
                }
            }
            Command::Configure(cfg) => {
                if *resp != Response::Ok || after.config() != cfg {
                    return Err(format!("configure: {resp:?}"));
                }
            }
            Command::ResultCopied { .. }
            | Command::ResultDropped { .. }
            | Command::SetLost { .. }
            | Command::Retire { .. }
            | Command::ObjectsDeleted { .. } => {
                // Where images are kept changes; no job does.
                if *resp != Response::Ok || a != b {
                    return Err(format!("{cmd:?}: {resp:?} or a job changed"));
                }
            }
        }
        Ok(())
    }
}

/// Runs one seed: returns the requests applied, the responses and the final state.
fn run_seed(seed: u64, steps: u64) -> (Vec<Request>, Vec<Response>, JobStateMachine) {
    let mut gen = Gen::new(seed);
    let mut obs = Observer::default();
    let mut sm = JobStateMachine::default();
    let mut log = Vec::new();
    let mut responses = Vec::new();
    for index in 1..=steps {
        let cmd = if index == 1 { Command::Configure(gen.small_config()) } else { gen.command(&sm) };
        let from_plan = if index == 1 { None } else { gen.planned };
        let req = Request { at_ms: 1_000 + index * 3, cmd };
        let before = sm.clone();
        let resp = sm.apply(index, &req);
        let fail = |e: String| -> ! {
            panic!("seed {seed} index {index}: {e}\ncommand: {:?}\nresponse: {resp:?}", req.cmd);
        };
        if let Err(e) = sm.check_invariants() {
            fail(format!("check_invariants: {e}"));
        }
        if let Err(e) = obs.check_step(index, &before, &req.cmd, &resp, &sm) {
            fail(e);
        }
        // An assignment planned on the current state is always accepted.
        if let (Some(n), Response::Applied { count }) = (from_plan, &resp) {
            if *count as usize != n {
                fail(format!("planned {n} assignments, {count} applied"));
            }
        }
        log.push(req);
        responses.push(resp);
    }
    (log, responses, sm)
}

#[test]
fn randomized_commands_keep_every_invariant() {
    let mut totals: BTreeMap<&str, usize> = BTreeMap::new();
    for seed in 0..200 {
        let (log, responses, sm) = run_seed(seed, 300);
        assert_eq!(log.len(), 300);
        for (req, resp) in log.iter().zip(&responses) {
            let name = match (&req.cmd, resp) {
                (Command::Submit { .. }, Response::Submitted { created: true, job }) if job.state.is_terminal() => {
                    "submit cached"
                }
                (Command::Submit { .. }, Response::Submitted { created: true, .. }) => "submit created",
                (Command::Submit { .. }, Response::Submitted { created: false, .. }) => "submit retried",
                (Command::Submit { .. }, Response::Rejected(Rejection::Invalid(_))) => "submit invalid",
                (Command::Submit { .. }, Response::Rejected(Rejection::QueueFull { .. })) => "submit queue full",
                (Command::Submit { .. }, Response::Rejected(Rejection::IdempotencyKeyReused { .. })) => "key reused",
                (Command::Assign { .. }, Response::Applied { count }) if *count > 0 => "assign applied",
                (Command::Start { .. }, Response::Ok) => "start ok",
                (Command::Complete { .. }, Response::Ok) => "complete ok",
                (Command::Complete { .. }, Response::Rejected(Rejection::StaleAttempt { .. })) => "complete stale",
                (Command::Requeue { .. }, Response::Applied { count }) if *count > 0 => "requeue applied",
                (Command::Cancel { .. }, Response::Ok) => "cancel ok",
                (Command::Cancel { .. }, Response::Rejected(Rejection::NotCancellable { .. })) => "not cancellable",
                (Command::ForgetNode { .. }, _) => "forget node",
                _ => continue,
            };
            *totals.entry(name).or_default() += 1;
        }
        let _ = sm;
    }
    eprintln!("outcomes over all seeds: {totals:?}");
    // The generator must reach every interesting branch, or the test proves little.
    for name in [
        "submit created",
        "submit cached",
        "submit retried",
        "submit invalid",
        "submit queue full",
        "key reused",
        "assign applied",
        "start ok",
        "complete ok",
        "complete stale",
        "requeue applied",
        "cancel ok",
        "not cancellable",
        "forget node",
    ] {
        assert!(
            totals.get(name).copied().unwrap_or(0) >= 100,
            "{name} happened only {:?} times: {totals:?}",
            totals.get(name)
        );
    }
}

#[test]
fn randomized_runs_also_evict_forget_and_give_up() {
    // Coverage of retention, retry and max_attempts paths across the random runs.
    let (mut evicted, mut forgotten_keys, mut gave_up, mut retried) = (0, 0, 0, 0);
    for seed in 1_000..1_040 {
        let (log, _, sm) = run_seed(seed, 300);
        let mut replay = JobStateMachine::default();
        let mut keyed: HashSet<String> = HashSet::new();
        for (i, req) in log.iter().enumerate() {
            replay.apply(i as u64 + 1, req);
            for j in replay.recent_jobs(None, usize::MAX) {
                if let Some(k) = &j.idempotency_key {
                    keyed.insert(k.clone());
                }
            }
        }
        assert_eq!(replay, sm);
        for j in sm.recent_jobs(None, usize::MAX) {
            evicted += usize::from(j.result_evicted);
            gave_up += usize::from(j.error.as_deref().is_some_and(|e| e.starts_with("gave up")));
            retried += count_events(j, |k| matches!(k, EventKind::AttemptFailed { .. }));
        }
        forgotten_keys += keyed
            .iter()
            .filter(|k| sm.recent_jobs(None, usize::MAX).iter().all(|j| j.idempotency_key.as_ref() != Some(k)))
            .count();
    }
    assert!(
        evicted > 0 && forgotten_keys > 0 && gave_up > 0 && retried > 0,
        "{evicted} {forgotten_keys} {gave_up} {retried}"
    );
}

// ---------------------------------------------------------------------------
// Determinism and replay
// ---------------------------------------------------------------------------

#[test]
fn replaying_the_same_log_gives_identical_states_and_bytes() {
    for seed in 0..30 {
        let (log, responses, sm) = run_seed(10_000 + seed, 300);
        let mut replica = JobStateMachine::default();
        for (i, req) in log.iter().enumerate() {
            let resp = replica.apply(i as u64 + 1, req);
            assert_eq!(resp, responses[i], "seed {seed} index {}: response differs on replay", i + 1);
        }
        assert_eq!(replica, sm, "seed {seed}");
        let bytes = codec::encode(&sm).unwrap();
        assert_eq!(codec::encode(&replica).unwrap(), bytes, "seed {seed}: encodings differ");

        // encode -> decode roundtrips, and re-encodes to the same bytes.
        let decoded: JobStateMachine = codec::decode(&bytes).unwrap();
        decoded.check_invariants().unwrap();
        assert_eq!(decoded, sm);
        assert_eq!(codec::encode(&decoded).unwrap(), bytes);

        // A snapshot taken midway, decoded, then fed the rest of the log,
        // reaches the same state as the uninterrupted run.
        let cut = 1 + seed as usize * 9;
        let mut first = JobStateMachine::default();
        for (i, req) in log[..cut].iter().enumerate() {
            first.apply(i as u64 + 1, req);
        }
        let mut restored: JobStateMachine = codec::decode(&codec::encode(&first).unwrap()).unwrap();
        for (i, req) in log.iter().enumerate().skip(cut) {
            let resp = restored.apply(i as u64 + 1, req);
            assert_eq!(resp, responses[i], "seed {seed}: response differs after restoring a snapshot");
        }
        assert_eq!(restored, sm);
    }
}

#[test]
fn decode_rejects_truncated_or_trailing_bytes() {
    let (_, _, sm) = run_seed(7, 200);
    let bytes = codec::encode(&sm).unwrap();
    assert!(codec::decode::<JobStateMachine>(&bytes[..bytes.len() - 1]).is_err());
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(codec::decode::<JobStateMachine>(&longer).is_err());
}

// ---------------------------------------------------------------------------
// Targeted: submission
// ---------------------------------------------------------------------------

#[test]
fn idempotency_key_with_same_request_returns_the_same_job() {
    let mut h = Harness::new(ClusterConfig::default());
    let req = request("a cat", "m1", 0);
    let Response::Submitted { job: first, created: true } = h.submit(1, req.clone(), Some("key")) else {
        panic!("first submission not created")
    };
    // A retry through another node: a new job id, same key, same request.
    let state = h.sm.clone();
    match h.submit(2, req.clone(), Some("key")) {
        Response::Submitted { job, created: false } => assert_eq!(job, first),
        other => panic!("{other:?}"),
    }
    assert_eq!(h.sm, state, "an idempotent retry must not change the state");
    assert_eq!(h.sm.job_count(), 1);
    assert!(h.sm.job(&JobId(2)).is_none());
}

#[test]
fn idempotency_key_with_a_different_request_is_rejected() {
    let mut h = Harness::new(ClusterConfig::default());
    h.submit(1, request("a cat", "m1", 0), Some("key"));
    let state = h.sm.clone();
    let resp = h.submit(2, request("a dog", "m1", 0), Some("key"));
    assert_eq!(resp, Response::Rejected(Rejection::IdempotencyKeyReused { job: JobId(1) }));
    assert_eq!(h.sm, state);
    // Even with the same job id: the key check comes first.
    let resp = h.submit(1, request("a cat", "m1", 1), Some("key"));
    assert_eq!(resp, Response::Rejected(Rejection::IdempotencyKeyReused { job: JobId(1) }));
}

#[test]
fn resubmitting_the_same_job_id_is_idempotent() {
    let mut h = Harness::new(ClusterConfig::default());
    let id = h.submit_ok(9, request("a cat", "m1", 0));
    let state = h.sm.clone();
    match h.submit(9, request("a cat", "m1", 0), None) {
        Response::Submitted { job, created: false } => assert_eq!(job.id, id),
        other => panic!("{other:?}"),
    }
    // A forwarded retry after the job moved on still finds it.
    match h.submit(9, request("a cat", "m1", 0), Some("new-key")) {
        Response::Submitted { job, created: false } => assert_eq!(*job, *h.job(id)),
        other => panic!("{other:?}"),
    }
    assert_eq!(h.sm, state);
}

#[test]
fn seed_is_the_leaders_then_the_requests() {
    let mut h = Harness::new(ClusterConfig::default());
    let mut req = request("a cat", "m1", 0);
    req.seed = Some(5);
    h.apply(Command::Submit { id: JobId(1), request: req.clone(), seed: Some(9), idempotency_key: None });
    assert_eq!(h.job(JobId(1)).seed, 9);
    h.apply(Command::Submit { id: JobId(2), request: req, seed: None, idempotency_key: None });
    assert_eq!(h.job(JobId(2)).seed, 5);
}

#[test]
fn queue_full_is_rejected_until_room_is_made() {
    let mut h = Harness::new(ClusterConfig { max_queue_depth: 2, ..Default::default() });
    let a = h.submit_ok(1, request("a", "m1", 0));
    h.submit_ok(2, request("b", "m1", 0));
    let state = h.sm.clone();
    assert_eq!(
        h.submit(3, request("c", "m1", 0), None),
        Response::Rejected(Rejection::QueueFull { max_queue_depth: 2 })
    );
    assert_eq!(h.sm, state);
    // A retry of an existing job is still answered when the queue is full.
    assert!(matches!(h.submit(1, request("a", "m1", 0), None), Response::Submitted { created: false, .. }));
    // Assigning a job frees a queue place.
    h.register(1, 1, &["m1"]);
    assert_eq!(h.assign(a, 1, 1), 1);
    h.submit_ok(3, request("c", "m1", 0));
}

/// Breaks one field of a valid request.
type Mutation = fn(&mut JobRequest);

#[test]
fn invalid_requests_are_rejected_naming_the_field() {
    let base = request("a cat", "m1", 0);
    let cases: [(&str, Mutation); 18] = [
        ("prompt", |r| r.prompt = String::new()),
        ("prompt", |r| r.prompt = " \t ".into()),
        ("prompt", |r| r.prompt = "p".repeat(MAX_PROMPT_CHARS + 1)),
        ("negative_prompt", |r| r.negative_prompt = "n".repeat(MAX_PROMPT_CHARS + 1)),
        ("width", |r| r.width = 0),
        ("width", |r| r.width = 12),
        ("width", |r| r.width = 4096),
        ("height", |r| r.height = 100),
        ("steps", |r| r.steps = 0),
        ("steps", |r| r.steps = 10_000),
        ("guidance", |r| r.guidance = f32::NAN),
        ("guidance", |r| r.guidance = f32::INFINITY),
        ("guidance", |r| r.guidance = -0.5),
        ("guidance", |r| r.guidance = 50.5),
        ("model", |r| r.model = String::new()),
        ("model", |r| r.model = "m".repeat(129)),
        ("priority", |r| r.priority = 101),
        ("priority", |r| r.priority = -101),
    ];
    let mut h = Harness::new(ClusterConfig::default());
    for (field, mutate) in &cases {
        let mut req = base.clone();
        mutate(&mut req);
        match h.submit(1, req, Some("key")) {
            Response::Rejected(Rejection::Invalid(e)) => assert_eq!(e.field, *field, "{e}"),
            other => panic!("{field}: {other:?}"),
        }
    }
    // Bounds themselves are accepted: multi-byte characters count as one.
    let mut req = base.clone();
    req.prompt = "é".repeat(MAX_PROMPT_CHARS);
    req.width = 2048;
    req.height = 8;
    req.steps = 150;
    req.guidance = 30.0;
    req.priority = -100;
    assert!(matches!(h.submit(2, req, None), Response::Submitted { created: true, .. }));
    for key in [String::new(), "k".repeat(MAX_IDEMPOTENCY_KEY_BYTES + 1)] {
        match h.submit(3, base.clone(), Some(&key)) {
            Response::Rejected(Rejection::Invalid(e)) => assert_eq!(e.field, "Idempotency-Key"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(h.sm.job_count(), 1, "nothing invalid may enter the state");
}

// ---------------------------------------------------------------------------
// Targeted: execution and fencing
// ---------------------------------------------------------------------------

#[test]
fn a_job_runs_to_success_with_its_image() {
    let mut h = Harness::new(ClusterConfig::default());
    h.register(1, 1, &["m1"]);
    let id = h.submit_ok(1, request("a cat", "m1", 0));
    assert_eq!(h.assign(id, 1, 1), 1);
    assert_eq!(h.job(id).state, JobState::Assigned);
    assert_eq!(h.apply(Command::Start { job: id, node: 1, attempt: 1 }), Response::Ok);
    assert_eq!(h.job(id).state, JobState::Running);
    assert_eq!(h.apply(Command::Start { job: id, node: 1, attempt: 1 }), Response::Ok, "start is idempotent");
    assert_eq!(h.apply(Command::Progress { job: id, node: 1, attempt: 1, step: 30, steps: 20 }), Response::Ok);
    assert_eq!(h.job(id).progress.step, 20, "step is clamped to steps");
    assert_eq!(h.complete(id, 1, 1, png(10, 7)), Response::Ok);
    let job = h.job(id);
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(job.result.map(|r| r.bytes), Some(10));
    assert_eq!(job.progress.step, job.progress.steps);
    assert_eq!(h.sm.image(&id).map(|i| i.0), Some(image_hash(10, 7)));
    assert_eq!(h.sm.active_count(1), 0);
    let kinds: Vec<EventKind> = job.history.iter().map(|e| e.kind.clone()).collect();
    assert_eq!(
        kinds,
        vec![
            EventKind::Submitted,
            EventKind::Assigned { node: 1, attempt: 1 },
            EventKind::Started { node: 1, attempt: 1 },
            EventKind::Succeeded { node: 1, attempt: 1 },
        ]
    );
    assert!(matches!(
        h.apply(Command::Progress { job: id, node: 1, attempt: 1, step: 1, steps: 20 }),
        Response::Rejected(Rejection::StaleAttempt { .. })
    ));
    assert_eq!(
        h.apply(Command::Cancel { job: id }),
        Response::Rejected(Rejection::NotCancellable { state: JobState::Succeeded })
    );
}

#[test]
fn counts_per_model_survive_retention_and_match_on_replay() {
    let config = ClusterConfig { max_finished_jobs: 1, max_attempts: 1, ..ClusterConfig::default() };
    let mut h = Harness::new(config);
    h.register(1, 4, &["m1", "m2"]);
    let ok = h.submit_ok(1, request("a", "m1", 0));
    let bad = h.submit_ok(2, request("b", "m1", 0));
    let lost = h.submit_ok(3, request("c", "m2", 0));
    let cancelled = h.submit_ok(4, request("d", "m2", 5));
    let queued = h.submit_ok(5, request("e", "m2", 5));
    let low = h.submit_ok(6, request("f", "m1", -3));
    assert_eq!(h.sm.queue_depth_by_priority(), BTreeMap::from([(-3, 1), (0, 3), (5, 2)]));
    for (job, n) in [(ok, 1), (bad, 1), (lost, 1)] {
        assert_eq!(h.assign(job, 1, 1), n);
    }
    let first_finish = h.sm.next_finish_seq();
    assert_eq!(h.complete(ok, 1, 1, png(3, 1)), Response::Ok);
    assert_eq!(h.complete(bad, 1, 1, failed("boom")), Response::Ok);
    assert_eq!(h.requeue(lost, 1), 1, "gives up: max_attempts is 1");
    assert_eq!(h.apply(Command::Cancel { job: cancelled }), Response::Ok);
    // Retention kept only the last finished job; the counts keep them all.
    let kept: Vec<JobId> = h.sm.finished_since(first_finish).map(|j| j.id).collect();
    assert_eq!(kept, vec![cancelled]);
    assert_eq!(h.sm.next_finish_seq(), first_finish + 4);
    let counts = h.sm.counts();
    assert_eq!(counts["m1"], JobCounts { submitted: 3, succeeded: 1, failed: 1, cancelled: 0, cache_hits: 0 });
    assert_eq!(counts["m2"], JobCounts { submitted: 3, succeeded: 0, failed: 1, cancelled: 1, cache_hits: 0 });
    assert_eq!(h.sm.queue_depth_by_priority(), BTreeMap::from([(-3, 1), (5, 1)]));
    // Rejected and repeated commands count nothing.
    let before = h.sm.counts().clone();
    h.submit(5, request("e", "m2", 5), None);
    h.apply(Command::Cancel { job: cancelled });
    h.complete(ok, 1, 1, png(3, 1));
    assert_eq!(h.sm.counts(), &before);
    let _ = (queued, low);
}

#[test]
fn repeating_the_accepted_completion_is_ok_without_a_new_event() {
    for outcome in [png(5, 1), failed("boom")] {
        let mut h = Harness::new(ClusterConfig::default());
        h.register(1, 1, &["m1"]);
        let id = h.submit_ok(1, request("a cat", "m1", 0));
        h.assign(id, 1, 1);
        assert_eq!(h.complete(id, 1, 1, outcome.clone()), Response::Ok);
        let state = h.sm.clone();
        assert_eq!(h.complete(id, 1, 1, outcome.clone()), Response::Ok);
        assert_eq!(h.sm, state, "a repeated completion changes nothing");
    }
}

#[test]
fn stale_completions_are_rejected_and_recorded() {
    let mut h = Harness::new(ClusterConfig::default());
    h.register(1, 1, &["m1"]);
    h.register(2, 1, &["m1"]);
    let id = h.submit_ok(1, request("a cat", "m1", 0));
    h.assign(id, 1, 1);
    h.apply(Command::Start { job: id, node: 1, attempt: 1 });
    // Node 1 is lost; the job is re-queued and runs again on node 2.
    assert_eq!(h.requeue(id, 1), 1);
    assert_eq!(h.job(id).state, JobState::Queued);
    assert_eq!(h.assign(id, 2, 2), 1);

    let expect_rejected = |h: &mut Harness, node: NodeId, attempt: u32| {
        let before = h.job(id).clone();
        let resp = h.complete(id, node, attempt, png(3, 1));
        assert_eq!(
            resp,
            Response::Rejected(Rejection::StaleAttempt { current_attempt: before.attempt, state: before.state }),
            "completion from node {node} attempt {attempt}"
        );
        let after = h.job(id);
        assert_eq!(after.history.len(), before.history.len() + 1);
        assert!(matches!(
            &after.history.last().unwrap().kind,
            EventKind::CompletionRejected { node: n, attempt: a, .. } if *n == node && *a == attempt
        ));
        assert_eq!(after.state, before.state);
    };
    // The old attempt, from the old node, after the requeue.
    expect_rejected(&mut h, 1, 1);
    // The current attempt number, but from the wrong node.
    expect_rejected(&mut h, 1, 2);
    // A future attempt.
    expect_rejected(&mut h, 2, 3);
    assert!(h.sm.image(&id).is_none());

    // After a cancel, even the current attempt's completion is stale.
    assert_eq!(h.apply(Command::Cancel { job: id }), Response::Ok);
    assert_eq!(h.sm.active_count(2), 0, "cancel frees the slot");
    expect_rejected(&mut h, 2, 2);
    assert_eq!(h.job(id).state, JobState::Cancelled);
    assert_eq!(h.apply(Command::Cancel { job: id }), Response::Ok, "cancel is idempotent");

    assert_eq!(
        h.complete(JobId(404), 1, 1, png(1, 1)),
        Response::Rejected(Rejection::UnknownJob),
        "unknown jobs are rejected"
    );
}

#[test]
fn completion_after_giving_up_is_rejected_not_acknowledged() {
    // The node was judged lost on its last allowed attempt, so the job failed;
    // when that node's completion finally arrives it was never accepted and
    // must not be answered as if it had been.
    let mut h = Harness::new(ClusterConfig { max_attempts: 1, ..Default::default() });
    h.register(1, 1, &["m1"]);
    let id = h.submit_ok(1, request("a cat", "m1", 0));
    h.assign(id, 1, 1);
    assert_eq!(h.requeue(id, 1), 1);
    assert_eq!(h.job(id).state, JobState::Failed);
    let resp = h.complete(id, 1, 1, png(3, 1));
    assert_eq!(resp, Response::Rejected(Rejection::StaleAttempt { current_attempt: 1, state: JobState::Failed }));
    assert!(matches!(
        h.job(id).history.last().unwrap().kind,
        EventKind::CompletionRejected { node: 1, attempt: 1, .. }
    ));
    assert!(h.sm.image(&id).is_none());
}

#[test]
fn repeated_stale_completions_are_capped_in_history() {
    let mut h = Harness::new(ClusterConfig::default());
    let id = h.submit_ok(1, request("a cat", "m1", 0));
    for _ in 0..(MAX_EVENTS_PER_JOB * 2) {
        assert!(matches!(h.complete(id, 1, 7, failed("x")), Response::Rejected(Rejection::StaleAttempt { .. })));
    }
    assert_eq!(h.job(id).history.len(), MAX_EVENTS_PER_JOB);
    // Transitions are still recorded after the cap.
    h.register(1, 1, &["m1"]);
    assert_eq!(h.assign(id, 1, 1), 1);
    assert_eq!(h.job(id).history.len(), MAX_EVENTS_PER_JOB + 1);
}

#[test]
fn failures_keep_a_bounded_error_and_oversized_images_fail() {
    let mut h = Harness::new(ClusterConfig::default());
    h.register(1, 2, &["m1"]);
    let a = h.submit_ok(1, request("a", "m1", 0));
    let b = h.submit_ok(2, request("b", "m1", 0));
    h.assign(a, 1, 1);
    h.assign(b, 1, 1);
    assert_eq!(h.complete(a, 1, 1, failed(&"e".repeat(MAX_ERROR_CHARS * 3))), Response::Ok);
    assert_eq!(h.job(a).state, JobState::Failed);
    assert_eq!(h.job(a).error.as_ref().unwrap().chars().count(), MAX_ERROR_CHARS);
    assert_eq!(h.complete(b, 1, 1, png(MAX_IMAGE_BYTES + 1, 0)), Response::Ok);
    assert_eq!(h.job(b).state, JobState::Failed);
    assert!(h.job(b).error.as_ref().unwrap().contains("exceeds"));
    assert!(h.sm.image(&b).is_none());
    assert_eq!(h.sm.result_bytes(), 0);
}

#[test]
fn start_and_progress_are_fenced() {
    let mut h = Harness::new(ClusterConfig::default());
    h.register(1, 1, &["m1"]);
    let id = h.submit_ok(1, request("a cat", "m1", 0));
    assert_eq!(
        h.apply(Command::Start { job: id, node: 1, attempt: 1 }),
        Response::Rejected(Rejection::StaleAttempt { current_attempt: 0, state: JobState::Queued })
    );
    h.assign(id, 1, 1);
    assert!(
        matches!(
            h.apply(Command::Progress { job: id, node: 1, attempt: 1, step: 1, steps: 20 }),
            Response::Rejected(Rejection::StaleAttempt { .. })
        ),
        "progress before start"
    );
    assert!(matches!(h.apply(Command::Start { job: id, node: 2, attempt: 1 }), Response::Rejected(_)));
    assert!(matches!(h.apply(Command::Start { job: id, node: 1, attempt: 2 }), Response::Rejected(_)));
    assert_eq!(h.apply(Command::Start { job: id, node: 1, attempt: 1 }), Response::Ok);
    assert!(matches!(
        h.apply(Command::Progress { job: id, node: 1, attempt: 0, step: 1, steps: 20 }),
        Response::Rejected(Rejection::StaleAttempt { current_attempt: 1, state: JobState::Running })
    ));
    assert_eq!(
        h.apply(Command::Start { job: JobId(5), node: 1, attempt: 1 }),
        Response::Rejected(Rejection::UnknownJob)
    );
}

#[test]
fn assign_checks_node_slots_model_draining_and_attempt() {
    let mut h = Harness::new(ClusterConfig::default());
    h.register(1, 1, &["m1"]);
    h.register(2, 1, &["m2"]);
    let a = h.submit_ok(1, request("a", "m1", 0));
    let b = h.submit_ok(2, request("b", "m1", 0));
    assert_eq!(h.assign(a, 9, 1), 0, "unknown node");
    assert_eq!(h.assign(a, 2, 1), 0, "model not served");
    assert_eq!(h.assign(a, 1, 2), 0, "attempt must be current + 1");
    assert_eq!(h.assign(a, 1, 0), 0, "attempt must be current + 1");
    assert_eq!(h.apply(Command::SetDraining { node: 1, draining: true }), Response::Ok);
    assert_eq!(h.assign(a, 1, 1), 0, "draining");
    assert_eq!(h.apply(Command::SetDraining { node: 1, draining: false }), Response::Ok);
    assert_eq!(h.apply(Command::SetDraining { node: 7, draining: true }), Response::Rejected(Rejection::UnknownNode));
    // Two assignments in one command, one slot: only the first takes effect;
    // and the same job twice counts once.
    let resp = h.apply(Command::Assign {
        assignments: vec![
            Assignment { job: a, node: 1, attempt: 1 },
            Assignment { job: a, node: 1, attempt: 1 },
            Assignment { job: b, node: 1, attempt: 1 },
        ],
    });
    assert_eq!(resp, Response::Applied { count: 1 });
    assert_eq!(h.sm.active_count(1), 1);
    assert_eq!(h.job(b).state, JobState::Queued);
    // More slots, then b fits.
    h.register(1, 2, &["m1"]);
    assert_eq!(h.assign(b, 1, 1), 1);
    assert_eq!(h.assign(JobId(77), 1, 1), 0, "unknown job");
}

#[test]
fn forgetting_a_node_requeues_its_jobs() {
    let mut h = Harness::new(ClusterConfig::default());
    h.register(1, 2, &["m1"]);
    let a = h.submit_ok(1, request("a", "m1", 0));
    let b = h.submit_ok(2, request("b", "m1", 0));
    h.assign(a, 1, 1);
    h.assign(b, 1, 1);
    h.apply(Command::Start { job: b, node: 1, attempt: 1 });
    assert_eq!(h.apply(Command::ForgetNode { node: 1 }), Response::Ok);
    assert!(h.sm.nodes().is_empty());
    assert_eq!(h.sm.active_count(1), 0);
    for id in [a, b] {
        let job = h.job(id);
        assert_eq!(job.state, JobState::Queued);
        assert_eq!(job.node, None);
        assert!(matches!(&job.history.last().unwrap().kind, EventKind::Requeued { node: 1, attempt: 1, .. }));
    }
    assert_eq!(h.apply(Command::ForgetNode { node: 1 }), Response::Ok, "forgetting twice is harmless");
}

#[test]
fn requeue_beyond_max_attempts_fails_the_job() {
    let mut h = Harness::new(ClusterConfig { max_attempts: 3, ..Default::default() });
    h.register(1, 1, &["m1"]);
    let id = h.submit_ok(1, request("a cat", "m1", 0));
    for attempt in 1..=3 {
        assert_eq!(h.assign(id, 1, attempt), 1);
        assert_eq!(h.requeue(id, attempt - 1), 0, "stale requeue is ignored");
        assert_eq!(h.requeue(id, attempt), 1);
        let expected = if attempt < 3 { JobState::Queued } else { JobState::Failed };
        assert_eq!(h.job(id).state, expected, "after attempt {attempt}");
    }
    let job = h.job(id);
    assert!(job.error.as_ref().unwrap().contains("gave up after 3 attempts"), "{:?}", job.error);
    assert_eq!(h.sm.active_count(1), 0);
    assert_eq!(h.sm.queue_depth(), 0);
    assert_eq!(h.requeue(id, 3), 0, "a failed job is not re-queued again");
}

#[test]
fn cancel_from_each_state() {
    let mut h = Harness::new(ClusterConfig::default());
    h.register(1, 3, &["m1"]);
    let queued = h.submit_ok(1, request("a", "m1", 0));
    let assigned = h.submit_ok(2, request("b", "m1", 0));
    let running = h.submit_ok(3, request("c", "m1", 0));
    h.assign(assigned, 1, 1);
    h.assign(running, 1, 1);
    h.apply(Command::Start { job: running, node: 1, attempt: 1 });
    for id in [queued, assigned, running] {
        assert_eq!(h.apply(Command::Cancel { job: id }), Response::Ok);
        assert_eq!(h.job(id).state, JobState::Cancelled);
    }
    assert_eq!(h.sm.queue_depth(), 0);
    assert_eq!(h.sm.active_count(1), 0);
    assert_eq!(h.apply(Command::Cancel { job: JobId(99) }), Response::Rejected(Rejection::UnknownJob));
    // A cancelled job is never assigned again.
    assert_eq!(h.assign(queued, 1, 1), 0);
}

// ---------------------------------------------------------------------------
// Targeted: retention
// ---------------------------------------------------------------------------

/// Submits, assigns and completes one job with an image of `len` bytes.
fn succeed(h: &mut Harness, id: u128, len: usize, key: Option<&str>) -> JobId {
    let Response::Submitted { job, created: true } = h.submit(id, request(&format!("p{id}"), "m1", 0), key) else {
        panic!("submit {id}")
    };
    assert_eq!(h.assign(job.id, 1, 1), 1);
    assert_eq!(h.complete(job.id, 1, 1, png(len, id as u8)), Response::Ok);
    job.id
}

#[test]
fn max_results_evicts_the_oldest_images() {
    let mut h = Harness::new(ClusterConfig { max_results: 2, ..Default::default() });
    h.register(1, 1, &["m1"]);
    let ids: Vec<JobId> = (1..=4).map(|i| succeed(&mut h, i, 10, None)).collect();
    for (i, id) in ids.iter().enumerate() {
        let job = h.job(*id);
        assert_eq!(job.state, JobState::Succeeded);
        assert_eq!(job.result_evicted, i < 2, "job {i}");
        assert_eq!(h.sm.image(id).is_some(), i >= 2, "job {i}");
        assert_eq!(job.result.map(|r| r.bytes), Some(10), "the size is kept after eviction");
        assert_eq!(job.history.last().unwrap().kind == EventKind::ResultEvicted, i < 2);
    }
    assert_eq!(h.sm.result_bytes(), 20);
    // Lowering the limit evicts at once.
    h.apply(Command::Configure(ClusterConfig { max_results: 0, ..Default::default() }));
    assert_eq!(h.sm.result_bytes(), 0);
    assert!(ids.iter().all(|id| h.job(*id).result_evicted && h.sm.image(id).is_none()));
}

#[test]
fn max_result_bytes_evicts_the_oldest_images() {
    let mut h = Harness::new(ClusterConfig { max_result_bytes: 25, ..Default::default() });
    h.register(1, 1, &["m1"]);
    let a = succeed(&mut h, 1, 10, None);
    let b = succeed(&mut h, 2, 10, None);
    assert_eq!(h.sm.result_bytes(), 20);
    let c = succeed(&mut h, 3, 10, None);
    assert!(h.job(a).result_evicted);
    assert!(!h.job(b).result_evicted && !h.job(c).result_evicted);
    assert_eq!(h.sm.result_bytes(), 20);
    // An image larger than the whole budget: oldest first, so the older images
    // go before it does (the documented order), leaving nothing.
    let d = succeed(&mut h, 4, 30, None);
    assert!([b, c, d].iter().all(|id| h.job(*id).result_evicted && h.sm.image(id).is_none()));
    assert_eq!(h.sm.result_bytes(), 0);
}

#[test]
fn max_finished_jobs_forgets_old_jobs_and_their_keys() {
    let mut h = Harness::new(ClusterConfig { max_finished_jobs: 2, ..Default::default() });
    h.register(1, 1, &["m1"]);
    let a = succeed(&mut h, 1, 10, Some("ka"));
    let b = succeed(&mut h, 2, 10, Some("kb"));
    let queued = h.submit_ok(50, request("still queued", "m1", 0));
    assert!(h.sm.job(&a).is_some());
    let c = h.submit_ok(3, request("c", "m1", 0));
    h.apply(Command::Cancel { job: c });
    assert!(h.sm.job(&a).is_none(), "the oldest finished job is forgotten");
    assert!(h.sm.image(&a).is_none());
    assert_eq!(h.sm.result_bytes(), 10);
    assert!(h.sm.job(&b).is_some() && h.sm.job(&c).is_some() && h.sm.job(&queued).is_some());
    assert!(h.sm.recent_jobs(None, usize::MAX).iter().all(|j| j.id != a));
    // Its idempotency key is free again: the same key makes a new job.
    match h.submit(100, request("p1", "m1", 0), Some("ka")) {
        Response::Submitted { job, created: true } => assert_eq!(job.id, JobId(100)),
        other => panic!("{other:?}"),
    }
    // The kept job's key still answers.
    assert!(matches!(h.submit(101, request("p2", "m1", 0), Some("kb")), Response::Submitted { created: false, .. }));
    // Lowering the limit forgets at once; queued jobs are never forgotten.
    h.apply(Command::Configure(ClusterConfig { max_finished_jobs: 0, ..Default::default() }));
    assert!(h.sm.job(&b).is_none() && h.sm.job(&c).is_none());
    assert!(h.sm.job(&queued).is_some());
    assert_eq!(h.sm.result_bytes(), 0);
}

// ---------------------------------------------------------------------------
// Targeted: priorities
// ---------------------------------------------------------------------------

#[test]
fn queue_is_highest_priority_first_then_fifo() {
    let mut h = Harness::new(ClusterConfig::default());
    let prios = [0, 5, -3, 5, 0, 100, -100, 5];
    for (i, p) in prios.iter().enumerate() {
        h.submit_ok(i as u128 + 1, request(&format!("p{i}"), "m1", *p));
    }
    let order: Vec<u128> = h.sm.queued().map(|j| j.id.0).collect();
    assert_eq!(order, vec![6, 2, 4, 8, 1, 5, 3, 7]);
    // A re-queued job keeps its place (its original submission order).
    h.register(1, 1, &["m1"]);
    h.assign(JobId(2), 1, 1);
    assert_eq!(h.sm.queued().map(|j| j.id.0).collect::<Vec<_>>(), vec![6, 4, 8, 1, 5, 3, 7]);
    h.requeue(JobId(2), 1);
    assert_eq!(h.sm.queued().map(|j| j.id.0).collect::<Vec<_>>(), order);
}

/// A batch (the leader's group commit) acts exactly like its commands applied
/// one after another: the same responses, the same jobs (apart from `seq`, the
/// submission order, which keeps the same relative order), the same images.
#[test]
fn batches_apply_like_their_commands_in_sequence() {
    for seed in 0..60 {
        let mut gen = Gen::new(10_000 + seed);
        let mut one_by_one = JobStateMachine::default();
        let mut batched = JobStateMachine::default();
        let config = Command::Configure(gen.small_config());
        one_by_one.apply(1, &Request { at_ms: 1, cmd: config.clone() });
        batched.apply(1, &Request { at_ms: 1, cmd: config });
        let mut single_index = 1;
        for entry in 2..80u64 {
            let size = 1 + (entry as usize * 7 + seed as usize) % 9;
            let at_ms = 1_000 + entry;
            let mut cmds = Vec::new();
            let mut expected = Vec::new();
            for _ in 0..size {
                let cmd = gen.command(&one_by_one);
                single_index += 1;
                expected.push(one_by_one.apply(single_index, &Request { at_ms, cmd: cmd.clone() }));
                cmds.push(cmd);
            }
            let resp = batched.apply(entry, &Request { at_ms, cmd: Command::Batch(cmds) });
            let no_seq = |r: Response| match r {
                Response::Submitted { mut job, created } => {
                    job.seq = 0;
                    Response::Submitted { job, created }
                }
                other => other,
            };
            let Response::Batch(got) = resp else { panic!("seed {seed}: a batch answered {resp:?}") };
            let got: Vec<Response> = got.into_iter().map(no_seq).collect();
            let expected: Vec<Response> = expected.into_iter().map(no_seq).collect();
            assert_eq!(got, expected, "seed {seed} entry {entry}");
            batched.check_invariants().unwrap_or_else(|e| panic!("seed {seed} entry {entry}: {e}"));
            let strip = |sm: &JobStateMachine| -> Vec<(Job, Option<(ResultHash, Location)>)> {
                let mut jobs: Vec<Job> = all_jobs(sm).into_values().collect();
                jobs.sort_by_key(|j| j.seq);
                jobs.into_iter()
                    .map(|mut j| {
                        let image = sm.image(&j.id).map(|(s, l)| (s, l.clone()));
                        j.seq = 0;
                        (j, image)
                    })
                    .collect()
            };
            assert_eq!(strip(&batched), strip(&one_by_one), "seed {seed} entry {entry}");
            let order = |sm: &JobStateMachine| sm.queued().map(|j| j.id).collect::<Vec<_>>();
            assert_eq!(order(&batched), order(&one_by_one), "seed {seed}: queue order differs");
        }
    }
}

#[test]
fn nested_or_oversized_batches_are_rejected_without_effect() {
    let mut sm = JobStateMachine::default();
    let nested = Command::Batch(vec![Command::Batch(vec![])]);
    let resp = sm.apply(1, &Request { at_ms: 1, cmd: nested });
    assert!(matches!(&resp, Response::Batch(r) if matches!(r[0], Response::Rejected(Rejection::Invalid(_)))));
    let cancel = Command::Cancel { job: JobId(7) };
    let big = Command::Batch(vec![cancel; raftgen_raft::command::MAX_BATCH_COMMANDS + 1]);
    let resp = sm.apply(2, &Request { at_ms: 1, cmd: big });
    assert!(matches!(resp, Response::Rejected(Rejection::Invalid(_))), "{resp:?}");
    assert_eq!(sm, JobStateMachine::default());
}

#[test]
fn a_node_with_other_bytes_under_a_model_name_gets_none_of_its_jobs() {
    let mut h = Harness::new(ClusterConfig::default());
    let with_hash = |slots, hash: &str| NodeRegistration {
        slots,
        models: vec![ModelInfo { name: "m".into(), hash: hash.into(), ..Default::default() }],
        ..Default::default()
    };
    assert_eq!(h.apply(Command::RegisterNode { node: 1, info: with_hash(1, "aaaa") }), Response::Ok);
    assert_eq!(h.apply(Command::RegisterNode { node: 2, info: with_hash(4, "bbbb") }), Response::Ok);
    assert!(h.sm.serves(1, "m"));
    assert!(!h.sm.serves(2, "m"), "the second hash registered under 'm' must not serve it");
    assert_eq!(h.sm.model_hashes()["m"], "aaaa");
    let a = h.submit_ok(1, request("a", "m", 0));
    let b = h.submit_ok(2, request("b", "m", 0));
    assert_eq!(h.assign(a, 2, 1), 0, "assigned to the node with the wrong bytes");
    assert_eq!(h.assign(a, 1, 1), 1);
    assert_eq!(h.assign(b, 2, 1), 0);
    // Node 2 fixes its folder: same bytes, now eligible.
    assert_eq!(h.apply(Command::RegisterNode { node: 2, info: with_hash(4, "aaaa") }), Response::Ok);
    assert_eq!(h.assign(b, 2, 1), 1);
    // The success records the hash that made the image.
    let out =
        Outcome::Succeeded { result: meta(8, 1), model_hash: "aaaa".into(), notes: vec!["prompt truncated".into()] };
    assert_eq!(h.complete(b, 2, 1, out), Response::Ok);
    assert_eq!(h.job(b).model_hash.as_deref(), Some("aaaa"));
    assert_eq!(h.job(b).notes, vec!["prompt truncated".to_string()]);
    // Once nobody serves the name, its hash is forgotten and a new one may take it.
    assert_eq!(h.apply(Command::ForgetNode { node: 1 }), Response::Ok);
    assert_eq!(h.apply(Command::ForgetNode { node: 2 }), Response::Ok);
    assert!(h.sm.model_hashes().is_empty());
    assert_eq!(h.apply(Command::RegisterNode { node: 3, info: with_hash(1, "cccc") }), Response::Ok);
    assert!(h.sm.serves(3, "m"));
}

// ---------------------------------------------------------------------------
// Retries of failed attempts
// ---------------------------------------------------------------------------

fn retryable(msg: &str) -> Outcome {
    Outcome::Failed { error: msg.to_string(), retryable: true }
}

#[test]
fn a_retryable_failure_requeues_until_max_attempts() {
    let mut h = Harness::new(ClusterConfig { max_attempts: 3, ..Default::default() });
    h.register(1, 1, &["m1"]);
    let id = h.submit_ok(1, request("a cat", "m1", 0));
    for attempt in 1..=2 {
        assert_eq!(h.assign(id, 1, attempt), 1);
        assert_eq!(h.complete(id, 1, attempt, retryable(&format!("out of memory {attempt}"))), Response::Ok);
        let job = h.job(id);
        assert_eq!((job.state, job.node, job.attempt, job.error.as_deref()), (JobState::Queued, None, attempt, None));
        assert_eq!(
            job.history.last().unwrap().kind,
            EventKind::AttemptFailed { node: 1, attempt, error: format!("out of memory {attempt}") }
        );
        assert_eq!(h.sm.active_count(1), 0, "the slot is free again");
        assert_eq!(h.sm.queue_depth(), 1);
        // The host retrying its report of that attempt is acknowledged, once.
        let events = job.history.len();
        assert_eq!(h.complete(id, 1, attempt, retryable("out of memory")), Response::Ok);
        assert_eq!(h.job(id).history.len(), events);
    }
    assert_eq!(h.assign(id, 1, 3), 1);
    assert_eq!(h.complete(id, 1, 3, retryable("out of memory 3")), Response::Ok);
    let job = h.job(id);
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.error.as_deref(), Some("gave up after 3 attempts: out of memory 3"));
    assert_eq!(count_events(job, |k| matches!(k, EventKind::AttemptFailed { .. })), 2);
    assert_eq!(h.sm.queue_depth(), 0);
    assert_eq!(h.sm.counts()["m1"].failed, 1);
    assert_eq!(h.complete(id, 1, 3, retryable("out of memory 3")), Response::Ok, "a repeat is acknowledged");

    // A retry that succeeds: attempt 2 makes the image.
    let id = h.submit_ok(2, request("a dog", "m1", 0));
    assert_eq!(h.assign(id, 1, 1), 1);
    assert_eq!(h.complete(id, 1, 1, retryable("executor crashed")), Response::Ok);
    assert_eq!(h.assign(id, 1, 2), 1);
    assert_eq!(h.complete(id, 1, 2, png(5, 1)), Response::Ok);
    let job = h.job(id);
    assert_eq!((job.state, job.attempt, job.error.as_deref()), (JobState::Succeeded, 2, None));
    assert_eq!(h.sm.counts()["m1"], JobCounts { submitted: 2, succeeded: 1, failed: 1, cancelled: 0, cache_hits: 0 });
}

#[test]
fn a_non_retryable_failure_fails_at_once() {
    let mut h = Harness::new(ClusterConfig { max_attempts: 3, ..Default::default() });
    h.register(1, 1, &["m1"]);
    let id = h.submit_ok(1, request("a cat", "m1", 0));
    assert_eq!(h.assign(id, 1, 1), 1);
    assert_eq!(h.complete(id, 1, 1, failed("model 'm1' has no sampler 'x'")), Response::Ok);
    let job = h.job(id);
    assert_eq!((job.state, job.attempt), (JobState::Failed, 1));
    assert_eq!(job.error.as_deref(), Some("model 'm1' has no sampler 'x'"));
    assert_eq!(count_events(job, |k| matches!(k, EventKind::AttemptFailed { .. })), 0);
    assert_eq!(h.sm.queue_depth(), 0);
}

#[test]
fn a_stale_retryable_failure_is_fenced() {
    let mut h = Harness::new(ClusterConfig::default());
    h.register(1, 1, &["m1"]);
    h.register(2, 1, &["m1"]);
    let id = h.submit_ok(1, request("a cat", "m1", 0));
    assert_eq!(h.assign(id, 1, 1), 1);
    // Node 1 is judged lost; attempt 2 runs on node 2.
    assert_eq!(h.requeue(id, 1), 1);
    assert_eq!(h.assign(id, 2, 2), 1);
    let resp = h.complete(id, 1, 1, retryable("executor crashed"));
    assert_eq!(resp, Response::Rejected(Rejection::StaleAttempt { current_attempt: 2, state: JobState::Assigned }));
    let job = h.job(id);
    assert_eq!((job.state, job.node, job.attempt), (JobState::Assigned, Some(2), 2));
    assert_eq!(count_events(job, |k| matches!(k, EventKind::AttemptFailed { .. })), 0);
    assert_eq!(h.sm.active_count(2), 1);
    assert_eq!(h.sm.queue_depth(), 0);
    // The right node with the wrong attempt is fenced too.
    let resp = h.complete(id, 2, 1, retryable("executor crashed"));
    assert!(matches!(resp, Response::Rejected(Rejection::StaleAttempt { .. })), "{resp:?}");
    assert_eq!(h.job(id).state, JobState::Assigned);
}

#[test]
fn a_cancelled_job_is_not_requeued_by_its_failure() {
    let mut h = Harness::new(ClusterConfig::default());
    h.register(1, 1, &["m1"]);
    let id = h.submit_ok(1, request("a cat", "m1", 0));
    assert_eq!(h.assign(id, 1, 1), 1);
    assert_eq!(h.apply(Command::Start { job: id, node: 1, attempt: 1 }), Response::Ok);
    assert_eq!(h.apply(Command::Cancel { job: id }), Response::Ok);
    let resp = h.complete(id, 1, 1, retryable("stopped"));
    assert_eq!(resp, Response::Rejected(Rejection::StaleAttempt { current_attempt: 1, state: JobState::Cancelled }));
    assert_eq!(h.job(id).state, JobState::Cancelled);
    assert_eq!(h.sm.queue_depth(), 0);
    assert_eq!(h.sm.counts()["m1"].cancelled, 1);
}

// ---------------------------------------------------------------------------
// Result cache
// ---------------------------------------------------------------------------

/// A harness with node 1 serving `m1` and `m2`, both as the bytes `h`
/// (the hash `png()` outcomes report).
fn cache_harness(config: ClusterConfig) -> Harness {
    let mut h = Harness::new(config);
    let info = NodeRegistration {
        slots: 4,
        models: ["m1", "m2"]
            .iter()
            .map(|m| ModelInfo { name: m.to_string(), hash: "h".into(), ..Default::default() })
            .collect(),
        ..Default::default()
    };
    assert_eq!(h.apply(Command::RegisterNode { node: 1, info }), Response::Ok);
    h
}

/// A fixed-seed request.
fn seeded(prompt: &str) -> JobRequest {
    JobRequest { seed: Some(7), ..request(prompt, "m1", 0) }
}

/// Submits as the leader does (the request's seed, when it has one).
fn submit_as_leader(h: &mut Harness, id: u128, req: JobRequest) -> Job {
    let seed = req.seed.or(Some(1_000 + id as u64));
    match h.apply(Command::Submit { id: JobId(id), request: req, seed, idempotency_key: None }) {
        Response::Submitted { job, created: true } => *job,
        other => panic!("submit {id}: {other:?}"),
    }
}

/// Submits, runs and succeeds one job with an image of `len` bytes of `fill`.
fn run_to_success(h: &mut Harness, id: u128, req: JobRequest, len: usize, fill: u8) -> JobId {
    let job = submit_as_leader(h, id, req);
    assert_eq!(job.state, JobState::Queued);
    assert_eq!(h.assign(job.id, 1, 1), 1);
    assert_eq!(h.complete(job.id, 1, 1, png(len, fill)), Response::Ok);
    job.id
}

fn cache_source(job: &Job) -> Option<JobId> {
    job.history.iter().find_map(|e| match e.kind {
        EventKind::CacheHit { source } => Some(source),
        _ => None,
    })
}

#[test]
fn an_identical_fixed_seed_job_is_answered_from_the_cache() {
    let mut h = cache_harness(ClusterConfig { max_queue_depth: 1, ..Default::default() });
    let first = run_to_success(&mut h, 1, seeded("a cat"), 10, 3);
    // A queued job fills the queue: a hit needs no room in it.
    submit_as_leader(&mut h, 2, seeded("something else"));
    // Priority is not a generation parameter.
    let again = JobRequest { priority: 5, ..seeded("a cat") };
    let hit = submit_as_leader(&mut h, 3, again);
    assert_eq!((hit.state, hit.attempt, hit.node), (JobState::Succeeded, 0, None));
    assert_eq!(cache_source(&hit), Some(first));
    let kinds: Vec<&EventKind> = hit.history.iter().map(|e| &e.kind).collect();
    assert_eq!(kinds, [&EventKind::Submitted, &EventKind::CacheHit { source: first }]);
    assert_eq!(hit.model_hash.as_deref(), Some("h"));
    assert_eq!(hit.result.map(|r| r.bytes), Some(10));
    assert_eq!(hit.progress.step, hit.progress.steps);
    assert_eq!(hit.finished_at_ms, Some(hit.submitted_at_ms));
    assert_eq!(h.sm.image(&hit.id).map(|i| i.0), Some(image_hash(10, 3)));
    assert_eq!(h.job(hit.id), &hit, "the answer is the stored job");
    assert_eq!(h.sm.queue_depth(), 1, "the hit was never queued");
    assert_eq!(h.sm.counts()["m1"], JobCounts { submitted: 3, succeeded: 2, failed: 0, cancelled: 0, cache_hits: 1 });
    // Identical again (the queue still full): another hit.
    let hit2 = submit_as_leader(&mut h, 4, seeded("a cat"));
    assert_eq!(hit2.state, JobState::Succeeded);
    assert_eq!(h.sm.counts()["m1"].cache_hits, 2);
}

#[test]
fn any_generation_parameter_change_misses_the_cache() {
    let mut h = cache_harness(ClusterConfig::default());
    run_to_success(&mut h, 1, seeded("a cat"), 10, 3);
    let base = seeded("a cat");
    let changes: Vec<(&str, JobRequest)> = vec![
        ("prompt", JobRequest { prompt: "a cat ".into(), ..base.clone() }),
        ("negative_prompt", JobRequest { negative_prompt: "dog".into(), ..base.clone() }),
        ("width", JobRequest { width: 128, ..base.clone() }),
        ("height", JobRequest { height: 128, ..base.clone() }),
        ("steps", JobRequest { steps: 21, ..base.clone() }),
        ("guidance", JobRequest { guidance: 7.25, ..base.clone() }),
        ("seed", JobRequest { seed: Some(8), ..base.clone() }),
        ("sampler", JobRequest { sampler: Some("euler".into()), ..base.clone() }),
        ("model", JobRequest { model: "m2".into(), ..base.clone() }),
    ];
    for (n, (what, req)) in changes.into_iter().enumerate() {
        let job = submit_as_leader(&mut h, 100 + n as u128, req);
        assert_eq!(job.state, JobState::Queued, "another {what} was answered from the cache");
    }
    assert_eq!(h.sm.counts()["m1"].cache_hits + h.sm.counts()["m2"].cache_hits, 0);

    // Other bytes under the model's name: a miss, though every parameter is the same.
    assert_eq!(h.apply(Command::ForgetNode { node: 1 }), Response::Ok);
    let info = NodeRegistration {
        slots: 1,
        models: vec![ModelInfo { name: "m1".into(), hash: "h2".into(), ..Default::default() }],
        ..Default::default()
    };
    assert_eq!(h.apply(Command::RegisterNode { node: 1, info }), Response::Ok);
    assert_eq!(submit_as_leader(&mut h, 200, seeded("a cat")).state, JobState::Queued, "new model bytes");
}

#[test]
fn a_job_without_a_fixed_seed_never_uses_the_cache() {
    let mut h = cache_harness(ClusterConfig::default());
    // The leader's seed (7) makes the image, but the client did not fix it.
    let unseeded = |id: u128| Command::Submit {
        id: JobId(id),
        request: request("a cat", "m1", 0),
        seed: Some(7),
        idempotency_key: None,
    };
    assert!(matches!(h.apply(unseeded(1)), Response::Submitted { created: true, .. }));
    assert_eq!(h.assign(JobId(1), 1, 1), 1);
    assert_eq!(h.complete(JobId(1), 1, 1, png(10, 3)), Response::Ok);
    // The same request again, even with the same leader seed: it runs again.
    match h.apply(unseeded(2)) {
        Response::Submitted { job, created: true } => assert_eq!(job.state, JobState::Queued),
        other => panic!("{other:?}"),
    }
    // And a request fixing that seed does not take the unseeded job's result.
    assert_eq!(submit_as_leader(&mut h, 3, seeded("a cat")).state, JobState::Queued);
}

#[test]
fn cache_false_runs_again_and_its_result_answers_later_jobs() {
    let mut h = cache_harness(ClusterConfig::default());
    let first = run_to_success(&mut h, 1, seeded("a cat"), 10, 3);
    let no_cache = JobRequest { cache: false, ..seeded("a cat") };
    let second = run_to_success(&mut h, 2, no_cache, 10, 3);
    assert_ne!(first, second);
    assert_eq!(h.sm.counts()["m1"].cache_hits, 0);
    // The newest result of the request answers from now on.
    let hit = submit_as_leader(&mut h, 3, seeded("a cat"));
    assert_eq!(cache_source(&hit), Some(second));
}

#[test]
fn an_evicted_or_forgotten_result_is_no_longer_served() {
    let mut h = cache_harness(ClusterConfig { max_results: 1, ..Default::default() });
    run_to_success(&mut h, 1, seeded("a cat"), 10, 3);
    // Another result evicts the first image: the cache forgets it.
    run_to_success(&mut h, 2, seeded("a dog"), 10, 4);
    assert_eq!(submit_as_leader(&mut h, 3, seeded("a cat")).state, JobState::Queued);
    assert_eq!(submit_as_leader(&mut h, 4, seeded("a dog")).state, JobState::Succeeded, "the kept one still hits");

    let mut h = cache_harness(ClusterConfig { max_finished_jobs: 1, ..Default::default() });
    run_to_success(&mut h, 1, seeded("a cat"), 10, 3);
    run_to_success(&mut h, 2, seeded("a dog"), 10, 4);
    assert!(h.sm.job(&JobId(1)).is_none(), "forgotten");
    assert_eq!(submit_as_leader(&mut h, 3, seeded("a cat")).state, JobState::Queued);
}

#[test]
fn the_cache_survives_a_snapshot_restore() {
    let mut h = cache_harness(ClusterConfig::default());
    let first = run_to_success(&mut h, 1, seeded("a cat"), 10, 3);
    let restored: JobStateMachine = codec::decode(&codec::encode(&h.sm).unwrap()).unwrap();
    restored.check_invariants().unwrap();
    assert_eq!(restored, h.sm);
    let mut h = Harness { sm: restored, index: h.index };
    let hit = submit_as_leader(&mut h, 2, seeded("a cat"));
    assert_eq!((hit.state, cache_source(&hit)), (JobState::Succeeded, Some(first)));
    assert_eq!(h.sm.image(&hit.id).map(|i| i.0), Some(image_hash(10, 3)));
}

#[test]
fn a_node_that_cannot_load_a_model_stops_serving_it_in_the_same_entry() {
    use raftgen_raft::state::MAX_UNCOUNTED_ATTEMPTS;
    let mut h = Harness::new(ClusterConfig { max_attempts: 2, ..Default::default() });
    h.register(1, 1, &["m1", "m2"]);
    let id = h.submit_ok(1, request("a cat", "m1", 0));
    assert_eq!(h.assign(id, 1, 1), 1);
    let unavailable = Outcome::Unavailable { error: "unet/x.safetensors: file cut short".into() };
    assert_eq!(h.complete(id, 1, 1, unavailable.clone()), Response::Ok);
    let job = h.job(id);
    assert_eq!((job.state, job.counted_attempts()), (JobState::Queued, 0), "the attempt is given back");
    assert!(!h.sm.serves(1, "m1") && h.sm.serves(1, "m2"), "node 1 stops serving m1 only");
    let reg = &h.sm.nodes()[&1].registration;
    assert_eq!(reg.refused_models.len(), 1);
    assert_eq!(
        (reg.refused_models[0].name.as_str(), reg.refused_models[0].reason.as_str()),
        ("m1", "unet/x.safetensors: file cut short")
    );
    assert!(schedule::plan(&h.sm, |_| true, 8).assign.is_empty(), "never handed straight back to node 1");

    // Another node that serves it takes the job.
    h.register(2, 1, &["m1"]);
    let plan = schedule::plan(&h.sm, |_| true, 8);
    assert_eq!(plan.assign.iter().map(|a| (a.job, a.node)).collect::<Vec<_>>(), [(id, 2)]);

    // Node 1, repaired and rescanned, registers m1 again and serves it.
    h.register(1, 1, &["m1", "m2"]);
    assert!(h.sm.serves(1, "m1"));
    assert!(h.sm.nodes()[&1].registration.refused_models.is_empty());

    // Past MAX_UNCOUNTED_ATTEMPTS the attempts count, then the job gives up.
    let mut attempt = h.job(id).attempt;
    for _ in 0..MAX_UNCOUNTED_ATTEMPTS + 2 {
        if h.job(id).state != JobState::Queued {
            break;
        }
        attempt += 1;
        h.register(1, 1, &["m1"]);
        assert_eq!(h.assign(id, 1, attempt), 1);
        assert_eq!(h.complete(id, 1, attempt, unavailable.clone()), Response::Ok);
    }
    let job = h.job(id);
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.uncounted_attempts, MAX_UNCOUNTED_ATTEMPTS);
    assert_eq!(job.counted_attempts(), 2);
    assert!(job.error.as_deref().unwrap().starts_with("gave up after 10 attempts"), "{:?}", job.error);
}
