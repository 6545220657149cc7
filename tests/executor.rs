//! The diffusion executor: the model memory budget, and a real node serving
//! the tiny models: per-model request limits, the recipe in the PNG, the hash
//! and the truncation note recorded in the job.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device};
use raftgen::executor::diffusion::DiffusionExecutor;
use raftgen::executor::{ExecError, Executor, JobSpec, RunControl};
use raftgen::models::catalog::ModelEntry;
use raftgen::models::files::ModelFiles;
use raftgen_raft::job::{JobId, JobRequest};
use serde_json::{json, Value};

mod common;

fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models")
}

fn entry(name: &str) -> ModelEntry {
    ModelEntry::open(name, ModelFiles::dir(models_dir().join(name)), None).unwrap()
}

fn job(model: &str, size: u32) -> (JobSpec, RunControl) {
    let request = JobRequest {
        prompt: "a red fox".into(),
        negative_prompt: String::new(),
        width: size,
        height: size,
        steps: 2,
        guidance: 0.0,
        seed: Some(1),
        model: model.into(),
        priority: 0,
        sampler: None,
        cache: true,
        webhook: None,
    };
    let spec = JobSpec { id: JobId(1), attempt: 1, request, seed: 1 };
    (spec, RunControl::new(Arc::new(AtomicBool::new(false)), Box::new(|_, _| {})))
}

#[test]
fn models_are_loaded_once_and_the_least_recently_used_is_unloaded_beyond_the_budget() {
    let (sd, xl, z) = (entry("tiny-sd"), entry("tiny-sdxl"), entry("tiny-z-image"));
    let bytes = |e: &ModelEntry| e.params * 4;
    // Room for the two largest, not for all three.
    let mut sizes = [bytes(&sd), bytes(&xl), bytes(&z)];
    sizes.sort();
    let budget = sizes[1] + sizes[2];
    let ex = DiffusionExecutor::new(vec![sd, xl, z], Device::Cpu, DType::F32, budget, 1);
    assert!(ex.loaded_models().is_empty(), "nothing is loaded before a job needs it");
    for model in ["tiny-sd", "tiny-sdxl", "tiny-sd", "tiny-z-image"] {
        let out = ex.generate_batch(&[job(model, 64)]);
        assert!(out[0].is_ok(), "{model}: {:?}", out[0].as_ref().err());
    }
    // tiny-sdxl was the least recently used when tiny-z-image needed room.
    assert_eq!(ex.loaded_models(), vec!["tiny-sd".to_string(), "tiny-z-image".to_string()]);

    // A model larger than the whole budget fails its job, for good (no retry
    // would fit it); the executor goes on.
    let small = DiffusionExecutor::new(
        vec![entry("tiny-sdxl"), entry("tiny-sd")],
        Device::Cpu,
        DType::F32,
        bytes(&entry("tiny-sd")),
        1,
    );
    match &small.generate_batch(&[job("tiny-sdxl", 64)])[0] {
        Err(ExecError::Invalid(msg)) => assert!(msg.contains("memory budget"), "{msg}"),
        other => panic!("expected a clear failure, got {:?}", other.as_ref().map(|o| o.png.len())),
    }
    assert!(small.generate_batch(&[job("tiny-sd", 64)])[0].is_ok());
    // A size the model cannot make (Z-Image needs multiples of 16) is bad input: not retried either.
    let z = DiffusionExecutor::new(vec![entry("tiny-z-image")], Device::Cpu, DType::F32, 1 << 30, 1);
    assert!(matches!(&z.generate_batch(&[job("tiny-z-image", 72)])[0], Err(ExecError::Invalid(m)) if m.contains("16")));
}

async fn post(url: &str, body: Value) -> (u16, Value) {
    let resp = reqwest::Client::new().post(format!("{url}/v1/jobs")).json(&body).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_serves_the_tiny_models_with_their_limits_recipes_and_hashes() {
    let dir = common::scratch();
    let models = models_dir().display().to_string();
    let cluster = common::start(&dir.path, 1, &["--no-builtin-model", "--models-dir", &models]);
    cluster.wait_ready(1, 1, 1, Duration::from_secs(60)).await.unwrap();
    let url = cluster.url(1);
    common::wait_until("the models to be registered", Duration::from_secs(30), || async {
        let c = reqwest::get(format!("{url}/v1/cluster")).await.unwrap().json::<Value>().await.unwrap();
        // tiny-sd, tiny-sdxl, tiny-z-image, and the built-in model's own folder (shapes-sd).
        c["members"][0]["models"].as_array().is_some_and(|m| m.len() == 4)
    })
    .await;

    // Bad input: 400 naming the field.
    let cases = [
        (json!({"prompt": "x", "model": "tiny-z-image", "width": 72, "height": 64}), "width"),
        (json!({"prompt": "x", "model": "tiny-sd", "height": 60}), "height"),
        (json!({"prompt": "x", "model": "tiny-sd", "steps": 151}), "steps"),
        (json!({"prompt": "x", "model": "tiny-sd", "guidance": 30.5}), "guidance"),
        (json!({"prompt": "x", "model": "sd-9"}), "model"),
        (json!({"prompt": "x", "model": "tiny-sd", "sampler": "plms"}), "sampler"),
        (json!({"prompt": "x", "model": "tiny-z-image", "sampler": "ddim"}), "sampler"),
    ];
    for (body, field) in cases {
        let (status, err) = post(&url, body.clone()).await;
        assert_eq!(status, 400, "{body}: {err}");
        assert_eq!(err["error"]["field"], field, "{body}: {err}");
    }

    // A prompt longer than CLIP's context: the job succeeds and says so.
    let long = ["a lighthouse on a rocky cliff at dusk"; 20].join(", ");
    let (status, job) =
        post(&url, json!({"prompt": long, "model": "tiny-sd", "steps": 3, "seed": 5, "sampler": "euler_a"})).await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(job["request"]["width"], 64, "the tiny model's default size");
    let client = cluster.client(1);
    let done = client.wait_job(&id, Duration::from_secs(120), |_| {}).await.unwrap();
    assert_eq!(done["state"], "succeeded", "{done}");
    let expected_hash = entry("tiny-sd").hash;
    let view: Value = reqwest::get(format!("{url}/v1/cluster")).await.unwrap().json().await.unwrap();
    assert_eq!(view["model_hashes"]["tiny-sd"], expected_hash.as_str(), "{view}");
    assert_eq!(view["members"][0]["model_conflicts"], json!([]), "{view}");
    assert_eq!(done["model_hash"], expected_hash.as_str());
    assert!(done["notes"][0].as_str().unwrap().contains("prompt truncated"), "{done}");
    let png = client.get_bytes(&format!("/v1/jobs/{id}/image")).await.unwrap();
    let params = raftgen::executor::png::read_parameters(&png).expect("a parameters chunk");
    assert!(params.starts_with(&long), "{params}");
    assert!(
        params.ends_with(&format!(
            "Steps: 3, Sampler: Euler a, CFG scale: 7.5, Seed: 5, Size: 64x64, Model hash: {}, Model: tiny-sd",
            &expected_hash[..10]
        )),
        "{params}"
    );
}
