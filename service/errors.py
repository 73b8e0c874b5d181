"""One exception hierarchy for the service, mapped to HTTP in one place (`install_handlers`).

Every error leaves as `{"error": {"code", "message", "field"?}}`. Bad input is always a 4xx: only a bug in
the service itself may become a 500, and its message never leaks internals.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("attnserve")


class ServiceError(Exception):
    """Base of every error the service raises on purpose."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.field, self.headers = message, field, headers or {}

    # Ray pickles exceptions raised in one replica and re-raises them in the caller: keep all state in args.
    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (type(self), self.message, self.field, self.headers)


def _rebuild(cls: type[ServiceError], message: str, field: str | None, headers: dict[str, str]) -> ServiceError:
    err = cls.__new__(cls)
    ServiceError.__init__(err, message, field=field, headers=headers)
    return err


class InvalidRequest(ServiceError):
    status, code = 422, "invalid_request"


class LimitExceeded(InvalidRequest):
    code = "limit_exceeded"


class BadImage(ServiceError):
    status, code = 400, "bad_image"


class ImageTooLarge(BadImage):
    code = "image_too_large"


class BodyTooLarge(ServiceError):
    status, code = 413, "body_too_large"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


class ClientDisconnected(ServiceError):
    """Never sent (nobody is listening): the status and code a request is counted with when its client left."""

    status, code = 499, "client_disconnected"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"

    def __init__(self, message: str):
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="attnserve"'})


class Overloaded(ServiceError):
    status, code = 503, "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1):
        super().__init__(message, headers={"Retry-After": str(max(1, int(retry_after_s)))})


class NotReady(ServiceError):
    status, code = 503, "not_ready"


class DeadlineExceeded(ServiceError):
    status, code = 504, "deadline_exceeded"


class NotFound(ServiceError):
    """An unknown model or model version (an unknown route is the router's 404)."""

    status, code = 404, "not_found"


def field_path(loc: Sequence[str | int]) -> str:
    """Pydantic `loc` -> "texts[3]" (the leading "body" dropped: every field is in the body)."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        err["field"] = field
    return {"error": err}


def describe(exc: BaseException) -> tuple[int, str, str, str | None, dict[str, str]]:
    """The single mapping from an exception to (status, code, message, field, headers)."""
    if isinstance(exc, ServiceError):
        return exc.status, exc.code, exc.message, exc.field, exc.headers
    if isinstance(exc, RequestValidationError):
        errors = exc.errors() or [{"loc": ("body",), "msg": "invalid request"}]
        if errors[0].get("type") == "json_invalid":  # FastAPI puts a character offset in `loc`: say it in words
            reason = (errors[0].get("ctx") or {}).get("error") or errors[0]["msg"]
            return 422, "invalid_request", f"the body is not valid JSON: {reason}", "body", {}
        msg = "; ".join(f"{field_path(e['loc'])}: {e['msg']}" for e in errors[:5])
        return 422, "invalid_request", msg, field_path(errors[0]["loc"]), {}
    if isinstance(exc, StarletteHTTPException) and exc.status_code == 400 and exc.__cause__ is not None:
        # FastAPI's "There was an error parsing the body" (e.g. JSON nested deeper than the parser's recursion
        # limit): invalid JSON like any other, so the same 422.
        return 422, "invalid_request", f"the body is not valid JSON: {exc.__cause__}", "body", {}
    if isinstance(exc, StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: BodyTooLarge.code,
                415: UnsupportedMediaType.code}.get(exc.status_code, "http_error")
        return exc.status_code, code, str(exc.detail), None, dict(exc.headers or {})
    log.error("unhandled error", exc_info=exc)
    return 500, "internal_error", "internal error; see the service logs", None, {}


def to_response(exc: BaseException) -> tuple[JSONResponse, str]:
    status, code, message, field, headers = describe(exc)
    return JSONResponse(error_body(code, message, field), status, headers=headers), code


ErrorForm = Callable[[BaseException], tuple[Any, str]]


def install_handlers(app: FastAPI, on_error: Callable[[Request, str], None] | None = None,
                     form: Callable[[str], ErrorForm] | None = None) -> None:
    """Every exception of `app` answered by `to_response`, or by the error form `form(path)` picks for the
    request's path (the v2 routes answer in their protocol's form, also the router's 404 and 405)."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        respond = to_response if form is None else form(request.scope["path"][len(request.scope.get("root_path", "")):])
        response, code = respond(exc)
        if on_error is not None:
            on_error(request, code)
        return response

    for cls in (ServiceError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(cls, handle)
