"""/v1/admin/scheduler: read and retune the scheduler at run time (the operator's lever)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError

from ..contract.admin import ADMIN_SCHEDULER_PATH, SchedulerPatch
from ..contract.config import SchedulerConfig
from .auth import require_admin_token
from .errors import validation_error
from .schemas import ErrorResponse

log = logging.getLogger("synerdiff.api")

router = APIRouter(dependencies=[Depends(require_admin_token)], tags=["admin"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or wrong admin bearer token."},
    403: {"model": ErrorResponse, "description": "Admin API disabled (no admin or API token configured)."},
    422: {"model": ErrorResponse, "description": "A value is out of range or inconsistent (`error.param` names the field)."},
}


@router.get(ADMIN_SCHEDULER_PATH, response_model=SchedulerConfig, responses=_ERRORS, summary="Current scheduler configuration")
async def get_scheduler(request: Request) -> SchedulerConfig:
    return request.app.state.synerdiff.engine.config.scheduler


@router.put(ADMIN_SCHEDULER_PATH, response_model=SchedulerConfig, responses=_ERRORS, summary="Update some scheduler knobs")
async def put_scheduler(patch: SchedulerPatch, request: Request) -> SchedulerConfig:
    engine = request.app.state.synerdiff.engine
    changes = patch.model_dump(exclude_none=True)
    merged = {**engine.config.scheduler.model_dump(), **changes}
    try:
        new = SchedulerConfig.model_validate(merged)
    except ValidationError as exc:
        # Cross-field rules (threshold within [min, max]...) only fail once merged.
        raise validation_error([dict(e) for e in exc.errors()], known_fields=set(SchedulerConfig.model_fields)) from None
    engine.apply_scheduler_config(new)
    log.info("scheduler updated: %s", changes)
    return new
