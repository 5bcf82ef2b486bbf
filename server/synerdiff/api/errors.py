"""Every error leaves the server in OpenAI's shape: {"error": {message, type, param, code}}.

Clients written for OpenAI (the official SDKs, open-webui...) read `error.message`, so
validation errors, engine refusals and engine faults all use it. A 500 means a bug in
SynerDiff: no input is supposed to produce one.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..engine import EngineError, ErrorKind, QueueFull, RequestError

log = logging.getLogger("synerdiff.api")

INVALID = "invalid_request_error"


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_request_error(exc: RequestError) -> APIError:
    # The engine speaks in height/width; the API takes them as one `size` field.
    param: str | None = "size" if exc.field in ("height", "width") else exc.field
    message = f"{exc.field} {exc.message}" if param == exc.field else f"size: {exc.field} {exc.message}"
    if exc.field == "work":  # several fields together; the message names them
        param, message = None, f"request too large: {exc.message}"
    return APIError(400, message, param=param, code="invalid_value")


# The engine says what went wrong; the API says it in HTTP.
_STATUS = {
    ErrorKind.CANCELLED: 499,  # client closed request (nginx's code): nobody reads it
    ErrorKind.TIMEOUT: 504,
    ErrorKind.QUEUE_FULL: 429,
    ErrorKind.SHUTTING_DOWN: 503,
    ErrorKind.OUT_OF_MEMORY: 503,
    ErrorKind.ENGINE_FAULT: 503,
    ErrorKind.NUMERICAL_FAULT: 503,
}


def status_of(kind: ErrorKind) -> int:
    return _STATUS[kind]


def from_engine_error(exc: EngineError) -> APIError:
    status = status_of(exc.kind)
    if isinstance(exc, QueueFull):
        retry = max(1, math.ceil(exc.retry_after_s))
        return APIError(status, str(exc), type="rate_limit_error", code=exc.reason, headers={"Retry-After": str(retry)})
    if exc.kind is ErrorKind.TIMEOUT:
        return APIError(status, str(exc), type="timeout_error", code=exc.reason)
    if exc.kind is ErrorKind.CANCELLED:
        return APIError(status, str(exc), code=exc.reason)
    headers = {"Retry-After": "1"}
    if exc.kind is ErrorKind.SHUTTING_DOWN:
        # Tell keep-alive clients to reconnect, most likely to another replica.
        headers["Connection"] = "close"
    return APIError(status, f"{exc} ({exc.reason})", type="server_error", code=exc.reason, headers=headers)


def _param_from_loc(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def validation_error(exc_errors: list[dict[str, Any]], known_fields: set[str] | None = None) -> APIError:
    """Turn pydantic errors into one 422 naming the first offending field."""
    first: dict[str, Any] = exc_errors[0] if exc_errors else {"loc": (), "msg": "invalid request"}
    param = _param_from_loc(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid value"))
    if param is None and known_fields:
        # Cross-field validators have no location; their message starts with the field name.
        head = msg.removeprefix("Value error, ").split(" ", 1)[0]
        param = head if head in known_fields else None
    if first.get("type") == "extra_forbidden":
        msg = "unknown field"
    elif first.get("type") == "json_invalid":
        ctx: dict[str, Any] = first.get("ctx") or {}
        param, msg = "body", f"invalid JSON: {ctx.get('error', msg)}"
    text = f"{param}: {msg}" if param else msg
    if len(exc_errors) > 1:
        text += f" (and {len(exc_errors) - 1} more error(s))"
    return APIError(422, text, param=param, code="invalid_value")


def install_handlers(app: FastAPI, on_rejected) -> None:
    """`on_rejected(request, api_error)` lets metrics count refusals made before the handler ran."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(list(exc.errors()))
        on_rejected(request, err)
        body = err.body()
        # FastAPI clients look for `detail`; keep it next to the OpenAI-shaped error.
        body["detail"] = _jsonable(list(exc.errors()))
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__ or exc.__context__, ClientDisconnect):
            # The client left mid-upload: a cancellation, not a malformed body (nobody reads this).
            err = APIError(499, "client disconnected before sending the whole body", code="cancelled")
            on_rejected(request, err)
            return err.response()
        if exc.status_code == 400 and request.method in ("POST", "PUT", "PATCH"):
            # FastAPI's "error parsing the body": bytes that are not UTF-8 JSON, or nested too deeply.
            err = APIError(422, "body: could not be parsed as JSON (invalid UTF-8, or nested too deeply)", param="body", code="invalid_value")
            on_rejected(request, err)
            return err.response()
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the first route that matched the path; a path can have several.
            headers["Allow"] = ", ".join(sorted(_allowed_methods(request)))
        err = APIError(exc.status_code, str(exc.detail), code=code, headers=headers)
        return err.response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        err = APIError(500, "internal server error (a bug in SynerDiff; see the server log)", type="server_error", code="internal_error")
        return err.response()


def _allowed_methods(request: Request) -> set[str]:
    """Every method some route serves on this path (asked of the router, method by method)."""
    from starlette.routing import Match

    allowed: set[str] = set()
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"):
        scope: dict[str, Any] = {"type": "http", "path": request.url.path, "method": method, "root_path": "", "headers": []}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            allowed.add(method)
    return allowed


def _jsonable(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for e in errors:
        item = {k: v for k, v in e.items() if k in ("type", "loc", "msg")}
        item["loc"] = [p if isinstance(p, (str, int)) else str(p) for p in e.get("loc", ())]
        out.append(item)
    return out
