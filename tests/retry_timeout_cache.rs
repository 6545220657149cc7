//! Jobs beyond the happy path, on real nodes: a run that hangs is stopped by
//! the execution timeout, broken runs are retried up to `--max-attempts`, and
//! a job identical to a succeeded fixed-seed one is answered from the result
//! cache. The hangs and breaks are injected by the test-pattern executor (a
//! TEST DOUBLE, see `src/executor/test_pattern.rs`).

use std::time::Duration;

use serde_json::{json, Value};

mod common;

use common::{scratch, start, wait_until};

const LONG: Duration = Duration::from_secs(60);

fn events(job: &Value) -> Vec<&str> {
    job["history"].as_array().unwrap().iter().map(|e| e["event"].as_str().unwrap()).collect()
}

fn errors_of<'a>(job: &'a Value, event: &str) -> Vec<&'a str> {
    job["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == event)
        .map(|e| e["error"].as_str().unwrap())
        .collect()
}

fn id(job: &Value) -> String {
    job["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_run_times_out_and_the_node_runs_the_next_job() {
    let dir = scratch();
    let cluster = start(
        &dir.path,
        1,
        &[
            "--executor",
            "test-pattern",
            "--test-pattern-delay-ms",
            "50",
            "--test-pattern-stall-first",
            "1",
            "--job-timeout-ms",
            "1000",
            "--slots",
            "1",
        ],
    );
    cluster.wait_ready(1, 1, 1, LONG).await.unwrap();
    let client = cluster.client(1);
    let body = |p: &str| json!({ "prompt": p, "width": 64, "height": 64, "steps": 4 });

    // The first run hangs (until cancelled): the job fails with the reason.
    let hung = client.submit(&body("hangs"), None).await.unwrap();
    let job = client.wait_job(&id(&hung), LONG, |_| {}).await.unwrap();
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["error"], "execution timed out after 1000 ms", "{job}");
    assert_eq!(job["attempt"], 1, "a timeout is not retried: {job}");
    assert_eq!(events(&job), ["submitted", "assigned", "started", "failed"], "{job}");

    // The node's only slot and lane are free again: the next job runs there.
    let next = client.submit(&body("runs"), None).await.unwrap();
    let job = client.wait_job(&id(&next), LONG, |_| {}).await.unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["node"], 1, "{job}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_runs_are_retried_until_max_attempts() {
    let dir = scratch();
    // Runs 1 to 4 break; 3 attempts per job.
    let cluster = start(
        &dir.path,
        1,
        &[
            "--executor",
            "test-pattern",
            "--test-pattern-delay-ms",
            "50",
            "--test-pattern-fail-first",
            "4",
            "--max-attempts",
            "3",
        ],
    );
    cluster.wait_ready(1, 1, 1, LONG).await.unwrap();
    let client = cluster.client(1);
    let body = |p: &str| json!({ "prompt": p, "width": 64, "height": 64, "steps": 4 });

    // Runs 1, 2 and 3: the job gives up with the last error.
    let first = client.submit(&body("unlucky"), None).await.unwrap();
    let job = client.wait_job(&id(&first), LONG, |_| {}).await.unwrap();
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["attempt"], 3, "{job}");
    assert_eq!(job["error"], "gave up after 3 attempts: test pattern: injected failure of run 3", "{job}");
    assert_eq!(
        errors_of(&job, "attempt_failed"),
        ["test pattern: injected failure of run 1", "test pattern: injected failure of run 2"],
        "{job}"
    );

    // Run 4 breaks, run 5 works: the job succeeds on its second attempt.
    let second = client.submit(&body("lucky"), None).await.unwrap();
    let job = client.wait_job(&id(&second), LONG, |_| {}).await.unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["attempt"], 2, "{job}");
    assert_eq!(job["error"], Value::Null, "{job}");
    assert_eq!(
        events(&job),
        ["submitted", "assigned", "started", "attempt_failed", "assigned", "started", "succeeded"],
        "{job}"
    );
}

/// `raftgen_cache_hits_total{model="test-pattern"}` on one node, if exported.
async fn cache_hits(url: &str) -> Option<f64> {
    let text = reqwest::get(format!("{url}/metrics")).await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix("raftgen_cache_hits_total{model=\"test-pattern\"} ")?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identical_fixed_seed_job_is_answered_from_the_cache() {
    let dir = scratch();
    let cluster = start(&dir.path, 3, &["--executor", "test-pattern", "--test-pattern-delay-ms", "50"]);
    let leader = cluster.wait_ready(1, 3, 1, LONG).await.unwrap();
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let other = (1..=3).find(|i| *i != leader && *i != follower).unwrap();
    let body = json!({ "prompt": "a cached cat", "width": 64, "height": 64, "steps": 3, "seed": 1234 });

    let first = cluster.client(follower).submit(&body, None).await.unwrap();
    let first_id = id(&first);
    let job = cluster.client(follower).wait_job(&first_id, LONG, |_| {}).await.unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    let image = cluster.client(follower).get_bytes(&format!("/v1/jobs/{first_id}/image")).await.unwrap();

    // The same request through another node: succeeded in the answer itself,
    // never assigned, with the first job's image.
    let hit = cluster.client(other).submit(&body, None).await.unwrap();
    assert_ne!(id(&hit), first_id);
    assert_eq!(hit["state"], "succeeded", "{hit}");
    assert_eq!((&hit["attempt"], &hit["node"]), (&json!(0), &Value::Null), "{hit}");
    assert_eq!(events(&hit), ["submitted", "cache_hit"], "{hit}");
    assert_eq!(hit["history"][1]["source"], first_id.as_str(), "{hit}");
    assert_eq!(hit["model_hash"], job["model_hash"], "{hit}");
    let hit_image = cluster.client(leader).get_bytes(&format!("/v1/jobs/{}/image", id(&hit))).await.unwrap();
    assert!(hit_image == image, "the cached image differs from the first one");

    // Every node counts the hit (a replicated count).
    for node in 1..=3 {
        let url = cluster.url(node);
        wait_until("the cache hit in /metrics", LONG, || {
            let url = url.clone();
            async move { cache_hits(&url).await == Some(1.0) }
        })
        .await;
    }

    // `"cache": false` runs it again (the test pattern makes the same bytes).
    let mut uncached = body.clone();
    uncached["cache"] = json!(false);
    let again = cluster.client(follower).submit(&uncached, None).await.unwrap();
    assert_eq!(again["request"]["cache"], false, "{again}");
    let job = cluster.client(follower).wait_job(&id(&again), LONG, |_| {}).await.unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["attempt"], 1, "{job}");
    assert!(!events(&job).contains(&"cache_hit"), "{job}");
    let again_image = cluster.client(follower).get_bytes(&format!("/v1/jobs/{}/image", id(&again))).await.unwrap();
    assert!(again_image == image);

    // Without a fixed seed there is no cache: the leader draws a seed.
    let unseeded = json!({ "prompt": "a cached cat", "width": 64, "height": 64, "steps": 3 });
    let fresh = cluster.client(follower).submit(&unseeded, None).await.unwrap();
    assert_ne!(fresh["state"], "succeeded", "{fresh}");
    cluster.client(follower).wait_job(&id(&fresh), LONG, |_| {}).await.unwrap();
    assert_eq!(cache_hits(&cluster.url(leader)).await, Some(1.0));

    // A `cache` that is not a boolean is a 400 naming it.
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/jobs", cluster.url(follower)))
        .json(&json!({ "prompt": "x", "cache": "yes" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["field"], "cache", "{err}");

    // The CLI: a plain `submit` of the same request is a hit, `--no-cache` is not.
    let cli = |extra: &[&str]| {
        let url = cluster.url(follower);
        let out_file = dir.path.join(format!("cli-{}.png", extra.len()));
        let mut args = vec!["submit", "--server", url.as_str(), "--width", "64", "--height", "64", "--steps", "3"];
        args.extend(["--seed", "1234", "--wait", "--output", "json", "--out", out_file.to_str().unwrap()]);
        args.extend(extra);
        args.push("a cached cat");
        let out = std::process::Command::new(common::EXE).args(&args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["job"].clone()
    };
    let hit = tokio::task::block_in_place(|| cli(&[]));
    assert!(events(&hit).contains(&"cache_hit"), "{hit}");
    let miss = tokio::task::block_in_place(|| cli(&["--no-cache"]));
    assert_eq!(miss["request"]["cache"], false, "{miss}");
    assert!(!events(&miss).contains(&"cache_hit"), "{miss}");
}
