//! A node's life outside failures: a stop by SIGTERM drains it (running jobs
//! finish, or are handed back when they outlast `--shutdown-timeout-ms`), a
//! restarted node takes jobs again, `/readyz` answers 200 only once a
//! submission would be accepted, and `--log-format json` names the node and
//! the job on the lines about a job.

use std::time::{Duration, Instant};

use raftgen::cli::Client;
use serde_json::{json, Value};

mod common;

use common::{scratch, start};

fn count_events(job: &Value, event: &str) -> usize {
    job["history"].as_array().unwrap().iter().filter(|e| e["event"] == event).count()
}

async fn submit(client: &Client, prompt: &str) -> String {
    let body = json!({ "prompt": prompt, "width": 64, "height": 64, "steps": 4 });
    client.submit(&body, None).await.unwrap()["id"].as_str().unwrap().to_string()
}

/// Waits until job `id` is running and returns its node.
async fn running_node(client: &Client, id: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let job = client.get(&format!("/v1/jobs/{id}")).await.unwrap();
        if job["state"] == "running" {
            return job["node"].as_u64().unwrap();
        }
        assert!(Instant::now() < deadline, "job never ran: {job}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn readyz(url: &str) -> Option<(u16, Value)> {
    let resp = reqwest::get(format!("{url}/readyz")).await.ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.json().await.ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_lets_running_jobs_finish_and_a_restarted_node_takes_jobs_again() {
    let dir = scratch();
    let mut cluster = start(
        &dir.path,
        3,
        &["--executor", "test-pattern", "--test-pattern-delay-ms", "4000", "--shutdown-timeout-ms", "60000"],
    );
    let leader = cluster.wait_ready(1, 3, 1, Duration::from_secs(60)).await.unwrap();
    let client = cluster.client(leader);
    let id = submit(&client, "finish me").await;
    let victim = running_node(&client, &id).await;
    let observer = (1..=3).find(|n| *n != victim).unwrap();
    let victim_url = cluster.url(victim);

    cluster.terminate(victim).unwrap();
    // While it drains it answers, but is not ready for new clients.
    let mut saw_draining = false;
    while let Some((status, body)) = readyz(&victim_url).await {
        if status == 503 && body["draining"] == true {
            saw_draining = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(saw_draining, "the stopping node never reported draining on /readyz");
    let status = tokio::task::block_in_place(|| cluster.wait_exit(victim, Duration::from_secs(60))).unwrap();
    assert!(status.success(), "the node exited with {status}");

    let observer = cluster.client(observer);
    let job = observer.wait_job(&id, Duration::from_secs(30), |_| {}).await.unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["node"], victim, "the job finished on the stopping node: {job}");
    assert_eq!(job["attempt"], 1, "{job}");
    assert_eq!(count_events(&job, "requeued"), 0, "{job}");

    // Back from the stop: no longer draining, ready, and it runs jobs again.
    cluster.spawn(victim).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((200, _)) = readyz(&victim_url).await {
            break;
        }
        assert!(Instant::now() < deadline, "the restarted node never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let view = observer.get("/v1/cluster").await.unwrap();
    let member = view["members"].as_array().unwrap().iter().find(|m| m["id"] == victim).unwrap().clone();
    assert_eq!(member["draining"], false, "{view}");
    // Three slots in the cluster, three jobs: each node gets one.
    let ids = [submit(&observer, "a").await, submit(&observer, "b").await, submit(&observer, "c").await];
    let mut nodes = Vec::new();
    for id in &ids {
        let job = observer.wait_job(id, Duration::from_secs(60), |_| {}).await.unwrap();
        assert_eq!(job["state"], "succeeded", "{job}");
        nodes.push(job["node"].as_u64().unwrap());
    }
    assert!(nodes.contains(&victim), "the restarted node ran none of {nodes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_hands_back_jobs_that_outlast_the_shutdown_timeout() {
    let dir = scratch();
    let mut cluster = start(
        &dir.path,
        3,
        &[
            "--executor",
            "test-pattern",
            "--test-pattern-delay-ms",
            "6000",
            "--shutdown-timeout-ms",
            "300",
            // Long enough that only the hand-back, not the node-loss timeout,
            // can explain a quick re-queue.
            "--node-timeout-ms",
            "60000",
        ],
    );
    let leader = cluster.wait_ready(1, 3, 1, Duration::from_secs(60)).await.unwrap();
    let client = cluster.client(leader);
    let id = submit(&client, "hand me back").await;
    let victim = running_node(&client, &id).await;
    let observer = cluster.client((1..=3).find(|n| *n != victim).unwrap());
    let stopped_at = Instant::now();
    cluster.terminate(victim).unwrap();
    let status = tokio::task::block_in_place(|| cluster.wait_exit(victim, Duration::from_secs(30))).unwrap();
    assert!(status.success(), "the node exited with {status}");

    let job = observer.wait_job(&id, Duration::from_secs(60), |_| {}).await.unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_ne!(job["node"], victim, "{job}");
    assert_eq!(job["attempt"], 2, "{job}");
    let requeued: Vec<&Value> =
        job["history"].as_array().unwrap().iter().filter(|e| e["event"] == "requeued").collect();
    assert_eq!(requeued.len(), 1, "{job}");
    assert!(requeued[0]["reason"].as_str().unwrap().contains("shut down"), "{job}");
    assert!(stopped_at.elapsed() < Duration::from_secs(60), "handed back only after the node-loss timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_name_the_node_on_every_line_and_the_job_on_job_lines() {
    let dir = scratch();
    let mut cluster = start(&dir.path, 1, &["--executor", "test-pattern", "--log-format", "json"]);
    cluster.wait_ready(1, 1, 1, Duration::from_secs(60)).await.unwrap();
    let client = cluster.client(1);
    let id = submit(&client, "log me").await;
    let job = client.wait_job(&id, Duration::from_secs(30), |_| {}).await.unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    cluster.stop(1).unwrap();

    let log = std::fs::read_to_string(dir.path.join("n1.log")).unwrap();
    let mut job_lines = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        for field in ["timestamp", "level", "target", "message"] {
            assert!(v[field].is_string(), "no {field}: {line}");
        }
        // The node id is known once the command line is parsed.
        assert_eq!(v["node_id"], 1, "{line}");
        if v["message"].as_str().unwrap().contains(&id) || v["job_id"].is_string() {
            assert_eq!(v["job_id"], id.as_str(), "a line about the job without its job_id: {line}");
            job_lines += 1;
        }
    }
    assert!(job_lines > 0, "no line about job {id} in:\n{log}");
}

/// Until some node serves a model, `/readyz` is 503 and a submission through
/// any API is a 503 with `Retry-After` (a server state, not a client error);
/// once a node with an executor has registered, both say yes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_and_503_until_a_node_serves_a_model() {
    let dir = scratch();
    let mut cluster = start(&dir.path, 1, &["--executor", "none"]);
    cluster.wait_ready(1, 1, 0, Duration::from_secs(60)).await.unwrap();
    let http = reqwest::Client::new();
    let url = cluster.url(1);
    common::wait_until("node 1 to register", Duration::from_secs(30), || async {
        let c: Value = http.get(format!("{url}/v1/cluster")).send().await.unwrap().json().await.unwrap();
        c["members"][0]["executor"].is_string()
    })
    .await;
    let r = http.get(format!("{url}/readyz")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let body: Value = r.json().await.unwrap();
    assert_eq!((body["ready"].as_bool(), body["models"].as_u64()), (Some(false), Some(0)), "{body}");
    let submissions = [
        ("/v1/jobs", json!({"prompt": "x"})),
        ("/v1/images/generations", json!({"prompt": "x"})),
        ("/sdapi/v1/txt2img", json!({"prompt": "x"})),
    ];
    for (path, body) in &submissions {
        let r = http.post(format!("{url}{path}")).json(body).send().await.unwrap();
        let status = r.status().as_u16();
        let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
        let text = r.text().await.unwrap();
        assert_eq!((status, retry.as_deref()), (503, Some("1")), "{path}: {text}");
        assert!(text.contains("no node in the cluster serves a model yet"), "{path}: {text}");
    }

    cluster.add_node(2, 1, &["--executor", "test-pattern"]).unwrap();
    common::wait_until("/readyz to say ready", Duration::from_secs(60), || async {
        http.get(format!("{url}/readyz")).send().await.is_ok_and(|r| r.status().as_u16() == 200)
    })
    .await;
    let r = http.post(format!("{url}/v1/jobs")).json(&json!({"prompt": "x", "steps": 1})).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 202, "{}", r.text().await.unwrap());
}

/// The check of readiness: fresh 3-node clusters, a submission to
/// every node the moment all three answer `/readyz` 200: none refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_clusters_accept_submissions_the_moment_they_say_ready() {
    const CLUSTERS: usize = 20;
    let http = reqwest::Client::new();
    for round in 0..CLUSTERS {
        let dir = scratch();
        let cluster = start(&dir.path, 3, &["--executor", "test-pattern"]);
        let urls: Vec<String> = (1..=3).map(|id| cluster.url(id)).collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut ready = 0;
            for url in &urls {
                if http.get(format!("{url}/readyz")).send().await.is_ok_and(|r| r.status().as_u16() == 200) {
                    ready += 1;
                }
            }
            if ready == urls.len() {
                break;
            }
            assert!(Instant::now() < deadline, "cluster {round} never ready; logs in {}", dir.path.display());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for url in &urls {
            let r = http.post(format!("{url}/v1/jobs")).json(&json!({"prompt": "ready?", "steps": 1})).send().await;
            let r = r.unwrap();
            let status = r.status().as_u16();
            assert_eq!(status, 202, "cluster {round}, {url}: {}", r.text().await.unwrap());
        }
    }
}
