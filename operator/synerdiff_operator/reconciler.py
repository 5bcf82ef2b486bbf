"""One reconcile pass for one pool: validate, apply children, observe them, write status.

Blocking I/O (kopf runs sync handlers in threads). Every pass re-reads the pool and its children,
so it is idempotent and safe after a restart; a per-pool lock keeps the handlers, the child
watcher and the periodic resync from interleaving on the same pool.
"""

from __future__ import annotations

import datetime
import json
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from synerdiff_operator import API_VERSION, PLURAL, engine_client, manifests, patching, status
from synerdiff_operator.kube import KIND_REFS, ApiException, Kube, Ref
from synerdiff_operator.spec import InvalidSpec, PoolSpec, check_name, parse_spec

POOL_REF = Ref(API_VERSION, PLURAL)


class ChildConflict(Exception):
    """A child's name is taken by an object another controller (or a previous pool) owns."""


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass
class Outcome:
    pool: dict[str, Any]
    status: dict[str, Any]
    spec_error: str | None = None
    child_error: tuple[str, str] | None = None
    actions: list[str] = field(default_factory=list)
    events: list[tuple[str, str, str]] = field(default_factory=list)
    desired_replicas: int | None = None  # what the valid spec asks for (None while it is invalid)


class Reconciler:
    def __init__(
        self,
        kube: Kube,
        *,
        scrape_timeout: float = 1.0,
        clock: Callable[[], str] = utc_now,
        stuck_creating_seconds: float = status.STUCK_CREATING_SECONDS,
        heartbeat_seconds: float = 60.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube = kube
        self.heartbeat_seconds = heartbeat_seconds
        self.monotonic = monotonic
        self._written: dict[tuple[str, str], float] = {}  # when each pool's status was last written
        self.scrape_timeout = scrape_timeout
        self.stuck_creating_seconds = stuck_creating_seconds
        self.clock = clock
        self._guard = threading.Lock()
        self._locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        with self._guard:
            return self._locks[(namespace, name)]

    def forget(self, namespace: str, name: str) -> None:
        with self._guard:
            self._locks.pop((namespace, name), None)
            self._written.pop((namespace, name), None)

    def reconcile(self, namespace: str, name: str) -> Outcome | None:
        """None when the pool is gone or being deleted (garbage collection removes the children)."""
        with self._lock(namespace, name):
            pool = self.kube.get(POOL_REF.path(namespace, name))
            if pool is None or (pool.get("metadata") or {}).get("deletionTimestamp"):
                return None
            return self._reconcile(pool)

    def _reconcile(self, pool: dict[str, Any]) -> Outcome:
        meta = pool["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        spec: PoolSpec | None = None
        spec_error: str | None = None
        try:
            check_name(name)
            spec = parse_spec(pool.get("spec"))
        except InvalidSpec as exc:
            spec_error = str(exc)

        actions: list[str] = []
        child_error: tuple[str, str] | None = None
        seen: dict[str, dict[str, Any]] = {}  # kind -> the child as the API server last returned it
        if spec is not None:
            child_meta = {"name": name, "namespace": namespace, "uid": meta["uid"], "generation": meta.get("generation")}
            for child in manifests.children(child_meta, spec):
                try:
                    action = self.apply(child, meta["uid"], seen)
                except ChildConflict as exc:
                    child_error = ("ChildConflict", str(exc))
                    break
                except ApiException as exc:
                    if exc.status not in (400, 422):
                        raise
                    child_error = ("ChildRejected", f"{child['kind']} {child['metadata']['name']} was rejected: {_api_message(exc)}")
                    break
                if action:
                    actions.append(action)
            if child_error is None and not spec.router.enabled:
                parked = self._park_router(namespace, name, meta["uid"])
                if parked:
                    actions.append(parked)

        # The Deployment as apply() just read or wrote it: one GET less per pass.
        deployment = seen["Deployment"] if "Deployment" in seen else self.kube.get(KIND_REFS["Deployment"].path(namespace, name))
        if deployment is not None and patching.controller_uid(deployment) != meta["uid"]:
            deployment = None  # someone else's; never report its pods as ours
        pods = self.kube.list(KIND_REFS["Pod"].path(namespace), manifests.selector_labels(name)) if deployment else []
        live = engine_client.live_threshold(pods, timeout=self.scrape_timeout) if pods else None
        known_starts = {str(e.get("pod")) for e in (pool.get("status") or {}).get("engineStarts") or [] if isinstance(e, dict)}
        new_starts = engine_client.new_engine_starts(pods, known_starts, timeout=self.scrape_timeout) if pods else {}
        # Volume trouble is only in Events; read them only while some pod still waits for its
        # containers, so a pool at rest costs no list of the namespace's Events.
        pod_events = (
            self.kube.list(KIND_REFS["Event"].path(namespace), fields={"involvedObject.kind": "Pod", "type": "Warning"})
            if any(status.is_creating(p) for p in pods)
            else []
        )

        previous = pool.get("status") or {}
        observation = status.Observation(
            name=name,
            generation=meta.get("generation"),
            now=self.clock(),
            spec_error=spec_error,
            configured_threshold=spec.engine.scheduler.threshold if spec else None,
            desired_replicas=spec.desired_replicas() if spec else None,
            deployment=deployment,
            pods=pods,
            live_threshold=live,
            previous=previous,
            child_error=child_error,
            pod_events=pod_events,
            new_starts=new_starts,
            stuck_creating_seconds=self.stuck_creating_seconds,
            model_source=spec.model.identity() if spec else None,
            adapters_source=spec.adapters.identity() if spec and spec.adapters else None,
        )
        new_status = status.compute(observation, spec.gpu.resource_name if spec else "nvidia.com/gpu")
        if self._worth_writing(namespace, name, previous, new_status):
            self.kube.patch(POOL_REF.path(namespace, name, "status"), {"status": new_status})
            with self._guard:
                self._written[(namespace, name)] = self.monotonic()
        return Outcome(
            pool=pool,
            status=new_status,
            spec_error=spec_error,
            child_error=child_error,
            actions=actions,
            events=status.transitions(previous, new_status),
            desired_replicas=spec.desired_replicas() if spec else None,
        )

    def _worth_writing(self, namespace: str, name: str, previous: dict[str, Any], new: dict[str, Any]) -> bool:
        """Anything changed but the engines' live threshold: write now. Only that (the adaptive
        controllers move it under load): at most once per heartbeat."""
        if status.same_status(previous, new):
            return False
        if not status.same_status(previous, {k: v for k, v in new.items() if k != "threshold"}) or previous.get("threshold") is None:
            return True
        with self._guard:
            last = self._written.get((namespace, name))
        return last is None or self.monotonic() - last >= self.heartbeat_seconds

    def _park_router(self, namespace: str, pool: str, owner_uid: str) -> str | None:
        """A pool that turned its router off keeps the router's objects (the operator deletes
        nothing; the pool's own deletion removes them) but runs no router pod."""
        path = KIND_REFS["Deployment"].path(namespace, manifests.router_name(pool))
        live = self.kube.get(path)
        if live is None or patching.controller_uid(live) != owner_uid or (live.get("spec") or {}).get("replicas") == 0:
            return None
        self.kube.patch(path, {"spec": {"replicas": 0}})
        return f"scaled Deployment {manifests.router_name(pool)} to 0 (router disabled)"

    def apply(self, desired: dict[str, Any], owner_uid: str, seen: dict[str, dict[str, Any]] | None = None) -> str | None:
        """Create or patch one child; returns what was done ("created Service x"), None if in sync.
        `seen[kind]` gets the child as the API server last returned it (read, created or patched)."""
        ref = KIND_REFS[desired["kind"]]
        namespace, name = desired["metadata"]["namespace"], desired["metadata"]["name"]
        live = self.kube.get(ref.path(namespace, name))
        if live is not None and patching.controller_uid(live) != owner_uid:
            raise ChildConflict(f"{desired['kind']} {name} exists but is not controlled by this DiffusionPool; rename or delete it")
        body = patching.plan(live, desired)
        result: dict[str, Any] | None = live
        action = None
        if body is not None and live is None:
            result = self.kube.create(ref.path(namespace), body)
            action = f"created {desired['kind']} {name}"
        elif body is not None:
            result = self.kube.patch(ref.path(namespace, name), body)
            action = f"updated {desired['kind']} {name}"
        if seen is not None and isinstance(result, dict):
            seen[desired["kind"]] = result
        return action


def _api_message(exc: ApiException) -> str:
    try:
        return json.loads(exc.body or "{}").get("message") or str(exc.reason)
    except ValueError:
        return str(exc.reason)
