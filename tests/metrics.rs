//! `GET /metrics` on real node processes, read back with a Prometheus text
//! parser (`prom_text_format_parser`, which rejects malformed lines, bad
//! escapes and families split apart): the values move as jobs run, the
//! cluster-wide counters agree on every node, each job's timings are observed
//! once in the cluster, and nothing secret or job-specific leaks into it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::json;

mod common;

use common::{scratch, start, wait_until};

/// One parsed scrape: every sample by full name and labels.
struct Scrape {
    text: String,
    /// Family name → type (`counter`, `gauge`, `histogram`).
    kinds: BTreeMap<String, String>,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

fn unescape(v: &str) -> String {
    let mut out = String::new();
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        match (c, c == '\\') {
            (_, true) => match chars.next() {
                Some('n') => out.push('\n'),
                Some(other) => out.push(other),
                None => out.push('\\'),
            },
            (c, false) => out.push(c),
        }
    }
    out
}

impl Scrape {
    fn parse(text: String) -> Scrape {
        use prom_text_format_parser::{Type, ValueType};
        let parsed = prom_text_format_parser::Scrape::parse(&text)
            .unwrap_or_else(|e| panic!("/metrics is not valid Prometheus text: {e:?}\n{text}"));
        let mut kinds = BTreeMap::new();
        let mut samples = Vec::new();
        for m in parsed.metrics {
            assert!(m.name.starts_with("raftgen_"), "{} lacks the raftgen_ prefix", m.name);
            assert!(m.help_desc.as_deref().is_some_and(|h| !h.is_empty()), "{} has no HELP", m.name);
            assert_ne!(m.kind, Type::Untyped, "{} has no TYPE", m.name);
            if m.kind == Type::Counter {
                assert!(m.name.ends_with("_total"), "counter {} does not end in _total", m.name);
            }
            assert!(kinds.insert(m.name.clone(), m.kind.to_string()).is_none(), "{} appears twice", m.name);
            for s in m.samples {
                let suffix = match (m.kind, s.value.value_type) {
                    (Type::Histogram, ValueType::Sample) => "_bucket",
                    (_, ValueType::Sum) => "_sum",
                    (_, ValueType::Count) => "_count",
                    _ => "",
                };
                let labels = s.labels.iter().map(|l| (l.key.clone(), unescape(&l.value))).collect();
                samples.push((format!("{}{suffix}", m.name), labels, s.value.value.as_f64()));
            }
        }
        let scrape = Scrape { text, kinds, samples };
        scrape.check_histograms();
        scrape
    }

    /// The sample with exactly these labels, if present.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.samples.iter().find(|(n, l, _)| n == name && *l == want).map(|s| s.2)
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or_else(|| panic!("no sample {name}{labels:?} in\n{}", self.text))
    }

    /// Every histogram: buckets cumulative and ascending in `le`, the last one
    /// `+Inf` and equal to `_count`, and a `_sum`.
    fn check_histograms(&self) {
        for (family, _) in self.kinds.iter().filter(|(_, k)| *k == "histogram") {
            let mut series: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
            for (name, labels, v) in &self.samples {
                if *name == format!("{family}_bucket") {
                    let mut rest = labels.clone();
                    let le = rest.remove("le").unwrap_or_else(|| panic!("{family} bucket without le"));
                    let le: f64 = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() };
                    series.entry(rest).or_default().push((le, *v));
                }
            }
            assert!(!series.is_empty(), "{family} has no buckets");
            for (labels, buckets) in series {
                let pairs: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                assert!(buckets.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1), "{family}: {buckets:?}");
                let (le, last) = *buckets.last().unwrap();
                assert_eq!(le, f64::INFINITY, "{family}: the last bucket is not +Inf");
                assert_eq!(last, self.value(&format!("{family}_count"), &pairs), "{family}: +Inf != _count");
                assert!(self.value(&format!("{family}_sum"), &pairs) >= 0.0);
            }
        }
    }
}

async fn scrape(url: &str) -> Scrape {
    // No credentials: /metrics is open to any scraper.
    let resp = reqwest::get(format!("{url}/metrics")).await.expect("GET /metrics");
    assert_eq!(resp.status(), 200);
    let ctype = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "content type {ctype}");
    Scrape::parse(resp.text().await.unwrap())
}

const MODEL: &str = "test-pattern";

/// The families every node exports from its start (the others appear with
/// their first sample: a model's jobs, run times and load time).
const ALWAYS: [&str; 18] = [
    "raftgen_build_info",
    "raftgen_queue_depth",
    "raftgen_queue_depth_total",
    "raftgen_job_queue_wait_seconds",
    "raftgen_job_latency_seconds",
    "raftgen_executor_slots",
    "raftgen_executor_busy_slots",
    "raftgen_images_generated_total",
    "raftgen_images_per_second",
    "raftgen_raft_term",
    "raftgen_raft_leader_id",
    "raftgen_raft_is_leader",
    "raftgen_raft_commit_index",
    "raftgen_raft_applied_index",
    "raftgen_raft_apply_lag",
    "raftgen_raft_membership_size",
    "raftgen_raft_voters",
    "raftgen_disk_bytes",
];

/// A sample's value, 0 when absent (a labelled series before its first event).
fn or_zero(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.get(name, labels).unwrap_or(0.0)
}

/// Scrapes every node, until they agree on one leader (an election may be
/// under way when a scrape lands) and `also` holds.
async fn scrape_all(
    urls: &BTreeMap<u64, String>,
    what: &str,
    also: impl Fn(&BTreeMap<u64, Scrape>) -> bool,
) -> BTreeMap<u64, Scrape> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut all = BTreeMap::new();
        for (id, url) in urls {
            all.insert(*id, scrape(url).await);
        }
        let leaders: Vec<u64> =
            all.iter().filter(|(_, s)| s.value("raftgen_raft_is_leader", &[]) == 1.0).map(|(id, _)| *id).collect();
        let agreed = leaders.len() == 1
            && all.values().all(|s| s.value("raftgen_raft_leader_id", &[]) == leaders[0] as f64)
            && all.values().all(|s| s.value("raftgen_raft_is_leader", &[]) <= 1.0);
        if agreed && also(&all) {
            return all;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_move_as_jobs_run_and_agree_across_nodes() {
    let dir = scratch();
    let cluster = start(
        &dir.path,
        3,
        &["--executor", "test-pattern", "--test-pattern-delay-ms", "100", "--slots", "2", "--node-timeout-ms", "5000"],
    );
    let leader = cluster.wait_ready(1, 3, 2, Duration::from_secs(60)).await.unwrap();
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let urls: BTreeMap<u64, String> = (1..=3).map(|i| (i, cluster.url(i))).collect();

    // Exactly one node says it leads, and the others name it.
    let before = scrape_all(&urls, "one leader", |_| true).await;
    for (id, s) in &before {
        for family in ALWAYS {
            assert!(s.kinds.contains_key(family), "node {id} lacks {family}:\n{}", s.text);
        }
        assert_eq!(s.kinds["raftgen_jobs_submitted_total"], "counter");
        assert_eq!(s.kinds["raftgen_job_latency_seconds"], "histogram");
        assert_eq!(s.kinds["raftgen_queue_depth_total"], "gauge");
        assert_eq!(s.value("raftgen_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
        assert_eq!(s.value("raftgen_raft_membership_size", &[]), 3.0);
        assert_eq!(s.value("raftgen_raft_voters", &[]), 3.0);
        assert!(s.value("raftgen_raft_term", &[]) >= 1.0);
        assert!(s.value("raftgen_disk_bytes", &[]) > 0.0, "node {id}");
        assert_eq!(s.value("raftgen_executor_slots", &[]), 2.0);
        assert_eq!(s.value("raftgen_queue_depth", &[("priority", "0")]), 0.0);
        let (commit, applied) = (s.value("raftgen_raft_commit_index", &[]), s.value("raftgen_raft_applied_index", &[]));
        assert!(commit >= applied && applied > 0.0, "node {id}: commit {commit}, applied {applied}");
        assert_eq!(s.value("raftgen_raft_apply_lag", &[]), commit - applied);
    }

    // Jobs through a follower; cancel the last two right away (each cancel
    // either takes, or finds the job already done).
    let client = cluster.client(follower);
    let n = 8;
    let mut ids = Vec::new();
    for k in 0..n {
        let body = json!({ "prompt": format!("secret prompt {k}"), "width": 64, "height": 64, "steps": 4,
                           "priority": if k % 2 == 0 { 5 } else { 0 } });
        ids.push(client.submit(&body, None).await.unwrap()["id"].as_str().unwrap().to_string());
    }
    let mut cancelled = 0;
    for id in ids.iter().skip(n - 2) {
        cancelled += usize::from(client.delete(&format!("/v1/jobs/{id}"), None).await.is_ok());
    }
    let (mut succeeded, mut started_then_cancelled) = (0, 0);
    for id in &ids {
        let job = client.wait_job(id, Duration::from_secs(60), |_| {}).await.unwrap();
        match job["state"].as_str().unwrap() {
            "succeeded" => succeeded += 1,
            "cancelled" => started_then_cancelled += usize::from(!job["started_at_ms"].is_null()),
            other => panic!("job {id} {other}: {job}"),
        }
    }
    assert_eq!(succeeded + cancelled, n);
    let jobs_done = Instant::now();

    // Every node applies every command: the counters reach the same values
    // everywhere. Each job's timings are observed once, on the node that ran it.
    let model = [("model", MODEL)];
    let delta = |after: &Scrape, id: u64, name: &str, labels: &[(&str, &str)]| {
        or_zero(after, name, labels) - or_zero(&before[&id], name, labels)
    };
    let sum = |after: &BTreeMap<u64, Scrape>, name: &str, labels: &[(&str, &str)]| -> f64 {
        after.iter().map(|(id, s)| delta(s, *id, name, labels)).sum()
    };
    let after = scrape_all(&urls, "every node's metrics to show the finished jobs", |after| {
        let counted = after.iter().all(|(id, s)| {
            delta(s, *id, "raftgen_jobs_succeeded_total", &model) == succeeded as f64
                && delta(s, *id, "raftgen_jobs_cancelled_total", &model) == cancelled as f64
        });
        counted
            && sum(after, "raftgen_job_latency_seconds_count", &[]) == succeeded as f64
            && sum(after, "raftgen_job_queue_wait_seconds_count", &[]) == (succeeded + started_then_cancelled) as f64
    })
    .await;

    for (id, s) in &after {
        assert_eq!(delta(s, *id, "raftgen_jobs_submitted_total", &model), n as f64, "node {id}");
        assert_eq!(delta(s, *id, "raftgen_jobs_failed_total", &model), 0.0, "node {id}");
        assert!(
            s.value("raftgen_raft_applied_index", &[]) > before[id].value("raftgen_raft_applied_index", &[]),
            "node {id}: the applied index did not grow"
        );
        assert_eq!(s.value("raftgen_queue_depth_total", &[]), 0.0);
        assert_eq!(s.value("raftgen_executor_busy_slots", &[]), 0.0);
        // A priority's gauge, once exported, reads 0 when its queue is empty.
        assert_eq!(or_zero(s, "raftgen_queue_depth", &[("priority", "5")]), 0.0);
        assert!(!s.text.contains("secret prompt"), "node {id}: a prompt leaked into /metrics");
        assert!(!s.text.contains(&cluster.secret), "node {id}: the cluster secret leaked into /metrics");
        for job in &ids {
            assert!(!s.text.contains(job.as_str()), "node {id}: a job id leaked into /metrics");
        }
    }
    assert_eq!(sum(&after, "raftgen_job_run_seconds_count", &model), succeeded as f64);
    // Each run takes the test pattern's 100 ms (at least), on the leader's clock.
    assert!(sum(&after, "raftgen_job_run_seconds_sum", &model) >= 0.1 * succeeded as f64);
    assert!(sum(&after, "raftgen_job_latency_seconds_sum", &[]) >= sum(&after, "raftgen_job_run_seconds_sum", &model));
    let images = sum(&after, "raftgen_images_generated_total", &[]);
    assert!(images >= succeeded as f64 && images <= n as f64, "{images} images for {succeeded} successes");
    let rate: f64 = after.values().map(|s| s.value("raftgen_images_per_second", &[])).sum();
    assert!(rate <= images / 60.0 + 1e-9, "images/s {rate} over 60 s exceeds the {images} images made");
    if jobs_done.elapsed() < Duration::from_secs(50) {
        assert!(rate > 0.0, "images were made within the last minute but images/s is 0");
    }
}

/// A node that takes no jobs (`--slots 0`): submissions stay queued, so the
/// queue depth gauges can be read exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_depth_follows_the_queue_by_priority() {
    let dir = scratch();
    let cluster = start(&dir.path, 1, &["--executor", "test-pattern", "--slots", "0"]);
    cluster.wait_ready(1, 1, 0, Duration::from_secs(60)).await.unwrap();
    let client = cluster.client(1);
    let url = cluster.url(1);
    let mut ids = Vec::new();
    for (k, priority) in [5, 5, 5, 0, -2].into_iter().enumerate() {
        let body = json!({ "prompt": format!("p{k}"), "width": 64, "height": 64, "steps": 1, "priority": priority });
        ids.push(client.submit(&body, None).await.unwrap()["id"].as_str().unwrap().to_string());
    }
    let s = scrape(&url).await;
    assert_eq!(s.value("raftgen_queue_depth", &[("priority", "5")]), 3.0);
    assert_eq!(s.value("raftgen_queue_depth", &[("priority", "0")]), 1.0);
    assert_eq!(s.value("raftgen_queue_depth", &[("priority", "-2")]), 1.0);
    assert_eq!(s.value("raftgen_queue_depth_total", &[]), 5.0);
    assert_eq!(s.value("raftgen_jobs_submitted_total", &[("model", MODEL)]), 5.0);
    assert_eq!(s.value("raftgen_executor_slots", &[]), 0.0);
    assert_eq!(s.value("raftgen_executor_busy_slots", &[]), 0.0);
    assert_eq!(s.value("raftgen_raft_is_leader", &[]), 1.0);
    assert_eq!(s.value("raftgen_raft_leader_id", &[]), 1.0);

    // Cancel one of priority 5 and the one of priority -2: its gauge stays, at 0.
    for id in [&ids[0], &ids[4]] {
        client.delete(&format!("/v1/jobs/{id}"), None).await.unwrap();
    }
    let s = scrape(&url).await;
    assert_eq!(s.value("raftgen_queue_depth", &[("priority", "5")]), 2.0);
    assert_eq!(s.value("raftgen_queue_depth", &[("priority", "-2")]), 0.0);
    assert_eq!(s.value("raftgen_queue_depth_total", &[]), 3.0);
    assert_eq!(s.value("raftgen_jobs_cancelled_total", &[("model", MODEL)]), 2.0);
    assert_eq!(s.value("raftgen_jobs_submitted_total", &[("model", MODEL)]), 5.0);
    assert_eq!(s.value("raftgen_jobs_succeeded_total", &[("model", MODEL)]), 0.0);

    // The counts are replicated state: a restarted node reports the same.
    let mut cluster = cluster;
    cluster.stop(1).unwrap();
    cluster.spawn(1).unwrap();
    cluster.wait_ready(1, 1, 0, Duration::from_secs(60)).await.unwrap();
    let s = scrape(&url).await;
    assert_eq!(s.value("raftgen_jobs_submitted_total", &[("model", MODEL)]), 5.0);
    assert_eq!(s.value("raftgen_jobs_cancelled_total", &[("model", MODEL)]), 2.0);
    assert_eq!(s.value("raftgen_queue_depth_total", &[]), 3.0);
}

/// The real executor on the built-in tiny model: its load time appears once
/// the first job has loaded it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_load_time_appears_once_a_model_is_loaded() {
    let dir = scratch();
    let cluster = start(&dir.path, 1, &["--executor", "diffusion"]);
    cluster.wait_ready(1, 1, 1, Duration::from_secs(60)).await.unwrap();
    let url = cluster.url(1);
    let s = scrape(&url).await;
    assert!(!s.kinds.contains_key("raftgen_model_load_seconds"), "nothing is loaded before a job needs it");

    let client = cluster.client(1);
    let body = json!({ "prompt": "a fox", "width": 64, "height": 64, "steps": 2, "seed": 1 });
    let id = client.submit(&body, None).await.unwrap()["id"].as_str().unwrap().to_string();
    let job = client.wait_job(&id, Duration::from_secs(120), |_| {}).await.unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    let model = job["request"]["model"].as_str().unwrap().to_string();

    wait_until("the job's timings to be observed", Duration::from_secs(30), || {
        let url = &url;
        async move { scrape(url).await.get("raftgen_job_latency_seconds_count", &[]) == Some(1.0) }
    })
    .await;
    let s = scrape(&url).await;
    assert_eq!(s.kinds["raftgen_model_load_seconds"], "gauge");
    assert!(s.value("raftgen_model_load_seconds", &[("model", &model)]) > 0.0);
    assert_eq!(s.value("raftgen_images_generated_total", &[]), 1.0);
    assert_eq!(s.value("raftgen_job_run_seconds_count", &[("model", &model)]), 1.0);
    assert_eq!(s.value("raftgen_jobs_succeeded_total", &[("model", &model)]), 1.0);
}
