//! The client workload: concurrent clients that behave as real ones do. Each
//! submits jobs to random nodes with an idempotency key, retries on errors and
//! timeouts with the same key (bounded), polls jobs it was given, and cancels
//! some. Every operation goes into the history with its invocation and
//! completion time; a leadership observer records each node's own claim of
//! term and leader.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::history::{Outcome, Record};

/// One client request (a node rides out a failover within its own
/// `submit_timeout_ms`, 30 s by default; a client gives up on one try sooner
/// and retries elsewhere, as HTTP clients do).
pub const REQUEST_TIMEOUT_MS: u64 = 5_000;
/// Tries of one submission before the client gives up (outcome unknown).
pub const MAX_SUBMIT_TRIES: u32 = 30;
/// Longest wait between two tries.
pub const MAX_BACKOFF_MS: u64 = 1_000;
/// How often the observer asks every node for its term and leader.
pub const OBSERVE_EVERY_MS: u64 = 50;

/// The history being written, shared by clients, observer and nemesis.
#[derive(Clone)]
pub struct Recorder {
    start: Instant,
    records: Arc<Mutex<Vec<Record>>>,
}

impl Recorder {
    pub fn new() -> Self {
        Recorder { start: Instant::now(), records: Arc::default() }
    }

    /// Milliseconds since the run started.
    pub fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    pub fn push(&self, r: Record) {
        self.records.lock().expect("history lock").push(r);
    }

    pub fn take(&self) -> Vec<Record> {
        std::mem::take(&mut *self.records.lock().expect("history lock"))
    }

    /// Acknowledged submissions so far.
    pub fn acked(&self) -> usize {
        let r = self.records.lock().expect("history lock");
        r.iter().filter(|r| matches!(r, Record::Submit { outcome: Outcome::Ok, .. })).count()
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Clone)]
pub struct Workload {
    /// Node id -> base URL, for the nodes clients may talk to.
    pub nodes: Arc<Mutex<Vec<(u64, String)>>>,
    pub jobs: usize,
    /// Target submissions per second over all clients.
    pub rate_per_s: f64,
    /// Fraction of acknowledged jobs a client cancels.
    pub cancel_fraction: f64,
    pub seed: u64,
    /// Submissions the clients may start so far: the nemesis releases the
    /// jobs in tranches, one as each fault begins, so every fault meets
    /// traffic however long the faults before it took.
    pub released: Arc<AtomicUsize>,
}

/// Runs `clients` clients until `jobs` submissions were invoked and have
/// completed (acknowledged, failed or given up). Submissions start at most
/// `rate_per_s` a second, and only as far as `released` allows.
pub async fn run_clients(w: Workload, clients: u32, rec: Recorder) {
    let next = Arc::new(AtomicUsize::new(0));
    let pace = Arc::new(tokio::sync::Mutex::new(Instant::now()));
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_millis(500))
        .pool_max_idle_per_host(8)
        .build()
        .expect("static client settings");
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (w, rec, next, http, pace) = (w.clone(), rec.clone(), next.clone(), http.clone(), pace.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(w.seed ^ (u64::from(c) << 32));
            let mut mine: Vec<String> = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= w.jobs {
                    break;
                }
                while n >= w.released.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                {
                    // One start every 1/rate seconds, over all clients.
                    let mut next_start = pace.lock().await;
                    let start_at = (*next_start).max(Instant::now());
                    *next_start = start_at + Duration::from_secs_f64(1.0 / w.rate_per_s.max(0.001));
                    drop(next_start);
                    tokio::time::sleep_until(start_at.into()).await;
                }
                if let Some(id) = submit(&http, &w, c, n, &mut rng, &rec).await {
                    if rng.gen_bool(w.cancel_fraction.clamp(0.0, 1.0)) {
                        cancel(&http, &w, c, &id, &mut rng, &rec).await;
                    }
                    mine.push(id);
                }
                if !mine.is_empty() && rng.gen_bool(0.3) {
                    let id = mine[rng.gen_range(0..mine.len())].clone();
                    poll(&http, &w, c, &id, &mut rng, &rec).await;
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

fn pick(w: &Workload, rng: &mut StdRng) -> (u64, String) {
    let nodes = w.nodes.lock().expect("nodes lock");
    nodes[rng.gen_range(0..nodes.len())].clone()
}

/// One logical submission with all its tries; returns the job id once acknowledged.
async fn submit(
    http: &reqwest::Client,
    w: &Workload,
    client: u32,
    n: usize,
    rng: &mut StdRng,
    rec: &Recorder,
) -> Option<String> {
    let key = format!("chaos-{}-{n}", w.seed);
    let body = json!({ "prompt": format!("chaos job {n}"), "width": 64, "height": 64, "steps": 4 });
    let invoke_ms = rec.now_ms();
    let mut tried = Vec::new();
    let mut backoff_ms = 50;
    let mut outcome = Outcome::Info { error: String::new() };
    let mut job = None;
    for _ in 0..MAX_SUBMIT_TRIES {
        let (node, url) = pick(w, rng);
        tried.push(node);
        let resp = http
            .post(format!("{url}/v1/jobs"))
            .header("Idempotency-Key", &key)
            .timeout(Duration::from_millis(REQUEST_TIMEOUT_MS))
            .json(&body)
            .send()
            .await;
        let error = match resp {
            Ok(r) if r.status().is_success() => {
                let v: Value = r.json().await.unwrap_or_default();
                if let Some(id) = v["id"].as_str() {
                    (outcome, job) = (Outcome::Ok, Some(id.to_string()));
                    break;
                }
                "a 2xx answer without a job id".to_string()
            }
            // A 4xx other than 408/429 rejects the request itself: it did
            // not happen, and retrying it would not help.
            Ok(r) if r.status().is_client_error() && ![408, 429].contains(&r.status().as_u16()) => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                outcome = Outcome::Fail { error: format!("HTTP {status}: {text}") };
                break;
            }
            Ok(r) => format!("HTTP {}", r.status()),
            Err(e) => e.to_string(),
        };
        // Tries exhausted with this as the last error: the outcome is unknown.
        outcome = Outcome::Info { error };
        tokio::time::sleep(Duration::from_millis(rng.gen_range(backoff_ms / 2..=backoff_ms))).await;
        backoff_ms = (backoff_ms * 2).min(MAX_BACKOFF_MS);
    }
    rec.push(Record::Submit {
        client,
        key,
        nodes: tried,
        invoke_ms,
        complete_ms: rec.now_ms(),
        outcome,
        job: job.clone(),
    });
    job
}

async fn cancel(http: &reqwest::Client, w: &Workload, client: u32, id: &str, rng: &mut StdRng, rec: &Recorder) {
    let (node, url) = pick(w, rng);
    let invoke_ms = rec.now_ms();
    let resp =
        http.delete(format!("{url}/v1/jobs/{id}")).timeout(Duration::from_millis(REQUEST_TIMEOUT_MS)).send().await;
    let outcome = match resp {
        Ok(r) if r.status().is_success() => Outcome::Ok,
        Ok(r) if r.status().is_client_error() => Outcome::Fail { error: format!("HTTP {}", r.status()) },
        Ok(r) => Outcome::Info { error: format!("HTTP {}", r.status()) },
        Err(e) => Outcome::Info { error: e.to_string() },
    };
    rec.push(Record::Cancel { client, job: id.to_string(), node, invoke_ms, complete_ms: rec.now_ms(), outcome });
}

async fn poll(http: &reqwest::Client, w: &Workload, client: u32, id: &str, rng: &mut StdRng, rec: &Recorder) {
    let (node, url) = pick(w, rng);
    let invoke_ms = rec.now_ms();
    let resp = http.get(format!("{url}/v1/jobs/{id}")).timeout(Duration::from_millis(REQUEST_TIMEOUT_MS)).send().await;
    let (state, attempt) = match resp {
        Ok(r) if r.status().is_success() => {
            let v: Value = r.json().await.unwrap_or_default();
            (v["state"].as_str().map(String::from), v["attempt"].as_u64().map(|a| a as u32))
        }
        _ => (None, None),
    };
    rec.push(Record::Poll { client, job: id.to_string(), node, invoke_ms, complete_ms: rec.now_ms(), state, attempt });
}

/// Records every change of each node's (term, leader), as the node itself
/// reports it on `/v1/cluster?local=1`, until `stop` is set.
pub async fn observe_leadership(nodes: Arc<Mutex<Vec<(u64, String)>>>, rec: Recorder, stop: Arc<AtomicBool>) {
    let http =
        reqwest::Client::builder().connect_timeout(Duration::from_millis(200)).build().expect("static client settings");
    let mut last: std::collections::BTreeMap<u64, (u64, Option<u64>)> = Default::default();
    while !stop.load(Ordering::SeqCst) {
        let targets: Vec<(u64, String)> = nodes.lock().expect("nodes lock").clone();
        let mut tasks = Vec::new();
        for (id, url) in targets {
            let http = http.clone();
            tasks.push(tokio::spawn(async move {
                let resp = http
                    .get(format!("{url}/v1/cluster?local=1"))
                    .timeout(Duration::from_millis(OBSERVE_EVERY_MS * 4))
                    .send()
                    .await
                    .ok()?;
                let v: Value = resp.json().await.ok()?;
                Some((id, v["term"].as_u64()?, v["leader_id"].as_u64()))
            }));
        }
        for t in tasks {
            if let Ok(Some((id, term, leader))) = t.await {
                if last.get(&id) != Some(&(term, leader)) {
                    last.insert(id, (term, leader));
                    rec.push(Record::Leadership { at_ms: rec.now_ms(), node: id, term, leader });
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(OBSERVE_EVERY_MS)).await;
    }
}
