//! The OpenAPI document every node serves at `GET /openapi.json`, checked by
//! outside tools against a 3-node test-pattern cluster through a follower:
//! openapi-spec-validator says it is a valid OpenAPI 3.1 document, and a
//! schemathesis run (examples, coverage, fuzzing and stateful phases, valid
//! and invalid data, a fixed seed) finds no 5xx, hang or dropped connection
//! in any documented operation. The cluster must be healthy afterwards.
//!
//! schemathesis gets no credentials: the admin operations (adding and
//! removing nodes) must answer it 401, and the membership must not change.
//! The tools live in a virtual environment made once under
//! `target/pyenv-openapi` from tests/data/requirements-openapi.txt (see
//! [`common::pyenv`]; PyPI is needed the first time).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

mod common;

use common::{scratch, start, wait_until};

/// The seed of the schemathesis run, so a failure can be replayed.
const SEED: &str = "1121";
/// Test cases per operation and phase: enough to cover each operation's
/// fields with valid and invalid values, few enough for a 2-core machine.
const MAX_EXAMPLES: &str = "100";
/// Longest the whole schemathesis run may take before it counts as hung
/// (it takes well under a minute; this only stops a stuck run).
const RUN_LIMIT: Duration = Duration::from_secs(900);

/// A tool from the venv's `bin/` (after making the venv if needed).
async fn tool(name: &'static str) -> PathBuf {
    let py = tokio::task::spawn_blocking(|| common::pyenv::python("pyenv-openapi", "requirements-openapi.txt"));
    py.await.unwrap().with_file_name(name)
}

/// Runs `program` in `dir` until it exits: its success and its output
/// (stdout then stderr). Panics if it runs past [`RUN_LIMIT`].
async fn run(program: &Path, args: &[&str], dir: &Path) -> (bool, String) {
    let child = tokio::process::Command::new(program)
        .args(args)
        .current_dir(dir)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .env("NO_COLOR", "1")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(RUN_LIMIT, child)
        .await
        .unwrap_or_else(|_| panic!("{} {args:?} still running after {RUN_LIMIT:?}: hung", program.display()))
        .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// A 3-node test-pattern cluster, its leader and one of its followers, with
/// limits that keep a fuzzing run bounded and free of legitimate 503s: short
/// synchronous waits (a 408 after 2 s) and progress streams (closed after
/// 3 s), and room for every stream and queued job a run makes.
async fn cluster(dir: &Path) -> (raftgen::cli::local::LocalCluster, u64, u64) {
    let cluster = start(
        dir,
        3,
        &[
            "--executor",
            "test-pattern",
            "--test-pattern-delay-ms",
            "10",
            "--sync-timeout-ms",
            "2000",
            "--event-stream-max-ms",
            "3000",
            "--max-event-streams",
            "10000",
            "--max-queue-depth",
            "100000",
        ],
    );
    let leader = cluster.wait_ready(1, 3, 1, Duration::from_secs(60)).await.unwrap();
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    (cluster, leader, follower)
}

async fn fetch_document(base: &str) -> (String, Value) {
    let resp = reqwest::get(format!("{base}/openapi.json")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let content_type = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    assert!(content_type.starts_with("application/json"), "content-type {content_type}");
    let text = resp.text().await.unwrap();
    let doc = serde_json::from_str(&text).unwrap_or_else(|e| panic!("/openapi.json is not JSON ({e}): {text}"));
    (text, doc)
}

/// The (method, path) pairs the document describes.
fn operations(doc: &Value) -> Vec<(String, String)> {
    let paths = doc["paths"].as_object().expect("paths");
    let methods = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];
    let mut ops = Vec::new();
    for (path, item) in paths {
        for m in methods.iter().filter(|m| item.get(**m).is_some()) {
            ops.push((m.to_uppercase(), path.clone()));
        }
    }
    ops
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_is_valid_openapi_3_1_and_covers_every_api() {
    let dir = scratch();
    let (cluster, leader, follower) = cluster(&dir.path).await;
    let (text, doc) = fetch_document(&cluster.url(follower)).await;
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.1.")), "openapi: {}", doc["openapi"]);

    let ops = operations(&doc);
    for (method, path) in [
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs"),
        ("GET", "/v1/jobs/{id}"),
        ("DELETE", "/v1/jobs/{id}"),
        ("GET", "/v1/jobs/{id}/image"),
        ("GET", "/v1/jobs/{id}/events"),
        ("GET", "/v1/cluster"),
        ("POST", "/v1/images/generations"),
        ("POST", "/sdapi/v1/txt2img"),
        ("GET", "/sdapi/v1/sd-models"),
    ] {
        assert!(ops.contains(&(method.into(), path.into())), "{method} {path} is not documented; have {ops:?}");
    }
    assert!(ops.iter().all(|(_, p)| !p.starts_with("/raft/")), "node-to-node RPCs documented: {ops:?}");

    // Every node serves the same document.
    let (_, from_leader) = fetch_document(&cluster.url(leader)).await;
    assert_eq!(from_leader, doc);

    let file = dir.path.join("openapi.json");
    std::fs::write(&file, &text).unwrap();
    let validator = tool("openapi-spec-validator").await;
    let (ok, output) =
        run(&validator, &["--schema", "3.1", "--validation-errors", "all", "openapi.json"], &dir.path).await;
    assert!(ok, "/openapi.json is not a valid OpenAPI 3.1 document:\n{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error() {
    let dir = scratch();
    let (cluster, _, follower) = cluster(&dir.path).await;
    let base = cluster.url(follower);
    let client = cluster.client(follower);
    let members = |c: &Value| -> Vec<(u64, String)> {
        let list = c["members"].as_array().expect("members");
        list.iter().map(|m| (m["id"].as_u64().unwrap(), m["role"].as_str().unwrap_or("").to_string())).collect()
    };
    let before = members(&client.get("/v1/cluster").await.unwrap());
    let (_, doc) = fetch_document(&base).await;
    let ops = operations(&doc).len();

    let schemathesis = tool("schemathesis").await;
    let url = format!("{base}/openapi.json");
    #[rustfmt::skip]
    let args = [
        "run", url.as_str(),
        "--checks", "not_a_server_error,response_schema_conformance",
        "--phases", "examples,coverage,fuzzing,stateful",
        "--mode", "all",
        "--seed", SEED,
        "--max-examples", MAX_EXAMPLES,
        "--request-timeout", "30",
        "--generation-database", "none",
        "--no-color",
    ];
    let (ok, output) = run(&schemathesis, &args, &dir.path).await;
    eprintln!("{output}");
    assert!(ok, "schemathesis found failures (each with a curl reproduction above); replay with --seed {SEED}");
    // Every documented operation was exercised (an honest pass, not an empty run).
    assert!(output.contains(&format!("Tested: {ops}")), "schemathesis did not test all {ops} operations");

    // The cluster is healthy afterwards: every node ready, the membership as
    // it was (no credentials, no admin change), and a job through the follower succeeds.
    for id in 1..=3 {
        let url = format!("{}/readyz", cluster.url(id));
        wait_until(&format!("node {id} ready"), Duration::from_secs(60), || {
            let url = url.clone();
            async move { reqwest::get(&url).await.is_ok_and(|r| r.status() == 200) }
        })
        .await;
    }
    assert_eq!(members(&client.get("/v1/cluster").await.unwrap()), before);
    let body = json!({ "prompt": "after the fuzzing", "width": 64, "height": 64, "steps": 2, "seed": 7 });
    let job = client.submit(&body, None).await.unwrap();
    let id = job["id"].as_str().unwrap();
    let done = client.wait_job(id, Duration::from_secs(120), |_| {}).await.unwrap();
    assert_eq!(done["state"], "succeeded", "{done}");
    assert!(!client.get_bytes(&format!("/v1/jobs/{id}/image")).await.unwrap().is_empty());
}
