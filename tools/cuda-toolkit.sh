#!/usr/bin/env bash
# Assembles the CUDA 13.0 toolkit that `cargo build --features cuda` needs from
# NVIDIA's PyPI wheels (no system CUDA, no GPU, no root), and prints the
# environment to build with:
#
#     eval "$(tools/cuda-toolkit.sh)"
#     cargo build --release --features cuda
#
# Why wheels: the build machines have no CUDA; the wheels pinned by
# `cuda-toolkit==13.0.2` unpack to `nvidia/cu13/{bin,include,lib,nvvm}`, which
# works as CUDA_ROOT once two things no wheel ships are added: unversioned
# `.so` symlinks in lib/ (the linker looks for libcublas.so, the wheels ship
# libcublas.so.13) and lib/stubs/libcuda.so, a stand-in for the driver library
# whose `cu*` functions all return CUDA_ERROR_STUB_LIBRARY (34). Stay on 13.0.x:
# the GPU machines' driver (580) cannot JIT PTX from newer toolkits.
#
# Steps, each skipped when already done:
#   1. `pip download --no-deps` the pinned wheels into the wheel cache
#      ($RAFTGEN_CUDA_WHEEL_CACHE, default ${XDG_CACHE_HOME:-~/.cache}/raftgen/cuda-wheels);
#      a second run downloads nothing.
#   2. Unpack them into the toolkit dir ($RAFTGEN_CUDA_TOOLKIT, default
#      target/cuda-toolkit), add the symlinks and the stub, and check that nvcc
#      compiles a kernel to PTX. A stamp file records what was assembled; when it
#      matches, this step is skipped (a warm run takes well under a second).
#   3. Print `export` lines on stdout (progress goes to stderr):
#      CUDA_ROOT/CUDA_PATH/CUDA_HOME, PATH, LD_LIBRARY_PATH, CUDA_COMPUTE_CAP
#      (default 90, i.e. sm_90a for H100/H200; a value already in the
#      environment is kept) and NVCC_CCBIN when it is set.
#
# Needs: python3 with pip (for the download and the unzip), cc, cargo (only when
# cudarc's sources are not yet in the cargo registry), network on the first run.
set -euo pipefail

die() {
    echo "cuda-toolkit.sh: error: $*" >&2
    exit 1
}
say() { echo "cuda-toolkit.sh: $*" >&2; }

# Bump when what this script assembles changes, so old toolkit dirs are redone.
readonly LAYOUT_VERSION=1
# The versions `cuda-toolkit==13.0.2` pins (its METADATA's Requires-Dist).
readonly WHEELS=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-cccl==13.0.85
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-nvrtc==13.0.88
    nvidia-cublas==13.1.0.3
    nvidia-curand==10.4.0.35
)
# CUDA_ERROR_STUB_LIBRARY in cuda.h.
readonly STUB_RESULT=34

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${RAFTGEN_CUDA_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/raftgen/cuda-wheels}
toolkit=${RAFTGEN_CUDA_TOOLKIT:-$repo/target/cuda-toolkit}
python=${PYTHON:-python3}
arch=$(uname -m)

[ "$(uname -s)" = Linux ] || die "only Linux is supported (NVIDIA's wheels used here are manylinux)"
case "$arch" in
x86_64 | aarch64) ;;
*) die "no CUDA wheels for machine type $arch (need x86_64 or aarch64)" ;;
esac
# Checked only when needed, so a warm run does not pay for starting pip.
need_pip() {
    command -v "$python" >/dev/null 2>&1 || die "$python not found: install python3 with pip (or set PYTHON=/path/to/python3)"
    "$python" -m pip --version >/dev/null 2>&1 || die "$python has no pip: install python3-pip (or set PYTHON to a python3 with pip)"
}
mkdir -p "$cache" || die "cannot create the wheel cache $cache"
case "$toolkit" in /*) ;; *) toolkit=$PWD/$toolkit ;; esac
case "$cache" in /*) ;; *) cache=$PWD/$cache ;; esac

# --- 1. the wheels -----------------------------------------------------------
# The cached wheel for a pin `name==version` on this machine type, or nothing.
cached_wheel() {
    local name=${1%%==*} version=${1##*==} f
    for f in "$cache/${name//-/_}-$version-"*"$arch"*.whl; do
        [ -f "$f" ] && { echo "$f"; return; }
    done
    return 0 # nothing found: empty output, not a failure (set -e)
}

missing=()
for pin in "${WHEELS[@]}"; do
    [ -n "$(cached_wheel "$pin")" ] || missing+=("$pin")
done
if [ ${#missing[@]} -gt 0 ]; then
    need_pip
    say "downloading ${#missing[@]} wheel(s) (about 650 MB for all 8) into $cache"
    "$python" -m pip download --no-deps --only-binary=:all: --disable-pip-version-check \
        --retries 2 --timeout 60 --progress-bar off -q -d "$cache" "${missing[@]}" >&2 ||
        die "pip download failed for ${missing[*]} (no network and no cached wheels in $cache?)"
fi
wheels=()
for pin in "${WHEELS[@]}"; do
    w=$(cached_wheel "$pin")
    [ -n "$w" ] || die "pip download did not leave a $arch wheel for $pin in $cache"
    wheels+=("$w")
done

# --- 2. the toolkit dir -------------------------------------------------------
# The stub must define every driver function cudarc binds; take the list from
# the cudarc that Cargo.lock resolves (candle's), not from a hand-kept list.
cudarc_version=$(awk '/^name = "cudarc"$/ { getline; gsub(/version = |"/, ""); print; exit }' "$repo/Cargo.lock")
[ -n "$cudarc_version" ] || die "no cudarc in $repo/Cargo.lock: is the cuda feature in Cargo.toml?"

stamp_text=$(
    echo "layout $LAYOUT_VERSION"
    echo "cudarc $cudarc_version"
    for w in "${wheels[@]}"; do basename "$w"; done
)
stamp=$toolkit/.raftgen-cuda-toolkit
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_text" ]; then
    say "toolkit up to date in $toolkit"
else
    cudarc_src() {
        local d
        for d in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$cudarc_version"; do
            [ -d "$d/src/driver/sys" ] && { echo "$d"; return; }
        done
        # Not unpacked (a fresh machine: only a build of cudarc unpacks it):
        # empty output, not a failure, or set -e would end the script silently.
        return 0
    }
    src=$(cudarc_src)
    if [ -z "$src" ]; then
        command -v cargo >/dev/null 2>&1 || die "cudarc $cudarc_version is not in the cargo registry and cargo is not installed to fetch it"
        say "fetching crates (cudarc $cudarc_version's sources give the stub's symbol list)"
        cargo fetch --manifest-path "$repo/Cargo.toml" >&2 || die "cargo fetch failed (no network?)"
        src=$(cudarc_src)
    fi
    if [ -z "$src" ]; then
        # `cargo fetch` leaves crates packed in registry/cache; only a build
        # unpacks them into registry/src, and the default build never builds
        # cudarc. Unpack the .crate (a gzipped tar) ourselves.
        crate=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"cudarc-$cudarc_version.crate" 2>/dev/null | head -n 1)
        [ -n "$crate" ] || die "cudarc $cudarc_version not found under ${CARGO_HOME:-$HOME/.cargo}/registry after cargo fetch"
        mkdir -p "$toolkit.src"
        tar -xzf "$crate" -C "$toolkit.src" || die "unpacking $crate failed"
        src=$toolkit.src/cudarc-$cudarc_version
        [ -d "$src/src/driver/sys" ] || die "$crate has no src/driver/sys: cudarc's layout changed, update this script"
    fi
    # cudarc declares each driver function in an `extern "C"` block as
    # `    fn cuName(...) -> CUresult;` (indented; its wrappers are `pub unsafe fn`).
    mapfile -t symbols < <(grep -rhoE '^[[:space:]]+fn cu[A-Z][A-Za-z0-9_]*\(' "$src/src/driver/sys" |
        sed -E 's/^[[:space:]]+fn //; s/\($//' | sort -u)
    [ ${#symbols[@]} -ge 100 ] || die "found only ${#symbols[@]} driver symbols in $src/src/driver/sys: cudarc's layout changed, update this script"

    need_pip
    command -v cc >/dev/null 2>&1 || die "cc not found: a C compiler is needed for the stub libcuda.so (apt-get install gcc)"
    if [ -e "$toolkit" ] && [ ! -f "$stamp" ] && [ -n "$(ls -A "$toolkit")" ]; then
        die "$toolkit exists but was not made by this script; remove it or set RAFTGEN_CUDA_TOOLKIT"
    fi
    partial=$toolkit.partial
    rm -rf "$partial"
    mkdir -p "$partial"
    say "unpacking ${#wheels[@]} wheels into $toolkit"
    # Python's zipfile, not unzip: it is there whenever pip is, and it keeps the
    # executable bits (nvcc, ptxas, cicc) from each entry's Unix mode.
    "$python" - "$partial/wheels" "${wheels[@]}" <<'EOF' || die "unpacking the wheels failed"
import os, sys, zipfile
dest = sys.argv[1]
for whl in sys.argv[2:]:
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            if not info.filename.startswith("nvidia/"):
                continue  # the .dist-info metadata
            path = z.extract(info, dest)
            mode = (info.external_attr >> 16) & 0o777
            if mode and not info.is_dir():
                os.chmod(path, mode)
EOF
    root=$partial/wheels/nvidia/cu13
    [ -x "$root/bin/nvcc" ] || die "the wheels did not unpack to nvidia/cu13/bin/nvcc (layout changed?)"
    mv "$root" "$partial/cu13"
    rm -rf "$partial/wheels"
    root=$partial/cu13

    # Unversioned names for the linker: libfoo.so -> libfoo.so.13.
    for lib in "$root"/lib/lib*.so.*; do
        [ -f "$lib" ] || continue
        base=$(basename "$lib")
        link=$root/lib/${base%%.so.*}.so
        [ -e "$link" ] || ln -s "$base" "$link"
    done

    # The stub driver library. libcuda.so.1 beside it lets binaries built here
    # start (their cuInit then reports "stub library" and candle gives an error
    # instead of the loader refusing to run them); on a GPU machine the driver's
    # libcuda.so.1 is used, never this directory.
    mkdir -p "$root/lib/stubs"
    {
        echo "/* Generated by tools/cuda-toolkit.sh from cudarc $cudarc_version: not the CUDA driver. */"
        for s in "${symbols[@]}"; do echo "int $s(void) { return $STUB_RESULT; }"; done
    } >"$root/lib/stubs/libcuda.c"
    cc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$root/lib/stubs/libcuda.so" "$root/lib/stubs/libcuda.c" >&2 ||
        die "compiling the stub libcuda.so failed"
    ln -s libcuda.so "$root/lib/stubs/libcuda.so.1"

    # Smoke test: nvcc with its cicc, ptxas and headers compiles a kernel to PTX.
    smoke=$partial/smoke
    mkdir -p "$smoke"
    printf '%s\n' '#include <cuda_fp16.h>' \
        'extern "C" __global__ void axpy(float a, const __half *x, float *y, int n) {' \
        '  int i = blockIdx.x * blockDim.x + threadIdx.x;' \
        '  if (i < n) y[i] += a * __half2float(x[i]);' \
        '}' >"$smoke/axpy.cu"
    ccbin=()
    [ -z "${NVCC_CCBIN:-}" ] || ccbin=(-ccbin "$NVCC_CCBIN")
    if ! PATH=$root/bin:$PATH "$root/bin/nvcc" "${ccbin[@]}" -arch=sm_90 -ptx -o "$smoke/axpy.ptx" "$smoke/axpy.cu" >&2; then
        die "nvcc from the wheels failed to compile a test kernel (if it names an unsupported host compiler, set NVCC_CCBIN to a supported g++)"
    fi
    rm -rf "$smoke"

    echo "$stamp_text" >"$root/.raftgen-cuda-toolkit"
    rm -rf "$toolkit"
    mkdir -p "$(dirname "$toolkit")"
    mv "$root" "$toolkit"
    rm -rf "$partial"
    say "assembled $("$toolkit/bin/nvcc" --version | tail -n 2 | head -n 1) in $toolkit (stub libcuda: ${#symbols[@]} symbols from cudarc $cudarc_version)"
fi

# --- 3. the environment ---------------------------------------------------------
q() { printf '%q' "$1"; }
cat <<EOF
export CUDA_ROOT=$(q "$toolkit")
export CUDA_PATH=$(q "$toolkit")
export CUDA_HOME=$(q "$toolkit")
case ":\$PATH:" in *:$(q "$toolkit/bin"):*) ;; *) export PATH=$(q "$toolkit/bin")\${PATH:+:\$PATH} ;; esac
case ":\${LD_LIBRARY_PATH:-}:" in *:$(q "$toolkit/lib"):*) ;; *) export LD_LIBRARY_PATH=$(q "$toolkit/lib"):$(q "$toolkit/lib/stubs")\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH} ;; esac
export CUDA_COMPUTE_CAP=$(q "${CUDA_COMPUTE_CAP:-90}")
EOF
if [ -n "${NVCC_CCBIN:-}" ]; then
    echo "export NVCC_CCBIN=$(q "$NVCC_CCBIN")"
fi
