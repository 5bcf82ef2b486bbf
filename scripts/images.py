#!/usr/bin/env python3
"""The images' Python dependencies: lock them, and replay an image's install without a builder.

  scripts/images.py lock [IMAGE...]    rewrite docker/IMAGE.constraints.txt (default: every image)
  scripts/images.py check [IMAGE...]   replay the install of each image (default: every image)

Each image installs the project's extras named in its Dockerfile (`pip install -c
docker/IMAGE.constraints.txt ".[EXTRAS]"`) under a constraints file that pins every package
the install brings. `lock` resolves those extras with pip for the image's Python and platform
(Linux x86_64, wheels only) from PyPI alone (`pip --isolated`: no local index or pip.conf) and
writes the pins; rerun it after changing an extra in pyproject.toml or a Dockerfile.

The engine's torch comes from PyTorch's CUDA index (TORCH_VERSION and TORCH_CUDA in its
Dockerfile). PyPI's torch of the same version is another CUDA build with other CUDA packages,
so the engine's lock pins torch's version but leaves out the packages that differ between
CUDA builds (nvidia-*, cuda-*, triton): the torch wheel pins those exactly itself.

`check` replays an install the way the Dockerfile runs it: for the router and operator images a
fresh venv, `pip install` of the Dockerfile's COPY'd files with its constraints, then the image's
entry point (`--help`) and smoke imports, and that nothing unpinned came in. For the engine (a
CUDA torch cannot be installed here) a dry-run resolve under its constraints for Python 3.12 on
Linux x86_64, with the same completeness check.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"


@dataclass(frozen=True)
class Image:
    name: str
    python: str  # the base image's Python, major.minor: what the lock resolves for
    smoke: tuple[tuple[str, ...], ...] = ()  # commands that must succeed in the installed venv
    forbidden: tuple[str, ...] = ()  # modules that must not be importable there

    @property
    def dockerfile(self) -> Path:
        return DOCKER / f"{self.name}.Dockerfile"

    @property
    def constraints(self) -> Path:
        return DOCKER / f"{self.name}.constraints.txt"


IMAGES = {
    # Ubuntu 24.04's python3 (the CUDA base image).
    "engine": Image("engine", "3.12"),
    "router": Image(
        "router",
        "3.11",
        smoke=(("synerdiff", "route", "--help"), ("python", "-c", "import synerdiff.router.server")),
        forbidden=("torch",),
    ),
    "operator": Image(
        "operator",
        "3.11",
        smoke=(("python", "-m", "synerdiff_operator", "--help"), ("python", "-c", "import synerdiff_operator.handlers")),
        forbidden=("torch",),
    ),
}

# Names of the packages a torch wheel pins exactly and that differ between its CUDA builds.
_CUDA_BUILD_PACKAGE = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")
# Platform tags pip may pick wheels for: Linux x86_64 with glibc 2.17 (manylinux2014) to 2.28.
PLATFORMS = ["manylinux2014_x86_64", *(f"manylinux_2_{minor}_x86_64" for minor in range(17, 29))]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def is_cuda_build_package(name: str) -> bool:
    return bool(_CUDA_BUILD_PACKAGE.match(canonical(name)))


def dockerfile_extras(text: str) -> list[str]:
    """The extras of the project the Dockerfile installs, over all its `".[...]"`: `".[server]"` -> ["server"]."""
    found = re.findall(r"""["']\.\[([A-Za-z0-9_,\- ]+)\]["']""", text)
    if not found:
        raise ValueError('the Dockerfile installs no `".[EXTRAS]"` of the project')
    return list(dict.fromkeys(e.strip() for group in found for e in group.split(",") if e.strip()))


def dockerfile_args(text: str) -> dict[str, str]:
    """`ARG NAME=default` lines, by name."""
    return dict(re.findall(r"^ARG\s+([A-Za-z_][A-Za-z0-9_]*)=(\S+)\s*$", text, re.MULTILINE))


def dockerfile_copies(text: str) -> list[tuple[list[str], str]]:
    """The build-context COPY lines into the work directory: ([sources], destination)."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3 or parts[0] != "COPY" or any(p.startswith("--") for p in parts):
            continue
        if parts[-1].startswith("/"):
            continue  # into the image's own tree (the embedded model), not the install's sources
        out.append((parts[1:-1], parts[-1]))
    return out


def dockerfile_entrypoint(text: str) -> list[str]:
    found = re.findall(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.MULTILINE)
    return list(json.loads(found[-1])) if found else []


def torch_pin(image: Image, text: str) -> str | None:
    """`torch==VERSION` for an image that installs torch from its own CUDA index, else None."""
    version = dockerfile_args(text).get("TORCH_VERSION")
    return f"torch=={version}" if image.name == "engine" and version else None


def requirements(pyproject: dict[str, object], extras: list[str]) -> list[str]:
    project = pyproject["project"]
    assert isinstance(project, dict)
    optional = project.get("optional-dependencies") or {}
    missing = [e for e in extras if e not in optional]
    if missing:
        raise ValueError(f"pyproject.toml has no extra {', '.join(missing)}")
    return [*project.get("dependencies", []), *(r for e in extras for r in optional[e])]


def parse_constraints(text: str) -> dict[str, str]:
    pins = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise ValueError(f"not a `name==version` pin: {raw!r}")
        pins[canonical(name.strip())] = version.strip()
    return pins


def installs(report: dict[str, object]) -> dict[str, str]:
    """name -> version of what a `pip install --report` installs (the project itself left out)."""
    out = {}
    for item in report["install"]:  # type: ignore[attr-defined]
        meta = item["metadata"]
        if canonical(meta["name"]) != "synerdiff":
            out[canonical(meta["name"])] = meta["version"]
    return out


def lockable(resolved: dict[str, str], image: Image) -> dict[str, str]:
    """What an image's lock pins: everything resolved but, for the engine, the CUDA-build packages."""
    return {n: v for n, v in resolved.items() if not (image.name == "engine" and is_cuda_build_package(n))}


def unpinned(resolved: dict[str, str], pins: dict[str, str], image: Image) -> list[str]:
    """Packages an install brings that its lock does not pin at that version."""
    return sorted(f"{n}=={v}" for n, v in lockable(resolved, image).items() if pins.get(n) != v)


def render(image: Image, pins: dict[str, str], extras: list[str]) -> str:
    head = [
        f'# {image.name} image: every package `pip install ".[{",".join(extras)}]"` brings, for Python {image.python} on Linux x86_64.',
        "# Generated by `scripts/images.py lock`; do not edit by hand.",
    ]
    if image.name == "engine":
        head.append("# torch's CUDA packages (nvidia-*, cuda-*, triton) are left out: the torch wheel from the CUDA index pins them.")
    return "\n".join([*head, *(f"{n}=={pins[n]}" for n in sorted(pins))]) + "\n"


def resolve(image: Image, *, constraints: Path | None, isolated: bool) -> dict[str, str]:
    """A dry-run `pip install` of the image's requirements for its Python on Linux x86_64."""
    text = image.dockerfile.read_text()
    reqs = requirements(tomllib.loads((ROOT / "pyproject.toml").read_text()), dockerfile_extras(text))
    pin = torch_pin(image, text)
    if pin:
        reqs.append(pin)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", *(["--isolated"] if isolated else []), "install", "--dry-run", "--ignore-installed", "--quiet"]
        cmd += ["--target", str(Path(tmp) / "target"), "--report", str(report), "--only-binary=:all:"]
        cmd += ["--python-version", image.python, "--implementation", "cp", "--abi", f"cp{image.python.replace('.', '')}", "--abi", "abi3", "--abi", "none"]
        cmd += [arg for p in PLATFORMS for arg in ("--platform", p)]
        if constraints is not None:
            cmd += ["-c", str(constraints)]
        run(cmd + reqs, cwd=ROOT)
        return installs(json.loads(report.read_text()))


def run(cmd: list[str], **kwargs: object) -> None:
    print("+", shlex.join(cmd), flush=True)
    done = subprocess.run(cmd, text=True, capture_output=True, **kwargs)  # type: ignore[call-overload]
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {shlex.join(cmd)}\n{done.stdout[-4000:]}{done.stderr[-4000:]}")


def lock(image: Image) -> None:
    extras = dockerfile_extras(image.dockerfile.read_text())
    pins = lockable(resolve(image, constraints=None, isolated=True), image)
    image.constraints.write_text(render(image, pins, extras))
    print(f"{image.constraints.relative_to(ROOT)}: {len(pins)} pins")


def check(image: Image) -> None:
    pins = parse_constraints(image.constraints.read_text())
    if image.name == "engine":
        resolved = resolve(image, constraints=image.constraints, isolated=False)
    else:
        resolved = replay(image)
    missing = unpinned(resolved, pins, image)
    if missing:
        raise SystemExit(
            f"{image.constraints.relative_to(ROOT)} does not pin what the install brings: {', '.join(missing)}; run scripts/images.py lock {image.name}"
        )
    print(f"{image.name}: {len(resolved)} packages, all pinned")


def interpreter(image: Image) -> str:
    """A Python of the image's version: this one when it is, else `pythonX.Y` from PATH."""
    if f"{sys.version_info.major}.{sys.version_info.minor}" == image.python:
        return sys.executable
    found = shutil.which(f"python{image.python}")
    if found is None:
        raise SystemExit(f"the {image.name} image runs Python {image.python}; no python{image.python} found to replay its install with")
    return found


def replay(image: Image) -> dict[str, str]:
    """The Dockerfile's install in a fresh venv: its COPY'd sources, its pip install, its entry point."""
    text = image.dockerfile.read_text()
    extras = dockerfile_extras(text)
    with tempfile.TemporaryDirectory() as tmp:
        src, venv = Path(tmp) / "src", Path(tmp) / "venv"
        src.mkdir()
        for sources, dest in dockerfile_copies(text):
            for source in sources:
                origin = ROOT / source
                target = src / dest / origin.name if dest.endswith("/") else src / dest
                target.parent.mkdir(parents=True, exist_ok=True)
                if origin.is_dir():
                    shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
                else:
                    shutil.copy2(origin, target)
        run([interpreter(image), "-m", "venv", str(venv)])
        env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", "VIRTUAL_ENV": str(venv)}
        env.pop("PYTHONPATH", None)
        constraints = src / image.constraints.relative_to(ROOT)
        if not constraints.exists():
            raise SystemExit(f"{image.dockerfile.relative_to(ROOT)} does not COPY {image.constraints.relative_to(ROOT)} before its pip install")
        run(["pip", "install", "--quiet", "-c", str(constraints), f".[{','.join(extras)}]"], cwd=src, env=env)
        entry = dockerfile_entrypoint(text)
        for command in [[*entry, "--help"], *image.smoke] if entry else image.smoke:
            run(list(command), cwd=tmp, env=env)
        for module in image.forbidden:
            probe = subprocess.run(["python", "-c", f"import {module}"], cwd=tmp, env=env, capture_output=True)
            if probe.returncode == 0:
                raise SystemExit(f"the {image.name} image must not contain {module}, but it imports")
        freeze = subprocess.run(["python", "-m", "pip", "list", "--format=json"], cwd=tmp, env=env, capture_output=True, text=True, check=True).stdout
    bootstrap = {"pip", "setuptools", "wheel", "synerdiff"}  # the venv's own tools and the project
    return {canonical(p["name"]): p["version"] for p in json.loads(freeze) if canonical(p["name"]) not in bootstrap}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("lock", "check"))
    parser.add_argument("images", nargs="*", metavar="IMAGE", help=f"{', '.join(IMAGES)} (default: every image)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.images if n not in IMAGES]
    if unknown:
        parser.error(f"no image {', '.join(unknown)}; the images are {', '.join(IMAGES)}")
    for name in args.images or IMAGES:
        (lock if args.action == "lock" else check)(IMAGES[name])
    return 0


if __name__ == "__main__":
    sys.exit(main())
