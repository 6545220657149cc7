//! The OpenAI Images API and the AUTOMATIC1111 API, driven by the real
//! Python clients (`openai`, `webuiapi`) against a 3-node cluster through a
//! follower, and every new endpoint fed bad input (malformed JSON, wrong
//! types, out-of-range numbers, a 10 MB body, unknown models), which must get
//! a 4xx in that API's own error shape.
//!
//! The clients live in a virtual environment made once under
//! `target/pyenv` (python3 -m venv, then pip install of
//! tests/data/requirements-clients.txt; this needs PyPI the first time) and
//! remade when the requirements change.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

mod common;

use common::{scratch, start, wait_until};

const MODEL: &str = "test-pattern";

/// The venv's python (see [`common::pyenv`]).
fn python() -> PathBuf {
    common::pyenv::python("pyenv", "requirements-clients.txt")
}

/// Runs tests/data/SCRIPT with `args` in the venv; panics with its output unless it succeeds.
async fn run_script(script: &str, args: Vec<String>) {
    let py = tokio::task::spawn_blocking(python).await.unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(script);
    let out = tokio::process::Command::new(py)
        .arg(&path)
        .args(&args)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .output()
        .await
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{stderr}");
    eprintln!("{stdout}");
}

/// A 3-node test-pattern cluster and one of its followers.
async fn cluster(dir: &Path, delay_ms: &str) -> (raftgen::cli::local::LocalCluster, u64) {
    let cluster = start(dir, 3, &["--executor", "test-pattern", "--test-pattern-delay-ms", delay_ms]);
    let leader = cluster.wait_ready(1, 3, 1, Duration::from_secs(60)).await.unwrap();
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    (cluster, follower)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_client_through_a_follower() {
    let dir = scratch();
    let (cluster, follower) = cluster(&dir.path, "20").await;
    run_script("openai_client.py", vec![cluster.url(follower), MODEL.into()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webuiapi_client_through_a_follower() {
    let dir = scratch();
    let (cluster, follower) = cluster(&dir.path, "20").await;
    let port = cluster.url(follower).rsplit(':').next().unwrap().to_string();
    run_script("webuiapi_client.py", vec!["127.0.0.1".into(), port, MODEL.into()]).await;
}

/// Status and JSON body of one request (panics on a dropped connection).
async fn send(url: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{url}: connection failed: {e}"));
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("{url} answered {status} with non-JSON: {text}")))
}

/// OpenAI's error shape, naming `param`.
fn assert_openai_error(what: &str, status: u16, body: &Value, param: &str) {
    assert!((400..500).contains(&status), "{what}: status {status}: {body}");
    let e = &body["error"];
    assert!(e["message"].is_string() && e["type"].is_string() && e.get("code").is_some(), "{what}: {body}");
    assert_eq!(e["param"], param, "{what}: {body}");
}

/// A1111's shapes: a 422 whose detail locates `field`, or `{error, detail, body, errors}`.
fn assert_a1111_error(what: &str, status: u16, body: &Value, field: Option<&str>) {
    assert!((400..500).contains(&status), "{what}: status {status}: {body}");
    match field {
        Some(field) => {
            assert_eq!(status, 422, "{what}: {body}");
            let loc = &body["detail"][0]["loc"];
            assert_eq!(loc[0], "body", "{what}: {body}");
            let path: Vec<&str> = loc.as_array().unwrap()[1..].iter().filter_map(Value::as_str).collect();
            assert_eq!(path.join("."), field, "{what}: {body}");
            assert!(body["detail"][0]["msg"].is_string() && body["detail"][0]["type"].is_string(), "{what}: {body}");
        }
        None => {
            for k in ["error", "detail", "body", "errors"] {
                assert!(body.get(k).is_some(), "{what}: no '{k}' in {body}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_4xx_in_each_apis_shape() {
    let dir = scratch();
    let (cluster, follower) = cluster(&dir.path, "20").await;
    let base = cluster.url(follower);
    let huge = vec![b' '; 10 << 20];

    let openai = format!("{base}/v1/images/generations");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("malformed JSON", b"{\"prompt\": ".to_vec(), "body"),
        ("not an object", b"[1, 2]".to_vec(), "body"),
        ("no prompt", br#"{"model": "test-pattern"}"#.to_vec(), "prompt"),
        ("prompt not a string", br#"{"prompt": 5}"#.to_vec(), "prompt"),
        ("n not an integer", br#"{"prompt": "x", "n": "two"}"#.to_vec(), "n"),
        ("n = 0", br#"{"prompt": "x", "n": 0}"#.to_vec(), "n"),
        ("n = 11", br#"{"prompt": "x", "n": 11}"#.to_vec(), "n"),
        ("size not WxH", br#"{"prompt": "x", "size": "large"}"#.to_vec(), "size"),
        ("size too big", br#"{"prompt": "x", "size": "100000x64"}"#.to_vec(), "size"),
        ("size not a multiple of 8", br#"{"prompt": "x", "size": "60x64"}"#.to_vec(), "size"),
        ("size of a wrong type", br#"{"prompt": "x", "size": 512}"#.to_vec(), "size"),
        ("unknown model", br#"{"prompt": "x", "model": "sdxl-nope"}"#.to_vec(), "model"),
        ("bad response_format", br#"{"prompt": "x", "response_format": "jpeg"}"#.to_vec(), "response_format"),
        ("stream", br#"{"prompt": "x", "stream": true}"#.to_vec(), "stream"),
        ("unknown field", br#"{"prompt": "x", "colour": "red"}"#.to_vec(), "colour"),
        ("steps out of range", br#"{"prompt": "x", "steps": 100000}"#.to_vec(), "steps"),
        ("10 MB body", huge.clone(), "body"),
    ];
    for (what, body, param) in cases {
        let (status, answer) = send(&openai, body).await;
        assert_openai_error(what, status, &answer, param);
        if what == "10 MB body" {
            assert_eq!(status, 413, "{answer}");
        }
    }

    let txt2img = format!("{base}/sdapi/v1/txt2img");
    let cases: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        ("malformed JSON", b"{\"prompt\": ".to_vec(), Some("")),
        ("steps not an integer", br#"{"prompt": "x", "steps": "many"}"#.to_vec(), Some("steps")),
        ("steps out of range", br#"{"prompt": "x", "steps": 100000}"#.to_vec(), Some("steps")),
        ("negative width", br#"{"prompt": "x", "width": -64}"#.to_vec(), Some("width")),
        ("huge height", br#"{"prompt": "x", "height": 1000000}"#.to_vec(), Some("height")),
        ("cfg_scale not a number", br#"{"prompt": "x", "cfg_scale": "high"}"#.to_vec(), Some("cfg_scale")),
        ("cfg_scale out of range", br#"{"prompt": "x", "cfg_scale": 1e9}"#.to_vec(), Some("cfg_scale")),
        ("batch too large", br#"{"prompt": "x", "batch_size": 8, "n_iter": 8}"#.to_vec(), Some("batch_size")),
        ("n_iter = 0", br#"{"prompt": "x", "n_iter": 0}"#.to_vec(), Some("n_iter")),
        ("unknown sampler", br#"{"prompt": "x", "sampler_name": "Wobbly 9000"}"#.to_vec(), Some("sampler_name")),
        (
            "unknown model",
            br#"{"prompt": "x", "override_settings": {"sd_model_checkpoint": "nope.safetensors"}}"#.to_vec(),
            Some("override_settings.sd_model_checkpoint"),
        ),
        ("hires fix", br#"{"prompt": "x", "enable_hr": true}"#.to_vec(), Some("enable_hr")),
        ("prompt of a wrong type", br#"{"prompt": ["x"]}"#.to_vec(), Some("prompt")),
        ("10 MB body", huge.clone(), None),
    ];
    for (what, body, field) in cases {
        let (status, answer) = send(&txt2img, body).await;
        if field == Some("") {
            // FastAPI locates a JSON decode error by its position.
            assert_eq!(status, 422, "{what}: {answer}");
            assert_eq!(answer["detail"][0]["loc"][0], "body", "{what}: {answer}");
            continue;
        }
        assert_a1111_error(what, status, &answer, field);
    }

    // Unknown extra fields that A1111 clients send are ignored, not refused.
    let (status, answer) = send(
        &txt2img,
        json!({
            "prompt": "extras", "width": 32, "height": 32, "steps": 2, "seed": 9,
            "scheduler": "automatic", "eta": 1.0, "s_noise": 1, "restore_faces": false, "styles": [],
            "alwayson_scripts": {}, "some_extension_field": {"x": 1}, "sampler_name": "DPM++ 2M Karras",
        })
        .to_string(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["images"].as_array().unwrap().len(), 1);
    let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["all_seeds"], json!([9]));
}

/// `/sdapi/v1/interrupt` cancels the jobs of the txt2img requests the node
/// holds; the request then returns what was made, and says it was interrupted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupt_ends_a_waiting_txt2img() {
    let dir = scratch();
    let (cluster, follower) = cluster(&dir.path, "3000").await;
    let base = cluster.url(follower);
    let url = format!("{base}/sdapi/v1/txt2img");
    let body = json!({ "prompt": "slow", "width": 32, "height": 32, "steps": 3, "batch_size": 4 }).to_string();
    let request = tokio::spawn(async move { send(&url, body).await });
    let progress = format!("{base}/sdapi/v1/progress");
    wait_until("a running job in /progress", Duration::from_secs(60), || {
        let progress = progress.clone();
        async move {
            let p: Value = reqwest::get(&progress).await.unwrap().json().await.unwrap();
            p["state"]["job_count"].as_u64().unwrap_or(0) > 0
        }
    })
    .await;
    let resp = reqwest::Client::new().post(format!("{base}/sdapi/v1/interrupt")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let (status, answer) = request.await.unwrap();
    assert_eq!(status, 200, "{answer}");
    let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["interrupted"], true, "{info}");
    assert!(answer["images"].as_array().unwrap().len() < 4, "{info}");
    assert_eq!(info["job_ids"].as_array().unwrap().len(), 4);
}

/// The leader dies while a follower holds a synchronous request: the jobs are
/// in the Raft log, a new leader runs them, and the request still answers 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_failure_during_a_synchronous_request_loses_nothing() {
    let dir = scratch();
    let mut cluster = start(
        &dir.path,
        3,
        &["--executor", "test-pattern", "--test-pattern-delay-ms", "1500", "--node-timeout-ms", "1000"],
    );
    let leader = cluster.wait_ready(1, 3, 1, Duration::from_secs(60)).await.unwrap();
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let base = cluster.url(follower);
    let url = format!("{base}/v1/images/generations");
    let body = json!({ "prompt": "failover", "n": 3, "size": "32x32", "response_format": "b64_json" }).to_string();
    let request = tokio::spawn(async move { send(&url, body).await });
    let progress = format!("{base}/sdapi/v1/progress");
    wait_until("the request's jobs in the queue", Duration::from_secs(60), || {
        let progress = progress.clone();
        async move {
            let p: Value = reqwest::get(&progress).await.unwrap().json().await.unwrap();
            p["state"]["job_count"].as_u64().unwrap_or(0) == 3
        }
    })
    .await;
    cluster.kill(leader).unwrap();
    let (status, answer) = request.await.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["data"].as_array().unwrap().len(), 3, "{answer}");
    assert!(answer["data"].as_array().unwrap().iter().all(|d| d["b64_json"].as_str().is_some_and(|s| !s.is_empty())));
}
