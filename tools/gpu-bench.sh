#!/usr/bin/env bash
# The GPU benchmark of issue 7, in one command on the GPU machine:
#
#     bash PACK/tools/gpu-bench.sh [PACK]
#
# PACK is the directory tools/gpu-pack.sh made on the build machine (default:
# the parent of this script's directory). Steps:
#   1. LD_LIBRARY_PATH gets PyTorch's CUDA 13 libraries (site-packages
#      nvidia/cu13/lib), which the candle binaries load.
#   2. A venv with --system-site-packages (torch from the machine) gets the
#      packed diffusers wheels, offline (--no-index).
#   3. bin/gpu-bench (candle stock vs. fused; writes the random weights) and
#      tools/bench_diffusers.py (diffusers eager on those weights) run.
#   4. One table: ms/step and ms/image per case and path, fused/stock and
#      fused/diffusers ratios (per image), and the GPU's name (nvidia-smi).
# Environment: $RAFTGEN_GPU_BENCH_OUT (results and weights; default
# PACK/results; the weights take about 14 GB), and the RAFTGEN_GPU_BENCH_*
# variables of benches/gpu.rs (cases, repetitions, steps), passed through.
set -euo pipefail
die() { echo "gpu-bench.sh: error: $*" >&2; exit 1; }
say() { echo "gpu-bench.sh: $*" >&2; }

pack=$(cd "${1:-$(dirname "${BASH_SOURCE[0]}")/..}" && pwd)
out=${RAFTGEN_GPU_BENCH_OUT:-$pack/results}
python=${PYTHON:-python3}
[ -x "$pack/bin/gpu-bench" ] || die "$pack/bin/gpu-bench missing: run tools/gpu-pack.sh on the build machine first"
mkdir -p "$out"

gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1) ||
    gpu="unknown (nvidia-smi failed)"
say "GPU: $gpu"

cu13=$("$python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null) ||
    die "$python cannot import PyTorch's nvidia package (is torch with CUDA 13 installed?)"
[ -d "$cu13" ] || die "$cu13 does not exist"
export LD_LIBRARY_PATH="$cu13${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

venv=$out/venv
if [ ! -x "$venv/bin/python" ]; then
    say "installing diffusers offline into $venv"
    "$python" -m venv --system-site-packages "$venv"
    "$venv/bin/python" -m pip install --no-index --find-links "$pack/wheels" --disable-pip-version-check -q \
        -r "$pack/wheels/requirements.txt" || die "offline install of the wheels failed"
fi
"$venv/bin/python" -c 'import torch, diffusers; assert torch.cuda.is_available(), "torch sees no GPU"' ||
    die "torch/diffusers not usable in $venv"

weights=$out/weights
say "candle: stock and fused (writes the weights to $weights)"
RAFTGEN_GPU_BENCH_WEIGHTS=$weights RAFTGEN_GPU_BENCH_JSON=$out/candle.json "$pack/bin/gpu-bench" | tee "$out/candle.txt"
say "diffusers eager on the same weights"
"$venv/bin/python" "$pack/tools/bench_diffusers.py" "$weights" --allow-mismatch --json "$out/diffusers.json" |
    tee "$out/diffusers.txt"

"$venv/bin/python" - "$out/candle.json" "$out/diffusers.json" "$gpu" <<'PY' | tee "$out/table.md"
import json, sys
candle, diffusers, gpu = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), sys.argv[3]
rows = {}
for r in candle["results"] + diffusers["results"]:
    rows.setdefault(r["case"], {})[r["path"]] = r
print(f"GPU: {gpu}; diffusers {diffusers['diffusers']}, torch {diffusers['torch']}; "
      f"reps {candle['settings']['reps']}, medians")
print(f"fused path, active: {'; '.join(candle['fusions_active'])}")
print(f"fused path, not wired yet: {'; '.join(candle['fusions_not_wired'])}")
if not diffusers["weights_match"]:
    print("NOTE: diffusers' state dict did not match the saved weights exactly (see diffusers.json 'weights')")
print()
print("| case | images | steps | stock ms/step | fused ms/step | diffusers ms/step | stock ms/image | fused ms/image "
      "| diffusers ms/image | fused/stock | fused/diffusers |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
def f(p, key, fmt):
    return fmt.format(p[key]) if p else "-"
for case, paths in rows.items():
    s, fu, d = paths.get("stock"), paths.get("fused"), paths.get("diffusers")
    any_ = s or fu or d
    r1 = f"{fu['image_ms'] / s['image_ms']:.3f}" if s and fu else "-"
    r2 = f"{fu['image_ms'] / d['image_ms']:.3f}" if d and fu else "-"
    print(f"| {case} | {any_['images']} | {any_['steps']} | {f(s, 'step_ms', '{:.2f}')} | {f(fu, 'step_ms', '{:.2f}')} "
          f"| {f(d, 'step_ms', '{:.2f}')} | {f(s, 'image_ms', '{:.1f}')} | {f(fu, 'image_ms', '{:.1f}')} "
          f"| {f(d, 'image_ms', '{:.1f}')} | {r1} | {r2} |")
print()
print("ratios: per image (whole denoising loop / images); below 1 means the fused path is faster.")
PY
say "results in $out (table.md, candle.json, diffusers.json); the weights in $weights can be deleted"
