"""The typed `DiffusionPool` spec: the single source of the CRD schema and of the operator's parsing.

The CRD's OpenAPI schema is generated from these models (see `crd.py`), so the API server's
defaults and bounds and the operator's own defaults and bounds cannot drift apart. The `engine`
section reuses `synerdiff.contract.config.EngineConfig`'s fields verbatim (snake_case, as in the engine's
config file and admin API), minus the fields the operator derives from the rest of the spec.

Every CEL rule (`x-kubernetes-validations`) has a Python twin in a model validator, because the
operator must also refuse specs that reached it without the API server's checks (an older CRD,
or a test emulator): tests evaluate both on the same examples.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, create_model, field_validator, model_validator

from synerdiff.contract.config import EngineConfig

# Derived from spec.model and spec.gpu, so a user-set value would only contradict them.
ENGINE_OWNED_FIELDS = frozenset({"model", "device", "dtype"})

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
HF_URI = r"^hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$"
# s3://bucket[/prefix] and gs://bucket[/prefix]: a bucket name as both stores allow it, and prefix
# segments that never start with a dot, so that the download folder (/models/<scheme>/<bucket>/<prefix>)
# cannot climb out of /models through "." or "..".
OBJECT_URI = r"^(s3|gs)://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/[A-Za-z0-9_=+@,-][A-Za-z0-9._=+@,-]*)*$"
# A folder inside a PersistentVolumeClaim the pods mount read-only: a claim name, then the folder
# (no "." or ".." segment), or the claim's root.
PVC_URI = r"^pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*(/[A-Za-z0-9_=+@,-][A-Za-z0-9._=+@,-]*)*/?$"
MODEL_URI = "^(" + HF_URI.strip("^$") + "|" + OBJECT_URI.strip("^$") + "|" + PVC_URI.strip("^$") + ")$"
# Kubernetes' resource.Quantity ("4", "500m", "32Gi", "1e3"): "32 GB" is refused at apply time,
# not by the kubelet once pods fail to be created.
QUANTITY = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
# A qualified name, as extended resources are named: an optional DNS-subdomain prefix and a name.
RESOURCE_NAME = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"


def rules(*pairs: tuple[str, str]) -> dict[str, Any]:
    """json_schema_extra carrying CEL rules: (rule, message) pairs."""
    return {"x-kubernetes-validations": [{"rule": rule, "message": message} for rule, message in pairs]}


class InvalidSpec(ValueError):
    """The spec cannot work; the message names the offending fields."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class SecretKeyRef(_Spec):
    name: str = Field(pattern=DNS_SUBDOMAIN, max_length=253, description="Secret in the pool's namespace.")
    key: str = Field("token", min_length=1, description="Key inside the Secret.")


class SecretRef(_Spec):
    name: str = Field(pattern=DNS_SUBDOMAIN, max_length=253, description="Secret in the pool's namespace.")


class ServiceAccountKeyRef(_Spec):
    name: str = Field(pattern=DNS_SUBDOMAIN, max_length=253, description="Secret in the pool's namespace.")
    key: str = Field("key.json", min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$", description="Key inside the Secret holding the JSON key file.")


# The Secret keys model.s3.credentialsSecret must hold, as the AWS SDKs name them (the session token is optional).
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
S3_OPTIONAL_SECRET_KEYS = ("AWS_SESSION_TOKEN",)


class S3Source(_Spec):
    """How the download reaches an s3:// bucket."""

    endpoint: str | None = Field(
        None,
        pattern=r"^https?://[^\s]+$",
        max_length=2048,
        description="Endpoint of an S3-compatible store (MinIO, Ceph, R2, ...), e.g. http://minio.storage:9000; unset for AWS S3.",
    )
    region: str | None = Field(None, pattern=r"^[a-z0-9-]+$", max_length=64, description="Region of the bucket (AWS_REGION); unset: the SDK's default.")
    credentials_secret: SecretRef | None = Field(
        None,
        alias="credentialsSecret",
        description="Secret with the keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and optionally AWS_SESSION_TOKEN), exposed to the "
        "download init container only. Unset: the pod's own identity (IRSA through podTemplate.spec.serviceAccountName, EKS Pod Identity, "
        "or the node's role).",
    )


class GSSource(_Spec):
    """How the download reaches a gs:// bucket."""

    credentials_secret: ServiceAccountKeyRef | None = Field(
        None,
        alias="credentialsSecret",
        description="Secret holding a service-account JSON key file, mounted into the download init container only "
        "(GOOGLE_APPLICATION_CREDENTIALS). Unset: the pod's own identity (Workload Identity through podTemplate.spec.serviceAccountName).",
    )


MODEL_RULES = (
    ("has(self.path) != has(self.uri)", "set exactly one of model.path or model.uri"),
    ("!has(self.path) || has(self.pvc) || self.path.startsWith('/')", "model.path must be absolute unless model.pvc is set"),
    # A pool's model is its identity: rolling one model into another mixes two models' outputs
    # behind one Service during the rollout. Serve a new model from a new pool instead.
    ("(has(self.uri) ? self.uri : '') == (has(oldSelf.uri) ? oldSelf.uri : '')", "model.uri is immutable; create a new DiffusionPool for another model"),
    ("(has(self.path) ? self.path : '') == (has(oldSelf.path) ? oldSelf.path : '')", "model.path is immutable; create a new DiffusionPool for another model"),
    ("!has(self.s3) || (has(self.uri) && self.uri.startsWith('s3://'))", "model.s3 applies to s3:// URIs only"),
    ("!has(self.gs) || (has(self.uri) && self.uri.startsWith('gs://'))", "model.gs applies to gs:// URIs only"),
    (
        "!has(self.tokenSecret) || !has(self.uri) || self.uri.startsWith('hf://')",
        "model.tokenSecret applies to hf:// URIs only; credentials for s3:// and gs:// go in model.s3 or model.gs",
    ),
    (
        "!has(self.uri) || self.uri.startsWith('hf://') || self.revision == 'main'",
        "model.revision applies to hf:// URIs only; s3:// and gs:// serve the objects as they are (the download records their ETags or generations)",
    ),
    (
        "!has(self.uri) || !self.uri.startsWith('pvc://') || !has(self.pvc)",
        "a pvc:// model.uri names its claim; model.pvc is for model.path or a download's cache",
    ),
    (
        "!has(self.uri) || !self.uri.startsWith('pvc://') || self.uri.matches('^pvc://[^/]{1,253}(/.*)?$')",
        "a pvc:// model.uri's claim name has at most 253 characters",
    ),
)


class ModelSource(_Spec):
    model_config = ConfigDict(json_schema_extra=rules(*MODEL_RULES))

    path: str | None = Field(
        None,
        min_length=1,
        max_length=1024,
        description="Directory of a diffusers Stable-Diffusion pipeline: inside the claim when `pvc` is set, else an absolute path inside the image.",
    )
    uri: str | None = Field(
        None,
        pattern=MODEL_URI,
        max_length=512,
        description="`hf://org/name`, `s3://bucket/prefix` or `gs://bucket/prefix` (a diffusers pipeline folder): downloaded by an init "
        "container before the engine starts (into `pvc` when set, else an emptyDir); or `pvc://claim/folder`: a pipeline already in "
        "that claim, mounted read-only (the same as `path` with `pvc`).",
    )
    revision: str = Field("main", min_length=1, max_length=128, description="Hugging Face revision (branch, tag or commit) for an hf:// `uri`.")
    pvc: str | None = Field(
        None,
        pattern=DNS_SUBDOMAIN,
        max_length=253,
        description="PersistentVolumeClaim holding the model (path) or caching the download (uri); mounted at /models.",
    )
    dtype: Literal["float16", "bfloat16", "float32"] = Field("float16", description="Weights and activations dtype.")
    token_secret: SecretKeyRef | None = Field(
        None, alias="tokenSecret", description="Hugging Face token for gated models (exposed to the download init container only)."
    )
    s3: S3Source | None = Field(None, description="Endpoint, region and credentials for an s3:// `uri`.")
    gs: GSSource | None = Field(None, description="Credentials for a gs:// `uri`.")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        if (self.path is None) == (self.uri is None):
            raise ValueError(MODEL_RULES[0][1])
        if self.path is not None and self.pvc is None and not self.path.startswith("/"):
            raise ValueError(MODEL_RULES[1][1])
        if self.s3 is not None and self.scheme != "s3":
            raise ValueError(MODEL_RULES[4][1])
        if self.gs is not None and self.scheme != "gs":
            raise ValueError(MODEL_RULES[5][1])
        if self.token_secret is not None and self.scheme not in (None, "hf"):
            raise ValueError(MODEL_RULES[6][1])
        if self.scheme not in (None, "hf") and self.revision != "main":
            raise ValueError(MODEL_RULES[7][1])
        if self.scheme == "pvc" and self.pvc is not None:
            raise ValueError(MODEL_RULES[8][1])
        if self.scheme == "pvc" and len(self.claim or "") > 253:
            raise ValueError(MODEL_RULES[9][1])
        return self

    @property
    def downloaded(self) -> bool:
        """Whether an init container fetches the model (hf://, s3://, gs://) before the engine starts."""
        return self.scheme in ("hf", "s3", "gs")

    @property
    def claim(self) -> str | None:
        """The PersistentVolumeClaim mounted at /models: named by a pvc:// URI, else `pvc`."""
        if self.scheme == "pvc":
            assert self.uri is not None
            return self.uri.removeprefix("pvc://").split("/", 1)[0]
        return self.pvc

    @property
    def claim_folder(self) -> str | None:
        """The pipeline's folder inside the claim ("" = its root), for a pvc:// URI or a `path` with `pvc`."""
        if self.scheme == "pvc":
            assert self.uri is not None
            return self.uri.removeprefix("pvc://").partition("/")[2].strip("/")
        if self.path is not None and self.pvc is not None:
            return self.path.strip("/")
        return None

    def identity(self) -> dict[str, str]:
        """How status.model names the model: {"uri", "revision"} (a revision only for hf://) or {"path"}."""
        if self.uri is None:
            return {"path": self.path or ""}
        return {"uri": self.uri, "revision": self.revision} if self.scheme == "hf" else {"uri": self.uri}

    @property
    def scheme(self) -> str | None:
        """hf, s3 or gs for a `uri`; None for a `path`."""
        return self.uri.split("://", 1)[0] if self.uri is not None else None


ADAPTER_RULES = (
    ("!has(self.s3) || self.uri.startsWith('s3://')", "adapters.s3 applies to s3:// URIs only"),
    ("!has(self.gs) || self.uri.startsWith('gs://')", "adapters.gs applies to gs:// URIs only"),
    (
        "!has(self.tokenSecret) || self.uri.startsWith('hf://')",
        "adapters.tokenSecret applies to hf:// URIs only; credentials for s3:// and gs:// go in adapters.s3 or adapters.gs",
    ),
    ("self.uri.startsWith('hf://') || self.revision == 'main'", "adapters.revision applies to hf:// URIs only"),
    (
        "!self.uri.startsWith('pvc://') || self.uri.matches('^pvc://[^/]{1,253}(/.*)?$')",
        "a pvc:// adapters.uri's claim name has at most 253 characters",
    ),
)


class AdapterSource(_Spec):
    """Where the pool's LoRA adapters come from: a folder the engines read `engine.lora.dir` from."""

    model_config = ConfigDict(json_schema_extra=rules(*ADAPTER_RULES))

    uri: str = Field(
        pattern=MODEL_URI,
        max_length=512,
        description="A folder of LoRA adapters laid out as the engine reads them (NAME.safetensors, or NAME/pytorch_lora_weights.safetensors): "
        "`hf://org/repo`, `s3://bucket/prefix` or `gs://bucket/prefix`, downloaded by an init container into the pod before the engine "
        "starts (its .safetensors files only); or `pvc://claim/folder`, a folder already in that claim, mounted read-only. The engines read "
        "it as engine.lora.dir, which the operator sets; tune the device slots and limits with engine.lora.",
    )
    revision: str = Field("main", min_length=1, max_length=128, description="Hugging Face revision (branch, tag or commit) for an hf:// `uri`.")
    token_secret: SecretKeyRef | None = Field(
        None, alias="tokenSecret", description="Hugging Face token for a gated or private repository (exposed to the adapters' download only)."
    )
    s3: S3Source | None = Field(None, description="Endpoint, region and credentials for an s3:// `uri`.")
    gs: GSSource | None = Field(None, description="Credentials for a gs:// `uri`.")

    @model_validator(mode="after")
    def _consistent(self) -> AdapterSource:
        if self.s3 is not None and self.scheme != "s3":
            raise ValueError(ADAPTER_RULES[0][1])
        if self.gs is not None and self.scheme != "gs":
            raise ValueError(ADAPTER_RULES[1][1])
        if self.token_secret is not None and self.scheme != "hf":
            raise ValueError(ADAPTER_RULES[2][1])
        if self.scheme != "hf" and self.revision != "main":
            raise ValueError(ADAPTER_RULES[3][1])
        if self.scheme == "pvc" and len(self.claim or "") > 253:
            raise ValueError(ADAPTER_RULES[4][1])
        return self

    @property
    def scheme(self) -> str:
        """hf, s3, gs or pvc."""
        return self.uri.split("://", 1)[0]

    @property
    def downloaded(self) -> bool:
        """Whether an init container fetches the adapters (hf://, s3://, gs://) before the engine starts."""
        return self.scheme in ("hf", "s3", "gs")

    @property
    def claim(self) -> str | None:
        """The PersistentVolumeClaim a pvc:// URI names."""
        return self.uri.removeprefix("pvc://").split("/", 1)[0] if self.scheme == "pvc" else None

    @property
    def claim_folder(self) -> str | None:
        """The adapters' folder inside the claim ("" = its root), for a pvc:// URI."""
        return self.uri.removeprefix("pvc://").partition("/")[2].strip("/") if self.scheme == "pvc" else None

    def identity(self) -> dict[str, str]:
        """How status.adapters names the source: {"uri", "revision"} (a revision only for hf://)."""
        return {"uri": self.uri, "revision": self.revision} if self.scheme == "hf" else {"uri": self.uri}


# What the operator sets in an engine pod, and so a pod template may not: its labels (selectors
# find pods by them), annotations under its prefix, the engine's environment (the engine is
# configured through spec.engine), and the volumes and mount paths of config, scratch, models,
# tokens and the compile cache.
OWNED_LABEL_PREFIXES = ("synerdiff.io/", "app.kubernetes.io/")
OWNED_ANNOTATION_PREFIX = "synerdiff.io/"
# The object stores' credentials come from model.s3/model.gs Secrets into the download alone; a
# pod-template value would override them there and also reach the engine container.
OWNED_ENV = (
    "HOME",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "HF_HUB_DISABLE_TELEMETRY",
    "HF_TOKEN",
    "OMP_WAIT_POLICY",
    "PYTHONUNBUFFERED",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "GOOGLE_APPLICATION_CREDENTIALS",
)
OWNED_ENV_PREFIX = "SYNERDIFF_"
OWNED_VOLUMES = ("config", "tmp", "dshm", "models", "model-credentials", "adapters", "adapter-credentials", "api-token", "compile-cache")
OWNED_MOUNT_PATHS = ("/etc/synerdiff", "/tmp", "/dev/shm", "/models", "/adapters", "/var/run/secrets/synerdiff", "/var/cache/synerdiff/compile")


def _cel_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


POD_META_RULES = (
    (
        "!has(self.labels) || self.labels.all(k, " + " && ".join(f"!k.startsWith('{p}')" for p in OWNED_LABEL_PREFIXES) + ")",
        "podTemplate.metadata.labels: keys under synerdiff.io/ and app.kubernetes.io/ are the operator's (its selectors find pods by them)",
    ),
    (
        f"!has(self.annotations) || self.annotations.all(k, !k.startsWith('{OWNED_ANNOTATION_PREFIX}'))",
        "podTemplate.metadata.annotations: keys under synerdiff.io/ are the operator's",
    ),
)
POD_SPEC_RULES = (
    (
        f"!has(self.env) || self.env.all(e, !e.name.startsWith('{OWNED_ENV_PREFIX}') && !(e.name in {_cel_list(OWNED_ENV)}))",
        "podTemplate.spec.env: SYNERDIFF_* and "
        + ", ".join(OWNED_ENV)
        + " are set by the operator; configure the engine through spec.engine and object-store credentials through model.s3 or model.gs",
    ),
    (
        f"!has(self.volumes) || self.volumes.all(v, !(v.name in {_cel_list(OWNED_VOLUMES)}))",
        "podTemplate.spec.volumes: the names " + ", ".join(OWNED_VOLUMES) + " are the operator's; name yours otherwise",
    ),
    (
        f"!has(self.volumeMounts) || self.volumeMounts.all(m, !(m.mountPath in {_cel_list(OWNED_MOUNT_PATHS)}))",
        "podTemplate.spec.volumeMounts: " + ", ".join(OWNED_MOUNT_PATHS) + " are mounted by the operator",
    ),
    (
        # model-credentials would put the download's key into the engine container.
        f"!has(self.volumeMounts) || self.volumeMounts.all(m, !(m.name in {_cel_list(OWNED_VOLUMES)}))",
        "podTemplate.spec.volumeMounts: the operator's volumes (" + ", ".join(OWNED_VOLUMES) + ") are mounted by the operator where they belong",
    ),
)


class LocalObjectReference(_Spec):
    name: str = Field(pattern=DNS_SUBDOMAIN, max_length=253)


class EnvVar(_Spec):
    name: str = Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
    value: str | None = None
    value_from: dict[str, Any] | None = Field(None, alias="valueFrom", description="As a container's env[].valueFrom.")


class Volume(BaseModel):
    """A pod volume: its name, and its source as Kubernetes spells it (kept as given)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True)

    name: str = Field(pattern=DNS_LABEL, max_length=63)


class VolumeMount(_Spec):
    name: str = Field(pattern=DNS_LABEL, max_length=63)
    # Absolute, without a trailing slash, so that an owned path cannot come back as "/models/".
    mount_path: str = Field(alias="mountPath", min_length=1, max_length=4096, pattern=r"^/(.*[^/])?$")
    read_only: bool | None = Field(None, alias="readOnly")
    sub_path: str | None = Field(None, alias="subPath")
    sub_path_expr: str | None = Field(None, alias="subPathExpr")


class PodTemplateMeta(_Spec):
    model_config = ConfigDict(json_schema_extra=rules(*POD_META_RULES))

    # Bounded so that the API server's cost estimate of the CEL rules over them stays in budget.
    labels: dict[str, str] = Field(default_factory=dict, max_length=64, description="Added to the engine pods' labels.")
    annotations: dict[str, str] = Field(
        default_factory=dict, max_length=64, description="Added to the engine pods' annotations (e.g. karpenter.sh/do-not-disrupt)."
    )

    @model_validator(mode="after")
    def _not_owned(self) -> PodTemplateMeta:
        if any(k.startswith(OWNED_LABEL_PREFIXES) for k in self.labels):
            raise ValueError(POD_META_RULES[0][1])
        if any(k.startswith(OWNED_ANNOTATION_PREFIX) for k in self.annotations):
            raise ValueError(POD_META_RULES[1][1])
        return self


class PodTemplateSpec(_Spec):
    model_config = ConfigDict(json_schema_extra=rules(*POD_SPEC_RULES))

    image_pull_secrets: list[LocalObjectReference] = Field(default_factory=list, alias="imagePullSecrets", description="Secrets for pulling the engine image.")
    service_account_name: str | None = Field(
        None, alias="serviceAccountName", pattern=DNS_SUBDOMAIN, max_length=253, description="For cloud identity (IRSA, Workload Identity)."
    )
    priority_class_name: str | None = Field(None, alias="priorityClassName", pattern=DNS_SUBDOMAIN, max_length=253)
    affinity: dict[str, Any] | None = Field(None, description="As a pod's spec.affinity.")
    topology_spread_constraints: list[dict[str, Any]] | None = Field(
        None,
        alias="topologySpreadConstraints",
        description="As a pod's spec.topologySpreadConstraints; unset: engines spread one per node where possible; [] for none.",
    )
    env: list[EnvVar] = Field(default_factory=list, max_length=64, description="Added to the engine and model-fetch containers (e.g. HTTPS_PROXY).")
    volumes: list[Volume] = Field(default_factory=list, max_length=32, description="Added to the pod.")
    volume_mounts: list[VolumeMount] = Field(default_factory=list, max_length=32, alias="volumeMounts", description="Added to the engine container.")

    @model_validator(mode="after")
    def _not_owned(self) -> PodTemplateSpec:
        if any(e.name.startswith(OWNED_ENV_PREFIX) or e.name in OWNED_ENV for e in self.env):
            raise ValueError(POD_SPEC_RULES[0][1])
        if any(v.name in OWNED_VOLUMES for v in self.volumes):
            raise ValueError(POD_SPEC_RULES[1][1])
        if any(m.mount_path in OWNED_MOUNT_PATHS for m in self.volume_mounts):
            raise ValueError(POD_SPEC_RULES[2][1])
        if any(m.name in OWNED_VOLUMES for m in self.volume_mounts):
            raise ValueError(POD_SPEC_RULES[3][1])
        return self


class PodTemplate(_Spec):
    metadata: PodTemplateMeta = Field(default_factory=PodTemplateMeta)
    spec: PodTemplateSpec = Field(default_factory=PodTemplateSpec)


class CompileCache(_Spec):
    pvc: str = Field(
        pattern=DNS_SUBDOMAIN,
        max_length=253,
        description="PersistentVolumeClaim holding the engines' compiled UNet kernels, shared by the pool's pods: ReadWriteMany, "
        "or ReadOnlyMany filled beforehand (readOnly: true). The first pod to compile writes it; later pods and restarts load it "
        "and start warm (seconds per graph instead of about a minute).",
    )
    read_only: bool = Field(False, alias="readOnly", description="Mount the claim read-only: pods load the cache and never write it.")


TOLERATION_RULES = (
    ("self.operator != 'Exists' || !has(self.value)", "a toleration with operator Exists takes no value"),
    ("has(self.key) || self.operator == 'Exists'", "a toleration without a key must use operator Exists"),
    ("!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')", "tolerationSeconds needs effect NoExecute"),
)


class Toleration(_Spec):
    model_config = ConfigDict(json_schema_extra=rules(*TOLERATION_RULES))

    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, alias="tolerationSeconds", ge=0)

    @model_validator(mode="after")
    def _kubernetes_rules(self) -> Toleration:
        if self.operator == "Exists" and self.value is not None:
            raise ValueError(TOLERATION_RULES[0][1])
        if self.key is None and self.operator != "Exists":
            raise ValueError(TOLERATION_RULES[1][1])
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError(TOLERATION_RULES[2][1])
        return self


GPU_RULES = (
    (
        "self.count <= 1",
        "gpu.count above 1 would be paid for and sit idle: an engine runs on one GPU; for more GPUs raise replicas "
        "(the pool's router spreads requests over the engines)",
    ),
)


class GPU(_Spec):
    model_config = ConfigDict(json_schema_extra=rules(*GPU_RULES))

    count: int = Field(1, ge=0, le=8, description="GPUs per engine pod: 1, or 0 to run the engine on CPU (testing only).")
    resource_name: str = Field(
        "nvidia.com/gpu", alias="resourceName", min_length=1, max_length=317, pattern=RESOURCE_NAME, description="Extended resource that counts GPUs."
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, alias="nodeSelector", description="Node labels the engine pods require (e.g. a GPU product label)."
    )
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32, description="Tolerations for tainted GPU nodes.")
    runtime_class_name: str | None = Field(None, alias="runtimeClassName", pattern=DNS_LABEL, description="RuntimeClass for GPU containers, e.g. `nvidia`.")

    @model_validator(mode="after")
    def _one_engine_one_gpu(self) -> GPU:
        if self.count > 1:
            raise ValueError(GPU_RULES[0][1])
        return self


Quantity = Annotated[str, StringConstraints(pattern=QUANTITY)]


class Quantities(_Spec):
    requests: dict[str, int | Quantity] = Field(default_factory=dict, description="e.g. cpu: 4, memory: 32Gi (GPUs come from spec.gpu).")
    limits: dict[str, int | Quantity] = Field(default_factory=dict)


class Autoscaling(_Spec):
    """The operator's own control loop (`autoscaler.py`, algorithm in `scaling.py`, see docs/operator.md)."""

    enabled: bool = Field(
        False,
        description="Let the operator's autoscaler own spec.replicas within [minReplicas, maxReplicas]. Leave false to drive /scale with an HPA, KEDA or kubectl.",
    )
    tune_thresholds: bool = Field(
        False,
        alias="tuneThresholds",
        description="Push scheduler threshold floors and the skip-CFG bound to the pods from pool-wide metrics (PUT /v1/admin/scheduler; needs an admin or API token Secret). Works with or without `enabled`.",
    )
    period_seconds: float = Field(5.0, alias="periodSeconds", ge=0.2, le=300, description="How often the pods' /metrics are read and a decision is taken.")
    capacity_per_replica: float | None = Field(
        None,
        alias="capacityPerReplica",
        gt=0,
        le=100000,
        description="Images/s one ready pod sustains within the latency SLO (e.g. from `synerdiff profile` and the pool simulator). Unset: learned from pods observed saturated.",
    )
    target_utilization: float = Field(
        0.7,
        alias="targetUtilization",
        gt=0,
        le=1,
        description="Fraction of capacityPerReplica each pod is planned to carry; the rest absorbs bursts while new pods start.",
    )
    target_queue_per_replica: float = Field(
        4.0,
        alias="targetQueuePerReplica",
        gt=0,
        le=10000,
        description="Waiting requests per ready replica tolerated; a backlog beyond it adds the capacity to drain it within the stable window, and marks the pool saturated for threshold tuning.",
    )
    scale_up_window_seconds: int = Field(
        30, alias="scaleUpWindowSeconds", ge=0, le=3600, description="The stable window: the arrival rate is averaged over it for the normal decision."
    )
    predict_seconds: float = Field(
        0.0,
        alias="predictSeconds",
        ge=0,
        le=3600,
        description="Lead time: while the arrival rate rises, plan for where its trend (regressed over four stable windows) will be this much later. Set it near the pods' start-up time (image pull + model load); 0 disables.",
    )
    headroom_images_per_second: float = Field(
        0.0,
        alias="headroomImagesPerSecond",
        ge=0,
        le=100000,
        description="Spare capacity (images/s) kept above the planned load, within maxReplicas: the rise a burst can make while a new pod starts (its ramp x start-up time). No reactive signal sees a burst before it comes; this is the buffer that absorbs it.",
    )
    panic_window_seconds: float = Field(
        6.0,
        alias="panicWindowSeconds",
        ge=0,
        le=3600,
        description="The panic window (shorter than the stable window): a burst seen here that needs panicThreshold x the ready pods scales up at once, and nothing scales down until a stable window passes without one.",
    )
    panic_threshold: float = Field(
        2.0, alias="panicThreshold", ge=1, le=100, description="Panic when the panic window's desired pods reach this multiple of the ready pods."
    )
    scale_down_delay_seconds: int = Field(
        300,
        alias="scaleDownDelaySeconds",
        ge=0,
        le=86400,
        description="A scale-down takes the highest recommendation of this window, so load must stay low this long.",
    )
    max_scale_up_rate: float = Field(
        2.0,
        alias="maxScaleUpRate",
        ge=1,
        le=1000,
        description="A stable-window decision sets at most max(n+1, ceil(n x this)) pods, n = ready pods + pods on the way; panic asks for what the load needs.",
    )
    gpu_budget: int | None = Field(
        None,
        alias="gpuBudget",
        ge=0,
        le=100000,
        description="Most GPUs (replicas x gpu.count) the autoscaler may ask for in this pool; it never scales down to meet it. The operator may have a budget across pools too.",
    )
    max_scale_down_rate: float = Field(
        2.0, alias="maxScaleDownRate", ge=1, le=1000, description="One decision removes at most half (for 2) of the pods, and at least one."
    )
    latency_slo_seconds: float | None = Field(
        None,
        alias="latencySLOSeconds",
        gt=0,
        le=3600,
        description="End-to-end latency objective; threshold tuning raises the floor while SLO attainment is below sloTarget.",
    )
    slo_target: float = Field(0.99, alias="sloTarget", gt=0, le=1, description="Fraction of requests that should meet latencySLOSeconds.")
    prometheus_url: str | None = Field(
        None,
        alias="prometheusURL",
        pattern=r"^https?://[^\s]+$",
        max_length=2048,
        description="Read the pods' engine metrics from this Prometheus server's query API instead of scraping each pod; its series must carry `namespace` and `pod` labels (a PodMonitor or the usual kubernetes_sd relabelling). Scrape at least every periodSeconds.",
    )
    prometheus_selector: str = Field(
        "", alias="prometheusSelector", max_length=1024, description='Extra label matchers for the Prometheus queries, as inside {...}: e.g. job="synerdiff".'
    )

    @field_validator("prometheus_selector")
    @classmethod
    def _selector(cls, v: str) -> str:
        from synerdiff_operator.prometheus import valid_selector

        if not valid_selector(v):
            raise ValueError('prometheusSelector must be label matchers like job="synerdiff", env=~"a|b"')
        return v


class ServiceSpec(_Spec):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    port: int = Field(80, ge=1, le=65535, description="Service port; it forwards to the router's (or, without the router, the engines') port 8000.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Extra Service annotations (e.g. for a cloud load balancer).")


class RouterSpec(_Spec):
    """`synerdiff route` in front of the engines: the pool's Service points at it (docs/router.md)."""

    enabled: bool = Field(
        True,
        description="Run the router: the pool's Service selects it, and it routes by outstanding work, retries refusals that never started, and buffers while no engine is ready (needed for minReplicas 0). False: the Service selects the engines directly (kube-proxy's random pick per connection).",
    )
    replicas: int = Field(2, ge=2, le=100, description="Router pods (at least 2, spread over nodes; a PodDisruptionBudget keeps one up).")
    image: str | None = Field(None, min_length=1, max_length=1024, description="Router image; defaults to the engine image, which includes `synerdiff route`.")
    resources: Quantities = Field(
        default_factory=Quantities, description="Router container resources; default requests cpu 250m, memory 256Mi, limit memory 1Gi."
    )
    buffer_timeout_seconds: int = Field(
        600,
        alias="bufferTimeoutSeconds",
        ge=1,
        le=86400,
        description="Longest a request waits at the router for a ready engine (a pool waking from zero takes a pod's start-up time).",
    )
    buffer_max: int = Field(
        1024, alias="bufferMax", ge=0, le=1_000_000, description="Most requests a router replica holds while no engine is ready; beyond it 503."
    )


class Auth(_Spec):
    api_token_secret: SecretKeyRef | None = Field(None, alias="apiTokenSecret", description="Bearer token every API call must carry (mounted as a file).")
    admin_token_secret: SecretKeyRef | None = Field(None, alias="adminTokenSecret", description="Token for /v1/admin/*; defaults to the API token.")


class Rollout(_Spec):
    model_config = ConfigDict(
        json_schema_extra=rules(("self.maxSurge + self.maxUnavailable > 0", "rollout.maxSurge and rollout.maxUnavailable cannot both be 0"))
    )

    max_surge: int = Field(1, alias="maxSurge", ge=0, le=100, description="Extra pods during a rollout; each needs free GPUs.")
    max_unavailable: int = Field(
        0, alias="maxUnavailable", ge=0, le=100, description="Pods that may be down during a rollout; >0 lets a rollout proceed without spare GPUs."
    )

    @model_validator(mode="after")
    def _progress(self) -> Rollout:
        if self.max_surge + self.max_unavailable <= 0:
            raise ValueError("rollout.maxSurge and rollout.maxUnavailable cannot both be 0")
        return self


def _engine_spec_model() -> type[BaseModel]:
    """EngineConfig's own fields (with their bounds, defaults and nested validators), minus the derived ones."""
    fields: dict[str, Any] = {name: (info.annotation, info) for name, info in EngineConfig.model_fields.items() if name not in ENGINE_OWNED_FIELDS}
    return create_model(
        "EngineSpec",
        __config__=ConfigDict(extra="forbid", frozen=True, title="EngineSpec"),
        __doc__="Engine settings, as in the engine's config file (snake_case, generated from synerdiff.contract.config.EngineConfig).",
        **fields,
    )


if TYPE_CHECKING:
    # A model built at run time is no type to a checker; EngineConfig has the same fields plus
    # the owned ones, which the operator never reads from a spec.
    EngineSpec = EngineConfig
else:
    EngineSpec = _engine_spec_model()

SPEC_RULES = (
    ("self.minReplicas <= self.maxReplicas", "minReplicas must be <= maxReplicas"),
    (
        "self.autoscaling.enabled || (self.replicas >= self.minReplicas && self.replicas <= self.maxReplicas)",
        "replicas must lie within [minReplicas, maxReplicas] while autoscaling is disabled",
    ),
    ("self.gpu.count > 0 || self.model.dtype != 'float16'", "model.dtype float16 needs gpu.count >= 1"),
    ("self.engine.default_steps <= self.engine.limits.max_steps", "engine.default_steps must be <= engine.limits.max_steps"),
    (
        "!has(self.drainTimeoutSeconds) || self.drainTimeoutSeconds >= self.engine.limits.request_timeout_s",
        "drainTimeoutSeconds must be at least engine.limits.request_timeout_s: a pod stopping (scale-down, rollout, node drain) would cut off "
        "requests still within their deadline. Raise drainTimeoutSeconds, lower engine.limits.request_timeout_s, or leave drainTimeoutSeconds "
        "unset to drain for the request timeout",
    ),
    (
        "!has(self.adapters) || !has(self.engine.lora) || !has(self.engine.lora.dir) || self.engine.lora.dir == ''",
        "engine.lora.dir is set by the operator when spec.adapters is given (the adapters are mounted into the engine); leave it unset",
    ),
    (
        "!has(self.engine.precision) || self.engine.precision != 'fp8' || (self.model.dtype == 'bfloat16' && self.gpu.count > 0)",
        "engine.precision fp8 needs model.dtype bfloat16 (float8 with per-row scales is computed from bfloat16 weights) and gpu.count >= 1 "
        "on GPUs with FP8 tensor cores (Ada, Hopper, Blackwell)",
    ),
)


class PoolSpec(_Spec):
    model_config = ConfigDict(json_schema_extra=rules(*SPEC_RULES))

    model: ModelSource
    adapters: AdapterSource | None = Field(
        None,
        description="LoRA adapters the engines serve per request (a request's `lora` names them): fetched or mounted like the model, "
        "and given to the engines as engine.lora.dir. Unset: engine.lora.dir as set in spec.engine (empty: LoRA off).",
    )
    image: str = Field(min_length=1, max_length=1024, description="Engine container image (docker/engine.Dockerfile); runs `synerdiff serve`.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field("IfNotPresent", alias="imagePullPolicy")
    replicas: int = Field(1, ge=0, le=1000, description="Engine pods; set by `kubectl scale` and by the autoscaler through /scale.")
    min_replicas: int = Field(
        1,
        alias="minReplicas",
        ge=0,
        le=1000,
        description="Fewest engine pods the autoscaler keeps. 0 lets it scale an idle pool to zero after scaleDownDelaySeconds; the router buffers requests meanwhile and its buffered count wakes the pool (needs router.enabled).",
    )
    max_replicas: int = Field(4, alias="maxReplicas", ge=1, le=1000)
    gpu: GPU = Field(default_factory=GPU)
    resources: Quantities = Field(default_factory=Quantities)
    engine: EngineSpec = Field(default_factory=EngineSpec)
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    service: ServiceSpec = Field(default_factory=ServiceSpec)
    router: RouterSpec = Field(default_factory=RouterSpec)
    auth: Auth = Field(default_factory=Auth)
    rollout: Rollout = Field(default_factory=Rollout)
    pod_template: PodTemplate = Field(
        default_factory=PodTemplate,
        alias="podTemplate",
        description="Merged into the engine pods: labels, annotations, pull secrets, service account, priority, affinity, "
        "spread, env, volumes and the engine's volume mounts. What the operator sets (command, probes, resources, its "
        "labels, env and volumes) is refused here.",
    )
    compile_cache: CompileCache | None = Field(
        None,
        alias="compileCache",
        description="Where the engines keep compiled kernels (GPU pools); unset: in the pod's scratch space, so a container restart "
        "starts warm but a new pod compiles again.",
    )
    served_model_name: str | None = Field(
        None, alias="servedModelName", min_length=1, max_length=256, description="Model name in the OpenAI API; defaults to the pool's name."
    )
    drain_timeout_seconds: float | None = Field(
        None,
        alias="drainTimeoutSeconds",
        ge=0,
        le=3600,
        description="On shutdown, how long in-flight requests may take to finish; at least engine.limits.request_timeout_s. Unset: that timeout.",
    )
    startup_timeout_seconds: int = Field(
        1800, alias="startupTimeoutSeconds", ge=60, le=86400, description="Longest model download + load + warm-up before a pod is restarted."
    )

    @model_validator(mode="after")
    def _consistent(self) -> PoolSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(SPEC_RULES[0][1])
        if not self.autoscaling.enabled and not self.min_replicas <= self.replicas <= self.max_replicas:
            raise ValueError(SPEC_RULES[1][1])
        if self.gpu.count == 0 and self.model.dtype == "float16":
            raise ValueError(SPEC_RULES[2][1])
        if self.engine.default_steps > self.engine.limits.max_steps:
            raise ValueError(SPEC_RULES[3][1])
        if self.drain_timeout_seconds is not None and self.drain_timeout_seconds < self.engine.limits.request_timeout_s:
            raise ValueError(SPEC_RULES[4][1])
        if self.adapters is not None and self.engine.lora.dir:
            raise ValueError(SPEC_RULES[5][1])
        if self.engine.precision == "fp8" and (self.model.dtype != "bfloat16" or self.gpu.count == 0):
            raise ValueError(SPEC_RULES[6][1])
        return self

    def drain_seconds(self) -> float:
        """How long a stopping pod drains: the spec's, else the request timeout, which every request
        admitted before SIGTERM finishes (or fails) within."""
        return self.drain_timeout_seconds if self.drain_timeout_seconds is not None else self.engine.limits.request_timeout_s

    def desired_replicas(self) -> int:
        """Pods to run: the autoscaler's choice is clamped to the bounds it must respect."""
        if self.autoscaling.enabled:
            return max(self.min_replicas, min(self.replicas, self.max_replicas))
        return self.replicas


def _describe(error: ValidationError) -> str:
    parts = []
    for err in error.errors():
        where = ".".join(str(p) for p in err["loc"]) or "spec"
        parts.append(f"spec.{where}: {err['msg']}" if where != "spec" else f"spec: {err['msg']}")
    return "; ".join(parts)


def parse_spec(raw: dict[str, Any] | None) -> PoolSpec:
    """Validate a raw spec (with defaults applied as the API server would); InvalidSpec names the fields."""
    try:
        return PoolSpec.model_validate(raw or {})
    except ValidationError as exc:
        raise InvalidSpec(_describe(exc)) from None


def check_name(name: str) -> None:
    """Children are named after the pool; a Service name must be a DNS-1035 label."""
    if len(name) > 63 or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        raise InvalidSpec(f"metadata.name {name!r} must be a DNS-1035 label (lowercase, starts with a letter, <= 63 chars): it names the Service")


NAME_RULE = (
    "size(self.metadata.name) <= 63 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
    "metadata.name must be a DNS-1035 label of at most 63 characters (it names the pool's Service)",
)
