//! The real executor: candle text-to-image pipelines (see [`crate::models`]).
//!
//! It serves every model of its catalog, loads a model the first time a job
//! needs it and keeps it while it fits the memory budget, evicting the least
//! recently used ones to make room. A model that cannot fit fails its jobs
//! with a clear error; the node stays up. Jobs for the same model, size,
//! steps, sampler and guidance run as one batch; each job keeps its own noise
//! stream, so its image does not depend on what it was batched with.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use raftgen_raft::command::ModelInfo;

use super::png::{encode_rgb, Recipe};
use super::{ExecError, Executor, JobOutput, JobSpec, RunControl};
use crate::models::catalog::ModelEntry;
use crate::models::{Cancelled, GenRequest, Pipeline, SamplerKind};

/// Steps and guidance a model gets when the job does not say: Turbo models
/// (by folder name) are distilled for few steps without guidance.
fn defaults(entry: &ModelEntry) -> (u32, f32) {
    let turbo = entry.name.to_ascii_lowercase().contains("turbo");
    match (entry.meta.family, turbo) {
        ("z-image", _) => (8, 0.0),
        (_, true) => (4, 0.0),
        _ => (20, 7.5),
    }
}

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

pub struct DiffusionExecutor {
    models: Vec<ModelEntry>,
    device: Device,
    dtype: DType,
    budget_bytes: u64,
    max_batch: usize,
    /// Loaded models, least recently used first.
    loaded: Mutex<Vec<Loaded>>,
    /// How long the last load of each model took (kept after unloading).
    load_times: Mutex<BTreeMap<String, Duration>>,
}

impl DiffusionExecutor {
    pub fn new(models: Vec<ModelEntry>, device: Device, dtype: DType, budget_bytes: u64, max_batch: usize) -> Self {
        DiffusionExecutor {
            models,
            device,
            dtype,
            budget_bytes,
            max_batch: max_batch.max(1),
            loaded: Mutex::new(Vec::new()),
            load_times: Mutex::new(BTreeMap::new()),
        }
    }

    fn entry(&self, name: &str) -> Option<&ModelEntry> {
        self.models.iter().find(|m| m.name == name)
    }

    /// Memory a loaded model takes: its weights at the executor's dtype.
    fn footprint(&self, entry: &ModelEntry) -> u64 {
        entry.params * self.dtype.size_in_bytes() as u64
    }

    /// The pipeline for `name`, loading it (and evicting others) if needed.
    /// A model larger than the budget never fits here (`Invalid`); a load
    /// that fails (I/O, memory) may work next time (`Failed`).
    fn pipeline(&self, entry: &ModelEntry) -> Result<Arc<Pipeline>, ExecError> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pos) = loaded.iter().position(|l| l.name == entry.name) {
            let l = loaded.remove(pos);
            let p = l.pipeline.clone();
            loaded.push(l);
            return Ok(p);
        }
        let bytes = self.footprint(entry);
        if bytes > self.budget_bytes {
            return Err(ExecError::Invalid(format!(
                "model '{}' needs {} MiB, more than this node's model memory budget of {} MiB (--model-memory-mb)",
                entry.name,
                bytes >> 20,
                self.budget_bytes >> 20
            )));
        }
        while loaded.iter().map(|l| l.bytes).sum::<u64>() + bytes > self.budget_bytes {
            let evicted = loaded.remove(0);
            tracing::info!("unloading model '{}' ({} MiB) to make room", evicted.name, evicted.bytes >> 20);
        }
        let started = Instant::now();
        let pipeline = Pipeline::load(entry.family, &entry.files, &self.device, self.dtype)
            .map_err(|e| ExecError::Failed(format!("loading model '{}': {e:#}", entry.name)))?;
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

    fn run(&self, jobs: &[(JobSpec, RunControl)]) -> Result<Vec<Result<JobOutput, ExecError>>, ExecError> {
        let first = &jobs[0].0;
        let entry = self
            .entry(&first.request.model)
            .ok_or_else(|| ExecError::Invalid(format!("this node has no model '{}'", first.request.model)))?;
        let reqs = jobs.iter().map(|(j, _)| self.request(entry, j)).collect::<Result<Vec<_>, _>>()?;
        let pipeline = self.pipeline(entry)?;
        let mut progress = |step: usize, steps: usize| {
            for (_, ctl) in jobs {
                ctl.progress(step as u32, steps as u32);
            }
            !jobs.iter().all(|(_, ctl)| ctl.is_cancelled())
        };
        let images = match pipeline.generate(&reqs, &mut progress) {
            Ok(images) => images,
            Err(e) if e.is::<Cancelled>() => return Ok(jobs.iter().map(|_| Err(ExecError::Cancelled)).collect()),
            // Out of memory, a backend error: the run broke, not the request.
            Err(e) => return Err(ExecError::Failed(format!("{e:#}"))),
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
}

impl Executor for DiffusionExecutor {
    fn name(&self) -> &str {
        "diffusion"
    }

    fn models(&self) -> Vec<ModelInfo> {
        self.models.iter().map(model_info).collect()
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

    fn generate_batch(&self, jobs: &[(JobSpec, RunControl)]) -> Vec<Result<JobOutput, ExecError>> {
        if jobs.is_empty() {
            return Vec::new();
        }
        match self.run(jobs) {
            Ok(out) => out,
            Err(e) => jobs.iter().map(|_| Err(e.clone())).collect(),
        }
    }
}
