"""The operator's only channel to engine pods: their HTTP API (`GET /metrics`, `PUT /v1/admin/scheduler`).

Reads are best effort with short timeouts: an unreachable pod yields no reading, never a zero
(treating an unknown metric as 0 is how autoscalers scale healthy pools down).
"""

from __future__ import annotations

import json
import statistics
import urllib.error
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from synerdiff.contract import metrics
from synerdiff.contract.admin import ADMIN_SCHEDULER_PATH
from synerdiff_operator.manifests import ENGINE_CONTAINER


def pod_base_url(pod: dict[str, Any], container_name: str = ENGINE_CONTAINER) -> str | None:
    """http://<podIP>:<the container's port named 'http'> of a ready pod (the engine's by default), else None."""
    status = pod.get("status") or {}
    ip = status.get("podIP")
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    if not ip or not ready or (pod.get("metadata") or {}).get("deletionTimestamp"):
        return None
    for container in (pod.get("spec") or {}).get("containers") or []:
        if container.get("name") != container_name:
            continue
        for port in container.get("ports") or []:
            if port.get("name") == "http":
                host = f"[{ip}]" if ":" in ip else ip
                return f"http://{host}:{port['containerPort']}"
    return None


def gauge_values(text: str, name: str) -> list[float]:
    values = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                values.append(float(sample.value))
    return values


def fetch_metrics(base_url: str, timeout: float) -> str | None:
    try:
        with urllib.request.urlopen(f"{base_url}/metrics", timeout=timeout) as resp:  # noqa: S310 - pod IPs only
            body: bytes = resp.read()
            return body.decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError):
        return None


def live_threshold(pods: list[dict[str, Any]], *, timeout: float = 1.0, sample: int = 3) -> float | None:
    """Mean scheduler threshold over up to `sample` ready pods; None when no pod answered."""
    readings: list[float] = []
    urls = [u for u in (pod_base_url(p) for p in pods) if u is not None][:sample]
    for url in urls:
        text = fetch_metrics(url, timeout)
        if text is None:
            continue
        try:
            readings.extend(gauge_values(text, metrics.THRESHOLD))
        except ValueError:
            continue
    return statistics.fmean(readings) if readings else None


def engine_start(text: str) -> dict[str, Any] | None:
    """{"startupSeconds", "compileCache"[, "modelCommit"]} from an engine's /metrics; None before it is ready."""
    seconds = gauge_values(text, metrics.STARTUP_SECONDS)
    if not seconds or seconds[0] <= 0:
        return None
    state = commit = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == metrics.COMPILE_CACHE and sample.value == 1:
                state = sample.labels.get("state")
            elif sample.name == metrics.MODEL_INFO and sample.value == 1:
                commit = sample.labels.get("commit") or None
    out: dict[str, Any] = {"startupSeconds": round(seconds[0], 1), "compileCache": state}
    if commit:
        out["modelCommit"] = commit
    return out


def new_engine_starts(pods: list[dict[str, Any]], known: set[str], *, timeout: float = 1.0) -> dict[str, dict[str, Any]]:
    """The starts of ready pods not in `known`, by pod name: one scrape per pod, once in its life."""
    out: dict[str, dict[str, Any]] = {}
    for pod in pods:
        name = (pod.get("metadata") or {}).get("name")
        url = pod_base_url(pod)
        if not name or name in known or url is None:
            continue
        text = fetch_metrics(url, timeout)
        try:
            reading = engine_start(text) if text is not None else None
        except ValueError:
            reading = None
        if reading is not None:
            out[name] = reading
    return out


def put_scheduler(base_url: str, body: dict[str, Any], token: str, timeout: float) -> str | None:
    """PUT /v1/admin/scheduler; None on success, else why it failed (for the pool's status)."""
    request = urllib.request.Request(
        f"{base_url}{ADMIN_SCHEDULER_PATH}",
        data=json.dumps(body).encode(),
        method="PUT",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310 - pod IPs only
            resp.read()
        return None
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")[:300]
        return f"HTTP {exc.code}: {detail}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"unreachable: {exc}"
