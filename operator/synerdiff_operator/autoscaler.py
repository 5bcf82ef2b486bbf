"""The outer feedback loop's I/O: scrape the pods, decide (`scaling.py`), then act and report.

One `step()` per pool per `autoscaling.periodSeconds`, from the operator's own task (no kopf
timer: timers add finalizers, which this operator avoids). Blocking I/O; the handlers run it in
a worker thread. It acts only through

- `spec.replicas` of the pool (a merge patch, as `kubectl scale` or an HPA would write it; the
  reconciler then sizes the Deployment), so the pool's /scale subresource means the same thing
  whoever scales;
- `controller.kubernetes.io/pod-deletion-cost` on the ready pods that should go first on a
  scale-down (the fewest requests running), so the ReplicaSet removes idle engines and the
  engines' SIGTERM drain has the least to finish;
- `PUT /v1/admin/scheduler` on the ready pods (threshold tuning), with the pool's admin token;
- `status.desiredReplicas`, `status.lastScaleTime` and `status.autoscaler`.

Per-pool memory (readings, recommendations, what each pod was sent) lives here and is lost on
an operator restart; `decide` then waits a full scale-down delay before any scale-down.
"""

from __future__ import annotations

import base64
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from synerdiff.contract.admin import ADMIN_SCHEDULER_PATH
from synerdiff.contract.metrics import ROUTER_BUFFERED
from synerdiff_operator import engine_client, manifests, prometheus, scaling, signals, status
from synerdiff_operator.kube import KIND_REFS, ApiException, Kube
from synerdiff_operator.reconciler import POOL_REF, utc_now
from synerdiff_operator.spec import InvalidSpec, PoolSpec, parse_spec

log = logging.getLogger("synerdiff_operator.autoscaler")

ANN_DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
ANN_SCALE_DOWN = "synerdiff.io/scale-down-candidate"
# Well below anything a person would set, so our candidates go before any hand-ranked pod.
DELETION_COST = "-1000"
HISTORY_LEN = 10
IDLE_RECHECK_S = 30.0  # how soon a pool without autoscaling or tuning is looked at again
# Readings that move with every scrape (rates, percentiles, and the messages quoting them): written
# when something else in the status changes, else at most once per heartbeat. The reason, the pod
# counts, the queue (waiting, running) and the knobs are written as soon as they change; at rest
# none of them moves.
HEARTBEAT_FIELDS = frozenset(
    {"message", "arrivalRate", "throughput", "queueWaitP99Seconds", "latencyP99Seconds", "sloAttainment", "tuningMessage", "capacityPerReplica"}
)


@dataclass
class PodMemory:
    sample: signals.EngineSample
    time: float  # when the pod was scraped (the loop's clock)
    # The sample before it. Through Prometheus, two periods can return the same scrape; the rate then
    # still spans the two newest distinct scrapes.
    before: tuple[signals.EngineSample, float] | None = None
    step: float | None = None  # the loop step (its clock) that read `sample`


@dataclass
class PoolLoop:
    history: deque[signals.PoolMetrics] = field(default_factory=lambda: deque(maxlen=4096))
    pods: dict[str, PodMemory] = field(default_factory=dict)  # pod uid -> last good sample
    scaler: scaling.ScalerState = field(default_factory=scaling.ScalerState)
    tuner: scaling.TuneState = field(default_factory=scaling.TuneState)
    pushed: dict[str, dict[str, float]] = field(default_factory=dict)  # pod uid -> knobs it runs with
    next_due: float = 0.0
    last_write: float | None = None  # when the loop last wrote the status (the loop's clock)
    last_scale_time: str | None = None
    events: list[dict[str, Any]] | None = None  # status history, seeded from the pool's status


@dataclass
class StepReport:
    pool: dict[str, Any]
    decision: scaling.Decision | None
    tuning: scaling.TuneDecision | None
    metrics: signals.PoolMetrics
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message) for the pool


def is_ready(pod: dict[str, Any]) -> bool:
    return engine_client.pod_base_url(pod) is not None


def is_terminating(pod: dict[str, Any]) -> bool:
    return bool((pod.get("metadata") or {}).get("deletionTimestamp"))


def scale_down_candidates(pods: list[dict[str, Any]], running: dict[str, float], remove: int) -> list[str]:
    """Names of the ready pods to go first: the fewest requests running (unknown last), then
    the youngest (the ReplicaSet's own tie-break), at most `remove`.

    Pods that are not ready are removed first by the ReplicaSet anyway, so they use up the
    removal count before any ready pod needs a mark.
    """
    live = [p for p in pods if not is_terminating(p)]
    unready = sum(1 for p in live if not is_ready(p))
    need = max(0, remove - unready)
    ready = sorted((p for p in live if is_ready(p)), key=lambda p: p["metadata"]["name"])
    # Stable sorts, last key first: youngest first among equals, then fewest running.
    ready.sort(key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "", reverse=True)
    ready.sort(key=lambda p: running.get(Autoscaler._uid(p), float("inf")))
    return [p["metadata"]["name"] for p in ready[:need]]


class Autoscaler:
    def __init__(
        self,
        kube: Kube,
        *,
        scrape_timeout: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], str] = utc_now,
        workers: int = 8,
        gpu_budget: int | None = None,
        heartbeat_seconds: float = 60.0,
        scrape_budget_seconds: float | None = None,
    ) -> None:
        self.kube = kube
        self.heartbeat_seconds = heartbeat_seconds
        # The longest one pool's scrape round may take; pods not answered by then are unknown.
        self.scrape_budget_seconds = scrape_budget_seconds if scrape_budget_seconds is not None else 2 * scrape_timeout
        self.scrape_timeout = scrape_timeout
        self.gpu_budget = gpu_budget
        self._gpus: dict[tuple[str, str], int] = {}  # GPUs each pool asks for (spec.replicas x gpu.count), as last seen
        self.clock = clock
        self.wall = wall
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scrape")
        self._loops: dict[tuple[str, str], PoolLoop] = {}
        self._guard = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def forget(self, namespace: str, name: str) -> None:
        with self._guard:
            self._loops.pop((namespace, name), None)
            self._gpus.pop((namespace, name), None)

    def gpu_room(self, namespace: str, name: str) -> int | None:
        """GPUs the operator-wide budget leaves to this pool: the budget less what the other
        pools ask for (as last seen by their own steps)."""
        if self.gpu_budget is None:
            return None
        with self._guard:
            others = sum(g for key, g in self._gpus.items() if key != (namespace, name))
        return max(0, self.gpu_budget - others)

    def due(self, namespace: str, name: str) -> bool:
        with self._guard:
            loop = self._loops.get((namespace, name))
        return loop is None or self.clock() >= loop.next_due

    def _loop(self, namespace: str, name: str) -> PoolLoop:
        with self._guard:
            return self._loops.setdefault((namespace, name), PoolLoop())

    # ------------------------------------------------------------------------------------ step
    def step(self, namespace: str, name: str) -> StepReport | None:
        loop = self._loop(namespace, name)
        pool = self.kube.get(POOL_REF.path(namespace, name))
        if pool is None or (pool.get("metadata") or {}).get("deletionTimestamp"):
            self.forget(namespace, name)
            return None
        try:
            spec = parse_spec(pool.get("spec"))
        except InvalidSpec:
            loop.next_due = self.clock() + IDLE_RECHECK_S  # the reconciler reports it
            return None
        a = spec.autoscaling
        if not (a.enabled or a.tune_thresholds):
            loop.next_due = self.clock() + IDLE_RECHECK_S
            return None
        now = self.clock()
        loop.next_due = now + a.period_seconds
        if loop.events is None:
            previous = pool.get("status") or {}
            loop.events = list(((previous.get("autoscaler") or {}).get("history")) or [])[-HISTORY_LEN:]
            loop.last_scale_time = previous.get("lastScaleTime")

        with self._guard:
            self._gpus[(namespace, name)] = spec.desired_replicas() * spec.gpu.count
        pods = [p for p in self.kube.list(KIND_REFS["Pod"].path(namespace), manifests.selector_labels(name)) if not is_terminating(p)]
        ready = [p for p in pods if is_ready(p)]
        blocked = [problems[0] for p in pods if not is_ready(p) and (problems := status.diagnose_pods([p], spec.gpu.resource_name))]
        metrics, running = self._observe(
            loop, spec, ready, pending=len(pods) - len(ready), blocked=len(blocked), blocked_reason=blocked[0].message if blocked else None, now=now
        )
        if spec.router.enabled:
            metrics = replace(metrics, buffered=self._buffered(namespace, name))
        loop.history.append(metrics)
        keep = scaling.history_seconds(spec)
        while loop.history and loop.history[0].time < now - keep:
            loop.history.popleft()

        report = StepReport(pool=pool, decision=None, tuning=None, metrics=metrics)
        if a.enabled:
            decision = scaling.decide(spec, list(loop.history), now, loop.scaler, gpu_room=self.gpu_room(namespace, name))
            loop.scaler = decision.state
            report.decision = decision
            if decision.changed:
                if decision.replicas < decision.current:
                    self._mark_for_removal(namespace, pods, running, decision.current - decision.replicas)
                self.kube.patch(POOL_REF.path(namespace, name), {"spec": {"replicas": decision.replicas}})
                with self._guard:
                    self._gpus[(namespace, name)] = decision.replicas * spec.gpu.count
                loop.last_scale_time = self.wall()
                self._remember(loop, decision.reason, decision.message, replicas=decision.replicas)
                report.events.append(("Normal", "Scaled", decision.message))
        if a.tune_thresholds:
            answered = [p for p in ready if self._uid(p) in running]  # an unknown pod gets nothing until it answers
            report.tuning = self._tune(loop, pool, spec, answered, now, report)
        self._write_status(namespace, name, pool, spec, loop, report)
        return report

    def _observe(
        self,
        loop: PoolLoop,
        spec: PoolSpec,
        ready: list[dict[str, Any]],
        *,
        pending: int,
        now: float,
        blocked: int = 0,
        blocked_reason: str | None = None,
    ) -> tuple[signals.PoolMetrics, dict[str, float]]:
        stale = scaling.stale_after(spec)
        taken = self._read(spec, ready, now, stale)
        # A step that runs late (a busy operator) must not make the scrape read by the step just
        # before it stale: a rate over a longer interval is still the rate. Only a pod missed for
        # periods is, and a pause of more than a few periods (autoscaling off and on) is too.
        last_step = loop.history[-1].time if loop.history else None
        late = min(2 * stale, max(0.0, now - last_step - spec.autoscaling.period_seconds)) if last_step is not None else 0.0
        readings, running = [], {}
        for pod in ready:
            uid = self._uid(pod)
            sample, at = taken.get(uid, (None, now))
            mem = loop.pods.get(uid)
            previous, interval = None, None
            if sample is not None and mem is not None:
                fresh = at > mem.time + 1e-6
                # The same scrape as last period (Prometheus has not scraped since): the rate still
                # spans the two newest distinct scrapes.
                prev = (mem.sample, mem.time) if fresh else mem.before
                if not fresh:
                    at = mem.time
                limit = stale + (late if fresh and mem.step == last_step else 0.0)
                if prev is not None and 0 < at - prev[1] <= limit:
                    previous, interval = prev[0], at - prev[1]
            readings.append(signals.PodReading(pod["metadata"]["name"], sample, previous, interval))
            if sample is not None:
                if mem is None or at > mem.time + 1e-6:
                    loop.pods[uid] = PodMemory(sample, at, (mem.sample, mem.time) if mem is not None else None, step=now)
                running[uid] = sample.running
                if sample.threshold is not None:
                    pushed = loop.pushed.get(uid)
                    # A restarted engine (or one edited by hand) no longer runs what we sent it.
                    if pushed is not None and (
                        sample.threshold < pushed["threshold_min"] - 1e-6
                        or (sample.skip_cfg_bound is not None and abs(sample.skip_cfg_bound - pushed["skip_cfg_bound"]) > 1e-6)
                    ):
                        loop.pushed.pop(uid, None)
        alive = {self._uid(p) for p in ready}
        for uid in [u for u in loop.pods if u not in alive]:
            loop.pods.pop(uid, None)
            loop.pushed.pop(uid, None)
        metrics = signals.aggregate(
            now, readings, pending=pending, slo_seconds=spec.autoscaling.latency_slo_seconds, blocked=blocked, blocked_reason=blocked_reason
        )
        return metrics, running

    def _read(self, spec: PoolSpec, ready: list[dict[str, Any]], now: float, stale: float) -> dict[str, tuple[signals.EngineSample | None, float]]:
        """Each ready pod's newest sample and when it was taken (the loop's clock): from its own
        /metrics, or from Prometheus when the pool names one."""
        a = spec.autoscaling
        if a.prometheus_url:
            names = {p["metadata"]["name"]: self._uid(p) for p in ready}
            namespace = ready[0]["metadata"].get("namespace", "") if ready else ""
            got = prometheus.read_pods(
                a.prometheus_url, namespace, list(names), selector=a.prometheus_selector, max_age_s=stale, timeout=max(self.scrape_timeout, 2.0)
            )
            return {uid: ((ps.sample, now - ps.age_s) if (ps := got.get(n)) else (None, now)) for n, uid in names.items()}
        urls = {self._uid(p): engine_client.pod_base_url(p) for p in ready}
        futures = {uid: self._pool.submit(self._scrape, url) for uid, url in urls.items() if url}
        concurrent.futures.wait(futures.values(), timeout=self.scrape_budget_seconds)
        # A pod still queued or answering past the budget is unknown this period: one pool with
        # many slow pods must not hold the loop, nor the other pools' scrapes behind it.
        for f in futures.values():
            f.cancel()
        return {uid: (f.result() if f.done() and not f.cancelled() else None, now) for uid, f in futures.items()}

    def _buffered(self, namespace: str, name: str) -> float | None:
        """Requests the pool's routers hold for want of a ready engine (None: no router answered)."""
        routers = self.kube.list(KIND_REFS["Pod"].path(namespace), manifests.router_selector_labels(name))
        urls = [u for p in routers if not is_terminating(p) and (u := engine_client.pod_base_url(p, manifests.ROUTER_CONTAINER))]
        texts = [f.result() for f in [self._pool.submit(engine_client.fetch_metrics, u, self.scrape_timeout) for u in urls]]
        values = [sum(engine_client.gauge_values(t, ROUTER_BUFFERED)) for t in texts if t is not None]
        return sum(values) if values else None

    def _scrape(self, url: str) -> signals.EngineSample | None:
        text = engine_client.fetch_metrics(url, self.scrape_timeout)
        if text is None:
            return None
        try:
            return signals.parse(text)
        except signals.BadSample:
            return None

    @staticmethod
    def _uid(pod: dict[str, Any]) -> str:
        meta = pod.get("metadata") or {}
        uid: str = meta.get("uid") or meta["name"]
        return uid

    def _mark_for_removal(self, namespace: str, pods: list[dict[str, Any]], running: dict[str, float], remove: int) -> None:
        chosen = set(scale_down_candidates(pods, running, remove))
        stamp = self.wall()
        for pod in pods:
            annotations = (pod.get("metadata") or {}).get("annotations") or {}
            name = pod["metadata"]["name"]
            path = KIND_REFS["Pod"].path(namespace, name)
            if name in chosen:
                body: dict[str, Any] = {"metadata": {"annotations": {ANN_DELETION_COST: DELETION_COST, ANN_SCALE_DOWN: stamp}}}
            elif ANN_SCALE_DOWN in annotations:
                # A candidate of an earlier scale-down that survived it: busy again, maybe.
                body = {"metadata": {"annotations": {ANN_DELETION_COST: None, ANN_SCALE_DOWN: None}}}
            else:
                continue
            try:
                self.kube.patch(path, body)
            except ApiException as exc:
                if exc.status != 403:
                    raise
                # No right to patch pods in this namespace (the chart grants it per namespace):
                # the scale-down goes ahead, and the ReplicaSet picks the pod.
                log.warning(f"cannot mark pod {namespace}/{name} for scale-down: {exc.status} {exc.reason}")
                return

    def _remember(self, loop: PoolLoop, reason: str, message: str, **extra: Any) -> None:
        assert loop.events is not None
        loop.events.append({"time": self.wall(), "reason": reason, "message": message[:512], **extra})
        del loop.events[:-HISTORY_LEN]

    # ---------------------------------------------------------------------------------- tuning
    def _token(self, namespace: str, spec: PoolSpec) -> str | None:
        ref = spec.auth.admin_token_secret or spec.auth.api_token_secret
        if ref is None:
            return None
        secret = self.kube.get(KIND_REFS["Secret"].path(namespace, ref.name))
        raw = ((secret or {}).get("data") or {}).get(ref.key)
        if not raw:
            return None
        try:
            return base64.b64decode(raw).decode().strip() or None
        except (ValueError, UnicodeDecodeError):
            return None

    def _tune(self, loop: PoolLoop, pool: dict[str, Any], spec: PoolSpec, ready: list[dict[str, Any]], now: float, report: StepReport) -> scaling.TuneDecision:
        namespace = pool["metadata"]["namespace"]
        decision = scaling.tune(spec, list(loop.history), now, loop.tuner)
        loop.tuner = decision.state
        if decision.changed:
            self._remember(loop, "Tuned" + decision.reason, decision.message, thresholdMin=decision.target.threshold_min)
            report.events.append(("Normal", "ThresholdTuned", decision.message))
        body = decision.target.body()
        todo = [p for p in ready if loop.pushed.get(self._uid(p)) != body]
        if not todo:
            return decision
        try:
            token = self._token(namespace, spec)
        except ApiException as exc:
            return _failed(decision, f"cannot read the admin token Secret: {exc.status} {exc.reason}")
        if token is None:
            return _failed(decision, "no admin token: set auth.adminTokenSecret (or auth.apiTokenSecret) to a Secret with the token")
        failures = []
        for pod in todo:
            url = engine_client.pod_base_url(pod)
            if url is None:
                continue
            error = engine_client.put_scheduler(url, body, token, self.scrape_timeout * 2)
            if error is None:
                loop.pushed[self._uid(pod)] = dict(body)
            else:
                failures.append(f"{pod['metadata']['name']}: {error}")
        if failures:
            return _failed(decision, f"PUT {ADMIN_SCHEDULER_PATH} failed on " + "; ".join(failures))
        return decision

    # ---------------------------------------------------------------------------------- status
    def _write_status(self, namespace: str, name: str, pool: dict[str, Any], spec: PoolSpec, loop: PoolLoop, report: StepReport) -> None:
        m = report.metrics

        def num(x: float | None, digits: int = 3) -> float | None:
            return None if x is None else round(float(x), digits)

        attained, counted = scaling.slo_attainment(
            list(loop.history), m.time, max(float(spec.autoscaling.scale_up_window_seconds), spec.autoscaling.period_seconds)
        )
        body: dict[str, Any] = {
            "readyPods": m.ready,
            "pendingPods": m.pending,
            "scrapedPods": m.scraped,
            "unknownPods": m.unknown,
            "waiting": num(m.waiting),
            "running": num(m.running),
            "arrivalRate": num(m.arrival_rate),
            "throughput": num(m.throughput),
            "queueWaitP99Seconds": num(m.queue_wait_p99),
            "latencyP99Seconds": num(m.latency_p99),
            "sloAttainment": num(attained, 4) if counted else None,
            "history": loop.events or None,
        }
        status: dict[str, Any] = {}
        d = report.decision
        if d is not None:
            status["desiredReplicas"] = d.replicas
            if loop.last_scale_time:
                status["lastScaleTime"] = loop.last_scale_time
            body.update(reason=d.reason, message=d.message[:1024], mode="panic" if d.panic else "stable", capacityPerReplica=num(d.capacity))
        t = report.tuning
        if t is not None:
            body.update(tuningReason=t.reason, tuningMessage=t.message[:1024], thresholdMin=t.target.threshold_min, skipCfgBound=t.target.skip_cfg_bound)
        status["autoscaler"] = {k: v for k, v in body.items() if v is not None}
        previous = pool.get("status") or {}
        # Clear fields that became unknown: a stale number would be read as a fact.
        for key in previous.get("autoscaler") or {}:
            if key not in status["autoscaler"]:
                status["autoscaler"][key] = None
        if not needs_write(previous, status, loop.last_write, report.metrics.time, self.heartbeat_seconds):
            return
        self.kube.patch(POOL_REF.path(namespace, name, "status"), {"status": status})
        loop.last_write = report.metrics.time


def needs_write(previous: dict[str, Any], status: dict[str, Any], last_write: float | None, now: float, heartbeat_s: float) -> bool:
    """Whether merging `status` into `previous` is worth a write: at once when anything but the
    moving readings would change, else when those would and the heartbeat is due."""
    old_auto = previous.get("autoscaler") or {}
    new_auto = status.get("autoscaler") or {}
    changed = {k for k, v in status.items() if k != "autoscaler" and previous.get(k) != v}
    changed |= {k for k, v in new_auto.items() if old_auto.get(k) != v}
    if not changed:
        return False
    # A reading that became unknown is cleared at once: a stale number would be read as a fact.
    if changed - HEARTBEAT_FIELDS or any(new_auto.get(k) is None for k in changed):
        return True
    return last_write is None or now - last_write >= heartbeat_s


def _failed(decision: scaling.TuneDecision, message: str) -> scaling.TuneDecision:
    return scaling.TuneDecision(decision.target, "PushFailed", message, decision.state, decision.changed)
