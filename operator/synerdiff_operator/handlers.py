"""kopf handlers: when to reconcile. What a reconcile does lives in `reconciler.py`.

Triggers: the pool's own create/update/resume; any change to an engine Deployment (rollout
progress, readiness, deletion); and a periodic resync that catches what no watch reports (pods
turning Unschedulable or crash-looping, engines' live scheduler threshold, drifted children).

No finalizers: children carry controller ownerReferences, so Kubernetes' garbage collector
deletes them with the pool, and deleting a pool never waits on the operator being up. (kopf's
timers and daemons would add a finalizer, hence the operator-level resync task instead.)

The outer feedback loop (`autoscaler.py`: scrape the pods, decide replicas and scheduler floors)
runs beside the resync, in a task of its own, for pools with `autoscaling.enabled` or
`autoscaling.tuneThresholds`. It writes only `spec.replicas` (like `kubectl scale`), pod
annotations and its status fields, so the reconcile path stays the only writer of children.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import kopf
import urllib3.exceptions
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from synerdiff_operator import GROUP, PLURAL, VERSION, kube, manifests
from synerdiff_operator.autoscaler import Autoscaler
from synerdiff_operator.kube import ApiException, Kube
from synerdiff_operator.peering import Peering
from synerdiff_operator.reconciler import Outcome, Reconciler
from synerdiff_operator.telemetry import Telemetry

POOLS = (GROUP, VERSION, PLURAL)
log = logging.getLogger("synerdiff_operator")  # the periodic tasks serve every pool: no per-pool logger


class OperatorOptions(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SYNERDIFF_OPERATOR_")

    resync_seconds: float = Field(30.0, gt=0, description="How often every known pool is reconciled regardless of events.")
    scrape_timeout_seconds: float = Field(1.0, gt=0, description="Timeout of one GET /metrics on an engine pod.")
    autoscale_tick_seconds: float = Field(1.0, gt=0, description="How often the autoscaling task looks for pools whose period is due.")
    peering_lifetime_seconds: int = Field(
        20, ge=2, le=3600, description="With peering: how long a silent replica's record counts; a standby takes over at most this long after the leader dies."
    )
    metrics_port: int = Field(0, ge=0, le=65535, description="Port of the operator's /metrics and /readyz server; 0 runs none.")
    scan_crds: bool = Field(True, description="Let kopf watch CustomResourceDefinitions (cluster-scoped); off where the operator only has namespaced Roles.")
    max_parallel_pools: int = Field(8, ge=1, le=256, description="Pools reconciled or autoscaled at once by the periodic tasks (each in a worker thread).")
    status_heartbeat_seconds: float = Field(
        60.0, gt=0, description="Readings that move on every scrape (load, latencies, the live threshold) are written at most this often."
    )
    gpu_budget: int | None = Field(
        None, ge=0, description="Most GPUs the autoscaler may ask for across all pools it scales (spec.replicas x gpu.count); unset: no such budget."
    )
    stuck_creating_seconds: float = Field(
        600.0, gt=0, description="A pod still creating its containers (no init container running) this long after scheduling is StuckCreating."
    )


@dataclass
class State:
    """Shared by every handler: kopf shallow-copies the memo per object, so mutable state sits here."""

    options: OperatorOptions
    reconciler: Reconciler | None = None
    pools: set[tuple[str, str]] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    resync_task: asyncio.Task[None] | None = None
    autoscaler: Autoscaler | None = None
    autoscale_task: asyncio.Task[None] | None = None
    executor: concurrent.futures.ThreadPoolExecutor | None = None
    telemetry: Telemetry = field(default_factory=Telemetry)
    peering: Peering | None = None  # None: standalone, this replica always does the work
    periodic_limit: asyncio.Semaphore | None = None  # shared by the resync and autoscaling tasks
    foreground: int = 0  # event-driven reconciles in flight (a pool or its Deployment changed)

    def enter_foreground(self, delta: int) -> None:
        with self.lock:
            self.foreground += delta

    def get_executor(self) -> concurrent.futures.ThreadPoolExecutor:
        with self.lock:
            if self.executor is None:
                # Both periodic tasks share it and one bound, max_parallel_pools.
                self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=self.options.max_parallel_pools, thread_name_prefix="pool")
            return self.executor

    def get_reconciler(self) -> Reconciler:
        with self.lock:
            if self.reconciler is None:
                self.reconciler = Reconciler(
                    Kube(kube.load_configuration()),
                    scrape_timeout=self.options.scrape_timeout_seconds,
                    stuck_creating_seconds=self.options.stuck_creating_seconds,
                    heartbeat_seconds=self.options.status_heartbeat_seconds,
                )
            return self.reconciler

    def get_autoscaler(self) -> Autoscaler:
        kube_client = self.get_reconciler().kube  # one client (and connection pool) for both
        with self.lock:
            if self.autoscaler is None:
                self.autoscaler = Autoscaler(
                    kube_client,
                    scrape_timeout=self.options.scrape_timeout_seconds,
                    gpu_budget=self.options.gpu_budget,
                    heartbeat_seconds=self.options.status_heartbeat_seconds,
                )
            return self.autoscaler


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    # The same credential sources as our own client, read at call time (tests point $KUBECONFIG anywhere).
    return kube.connection_info(kube.load_configuration())


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Structural schemas prune unknown status fields, so kopf keeps its state in annotations.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP, key="last-handled-configuration")
    # Our own events say what happened; kopf's per-handler chatter stays in the logs.
    settings.posting.level = logging.WARNING
    # kopf's `labels=` filters run in the operator, after every Deployment of the cluster has been
    # listed and streamed to it; the API server applies this selector before anything is sent.
    settings.watching.label_selectors["apps", "v1", "deployments"] = f"{manifests.LABEL_MANAGED_BY}={manifests.MANAGER}"
    options = OperatorOptions()
    # Without cluster-wide rights kopf finds the CRD once through discovery instead of a watch.
    settings.scanning.disabled = not options.scan_crds
    settings.peering.lifetime = options.peering_lifetime_seconds
    state = State(options=options)
    if not settings.peering.standalone:
        state.peering = Peering(settings.peering.name, settings.peering.priority, clusterwide=settings.peering.clusterwide)
    if options.metrics_port:
        state.telemetry.serve("0.0.0.0", options.metrics_port)  # noqa: S104 - scraped from inside the cluster
    state.telemetry.leader.set(1 if state.peering is None else 0)
    state.telemetry.set_ready(True)
    memo.state = state


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    state: State = memo.state
    state.telemetry.set_ready(False)
    state.telemetry.close()
    tasks = [t for t in (state.resync_task, state.autoscale_task) if t is not None]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if state.autoscaler is not None:
        state.autoscaler.close()
    if state.reconciler is not None:
        state.reconciler.kube.close()
    if state.executor is not None:
        state.executor.shutdown(wait=False, cancel_futures=True)


def _event(obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
    """kopf.event for an object read with our own client: the API's JSON, wrapped in kopf's view of it."""
    kopf.event(kopf.Body(cast(kopf.RawBody, obj)), type=type_, reason=reason, message=message)


def _post(outcome: Outcome) -> None:
    for action in outcome.actions:
        verb, _, what = action.partition(" ")
        _event(outcome.pool, "Normal", verb.capitalize(), f"{verb.capitalize()} {what}")
    for type_, reason, message in outcome.events:
        _event(outcome.pool, type_, reason, message[:1024])


def run_reconcile(state: State, namespace: str, name: str, logger: kopf.Logger, trigger: str = "resync") -> Outcome | None:
    """Reconcile and post events; API trouble becomes kopf.TemporaryError (kopf retries it)."""
    telemetry = state.telemetry
    started = time.perf_counter()
    foreground = trigger != "resync"
    if foreground:
        state.enter_foreground(1)
    try:
        outcome = state.get_reconciler().reconcile(namespace, name)
    except ApiException as exc:
        telemetry.reconciles.labels(trigger, "error").inc()
        if exc.status in (401, 403):
            raise kopf.TemporaryError(f"the API refused us ({exc.status} {exc.reason}); check the operator's RBAC", delay=30) from exc
        if exc.status == 409 or exc.status == 429 or exc.status >= 500:
            raise kopf.TemporaryError(f"transient API error {exc.status} {exc.reason}", delay=2) from exc
        raise
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        telemetry.reconciles.labels(trigger, "error").inc()
        raise kopf.TemporaryError(f"cannot reach the API server: {exc}", delay=5) from exc
    finally:
        telemetry.reconcile_seconds.observe(time.perf_counter() - started)
        if foreground:
            state.enter_foreground(-1)
    telemetry.reconciles.labels(trigger, "ok").inc()
    if outcome is not None:
        telemetry.pool(namespace, name, desired=outcome.desired_replicas, ready=outcome.status.get("readyReplicas"))
        _post(outcome)
        for action in outcome.actions:
            logger.info(action)
    return outcome


@kopf.on.resume(*POOLS)
@kopf.on.create(*POOLS)
@kopf.on.update(*POOLS)
def reconcile_pool(namespace: str | None, name: str, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    assert namespace is not None, "DiffusionPool is a namespaced resource"
    state: State = memo.state
    with state.lock:
        state.pools.add((namespace, name))
    outcome = run_reconcile(state, namespace, name, logger, "pool")
    if outcome is None:
        return
    if outcome.spec_error:
        # Retrying cannot fix a spec; the next spec change triggers this handler again.
        raise kopf.PermanentError(f"InvalidSpec: {outcome.spec_error}")
    if outcome.child_error:
        raise kopf.TemporaryError(f"{outcome.child_error[0]}: {outcome.child_error[1]}", delay=30)


def _start_tasks(state: State) -> None:
    # Started from a resource handler, not from startup: kopf.event() needs the event queue that
    # kopf puts in the context of resource handlers only, and tasks inherit their creator's context.
    if state.resync_task is None:
        state.resync_task = asyncio.create_task(_resync_forever(state, log))
    if state.autoscale_task is None:
        state.autoscale_task = asyncio.create_task(_autoscale_forever(state, log))


@kopf.on.event(*POOLS)
async def track_pool(event: kopf.RawEvent, namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    """Keeps the resync's list of pools in step with what kopf watches (its namespaces only)."""
    assert namespace is not None, "DiffusionPool is a namespaced resource"
    state: State = memo.state
    _start_tasks(state)
    with state.lock:
        if event.get("type") == "DELETED":
            state.pools.discard((namespace, name))
        else:
            state.pools.add((namespace, name))
    if event.get("type") == "DELETED" and state.reconciler is not None:
        state.reconciler.forget(namespace, name)
    if event.get("type") == "DELETED" and state.autoscaler is not None:
        state.autoscaler.forget(namespace, name)
    if event.get("type") == "DELETED":
        state.telemetry.forget(namespace, name)


@kopf.on.event("apps", "v1", "deployments", labels={manifests.LABEL_MANAGED_BY: manifests.MANAGER})
def deployment_changed(body: kopf.Body, namespace: str | None, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """Readiness and rollout progress arrive here; a deleted Deployment is recreated."""
    assert namespace is not None, "the engine Deployments are namespaced"
    pool = (body.metadata.labels or {}).get(manifests.LABEL_POOL)
    if not pool:
        return
    try:
        run_reconcile(memo.state, namespace, pool, logger, "deployment")
    except kopf.TemporaryError as exc:
        logger.warning(f"pool {namespace}/{pool}: {exc}; the periodic resync retries")


async def _every_pool_forever(state: State, period_s: float, work: Callable[[State, str, str, kopf.Logger], object], what: str, logger: logging.Logger) -> None:
    """Every `period_s`, run `work(state, namespace, name, logger)` for each known pool in a worker
    thread, at most `max_parallel_pools` at once across both periodic tasks. A pool whose previous
    run has not finished is skipped this period: one slow pool (an API call timing out, engines
    not answering) delays only itself, never the others, and never piles up. Reconciles that an
    event started (a spec change, a Deployment change) go first: a periodic pass waits for them,
    up to one period, so that the API server's capacity serves a change before a routine check."""
    loop = asyncio.get_running_loop()
    if state.periodic_limit is None:
        state.periodic_limit = asyncio.Semaphore(state.options.max_parallel_pools)
    limit = state.periodic_limit
    busy: set[tuple[str, str]] = set()
    tasks: set[asyncio.Task[None]] = set()

    def guarded(namespace: str, name: str) -> object:
        # kopf pauses its own handlers on a standby replica; these tasks are ours to pause.
        if state.peering is not None:
            leading = state.peering.leading(state.get_reconciler().kube, namespace)
            state.telemetry.leader.set(1 if leading else 0)
            if not leading:
                return None
        return work(state, namespace, name, logger)

    async def one(namespace: str, name: str) -> None:
        try:
            deadline = loop.time() + period_s
            while state.foreground > 0 and loop.time() < deadline:
                await asyncio.sleep(0.05)
            async with limit:
                # copy_context: kopf.event() finds kopf's event queue through context variables.
                ctx = contextvars.copy_context()
                await loop.run_in_executor(state.get_executor(), ctx.run, guarded, namespace, name)
        except kopf.TemporaryError as exc:
            logger.warning(f"{what} of {namespace}/{name}: {exc}")
        except Exception:  # one broken pool must not stop the others
            logger.exception(f"{what} of {namespace}/{name} failed")
        finally:
            busy.discard((namespace, name))

    try:
        while True:
            await asyncio.sleep(period_s)
            with state.lock:
                pools = sorted(state.pools)
            for key in pools:
                if key in busy:
                    continue
                busy.add(key)
                task = asyncio.create_task(one(*key))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
    finally:
        for task in tasks:
            task.cancel()


async def _resync_forever(state: State, logger: logging.Logger) -> None:
    await _every_pool_forever(state, state.options.resync_seconds, run_reconcile, "resync", logger)


def run_autoscale(state: State, namespace: str, name: str, logger: kopf.Logger) -> None:
    autoscaler = state.get_autoscaler()
    if not autoscaler.due(namespace, name):
        return
    try:
        report = autoscaler.step(namespace, name)
    except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
        state.telemetry.autoscaler_steps.labels("error").inc()
        logger.warning(f"autoscaling {namespace}/{name}: {exc}; retried next period")
        return
    if report is None:
        return
    state.telemetry.autoscaler_steps.labels("ok").inc()
    if report.decision is not None:
        state.telemetry.scaling_decisions.labels(report.decision.reason).inc()
        state.telemetry.pool(namespace, name, desired=report.decision.replicas, ready=report.metrics.ready)
    for type_, reason, message in report.events:
        _event(report.pool, type_, reason, message[:1024])
        logger.info(f"{namespace}/{name}: {reason}: {message}")


async def _autoscale_forever(state: State, logger: logging.Logger) -> None:
    """Each tick, steps every pool whose autoscaling period is due (pools without it are cheap:
    the autoscaler looks at them again only every IDLE_RECHECK_S)."""
    await _every_pool_forever(state, state.options.autoscale_tick_seconds, run_autoscale, "autoscaling", logger)
