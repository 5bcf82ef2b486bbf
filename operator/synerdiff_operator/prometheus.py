"""Read the pods' engine metrics from a Prometheus server instead of scraping each pod.

With `autoscaling.prometheusURL` set, the loop sends two instant queries per period to
`/api/v1/query`: every series `signals.from_samples` needs, for the pool's ready pods, and the
timestamp of each pod's newest `synerdiff_requests_waiting` sample. A pod is found by the labels
`namespace` and `pod`, which a Prometheus Operator PodMonitor or the usual `kubernetes_sd`
relabelling attach. `autoscaling.prometheusSelector` adds matchers such as `job="synerdiff"`.

Unknowns stay unknown here as in a direct scrape. A pod Prometheus has no series for, or whose
newest sample is older than the loop's staleness limit, reads as None. A scrape that failed
leaves the target's series stale, so its old values are never used as current. An unreachable
or failing Prometheus makes every pod None for that period, so the loop holds.
"""

from __future__ import annotations

import json
import logging
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from synerdiff_operator import signals

log = logging.getLogger("synerdiff_operator.prometheus")

_SELECTOR = re.compile(r'^\s*([a-zA-Z_][a-zA-Z0-9_]*\s*(=|!=|=~|!~)\s*"(?:[^"\\]|\\.)*"\s*(,\s*|$))*$')


class PrometheusError(RuntimeError):
    pass


@dataclass(frozen=True)
class PodSample:
    sample: signals.EngineSample
    age_s: float  # how long before the query the pod was last scraped


def valid_selector(selector: str) -> bool:
    """Label matchers as inside `{...}`: `job="x", env=~"prod|staging"` (empty is fine)."""
    return bool(_SELECTOR.match(selector))


def matchers(namespace: str, pods: Iterable[str], selector: str = "") -> str:
    names = "|".join(re.escape(p) for p in sorted(set(pods)))
    parts = [f'namespace="{namespace}"', f'pod=~"{names}"']
    if selector.strip():
        parts.append(selector.strip().rstrip(","))
    return ", ".join(parts)


def series_query(namespace: str, pods: Iterable[str], selector: str = "") -> str:
    names = "|".join(re.escape(n) for n in signals.SERIES)
    return f'{{__name__=~"{names}", {matchers(namespace, pods, selector)}}}'


def timestamp_query(namespace: str, pods: Iterable[str], selector: str = "") -> str:
    return f"timestamp({signals.WAITING}{{{matchers(namespace, pods, selector)}}})"


def _value(raw: Any) -> float:
    return float(raw[1])  # [unix time, "value"]; Prometheus writes NaN and ±Inf as strings float() reads


def samples_by_pod(
    series: Sequence[Mapping[str, Any]], stamps: Sequence[Mapping[str, Any]], eval_time: float, max_age_s: float, pods: Iterable[str]
) -> dict[str, PodSample | None]:
    """Pure: two instant-vector results -> each pod's engine sample, or None when it is unknown."""
    grouped: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for s in series:
        labels = dict(s.get("metric") or {})
        pod = labels.get("pod")
        if pod is None:
            continue
        grouped.setdefault(pod, []).append((labels.pop("__name__", ""), labels, _value(s["value"])))
    newest: dict[str, float] = {}
    for s in stamps:
        pod = (s.get("metric") or {}).get("pod")
        if pod is not None:
            newest[pod] = max(newest.get(pod, float("-inf")), _value(s["value"]))
    out: dict[str, PodSample | None] = {}
    for pod in pods:
        age = eval_time - newest[pod] if pod in newest else None
        if pod not in grouped or age is None or age > max_age_s:
            out[pod] = None
            continue
        try:
            out[pod] = PodSample(signals.from_samples(grouped[pod]), max(0.0, age))
        except signals.BadSample:
            out[pod] = None
    return out


def instant(url: str, query: str, timeout: float, headers: Mapping[str, str] | None = None) -> tuple[list[dict[str, Any]], float]:
    """GET /api/v1/query: (the instant vector, its evaluation time). Raises PrometheusError."""
    req = urllib.request.Request(url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": query}), headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise PrometheusError(f"{url}: {exc}") from None
    if body.get("status") != "success" or (body.get("data") or {}).get("resultType") != "vector":
        raise PrometheusError(f"{url}: {body.get('errorType', 'unexpected answer')}: {body.get('error', body.get('data'))}")
    result = body["data"]["result"]
    # Every sample of an instant vector carries the evaluation time; an empty one has none.
    eval_time = float(result[0]["value"][0]) if result else 0.0
    return result, eval_time


def read_pods(
    url: str, namespace: str, pods: list[str], *, selector: str = "", max_age_s: float, timeout: float = 2.0, headers: Mapping[str, str] | None = None
) -> dict[str, PodSample | None]:
    """Each pod's newest engine sample from Prometheus; None for every pod when Prometheus fails."""
    if not pods:
        return {}
    try:
        stamps, eval_time = instant(url, timestamp_query(namespace, pods, selector), timeout, headers)
        if not stamps:
            return {p: None for p in pods}
        series, _ = instant(url, series_query(namespace, pods, selector), timeout, headers)
    except PrometheusError as exc:
        log.warning("Prometheus query failed; the pods read as unknown this period: %s", exc)
        return {p: None for p in pods}
    return samples_by_pod(series, stamps, eval_time, max_age_s, pods)
