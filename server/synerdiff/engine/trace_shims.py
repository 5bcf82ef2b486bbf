"""Compile-time stand-ins for diffusers layers whose Python branches on the batch size.

diffusers' `Upsample2D.forward` makes its input contiguous (NCHW) once a batch reaches 64 rows,
a guard against an old PyTorch eager kernel (upsample_nearest on NHWC inputs failed at large
batches). Under `torch.compile` with a dynamic batch that branch is a guard on the batch symbol:
dynamo traces an SD UNet twice, once below 64 rows and once from 64 up, and the second trace is
about 9 s of every warm start (H100 host). It also hands the graphs of 64 rows and more an NCHW
tensor in the middle of a channels_last UNet. Inductor lowers nearest upsampling to its own
kernel, so the compiled graph needs no such guard.

`drop_batch_branches` gives each such layer a forward that, while dynamo traces, computes the same
values without the batch branch, and calls diffusers' own forward otherwise (eager calls keep the
guard). It only touches layers whose class still has the branch, and only configurations whose
computation it reproduces (no norm, no transposed convolution, nearest interpolation).
"""

from __future__ import annotations

import inspect
import logging
import types
from typing import Any

import torch

log = logging.getLogger("synerdiff.fastpath")

_BRANCH = "hidden_states.shape[0] >= 64"


def _has_branch(forward: Any) -> bool:
    try:
        return _BRANCH in inspect.getsource(forward)
    except (OSError, TypeError):
        return False


def _upsample_traced(module: Any, hidden_states: torch.Tensor, output_size: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
    if not torch.compiler.is_compiling():
        out: torch.Tensor = type(module).forward(module, hidden_states, output_size, *args, **kwargs)
        return out
    # diffusers' computation for this configuration, less the batch branch: that branch only
    # changes the memory layout (the convolution after it may round differently in the other one).
    scale_factor = 2 if output_size is None else max([f / s for f, s in zip(output_size, hidden_states.shape[-2:])])  # noqa: B905 (diffusers' own expression)
    if hidden_states.numel() * scale_factor > pow(2, 31):  # diffusers' other layout guard, kept
        hidden_states = hidden_states.contiguous()
    if output_size is None:
        hidden_states = torch.nn.functional.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
    else:
        hidden_states = torch.nn.functional.interpolate(hidden_states, size=output_size, mode="nearest")
    if module.use_conv:
        hidden_states = (module.conv if module.name == "conv" else module.Conv2d_0)(hidden_states)
    return hidden_states


def drop_batch_branches(net: torch.nn.Module) -> int:
    """Give `net`'s upsampling layers the compile-time forward above; returns how many it changed."""
    try:
        from diffusers.models.upsampling import Upsample2D
    except ImportError:  # an older diffusers layout: nothing known to change
        return 0
    if not _has_branch(Upsample2D.forward):
        return 0
    changed = 0
    for m in net.modules():
        if type(m) is not Upsample2D:
            continue
        if getattr(m, "norm", None) is not None or m.use_conv_transpose or not m.interpolate:
            continue
        m.forward = types.MethodType(_upsample_traced, m)
        changed += 1
    if changed:
        log.debug("compile-time forward without the batch branch for %d upsampling layers", changed)
    return changed
