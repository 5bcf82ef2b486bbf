"""POST /v1/images/edits on a real server: the official openai client, the engine's own image
through HTTP, and a 4xx naming the part for each client mistake."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from openai import OpenAI
from PIL import Image

from synerdiff.api import create_app
from synerdiff.cli import _sse_events
from synerdiff.contract.config import ServerSettings
from synerdiff.engine import GenerationRequest

from .httpkit import Live, decode_png, psnr, serve_app


def png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def picture(width: int = 64, height: int = 64) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // width, y * 255 // height, ((x + y) * 2) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(arr)


PICTURE = picture()


@pytest.fixture(scope="module")
def client(live: Live) -> OpenAI:
    return OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(live: Live, files: dict, data: dict | None = None, url: str | None = None) -> httpx.Response:
    return httpx.post((url or live.url) + "/v1/images/edits", files=files, data=data or {}, timeout=60)


def test_openai_client_edit_equals_the_engines_img2img(client: OpenAI, live: Live):
    resp = client.images.edit(
        image=("picture.png", png(PICTURE), "image/png"),
        prompt="a red circle",
        n=2,
        size="64x64",
        response_format="b64_json",
        extra_body={"strength": 0.6, "seed": 7, "num_inference_steps": 5, "sampler": "ddim", "negative_prompt": "blurry"},
    )
    images = [decode_png(d.b64_json) for d in resp.data]
    assert [i.size for i in images] == [(64, 64), (64, 64)]
    info = resp.to_dict()["synerdiff"]
    assert info["seed"] == 7 and info["steps"] == 3  # int(5 * 0.6) steps of the schedule run
    direct = live.engine.generate_sync(
        GenerationRequest(
            prompt="a red circle",
            negative_prompt="blurry",
            n=2,
            steps=5,
            seed=7,
            sampler="ddim",
            image=PICTURE,
            strength=0.6,
            guidance_scale=live.engine.default_guidance(),
        )
    ).to_pil()
    for got, want in zip(images, direct, strict=True):
        assert psnr(got, want) >= 40
    other = live.engine.generate_sync(
        GenerationRequest(prompt="a red circle", negative_prompt="blurry", steps=5, seed=7, sampler="ddim", image=picture(64, 64).rotate(90), strength=0.6)
    ).to_pil()[0]
    assert psnr(images[0], other) < psnr(images[0], direct[0]) - 15  # the picture matters


def test_size_defaults_to_the_pictures_own_and_jpeg_webp_are_read(live: Live):
    for fmt in ("JPEG", "WEBP"):
        r = post(live, {"image": ("p", png(picture(72, 56), fmt), "application/octet-stream")}, {"prompt": "x", "num_inference_steps": "2", "strength": "1"})
        assert r.status_code == 200, r.text
        assert r.json()["size"] == "72x56"
        assert decode_png(r.json()["data"][0]["b64_json"]).size == (72, 56)


def test_grey_and_palette_pictures_are_read_as_rgb(live: Live):
    for img in (Image.new("I;16", (64, 64), 3000), picture().convert("P"), picture().convert("RGBA")):
        r = post(live, {"image": ("p.png", png(img), "image/png")}, {"prompt": "x", "num_inference_steps": "2"})
        assert r.status_code == 200, (img.mode, r.text)


def test_an_upload_above_the_body_limit_is_accepted(live: Live):
    # Noise does not compress: a PNG well over the 1 MiB JSON body limit.
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (640, 640, 3), dtype=np.uint8))
    data = png(big)
    assert len(data) > live.state.settings.max_body_bytes
    r = post(live, {"image": ("p.png", data, "image/png")}, {"prompt": "x", "size": "64x64", "num_inference_steps": "2", "strength": "0.5"})
    assert r.status_code == 200, r.text


def _truncated() -> bytes:
    data = png(picture())
    return data[: len(data) // 2]


def _mask(mode: str, size: tuple[int, int] = (64, 64)) -> bytes:
    return png(Image.new(mode, size))


@pytest.mark.parametrize(
    ("files", "data", "status", "param"),
    [
        ({"image": ("a.txt", b"hello, not a picture", "text/plain")}, {}, 400, "image"),
        ({"image": ("a.png", _truncated(), "image/png")}, {}, 400, "image"),
        ({"image": ("a.gif", png(picture(), "GIF"), "image/gif")}, {}, 400, "image"),
        ({"image": ("a.png", b"", "image/png")}, {}, 400, "image"),
        ({}, {}, 400, "image"),
        ({"image": ("a.png", png(PICTURE), "image/png")}, {"prompt": None}, 400, "prompt"),
        ({"image": ("a.png", png(PICTURE), "image/png")}, {"strength": "1.5"}, 400, "strength"),
        ({"image": ("a.png", png(PICTURE), "image/png")}, {"strength": "abc"}, 400, "strength"),
        ({"image": ("a.png", png(PICTURE), "image/png")}, {"strength": "0.01", "num_inference_steps": "10"}, 400, "strength"),
        ({"image": ("a.png", png(PICTURE), "image/png")}, {"n": "two"}, 400, "n"),
        ({"image": ("a.png", png(PICTURE), "image/png")}, {"num_inference_step": "3"}, 400, "num_inference_step"),
        ({"image": ("a.png", png(PICTURE), "image/png")}, {"sampler": "heun"}, 400, "sampler"),
        ({"image": ("a.png", png(PICTURE), "image/png")}, {"size": "64xx"}, 400, "size"),
        ({"image": ("a.png", png(PICTURE), "image/png")}, {"size": "60x64"}, 400, "size"),
        ({"image": ("a.png", png(PICTURE), "image/png")}, {"response_format": "url"}, 400, "response_format"),
        ({"image": ("a.png", png(PICTURE), "image/png"), "mask": ("m.png", _mask("RGBA", (32, 32)), "image/png")}, {}, 400, "mask"),
        ({"image": ("a.png", png(PICTURE), "image/png"), "mask": ("m.png", _mask("RGB"), "image/png")}, {}, 400, "mask"),
        ({"image": ("a.png", png(PICTURE), "image/png"), "mask": ("m.jpg", png(Image.new("RGB", (64, 64)), "JPEG"), "image/jpeg")}, {}, 400, "mask"),
        ({"image": ("a.png", png(PICTURE), "image/png"), "prompt": ("p.txt", b"x", "text/plain")}, {}, 400, "prompt"),
    ],
)
def test_client_mistakes_are_4xx_naming_the_part(live: Live, files, data, status, param):
    form = {"prompt": "a red circle", "num_inference_steps": "2", **data}
    form = {k: v for k, v in form.items() if v is not None}
    r = post(live, files, form)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_not_multipart_is_415(live: Live):
    r = httpx.post(live.url + "/v1/images/edits", json={"prompt": "x"}, timeout=30)
    assert r.status_code == 415 and r.json()["error"]["param"] == "body"


@pytest.fixture(scope="module")
def small_limits(live: Live) -> Iterator[str]:
    app = create_app(ServerSettings(max_upload_bytes=4096, max_upload_pixels=100 * 100), engine=live.engine)
    with serve_app(app) as url:
        yield url


def test_upload_limits_bytes_and_pixels(live: Live, small_limits: str):
    noisy = png(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    r = post(live, {"image": ("p.png", noisy, "image/png")}, {"prompt": "x"}, url=small_limits)
    assert r.status_code == 413 and "SYNERDIFF_MAX_UPLOAD_BYTES" in r.json()["error"]["message"]
    flat = png(Image.new("RGB", (200, 200)))  # small file, too many pixels
    assert len(flat) < 4096
    r = post(live, {"image": ("p.png", flat, "image/png")}, {"prompt": "x"}, url=small_limits)
    assert r.status_code == 413 and r.json()["error"]["param"] == "image", r.text


def test_mask_transparent_pixels_are_repainted(client: OpenAI, live: Live):
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))  # OpenAI's convention: transparent = repaint
    resp = client.images.edit(
        image=("picture.png", png(PICTURE), "image/png"),
        mask=("mask.png", png(mask), "image/png"),
        prompt="a red circle",
        extra_body={"strength": 0.9, "seed": 8, "num_inference_steps": 5, "sampler": "euler"},
    )
    got = decode_png(resp.data[0].b64_json)
    white_repaints = Image.new("L", (64, 64), 0)
    white_repaints.paste(255, (16, 16, 48, 48))
    kw = dict(prompt="a red circle", steps=5, seed=8, sampler="euler", image=PICTURE, strength=0.9, guidance_scale=live.engine.default_guidance())
    direct = live.engine.generate_sync(GenerationRequest(mask=white_repaints, **kw)).to_pil()[0]
    unmasked = live.engine.generate_sync(GenerationRequest(**kw)).to_pil()[0]
    assert psnr(got, direct) >= 40
    assert psnr(got, unmasked) < psnr(got, direct) - 15


def test_cli_generate_with_image_and_mask(live: Live, tmp_path, capsys):
    from synerdiff.cli import main

    (tmp_path / "in.png").write_bytes(png(PICTURE))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))
    (tmp_path / "mask.png").write_bytes(png(mask))
    out = tmp_path / "out.png"
    args = ["generate", "a red circle", "--url", live.url, "--image", str(tmp_path / "in.png"), "--steps", "4", "--seed", "3", "-o", str(out), "-q"]
    assert main([*args, "--mask", str(tmp_path / "mask.png"), "--strength", "0.5"]) == 0
    assert Image.open(out).size == (64, 64)
    capsys.readouterr()
    assert main([a for a in args if a != "-q"] + ["--strength", "0.5"]) == 0
    assert "2/2 steps" in capsys.readouterr().err  # the edit's progress: half of 4 steps run
    assert main([*args, "--strength", "2"]) == 1
    assert "strength" in capsys.readouterr().err


def test_streamed_edit_progress_then_images_then_done(live: Live):
    files = {"image": ("a.png", png(PICTURE), "image/png"), "mask": ("m.png", _mask("RGBA"), "image/png")}
    data = {"prompt": "a red circle", "n": "2", "num_inference_steps": "6", "strength": "0.5", "seed": "4", "sampler": "euler"}
    with httpx.stream("POST", live.url + "/v1/images/edits", files=files, data={**data, "stream": "true"}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [(ev, json.loads(body)) for ev, body in _sse_events(r.iter_lines())]
    # strength 0.5 of 6 steps runs the schedule's last 3
    assert [ev for ev, _ in events] == ["progress"] * 3 + ["image", "image", "done"]
    assert [(d["step"], d["total"]) for ev, d in events if ev == "progress"] == [(1, 3), (2, 3), (3, 3)]
    images = [d for ev, d in events if ev == "image"]
    assert [d["type"] for d in images] == ["image_edit.completed"] * 2 and [d["index"] for d in images] == [0, 1]
    plain = post(live, files, data).json()["data"]
    for got, want in zip(images, plain, strict=True):
        assert decode_png(got["b64_json"]).tobytes() == decode_png(want["b64_json"]).tobytes()


def test_openai_client_reads_a_streamed_edit(client: OpenAI, live: Live):
    stream = client.images.edit(
        image=("picture.png", png(PICTURE), "image/png"),
        prompt="a red circle",
        size="64x64",
        stream=True,
        extra_body={"strength": 0.6, "seed": 7, "num_inference_steps": 5, "sampler": "ddim"},
    )
    completed = [ev for ev in stream if ev.type == "image_edit.completed"]
    assert len(completed) == 1
    want = live.engine.generate_sync(
        GenerationRequest(prompt="a red circle", steps=5, seed=7, sampler="ddim", image=PICTURE, strength=0.6, guidance_scale=live.engine.default_guidance())
    ).to_pil()[0]
    assert psnr(decode_png(completed[0].b64_json), want) >= 40


def test_a_bad_streamed_edit_is_refused_before_the_stream(live: Live):
    r = post(live, {"image": ("a.png", png(PICTURE), "image/png")}, {"prompt": "x", "stream": "yes"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"
    r = post(live, {"image": ("a.png", png(PICTURE), "image/png")}, {"prompt": "x", "stream": "true", "strength": "2"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "strength"
