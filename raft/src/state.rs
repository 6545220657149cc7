//! The job state machine: the replicated state of the whole cluster.
//!
//! `apply` is a pure, deterministic function of (state, log index, request): no
//! clock, no randomness, no I/O. Every replica that applies the same log reaches
//! the same state byte for byte, which is what lets us snapshot, replay and test
//! it exhaustively (see `check_invariants` and the randomized tests below).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::cache::{self, ResultCache};
use crate::command::{
    Assignment, ClusterConfig, Command, NodeRegistration, Outcome, RefusedModel, Rejection, Request, Response,
    MAX_BATCH_COMMANDS, MAX_REFUSED_MODELS,
};
use crate::job::{
    bounded_message, Delivery, EventKind, FieldError, Job, JobId, JobRequest, JobState, NodeId, Progress,
    WebhookStatus, MAX_DELIVERY_ERROR_CHARS, MAX_IDEMPOTENCY_KEY_BYTES, MAX_NOTES, MAX_NOTE_CHARS,
    MAX_WEBHOOK_ATTEMPTS,
};
use crate::result::{Blob, Location, ResultHash, ResultMeta, MAX_RESULT_HOLDERS};

/// Most object-store keys waiting for the leader to delete them; beyond it
/// the oldest are dropped from the queue (the leader's sweep finds them).
pub const MAX_OBJECT_DELETIONS: usize = 100_000;

/// Attempts per job that a node's [`Outcome::Unavailable`] gives back; past
/// it they count like any failure (a node that keeps advertising a model it
/// cannot load, restart after restart, cannot keep a job forever).
pub const MAX_UNCOUNTED_ATTEMPTS: u32 = 8;

/// A node's executor as the cluster sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub registration: NodeRegistration,
    pub draining: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JobStateMachine {
    config: ClusterConfig,
    jobs: BTreeMap<JobId, Job>,
    /// Every job by submission order (log index), for listings.
    by_seq: BTreeMap<u64, JobId>,
    /// Queued jobs in scheduling order: (-priority, seq).
    queue: BTreeMap<(i64, u64), JobId>,
    /// Assigned or running jobs, per node.
    active: BTreeMap<NodeId, BTreeSet<JobId>>,
    /// Terminal jobs in the order they finished (retention order).
    finished: BTreeMap<u64, JobId>,
    /// Retained results of succeeded jobs, keyed like `finished`.
    image_order: BTreeMap<u64, JobId>,
    /// Each retained result's image (several jobs may share one).
    images: BTreeMap<JobId, ResultHash>,
    /// Every image a retained result names: where its bytes are, and how
    /// many retained results name it.
    blobs: BTreeMap<ResultHash, Blob>,
    /// Bytes of the retained results (an image shared by two jobs counts twice).
    result_bytes: u64,
    /// Nodes the leader declared lost, since when (its clock).
    lost: BTreeMap<NodeId, u64>,
    /// Nodes leaving the cluster (their copies are handed over first).
    retiring: BTreeSet<NodeId>,
    /// Object-store keys no result names any more, for the leader to
    /// delete, by queue position.
    object_deletions: BTreeMap<u64, String>,
    next_deletion_seq: u64,
    idempotency: BTreeMap<String, JobId>,
    nodes: BTreeMap<NodeId, NodeInfo>,
    /// The hash each model name stands for: the first one registered while no
    /// node served the name. A node advertising other bytes under the name is
    /// not given its jobs (see [`JobStateMachine::serves`]).
    model_hashes: BTreeMap<String, String>,
    next_finish_seq: u64,
    /// Jobs created and finished per model since the cluster began.
    counts: BTreeMap<String, JobCounts>,
    /// Finished jobs whose webhook is neither delivered nor given up, so the
    /// deliverer does not scan every job. A job leaves it when a try succeeds,
    /// when its tries run out, or when retention forgets the job (a forgotten
    /// job's webhook is dropped with it).
    webhooks_pending: BTreeSet<JobId>,
    /// Succeeded fixed-seed jobs whose image is still stored, by what they
    /// answer (see [`crate::cache`]).
    cache: ResultCache,
}

/// How many jobs of one model were created and how many ended in each terminal
/// state, since the cluster began. Counted in `apply`, so every replica holds
/// the same numbers; kept in the state (and its snapshots), so they survive
/// restarts, and apart from the jobs, so retention forgets jobs, not counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobCounts {
    pub submitted: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
    /// Of the succeeded jobs, those answered from the result cache.
    pub cache_hits: u64,
}

impl JobStateMachine {
    pub fn new(config: ClusterConfig) -> Self {
        JobStateMachine { config, ..Default::default() }
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// Applies one committed request. `index` is the entry's log index; with the
    /// position inside a batch it orders jobs FIFO within a priority.
    pub fn apply(&mut self, index: u64, req: &Request) -> Response {
        match &req.cmd {
            Command::Batch(cmds) if cmds.len() <= MAX_BATCH_COMMANDS => Response::Batch(
                cmds.iter().enumerate().map(|(pos, cmd)| self.apply_one(index, pos as u64, req.at_ms, cmd)).collect(),
            ),
            cmd => self.apply_one(index, 0, req.at_ms, cmd),
        }
    }

    fn apply_one(&mut self, index: u64, pos: u64, at: u64, cmd: &Command) -> Response {
        match cmd {
            Command::Batch(_) => Response::Rejected(Rejection::Invalid(FieldError::new(
                "batch",
                "batches do not nest or exceed the limit",
            ))),
            Command::Submit { id, request, seed, idempotency_key } => {
                let seq = index * MAX_BATCH_COMMANDS as u64 + pos;
                self.submit(seq, at, *id, request, *seed, idempotency_key.as_deref())
            }
            Command::Assign { assignments } => {
                let count = assignments.iter().filter(|a| self.assign(at, a)).count();
                Response::Applied { count: count as u32 }
            }
            Command::Start { job, node, attempt } => self.start(at, *job, *node, *attempt),
            Command::Progress { job, node, attempt, step, steps } => {
                let Some(j) = self.jobs.get_mut(job) else { return Response::Rejected(Rejection::UnknownJob) };
                if j.state != JobState::Running || j.node != Some(*node) || j.attempt != *attempt {
                    return Response::Rejected(Rejection::StaleAttempt { current_attempt: j.attempt, state: j.state });
                }
                j.progress = Progress { step: (*step).min(*steps), steps: *steps };
                Response::Ok
            }
            Command::Complete { job, node, attempt, outcome } => self.complete(at, *job, *node, *attempt, outcome),
            Command::Requeue { jobs, reason } => {
                let count = jobs.iter().filter(|(job, attempt)| self.requeue(at, *job, *attempt, reason)).count();
                Response::Applied { count: count as u32 }
            }
            Command::Cancel { job } => self.cancel(at, *job),
            Command::RegisterNode { node, info } => {
                self.nodes.entry(*node).or_default().registration = info.clone();
                for model in &info.models {
                    self.model_hashes.entry(model.name.clone()).or_insert_with(|| model.hash.clone());
                }
                self.forget_unserved_models();
                Response::Ok
            }
            Command::SetDraining { node, draining } => match self.nodes.get_mut(node) {
                Some(n) => {
                    n.draining = *draining;
                    Response::Ok
                }
                None => Response::Rejected(Rejection::UnknownNode),
            },
            Command::ForgetNode { node } => {
                let stranded: Vec<(JobId, u32)> =
                    self.active.get(node).into_iter().flatten().map(|id| (*id, self.jobs[id].attempt)).collect();
                for (job, attempt) in stranded {
                    self.requeue(at, job, attempt, "node left the cluster");
                }
                self.nodes.remove(node);
                self.forget_unserved_models();
                // Its copies left with it.
                for blob in self.blobs.values_mut() {
                    if let Location::Nodes(holders) = &mut blob.location {
                        holders.remove(node);
                    }
                }
                self.lost.remove(node);
                self.retiring.remove(node);
                Response::Ok
            }
            Command::ResultCopied { sha256, node } => {
                if let Some(Location::Nodes(holders)) = self.blobs.get_mut(sha256).map(|b| &mut b.location) {
                    if holders.len() < MAX_RESULT_HOLDERS {
                        holders.insert(*node);
                    }
                }
                Response::Ok
            }
            Command::ResultDropped { sha256, node, lost } => {
                let lost_nodes = &self.lost;
                if let Some(Location::Nodes(holders)) = self.blobs.get_mut(sha256).map(|b| &mut b.location) {
                    let others_alive = holders.iter().any(|h| h != node && !lost_nodes.contains_key(h));
                    if *lost || others_alive {
                        holders.remove(node);
                    }
                }
                Response::Ok
            }
            Command::SetLost { node, lost } => {
                if *lost {
                    self.lost.entry(*node).or_insert(at);
                } else {
                    self.lost.remove(node);
                }
                Response::Ok
            }
            Command::Retire { node } => {
                self.retiring.insert(*node);
                Response::Ok
            }
            Command::ObjectsDeleted { seqs } => {
                for seq in seqs {
                    self.object_deletions.remove(seq);
                }
                Response::Ok
            }
            Command::WebhookDelivery { job, delivery, max_attempts } => {
                self.webhook_delivery(*job, delivery, *max_attempts)
            }
            Command::Configure(config) => {
                self.config = *config;
                self.enforce_retention(at);
                Response::Ok
            }
        }
    }

    /// Drops the hash of every model name no node advertises any more.
    fn forget_unserved_models(&mut self) {
        let nodes = &self.nodes;
        self.model_hashes.retain(|m, _| nodes.values().any(|n| n.registration.has_model(m)));
    }

    /// Whether `node` may run jobs for `model`: it serves the name with the
    /// bytes the cluster knows under it.
    pub fn serves(&self, node: NodeId, model: &str) -> bool {
        let Some(info) = self.nodes.get(&node).and_then(|n| n.registration.info(model)) else { return false };
        self.model_hashes.get(model) == Some(&info.hash)
    }

    /// The hash each served model name stands for.
    pub fn model_hashes(&self) -> &BTreeMap<String, String> {
        &self.model_hashes
    }

    fn submit(
        &mut self,
        seq: u64,
        at: u64,
        id: JobId,
        request: &JobRequest,
        seed: Option<u64>,
        key: Option<&str>,
    ) -> Response {
        if let Err(e) = request.validate() {
            return Response::Rejected(Rejection::Invalid(e));
        }
        if let Some(key) = key {
            if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
                return Response::Rejected(Rejection::Invalid(FieldError::new(
                    "Idempotency-Key",
                    format!("must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes"),
                )));
            }
            if let Some(existing) = self.idempotency.get(key) {
                let job = &self.jobs[existing];
                if job.request == *request {
                    return Response::Submitted { job: Box::new(job.clone()), created: false };
                }
                return Response::Rejected(Rejection::IdempotencyKeyReused { job: *existing });
            }
        }
        if let Some(job) = self.jobs.get(&id) {
            // The receiving node retried a forward whose first try did commit.
            return Response::Submitted { job: Box::new(job.clone()), created: false };
        }
        // The leader always fills the seed; this fallback is deterministic too.
        let seed = seed.or(request.seed).unwrap_or((id.0 as u64) ^ ((id.0 >> 64) as u64));
        // A job answered from the cache takes no room in the queue.
        let hit = self.cache_hit(request, seed);
        if hit.is_none() && self.queue.len() as u64 >= self.config.max_queue_depth {
            return Response::Rejected(Rejection::QueueFull { max_queue_depth: self.config.max_queue_depth });
        }
        let mut job = Job {
            id,
            request: request.clone(),
            seed,
            idempotency_key: key.map(str::to_string),
            state: JobState::Queued,
            node: None,
            attempt: 0,
            uncounted_attempts: 0,
            progress: Progress { step: 0, steps: request.steps },
            error: None,
            seq,
            submitted_at_ms: at,
            assigned_at_ms: None,
            started_at_ms: None,
            finished_at_ms: None,
            result: None,
            result_evicted: false,
            model_hash: None,
            notes: Vec::new(),
            history: Vec::new(),
            webhook: request.webhook.as_ref().map(|_| WebhookStatus::default()),
        };
        job.push_event(at, EventKind::Submitted);
        self.counts.entry(request.model.clone()).or_default().submitted += 1;
        self.by_seq.insert(seq, id);
        if let Some(key) = key {
            self.idempotency.insert(key.to_string(), id);
        }
        if let Some(source) = hit {
            return self.serve_from_cache(at, job, source);
        }
        self.queue.insert(queue_key(&job), id);
        self.jobs.insert(id, job.clone());
        Response::Submitted { job: Box::new(job), created: true }
    }

    /// The succeeded job whose image answers `request` run with `seed`, if
    /// the request allows the cache, has a fixed seed, and its model's
    /// current bytes made that image.
    fn cache_hit(&self, request: &JobRequest, seed: u64) -> Option<JobId> {
        if !request.cache {
            return None;
        }
        let key = cache::key(request, seed, self.model_hashes.get(&request.model)?)?;
        self.cache.get(&key).filter(|source| self.images.contains_key(source))
    }

    /// Finishes a new job at once with `source`'s image. The job names the
    /// same stored image (no bytes are copied), but its result lives and is
    /// evicted on its own, like any result.
    fn serve_from_cache(&mut self, at: u64, mut job: Job, source: JobId) -> Response {
        let sha = self.images[&source];
        let src = &self.jobs[&source];
        job.push_event(at, EventKind::CacheHit { source });
        job.progress.step = job.progress.steps;
        job.result = src.result;
        job.model_hash = src.model_hash.clone();
        job.notes = src.notes.clone();
        let id = job.id;
        // What the client is answered should retention forget the job at once.
        let mut answer = job.clone();
        answer.state = JobState::Succeeded;
        answer.finished_at_ms = Some(at);
        self.counts.entry(job.request.model.clone()).or_default().cache_hits += 1;
        self.jobs.insert(id, job);
        self.finish(at, id, JobState::Succeeded, None, Some((sha, None)));
        let job = self.jobs.get(&id).cloned().unwrap_or(answer);
        Response::Submitted { job: Box::new(job), created: true }
    }

    fn assign(&mut self, at: u64, a: &Assignment) -> bool {
        let Some(job) = self.jobs.get(&a.job) else { return false };
        if job.state != JobState::Queued || a.attempt != job.attempt + 1 {
            return false;
        }
        let Some(node) = self.nodes.get(&a.node) else { return false };
        let busy = self.active.get(&a.node).map_or(0, BTreeSet::len) as u32;
        if node.draining || busy >= node.registration.slots || !self.serves(a.node, &job.request.model) {
            return false;
        }
        let job = self.jobs.get_mut(&a.job).expect("checked above");
        self.queue.remove(&queue_key(job));
        job.state = JobState::Assigned;
        job.node = Some(a.node);
        job.attempt = a.attempt;
        job.assigned_at_ms = Some(at);
        job.progress = Progress { step: 0, steps: job.request.steps };
        job.push_event(at, EventKind::Assigned { node: a.node, attempt: a.attempt });
        self.active.entry(a.node).or_default().insert(a.job);
        true
    }

    fn start(&mut self, at: u64, id: JobId, node: NodeId, attempt: u32) -> Response {
        let Some(job) = self.jobs.get_mut(&id) else { return Response::Rejected(Rejection::UnknownJob) };
        let current = job.node == Some(node) && job.attempt == attempt;
        match job.state {
            JobState::Running if current => Response::Ok,
            JobState::Assigned if current => {
                job.state = JobState::Running;
                job.started_at_ms = Some(at);
                job.push_event(at, EventKind::Started { node, attempt });
                Response::Ok
            }
            state => Response::Rejected(Rejection::StaleAttempt { current_attempt: job.attempt, state }),
        }
    }

    fn complete(&mut self, at: u64, id: JobId, node: NodeId, attempt: u32, outcome: &Outcome) -> Response {
        let Some(job) = self.jobs.get_mut(&id) else { return Response::Rejected(Rejection::UnknownJob) };
        let current = job.node == Some(node) && job.attempt == attempt;
        if !(current && job.state.is_active()) {
            // The same completion, retried after its first commit. Only a
            // completion that was accepted (not a job that gave up while this
            // node was judged lost) is acknowledged. An attempt number is
            // assigned once per job, so (node, attempt) names the attempt even
            // after a retryable failure sent the job back to the queue.
            let accepted = job.history.iter().any(|e| match e.kind {
                EventKind::Succeeded { node: n, attempt: a }
                | EventKind::Failed { node: Some(n), attempt: a, .. }
                | EventKind::AttemptFailed { node: n, attempt: a, .. } => n == node && a == attempt,
                _ => false,
            });
            if accepted {
                return Response::Ok;
            }
            let rejection = Rejection::StaleAttempt { current_attempt: job.attempt, state: job.state };
            job.push_event(at, EventKind::CompletionRejected { node, attempt, reason: rejection.to_string() });
            return Response::Rejected(rejection);
        }
        match outcome {
            Outcome::Succeeded { result, model_hash, notes } if result.validate().is_ok() => {
                job.push_event(at, EventKind::Succeeded { node, attempt });
                job.progress.step = job.progress.steps;
                job.result = Some(result.info());
                job.model_hash = Some(bounded_message(model_hash));
                job.notes = notes.iter().take(MAX_NOTES).map(|n| n.chars().take(MAX_NOTE_CHARS).collect()).collect();
                self.finish(at, id, JobState::Succeeded, None, Some((result.sha256, Some(result))));
            }
            Outcome::Succeeded { result, .. } => {
                let error = result.validate().expect_err("checked above");
                job.push_event(at, EventKind::Failed { node: Some(node), attempt, error: error.clone() });
                self.finish(at, id, JobState::Failed, Some(error), None);
            }
            Outcome::Unavailable { error } => {
                // The node cannot run this model at all: it stops serving it in
                // this same entry, so the scheduler never hands the job straight
                // back to it (its next registration, after a rescan, may serve
                // the model again).
                let model = job.request.model.clone();
                self.refuse_model(node, &model, error);
                self.unavailable(at, id, node, attempt, error);
            }
            Outcome::Failed { error, retryable: true } if job.counted_attempts() < self.config.max_attempts => {
                let error = bounded_message(error);
                job.push_event(at, EventKind::AttemptFailed { node, attempt, error });
                self.return_to_queue(id);
            }
            Outcome::Failed { error, retryable } => {
                let error = if *retryable {
                    bounded_message(&format!("gave up after {attempt} attempts: {error}"))
                } else {
                    bounded_message(error)
                };
                job.push_event(at, EventKind::Failed { node: Some(node), attempt, error: error.clone() });
                self.finish(at, id, JobState::Failed, Some(error), None);
            }
        }
        Response::Ok
    }

    fn requeue(&mut self, at: u64, id: JobId, attempt: u32, reason: &str) -> bool {
        let Some(job) = self.jobs.get_mut(&id) else { return false };
        if !job.state.is_active() || job.attempt != attempt {
            return false;
        }
        let node = job.node.expect("active jobs have a node");
        let reason = bounded_message(reason);
        job.push_event(at, EventKind::Requeued { node, attempt, reason: reason.clone() });
        if job.counted_attempts() >= self.config.max_attempts {
            let error = format!("gave up after {attempt} attempts: {reason}");
            job.push_event(at, EventKind::Failed { node: None, attempt, error: error.clone() });
            self.finish(at, id, JobState::Failed, Some(error), None);
            return true;
        }
        self.return_to_queue(id);
        true
    }

    /// Puts an active job back in the queue, freeing its slot; the next
    /// assignment makes the next attempt.
    /// An attempt that could not run the model at all: queued again without
    /// spending an attempt, up to [`MAX_UNCOUNTED_ATTEMPTS`] times.
    fn unavailable(&mut self, at: u64, id: JobId, node: NodeId, attempt: u32, error: &str) {
        let job = self.jobs.get_mut(&id).expect("a known job");
        if job.uncounted_attempts < MAX_UNCOUNTED_ATTEMPTS {
            job.uncounted_attempts += 1;
            let error = bounded_message(&format!("not counted: {error}"));
            job.push_event(at, EventKind::AttemptFailed { node, attempt, error });
            self.return_to_queue(id);
        } else if job.counted_attempts() < self.config.max_attempts {
            let error = bounded_message(error);
            job.push_event(at, EventKind::AttemptFailed { node, attempt, error });
            self.return_to_queue(id);
        } else {
            let error = bounded_message(&format!("gave up after {attempt} attempts: {error}"));
            job.push_event(at, EventKind::Failed { node: Some(node), attempt, error: error.clone() });
            self.finish(at, id, JobState::Failed, Some(error), None);
        }
    }

    /// `node` found at run time that it cannot load `model`: it no longer
    /// serves it, and says why, as if it had registered so.
    fn refuse_model(&mut self, node: NodeId, model: &str, reason: &str) {
        let Some(n) = self.nodes.get_mut(&node) else { return };
        let reg = &mut n.registration;
        reg.models.retain(|m| m.name != model);
        reg.loaded_models.retain(|m| m != model);
        reg.refused_models.retain(|r| r.name != model);
        if reg.refused_models.len() < MAX_REFUSED_MODELS {
            reg.refused_models.push(RefusedModel { name: bounded_message(model), reason: bounded_message(reason) });
        }
        self.forget_unserved_models();
    }

    fn return_to_queue(&mut self, id: JobId) {
        let job = self.jobs.get_mut(&id).expect("a known job");
        let node = job.node.take().expect("active jobs have a node");
        job.state = JobState::Queued;
        job.progress = Progress { step: 0, steps: job.request.steps };
        self.queue.insert(queue_key(job), id);
        remove_active(&mut self.active, node, id);
    }

    fn cancel(&mut self, at: u64, id: JobId) -> Response {
        let Some(job) = self.jobs.get_mut(&id) else { return Response::Rejected(Rejection::UnknownJob) };
        match job.state {
            JobState::Cancelled => return Response::Ok,
            state if state.is_terminal() => return Response::Rejected(Rejection::NotCancellable { state }),
            JobState::Queued => {
                self.queue.remove(&queue_key(job));
            }
            _ => {}
        }
        job.push_event(at, EventKind::Cancelled);
        self.finish(at, id, JobState::Cancelled, None, None);
        Response::Ok
    }

    /// Records one webhook delivery try. Tries are numbered: the next one must
    /// be `recorded + 1`; an earlier number is a record retried after its first
    /// commit (or the same try made by two leaders across a change), and is
    /// acknowledged without being recorded twice. Once the job is delivered or
    /// gave up, further records are acknowledged and ignored.
    fn webhook_delivery(&mut self, id: JobId, delivery: &Delivery, max_attempts: u32) -> Response {
        let Some(job) = self.jobs.get_mut(&id) else { return Response::Rejected(Rejection::UnknownJob) };
        let invalid = |msg: String| Response::Rejected(Rejection::Invalid(FieldError::new("webhook", msg)));
        let state = job.state;
        let Some(webhook) = job.webhook.as_mut() else { return invalid("the job has no webhook".into()) };
        if !state.is_terminal() {
            return invalid(format!("the job is {}; its webhook is not due", state.as_str()));
        }
        let recorded = webhook.deliveries.len() as u32;
        if !webhook.is_open() || (1..=recorded).contains(&delivery.attempt) {
            return Response::Ok;
        }
        if delivery.attempt != recorded + 1 {
            return invalid(format!("try {} does not follow try {recorded}", delivery.attempt));
        }
        let delivery = Delivery {
            error: delivery.error.as_ref().map(|e| e.chars().take(MAX_DELIVERY_ERROR_CHARS).collect()),
            ..delivery.clone()
        };
        webhook.delivered = delivery.succeeded();
        webhook.deliveries.push(delivery);
        let max_attempts = max_attempts.clamp(1, MAX_WEBHOOK_ATTEMPTS);
        webhook.gave_up = !webhook.delivered && webhook.deliveries.len() as u32 >= max_attempts;
        if !webhook.is_open() {
            self.webhooks_pending.remove(&id);
        }
        Response::Ok
    }

    /// Moves a queued or active job to a terminal state and applies retention.
    /// A succeeded job keeps `result`: the image's hash, with where its bytes
    /// are (a fresh result) or `None` (a cache hit: the image is stored).
    fn finish(
        &mut self,
        at: u64,
        id: JobId,
        state: JobState,
        error: Option<String>,
        result: Option<(ResultHash, Option<&ResultMeta>)>,
    ) {
        let job = self.jobs.get_mut(&id).expect("finish of a known job");
        if job.state.is_active() {
            let node = job.node.expect("active jobs have a node");
            remove_active(&mut self.active, node, id);
        }
        job.state = state;
        job.error = error;
        job.finished_at_ms = Some(at);
        let counts = self.counts.entry(job.request.model.clone()).or_default();
        match state {
            JobState::Succeeded => counts.succeeded += 1,
            JobState::Failed => counts.failed += 1,
            JobState::Cancelled => counts.cancelled += 1,
            _ => unreachable!("finish to a terminal state"),
        }
        let seq = self.next_finish_seq;
        self.next_finish_seq += 1;
        self.finished.insert(seq, id);
        if job.webhook.is_some() {
            self.webhooks_pending.insert(id);
        }
        if let Some((sha, meta)) = result {
            self.result_bytes += job.result.map_or(0, |r| r.bytes);
            self.images.insert(id, sha);
            self.image_order.insert(seq, id);
            self.cache.remember(job);
            self.keep_blob(sha, meta);
        }
        self.enforce_retention(at);
    }

    /// One more retained result names `sha`; `meta`: a fresh result's
    /// metadata (where its bytes are), `None` for a cache hit on a stored one.
    fn keep_blob(&mut self, sha: ResultHash, meta: Option<&ResultMeta>) {
        let Some(meta) = meta else {
            self.blobs.get_mut(&sha).expect("a cache hit names a stored image").refs += 1;
            return;
        };
        let Some(blob) = self.blobs.get_mut(&sha) else {
            self.blobs.insert(sha, Blob { bytes: meta.bytes, location: meta.location.clone(), refs: 1 });
            return;
        };
        blob.refs += 1;
        // The same image again (a seeded re-run): keep one location.
        let unused = match (&mut blob.location, &meta.location) {
            (Location::Nodes(held), Location::Nodes(more)) => {
                let room = MAX_RESULT_HOLDERS.saturating_sub(held.len());
                held.extend(more.iter().filter(|n| !held.contains(n)).take(room).copied().collect::<Vec<_>>());
                None
            }
            // An object store outlives the nodes' copies (the nodes delete theirs).
            (loc @ Location::Nodes(_), Location::Object(key)) => {
                *loc = Location::Object(key.clone());
                None
            }
            (Location::Object(kept), Location::Object(key)) if kept != key => Some(key.clone()),
            (Location::Object(_), _) => None,
        };
        if let Some(key) = unused {
            self.queue_object_deletion(key);
        }
    }

    /// A retained result no longer names `sha`: the image leaves the state
    /// with the last one (an object-store key is queued for deletion; the
    /// nodes delete their copies, see `src/node/results/janitor.rs`).
    fn release_blob(&mut self, sha: ResultHash) {
        let Some(blob) = self.blobs.get_mut(&sha) else { return };
        blob.refs -= 1;
        if blob.refs == 0 {
            if let Some(Blob { location: Location::Object(key), .. }) = self.blobs.remove(&sha) {
                self.queue_object_deletion(key);
            }
        }
    }

    fn queue_object_deletion(&mut self, key: String) {
        self.object_deletions.insert(self.next_deletion_seq, key);
        self.next_deletion_seq += 1;
        while self.object_deletions.len() > MAX_OBJECT_DELETIONS {
            self.object_deletions.pop_first();
        }
    }

    /// Drops a retained result's image (retention), freeing its bytes.
    fn drop_image(&mut self, id: JobId) {
        if let Some(sha) = self.images.remove(&id) {
            self.result_bytes -= self.jobs[&id].result.map_or(0, |r| r.bytes);
            self.release_blob(sha);
        }
    }

    fn enforce_retention(&mut self, at: u64) {
        while self.image_order.len() as u64 > self.config.max_results
            || self.result_bytes > self.config.max_result_bytes
        {
            let Some((_, id)) = self.image_order.pop_first() else { break };
            self.drop_image(id);
            let job = self.jobs.get_mut(&id).expect("images belong to known jobs");
            self.cache.forget(job);
            job.result_evicted = true;
            job.push_event(at, EventKind::ResultEvicted);
        }
        while self.finished.len() as u64 > self.config.max_finished_jobs {
            let Some((seq, id)) = self.finished.pop_first() else { break };
            if self.image_order.remove(&seq).is_some() {
                self.drop_image(id);
            }
            let job = self.jobs.remove(&id).expect("finished jobs are known");
            self.cache.forget(&job);
            self.by_seq.remove(&job.seq);
            if let Some(key) = &job.idempotency_key {
                self.idempotency.remove(key);
            }
            self.webhooks_pending.remove(&id);
        }
    }

    // ---- Queries (pure reads) ----

    pub fn job(&self, id: &JobId) -> Option<&Job> {
        self.jobs.get(id)
    }

    /// A retained result's image: its hash and where its bytes are.
    pub fn image(&self, id: &JobId) -> Option<(ResultHash, &Location)> {
        let sha = self.images.get(id)?;
        Some((*sha, &self.blobs[sha].location))
    }

    /// Every stored image, in hash order.
    pub fn blobs(&self) -> impl Iterator<Item = (&ResultHash, &Blob)> {
        self.blobs.iter()
    }

    pub fn blob(&self, sha: &ResultHash) -> Option<&Blob> {
        self.blobs.get(sha)
    }

    /// Since when (the leader's clock) `node` is declared lost, if it is.
    pub fn lost_since(&self, node: NodeId) -> Option<u64> {
        self.lost.get(&node).copied()
    }

    pub fn lost_nodes(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.lost.keys().copied()
    }

    /// Whether `node` is leaving (its copies are being handed over).
    pub fn is_retiring(&self, node: NodeId) -> bool {
        self.retiring.contains(&node)
    }

    /// Object-store keys queued for deletion, oldest first, with their position.
    pub fn object_deletions(&self) -> impl Iterator<Item = (u64, &str)> {
        self.object_deletions.iter().map(|(s, k)| (*s, k.as_str()))
    }

    /// Retained results.
    pub fn result_count(&self) -> usize {
        self.images.len()
    }

    /// Newest first, optionally only one state, at most `limit`.
    pub fn recent_jobs(&self, state: Option<JobState>, limit: usize) -> Vec<&Job> {
        self.by_seq
            .values()
            .rev()
            .map(|id| &self.jobs[id])
            .filter(|j| state.is_none_or(|s| j.state == s))
            .take(limit)
            .collect()
    }

    pub fn job_count(&self) -> usize {
        self.jobs.len()
    }

    pub fn queue_depth(&self) -> usize {
        self.queue.len()
    }

    /// Queued jobs per priority.
    pub fn queue_depth_by_priority(&self) -> BTreeMap<i32, u64> {
        let mut depth = BTreeMap::new();
        for (neg_priority, _) in self.queue.keys() {
            *depth.entry((-neg_priority) as i32).or_default() += 1;
        }
        depth
    }

    /// Jobs created and finished per model since the cluster began (see [`JobCounts`]).
    pub fn counts(&self) -> &BTreeMap<String, JobCounts> {
        &self.counts
    }

    /// The position the next job to finish will take in the finish order.
    pub fn next_finish_seq(&self) -> u64 {
        self.next_finish_seq
    }

    /// Jobs that finished at or after position `seq` of the finish order (and
    /// are still retained), in the order they finished.
    pub fn finished_since(&self, seq: u64) -> impl Iterator<Item = &Job> {
        self.finished.range(seq..).map(|(_, id)| &self.jobs[id])
    }

    /// Queued jobs in scheduling order (highest priority, then oldest, first).
    pub fn queued(&self) -> impl Iterator<Item = &Job> {
        self.queue.values().map(|id| &self.jobs[id])
    }

    /// Assigned or running jobs of one node.
    pub fn active_on(&self, node: NodeId) -> impl Iterator<Item = &Job> {
        self.active.get(&node).into_iter().flatten().map(|id| &self.jobs[id])
    }

    pub fn active_count(&self, node: NodeId) -> usize {
        self.active.get(&node).map_or(0, BTreeSet::len)
    }

    /// Nodes that hold active jobs (whether or not still registered).
    pub fn nodes_with_active_jobs(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.active.iter().filter(|(_, s)| !s.is_empty()).map(|(n, _)| *n)
    }

    pub fn nodes(&self) -> &BTreeMap<NodeId, NodeInfo> {
        &self.nodes
    }

    /// Finished jobs whose webhook is still owed (neither delivered nor given
    /// up), by job id.
    pub fn webhooks_pending(&self) -> impl Iterator<Item = &Job> {
        self.webhooks_pending.iter().map(|id| &self.jobs[id])
    }

    pub fn result_bytes(&self) -> u64 {
        self.result_bytes
    }

    /// Checks every structural invariant; tests call it after each step, and the
    /// storage layer after loading a snapshot.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut queued = 0;
        let mut active = 0;
        let mut terminal = 0;
        for (id, job) in &self.jobs {
            if job.id != *id {
                return Err(format!("{id}: keyed under another id"));
            }
            if self.by_seq.get(&job.seq) != Some(id) {
                return Err(format!("{id}: missing from the submission index"));
            }
            let in_queue = self.queue.get(&queue_key(job)) == Some(id);
            let in_active = self.active.values().filter(|s| s.contains(id)).count();
            let assigned_events =
                job.history.iter().filter(|e| matches!(e.kind, EventKind::Assigned { .. })).count() as u32;
            if assigned_events != job.attempt {
                return Err(format!("{id}: attempt {} but {assigned_events} assignments", job.attempt));
            }
            // A job succeeds by running or by being answered from the cache.
            let successes = job
                .history
                .iter()
                .filter(|e| matches!(e.kind, EventKind::Succeeded { .. } | EventKind::CacheHit { .. }))
                .count();
            match job.state {
                JobState::Queued => {
                    queued += 1;
                    if !in_queue || in_active != 0 || job.node.is_some() {
                        return Err(format!("{id}: queued but queue={in_queue} active={in_active}"));
                    }
                }
                JobState::Assigned | JobState::Running => {
                    active += 1;
                    let node = job.node.ok_or_else(|| format!("{id}: active without node"))?;
                    if in_queue || in_active != 1 || !self.active[&node].contains(id) {
                        return Err(format!("{id}: active but queue={in_queue} active={in_active}"));
                    }
                    if job.attempt == 0 {
                        return Err(format!("{id}: active with attempt 0"));
                    }
                }
                state => {
                    terminal += 1;
                    if in_queue || in_active != 0 {
                        return Err(format!("{id}: terminal but queue={in_queue} active={in_active}"));
                    }
                    let has_image = self.images.contains_key(id);
                    if state == JobState::Succeeded {
                        if successes != 1 {
                            return Err(format!("{id}: succeeded with {successes} success events"));
                        }
                        if has_image == job.result_evicted {
                            return Err(format!("{id}: image present={has_image} evicted={}", job.result_evicted));
                        }
                        let Some(result) = &job.result else { return Err(format!("{id}: succeeded without a result")) };
                        if has_image && self.images[id] != result.sha256 {
                            return Err(format!("{id}: its image is not its result's"));
                        }
                    } else if has_image || successes != 0 || job.result.is_some() {
                        return Err(format!("{id}: {state:?} with a result"));
                    }
                }
            }
            if job.state != JobState::Succeeded && successes != 0 {
                return Err(format!("{id}: success event but state {:?}", job.state));
            }
        }
        if queued != self.queue.len() || self.by_seq.len() != self.jobs.len() {
            return Err("queue or submission index holds unknown jobs".into());
        }
        if active != self.active.values().map(BTreeSet::len).sum::<usize>() {
            return Err("active index holds unknown jobs".into());
        }
        if terminal != self.finished.len() {
            return Err(format!("{terminal} terminal jobs but {} in finish order", self.finished.len()));
        }
        let bytes: u64 = self.images.keys().map(|id| self.jobs[id].result.map_or(0, |r| r.bytes)).sum();
        if bytes != self.result_bytes || self.images.len() != self.image_order.len() {
            return Err("image accounting is off".into());
        }
        if self.image_order.values().any(|id| !self.images.contains_key(id)) {
            return Err("the retention order names a job without an image".into());
        }
        self.check_blobs()?;
        if self.image_order.len() as u64 > self.config.max_results || bytes > self.config.max_result_bytes {
            return Err("result retention exceeded".into());
        }
        if self.finished.len() as u64 > self.config.max_finished_jobs {
            return Err("finished-job retention exceeded".into());
        }
        for (key, id) in &self.idempotency {
            if self.jobs.get(id).and_then(|j| j.idempotency_key.as_deref()) != Some(key.as_str()) {
                return Err(format!("idempotency key {key} points at the wrong job"));
            }
        }
        let keyed = self.jobs.values().filter(|j| j.idempotency_key.is_some()).count();
        if keyed != self.idempotency.len() {
            return Err("a job's idempotency key is not indexed".into());
        }
        // Every created job is either still unfinished (never forgotten) or
        // counted once in a terminal state.
        let mut unfinished: BTreeMap<&str, u64> = BTreeMap::new();
        for job in self.jobs.values().filter(|j| !j.state.is_terminal()) {
            *unfinished.entry(job.request.model.as_str()).or_default() += 1;
        }
        for (model, c) in &self.counts {
            let open = unfinished.remove(model.as_str()).unwrap_or(0);
            if c.submitted != c.succeeded + c.failed + c.cancelled + open {
                return Err(format!("model {model}: {c:?} but {open} unfinished jobs"));
            }
        }
        if let Some(model) = unfinished.keys().next() {
            return Err(format!("model {model} has unfinished jobs but no counts"));
        }
        self.check_webhooks()?;
        self.check_cache()?;
        Ok(())
    }

    /// Every image a retained result names is stored once, counted once per
    /// result, located within bounds; nothing else is stored; queued object
    /// deletions name no stored image.
    fn check_blobs(&self) -> Result<(), String> {
        let mut refs: BTreeMap<ResultHash, u32> = BTreeMap::new();
        for sha in self.images.values() {
            *refs.entry(*sha).or_default() += 1;
        }
        if refs.len() != self.blobs.len() {
            return Err(format!("{} images named but {} stored", refs.len(), self.blobs.len()));
        }
        for (sha, blob) in &self.blobs {
            if refs.get(sha) != Some(&blob.refs) {
                return Err(format!("{sha}: {} references counted, {:?} found", blob.refs, refs.get(sha)));
            }
            match &blob.location {
                Location::Nodes(h) if h.len() > MAX_RESULT_HOLDERS => {
                    return Err(format!("{sha}: {} holders", h.len()));
                }
                Location::Object(k) if self.object_deletions.values().any(|d| d == k) => {
                    return Err(format!("{sha}: its key {k} is queued for deletion"));
                }
                _ => {}
            }
        }
        if self.object_deletions.len() > MAX_OBJECT_DELETIONS {
            return Err("object deletion queue exceeds its bound".into());
        }
        Ok(())
    }

    /// Every cache entry names a succeeded job with a stored image that
    /// answers the entry's key, and every such job's key has an entry (the
    /// newest result of a key is the last one evicted).
    fn check_cache(&self) -> Result<(), String> {
        for (key, id) in self.cache.iter() {
            let job = self.jobs.get(id).ok_or_else(|| format!("cache entry for unknown job {id}"))?;
            if job.state != JobState::Succeeded || !self.images.contains_key(id) {
                return Err(format!("{id}: cached but {:?} with image={}", job.state, self.images.contains_key(id)));
            }
            if cache::job_key(job).as_ref() != Some(key) {
                return Err(format!("{id}: cached under a key it does not answer"));
            }
        }
        for id in self.images.keys() {
            if let Some(key) = cache::job_key(&self.jobs[id]) {
                if self.cache.get(&key).is_none() {
                    return Err(format!("{id}: a stored fixed-seed result is not in the cache"));
                }
            }
        }
        Ok(())
    }
}

impl JobStateMachine {
    /// Webhook records are numbered and bounded, and the pending index holds
    /// exactly the finished jobs whose webhook is still owed.
    fn check_webhooks(&self) -> Result<(), String> {
        let mut pending = 0;
        for (id, job) in &self.jobs {
            if job.webhook.is_some() != job.request.webhook.is_some() {
                return Err(format!(
                    "{id}: webhook status present={} but url present={}",
                    job.webhook.is_some(),
                    job.request.webhook.is_some()
                ));
            }
            let Some(w) = &job.webhook else { continue };
            let owed = job.state.is_terminal() && w.is_open();
            if owed != self.webhooks_pending.contains(id) {
                return Err(format!("{id}: webhook owed={owed} but pending index disagrees"));
            }
            pending += owed as usize;
            if !job.state.is_terminal() && (!w.deliveries.is_empty() || !w.is_open()) {
                return Err(format!("{id}: {:?} with webhook deliveries", job.state));
            }
            if w.deliveries.len() as u32 > MAX_WEBHOOK_ATTEMPTS || (w.delivered && w.gave_up) {
                return Err(format!(
                    "{id}: {} webhook deliveries, delivered={} gave_up={}",
                    w.deliveries.len(),
                    w.delivered,
                    w.gave_up
                ));
            }
            for (n, d) in w.deliveries.iter().enumerate() {
                if d.attempt as usize != n + 1 {
                    return Err(format!("{id}: webhook try {} recorded in place {}", d.attempt, n + 1));
                }
                let last = n + 1 == w.deliveries.len();
                if d.succeeded() != (last && w.delivered) {
                    return Err(format!(
                        "{id}: webhook try {} succeeded={} but delivered={}",
                        d.attempt,
                        d.succeeded(),
                        w.delivered
                    ));
                }
            }
        }
        if pending != self.webhooks_pending.len() {
            return Err("the webhook pending index holds unknown or finished jobs".into());
        }
        Ok(())
    }
}

fn queue_key(job: &Job) -> (i64, u64) {
    (-(job.request.priority as i64), job.seq)
}

fn remove_active(active: &mut BTreeMap<NodeId, BTreeSet<JobId>>, node: NodeId, id: JobId) {
    if let Some(set) = active.get_mut(&node) {
        set.remove(&id);
        if set.is_empty() {
            active.remove(&node);
        }
    }
}
