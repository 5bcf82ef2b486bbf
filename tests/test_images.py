"""The images' locked dependencies (docker/*.constraints.txt, scripts/images.py).

No image builder runs here, so the install of each image is replayed instead: the router and
operator images in a fresh venv with their constraints, then their entry points; the engine
(whose CUDA torch cannot be installed here) as a dry-run resolve for its Python and platform.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("synerdiff_images_script", ROOT / "scripts" / "images.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


images = _load()


def test_each_dockerfile_installs_its_extras_under_its_copied_constraints() -> None:
    for name, extra in (("engine", "server"), ("router", "router"), ("operator", "operator")):
        image = images.IMAGES[name]
        text = image.dockerfile.read_text()
        assert extra in images.dockerfile_extras(text)
        assert f"-c docker/{name}.constraints.txt" in text
        copied = [src for sources, _ in images.dockerfile_copies(text) for src in sources]
        assert f"docker/{name}.constraints.txt" in copied and "pyproject.toml" in copied and "server" in copied
    assert images.dockerfile_entrypoint(images.IMAGES["router"].dockerfile.read_text()) == ["synerdiff", "route"]
    assert images.dockerfile_entrypoint(images.IMAGES["operator"].dockerfile.read_text()) == ["python", "-m", "synerdiff_operator"]
    # The engine's embedded model goes into the image's own tree, not into the install's sources.
    assert all(not dest.startswith("/") for _, dest in images.dockerfile_copies(images.IMAGES["engine"].dockerfile.read_text()))


def test_the_router_and_operator_locks_are_for_their_base_images_python() -> None:
    for name in ("router", "operator"):
        image = images.IMAGES[name]
        assert f"FROM python:{image.python}-slim" in image.dockerfile.read_text()
    assert "ubuntu24.04" in images.IMAGES["engine"].dockerfile.read_text() and images.IMAGES["engine"].python == "3.12"


def test_the_engine_pins_a_cuda_12_torch_of_the_version_ci_tests() -> None:
    text = images.IMAGES["engine"].dockerfile.read_text()
    args = images.dockerfile_args(text)
    # A CUDA 12.6 build runs on the R535-R570 drivers of managed clusters; PyPI's torch is CUDA 13 (R580+).
    assert re.fullmatch(r"cu12\d", args["TORCH_CUDA"]), args["TORCH_CUDA"]
    cuda = re.search(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-", args["CUDA_IMAGE"])
    assert cuda is not None and f"cu{cuda[1]}{cuda[2]}" == args["TORCH_CUDA"], "the CUDA base image and torch's CUDA build differ"
    assert '"torch==${TORCH_VERSION}+${TORCH_CUDA}"' in text and "https://download.pytorch.org/whl/${TORCH_CUDA}" in text
    pins = images.parse_constraints(images.IMAGES["engine"].constraints.read_text())
    assert pins["torch"] == args["TORCH_VERSION"]
    assert f"torch=={args['TORCH_VERSION']}" in (ROOT / "scripts" / "setup-env.sh").read_text(), "CI tests another torch than the image runs"
    assert not [n for n in pins if images.is_cuda_build_package(n)], "CUDA-build packages belong to the torch wheel, not the lock"


@pytest.mark.parametrize("name", ["engine", "router", "operator"])
def test_every_direct_requirement_is_pinned_within_its_range(name: str) -> None:
    """Fast and offline: a requirement added to or narrowed in pyproject.toml without `lock` fails here."""
    image = images.IMAGES[name]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = images.parse_constraints(image.constraints.read_text())
    for line in images.requirements(pyproject, images.dockerfile_extras(image.dockerfile.read_text())):
        req = Requirement(line)
        pinned = pins.get(images.canonical(req.name))
        relock = f"run scripts/images.py lock {name}"
        assert pinned is not None, f"{req.name} is not pinned in {image.constraints.name}: {relock}"
        assert req.specifier.contains(pinned, prereleases=True), f"{image.constraints.name} pins {req.name}=={pinned}, outside {req}: {relock}"


def test_pure_helpers() -> None:
    assert images.parse_constraints("# header\nFoo_Bar==1.0  # why\n\ntorch==2.13.0\n") == {"foo-bar": "1.0", "torch": "2.13.0"}
    with pytest.raises(ValueError, match="not a `name==version` pin: 'numpy>=2'"):
        images.parse_constraints("numpy>=2\n")
    with pytest.raises(ValueError, match="installs no"):
        images.dockerfile_extras('RUN pip install "."')
    assert images.dockerfile_extras('RUN pip install ".[server, objectstore]" && pip install ".[server]"') == ["server", "objectstore"]
    with pytest.raises(ValueError, match="no extra nosuch"):
        images.requirements({"project": {"dependencies": [], "optional-dependencies": {"server": []}}}, ["nosuch"])
    engine, router = images.IMAGES["engine"], images.IMAGES["router"]
    resolved = {"torch": "2.13.0", "nvidia-cublas": "13.1", "triton": "3.7.1", "cuda-toolkit": "13.0", "numpy": "2.4.6"}
    assert images.lockable(resolved, engine) == {"torch": "2.13.0", "numpy": "2.4.6"}
    assert images.unpinned(resolved, {"torch": "2.13.0", "numpy": "2.4.5"}, engine) == ["numpy==2.4.6"]
    # Only the engine's torch comes from a CUDA index: elsewhere a CUDA package is an ordinary one.
    assert images.unpinned({"triton": "3.7.1"}, {}, router) == ["triton==3.7.1"]
    assert images.dockerfile_copies("COPY a b ./\nCOPY --from=x /a /b\nCOPY m /opt/m\nCOPY server ./server\n") == [(["a", "b"], "./"), (["server"], "./server")]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["router", "operator", "engine"])
def test_the_image_install_replays_under_its_lock(name: str) -> None:
    """Router and operator: a fresh venv, the Dockerfile's pip install, its entry point's --help;
    engine: the dry-run resolve. Either way nothing the install brings may be unpinned."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "images.py"), "check", name], capture_output=True, text=True, timeout=290)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"{name}: " in done.stdout and "all pinned" in done.stdout
