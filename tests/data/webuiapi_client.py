"""Drives the AUTOMATIC1111 API (/sdapi/v1) with the `webuiapi` package.

Usage: webuiapi_client.py HOST PORT MODEL. Exits non-zero (with a traceback)
when an answer is not what webuiapi expects from A1111.
"""
import sys

import webuiapi

host, port, model = sys.argv[1], int(sys.argv[2]), sys.argv[3]
api = webuiapi.WebUIApi(host=host, port=port)  # asks GET /sdapi/v1/scripts

models = api.get_sd_models()
assert [m["model_name"] for m in models] == [model], models
title = models[0]["title"]
assert title in api.util_get_model_names()
assert isinstance(api.get_samplers(), list)

# webuiapi sends ~45 fields (hires fix off, scheduler, eta, ...); unknown ones are ignored.
r = api.txt2img(prompt="a red fox in snow", negative_prompt="blurry", width=64, height=48, steps=3,
                seed=5, batch_size=2, cfg_scale=6.5, override_settings={"sd_model_checkpoint": title})
assert len(r.images) == 2, r.images
assert all(img.size == (64, 48) for img in r.images), [img.size for img in r.images]
assert isinstance(r.info, dict), r.info
assert r.info["all_seeds"] == [5, 6], r.info
assert r.info["seed"] == 5 and r.info["width"] == 64 and r.info["steps"] == 3, r.info
assert r.parameters["prompt"] == "a red fox in snow", r.parameters
assert r.images[0].tobytes() != r.images[1].tobytes()

# The same seed again: the same image.
again = api.txt2img(prompt="a red fox in snow", negative_prompt="blurry", width=64, height=48, steps=3,
                    seed=5, cfg_scale=6.5)
assert again.images[0].tobytes() == r.images[0].tobytes()

# seed -1: the leader picks one, and info reports it.
rnd = api.txt2img(prompt="a red fox", width=32, height=32, steps=2)
assert rnd.info["seed"] >= 0 and len(rnd.images) == 1 and rnd.images[0].size == (32, 32), rnd.info

p = api.get_progress()
assert 0.0 <= p["progress"] <= 1.0 and p["state"]["job_count"] >= 0, p
api.util_wait_for_ready(check_interval=0.2)

# Bad input: webuiapi raises RuntimeError(status, text) on any non-200.
try:
    api.txt2img(prompt="x", width=63, height=64, steps=2)
except RuntimeError as e:
    assert e.args[0] == 422 and '"width"' in e.args[1], e.args
else:
    raise AssertionError("width=63 was accepted")

print("webuiapi client ok")
