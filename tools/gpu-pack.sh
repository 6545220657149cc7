#!/usr/bin/env bash
# Prepares, on the build machine, the directory tools/gpu-bench.sh runs from on
# the GPU machine (which has no Rust and no network):
#
#     tools/gpu-pack.sh [DIR]        # default target/gpu-pack
#
# DIR gets: bin/gpu-bench (benches/gpu.rs built with `cargo bench --features
# cuda --no-run`), bin/kernel-tests (the lib's test binary with the cuda
# feature: the fused-kernel GPU tests), wheels/ (tools/requirements-gpu-bench.txt
# downloaded with `pip download --no-deps`; binary wheels for each CPython in
# $RAFTGEN_GPU_PYTHONS, default "3.10 3.11 3.12 3.13": set it to the GPU
# machine's `python3 --version` alone to keep the directory small, e.g. when
# it travels as a carried path of at most 64 MiB), the benchmark's
# configs, tools/bench_diffusers.py and tools/gpu-bench.sh.
# Needs the CUDA toolkit env (tools/cuda-toolkit.sh, run here), cargo, pip and
# network. The cargo builds use the bench/test profiles in target/cuda.
set -euo pipefail
die() { echo "gpu-pack.sh: error: $*" >&2; exit 1; }
say() { echo "gpu-pack.sh: $*" >&2; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest=${1:-$repo/target/gpu-pack}
pythons=${RAFTGEN_GPU_PYTHONS:-3.10 3.11 3.12 3.13}
python=${PYTHON:-python3}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target/cuda}

eval "$("$repo/tools/cuda-toolkit.sh")"
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
say "building the GPU benchmark (cargo bench --features cuda --no-run)"
bench=$(cd "$repo" && cargo bench -p raftgen --features cuda --bench gpu --no-run --message-format json | built gpu | tail -n 1)
[ -x "$bench" ] || die "cargo did not report the gpu bench executable"
cp "$bench" "$dest/bin/gpu-bench"
strip --strip-debug "$dest/bin/gpu-bench" 2>/dev/null || say "strip not found: the binary keeps its debug info"
say "building the kernel tests (cargo test --features cuda --lib --no-run)"
tests=$(cd "$repo" && cargo test -p raftgen --features cuda --lib --no-run --message-format json | built raftgen | tail -n 1)
[ -x "$tests" ] || die "cargo did not report the lib test executable"
cp "$tests" "$dest/bin/kernel-tests"
strip --strip-debug "$dest/bin/kernel-tests" 2>/dev/null || true

say "downloading the diffusers wheels into $dest/wheels"
req=$repo/tools/requirements-gpu-bench.txt
mapfile -t pins < <(grep -vE '^\s*(#|$)' "$req")
# Pure-Python wheels once; the rest for each CPython (pip picks the one that fits).
for pin in "${pins[@]}"; do
    if ! "$python" -m pip download --no-deps --only-binary=:all: --platform any --python-version 3.11 \
        --implementation py --disable-pip-version-check -q -d "$dest/wheels" "$pin" 2>/dev/null; then
        for v in $pythons; do
            "$python" -m pip download --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 \
                --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --python-version "$v" \
                --implementation cp --disable-pip-version-check -q -d "$dest/wheels" "$pin" ||
                die "pip download failed for $pin (CPython $v)"
        done
    fi
done
cp "$req" "$dest/wheels/requirements.txt"
cp "$repo/tools/bench_diffusers.py" "$repo/tools/gpu-bench.sh" "$dest/tools/"
say "ready: $(du -sh "$dest" | cut -f1) in $dest; on the GPU machine: bash $dest/tools/gpu-bench.sh"
