"""The denoiser's arithmetic: float8 linear layers on GPUs with FP8 tensor cores.

`fp8` hands the denoiser's `nn.Linear` layers to torchao's float8 inference path: weights are
stored as float8 (e4m3) with one scale per output channel, and each activation row (one token of
one image) is scaled by its own maximum as it arrives, so no row's scale depends on another's
and a request's image stays independent of what shares its batch. torchao computes per-row
scales from bfloat16 weights, so the model is loaded in bfloat16 for it. Convolutions stay in
16 bit: torchao quantizes them only with one scale for the whole activation tensor, which would
tie each image to its batch mates. Layers whose sides are not multiples of 16 (what the float8
GEMM needs) stay in 16 bit too.

Not every linear layer gains from float8. Its GEMM runs at twice the fp16 rate, but the input's
per-row scaling is one more pass over the activations, and a GEMM whose sides are small is bound
by memory, not by the tensor cores: on SD1.5 at 512², where most rows meet 320-wide layers,
float8 in every layer made the compiled step slower (150.9 against 132.5 ms in fp16, H100). `fp8_layers="paying"` (the default) quantizes a layer only where a roofline
estimate of its GEMM, at the rows it multiplies at full batch, is at least 10% faster in float8
with the scaling counted (`fp8_pays`); `"all"` quantizes every layer whose sides allow it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

log = logging.getLogger("synerdiff.precision")

FP8_CAPABILITY = (8, 9)  # Ada; Hopper is 9.0, Blackwell 10.0
# The roofline's one hardware number: dense fp16 tensor FLOPs per byte of memory traffic (an H100
# SXM: 989 TFLOP/s over 3.35 TB/s; an H200's 4.8 TB/s gives 206, an L40S 419). FP8's rate is twice fp16's.
FLOPS_PER_BYTE = 300.0
FP8_MARGIN = 0.9  # float8 is lossy: a layer takes it for a gain of 10% or more, not for a tie
# A kernel's fixed cost, whatever its size (about 3 µs: its start within a graph, prologue and
# tail), as bytes at an H100's 3.35 TB/s. It makes a GEMM of a few rows (a time embedding) a tie.
KERNEL_BYTES = 10e6


class PrecisionError(ValueError):
    """A precision this machine or model cannot run: refused at start with what to change."""


def fp8_unsupported(device: torch.device) -> str | None:
    """Why float8 cannot run on `device` (None: it can)."""
    if device.type != "cuda":
        return f"precision fp8 needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell); the engine runs on {device.type}"
    cap = torch.cuda.get_device_capability(device)
    if cap < FP8_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return f"precision fp8 needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell); {name} has {cap[0]}.{cap[1]}: use precision fp16"
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_  # noqa: F401
    except ImportError:
        return "precision fp8 needs the torchao package, 0.18 or later (pip install 'synerdiff[fp8]'), which is not installed or too old"
    except Exception as exc:  # a torchao built for another torch fails in other ways
        return f"precision fp8 needs a working torchao (pip install 'synerdiff[fp8]'); importing it failed: {type(exc).__name__}: {exc}"
    return None


def _float8_compatible(module: torch.nn.Module, fqn: str) -> bool:
    if not isinstance(module, torch.nn.Linear) or _quantized(module.weight):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def gemm_time(m: int, k: int, n: int, fp8: bool, flops_per_byte: float = FLOPS_PER_BYTE) -> float:
    """A roofline estimate of an (m×k)·(k×n) GEMM, in the time memory takes to move one byte: the
    larger of its FLOPs at the tensor rate and its traffic (16-bit operands and output; float8
    operands, a 16-bit output, and ~3 bytes an input element for the per-row scaling: a read for
    the absolute maximum, a float8 write; the compiled graph fuses the rest into the producer),
    plus each kernel's fixed cost (float8: the GEMM's and the scaling's)."""
    flops = 2.0 * m * k * n
    if not fp8:
        return max(flops / flops_per_byte, 2.0 * (m * k + k * n + m * n)) + KERNEL_BYTES
    return max(flops / (2 * flops_per_byte), m * k + k * n + 2.0 * m * n) + 3.0 * m * k + 2 * KERNEL_BYTES


def fp8_pays(m: int, k: int, n: int, flops_per_byte: float = FLOPS_PER_BYTE, margin: float = FP8_MARGIN) -> bool:
    """Whether a linear layer of `k` inputs and `n` outputs, multiplying `m` rows, is estimated
    at least 1 - `margin` faster in float8 than in 16 bit (`gemm_time`)."""
    return gemm_time(m, k, n, True, flops_per_byte) <= margin * gemm_time(m, k, n, False, flops_per_byte)


def linear_rows(net: torch.nn.Module, forward: Callable[[], object]) -> dict[str, int]:
    """The rows each `nn.Linear` of `net` multiplies in one call of `forward` (tokens times batch;
    the largest of its calls), by module name; layers `forward` does not reach are absent."""
    rows: dict[str, int] = {}
    hooks = []
    for name, module in net.named_modules():
        if isinstance(module, torch.nn.Linear):

            def count(mod: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str = name) -> None:
                x = args[0] if args else kwargs["input"]
                rows[name] = max(rows.get(name, 0), x.numel() // max(1, x.shape[-1]))

            hooks.append(module.register_forward_pre_hook(count, with_kwargs=True))
    try:
        with torch.inference_mode():
            forward()
    finally:
        for hook in hooks:
            hook.remove()
    return rows


def paying_layers(net: torch.nn.Module, rows: Mapping[str, int]) -> set[str]:
    """The linear layers of `net` that `fp8_pays` picks at `rows` (`linear_rows`, scaled to the batch served)."""
    return {
        name
        for name, module in net.named_modules()
        if isinstance(module, torch.nn.Linear) and name in rows and fp8_pays(rows[name], module.in_features, module.out_features)
    }


def float8_layers(net: torch.nn.Module) -> int:
    """The linear layers of `net` whose weights torchao holds (0 for a 16-bit model)."""
    return sum(1 for m in net.modules() if isinstance(m, torch.nn.Linear) and _quantized(m.weight))


def _quantized(weight: torch.Tensor) -> bool:
    """A weight torchao already holds (a model shared by two fp8 engines is quantized once)."""
    return type(weight) is not torch.nn.Parameter and type(weight) is not torch.Tensor


def layer_set(only: set[str] | None) -> str:
    """A short name of which layers are float8, for cache and profile keys: "all", or a digest of their names."""
    return "all" if only is None else hashlib.sha256("\n".join(sorted(only)).encode()).hexdigest()[:8]


def apply_fp8(net: torch.nn.Module, device: torch.device, only: set[str] | None = None) -> int:
    """Quantize `net`'s linear layers in place to float8 (per-row activation scales, per-channel
    weight scales): those named in `only` (`paying_layers`), or every one whose sides allow it
    (None). The number of its float8 layers (those quantized before by an engine sharing the
    model included). Raises PrecisionError where it cannot run."""
    reason = fp8_unsupported(device)
    if reason is not None:
        raise PrecisionError(reason)
    dtypes = {p.dtype for p in net.parameters() if p.is_floating_point()}
    if dtypes != {torch.bfloat16}:
        raise PrecisionError(
            f"precision fp8 quantizes from bfloat16 weights; the denoiser's are {sorted(map(str, dtypes))}: load it with dtype auto or bfloat16"
        )
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    # set_inductor_config=False: torchao's recommended inductor settings would apply to every
    # later compile in the process (the VAE's too) and make fp8 against fp16 a comparison of two tunings.
    def chosen(module: torch.nn.Module, fqn: str) -> bool:
        return _float8_compatible(module, fqn) and (only is None or fqn in only)

    quantize_(net, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False), filter_fn=chosen)
    count = float8_layers(net)
    total = sum(1 for m in net.modules() if isinstance(m, torch.nn.Linear))
    log.info(
        "precision fp8: %d of %d linear layers in float8 (%s; per-row activation scales, per-channel weight scales)",
        count,
        total,
        "every one whose sides allow it" if only is None else "where the roofline estimate pays",
    )
    return count
