"""kmock's Kubernetes emulator on loopback, and the real kopf operator pointed at it.

kmock's emulator stores objects and serves list/watch/get/create/merge-patch/delete, but assigns
no uid, generation or resourceVersion, ignores label selectors and has no garbage collector.
`Emulator` adds the metadata a real API server maintains; `Cluster.collect_garbage()` plays the
GC when a test asks; the operator filters label selectors itself.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import json
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kmock
import kopf

REPO_ROOT = Path(__file__).resolve().parents[2]

POOLS = "synerdiff.io/v1alpha1/diffusionpools"
WRITES = {"POST", "PATCH", "PUT", "DELETE"}
NS = "default"
_names = itertools.count(1)
_versions = itertools.count(1)


def merge(base: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(base) if isinstance(base, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge(out.get(key), value)
    return out


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator plus the object metadata a real API server maintains.

    uid, creationTimestamp and generation on create, generateName (kopf names its events that
    way), a generation bump when a patch changes the spec, and a new resourceVersion on every
    write: the operator's ownerReferences and observedGeneration, and kopf's own bookkeeping,
    depend on them.
    """

    async def _handle(self, request: Any) -> Any:
        data = request.data
        if request.resource is not None and isinstance(data, dict):
            if request.action == kmock.action.CREATE:
                meta = data.setdefault("metadata", {})
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = f"{meta['generateName']}{next(_names):05d}"
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("generation", 1)
                meta.setdefault("creationTimestamp", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
            elif request.action == kmock.action.UPDATE and request.subresource is None and "spec" in data:
                key = (request.resource, request.namespace, request.name)
                if key in self.objects and not self.objects[key].deleted:
                    current = self.objects[key].raw
                    if merge(current.get("spec"), data["spec"]) != current.get("spec"):
                        data.setdefault("metadata", {})["generation"] = current["metadata"].get("generation", 1) + 1
            if request.action in (kmock.action.CREATE, kmock.action.UPDATE):
                # kopf tells its own patches from watch events queued before them by the
                # resourceVersion; without one, it handles a pool again for each stale event.
                data.setdefault("metadata", {})["resourceVersion"] = str(next(_versions))
        return await super()._handle(request)


class LeanEmulator(Emulator):
    """The test emulator with a short request log: kmock matches every request against its whole
    log, which makes a long run with many pools quadratic in the emulator rather than in the
    operator. The operator's calls are recorded in `calls` instead."""

    KEEP = 64

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # (time, method, plural[/subresource], namespace, name) of each call the operator made
        self.calls: list[tuple[float, str, str, str | None, str | None]] = []
        self.bodies: list[tuple[float, Any]] = []  # (time, what) each write sent

    async def _handle(self, request: Any) -> Any:
        method = str(getattr(request.method, "value", request.method))
        if request.resource is not None and request.headers.get("Authorization") == "Bearer test-token":
            sub = f"/{request.subresource}" if request.subresource else ""
            self.calls.append((time.monotonic(), method, f"{request.resource.plural}{sub}", request.namespace, request.name))
            if method in WRITES:
                self.bodies.append((time.monotonic(), request.data))
        if len(self._requests) > 2 * self.KEEP:
            del self._requests[: -self.KEEP]
        return await super()._handle(request)

    def writes(self, since: float, until: float = float("inf")) -> list[tuple[float, str, str, str | None, str | None]]:
        return [c for c in self.calls if since <= c[0] < until and c[1] in WRITES]


def pool_body(name: str, spec: dict[str, Any], *, namespace: str = NS) -> dict[str, Any]:
    return {
        "apiVersion": "synerdiff.io/v1alpha1",
        "kind": "DiffusionPool",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


class Cluster:
    def __init__(self, server: Emulator) -> None:
        self.k = server

    # --- the API server's part ---------------------------------------------------------------
    async def create_pool(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        resp = await self.k.post(f"/apis/synerdiff.io/v1alpha1/namespaces/{NS}/diffusionpools", json=pool_body(name, spec))
        assert resp.status == 200, await resp.text()
        return await resp.json()

    async def update_spec(self, name: str, spec_patch: dict[str, Any]) -> int:
        await self.patch(POOLS, name, {"spec": spec_patch})
        return self.obj(POOLS, name)["metadata"]["generation"]

    async def patch(self, resource: str, name: str, body: dict[str, Any], subresource: str | None = None) -> None:
        path = self.path(resource, name) + (f"/{subresource}" if subresource else "")
        resp = await self.k.patch(path, json=body, headers={"Content-Type": "application/merge-patch+json"})
        assert resp.status == 200, await resp.text()

    async def create(self, resource: str, body: dict[str, Any]) -> None:
        resp = await self.k.post(self.path(resource, None), json=body)
        assert resp.status == 200, await resp.text()

    async def delete(self, resource: str, name: str) -> None:
        resp = await self.k.delete(self.path(resource, name))
        assert resp.status == 200, await resp.text()

    async def collect_garbage(self) -> list[tuple[str, str]]:
        """What Kubernetes' GC does: delete objects whose controller owner no longer exists."""
        live_uids = {o["metadata"].get("uid") for (_, _, _), o in self._items() if o.get("metadata")}
        doomed = []
        for (res, _ns, name), obj in self._items():
            for ref in obj.get("metadata", {}).get("ownerReferences") or []:
                if ref.get("controller") and ref["uid"] not in live_uids:
                    doomed.append((f"{res.group}/{res.version}/{res.plural}".lstrip("/"), name))
        for resource, name in doomed:
            await self.delete(resource, name)
        return doomed

    # --- reading ------------------------------------------------------------------------------
    def _items(self) -> list[tuple[Any, Any]]:
        return [(key, obj.raw) for key, obj in self.k.objects.items() if not obj.deleted]

    @staticmethod
    def path(resource: str, name: str | None) -> str:
        group_version, plural = resource.rsplit("/", 1)
        base = f"/api/{group_version}" if "/" not in group_version else f"/apis/{group_version}"
        return f"{base}/namespaces/{NS}/{plural}" + (f"/{name}" if name else "")

    def obj(self, resource: str, name: str) -> dict[str, Any] | None:
        try:
            view = self.k.objects[resource, NS, name]
        except KeyError:
            return None
        return None if view.deleted else json.loads(json.dumps(view.raw))

    def exists(self, resource: str, name: str) -> bool:
        return self.obj(resource, name) is not None

    def condition(self, name: str, type_: str) -> dict[str, Any] | None:
        pool = self.obj(POOLS, name) or {}
        return next((c for c in (pool.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        found = []
        for request in list(self.k):
            if request.action == kmock.action.CREATE and request.resource is not None and request.resource.plural == "events":
                data = request.data or {}
                if name is None or data.get("involvedObject", {}).get("name") == name:
                    found.append(data)
        return found

    def requests(self) -> list[Any]:
        return list(self.k)

    async def eventually(self, predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for {what or predicate}")
            await asyncio.sleep(0.05)


class OperatorThread:
    """The real kopf operator in its own thread and event loop, as `kopf run` would run it.

    Not a task in the test's loop: on exit kopf cancels every task its loop gained while it ran,
    which would include pytest-asyncio's own.
    """

    def __init__(self, **run: Any) -> None:
        """`run`: more of kopf.run's arguments (peering_name, priority, memo)."""
        self.run_args = {"standalone": True, **run}
        self.stop_flag = threading.Event()
        self.ready_flag = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="kopf-operator", daemon=True)

    def _run(self) -> None:
        try:
            kopf.run(clusterwide=True, stop_flag=self.stop_flag, ready_flag=self.ready_flag, **self.run_args)
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    async def start(self) -> None:
        self.thread.start()
        ok = await asyncio.to_thread(self.ready_flag.wait, 20)
        assert ok and self.error is None, f"the operator did not start: {self.error!r}"

    async def stop(self) -> None:
        self.stop_flag.set()
        await asyncio.to_thread(self.thread.join, 20)
        assert not self.thread.is_alive(), "the operator did not stop"
        assert self.error is None, f"the operator failed: {self.error!r}"
