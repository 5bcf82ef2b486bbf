"""Systems under test behind one small interface: our engine in-process, or a server over HTTP.

A system takes a request and a completion callback and returns at once (the load is open
loop: arrivals never wait for the system). The callback gets a status and whatever
timings the system can report; it may run on any thread and is called exactly once.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from synerdiff.contract.config import EngineConfig
from synerdiff.engine import Cancelled, Engine, EngineError, QueueFull, RequestError, TimedOut
from synerdiff.models.loader import ModelBundle

from .workload import BenchRequest

# status: "ok", "rejected" (refused for load), "error:<reason>", "unfinished" (abandoned by the harness)
DoneFn = Callable[[str, dict[str, Any]], None]


class System(Protocol):
    name: str
    kind: str

    def start(self) -> None: ...

    def submit(self, request: BenchRequest, done: DoneFn) -> None: ...

    def abort_all(self) -> None:
        """Drop queued work and cancel what can be cancelled: the harness gave up on it."""

    def idle(self) -> bool: ...

    def close(self) -> None: ...

    def describe(self) -> dict[str, Any]: ...


class EngineSystem:
    """One engine (any policy) on the shared model weights."""

    kind = "engine"

    def __init__(self, name: str, config: EngineConfig, model: ModelBundle | None):
        self.name = name
        self.config = config
        self._model = model
        self.engine: Engine | None = None
        self._live: dict[str, Any] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        self.engine = Engine(self.config, model=self._model).start()

    def submit(self, request: BenchRequest, done: DoneFn) -> None:
        assert self.engine is not None
        try:
            handle = self.engine.submit(request.to_engine())
        except QueueFull:
            done("rejected", {})
            return
        except RequestError as exc:
            done(f"error:invalid-{exc.field}", {})
            return
        except EngineError as exc:
            done(f"error:{exc.reason}", {})
            return
        with self._lock:
            self._live[handle.request_id] = handle

        def finished(fut: Future) -> None:
            with self._lock:
                self._live.pop(handle.request_id, None)
            exc = fut.exception()
            if exc is None:
                res = fut.result()
                t = res.timings
                done(
                    "ok",
                    {
                        "queue_wait_s": t.queue_wait_s,
                        "inference_s": t.inference_s,
                        "decode_wait_s": t.decode_wait_s,
                        "decode_s": t.decode_s,
                        "cfg_skipped": res.guided_steps_skipped,
                    },
                )
            elif isinstance(exc, Cancelled):
                done("unfinished", {})
            elif isinstance(exc, TimedOut):
                done("error:timeout", {})
            else:
                done(f"error:{getattr(exc, 'reason', type(exc).__name__)}", {})

        handle.future.add_done_callback(finished)

    def abort_all(self) -> None:
        with self._lock:
            handles = list(self._live.values())
        for h in handles:
            h.cancel()

    def idle(self) -> bool:
        return self.engine is None or (self.engine.running == 0 and self.engine.waiting == 0)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "engine_config": self.config.model_dump(mode="json")}


class HttpSystem:
    """A running SynerDiff (or any OpenAI-images-compatible) server, driven over HTTP.

    One thread per in-flight request keeps the load open loop; the server's own queue
    decides everything else. Queue wait and per-step time come from the response's
    `synerdiff.timings` when the server is SynerDiff; otherwise only end-to-end latency.
    """

    kind = "http"

    def __init__(self, name: str, url: str, model: str | None = None, token: str | None = None, timeout_s: float = 600.0, workers: int = 512):
        self.name = name
        # Several servers ("http://a:8000;http://b:8000", e.g. one per GPU) are sent requests
        # round-robin: the plain router a pool Service without an inference gateway gives.
        self.urls = [u.strip().rstrip("/") + "/v1/images/generations" for u in url.split(";") if u.strip()]
        self.url = self.urls[0]
        self._next = 0
        self.model = model
        self.token = token
        self.timeout_s = timeout_s
        self._workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._epoch = 0
        self._inflight = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix=f"bench-http-{self.name}")

    def body(self, r: BenchRequest) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt": r.prompt,
            "n": r.n,
            "size": f"{r.width}x{r.height}",  # OpenAI's size is WIDTHxHEIGHT
            "response_format": "b64_json",
            "num_inference_steps": r.steps,
            "guidance_scale": r.guidance,
            "seed": r.seed,
            "sampler": r.sampler,
        }
        if self.model:
            out["model"] = self.model
        return out

    def submit(self, request: BenchRequest, done: DoneFn) -> None:
        assert self._pool is not None
        with self._lock:
            self._inflight += 1
            epoch = self._epoch
        self._pool.submit(self._post, request, done, epoch)

    def _post(self, r: BenchRequest, done: DoneFn, epoch: int) -> None:
        try:
            if epoch != self._epoch:  # aborted before it left the client
                done("unfinished", {})
                return
            data = json.dumps(self.body(r)).encode()
            headers = {"Content-Type": "application/json"}
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
            with self._lock:
                url = self.urls[self._next % len(self.urls)]
                self._next += 1
            req = urllib.request.Request(url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    payload = json.loads(resp.read() or b"{}")
                # SynerDiff servers report engine-side timings under `synerdiff.timings`.
                timings = (payload.get("synerdiff") or {}).get("timings") or payload.get("timings") or {}
                info = {k: v for k, v in timings.items() if isinstance(v, (int, float))}
                images = payload.get("data") or []
                if len(images) != r.n or not all(base64.b64decode(d.get("b64_json", ""), validate=False) for d in images):
                    done("error:bad-response", info)
                else:
                    done("ok", info)
            except urllib.error.HTTPError as exc:
                done("rejected" if exc.code == 429 else f"error:http-{exc.code}", {})
            except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
                done(f"error:{type(exc).__name__}", {})
        finally:
            with self._lock:
                self._inflight -= 1

    def abort_all(self) -> None:
        # Requests already sent cannot be withdrawn; those still queued here are dropped.
        with self._lock:
            self._epoch += 1

    def idle(self) -> bool:
        return self._inflight == 0

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "url": self.url, "urls": self.urls, "model": self.model}


def wait_idle(system: System, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not system.idle():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


__all__ = ["System", "EngineSystem", "HttpSystem", "DoneFn", "wait_idle"]
