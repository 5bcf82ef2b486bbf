"""Plot a sweep's JSON (run on a machine with matplotlib; the GPU machine has none).

Four panels against offered load, one line per system: P99 latency, mean latency,
throughput (with the offered = served diagonal) and SLO attainment. A point where the
harness gave up (cut) is drawn as an x, its P99 as the lower bound it is known to exceed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _series(points: list[dict[str, Any]], get: Callable[[dict[str, Any]], float | None]) -> tuple[list[float], list[float], list[float], list[float]]:
    xs: list[float] = []
    ys: list[float] = []
    cx: list[float] = []
    cy: list[float] = []
    for p in points:
        if p.get("skipped"):
            continue
        y = get(p)
        if y is None:
            continue
        (cx if p.get("cut") else xs).append(p["rate"])
        (cy if p.get("cut") else ys).append(y)
    return xs, ys, cx, cy


def _p99(p: dict[str, Any]) -> float | None:
    vals = [v for v in (p["latency_s"]["p99"], p.get("p99_lower_bound_s")) if v is not None]
    return max(vals) if vals else None


def _steps(steps: list[int] | None) -> str:
    if not steps:
        return "?"
    return str(steps[0]) if steps[0] == steps[-1] else f"{steps[0]}-{steps[-1]}"


def merge(paths: list[str | Path]) -> dict[str, Any]:
    """Several sweeps of one load (e.g. one system per GPU job) as one: the first file's
    header, every file's systems; a name seen before gets its file's stem appended."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    data = {**docs[0], "systems": {}}
    for p, d in zip(paths, docs, strict=False):
        for name, sysdata in d["systems"].items():
            data["systems"][name if name not in data["systems"] else f"{name} ({Path(p).stem})"] = sysdata
    if len(docs) > 1:
        data["name"] = " + ".join(d.get("name", "") for d in docs)
    return data


def plot(json_path: str | Path | list[str | Path], out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = json_path if isinstance(json_path, list) else [json_path]
    data = merge(paths)
    out = Path(out) if out else Path(paths[0]).with_suffix(".png")
    panels = [
        ("P99 end-to-end latency (s)", _p99, True),
        ("mean end-to-end latency (s)", lambda p: p["latency_s"]["mean"], True),
        ("throughput (images/s)", lambda p: p["throughput_ips"], False),
        ("SLO attainment", lambda p: p["slo_attainment"], False),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    rates = sorted({p["rate"] for s in data["systems"].values() for p in s["points"]})
    for ax, (title, get, log_y) in zip(axes.flat, panels, strict=False):
        for i, (name, sysdata) in enumerate(data["systems"].items()):
            color = f"C{i}"
            xs, ys, cx, cy = _series(sysdata["points"], get)
            ax.plot(xs, ys, "o-", color=color, label=name)
            if cx:
                ax.plot(cx, cy, "x", color=color, markersize=10, mew=2)
        if title.startswith("throughput") and rates:
            ax.plot(rates, rates, "--", color="grey", lw=0.8, label="offered")
        if title.startswith("P99") and data.get("slo", {}).get("default_request_slo_s"):
            ax.axhline(data["slo"]["default_request_slo_s"], color="grey", ls=":", lw=0.8, label="SLO")
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("offered load (requests/s)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    env = data.get("environment", {})
    mix = data.get("config", {}).get("mix", {})
    fig.suptitle(
        f"{data.get('name', '')}: {env.get('gpu', '?')}, torch {env.get('torch', '?')}, mix {mix.get('name', '?')} "
        f"{','.join(mix.get('sizes', []))} {_steps(mix.get('steps'))} steps   (x = cut: overloaded)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
