//! Leadership stays put: a 3-node cluster on this machine's 2 cores keeps
//! one leader and one term while idle, and while every node's executor is
//! busy with the built-in model (issue 15, item 4). Elections here are
//! spurious by construction (no node is killed or paused), so the test
//! counts terms: any change of `raftgen_raft_term` on any node is one.
//!
//! `cargo test` runs 90 s idle + 90 s busy. The documented long run is
//! `RAFTGEN_STABILITY_SECS=1800 cargo test --release --test stability -- --nocapture`
//! (30 minutes each). `RAFTGEN_STABILITY_HOGS=N` adds N threads spinning
//! at normal priority for the whole test (other tenants of a shared machine),
//! and `RAFTGEN_STABILITY_NODE_ARGS` passes flags to every node.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use raftgen::cli::local::LocalCluster;
use serde_json::json;

mod common;

use common::{scratch, start};

fn phase() -> Duration {
    let secs = std::env::var("RAFTGEN_STABILITY_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(90);
    Duration::from_secs(secs)
}

/// Each node's current term and the leader it knows, from its /metrics.
async fn terms(cluster: &LocalCluster) -> Vec<(u64, u64, u64)> {
    let mut out = Vec::new();
    for id in 1..=3 {
        let text = String::from_utf8(cluster.client(id).get_bytes("/metrics").await.unwrap()).unwrap();
        let value = |name: &str| -> u64 {
            let line = text
                .lines()
                .find(|l| l.split_whitespace().next() == Some(name))
                .unwrap_or_else(|| panic!("node {id}: no {name} in /metrics"));
            line.split_whitespace().nth(1).unwrap().parse::<f64>().unwrap() as u64
        };
        out.push((id, value("raftgen_raft_term"), value("raftgen_raft_leader_id")));
    }
    out
}

fn assert_same(before: &[(u64, u64, u64)], after: &[(u64, u64, u64)], what: &str, dir: &std::path::Path) {
    assert_eq!(
        before,
        after,
        "{what}: (node, term, leader) changed: an election happened with no node killed; logs in {}",
        dir.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_and_one_term_idle_and_with_every_executor_busy() {
    let dir = scratch();
    let node_args = std::env::var("RAFTGEN_STABILITY_NODE_ARGS").unwrap_or_default();
    let node_args: Vec<&str> = node_args.split_whitespace().collect();
    let cluster = start(&dir.path, 3, &node_args);
    let stop_hogs = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hogs = std::env::var("RAFTGEN_STABILITY_HOGS").ok().and_then(|s| s.parse().ok()).unwrap_or(0u32);
    for _ in 0..hogs {
        let stop = stop_hogs.clone();
        std::thread::spawn(move || {
            let mut x = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        });
    }
    let leader = cluster.wait_ready(1, 3, 1, Duration::from_secs(120)).await.unwrap();
    // Past the start (joins, the first registrations) before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let start_terms = terms(&cluster).await;
    assert!(start_terms.iter().all(|(_, _, l)| *l == leader), "{start_terms:?}");

    let phase = phase();
    eprintln!("idle for {} s", phase.as_secs());
    tokio::time::sleep(phase).await;
    let idle_terms = terms(&cluster).await;
    assert_same(&start_terms, &idle_terms, "idle", &dir.path);

    // Busy: every node runs the built-in model back to back. The queue is
    // kept at least as deep as the cluster's slots, submitting through
    // every node in turn.
    let model = cluster.client(leader).get("/v1/models").await.unwrap();
    let side = model["data"][0]["default_side_px"].as_u64().unwrap();
    let busy_until = Instant::now() + phase;
    let mut outstanding: VecDeque<String> = VecDeque::new();
    let (mut submitted, mut done, mut ran_on) = (0u64, 0u64, std::collections::BTreeSet::new());
    eprintln!("busy for {} s ({side} px images)", phase.as_secs());
    while Instant::now() < busy_until {
        while outstanding.len() < 12 {
            let via = cluster.client(submitted % 3 + 1);
            let body = json!({ "prompt": format!("a red circle on the left, job {submitted}"),
                               "width": side, "height": side, "cache": false });
            outstanding.push_back(via.submit(&body, None).await.unwrap()["id"].as_str().unwrap().to_string());
            submitted += 1;
        }
        let client = cluster.client(leader);
        let mut still = VecDeque::new();
        for id in outstanding.drain(..) {
            let job = client.get(&format!("/v1/jobs/{id}")).await.unwrap();
            match job["state"].as_str().unwrap() {
                "succeeded" => {
                    done += 1;
                    ran_on.insert(job["node"].as_u64().unwrap());
                }
                "failed" | "cancelled" => panic!("job {id} did not succeed: {job}"),
                _ => still.push_back(id),
            }
        }
        outstanding = still;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let busy_terms = terms(&cluster).await;
    stop_hogs.store(true, std::sync::atomic::Ordering::Relaxed);
    eprintln!("busy: {done} images made on nodes {ran_on:?}");
    assert_same(&start_terms, &busy_terms, "busy", &dir.path);
    assert_eq!(ran_on.len(), 3, "not every node's executor ran jobs ({done} done): {ran_on:?}");
}
