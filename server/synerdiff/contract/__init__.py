"""What the engine's server and the operator agree on, and nothing else: no torch, no HTTP.

The operator imports this package and nothing else of the server (an import contract checks
it), so a name or a bucket changed here changes both sides at once:
- `config`: the typed settings (CLI, env vars, config file, the CRD's engine schema);
- `metrics`: metric names and histogram buckets of an engine's `/metrics`;
- `readiness`: the load fields of an engine's `/readyz` body, which a router polls;
- `requests`: sampler names and how many UNet rows an image costs;
- `families`: what a model family means for a request (samplers, defaults, guidance, edits);
- `admin`: the admin API's path and its partial-update schema.
"""

from .admin import ADMIN_SCHEDULER_PATH, SchedulerPatch
from .config import EMBEDDED_MODEL_DIR, EngineConfig, LimitsConfig, SchedulerConfig, ServerSettings
from .families import FAMILIES, FamilyName, FamilyRules
from .requests import SAMPLER_NAMES, SamplerName, rows_per_image

__all__ = [
    "ADMIN_SCHEDULER_PATH",
    "EMBEDDED_MODEL_DIR",
    "FAMILIES",
    "SAMPLER_NAMES",
    "EngineConfig",
    "FamilyName",
    "FamilyRules",
    "LimitsConfig",
    "SamplerName",
    "SchedulerConfig",
    "SchedulerPatch",
    "ServerSettings",
    "rows_per_image",
]
