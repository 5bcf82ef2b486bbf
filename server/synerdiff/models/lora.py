"""Per-request LoRA adapters applied per row inside the running batch: no weight merging, no
batch per adapter.

At start (only when `engine.lora.dir` is set) every `nn.Linear` of the denoiser and the text
encoders whose name ends in one of the common LoRA targets (`DENOISER_TARGETS`, `TEXT_TARGETS`)
is replaced by a `BatchedLoraLinear`. Each holds static device tensors for `cache_slots + 1`
adapters: A (slots+1, max_rank, in), B (slots+1, out, max_rank) and the layer's alpha/r per slot;
slot 0 is "no adapter" (zeros), a lower rank is zero-padded (exact). Before a forward the runner
writes, per batch row, `max_per_request` (slot, scale) pairs into a static `RowTable`; the layer
adds `sum_k scale_k * s[slot_k] * (x @ A[slot_k]^T) @ B[slot_k]^T` to the base output of each row,
which is what PEFT computes for that row's active adapters after diffusers' `load_lora_weights`
and `set_adapters(names, weights)` (scaling = weight * alpha / r). The gather `A[slots]` has a
static shape, so the UNet's captured CUDA graphs stay valid: a graph reads the row table and
the slot tensors by address, and loading an adapter only overwrites a slot in place.

Adapters are read with the family's pipeline class (`lora_state_dict`, which converts kohya
keys and alphas exactly as `load_lora_weights` does), and their ranks and alphas resolved as
diffusers' `get_peft_kwargs` and PEFT's pattern lookup resolve them. An adapter that targets a
layer that is not wrapped (a convolution, LoCon, a module the model lacks), carries biases or
DoRA magnitudes, or exceeds `max_rank`, is refused at submit naming the problem.

`AdapterCache` keeps the parsed adapters (host memory), the device slots with LRU eviction and
the pins: a request pins its adapters' slots from admission to release, and an adapter that a
pinned request uses is never evicted. A request whose adapters do not fit the unpinned slots
now waits in the queue (`admissible`).
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..contract.config import LoraConfig
from .loader import ModelBundle

log = logging.getLogger("synerdiff.lora")

# Last parts of the module names wrapped (nn.Linear only): attention projections, feed-forward,
# linear proj_in/proj_out, time and added-condition embeddings; DiT transformers use the same names.
DENOISER_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_in",
    "proj_out",
    "proj_mlp",
    "time_emb_proj",
    "linear_1",
    "linear_2",
)
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
DENOISERS = ("unet", "transformer")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class AdapterError(ValueError):
    """An adapter a request names cannot be served; the message names the problem."""


@dataclass(frozen=True)
class LayerDelta:
    a: torch.Tensor  # (r, in), CPU
    b: torch.Tensor  # (out, r), CPU
    scaling: float  # alpha / r (alpha / sqrt(r) with rslora), as PEFT sets it


@dataclass
class Adapter:
    name: str
    rank: int
    layers: dict[str, LayerDelta]  # "component.module" -> delta
    stamp: tuple[float, int] = (0.0, 0)  # the file's mtime and size when read

    @property
    def key(self) -> tuple[str, tuple[float, int]]:
        """Which file version it is: one slot a version, however often the file was parsed."""
        return (self.name, self.stamp)

    @property
    def components(self) -> set[str]:
        return {k.split(".", 1)[0] for k in self.layers}


def adapter_path(root: Path, name: str) -> Path | None:
    """NAME.safetensors or NAME/pytorch_lora_weights.safetensors in `root`, if either exists."""
    for p in (root / f"{name}.safetensors", root / name / WEIGHTS_FILE):
        if p.is_file():
            return p
    return None


def list_adapters(root: str | Path) -> list[str]:
    """The adapter names in the folder (both layouts)."""
    base = Path(root)
    if not base.is_dir():
        return []
    names = {p.stem for p in base.glob("*.safetensors") if p.is_file()}
    names |= {p.parent.name for p in base.glob(f"*/{WEIGHTS_FILE}") if p.is_file()}
    return sorted(n for n in names if _NAME.match(n))


def _pattern_key(keys: Sequence[str], name: str) -> str:
    """PEFT's get_pattern_key: the first rank/alpha pattern that matches the module name's end."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return name


def _module_deltas(
    state: dict[str, torch.Tensor], alphas: dict[str, Any] | None, metadata: dict[str, Any] | None, rank: dict[str, int], is_unet: bool
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """PEFT-format keys (module.lora_A.weight / lora_B.weight) of one component -> per module
    (A, B, alpha/r), with r and alpha as diffusers' LoraConfig and PEFT's layers get them."""
    from diffusers.utils.peft_utils import get_peft_kwargs

    for key in state:
        if "lora_magnitude_vector" in key:
            raise AdapterError(f"{key}: DoRA adapters are not served")
        if ".lora_B" in key and key.endswith(".bias"):
            raise AdapterError(f"{key}: LoRA biases are not served")
        if not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise AdapterError(f"{key}: not a LoRA A/B weight (only LoRA on linear layers is served)")
    kw: dict[str, Any] = dict(metadata) if metadata else get_peft_kwargs(rank, network_alpha_dict=alphas, peft_state_dict=state, is_unet=is_unet)
    r0, alpha0 = kw.get("r", 8), kw.get("lora_alpha", 8)
    ranks: dict[str, Any] = kw.get("rank_pattern") or {}
    alphas_p: dict[str, Any] = kw.get("alpha_pattern") or {}
    rslora = bool(kw.get("use_rslora", False))
    out = {}
    for key, a in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        b = state.get(f"{module}.lora_B.weight")
        if b is None:
            raise AdapterError(f"{module}: lora_A without lora_B")
        r = int(ranks.get(_pattern_key(list(ranks), module), r0))
        alpha = float(alphas_p.get(_pattern_key(list(alphas_p), module), alpha0))
        if a.ndim != 2 or b.ndim != 2:
            raise AdapterError(f"{module}: LoRA weights of {a.ndim} and {b.ndim} dimensions; only linear layers (LoRA, not LoCon) are served")
        if a.shape[0] != b.shape[1] or a.shape[0] != r:
            raise AdapterError(f"{module}: A {tuple(a.shape)} and B {tuple(b.shape)} disagree with rank {r}")
        scaling = alpha / math.sqrt(r) if rslora else alpha / r
        out[module] = (a, b, scaling)
    for key in state:
        if key.endswith(".lora_B.weight") and key[: -len(".lora_B.weight")] not in out:
            raise AdapterError(f"{key}: lora_B without lora_A")
    return out


def read_adapter(
    path: Path, name: str, family_pipeline: Any, components: dict[str, nn.Module], unet_config: Any = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """The adapter file's deltas, "component.module" -> (A, B, alpha/r), read as the family's
    pipeline `load_lora_weights` reads it (kohya keys and alphas converted by diffusers)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    kw: dict[str, Any] = dict(weight_name=path.name, local_files_only=True, return_lora_metadata=True)
    if unet_config is not None:
        kw["unet_config"] = unet_config
    try:
        state, alphas, metadata = _lora_state_dict(family_pipeline, str(path.parent), kw)
    except Exception as exc:  # noqa: BLE001 - any reader error is a bad file
        raise AdapterError(f"could not read {path.name}: {type(exc).__name__}: {str(exc)[:300]}") from None
    if not state:
        raise AdapterError(f"{path.name} holds no weights")
    if not all("lora" in k for k in state):
        raise AdapterError("not a LoRA checkpoint: every parameter name must contain 'lora' (as diffusers' load_lora_weights requires)")
    known = set(components)
    stray = sorted({k.split(".", 1)[0] for k in state} - known)
    if stray:
        raise AdapterError(f"weights for {', '.join(repr(s) for s in stray[:3])}, which this model lacks (it has {', '.join(sorted(known))})")
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for comp, module in components.items():
        prefix = f"{comp}."
        part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not part:
            continue
        meta = {k[len(prefix) :]: v for k, v in metadata.items() if k.startswith(prefix)} if metadata else None
        if comp in DENOISERS:
            if "lora_A" not in next(iter(part)):
                part = convert_unet_state_dict_to_peft(part)
            rank = {f"^{k}": int(v.shape[1]) for k, v in part.items() if "lora_B" in k and v.ndim > 1}
            al = {k[len(prefix) :]: v for k, v in alphas.items() if k.startswith(prefix)} if alphas else None
            found = _module_deltas(part, al, meta, rank, is_unet=True)
        else:
            part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
            if not hasattr(module, "text_model"):
                part = {k.removeprefix("text_model."): v for k, v in part.items()}
            rank = {}
            for mname, _ in module.named_modules():
                if mname.endswith((".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")):
                    rk = f"{mname}.lora_B.weight"
                    if rk in part:
                        rank[rk] = int(part[rk].shape[1])
            if not rank:
                raise AdapterError(f"{comp}: no weights for its attention or MLP projections")
            al = {k[len(prefix) :]: v for k, v in alphas.items() if k.startswith(prefix) and k.split(".")[0] == comp} if alphas else None
            found = _module_deltas(part, al, meta, rank, is_unet=False)
        deltas.update({f"{comp}.{m}": v for m, v in found.items()})
    return deltas


class RowTable:
    """Per batch row, `pairs` (slot, scale) pairs: static device tensors a graph reads by address."""

    def __init__(self, capacity: int, pairs: int, device: torch.device, dtype: torch.dtype, always: bool = False):
        self.pairs = pairs
        self.capacity = capacity
        self._slots = torch.zeros(capacity, pairs, dtype=torch.long, device=device)
        self._scales = torch.zeros(capacity, pairs, dtype=dtype, device=device)
        self.slots, self.scales = self._slots, self._scales
        self.always = always  # compute the LoRA term even when no row has an adapter (CUDA graphs)
        self.active = always

    def set(self, rows: Sequence[Sequence[tuple[int, float]]]) -> None:
        n = len(rows)
        size = max(n, self.capacity)
        slots = [[0] * self.pairs for _ in range(size)]
        scales = [[0.0] * self.pairs for _ in range(size)]
        any_adapter = False
        for i, row in enumerate(rows):
            for k, (slot, scale) in enumerate(row):
                slots[i][k], scales[i][k] = slot, scale
                any_adapter = any_adapter or slot != 0
        host_slots = torch.tensor(slots, dtype=torch.long)
        host_scales = torch.tensor(scales, dtype=torch.float64).to(self._scales.dtype)
        if n <= self.capacity:
            # Always the same tensors: a captured graph reads them by address. Rows past `n`
            # (a graph's padding) get slot 0.
            self._slots.copy_(host_slots, non_blocking=True)
            self._scales.copy_(host_scales, non_blocking=True)
            self.slots, self.scales = self._slots, self._scales
        else:  # more rows than any graph replays: eager, so a fresh tensor is fine
            self.slots = host_slots.to(self._slots.device)
            self.scales = host_scales.to(self._scales.device)
        self.active = self.always or any_adapter


class BatchedLoraLinear(nn.Module):
    """base(x) + per row sum_k scale_k * s[slot_k] * (x @ A[slot_k]^T) @ B[slot_k]^T; the first
    dimension of x is the batch row."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    lora_s: torch.Tensor

    def __init__(self, base: nn.Linear, table: RowTable, slots: int, rank: int):
        super().__init__()
        self.base = base
        self.table = table
        w = base.weight
        self.register_buffer("lora_A", torch.zeros(slots + 1, rank, base.in_features, dtype=w.dtype, device=w.device), persistent=False)
        self.register_buffer("lora_B", torch.zeros(slots + 1, base.out_features, rank, dtype=w.dtype, device=w.device), persistent=False)
        self.register_buffer("lora_s", torch.zeros(slots + 1, dtype=torch.float32, device=w.device), persistent=False)

    # nn.Linear's attributes, for code that reads them off the layer it replaced.
    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        t = self.table
        n = x.shape[0]
        if not t.active or n > t.slots.shape[0]:
            # No row has an adapter, or rows the table was not set for (timing runs of more rows).
            return out
        idx = t.slots[:n]  # (n, K)
        scale = t.scales[:n] * self.lora_s[idx]  # (n, K)
        a = self.lora_A[idx]  # (n, K, R, in)
        b = self.lora_B[idx]  # (n, K, out, R)
        xs = x.reshape(n, -1, x.shape[-1]).to(a.dtype)  # (n, L, in)
        h = (torch.einsum("nli,nkri->nlkr", xs, a).float() * scale[:, None, :, None]).to(b.dtype)
        delta = torch.einsum("nlkr,nkor->nlo", h, b)
        return out + delta.reshape(out.shape).to(out.dtype)


def _targets(component: str) -> tuple[str, ...]:
    return DENOISER_TARGETS if component in DENOISERS else TEXT_TARGETS


def wrap_linears(module: nn.Module, targets: Sequence[str], make: Callable[[nn.Linear], BatchedLoraLinear]) -> dict[str, BatchedLoraLinear]:
    """Replace every nn.Linear whose name ends in one of `targets`; their names -> the wrappers."""
    found = []
    for name, child in module.named_modules():
        if isinstance(child, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            found.append(name)
    wrapped = {}
    for name in found:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        layer = make(getattr(parent, attr))
        setattr(parent, attr, layer)
        wrapped[name] = layer
    return wrapped


def family_pipeline(family: str) -> Any:
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    return {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}[family]


def _lora_state_dict(pipeline: Any, folder: str, kw: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, dict[str, Any] | None]:
    """(state dict, network alphas, metadata) as the family's pipeline reads an adapter: the SD and
    SDXL readers return alphas, SD3's none (its loader passes none on), FLUX's when asked."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    if issubclass(pipeline, StableDiffusion3Pipeline):
        state, metadata = pipeline.lora_state_dict(folder, **kw)
        return state, None, metadata
    if issubclass(pipeline, FluxPipeline):
        state, alphas, metadata = pipeline.lora_state_dict(folder, return_alphas=True, **kw)
        return state, alphas, metadata
    state, alphas, metadata = pipeline.lora_state_dict(folder, **kw)
    return state, alphas, metadata


@dataclass
class CacheStats:
    loads: int = 0
    evictions: int = 0
    load_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=1024))  # drained by the metrics


class AdapterCache:
    """The adapters of one engine: validation (any thread), device slots and pins (engine thread)."""

    def __init__(self, config: LoraConfig, model: ModelBundle, rows: int):
        self.config = config
        self.model = model
        self.root = Path(config.dir)
        self.slots = config.cache_slots
        self.pairs = config.max_per_request
        self.max_rank = config.max_rank
        dev = model.device
        # The denoiser's table: every row a step can hold; the text encoders': grown as needed.
        # Scales stay float32 (PEFT keeps its scaling a Python float): 0.8 is 0.80078 in bfloat16.
        self.denoiser_rows = RowTable(rows, self.pairs, dev, torch.float32)
        self.text_rows = RowTable(16, self.pairs, dev, torch.float32)
        self.components: dict[str, nn.Module] = {}
        self.layers: dict[str, BatchedLoraLinear] = {}
        for comp in DENOISERS + TEXT_ENCODERS:
            module = getattr(model, comp, None)
            if module is None:
                continue
            self.components[comp] = module
            table = self.denoiser_rows if comp in DENOISERS else self.text_rows
            wrapped = wrap_linears(module, _targets(comp), self._wrapper(table))
            self.layers.update({f"{comp}.{k}": v for k, v in wrapped.items()})
        self._lock = threading.Lock()
        self._parsed: OrderedDict[str, Adapter] = OrderedDict()  # host cache, by name
        self._held: dict[str, list[tuple[Adapter, float]]] = {}  # submitted requests' adapters
        self._pins: dict[str, list[tuple[int, float]]] = {}  # admitted requests' (slot, scale)
        self._owner: dict[int, Adapter] = {}  # slot -> the adapter loaded there
        self._lru: OrderedDict[int, None] = OrderedDict()  # occupied slots, least recently used first
        self._written: dict[int, list[str]] = {}  # layers each slot has nonzero weights in
        self._refs: dict[int, int] = {}  # pins per slot
        self.stats = CacheStats()
        log.info("LoRA: %d linear layers wrapped, %d slots of rank %d, adapters from %s", len(self.layers), self.slots, self.max_rank, self.root)

    def _wrapper(self, table: RowTable) -> Callable[[nn.Linear], BatchedLoraLinear]:
        def make(base: nn.Linear) -> BatchedLoraLinear:
            return BatchedLoraLinear(base, table, self.slots, self.max_rank)

        return make

    # ------------------------------------------------------------------ any thread
    def available(self) -> list[str]:
        return list_adapters(self.root)

    def loaded(self) -> list[str]:
        with self._lock:
            return list(dict.fromkeys(self._owner[s].name for s in self._lru))

    def resolve(self, refs: Sequence[tuple[str, float]]) -> list[tuple[Adapter, float]]:
        """The parsed adapters a request names, or AdapterError naming the problem."""
        most = min(self.pairs, self.slots)  # more than the slots could never be admitted
        if len(refs) > most:
            raise AdapterError(f"names {len(refs)} adapters; at most {most} per request")
        names = [n for n, _ in refs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise AdapterError(f"names {dup[0]!r} more than once")
        out = []
        for name, scale in refs:
            if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or abs(scale) > 100:
                raise AdapterError(f"{name!r}: scale must be a finite number between -100 and 100, got {scale!r}")
            out.append((self._parse(name), float(scale)))
        return out

    def _parse(self, name: str) -> Adapter:
        if not isinstance(name, str) or not _NAME.match(name):
            raise AdapterError(f"{str(name)[:60]!r} is not an adapter name (letters, digits, '.', '_', '-')")
        path = adapter_path(self.root, name)
        if path is None:
            raise AdapterError(f"no adapter {name!r} in the LoRA folder (GET /v1/models lists them)")
        st = path.stat()
        stamp = (st.st_mtime, st.st_size)
        with self._lock:
            hit = self._parsed.get(name)
            if hit is not None and hit.stamp == stamp:
                self._parsed.move_to_end(name)
                return hit
        adapter = self._read(name, path, stamp)
        with self._lock:
            self._parsed[name] = adapter
            self._parsed.move_to_end(name)
            # Host copies beyond the device slots (and what queued requests hold) are let go.
            while len(self._parsed) > 2 * self.slots:
                self._parsed.popitem(last=False)
        return adapter

    def _read(self, name: str, path: Path, stamp: tuple[float, int]) -> Adapter:
        unet_config = self.model.unet.config if self.model.family == "sdxl" else None
        try:
            deltas = read_adapter(path, name, family_pipeline(self.model.family), self.components, unet_config)
        except AdapterError as exc:
            raise AdapterError(f"{name!r}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - diffusers' key conversions and PEFT's metadata raise anything on a malformed file
            raise AdapterError(f"{name!r}: could not read it as a LoRA file ({type(exc).__name__}: {str(exc)[:200]})") from None
        layers = {}
        rank = 0
        for key, (a, b, scaling) in deltas.items():
            layer = self.layers.get(key)
            if layer is None:
                raise AdapterError(
                    f"{name!r} targets {key}, which is not a wrapped linear layer (served: LoRA on the denoiser's "
                    "attention, feed-forward, projection and embedding linears and the text encoders' attention and MLP)"
                )
            r = int(a.shape[0])
            if r > self.max_rank:
                raise AdapterError(f"{name!r} has rank {r} at {key}; the largest served is lora.max_rank = {self.max_rank}")
            if tuple(a.shape) != (r, layer.in_features) or tuple(b.shape) != (layer.out_features, r):
                raise AdapterError(f"{name!r}: {key} has A {tuple(a.shape)} and B {tuple(b.shape)}, the layer is {layer.in_features} -> {layer.out_features}")
            if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all()) and math.isfinite(scaling)):
                raise AdapterError(f"{name!r}: {key} holds non-finite weights")
            rank = max(rank, r)
            layers[key] = LayerDelta(a.detach().to("cpu"), b.detach().to("cpu"), scaling)
        if not layers:
            raise AdapterError(f"{name!r} holds no LoRA weights for this model")
        return Adapter(name, rank, layers, stamp)

    def hold(self, job_id: str, adapters: list[tuple[Adapter, float]]) -> None:
        """Keep a submitted request's parsed adapters until it is released."""
        with self._lock:
            self._held[job_id] = adapters

    # ------------------------------------------------------------------ engine thread
    def admissible(self, jobs: Sequence[str]) -> list[str]:
        """Those of `jobs` (in order) whose adapters fit the device slots beside the pinned ones."""
        with self._lock:
            taken = {self._owner[s].key for s, c in self._refs.items() if c > 0}
            ok = []
            blocked = False
            for job in jobs:
                wanted = {a.key for a, _ in self._held.get(job, ())}
                if wanted <= taken or (not blocked and len(taken | wanted) <= self.slots):
                    taken |= wanted
                    ok.append(job)
                else:
                    # Its slots are reserved: later jobs that would take free slots wait behind it, so
                    # a request of several new adapters is not passed over until its deadline.
                    blocked = True
            return ok

    def pin(self, job_id: str) -> list[tuple[int, float]]:
        """Load a request's adapters into slots (evicting idle ones) and pin them: its (slot, scale) pairs."""
        if job_id in self._pins:
            return self._pins[job_id]
        with self._lock:
            held = self._held.get(job_id, [])
        pairs: list[tuple[int, float]] = []
        try:
            for adapter, scale in held:
                slot = self._load(adapter)
                self._refs[slot] = self._refs.get(slot, 0) + 1
                pairs.append((slot, scale))
        except Exception:
            for slot, _ in pairs:
                self._refs[slot] -= 1
            raise
        self._pins[job_id] = pairs
        return pairs

    def release(self, job_id: str) -> None:
        with self._lock:
            self._held.pop(job_id, None)
        for slot, _ in self._pins.pop(job_id, ()):
            self._refs[slot] -= 1

    def _load(self, adapter: Adapter) -> int:
        with self._lock:
            for s, owner in self._owner.items():
                if owner.key == adapter.key:
                    self._lru.move_to_end(s)
                    return s
            free = [s for s in range(1, self.slots + 1) if s not in self._owner]
            if free:
                slot = free[0]
            else:
                victim = next((s for s in self._lru if self._refs.get(s, 0) == 0), None)
                if victim is None:
                    raise RuntimeError("every LoRA slot is pinned (admission should have held the request back)")
                slot = victim
                gone = self._owner.pop(slot)
                del self._lru[slot]
                self.stats.evictions += 1
                log.info("LoRA: evicted %s from slot %d", gone.name, slot)
        t0 = time.perf_counter()
        self._write(slot, adapter)
        seconds = time.perf_counter() - t0
        with self._lock:
            self._owner[slot] = adapter
            self._lru[slot] = None
            self.stats.loads += 1
            self.stats.load_seconds.append(seconds)
        log.info("LoRA: loaded %s (rank %d, %d layers) into slot %d in %.3f s", adapter.name, adapter.rank, len(adapter.layers), slot, seconds)
        return slot

    @torch.inference_mode()
    def _write(self, slot: int, adapter: Adapter) -> None:
        stale = self._written.get(slot, [])
        # Listed before any copy: a write cut short leaves no layer that the next write would not zero.
        self._written[slot] = list(dict.fromkeys([*stale, *adapter.layers]))
        for key in stale:
            layer = self.layers[key]
            layer.lora_A[slot].zero_()
            layer.lora_B[slot].zero_()
            layer.lora_s[slot] = 0.0
        for key, d in adapter.layers.items():
            layer = self.layers[key]
            r = d.a.shape[0]
            layer.lora_A[slot, :r].copy_(d.a)
            layer.lora_B[slot, :, :r].copy_(d.b)
            layer.lora_s[slot] = d.scaling
        self._written[slot] = list(adapter.layers)

    def set_denoiser_rows(self, rows: Sequence[Sequence[tuple[int, float]]]) -> None:
        self.denoiser_rows.set(rows)

    def set_text_rows(self, rows: Sequence[Sequence[tuple[int, float]]]) -> None:
        self.text_rows.set(rows)  # never graphed: more rows than its capacity take fresh tensors
