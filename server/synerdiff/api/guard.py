"""The request guard: authentication and the body-size limit, before any body is read.

FastAPI reads and parses a request's body before its dependencies run, so a token check in a
dependency comes after a client has made the server hold (and parse) whatever it sent. This
ASGI middleware runs first: on protected paths it checks the bearer token from the headers,
refuses a declared `Content-Length` over `max_body_bytes` with 413 at once, and reads a body
of unknown length only up to that limit before handing it on. Image uploads (the edits
endpoint) are bounded by the larger `max_upload_bytes` instead.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi.security.utils import get_authorization_scheme_param
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..contract.config import ServerSettings
from .auth import check
from .edits import EDITS_PATH
from .errors import APIError

DOCS_PATHS = ("/docs", "/redoc", "/openapi.json")


class RequestGuard:
    def __init__(self, app: ASGIApp, settings: ServerSettings, on_rejected: Callable[[str, APIError], None] | None = None):
        self.app = app
        self.settings = settings
        self.on_rejected = on_rejected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = _route_path(scope)
        try:
            if path.startswith("/v1/") or path == "/v1":
                check(self.settings, _bearer(scope), admin=path.startswith("/v1/admin"))
            elif path.startswith(DOCS_PATHS):
                check(self.settings, _bearer(scope))
            receive = await self._bounded(scope, receive, path)
        except APIError as err:
            if self.on_rejected is not None:
                self.on_rejected(path, err)
            if _header(scope, b"content-length") not in (None, "0") or _header(scope, b"transfer-encoding") is not None:
                # Otherwise the server would go on reading (and discarding) a body it refused.
                err.headers["Connection"] = "close"
            await err.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _bounded(self, scope: Scope, receive: Receive, path: str) -> Receive:
        """A `receive` that replays a body read up to the limit; raises 413 past it."""
        upload = path == EDITS_PATH
        limit = self.settings.max_upload_bytes if upload else self.settings.max_body_bytes
        setting = "SYNERDIFF_MAX_UPLOAD_BYTES" if upload else "SYNERDIFF_MAX_BODY_BYTES"
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise APIError(400, "Content-Length is not a number", code="invalid_content_length") from None
            if size > limit:
                raise _too_large(size, limit, setting)
        if scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS") and declared is None:
            return receive
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                first: Message = message
                break
            body = message.get("body", b"")
            total += len(body)
            if total > limit:
                raise _too_large(total, limit, setting, streamed=True)
            chunks.append(body)
            if not message.get("more_body", False):
                first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return first
            return await receive()

        return replay


def _route_path(scope: Scope) -> str:
    """The path the routes see: uvicorn puts a configured root path in front of it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] or "/" if root and path.startswith(root) else path


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


def _bearer(scope: Scope) -> str | None:
    scheme, credentials = get_authorization_scheme_param(_header(scope, b"authorization"))
    return credentials if scheme.lower() == "bearer" and credentials else None


def _too_large(size: int, limit: int, setting: str, streamed: bool = False) -> APIError:
    what = f"more than {limit}" if streamed else str(size)
    return APIError(
        413,
        f"request body is {what} bytes; the limit is {limit} ({setting})",
        param="body",
        code="body_too_large",
        headers={"Connection": "close"},
    )
