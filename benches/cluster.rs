//! Cluster benchmark: durable submissions per second, submit latency, and
//! failover time, against a real 3-node cluster on loopback.
//!
//!     cargo bench --bench cluster
//!
//! Environment: RAFTGEN_BENCH_SECS (seconds per load phase, default 5),
//! RAFTGEN_BENCH_FAILOVER_TRIALS (default 7), RAFTGEN_BENCH_NODE_ARGS (more
//! node flags, split on spaces, e.g. `--unsafe-no-fsync` to price the sync).
//!
//! Nodes run the test-pattern executor (a test double) with `--slots 0`, so
//! jobs queue but never run: this measures the submit path alone. Every 202
//! counted here was committed by a quorum and flushed to disk on each of them.
//! The clients share the machine's 2 cores with the three nodes.

use std::path::Path;
use std::time::{Duration, Instant};

use raftgen::cli::local::LocalCluster;
use serde_json::json;

mod common;

use common::load::{self, Phase, Proto};
use common::{env_u64, ms, percentile};

const EXE: &str = env!("CARGO_BIN_EXE_raftgen");

/// `clients` concurrent raftgen clients spread over `urls` (the shared load
/// generator, `common::load`).
async fn load(urls: &[String], clients: usize, secs: u64, name: String) -> Phase {
    load::run(Proto::Raftgen, urls, clients, secs as f64, name).await
}

/// The leader, once all three nodes agree on it and it says so itself.
async fn settled_leader(cluster: &LocalCluster) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut views = Vec::new();
        for i in 1..=3 {
            views.push(cluster.leader(i).await.ok());
        }
        if let Some(Some(l)) = views.first() {
            if views.iter().all(|v| *v == Some(*l)) {
                return *l;
            }
        }
        assert!(Instant::now() < deadline, "no settled leader: {views:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn failover_trial(cluster: &mut LocalCluster) -> Duration {
    cluster.wait_ready(1, 3, 0, Duration::from_secs(30)).await.unwrap();
    // Let the restarted node catch up and the leadership settle before the kill.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let leader = settled_leader(cluster).await;
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let client = cluster.client(follower);
    client.submit(&json!({ "prompt": "warm-up" }), None).await.unwrap();
    cluster.kill(leader).unwrap();
    let killed = Instant::now();
    // This submission starts after the kill; the follower rides out the
    // election and answers once the new leader has committed it.
    client.submit(&json!({ "prompt": "after the kill" }), None).await.unwrap();
    let took = killed.elapsed();
    let new_leader = cluster.leader(follower).await.unwrap();
    assert_ne!(new_leader, leader, "the acknowledgement did not come from a new leader");
    cluster.spawn(leader).unwrap();
    took
}

// One client thread: the clients share the 2 cores with the three nodes.
#[tokio::main(flavor = "current_thread")]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` lists benchmarks; this one has no unit tests.
    }
    let secs = env_u64("RAFTGEN_BENCH_SECS", 5);
    let trials = env_u64("RAFTGEN_BENCH_FAILOVER_TRIALS", 7);
    let dir = tempfile::tempdir().unwrap();
    let more = std::env::var("RAFTGEN_BENCH_NODE_ARGS").unwrap_or_default();
    let mut extra = vec!["--executor", "test-pattern", "--slots", "0", "--max-queue-depth", "100000000"];
    extra.extend(more.split_whitespace());
    let mut cluster = LocalCluster::start(Path::new(EXE), dir.path(), 3, &[], &extra).unwrap();
    let leader = cluster.wait_ready(1, 3, 0, Duration::from_secs(60)).await.unwrap();
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let all: Vec<String> = (1..=3).map(|i| cluster.url(i)).collect();
    println!("raftgen cluster benchmark: 3 nodes on loopback, {secs} s per phase, leader = node {leader}, node args {more:?}");

    let phases = vec![
        load(&[cluster.url(leader)], 1, secs, "1 client -> leader".into()).await,
        load(&[cluster.url(follower)], 1, secs, "1 client -> follower".into()).await,
        load(&all, 16, secs, "16 clients -> all nodes".into()).await,
        load(&all, 64, secs, "64 clients -> all nodes".into()).await,
        load(&[cluster.url(leader)], 64, secs, "64 clients -> leader".into()).await,
    ];
    println!("{:<26} {:>12} {:>9} {:>9} {:>9} {:>7}", "phase", "submits/s", "p50 ms", "p99 ms", "max ms", "errors");
    for p in &phases {
        println!(
            "{:<26} {:>12.0} {:>9.2} {:>9.2} {:>9.2} {:>7}",
            p.name,
            p.ok as f64 / p.secs,
            ms(percentile(&p.latencies, 0.50)),
            ms(percentile(&p.latencies, 0.99)),
            ms(percentile(&p.latencies, 1.0)),
            p.errors
        );
    }

    let mut failovers = Vec::new();
    for t in 0..trials {
        let took = failover_trial(&mut cluster).await;
        println!("failover trial {}: leader SIGKILL -> first acknowledged submission: {:.0} ms", t + 1, ms(took));
        failovers.push(took);
    }
    failovers.sort();
    println!(
        "failover over {} trials: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        failovers.len(),
        ms(percentile(&failovers, 0.50)),
        ms(percentile(&failovers, 0.99)),
        ms(percentile(&failovers, 1.0)),
    );
}
