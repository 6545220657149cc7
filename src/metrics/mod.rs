//! `GET /metrics`: what an operator watches, in Prometheus text format.
//!
//! Every node serves it, without authentication (Prometheus scrapes each
//! node), so it carries no secret and no job content: only counts, times,
//! indexes, model names and this node's settings. Where each number comes
//! from decides what it means, so each family's HELP says it:
//!
//! - **cluster-wide** (the same on every node): job totals per model, counted
//!   by the state machine in `apply` and kept in the replicated state
//!   ([`raftgen_raft::state::JobCounts`]), so they survive restarts; queue
//!   depth, read from this node's applied state. Aggregate these with `max`,
//!   not `sum`.
//! - **this node**: job timing histograms, observed on the node that ran the
//!   job (see [`observer`]), so `sum` over nodes gives the cluster's; executor
//!   slots, images, model load times; this node's view of Raft; its disk.
//!
//! Most numbers are read when scraped from where they already live (the
//! applied state, openraft's metrics, sled, the executor); [`NodeMetrics`]
//! holds only what exists nowhere else. The text format is in [`exposition`].

pub mod exposition;
pub mod gpu;
pub mod histogram;
pub mod observer;
pub mod rate;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use exposition::{Exposition, Kind, Labels};
use histogram::{Histogram, JOB_SECONDS_BUCKETS};
use rate::RateWindow;

use crate::node::app::App;

/// Job timing histograms of this node (see [`observer`]).
pub struct Timings {
    pub queue_wait: Histogram,
    pub run: BTreeMap<String, Histogram>,
    pub latency: Histogram,
}

/// The instruments only this node keeps.
pub struct NodeMetrics {
    pub timings: Mutex<Timings>,
    /// Images this node's executor produced (successful outputs).
    images: AtomicU64,
    image_rate: RateWindow,
    /// Priorities ever queued while this node ran: their gauges stay, at 0
    /// when empty, instead of vanishing (0 is always there).
    priorities: Mutex<BTreeSet<i32>>,
    /// Bytes this node sent to other nodes: the bodies of its Raft RPCs and
    /// forwarded writes, and of its answers to theirs (shared with the Raft
    /// network and the forwarder, which count as they send).
    pub peer_sent_bytes: Arc<AtomicU64>,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        NodeMetrics {
            timings: Mutex::new(Timings {
                queue_wait: Histogram::new(JOB_SECONDS_BUCKETS),
                run: BTreeMap::new(),
                latency: Histogram::new(JOB_SECONDS_BUCKETS),
            }),
            images: AtomicU64::new(0),
            image_rate: RateWindow::default(),
            priorities: Mutex::new(BTreeSet::from([0])),
            peer_sent_bytes: Arc::default(),
        }
    }
}

impl NodeMetrics {
    fn timings(&self) -> std::sync::MutexGuard<'_, Timings> {
        self.timings.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn observe_queue_wait(&self, seconds: f64) {
        self.timings().queue_wait.observe(seconds);
    }

    pub fn observe_run(&self, model: &str, seconds: f64) {
        let mut t = self.timings();
        t.run.entry(model.to_string()).or_insert_with(|| Histogram::new(JOB_SECONDS_BUCKETS)).observe(seconds);
    }

    pub fn observe_latency(&self, seconds: f64) {
        self.timings().latency.observe(seconds);
    }

    /// This node's executor produced `n` images.
    pub fn images_generated(&self, n: u64) {
        self.images.fetch_add(n, Ordering::Relaxed);
        self.image_rate.record(n);
    }
}

/// One scrape of this node. Reads the applied state under its lock briefly,
/// and sled's file sizes (a few `stat`s): call it off the async threads.
pub fn render(app: &App) -> String {
    let mut e = Exposition::new();
    e.family(
        "raftgen_build_info",
        Kind::Gauge,
        "Always 1; the label is this node's raftgen version.",
        [([("version", env!("CARGO_PKG_VERSION"))], 1.0)],
    );
    jobs(app, &mut e);
    executor(app, &mut e);
    raft(app, &mut e);
    e.single(
        "raftgen_disk_bytes",
        Kind::Gauge,
        "Bytes this node's sled database takes on disk (Raft log, vote and snapshot).",
        app.view.disk_bytes() as f64,
    );
    e.single(
        "raftgen_snapshot_bytes",
        Kind::Gauge,
        "Bytes of this node's stored Raft snapshot (0 before the first).",
        app.view.snapshot_bytes() as f64,
    );
    e.single(
        "raftgen_peer_sent_bytes_total",
        Kind::Counter,
        "Bytes this node sent to other nodes since it started: bodies of Raft RPCs, forwarded writes and their answers, and result images it pushed or served.",
        app.metrics.peer_sent_bytes.load(Ordering::Relaxed) as f64,
    );
    results(app, &mut e);
    gpu::write(&mut e, &gpu::sample());
    e.finish()
}

/// Result storage: this node's store and transfers, and, from the
/// replicated state, what is kept and how well it is copied.
fn results(app: &App, e: &mut Exposition) {
    let r = &app.results;
    let (images, bytes) = r.local.usage();
    e.single("raftgen_result_store_images", Kind::Gauge, "Result images in this node's embedded store.", images as f64);
    e.single("raftgen_result_store_bytes", Kind::Gauge, "Bytes of this node's embedded result store.", bytes as f64);
    let (_, cached) = r.cache.usage();
    e.single(
        "raftgen_result_cache_bytes",
        Kind::Gauge,
        "Bytes of images fetched from other nodes or the object store that this node keeps (--result-cache-mb).",
        cached as f64,
    );
    let t = &r.traffic;
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64;
    e.family(
        "raftgen_result_transfer_bytes_total",
        Kind::Counter,
        "This node's result image bytes: pushed (its own results, to other nodes or the object store), received (pushed to it), served (to other nodes' readers and repair), fetched (from other nodes or the object store).",
        [
            ([("direction", "pushed")], load(&t.pushed)),
            ([("direction", "received")], load(&t.received)),
            ([("direction", "served")], load(&t.served)),
            ([("direction", "fetched")], load(&t.fetched)),
        ],
    );
    e.family(
        "raftgen_result_reads_total",
        Kind::Counter,
        "Image reads on this node by where the bytes came from: its store, its cache, a fetch; or unavailable (answered 503).",
        [
            ([("source", "local")], load(&t.reads_local)),
            ([("source", "cache")], load(&t.reads_cached)),
            ([("source", "fetched")], load(&t.reads_fetched)),
            ([("source", "unavailable")], load(&t.reads_unavailable)),
        ],
    );
    let members: BTreeSet<u64> = app.members().into_keys().collect();
    let now = crate::node::results::object::now_ms();
    let (kept, kept_bytes, short, homeless) = {
        let data = app.view.read();
        let sm = &data.jobs;
        let (copies, eligible) = (
            sm.config().result_copies.max(1) as usize,
            members.iter().filter(|n| !sm.is_retiring(**n) && sm.lost_since(**n).is_none()).count(),
        );
        let target = copies.min(eligible);
        let mut short = 0;
        let mut homeless = 0;
        for (_, blob) in sm.blobs() {
            let Some(holders) = blob.location.nodes() else { continue };
            let counting = holders
                .iter()
                .filter(|n| {
                    members.contains(n)
                        && !sm.is_retiring(**n)
                        && sm.lost_since(**n).is_none_or(|t| now.saturating_sub(t) < sm.config().repair_delay_ms)
                })
                .count();
            short += usize::from(counting < target);
            homeless += usize::from(counting == 0);
        }
        (sm.result_count(), sm.result_bytes(), short, homeless)
    };
    e.single("raftgen_results_retained", Kind::Gauge, "Cluster-wide: results kept (retention).", kept as f64);
    e.single(
        "raftgen_results_retained_bytes",
        Kind::Gauge,
        "Cluster-wide: bytes of the results kept (an image two jobs share counts twice).",
        kept_bytes as f64,
    );
    e.single(
        "raftgen_results_under_replicated",
        Kind::Gauge,
        "Cluster-wide: stored images with fewer counting copies than --result-copies allows (repair is due or running).",
        short as f64,
    );
    e.single(
        "raftgen_results_without_copy",
        Kind::Gauge,
        "Cluster-wide: stored images no live node counts as holding (unreadable until a holder returns).",
        homeless as f64,
    );
}

fn jobs(app: &App, e: &mut Exposition) {
    let (counts, depth, busy) = {
        let data = app.view.read();
        let mut counts = data.jobs.counts().clone();
        // Served models start at 0, so a rate sees their first job.
        for model in data.jobs.model_hashes().keys() {
            counts.entry(model.clone()).or_default();
        }
        (counts, data.jobs.queue_depth_by_priority(), data.jobs.active_count(app.id))
    };
    let cluster = "Cluster-wide: counted when the log entry is applied and kept in the replicated state, so \
                   every node reports the same value and it survives restarts.";
    type Field = fn(&raftgen_raft::state::JobCounts) -> u64;
    let totals: [(&str, &str, Field); 4] = [
        ("submitted", "Jobs created (a retried submission is not counted again), per model.", |c| c.submitted),
        ("succeeded", "Jobs that succeeded, per model.", |c| c.succeeded),
        (
            "failed",
            "Jobs that failed: the executor reported an error, or the job was re-queued --max-attempts times; per model.",
            |c| c.failed,
        ),
        ("cancelled", "Jobs cancelled (queued or running), per model.", |c| c.cancelled),
    ];
    for (what, help, field) in totals {
        e.family(
            &format!("raftgen_jobs_{what}_total"),
            Kind::Counter,
            &format!("{help} {cluster}"),
            counts.iter().map(|(model, c)| ([("model", model.as_str())], field(c) as f64)),
        );
    }
    e.family(
        "raftgen_cache_hits_total",
        Kind::Counter,
        &format!(
            "Jobs answered from the result cache (identical to a succeeded fixed-seed job; also counted as \
             submitted and succeeded), per model. {cluster}"
        ),
        counts.iter().map(|(model, c)| ([("model", model.as_str())], c.cache_hits as f64)),
    );

    let priorities: Vec<(String, u64)> = {
        let mut seen = app.metrics.priorities.lock().unwrap_or_else(|e| e.into_inner());
        seen.extend(depth.keys().copied());
        seen.iter().map(|p| (p.to_string(), depth.get(p).copied().unwrap_or(0))).collect()
    };
    e.family(
        "raftgen_queue_depth",
        Kind::Gauge,
        "Jobs queued (not yet assigned to a node) per priority, in this node's applied state (cluster-wide). \
         A priority seen since the node started stays, at 0 when empty.",
        priorities.iter().map(|(p, n)| ([("priority", p.as_str())], *n as f64)),
    );
    e.single(
        "raftgen_queue_depth_total",
        Kind::Gauge,
        "Jobs queued (not yet assigned to a node), all priorities, in this node's applied state (cluster-wide).",
        depth.values().sum::<u64>() as f64,
    );

    {
        let t = app.metrics.timings();
        let here = "Observed on the node that ran the job, from the leader's timestamps in the log.";
        e.histograms(
            "raftgen_job_queue_wait_seconds",
            &format!("Time from submission to the start of the attempt, per attempt started on this node. {here}"),
            [(&[] as Labels, &t.queue_wait)],
        );
        e.histograms(
            "raftgen_job_run_seconds",
            &format!(
                "Time from start to finish of attempts this node ran to success or reported as failed, per model. \
                 {here}"
            ),
            t.run.iter().map(|(model, h)| ([("model", model.as_str())], h)),
        );
        e.histograms(
            "raftgen_job_latency_seconds",
            &format!("Time from submission to success, per job that succeeded on this node. {here}"),
            [(&[] as Labels, &t.latency)],
        );
    }

    e.single(
        "raftgen_executor_slots",
        Kind::Gauge,
        "Jobs this node takes at once (--slots).",
        app.settings.slots as f64,
    );
    e.single(
        "raftgen_executor_busy_slots",
        Kind::Gauge,
        "Slots of this node holding an assigned or running job, in the applied state.",
        busy as f64,
    );
}

fn executor(app: &App, e: &mut Exposition) {
    let m = &app.metrics;
    let (name, device, dtype) = (app.executor.name(), app.executor.device(), app.executor.dtype());
    e.family(
        "raftgen_executor_info",
        Kind::Gauge,
        "Always 1; the labels are this node's executor, the device it runs on (cpu, cuda:N) and its precision \
         (--device, --dtype).",
        [([("executor", name), ("device", device.as_str()), ("dtype", dtype.as_str())], 1.0)],
    );
    e.single(
        "raftgen_images_generated_total",
        Kind::Counter,
        "Images this node's executor produced since the node started (whether or not the completion was \
         accepted).",
        m.images.load(Ordering::Relaxed) as f64,
    );
    e.single(
        "raftgen_images_per_second",
        Kind::Gauge,
        "Images this node's executor produced per second, averaged over the last 60 s.",
        m.image_rate.per_second(),
    );
    let loads = app.executor.model_load_times();
    e.family(
        "raftgen_model_load_seconds",
        Kind::Gauge,
        "How long the last load of each model took on this node (present once the model was loaded).",
        loads.iter().map(|(model, d)| ([("model", model.as_str())], d.as_secs_f64())),
    );
}

fn raft(app: &App, e: &mut Exposition) {
    let (term, leader, voters, members) = {
        let m = app.raft.metrics();
        let m = m.borrow();
        let membership = m.membership_config.membership();
        (m.current_term, m.current_leader, membership.voter_ids().count(), membership.nodes().count())
    };
    // Whatever is applied is committed (an installed snapshot moves the
    // applied index without a commit report), so the lag is never negative.
    let applied = app.view.applied_index();
    let committed = app.view.committed_index().max(applied);
    let gauges: [(&str, &str, f64); 8] = [
        ("raftgen_raft_term", "This node's current Raft term.", term as f64),
        ("raftgen_raft_leader_id", "The leader this node knows of (0: none known).", leader.unwrap_or(0) as f64),
        ("raftgen_raft_is_leader", "1 if this node is the leader, else 0.", f64::from(leader == Some(app.id))),
        ("raftgen_raft_commit_index", "The last log index this node knows to be committed.", committed as f64),
        ("raftgen_raft_applied_index", "The last log index applied to this node's state.", applied as f64),
        (
            "raftgen_raft_apply_lag",
            "Committed entries not yet applied on this node (commit index - applied index).",
            (committed - applied) as f64,
        ),
        (
            "raftgen_raft_membership_size",
            "Nodes in the cluster's membership (voters and learners), as this node knows it.",
            members as f64,
        ),
        ("raftgen_raft_voters", "Voting members, as this node knows them.", voters as f64),
    ];
    for (name, help, value) in gauges {
        e.single(name, Kind::Gauge, help, value);
    }
}
