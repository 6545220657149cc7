//! Parity of our Stable Diffusion pipelines with diffusers.
//!
//! `tools/make_tiny_models.py` built tiny random-weight SD-1.5-style and
//! SDXL-style pipelines with diffusers and saved, from the same weights and
//! the same initial latents, what diffusers computed at each stage
//! (`tools/train_shapes_model.py` does the same for the trained built-in
//! model, `shapes-sd`). Loading
//! the same folders here must reproduce every stage within a max relative
//! error of 1e-3 (max |ours - theirs| / max |theirs|), in f32 on the CPU.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use raftgen::models::files::ModelFiles;
use raftgen::models::noise::NoiseStream;
use raftgen::models::scheduler::{self, SamplerKind, SchedulerConfig};
use raftgen::models::sd::SdPipeline;
use raftgen::models::{to_outputs, GenRequest, Kernels};

const TOLERANCE: f32 = 1e-3;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Reference {
    tensors: std::collections::HashMap<String, Tensor>,
    json: serde_json::Value,
}

impl Reference {
    fn load(name: &str) -> Reference {
        let dir = root().join("tests/data/parity").join(name);
        let tensors = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
        let json = serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
        Reference { tensors, json }
    }

    fn t(&self, name: &str) -> Tensor {
        self.tensors.get(name).unwrap_or_else(|| panic!("reference has no tensor {name}")).clone()
    }

    fn f32(&self, name: &str) -> Tensor {
        self.t(name).to_dtype(DType::F32).unwrap()
    }

    fn ids(&self, name: &str) -> Vec<u32> {
        self.t(name)
            .flatten_all()
            .unwrap()
            .to_dtype(DType::I64)
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .map(|&v| v as u32)
            .collect()
    }

    fn s(&self, key: &str) -> String {
        self.json[key].as_str().unwrap_or_else(|| panic!("reference.json has no string {key}")).to_string()
    }
}

fn rel_err(ours: &Tensor, theirs: &Tensor) -> f32 {
    assert_eq!(ours.dims(), theirs.dims(), "shapes differ");
    let diff =
        (ours - theirs).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let scale = theirs.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    diff / scale.max(f32::MIN_POSITIVE)
}

fn check(stage: &str, ours: &Tensor, theirs: &Tensor) {
    let e = rel_err(ours, theirs);
    println!("{stage}: max relative error {e:.2e}");
    assert!(e <= TOLERANCE, "{stage}: max relative error {e:.3e} > {TOLERANCE:e}");
}

fn never_called(_: &[usize]) -> candle_core::Result<Tensor> {
    panic!("a deterministic sampler drew noise")
}

/// Checks tokenization, text conditioning, one UNet step, one sampler step,
/// the full run from the reference latents, the VAE decode and the bytes.
fn check_family(name: &str) -> (SdPipeline, Reference) {
    let files = ModelFiles::dir(root().join("models").join(name));
    let p = SdPipeline::load(&files, &Device::Cpu, DType::F32, Kernels::Candle).unwrap();
    let r = Reference::load(name);
    let (prompt, negative) = (r.s("prompt"), r.s("negative_prompt"));
    let guidance = r.json["guidance_scale"].as_f64().unwrap();
    let steps = r.json["num_inference_steps"].as_u64().unwrap() as usize;
    let (h, w) = (r.json["height"].as_u64().unwrap() as usize, r.json["width"].as_u64().unwrap() as usize);
    let xl = r.tensors.contains_key("pooled_prompt_embeds");

    // Tokenization: every tokenizer gives diffusers' ids; long prompts are cut
    // to the context and the cut is counted.
    let suffixes: &[&str] = if xl { &["", "_2"] } else { &[""] };
    let enc = p.tokenize(&prompt).unwrap();
    let neg = p.tokenize(&negative).unwrap();
    let long = p.tokenize(&r.s("long_prompt")).unwrap();
    for (i, sfx) in suffixes.iter().enumerate() {
        assert_eq!(enc[i].ids, r.ids(&format!("input_ids{sfx}")), "{name}: prompt ids of tokenizer{sfx}");
        assert_eq!(neg[i].ids, r.ids(&format!("negative_input_ids{sfx}")), "{name}: negative ids of tokenizer{sfx}");
        assert_eq!(long[i].ids, r.ids(&format!("long_input_ids{sfx}")), "{name}: long prompt ids of tokenizer{sfx}");
    }
    assert_eq!(enc[0].dropped_tokens, 0);
    if let Some(untruncated) = r.tensors.get("long_untruncated_input_ids") {
        assert_eq!(long[0].dropped_tokens, untruncated.dims()[1] - 77, "{name}: dropped token count");
    } else {
        assert!(long[0].dropped_tokens > 0, "{name}: the long prompt must be truncated");
    }

    // Text conditioning, rows [uncond, cond] as diffusers batches them.
    let cond = p.condition(&[prompt.as_str()], &[negative.as_str()], guidance, w, h).unwrap();
    let expected = Tensor::cat(&[r.f32("negative_prompt_embeds"), r.f32("prompt_embeds")], 0).unwrap();
    check(&format!("{name} text embeddings"), &cond.context, &expected);
    if xl {
        let (pooled, time_ids) = cond.text_time.as_ref().expect("SDXL conditioning has text-time inputs");
        check(&format!("{name} pooled text embeddings"), pooled, &r.f32("add_text_embeds"));
        check(&format!("{name} time ids"), time_ids, &r.f32("add_time_ids"));
    }

    // One denoiser step on diffusers' exact input.
    let t0 = r.ids("step0_timestep")[0] as f64;
    let out = p.denoise(&r.f32("step0_unet_input"), t0, &cond).unwrap();
    check(&format!("{name} one UNet step"), &out, &r.f32("step0_noise_pred"));

    // One DDIM step from diffusers' UNet output.
    let ddim = scheduler::build(SamplerKind::Ddim, p.scheduler_config(), steps).unwrap();
    let timesteps: Vec<u32> = r.ids("timesteps");
    assert_eq!(ddim.timesteps().iter().map(|&t| t as u32).collect::<Vec<_>>(), timesteps, "{name}: DDIM timesteps");
    let after = ddim.step(&r.f32("step0_guided_noise_pred"), 0, &r.f32("init_noise"), &mut never_called).unwrap();
    check(&format!("{name} one DDIM step"), &after, &r.f32("step0_latents"));

    // The whole run from the same initial latents.
    let mut no_streams: Vec<NoiseStream> = Vec::new();
    let latents = p
        .sample(&r.f32("init_noise"), &cond, SamplerKind::Ddim, steps, guidance, &mut no_streams, &mut |_, _| true)
        .unwrap();
    check(&format!("{name} final latents"), &latents, &r.f32("final_latents"));

    // The VAE on diffusers' final latents, and the bytes of the image.
    let decoded = p.decode(&r.f32("final_latents")).unwrap();
    check(&format!("{name} decoded image"), &decoded, &r.f32("decoded"));
    let ours = to_outputs(&p.decode(&latents).unwrap(), &[0]).unwrap().remove(0).rgb;
    let theirs: Vec<f32> = r.f32("image").flatten_all().unwrap().to_vec1().unwrap();
    let worst = ours.iter().zip(&theirs).map(|(&a, &b)| (a as f32 - (b * 255.0).round()).abs()).fold(0.0, f32::max);
    println!("{name} image bytes: max difference {worst}");
    assert!(worst <= 1.0, "{name}: image bytes differ by {worst}");
    (p, r)
}

#[test]
fn tiny_sd_matches_diffusers() {
    check_family("tiny-sd");
}

/// The trained built-in model (`tools/train_shapes_model.py`, stage parity):
/// trained weights, a downscale-4 autoencoder with 8 GroupNorm groups, and a
/// UNet whose first level has no attention.
#[test]
fn shapes_sd_matches_diffusers() {
    check_family("shapes-sd");
}

#[test]
fn tiny_sdxl_matches_diffusers() {
    let (p, r) = check_family("tiny-sdxl");
    // SDXL-Turbo's sampler, one step with diffusers' own noise.
    let config: &SchedulerConfig = p.scheduler_config();
    assert_eq!(config.kind(), Some(SamplerKind::EulerAncestral));
    let euler = scheduler::Euler::new(config, 4, true).unwrap();
    use raftgen::models::scheduler::Scheduler;
    let ts = Tensor::new(euler.timesteps().iter().map(|&t| t as f32).collect::<Vec<_>>(), &Device::Cpu).unwrap();
    check("Euler a timesteps", &ts, &r.f32("euler_a_timesteps"));
    let sig = Tensor::new(euler.sigmas().iter().map(|&s| s as f32).collect::<Vec<_>>(), &Device::Cpu).unwrap();
    check("Euler a sigmas", &sig, &r.f32("euler_a_sigmas"));
    let init = r.f32("euler_a_init_noise_sigma").flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
    assert!((euler.init_noise_sigma() as f32 - init).abs() / init < TOLERANCE, "Euler a init_noise_sigma");
    let sample = r.f32("euler_a_sample");
    let model_in = euler.scale_model_input(&Tensor::cat(&[&sample, &sample], 0).unwrap(), 0).unwrap();
    check("Euler a model input", &model_in, &r.f32("euler_a_model_input"));
    let noise = r.f32("euler_a_noise");
    let mut give = |_: &[usize]| Ok(noise.clone());
    let prev = euler.step(&r.f32("euler_a_model_output"), 0, &sample, &mut give).unwrap();
    check("Euler a step", &prev, &r.f32("euler_a_prev_sample"));
}

fn request(seed: u64, prompt: &str) -> GenRequest {
    GenRequest {
        prompt: prompt.into(),
        negative_prompt: "blurry".into(),
        width: 64,
        height: 64,
        steps: 3,
        guidance: 7.5,
        seed,
        sampler: SamplerKind::EulerAncestral,
    }
}

#[test]
fn same_seed_same_pixels_and_different_seeds_differ() {
    let files = ModelFiles::dir(root().join("models/tiny-sd"));
    let p = SdPipeline::load(&files, &Device::Cpu, DType::F32, Kernels::Candle).unwrap();
    let alone = p.generate(&[request(1, "a red fox")], &mut |_, _| true).unwrap().remove(0).rgb;
    let again = p.generate(&[request(1, "a red fox")], &mut |_, _| true).unwrap().remove(0).rgb;
    assert_eq!(alone, again, "same seed, same bytes");
    // A batch is reproducible too, for the same batch composition. (Across
    // compositions a job's image may differ slightly: float summation order;
    // see `--max-batch` in the README.)
    let pair = [request(2, "a blue bird"), request(1, "a red fox")];
    let batch = p.generate(&pair, &mut |_, _| true).unwrap();
    let batch_again = p.generate(&pair, &mut |_, _| true).unwrap();
    assert_eq!(batch[0].rgb, batch_again[0].rgb);
    assert_eq!(batch[1].rgb, batch_again[1].rgb);
    assert_ne!(batch[0].rgb, batch[1].rgb, "different seeds and prompts, different images");
    let other_seed = p.generate(&[request(3, "a red fox")], &mut |_, _| true).unwrap().remove(0).rgb;
    assert_ne!(other_seed, alone, "different seed, different image");
    // Cancellation stops the run between steps.
    let mut calls = 0;
    let r = p.generate(&[request(1, "a red fox")], &mut |_, _| {
        calls += 1;
        false
    });
    assert!(r.is_err() && calls == 1, "cancelled after the first step");
}
