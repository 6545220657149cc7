#!/usr/bin/env python3
"""Part (e) of the GPU device check: where one denoising step's GPU time goes,
by category of kernel.

    gpu_profile.py ncu NCU.csv [--title T] [--json OUT.json]

reads the CSV that `ncu --csv --print-units base --metrics
gpu__time_duration.sum` wrote for one step of `bin/gpu-bench` under
`RAFTGEN_GPU_BENCH_PROFILE=1` (tools/gpu-check.sh), sums each kernel's
duration into a category and prints a table (ms, share, launches) and the
costliest kernels. `tools/bench_diffusers.py --profile` uses `classify` for
the PyTorch side, so both sides of the comparison are cut the same way.
Standard library only.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict

# First match wins: our fused kernels, then the library families, then
# candle's and PyTorch's element-wise kernel names.
CATEGORIES = [
    ("fused (ours)", ("group_norm_silu", "geglu", "guided_step", "attention_mma", "attention_f", "attention_bf")),
    ("attention", ("flash", "fmha", "sdpa", "attention", "softmax", "mem_efficient", "cutlass_fmha")),
    ("convolution", ("conv", "im2col", "col2im", "fprop", "dgrad", "wgrad", "winograd", "implicit", "cudnn")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "sm90_", "sm80_", "ampere_", "hopper")),
    ("normalization", ("group_norm", "groupnorm", "layer_norm", "layernorm", "rms_norm", "rmsnorm", "norm")),
    ("copy / layout", ("copy", "ucopy", "cast", "transpose", "cat", "contiguous", "index", "gather", "where", "pad")),
    ("reduction", ("reduce", "fast_sum", "fast_max", "fast_min", "sum_", "max_", "argmax")),
    ("element-wise", ("affine", "badd", "bmul", "bsub", "bdiv", "bmaximum", "usilu", "ugelu", "uexp", "usqrt",
                      "uneg", "urecip", "usqr", "utanh", "usin", "ucos", "elementwise", "silu", "gelu", "add", "mul",
                      "powf", "clamp", "unary", "binary")),
]


def classify(name: str) -> str:
    n = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in n for k in keys):
            return cat
    return "other"


def table(kernels: list[tuple[str, float]], title: str) -> dict:
    """kernels: (name, duration in ms) per launch."""
    total = sum(ms for _, ms in kernels) or 1e-12
    cats: dict[str, list[float]] = defaultdict(list)
    by_name: dict[str, list[float]] = defaultdict(list)
    for name, ms in kernels:
        cats[classify(name)].append(ms)
        by_name[name].append(ms)
    print(f"\n{title}: {len(kernels)} kernel launches, {total:.2f} ms of GPU time")
    print("| category | ms | share | launches |")
    print("| --- | ---: | ---: | ---: |")
    rows = sorted(cats.items(), key=lambda kv: -sum(kv[1]))
    for cat, v in rows:
        print(f"| {cat} | {sum(v):.2f} | {100 * sum(v) / total:.1f}% | {len(v)} |")
    print("top kernels:")
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:12]
    for name, v in top:
        short = name if len(name) <= 110 else name[:107] + "..."
        print(f"  {sum(v):8.2f} ms {len(v):5d}x  [{classify(name)}] {short}")
    return {
        "title": title, "total_ms": total, "launches": len(kernels),
        "categories": {cat: {"ms": sum(v), "launches": len(v)} for cat, v in rows},
        "top": [{"name": n, "ms": sum(v), "launches": len(v)} for n, v in top],
    }


def read_ncu(path: str) -> list[tuple[str, float]]:
    """(kernel name, ms) per launch from ncu's CSV (lines before the header,
    ncu's own messages, are skipped)."""
    with open(path, newline="", errors="replace") as f:
        lines = f.read().splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
    if start is None:
        raise SystemExit(f"{path}: no ncu CSV header found")
    out = []
    for row in csv.DictReader(lines[start:]):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(row["Metric Value"].replace(",", ""))
        unit = row.get("Metric Unit", "nsecond")
        scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "second": 1e3}.get(unit, 1e-6)
        out.append((row["Kernel Name"], value * scale))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    n = sub.add_parser("ncu")
    n.add_argument("csv")
    n.add_argument("--title", default="candle")
    n.add_argument("--json")
    a = ap.parse_args()
    doc = table(read_ncu(a.csv), a.title)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
