"""Fixtures: kmock's Kubernetes emulator on loopback, and the real kopf operator pointed at it."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import kmock
import pytest
import pytest_asyncio

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT / "operator") not in sys.path:  # when the project is not (re)installed editable
    sys.path.append(str(REPO_ROOT / "operator"))

from .harness import NS, POOLS, Cluster, Emulator, OperatorThread  # noqa: E402


@pytest_asyncio.fixture()
async def emulator() -> AsyncIterator[Emulator]:
    async with Emulator() as server, kmock.Server(server):
        yield server


@pytest_asyncio.fixture()
async def cluster(emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    emulator.resources.load_bundled()
    emulator.resources[POOLS] = kmock.ResourceInfo(
        kind="DiffusionPool",
        singular="diffusionpool",
        namespaced=True,
        verbs={"get", "list", "watch", "create", "patch", "delete"},
        subresources={"status", "scale"},
    )
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": str(emulator.url).rstrip("/")}}],
        "users": [{"name": "tester", "user": {"token": "test-token"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester", "namespace": NS}}],
        "current-context": "emulator",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(path))
    yield Cluster(emulator)


@pytest_asyncio.fixture()
async def operator(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    """The real kopf operator (all of synerdiff_operator.handlers) running against the emulator."""
    monkeypatch.setenv("SYNERDIFF_OPERATOR_RESYNC_SECONDS", "0.3")
    monkeypatch.setenv("SYNERDIFF_OPERATOR_SCRAPE_TIMEOUT_SECONDS", "1")
    monkeypatch.setenv("SYNERDIFF_OPERATOR_AUTOSCALE_TICK_SECONDS", "0.1")
    import synerdiff_operator.handlers  # noqa: F401  registers the handlers in kopf's default registry

    runner = OperatorThread()
    await runner.start()
    try:
        yield cluster
    finally:
        await runner.stop()
