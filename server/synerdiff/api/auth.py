"""Bearer-token checks: optional on the /v1 API, mandatory on /v1/admin."""

from __future__ import annotations

import hmac
import logging

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import APIError
from .state import AppState

log = logging.getLogger("synerdiff.api")

# auto_error=False: a missing header must give our OpenAI-shaped 401, not FastAPI's 403.
bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <token>`")


def _state(request: Request) -> AppState:
    return request.app.state.synerdiff


def _matches(given: HTTPAuthorizationCredentials | None, expected: str) -> bool:
    if given is None:
        return False
    return hmac.compare_digest(given.credentials.encode(), expected.encode())


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def _resolve(fn, what: str) -> str | None:
    try:
        return fn()
    except OSError as exc:  # a missing or unreadable token file is misconfiguration, not a bug
        log.error("cannot read the %s token file: %s", what, exc)
        raise APIError(503, f"server misconfigured: the {what} token file cannot be read", type="server_error", code="auth_unavailable") from exc


async def require_api_token(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    token = _resolve(_state(request).settings.resolved_api_token, "API")
    if token is not None and not _matches(creds, token):
        raise _unauthorized("missing or invalid bearer token")


async def require_admin_token(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    token = _resolve(_state(request).settings.resolved_admin_token, "admin")
    if token is None:
        raise APIError(403, "admin API disabled: set SYNERDIFF_ADMIN_TOKEN (or an API token) to enable it", type="permission_error", code="admin_disabled")
    if not _matches(creds, token):
        raise _unauthorized("missing or invalid admin bearer token")
