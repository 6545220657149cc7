//! Executor benchmark: CPU time of the candle pipelines.
//!
//! `cargo bench --bench executor` prints, for each built-in tiny model
//! (tiny-sd, tiny-sdxl, tiny-z-image), the time per denoising step and per
//! image, one image at a time and as one batch of 4; then one denoiser step of
//! an SD-1.5-sized UNet at 512×512 (860M parameters, random weights built in
//! memory from SD-1.5's real `unet/config.json`, no file needed), for one
//! image (2 rows with guidance) and a batch of 2 images (4 rows).
//!
//! Then, for each tiny model, candle's ops against our fused kernels' CPU
//! references (`Kernels::Candle` vs `Kernels::Fused`), images alternating
//! between the two in one sitting: which the CPU default should be.
//!
//! Environment: `RAFTGEN_BENCH_IMAGES` (images per tiny measurement, default
//! 8), `RAFTGEN_BENCH_SKIP_SD15=1` skips the SD-1.5 step (about 2-3 minutes
//! and 6-11 GB of memory).

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use raftgen::models::files::ModelFiles;
use raftgen::models::sd::unet::{UNet, UNetConfig};
use raftgen::models::{Family, GenRequest, Kernels, Pipeline, SamplerKind};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn request(model: Family, seed: u64, steps: usize) -> GenRequest {
    let (sampler, guidance) = match model {
        Family::StableDiffusion => (SamplerKind::Ddim, 7.5),
        Family::ZImage => (SamplerKind::FlowMatchEuler, 3.0),
    };
    GenRequest {
        prompt: "a lighthouse at dusk, oil painting".into(),
        negative_prompt: "blurry".into(),
        width: 64,
        height: 64,
        steps,
        guidance,
        seed,
        sampler,
    }
}

fn tiny(name: &str, images: usize) {
    let files = ModelFiles::dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models").join(name));
    let family = Family::detect(&files).unwrap();
    let t = Instant::now();
    let p = Pipeline::load(family, &files, &Device::Cpu, DType::F32).unwrap();
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    let steps = 20;
    // Warm-up.
    p.generate(&[request(family, 0, 2)], &mut |_, _| true).unwrap();
    // Per step: time from the first to the last step callback of one image.
    let mut step_times = Vec::new();
    let mut one_ms = Vec::new();
    for i in 0..images {
        let start = Instant::now();
        let mut first: Option<Instant> = None;
        let mut last = start;
        p.generate(&[request(family, i as u64, steps)], &mut |_, _| {
            let now = Instant::now();
            first.get_or_insert(now);
            last = now;
            true
        })
        .unwrap();
        one_ms.push(start.elapsed().as_secs_f64() * 1e3);
        step_times.push((last - first.unwrap()).as_secs_f64() * 1e3 / (steps - 1) as f64);
    }
    let batch = 4;
    let mut batch_ms = Vec::new();
    for i in 0..images.div_ceil(batch) {
        let reqs: Vec<GenRequest> = (0..batch).map(|k| request(family, (i * batch + k) as u64, steps)).collect();
        let start = Instant::now();
        p.generate(&reqs, &mut |_, _| true).unwrap();
        batch_ms.push(start.elapsed().as_secs_f64() * 1e3 / batch as f64);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (step, one, per_in_batch) = (med(&mut step_times), med(&mut one_ms), med(&mut batch_ms));
    println!(
        "{name:<13} load {load_ms:>6.0} ms | 64x64, {steps} steps, guided: {step:>6.1} ms/step, {one:>7.1} ms/image alone, \
         {per_in_batch:>7.1} ms/image in batches of {batch} ({:.2}x throughput)",
        one / per_in_batch
    );
}

/// candle's ops vs our fused kernels' CPU references on one tiny model: the
/// same images, alternating between the two models, median ms per image.
fn kernels_on_cpu(name: &str, images: usize) {
    let files = ModelFiles::dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models").join(name));
    let family = Family::detect(&files).unwrap();
    let load = |k| Pipeline::load_with(family, &files, &Device::Cpu, DType::F32, k).unwrap();
    let (candle, fused) = (load(Kernels::Candle), load(Kernels::Fused));
    let steps = 20;
    for p in [&candle, &fused] {
        p.generate(&[request(family, 0, 2)], &mut |_, _| true).unwrap();
    }
    let (mut c_ms, mut f_ms) = (Vec::new(), Vec::new());
    for i in 0..images {
        for (p, out) in [(&candle, &mut c_ms), (&fused, &mut f_ms)] {
            let start = Instant::now();
            p.generate(&[request(family, i as u64, steps)], &mut |_, _| true).unwrap();
            out.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (c, f) = (med(&mut c_ms), med(&mut f_ms));
    println!(
        "{name:<13} CPU kernels: candle {c:>7.1} ms/image, fused references {f:>7.1} ms/image, fused/candle {:.2}",
        f / c
    );
}

/// Random weights for any requested shape: N(0, 0.02), norms at their init.
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(&self, s: Shape, _name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match h {
            Init::Const(v) => Tensor::full(v as f32, s, dev)?.to_dtype(dtype),
            _ => (Tensor::randn(0f32, 1f32, s, dev)? * 0.02)?.to_dtype(dtype),
        }
    }
    fn get_unchecked(&self, _name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("shape needed")
    }
    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// SD-1.5's `unet/config.json` (the fields our loader reads).
const SD15_UNET: &str = r#"{
  "in_channels": 4, "out_channels": 4, "sample_size": 64, "center_input_sample": false,
  "flip_sin_to_cos": true, "freq_shift": 0,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
  "mid_block_type": "UNetMidBlock2DCrossAttn",
  "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1,
  "mid_block_scale_factor": 1, "norm_num_groups": 32, "norm_eps": 1e-05, "cross_attention_dim": 768,
  "attention_head_dim": 8, "use_linear_projection": false
}"#;

fn sd15_step() {
    let cfg: UNetConfig = serde_json::from_str(SD15_UNET).unwrap();
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, Device::Cpu);
    let t = Instant::now();
    let unet = UNet::new(&cfg, vb, raftgen::models::Kernels::Candle).unwrap();
    println!("sd-1.5 unet    built with random weights in {:.1} s", t.elapsed().as_secs_f64());
    let mut per_image = Vec::new();
    for images in [1usize, 2] {
        let rows = 2 * images; // classifier-free guidance: uncond + cond per image
        let x = Tensor::randn(0f32, 1f32, (rows, 4, 64, 64), &Device::Cpu).unwrap();
        let ctx = Tensor::randn(0f32, 1f32, (rows, 77, 768), &Device::Cpu).unwrap();
        let start = Instant::now();
        let out = unet.forward(&x, 500.0, &ctx, None).unwrap();
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(out.dims(), x.dims());
        per_image.push(secs / images as f64);
        println!(
            "sd-1.5 unet    512x512, one step, {images} image(s) ({rows} rows): {secs:>6.1} s, {:.1} s per image",
            secs / images as f64
        );
    }
    println!("sd-1.5 unet    batching gain (per-image time, batch 1 / batch 2): {:.2}x", per_image[0] / per_image[1]);
}

fn main() {
    let images = env_usize("RAFTGEN_BENCH_IMAGES", 8);
    println!(
        "raftgen executor benchmark (CPU, f32, {} threads)",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    for name in ["tiny-sd", "tiny-sdxl", "tiny-z-image"] {
        tiny(name, images);
    }
    for name in ["tiny-sd", "tiny-sdxl", "tiny-z-image"] {
        kernels_on_cpu(name, images);
    }
    if std::env::var("RAFTGEN_BENCH_SKIP_SD15").as_deref() != Ok("1") {
        sd15_step();
    }
}
