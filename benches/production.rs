//! What the production features cost: the submit path of a 3-node cluster
//! with API keys, and with mutual TLS plus API keys, against the same cluster
//! with neither, run side by side (the variants take turns, round after
//! round, so they share the machine's noise); and what a result-cache hit
//! saves against running the same seeded job on the real executor.
//!
//!     cargo bench --bench production
//!
//! Environment: RAFTGEN_BENCH_SECS (seconds per load phase, default 5),
//! RAFTGEN_BENCH_ROUNDS (turns of every variant, default 3).
//!
//! The submit phases run the test-pattern executor (a test double) with
//! `--slots 0`, so jobs queue but never run; every 202 counted was committed
//! by a quorum and flushed on each node. All clients use the same stack
//! (reqwest, one keep-alive connection each), so the ratios isolate what the
//! nodes do: TLS on the client's hop and on every Raft RPC, and the key check
//! on every request. The cache phase runs the built-in model (shapes-sd) on the
//! CPU, on one node.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raftgen::cli::local::LocalCluster;
use raftgen::cli::Client;
use raftgen::tls::ClientTls;
use serde_json::{json, Value};

mod common;

use common::{env_u64, median, ms, percentile};

const EXE: &str = env!("CARGO_BIN_EXE_raftgen");
const KEY: &str = "bench-5f1e0c3a9b7d2e4f6a8c0b1d3e5f7a9c";

/// One way of running the cluster.
struct Variant {
    name: &'static str,
    keys: bool,
    tls: bool,
}

const VARIANTS: [Variant; 3] = [
    Variant { name: "plain", keys: false, tls: false },
    Variant { name: "api keys", keys: true, tls: false },
    Variant { name: "mTLS + api keys", keys: true, tls: true },
];

/// The files a variant needs, made once: an API-key file and a test PKI.
struct Files {
    keys: String,
    pki: std::path::PathBuf,
}

impl Files {
    fn make(dir: &Path) -> Files {
        let keys = dir.join("api-keys");
        std::fs::write(&keys, format!("bench {KEY}\n")).unwrap();
        let pki = dir.join("pki");
        let out = Command::new(EXE)
            .args(["certs", "--out"])
            .arg(&pki)
            .args(["--hosts", "127.0.0.1,localhost", "--nodes", "3"])
            .output()
            .expect("running raftgen certs");
        assert!(out.status.success(), "raftgen certs: {}", String::from_utf8_lossy(&out.stderr));
        Files { keys: keys.display().to_string(), pki }
    }

    fn client_tls(&self) -> ClientTls {
        ClientTls {
            tls_ca: Some(self.pki.join("ca.pem")),
            tls_cert: Some(self.pki.join("client.pem")),
            tls_key: Some(self.pki.join("client-key.pem")),
        }
    }
}

/// A running 3-node cluster of one variant.
struct Running {
    cluster: LocalCluster,
    tls: Option<ClientTls>,
    key: Option<&'static str>,
}

impl Running {
    async fn start(v: &Variant, files: &Files, dir: &Path) -> Running {
        let mut extra: Vec<String> =
            ["--executor", "test-pattern", "--slots", "0", "--max-queue-depth", "100000000"].map(String::from).into();
        if v.keys {
            extra.extend(["--api-keys".into(), files.keys.clone()]);
        }
        let tls = v.tls.then(|| files.client_tls());
        // Each node presents its own certificate and verifies its peers'
        // against the CA: node 1 starts the cluster, 2 and 3 join it.
        let node_args = |k: u64| -> Vec<String> {
            let mut args = extra.clone();
            if v.tls {
                let pem = |f: String| files.pki.join(f).display().to_string();
                args.extend(["--tls-cert".into(), pem(format!("node-{k}.pem")), "--tls-key".into()]);
                args.extend([pem(format!("node-{k}-key.pem")), "--tls-ca".into(), pem("ca.pem".into())]);
            }
            args
        };
        let first = node_args(1);
        let first: Vec<&str> = first.iter().map(String::as_str).collect();
        let mut cluster = LocalCluster::start_tls(Path::new(EXE), dir, 1, &[], &first, tls.clone()).unwrap();
        for k in 2..=3 {
            let args = node_args(k);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            cluster.add_node(k, 1, &args).unwrap();
        }
        let running = Running { cluster, tls, key: v.keys.then_some(KEY) };
        running.wait_ready().await;
        running
    }

    fn client(&self, node: u64) -> Client {
        self.cluster.client(node).with_api_key(self.key.map(String::from))
    }

    /// Three members with their executors registered, and a leader that
    /// every node names; returns it.
    async fn wait_ready(&self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut leaders = Vec::new();
            for node in 1..=3 {
                let c = self.client(node).get("/v1/cluster?local=1").await.ok();
                leaders.push(c.and_then(|c| c["leader_id"].as_u64()));
            }
            let members = self.client(1).get("/v1/cluster").await.ok().and_then(|c| {
                let members = c["members"].as_array()?.clone();
                members.iter().all(|m| !m["executor"].is_null()).then_some(members.len())
            });
            if let (Some(Some(l)), Some(3)) = (leaders.first(), members) {
                if leaders.iter().all(|x| *x == Some(*l)) {
                    return *l;
                }
            }
            assert!(Instant::now() < deadline, "cluster not ready: {leaders:?} {members:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn http(&self, url: &str) -> reqwest::Client {
        let mut b = reqwest::Client::builder().http1_only().pool_max_idle_per_host(1).timeout(Duration::from_secs(30));
        if let Some(tls) = &self.tls {
            b = tls.apply(b, url).expect("client TLS files");
        }
        b.build().unwrap()
    }
}

/// One client: back-to-back submissions on one keep-alive connection.
async fn client(
    http: reqwest::Client,
    url: String,
    key: Option<&'static str>,
    c: usize,
    stop: Arc<AtomicBool>,
) -> (Vec<Duration>, usize) {
    let (mut lat, mut errors, mut n) = (Vec::new(), 0usize, 0u64);
    while !stop.load(Ordering::Relaxed) {
        let body = format!(r#"{{"prompt":"bench {c} {n}","width":64,"height":64,"steps":1}}"#);
        let mut req = http
            .post(format!("{url}/v1/jobs"))
            .header("content-type", "application/json")
            .header("idempotency-key", format!("p-{c}-{n}"))
            .body(body);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        n += 1;
        let t = Instant::now();
        let accepted = match req.send().await {
            Ok(resp) => resp.status() == 202 && resp.bytes().await.is_ok(),
            Err(_) => false,
        };
        match accepted {
            true => lat.push(t.elapsed()),
            false => errors += 1,
        }
    }
    (lat, errors)
}

/// One load phase's figures.
struct Phase {
    per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: usize,
}

async fn load(r: &Running, nodes: &[u64], clients: usize, secs: u64) -> Phase {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let url = r.cluster.url(nodes[c % nodes.len()]);
            tokio::spawn(client(r.http(&url), url, r.key, c, stop.clone()))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut lat, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (l, e) = t.await.unwrap();
        lat.extend(l);
        errors += e;
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort();
    Phase {
        per_s: lat.len() as f64 / secs,
        p50_ms: ms(percentile(&lat, 0.5)),
        p99_ms: ms(percentile(&lat, 0.99)),
        errors,
    }
}

const PHASES: [&str; 2] = ["1 client -> follower", "16 clients -> all nodes"];

/// `GET /metrics` on a follower with the queue the load phases left behind,
/// against `GET /healthz` on the same connection: p50 of 50 requests each.
async fn scrape_phase(r: &Running, node: u64) {
    let url = r.cluster.url(node);
    let http = r.http(&url);
    let timed = |path: &'static str| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let (mut lat, mut body) = (Vec::new(), String::new());
            for _ in 0..50 {
                let t = Instant::now();
                body = http.get(format!("{url}{path}")).send().await.unwrap().text().await.unwrap();
                lat.push(t.elapsed());
            }
            lat.sort();
            (percentile(&lat, 0.5), body)
        }
    };
    let (health, _) = timed("/healthz").await;
    let (metrics, text) = timed("/metrics").await;
    let depth = text.lines().find_map(|l| l.strip_prefix("raftgen_queue_depth_total ")).unwrap_or("?").to_string();
    println!(
        "  /metrics with {depth} jobs queued: {} bytes, p50 {:.2} ms ({:.1}x /healthz's {:.2} ms)",
        text.len(),
        ms(metrics),
        ms(metrics) / ms(health),
        ms(health)
    );
}

/// Submit to `client` and poll every 5 ms until the job has succeeded; the
/// time from sending the submission to seeing `succeeded`.
async fn submit_until_done(client: &Client, body: &Value) -> (Duration, Value) {
    let t = Instant::now();
    let mut job = client.submit(body, None).await.unwrap();
    let path = format!("/v1/jobs/{}", job["id"].as_str().unwrap());
    while !["succeeded", "failed", "cancelled"].contains(&job["state"].as_str().unwrap_or("")) {
        assert!(t.elapsed() < Duration::from_secs(600), "job not done: {job}");
        tokio::time::sleep(Duration::from_millis(5)).await;
        job = client.get(&path).await.unwrap();
    }
    let took = t.elapsed();
    assert_eq!(job["state"], "succeeded", "{job}");
    (took, job)
}

/// A seeded job on the real executor, the same job again (a cache hit), and
/// the same job with `"cache": false` (run again): the time to `succeeded`.
async fn cache_phase(dir: &Path, trials: u64) {
    let cluster = LocalCluster::start(Path::new(EXE), dir, 1, &[], &[]).unwrap();
    cluster.wait_ready(1, 1, 1, Duration::from_secs(120)).await.unwrap();
    let client = cluster.client(1);
    let (mut run, mut hit, mut rerun) = (Vec::new(), Vec::new(), Vec::new());
    for seed in 0..trials {
        let body =
            json!({ "prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 8, "seed": 1000 + seed });
        let (t_run, _) = submit_until_done(&client, &body).await;
        let (t_hit, job) = submit_until_done(&client, &body).await;
        assert_eq!(job["attempt"], 0, "not a cache hit: {job}");
        let mut uncached = body.clone();
        uncached["cache"] = json!(false);
        let (t_rerun, job) = submit_until_done(&client, &uncached).await;
        assert_eq!(job["attempt"], 1, "served from the cache: {job}");
        run.push(ms(t_run));
        hit.push(ms(t_hit));
        rerun.push(ms(t_rerun));
    }
    let (run, hit, rerun) = (median(&run), median(&hit), median(&rerun));
    println!("result cache, 1 node, built-in model 64x64, 8 steps on the CPU, median of {trials} seeds:");
    println!(
        "  first run {run:.1} ms, identical job (cache hit) {hit:.1} ms, same job with \"cache\": false {rerun:.1} ms"
    );
    println!("  a hit takes {:.3}x the time of running the job again", hit / rerun);
}

// One client thread: the clients share the 2 cores with the three nodes.
#[tokio::main(flavor = "current_thread")]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` lists benchmarks; this one has no unit tests.
    }
    let secs = env_u64("RAFTGEN_BENCH_SECS", 5);
    let rounds = env_u64("RAFTGEN_BENCH_ROUNDS", 3);
    let dir = tempfile::tempdir().unwrap();
    let files = Files::make(dir.path());
    println!("raftgen production-features benchmark: 3 nodes on loopback, {secs} s per phase, {rounds} rounds");

    // figures[variant][phase] = one Phase per round.
    let mut figures: Vec<Vec<Vec<Phase>>> =
        VARIANTS.iter().map(|_| PHASES.iter().map(|_| Vec::new()).collect()).collect();
    for round in 0..rounds as usize {
        // Each round starts with a different variant, so none always follows
        // the same one (and the disk writeback its cluster left behind).
        for vi in (0..VARIANTS.len()).map(|i| (i + round) % VARIANTS.len()) {
            let v = &VARIANTS[vi];
            let data = dir.path().join(format!("r{round}-v{vi}"));
            let r = Running::start(v, &files, &data).await;
            let leader = r.wait_ready().await;
            let follower = (1..=3).find(|i| *i != leader).unwrap();
            figures[vi][0].push(load(&r, &[follower], 1, secs).await);
            figures[vi][1].push(load(&r, &[1, 2, 3], 16, secs).await);
            if round + 1 == rounds as usize && vi == 0 {
                scrape_phase(&r, follower).await;
            }
            let last = [&figures[vi][0], &figures[vi][1]].map(|p| p.last().map_or(0.0, |p| p.per_s));
            println!(
                "round {} {:<16} {:>8.0} /s (1 client) {:>8.0} /s (16 clients)",
                round + 1,
                v.name,
                last[0],
                last[1]
            );
            drop(r);
            std::fs::remove_dir_all(&data).unwrap();
        }
    }

    println!();
    println!("median over rounds; ratios against plain from the same rounds");
    println!(
        "{:<24} {:<16} {:>10} {:>8} {:>8} {:>8} {:>10} {:>10}",
        "phase", "variant", "submits/s", "p50 ms", "p99 ms", "errors", "rate/plain", "p50/plain"
    );
    for (pi, phase) in PHASES.iter().enumerate() {
        let stat = |vi: usize, f: fn(&Phase) -> f64| median(&figures[vi][pi].iter().map(f).collect::<Vec<_>>());
        let (base_rate, base_p50) = (stat(0, |p| p.per_s), stat(0, |p| p.p50_ms));
        for (vi, v) in VARIANTS.iter().enumerate() {
            let errors: usize = figures[vi][pi].iter().map(|p| p.errors).sum();
            println!(
                "{:<24} {:<16} {:>10.0} {:>8.2} {:>8.2} {:>8} {:>10.3} {:>10.3}",
                phase,
                v.name,
                stat(vi, |p| p.per_s),
                stat(vi, |p| p.p50_ms),
                stat(vi, |p| p.p99_ms),
                errors,
                stat(vi, |p| p.per_s) / base_rate,
                stat(vi, |p| p.p50_ms) / base_p50
            );
        }
    }
    println!();
    cache_phase(&dir.path().join("cache"), env_u64("RAFTGEN_BENCH_CACHE_TRIALS", 3)).await;
}
