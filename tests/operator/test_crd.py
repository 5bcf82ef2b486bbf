"""The CRD: generated from the pydantic models, committed in sync, structural, and its CEL rules
agree with the operator's own validation."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from synerdiff.contract.config import EngineConfig, LimitsConfig, SchedulerConfig
from synerdiff_operator import crd as crdgen
from synerdiff_operator.spec import ENGINE_OWNED_FIELDS, EngineSpec, InvalidSpec, parse_spec

from .crdcheck import REPO_ROOT, admit, apply_defaults, iter_rules, load_crd, root_schema, schema_errors

EXAMPLES = sorted((REPO_ROOT / "examples").glob("*.yaml")) + sorted((REPO_ROOT / "charts/synerdiff-operator/examples").glob("*.yaml"))


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return load_crd()


def pool(spec: dict[str, Any], name: str = "sd") -> dict[str, Any]:
    return {"apiVersion": "synerdiff.io/v1alpha1", "kind": "DiffusionPool", "metadata": {"name": name}, "spec": spec}


BASE = {"image": "engine:1", "model": {"uri": "hf://org/model"}}


@pytest.mark.parametrize("path", crdgen.CRD_PATHS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_committed_crd_is_the_generated_one(path: Path) -> None:
    assert path.read_text() == crdgen.render(), "stale: run `python -m synerdiff_operator.crd --write`"


def _nodes(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, schema)]
    for key, sub in (schema.get("properties") or {}).items():
        out += _nodes(sub, f"{path}.{key}")
    if isinstance(schema.get("additionalProperties"), dict):
        out += _nodes(schema["additionalProperties"], f"{path}.*")
    if "items" in schema:
        out += _nodes(schema["items"], f"{path}[]")
    return out


def test_schema_is_structural(crd: dict[str, Any]) -> None:
    for path, node in _nodes(root_schema(crd)):
        banned = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "not", "nullable", "title", "const"} & node.keys()
        assert not banned, f"{path}: {banned}"
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        assert node.get("additionalProperties") is not False, path
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            if key in node:
                assert node[key] is True and key.replace("exclusiveM", "m") in node, path
        if "default" in node:
            assert schema_errors(node, node["default"]) == [], f"{path}: default does not validate"
        if "enum" in node:
            assert all(isinstance(v, str) for v in node["enum"]) == (node["type"] == "string"), path


def test_subresources_and_printer_columns(crd: dict[str, Any]) -> None:
    version = crd["spec"]["versions"][0]
    assert crd["spec"]["group"] == "synerdiff.io" and version["name"] == "v1alpha1" and crd["spec"]["scope"] == "Namespaced"
    assert version["subresources"] == {
        "status": {},
        "scale": {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas", "labelSelectorPath": ".status.selector"},
    }
    status = root_schema(crd)["properties"]["status"]["properties"]
    assert status["selector"]["type"] == "string" and status["replicas"]["type"] == "integer"
    assert status["conditions"]["x-kubernetes-list-type"] == "map"
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    for name in ("Ready", "Replicas", "Min", "Max", "Threshold", "Age"):
        assert name in columns and columns[name].get("priority", 0) == 0
    assert columns["Ready"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Commit"] == {"name": "Commit", "type": "string", "jsonPath": ".status.model.commit", "priority": 1}


def test_engine_section_is_engineconfig(crd: dict[str, Any]) -> None:
    engine = root_schema(crd)["properties"]["spec"]["properties"]["engine"]
    wanted = set(EngineConfig.model_fields) - ENGINE_OWNED_FIELDS
    assert set(engine["properties"]) == wanted
    assert set(engine["properties"]["limits"]["properties"]) == set(LimitsConfig.model_fields)
    assert set(engine["properties"]["scheduler"]["properties"]) == set(SchedulerConfig.model_fields)
    # The API server's defaulting of an empty `engine` gives exactly pydantic's defaults.
    defaulted = apply_defaults(engine, {})
    assert defaulted == EngineSpec().model_dump(exclude_none=True)
    # Bounds come from the Field definitions.
    limits = engine["properties"]["limits"]["properties"]
    assert limits["max_n"]["maximum"] == 64 and limits["max_n"]["minimum"] == 1
    assert limits["request_timeout_s"] == {**limits["request_timeout_s"], "minimum": 0, "exclusiveMinimum": True}
    assert engine["properties"]["scheduler"]["properties"]["policy"]["enum"] == ["synerdiff", "continuous"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_examples_are_admitted_and_parse(crd: dict[str, Any], path: Path) -> None:
    obj = yaml.safe_load(path.read_text())
    stored, errors = admit(crd, obj)
    assert errors == []
    spec = parse_spec(stored["spec"])  # the operator agrees
    # Defaults are the same on both sides: what the API server stores is what the operator assumes.
    assert parse_spec(obj["spec"]) == spec
    assert stored["spec"]["engine"]["limits"]["max_queue"] == spec.engine.limits.max_queue


# (patch to BASE, CEL message fragment): each must be refused by the API server and the operator.
INVALID = [
    ({"minReplicas": 3, "maxReplicas": 2, "replicas": 2}, "minReplicas must be <= maxReplicas"),
    ({"replicas": 9, "maxReplicas": 4}, "replicas must lie within"),
    ({"replicas": 0, "minReplicas": 1}, "replicas must lie within"),
    ({"model": {"uri": "hf://org/model", "path": "/m"}}, "exactly one of model.path or model.uri"),
    ({"model": {}}, "exactly one of model.path or model.uri"),
    ({"model": {"path": "relative/dir"}}, "model.path must be absolute"),
    ({"model": {"uri": "hf://org/model", "s3": {"region": "eu-west-1"}}}, "model.s3 applies to s3:// URIs only"),
    ({"model": {"uri": "s3://models/sd15", "gs": {}}}, "model.gs applies to gs:// URIs only"),
    ({"model": {"path": "/m", "s3": {}}}, "model.s3 applies to s3:// URIs only"),
    ({"model": {"uri": "gs://models/sd15", "tokenSecret": {"name": "hf"}}}, "model.tokenSecret applies to hf:// URIs only"),
    ({"model": {"uri": "s3://models/sd15", "revision": "v2"}}, "model.revision applies to hf:// URIs only"),
    ({"model": {"uri": "pvc://models/sd15", "pvc": "cache"}}, "a pvc:// model.uri names its claim"),
    ({"model": {"uri": "pvc://" + "a" * 254 + "/sd15"}}, "a pvc:// model.uri's claim name has at most 253 characters"),
    ({"podTemplate": {"spec": {"volumeMounts": [{"name": "model-credentials", "mountPath": "/x"}]}}}, "the operator's volumes"),
    ({"model": {"uri": "pvc://models/sd15", "revision": "v2"}}, "model.revision applies to hf:// URIs only"),
    ({"gpu": {"count": 0}}, "float16 needs gpu.count"),
    ({"rollout": {"maxSurge": 0, "maxUnavailable": 0}}, "cannot both be 0"),
    ({"engine": {"scheduler": {"threshold": 0.99}}}, "threshold must lie within"),
    ({"engine": {"scheduler": {"threshold_min": 0.9, "threshold_max": 0.6, "threshold": 0.7}}}, "threshold_min must be <= threshold_max"),
    ({"engine": {"scheduler": {"controller_low_water": 3.0}}}, "controller_low_water must be <= controller_high_water"),
    ({"engine": {"limits": {"min_side": 512, "max_side": 256}}}, "min_side must be <= max_side"),
    ({"engine": {"limits": {"min_guidance": 9, "max_guidance": 3}}}, "min_guidance must be <= max_guidance"),
    ({"engine": {"default_steps": 50, "limits": {"max_steps": 20}}}, "engine.default_steps must be <= engine.limits.max_steps"),
    ({"drainTimeoutSeconds": 30}, "drainTimeoutSeconds must be at least engine.limits.request_timeout_s"),
    ({"drainTimeoutSeconds": 60, "engine": {"limits": {"request_timeout_s": 90}}}, "drainTimeoutSeconds must be at least engine.limits.request_timeout_s"),
    ({"resources": {"limits": {"memory": "32 GB"}}}, "does not match"),
    ({"resources": {"requests": {"cpu": "two"}}}, "does not match"),
    ({"gpu": {"resourceName": "bad name!"}}, "does not match"),
    ({"gpu": {"tolerations": [{"key": "gpu", "operator": "Exists", "value": "x"}]}}, "operator Exists takes no value"),
    ({"gpu": {"tolerations": [{"operator": "Equal", "value": "x"}]}}, "without a key must use operator Exists"),
    ({"gpu": {"tolerations": [{"key": "gpu", "effect": "NoSchedule", "tolerationSeconds": 30}]}}, "tolerationSeconds needs effect NoExecute"),
    ({"gpu": {"count": 2}}, "raise replicas (the pool's router spreads requests over the engines)"),
    ({"podTemplate": {"metadata": {"labels": {"synerdiff.io/pool": "other"}}}}, "labels: keys under synerdiff.io/ and app.kubernetes.io/ are the operator's"),
    ({"podTemplate": {"metadata": {"annotations": {"synerdiff.io/config-hash": "x"}}}}, "annotations: keys under synerdiff.io/ are the operator's"),
    ({"podTemplate": {"spec": {"env": [{"name": "SYNERDIFF_PORT", "value": "9"}]}}}, "are set by the operator; configure the engine through spec.engine"),
    (
        {"podTemplate": {"spec": {"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]}}},
        "are set by the operator; configure the engine through spec.engine",
    ),
    ({"podTemplate": {"spec": {"env": [{"name": "HF_HUB_OFFLINE", "value": "0"}]}}}, "are set by the operator; configure the engine through spec.engine"),
    ({"podTemplate": {"spec": {"volumes": [{"name": "tmp", "emptyDir": {}}]}}}, "podTemplate.spec.volumes: the names"),
    ({"podTemplate": {"spec": {"volumeMounts": [{"name": "data", "mountPath": "/models"}]}}}, "are mounted by the operator"),
    ({"adapters": {"uri": "hf://org/loras", "s3": {}}}, "adapters.s3 applies to s3:// URIs only"),
    ({"adapters": {"uri": "s3://loras/sd15", "gs": {}}}, "adapters.gs applies to gs:// URIs only"),
    ({"adapters": {"uri": "pvc://loras/sd15", "tokenSecret": {"name": "hf"}}}, "adapters.tokenSecret applies to hf:// URIs only"),
    ({"adapters": {"uri": "gs://loras/sd15", "revision": "v2"}}, "adapters.revision applies to hf:// URIs only"),
    ({"adapters": {"uri": "pvc://" + "a" * 254 + "/loras"}}, "a pvc:// adapters.uri's claim name has at most 253 characters"),
    ({"adapters": {"uri": "s3://loras/../x"}}, "does not match"),
    ({"adapters": {"uri": "s3://loras/sd15"}, "engine": {"lora": {"dir": "/opt/loras"}}}, "engine.lora.dir is set by the operator"),
    ({"podTemplate": {"spec": {"volumeMounts": [{"name": "data", "mountPath": "/adapters"}]}}}, "are mounted by the operator"),
    ({"engine": {"precision": "fp8"}}, "engine.precision fp8 needs model.dtype bfloat16"),  # the default dtype is float16
    ({"engine": {"precision": "fp8"}, "gpu": {"count": 0}, "model": {"uri": "hf://org/model", "dtype": "bfloat16"}}, "engine.precision fp8 needs"),
]


def merged(patch: dict[str, Any]) -> dict[str, Any]:
    spec = copy.deepcopy(BASE)
    for key, value in patch.items():
        spec[key] = value if key == "model" else ({**spec.get(key, {}), **value} if isinstance(value, dict) else value)
    return spec


@pytest.mark.parametrize(("patch", "message"), INVALID, ids=[m for _, m in INVALID])
def test_cel_rules_and_the_operator_refuse_the_same_specs(crd: dict[str, Any], patch: dict[str, Any], message: str) -> None:
    _, errors = admit(crd, pool(merged(patch)))
    assert any(message in e for e in errors), errors
    with pytest.raises(InvalidSpec):
        parse_spec(merged(patch))


POD_TEMPLATE = {
    "metadata": {"labels": {"team": "imaging"}, "annotations": {"karpenter.sh/do-not-disrupt": "true"}},
    "spec": {
        "imagePullSecrets": [{"name": "registry"}],
        "serviceAccountName": "engine-identity",
        "priorityClassName": "inference",
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h200"]}]}]
                }
            }
        },
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "DoNotSchedule",
                "labelSelector": {"matchLabels": {"team": "imaging"}},
            }
        ],
        "env": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}, {"name": "LOG_SINK", "valueFrom": {"configMapKeyRef": {"name": "sinks", "key": "url"}}}],
        "volumes": [{"name": "loras", "persistentVolumeClaim": {"claimName": "loras", "readOnly": True}}],
        "volumeMounts": [{"name": "loras", "mountPath": "/loras", "readOnly": True}],
    },
}

VALID_EDGES = [
    {"podTemplate": POD_TEMPLATE},
    {"podTemplate": {"spec": {"topologySpreadConstraints": []}}},
    {"minReplicas": 2, "maxReplicas": 2, "replicas": 2},
    {"replicas": 9, "maxReplicas": 4, "autoscaling": {"enabled": True}},  # the autoscaler's value is clamped
    {"model": {"path": "relative/dir", "pvc": "models"}},
    {"gpu": {"count": 0}, "model": {"uri": "hf://org/model", "dtype": "float32"}},
    {"engine": {"precision": "fp8"}, "model": {"uri": "hf://org/model", "dtype": "bfloat16"}},
    {
        "model": {
            "uri": "s3://models/sd/sd15",
            "pvc": "cache",
            "s3": {"endpoint": "http://minio:9000", "region": "us-east-1", "credentialsSecret": {"name": "minio"}},
        }
    },
    {"model": {"uri": "s3://models"}, "podTemplate": {"spec": {"serviceAccountName": "irsa-reader"}}},
    {"model": {"uri": "gs://my.models_1/sd15/fp16", "gs": {"credentialsSecret": {"name": "gcs-key", "key": "sa.json"}}}},
    {"model": {"uri": "gs://models/sd15"}},
    {"model": {"uri": "pvc://models/sd15/fp16"}},
    {"model": {"uri": "pvc://team.models"}},
    {"engine": {"scheduler": {"threshold": 0.95, "threshold_max": 0.95}, "limits": {"min_side": 256, "max_side": 256}}},
    {"engine": {"default_steps": 20, "limits": {"max_steps": 20}}},
    {"drainTimeoutSeconds": 90, "engine": {"limits": {"request_timeout_s": 90}}},
    {"resources": {"requests": {"cpu": "500m", "memory": "32Gi", "ephemeral-storage": "1e9"}, "limits": {"cpu": 4, "memory": "64Gi"}}},
    {"adapters": {"uri": "hf://org/loras", "revision": "v2", "tokenSecret": {"name": "hf"}}, "engine": {"lora": {"cache_slots": 4}}},
    {"adapters": {"uri": "s3://loras/sd15", "s3": {"endpoint": "http://minio:9000", "credentialsSecret": {"name": "minio"}}}},
    {"adapters": {"uri": "gs://loras", "gs": {"credentialsSecret": {"name": "k"}}}},
    {"adapters": {"uri": "pvc://loras"}},
    {"engine": {"lora": {"dir": "/opt/loras"}}},
    {"gpu": {"resourceName": "amd.com/gpu", "tolerations": [{"operator": "Exists"}, {"key": "k", "effect": "NoExecute", "tolerationSeconds": 30}]}},
]


@pytest.mark.parametrize("patch", VALID_EDGES)
def test_boundary_specs_pass_both(crd: dict[str, Any], patch: dict[str, Any]) -> None:
    _, errors = admit(crd, pool(merged(patch)))
    assert errors == []
    parse_spec(merged(patch))


def test_every_cel_rule_is_exercised(crd: dict[str, Any]) -> None:
    messages = {rule["message"] for _, _, rule in iter_rules(root_schema(crd)) if "oldSelf" not in rule["rule"]}
    covered = {m for m in messages if any(fragment in m for _, fragment in INVALID)} | {crdgen.NAME_RULE[1]}
    assert covered == messages


def test_the_pool_name_must_fit_a_service_name(crd: dict[str, Any]) -> None:
    assert admit(crd, pool(BASE, name="sd-15"))[1] == []
    for bad in ("1sd", "a" * 64, "sd.v15"):
        _, errors = admit(crd, pool(BASE, name=bad))
        assert any("DNS-1035" in e for e in errors), (bad, errors)


def test_model_identity_is_immutable_but_its_revision_is_not(crd: dict[str, Any]) -> None:
    old = pool(BASE)
    changed = pool({**BASE, "model": {"uri": "hf://org/other"}})
    assert any("model.uri is immutable" in e for e in admit(crd, changed, old=old)[1])
    to_path = pool({**BASE, "model": {"path": "/m"}})
    assert any("immutable" in e for e in admit(crd, to_path, old=old)[1])
    bumped = pool({**BASE, "model": {"uri": "hf://org/model", "revision": "v2"}, "replicas": 2})
    assert admit(crd, bumped, old=old)[1] == []
    s3 = pool({**BASE, "model": {"uri": "s3://models/sd15"}})
    assert any("model.uri is immutable" in e for e in admit(crd, pool({**BASE, "model": {"uri": "s3://models/sd21"}}), old=s3)[1])
    moved = pool({**BASE, "model": {"uri": "s3://models/sd15", "s3": {"endpoint": "http://minio:9000"}}})
    assert admit(crd, moved, old=s3)[1] == []  # where the bucket is reached from may change


def test_unknown_fields_and_bad_enums_are_refused(crd: dict[str, Any]) -> None:
    assert any("replica" in e for e in admit(crd, pool({**BASE, "replica": 2}))[1])
    assert admit(crd, pool({**BASE, "model": {"uri": "hf://org/model", "dtype": "int8"}}))[1]
    assert admit(crd, pool({**BASE, "engine": {"scheduler": {"policy": "fifo"}}}))[1]
    for uri in (
        "s3://Bucket/model",
        "s3://bucket/../etc",
        "s3://bucket/.hidden",
        "s3://bucket/model/",
        "gs://b/model",
        "az://bucket/model",
        "hf://org/model/extra",
        "pvc://Models/sd15",
        "pvc://models/../sd15",
        "pvc://-models/sd15",
        "pvc://",
    ):
        assert admit(crd, pool({**BASE, "model": {"uri": uri}}))[1], uri
        with pytest.raises(InvalidSpec):
            parse_spec({**BASE, "model": {"uri": uri}})
    assert admit(crd, pool({**BASE, "model": {"uri": "s3://bucket/m", "s3": {"endpoint": "minio:9000"}}}))[1]
    assert admit(crd, pool({**BASE, "engine": {"limits": {"request_timeout_s": 0}}}))[1]


def test_generator_refuses_what_it_cannot_express() -> None:
    with pytest.raises(crdgen.UnsupportedSchema):
        crdgen.structural({"anyOf": [{"type": "integer"}, {"type": "boolean"}]})
    assert crdgen.structural({"anyOf": [{"type": "string"}, {"type": "null"}], "default": None}) == {"type": "string"}
    assert crdgen.structural({"type": "number", "exclusiveMinimum": 0}) == {"type": "number", "minimum": 0, "exclusiveMinimum": True}
