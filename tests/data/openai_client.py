"""Drives POST /v1/images/generations with the official `openai` package.

Usage: openai_client.py NODE_URL MODEL. Exits non-zero (with a traceback)
when an answer is not what the OpenAI API would give.
"""
import base64
import io
import sys
import urllib.request

import openai
from PIL import Image

node, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=node + "/v1", api_key="not-checked-without-api-keys")


def png_size(data):
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG", img.format
    return img.size


# Two images as base64, each job with its own seed.
r = client.images.generate(model=model, prompt="a lighthouse at dusk", n=2, size="64x48",
                           response_format="b64_json", user="tests")
assert isinstance(r.created, int) and r.created > 1_600_000_000, r.created
assert len(r.data) == 2, r
pngs = [base64.b64decode(d.b64_json) for d in r.data]
assert [png_size(p) for p in pngs] == [(64, 48), (64, 48)]
assert pngs[0] != pngs[1], "two images of one request should differ (own seeds)"

# One image as a URL on the node.
r = client.images.generate(model=model, prompt="a lighthouse at dawn", size="32x32", response_format="url")
assert len(r.data) == 1 and r.data[0].url.startswith(node + "/v1/jobs/"), r.data[0].url
with urllib.request.urlopen(r.data[0].url) as resp:
    assert png_size(resp.read()) == (32, 32)

# OpenAI's own model names mean the cluster's default model.
r = client.images.generate(model="gpt-image-1", prompt="a lighthouse", size="32x32", response_format="b64_json")
assert png_size(base64.b64decode(r.data[0].b64_json)) == (32, 32)

# Errors arrive as the client's typed exceptions, naming the parameter.
for kwargs, param in [
    (dict(model="no-such-model"), "model"),
    (dict(model=model, n=11), "n"),
    (dict(model=model, size="big"), "size"),
    (dict(model=model, size="4096x4096"), "size"),
]:
    try:
        client.images.generate(prompt="x", **kwargs)
    except openai.BadRequestError as e:
        assert e.status_code == 400, e
        assert isinstance(e.body, dict) and e.body.get("param") == param, e.body
        assert e.body.get("type") == "invalid_request_error", e.body
    else:
        raise AssertionError(f"{kwargs} was accepted")

print("openai client ok")
