#!/usr/bin/env python3
"""Sharded copies of corpus cases, with the standard library only.

Sharding splits a component's tensors over several `*-0000K-of-0000N`
safetensors files under an `*.index.json` that maps each tensor to its file,
as `save_pretrained(max_shard_size=...)` and the hub's large checkpoints do.
The bytes of every tensor are unchanged, so what diffusers computes from a
sharded folder is exactly what it computes from the unsharded one: a derived
case reuses its source case's reference.

    python3 tools/corpus_shards.py     # (re)derive the sharded cases

tools/make_model_corpus.py calls `derive_all()` after building the cases.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "data" / "corpus"


def read_safetensors(path: Path) -> tuple[dict, dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    return header, meta, raw[8 + n :]


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list, bytes]], meta) -> None:
    header, blobs, offset = {}, [], 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if meta is not None:
        header["__metadata__"] = meta
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def shard(src: Path, stem: str, shards: int) -> None:
    """Splits `src` (`<stem>.safetensors`) into `shards` files plus
    `<stem>.safetensors.index.json`, in tensor-name order, and removes it."""
    header, meta, data = read_safetensors(src)
    names = sorted(header)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        part = names[i * per : (i + 1) * per]
        fname = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for name in part:
            h = header[name]
            a, b = h["data_offsets"]
            tensors[name] = (h["dtype"], h["shape"], data[a:b])
            weight_map[name] = fname
            total += b - a
        write_safetensors(src.parent / fname, tensors, meta)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (src.parent / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    src.unlink()


def derive_zimage_base() -> None:
    """Z-Image (the base model, Tongyi-MAI/Z-Image) ships the release layout
    with its transformer in 2 shards and its text encoder in 3, each under an
    index."""
    src, dst = CORPUS / "zimage-release", CORPUS / "zimage-base"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    shard(dst / "model" / "transformer" / "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model", 2)
    shard(dst / "model" / "text_encoder" / "model.safetensors", "model", 3)


def derive_all() -> None:
    derive_zimage_base()


if __name__ == "__main__":
    derive_all()
    print("derived: zimage-base")
