#!/usr/bin/env bash
# Prepares, on the build machine, the folder tools/gpu-check.sh runs from on
# the GPU machine (which has no Rust and no network):
#
#     tools/gpu-pack.sh [DIR]        # default target/gpu-pack
#
# DIR gets, small enough to travel as one carried path (the device tool takes
# at most 64 MiB with the working tree; this is about 25 MiB):
#   bin/binaries.tar.xz  stripped, in one archive:
#     raftgen            the node binary with the `cuda` feature (release)
#     kernel-tests       the lib's test binary with `cuda` (release profile):
#                        the fused-kernel GPU tests
#     gpu-bench          benches/gpu.rs (candle stock vs fused, attention)
#     pipeline-tests     tests/fused_pipelines.rs with `cuda`: the tiny
#                        pipelines on CUDA against the CPU
#     gpu-bench-cudnn    with RAFTGEN_GPU_PACK_CUDNN=1 only: the benchmark
#                        with the `cudnn` feature (candle's convolutions
#                        through cuDNN; tools/cudnn.sh), measured 7x slower
#                        than candle's default convolutions (docs/gpu.md)
#   wheels/              what tools/bench_diffusers.py needs beyond the GPU
#                        machine's PyTorch image: diffusers and the
#                        huggingface_hub it was tested with (pip download
#                        --no-deps, CPython $RAFTGEN_GPU_PYTHON, default 3.12)
#   tools/               gpu-check.sh and the Python helpers it runs
# gpu-check.sh unpacks the archive with Python's tarfile (no xz needed there). The cargo builds use target/cuda (the CUDA toolkit from
# tools/cuda-toolkit.sh; about 15 minutes from clean on 2 cores).
# Needs: cargo, python3 with pip, network (the wheels, the first time).
set -euo pipefail
die() { echo "gpu-pack.sh: error: $*" >&2; exit 1; }
say() { echo "gpu-pack.sh: $*" >&2; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest=${1:-$repo/target/gpu-pack}
pyver=${RAFTGEN_GPU_PYTHON:-3.12}
python=${PYTHON:-python3}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target/cuda}

toolkit_env=$("$repo/tools/cuda-toolkit.sh") || die "tools/cuda-toolkit.sh failed"
eval "$toolkit_env"
rm -rf "$dest"
mkdir -p "$dest/bin" "$dest/wheels" "$dest/tools"

# The executable a `cargo --message-format json` build reports for a target.
built() {
    "$python" -c '
import json, sys
kind = sys.argv[1]
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == kind:
        print(m["executable"])' "$1"
}
pack_bin() { # SRC NAME
    [ -x "$1" ] || die "cargo did not report the $2 executable"
    cp "$1" "$dest/bin/$2"
    strip --strip-all "$dest/bin/$2" 2>/dev/null || say "strip not found: $2 keeps its symbols"
}
cd "$repo"
say "building raftgen with the cuda feature (release)"
exe=$(cargo build --release -p raftgen --features cuda --bin raftgen --message-format json | built raftgen | tail -n 1)
pack_bin "$exe" raftgen
say "building the kernel tests (cargo test --release --features cuda --lib --no-run)"
exe=$(cargo test --release -p raftgen --features cuda --lib --no-run --message-format json | built raftgen | tail -n 1)
pack_bin "$exe" kernel-tests
say "building the GPU benchmark (cargo bench --features cuda --bench gpu --no-run)"
exe=$(cargo bench -p raftgen --features cuda --bench gpu --no-run --message-format json | built gpu | tail -n 1)
pack_bin "$exe" gpu-bench
say "building the pipeline tests (cargo test --release --features cuda --test fused_pipelines --no-run)"
exe=$(cargo test --release -p raftgen --features cuda --test fused_pipelines --no-run --message-format json |
    built fused_pipelines | tail -n 1)
pack_bin "$exe" pipeline-tests
bins=(raftgen kernel-tests gpu-bench pipeline-tests)
if [ "${RAFTGEN_GPU_PACK_CUDNN:-0}" = 1 ]; then
    say "building the GPU benchmark with cuDNN convolutions (--features cudnn)"
    cudnn_env=$("$repo/tools/cudnn.sh") || die "tools/cudnn.sh failed"
    exe=$(eval "$cudnn_env" &&
        cargo bench -p raftgen --features cudnn --bench gpu --no-run --message-format json | built gpu | tail -n 1)
    pack_bin "$exe" gpu-bench-cudnn
    bins+=(gpu-bench-cudnn)
fi

# One xz archive with a dictionary larger than a binary: the binaries share
# most of their bytes (candle's PTX), which the archive then stores once
# (three binaries of 50-80 MB become about 16 MB; gzip would make 70 MB).
say "compressing the binaries (xz, 256 MiB dictionary; about 2 minutes)"
tar -C "$dest/bin" -cf - "${bins[@]}" |
    xz -T1 --lzma2=preset=9e,dict=256MiB -c >"$dest/bin/binaries.tar.xz" || die "xz failed"
(cd "$dest/bin" && rm -f "${bins[@]}")

say "downloading the diffusers wheels (CPython $pyver)"
req=$repo/tools/requirements-gpu-bench.txt
# The GPU machine's image has PyTorch, numpy, requests, PyYAML, tqdm, ...:
# only what it lacks (or has in a version diffusers 0.36 was not tested with).
# Not huggingface_hub: the machine's transformers 5 needs its own hub 1.x,
# which diffusers 0.36 accepts (<2.0).
for name in diffusers importlib_metadata; do
    pin=$(grep -iE "^$name==" "$req") || die "$name is not pinned in $req"
    "$python" -m pip download --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any --disable-pip-version-check -q -d "$dest/wheels" "$pin" || die "pip download failed for $pin"
done
cp tools/gpu-check.sh tools/bench_diffusers.py tools/gpu_check_cluster.py tools/gpu_profile.py "$dest/tools/"
say "ready: $(du -sh "$dest" | cut -f1) in $dest"
say "on the GPU machine, from the repository root: bash ${dest#"$repo"/}/tools/gpu-check.sh OUTDIR"
