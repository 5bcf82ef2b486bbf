"""The denoiser's arithmetic: float8 linear layers on GPUs with FP8 tensor cores.

`fp8` hands the denoiser's `nn.Linear` layers to torchao's float8 inference path: weights are
stored as float8 (e4m3) with one scale per output channel, and each activation row (one token of
one image) is scaled by its own maximum as it arrives, so no row's scale depends on another's
and a request's image stays independent of what shares its batch. torchao computes per-row
scales from bfloat16 weights, so the model is loaded in bfloat16 for it. Convolutions stay in
16 bit: torchao quantizes them only with one scale for the whole activation tensor, which would
tie each image to its batch mates. Layers whose sides are not multiples of 16 (what the float8
GEMM needs) stay in 16 bit too.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("synerdiff.precision")

FP8_CAPABILITY = (8, 9)  # Ada; Hopper is 9.0, Blackwell 10.0


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


def float8_layers(net: torch.nn.Module) -> int:
    """The linear layers of `net` whose weights torchao holds (0 for a 16-bit model)."""
    return sum(1 for m in net.modules() if isinstance(m, torch.nn.Linear) and _quantized(m.weight))


def _quantized(weight: torch.Tensor) -> bool:
    """A weight torchao already holds (a model shared by two fp8 engines is quantized once)."""
    return type(weight) is not torch.nn.Parameter and type(weight) is not torch.Tensor


def apply_fp8(net: torch.nn.Module, device: torch.device) -> int:
    """Quantize `net`'s linear layers in place to float8 (per-row activation scales, per-channel
    weight scales); the number of its float8 layers (those quantized before by an engine sharing
    the model included). Raises PrecisionError where it cannot run."""
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
    quantize_(net, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False), filter_fn=_float8_compatible)
    count = float8_layers(net)
    log.info("precision fp8: %d linear layers in float8 (per-row activation scales, per-channel weight scales)", count)
    return count
