"""The engine's `/readyz` body beside its phase: the load a router balances on.

A router polls every engine twice a second; with the load in the readiness answer, one small JSON
GET tells it both whether to send and how much work the engine holds, instead of a second GET of
the whole Prometheus page and its parse. The values equal the `/metrics` gauges of the same names
(contract/metrics.py), which the router still reads from an engine whose `/readyz` lacks them.
"""

from __future__ import annotations

LOAD = "load"  # the key of the load object in the /readyz body, present once the model is loaded
OUTSTANDING_ROW_STEPS = "outstanding_row_steps"  # as synerdiff_outstanding_row_steps (native-size row-steps)
MAX_ROWS = "max_rows"  # as synerdiff_scheduler_max_rows
NATIVE_SIZE = "native_size"  # as synerdiff_native_size_pixels
# What a request costs on this engine's model, so that a router weighs a mixed pool by work: a row
# costs (image tokens + TEXT_TOKENS) over a native row's, an image token being TOKEN_SIDE² pixels
# (a UNet: latent pixels, no text tokens); CFG_ROWS: guidance_scale > 1 adds an unconditional row
# an image (false for FLUX, whose guidance is an input); DEFAULT_GUIDANCE: the scale of a request
# that names none.
TEXT_TOKENS = "text_tokens"
TOKEN_SIDE = "token_side"
CFG_ROWS = "cfg_rows"
DEFAULT_GUIDANCE = "default_guidance"
ADAPTERS = "adapters"  # names of the LoRA adapters loaded in the engine's device slots (a router prefers an engine holding the request's)
