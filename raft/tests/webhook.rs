//! Webhook delivery records in the state machine: validation of the URL, the
//! pending index (which jobs still owe their receiver a POST), recorded tries,
//! giving up after the maximum, idempotent and stale records, retention and
//! snapshots. `check_invariants` runs after every apply.

use raftgen_raft::codec;
use raftgen_raft::command::{
    Assignment, ClusterConfig, Command, ModelInfo, NodeRegistration, Outcome, Rejection, Request, Response,
};
use raftgen_raft::job::{
    Delivery, FieldError, JobId, JobRequest, JobState, WebhookStatus, MAX_DELIVERY_ERROR_CHARS, MAX_WEBHOOK_ATTEMPTS,
    MAX_WEBHOOK_URL_BYTES,
};
use raftgen_raft::state::JobStateMachine;

const URL: &str = "http://127.0.0.1:9/hook";

fn request(webhook: Option<&str>) -> JobRequest {
    JobRequest {
        prompt: "a lighthouse".into(),
        negative_prompt: String::new(),
        width: 64,
        height: 64,
        steps: 4,
        guidance: 7.5,
        seed: Some(1),
        model: "m".into(),
        priority: 0,
        sampler: None,
        cache: true,
        webhook: webhook.map(str::to_string),
    }
}

struct Harness {
    sm: JobStateMachine,
    index: u64,
}

impl Harness {
    fn new(config: ClusterConfig) -> Self {
        let mut h = Harness { sm: JobStateMachine::new(config), index: 0 };
        let info = NodeRegistration {
            slots: 8,
            models: vec![ModelInfo { name: "m".into(), ..Default::default() }],
            loaded_models: Vec::new(),
            executor: "test-pattern".into(),
            refused_models: Vec::new(),
        };
        assert_eq!(h.apply(Command::RegisterNode { node: 1, info }), Response::Ok);
        h
    }

    fn apply(&mut self, cmd: Command) -> Response {
        self.index += 1;
        let resp = self.sm.apply(self.index, &Request { at_ms: 10_000 + self.index, cmd });
        if let Err(e) = self.sm.check_invariants() {
            panic!("invariants broken after index {}: {e}", self.index);
        }
        resp
    }

    fn submit(&mut self, id: u128, webhook: Option<&str>) -> JobId {
        let cmd = Command::Submit { id: JobId(id), request: request(webhook), seed: Some(1), idempotency_key: None };
        match self.apply(cmd) {
            Response::Submitted { created: true, .. } => JobId(id),
            other => panic!("submit {id}: {other:?}"),
        }
    }

    fn run(&mut self, job: JobId) {
        let resp = self.apply(Command::Assign { assignments: vec![Assignment { job, node: 1, attempt: 1 }] });
        assert_eq!(resp, Response::Applied { count: 1 });
        assert_eq!(self.apply(Command::Start { job, node: 1, attempt: 1 }), Response::Ok);
    }

    fn succeed(&mut self, job: JobId) {
        self.run(job);
        let outcome = Outcome::Succeeded { result: meta(), model_hash: "h".into(), notes: Vec::new() };
        assert_eq!(self.apply(Command::Complete { job, node: 1, attempt: 1, outcome }), Response::Ok);
    }

    fn record(&mut self, job: JobId, attempt: u32, status: Option<u16>, max_attempts: u32) -> Response {
        let error = status.is_none().then(|| "connection refused".to_string());
        let delivery = Delivery { attempt, at_ms: 50_000 + attempt as u64, node: 1, status, error, took_ms: 3 };
        self.apply(Command::WebhookDelivery { job, delivery, max_attempts })
    }

    fn webhook(&self, job: JobId) -> WebhookStatus {
        self.sm.job(&job).expect("known job").webhook.clone().expect("job has a webhook")
    }

    fn pending(&self) -> Vec<JobId> {
        self.sm.webhooks_pending().map(|j| j.id).collect()
    }
}

fn invalid_webhook(resp: Response) -> String {
    match resp {
        Response::Rejected(Rejection::Invalid(FieldError { field, message })) if field == "webhook" => message,
        other => panic!("expected a rejection naming webhook, got {other:?}"),
    }
}

#[test]
fn webhook_urls_are_validated_naming_the_field() {
    let long = format!("http://example.com/{}", "a".repeat(MAX_WEBHOOK_URL_BYTES));
    for bad in [
        "",
        "/relative/path",
        "example.com/hook",
        "ftp://example.com/hook",
        "http://",
        "http:///path",
        "http://user:pw@example.com/hook",
        "http://token@example.com/hook",
        "http://exa mple.com/hook",
        "http://example.com/ho\nok",
        "http://example.com/\u{e9}",
        "http://example.com:0/",
        "http://example.com:99999/",
        "http://example.com:port/",
        "http://[::1/hook",
        "http://[::1]x/hook",
        "http://exa\\mple.com/",
        long.as_str(),
    ] {
        let err = request(Some(bad)).validate().expect_err(bad);
        assert_eq!(err.field, "webhook", "{bad}: {err}");
    }
    for good in [
        URL,
        "https://example.com",
        "HTTPS://Example.COM:8443/a/b?c=d&e=f#frag",
        "http://[::1]:8080/hook",
        "http://[::1]/hook",
        "http://hooks.example.com?x=1",
    ] {
        assert_eq!(request(Some(good)).validate(), Ok(()), "{good}");
    }
    // The state machine refuses it too, whoever proposed it.
    let mut h = Harness::new(ClusterConfig::default());
    let cmd =
        Command::Submit { id: JobId(1), request: request(Some("ftp://x/")), seed: Some(1), idempotency_key: None };
    invalid_webhook(h.apply(cmd));
    assert_eq!(h.sm.job_count(), 0);
}

#[test]
fn a_job_owes_its_webhook_only_once_it_has_ended() {
    let mut h = Harness::new(ClusterConfig::default());
    let plain = h.submit(1, None);
    let hooked = h.submit(2, Some(URL));
    assert_eq!(h.sm.job(&plain).unwrap().webhook, None);
    assert_eq!(h.webhook(hooked), WebhookStatus::default());
    assert!(h.pending().is_empty(), "queued jobs owe nothing");
    h.run(hooked);
    assert!(h.pending().is_empty(), "running jobs owe nothing");
    // A try for a job that has not ended is refused.
    let msg = invalid_webhook(h.record(hooked, 1, Some(200), 8));
    assert!(msg.contains("running"), "{msg}");
    let outcome = Outcome::Succeeded { result: meta(), model_hash: "h".into(), notes: Vec::new() };
    assert_eq!(h.apply(Command::Complete { job: hooked, node: 1, attempt: 1, outcome }), Response::Ok);
    assert_eq!(h.pending(), vec![hooked]);
    h.succeed(plain);
    assert_eq!(h.pending(), vec![hooked], "a job without a webhook is never pending");
    // Failed and cancelled jobs owe theirs too.
    let failed = h.submit(3, Some(URL));
    h.run(failed);
    let outcome = Outcome::Failed { error: "boom".into(), retryable: false };
    assert_eq!(h.apply(Command::Complete { job: failed, node: 1, attempt: 1, outcome }), Response::Ok);
    let cancelled = h.submit(4, Some(URL));
    assert_eq!(h.apply(Command::Cancel { job: cancelled }), Response::Ok);
    assert_eq!(h.pending(), vec![hooked, failed, cancelled]);
    assert_eq!(h.sm.job(&failed).unwrap().state, JobState::Failed);
}

#[test]
fn a_failed_try_keeps_the_job_pending_and_a_2xx_delivers_it() {
    let mut h = Harness::new(ClusterConfig::default());
    let job = h.submit(1, Some(URL));
    h.succeed(job);
    assert_eq!(h.record(job, 1, Some(500), 8), Response::Ok);
    assert_eq!(h.record(job, 2, None, 8), Response::Ok);
    let w = h.webhook(job);
    assert_eq!(w.deliveries.len(), 2);
    assert!(!w.delivered && !w.gave_up);
    assert_eq!(w.deliveries[0].status, Some(500));
    assert_eq!(w.deliveries[1].error.as_deref(), Some("connection refused"));
    assert_eq!(h.pending(), vec![job]);
    assert_eq!(h.record(job, 3, Some(204), 8), Response::Ok);
    let w = h.webhook(job);
    assert!(w.delivered && !w.gave_up);
    assert_eq!(w.deliveries.iter().map(|d| d.attempt).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(
        w.deliveries[2],
        Delivery { attempt: 3, at_ms: 50_003, node: 1, status: Some(204), error: None, took_ms: 3 }
    );
    assert!(h.pending().is_empty());
    // Later records (another leader's duplicate try) change nothing.
    assert_eq!(h.record(job, 4, Some(200), 8), Response::Ok);
    assert_eq!(h.webhook(job), w);
}

#[test]
fn only_2xx_statuses_deliver() {
    let mut h = Harness::new(ClusterConfig::default());
    let job = h.submit(1, Some(URL));
    h.succeed(job);
    for (attempt, status) in [(1, 199), (2, 300), (3, 302), (4, 404), (5, 503)] {
        assert_eq!(h.record(job, attempt, Some(status), 32), Response::Ok);
        assert!(!h.webhook(job).delivered, "status {status} delivered");
    }
    assert_eq!(h.record(job, 6, Some(299), 32), Response::Ok);
    assert!(h.webhook(job).delivered);
}

#[test]
fn the_job_gives_up_after_the_maximum_tries() {
    let mut h = Harness::new(ClusterConfig::default());
    let job = h.submit(1, Some(URL));
    h.succeed(job);
    for attempt in 1..=3 {
        assert_eq!(h.pending(), vec![job]);
        assert_eq!(h.record(job, attempt, Some(500), 3), Response::Ok);
    }
    let w = h.webhook(job);
    assert!(w.gave_up && !w.delivered);
    assert_eq!(w.deliveries.len(), 3);
    assert!(h.pending().is_empty());
    // A late success of a 4th try is not recorded: the job gave up.
    assert_eq!(h.record(job, 4, Some(200), 3), Response::Ok);
    assert_eq!(h.webhook(job), w);
}

#[test]
fn the_maximum_is_clamped() {
    let mut h = Harness::new(ClusterConfig::default());
    // Zero means one try.
    let one = h.submit(1, Some(URL));
    h.succeed(one);
    assert_eq!(h.record(one, 1, None, 0), Response::Ok);
    assert!(h.webhook(one).gave_up);
    // However large the node's setting, at most MAX_WEBHOOK_ATTEMPTS are kept.
    let many = h.submit(2, Some(URL));
    h.succeed(many);
    for attempt in 1..=MAX_WEBHOOK_ATTEMPTS {
        assert!(!h.webhook(many).gave_up, "gave up before try {attempt}");
        assert_eq!(h.record(many, attempt, Some(500), u32::MAX), Response::Ok);
    }
    let w = h.webhook(many);
    assert!(w.gave_up);
    assert_eq!(w.deliveries.len() as u32, MAX_WEBHOOK_ATTEMPTS);
}

#[test]
fn a_retried_record_is_recorded_once_and_out_of_order_tries_are_refused() {
    let mut h = Harness::new(ClusterConfig::default());
    let job = h.submit(1, Some(URL));
    h.succeed(job);
    assert_eq!(h.record(job, 1, Some(500), 8), Response::Ok);
    // The same record again (a forward retried after its first commit, or the
    // same try made by the next leader): acknowledged, not recorded twice.
    assert_eq!(h.record(job, 1, Some(200), 8), Response::Ok);
    let w = h.webhook(job);
    assert_eq!(w.deliveries.len(), 1);
    assert!(!w.delivered);
    let msg = invalid_webhook(h.record(job, 3, Some(200), 8));
    assert!(msg.contains("try 3"), "{msg}");
    invalid_webhook(h.record(job, 0, Some(200), 8));
    assert_eq!(h.webhook(job).deliveries.len(), 1);
}

#[test]
fn records_for_unknown_jobs_or_jobs_without_a_webhook_are_refused() {
    let mut h = Harness::new(ClusterConfig::default());
    assert_eq!(h.record(JobId(99), 1, Some(200), 8), Response::Rejected(Rejection::UnknownJob));
    let plain = h.submit(1, None);
    h.succeed(plain);
    let msg = invalid_webhook(h.record(plain, 1, Some(200), 8));
    assert!(msg.contains("no webhook"), "{msg}");
    assert_eq!(h.sm.job(&plain).unwrap().webhook, None);
}

#[test]
fn delivery_errors_are_bounded() {
    let mut h = Harness::new(ClusterConfig::default());
    let job = h.submit(1, Some(URL));
    h.succeed(job);
    let delivery =
        Delivery { attempt: 1, at_ms: 1, node: 1, status: None, error: Some("é".repeat(10_000)), took_ms: 0 };
    assert_eq!(h.apply(Command::WebhookDelivery { job, delivery, max_attempts: 8 }), Response::Ok);
    let error = h.webhook(job).deliveries[0].error.clone().unwrap();
    assert_eq!(error.chars().count(), MAX_DELIVERY_ERROR_CHARS);
}

#[test]
fn retention_forgets_a_pending_webhook_with_its_job() {
    let mut h = Harness::new(ClusterConfig { max_finished_jobs: 1, ..Default::default() });
    let first = h.submit(1, Some(URL));
    let second = h.submit(2, Some(URL));
    h.succeed(first);
    assert_eq!(h.pending(), vec![first]);
    h.run(second);
    let outcome = Outcome::Failed { error: "boom".into(), retryable: false };
    assert_eq!(h.apply(Command::Complete { job: second, node: 1, attempt: 1, outcome }), Response::Ok);
    assert!(h.sm.job(&first).is_none(), "the oldest finished job is forgotten");
    assert_eq!(h.pending(), vec![second]);
    assert_eq!(h.record(first, 1, Some(200), 8), Response::Rejected(Rejection::UnknownJob));
    assert_eq!(h.apply(Command::Configure(ClusterConfig { max_finished_jobs: 0, ..Default::default() })), Response::Ok);
    assert!(h.pending().is_empty());
}

#[test]
fn snapshots_and_replays_keep_the_pending_index() {
    let mut h = Harness::new(ClusterConfig::default());
    let mut log = Vec::new();
    let delivered = h.submit(1, Some(URL));
    let owed = h.submit(2, Some(URL));
    h.submit(3, Some(URL));
    h.succeed(delivered);
    h.succeed(owed);
    h.record(delivered, 1, Some(200), 8);
    h.record(owed, 1, Some(500), 8);
    assert_eq!(h.pending(), vec![owed]);
    let bytes = codec::encode(&h.sm).unwrap();
    let restored: JobStateMachine = codec::decode(&bytes).unwrap();
    restored.check_invariants().unwrap();
    assert_eq!(restored, h.sm);
    assert_eq!(restored.webhooks_pending().map(|j| j.id).collect::<Vec<_>>(), vec![owed]);

    // The same commands on a fresh replica reach the same bytes.
    let mut a = Harness::new(ClusterConfig::default());
    let mut b = Harness::new(ClusterConfig::default());
    for h in [&mut a, &mut b] {
        let job = h.submit(5, Some(URL));
        h.succeed(job);
        log.push(h.record(job, 1, None, 2));
        log.push(h.record(job, 2, Some(503), 2));
        assert!(h.webhook(job).gave_up);
    }
    assert_eq!(codec::encode(&a.sm).unwrap(), codec::encode(&b.sm).unwrap());
    assert!(log.iter().all(|r| *r == Response::Ok));
}

/// Random interleavings of submissions (with and without a webhook), runs,
/// cancellations, retention changes and delivery records (in order, repeated,
/// out of order, for unknown jobs): the invariants hold after every step, and
/// a replica replaying the same log reaches the same bytes.
#[test]
fn random_histories_keep_the_webhook_invariants() {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    // (pending, recorded tries, delivered, gave up) over all seeds: the
    // generator must reach every case, or the test proves little.
    let mut stats = (0, 0, 0, 0);
    for seed in 0..150 {
        let mut rng = StdRng::seed_from_u64(seed);
        let config = ClusterConfig { max_finished_jobs: rng.gen_range(0..12), ..Default::default() };
        let mut h = Harness::new(config);
        let mut log = Vec::new();
        let mut next = 1u128;
        for _ in 0..150 {
            // Mostly the newest jobs, so runs and deliveries find live ones.
            let id = JobId(rng.gen_range(next.saturating_sub(4).max(1)..=next + 1));
            let job = h.sm.job(&id).cloned();
            let cmd = match rng.gen_range(0..8) {
                0 | 1 => {
                    next += 1;
                    let webhook = rng.gen_bool(0.7).then_some(URL);
                    Command::Submit { id: JobId(next), request: request(webhook), seed: Some(1), idempotency_key: None }
                }
                2 => {
                    let attempt = job.map_or(1, |j| j.attempt + 1);
                    Command::Assign { assignments: vec![Assignment { job: id, node: 1, attempt }] }
                }
                3 => {
                    let attempt = job.map_or(1, |j| j.attempt);
                    let outcome = if rng.gen_bool(0.5) {
                        Outcome::Succeeded { result: meta(), model_hash: "h".into(), notes: Vec::new() }
                    } else {
                        Outcome::Failed { error: "boom".into(), retryable: false }
                    };
                    Command::Complete { job: id, node: 1, attempt, outcome }
                }
                4 => Command::Cancel { job: id },
                5 if rng.gen_bool(0.1) => {
                    Command::Configure(ClusterConfig { max_finished_jobs: rng.gen_range(0..12), ..Default::default() })
                }
                _ => {
                    let recorded = job.and_then(|j| j.webhook).map_or(0, |w| w.deliveries.len() as u32);
                    let status = [None, Some(200), Some(204), Some(302), Some(500)][rng.gen_range(0..5)];
                    let delivery = Delivery {
                        attempt: rng.gen_range(0..=recorded + 2),
                        at_ms: rng.gen_range(0..1_000_000),
                        node: rng.gen_range(1..=3),
                        status,
                        error: status.is_none().then(|| "connection failed".into()),
                        took_ms: rng.gen_range(0..10_000),
                    };
                    Command::WebhookDelivery { job: id, delivery, max_attempts: rng.gen_range(0..=4) }
                }
            };
            log.push(cmd.clone());
            let tries = |h: &Harness, id: JobId| {
                h.sm.job(&id).and_then(|j| j.webhook.clone()).map_or(0, |w| w.deliveries.len())
            };
            let before = tries(&h, id);
            h.apply(cmd);
            stats.1 += tries(&h, id).saturating_sub(before);
        }
        let mut replica = Harness::new(config);
        for cmd in log {
            replica.apply(cmd);
        }
        assert_eq!(codec::encode(&replica.sm).unwrap(), codec::encode(&h.sm).unwrap(), "seed {seed}");
        stats.0 += h.pending().len();
        stats.2 += all_webhooks(&h).filter(|w| w.delivered).count();
        stats.3 += all_webhooks(&h).filter(|w| w.gave_up).count();
    }
    let (pending, recorded, delivered, gave_up) = stats;
    assert!(pending > 0 && recorded > 100 && delivered > 0 && gave_up > 0, "{stats:?}");
}

fn all_webhooks(h: &Harness) -> impl Iterator<Item = WebhookStatus> + '_ {
    h.sm.recent_jobs(None, usize::MAX).into_iter().filter_map(|j| j.webhook.clone())
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
