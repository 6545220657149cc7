//! Webhooks end to end: real `raftgen node` processes POST finished jobs to a
//! receiver on 127.0.0.1 that this test runs. The receiver checks every
//! signature itself (HMAC-SHA256 with the configured key, computed here, not
//! with raftgen's code) and answers as each test scripts it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

mod common;

use common::{scratch, start, wait_until};

const WEBHOOK_SECRET: &str = "receiver-shared-key";

/// One POST the receiver got.
#[derive(Clone, Debug)]
struct Hit {
    hook: String,
    event: String,
    delivery: String,
    /// The signature matched HMAC-SHA256(WEBHOOK_SECRET, "{timestamp}.{body}").
    signed: bool,
    body: Value,
    answered: u16,
}

/// How the receiver answers one hook.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Answer {
    Status(u16),
    /// Take the request and answer nothing for a long while (a receiver that
    /// hangs while the leader dies).
    Hang,
}

#[derive(Default)]
struct Inner {
    hits: Vec<Hit>,
    /// Scripted answers per hook, used up in order; then 200.
    script: HashMap<String, VecDeque<Answer>>,
}

#[derive(Clone, Default)]
struct Receiver {
    inner: Arc<Mutex<Inner>>,
    url: String,
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let receiver = Receiver { url, ..Default::default() };
        let app = Router::new().route("/hooks/{name}", post(receive)).with_state(receiver.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        receiver
    }

    fn hook(&self, name: &str, script: &[Answer]) -> String {
        self.inner.lock().unwrap().script.insert(name.into(), script.iter().copied().collect());
        format!("{}/hooks/{name}", self.url)
    }

    fn hits(&self, name: &str) -> Vec<Hit> {
        self.inner.lock().unwrap().hits.iter().filter(|h| h.hook == name).cloned().collect()
    }
}

fn signature_ok(headers: &HeaderMap, body: &[u8]) -> bool {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let timestamp = header("x-raftgen-timestamp");
    if timestamp.parse::<u64>().is_err() {
        return false;
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(WEBHOOK_SECRET.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    let expected: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    header("x-raftgen-signature") == format!("sha256={expected}")
}

async fn receive(State(r): State<Receiver>, Path(name): Path<String>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let answer = r.inner.lock().unwrap().script.get_mut(&name).and_then(VecDeque::pop_front);
    let answer = answer.unwrap_or(Answer::Status(200));
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let hit = Hit {
        hook: name,
        event: header("x-raftgen-event"),
        delivery: header("x-raftgen-delivery"),
        signed: signature_ok(&headers, &body),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        answered: match answer {
            Answer::Status(s) => s,
            Answer::Hang => 0,
        },
    };
    r.inner.lock().unwrap().hits.push(hit);
    match answer {
        Answer::Status(s) => StatusCode::from_u16(s).unwrap(),
        Answer::Hang => {
            tokio::time::sleep(Duration::from_secs(120)).await;
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
}

fn job_body(prompt: &str, webhook: &str) -> Value {
    json!({ "prompt": prompt, "width": 64, "height": 64, "steps": 3, "seed": 7, "webhook": webhook })
}

const NODE_ARGS: &[&str] = &[
    "--executor",
    "test-pattern",
    "--test-pattern-delay-ms",
    "50",
    "--webhook-secret",
    WEBHOOK_SECRET,
    "--webhook-max-attempts",
    "3",
];

/// The job, once `done` says its webhook record is settled.
async fn wait_webhook(client: &raftgen::cli::Client, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let job = client.get(&format!("/v1/jobs/{id}")).await.ok();
        match job {
            Some(job) if done(&job["webhook"]) => return job,
            job => assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}: {job:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_are_posted_signed_retried_and_given_up_on() {
    let receiver = Receiver::start().await;
    let dir = scratch();
    let cluster = start(&dir.path, 3, NODE_ARGS);
    let leader = cluster.wait_ready(1, 3, 1, Duration::from_secs(60)).await.unwrap();
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let client = cluster.client(follower);

    // (d) A bad webhook is a 400 naming the field, before anything is queued.
    let http = reqwest::Client::new();
    for bad in [json!("ftp://example.com/hook"), json!("http://user:pw@example.com/"), json!("/relative"), json!(42)] {
        let body = json!({ "prompt": "x", "webhook": bad });
        let resp = http.post(format!("{}/v1/jobs", cluster.url(follower))).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 400, "{body}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["field"], "webhook", "{body}: {err}");
    }

    // (a) One signed POST for a job that succeeds, naming a working image URL.
    let ok_url = receiver.hook("ok", &[]);
    let ok = client.submit(&job_body("a lighthouse", &ok_url), None).await.unwrap();
    let ok_id = ok["id"].as_str().unwrap().to_string();
    assert_eq!(ok["webhook"]["url"], ok_url.as_str(), "{ok}");
    assert_eq!(ok["webhook"]["delivered"], false);
    // (b) 500, 500, then 200: three tries, delivered.
    let flaky_url = receiver.hook("flaky", &[Answer::Status(500), Answer::Status(500)]);
    let flaky = client.submit(&job_body("a harbour", &flaky_url), None).await.unwrap();
    let flaky_id = flaky["id"].as_str().unwrap().to_string();
    // Always 503: gives up after --webhook-max-attempts (3).
    let down_url = receiver.hook("down", &[Answer::Status(503); 10]);
    let down = client.submit(&job_body("a storm", &down_url), None).await.unwrap();
    let down_id = down["id"].as_str().unwrap().to_string();
    // Nobody listening: the connection error is recorded, then it gives up.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let refused = client.submit(&job_body("a closed port", &format!("http://{closed}/hook")), None).await.unwrap();
    let refused_id = refused["id"].as_str().unwrap().to_string();
    // A cancelled job is posted too.
    let cancel_url = receiver.hook("cancelled", &[]);
    let cancelled = client.submit(&job_body("later", &cancel_url), None).await.unwrap();
    let cancelled_id = cancelled["id"].as_str().unwrap().to_string();
    let _ = client.delete(&format!("/v1/jobs/{cancelled_id}"), None).await;

    let job = wait_webhook(&client, &ok_id, "the ok webhook", |w| w["delivered"] == true).await;
    assert_eq!(job["state"], "succeeded");
    let deliveries = job["webhook"]["deliveries"].as_array().unwrap();
    assert_eq!(deliveries.len(), 1, "{job}");
    assert_eq!(deliveries[0]["status"], 200);
    assert_eq!(deliveries[0]["attempt"], 1);
    let hits = receiver.hits("ok");
    assert_eq!(hits.len(), 1, "exactly one POST: {hits:?}");
    let hit = &hits[0];
    assert!(hit.signed, "bad signature: {hit:?}");
    assert_eq!(hit.event, "job.succeeded");
    assert_eq!(hit.delivery, format!("{ok_id}-1"));
    assert_eq!(hit.body["id"], ok_id.as_str());
    assert_eq!(hit.body["state"], "succeeded");
    assert_eq!(hit.body["event"], "job.succeeded");
    assert_eq!(hit.body["seed"], 7);
    assert_eq!(hit.body["attempts"], 1);
    assert_eq!(hit.body["finished_at_ms"], job["finished_at_ms"]);
    for field in ["model", "submitted_at_ms", "started_at_ms", "queue_wait_ms", "run_ms"] {
        assert!(!hit.body[field].is_null(), "{field} missing: {}", hit.body);
    }
    // The image URL is absolute and serves the same PNG as any node.
    let image_url = hit.body["image_url"].as_str().unwrap();
    assert!(image_url.starts_with("http://127.0.0.1:") && image_url.ends_with(&format!("/v1/jobs/{ok_id}/image")));
    let resp = http.get(image_url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let png = resp.bytes().await.unwrap();
    assert_eq!(&png[..], &client.get_bytes(&format!("/v1/jobs/{ok_id}/image")).await.unwrap()[..]);
    assert!(png.starts_with(b"\x89PNG"));

    let job = wait_webhook(&client, &flaky_id, "the flaky webhook", |w| w["delivered"] == true).await;
    let statuses: Vec<&Value> = job["webhook"]["deliveries"].as_array().unwrap().iter().map(|d| &d["status"]).collect();
    assert_eq!(statuses, [500, 500, 200], "{job}");
    assert_eq!(job["webhook"]["gave_up"], false);
    let hits = receiver.hits("flaky");
    let ids: Vec<&str> = hits.iter().map(|h| h.delivery.as_str()).collect();
    assert_eq!(ids, [format!("{flaky_id}-1"), format!("{flaky_id}-2"), format!("{flaky_id}-3")]);
    assert!(hits.iter().all(|h| h.signed && h.body["id"] == flaky_id.as_str()), "{hits:?}");
    // Tries are spaced by the backoff (recorded by the leader's clock).
    let at: Vec<u64> =
        job["webhook"]["deliveries"].as_array().unwrap().iter().map(|d| d["at_ms"].as_u64().unwrap()).collect();
    assert!(at[1] >= at[0] + 1_000 && at[2] >= at[1] + 2_000, "tries at {at:?}");

    let job = wait_webhook(&client, &down_id, "the down webhook to give up", |w| w["gave_up"] == true).await;
    assert_eq!(job["webhook"]["delivered"], false);
    assert_eq!(job["webhook"]["deliveries"].as_array().unwrap().len(), 3, "{job}");
    assert_eq!(receiver.hits("down").len(), 3);

    let job = wait_webhook(&client, &refused_id, "the refused webhook to give up", |w| w["gave_up"] == true).await;
    let deliveries = job["webhook"]["deliveries"].as_array().unwrap();
    assert_eq!(deliveries.len(), 3, "{job}");
    for d in deliveries {
        assert!(d["status"].is_null(), "{job}");
        assert!(d["error"].as_str().unwrap().starts_with("connection failed"), "{job}");
    }

    // Cancelled right after submission (or, rarely, already done): the event
    // names the job's final state, and only a success has an image URL.
    let job = wait_webhook(&client, &cancelled_id, "the cancelled job's webhook", |w| w["delivered"] == true).await;
    let state = job["state"].as_str().unwrap();
    let hits = receiver.hits("cancelled");
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert_eq!(hits[0].event, format!("job.{state}"));
    assert_eq!(hits[0].body["state"], state);
    assert_eq!(hits[0].body["image_url"].is_null(), state != "succeeded", "{:?}", hits[0]);

    // Every node shows the same record (it is replicated: a follower may
    // apply the last delivery a moment after the node asked above).
    let expected = job_webhook(&client, &flaky_id).await;
    for node in 1..=3 {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let j = cluster.client(node).get(&format!("/v1/jobs/{flaky_id}")).await.unwrap();
            if j["webhook"] == expected {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "node {node}: {} != {expected}", j["webhook"]);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn job_webhook(client: &raftgen::cli::Client, id: &str) -> Value {
    client.get(&format!("/v1/jobs/{id}")).await.unwrap()["webhook"].clone()
}

/// (c) The leader POSTs, the receiver hangs, the leader dies before it can
/// record the try: the next leader finds the job still owed and delivers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_leader_delivers_what_the_old_one_could_not_record() {
    let receiver = Receiver::start().await;
    let dir = scratch();
    let mut args = NODE_ARGS.to_vec();
    args.extend(["--webhook-timeout-ms", "100000", "--node-timeout-ms", "2000"]);
    let mut cluster = start(&dir.path, 3, &args);
    let leader = cluster.wait_ready(1, 3, 1, Duration::from_secs(60)).await.unwrap();
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let client = cluster.client(follower);

    let url = receiver.hook("slow", &[Answer::Hang]);
    let job = client.submit(&job_body("a slow receiver", &url), None).await.unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    wait_until("the leader's first POST", Duration::from_secs(60), || {
        let n = receiver.hits("slow").len();
        async move { n >= 1 }
    })
    .await;
    cluster.kill(leader).unwrap();

    let job = wait_webhook(&client, &id, "delivery by the new leader", |w| w["delivered"] == true).await;
    let deliveries = job["webhook"]["deliveries"].as_array().unwrap();
    assert_eq!(deliveries.len(), 1, "the hung try was never recorded: {job}");
    assert_eq!(deliveries[0]["status"], 200);
    assert_ne!(deliveries[0]["node"], leader, "the killed leader cannot have recorded it: {job}");
    let hits = receiver.hits("slow");
    assert!(hits.len() >= 2, "{hits:?}");
    assert_eq!(hits[0].answered, 0);
    assert_eq!(hits.last().unwrap().answered, 200);
    // At least once: both POSTs are the same delivery (job id and try 1).
    for hit in &hits {
        assert!(hit.signed, "{hit:?}");
        assert_eq!(hit.delivery, format!("{id}-1"));
        assert_eq!(hit.body["id"], id.as_str());
        assert_eq!(hit.body["state"], "succeeded");
    }
    // The new leader's image URL points at itself, and works.
    let image_url = hits.last().unwrap().body["image_url"].as_str().unwrap().to_string();
    let resp = reqwest::get(&image_url).await.unwrap();
    assert_eq!(resp.status(), 200, "{image_url}");
}
