"""The README's path, as processes: `synerdiff serve`, `synerdiff generate`, and SIGTERM draining."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from .httpkit import decode_png, metric_value, wait_until

_SCRIPT = Path(sys.executable).parent / "synerdiff"
# The console script the README uses; `python -m` when the package is not installed with scripts.
SYNERDIFF = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "synerdiff.cli"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNERDIFF_")}
    env.update(extra)
    return env


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*SYNERDIFF, *args], capture_output=True, text=True, timeout=timeout, env=env or _env())


class Served:
    def __init__(self, port: int, log: Path, drain_timeout: float = 60, env: dict[str, str] | None = None):
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.proc = subprocess.Popen(
            [*SYNERDIFF, "serve", "--port", str(port), "--device", "cpu", "--drain-timeout", str(drain_timeout), "--default-steps", "4"],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            env=env or _env(),
        )

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            return httpx.get(self.url + "/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False


@contextmanager
def running(port: int, log: Path, **kw: Any) -> Iterator[Served]:
    """A `synerdiff serve` process, ready; killed at the end if it is still running."""
    srv = Served(port, log, **kw)
    try:
        wait_until(srv.ready, timeout=120, what="synerdiff serve ready")
        yield srv
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()


@pytest.fixture(scope="module")
def served(free_port, tmp_path_factory) -> Iterator[Served]:
    with running(free_port(), tmp_path_factory.mktemp("serve") / "server.log") as srv:
        yield srv


def test_help_texts():
    top = _run("--help")
    assert top.returncode == 0 and "serve" in top.stdout and "generate" in top.stdout
    serve = _run("serve", "--help")
    for flag in ("--model", "--host", "--port", "--device", "--dtype", "--max-rows", "--policy", "--drain-timeout"):
        assert flag in serve.stdout
    gen = _run("generate", "--help")
    for flag in ("--output", "--url", "--size", "--steps", "--seed", "--n"):
        assert flag in gen.stdout


def test_bench_without_the_bench_distribution_says_how_to_install_it():
    for command in ("bench", "profile"):
        # A None entry in sys.modules makes `import synerdiff_bench` fail as if it were not installed.
        code = f"import sys; sys.modules['synerdiff_bench'] = None; from synerdiff.cli import main; sys.exit(main([{command!r}, '--help']))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=_env())
        assert out.returncode == 2 and "pip install -e bench" in out.stderr, out.stderr


def test_settings_precedence_flags_over_env_over_file(tmp_path: Path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"port": 1111, "engine": {"device": "cpu", "scheduler": {"max_rows": 5, "policy": "continuous"}}}))
    env = _env(SYNERDIFF_PORT="2222", SYNERDIFF_ENGINE__SCHEDULER__MAX_ROWS="6")
    out = _run("serve", "--config", str(cfg), "--max-rows", "7", "--print-config", env=env)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["engine"]["scheduler"]["max_rows"] == 7  # flag beats env and file
    assert got["port"] == 2222  # env beats file
    assert got["engine"]["device"] == "cpu" and got["engine"]["scheduler"]["policy"] == "continuous"  # file beats defaults
    defaults = json.loads(_run("serve", "--print-config").stdout)
    assert (defaults["host"], defaults["port"]) == ("127.0.0.1", 8000)
    bad = _run("serve", "--max-rows", "0", "--print-config")
    assert bad.returncode == 2 and "max_rows" in bad.stderr


def test_unloadable_model_exits_nonzero(free_port, tmp_path: Path):
    out = _run("serve", "--model", str(tmp_path / "nope"), "--port", str(free_port()), "--device", "cpu", timeout=120)
    assert out.returncode == 1
    assert "not a diffusers model directory" in out.stdout + out.stderr


def test_generate_cli_writes_pngs(served: Served, tmp_path: Path):
    out = _run("generate", "a red circle", "-o", str(tmp_path / "out.png"), "--url", served.url, "--steps", "5", "--seed", "3")
    assert out.returncode == 0, out.stderr
    assert "5/5 steps" in out.stderr  # the progress bar reached the end
    img = Image.open(tmp_path / "out.png")
    assert img.format == "PNG" and img.size == (64, 64)
    two = _run("generate", "two squares", "-o", str(tmp_path / "sq.png"), "--url", served.url, "--n", "2", "--size", "64x128", "-q")
    assert two.returncode == 0, two.stderr
    assert [Image.open(tmp_path / f"sq-{i}.png").size for i in range(2)] == [(64, 128), (64, 128)]
    bad = _run("generate", "x", "-o", str(tmp_path / "bad.png"), "--url", served.url, "--steps", "100000")
    assert bad.returncode == 1 and "num_inference_steps" in bad.stderr
    assert not (tmp_path / "bad.png").exists()


def test_sigterm_drains_in_flight_then_exits_zero(served: Served):
    result: dict = {}

    def slow() -> None:
        body = {"prompt": "drain me", "size": "128x128", "num_inference_steps": 40, "seed": 1}
        result["response"] = httpx.post(served.url + "/v1/images/generations", json=body, timeout=120)

    client = threading.Thread(target=slow)
    client.start()
    wait_until(
        lambda: metric_value(httpx.get(served.url + "/metrics").text, "synerdiff_requests_running") == 1,
        what="request running",
    )
    served.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: httpx.get(served.url + "/readyz").status_code == 503, timeout=5, what="readiness off")
    assert httpx.get(served.url + "/readyz").json()["status"] == "draining"
    try:
        late = httpx.post(served.url + "/v1/images/generations", json={"prompt": "too late"}, timeout=10)
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        assert late.headers["X-SynerDiff-Not-Started"] == "1"
    except httpx.ConnectError:
        pass  # the drain already finished and the listener closed: also a refusal
    client.join(timeout=120)
    resp = result["response"]
    assert resp.status_code == 200, resp.text
    assert decode_png(resp.json()["data"][0]["b64_json"]).size == (128, 128)
    assert served.proc.wait(timeout=60) == 0
    log = served.log.read_text()
    assert "drain complete" in log
    # Timestamped log lines (YYYY-MM-DD HH:MM:SS).
    assert time.strftime("%Y-") in log


def test_fp8_precision_without_fp8_hardware_exits_naming_the_reason(free_port):
    """A CPU (or a GPU without FP8 tensor cores) refuses precision fp8 at start, before loading the model."""
    env = _env(SYNERDIFF_ENGINE__PRECISION="fp8")
    out = _run("serve", "--port", str(free_port()), "--device", "cpu", env=env, timeout=120)
    assert out.returncode == 1
    said = out.stdout + out.stderr
    assert "precision fp8 needs a CUDA GPU with FP8 tensor cores" in said and "compute capability 8.9" in said, said[-2000:]
    bad = _run("serve", "--print-config", env=_env(SYNERDIFF_ENGINE__PRECISION="fp8", SYNERDIFF_ENGINE__DTYPE="float16"))
    assert bad.returncode == 2 and "dtype float16 cannot be combined" in bad.stderr
