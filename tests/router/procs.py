"""Real processes for the router's loopback tests: `synerdiff serve` engines (embedded model, CPU)
and `synerdiff route` in front of them, as the README runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

from ..server.httpkit import wait_until

_SCRIPT = Path(sys.executable).parent / "synerdiff"
SYNERDIFF = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "synerdiff.cli"]


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SYNERDIFF_")}


class Proc:
    def __init__(self, args: list[str], port: int, log: Path):
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.log = log
        self.proc = subprocess.Popen([*SYNERDIFF, *args, "--port", str(port)], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env())

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.log.name} exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            return httpx.get(self.url + "/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def engine_args(*extra: str) -> list[str]:
    return ["serve", "--device", "cpu", "--default-steps", "4", "--drain-timeout", "60", *extra]


def router_args(upstreams: list[str], *extra: str) -> list[str]:
    args = ["route", "--poll-interval", "0.2", "--default-steps", "4"]
    for u in upstreams:
        args += ["--upstream", u]
    return [*args, *extra]


@contextmanager
def started(*procs: Proc, wait: bool = True, timeout: float = 180) -> Iterator[list[Proc]]:
    with ExitStack() as stack:
        for p in procs:
            stack.callback(p.stop)
        if wait:
            for p in procs:
                wait_until(p.ready, timeout=timeout, what=f"{p.log.name} ready")
        yield list(procs)
