//! The real executor: candle text-to-image pipelines (see [`crate::models`]).
//!
//! It serves every model of its catalog, loads a model the first time a job
//! needs it and keeps it while it fits the memory budget, evicting the least
//! recently used ones to make room. A model that cannot fit fails its jobs
//! with a clear error; the node stays up. Jobs for the same model, size,
//! steps, sampler and guidance run as one batch; each job keeps its own noise
//! stream, so its image does not depend on what it was batched with.
//!
//! It runs on the device and in the precision given at start (see
//! [`super::device`]). A run that runs out of GPU memory does not take the
//! node down: the executor first unloads the other models and tries again,
//! then runs a batch one job at a time; a single job that still does not fit
//! fails with "does not fit in GPU memory", retryably (bounded by
//! `--max-attempts`: another node's GPU may hold it; see `device`'s doc).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use anyhow::Context;
use std::time::{Duration, Instant};

use candle_core::{Device, DeviceLocation};
use raftgen_raft::command::{ModelInfo, RefusedModel, MAX_REFUSED_MODELS};

use super::device::{is_out_of_memory, Precision};
use super::png::{encode_rgb, Recipe};
use super::{ExecError, Executor, JobOutput, JobSpec, Rescan, RunControl};
use crate::models::catalog::{Catalog, ModelEntry, Refused, Scan, BUILTIN_MODEL};
use crate::models::errors::one_line;
use crate::models::{Cancelled, GenRequest, Pipeline, SamplerKind};

/// Steps and guidance a model gets when the job does not say: Turbo models
/// (by folder name) are distilled for few steps without guidance; the
/// built-in model draws its shapes best at guidance 3 (measured on its
/// held-out captions: shape 81% at 3, 62% at 7.5, colour and position no
/// worse; README "The built-in model").
fn defaults(entry: &ModelEntry) -> (u32, f32) {
    let turbo = entry.name.to_ascii_lowercase().contains("turbo");
    match (entry.meta.family, turbo) {
        ("z-image", _) => (8, 0.0),
        (_, true) => (4, 0.0),
        _ if entry.name == BUILTIN_MODEL => (20, BUILTIN_GUIDANCE),
        _ => (20, 7.5),
    }
}

/// The built-in model's default guidance scale (see [`defaults`]).
const BUILTIN_GUIDANCE: f32 = 3.0;

pub fn model_info(entry: &ModelEntry) -> ModelInfo {
    let (steps, guidance) = defaults(entry);
    ModelInfo {
        name: entry.name.clone(),
        hash: entry.hash.clone(),
        family: entry.meta.family.to_string(),
        pixel_multiple: entry.meta.pixel_multiple,
        max_prompt_tokens: entry.meta.max_prompt_tokens,
        default_side_px: entry.meta.default_side_px,
        default_steps: steps,
        default_guidance_centi: (guidance * 100.0).round() as u32,
        default_sampler: entry.meta.default_sampler.name().to_string(),
        samplers: entry.meta.samplers.iter().map(|s| s.name().to_string()).collect(),
    }
}

struct Loaded {
    name: String,
    pipeline: Arc<Pipeline>,
    bytes: u64,
}

/// Why a run produced no images.
#[derive(Debug)]
enum RunError {
    Exec(ExecError),
    /// The GPU ran out of memory, loading the model or running the batch.
    OutOfMemory {
        loading: bool,
        error: String,
    },
}

impl From<ExecError> for RunError {
    fn from(e: ExecError) -> Self {
        RunError::Exec(e)
    }
}

/// TEST HOOK: called with the batch size before each run; an error text it
/// returns is taken as the pipeline's error (to exercise out-of-memory
/// handling without a GPU).
#[cfg(test)]
type InjectFn = Box<dyn Fn(usize) -> Option<String> + Send + Sync>;

pub struct DiffusionExecutor {
    /// The models served; replaced by a rescan.
    models: RwLock<Vec<ModelEntry>>,
    /// Where they came from, for a rescan (`None`: a fixed list, in tests).
    catalog: Option<Catalog>,
    /// Model folders not served, with the reason: refused at start (see
    /// `catalog::scan`), or whose load failed at run time (then the model
    /// is no longer advertised, so its jobs go to other nodes).
    refused: Mutex<BTreeMap<String, String>>,
    device: Device,
    precision: Precision,
    budget_bytes: u64,
    max_batch: usize,
    /// Loaded models, least recently used first.
    loaded: Mutex<Vec<Loaded>>,
    /// How long the last load of each model took (kept after unloading).
    load_times: Mutex<BTreeMap<String, Duration>>,
    #[cfg(test)]
    inject: Option<InjectFn>,
}

impl DiffusionExecutor {
    /// `precision`: a `DType` for every model, or [`Precision::PerFamily`].
    pub fn new(
        models: Vec<ModelEntry>,
        device: Device,
        precision: impl Into<Precision>,
        budget_bytes: u64,
        max_batch: usize,
    ) -> Self {
        DiffusionExecutor {
            models: RwLock::new(models),
            catalog: None,
            refused: Mutex::new(BTreeMap::new()),
            device,
            precision: precision.into(),
            budget_bytes,
            max_batch: max_batch.max(1),
            loaded: Mutex::new(Vec::new()),
            load_times: Mutex::new(BTreeMap::new()),
            #[cfg(test)]
            inject: None,
        }
    }

    /// Where the models came from, so that [`Executor::rescan`] can read it
    /// again, and the folders it refused.
    pub fn with_catalog(mut self, catalog: Catalog, refused: Vec<Refused>) -> Self {
        self.catalog = Some(catalog);
        self.refused.lock().unwrap_or_else(|e| e.into_inner()).extend(refused.into_iter().map(|r| (r.name, r.reason)));
        self
    }

    fn entry(&self, name: &str) -> Option<ModelEntry> {
        self.models.read().unwrap_or_else(|e| e.into_inner()).iter().find(|m| m.name == name).cloned()
    }

    /// Memory a loaded model takes: its weights at its dtype.
    fn footprint(&self, entry: &ModelEntry) -> u64 {
        entry.params * self.precision.for_family(entry.meta.family).size_in_bytes() as u64
    }

    /// Unloads every model but `keep`; returns how many were unloaded.
    fn unload_others(&self, keep: &str) -> usize {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        let before = loaded.len();
        loaded.retain(|l| l.name == keep);
        before - loaded.len()
    }

    /// The pipeline for `name`, loading it (and evicting others) if needed.
    /// A model larger than the budget never fits here (`Invalid`); out of
    /// GPU memory may work after unloading others; any other load failure
    /// means this node cannot run the model: it is refused from then on and
    /// the job goes elsewhere without spending an attempt (`Unavailable`).
    fn pipeline(&self, entry: &ModelEntry) -> Result<Arc<Pipeline>, RunError> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pos) = loaded.iter().position(|l| l.name == entry.name) {
            let l = loaded.remove(pos);
            let p = l.pipeline.clone();
            loaded.push(l);
            return Ok(p);
        }
        let bytes = self.footprint(entry);
        if bytes > self.budget_bytes {
            return Err(RunError::Exec(ExecError::Invalid(format!(
                "model '{}' needs {} MiB, more than this node's model memory budget of {} MiB (--model-memory-mb)",
                entry.name,
                bytes >> 20,
                self.budget_bytes >> 20
            ))));
        }
        while loaded.iter().map(|l| l.bytes).sum::<u64>() + bytes > self.budget_bytes {
            let evicted = loaded.remove(0);
            tracing::info!("unloading model '{}' ({} MiB) to make room", evicted.name, evicted.bytes >> 20);
        }
        let started = Instant::now();
        let dtype = self.precision.for_family(entry.meta.family);
        let pipeline = match Pipeline::load(entry.family, &entry.files, &self.device, dtype) {
            Ok(p) => p,
            Err(e) => {
                let error = format!("loading model '{}': {}", entry.name, one_line(&e));
                if let RunError::OutOfMemory { loading, error } = classify(error.clone(), true) {
                    return Err(RunError::OutOfMemory { loading, error });
                }
                tracing::error!("{error}; this node no longer serves the model");
                self.refused.lock().unwrap_or_else(|e| e.into_inner()).insert(entry.name.clone(), error.clone());
                return Err(RunError::Exec(ExecError::Unavailable(error)));
            }
        };
        let took = started.elapsed();
        tracing::info!("loaded model '{}' ({} MiB) in {} ms", entry.name, bytes >> 20, took.as_millis());
        self.load_times.lock().unwrap_or_else(|e| e.into_inner()).insert(entry.name.clone(), took);
        let pipeline = Arc::new(pipeline);
        loaded.push(Loaded { name: entry.name.clone(), pipeline: pipeline.clone(), bytes });
        Ok(pipeline)
    }

    fn sampler(&self, entry: &ModelEntry, job: &JobSpec) -> Result<SamplerKind, ExecError> {
        match &job.request.sampler {
            None => Ok(entry.meta.default_sampler),
            Some(name) => SamplerKind::parse(name)
                .filter(|k| entry.meta.samplers.contains(k))
                .ok_or_else(|| ExecError::Invalid(format!("model '{}' has no sampler '{name}'", entry.name))),
        }
    }

    fn request(&self, entry: &ModelEntry, job: &JobSpec) -> Result<GenRequest, ExecError> {
        let r = &job.request;
        let m = entry.meta.pixel_multiple;
        if !r.width.is_multiple_of(m) || !r.height.is_multiple_of(m) {
            return Err(ExecError::Invalid(format!(
                "width and height must be multiples of {m} for model '{}'",
                entry.name
            )));
        }
        Ok(GenRequest {
            prompt: r.prompt.clone(),
            negative_prompt: r.negative_prompt.clone(),
            width: r.width,
            height: r.height,
            steps: r.steps as usize,
            guidance: r.guidance as f64,
            seed: job.seed,
            sampler: self.sampler(entry, job)?,
        })
    }

    fn run(&self, jobs: &[(JobSpec, RunControl)]) -> Result<Vec<Result<JobOutput, ExecError>>, RunError> {
        let first = &jobs[0].0;
        // Not served here (any more: a rescan dropped it): another node may.
        let entry = self
            .entry(&first.request.model)
            .ok_or_else(|| ExecError::Unavailable(format!("node does not serve model '{}'", first.request.model)))?;
        let entry = &entry;
        let reqs = jobs.iter().map(|(j, _)| self.request(entry, j)).collect::<Result<Vec<_>, _>>()?;
        let pipeline = self.pipeline(entry)?;
        let mut progress = |step: usize, steps: usize| {
            for (_, ctl) in jobs {
                ctl.progress(step as u32, steps as u32);
            }
            !jobs.iter().all(|(_, ctl)| ctl.is_cancelled())
        };
        #[cfg(test)]
        if let Some(error) = self.inject.as_ref().and_then(|f| f(jobs.len())) {
            return Err(classify(error, false));
        }
        let images = match pipeline.generate(&reqs, &mut progress) {
            Ok(images) => images,
            Err(e) if e.is::<Cancelled>() => return Ok(jobs.iter().map(|_| Err(ExecError::Cancelled)).collect()),
            Err(e) => return Err(classify(one_line(&e), false)),
        };
        let mut out = Vec::with_capacity(jobs.len());
        for (((job, ctl), req), image) in jobs.iter().zip(&reqs).zip(images) {
            if ctl.is_cancelled() {
                out.push(Err(ExecError::Cancelled));
                continue;
            }
            let recipe = Recipe {
                prompt: &req.prompt,
                negative_prompt: &req.negative_prompt,
                steps: job.request.steps,
                sampler: req.sampler.a1111_name(),
                guidance: job.request.guidance,
                seed: job.seed,
                width: image.width,
                height: image.height,
                model: &entry.name,
                model_hash: entry.short_hash(),
            };
            let mut notes = Vec::new();
            if image.dropped_tokens > 0 {
                notes.push(format!(
                    "prompt truncated: {} tokens beyond the text encoder's {} were dropped",
                    image.dropped_tokens, entry.meta.max_prompt_tokens
                ));
            }
            out.push(
                encode_rgb(&image.rgb, image.width, image.height, &recipe.to_text())
                    .map(|png| JobOutput { png, model_hash: entry.hash.clone(), notes })
                    .map_err(|e| ExecError::Failed(format!("png encoding: {e}"))),
            );
        }
        Ok(out)
    }

    /// After a run ran out of GPU memory: unload the other models and try
    /// again; then split a batch into single jobs; a single job (or a model)
    /// that still does not fit fails, retryably (see the module doc).
    fn out_of_memory(&self, jobs: &[(JobSpec, RunControl)], mut loading: bool, mut error: String) -> Vec<Outcome> {
        let model = &jobs[0].0.request.model;
        let unloaded = self.unload_others(model);
        if unloaded > 0 {
            tracing::warn!("out of GPU memory; unloaded {unloaded} other model(s) and trying again: {error}");
            match self.run(jobs) {
                Ok(out) => return out,
                Err(RunError::Exec(e)) => return jobs.iter().map(|_| Err(e.clone())).collect(),
                Err(RunError::OutOfMemory { loading: l, error: e }) => (loading, error) = (l, e),
            }
        }
        if jobs.len() > 1 && !loading {
            tracing::warn!("a batch of {} jobs ran out of GPU memory; running them one at a time: {error}", jobs.len());
            return jobs.iter().flat_map(|job| self.generate_batch(std::slice::from_ref(job))).collect();
        }
        let what = if loading { format!("model '{model}'") } else { "the job".to_string() };
        let e = ExecError::Failed(format!("{what} does not fit in GPU memory: {error}"));
        jobs.iter().map(|_| Err(e.clone())).collect()
    }
}

type Outcome = Result<JobOutput, ExecError>;

/// A pipeline's error, loading the model or running a batch: out of GPU
/// memory, or a backend error (the run broke, not the request: retryable).
fn classify(error: String, loading: bool) -> RunError {
    if is_out_of_memory(&error) {
        RunError::OutOfMemory { loading, error }
    } else {
        RunError::Exec(ExecError::Failed(error))
    }
}

/// `cpu`, `cuda:N`, `metal:N`.
fn device_label(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".into(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

impl Executor for DiffusionExecutor {
    fn name(&self) -> &str {
        "diffusion"
    }

    fn models(&self) -> Vec<ModelInfo> {
        let refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        let models = self.models.read().unwrap_or_else(|e| e.into_inner());
        models.iter().filter(|m| !refused.contains_key(&m.name)).map(model_info).collect()
    }

    fn rescan(&self) -> anyhow::Result<Rescan> {
        let catalog = self.catalog.as_ref().context("this executor was given a fixed list of models")?;
        let Scan { served, refused } = catalog.load()?;
        let mut models = self.models.write().unwrap_or_else(|e| e.into_inner());
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        let mut refusals = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        let before: BTreeMap<String, String> = models.iter().map(|m| (m.name.clone(), m.hash.clone())).collect();
        // A model whose folder is gone or changed is unloaded (jobs running
        // it keep their own reference to the pipeline until they finish).
        loaded.retain(|l| served.iter().any(|m| m.name == l.name && before.get(&m.name) == Some(&m.hash)));
        let added = served.iter().filter(|m| !before.contains_key(&m.name)).map(|m| m.name.clone()).collect();
        let removed = before.keys().filter(|n| !served.iter().any(|m| &&m.name == n)).cloned().collect();
        // Run-time refusals are forgotten: a rescan is the operator saying
        // the folders were fixed; one that still fails to load is refused
        // again by its next job.
        *refusals = refused.iter().map(|r| (r.name.clone(), r.reason.clone())).collect();
        *models = served;
        let served = models.iter().map(|m| m.name.clone()).collect();
        let refused = refused.into_iter().map(|r| RefusedModel { name: r.name, reason: r.reason }).collect();
        Ok(Rescan { served, refused, added, removed })
    }

    fn refused_models(&self) -> Vec<RefusedModel> {
        let refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        refused
            .iter()
            .take(MAX_REFUSED_MODELS)
            .map(|(name, reason)| RefusedModel { name: name.clone(), reason: reason.clone() })
            .collect()
    }

    fn loaded_models(&self) -> Vec<String> {
        self.loaded.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|l| l.name.clone()).collect()
    }

    fn model_load_times(&self) -> Vec<(String, Duration)> {
        self.load_times.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(m, d)| (m.clone(), *d)).collect()
    }

    fn lanes(&self) -> usize {
        1
    }

    fn batch_key(&self, job: &JobSpec) -> Option<String> {
        let r = &job.request;
        let sampler = r.sampler.as_deref().and_then(SamplerKind::parse).map_or("default", |s| s.name());
        Some(format!("{}|{}x{}|{}|{}|{}", r.model, r.width, r.height, r.steps, sampler, r.guidance.to_bits()))
    }

    fn max_batch(&self) -> usize {
        self.max_batch
    }

    fn device(&self) -> String {
        device_label(&self.device)
    }

    fn dtype(&self) -> String {
        self.precision.to_string()
    }

    fn generate_batch(&self, jobs: &[(JobSpec, RunControl)]) -> Vec<Result<JobOutput, ExecError>> {
        if jobs.is_empty() {
            return Vec::new();
        }
        match self.run(jobs) {
            Ok(out) => out,
            Err(RunError::Exec(e)) => jobs.iter().map(|_| Err(e.clone())).collect(),
            Err(RunError::OutOfMemory { loading, error }) => self.out_of_memory(jobs, loading, error),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::atomic::AtomicBool;

    use candle_core::DType;
    use raftgen_raft::job::{JobId, JobRequest};

    use super::*;
    use crate::models::files::ModelFiles;

    /// cudarc's text for a driver allocation that failed, as candle wraps it.
    const OOM: &str = r#"DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")"#;

    fn tiny(name: &str) -> ModelEntry {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models").join(name);
        ModelEntry::open(name, ModelFiles::dir(dir), None).unwrap()
    }

    fn job(model: &str, seed: u64) -> (JobSpec, RunControl) {
        let request = JobRequest {
            prompt: "a red fox".into(),
            negative_prompt: String::new(),
            width: 64,
            height: 64,
            steps: 2,
            guidance: 0.0,
            seed: Some(seed),
            model: model.into(),
            priority: 0,
            sampler: None,
            cache: true,
            webhook: None,
        };
        let spec = JobSpec { id: JobId(seed as u128), attempt: 1, request, seed };
        (spec, RunControl::new(Arc::new(AtomicBool::new(false)), Box::new(|_, _| {})))
    }

    /// An executor on the CPU whose runs fail with `error(batch size)`, and
    /// the batch sizes it was asked to run.
    fn failing(
        models: Vec<ModelEntry>,
        error: impl Fn(usize) -> Option<String> + Send + Sync + 'static,
    ) -> (DiffusionExecutor, Arc<Mutex<Vec<usize>>>) {
        let runs = Arc::new(Mutex::new(Vec::new()));
        let seen = runs.clone();
        let inject: InjectFn = Box::new(move |n| {
            seen.lock().unwrap().push(n);
            error(n)
        });
        let ex = DiffusionExecutor {
            inject: Some(inject),
            ..DiffusionExecutor::new(models, Device::Cpu, DType::F32, 1 << 30, 4)
        };
        (ex, runs)
    }

    #[test]
    fn a_batch_out_of_gpu_memory_runs_again_one_job_at_a_time() {
        let (ex, runs) = failing(vec![tiny("tiny-sd")], |n| (n > 1).then(|| OOM.to_string()));
        let jobs = [job("tiny-sd", 1), job("tiny-sd", 2), job("tiny-sd", 3)];
        let out = ex.generate_batch(&jobs);
        assert_eq!(*runs.lock().unwrap(), vec![3, 1, 1, 1]);
        assert_eq!(out.len(), 3);
        for o in &out {
            assert!(o.is_ok(), "{:?}", o.as_ref().err());
        }
        // Each image is the one its job makes alone.
        let alone = DiffusionExecutor::new(vec![tiny("tiny-sd")], Device::Cpu, DType::F32, 1 << 30, 1);
        assert_eq!(alone.generate_batch(&[job("tiny-sd", 2)])[0].as_ref().unwrap().png, out[1].as_ref().unwrap().png);
    }

    #[test]
    fn a_single_job_out_of_gpu_memory_fails_retryably_and_the_executor_goes_on() {
        let fail = Arc::new(AtomicBool::new(true));
        let flag = fail.clone();
        let (ex, runs) = failing(vec![tiny("tiny-sd"), tiny("tiny-z-image")], move |_| {
            flag.load(std::sync::atomic::Ordering::Relaxed).then(|| format!("denoising: {OOM}"))
        });
        // Another model loaded first: it is unloaded to make room, and the
        // job tried once more before it fails.
        fail.store(false, std::sync::atomic::Ordering::Relaxed);
        assert!(ex.generate_batch(&[job("tiny-z-image", 5)])[0].is_ok());
        assert_eq!(ex.loaded_models(), vec!["tiny-z-image".to_string()]);
        fail.store(true, std::sync::atomic::Ordering::Relaxed);
        runs.lock().unwrap().clear();
        let out = ex.generate_batch(&[job("tiny-sd", 1), job("tiny-sd", 2)]);
        // The batch, again after unloading tiny-z-image, then each job alone.
        assert_eq!(*runs.lock().unwrap(), vec![2, 2, 1, 1]);
        assert_eq!(ex.loaded_models(), vec!["tiny-sd".to_string()]);
        for o in out {
            match o {
                Err(e @ ExecError::Failed(_)) => {
                    assert!(e.is_retryable());
                    let msg = e.to_string();
                    assert!(msg.starts_with("the job does not fit in GPU memory: ") && msg.contains(OOM), "{msg}");
                }
                other => panic!("expected a retryable out-of-memory failure, got {:?}", other.map(|o| o.png.len())),
            }
        }
        fail.store(false, std::sync::atomic::Ordering::Relaxed);
        assert!(ex.generate_batch(&[job("tiny-sd", 1)])[0].is_ok(), "the executor works after it");
    }

    #[test]
    fn other_run_errors_fail_the_batch_without_splitting() {
        let (ex, runs) =
            failing(vec![tiny("tiny-sd")], |_| Some(r#"DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, "illegal")"#.into()));
        let out = ex.generate_batch(&[job("tiny-sd", 1), job("tiny-sd", 2)]);
        assert_eq!(*runs.lock().unwrap(), vec![2]);
        for o in out {
            assert!(matches!(&o, Err(ExecError::Failed(m)) if m.contains("ILLEGAL_ADDRESS")), "{:?}", o.err());
        }
    }

    /// f16 runs every family on the CPU (slowly); bf16 does not (candle's
    /// CPU matmul has no bf16), which is why `--dtype bf16` is refused there
    /// (`device::decide`). If this starts failing, candle gained it: allow it.
    #[test]
    fn f16_runs_on_the_cpu_and_bf16_does_not() {
        for model in ["tiny-sd", "tiny-sdxl", "tiny-z-image"] {
            let ex = DiffusionExecutor::new(vec![tiny(model)], Device::Cpu, DType::F16, 1 << 30, 1);
            let out = ex.generate_batch(&[job(model, 1)]);
            let png = out[0].as_ref().unwrap_or_else(|e| panic!("{model} at f16: {e}"));
            assert!(png.png.starts_with(b"\x89PNG"), "{model} at f16");
        }
        let ex = DiffusionExecutor::new(vec![tiny("tiny-sd")], Device::Cpu, DType::BF16, 1 << 30, 1);
        match &ex.generate_batch(&[job("tiny-sd", 1)])[0] {
            Err(ExecError::Failed(m)) => assert!(m.contains("unsupported dtype BF16"), "{m}"),
            other => panic!("bf16 ran on the CPU ({:?}): allow --dtype bf16 there", other.as_ref().err()),
        }
        assert_eq!(
            DiffusionExecutor::new(vec![tiny("tiny-sd")], Device::Cpu, Precision::PerFamily, 1 << 30, 1).dtype(),
            Precision::PerFamily.to_string()
        );
    }
}
