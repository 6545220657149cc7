//! The model-folder corpus (issue 17): every layout in `tests/data/corpus/`
//! (made by `tools/make_model_corpus.py` with diffusers and transformers:
//! variants, PyTorch pickles, shards, stray files, old config keys, SD-1.4,
//! SD-2, an SDXL refiner, Z-Image as released and as re-saved) either loads
//! and reproduces what diffusers computed from it within the parity tolerance
//! (max relative error 1e-3 on the decoded image), or is refused with the
//! reason the case names.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use raftgen::models::catalog::ModelEntry;
use raftgen::models::files::ModelFiles;
use raftgen::models::sd::SdPipeline;
use raftgen::models::z_image::ZImagePipeline;
use raftgen::models::{Kernels, SamplerKind};

const TOLERANCE: f32 = 1e-3;

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/corpus")
}

fn rel_err(ours: &Tensor, theirs: &Tensor) -> f32 {
    assert_eq!(ours.dims(), theirs.dims(), "shapes differ");
    let max = |t: Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    max((ours - theirs).unwrap()) / max(theirs.clone()).max(f32::MIN_POSITIVE)
}

/// Decoded [-1, 1] images [1, 3, H, W] as diffusers' `output_type="np"`:
/// [1, H, W, 3] in [0, 1].
fn as_np(images: &Tensor) -> Tensor {
    ((images.to_dtype(DType::F32).unwrap() / 2.0).unwrap() + 0.5)
        .unwrap()
        .clamp(0f32, 1f32)
        .unwrap()
        .permute((0, 2, 3, 1))
        .unwrap()
}

fn run_case(case: &Path, exp: &serde_json::Value) -> Tensor {
    let files = ModelFiles::dir(case.join("model"));
    let reference = candle_core::safetensors::load(case.join("reference.safetensors"), &Device::Cpu).unwrap();
    let noise = reference["init_noise"].clone();
    let prompt = exp["prompt"].as_str().unwrap();
    let negative = exp["negative_prompt"].as_str().unwrap();
    let steps = exp["num_inference_steps"].as_u64().unwrap() as usize;
    let guidance = exp["guidance_scale"].as_f64().unwrap();
    let (h, w) = (exp["height"].as_u64().unwrap() as usize, exp["width"].as_u64().unwrap() as usize);
    let never = |_: usize, _: usize| true;
    let image = match exp["family"].as_str().unwrap() {
        "sd" => {
            let p = SdPipeline::load(&files, &Device::Cpu, DType::F32, Kernels::Candle).unwrap();
            let cond = p.condition(&[prompt], &[negative], guidance, w, h).unwrap();
            let mut streams = vec![raftgen::models::noise::NoiseStream::new(0)];
            let latents =
                p.sample(&noise, &cond, SamplerKind::Ddim, steps, guidance, &mut streams, &mut { never }).unwrap();
            p.decode(&latents).unwrap()
        }
        "z-image" => {
            let p = ZImagePipeline::load(&files, &Device::Cpu, DType::F32, Kernels::Candle).unwrap();
            let cond = p.condition(&[prompt], &[negative], guidance).unwrap();
            let latents = p.sample(&noise, &cond, steps, guidance, &mut { never }).unwrap();
            p.decode(&latents).unwrap()
        }
        other => panic!("unknown family {other}"),
    };
    let err = rel_err(&as_np(&image), &reference["image"]);
    println!("{}: max relative error {err:.2e} against diffusers", case.display());
    assert!(err <= TOLERANCE, "{}: {err:.3e} > {TOLERANCE:e}", case.display());
    image
}

#[test]
fn every_layout_loads_as_diffusers_loads_it_or_is_refused_with_its_reason() {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(corpus()).unwrap().map(|e| e.unwrap().path()).collect();
    cases.sort();
    assert!(cases.len() >= 12, "the corpus has {} cases", cases.len());
    for case in &cases {
        let exp: serde_json::Value =
            serde_json::from_slice(&std::fs::read(case.join("expected.json")).unwrap()).unwrap();
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let opened = ModelEntry::open(&name, ModelFiles::dir(case.join("model")), None);
        if exp["serves"].as_bool().unwrap() {
            let entry = opened.unwrap_or_else(|e| panic!("{name}: refused: {e:#}"));
            assert!(entry.params > 0);
            run_case(case, &exp);
        } else {
            let want = exp["reason"].as_str().unwrap();
            let err = match opened {
                Ok(_) => panic!("{name}: served, but the case expects it refused ({want})"),
                Err(e) => format!("{e:#}"),
            };
            println!("{name}: refused: {err}");
            assert!(err.contains(want), "{name}: refusal {err:?} does not say {want:?}");
            assert!(!err.contains("stack backtrace") && !err.contains('\n'), "{name}: not one line: {err:?}");
        }
    }
}

/// The hash covers exactly the files loaded: the fp16 + non_ema folder hashes
/// as its fp16 UNet (not both), and an unrelated stray file changes nothing.
#[test]
fn the_model_hash_covers_exactly_the_files_loaded() {
    let fp16 = corpus().join("sd15-fp16-and-non-ema/model");
    let files = ModelFiles::dir(&fp16);
    let family = raftgen::models::Family::detect(&files).unwrap();
    let loaded = family.weight_files(&files).unwrap();
    assert!(loaded.contains(&"unet/diffusion_pytorch_model.fp16.safetensors".to_string()), "{loaded:?}");
    assert!(!loaded.iter().any(|f| f.contains("non_ema")), "{loaded:?}");
    let with_non_ema = files.clone().with_variant(Some("non_ema".into()));
    let loaded_non_ema = family.weight_files(&with_non_ema).unwrap();
    assert!(loaded_non_ema.iter().any(|f| f.contains("non_ema")) && !loaded_non_ema.iter().any(|f| f.contains("fp16")));
    let a = ModelEntry::open("a", files, None).unwrap();
    let b = ModelEntry::open("b", with_non_ema, None).unwrap();
    assert_ne!(a.hash, b.hash, "different weights, different hash");
    let stray = corpus().join("sd15-old-keys-stray-files/model");
    let loaded = family.weight_files(&ModelFiles::dir(&stray)).unwrap();
    assert!(loaded.iter().all(|f| f.ends_with(".safetensors")), "{loaded:?}");
}

fn copy_dir(from: &Path, to: &Path) {
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

/// Rewrites one safetensors file through `edit`.
fn edit_weights(path: &Path, edit: impl FnOnce(&mut std::collections::HashMap<String, Tensor>)) {
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, path).unwrap();
}

/// A scan validates each folder before it is advertised: a missing tensor, a
/// tensor of the wrong shape and a tokenizer that does not build are refused
/// with a one-line reason naming what is wrong (found from the headers, no
/// weights loaded); the good folders, re-saved Z-Image included, are served.
#[test]
fn a_scan_refuses_folders_that_would_fail_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let plain = corpus().join("sd15-plain/model");
    copy_dir(&plain, &root.join("good"));
    copy_dir(&corpus().join("zimage-resaved/model"), &root.join("zimage-resaved"));
    copy_dir(&corpus().join("sdxl-refiner/model"), &root.join("refiner"));

    let missing = "down_blocks.0.resnets.0.conv1.weight";
    copy_dir(&plain, &root.join("missing-tensor"));
    edit_weights(&root.join("missing-tensor/unet/diffusion_pytorch_model.safetensors"), |t| {
        assert!(t.remove(missing).is_some());
    });
    copy_dir(&plain, &root.join("wrong-shape"));
    let reshaped = "conv_in.weight";
    edit_weights(&root.join("wrong-shape/unet/diffusion_pytorch_model.safetensors"), |t| {
        let w = &t[reshaped];
        let mut dims = w.dims().to_vec();
        dims[0] += 1;
        t.insert(reshaped.into(), Tensor::zeros(dims, w.dtype(), &Device::Cpu).unwrap());
    });
    copy_dir(&plain, &root.join("bad-tokenizer"));
    std::fs::write(root.join("bad-tokenizer/tokenizer/vocab.json"), b"{ not json").unwrap();

    let mut cache = raftgen::models::catalog::HashCache::open(None);
    let scan = raftgen::models::catalog::scan(root, None, &mut cache).unwrap();
    let served: Vec<&str> = scan.served.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(served, ["good", "zimage-resaved"]);
    let reason = |name: &str| {
        let r = scan.refused.iter().find(|r| r.name == name).unwrap_or_else(|| panic!("{name} not refused"));
        println!("{name}: {}", r.reason);
        assert!(!r.reason.contains('\n') && !r.reason.contains("backtrace"), "{name}: {:?}", r.reason);
        r.reason.clone()
    };
    assert!(reason("missing-tensor").contains(missing));
    let wrong = reason("wrong-shape");
    assert!(wrong.contains(reshaped) && wrong.contains("shape"), "{wrong}");
    assert!(reason("bad-tokenizer").contains("vocab.json"));
    assert!(reason("refiner").contains("image-to-image"));
    assert_eq!(scan.refused.len(), 4);
}
