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
use raftgen_raft::network::SECRET_HEADER;
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

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

async fn get_json(url: &str) -> Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

/// Issue 17: a folder that fails validation is not advertised, and says why
/// in /v1/models, /v1/cluster and a submission's 400; a folder that passes
/// validation but fails to load (its UNet weights cut short after the header)
/// is refused by the node at run time, and its job is queued again without
/// spending an attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_broken_folders_and_says_why() {
    let dir = common::scratch();
    let models = dir.path.join("models");
    let tiny = models_dir().join("tiny-sd");
    copy_dir(&tiny, &models.join("tiny-sd"));
    copy_dir(&tiny, &models.join("missing"));
    let unet = models.join("missing/unet/diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&unet, &Device::Cpu).unwrap();
    assert!(tensors.remove("conv_in.weight").is_some());
    candle_core::safetensors::save(&tensors, &unet).unwrap();
    copy_dir(&tiny, &models.join("truncated"));
    let unet = models.join("truncated/unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&unet).unwrap();
    let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    std::fs::write(&unet, &bytes[..header + (bytes.len() - header) / 2]).unwrap();

    let models_arg = models.display().to_string();
    // RUST_BACKTRACE=1 in the node's environment (as issue 17 measured it):
    // still no backtrace in any error a client sees.
    let cluster = raftgen::cli::local::LocalCluster::start_env(
        std::path::Path::new(common::EXE),
        &dir.path,
        1,
        &["--no-builtin-model", "--models-dir", &models_arg],
        &[("RUST_BACKTRACE", "1")],
    )
    .unwrap();
    cluster.wait_ready(1, 1, 1, Duration::from_secs(60)).await.unwrap();
    let url = cluster.url(1);
    common::wait_until("the models to be registered", Duration::from_secs(30), || async {
        let m = get_json(&format!("{url}/v1/models")).await;
        m["data"].as_array().is_some_and(|d| d.len() == 2)
    })
    .await;
    let list = get_json(&format!("{url}/v1/models")).await;
    let served: Vec<&str> = list["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(served, ["tiny-sd", "truncated"], "{list}");
    assert_eq!(list["refused"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["refused"][0]["name"], "missing");
    let reason = list["refused"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("conv_in.weight") && !reason.contains('\n'), "{reason}");
    let cv = get_json(&format!("{url}/v1/cluster")).await;
    assert_eq!(cv["members"][0]["refused_models"][0]["reason"], reason, "{cv}");

    let (status, err) = post(&url, json!({"prompt": "x", "model": "missing"})).await;
    assert_eq!(status, 400, "{err}");
    assert_eq!(err["error"]["field"], "model", "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains(reason), "{err}");

    // Passes validation, fails to load: refused at run time, attempt not counted.
    let (status, job) = post(&url, json!({"prompt": "x", "model": "truncated", "steps": 2})).await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    common::wait_until("the node to refuse the model it cannot load", Duration::from_secs(60), || async {
        let m = get_json(&format!("{url}/v1/models")).await;
        m["refused"].as_array().is_some_and(|r| r.iter().any(|r| r["name"] == "truncated"))
    })
    .await;
    let job = get_json(&format!("{url}/v1/jobs/{id}")).await;
    assert_eq!(job["state"], "queued", "no other node serves it: {job}");
    assert!(job.to_string().contains("not counted"), "{job}");
    for needle in ["backtrace", "rust_begin_unwind", ".rs:"] {
        assert!(!job.to_string().contains(needle), "{needle} in {job}");
    }
    let (status, err) = post(&url, json!({"prompt": "x", "model": "truncated"})).await;
    assert_eq!(status, 400, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("node 1 refused it"), "{err}");
    // The good model still works beside them.
    let (status, job) = post(&url, json!({"prompt": "x", "model": "tiny-sd", "steps": 2})).await;
    assert_eq!(status, 202, "{job}");
    let done = cluster.client(1).wait_job(job["id"].as_str().unwrap(), Duration::from_secs(120), |_| {}).await.unwrap();
    assert_eq!(done["state"], "succeeded", "{done}");

    // The operator repairs the folder and rescans: the model is served again
    // and the waiting job runs, its refused attempt not counted.
    std::fs::write(&unet, &bytes).unwrap();
    let rescan = format!("{url}/v1/models/rescan");
    let resp = reqwest::Client::new().post(&rescan).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 401, "a rescan needs the admin key or the cluster secret");
    let resp = reqwest::Client::new().post(&rescan).header(SECRET_HEADER, &cluster.secret).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let r: Value = resp.json().await.unwrap();
    assert_eq!(r["rescan"]["served"], json!(["tiny-sd", "truncated"]), "{r}");
    assert_eq!(r["rescan"]["refused"][0]["name"], "missing", "{r}");
    let done = cluster.client(1).wait_job(&id, Duration::from_secs(120), |_| {}).await.unwrap();
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["attempt"], 2, "{done}");
}
