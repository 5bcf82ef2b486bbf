"""The admin API that retunes a running engine's scheduler (the operator's lever)."""

from __future__ import annotations

from typing import Annotated, Any, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model

from .config import SchedulerConfig

ADMIN_SCHEDULER_PATH = "/v1/admin/scheduler"


def _optional_fields(model: type[BaseModel]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        # Keep each field's constraints (ge/le/Literal) so a bad value is a 422 naming it.
        inner = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        fields[name] = (Optional[inner], Field(None, description=info.description))  # noqa: UP045 - a runtime type expression
    return fields


# Built from SchedulerConfig so that knobs added there appear here without edits.
SchedulerPatch: type[BaseModel] = create_model(
    "SchedulerPatch",
    __config__=ConfigDict(extra="forbid", allow_inf_nan=False),
    __doc__="Partial update of the scheduler configuration: omitted or null fields keep their value.",
    **_optional_fields(SchedulerConfig),
)
