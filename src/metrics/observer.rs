//! Job timing histograms, observed on the node that ran the job.
//!
//! Why there: each job is then observed once in the whole cluster, so summing
//! a histogram over nodes gives cluster-wide numbers (and a quantile of the
//! sum is the cluster's), while each node's own shows how that node performs.
//! Why from the applied state: the times are the leader's clock stamped on the
//! log entries (`submitted_at_ms`, `started_at_ms`, `finished_at_ms`, the same
//! numbers `GET /v1/jobs/{id}` shows), so every timing is measured on one
//! clock, whichever node ran the job. `apply` itself stays pure: this task
//! only reads the state after it changed.
//!
//! - queue wait (submitted → started): once per attempt this node started,
//!   when the start shows in the applied state (or at the end, if the attempt
//!   started and ended between two looks);
//! - run time (started → finished), per model: attempts that this node ran
//!   to success or reported as failed;
//! - latency (submitted → succeeded): jobs that succeeded on this node.
//!
//! A restarted node observes only what starts or finishes after it restarts
//! (and after it has replayed its log).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use raftgen_raft::job::{EventKind, Job, JobId, JobState, NodeId};
use raftgen_raft::state::JobStateMachine;

use super::NodeMetrics;
use crate::node::app::App;

/// Longest wait for the replay after a restart before observing anyway.
const REPLAY_WAIT: Duration = Duration::from_secs(60);

/// What has been observed so far.
pub struct JobTimings {
    node: NodeId,
    /// Finished jobs before this position in the finish order are done with.
    next_finish_seq: u64,
    /// Running attempts on this node whose queue wait was observed.
    started: HashSet<(JobId, u32)>,
}

impl JobTimings {
    /// Starts from the present: jobs already running or finished are not observed.
    pub fn new(node: NodeId, sm: &JobStateMachine) -> Self {
        let started = sm.active_on(node).filter(|j| j.state == JobState::Running).map(|j| (j.id, j.attempt)).collect();
        JobTimings { node, next_finish_seq: sm.next_finish_seq(), started }
    }

    /// Observes what changed in `sm` since the last call.
    pub fn scan(&mut self, sm: &JobStateMachine, metrics: &NodeMetrics) {
        for job in sm.finished_since(self.next_finish_seq) {
            if job.node != Some(self.node) {
                continue;
            }
            let Some(started) = job.started_at_ms.filter(|_| self.started_here(job)) else { continue };
            if !self.started.remove(&(job.id, job.attempt)) {
                metrics.observe_queue_wait(seconds(job.submitted_at_ms, started));
            }
            let finished = job.finished_at_ms.unwrap_or(started);
            if self.ended_here(job) {
                metrics.observe_run(&job.request.model, seconds(started, finished));
            }
            if job.state == JobState::Succeeded {
                metrics.observe_latency(seconds(job.submitted_at_ms, finished));
            }
        }
        self.next_finish_seq = sm.next_finish_seq();
        let mut running = HashSet::new();
        for job in sm.active_on(self.node).filter(|j| j.state == JobState::Running) {
            let key = (job.id, job.attempt);
            running.insert(key);
            if self.started.insert(key) {
                let started = job.started_at_ms.unwrap_or(job.submitted_at_ms);
                metrics.observe_queue_wait(seconds(job.submitted_at_ms, started));
            }
        }
        self.started.retain(|k| running.contains(k));
    }

    /// Whether the job's last attempt was started on this node.
    fn started_here(&self, job: &Job) -> bool {
        job.history.iter().rev().find_map(|e| match e.kind {
            EventKind::Started { node, attempt } => Some(node == self.node && attempt == job.attempt),
            _ => None,
        }) == Some(true)
    }

    /// Whether this node ended the job's last attempt itself (a success, or a
    /// failure it reported), rather than a cancel or the leader giving up.
    fn ended_here(&self, job: &Job) -> bool {
        job.history.iter().rev().any(|e| match &e.kind {
            EventKind::Succeeded { node, attempt } | EventKind::Failed { node: Some(node), attempt, .. } => {
                *node == self.node && *attempt == job.attempt
            }
            _ => false,
        })
    }
}

/// Seconds from one leader timestamp to a later one (0 if the clock of a new
/// leader was behind the old one's).
fn seconds(from_ms: u64, to_ms: u64) -> f64 {
    to_ms.saturating_sub(from_ms) as f64 / 1_000.0
}

/// Watches the applied state and observes job timings (see the module docs).
pub async fn run(app: Arc<App>) {
    let mut applied = app.view.subscribe();
    let mut shutdown = app.shutdown.clone();
    // After a restart openraft replays the log past the last snapshot: jobs
    // that finished before the restart would look new. Start from the state
    // that replay reaches (bounded, so a stuck replay does not silence us).
    let replayed = app.view.committed_index();
    tokio::select! {
        _ = tokio::time::timeout(REPLAY_WAIT, applied.wait_for(|i| *i >= replayed)) => {}
        _ = shutdown.changed() => return,
    }
    let mut timings = JobTimings::new(app.id, &app.view.read().jobs);
    loop {
        tokio::select! {
            changed = applied.changed() => if changed.is_err() { return },
            _ = shutdown.changed() => return,
        }
        timings.scan(&app.view.read().jobs, &app.metrics);
    }
}

#[cfg(test)]
mod tests {
    use raftgen_raft::command::{Assignment, ClusterConfig, Command, ModelInfo, NodeRegistration, Outcome, Request};
    use raftgen_raft::job::{JobId, JobRequest};

    use super::*;

    struct Log {
        sm: JobStateMachine,
        index: u64,
    }

    impl Log {
        fn apply(&mut self, at_ms: u64, cmd: Command) {
            self.index += 1;
            self.sm.apply(self.index, &Request { at_ms, cmd });
        }

        /// Assigns and starts the job's first attempt on `node`.
        fn start(&mut self, job: u128, node: NodeId, at_ms: u64) {
            let job = JobId(job);
            self.apply(at_ms, Command::Assign { assignments: vec![Assignment { job, node, attempt: 1 }] });
            self.apply(at_ms, Command::Start { job, node, attempt: 1 });
        }
    }

    fn submit(log: &mut Log, id: u128, at_ms: u64) {
        let request = JobRequest {
            prompt: "p".into(),
            negative_prompt: String::new(),
            width: 64,
            height: 64,
            steps: 1,
            guidance: 0.0,
            seed: Some(1),
            model: "m".into(),
            priority: 0,
            sampler: None,
            cache: true,
            webhook: None,
        };
        log.apply(at_ms, Command::Submit { id: JobId(id), request, seed: None, idempotency_key: None });
    }

    fn complete(log: &mut Log, id: u128, node: NodeId, at_ms: u64, ok: bool) {
        let outcome = if ok {
            let result = raftgen_raft::result::ResultMeta {
                sha256: raftgen_raft::result::ResultHash::of(&id.to_le_bytes()),
                bytes: 1,
                width: 8,
                height: 8,
                location: raftgen_raft::result::Location::Nodes([node].into()),
            };
            Outcome::Succeeded { result, model_hash: "h".into(), notes: Vec::new() }
        } else {
            Outcome::Failed { error: "boom".into(), retryable: false }
        };
        log.apply(at_ms, Command::Complete { job: JobId(id), node, attempt: 1, outcome });
    }

    #[test]
    fn each_job_is_observed_once_on_the_node_that_ran_it() {
        let mut log = Log { sm: JobStateMachine::new(ClusterConfig::default()), index: 0 };
        let model = ModelInfo { name: "m".into(), ..Default::default() };
        for node in [1, 2] {
            let info = NodeRegistration { slots: 4, models: vec![model.clone()], ..Default::default() };
            log.apply(0, Command::RegisterNode { node, info });
        }
        let (mine, theirs) = (NodeMetrics::default(), NodeMetrics::default());
        let mut on1 = JobTimings::new(1, &log.sm);
        let mut on2 = JobTimings::new(2, &log.sm);
        let scan = |log: &Log, on1: &mut JobTimings, on2: &mut JobTimings| {
            on1.scan(&log.sm, &mine);
            on2.scan(&log.sm, &theirs);
        };

        // Job 1 on node 1: queued 1 s, ran 2.5 s, succeeded; seen while running.
        submit(&mut log, 1, 10_000);
        log.start(1, 1, 11_000);
        scan(&log, &mut on1, &mut on2);
        scan(&log, &mut on1, &mut on2);
        complete(&mut log, 1, 1, 13_500, true);
        scan(&log, &mut on1, &mut on2);
        // Job 2 on node 1: started and failed between two looks.
        submit(&mut log, 2, 20_000);
        log.start(2, 1, 20_050);
        complete(&mut log, 2, 1, 20_300, false);
        // Job 3 on node 2, cancelled while running: queue wait only.
        submit(&mut log, 3, 30_000);
        log.start(3, 2, 30_200);
        log.apply(31_000, Command::Cancel { job: JobId(3) });
        scan(&log, &mut on1, &mut on2);

        let t = mine.timings.lock().unwrap();
        assert_eq!(t.queue_wait.count(), 2, "jobs 1 and 2, once each");
        assert_eq!(t.queue_wait.sum(), 1.0 + 0.05);
        let run = &t.run["m"];
        assert_eq!((run.count(), run.sum()), (2, 2.5 + 0.25));
        assert_eq!((t.latency.count(), t.latency.sum()), (1, 3.5), "only the success");
        let t = theirs.timings.lock().unwrap();
        assert_eq!((t.queue_wait.count(), t.queue_wait.sum()), (1, 0.2));
        assert!(t.run.is_empty() && t.latency.count() == 0, "a cancelled run is not a run time");
    }
}
