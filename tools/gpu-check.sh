#!/usr/bin/env bash
# The GPU device check (issue 16), one command on the GPU machine, from the
# repository root (the tiny model folders under models/ are used):
#
#     bash PACK/tools/gpu-check.sh OUTDIR
#
# PACK is the folder tools/gpu-pack.sh made on the build machine (default:
# the parent of this script's folder). Everything it measures goes under
# OUTDIR: summary.md (the tables), check.log (all output) and logs.tar.gz
# (every step's log and JSON). Steps, each under its own time limit, all
# within $RAFTGEN_GPU_CHECK_BUDGET_S (default 480 s; a step that would not
# fit is skipped and says so; $RAFTGEN_GPU_CHECK_SKIP names steps to skip):
#   a. kernels   the fused-kernel tests on the GPU (f32 1e-3, f16/bf16 1e-2,
#                outputs poisoned with NaN before each launch)
#   b. pipelines the tiny pipelines on CUDA against the CPU in floats
#                (tests/fused_pipelines.rs, cuda_pipelines_match_the_cpu)
#   c. cluster   3-node clusters on loopback with the tiny model folders, jobs
#                through a follower: --device cpu (the reference), --device
#                cuda --dtype f32 and --dtype auto (f16/bf16); images compared
#                with the CPU's; GPU metrics read from /metrics
#   d. bench     attention alone (candle f32 / in dtype / our SIMT / our
#                tensor-core kernels), then SD-1.5 UNet 512x512 (batch 1, 2, 4,
#                CFG) and Z-Image-Turbo DiT 1024x1024: candle stock and fused
#   d''. bench-cudnn the SD cases with candle's convolutions through cuDNN
#   d'. diffusers the same cases in diffusers eager on the same weights, with
#                one profiled step per model (torch.profiler)
#   e. profile   one candle step of each model under ncu: GPU time per kernel
#                category (tools/gpu_profile.py)
set -uo pipefail

out=${1:?usage: gpu-check.sh OUTDIR [PACK]}
pack=$(cd "${2:-$(dirname "${BASH_SOURCE[0]}")/..}" && pwd)
repo=$(pwd)
budget=${RAFTGEN_GPU_CHECK_BUDGET_S:-480}
work=${RAFTGEN_GPU_CHECK_WORK:-/tmp/raftgen-gpu-check}
python=${PYTHON:-python3}
start=$(date +%s)
mkdir -p "$out" "$work/logs"
exec > >(tee "$out/check.log") 2>&1

left() { echo $((budget - ($(date +%s) - start))); }
summary=()
# step NAME LIMIT_S COMMAND...: runs it with its output in logs/NAME.log,
# prints the log's tail, records the outcome.
step() {
    local name=$1 limit=$2 l rc t0
    shift 2
    case " ${RAFTGEN_GPU_CHECK_SKIP:-} " in *" $name "*)
        echo "=== $name: SKIPPED (RAFTGEN_GPU_CHECK_SKIP)"
        summary+=("| $name | skipped (asked) | |")
        return ;;
    esac
    l=$(left)
    if [ "$l" -lt 15 ]; then
        echo "=== $name: SKIPPED, ${l}s of the budget left"
        summary+=("| $name | skipped (budget) | |")
        return
    fi
    [ "$limit" -gt "$l" ] && limit=$l
    echo "=== $name (limit ${limit}s, $(($(date +%s) - start))s elapsed)"
    t0=$(date +%s)
    timeout -k 5 "$limit" bash -c '"$@"' "$name" "$@" >"$work/logs/$name.log" 2>&1
    rc=$?
    tail -n "${TAIL_LINES:-30}" "$work/logs/$name.log"
    local verdict=ok
    [ $rc -eq 124 ] && verdict="TIMED OUT"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && verdict="FAILED (exit $rc)"
    summary+=("| $name | $verdict | $(($(date +%s) - t0)) s |")
}

echo "raftgen GPU check: pack $pack, output $out, budget ${budget}s"
gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -n 1)
echo "GPU: $gpu"
cu13=$("$python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null)
[ -d "$cu13" ] || { echo "error: PyTorch's nvidia/cu13/lib not found ($cu13)"; exit 1; }
export LD_LIBRARY_PATH="$cu13${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
mkdir -p "$work/bin"
cudnn=$("$python" -c 'import nvidia.cudnn, os; print(os.path.join(list(nvidia.cudnn.__path__)[0], "lib"))' 2>/dev/null)
[ -d "$cudnn" ] && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$cudnn"
"$python" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
    "$pack/bin/binaries.tar.xz" "$work/bin" || { echo "error: unpacking $pack/bin/binaries.tar.xz"; exit 1; }
bin=$work/bin
export bin pack repo work python

# a. kernels
TAIL_LINES=60 step kernels 150 "$bin/kernel-tests" --test-threads=1 --nocapture kernels::

# b. the tiny pipelines on CUDA (f32 and f16/bf16) against the CPU, in floats
TAIL_LINES=40 step pipelines 120 "$bin/pipeline-tests" --test-threads=1 --nocapture

# c. cluster: CPU reference, CUDA f32, CUDA auto (f16 SD / bf16 SDXL, Z-Image)
cluster() { "$python" "$pack/tools/gpu_check_cluster.py" run --raftgen "$bin/raftgen" --models "$repo/models" \
    --out "$work/cluster" --data "$work/cluster-data" "$@"; }
export -f cluster
step cluster-cpu 60 cluster --label cpu-f32 --device cpu --dtype f32 --base-port 7310
step cluster-cuda-f32 60 cluster --label cuda-f32 --device cuda --dtype f32 --base-port 7320
step cluster-cuda-auto 60 cluster --label cuda-auto --device cuda --dtype auto --base-port 7330
step cluster-compare 20 "$python" "$pack/tools/gpu_check_cluster.py" compare --out "$work/cluster" \
    --reference cpu-f32 cuda-f32 cuda-auto

# d. candle benchmark (writes the weights diffusers reads)
export RAFTGEN_GPU_BENCH_WEIGHTS=$work/weights RAFTGEN_GPU_BENCH_REPS=${RAFTGEN_GPU_BENCH_REPS:-2}
export RAFTGEN_GPU_BENCH_CASES=${RAFTGEN_GPU_BENCH_CASES:-sd15-b1,sd15-b2,sd15-b4,zimage-b1}
export RAFTGEN_GPU_BENCH_JSON=$work/logs/candle.json
TAIL_LINES=40 step bench 240 "$bin/gpu-bench"
unset RAFTGEN_GPU_BENCH_JSON

# d''. the SD cases again with candle's convolutions through cuDNN
if [ -x "$bin/gpu-bench-cudnn" ]; then
    TAIL_LINES=20 RAFTGEN_GPU_BENCH_CASES=sd15-b1,sd15-b2,sd15-b4 RAFTGEN_GPU_BENCH_ATTENTION=0 \
        RAFTGEN_GPU_BENCH_SAVE=0 RAFTGEN_GPU_BENCH_PATHS=stock step bench-cudnn 90 "$bin/gpu-bench-cudnn"
fi

# d'. diffusers eager on the same weights
diffusers() {
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" \
        "$pack"/wheels/*.whl || return 1
    PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}" "$python" "$pack/tools/bench_diffusers.py" \
        "$RAFTGEN_GPU_BENCH_WEIGHTS" --allow-mismatch --json "$work/logs/diffusers.json" --profile sd15-b1,zimage-b1
}
export -f diffusers
TAIL_LINES=60 step diffusers 200 diffusers

# e. where a candle step's time goes (ncu, one step per model)
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
profile() { # CASE
    [ -n "$ncu" ] || { echo "ncu not found"; return 1; }
    RAFTGEN_GPU_BENCH_PROFILE=1 RAFTGEN_GPU_BENCH_SAVE=0 RAFTGEN_GPU_BENCH_CASES=$1 \
        RAFTGEN_GPU_BENCH_PATHS=${RAFTGEN_GPU_CHECK_PROFILE_PATH:-fused} \
        "$ncu" --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
        --log-file "$work/logs/ncu-$1.csv" "$bin/gpu-bench" || return 1
    "$python" "$pack/tools/gpu_profile.py" ncu "$work/logs/ncu-$1.csv" \
        --title "candle ${RAFTGEN_GPU_CHECK_PROFILE_PATH:-fused} $1, one step" \
        --json "$work/logs/profile-$1.json"
}
export ncu
export -f profile
step profile-sd15 120 profile sd15-b1
step profile-zimage 120 profile zimage-b1

# The summary: outcomes, then the tables each step printed.
{
    echo "# raftgen GPU check"
    echo
    echo "GPU: $gpu; $(($(date +%s) - start)) s"
    echo
    echo "| step | outcome | time |"
    echo "| --- | --- | --- |"
    printf '%s\n' "${summary[@]}"
    echo
    echo "## kernels"
    grep -E "^test |test result|relative error|panicked" "$work/logs/kernels.log" | head -n 80
    echo
    echo "## pipelines on CUDA vs the CPU"
    grep -E "^cuda pipeline|^test |test result|panicked|skipping" "$work/logs/pipelines.log"
    echo
    echo "## cluster"
    grep -hE "^\[|^\|" "$work/logs"/cluster-*.log
    echo
    echo "## bench (candle)"
    grep -E "^\||^attention|^fused" "$work/logs/bench.log"
    echo
    echo "## bench (candle with cuDNN convolutions)"
    grep -E "^\||^fused" "$work/logs/bench-cudnn.log"
    echo
    echo "## diffusers"
    grep -E "diffusers|^\||ms of GPU|^  " "$work/logs/diffusers.log" | head -n 80
    echo
    echo "## profiles (candle)"
    for f in "$work/logs"/profile-*.log; do [ -f "$f" ] && grep -vE "^==PROF==|^  saved" "$f" | tail -n 30; done
} >"$out/summary.md" 2>/dev/null
rm -rf "$work/weights"
tar -czf "$out/logs.tar.gz" -C "$work" logs cluster 2>/dev/null
cat "$out/summary.md"
sleep 1 # let tee finish check.log
