#!/usr/bin/env python3
"""Part (c) of the GPU device check (tools/gpu-check.sh): a 3-node raftgen
cluster on this machine's loopback, jobs submitted through a follower, images
fetched, GPU metrics read; then the images compared across runs.

    gpu_check_cluster.py run --raftgen BIN --models DIR --out DIR --label L [--device cuda] [--dtype auto]
    gpu_check_cluster.py compare --out DIR --reference cpu-f32 LABEL...

`run` starts nodes 1-3 (`--init` / `--join`) with `--models-dir DIR
--no-builtin-model --device D --dtype T`, waits until every node is ready and
a submission is accepted, submits one seeded job per model folder through a
follower, waits for each, saves `OUT/L/<model>.png` and the nodes'
`raftgen_gpu_*` / `raftgen_executor_info` metric lines, and stops the nodes
with SIGTERM. Exit status 1 when a job fails or a node dies.

`compare` reads the PNGs of each LABEL against the reference label and prints,
per model, the largest and mean absolute pixel difference (0-255 scale) and the
normwise relative error max|a-b| / max|b|. Standard library only (PNG decoding
included), so it runs on any python3.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib

SECRET = "raftgen-gpu-check"


def http(method: str, url: str, body: dict | None = None, timeout: float = 10.0):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
        return 0, str(e).encode()


def run(a) -> int:
    out = os.path.join(a.out, a.label)
    os.makedirs(out, exist_ok=True)
    models = sorted(d for d in os.listdir(a.models) if os.path.isfile(os.path.join(a.models, d, "model_index.json")))
    ports = [a.base_port + i for i in (1, 2, 3)]
    procs = []
    t0 = time.time()
    for i, port in enumerate(ports, start=1):
        data = os.path.join(a.data, a.label, f"n{i}")
        os.makedirs(data, exist_ok=True)
        cmd = [a.raftgen, "node", "--id", str(i), "--listen", f"127.0.0.1:{port}", "--data", data,
               "--models-dir", a.models, "--no-builtin-model", "--device", a.device, "--dtype", a.dtype,
               "--cluster-secret", SECRET]
        cmd += ["--init"] if i == 1 else ["--join", f"http://127.0.0.1:{ports[0]}"]
        log = open(os.path.join(out, f"node{i}.log"), "w")
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
    ok = True
    try:
        deadline = time.time() + a.ready_timeout_s
        while time.time() < deadline:
            if any(p.poll() is not None for p in procs):
                print(f"[{a.label}] a node exited during start (see {out}/node*.log)")
                return 1
            if all(http("GET", f"http://127.0.0.1:{p}/readyz", timeout=2)[0] == 200 for p in ports):
                break
            time.sleep(0.2)
        else:
            print(f"[{a.label}] not ready after {a.ready_timeout_s} s")
            return 1
        status, body = http("GET", f"http://127.0.0.1:{ports[0]}/v1/cluster")
        leader = json.loads(body).get("leader_id") if status == 200 else None
        follower = next(p for i, p in enumerate(ports, start=1) if i != leader)
        print(f"[{a.label}] ready in {time.time() - t0:.1f} s; leader {leader}; submitting through :{follower}")
        jobs = {}
        for m in models:
            req = {"prompt": "a red circle on the left on a blue background", "model": m, "seed": 1234,
                   "width": a.size, "height": a.size, "steps": a.steps, "cache": False}
            for _ in range(100):  # 503 (no model registered yet) is transient
                status, body = http("POST", f"http://127.0.0.1:{follower}/v1/jobs", req)
                if status == 202:
                    break
                time.sleep(0.2)
            if status != 202:
                print(f"[{a.label}] {m}: submit answered {status} {body[:300]!r}")
                ok = False
                continue
            jobs[m] = json.loads(body)["id"]
        timings = {}
        for m, jid in jobs.items():
            deadline = time.time() + a.job_timeout_s
            while time.time() < deadline:
                status, body = http("GET", f"http://127.0.0.1:{follower}/v1/jobs/{jid}")
                job = json.loads(body) if status == 200 else {}
                if job.get("state") in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(0.1)
            state = job.get("state")
            if state != "succeeded":
                print(f"[{a.label}] {m}: job {jid} {state}: {job.get('error')}")
                ok = False
                continue
            status, png = http("GET", f"http://127.0.0.1:{follower}/v1/jobs/{jid}/image")
            if status != 200:
                print(f"[{a.label}] {m}: image answered {status}")
                ok = False
                continue
            with open(os.path.join(out, f"{m}.png"), "wb") as f:
                f.write(png)
            run_ms = (job.get("finished_at_ms") or 0) - (job.get("started_at_ms") or 0)
            timings[m] = run_ms
            print(f"[{a.label}] {m}: ok on node {job.get('node')}, attempt {job.get('attempt')}, run {run_ms} ms")
        lines = []
        for i, p in enumerate(ports, start=1):
            status, body = http("GET", f"http://127.0.0.1:{p}/metrics")
            for line in body.decode(errors="replace").splitlines():
                if line.startswith(("raftgen_gpu_", "raftgen_executor_info", "raftgen_model_load")):
                    lines.append(f"node{i} {line}")
        with open(os.path.join(out, "metrics.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
        gpu_lines = [l for l in lines if "raftgen_gpu_" in l]
        print(f"[{a.label}] metrics: {len(gpu_lines)} raftgen_gpu_* samples; e.g. "
              + "; ".join(l for l in lines if "executor_info" in l)[:400])
        with open(os.path.join(out, "jobs.json"), "w") as f:
            json.dump({"jobs": jobs, "run_ms": timings}, f, indent=1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
    return 0 if ok else 1


def read_png(path: str) -> tuple[int, int, int, bytes]:
    """(width, height, channels, raw pixels) of an 8-bit non-interlaced PNG."""
    with open(path, "rb") as f:
        data = f.read()
    pos, idat = 8, b""
    w = h = ctype = None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, ctype = struct.unpack(">IIBB", chunk[:10])
            if depth != 8:
                raise ValueError(f"{path}: bit depth {depth}")
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + n
    ch = {0: 1, 2: 3, 4: 2, 6: 4}[ctype]
    raw = zlib.decompress(idat)
    stride = w * ch
    out, prev = bytearray(), bytearray(stride)
    for y in range(h):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - ch] if x >= ch else 0
            b = prev[x]
            c = prev[x - ch] if x >= ch else 0
            if f == 1:
                line[x] = (line[x] + a) & 255
            elif f == 2:
                line[x] = (line[x] + b) & 255
            elif f == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out += line
        prev = line
    return w, h, ch, bytes(out)


def compare(a) -> int:
    ref_dir = os.path.join(a.out, a.reference)
    models = sorted(f[:-4] for f in os.listdir(ref_dir) if f.endswith(".png"))
    print(f"| run | model | max abs diff (0-255) | mean abs diff | rel. error vs {a.reference} |")
    print("| --- | --- | ---: | ---: | ---: |")
    for label in a.labels:
        for m in models:
            p = os.path.join(a.out, label, f"{m}.png")
            if not os.path.exists(p):
                print(f"| {label} | {m} | missing | | |")
                continue
            w1, h1, c1, x = read_png(p)
            w2, h2, c2, y = read_png(os.path.join(ref_dir, f"{m}.png"))
            if (w1, h1, c1) != (w2, h2, c2):
                print(f"| {label} | {m} | shape {w1}x{h1}x{c1} vs {w2}x{h2}x{c2} | | |")
                continue
            diffs = [abs(u - v) for u, v in zip(x, y)]
            rel = max(diffs) / max(max(y), 1)
            print(f"| {label} | {m} | {max(diffs)} | {sum(diffs) / len(diffs):.3f} | {rel:.2e} |")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--raftgen", required=True)
    r.add_argument("--models", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--data", default="/tmp/raftgen-gpu-check")
    r.add_argument("--label", required=True)
    r.add_argument("--device", default="cuda")
    r.add_argument("--dtype", default="auto")
    r.add_argument("--base-port", type=int, default=7300)
    r.add_argument("--size", type=int, default=64)
    r.add_argument("--steps", type=int, default=4)
    r.add_argument("--ready-timeout-s", type=float, default=60)
    r.add_argument("--job-timeout-s", type=float, default=120)
    c = sub.add_parser("compare")
    c.add_argument("--out", required=True)
    c.add_argument("--reference", required=True)
    c.add_argument("labels", nargs="+")
    a = ap.parse_args()
    return run(a) if a.cmd == "run" else compare(a)


if __name__ == "__main__":
    sys.exit(main())
