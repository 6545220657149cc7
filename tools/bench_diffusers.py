#!/usr/bin/env python3
"""PyTorch diffusers (eager) side of the GPU benchmark (issue 7).

Runs the cases `benches/gpu.rs` ran, with the weights it saved, so the two
compare like for like:

    python3 tools/bench_diffusers.py WEIGHTS_DIR [--json OUT.json] [--device cuda|cpu]

WEIGHTS_DIR is `$RAFTGEN_GPU_BENCH_WEIGHTS` of the Rust run: `cases.json`,
`sd15-unet/` and `zimage-transformer/` (each `config.json`,
`scheduler_config.json`, `diffusion_pytorch_model.safetensors`).

Per case it times the full denoising loop the way the diffusers pipelines run
it (StableDiffusionPipeline with DDIMScheduler; ZImagePipeline with
FlowMatchEulerDiscreteScheduler): the batch doubled for classifier-free
guidance, the denoiser, the guidance combine, `scheduler.step`; fp16 (SD) /
bf16 (Z-Image) on CUDA, fp32 on the CPU. Warm-up steps, then `reps` loops,
`torch.cuda.synchronize()` before every clock reading; per step the median over
all steps, per image the median loop time over the images in the batch. Text
encoding and VAE decoding are not timed (nor are they on the Rust side).

The weights load with `strict=True` semantics: missing or unexpected keys are
listed; the run stops unless `--allow-mismatch` is given (then missing weights
keep diffusers' initialisation, which does not change the timing, and the JSON
says `"weights_match": false`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from safetensors.torch import load_file


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_model(cls, model_dir: str, dtype: torch.dtype, device: torch.device, allow_mismatch: bool):
    """Builds `cls` from `config.json` without initialising weights (on the
    meta device) and assigns the saved tensors; returns (model, key report)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    state = load_file(os.path.join(model_dir, "diffusion_pytorch_model.safetensors"), device=str(device))
    state = {k: v.to(dtype) for k, v in state.items()}
    with torch.device("meta"):
        model = cls.from_config(config)
    expected = set(model.state_dict().keys())
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected)
    report = {"tensors": len(state), "missing": missing, "unexpected": unexpected}
    if missing or unexpected:
        print(f"  {cls.__name__}: {len(missing)} missing, {len(unexpected)} unexpected keys", file=sys.stderr)
        for k in missing[:20]:
            print(f"    missing    {k}", file=sys.stderr)
        for k in unexpected[:20]:
            print(f"    unexpected {k}", file=sys.stderr)
        if not allow_mismatch:
            sys.exit(f"{model_dir}: the weights do not match {cls.__name__}'s state dict (--allow-mismatch to go on)")
        model = model.to_empty(device=device)  # missing tensors: garbage, then diffusers' init below
        model.load_state_dict(state, strict=False)
        for name, p in model.named_parameters():
            if name in missing:
                torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.zeros_(p)
    else:
        model.load_state_dict(state, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype).eval()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        sys.exit(f"{model_dir}: tensors left uninitialised on the meta device: {left[:10]}")
    return model, report


def measure(device, steps, images, reps, warmup_steps, init, step):
    x = init()
    for i in range(min(warmup_steps, steps)):
        step(i, x)
    sync(device)
    step_samples, loop_samples = [], []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        latents = init()
        for i in range(steps):
            sync(device)
            t = time.perf_counter()
            latents = step(i, latents)
            sync(device)
            step_samples.append((time.perf_counter() - t) * 1e3)
        sync(device)
        loop_samples.append((time.perf_counter() - start) * 1e3)
    return {
        "step_ms": statistics.median(step_samples),
        "image_ms": statistics.median([ms / images for ms in loop_samples]),
        "step_samples_ms": step_samples,
        "loop_samples_ms": loop_samples,
    }


PROFILES: list = []


def profile_step(case, device, init, step):
    """One step under torch.profiler: the GPU time per kernel category (the
    same categories as tools/gpu_profile.py cuts the candle side into)."""
    if not PROFILE_CASES or case["name"] not in PROFILE_CASES or device.type != "cuda":
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gpu_profile import table

    x = init()
    step(0, x)  # warm: autotuning and allocations stay out of the profile
    sync(device)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        step(0, x)
        sync(device)
    kernels = [(e.name, e.time_range.elapsed_us() / 1e3) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    PROFILES.append(table(kernels, f"diffusers {case['name']}, one step"))


PROFILE_CASES: set = set()


def seeded(shape, seed, dtype, device):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def sd15_cases(weights, cases, settings, device, half, allow_mismatch):
    from diffusers import DDIMScheduler, UNet2DConditionModel

    dtype = torch.float16 if half else torch.float32
    model_dir = os.path.join(weights, "sd15-unet")
    unet, report = load_model(UNet2DConditionModel, model_dir, dtype, device, allow_mismatch)
    sched_config = DDIMScheduler.load_config(model_dir, config_name="scheduler_config.json")
    out = []
    for case in cases:
        sched = DDIMScheduler.from_config(sched_config)
        sched.set_timesteps(case["steps"], device=device)
        timesteps = sched.timesteps
        c = unet.config.in_channels
        shape = (case["images"], c, case["height"] // 8, case["width"] // 8)
        ctx_dim = unet.config.cross_attention_dim
        ctx = seeded((case["rows"], case["context_tokens"], ctx_dim), 1, dtype, device)
        noise = seeded(shape, 2, dtype, device)
        g = case["guidance"]

        def init():
            return noise * sched.init_noise_sigma

        @torch.no_grad()
        def step(i, latents):
            t = timesteps[i]
            x = torch.cat([latents] * 2) if case["cfg"] else latents
            x = sched.scale_model_input(x, t)
            pred = unet(x, t, encoder_hidden_states=ctx, return_dict=False)[0]
            if case["cfg"]:
                unc, txt = pred.chunk(2)
                pred = unc + g * (txt - unc)
            return sched.step(pred, t, latents, return_dict=False)[0]

        m = measure(device, case["steps"], case["images"], settings["reps"], settings["warmup_steps"], init, step)
        out.append((case, m))
        profile_step(case, device, init, step)
        print_row(case, m)
    del unet
    return out, report


def zimage_cases(weights, cases, settings, device, half, allow_mismatch):
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel

    dtype = torch.bfloat16 if half else torch.float32
    model_dir = os.path.join(weights, "zimage-transformer")
    transformer, report = load_model(ZImageTransformer2DModel, model_dir, dtype, device, allow_mismatch)
    sched_config = FlowMatchEulerDiscreteScheduler.load_config(model_dir, config_name="scheduler_config.json")
    cfg = transformer.config
    out = []
    for case in cases:
        sched = FlowMatchEulerDiscreteScheduler.from_config(sched_config)
        sched.set_timesteps(case["steps"], device=device)
        timesteps = sched.timesteps
        shape = (case["images"], cfg.in_channels, case["height"] // 8, case["width"] // 8)
        caps = [seeded((case["context_tokens"], cfg.cap_feat_dim), 10 + r, dtype, device) for r in range(case["rows"])]
        noise = seeded(shape, 2, torch.float32, device)
        b, g = case["images"], case["guidance"]

        def init():
            return noise.clone()  # flow matching starts from the noise itself

        @torch.no_grad()
        def step(i, latents):
            # ZImagePipeline.__call__'s loop body (no CFG truncation or renormalisation).
            t = timesteps[i]
            timestep = (1000 - t.expand(latents.shape[0])) / 1000
            x = latents.to(dtype)
            if case["cfg"]:
                x, timestep = x.repeat(2, 1, 1, 1), timestep.repeat(2)
            outs = transformer(list(x.unsqueeze(2).unbind(dim=0)), timestep, caps, return_dict=False)[0]
            if case["cfg"]:
                pred = []
                for j in range(b):
                    pos, neg = outs[j].float(), outs[b + j].float()
                    pred.append(pos + g * (pos - neg))
                pred = torch.stack(pred, dim=0)
            else:
                pred = torch.stack([o.float() for o in outs], dim=0)
            pred = -pred.squeeze(2)
            return sched.step(pred.to(torch.float32), t, latents, return_dict=False)[0]

        def init_and_reset():
            sched._step_index = None  # FlowMatchEuler counts steps; each loop starts over
            return init()

        def step_indexed(i, latents):
            sched._step_index = i
            return step(i, latents)

        m = measure(
            device, case["steps"], case["images"], settings["reps"], settings["warmup_steps"], init_and_reset, step_indexed
        )
        out.append((case, m))
        profile_step(case, device, init_and_reset, step_indexed)
        print_row(case, m)
    del transformer
    return out, report


def print_row(case, m):
    print(
        f"  {case['name']:<14} diffusers {case['images']:>3} img {case['rows']:>2} rows {case['steps']:>3} steps: "
        f"{m['step_ms']:>9.2f} ms/step {m['image_ms']:>10.1f} ms/image",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("weights", help="the directory benches/gpu.rs wrote ($RAFTGEN_GPU_BENCH_WEIGHTS)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--allow-mismatch", action="store_true", help="go on when weight names do not match")
    ap.add_argument("--profile", default="", help="comma-separated cases to profile one step of (torch.profiler)")
    args = ap.parse_args()
    PROFILE_CASES.update(c for c in args.profile.split(",") if c)

    import diffusers

    with open(os.path.join(args.weights, "cases.json")) as f:
        plan = json.load(f)
    settings, cases = plan["settings"], plan["cases"]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA is not available to PyTorch (--device cpu for a CPU check)")
    half = device.type == "cuda"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"diffusers {diffusers.__version__} eager, torch {torch.__version__}, {gpu}", flush=True)

    results, reports = [], {}
    for model, runner in (("sd15", sd15_cases), ("zimage", zimage_cases)):
        todo = [c for c in cases if c["model"] == model]
        if not todo:
            continue
        rows, report = runner(args.weights, todo, settings, device, half, args.allow_mismatch)
        reports[model] = {"tensors": report["tensors"], "missing": report["missing"], "unexpected": report["unexpected"]}
        for case, m in rows:
            results.append({"case": case["name"], "model": model, "images": case["images"], "rows": case["rows"],
                            "steps": case["steps"], "path": "diffusers", **m})
    if args.json:
        doc = {
            "tool": "diffusers", "diffusers": diffusers.__version__, "torch": torch.__version__, "device": gpu,
            "settings": settings, "weights": reports,
            "weights_match": all(not r["missing"] and not r["unexpected"] for r in reports.values()),
            "results": results, "profiles": PROFILES,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)


if __name__ == "__main__":
    main()
