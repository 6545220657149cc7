#!/usr/bin/env bash
# Assembles cuDNN for building the `cudnn` feature (candle's cuDNN
# convolutions) from NVIDIA's PyPI wheel, and prints the environment to build
# with, on top of tools/cuda-toolkit.sh's:
#
#     eval "$(tools/cuda-toolkit.sh)"; eval "$(tools/cudnn.sh)"
#     cargo build --release --features cudnn
#
# The wheel (nvidia-cudnn-cu13, about 520 MB) is cached in
# $RAFTGEN_CUDA_WHEEL_CACHE (as tools/cuda-toolkit.sh's wheels) and unpacked
# into $RAFTGEN_CUDNN_DIR (default target/cudnn): lib/ with the unversioned
# libcudnn.so the linker needs, and include/. cudarc's build script searches
# $CUDNN_LIB/lib. At run time a `cudnn` binary needs libcudnn.so.9 (and the
# libcudnn_*.so.9 it loads): on the GPU machines PyTorch's nvidia/cudnn/lib
# (tools/gpu-check.sh puts it on LD_LIBRARY_PATH). cuDNN 9 keeps its ABI
# within the major version, so the build-time and run-time 9.x may differ.
set -euo pipefail
die() { echo "cudnn.sh: error: $*" >&2; exit 1; }
say() { echo "cudnn.sh: $*" >&2; }

readonly PIN=nvidia-cudnn-cu13==9.28.1.4
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${RAFTGEN_CUDA_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/raftgen/cuda-wheels}
dir=${RAFTGEN_CUDNN_DIR:-$repo/target/cudnn}
python=${PYTHON:-python3}
stamp=$dir/.raftgen-cudnn

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$PIN" ]; then
    mkdir -p "$cache"
    whl=$(ls "$cache"/nvidia_cudnn_cu13-"${PIN##*==}"-*.whl 2>/dev/null | head -n 1 || true)
    if [ -z "$whl" ]; then
        say "downloading $PIN (about 520 MB) into $cache"
        "$python" -m pip download --no-deps --only-binary=:all: --disable-pip-version-check --retries 2 \
            --timeout 60 --progress-bar off -q -d "$cache" "$PIN" >&2 || die "pip download $PIN failed"
        whl=$(ls "$cache"/nvidia_cudnn_cu13-"${PIN##*==}"-*.whl 2>/dev/null | head -n 1 || true)
        [ -n "$whl" ] || die "pip download left no $PIN wheel in $cache"
    fi
    rm -rf "$dir" "$dir.partial"
    mkdir -p "$dir.partial"
    "$python" - "$dir.partial" "$whl" <<'EOF' || die "unpacking $whl failed"
import sys, zipfile
with zipfile.ZipFile(sys.argv[2]) as z:
    for info in z.infolist():
        if info.filename.startswith("nvidia/cudnn/"):
            z.extract(info, sys.argv[1])
EOF
    mv "$dir.partial/nvidia/cudnn" "$dir"
    rm -rf "$dir.partial"
    [ -f "$dir/lib/libcudnn.so.9" ] || die "the wheel has no nvidia/cudnn/lib/libcudnn.so.9 (layout changed?)"
    ln -s libcudnn.so.9 "$dir/lib/libcudnn.so"
    echo "$PIN" >"$stamp"
    say "cuDNN ${PIN##*==} in $dir"
fi
q() { printf '%q' "$1"; }
echo "export CUDNN_LIB=$(q "$dir")"
