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
import contextvars
import logging
import threading
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
from synerdiff_operator.reconciler import Outcome, Reconciler

POOLS = (GROUP, VERSION, PLURAL)
log = logging.getLogger("synerdiff_operator")  # the periodic tasks serve every pool: no per-pool logger


class OperatorOptions(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SYNERDIFF_OPERATOR_")

    resync_seconds: float = Field(30.0, gt=0, description="How often every known pool is reconciled regardless of events.")
    scrape_timeout_seconds: float = Field(1.0, gt=0, description="Timeout of one GET /metrics on an engine pod.")
    autoscale_tick_seconds: float = Field(1.0, gt=0, description="How often the autoscaling task looks for pools whose period is due.")


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

    def get_reconciler(self) -> Reconciler:
        with self.lock:
            if self.reconciler is None:
                self.reconciler = Reconciler(Kube(kube.load_configuration()), scrape_timeout=self.options.scrape_timeout_seconds)
            return self.reconciler

    def get_autoscaler(self) -> Autoscaler:
        kube_client = self.get_reconciler().kube  # one client (and connection pool) for both
        with self.lock:
            if self.autoscaler is None:
                self.autoscaler = Autoscaler(kube_client, scrape_timeout=self.options.scrape_timeout_seconds)
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
    memo.state = State(options=OperatorOptions())


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    state: State = memo.state
    tasks = [t for t in (state.resync_task, state.autoscale_task) if t is not None]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if state.autoscaler is not None:
        state.autoscaler.close()
    if state.reconciler is not None:
        state.reconciler.kube.close()


def _event(obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
    """kopf.event for an object read with our own client: the API's JSON, wrapped in kopf's view of it."""
    kopf.event(kopf.Body(cast(kopf.RawBody, obj)), type=type_, reason=reason, message=message)


def _post(outcome: Outcome) -> None:
    for action in outcome.actions:
        verb, _, what = action.partition(" ")
        _event(outcome.pool, "Normal", verb.capitalize(), f"{verb.capitalize()} {what}")
    for type_, reason, message in outcome.events:
        _event(outcome.pool, type_, reason, message[:1024])


def run_reconcile(state: State, namespace: str, name: str, logger: kopf.Logger) -> Outcome | None:
    """Reconcile and post events; API trouble becomes kopf.TemporaryError (kopf retries it)."""
    try:
        outcome = state.get_reconciler().reconcile(namespace, name)
    except ApiException as exc:
        if exc.status in (401, 403):
            raise kopf.TemporaryError(f"the API refused us ({exc.status} {exc.reason}); check the operator's RBAC", delay=30) from exc
        if exc.status == 409 or exc.status == 429 or exc.status >= 500:
            raise kopf.TemporaryError(f"transient API error {exc.status} {exc.reason}", delay=2) from exc
        raise
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise kopf.TemporaryError(f"cannot reach the API server: {exc}", delay=5) from exc
    if outcome is not None:
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
    outcome = run_reconcile(state, namespace, name, logger)
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


@kopf.on.event("apps", "v1", "deployments", labels={manifests.LABEL_MANAGED_BY: manifests.MANAGER})
def deployment_changed(body: kopf.Body, namespace: str | None, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """Readiness and rollout progress arrive here; a deleted Deployment is recreated."""
    assert namespace is not None, "the engine Deployments are namespaced"
    pool = (body.metadata.labels or {}).get(manifests.LABEL_POOL)
    if not pool:
        return
    try:
        run_reconcile(memo.state, namespace, pool, logger)
    except kopf.TemporaryError as exc:
        logger.warning(f"pool {namespace}/{pool}: {exc}; the periodic resync retries")


async def _every_pool_forever(state: State, period_s: float, work: Callable[[State, str, str, kopf.Logger], object], what: str, logger: logging.Logger) -> None:
    """Every `period_s`, run `work(state, namespace, name, logger)` for each known pool in a thread."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(period_s)
        with state.lock:
            pools = sorted(state.pools)
        for namespace, name in pools:
            # copy_context: kopf.event() finds kopf's event queue through context variables.
            ctx = contextvars.copy_context()
            try:
                await loop.run_in_executor(None, ctx.run, work, state, namespace, name, logger)
            except kopf.TemporaryError as exc:
                logger.warning(f"{what} of {namespace}/{name}: {exc}")
            except Exception:  # one broken pool must not stop the others
                logger.exception(f"{what} of {namespace}/{name} failed")


async def _resync_forever(state: State, logger: logging.Logger) -> None:
    await _every_pool_forever(state, state.options.resync_seconds, run_reconcile, "resync", logger)


def run_autoscale(state: State, namespace: str, name: str, logger: kopf.Logger) -> None:
    autoscaler = state.get_autoscaler()
    if not autoscaler.due(namespace, name):
        return
    try:
        report = autoscaler.step(namespace, name)
    except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
        logger.warning(f"autoscaling {namespace}/{name}: {exc}; retried next period")
        return
    if report is None:
        return
    for type_, reason, message in report.events:
        _event(report.pool, type_, reason, message[:1024])
        logger.info(f"{namespace}/{name}: {reason}: {message}")


async def _autoscale_forever(state: State, logger: logging.Logger) -> None:
    """Each tick, steps every pool whose autoscaling period is due (pools without it are cheap:
    the autoscaler looks at them again only every IDLE_RECHECK_S)."""
    await _every_pool_forever(state, state.options.autoscale_tick_seconds, run_autoscale, "autoscaling", logger)
