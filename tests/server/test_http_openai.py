"""The official openai client against a real server: images, models, batching equivalence."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from openai import OpenAI

from synerdiff.engine import EngineObserver

from .httpkit import Live, decode_png, psnr


@pytest.fixture(scope="module")
def client(live: Live) -> OpenAI:
    return OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_generate_native_size_b64_png(client: OpenAI, live: Live):
    resp = client.images.generate(prompt="a red circle", extra_body={"num_inference_steps": 3, "seed": 11})
    assert len(resp.data) == 1
    img = decode_png(resp.data[0].b64_json)
    native = live.engine.model.default_size
    assert img.size == (native, native) and img.mode == "RGB"
    info = resp.to_dict()["synerdiff"]
    assert info["seed"] == 11 and info["steps"] == 3
    assert info["vae_tiled"] is False and info["guided_steps_skipped"] == 0
    t = info["timings"]
    assert t["total_s"] >= t["inference_s"] > 0 and t["queue_wait_s"] >= 0


def test_size_n_and_ignored_openai_fields(client: OpenAI):
    resp = client.images.generate(
        prompt="a blue square",
        model="synerdiff-default",
        n=2,
        size="64x128",  # WIDTHxHEIGHT
        response_format="b64_json",
        quality="standard",
        style="vivid",
        user="someone",
        extra_body={"num_inference_steps": 2, "sampler": "ddim", "negative_prompt": "green"},
    )
    sizes = [decode_png(d.b64_json).size for d in resp.data]
    assert sizes == [(64, 128), (64, 128)]
    assert resp.to_dict()["size"] == "64x128"


def test_same_seed_same_image(client: OpenAI):
    kw = dict(prompt="a yellow star", extra_body={"num_inference_steps": 3, "seed": 5, "sampler": "euler_a", "cfg_skip": "never"})
    a = decode_png(client.images.generate(**kw).data[0].b64_json)
    b = decode_png(client.images.generate(**kw).data[0].b64_json)
    assert psnr(a, b) >= 40


def test_url_response_format_is_a_clear_400(client: OpenAI):
    with pytest.raises(openai.BadRequestError) as exc:
        client.images.generate(prompt="x", response_format="url")
    err = exc.value.body
    assert exc.value.status_code == 400
    assert err["param"] == "response_format" and "not supported" in err["message"]


def test_models_list(client: OpenAI, live: Live):
    models = client.models.list()
    assert [m.id for m in models.data] == [live.state.settings.served_model_name]
    assert client.models.retrieve(live.state.settings.served_model_name).object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("dall-e-3")


# Different shapes, samplers, step counts, guidance and n, all with cfg_skip=never: batched
# with each other they must give what each gives alone.
MIX = [
    {"prompt": "a cat", "size": "64x64", "n": 1, "extra_body": {"num_inference_steps": 12, "sampler": "euler", "guidance_scale": 7.5, "seed": 1}},
    {"prompt": "a dog", "size": "64x128", "n": 2, "extra_body": {"num_inference_steps": 16, "sampler": "ddim", "guidance_scale": 5.0, "seed": 2}},
    {"prompt": "a fox", "size": "64x64", "n": 1, "extra_body": {"num_inference_steps": 10, "sampler": "euler_a", "guidance_scale": 1.0, "seed": 3}},
    {
        "prompt": "an owl",
        "size": "64x64",
        "n": 2,
        "extra_body": {"num_inference_steps": 20, "sampler": "dpmpp_2m", "guidance_scale": 3.0, "seed": 4, "negative_prompt": "blur"},
    },
    {"prompt": "a cow", "size": "128x64", "n": 1, "extra_body": {"num_inference_steps": 14, "sampler": "euler", "guidance_scale": 9.0, "seed": 5}},
]


def test_concurrent_mixed_requests_equal_their_solo_results(client: OpenAI, live: Live):
    def run(kw):
        kw = {**kw, "extra_body": {**kw["extra_body"], "cfg_skip": "never"}}
        return [decode_png(d.b64_json) for d in client.images.generate(**kw).data]

    solo = [run(kw) for kw in MIX]
    max_batch = {"rows": 0}
    hook = EngineObserver(on_iteration=lambda stats: max_batch.__setitem__("rows", max(max_batch["rows"], stats.rows)))
    live.engine.observers.append(hook)
    try:
        with ThreadPoolExecutor(len(MIX)) as pool:
            together = list(pool.map(run, MIX))
    finally:
        live.engine.observers.remove(hook)
    # Requests really shared forwards: more rows than the largest single request (4).
    assert max_batch["rows"] > 4
    for kw, alone, batched in zip(MIX, solo, together, strict=True):
        assert len(alone) == len(batched) == kw["n"]
        for a, b in zip(alone, batched, strict=True):
            assert a.size == b.size
            assert psnr(a, b) >= 40, f"{kw['prompt']}: batched result differs from solo"


def test_healthz_and_readyz(live: Live):
    assert httpx.get(live.url + "/healthz").json() == {"status": "ok"}
    r = httpx.get(live.url + "/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"
