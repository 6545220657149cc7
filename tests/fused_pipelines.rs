//! The fused kernels inside the whole pipelines (issue 16, item 2): each tiny
//! model folder runs once with candle's ops and once with our fused ops (on
//! the CPU: their references, the same arithmetic the CUDA kernels do), from
//! the same seeds; the decoded images (f32, before rounding to bytes) and the
//! final latents must agree within a max relative error of 1e-4.
//!
//! What the fused path changes: GroupNorm+SiLU in every ResNet block (UNet
//! and autoencoder), GEGLU in the UNet's feed-forwards, attention without the
//! score matrix (UNet, autoencoder mid-block, Z-Image DiT), and the guidance
//! combine with the sampler's update in one op. A test that compares a path
//! with itself proves nothing, so each case first checks that the two models
//! were built with different kernels (their outputs differ in the last bits).

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use raftgen::models::files::ModelFiles;
use raftgen::models::noise::{batch_noise, NoiseStream};
use raftgen::models::sd::SdPipeline;
use raftgen::models::z_image::ZImagePipeline;
use raftgen::models::{Kernels, SamplerKind};

const TOLERANCE: f32 = 1e-4;
const SIDE: usize = 64;
const STEPS: usize = 4;

fn files(name: &str) -> ModelFiles {
    ModelFiles::dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models").join(name))
}

fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let max = |t: Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let (a, b) = (a.to_dtype(DType::F32).unwrap(), b.to_dtype(DType::F32).unwrap());
    let diff = max((&a - &b).unwrap());
    assert!(diff.is_finite(), "non-finite difference");
    diff / max(b).max(f32::MIN_POSITIVE)
}

fn no_progress(_: usize, _: usize) -> bool {
    true
}

/// (final latents, decoded image) of one SD-family run, on the CPU in f32.
fn sd_run(name: &str, kernels: Kernels, sampler: SamplerKind, guidance: f64) -> (Tensor, Tensor) {
    sd_run_on(name, &Device::Cpu, DType::F32, kernels, sampler, guidance)
}

fn sd_run_on(
    name: &str,
    device: &Device,
    dtype: DType,
    kernels: Kernels,
    sampler: SamplerKind,
    guidance: f64,
) -> (Tensor, Tensor) {
    let p = SdPipeline::load(&files(name), device, dtype, kernels).expect("loading the pipeline");
    let f = SIDE / 8;
    let mut streams = vec![NoiseStream::new(7), NoiseStream::new(8)];
    let shape = [p.latent_channels(), f, f];
    let init = batch_noise(&mut streams, &shape, device).unwrap().to_dtype(dtype).unwrap();
    let prompts = ["a red circle on the left", "a blue square"];
    let cond = p.condition(&prompts, &["", "blurry"], guidance, SIDE, SIDE).unwrap();
    let latents = p.sample(&init, &cond, sampler, STEPS, guidance, &mut streams, &mut no_progress).unwrap();
    let image = p.decode(&latents).unwrap();
    (latents.to_device(&Device::Cpu).unwrap(), image.to_device(&Device::Cpu).unwrap())
}

fn check(case: &str, candle: (Tensor, Tensor), fused: (Tensor, Tensor)) {
    let (el, ei) = (rel_err(&fused.0, &candle.0), rel_err(&fused.1, &candle.1));
    println!("{case}: latents {el:.2e}, image {ei:.2e}");
    // Different kernels sum in a different order: exactly equal outputs
    // would mean both runs took the same path.
    assert!(ei > 0.0, "{case}: the fused and candle images are bit-identical: did the fused path run?");
    assert!(el <= TOLERANCE, "{case}: latents differ by {el:.3e} > {TOLERANCE:e}");
    assert!(ei <= TOLERANCE, "{case}: images differ by {ei:.3e} > {TOLERANCE:e}");
}

#[test]
fn sd15_fused_matches_candle() {
    for (sampler, guidance) in [(SamplerKind::Ddim, 7.5), (SamplerKind::EulerAncestral, 5.0), (SamplerKind::Euler, 1.0)]
    {
        let case = format!("tiny-sd {sampler:?} guidance {guidance}");
        check(
            &case,
            sd_run("tiny-sd", Kernels::Candle, sampler, guidance),
            sd_run("tiny-sd", Kernels::Fused, sampler, guidance),
        );
    }
}

#[test]
fn sdxl_fused_matches_candle() {
    check(
        "tiny-sdxl ddim guidance 5",
        sd_run("tiny-sdxl", Kernels::Candle, SamplerKind::Ddim, 5.0),
        sd_run("tiny-sdxl", Kernels::Fused, SamplerKind::Ddim, 5.0),
    );
}

fn z_run(kernels: Kernels, guidance: f64) -> (Tensor, Tensor) {
    z_run_on(&Device::Cpu, DType::F32, kernels, guidance)
}

fn z_run_on(device: &Device, dtype: DType, kernels: Kernels, guidance: f64) -> (Tensor, Tensor) {
    let p = ZImagePipeline::load(&files("tiny-z-image"), device, dtype, kernels).expect("loading");
    let f = SIDE / 8;
    let mut streams = vec![NoiseStream::new(3)];
    let init = batch_noise(&mut streams, &[p.latent_channels(), f, f], device).unwrap();
    let cond = p.condition(&["a green triangle at the top"], &["noise"], guidance).unwrap();
    let latents = p.sample(&init, &cond, STEPS, guidance, &mut no_progress).unwrap();
    let image = p.decode(&latents).unwrap();
    (latents.to_device(&Device::Cpu).unwrap(), image.to_device(&Device::Cpu).unwrap())
}

#[test]
fn z_image_fused_matches_candle() {
    for guidance in [0.0, 4.0] {
        check(
            &format!("tiny-z-image guidance {guidance}"),
            z_run(Kernels::Candle, guidance),
            z_run(Kernels::Fused, guidance),
        );
    }
}

/// Part (b) of the GPU device check (`tools/gpu-check.sh`): the tiny
/// pipelines on CUDA against the CPU (candle's ops in f32, the reference),
/// in f32 with both kernel sets (max relative error 1e-3) and in each
/// family's CUDA dtype with the fused kernels (f16 for SD, bf16 for SDXL and
/// Z-Image), whose error is printed and bounded by HALF_TOLERANCE. Skips,
/// saying so, without a GPU.
#[cfg(feature = "cuda")]
#[test]
fn cuda_pipelines_match_the_cpu() {
    const F32_TOLERANCE: f32 = 1e-3;
    const HALF_TOLERANCE: f32 = 5e-2;
    let gpu = match std::panic::catch_unwind(|| Device::new_cuda(0)) {
        Ok(Ok(d)) => d,
        other => {
            eprintln!("skipping: no CUDA device ({:?})", other.map(|r| r.map(|_| ())));
            return;
        }
    };
    let report = |case: &str, cpu: &(Tensor, Tensor), got: &(Tensor, Tensor), bound: f32| {
        let (el, ei) = (rel_err(&got.0, &cpu.0), rel_err(&got.1, &cpu.1));
        println!("cuda pipeline {case}: latents {el:.2e}, image {ei:.2e} (bound {bound:e})");
        (case.to_string(), el.max(ei), bound)
    };
    let mut results = Vec::new();
    for (name, half, sampler, guidance) in [
        ("tiny-sd", DType::F16, SamplerKind::Ddim, 7.5),
        ("tiny-sd", DType::F16, SamplerKind::Ddim, 1.0),
        ("tiny-sdxl", DType::BF16, SamplerKind::Ddim, 5.0),
        ("tiny-sdxl", DType::BF16, SamplerKind::Ddim, 1.0),
    ] {
        let cpu = sd_run(name, Kernels::Candle, sampler, guidance);
        for kernels in [Kernels::Candle, Kernels::Fused] {
            let got = sd_run_on(name, &gpu, DType::F32, kernels, sampler, guidance);
            results.push(report(&format!("{name} g{guidance} f32 {kernels:?}"), &cpu, &got, F32_TOLERANCE));
        }
        let got = sd_run_on(name, &gpu, half, Kernels::Fused, sampler, guidance);
        results.push(report(&format!("{name} g{guidance} {half:?} Fused"), &cpu, &got, HALF_TOLERANCE));
    }
    for guidance in [0.0, 4.0] {
        let cpu = z_run(Kernels::Candle, guidance);
        for kernels in [Kernels::Candle, Kernels::Fused] {
            let got = z_run_on(&gpu, DType::F32, kernels, guidance);
            results.push(report(&format!("tiny-z-image g{guidance} f32 {kernels:?}"), &cpu, &got, F32_TOLERANCE));
        }
        let got = z_run_on(&gpu, DType::BF16, Kernels::Fused, guidance);
        results.push(report(&format!("tiny-z-image g{guidance} BF16 Fused"), &cpu, &got, HALF_TOLERANCE));
    }
    // Where an SD image differs: the same latents decoded on both devices,
    // stage by stage (first stage over 1e-4 named).
    for name in ["tiny-sd", "tiny-sdxl"] {
        let cpu = SdPipeline::load(&files(name), &Device::Cpu, DType::F32, Kernels::Candle).unwrap();
        let cuda = SdPipeline::load(&files(name), &gpu, DType::F32, Kernels::Candle).unwrap();
        let latents = sd_run(name, Kernels::Candle, SamplerKind::Ddim, 1.0).0;
        let mut stages = Vec::new();
        cpu.decode_traced(&latents, &mut |s, t| stages.push((s.to_string(), t.clone()))).unwrap();
        let mut k = 0;
        cuda.decode_traced(&latents.to_device(&gpu).unwrap(), &mut |s, t| {
            let e = rel_err(&t.to_device(&Device::Cpu).unwrap(), &stages[k].1);
            println!("decode stage {name} {s}: cuda vs cpu {e:.2e}");
            k += 1;
        })
        .unwrap();
    }
    let failed: Vec<_> = results.iter().filter(|(_, e, bound)| !(e <= bound)).collect();
    assert!(failed.is_empty(), "over the bound: {failed:?}");
}
