#!/usr/bin/env python3
"""Build the model-folder corpus for the Rust loader tests (issue 17).

Real checkpoints on the hub come in many layouts: plain safetensors, `.fp16`
and `.non_ema` variants, PyTorch `.bin` pickles, shards under an index, stray
ONNX/OpenVINO/Flax files, old config keys, pipelines re-saved by diffusers.
This script writes one micro random-weight pipeline per layout, saved by
diffusers / transformers themselves (or edited the way the hub's files are),
and records for each what diffusers computes from it (the decoded image for a
fixed prompt, seed and initial noise), or, for layouts raftgen refuses, the
reason it must give.

    python tools/make_model_corpus.py            # regenerate tests/data/corpus/
    python tools/make_model_corpus.py --check    # only reload + compare

Run from the repository root in the venv of tools/README.md (the same as
make_tiny_models.py, whose builders it reuses). Deterministic: fixed seeds.

Each case is tests/data/corpus/<case>/ with
    model/             the folder a node would serve
    expected.json      {"serves": true, ...run settings...} or
                       {"serves": false, "reason": "<substring of the refusal>"}
    reference.safetensors  (serving cases) init_noise [1,C,h,w] and image
                       [1,H,W,3] in [0, 1] as diffusers' output_type="np"
`tests/model_corpus.rs` loads every case and checks it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_tiny_models as mt  # noqa: E402  (reuse: seeds, tokenizers, configs)
import corpus_shards  # noqa: E402  (sharded cases, derived with the standard library)

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from transformers import CLIPTextModel, CLIPTokenizer, Qwen2Tokenizer, Qwen3Config, Qwen3ForCausalLM, Qwen3Model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "data" / "corpus"
SIZE_LIMIT_BYTES = 6 * 1024 * 1024
PROMPT = "a red circle on the left"
NEGATIVE = "blurry"
SD_RUN = dict(height=32, width=32, num_inference_steps=2, guidance_scale=5.0)
ZI_RUN = dict(height=32, width=32, num_inference_steps=2, guidance_scale=3.0)


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------
# Micro pipelines
# --------------------------------------------------------------------------


def micro_vae(latent_channels: int, scaling: float, shift=None, quant=True) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 4, 4), layers_per_block=1, act_fn="silu",
        latent_channels=latent_channels, norm_num_groups=2, sample_size=32,
        scaling_factor=scaling, shift_factor=shift, use_quant_conv=quant, use_post_quant_conv=quant,
        force_upcast=True,
    )


CLIP_MERGES = 200  # vocab = 256 + 256 + 200 + 2 ids: small embeddings, real BPE rules
_CLIP_DIR = Path("/tmp/raftgen-corpus-clip-vocab")


def micro_clip_tokenizer(pad: str) -> CLIPTokenizer:
    if not (_CLIP_DIR / "vocab.json").exists():
        merges = mt.load_open_clip_merges(Path.home() / ".cache" / "raftgen" / "open-clip")
        mt.write_truncated_clip_vocab(_CLIP_DIR, merges, CLIP_MERGES)
    return mt.make_clip_tokenizer(_CLIP_DIR, pad_token=pad)


def micro_sd(seed: int, *, linear_projection=False, act="quick_gelu", pad="<|endoftext|>") -> StableDiffusionPipeline:
    tokenizer = micro_clip_tokenizer(pad)
    te = CLIPTextModel(mt.clip_text_config(len(tokenizer.encoder), hidden=16, heads=2, act=act, projection_dim=16))
    mt.reinit_parameters(te, seed)
    unet = UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=2, cross_attention_dim=16,
        attention_head_dim=2, use_linear_projection=linear_projection,
    )
    mt.reinit_parameters(unet, seed + 1)
    vae = micro_vae(4, 0.18215)
    mt.reinit_parameters(vae, seed + 2)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler.from_config(mt.SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def micro_zimage(seed: int, tok_dir: Path) -> ZImagePipeline:
    slow = Qwen2Tokenizer.from_pretrained(ROOT / "models" / "tiny-z-image" / "tokenizer")
    n_tok = len(slow)
    cfg = Qwen3Config(
        vocab_size=((n_tok + 63) // 64) * 64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, hidden_act="silu",
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
        bos_token_id=slow.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=slow.convert_tokens_to_ids("<|im_end|>"),
        torch_dtype="float32",
    )
    te = Qwen3Model(cfg)
    mt.reinit_parameters(te, seed)
    te.eval()
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=24, n_layers=1, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[4, 4, 4], axes_lens=[1536, 512, 512],
    )
    mt.reinit_parameters(transformer, seed + 1)
    vae = micro_vae(16, 0.3611, shift=0.1159, quant=False)
    mt.reinit_parameters(vae, seed + 2)
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(mt.ZIMAGE_TURBO_SCHEDULER),
        vae=vae, text_encoder=te, tokenizer=slow, transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe._micro_cfg = cfg  # for re-saving the text encoder like the release
    return pipe


# --------------------------------------------------------------------------
# Layout edits (what the hub's folders look like)
# --------------------------------------------------------------------------


def resave_component(comp_dir: Path, module, *, variant=None, safe=True, shard=None, dtype=None) -> None:
    for f in list(comp_dir.iterdir()):
        if f.name != "config.json" and f.name != "generation_config.json":
            f.unlink()
    m = module.to(dtype) if dtype is not None else module
    kw = dict(safe_serialization=safe)
    if variant:
        kw["variant"] = variant
    if shard:
        kw["max_shard_size"] = shard
    m.save_pretrained(comp_dir, **kw)
    if dtype is not None:
        module.to(torch.float32)


def stray_files(model: Path) -> None:
    junk = b"not a weight file\n"
    for rel in ["unet/model.onnx", "unet/openvino_model.bin", "unet/openvino_model.xml",
                "unet/diffusion_flax_model.msgpack", "text_encoder/flax_model.msgpack", "text_encoder/model.onnx",
                "vae/diffusion_pytorch_model.safetensors.bak"]:
        (model / rel).write_bytes(junk)
    (model / "onnx").mkdir(exist_ok=True)
    (model / "onnx" / "model.onnx").write_bytes(junk)


def edit_json(path: Path, fn) -> None:
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------


def reference_sd(model: Path, noise_seed: int, run: dict, **load_kw) -> dict:
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, torch_dtype=torch.float32, **load_kw)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # raftgen serves PNDM folders with DDIM
    pipe.set_progress_bar_config(disable=True)
    noise = mt.randn((1, 4, run["height"] // 8, run["width"] // 8), noise_seed)
    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, latents=noise.clone(), output_type="np", eta=0.0, **run)
    return {"init_noise": noise, "image": torch.from_numpy(out.images).float()}


def reference_zimage(model: Path, noise_seed: int, run: dict) -> dict:
    pipe = ZImagePipeline.from_pretrained(model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    noise = mt.randn((1, 16, run["height"] // 8, run["width"] // 8), noise_seed)
    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, latents=noise.clone(), output_type="np",
               cfg_normalization=False, cfg_truncation=1.0, max_sequence_length=512, **run)
    return {"init_noise": noise, "image": torch.from_numpy(out.images).float()}


def write_case(name: str, expected: dict, ref: dict | None) -> None:
    case = CORPUS / name
    (case / "expected.json").write_text(json.dumps(expected, indent=2, sort_keys=True) + "\n")
    if ref is not None:
        save_file({k: v.contiguous() for k, v in ref.items()}, str(case / "reference.safetensors"))
    log(f"  {name}: {'serves' if expected['serves'] else 'refused: ' + expected['reason']}")


# --------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------


def sd_case(name: str, seed: int, edit, *, expected_extra=None, serves=True, reason=None, ref_kw=None,
            pipe_kw=None) -> None:
    model = CORPUS / name / "model"
    pipe = micro_sd(seed, **(pipe_kw or {}))
    pipe.save_pretrained(model, safe_serialization=True)
    edit(model, pipe)
    if serves:
        ref = reference_sd(model, seed + 10, SD_RUN, **(ref_kw or {}))
        write_case(name, {"serves": True, "family": "sd", "prompt": PROMPT, "negative_prompt": NEGATIVE,
                          "sampler": "ddim", "noise_seed": seed + 10, "diffusers_load": ref_kw or {},
                          **SD_RUN, **(expected_extra or {})}, ref)
    else:
        write_case(name, {"serves": False, "reason": reason}, None)


def build_all() -> None:
    if CORPUS.exists():
        shutil.rmtree(CORPUS)
    CORPUS.mkdir(parents=True)
    nothing = lambda m, p: None  # noqa: E731

    sd_case("sd15-plain", 100, nothing)

    def fp16_and_non_ema(m: Path, p) -> None:
        # The folder: no plain UNet weights, an fp16 export and the
        # training (non-EMA) weights, which must not be what runs.
        resave_component(m / "unet", p.unet, variant="fp16", dtype=torch.float16)
        other = micro_sd(999).unet
        other.save_pretrained(m / "unet", variant="non_ema", safe_serialization=True)
    sd_case("sd15-fp16-and-non-ema", 110, fp16_and_non_ema, ref_kw={"variant": "fp16"})

    def fp16_only(m: Path, p) -> None:
        for comp in ["unet", "vae", "text_encoder"]:
            resave_component(m / comp, getattr(p, comp), variant="fp16", dtype=torch.float16)
    sd_case("sd15-fp16-only", 120, fp16_only, ref_kw={"variant": "fp16"})

    def bin_only(m: Path, p) -> None:
        for comp in ["unet", "vae", "text_encoder"]:
            resave_component(m / comp, getattr(p, comp), safe=False)
    sd_case("sd15-bin-only", 130, bin_only)

    def sharded(m: Path, p) -> None:
        resave_component(m / "unet", p.unet, shard="40KB")
        resave_component(m / "text_encoder", p.text_encoder, shard="40KB")
    sd_case("sd15-sharded", 140, sharded)

    def old_keys(m: Path, p) -> None:
        stray_files(m)
        def unet(cfg):
            cfg.pop("num_attention_heads", None)
            cfg["attention_head_dim"] = [2, 2]
            cfg.pop("_diffusers_version", None)
        edit_json(m / "unet" / "config.json", unet)
        edit_json(m / "vae" / "config.json", lambda c: c.pop("scaling_factor", None))
    sd_case("sd15-old-keys-stray-files", 160, old_keys)

    def pndm_with_safety_entries(m: Path, p) -> None:
        # SD-1.4's layout: PNDM, and safety checker / feature extractor entries.
        edit_json(m / "scheduler" / "scheduler_config.json", lambda c: c.update(
            {"_class_name": "PNDMScheduler", "skip_prk_steps": True, "set_alpha_to_one": False}))
        edit_json(m / "model_index.json", lambda c: c.update(
            {"scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [None, None],
             "feature_extractor": [None, None]}))
    sd_case("sd14-pndm", 170, pndm_with_safety_entries)

    sd_case("sd2-base-epsilon", 180, nothing, pipe_kw={"linear_projection": True, "act": "gelu", "pad": "!"})

    def ambiguous(m: Path, p) -> None:
        resave_component(m / "unet", p.unet, variant="fp16", dtype=torch.float16)
        p.unet.to(torch.bfloat16).save_pretrained(m / "unet", variant="bf16", safe_serialization=True)
    sd_case("sd15-two-variants", 190, ambiguous, serves=False, reason="several variants (bf16, fp16)")

    def non_ema_only(m: Path, p) -> None:
        resave_component(m / "unet", p.unet, variant="non_ema")
    sd_case("sd15-non-ema-only", 200, non_ema_only, serves=False, reason="only non_ema")

    def refiner(m: Path, p) -> None:
        # SDXL refiner: an image-to-image pipeline with only text_encoder_2.
        edit_json(m / "model_index.json", lambda c: c.update(
            {"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None],
             "tokenizer": [None, None], "requires_aesthetics_score": True}))
    sd_case("sdxl-refiner", 210, refiner, serves=False, reason="image-to-image")

    # Z-Image as the release ships it (Qwen3ForCausalLM keys under model.,
    # tokenizer.json) and as diffusers re-saves it (Qwen3Model keys without
    # the prefix, vocab/merges/tokenizer_config only).
    for name, seed, resaved in [("zimage-release", 300, False), ("zimage-resaved", 310, True)]:
        model = CORPUS / name / "model"
        pipe = micro_zimage(seed, model / "tokenizer")
        pipe.save_pretrained(model, safe_serialization=True)
        # The transformer as the release ships it: bf16 (its fixed 256->1024
        # timestep MLP is most of a micro model's bytes).
        resave_component(model / "transformer", pipe.transformer, dtype=torch.bfloat16)
        if not resaved:
            te_dir = model / "text_encoder"
            lm = Qwen3ForCausalLM(pipe._micro_cfg)
            lm.model.load_state_dict(pipe.text_encoder.state_dict(), strict=True)
            lm.tie_weights()
            for f in te_dir.iterdir():
                f.unlink()
            lm.save_pretrained(te_dir, safe_serialization=True)
            shutil.copy(ROOT / "models" / "tiny-z-image" / "tokenizer" / "tokenizer.json", model / "tokenizer")
        else:
            assert not (model / "tokenizer" / "tokenizer.json").exists(), "diffusers wrote a tokenizer.json"
        ref = reference_zimage(model, seed + 10, ZI_RUN)
        write_case(name, {"serves": True, "family": "z-image", "prompt": PROMPT, "negative_prompt": NEGATIVE,
                          "sampler": "flow_match_euler", "noise_seed": seed + 10, "diffusers_load": {},
                          **ZI_RUN}, ref)

    # Z-Image base: the release layout, sharded (tools/corpus_shards.py;
    # check_all recomputes its reference from the shards with diffusers).
    corpus_shards.derive_all()


def check_all() -> None:
    """Recompute every serving case's reference with diffusers from the files
    on disk; they must match what is stored exactly (same machine)."""
    for case in sorted(CORPUS.iterdir()):
        exp = json.loads((case / "expected.json").read_text())
        if not exp["serves"]:
            log(f"  {case.name}: refused case ({exp['reason']})")
            continue
        stored = load_file(str(case / "reference.safetensors"))
        run = {k: exp[k] for k in ("height", "width", "num_inference_steps", "guidance_scale")}
        if exp["family"] == "sd":
            again = reference_sd(case / "model", exp["noise_seed"], run, **exp["diffusers_load"])
        else:
            again = reference_zimage(case / "model", exp["noise_seed"], run)
        for k in ("init_noise", "image"):
            mt.assert_close(f"{case.name}/{k}", again[k], stored[k])
        log(f"  {case.name}: diffusers reproduces the reference ({tuple(stored['image'].shape)})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    mt.setup_torch()
    if not args.check:
        build_all()
    check_all()
    size = mt.dir_size(CORPUS)
    log(f"corpus: {size / 1e6:.2f} MB in {CORPUS}")
    if size > SIZE_LIMIT_BYTES:
        sys.exit(f"the corpus is {size} bytes, over {SIZE_LIMIT_BYTES}")


if __name__ == "__main__":
    main()
