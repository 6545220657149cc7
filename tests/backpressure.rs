//! Backpressure: beyond `--max-queue-depth` queued jobs, submissions are
//! refused with 429 and `Retry-After` (through any node), nothing is added to
//! the log, and the cluster keeps answering reads and status.

use std::time::Duration;

use serde_json::{json, Value};

mod common;

use common::{scratch, start};

const MAX_QUEUE_DEPTH: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_refuses_submissions_with_429_and_stays_responsive() {
    let dir = scratch();
    // Jobs that take a minute: the three slots stay busy, the queue fills.
    let cluster = start(
        &dir.path,
        3,
        &["--executor", "test-pattern", "--test-pattern-delay-ms", "60000", "--max-queue-depth", "5"],
    );
    let leader = cluster.wait_ready(1, 3, 1, Duration::from_secs(60)).await.unwrap();
    let follower = (1..=3).find(|n| *n != leader).unwrap();
    let http = reqwest::Client::new();
    let submit_url = format!("{}/v1/jobs", cluster.url(follower));
    let body = |n: usize| json!({ "prompt": format!("job {n}"), "width": 64, "height": 64, "steps": 2 });

    // Three jobs to run (one per slot), then fill the queue.
    let mut accepted = Vec::new();
    for n in 0..3 {
        let resp = http.post(&submit_url).json(&body(n)).send().await.unwrap();
        assert_eq!(resp.status(), 202);
        accepted.push(resp.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string());
    }
    let client = cluster.client(follower);
    common::wait_until("three jobs running", Duration::from_secs(30), || async {
        let jobs = client.get("/v1/jobs?state=running").await.unwrap();
        jobs["jobs"].as_array().map_or(0, Vec::len) == 3
    })
    .await;
    for n in 3..3 + MAX_QUEUE_DEPTH {
        let resp = http.post(&submit_url).json(&body(n)).send().await.unwrap();
        assert_eq!(resp.status(), 202, "{:?}", resp.text().await);
        accepted.push(resp.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string());
    }

    // Now every node refuses, with the standard answer, concurrently.
    let mut refusals = Vec::new();
    for n in 0..30 {
        let (http, url) = (http.clone(), format!("{}/v1/jobs", cluster.url(1 + (n % 3) as u64)));
        refusals.push(tokio::spawn(async move { http.post(url).json(&body(100 + n)).send().await.unwrap() }));
    }
    for r in refusals {
        let resp = r.await.unwrap();
        assert_eq!(resp.status(), 429);
        let retry_after: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
        assert!(retry_after >= 1);
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["code"], "queue_full", "{err}");
    }

    // Reads and status still answer, and the log holds only the accepted jobs.
    for id in 1..=3 {
        let c = cluster.client(id);
        let view = c.get("/v1/cluster").await.unwrap();
        assert_eq!(view["queue_depth"], MAX_QUEUE_DEPTH, "{view}");
        assert_eq!(reqwest::get(format!("{}/healthz", cluster.url(id))).await.unwrap().status(), 200);
        let metrics = reqwest::get(format!("{}/metrics", cluster.url(id))).await.unwrap().text().await.unwrap();
        assert!(metrics.contains("raftgen_queue_depth{priority=\"0\"} 5"), "{metrics}");
    }
    let all = client.get("/v1/jobs?limit=100").await.unwrap();
    assert_eq!(all["jobs"].as_array().unwrap().len(), accepted.len(), "{all}");

    // Room again once a job leaves the queue.
    cluster.client(leader).delete(&format!("/v1/jobs/{}", accepted[3]), None).await.unwrap();
    let resp = http.post(&submit_url).json(&body(999)).send().await.unwrap();
    assert_eq!(resp.status(), 202);
}
