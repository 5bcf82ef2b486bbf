"""Parsing a DiffusionPool spec: defaults, errors that name the field, derived engine fields."""

from __future__ import annotations

import pytest

from synerdiff.contract.config import EngineConfig
from synerdiff_operator.spec import InvalidSpec, check_name, parse_spec

BASE = {"image": "engine:1", "model": {"uri": "hf://org/model"}}


def test_defaults() -> None:
    spec = parse_spec(BASE)
    assert (spec.replicas, spec.min_replicas, spec.max_replicas) == (1, 1, 4)
    assert spec.gpu.count == 1 and spec.gpu.resource_name == "nvidia.com/gpu"
    assert spec.model.dtype == "float16" and spec.model.revision == "main"
    assert spec.service.type == "ClusterIP" and spec.service.port == 80
    assert spec.engine.scheduler == EngineConfig().scheduler and spec.engine.limits == EngineConfig().limits
    assert spec.drain_timeout_seconds is None and spec.drain_seconds() == spec.engine.limits.request_timeout_s == 300
    assert not spec.autoscaling.enabled


def test_errors_name_the_fields() -> None:
    with pytest.raises(InvalidSpec, match=r"spec\.engine\.limits\.max_n"):
        parse_spec({**BASE, "engine": {"limits": {"max_n": 0}}})
    with pytest.raises(InvalidSpec, match=r"spec\.image"):
        parse_spec({"model": {"uri": "hf://org/model"}})
    with pytest.raises(InvalidSpec, match=r"spec\.gpu\.cuont"):
        parse_spec({**BASE, "gpu": {"cuont": 1}})  # typos are not silently dropped
    with pytest.raises(InvalidSpec):
        parse_spec(None)


@pytest.mark.parametrize("field", ["model", "device", "dtype"])
def test_engine_fields_the_operator_derives_are_refused(field: str) -> None:
    with pytest.raises(InvalidSpec, match=rf"spec\.engine\.{field}"):
        parse_spec({**BASE, "engine": {field: "cpu"}})


def test_every_other_engine_field_is_accepted() -> None:
    spec = parse_spec(
        {**BASE, "engine": {"default_sampler": "ddim", "default_steps": 25, "warmup": False, "scheduler": {"policy": "continuous", "controller": "fixed"}}}
    )
    assert spec.engine.default_sampler == "ddim" and spec.engine.scheduler.policy == "continuous"


def test_names() -> None:
    check_name("sd-turbo")
    for bad in ("SD", "1sd", "sd_turbo", "x" * 64, "sd-"):
        with pytest.raises(InvalidSpec, match="DNS-1035"):
            check_name(bad)
