"""docs/quickstart.md, command by command: what each one names (images, pools, claims, Services)
is what the real `helm` renders, what the CRD admits and what the operator builds from it."""

from __future__ import annotations

import re
import shlex
from typing import Any

import kubernetes_validate
import pytest
import yaml

from synerdiff_operator import manifests
from synerdiff_operator.spec import parse_spec

from .crdcheck import REPO_ROOT, admit, load_crd
from .test_chart import CUSTOM_KINDS, by_kind, render

DOC = (REPO_ROOT / "docs" / "quickstart.md").read_text()
K8S_VERSION = "1.33.0"
META = {"namespace": "default", "uid": "quickstart-uid", "generation": 1}


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC, flags=re.S)


def commands() -> list[list[str]]:
    return [shlex.split(line) for block in blocks("bash") for line in block.splitlines() if line.strip()]


def helm_installs() -> list[list[str]]:
    return [c for c in commands() if c[:2] == ["helm", "install"]]


def option_values(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, word in enumerate(cmd) if word == flag]


@pytest.mark.parametrize("install", helm_installs(), ids=["kind", "gpu"])
def test_the_helm_install_renders_the_operator_image_the_doc_built(install: list[str]) -> None:
    sets = option_values(install, "--set")
    objs = render(*[a for s in sets for a in ("--set", s)])
    for obj in objs:
        if obj["kind"] not in CUSTOM_KINDS:  # kinds of CRDs; test_chart checks those
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    values = dict(s.split("=", 1) for s in sets)
    (container,) = by_kind(objs)["Deployment"]["spec"]["template"]["spec"]["containers"]
    image = f"{values['image.repository']}:{values['image.tag']}"
    assert container["image"] == image
    assert container["imagePullPolicy"] == values.get("image.pullPolicy", "IfNotPresent")
    # The image it runs is one the doc built (and, on kind, loaded into the cluster).
    built = [c[c.index("-t") + 1] for c in commands() if c[:2] == ["docker", "build"]]
    assert image in built
    if values.get("image.pullPolicy") == "Never":
        (load,) = [c for c in commands() if c[:3] == ["kind", "load", "docker-image"]]
        assert image in load


def test_the_kind_pool_is_the_cpu_example_with_the_image_built_here() -> None:
    (sed,) = [c for c in commands() if c[0] == "sed"]
    pattern, example = sed[1], sed[2]
    _, old, new, _ = pattern.split("#")
    text = (REPO_ROOT / example).read_text()
    assert old in text
    pool = yaml.safe_load(text.replace(old, new))
    stored, errors = admit(load_crd(), pool)
    assert errors == []
    spec = parse_spec(stored["spec"])
    assert spec.gpu.count == 0 and spec.image == new
    built = [c[c.index("-t") + 1] for c in commands() if c[:2] == ["docker", "build"]]
    assert new in built
    name = pool["metadata"]["name"]
    kids = {(c["kind"], c["metadata"]["name"]): c for c in manifests.children({**META, "name": name}, spec)}
    for child in kids.values():
        kubernetes_validate.validate(child, K8S_VERSION, strict=True)
    assert kids[("Deployment", name)]["spec"]["template"]["spec"]["containers"][0]["image"] == new
    # kubectl wait / get name the pool; port-forward reaches its Service on the Service's port.
    assert [c[2] for c in commands() if c[:2] == ["kubectl", "wait"]][0] == f"diffusionpool/{name}"
    (forward,) = [c for c in commands() if c[:2] == ["kubectl", "port-forward"]]
    service = kids[("Service", name)]
    assert forward[2] == f"svc/{name}" and forward[3].split(":")[1] == str(service["spec"]["ports"][0]["port"])
    # The request the doc sends fits the example's limits.
    (curl,) = [c for c in commands() if c[0] == "curl"]
    body = yaml.safe_load(curl[curl.index("-d") + 1])
    side = int(body["size"].split("x")[0])
    assert side <= spec.engine.limits.max_side and body["num_inference_steps"] <= spec.engine.limits.max_steps


def test_the_gpu_pool_uses_the_claims_the_doc_creates() -> None:
    docs: list[dict[str, Any]] = [d for block in blocks("yaml") for d in yaml.safe_load_all(block) if d]
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for d in docs:
        if d["kind"] == "PersistentVolumeClaim":
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    (pool,) = [d for d in docs if d["kind"] == "DiffusionPool"]
    stored, errors = admit(load_crd(), pool)
    assert errors == []
    spec = parse_spec(stored["spec"])
    assert spec.model.pvc in claims and spec.compile_cache is not None and spec.compile_cache.pvc in claims
    assert spec.gpu.count == 1
    gpu_install = helm_installs()[1]
    repository = dict(s.split("=", 1) for s in option_values(gpu_install, "--set"))["image.repository"]
    assert spec.image.rsplit("/", 1)[0] == repository.rsplit("/", 1)[0]  # one registry for both images
    kids = manifests.children({**META, "name": pool["metadata"]["name"]}, spec)
    for child in kids:
        kubernetes_validate.validate(child, K8S_VERSION, strict=True)
    (wait,) = [c for c in commands() if c[:2] == ["kubectl", "wait"] and c[2] == f"diffusionpool/{pool['metadata']['name']}"]
    assert wait
