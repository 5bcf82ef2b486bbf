"""The compile cache: its key, its atomic write, and a warm load in a fresh process (CPU inductor)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from synerdiff.engine.compile_cache import STALE_TEMP_S, CompileCache, cache_key, default_cache_dir, model_fingerprint, prune

FACTS: dict[str, object] = dict(
    gpu="NVIDIA H200",
    capability=[9, 0],
    torch="2.11.0",
    triton="3.5.0",
    diffusers="0.42.1",
    unet="0123456789abcdef",
    dtype="torch.float16",
    shapes=[(4, 64, 64)],
    rows=[2, 4, 8, 16, 24, 32, 48, 64],
    mode="default",
    attention="auto",
)


def test_equal_facts_give_one_key_whatever_their_order() -> None:
    assert cache_key(FACTS) == cache_key(dict(reversed(list(FACTS.items()))))


@pytest.mark.parametrize(
    "fact, other",
    [
        ("gpu", "NVIDIA H100 80GB HBM3"),
        ("capability", [8, 0]),
        ("torch", "2.12.0"),
        ("triton", "3.6.0"),
        ("diffusers", "0.43.0"),
        ("unet", "fedcba9876543210"),
        ("dtype", "torch.bfloat16"),
        ("shapes", [(4, 96, 96)]),
        ("rows", [2, 4, 8, 16, 32, 64]),
        ("mode", "max-autotune-no-cudagraphs"),
        ("attention", "flash"),
    ],
)
def test_any_fact_that_changes_the_code_changes_the_key(fact: str, other: object) -> None:
    assert cache_key({**FACTS, fact: other}) != cache_key(FACTS)


def test_the_fingerprint_follows_the_architecture_not_the_bookkeeping() -> None:
    config = {"block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "_name_or_path": "/models/a", "_diffusers_version": "0.30.0"}
    moved = {**config, "_name_or_path": "/elsewhere/b", "_diffusers_version": "0.42.1"}
    assert model_fingerprint(config) == model_fingerprint(moved)
    assert model_fingerprint({**config, "cross_attention_dim": 1024}) != model_fingerprint(config)


def test_the_default_folder_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "synerdiff" / "compile"


def test_an_unreadable_blob_costs_a_cold_start_not_the_start(tmp_path: Path) -> None:
    cache = CompileCache(tmp_path, dict(FACTS))
    assert not cache.exists() and cache.load() is False
    cache.blob_path.write_bytes(b"not a cache artifact")
    assert cache.load() is False
    assert cache.remembered("attention") is None  # no metadata beside it


# A script run in a fresh process with its own empty inductor cache: it compiles (or loads and
# then compiles) a small function and reports inductor's cache hits and misses.
SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from torch._dynamo.utils import counters
    from synerdiff.engine.compile_cache import CompileCache

    root, mode = Path(sys.argv[1]), sys.argv[2]
    cache = CompileCache(root, {"what": "a small pointwise function", "shape": [64]})
    loaded = cache.load() if mode == "warm" else False
    fn = torch.compile(lambda x: torch.sin(x * 3.0) + x.cos(), dynamic=False)
    out = fn(torch.linspace(0, 1, 64))
    written = cache.save({"attention": "flash"}) if mode == "cold" else 0
    print(json.dumps({
        "loaded": loaded,
        "written": written,
        "hits": counters["inductor"]["fxgraph_cache_hit"],
        "misses": counters["inductor"]["fxgraph_cache_miss"],
        "sum": float(out.sum()),
    }))
    """
)


# The same with one dynamo trace for two row sizes (compile_trace once): each size's inductor
# compile runs outside dynamo's backend call, and must still be cached, not bypassed.
SCRIPT_ONE_TRACE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from torch._dynamo.utils import counters
    from synerdiff.engine.compile_cache import CompileCache
    from synerdiff.engine.size_compile import PerSizeBackend, mark_batch_dynamic

    root, mode = Path(sys.argv[1]), sys.argv[2]
    cache = CompileCache(root, {"what": "a conv and a linear, one trace", "rows": [2, 3]})
    loaded = cache.load() if mode == "warm" else False
    torch.manual_seed(0)
    conv, lin = torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.Linear(8, 8)

    def forward(x, t):
        h = torch.nn.functional.silu(conv(x)) * t.view(-1, 1, 1, 1)
        return lin(h.flatten(2).transpose(1, 2)).sum(1)

    backend = PerSizeBackend()
    fn = torch.compile(forward, backend=backend, dynamic=False, fullgraph=True)
    sums = []
    with torch.inference_mode():
        for rows in (2, 3):
            g = torch.Generator().manual_seed(rows)
            x, t = torch.randn(rows, 4, 6, 6, generator=g), torch.rand(rows, generator=g)
            if rows == 2:
                mark_batch_dynamic(x, t)
            sums.append(float(fn(x, t).sum()))
    written = cache.save() if mode == "cold" else 0
    print(json.dumps({
        "loaded": loaded,
        "written": written,
        "traces": backend.traces,
        "sizes": len(backend.compiled),
        "hits": counters["inductor"]["fxgraph_cache_hit"],
        "misses": counters["inductor"]["fxgraph_cache_miss"],
        "bypasses": counters["inductor"]["fxgraph_cache_bypass"],
        "sums": sums,
    }))
    """
)


def _run(root: Path, mode: str, inductor_dir: Path, script: str = SCRIPT) -> dict[str, object]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
    env.pop("TORCHINDUCTOR_FORCE_DISABLE_CACHES", None)
    proc = subprocess.run([sys.executable, "-c", script, str(root), mode], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_a_fresh_process_starts_warm_from_what_another_wrote(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    cold = _run(root, "cold", tmp_path / "inductor-a")
    assert cold["loaded"] is False and cold["misses"] and not cold["hits"]
    assert isinstance(cold["written"], int) and cold["written"] > 0
    # One blob and its metadata, no temporary file left behind.
    assert sorted(p.suffix for p in root.iterdir()) == [".bin", ".json"]
    meta = json.loads(next(root.glob("*.json")).read_text())
    assert meta["attention"] == "flash" and meta["bytes"] == cold["written"]
    # Another process, with an empty local inductor cache of its own, compiles from the blob.
    warm = _run(root, "warm", tmp_path / "inductor-b")
    assert warm["loaded"] is True
    assert warm["hits"] and not warm["misses"]
    assert warm["sum"] == pytest.approx(cold["sum"])
    cache = CompileCache(root, {"what": "a small pointwise function", "shape": [64]})
    assert cache.remembered("attention") == "flash"


def test_one_trace_for_every_size_is_cached_per_size_for_a_fresh_process(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    cold = _run(root, "cold", tmp_path / "inductor-a", SCRIPT_ONE_TRACE)
    assert cold["traces"] == 1 and cold["sizes"] == 2
    assert cold["misses"] == 2 and not cold["bypasses"] and not cold["hits"]
    assert isinstance(cold["written"], int) and cold["written"] > 0
    warm = _run(root, "warm", tmp_path / "inductor-b", SCRIPT_ONE_TRACE)
    assert warm["loaded"] is True and warm["traces"] == 1 and warm["sizes"] == 2
    assert warm["hits"] == 2 and not warm["misses"] and not warm["bypasses"]
    assert warm["sums"] == pytest.approx(cold["sums"])


def test_pruning_keeps_the_newest_entries_and_the_current_one(tmp_path: Path) -> None:
    for i, key in enumerate(["k0", "k1", "k2", "k3", "k4", "k5"]):
        for suffix in (".bin", ".json"):
            path = tmp_path / f"{key}{suffix}"
            path.write_bytes(b"x")
            os.utime(path, (1000.0 + i, 1000.0 + i))  # k5 newest, k0 oldest
    fresh, stale = tmp_path / ".k9.bin.abc.tmp", tmp_path / ".k8.bin.def.tmp"
    fresh.write_bytes(b"partial")
    stale.write_bytes(b"partial")
    os.utime(fresh, (9000.0, 9000.0))
    os.utime(stale, (9000.0 - STALE_TEMP_S - 1, 9000.0 - STALE_TEMP_S - 1))
    removed = prune(tmp_path, keep=3, current="k0", now=9000.0)
    # The current entry (just written by this start) stays; with it, the two newest others.
    assert sorted(removed) == ["k1", "k2", "k3"]
    assert sorted(p.name for p in tmp_path.glob("k*")) == ["k0.bin", "k0.json", "k4.bin", "k4.json", "k5.bin", "k5.json"]
    assert fresh.exists() and not stale.exists()  # a writer may still be busy with the fresh one


def test_compile_breakdown_reads_dynamo_timers_in_either_layout(monkeypatch):
    """torch prints dynamo's timers as "name, seconds" lines or as a table; both are read, by what they measure."""
    import torch._dynamo.utils

    from synerdiff.engine.executor import compile_breakdown

    table = (
        "TorchDynamo compilation metrics:\nFunction      Runtimes (s)\n------------  ------------\n"
        "_compile.compile_inner      12.5\nbytecode_tracing      3.25\nAOTAutogradCache.inductor_load     4.0\ncompile_attempt_0   12.4\n"
    )
    lines = "TorchDynamo compilation metrics:\nFunction, Runtimes (s)\n_compile.compile_inner, 2.5\nbuild_guards, 0.125\n"
    monkeypatch.setattr(torch._dynamo.utils, "compile_times", lambda repr, aggregate: table)
    assert compile_breakdown() == {"total": 12.5, "dynamo_trace": 3.25, "cache_load": 4.0}
    monkeypatch.setattr(torch._dynamo.utils, "compile_times", lambda repr, aggregate: lines)
    assert compile_breakdown() == {"total": 2.5, "guards": 0.125}


def test_compile_breakdown_reads_this_torch_s_own_timers():
    import torch

    from synerdiff.engine.executor import compile_breakdown

    torch.compile(lambda x: x.sin() * 2, backend="eager", fullgraph=True)(torch.randn(4))
    got = compile_breakdown()
    assert got["total"] > 0 and got["dynamo_trace"] > 0 and got["total"] >= got["dynamo_trace"]
