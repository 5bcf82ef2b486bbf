"""LoRA over HTTP: the `lora` field of generations and edits, 400s naming the problem,
`GET /v1/models` listing the adapters, `/readyz` naming the loaded ones, and the metrics."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import httpx
import pytest
import torch
from PIL import Image

from synerdiff.api import create_app
from synerdiff.contract.config import EMBEDDED_MODEL_DIR, EngineConfig, LimitsConfig, LoraConfig, ServerSettings
from synerdiff.engine import Engine, GenerationRequest

from ..engine.lora_kit import random_layers
from .httpkit import TEST_LIMITS, Live, decode_png, metric_value, psnr, serve_app

GEN = "/v1/images/generations"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("lora-http")
    unet = UNet2DConditionModel.from_pretrained(EMBEDDED_MODEL_DIR, subfolder="unet", local_files_only=True)
    gen = torch.Generator().manual_seed(0)
    for name, rank in (("red", 2), ("blue", 3), ("huge", 8)):
        layers = random_layers(unet, ("to_q", "to_k", "to_v", "to_out.0"), rank, gen)
        save_file({f"unet.{k}": v for k, v in layers.items()}, str(d / f"{name}.safetensors"))
    (d / "junk.safetensors").write_bytes(b"\x00" * 64)
    return d


@pytest.fixture(scope="module")
def lora_live(folder) -> Iterator[Live]:
    cfg = EngineConfig(
        device="cpu", dtype="float32", default_steps=3, limits=LimitsConfig(**TEST_LIMITS), lora=LoraConfig(dir=str(folder), max_per_request=2, max_rank=4)
    )
    engine = Engine(cfg).start()
    app = create_app(ServerSettings(), engine=engine)
    with serve_app(app) as url:
        yield Live(url, app, engine)
    engine.shutdown(0)


def body(**kw) -> dict:
    return {"prompt": "a red circle", "size": "64x64", "num_inference_steps": 3, "seed": 5, **kw}


def test_generation_with_adapters_equals_the_engine(lora_live: Live):
    lora = [{"name": "red", "scale": 0.9}, {"name": "blue", "scale": -0.4}]
    resp = httpx.post(lora_live.url + GEN, json=body(lora=lora), timeout=120)
    assert resp.status_code == 200, resp.text
    got = decode_png(resp.json()["data"][0]["b64_json"])
    direct = lora_live.engine.generate_sync(GenerationRequest(prompt="a red circle", steps=3, seed=5, lora=[("red", 0.9), ("blue", -0.4)]))
    assert psnr(got, direct.to_pil()[0]) > 60
    plain = httpx.post(lora_live.url + GEN, json=body(), timeout=120)
    assert psnr(got, decode_png(plain.json()["data"][0]["b64_json"])) < 40  # the adapters change the image


@pytest.mark.parametrize(
    ("lora", "words"),
    [
        ([{"name": "nope"}], "no adapter 'nope'"),
        ([{"name": "red"}, {"name": "blue"}, {"name": "huge"}], "at most 2"),
        ([{"name": "junk"}], "could not read"),
        ([{"name": "huge"}], "rank 8"),
        ([{"name": "red"}, {"name": "red", "scale": 0.5}], "more than once"),
        ([{"name": "red", "scale": 1000}], "between -100 and 100"),
    ],
)
def test_bad_adapters_are_400(lora_live: Live, lora, words):
    resp = httpx.post(lora_live.url + GEN, json=body(lora=lora), timeout=60)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == "lora" and words in err["message"], err


def test_wrong_shape_is_422(lora_live: Live):
    resp = httpx.post(lora_live.url + GEN, json=body(lora=[{"name": "red", "weight": 1}]), timeout=60)
    assert resp.status_code == 422


def test_lora_off_is_400(live: Live):
    resp = httpx.post(live.url + GEN, json=body(lora=[{"name": "red"}]), timeout=60)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "lora" and "not served" in resp.json()["error"]["message"]
    models = httpx.get(live.url + "/v1/models").json()
    assert "lora_adapters" not in models["data"][0]
    assert httpx.get(live.url + "/readyz").json()["load"]["adapters"] == []


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_edit_takes_lora_as_a_json_field(lora_live: Live):
    files = {"image": ("p.png", _png(), "image/png")}
    ok = httpx.post(
        lora_live.url + "/v1/images/edits",
        files=files,
        data={"prompt": "a red circle", "num_inference_steps": "4", "seed": "3", "lora": json.dumps([{"name": "blue", "scale": 0.7}])},
        timeout=120,
    )
    assert ok.status_code == 200, ok.text
    huge = '[{"name": "blue", "scale": ' + "9" * 400 + "}]"  # an integer no float holds
    for bad, words in (
        ("not json", "JSON list"),
        (json.dumps({"name": "blue"}), "JSON list"),
        (json.dumps([{"name": "nope"}]), "no adapter"),
        (huge, "finite"),
    ):
        resp = httpx.post(lora_live.url + "/v1/images/edits", files=files, data={"prompt": "a red circle", "lora": bad}, timeout=60)
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == "lora" and words in resp.json()["error"]["message"]


def test_models_readyz_and_metrics_name_the_adapters(lora_live: Live):
    httpx.post(lora_live.url + GEN, json=body(lora=[{"name": "red"}]), timeout=120).raise_for_status()
    models = httpx.get(lora_live.url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "synerdiff-default"
    assert models["data"][0]["lora_adapters"] == ["blue", "huge", "junk", "red"]
    ready = httpx.get(lora_live.url + "/readyz").json()
    assert "red" in ready["load"]["adapters"]
    text = lora_live.metrics()
    assert metric_value(text, "synerdiff_lora_loads_total") >= 1
    assert metric_value(text, "synerdiff_lora_adapters_loaded") >= 1
    assert metric_value(text, "synerdiff_lora_load_seconds_count") >= 1
