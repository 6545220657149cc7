#!/usr/bin/env python3
"""Build tiny random-weight diffusers pipelines and reference tensors for the
Rust parity tests.

Run once, from the repository root, inside the venv described in
tools/README.md:

    python tools/make_tiny_models.py            # regenerate everything
    python tools/make_tiny_models.py --verify   # only re-check what is on disk

It writes (and overwrites):

    models/tiny-sd/          StableDiffusionPipeline   (SD-1.5 layout)
    models/tiny-sdxl/        StableDiffusionXLPipeline (SDXL / SDXL-Turbo layout)
    models/tiny-z-image/     ZImagePipeline            (Z-Image-Turbo layout)
    tests/data/parity/<family>/reference.safetensors + reference.json

Everything is built with diffusers / transformers themselves and saved with
`save_pretrained`; all weights are float32 and drawn from fixed torch seeds, so
a rerun on the same machine reproduces the same bytes.  The reference tensors
are computed by the diffusers pipelines from exactly those weights;
reference.json documents every tensor (shape, dtype, meaning) and the
conventions a re-implementation has to follow.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import diffusers
import tokenizers
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from tokenizers import AddedToken, Regex, decoders, models as tok_models, normalizers
from tokenizers import pre_tokenizers, processors, trainers
from transformers import (
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPTokenizerFast,
    Qwen2Tokenizer,
    Qwen2TokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
)

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
PARITY = ROOT / "tests" / "data" / "parity"
SIZE_LIMIT_BYTES = 20 * 1024 * 1024

# --------------------------------------------------------------------------
# Pinned inputs
# --------------------------------------------------------------------------

EXPECTED_VERSIONS = {
    "torch": "2.9.1",
    "diffusers": "0.36.0",
    "transformers": "4.57.6",
    "tokenizers": "0.22.2",
}

# The CLIP BPE merges ship inside the open-clip-torch wheel (MIT licence).
OPEN_CLIP_VERSION = "3.3.0"
OPEN_CLIP_BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
OPEN_CLIP_BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
CLIP_NUM_MERGES = 1500  # vocab = 256 + 256 + 1500 + 2 = 2014 ids

QWEN_BPE_VOCAB = 1536  # trained byte-level BPE size, before the added tokens

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed, dramatic lighting"
NEGATIVE_PROMPT = "blurry, low quality, watermark"
LONG_PROMPT = (
    "a very detailed oil painting of a quiet harbor town at sunset, with small wooden boats, "
    "seagulls flying over the water, warm orange and pink clouds, reflections on the calm sea, "
    "old stone houses with red roofs, narrow streets, people walking along the pier, lanterns "
    "glowing softly, mountains in the distance covered with snow, a lighthouse on the rocky cliff, "
    "fishing nets drying in the wind, children playing near the fountain, a cat sleeping on a "
    "windowsill, flowers in clay pots, and a bright full moon rising above the hills"
)

SEED_WEIGHTS = {  # one generator per component, so components are independent
    "sd.text_encoder": 1001,
    "sd.unet": 1002,
    "sd.vae": 1003,
    "sdxl.text_encoder": 2001,
    "sdxl.text_encoder_2": 2002,
    "sdxl.unet": 2003,
    "sdxl.vae": 2004,
    "zimage.text_encoder": 3001,
    "zimage.transformer": 3002,
    "zimage.vae": 3003,
}
SEED_NOISE = {"sd": 11, "sdxl": 22, "zimage": 33}
SEED_EULER_A_STEP_NOISE = 2222
SEED_ZIMAGE_EXTRA = 3333
SEED_QWEN_CORPUS = 4242

# Qwen3's chat template (tokenizer_config.json "chat_template" of the Qwen3
# family; verbatim copy as mirrored in llama.cpp models/templates/
# Qwen-Qwen3-0.6B.jinja).  The Z-Image pipeline calls
# apply_chat_template(..., add_generation_prompt=True, enable_thinking=True).
QWEN3_CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- messages[0].content + '\\n\\n' }}\n"
    "    {%- endif %}\n"
    "    {{- \"# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n"
    "{%- for message in messages[::-1] %}\n"
    "    {%- set index = (messages|length - 1) - loop.index0 %}\n"
    "    {%- if ns.multi_step_tool and message.role == \"user\" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}\n"
    "        {%- set ns.multi_step_tool = false %}\n"
    "        {%- set ns.last_query_index = index %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {%- set content = message.content %}\n"
    "        {%- set reasoning_content = '' %}\n"
    "        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}\n"
    "            {%- set reasoning_content = message.reasoning_content %}\n"
    "        {%- else %}\n"
    "            {%- if '</think>' in message.content %}\n"
    "                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}\n"
    "                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}\n"
    "            {%- endif %}\n"
    "        {%- endif %}\n"
    "        {%- if loop.index0 > ns.last_query_index %}\n"
    "            {%- if loop.last or (not loop.last and reasoning_content) %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}\n"
    "            {%- else %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    "            {%- endif %}\n"
    "        {%- else %}\n"
    "            {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    "        {%- endif %}\n"
    "        {%- if message.tool_calls %}\n"
    "            {%- for tool_call in message.tool_calls %}\n"
    "                {%- if (loop.first and content) or (not loop.first) %}\n"
    "                    {{- '\\n' }}\n"
    "                {%- endif %}\n"
    "                {%- if tool_call.function %}\n"
    "                    {%- set tool_call = tool_call.function %}\n"
    "                {%- endif %}\n"
    "                {{- '<tool_call>\\n{\"name\": \"' }}\n"
    "                {{- tool_call.name }}\n"
    "                {{- '\", \"arguments\": ' }}\n"
    "                {%- if tool_call.arguments is string %}\n"
    "                    {{- tool_call.arguments }}\n"
    "                {%- else %}\n"
    "                    {{- tool_call.arguments | tojson }}\n"
    "                {%- endif %}\n"
    "                {{- '}\\n</tool_call>' }}\n"
    "            {%- endfor %}\n"
    "        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if loop.first or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}"
)

# Qwen2/Qwen3 pre-tokenizer split regex (tokenizer.json of the Qwen2/3 family).
QWEN_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3's added tokens, in Qwen3's id order (151643..151668 there), and whether
# each is "special".
QWEN3_ADDED_TOKENS = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
]


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, flush=True)


def check_versions() -> None:
    found = {
        "torch": torch.__version__.split("+")[0],
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
    bad = {k: (found[k], v) for k, v in EXPECTED_VERSIONS.items() if found[k] != v}
    if bad:
        msg = ", ".join(f"{k} {f} (pinned {p})" for k, (f, p) in bad.items())
        raise SystemExit(f"version mismatch: {msg}; install tools/requirements.txt")


def setup_torch() -> None:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_grad_enabled(False)


@torch.no_grad()
def reinit_parameters(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with seeded values, independent of how the
    module initialises itself (some diffusers parameters are torch.empty, some
    zero-initialised, which would make parity tests weak or nondeterministic).

    * matrices / conv kernels: N(0, 1/fan_in)
    * 1-D "weight" (norm scales): 1 + N(0, 0.1^2)    (non-trivial on purpose)
    * biases and other 1-D params: N(0, 0.05^2)
    * Z-Image pad tokens ([1, dim]): N(0, 0.5^2)
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        shape = p.shape
        if name.endswith("pad_token"):
            val = torch.randn(shape, generator=gen) * 0.5
        elif p.dim() >= 2:
            fan_in = int(np.prod(shape[1:]))
            val = torch.randn(shape, generator=gen) / float(np.sqrt(fan_in))
        elif name.endswith("weight"):
            val = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            val = 0.05 * torch.randn(shape, generator=gen)
        p.copy_(val.to(p.dtype))


def randn(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def assert_close(name: str, a: torch.Tensor, b: torch.Tensor, atol: float = 0.0) -> None:
    a = a.detach().float().cpu()
    b = b.detach().float().cpu()
    if a.shape != b.shape:
        raise AssertionError(f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}")
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    if not diff <= atol:
        raise AssertionError(f"{name}: max abs diff {diff} > {atol}")


def tensor_stats(t: torch.Tensor) -> dict:
    t = t.detach().float()
    return {
        "min": round(t.min().item(), 6),
        "max": round(t.max().item(), 6),
        "mean": round(t.mean().item(), 6),
        "std": round(t.std().item(), 6) if t.numel() > 1 else 0.0,
    }


class RefWriter:
    """Collects reference tensors with their documentation."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.docs: dict[str, dict] = {}

    def add(self, name: str, t, meaning: str, dtype: torch.dtype = torch.float32) -> None:
        if name in self.tensors:
            raise KeyError(f"duplicate reference tensor {name}")
        if not isinstance(t, torch.Tensor):
            t = torch.tensor(t)
        t = t.detach().cpu().to(dtype).contiguous()
        self.tensors[name] = t
        doc = {"shape": list(t.shape), "dtype": str(dtype).replace("torch.", ""), "meaning": meaning}
        if dtype == torch.float32 and t.numel() > 0:
            doc["stats"] = tensor_stats(t)
        self.docs[name] = doc

    def write(self, out_dir: Path, meta: dict) -> None:
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        save_file(self.tensors, str(out_dir / "reference.safetensors"), metadata={"format": "pt"})
        meta = dict(meta)
        meta["tensors"] = self.docs
        (out_dir / "reference.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode table (same as open_clip and HF)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def load_open_clip_merges(cache_dir: Path) -> list[tuple[str, str]]:
    """Read CLIP's BPE merge list from the open-clip-torch wheel (downloaded
    with `pip download`, never installed)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache_dir.glob(f"open_clip_torch-{OPEN_CLIP_VERSION}-*.whl"))
    if not wheels:
        log(f"downloading open-clip-torch=={OPEN_CLIP_VERSION} wheel (for its BPE vocabulary) ...")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             f"open-clip-torch=={OPEN_CLIP_VERSION}", "-d", str(cache_dir)],
            check=True,
        )
        wheels = sorted(cache_dir.glob(f"open_clip_torch-{OPEN_CLIP_VERSION}-*.whl"))
    with zipfile.ZipFile(wheels[0]) as zf:
        raw = zf.read(OPEN_CLIP_BPE_MEMBER)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != OPEN_CLIP_BPE_SHA256:
        raise SystemExit(f"unexpected sha256 of {OPEN_CLIP_BPE_MEMBER}: {digest}")
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    # Same slicing as open_clip's SimpleTokenizer and HF's CLIPTokenizer: the
    # first line is a header, then 49152-256-2 merges.
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    assert all(len(m) == 2 for m in merges)
    return merges


def write_truncated_clip_vocab(out_dir: Path, merges: list[tuple[str, str]], k: int) -> dict[str, int]:
    """CLIP's vocabulary is: 256 byte symbols, the same 256 with '</w>', one
    token per merge (in merge order), '<|startoftext|>', '<|endoftext|>'.
    Keeping the first k merges is therefore a self-consistent BPE."""
    merges = merges[:k]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    known = set(vocab)
    for a, b in merges:
        assert a in known and b in known, f"merge ({a}, {b}) uses an unknown symbol"
        vocab.append(a + b)
        known.add(a + b)
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    assert len(vocab) == len(set(vocab)), "duplicate token in truncated CLIP vocab"
    encoder = {tok: i for i, tok in enumerate(vocab)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return encoder


def make_clip_tokenizer(vocab_dir: Path, pad_token: str) -> CLIPTokenizer:
    tok = CLIPTokenizer(
        vocab_file=str(vocab_dir / "vocab.json"),
        merges_file=str(vocab_dir / "merges.txt"),
        errors="replace",
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token=pad_token,
        model_max_length=77,
    )
    return tok


def add_fast_clip_tokenizer_json(tok_dir: Path, prompts: list[str]) -> None:
    """Write tokenizer.json (HF `tokenizers` format, for the Rust side) next to
    the slow CLIPTokenizer files, and check slow == fast on the prompts."""
    slow = CLIPTokenizer.from_pretrained(tok_dir)
    fast = CLIPTokenizerFast.from_pretrained(tok_dir, from_slow=True)
    for p in prompts + ["wow! a cat!!"]:
        for kw in ({}, {"padding": "max_length", "max_length": 77, "truncation": True}):
            a = slow(p, **kw).input_ids
            b = fast(p, **kw).input_ids
            assert a == b, f"slow/fast CLIP tokenizer mismatch on {p!r} {kw}: {a} vs {b}"
    with tempfile.TemporaryDirectory() as tmp:
        fast.save_pretrained(tmp)
        raw = tokenizers.Tokenizer.from_file(str(Path(tmp) / "tokenizer.json"))
    # Make the saved tokenizer.json reproduce the pipeline's input_ids on its
    # own: pad to 77 with the pad token, truncate to 77 (special tokens kept).
    raw.no_padding()
    raw.no_truncation()
    raw.enable_truncation(max_length=77, strategy="longest_first", direction="right")
    raw.enable_padding(direction="right", pad_id=slow.pad_token_id, pad_type_id=0, pad_token=slow.pad_token,
                       length=77)
    raw.save(str(tok_dir / "tokenizer.json"))
    check = tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    for p in prompts + ["wow! a cat!!"]:
        want = slow(p, padding="max_length", max_length=77, truncation=True).input_ids
        got = check.encode(p).ids
        assert got == want, f"tokenizer.json mismatch on {p!r}: {got} vs {want}"


def qwen_corpus(seed: int) -> list[str]:
    """1500 varied image prompts, generated deterministically."""
    rng = random.Random(seed)
    subjects = [
        "an astronaut", "a horse", "a red fox", "a small cat", "an old man", "a young woman", "a dragon",
        "a robot", "a lighthouse", "a castle", "a sailing ship", "a bowl of fruit", "a mountain village",
        "a city street", "a forest cabin", "a steam train", "a hot air balloon", "a koi pond", "a violin",
        "a vintage car", "a bicycle", "a white owl", "a tiger", "a penguin", "a giant tree", "a waterfall",
        "a desert oasis", "a snowy peak", "a neon sign", "a cup of coffee", "a stack of books",
        "a portrait of a knight", "a field of sunflowers", "a glass bottle", "a wooden bridge",
        "a space station", "the moon", "a harbor town", "a market square", "a garden", "a temple",
    ]
    actions = [
        "riding", "standing next to", "floating above", "sleeping under", "walking through", "reflected in",
        "painted on", "hiding behind", "flying over", "sitting on", "surrounded by", "looking at",
    ]
    places = [
        "on the moon", "in a misty forest", "at sunset", "under a starry sky", "in the rain",
        "on a quiet beach", "in a busy market", "inside a cathedral", "on a frozen lake", "in the desert",
        "above the clouds", "near a river", "in a snowy village", "at dawn", "in an abandoned factory",
        "on a rooftop", "in a field of flowers", "at night", "in deep space", "under the sea",
    ]
    styles = [
        "highly detailed", "dramatic lighting", "oil painting", "watercolor", "photograph", "digital art",
        "cinematic", "studio lighting", "soft focus", "wide angle", "35mm film", "ultra realistic",
        "pencil sketch", "anime style", "concept art", "low poly", "vivid colors", "black and white",
        "golden hour", "bokeh", "8k", "trending on artstation", "isometric", "minimalist", "baroque",
        "impressionist", "matte painting", "long exposure", "macro shot", "portrait", "landscape",
    ]
    extras = [
        "blurry", "low quality", "watermark", "jpeg artifacts", "deformed", "extra fingers", "text",
        "signature", "cropped", "worst quality", "overexposed", "noisy",
    ]
    chinese = ["一只猫", "山水画", "夜晚的城市", "红色的灯笼", "雪山", "高清", "写实风格"]
    adjectives = (
        "ancient beautiful bright broken calm colorful cozy crowded dark delicate dusty elegant empty enormous "
        "fantastic fierce fluffy foggy fragile frozen gentle giant glowing golden gorgeous graceful haunted heavy "
        "hidden huge icy intricate lonely lush magical majestic massive mechanical mysterious narrow noble ornate "
        "peaceful polished quiet rainy rusty sacred serene shiny silent silver sleepy smoky soft sparkling stormy "
        "strange sunny surreal tall tiny translucent tropical twisted vast velvet vibrant vintage warm weathered "
        "wild windy wooden young"
    ).split()
    nouns = (
        "apple armor balcony banner barn basket beach bear bell bird boat book bottle bridge butterfly cabin "
        "candle canyon carpet castle cave chair city clock cloud coast crown crystal deer desert door dragon "
        "eagle engine feather fence field flower forest fountain garden gate glacier guitar hammer harbor hat "
        "helmet hill horse island jungle key kitchen knight lake lamp lantern library lion machine map market "
        "meadow mirror monastery monster mountain mushroom ocean orchard owl painting palace path piano pier "
        "planet pond portrait puppy queen rabbit river road robot rock rose sailor scarf sculpture shadow shelf "
        "shore sky skyline spaceship staircase star statue storm street sword table teapot telescope temple "
        "tower train tree tunnel umbrella valley village violin volcano wagon wall waterfall whale window wizard "
        "wolf"
    ).split()
    colors = "red orange yellow green blue purple pink brown black white gray teal amber crimson emerald".split()
    materials = "glass stone marble paper clay steel bronze copper silk wool ice porcelain".split()
    lighting = (
        "rim light, volumetric light, backlit, candlelight, moonlight, neon glow, overcast, harsh shadows, "
        "soft light, sunbeams, twilight, blue hour"
    ).split(", ")
    camera = (
        "close-up, aerial view, low angle, top-down view, telephoto lens, fisheye, tilt-shift, depth of field, "
        "f/1.8, 85mm, shallow focus, motion blur"
    ).split(", ")
    out = []
    for i in range(1500):
        s = rng.choice(subjects)
        if rng.random() < 0.5:
            s = f"a {rng.choice(adjectives)} {rng.choice(colors)} {rng.choice(nouns)}"
        parts = [s]
        if rng.random() < 0.7:
            parts.append(f"{rng.choice(actions)} {rng.choice(subjects)}")
        if rng.random() < 0.5:
            parts.append(f"made of {rng.choice(materials)}")
        if rng.random() < 0.5:
            parts.append(f"with a {rng.choice(adjectives)} {rng.choice(nouns)}")
        parts.append(rng.choice(places))
        text = " ".join(parts)
        tags = rng.sample(styles, rng.randint(1, 4))
        if rng.random() < 0.5:
            tags.append(rng.choice(lighting))
        if rng.random() < 0.5:
            tags.append(rng.choice(camera))
        text = ", ".join([text] + tags)
        if rng.random() < 0.3:
            text = text[0].upper() + text[1:] + "."
        if rng.random() < 0.15:
            text += " " + ", ".join(rng.sample(extras, 3))
        if rng.random() < 0.1:
            text += " " + rng.choice(chinese)
        if rng.random() < 0.1:
            text += f" {rng.randint(1, 2048)}x{rng.randint(1, 2048)} seed {rng.randint(0, 99999)}"
        if rng.random() < 0.1:
            text = f"user: {text}\nassistant: ok"
        out.append(text)
    # make sure the reference prompts are representable with reasonable merges
    out += [PROMPT, NEGATIVE_PROMPT, LONG_PROMPT, "user", "assistant", "system"]
    return out


def build_qwen_tokenizer(out_dir: Path) -> Qwen2TokenizerFast:
    corpus = qwen_corpus(SEED_QWEN_CORPUS)
    tok = tokenizers.Tokenizer(tok_models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=QWEN_BPE_VOCAB,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    base_size = tok.get_vocab_size()
    for text, special in QWEN3_ADDED_TOKENS:
        at = AddedToken(text, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        if special:
            tok.add_special_tokens([at])
        else:
            tok.add_tokens([at])
    assert tok.get_vocab_size() == base_size + len(QWEN3_ADDED_TOKENS)
    fast = Qwen2TokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        unk_token=None,
        pad_token="<|endoftext|>",
        errors="replace",
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    fast.chat_template = QWEN3_CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


# --------------------------------------------------------------------------
# Model configs (tiny, same structure as the real checkpoints)
# --------------------------------------------------------------------------


def clip_text_config(vocab_size: int, hidden: int, heads: int, act: str, projection_dim: int) -> CLIPTextConfig:
    # bos/eos/pad ids 0/2/1 are the (legacy) values in the real SD-1.5 and
    # SDXL text-encoder configs; with eos_token_id == 2 transformers pools at
    # argmax(input_ids), i.e. the first <|endoftext|> (the largest id).
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        projection_dim=projection_dim,
        num_hidden_layers=3,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
        dropout=0.0,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        torch_dtype="float32",
    )


def sd_vae(scaling_factor: float, latent_channels: int = 4, shift_factor=None, force_upcast=True,
           use_quant_conv=True) -> AutoencoderKL:
    kwargs = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        act_fn="silu",
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
        use_quant_conv=use_quant_conv,
        use_post_quant_conv=use_quant_conv,
        mid_block_add_attention=True,
    )
    if shift_factor is not None:
        kwargs["shift_factor"] = shift_factor
    return AutoencoderKL(**kwargs)


SD15_SCHEDULER = dict(  # SD-1.5 scheduler_config.json values (shipped there for PNDM), used with DDIM
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    trained_betas=None,
    clip_sample=False,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)

SDXL_TURBO_SCHEDULER = dict(  # stabilityai/sdxl-turbo scheduler/scheduler_config.json
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    trained_betas=None,
    prediction_type="epsilon",
    interpolation_type="linear",
    use_karras_sigmas=False,
    timestep_spacing="trailing",
    steps_offset=1,
    # keys the real file carries for other schedulers; DDIMScheduler.from_config() picks them up
    clip_sample=False,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    sample_max_value=1.0,
)

ZIMAGE_TURBO_SCHEDULER = dict(  # Tongyi-MAI/Z-Image-Turbo scheduler/scheduler_config.json
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=False,
)


# --------------------------------------------------------------------------
# Conventions written into reference.json ("conventions"), for the Rust side
# --------------------------------------------------------------------------

SD_NOTES = [
    "Tokenizer: CLIP BPE (lower-cased, whitespace collapsed); ids = [<|startoftext|>] + tokens + [<|endoftext|>], "
    "truncated to 77 keeping both specials (bos + first 75 tokens + eos), right-padded to 77 with the pad token "
    "(<|endoftext|> = 2013 here, 49407 in real CLIP). models/*/tokenizer*/tokenizer.json has this padding and "
    "truncation built in.",
    "Text encoder (SD-1.5): prompt_embeds = CLIPTextModel(input_ids).last_hidden_state, i.e. AFTER final_layer_norm; "
    "causal mask only, no padding mask; position ids 0..76; quick_gelu; LayerNorm eps 1e-5.",
    "Negative prompt is tokenized/encoded exactly like the prompt (same 77 padding). UNet batch = cat([uncond, cond]).",
    "UNet config: attention_head_dim is the NUMBER of heads (diffusers legacy naming); head size = channels / heads. "
    "use_linear_projection=false -> proj_in/proj_out are 1x1 convs. time_proj: sinusoidal, flip_sin_to_cos=true "
    "(=[cos, sin]), freq_shift=0, dim = block_out_channels[0]; time_embedding: Linear -> SiLU -> Linear to "
    "4*block_out_channels[0].",
    "DDIM (eta 0): betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2, alphas_cumprod = cumprod(1 - betas); "
    "'leading' spacing: t = arange(0, n) * (1000 // n), reversed, + steps_offset(1) -> [751, 501, 251, 1]; "
    "prev_t = t - 1000 // n; a_prev = alphas_cumprod[prev_t] if prev_t >= 0 else alphas_cumprod[0] "
    "(set_alpha_to_one=false); x0 = (x - sqrt(1-a_t) eps) / sqrt(a_t); x_prev = sqrt(a_prev) x0 + sqrt(1-a_prev) eps; "
    "no clipping. init_noise_sigma = 1, scale_model_input = identity.",
    "VAE: image = vae.decode(latents / scaling_factor) (post_quant_conv present, no shift); "
    "output image = (decoded * 0.5 + 0.5).clamp(0, 1), NCHW -> HWC.",
    "The transformer feed-forward is GEGLU with EXACT (erf) gelu. candle-transformers 0.11.1's SD UNet uses the tanh "
    "approximation there: with this UNet (norm_num_groups 32, loadable by unmodified candle) it gives step0_noise_pred "
    "within ~3e-4 abs; with gelu_erf it matches to ~3e-6.",
]

SDXL_NOTES = [
    "Two tokenizers on the same prompt (prompt_2 defaults to prompt): tokenizer pads with <|endoftext|>, tokenizer_2 "
    "pads with '!' (id 0). Quirk kept from real SDXL: '!' is a registered special token of tokenizer_2, so a '!' "
    "inside a prompt also becomes id 0 there (tokenizer 1 gives '!</w>').",
    "prompt_embeds = cat([te1.hidden_states[-2], te2.hidden_states[-2]], -1): hidden_states = (embeddings, layer_0, "
    "..., layer_{n-1}), so [-2] is the raw output of encoder layer n-2 (the penultimate layer), WITHOUT "
    "final_layer_norm, for BOTH encoders (clip_skip=None).",
    "pooled_prompt_embeds = te2.text_embeds = text_projection(final_layer_norm(last layer output)[argmax(input_ids_2)]) "
    "(text_projection has no bias). argmax(ids) is the first <|endoftext|> because it has the largest id; "
    "te1's pooled output is not used. te2 uses exact (erf) gelu, te1 quick_gelu.",
    "Negative prompt given as a string -> encoded the same way. (Only when negative_prompt is None and "
    "force_zeros_for_empty_prompt is true does the pipeline use zeros for negative embeds and pooled.)",
    "add_time_ids = original_size + crops_coords_top_left + target_size = [h, w, 0, 0, h, w] as float; the negative "
    "row is identical; UNet batch order [uncond, cond] for sample, encoder_hidden_states, text_embeds and time_ids.",
    "UNet added conditioning (addition_embed_type 'text_time'): time_embeds = sinusoid(time_ids.flatten(), "
    "dim=addition_time_embed_dim, flip_sin_to_cos=true, freq_shift=0).reshape(B, 6*dim); add_embeds = "
    "cat([text_embeds, time_embeds], -1) (text FIRST); aug_emb = add_embedding(add_embeds) (Linear -> SiLU -> "
    "Linear); emb = time_embedding(time_proj(t)) + aug_emb. candle-transformers 0.11.1's UNet2DConditionModel "
    "has no add_embedding at all (it ignores these weights), so it cannot match this UNet.",
    "UNet: attention_head_dim per block = number of heads; transformer_layers_per_block per block (mid block uses "
    "the last value); use_linear_projection=true (proj_in/out are Linear); block 0 has no attention; "
    "norm_num_groups=32 everywhere with 64 channels (candle 0.11.1's DownBlock2D/UpBlock2D ignore resnet_groups and use 32).",
    "Reference run uses DDIMScheduler.from_config(SDXL-Turbo config): 'trailing' spacing: t = round(arange(1000, 0, "
    "-1000/n)) - 1 = [999, 749, 499, 249]; prev_t = t - 1000 // n (negative -> alphas_cumprod[0]); eta 0.",
    "EulerAncestral (shipped, 'trailing'): timesteps as above (float); sigmas = interp(timesteps, arange(1000), "
    "sqrt((1 - ac) / ac)) + [0]; init_noise_sigma = max(sigmas) (trailing/linspace); model input = "
    "sample / sqrt(sigma^2 + 1); the UNet gets the float timestep. step: see euler_a_step.formula; the noise is "
    "torch.randn(shape) from the generator (recorded in euler_a_noise).",
    "VAE: decode(latents / 0.13025) (force_upcast false; no latents_mean/std).",
]

ZIMAGE_NOTES = [
    "Prompt text = '<|im_start|>user\\n' + prompt + '<|im_end|>\\n<|im_start|>assistant\\n' (Qwen3 chat template, "
    "add_generation_prompt=True, enable_thinking=True -> no <think> block). Tokenized with the special tokens "
    "recognised, no BOS/EOS added, right-padded with <|endoftext|> to max_sequence_length=512, truncation at 512.",
    "Text encoder: Qwen3Model(input_ids, attention_mask).hidden_states[-2] = raw output of decoder layer "
    "num_hidden_layers-2 (no final RMSNorm), then only rows with attention_mask==1 are kept -> [L, hidden] per "
    "prompt (padding dropped). Equal (1e-5) to running the unpadded ids with a plain causal mask, which is what "
    "candle's ZImageTextEncoder does. Weight keys are 'model.*' (saved from Qwen3ForCausalLM, tied embeddings).",
    "CFG (diffusers 0.36): enabled iff guidance_scale > 1; transformer batch = [cond, uncond]; pred = pos + "
    "guidance_scale * (pos - neg)  (NOT neg + g*(pos-neg)); cfg_truncation 1.0 / cfg_normalization off; "
    "scheduler model_output = -pred. With guidance 0 the transformer runs on the cond prompt only.",
    "Timestep: the transformer receives t = (1000 - timesteps[i]) / 1000 = 1 - sigma_i (0 = pure noise, 1 = clean), "
    "and multiplies it by t_scale=1000 before the sinusoidal embedding ([cos, sin], 128 freqs exp(-ln(1e4) k/128)).",
    "Scheduler (FlowMatchEulerDiscrete, shift 3, use_dynamic_shifting false): the pipeline sets sigma_min = 0; "
    "s = linspace(1, 0, n); s = shift*s / (1 + (shift-1)*s); timesteps = s*1000; sigmas = s ++ [0]; "
    "step: x_next = x + (sigma_{i+1} - sigma_i) * model_output (f32). mu is computed but unused. With n steps the "
    "last step goes 0 -> 0 (a no-op that still runs the transformer), as in diffusers 0.36.",
    "Transformer input per sample: latents [C, F=1, H, W]; patchify: view(C, F, 1, H/2, 2, W/2, 2).permute(1,3,5,2,4,6,0)"
    " -> [(F H/2 W/2), (1*2*2*C)] (channel fastest inside a patch); unpatchify is the inverse.",
    "Sequence padding (diffusers; candle 0.11.1 does NOT do this): caption length L is padded to a multiple of 32 by "
    "repeating the LAST caption row; after cap_embedder (RMSNorm + Linear) the padded rows are REPLACED by "
    "cap_pad_token. Image tokens N likewise (repeat last patch, then x_pad_token after x_embedder). The padded "
    "rows are NOT masked: they take part in attention as real tokens.",
    "RoPE position ids: caption token i -> (1 + i, 0, 0) for i < L_pad (padding continues the count); image token "
    "(f, h, w) -> (L_pad + 1 + f, h, w); image pad tokens -> (0, 0, 0). Per axis d: inv_freq = 1/256^(arange(0,d,2)/d)"
    " (computed in float64), angles = pos * inv_freq, axes concatenated along the pair index [d0/2 | d1/2 | d2/2]; "
    "rotation on interleaved pairs (x[2k], x[2k+1]).",
    "Order: noise_refiner (image tokens, adaLN-modulated), context_refiner (caption tokens, no modulation), then "
    "unified = cat([image tokens incl. pad, caption tokens incl. pad]) through the main layers, final layer on all, "
    "keep the first N (unpadded) image tokens. When cond/uncond have different padded lengths, diffusers pads the "
    "batch with zeros and masks that batch padding, which is equivalent to running each sample alone.",
    "Block: (scale_msa, gate_msa, scale_mlp, gate_mlp) = Linear(min(dim,256) -> 4 dim)(adaln).chunk(4); "
    "x += tanh(gate_msa) * attention_norm2(attn(attention_norm1(x) * (1 + scale_msa))); "
    "x += tanh(gate_mlp) * ffn_norm2(ffn(ffn_norm1(x) * (1 + scale_mlp))); refiner blocks without modulation drop "
    "the scales/gates. Attention: q,k RMSNorm over head_dim (eps 1e-5), RoPE, SDPA with scale 1/sqrt(head_dim). "
    "FFN: w2(silu(w1 x) * w3 x), hidden = int(dim/3*8). Final layer: LayerNorm(no affine, eps 1e-6)(x) * "
    "(1 + Linear(SiLU(adaln))) -> Linear.",
    "VAE (Flux-style, no quant/post_quant conv): decode(latents / 0.3611 + 0.1159); image = (decoded*0.5+0.5).clamp(0,1).",
]


# --------------------------------------------------------------------------
# Capture helpers
# --------------------------------------------------------------------------


class CallCapture:
    """Records args/kwargs/output of each forward call of a module."""

    def __init__(self, module: torch.nn.Module):
        self.calls: list[dict] = []
        self._pre = module.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        self._post = module.register_forward_hook(self._post_hook, with_kwargs=True)

    def _pre_hook(self, module, args, kwargs):
        self.calls.append({"args": args, "kwargs": dict(kwargs)})

    def _post_hook(self, module, args, kwargs, output):
        self.calls[-1]["output"] = output

    def remove(self) -> None:
        self._pre.remove()
        self._post.remove()


class LatentsCapture:
    def __init__(self) -> None:
        self.latents: list[torch.Tensor] = []
        self.timesteps: list = []

    def __call__(self, pipe, i, t, kwargs):
        self.latents.append(kwargs["latents"].detach().clone())
        self.timesteps.append(t)
        return {}


def image_from_decoded(decoded: torch.Tensor) -> torch.Tensor:
    """VaeImageProcessor.postprocess(output_type='np') for one image."""
    return (decoded * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)[0]


# --------------------------------------------------------------------------
# Tiny Stable Diffusion 1.5
# --------------------------------------------------------------------------


def build_sd(clip_vocab_dir: Path, vocab_size: int) -> StableDiffusionPipeline:
    te = CLIPTextModel(clip_text_config(vocab_size, hidden=32, heads=4, act="quick_gelu", projection_dim=32))
    reinit_parameters(te, SEED_WEIGHTS["sd.text_encoder"])
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        center_input_sample=False,
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        only_cross_attention=False,
        block_out_channels=(32, 64),
        layers_per_block=1,
        downsample_padding=1,
        mid_block_scale_factor=1,
        act_fn="silu",
        # 32 groups like the real SD-1.5 UNet: candle-transformers 0.11.1's DownBlock2D/UpBlock2D ignore
        # resnet_groups and always build GroupNorm(32, C), so only 32 lets unmodified candle run this UNet.
        # Caveat: with 32 channels (1 channel per group) GroupNorm removes the per-channel time-embedding
        # shift, so the timestep only acts through the 64-channel DownBlock2D / mid / UpBlock2D.
        norm_num_groups=32,
        norm_eps=1e-5,
        cross_attention_dim=32,
        attention_head_dim=4,  # SD-1.5 legacy naming: this is the NUMBER of heads (8 in SD-1.5)
        use_linear_projection=False,
        upcast_attention=False,
    )
    reinit_parameters(unet, SEED_WEIGHTS["sd.unet"])
    vae = sd_vae(scaling_factor=0.18215)
    reinit_parameters(vae, SEED_WEIGHTS["sd.vae"])
    scheduler = DDIMScheduler.from_config(SD15_SCHEDULER)
    tokenizer = make_clip_tokenizer(clip_vocab_dir, pad_token="<|endoftext|>")
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


SD_RUN = dict(height=64, width=64, num_inference_steps=4, guidance_scale=7.5, eta=0.0)


def run_sd(pipe: StableDiffusionPipeline, init_noise: torch.Tensor):
    cap = CallCapture(pipe.unet)
    cap.time_emb = CallCapture(pipe.unet.time_embedding)
    lat = LatentsCapture()
    out = pipe(
        prompt=PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        latents=init_noise.clone(),
        output_type="np",
        callback_on_step_end=lat,
        callback_on_step_end_tensor_inputs=["latents"],
        **SD_RUN,
    )
    cap.remove()
    cap.time_emb.remove()
    return out.images, cap, lat


def make_sd_reference(pipe: StableDiffusionPipeline) -> tuple[RefWriter, dict]:
    ref = RefWriter()
    tok = pipe.tokenizer
    te = pipe.text_encoder

    def ids(text):
        return tok(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

    input_ids = ids(PROMPT)
    neg_ids = ids(NEGATIVE_PROMPT)
    long_ids = ids(LONG_PROMPT)
    long_untrunc = tok(LONG_PROMPT, return_tensors="pt").input_ids
    assert long_untrunc.shape[1] > 77, "LONG_PROMPT must exceed 77 tokens"

    init_noise = randn((1, 4, 8, 8), SEED_NOISE["sd"])
    image, cap, lat = run_sd(pipe, init_noise)

    timesteps = pipe.scheduler.timesteps.clone()
    c0 = cap.calls[0]
    unet_in = c0["args"][0]
    t0 = c0["args"][1]
    ehs = c0["kwargs"]["encoder_hidden_states"]
    noise_pred0 = c0["output"][0]

    # prompt embeds exactly as the pipeline computes them: last_hidden_state
    # (final_layer_norm applied), no attention mask.
    pe = te(input_ids)[0]
    npe = te(neg_ids)[0]
    assert_close("sd encoder_hidden_states", ehs, torch.cat([npe, pe]))

    final_latents = lat.latents[-1]
    sf = pipe.vae.config.scaling_factor
    decoded = pipe.vae.decode(final_latents / sf).sample
    image_t = torch.from_numpy(image[0])
    assert_close("sd image vs decoded", image_t, image_from_decoded(decoded))

    # step 0 by hand: CFG + DDIM step, to pin the formula
    g = SD_RUN["guidance_scale"]
    uncond, cond = noise_pred0.chunk(2)
    guided = uncond + g * (cond - uncond)
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(SD_RUN["num_inference_steps"])
    step0 = sched.step(guided, timesteps[0], init_noise, eta=0.0).prev_sample
    assert_close("sd step0 latents", step0, lat.latents[0], atol=0.0)

    I64 = torch.int64
    ref.add("input_ids", input_ids, "CLIP token ids of `prompt`, padded with <|endoftext|> to 77, [1,77]", I64)
    ref.add("negative_input_ids", neg_ids, "token ids of `negative_prompt`, same padding, [1,77]", I64)
    ref.add("long_input_ids", long_ids,
            "token ids of `long_prompt` with truncation=True, max_length=77: <|startoftext|> + first 75 "
            "content tokens + <|endoftext|> (no padding needed)", I64)
    ref.add("long_untruncated_input_ids", long_untrunc,
            "token ids of `long_prompt` without truncation/padding (for the truncation test)", I64)
    ref.add("prompt_embeds", pe, "text_encoder(input_ids).last_hidden_state (final_layer_norm applied), "
            "no attention mask; [1,77,32]")
    ref.add("negative_prompt_embeds", npe, "same for negative_input_ids")
    ref.add("init_noise", init_noise, "latents passed as `latents=` (DDIM init_noise_sigma is 1.0, so this is "
            "also the step-0 sample); torch.randn([1,4,8,8]) with Generator().manual_seed(11)")
    ref.add("timesteps", timesteps, "scheduler.timesteps for the run (DDIM, 4 steps, 'leading' + steps_offset 1)", I64)
    ref.add("step0_unet_input", unet_in, "sample given to the UNet at step 0: cat([latents, latents]) "
            "(order [uncond, cond]); DDIM scale_model_input is identity")
    ref.add("step0_timestep", t0.reshape(1), "timestep value given to the UNet at step 0 (scalar, broadcast over "
            "the batch)", I64)
    ref.add("step0_time_emb", cap.time_emb.calls[0]["output"], "UNet time_embedding(time_proj(t)) at step 0 "
            "(linear_1 -> silu -> linear_2), [2, 4*block_out_channels[0]] = [2,128]")
    ref.add("step0_noise_pred", noise_pred0, "raw UNet output at step 0, [2,4,8,8], rows [uncond, cond]")
    ref.add("step0_guided_noise_pred", guided, "uncond + guidance_scale * (cond - uncond) at step 0")
    ref.add("step0_latents", lat.latents[0], "latents after CFG + DDIM step 0 (eta 0)")
    ref.add("all_step_latents", torch.cat(lat.latents), "latents after each of the 4 steps, [4,4,8,8]")
    ref.add("final_latents", final_latents, "latents after the last step, before the VAE")
    ref.add("decoded", decoded, "vae.decode(final_latents / 0.18215).sample, raw ([-1,1]-ish, not clamped), [1,3,64,64]")
    ref.add("image", image_t, "pipeline output, output_type='np': (decoded*0.5+0.5).clamp(0,1) as [H,W,3]")

    meta = {
        "family": "tiny-sd",
        "model_dir": "models/tiny-sd",
        "pipeline": "StableDiffusionPipeline",
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE_PROMPT,
        "long_prompt": LONG_PROMPT,
        **SD_RUN,
        "scheduler": {"class": "DDIMScheduler", "config": "models/tiny-sd/scheduler/scheduler_config.json",
                      "eta": 0.0},
        "cfg": "noise = uncond + guidance_scale * (cond - uncond); UNet batch order [uncond, cond]",
        "vae_scaling_factor": sf,
        "image_postprocess": "(decoded * 0.5 + 0.5).clamp(0, 1), NCHW -> NHWC",
        "tokenizer": {"pad_token": "<|endoftext|>", "pad_id": int(tok.pad_token_id),
                      "bos_id": int(tok.bos_token_id), "eos_id": int(tok.eos_token_id), "max_length": 77,
                      "vocab_size": len(tok)},
        "input_tokens": tok.convert_ids_to_tokens(input_ids[0].tolist()),
        "conventions": SD_NOTES,
    }
    return ref, meta


# --------------------------------------------------------------------------
# Tiny SDXL
# --------------------------------------------------------------------------

SDXL_TE1_HIDDEN = 32
SDXL_TE2_HIDDEN = 48
SDXL_TE2_PROJ = 24
SDXL_ADD_TIME_DIM = 8


def build_sdxl(clip_vocab_dir: Path, vocab_size: int) -> StableDiffusionXLPipeline:
    te1 = CLIPTextModel(clip_text_config(vocab_size, SDXL_TE1_HIDDEN, heads=4, act="quick_gelu",
                                         projection_dim=SDXL_TE1_HIDDEN))
    reinit_parameters(te1, SEED_WEIGHTS["sdxl.text_encoder"])
    te2 = CLIPTextModelWithProjection(clip_text_config(vocab_size, SDXL_TE2_HIDDEN, heads=4, act="gelu",
                                                       projection_dim=SDXL_TE2_PROJ))
    reinit_parameters(te2, SEED_WEIGHTS["sdxl.text_encoder_2"])
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        center_input_sample=False,
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 64),
        layers_per_block=1,
        downsample_padding=1,
        mid_block_scale_factor=1,
        act_fn="silu",
        # 32 groups as in real SDXL (candle 0.11.1's DownBlock2D/UpBlock2D hard-code 32 groups), with 64
        # channels so that each group holds 2 channels and the time / text_time embeddings are not
        # normalised away.
        norm_num_groups=32,
        norm_eps=1e-5,
        cross_attention_dim=SDXL_TE1_HIDDEN + SDXL_TE2_HIDDEN,
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),  # SDXL legacy naming: number of heads per block (5, 10, 20 in SDXL)
        use_linear_projection=True,
        upcast_attention=False,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_ADD_TIME_DIM,
        projection_class_embeddings_input_dim=6 * SDXL_ADD_TIME_DIM + SDXL_TE2_PROJ,
    )
    reinit_parameters(unet, SEED_WEIGHTS["sdxl.unet"])
    vae = sd_vae(scaling_factor=0.13025, force_upcast=False)
    reinit_parameters(vae, SEED_WEIGHTS["sdxl.vae"])
    scheduler = EulerAncestralDiscreteScheduler.from_config(SDXL_TURBO_SCHEDULER)
    tok1 = make_clip_tokenizer(clip_vocab_dir, pad_token="<|endoftext|>")
    tok2 = make_clip_tokenizer(clip_vocab_dir, pad_token="!")
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tok1,
        tokenizer_2=tok2,
        unet=unet,
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


SDXL_RUN = dict(height=64, width=64, num_inference_steps=4, guidance_scale=5.0)


def run_sdxl(pipe: StableDiffusionXLPipeline, init_noise: torch.Tensor):
    cap = CallCapture(pipe.unet)
    cap.time_emb = CallCapture(pipe.unet.time_embedding)
    cap.aug_emb = CallCapture(pipe.unet.add_embedding)
    lat = LatentsCapture()
    out = pipe(
        prompt=PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        latents=init_noise.clone(),
        output_type="np",
        callback_on_step_end=lat,
        callback_on_step_end_tensor_inputs=["latents"],
        eta=0.0,
        **SDXL_RUN,
    )
    cap.remove()
    cap.time_emb.remove()
    cap.aug_emb.remove()
    return out.images, cap, lat


def make_sdxl_reference(pipe: StableDiffusionXLPipeline) -> tuple[RefWriter, dict]:
    ref = RefWriter()
    I64 = torch.int64
    tok1, tok2 = pipe.tokenizer, pipe.tokenizer_2
    te1, te2 = pipe.text_encoder, pipe.text_encoder_2

    def ids(tok, text):
        return tok(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

    input_ids, input_ids_2 = ids(tok1, PROMPT), ids(tok2, PROMPT)
    neg_ids, neg_ids_2 = ids(tok1, NEGATIVE_PROMPT), ids(tok2, NEGATIVE_PROMPT)
    long_ids, long_ids_2 = ids(tok1, LONG_PROMPT), ids(tok2, LONG_PROMPT)

    o1 = te1(input_ids, output_hidden_states=True)
    o2 = te2(input_ids_2, output_hidden_states=True)
    n1 = te1(neg_ids, output_hidden_states=True)
    n2 = te2(neg_ids_2, output_hidden_states=True)
    prompt_embeds = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
    neg_prompt_embeds = torch.cat([n1.hidden_states[-2], n2.hidden_states[-2]], dim=-1)
    pooled, neg_pooled = o2.text_embeds, n2.text_embeds
    # pooled = text_projection(final_layer_norm(last layer)[argmax(input_ids)])
    eot = input_ids_2[0].argmax()
    manual_pooled = te2.text_projection(o2.last_hidden_state[0, eot])[None]
    assert_close("sdxl pooled", pooled, manual_pooled, atol=1e-6)

    # Reference run with a deterministic DDIM built from the SDXL(-Turbo) config.
    euler_config = dict(pipe.scheduler.config)
    pipe.scheduler = DDIMScheduler.from_config(euler_config)
    ddim_config = dict(pipe.scheduler.config)
    init_noise = randn((1, 4, 8, 8), SEED_NOISE["sdxl"])
    image, cap, lat = run_sdxl(pipe, init_noise)
    timesteps = pipe.scheduler.timesteps.clone()

    c0 = cap.calls[0]
    unet_in, t0 = c0["args"][0], c0["args"][1]
    ehs = c0["kwargs"]["encoder_hidden_states"]
    added = c0["kwargs"]["added_cond_kwargs"]
    noise_pred0 = c0["output"][0]
    assert_close("sdxl encoder_hidden_states", ehs, torch.cat([neg_prompt_embeds, prompt_embeds]))
    assert_close("sdxl text_embeds", added["text_embeds"], torch.cat([neg_pooled, pooled]))
    add_time_ids = added["time_ids"]
    assert add_time_ids.tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2, add_time_ids

    final_latents = lat.latents[-1]
    sf = pipe.vae.config.scaling_factor
    decoded = pipe.vae.decode(final_latents / sf).sample
    image_t = torch.from_numpy(image[0])
    assert_close("sdxl image vs decoded", image_t, image_from_decoded(decoded))

    g = SDXL_RUN["guidance_scale"]
    uncond, cond = noise_pred0.chunk(2)
    guided = uncond + g * (cond - uncond)

    # ---- one EulerAncestral step with explicit noise (SDXL-Turbo scheduler)
    ea = EulerAncestralDiscreteScheduler.from_config(euler_config)
    ea.set_timesteps(SDXL_RUN["num_inference_steps"])
    ea_t0 = ea.timesteps[0]
    ea_sample = init_noise * ea.init_noise_sigma
    ea_model_in = ea.scale_model_input(torch.cat([ea_sample] * 2), ea_t0)
    ea_unet_out = pipe.unet(
        ea_model_in, ea_t0, encoder_hidden_states=ehs,
        added_cond_kwargs={"text_embeds": added["text_embeds"], "time_ids": add_time_ids},
    ).sample
    u, c = ea_unet_out.chunk(2)
    ea_model_out = u + g * (c - u)
    ea_step = ea.step(ea_model_out, ea_t0, ea_sample,
                      generator=torch.Generator().manual_seed(SEED_EULER_A_STEP_NOISE))
    ea_noise = randn(ea_model_out.shape, SEED_EULER_A_STEP_NOISE)
    s_from, s_to = ea.sigmas[0].item(), ea.sigmas[1].item()
    s_from_t, s_to_t = ea.sigmas[0], ea.sigmas[1]
    sigma_up = (s_to_t**2 * (s_from_t**2 - s_to_t**2) / s_from_t**2) ** 0.5
    sigma_down = (s_to_t**2 - sigma_up**2) ** 0.5
    x0 = ea_sample - s_from_t * ea_model_out
    manual_prev = ea_sample + (ea_sample - x0) / s_from_t * (sigma_down - s_from_t) + ea_noise * sigma_up
    assert_close("euler_a prev_sample", ea_step.prev_sample, manual_prev, atol=1e-5)

    ref.add("input_ids", input_ids, "tokenizer (pad <|endoftext|>) ids of prompt, [1,77]", I64)
    ref.add("input_ids_2", input_ids_2, "tokenizer_2 (pad '!' = id 0) ids of prompt, [1,77]", I64)
    ref.add("negative_input_ids", neg_ids, "tokenizer ids of negative_prompt", I64)
    ref.add("negative_input_ids_2", neg_ids_2, "tokenizer_2 ids of negative_prompt", I64)
    ref.add("long_input_ids", long_ids, "tokenizer ids of long_prompt, truncation=True max_length=77", I64)
    ref.add("long_input_ids_2", long_ids_2, "tokenizer_2 ids of long_prompt, truncation=True max_length=77", I64)
    ref.add("text_encoder_hidden", o1.hidden_states[-2],
            "text_encoder(input_ids).hidden_states[-2]: output of encoder layer index 1 of 3 (penultimate), "
            "NO final_layer_norm, [1,77,32]")
    ref.add("text_encoder_2_hidden", o2.hidden_states[-2],
            "text_encoder_2(input_ids_2).hidden_states[-2], NO final_layer_norm, [1,77,48]")
    ref.add("prompt_embeds", prompt_embeds, "cat([text_encoder_hidden, text_encoder_2_hidden], -1), [1,77,80]")
    ref.add("negative_prompt_embeds", neg_prompt_embeds, "same for the negative prompt")
    ref.add("pooled_prompt_embeds", pooled,
            "text_encoder_2(input_ids_2).text_embeds = text_projection(final_layer_norm(last layer)"
            "[argmax(input_ids_2)]) (no bias), [1,24]")
    ref.add("negative_pooled_prompt_embeds", neg_pooled, "same for the negative prompt")
    ref.add("add_time_ids", add_time_ids, "time_ids passed to the UNet (rows [uncond, cond]): original_size + "
            "crops_coords_top_left + target_size = [64,64,0,0,64,64]")
    ref.add("add_text_embeds", added["text_embeds"], "text_embeds passed to the UNet: cat([negative_pooled, pooled])")
    ref.add("init_noise", init_noise, "latents passed as `latents=` (DDIM init_noise_sigma = 1.0); randn seed 22")
    ref.add("timesteps", timesteps, "DDIM timesteps ('trailing' spacing from the SDXL-Turbo config): [999,749,499,249]", I64)
    ref.add("step0_unet_input", unet_in, "UNet sample at step 0 = cat([latents, latents]), order [uncond, cond]")
    ref.add("step0_timestep", t0.reshape(1), "timestep given to the UNet at step 0", I64)
    ref.add("step0_time_emb", cap.time_emb.calls[0]["output"], "UNet time_embedding(time_proj(t)) at step 0, [2,64]")
    ref.add("step0_add_embeds_input", cap.aug_emb.calls[0]["args"][0], "input of unet.add_embedding at step 0: "
            "cat([text_embeds (24), add_time_proj(time_ids).reshape(B, 6*8)], -1) -> [2,72]")
    ref.add("step0_aug_emb", cap.aug_emb.calls[0]["output"], "unet.add_embedding(...) at step 0, [2,64]; the UNet "
            "uses emb = step0_time_emb + step0_aug_emb")
    ref.add("step0_noise_pred", noise_pred0, "raw UNet output at step 0, rows [uncond, cond]")
    ref.add("step0_guided_noise_pred", guided, "uncond + guidance_scale * (cond - uncond) at step 0")
    ref.add("step0_latents", lat.latents[0], "latents after CFG + DDIM step 0 (eta 0)")
    ref.add("all_step_latents", torch.cat(lat.latents), "latents after each step, [4,4,8,8]")
    ref.add("final_latents", final_latents, "latents after the last step, before the VAE")
    ref.add("decoded", decoded, "vae.decode(final_latents / 0.13025).sample (raw)")
    ref.add("image", image_t, "pipeline output, output_type='np', [64,64,3] in [0,1]")
    ref.add("euler_a_timesteps", ea.timesteps, "EulerAncestral (SDXL-Turbo config, trailing) timesteps for 4 steps "
            "(float32, the values the UNet receives)")
    ref.add("euler_a_sigmas", ea.sigmas, "EulerAncestral sigmas for 4 steps + trailing 0.0, [5]")
    ref.add("euler_a_init_noise_sigma", torch.tensor([float(ea.init_noise_sigma)]),
            "init_noise_sigma = max(sigmas) for 'trailing' spacing")
    ref.add("euler_a_sample", ea_sample, "step-0 sample = init_noise * init_noise_sigma")
    ref.add("euler_a_model_input", ea_model_in, "scale_model_input(cat([sample]*2), t0) = sample / sqrt(sigma^2+1)")
    ref.add("euler_a_unet_output", ea_unet_out, "UNet output at t0 (rows [uncond, cond]), same conditioning as the DDIM run")
    ref.add("euler_a_model_output", ea_model_out, "CFG-combined model output fed to scheduler.step")
    ref.add("euler_a_noise", ea_noise, "the noise the step draws: torch.randn([1,4,8,8], Generator().manual_seed(2222))")
    ref.add("euler_a_prev_sample", ea_step.prev_sample, "EulerAncestral step output")
    ref.add("euler_a_pred_original_sample", ea_step.pred_original_sample, "x0 = sample - sigma * model_output")

    meta = {
        "family": "tiny-sdxl",
        "model_dir": "models/tiny-sdxl",
        "pipeline": "StableDiffusionXLPipeline",
        "prompt": PROMPT,
        "prompt_2": None,
        "negative_prompt": NEGATIVE_PROMPT,
        "long_prompt": LONG_PROMPT,
        **SDXL_RUN,
        "scheduler": {
            "shipped": "EulerAncestralDiscreteScheduler (models/tiny-sdxl/scheduler/scheduler_config.json, SDXL-Turbo config)",
            "reference_run": "DDIMScheduler.from_config(shipped config), eta 0",
            "reference_run_config": {k: v for k, v in ddim_config.items() if not k.startswith("_")},
        },
        "cfg": "noise = uncond + guidance_scale * (cond - uncond); batch order [uncond, cond]",
        "original_size": [64, 64], "crops_coords_top_left": [0, 0], "target_size": [64, 64],
        "vae_scaling_factor": sf,
        "euler_a_step": {"sigma_from": s_from, "sigma_to": s_to, "sigma_up": sigma_up.item(),
                         "sigma_down": sigma_down.item(),
                         "formula": "x0 = sample - sigma*eps; d = (sample - x0)/sigma; "
                                    "prev = sample + d*(sigma_down - sigma) + noise*sigma_up; "
                                    "sigma_up = sqrt(s_to^2 (s_from^2 - s_to^2) / s_from^2); "
                                    "sigma_down = sqrt(s_to^2 - sigma_up^2)",
                         "noise_seed": SEED_EULER_A_STEP_NOISE},
        "tokenizer": {"pad_id": int(tok1.pad_token_id), "bos_id": int(tok1.bos_token_id),
                      "eos_id": int(tok1.eos_token_id), "vocab_size": len(tok1)},
        "tokenizer_2": {"pad_token": "!", "pad_id": int(tok2.pad_token_id)},
        "conventions": SDXL_NOTES,
    }
    # restore the shipped scheduler on the in-memory pipeline
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(euler_config)
    return ref, meta


# --------------------------------------------------------------------------
# Tiny Z-Image
# --------------------------------------------------------------------------

ZI_TEXT_HIDDEN = 48
ZI_DIM = 48  # divisible by 3: int(dim/3*8) == (dim//3)*8 (candle computes the latter)
ZI_HEADS = 3  # head_dim 16 == sum(axes_dims)
ZI_AXES_DIMS = [4, 6, 6]  # same 2:3:3 split as the real [32, 48, 48]


def build_zimage(tok_dir: Path) -> tuple[ZImagePipeline, Qwen3Config]:
    fast = build_qwen_tokenizer(tok_dir)
    slow = Qwen2Tokenizer.from_pretrained(tok_dir)
    n_tok = len(fast)
    vocab_size = ((n_tok + 63) // 64) * 64  # real Qwen3 pads its embedding table too (151936 > 151669)
    cfg = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=ZI_TEXT_HIDDEN,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,  # heads*head_dim (64) != hidden (48), like Qwen3-4B (4096 != 2560)
        hidden_act="silu",
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        rope_scaling=None,
        attention_bias=False,
        attention_dropout=0.0,
        use_sliding_window=False,
        tie_word_embeddings=True,
        bos_token_id=fast.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"),
        torch_dtype="float32",
    )
    te = Qwen3Model(cfg)
    reinit_parameters(te, SEED_WEIGHTS["zimage.text_encoder"])
    te.eval()
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=ZI_DIM,
        n_layers=2,
        n_refiner_layers=2,
        n_heads=ZI_HEADS,
        n_kv_heads=ZI_HEADS,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=ZI_TEXT_HIDDEN,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=ZI_AXES_DIMS,
        axes_lens=[1536, 512, 512],
    )
    reinit_parameters(transformer, SEED_WEIGHTS["zimage.transformer"])
    vae = sd_vae(scaling_factor=0.3611, shift_factor=0.1159, latent_channels=16, force_upcast=True,
                 use_quant_conv=False)
    reinit_parameters(vae, SEED_WEIGHTS["zimage.vae"])
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(ZIMAGE_TURBO_SCHEDULER)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=te, tokenizer=slow, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe, cfg


ZI_RUN = dict(height=64, width=128, num_inference_steps=4, guidance_scale=3.0, cfg_normalization=False,
              cfg_truncation=1.0, max_sequence_length=512)


def run_zimage(pipe: ZImagePipeline, init_noise: torch.Tensor, guidance_scale: float):
    cap = CallCapture(pipe.transformer)
    cap.t_emb = CallCapture(pipe.transformer.t_embedder)
    lat = LatentsCapture()
    kw = dict(ZI_RUN)
    kw["guidance_scale"] = guidance_scale
    out = pipe(
        prompt=PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        latents=init_noise.clone(),
        output_type="np",
        callback_on_step_end=lat,
        callback_on_step_end_tensor_inputs=["latents"],
        **kw,
    )
    cap.remove()
    cap.t_emb.remove()
    return out.images, cap, lat


def zimage_template(tok, text: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=True)


def make_zimage_reference(pipe: ZImagePipeline) -> tuple[RefWriter, dict]:
    ref = RefWriter()
    I64 = torch.int64
    tok, te, tr = pipe.tokenizer, pipe.text_encoder, pipe.transformer
    fast = AutoTokenizer.from_pretrained(MODELS / "tiny-z-image" / "tokenizer")
    assert isinstance(fast, Qwen2TokenizerFast), type(fast)

    def encode(text: str):
        templ = zimage_template(tok, text)
        assert templ == f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n", repr(templ)
        assert zimage_template(fast, text) == templ
        enc = tok([templ], padding="max_length", max_length=512, truncation=True, return_tensors="pt")
        enc_fast = fast([templ], padding="max_length", max_length=512, truncation=True, return_tensors="pt")
        assert enc.input_ids.tolist() == enc_fast.input_ids.tolist(), "slow/fast Qwen tokenizer mismatch"
        mask = enc.attention_mask.bool()
        hs = te(input_ids=enc.input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
        emb = hs[-2][0][mask[0]]
        return templ, enc.input_ids, enc.attention_mask, emb

    # hidden_states[-2] must be the raw output of decoder layer n-2 (no final norm)
    layer_out = {}
    h = te.layers[te.config.num_hidden_layers - 2].register_forward_hook(
        lambda m, a, o: layer_out.__setitem__("x", o[0] if isinstance(o, tuple) else o))
    templ, ids, am, pe = encode(PROMPT)
    h.remove()
    L = int(am.sum())
    assert_close("qwen hidden_states[-2] == layer[n-2] output", pe, layer_out["x"][0][:L], atol=0.0)
    # and the padded batch (attention mask) does not change the valid rows
    unpadded = te(input_ids=ids[:, :L], output_hidden_states=True).hidden_states[-2][0]
    assert_close("qwen padded vs unpadded", pe, unpadded, atol=1e-5)

    neg_templ, neg_ids, neg_am, npe = encode(NEGATIVE_PROMPT)
    long_templ, long_ids, long_am, _ = encode(LONG_PROMPT)

    lat_h = 2 * (ZI_RUN["height"] // 16)
    lat_w = 2 * (ZI_RUN["width"] // 16)
    init_noise = randn((1, 16, lat_h, lat_w), SEED_NOISE["zimage"])

    image, cap, lat = run_zimage(pipe, init_noise, ZI_RUN["guidance_scale"])
    timesteps = pipe.scheduler.timesteps.clone()
    sigmas = pipe.scheduler.sigmas.clone()

    c0 = cap.calls[0]
    x_list, t_in, cap_list = c0["args"][0], c0["args"][1], c0["args"][2]
    out_list = c0["output"][0]
    assert len(x_list) == 2 and len(cap_list) == 2
    assert_close("zimage cap feats (cond)", cap_list[0], pe)
    assert_close("zimage cap feats (uncond)", cap_list[1], npe)
    x_in = torch.stack(list(x_list))
    tr_out = torch.stack(list(out_list))
    g = ZI_RUN["guidance_scale"]
    pos, neg = tr_out[0:1].float(), tr_out[1:2].float()
    guided = pos + g * (pos - neg)
    model_output0 = -guided.squeeze(2)
    step0 = init_noise + (sigmas[1] - sigmas[0]) * model_output0
    assert_close("zimage step0 latents", step0, lat.latents[0], atol=1e-6)
    assert_close("zimage t0", t_in, ((1000 - timesteps[0]) / 1000).expand(2))

    final_latents = lat.latents[-1]
    vcfg = pipe.vae.config
    decoded = pipe.vae.decode(final_latents / vcfg.scaling_factor + vcfg.shift_factor).sample
    image_t = torch.from_numpy(image[0])
    assert_close("zimage image vs decoded", image_t, image_from_decoded(decoded))

    # ---- the same run without CFG (guidance_scale 0, as Z-Image-Turbo is used)
    image_nc, cap_nc, lat_nc = run_zimage(pipe, init_noise, 0.0)
    nc0 = cap_nc.calls[0]
    assert len(nc0["args"][0]) == 1
    nc_out0 = torch.stack(list(nc0["output"][0]))

    # ---- extra transformer calls
    # (a) "aligned": 32 caption tokens and 32 image tokens -> no padding anywhere
    gen = torch.Generator().manual_seed(SEED_ZIMAGE_EXTRA)
    al_x = torch.randn((16, 1, 16, 8), generator=gen)
    al_cap = torch.randn((32, ZI_TEXT_HIDDEN), generator=gen)
    al_t = torch.tensor([0.3])
    al_out = tr([al_x], al_t, [al_cap], return_dict=False)[0][0]
    # (b) "imgpad": 8x8 latent (16 image tokens, padded to 32 with x_pad_token) with the prompt's caption
    ip_x = torch.randn((16, 1, 8, 8), generator=gen)
    ip_t = torch.tensor([0.7])
    ip_out = tr([ip_x], ip_t, [pe], return_dict=False)[0][0]

    ref.add("input_ids", ids, "Qwen token ids of the chat-templated prompt, right-padded with <|endoftext|> to "
            "max_sequence_length 512, [1,512]", I64)
    ref.add("attention_mask", am, "tokenizer attention mask for input_ids (1 = real token), [1,512]", I64)
    ref.add("negative_input_ids", neg_ids, "same for the templated negative_prompt", I64)
    ref.add("negative_attention_mask", neg_am, "attention mask for negative_input_ids", I64)
    ref.add("long_input_ids", long_ids, "ids of the templated long_prompt (max_length 512: NOT truncated at 77)", I64)
    ref.add("long_attention_mask", long_am, "attention mask for long_input_ids", I64)
    ref.add("prompt_embeds", pe, "text_encoder(...).hidden_states[-2][0][attention_mask] = output of Qwen3 decoder "
            "layer index n-2 (here layer 1 of 0..2), no final norm, only the valid (unpadded) rows: [L,48]")
    ref.add("negative_prompt_embeds", npe, "same for the negative prompt: [L_neg,48]")
    ref.add("init_noise", init_noise, "latents passed as `latents=` (flow matching: used as is), [1,16,8,16]; "
            "randn seed 33")
    ref.add("timesteps", timesteps, "scheduler.timesteps (float32) = shifted sigmas * 1000, [4]")
    ref.add("sigmas", sigmas, "scheduler.sigmas (float32), [5] (terminal 0 appended)")
    ref.add("step0_transformer_input", x_in, "latents given to the transformer at step 0, stacked from the list "
            "[x_cond, x_uncond] (each [16,1,8,16]): [2,16,1,8,16], order [cond, uncond]")
    ref.add("step0_transformer_timestep", t_in, "t given to the transformer at step 0: (1000 - timesteps[0]) / 1000, "
            "per batch row [2] (the transformer multiplies by t_scale=1000 internally)")
    ref.add("step0_adaln_input", cap.t_emb.calls[0]["output"], "t_embedder(t * 1000) at step 0 (sinusoid [cos, sin] "
            "of 256 freqs -> Linear(256,1024) -> SiLU -> Linear(1024, min(dim,256))), [2,48]")
    ref.add("step0_transformer_output", tr_out, "raw transformer outputs at step 0, stacked [2,16,1,8,16], "
            "order [cond, uncond]")
    ref.add("step0_model_output", model_output0, "what goes into scheduler.step at step 0: "
            "-(pos + guidance_scale * (pos - neg)) squeezed to [1,16,8,16]")
    ref.add("step0_latents", lat.latents[0], "latents after step 0: init + (sigmas[1]-sigmas[0]) * step0_model_output")
    ref.add("all_step_latents", torch.cat(lat.latents), "latents after each of the 4 steps, [4,16,8,16]")
    ref.add("final_latents", final_latents, "latents after the last step, before the VAE")
    ref.add("decoded", decoded, "vae.decode(final_latents / 0.3611 + 0.1159).sample (raw), [1,3,64,128]")
    ref.add("image", image_t, "pipeline output, output_type='np', [64,128,3] in [0,1]")
    ref.add("nocfg_step0_transformer_output", nc_out0, "guidance_scale=0 run (no CFG, batch of 1): raw transformer "
            "output at step 0, [1,16,1,8,16]")
    ref.add("nocfg_final_latents", lat_nc.latents[-1], "guidance_scale=0 run: latents after the last step")
    ref.add("nocfg_image", torch.from_numpy(image_nc[0]), "guidance_scale=0 run: pipeline output image")
    ref.add("aligned_x", al_x, "extra transformer call, no padding anywhere: x [16,1,16,8] (32 image tokens)")
    ref.add("aligned_t", al_t, "t for the aligned call (already in [0,1]; transformer multiplies by 1000)")
    ref.add("aligned_cap_feats", al_cap, "caption features for the aligned call, exactly 32 tokens [32,48]")
    ref.add("aligned_output", al_out, "transformer([aligned_x], aligned_t, [aligned_cap_feats]) -> [16,1,16,8]")
    ref.add("imgpad_x", ip_x, "extra transformer call with image padding: x [16,1,8,8] -> 16 image tokens, "
            "padded to 32 with x_pad_token (position ids (0,0,0))")
    ref.add("imgpad_t", ip_t, "t for the imgpad call")
    ref.add("imgpad_output", ip_out, "transformer([imgpad_x], imgpad_t, [prompt_embeds]) -> [16,1,8,8]")

    lat_seq = (lat_h // 2) * (lat_w // 2)
    meta = {
        "family": "tiny-z-image",
        "model_dir": "models/tiny-z-image",
        "pipeline": "ZImagePipeline",
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE_PROMPT,
        "long_prompt": LONG_PROMPT,
        "templated_prompt": templ,
        "templated_negative_prompt": neg_templ,
        "chat_template_call": "tokenizer.apply_chat_template([{'role':'user','content':p}], tokenize=False, "
                              "add_generation_prompt=True, enable_thinking=True)",
        "prompt_tokens": int(L),
        "negative_prompt_tokens": int(neg_am.sum()),
        "input_tokens": tok.convert_ids_to_tokens(ids[0, :L].tolist()),
        **ZI_RUN,
        "latent_shape": [1, 16, lat_h, lat_w],
        "image_seq_len": lat_seq,
        "mu_computed_but_unused": None,
        "scheduler": {"class": "FlowMatchEulerDiscreteScheduler",
                      "config": "models/tiny-z-image/scheduler/scheduler_config.json",
                      "note": "the pipeline sets scheduler.sigma_min = 0.0 before set_timesteps; "
                              "use_dynamic_shifting is false, so mu is ignored and the static shift 3.0 applies"},
        "cfg": "do_classifier_free_guidance = guidance_scale > 1 (diffusers 0.36); transformer batch order "
               "[cond, uncond]; pred = pos + guidance_scale * (pos - neg); model_output = -pred",
        "nocfg_run": {"guidance_scale": 0.0},
        "vae": {"scaling_factor": vcfg.scaling_factor, "shift_factor": vcfg.shift_factor,
                "decode_input": "latents / scaling_factor + shift_factor"},
        "tokenizer": {"pad_token": "<|endoftext|>", "pad_id": int(tok.pad_token_id),
                      "im_start_id": int(tok.convert_tokens_to_ids("<|im_start|>")),
                      "im_end_id": int(tok.convert_tokens_to_ids("<|im_end|>")),
                      "len": len(tok)},
        "extra_calls": {"aligned_t": al_t.item(), "imgpad_t": ip_t.item()},
        "conventions": ZIMAGE_NOTES,
    }
    import math
    m = (1.15 - 0.5) / (4096 - 256)
    meta["mu_computed_but_unused"] = lat_seq * m + (0.5 - m * 256)
    assert math.isfinite(meta["mu_computed_but_unused"])
    return ref, meta


def resave_qwen_text_encoder_like_real(te: Qwen3Model, cfg: Qwen3Config, te_dir: Path) -> None:
    """The real Z-Image-Turbo text_encoder/ was saved from Qwen3ForCausalLM
    (config.architectures == ['Qwen3ForCausalLM'], tie_word_embeddings, weight
    keys 'model.*', no lm_head).  Qwen3Model.from_pretrained (what the pipeline
    uses) strips the 'model.' prefix.  Re-save our Qwen3Model that way."""
    lm = Qwen3ForCausalLM(cfg)
    lm.model.load_state_dict(te.state_dict(), strict=True)
    lm.tie_weights()
    for f in te_dir.iterdir():
        f.unlink()
    lm.save_pretrained(te_dir, safe_serialization=True)
    keys = list(load_file(str(te_dir / "model.safetensors")).keys())
    assert all(k.startswith("model.") for k in keys), keys[:5]
    assert not any(k.startswith("lm_head") for k in keys)


# --------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------


def verify_reload(family: str) -> None:
    """Reload a saved pipeline with from_pretrained, regenerate, and compare
    with the stored reference tensors (exact on the same machine)."""
    model_dir = MODELS / family
    ref = load_file(str(PARITY / family / "reference.safetensors"))
    init_noise = ref["init_noise"]
    if family == "tiny-sd":
        pipe = StableDiffusionPipeline.from_pretrained(model_dir)
        pipe.set_progress_bar_config(disable=True)
        image, _, lat = run_sd(pipe, init_noise)
    elif family == "tiny-sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
        pipe.set_progress_bar_config(disable=True)
        assert isinstance(pipe.scheduler, EulerAncestralDiscreteScheduler)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        image, _, lat = run_sdxl(pipe, init_noise)
    else:
        pipe = ZImagePipeline.from_pretrained(model_dir)
        pipe.set_progress_bar_config(disable=True)
        image, _, lat = run_zimage(pipe, init_noise, ZI_RUN["guidance_scale"])
        image_nc, _, lat_nc = run_zimage(pipe, init_noise, 0.0)
        assert_close(f"{family} reload nocfg_image", torch.from_numpy(image_nc[0]), ref["nocfg_image"])
    assert_close(f"{family} reload final_latents", lat.latents[-1], ref["final_latents"])
    assert_close(f"{family} reload image", torch.from_numpy(image[0]), ref["image"])
    log(f"  {family}: reloaded with from_pretrained, image and final_latents reproduced exactly")


def generate(cache_dir: Path) -> None:
    env = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "python": sys.version.split()[0],
        "open_clip_torch_wheel": OPEN_CLIP_VERSION,
    }

    for d in ("tiny-sd", "tiny-sdxl", "tiny-z-image"):
        if (MODELS / d).exists():
            shutil.rmtree(MODELS / d)
        if (PARITY / d).exists():
            shutil.rmtree(PARITY / d)
    MODELS.mkdir(parents=True, exist_ok=True)

    # -- CLIP vocabulary (truncated real CLIP BPE)
    merges = load_open_clip_merges(cache_dir)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_dir = Path(tmp)
        encoder = write_truncated_clip_vocab(vocab_dir, merges, CLIP_NUM_MERGES)
        clip_vocab_size = len(encoder)

        # -- SD
        log("building tiny-sd ...")
        pipe = build_sd(vocab_dir, clip_vocab_size)
        pipe.save_pretrained(MODELS / "tiny-sd", safe_serialization=True)
        add_fast_clip_tokenizer_json(MODELS / "tiny-sd" / "tokenizer", [PROMPT, NEGATIVE_PROMPT, LONG_PROMPT, ""])
        ref, meta = make_sd_reference(pipe)
        meta["environment"] = env
        ref.write(PARITY / "tiny-sd", meta)
        del pipe

        # -- SDXL
        log("building tiny-sdxl ...")
        pipe = build_sdxl(vocab_dir, clip_vocab_size)
        pipe.save_pretrained(MODELS / "tiny-sdxl", safe_serialization=True)
        for sub in ("tokenizer", "tokenizer_2"):
            add_fast_clip_tokenizer_json(MODELS / "tiny-sdxl" / sub, [PROMPT, NEGATIVE_PROMPT, LONG_PROMPT, ""])
        ref, meta = make_sdxl_reference(pipe)
        meta["environment"] = env
        ref.write(PARITY / "tiny-sdxl", meta)
        del pipe

    # -- Z-Image
    log("building tiny-z-image ...")
    with tempfile.TemporaryDirectory() as tmp:
        fast_dir = Path(tmp) / "qwen_tok"
        pipe, qcfg = build_zimage(fast_dir)
        pipe.save_pretrained(MODELS / "tiny-z-image", safe_serialization=True)
        # tokenizer.json (fast, for Rust `tokenizers`) next to the slow Qwen2Tokenizer files
        shutil.copy(fast_dir / "tokenizer.json", MODELS / "tiny-z-image" / "tokenizer" / "tokenizer.json")
    resave_qwen_text_encoder_like_real(pipe.text_encoder, qcfg, MODELS / "tiny-z-image" / "text_encoder")
    ref, meta = make_zimage_reference(pipe)
    meta["environment"] = env
    ref.write(PARITY / "tiny-z-image", meta)
    del pipe


def report_sizes() -> None:
    total = 0
    for base in (MODELS, PARITY):
        for d in ("tiny-sd", "tiny-sdxl", "tiny-z-image"):
            p = base / d
            if p.exists():
                s = dir_size(p)
                total += s
                log(f"  {p.relative_to(ROOT)}: {s / 1024:.1f} KiB")
    log(f"  total: {total / 1024 / 1024:.2f} MiB (limit {SIZE_LIMIT_BYTES / 1024 / 1024:.0f} MiB)")
    if total > SIZE_LIMIT_BYTES:
        raise SystemExit("models/ + tests/data/parity/ exceed the size limit")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verify", action="store_true", help="only reload the saved pipelines and compare")
    ap.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                    / "raftgen-tools", help="where the open-clip-torch wheel is downloaded")
    args = ap.parse_args()
    check_versions()
    setup_torch()
    if not args.verify:
        generate(args.cache_dir)
    log("verifying reload ...")
    for fam in ("tiny-sd", "tiny-sdxl", "tiny-z-image"):
        verify_reload(fam)
    log("sizes:")
    report_sizes()
    log("done")


if __name__ == "__main__":
    main()
