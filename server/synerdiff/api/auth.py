"""Bearer-token checks: optional on the /v1 API, mandatory on /v1/admin.

`check` is the one rule; the request guard (`guard.py`) applies it before a body is read,
and the route dependencies below apply it again so that the OpenAPI schema shows the scheme.
A configured token that cannot be read (a missing, unreadable or empty token file) fails
closed: 503, never an open API.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..contract.config import ServerSettings
from .errors import APIError
from .state import AppState

log = logging.getLogger("synerdiff.api")

# auto_error=False: a missing header must give our OpenAI-shaped 401, not FastAPI's 403.
bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <token>`")


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.synerdiff
    return state


def _matches(given: str | None, expected: str) -> bool:
    if given is None:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def _resolve(fn: Callable[[], str | None], what: str) -> str | None:
    try:
        return fn()
    except (OSError, ValueError) as exc:  # misconfiguration, not a bug, and never "no token"
        log.error("refusing requests: cannot read the %s token: %s", what, exc)
        raise APIError(503, f"server misconfigured: the {what} token cannot be read", type="server_error", code="auth_unavailable") from exc


def check(settings: ServerSettings, credentials: str | None, admin: bool = False) -> None:
    """Raise the APIError for a request bearing `credentials` (the bearer token, or None)."""
    if admin:
        token = _resolve(settings.resolved_admin_token, "admin")
        if token is None:
            raise APIError(403, "admin API disabled: set SYNERDIFF_ADMIN_TOKEN (or an API token) to enable it", type="permission_error", code="admin_disabled")
        if not _matches(credentials, token):
            raise _unauthorized("missing or invalid admin bearer token")
        return
    token = _resolve(settings.resolved_api_token, "API")
    if token is not None and not _matches(credentials, token):
        raise _unauthorized("missing or invalid bearer token")


def _given(creds: HTTPAuthorizationCredentials | None) -> str | None:
    return creds.credentials if creds is not None else None


async def require_api_token(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    check(_state(request).settings, _given(creds))


async def require_admin_token(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    check(_state(request).settings, _given(creds), admin=True)
