//! GPU benchmark (issue 7): candle stock vs. candle with our fused kernels,
//! on the denoiser of each family at its real size, with random weights.
//!
//! `tools/gpu-check.sh` runs it on the GPU machine beside
//! `tools/bench_diffusers.py` (PyTorch diffusers eager, same weights, same
//! shapes); see docs/gpu.md ("The device check").
//!
//! What it does:
//! 1. Builds each model from its real config (`benches/data/`) with random
//!    weights drawn deterministically: every tensor from its own ChaCha8
//!    stream seeded by (`RAFTGEN_GPU_BENCH_SEED`, its name, chunk index), so
//!    the bytes do not depend on build order or thread count. N(0, 0.02) for
//!    weights, the layer's constant init (norm scales 1, biases 0) otherwise.
//! 2. Saves exactly those tensors as diffusers-layout safetensors, with the
//!    model and scheduler configs, under `$RAFTGEN_GPU_BENCH_WEIGHTS/<model>/`
//!    (`diffusion_pytorch_model.safetensors`, `config.json`,
//!    `scheduler_config.json`), and the cases it runs in `cases.json`, so
//!    diffusers runs the same weights and shapes.
//! 3. Times the full denoising loop per case, for two paths:
//!    - `stock`: what `SdPipeline::sample` / `ZImagePipeline::sample` do per
//!      step: the batch doubled for classifier-free guidance, the denoiser,
//!      the guidance combine with candle ops, `Scheduler::step`;
//!    - `fused`: the same weights loaded with `Kernels::Fused` (our kernels in
//!      the UNet / DiT blocks: docs/gpu.md), then `kernels::guided_step`
//!      (guidance combine + scheduler update in one kernel).
//!
//!    Per step: each step between `Device::synchronize` calls, median over all
//!    steps of all repetitions. Per image: the whole loop (initial noise
//!    scaling plus every step) divided by the images in the batch, median over
//!    repetitions. Text encoding and VAE decoding are not part of either.
//!
//! Environment:
//! - `RAFTGEN_GPU_BENCH_WEIGHTS` (required): where the safetensors go.
//! - `RAFTGEN_GPU_BENCH_JSON`: write the results there as JSON.
//! - `RAFTGEN_GPU_BENCH_CASES`: comma-separated case names to run (default
//!   all: `sd15-b1,sd15-b2,sd15-b4,zimage-b1,zimage-b1-cfg`); `sd15` or
//!   `zimage` selects a family.
//! - `RAFTGEN_GPU_BENCH_REPS` (default 3), `RAFTGEN_GPU_BENCH_WARMUP_STEPS`
//!   (default 2), `RAFTGEN_GPU_BENCH_SD_STEPS` (default 20, DDIM),
//!   `RAFTGEN_GPU_BENCH_ZIMAGE_STEPS` (default 9, Z-Image-Turbo's),
//!   `RAFTGEN_GPU_BENCH_SEED` (default 0).
//! - `RAFTGEN_GPU_BENCH_PATHS` (default `stock,fused`): the paths to run.
//! - `RAFTGEN_GPU_BENCH_PROFILE=1`: one step per path and case, untimed, for a
//!   kernel profiler (`tools/gpu-check.sh` runs it under `ncu`);
//!   `RAFTGEN_GPU_BENCH_SAVE=0` skips writing the weights.
//! - `RAFTGEN_GPU_BENCH_ATTENTION=0` skips the attention table (CUDA only:
//!   candle's unfused attention in f32 and in the input dtype, our SIMT and
//!   tensor-core kernels, at the models' shapes).
//! - `RAFTGEN_GPU_BENCH_DEVICE`: `cuda` (default, device 0) or `cpu` (only
//!   useful with `RAFTGEN_GPU_BENCH_TINY=1`, which swaps the configs for tiny
//!   ones and 64×64 images, to check the plumbing without a GPU).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use raftgen::kernels::{attention_bshd, attention_with, guided_step, AttentionKernel, Guidance};
use raftgen::models::scheduler::{self, FlowMatchEuler, SamplerKind, Scheduler, SchedulerConfig};
use raftgen::models::sd::unet::{UNet, UNetConfig};
use raftgen::models::z_image::transformer::ZImageTransformer;
use raftgen::models::z_image::ZImagePipeline;
use raftgen::models::Kernels;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use serde_json::{json, Value};

mod common;

use common::median;

const SD15_UNET: &str = include_str!("data/sd-1.5-unet.json");
const SD15_SCHEDULER: &str = include_str!("data/sd-1.5-scheduler.json");
const ZIMAGE_TRANSFORMER: &str = include_str!("data/z-image-turbo-transformer.json");
const ZIMAGE_SCHEDULER: &str = include_str!("data/z-image-turbo-scheduler.json");

/// Guidance scales: SD's usual 7.5; Z-Image's non-Turbo 4 (Turbo runs at 0).
const SD_GUIDANCE: f64 = 7.5;
const ZIMAGE_GUIDANCE: f64 = 4.0;
/// CLIP's context length (SD) and the caption tokens given to Z-Image (a
/// short prompt in Qwen3's chat template, already a multiple of 32).
const SD_CONTEXT_TOKENS: usize = 77;
const ZIMAGE_CAPTION_TOKENS: usize = 64;

/// What the fused path does and does not fuse yet, printed and in the JSON.
const FUSIONS_ACTIVE: &[&str] = &[
    "guided_step: guidance combine + scheduler update (DDIM / flow-match Euler)",
    "group_norm_silu: the UNet's ResNet blocks and norm_out",
    "geglu: the UNet's transformer feed-forwards",
    "attention (tensor cores for f16/bf16): UNet self/cross-attention, Z-Image DiT blocks",
];
const FUSIONS_NOT_WIRED: &[&str] = &[];

fn env_usize(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(v) => v.parse().with_context(|| format!("{name}={v:?} is not a whole number")),
        Err(_) => Ok(default),
    }
}

// --- random weights ------------------------------------------------------------

/// FNV-1a, to seed each tensor's stream from its name.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// N(0, std) values for tensor `name`, in chunks of 1 Mi elements each drawn
/// from its own stream, generated on all cores.
fn normal_values(seed: u64, name: &str, n: usize, std: f32) -> Vec<f32> {
    const CHUNK: usize = 1 << 20;
    let base = seed ^ fnv1a(name);
    let mut v = vec![0f32; n];
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let chunks: Vec<(usize, &mut [f32])> = v.chunks_mut(CHUNK).enumerate().collect();
    let mut per_thread: Vec<Vec<(usize, &mut [f32])>> = (0..threads).map(|_| Vec::new()).collect();
    for (k, c) in chunks {
        per_thread[k % threads].push((k, c));
    }
    std::thread::scope(|s| {
        for work in per_thread {
            s.spawn(move || {
                for (k, chunk) in work {
                    let stream = base.wrapping_add((k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(stream);
                    for x in chunk.iter_mut() {
                        let z: f32 = StandardNormal.sample(&mut rng);
                        *x = z * std;
                    }
                }
            });
        }
    });
    v
}

/// A VarBuilder backend that makes every tensor the model asks for (random,
/// seeded per name) and keeps a CPU copy of each, to be saved for diffusers.
/// Clones share the record (the VarBuilder owns one, the caller another).
#[derive(Clone)]
struct RecordingWeights {
    seed: u64,
    made: Arc<Mutex<HashMap<String, Tensor>>>,
}

impl RecordingWeights {
    fn new(seed: u64) -> Self {
        RecordingWeights { seed, made: Arc::new(Mutex::new(HashMap::new())) }
    }

    /// The tensors made so far (the record is emptied).
    fn take(&self) -> HashMap<String, Tensor> {
        std::mem::take(&mut *self.made.lock().expect("weights lock"))
    }
}

impl SimpleBackend for RecordingWeights {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let mut made = self.made.lock().expect("weights lock");
        if let Some(t) = made.get(name) {
            if t.shape() != &s {
                candle_core::bail!("{name} asked for as {s:?} and as {:?}", t.shape());
            }
            return t.to_dtype(dtype)?.to_device(dev);
        }
        let t = match h {
            Init::Const(v) => Tensor::full(v as f32, s.clone(), &Device::Cpu)?,
            _ => Tensor::from_vec(normal_values(self.seed, name, s.elem_count(), 0.02), s.clone(), &Device::Cpu)?,
        }
        .to_dtype(dtype)?;
        made.insert(name.to_string(), t.clone());
        t.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("{name}: random weights need a shape")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// Writes a model directory diffusers can load: the weights, the model
/// config and the scheduler config.
fn save_model(dir: &Path, weights: HashMap<String, Tensor>, config: &str, scheduler: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let params: usize = weights.values().map(|t| t.elem_count()).sum();
    let t = Instant::now();
    let file = dir.join("diffusion_pytorch_model.safetensors");
    candle_core::safetensors::save(&weights, &file).with_context(|| format!("writing {}", file.display()))?;
    std::fs::write(dir.join("config.json"), config)?;
    std::fs::write(dir.join("scheduler_config.json"), scheduler)?;
    println!(
        "  saved {} tensors ({:.0}M parameters) to {} in {:.1} s",
        weights.len(),
        params as f64 / 1e6,
        file.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

// --- timing --------------------------------------------------------------------

struct Settings {
    device: Device,
    reps: usize,
    warmup_steps: usize,
    /// `RAFTGEN_GPU_BENCH_PROFILE=1`: each measured path runs one step only
    /// (under a kernel profiler such as `ncu`), no timing.
    profile: bool,
    /// `RAFTGEN_GPU_BENCH_PATHS`: which of `stock`, `fused` run.
    paths: Vec<String>,
    /// `RAFTGEN_GPU_BENCH_SAVE=0`: do not write the weights (profiling).
    save: bool,
}

impl Settings {
    fn runs(&self, path: &str) -> bool {
        self.paths.iter().any(|p| p == path)
    }
}

struct Measured {
    step_ms: f64,
    image_ms: f64,
    step_samples: Vec<f64>,
    loop_samples: Vec<f64>,
}

/// Times `reps` full loops of `steps` steps from `init` (after `warmup_steps`
/// steps of warm-up), synchronising the device before each clock reading.
fn measure(
    set: &Settings,
    steps: usize,
    images: usize,
    init: &dyn Fn() -> candle_core::Result<Tensor>,
    step: &dyn Fn(usize, &Tensor) -> Result<Tensor>,
) -> Result<Measured> {
    let dev = &set.device;
    let x = init()?;
    if set.profile {
        step(0, &x)?;
        dev.synchronize()?;
        return Ok(Measured { step_ms: f64::NAN, image_ms: f64::NAN, step_samples: vec![], loop_samples: vec![] });
    }
    for i in 0..set.warmup_steps.min(steps) {
        step(i, &x)?;
    }
    dev.synchronize()?;
    let (mut step_samples, mut loop_samples) = (Vec::new(), Vec::new());
    for _ in 0..set.reps {
        dev.synchronize()?;
        let start = Instant::now();
        let mut latents = init()?;
        for i in 0..steps {
            dev.synchronize()?;
            let t = Instant::now();
            latents = step(i, &latents)?;
            dev.synchronize()?;
            step_samples.push(t.elapsed().as_secs_f64() * 1e3);
        }
        dev.synchronize()?;
        loop_samples.push(start.elapsed().as_secs_f64() * 1e3);
        // A NaN would not change the timing, but say so: random weights at
        // half precision can overflow, which diffusers would hit as well.
        let finite = latents.to_dtype(DType::F32)?.abs()?.max_all()?.to_scalar::<f32>()?;
        if !finite.is_finite() {
            eprintln!("  note: the final latents are not finite (random weights); timings are unaffected");
        }
    }
    let per_image: Vec<f64> = loop_samples.iter().map(|ms| ms / images as f64).collect();
    Ok(Measured { step_ms: median(&step_samples), image_ms: median(&per_image), step_samples, loop_samples })
}

// --- cases ---------------------------------------------------------------------

#[derive(Clone)]
struct Case {
    name: String,
    model: &'static str,
    images: usize,
    cfg: bool,
    guidance: f64,
    steps: usize,
    height: usize,
    width: usize,
}

impl Case {
    fn rows(&self) -> usize {
        if self.cfg {
            2 * self.images
        } else {
            self.images
        }
    }

    fn json(&self, context_tokens: usize) -> Value {
        json!({
            "name": self.name, "model": self.model, "images": self.images, "rows": self.rows(),
            "cfg": self.cfg, "guidance": self.guidance, "steps": self.steps,
            "height": self.height, "width": self.width, "context_tokens": context_tokens,
        })
    }
}

struct Row {
    case: Case,
    path: &'static str,
    m: Measured,
}

fn report(rows: &mut Vec<Row>, case: &Case, path: &'static str, m: Measured) {
    println!(
        "  {:<14} {:<6} {:>3} img {:>2} rows {:>3} steps: {:>9.2} ms/step {:>10.1} ms/image",
        case.name,
        path,
        case.images,
        case.rows(),
        case.steps,
        m.step_ms,
        m.image_ms
    );
    rows.push(Row { case: case.clone(), path, m });
}

/// Seeded standard normal input on the device, in `dtype`.
fn input(seed: u64, name: &str, shape: &[usize], dtype: DType, dev: &Device) -> Result<Tensor> {
    let n = shape.iter().product();
    Ok(Tensor::from_vec(normal_values(seed, name, n, 1.0), shape, &Device::Cpu)?.to_dtype(dtype)?.to_device(dev)?)
}

fn sd15(set: &Settings, cases: &[Case], tiny: bool, seed: u64, out: &Path, rows: &mut Vec<Row>) -> Result<()> {
    let dev = &set.device;
    let dtype = if dev.is_cuda() { DType::F16 } else { DType::F32 };
    let config = if tiny { TINY_UNET } else { SD15_UNET };
    let cfg: UNetConfig = serde_json::from_str(config).context("the SD-1.5 UNet config")?;
    let sched_cfg: SchedulerConfig = serde_json::from_str(SD15_SCHEDULER).context("the SD-1.5 scheduler config")?;
    let weights = RecordingWeights::new(seed);
    let t = Instant::now();
    let vb = VarBuilder::from_backend(Box::new(weights.clone()), dtype, dev.clone());
    // The same weights twice: candle's ops (stock) and our fused kernels.
    let stock_unet = UNet::new(&cfg, vb.clone(), Kernels::Candle)?;
    let fused_unet = UNet::new(&cfg, vb, Kernels::Fused)?;
    println!("sd-1.5 unet: built with random weights ({dtype:?}) in {:.1} s", t.elapsed().as_secs_f64());
    if set.save {
        save_model(&out.join("sd15-unet"), weights.take(), config, SD15_SCHEDULER)?;
    }
    drop(weights.take());
    let ctx_dim = cfg_cross_attention_dim(&cfg)?;
    for case in cases.iter().filter(|c| c.model == "sd15") {
        let sched = scheduler::build(SamplerKind::Ddim, &sched_cfg, case.steps)?;
        let timesteps = sched.timesteps().to_vec();
        let (h, w) = (case.height / 8, case.width / 8);
        let shape = [case.images, cfg.in_channels, h, w];
        let ctx = input(seed, "context", &[case.rows(), SD_CONTEXT_TOKENS, ctx_dim], dtype, dev)?;
        let noise = input(seed, "latents", &shape, dtype, dev)?;
        let init = || &noise * sched.init_noise_sigma();
        let denoise = |unet: &UNet, i: usize, latents: &Tensor| -> Result<Tensor> {
            let x = if case.cfg { Tensor::cat(&[latents, latents], 0)? } else { latents.clone() };
            let x = sched.scale_model_input(&x, i)?;
            Ok(unet.forward(&x, timesteps[i], &ctx, None)?)
        };
        // Stock: SdPipeline::sample's ops.
        let stock = |i: usize, latents: &Tensor| -> Result<Tensor> {
            let out = denoise(&stock_unet, i, latents)?;
            let out = if case.cfg {
                let b = latents.dim(0)?;
                let (unc, txt) = (out.narrow(0, 0, b)?, out.narrow(0, b, b)?);
                (&unc + ((txt - &unc)? * case.guidance)?)?
            } else {
                out
            };
            let mut no_noise =
                |_: &[usize]| -> candle_core::Result<Tensor> { candle_core::bail!("DDIM draws no noise") };
            Ok(sched.step(&out, i, latents, &mut no_noise)?)
        };
        // Fused: the same denoiser, then one kernel for guidance + DDIM.
        let fused = |i: usize, latents: &Tensor| -> Result<Tensor> {
            let out = denoise(&fused_unet, i, latents)?;
            let step = sched.linear_step(i).context("DDIM steps linearly")?;
            let g = if case.cfg { Guidance::UncondFirst(case.guidance) } else { Guidance::None };
            Ok(guided_step(&out, latents, None, g, step)?)
        };
        if set.runs("stock") {
            report(rows, case, "stock", measure(set, case.steps, case.images, &init, &stock)?);
        }
        if set.runs("fused") {
            report(rows, case, "fused", measure(set, case.steps, case.images, &init, &fused)?);
        }
    }
    Ok(())
}

fn cfg_cross_attention_dim(cfg: &UNetConfig) -> Result<usize> {
    use raftgen::models::sd::unet::PerBlock;
    Ok(match &cfg.cross_attention_dim {
        PerBlock::One(d) => *d,
        PerBlock::Each(v) => *v.first().context("cross_attention_dim is empty")?,
    })
}

fn zimage(set: &Settings, cases: &[Case], tiny: bool, seed: u64, out: &Path, rows: &mut Vec<Row>) -> Result<()> {
    let dev = &set.device;
    let dtype = if dev.is_cuda() { DType::BF16 } else { DType::F32 };
    let config = if tiny { TINY_ZIMAGE } else { ZIMAGE_TRANSFORMER };
    let cfg: candle_transformers::models::z_image::Config =
        serde_json::from_str(config).context("the Z-Image transformer config")?;
    let sched_cfg: SchedulerConfig = serde_json::from_str(ZIMAGE_SCHEDULER).context("the Z-Image scheduler config")?;
    let t = Instant::now();
    let weights = RecordingWeights::new(seed);
    let vb = VarBuilder::from_backend(Box::new(weights.clone()), dtype, dev.clone());
    let stock_transformer = ZImageTransformer::new(&cfg, vb.clone(), Kernels::Candle)?;
    let fused_transformer = ZImageTransformer::new(&cfg, vb, Kernels::Fused)?;
    println!("z-image-turbo transformer: built with random weights ({dtype:?}) in {:.1} s", t.elapsed().as_secs_f64());
    if set.save {
        save_model(&out.join("zimage-transformer"), weights.take(), config, ZIMAGE_SCHEDULER)?;
    }
    drop(weights.take());
    for case in cases.iter().filter(|c| c.model == "zimage") {
        let sched = FlowMatchEuler::new(&sched_cfg, case.steps)?;
        let sigmas = sched.sigmas().to_vec();
        let shape = [case.images, cfg.in_channels, case.height / 8, case.width / 8];
        let captions: Vec<Tensor> = (0..case.rows())
            .map(|r| input(seed, &format!("caption.{r}"), &[ZIMAGE_CAPTION_TOKENS, cfg.cap_feat_dim], dtype, dev))
            .collect::<Result<_>>()?;
        // The latents stay in f32, as in ZImagePipeline::sample.
        let noise = input(seed, "latents", &shape, DType::F32, dev)?;
        let init = || &noise * sched.init_noise_sigma();
        let denoise = |transformer: &ZImageTransformer, i: usize, latents: &Tensor| -> Result<Tensor> {
            let x = latents.to_dtype(dtype)?.unsqueeze(2)?;
            let x = if case.cfg { Tensor::cat(&[&x, &x], 0)? } else { x };
            // ZImagePipeline::model_time: (1000 - sigma * 1000) / 1000 in f32.
            let mt = (1000.0 - sigmas[i] as f32 * 1000.0) / 1000.0;
            let t = Tensor::from_vec(vec![mt; case.rows()], case.rows(), dev)?;
            transformer.forward(&x, &t, &captions)
        };
        // Stock: ZImagePipeline::velocity + FlowMatchEuler::step.
        let stock = |i: usize, latents: &Tensor| -> Result<Tensor> {
            let v = ZImagePipeline::model_output(&denoise(&stock_transformer, i, latents)?, case.cfg, case.guidance)?;
            let mut no_noise = |_: &[usize]| -> candle_core::Result<Tensor> {
                candle_core::bail!("flow-matching Euler draws no noise")
            };
            Ok(sched.step(&v, i, latents, &mut no_noise)?)
        };
        // Fused: the prediction's negation goes into the step's coefficient.
        let fused = |i: usize, latents: &Tensor| -> Result<Tensor> {
            let out = denoise(&fused_transformer, i, latents)?.squeeze(2)?.to_dtype(DType::F32)?;
            let mut step = sched.linear_step(i).context("flow-match Euler steps linearly")?;
            step.model_output = -step.model_output;
            let g = if case.cfg { Guidance::CondFirst(case.guidance) } else { Guidance::None };
            Ok(guided_step(&out, latents, None, g, step)?)
        };
        if set.runs("stock") {
            report(rows, case, "stock", measure(set, case.steps, case.images, &init, &stock)?);
        }
        if set.runs("fused") {
            report(rows, case, "fused", measure(set, case.steps, case.images, &init, &fused)?);
        }
    }
    Ok(())
}

// --- attention ---------------------------------------------------------------

/// One attention shape of the real models: (name, [batch, heads], lq, lk,
/// head dim, dtype). SD-1.5 at 512x512 with CFG (2 rows): self-attention at
/// the three UNet levels and the cross-attention over CLIP's 77 tokens;
/// Z-Image-Turbo at 1024x1024: 4096 image tokens + 64 caption tokens, 30
/// heads of 128.
const ATTENTION_SHAPES: &[(&str, [usize; 2], usize, usize, usize, DType)] = &[
    ("sd15-self-64x64", [2, 8], 4096, 4096, 40, DType::F16),
    ("sd15-cross-64x64", [2, 8], 4096, 77, 40, DType::F16),
    ("sd15-self-32x32", [2, 8], 1024, 1024, 80, DType::F16),
    ("sd15-self-16x16", [2, 8], 256, 256, 160, DType::F16),
    ("zimage-1024", [1, 30], 4160, 4160, 128, DType::BF16),
];

/// Times `f` (median of `reps` runs after 3 warm-ups), in ms.
fn time_ms(dev: &Device, reps: usize, f: &dyn Fn() -> Result<Tensor>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    dev.synchronize()?;
    let mut samples = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        dev.synchronize()?;
        samples.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(&samples))
}

/// Attention alone at the models' shapes: candle's unfused ops as the SD
/// UNet runs them (upcast to f32), the same in the input dtype, our SIMT
/// kernel and our tensor-core kernel. Prints ms and TFLOP/s (4 B H Lq Lk D
/// flops) and the tensor-core kernel's error against the f32 reference.
fn attention_bench(set: &Settings, seed: u64, json_rows: &mut Vec<Value>) -> Result<()> {
    let dev = &set.device;
    let reps = (set.reps * 10).max(10);
    println!();
    println!("attention alone ({reps} runs each, median)");
    println!("| shape | dtype | candle f32 (stock SD) ms | candle in dtype ms | ours SIMT ms | ours tensor-core v1 ms | ours v2 (tokens-major) ms | v2 TFLOP/s | v2 / stock | v2 rel. error |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for &(name, [b, h], lq, lk, d, dtype) in ATTENTION_SHAPES {
        let q = input(seed, &format!("{name}.q"), &[b, h, lq, d], dtype, dev)?;
        let k = input(seed, &format!("{name}.k"), &[b, h, lk, d], dtype, dev)?;
        let v = input(seed, &format!("{name}.v"), &[b, h, lk, d], dtype, dev)?;
        let scale = 1.0 / (d as f64).sqrt();
        let unfused = |q: &Tensor, k: &Tensor, v: &Tensor| -> Result<Tensor> {
            let s = q.matmul(&(k.t()? * scale)?)?;
            Ok(candle_nn::ops::softmax_last_dim(&s)?.matmul(v)?)
        };
        let stock = || -> Result<Tensor> {
            let [q, k, v] = [&q, &k, &v].map(|t| t.to_dtype(DType::F32));
            Ok(unfused(&q?, &k?, &v?)?.to_dtype(dtype)?)
        };
        let in_dtype = || unfused(&q, &k, &v);
        let simt = || Ok(attention_with(&q, &k, &v, scale, AttentionKernel::Simt)?);
        let mma = || Ok(attention_with(&q, &k, &v, scale, AttentionKernel::Auto)?);
        let t = |x: &Tensor| -> Result<Tensor> { Ok(x.transpose(1, 2)?.contiguous()?) };
        let (qt, kt, vt) = (t(&q)?, t(&k)?, t(&v)?);
        let v2 = || Ok(attention_bshd(&qt, &kt, &vt, scale)?);
        let want = stock()?.to_dtype(DType::F32)?;
        let got = v2()?.transpose(1, 2)?.to_dtype(DType::F32)?;
        let err = ((got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?
            / want.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-12)) as f64;
        let t = [
            time_ms(dev, reps, &stock)?,
            time_ms(dev, reps, &in_dtype)?,
            time_ms(dev, reps, &simt)?,
            time_ms(dev, reps, &mma)?,
            time_ms(dev, reps, &v2)?,
        ];
        let tflops = 4.0 * (b * h * lq * lk * d) as f64 / (t[4] * 1e-3) / 1e12;
        println!(
            "| {name} [{b},{h},{lq},{lk},{d}] | {dtype:?} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {tflops:.1} | {:.3} | {err:.1e} |",
            t[0], t[1], t[2], t[3], t[4], t[4] / t[0]
        );
        json_rows.push(json!({
            "shape": name, "dims": [b, h, lq, lk, d], "dtype": format!("{dtype:?}"),
            "candle_f32_ms": t[0], "candle_dtype_ms": t[1], "simt_ms": t[2], "mma_v1_ms": t[3], "v2_ms": t[4],
            "v2_tflops": tflops, "v2_rel_err": err,
        }));
    }
    Ok(())
}

/// Tiny configs for `RAFTGEN_GPU_BENCH_TINY=1` (the plumbing, not the speed).
const TINY_UNET: &str = r#"{
  "in_channels": 4, "out_channels": 4, "flip_sin_to_cos": true, "freq_shift": 0,
  "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
  "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 32,
  "cross_attention_dim": 32, "attention_head_dim": 8, "sample_size": 8
}"#;
const TINY_ZIMAGE: &str = r#"{
  "all_f_patch_size": [1], "all_patch_size": [2], "axes_dims": [4, 6, 6], "axes_lens": [1536, 512, 512],
  "cap_feat_dim": 48, "dim": 48, "in_channels": 16, "n_heads": 3, "n_kv_heads": 3, "n_layers": 2,
  "n_refiner_layers": 1, "norm_eps": 1e-05, "qk_norm": true, "rope_theta": 256.0, "t_scale": 1000.0
}"#;

fn all_cases(tiny: bool) -> Result<Vec<Case>> {
    let sd_steps = env_usize("RAFTGEN_GPU_BENCH_SD_STEPS", 20)?;
    let z_steps = env_usize("RAFTGEN_GPU_BENCH_ZIMAGE_STEPS", 9)?;
    let (sd_px, z_px) = if tiny { (64, 64) } else { (512, 1024) };
    let sd = |images: usize| Case {
        name: format!("sd15-b{images}"),
        model: "sd15",
        images,
        cfg: true,
        guidance: SD_GUIDANCE,
        steps: sd_steps,
        height: sd_px,
        width: sd_px,
    };
    let z = |cfg: bool| Case {
        name: if cfg { "zimage-b1-cfg".into() } else { "zimage-b1".into() },
        model: "zimage",
        images: 1,
        cfg,
        guidance: if cfg { ZIMAGE_GUIDANCE } else { 0.0 },
        steps: z_steps,
        height: z_px,
        width: z_px,
    };
    let all = vec![sd(1), sd(2), sd(4), z(false), z(true)];
    let Ok(wanted) = std::env::var("RAFTGEN_GPU_BENCH_CASES") else {
        return Ok(all);
    };
    let wanted: Vec<&str> = wanted.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    for w in &wanted {
        if !all.iter().any(|c| c.name == *w || c.model == *w) {
            let names: Vec<&str> = all.iter().map(|c| c.name.as_str()).collect();
            bail!("RAFTGEN_GPU_BENCH_CASES: unknown case {w:?} (cases: {}, or sd15 / zimage)", names.join(", "));
        }
    }
    Ok(all.into_iter().filter(|c| wanted.iter().any(|w| c.name == *w || c.model == *w)).collect())
}

fn main() -> Result<()> {
    let tiny = std::env::var("RAFTGEN_GPU_BENCH_TINY").as_deref() == Ok("1");
    let device = match std::env::var("RAFTGEN_GPU_BENCH_DEVICE").as_deref() {
        Ok("cpu") => Device::Cpu,
        Ok("cuda") | Err(_) => {
            Device::new_cuda(0).context("opening CUDA device 0 (RAFTGEN_GPU_BENCH_DEVICE=cpu for the CPU)")?
        }
        Ok(other) => bail!("RAFTGEN_GPU_BENCH_DEVICE={other:?}: expected cuda or cpu"),
    };
    let out = PathBuf::from(
        std::env::var_os("RAFTGEN_GPU_BENCH_WEIGHTS")
            .context("set RAFTGEN_GPU_BENCH_WEIGHTS to the directory for the weights (about 14 GB at full size)")?,
    );
    let seed = env_usize("RAFTGEN_GPU_BENCH_SEED", 0)? as u64;
    let set = Settings {
        device,
        reps: env_usize("RAFTGEN_GPU_BENCH_REPS", 3)?.max(1),
        warmup_steps: env_usize("RAFTGEN_GPU_BENCH_WARMUP_STEPS", 2)?,
        profile: std::env::var("RAFTGEN_GPU_BENCH_PROFILE").as_deref() == Ok("1"),
        paths: std::env::var("RAFTGEN_GPU_BENCH_PATHS")
            .unwrap_or_else(|_| "stock,fused".into())
            .split(',')
            .map(|p| p.trim().to_string())
            .collect(),
        save: std::env::var("RAFTGEN_GPU_BENCH_SAVE").as_deref() != Ok("0"),
    };
    if let Some(p) = set.paths.iter().find(|p| !["stock", "fused"].contains(&p.as_str())) {
        bail!("RAFTGEN_GPU_BENCH_PATHS: unknown path {p:?} (stock, fused)");
    }
    let cases = all_cases(tiny)?;
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let cases_json: Vec<Value> = cases
        .iter()
        .map(|c| c.json(if c.model == "sd15" { SD_CONTEXT_TOKENS } else { ZIMAGE_CAPTION_TOKENS }))
        .collect();
    let settings = json!({ "reps": set.reps, "warmup_steps": set.warmup_steps, "seed": seed, "tiny": tiny });
    std::fs::write(
        out.join("cases.json"),
        serde_json::to_string_pretty(&json!({ "cases": cases_json, "settings": settings }))?,
    )?;

    println!("raftgen GPU benchmark: candle stock vs. candle + fused kernels ({:?})", set.device);
    println!("fused path, active: {}", FUSIONS_ACTIVE.join("; "));
    println!("fused path, not wired yet: {}", FUSIONS_NOT_WIRED.join("; "));
    let mut rows = Vec::new();
    let mut attention_rows = Vec::new();
    if std::env::var("RAFTGEN_GPU_BENCH_ATTENTION").as_deref() != Ok("0") && set.device.is_cuda() && !set.profile {
        attention_bench(&set, seed, &mut attention_rows)?;
    }
    if cases.iter().any(|c| c.model == "sd15") {
        sd15(&set, &cases, tiny, seed, &out, &mut rows)?;
    }
    if cases.iter().any(|c| c.model == "zimage") {
        zimage(&set, &cases, tiny, seed, &out, &mut rows)?;
    }

    println!();
    println!("| case | images | path | ms/step | ms/image | fused/stock (image) |");
    println!("| --- | ---: | --- | ---: | ---: | ---: |");
    for r in &rows {
        let stock = rows.iter().find(|s| s.case.name == r.case.name && s.path == "stock");
        let ratio = stock.map_or(String::from("-"), |s| format!("{:.3}", r.m.image_ms / s.m.image_ms));
        println!(
            "| {} | {} | {} | {:.2} | {:.1} | {} |",
            r.case.name, r.case.images, r.path, r.m.step_ms, r.m.image_ms, ratio
        );
    }
    if let Some(path) = std::env::var_os("RAFTGEN_GPU_BENCH_JSON") {
        let results: Vec<Value> = rows
            .iter()
            .map(|r| {
                json!({
                    "case": r.case.name, "model": r.case.model, "images": r.case.images, "rows": r.case.rows(),
                    "steps": r.case.steps, "path": r.path, "step_ms": r.m.step_ms, "image_ms": r.m.image_ms,
                    "step_samples_ms": r.m.step_samples, "loop_samples_ms": r.m.loop_samples,
                })
            })
            .collect();
        let doc = json!({
            "tool": "candle", "device": format!("{:?}", set.device), "settings": settings,
            "fusions_active": FUSIONS_ACTIVE, "fusions_not_wired": FUSIONS_NOT_WIRED, "results": results,
            "attention": attention_rows,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", PathBuf::from(&path).display()))?;
    }
    Ok(())
}
