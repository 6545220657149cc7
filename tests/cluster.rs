//! Cluster tests: real `raftgen node` processes on 127.0.0.1, driven over HTTP.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raftgen_raft::command::{Outcome, Rejection};
use raftgen_raft::job::JobId;
use raftgen_raft::network::SECRET_HEADER;
use raftgen_raft::{codec, Command, Response};
use serde_json::{json, Value};

mod common;

use common::{scratch, start, wait_until};

fn count_events(job: &Value, event: &str) -> usize {
    job["history"].as_array().unwrap().iter().filter(|e| e["event"] == event).count()
}

/// The acceptance test: 50 jobs through a follower, SIGKILL the leader while
/// they are in flight, every acknowledged job succeeds exactly once, images are
/// identical on every node, and the killed node restarts from its data dir and
/// catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_sigkill_loses_nothing_and_duplicates_nothing() {
    let dir = scratch();
    let mut cluster = start(
        &dir.path,
        3,
        &["--executor", "test-pattern", "--test-pattern-delay-ms", "150", "--slots", "2", "--node-timeout-ms", "2000"],
    );
    let leader = cluster.wait_ready(1, 3, 2, Duration::from_secs(60)).await.unwrap();
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let client = Arc::new(cluster.client(follower));

    // 50 submissions from 5 concurrent clients, each with its idempotency key.
    let mut tasks = Vec::new();
    for c in 0..5 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for k in 0..10 {
                let n = c * 10 + k;
                let body = json!({ "prompt": format!("job {n}"), "width": 64, "height": 64, "steps": 5, "seed": n });
                let job = client.submit(&body, Some(&format!("key-{n}"))).await;
                ids.push((n, job.map(|j| j["id"].as_str().unwrap().to_string())));
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
            ids
        }));
    }
    // Kill the leader while submissions and executions are in flight.
    tokio::time::sleep(Duration::from_millis(250)).await;
    cluster.kill(leader).unwrap();
    let killed_at = Instant::now();

    let mut acked: BTreeMap<u64, String> = BTreeMap::new();
    for t in tasks {
        for (n, id) in t.await.unwrap() {
            let id = id.unwrap_or_else(|e| panic!("submission {n} was not acknowledged across the failover: {e}"));
            acked.insert(n, id);
        }
    }
    assert_eq!(acked.len(), 50);
    let unique: BTreeSet<&String> = acked.values().collect();
    assert_eq!(unique.len(), 50, "two submissions got the same job");

    let survivors: Vec<u64> = cluster.running_ids();
    let deadline = Instant::now() + Duration::from_secs(10);
    let new_leader = loop {
        match cluster.leader(follower).await {
            Ok(l) if l != leader => break l,
            _ => assert!(Instant::now() < deadline, "no new leader"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("leader {leader} killed; node {new_leader} leads after {} ms", killed_at.elapsed().as_millis());

    // Every acknowledged job succeeds, as seen from every survivor.
    for &node in &survivors {
        let c = cluster.client(node);
        for id in acked.values() {
            let job = c.wait_job(id, Duration::from_secs(120), |_| {}).await.unwrap();
            assert_eq!(job["state"], "succeeded", "job {id} on node {node}: {job}");
        }
    }

    // Restart the killed node with its original command line; it catches up.
    cluster.spawn(leader).unwrap();
    let restarted = cluster.client(leader);
    wait_until("the restarted node to catch up", Duration::from_secs(60), || {
        let restarted = &restarted;
        let acked = &acked;
        async move {
            for id in acked.values() {
                match restarted.get(&format!("/v1/jobs/{id}")).await {
                    Ok(job) if job["state"] == "succeeded" => {}
                    _ => return false,
                }
            }
            true
        }
    })
    .await;

    // Exactly once, and the same everywhere: one success, identical histories
    // and byte-identical images on all three nodes. Only the killed node's
    // attempts were re-queued: jobs running on live nodes were not re-run.
    for id in acked.values() {
        let job = cluster.client(new_leader).get(&format!("/v1/jobs/{id}")).await.unwrap();
        for event in job["history"].as_array().unwrap() {
            if event["event"] == "requeued" {
                assert_eq!(event["node"], leader, "job {id}: a live node's attempt was re-queued: {job}");
            }
        }
        let attempts = job["attempt"].as_u64().unwrap();
        assert_eq!(attempts as usize, 1 + count_events(&job, "requeued"), "job {id}: {job}");
    }
    for id in acked.values() {
        let mut reference: Option<(Value, Vec<u8>)> = None;
        for node in 1..=3 {
            let c = cluster.client(node);
            let job = c.get(&format!("/v1/jobs/{id}")).await.unwrap();
            assert_eq!(count_events(&job, "succeeded"), 1, "job {id} on node {node}: {job}");
            let png = c.get_bytes(&format!("/v1/jobs/{id}/image")).await.unwrap();
            assert!(png.starts_with(b"\x89PNG"), "not a PNG");
            match &reference {
                None => reference = Some((job["history"].clone(), png)),
                Some((history, image)) => {
                    assert_eq!(&job["history"], history, "job {id}: histories differ on node {node}");
                    assert!(image == &png, "job {id}: image differs on node {node}");
                }
            }
        }
    }
}

/// Posts a command to a node's internal write endpoint, as a forwarding
/// follower would (a batch of one).
async fn internal_write(url: &str, secret: &str, cmd: &Command) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{url}/raft/write"))
        .header(SECRET_HEADER, secret)
        .body(codec::encode(&vec![cmd]).unwrap())
        .send()
        .await
        .unwrap()
}

fn one_answer(bytes: &[u8]) -> Result<Response, raftgen::node::app::ForwardReject> {
    let mut answers: Vec<Result<raftgen::node::app::Committed, raftgen::node::app::ForwardReject>> =
        codec::decode(bytes).unwrap();
    assert_eq!(answers.len(), 1);
    answers.pop().unwrap().map(|c| c.response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_stale_completion_and_bad_input() {
    let dir = scratch();
    let cluster = start(&dir.path, 3, &["--executor", "test-pattern", "--test-pattern-delay-ms", "50"]);
    let leader = cluster.wait_ready(1, 3, 1, Duration::from_secs(60)).await.unwrap();
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let other = (1..=3).find(|i| *i != leader && *i != follower).unwrap();
    let body = json!({ "prompt": "same key", "width": 64, "height": 64, "steps": 2 });

    // Same key, through two different nodes: the same job.
    let a = cluster.client(follower).submit(&body, Some("k-1")).await.unwrap();
    let b = cluster.client(other).submit(&body, Some("k-1")).await.unwrap();
    assert_eq!(a["id"], b["id"]);
    // Same key, another request: refused, naming the header.
    let err = cluster.client(follower).submit(&json!({ "prompt": "another" }), Some("k-1")).await.unwrap_err();
    assert!(err.to_string().contains("422") && err.to_string().contains("Idempotency-Key"), "{err}");
    // No key: two jobs.
    let c = cluster.client(follower).submit(&body, None).await.unwrap();
    let d = cluster.client(follower).submit(&body, None).await.unwrap();
    assert_ne!(c["id"], d["id"]);

    // Wait for the first job to succeed, then report a stale completion for it.
    let id = a["id"].as_str().unwrap().to_string();
    let job = cluster.client(follower).wait_job(&id, Duration::from_secs(60), |_| {}).await.unwrap();
    assert_eq!(job["state"], "succeeded");
    let image = cluster.client(follower).get_bytes(&format!("/v1/jobs/{id}/image")).await.unwrap();
    let node = job["node"].as_u64().unwrap();
    let attempt = job["attempt"].as_u64().unwrap() as u32;
    let job_id: JobId = id.parse().unwrap();
    let stale = Command::Complete {
        job: job_id,
        node: (node % 3) + 1,
        attempt,
        outcome: Outcome::Succeeded {
            result: raftgen_raft::result::ResultMeta {
                sha256: raftgen_raft::result::ResultHash::of(b"\x89PNG forged"),
                bytes: 12,
                width: 8,
                height: 8,
                location: raftgen_raft::result::Location::Nodes([(node % 3) + 1].into()),
            },
            model_hash: String::new(),
            notes: Vec::new(),
        },
    };
    let resp = internal_write(&cluster.url(leader), &cluster.secret, &stale).await;
    assert!(resp.status().is_success());
    let answer = one_answer(&resp.bytes().await.unwrap());
    match answer {
        Ok(Response::Rejected(Rejection::StaleAttempt { .. })) => {}
        other => panic!("a stale completion was not rejected: {other:?}"),
    }
    // A follower does not propose; it names the leader (the forwarding node retries there).
    let resp = internal_write(&cluster.url(follower), &cluster.secret, &stale).await;
    let answer = one_answer(&resp.bytes().await.unwrap());
    assert!(matches!(answer, Err(raftgen::node::app::ForwardReject::NotLeader { leader: Some(l) }) if l == leader));
    // An older attempt number is rejected too.
    let older = Command::Complete {
        job: job_id,
        node,
        attempt: attempt - 1,
        outcome: Outcome::Failed { error: "x".into(), retryable: false },
    };
    let resp = internal_write(&cluster.url(leader), &cluster.secret, &older).await;
    let answer = one_answer(&resp.bytes().await.unwrap());
    assert!(matches!(answer, Ok(Response::Rejected(Rejection::StaleAttempt { .. }))), "{answer:?}");
    // The rejections are on record and the result is untouched.
    let job = cluster.client(leader).get(&format!("/v1/jobs/{id}")).await.unwrap();
    assert_eq!(job["state"], "succeeded");
    assert_eq!(count_events(&job, "succeeded"), 1);
    assert_eq!(count_events(&job, "completion_rejected"), 2, "{job}");
    let after = cluster.client(leader).get_bytes(&format!("/v1/jobs/{id}/image")).await.unwrap();
    assert!(after == image);
    // Without the secret, internal writes are refused.
    let resp = internal_write(&cluster.url(follower), "wrong", &stale).await;
    assert_eq!(resp.status(), 401);

    // Bad input: 4xx with a JSON body naming the field; nothing accepted is lost.
    let http = reqwest::Client::new();
    let url = format!("{}/v1/jobs", cluster.url(follower));
    let cases: Vec<(Value, &str)> = vec![
        (json!({ "prompt": "x", "colour": "red" }), "colour"),
        (json!({ "negative_prompt": "x" }), "prompt"),
        (json!({ "prompt": "x", "width": 0 }), "width"),
        (json!({ "prompt": "x", "steps": 10000 }), "steps"),
        (json!({ "prompt": "x", "height": "tall" }), "height"),
        (json!({ "prompt": "x", "model": "sdxl-nope" }), "model"),
        (json!({ "prompt": "" }), "prompt"),
        (json!(["not", "an", "object"]), "body"),
    ];
    for (body, field) in cases {
        let resp = http.post(&url).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 400, "{body}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["field"], field, "{body}: {err}");
    }
    let resp = http.post(&url).body(vec![b' '; 10 << 20]).send().await.unwrap();
    assert_eq!(resp.status(), 413);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["field"], "body");
    let resp = http.post(&url).body("{not json").send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let resp = http.get(format!("{}/v1/jobs/zzz", cluster.url(follower))).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let resp = http.get(format!("{}/v1/jobs?state=done", cluster.url(follower))).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    // Wrong method and unknown path: JSON errors too.
    for (resp, status) in [
        (http.put(&url).body("{}").send().await.unwrap(), 405),
        (http.get(format!("{}/v2/nothing", cluster.url(follower))).send().await.unwrap(), 404),
    ] {
        assert_eq!(resp.status(), status);
        let err: Value = resp.json().await.unwrap();
        assert!(err["error"]["message"].is_string(), "{err}");
    }
    // The jobs accepted before are all still there.
    let list = cluster.client(leader).get("/v1/jobs?limit=100").await.unwrap();
    let ids: BTreeSet<&str> = list["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
    for j in [&a, &c, &d] {
        assert!(ids.contains(j["id"].as_str().unwrap()));
    }
    assert_eq!(list["total"], 3);
    // Read your writes: a job acknowledged by a follower is at once readable
    // there (the follower waits to apply its own write before answering).
    for i in 0..30 {
        let job =
            cluster.client(other).submit(&json!({ "prompt": format!("ryw {i}"), "steps": 1 }), None).await.unwrap();
        let id = job["id"].as_str().unwrap();
        let seen = cluster.client(other).get(&format!("/v1/jobs/{id}")).await;
        assert!(seen.is_ok(), "job {id} acknowledged by node {other} but not readable there: {seen:?}");
    }
}

/// A follower that dies while executing loses its attempt to the leader's
/// health check: the job is re-queued and finished elsewhere as attempt 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_executor_s_job_is_requeued_and_finished_elsewhere() {
    let dir = scratch();
    let mut cluster = start(
        &dir.path,
        3,
        &["--executor", "test-pattern", "--test-pattern-delay-ms", "1500", "--node-timeout-ms", "1000"],
    );
    let leader = cluster.wait_ready(1, 3, 1, Duration::from_secs(60)).await.unwrap();
    let client = cluster.client(leader);
    let mut ids = Vec::new();
    for n in 0..3 {
        let body = json!({ "prompt": format!("slow {n}"), "width": 64, "height": 64, "steps": 3 });
        ids.push(client.submit(&body, None).await.unwrap()["id"].as_str().unwrap().to_string());
    }
    // Wait until some follower is running one of them, then kill that follower.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (victim_job, victim) = loop {
        let mut found = None;
        for id in &ids {
            let job = client.get(&format!("/v1/jobs/{id}")).await.unwrap();
            let node = job["node"].as_u64();
            if job["state"] == "running" && node.is_some_and(|n| n != leader) {
                found = Some((id.clone(), node.unwrap()));
            }
        }
        if let Some(f) = found {
            break f;
        }
        assert!(Instant::now() < deadline, "no job ran on a follower");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    cluster.kill(victim).unwrap();
    let job = client.wait_job(&victim_job, Duration::from_secs(60), |_| {}).await.unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["attempt"], 2, "{job}");
    assert_ne!(job["node"], victim, "{job}");
    assert_eq!(count_events(&job, "requeued"), 1, "{job}");
    assert_eq!(count_events(&job, "succeeded"), 1, "{job}");
    for id in &ids {
        let job = client.wait_job(id, Duration::from_secs(60), |_| {}).await.unwrap();
        assert_eq!(job["state"], "succeeded", "{job}");
    }
}
