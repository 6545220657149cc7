//! Z-Image parity with diffusers: the tiny random-weight pipeline in
//! `models/tiny-z-image` against the tensors diffusers 0.36 computed from the
//! same weights (`tests/data/parity/tiny-z-image`, made by
//! `tools/make_tiny_models.py`; `reference.json` documents each tensor).
//!
//! Every stage is compared on its own, fed the reference's inputs, so a
//! failure names the stage that diverged: tokens, text embeddings, timestep
//! embedding, transformer (with and without sequence padding), guidance and
//! scheduler step, the full sampling run, the VAE, and `generate`'s bytes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

use candle_core::{DType, Device, IndexOp, Tensor};
use raftgen::models::files::ModelFiles;
use raftgen::models::scheduler::{FlowMatchEuler, SamplerKind, Scheduler};
use raftgen::models::z_image::{self, Conditioning, ZImagePipeline};
use raftgen::models::{GenRequest, Kernels};

const TOL: f64 = 1e-3;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn pipeline() -> &'static ZImagePipeline {
    static P: OnceLock<ZImagePipeline> = OnceLock::new();
    P.get_or_init(|| {
        let files = ModelFiles::dir(root().join("models/tiny-z-image"));
        ZImagePipeline::load(&files, &Device::Cpu, DType::F32, Kernels::Candle).expect("loading models/tiny-z-image")
    })
}

fn reference() -> &'static HashMap<String, Tensor> {
    static R: OnceLock<HashMap<String, Tensor>> = OnceLock::new();
    R.get_or_init(|| {
        candle_core::safetensors::load(
            root().join("tests/data/parity/tiny-z-image/reference.safetensors"),
            &Device::Cpu,
        )
        .expect("loading the reference tensors")
    })
}

fn meta() -> &'static serde_json::Value {
    static M: OnceLock<serde_json::Value> = OnceLock::new();
    M.get_or_init(|| {
        let text = std::fs::read_to_string(root().join("tests/data/parity/tiny-z-image/reference.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    })
}

fn r(name: &str) -> Tensor {
    reference().get(name).unwrap_or_else(|| panic!("reference tensor {name} missing")).clone()
}

fn s(key: &str) -> String {
    meta()[key].as_str().unwrap_or_else(|| panic!("reference.json: no string {key}")).to_string()
}

/// max |ours - ref| / max |ref|, printed and checked against `TOL`.
fn check(stage: &str, ours: &Tensor, reference: &Tensor) {
    assert_eq!(ours.dims(), reference.dims(), "{stage}: shape");
    let ours = ours.to_dtype(DType::F32).unwrap();
    let reference = reference.to_dtype(DType::F32).unwrap();
    let diff = (&ours - &reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    let scale = reference.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    let rel = diff / scale.max(1e-12);
    println!("{stage:<48} max rel err {rel:.3e}  (max abs {diff:.3e}, max |ref| {scale:.3e})");
    assert!(rel <= TOL, "{stage}: max relative error {rel:.3e} > {TOL:.0e}");
}

/// The first `mask.sum()` ids of a reference [1, 512] id tensor.
fn valid_ids(ids: &str, mask: &str) -> Vec<u32> {
    let ids = r(ids).i(0).unwrap().to_dtype(DType::I64).unwrap().to_vec1::<i64>().unwrap();
    let len = r(mask).to_dtype(DType::I64).unwrap().sum_all().unwrap().to_scalar::<i64>().unwrap() as usize;
    assert!(ids[len..].iter().all(|&i| i == meta()["tokenizer"]["pad_id"].as_i64().unwrap()));
    ids[..len].iter().map(|&i| i as u32).collect()
}

fn reference_conditioning(guided: bool) -> Conditioning {
    let mut captions = vec![r("prompt_embeds")];
    if guided {
        captions.push(r("negative_prompt_embeds"));
    }
    Conditioning { captions, guided, dropped_tokens: vec![0] }
}

fn guidance() -> f64 {
    meta()["guidance_scale"].as_f64().unwrap()
}

fn steps() -> usize {
    meta()["num_inference_steps"].as_u64().unwrap() as usize
}

#[test]
fn tokens_match_the_chat_templated_reference() {
    let p = pipeline();
    for (text, ids, mask, templated) in [
        ("prompt", "input_ids", "attention_mask", Some("templated_prompt")),
        ("negative_prompt", "negative_input_ids", "negative_attention_mask", Some("templated_negative_prompt")),
        ("long_prompt", "long_input_ids", "long_attention_mask", None),
    ] {
        let prompt = s(text);
        if let Some(t) = templated {
            assert_eq!(z_image::chat_template(&prompt), s(t), "chat template of {text}");
        }
        let ours = p.tokenize(&prompt).unwrap();
        assert_eq!(ours.ids, valid_ids(ids, mask), "token ids of {text}");
        assert_eq!(ours.dropped_tokens, 0, "{text}");
        println!("tokens ({text}): {} ids identical", ours.ids.len());
    }
}

#[test]
fn text_embeddings() {
    let p = pipeline();
    // From the reference ids, both prompts in one (right-padded) batch.
    let ids = [valid_ids("input_ids", "attention_mask"), valid_ids("negative_input_ids", "negative_attention_mask")];
    let emb = p.encode_ids(&ids).unwrap();
    check("text embeddings (reference ids, prompt)", &emb[0], &r("prompt_embeds"));
    check("text embeddings (reference ids, negative)", &emb[1], &r("negative_prompt_embeds"));
    // From our own tokenization, through the pipeline's conditioning.
    let cond = p.condition(&[&s("prompt")], &[&s("negative_prompt")], guidance()).unwrap();
    assert!(cond.guided);
    assert_eq!(cond.captions.len(), 2, "conditioning rows [cond, uncond]");
    check("text embeddings (our tokens, prompt)", &cond.captions[0], &r("prompt_embeds"));
    check("text embeddings (our tokens, negative)", &cond.captions[1], &r("negative_prompt_embeds"));
    let unguided = p.condition(&[&s("prompt")], &[&s("negative_prompt")], 0.0).unwrap();
    assert!(!unguided.guided && unguided.captions.len() == 1, "guidance 0 runs the prompt only");
}

#[test]
fn schedule_and_model_time() {
    let p = pipeline();
    let sched = FlowMatchEuler::new(p.scheduler_config(), steps()).unwrap();
    let sigmas = Tensor::new(sched.sigmas().iter().map(|&x| x as f32).collect::<Vec<_>>(), &Device::Cpu).unwrap();
    let ts = Tensor::new(sched.timesteps().iter().map(|&x| x as f32).collect::<Vec<_>>(), &Device::Cpu).unwrap();
    check("scheduler sigmas", &sigmas, &r("sigmas"));
    check("scheduler timesteps", &ts, &r("timesteps"));
    let t0 = p.model_time(sched.sigmas()[0]);
    check(
        "transformer timestep (step 0)",
        &Tensor::new(&[t0, t0], &Device::Cpu).unwrap(),
        &r("step0_transformer_timestep"),
    );
    let emb = p.transformer().time_embedding(&r("step0_transformer_timestep")).unwrap();
    check("timestep embedding / adaLN input (step 0)", &emb, &r("step0_adaln_input"));
}

#[test]
fn one_transformer_step() {
    let p = pipeline();
    let tr = p.transformer();
    let cond = reference_conditioning(true);
    let t = r("step0_transformer_timestep");
    let start = Instant::now();
    let out = tr.forward(&r("step0_transformer_input"), &t, &cond.captions).unwrap();
    println!("transformer forward, batch 2 (cond + uncond): {:.1} ms", start.elapsed().as_secs_f64() * 1e3);
    check("transformer step 0 (CFG batch [cond, uncond])", &out, &r("step0_transformer_output"));

    let x = r("step0_transformer_input").narrow(0, 0, 1).unwrap();
    let out = tr.forward(&x, &t.narrow(0, 0, 1).unwrap(), &cond.captions[..1]).unwrap();
    check("transformer step 0 (no CFG, batch 1)", &out, &r("nocfg_step0_transformer_output"));

    // No padding anywhere: 32 caption tokens, 32 image tokens.
    let out = tr.forward(&r("aligned_x").unsqueeze(0).unwrap(), &r("aligned_t"), &[r("aligned_cap_feats")]).unwrap();
    check("transformer, no sequence padding", &out.squeeze(0).unwrap(), &r("aligned_output"));

    // 16 image tokens padded to 32 with x_pad_token.
    let out = tr.forward(&r("imgpad_x").unsqueeze(0).unwrap(), &r("imgpad_t"), &[r("prompt_embeds")]).unwrap();
    check("transformer, image tokens padded", &out.squeeze(0).unwrap(), &r("imgpad_output"));
}

#[test]
fn guidance_and_one_scheduler_step() {
    let p = pipeline();
    let model_output = ZImagePipeline::model_output(&r("step0_transformer_output"), true, guidance()).unwrap();
    check("guidance: -(pos + g (pos - neg))", &model_output, &r("step0_model_output"));
    let sched = FlowMatchEuler::new(p.scheduler_config(), steps()).unwrap();
    let mut no_noise = |_: &[usize]| -> candle_core::Result<Tensor> { candle_core::bail!("no noise") };
    let latents = sched.step(&r("step0_model_output"), 0, &r("init_noise"), &mut no_noise).unwrap();
    check("scheduler step 0", &latents, &r("step0_latents"));
}

#[test]
fn full_sampling_run_and_decode() {
    let p = pipeline();
    let cond = p.condition(&[&s("prompt")], &[&s("negative_prompt")], guidance()).unwrap();
    let mut steps_seen = Vec::new();
    let start = Instant::now();
    let all = r("all_step_latents");
    let mut latents = r("init_noise");
    {
        // Step by step, comparing after each.
        let sched = FlowMatchEuler::new(p.scheduler_config(), steps()).unwrap();
        let mut no_noise = |_: &[usize]| -> candle_core::Result<Tensor> { candle_core::bail!("no noise") };
        for i in 0..steps() {
            let v = p.velocity(&latents, sched.sigmas()[i], &cond, guidance()).unwrap();
            latents = sched.step(&v, i, &latents, &mut no_noise).unwrap();
            check(&format!("sampling, latents after step {i}"), &latents, &all.narrow(0, i, 1).unwrap());
        }
    }
    let per_step = start.elapsed().as_secs_f64() / steps() as f64;
    println!("one sampling step (CFG, 64x128): {:.1} ms", per_step * 1e3);

    let fin = p.sample(&r("init_noise"), &cond, steps(), guidance(), &mut |k, n| {
        steps_seen.push((k, n));
        true
    });
    check("full run: final latents (CFG)", &fin.unwrap(), &r("final_latents"));
    assert_eq!(steps_seen, (1..=steps()).map(|k| (k, steps())).collect::<Vec<_>>(), "progress reports");

    let nocfg = p.condition(&[&s("prompt")], &[&s("negative_prompt")], 0.0).unwrap();
    let fin = p.sample(&r("init_noise"), &nocfg, steps(), 0.0, &mut |_, _| true).unwrap();
    check("full run: final latents (guidance 0)", &fin, &r("nocfg_final_latents"));

    let start = Instant::now();
    let decoded = p.decode(&r("final_latents")).unwrap();
    println!("vae decode (64x128): {:.1} ms", start.elapsed().as_secs_f64() * 1e3);
    check("vae decode", &decoded, &r("decoded"));
}

fn reference_bytes(image: &str) -> Vec<u8> {
    let img = (r(image) * 255.0).unwrap().round().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    img.into_iter().map(|v| v as u8).collect()
}

#[test]
fn generate_bytes_match_the_reference_image() {
    let p = pipeline();
    for (guidance, image) in [(guidance(), "image"), (0.0, "nocfg_image")] {
        let req = GenRequest {
            prompt: s("prompt"),
            negative_prompt: s("negative_prompt"),
            width: meta()["width"].as_u64().unwrap() as u32,
            height: meta()["height"].as_u64().unwrap() as u32,
            steps: steps(),
            guidance,
            seed: 0,
            sampler: SamplerKind::FlowMatchEuler,
        };
        let start = Instant::now();
        let out = p.generate_from_noise(&[req], &r("init_noise"), &mut |_, _| true).unwrap();
        println!(
            "one image, generate path (guidance {guidance}, 64x128, {} steps): {:.1} ms",
            steps(),
            start.elapsed().as_secs_f64() * 1e3
        );
        assert_eq!((out[0].width, out[0].height), (128, 64));
        let want = reference_bytes(image);
        assert_eq!(out[0].rgb.len(), want.len(), "generate ({image}): byte count");
        let worst = out[0].rgb.iter().zip(&want).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        let off = out[0].rgb.iter().zip(&want).filter(|(a, b)| a != b).count();
        println!("generate bytes vs {image:<12} max |diff| {worst}, {off} of {} bytes differ", want.len());
        assert!(worst <= 1, "generate ({image}): a byte differs by {worst}");
    }
}
