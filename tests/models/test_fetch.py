"""`synerdiff fetch` against a Hub-shaped HTTP server on loopback: which files it asks for, the
commit it pins, and a later pod reusing a pinned download (huggingface_hub's real client)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
from safetensors.torch import load_file, save_file

from synerdiff.contract.config import EMBEDDED_MODEL_DIR
from synerdiff.models.fetch import SOURCE_FILE, adapter_files, pipeline_files, weight_variant
from synerdiff.models.loader import load_model

REPO = "acme/tiny-sd"
FIRST, SECOND = "a" * 40, "b" * 40


@dataclass
class Hub:
    """A repository at one or more commits, and what clients asked of it."""

    root: Path
    main: str = FIRST
    resolves: list[str] = field(default_factory=list)  # revisions asked of the API
    downloads: list[str] = field(default_factory=list)  # files fetched (GET)
    url: str = ""

    def files(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())


def _handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # quiet test output
            pass

        def _send(self, code: int, body: bytes, headers: dict[str, str], head: bool = False) -> None:
            self.send_response(code)
            for k, v in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _route(self, head: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            api = f"/api/models/{REPO}/revision/"
            resolve = f"/{REPO}/resolve/"
            if path.startswith(api):
                rev = path[len(api) :]
                hub.resolves.append(rev)
                commit = hub.main if rev == "main" else rev
                if commit not in (FIRST, SECOND):
                    return self._send(404, b'{"error": "Revision Not Found"}', {"X-Error-Code": "RevisionNotFound"}, head)
                info = {"id": REPO, "modelId": REPO, "sha": commit, "private": False, "siblings": [{"rfilename": f} for f in hub.files()]}
                return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, head)
            if path.startswith(resolve):
                rev, _, name = path[len(resolve) :].partition("/")
                commit = hub.main if rev == "main" else rev
                target = hub.root / name
                if commit not in (FIRST, SECOND) or not target.is_file():
                    return self._send(404, b"not found", {"X-Error-Code": "EntryNotFound"}, head)
                data = target.read_bytes()
                if not head:
                    hub.downloads.append(name)
                etag = '"' + hashlib.sha256(data).hexdigest() + '"'
                return self._send(200, data, {"X-Repo-Commit": commit, "ETag": etag, "Content-Type": "application/octet-stream"}, head)
            self._send(404, b"not found", {}, head)

        def do_GET(self) -> None:
            self._route(head=False)

        def do_HEAD(self) -> None:
            self._route(head=True)

    return Handler


def published_pipeline(root: Path) -> None:
    """The embedded model laid out as published pipelines are, with what they carry besides: an fp16
    variant of the UNet, the UNet's weights again as .bin, a safety checker, a root checkpoint, ONNX, a README."""
    shutil.copytree(EMBEDDED_MODEL_DIR, root)
    index = json.loads((root / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    (root / "model_index.json").write_text(json.dumps(index))
    unet = load_file(root / "unet" / "diffusion_pytorch_model.safetensors")
    save_file({k: v.half() for k, v in unet.items()}, root / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    torch.save(unet, root / "unet" / "diffusion_pytorch_model.bin")
    (root / "safety_checker").mkdir()
    (root / "safety_checker" / "config.json").write_text("{}")
    (root / "safety_checker" / "model.safetensors").write_bytes(b"\0" * 64)
    (root / "v1-5-pruned.ckpt").write_bytes(b"\0" * 64)
    (root / "onnx" / "unet").mkdir(parents=True)
    (root / "onnx" / "unet" / "model.onnx").write_bytes(b"\0" * 64)
    (root / "README.md").write_text("# tiny")


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    """The embedded model as a Hub repository (see published_pipeline)."""
    root = tmp_path / "repo"
    published_pipeline(root)
    h = Hub(root)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(h))
    h.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield h
    server.shutdown()
    server.server_close()


def fetch(hub: Hub, dest: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(dest.parent / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    cmd = [sys.executable, "-m", "synerdiff.cli", "fetch", f"hf://{REPO}", str(dest), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def test_only_what_the_engine_loads_is_downloaded_and_the_commit_is_recorded(hub: Hub, tmp_path: Path) -> None:
    dest = tmp_path / "model"
    proc = fetch(hub, dest, "--dtype", "float16")
    assert proc.returncode == 0, proc.stderr
    loaded = ("unet/", "vae/", "text_encoder/", "tokenizer/", "scheduler/")
    expected = {f for f in hub.files() if f.startswith(loaded)} - {"unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin"}
    assert set(hub.downloads) == expected | {"model_index.json"}
    assert len(hub.downloads) == len(set(hub.downloads))  # model_index.json once, nothing twice
    source = json.loads((dest / SOURCE_FILE).read_text())
    assert source["commit"] == FIRST and source["revision"] == "main" and source["repo"] == REPO
    assert f"{REPO}@{FIRST}" in proc.stdout
    # The fp16-only UNet folder loads (as its variant), here widened to float32 on the CPU.
    model = load_model(dest, "cpu", "float32")
    original = load_file(hub.root / "unet" / "diffusion_pytorch_model.safetensors")
    name, ref = next(iter(original.items()))
    assert torch.equal(model.unet.state_dict()[name], ref.half().float())


def test_float32_takes_the_plain_weights(hub: Hub, tmp_path: Path) -> None:
    proc = fetch(hub, tmp_path / "model", "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr
    assert "unet/diffusion_pytorch_model.safetensors" in hub.downloads
    assert not any(".fp16." in f or f.endswith(".bin") for f in hub.downloads)


def test_a_pinned_download_is_reused_after_the_branch_moves(hub: Hub, tmp_path: Path) -> None:
    dest = tmp_path / "model"
    assert fetch(hub, dest, "--pin-key", "pool-uid/7").returncode == 0
    hub.main = SECOND  # the branch moves on after the first pod
    hub.resolves.clear()
    hub.downloads.clear()
    again = fetch(hub, dest, "--pin-key", "pool-uid/7")
    assert again.returncode == 0, again.stderr
    assert hub.resolves == [] and hub.downloads == []  # no question to the Hub, nothing downloaded
    assert "already held" in again.stdout and json.loads((dest / SOURCE_FILE).read_text())["commit"] == FIRST
    # A new pool generation resolves the branch again and gets the new commit.
    newer = fetch(hub, dest, "--pin-key", "pool-uid/8")
    assert newer.returncode == 0, newer.stderr
    assert hub.resolves == ["main"] and json.loads((dest / SOURCE_FILE).read_text())["commit"] == SECOND


def test_a_repository_that_is_not_a_pipeline_is_refused_by_name(hub: Hub, tmp_path: Path) -> None:
    (hub.root / "model_index.json").unlink()
    proc = fetch(hub, tmp_path / "model")
    assert proc.returncode == 1
    assert "has no model_index.json: not a diffusers pipeline repository" in proc.stderr


def test_an_unknown_revision_is_a_clear_error(hub: Hub, tmp_path: Path) -> None:
    proc = fetch(hub, tmp_path / "model", "--revision", "c" * 40)
    assert proc.returncode == 1 and f"could not download {REPO}@{'c' * 40}" in proc.stderr


@pytest.mark.parametrize(
    "name, variant",
    [
        ("diffusion_pytorch_model.safetensors", None),
        ("diffusion_pytorch_model.fp16.safetensors", "fp16"),
        ("diffusion_pytorch_model.fp16-00001-of-00002.safetensors", "fp16"),
        ("diffusion_pytorch_model-00001-of-00002.safetensors", None),
        ("model.bin", None),
        ("pytorch_model.ema.bin", "ema"),
        ("config.json", None),
    ],
)
def test_weight_variants_are_read_from_file_names(name: str, variant: str | None) -> None:
    assert weight_variant(name) == variant


def test_sharded_variant_weights_come_with_their_index() -> None:
    files = [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
        "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
    ]
    got = pipeline_files({"unet": ["diffusers", "UNet2DConditionModel"]}, files, "float16")
    assert [f for f in got if f.endswith(".safetensors")] == [
        "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
    ]
    assert "unet/diffusion_pytorch_model.safetensors.index.fp16.json" in got


def test_a_flux_repository_gets_its_transformer_and_t5_but_not_what_the_engine_never_reads() -> None:
    """FLUX.1-dev's layout: a sharded transformer and T5 encoder with their index files, T5's
    sentencepiece model; the engine loads no image encoder."""
    files = [
        "model_index.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
        "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
        "transformer/diffusion_pytorch_model-00003-of-00003.safetensors",
        "text_encoder_2/config.json",
        "text_encoder_2/model.safetensors.index.json",
        "text_encoder_2/model-00001-of-00002.safetensors",
        "text_encoder_2/model-00002-of-00002.safetensors",
        "tokenizer_2/spiece.model",
        "tokenizer_2/tokenizer.json",
        "image_encoder/model.safetensors",
        "flux1-dev.safetensors",
    ]
    index = {
        "_class_name": "FluxPipeline",
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
    }
    got = pipeline_files(index, files, "bfloat16")
    assert got == sorted(f for f in files if not f.startswith("image_encoder/") and f != "flux1-dev.safetensors")


def test_a_component_with_only_variant_weights_still_gets_them() -> None:
    files = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.ema.safetensors"]
    index = {"unet": ["diffusers", "UNet2DConditionModel"]}
    for dtype in ("float32", "bfloat16"):
        assert "unet/diffusion_pytorch_model.fp16.safetensors" in pipeline_files(index, files, dtype)


def test_an_unreachable_hub_is_a_clear_error(tmp_path: Path, free_port) -> None:
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HOME": str(tmp_path / "hf-home")}
    env.pop("HF_HUB_OFFLINE", None)
    cmd = [sys.executable, "-m", "synerdiff.cli", "fetch", f"hf://{REPO}", str(tmp_path / "model")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and f"synerdiff fetch: could not download {REPO}@main" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_folder_lock_is_taken_read_only_waits_boundedly_and_is_optional(tmp_path: Path) -> None:
    """single_writer: a lock file this process cannot open for writing is locked through a
    read-only descriptor; a holder that outlives the wait leaves the fetch to go on without it; a
    lock file that cannot be opened at all is no lock, not a failure."""
    import fcntl
    import time

    from synerdiff.models.fetch import LOCK_FILE, single_writer

    (tmp_path / "ro" / LOCK_FILE).mkdir(parents=True)  # opening a folder for writing fails; reading it works
    with single_writer(tmp_path / "ro") as locked:
        assert locked is True
    held = tmp_path / "held"
    held.mkdir()
    fd = os.open(held / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another holder (flock locks belong to an open file, so this conflicts)
    try:
        t0 = time.monotonic()
        with single_writer(held, wait_s=1.5) as locked:
            assert locked is False and 1.4 < time.monotonic() - t0 < 10
    finally:
        os.close(fd)
    with single_writer(held, wait_s=1.5) as locked:
        assert locked is True  # released: taken at once
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / LOCK_FILE).symlink_to(tmp_path / "missing" / "lock")  # cannot be created or opened
    with single_writer(tmp_path / "none") as locked:
        assert locked is False


ADAPTERS = {"style-a.safetensors", "style-b/pytorch_lora_weights.safetensors"}


def adapter_folder(root: Path) -> None:
    """A folder of LoRA adapters as published: the two layouts the engine reads, and what it does not."""
    root.mkdir(parents=True)
    lora = {"lora_unet_down.lora_down.weight": torch.zeros(4, 8), "lora_unet_down.lora_up.weight": torch.zeros(8, 4)}
    save_file(lora, root / "style-a.safetensors")
    (root / "style-b").mkdir()
    save_file(lora, root / "style-b" / "pytorch_lora_weights.safetensors")
    (root / "style-b" / "README.md").write_text("# style b")
    (root / "style-c").mkdir()
    (root / "style-c" / "other_name.safetensors").write_bytes(b"\0" * 16)  # not the name the engine reads
    (root / "deep" / "er").mkdir(parents=True)
    (root / "deep" / "er" / "x.safetensors").write_bytes(b"\0" * 16)
    (root / ".hidden.safetensors").write_bytes(b"\0" * 16)
    (root / "README.md").write_text("# loras")


def test_adapter_files_are_the_layouts_the_engine_reads() -> None:
    files = [
        "style-a.safetensors",
        "style-b/pytorch_lora_weights.safetensors",
        "style-b/README.md",
        "style-c/other_name.safetensors",
        "deep/er/x.safetensors",
        ".hidden.safetensors",
        ".cache/x/pytorch_lora_weights.safetensors",
        "README.md",
        "model.ckpt",
    ]
    assert adapter_files(files) == sorted(ADAPTERS)
    assert adapter_files(["model_index.json", "unet/config.json"]) == []


def test_an_adapters_repository_is_fetched_as_its_adapters_only(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    adapter_folder(root)
    h = Hub(root)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(h))
    h.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dest = tmp_path / "adapters"
        proc = fetch(h, dest, "--adapters", "--pin-key", "pool/1")
        assert proc.returncode == 0, proc.stderr
        assert set(h.downloads) == ADAPTERS and len(h.downloads) == 2
        assert load_file(dest / "style-a.safetensors").keys() == load_file(root / "style-a.safetensors").keys()
        source = json.loads((dest / SOURCE_FILE).read_text())
        assert source["kind"] == "adapters" and source["commit"] == FIRST and sorted(source["files"]) == sorted(ADAPTERS)
        # Pinned: reused without asking the Hub.
        h.resolves.clear()
        again = fetch(h, dest, "--adapters", "--pin-key", "pool/1")
        assert again.returncode == 0 and "already held" in again.stdout and h.resolves == []
        # The same folder fetched as a pipeline is not taken for one.
        assert fetch(h, dest, "--pin-key", "pool/1").returncode == 1
        # An adapter removed from the source leaves the folder at the next (unpinned) fetch.
        (root / "style-a.safetensors").unlink()
        h.main = SECOND
        newer = fetch(h, dest, "--adapters", "--pin-key", "pool/2")
        assert newer.returncode == 0, newer.stderr
        assert not (dest / "style-a.safetensors").exists() and (dest / "style-b" / "pytorch_lora_weights.safetensors").is_file()
        # A repository without adapters is refused by name.
        for f in list(root.rglob("*.safetensors")):
            f.unlink()
        empty = fetch(h, tmp_path / "none", "--adapters")
        assert empty.returncode == 1 and "holds no adapters" in empty.stderr and "Traceback" not in empty.stderr
    finally:
        server.shutdown()
        server.server_close()
