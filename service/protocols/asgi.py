"""HTTP plumbing shared by the three Serve apps: body cap, auth, per-request metrics, error bodies, the deadline
header. Admission control is the replica's (service/deployments/admission.py); `Observed` only asks it."""

from __future__ import annotations

import asyncio
import email.message
import hmac
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import FastAPI, Request

from service.config import AppArgs
from service.errors import (
    BodyTooLarge,
    ClientDisconnected,
    InvalidRequest,
    Unauthorized,
    UnsupportedMediaType,
    install_handlers,
    to_response,
)
from service.metrics import metrics

TIMEOUT_HEADER = "x-timeout-ms"  # a client may shorten (never extend) the route's deadline
# Every route with a body is a POST: other methods go to the router unread, which answers 405 with Allow.
BODY_METHODS = frozenset({"POST"})
BEARER_SCHEME = {"bearerAuth": {"type": "http", "scheme": "bearer",
                                "description": "An API token (config `auth`); only when tokens are configured."}}


class Admission(Protocol):
    """What `Observed` asks a model replica's admission gate (service/deployments/admission.py: Gate)."""

    def check(self, cost: int = 1) -> None: ...


ErrorForm = Callable[[BaseException], tuple[Any, str]]


def client_timeout_s(headers: Mapping[str, str]) -> float | None:
    """The deadline a client asks for with X-Timeout-Ms, in seconds (None: not asked); the replica caps it."""
    raw = headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        ms = float(raw)
    except ValueError:
        ms = math.nan
    if not (math.isfinite(ms) and ms > 0):
        raise InvalidRequest(f"{TIMEOUT_HEADER} must be a positive, finite number of milliseconds (it shortens, "
                             f"never extends, the model's deadline), got {raw!r}", field=TIMEOUT_HEADER)
    return ms / 1000


def _error(desc: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": desc, "model": None, "content": {"application/json": {"schema": {
        "$ref": "#/components/schemas/ErrorResponse"}}}}
    if headers:
        out["headers"] = headers
    return out


# Every status a model route can answer besides 200 (route-specific ones, like the classifier's 400, are added by
# the route). 499 (`client_disconnected`) is only counted in the metrics: the client is gone, nothing is sent.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: _error("no or an invalid `Authorization: Bearer` token (`unauthorized`); only when API tokens are "
                "configured", {"WWW-Authenticate": {"description": "Bearer realm=\"attnserve\"",
                                                   "schema": {"type": "string"}}}),
    413: _error("body over the cap (`body_too_large`)"),
    415: _error("Content-Type not accepted by this route (`unsupported_media_type`)"),
    422: _error("schema violation, invalid JSON or UTF-8, bad X-Timeout-Ms (`invalid_request`) or a limit from "
                "GET /v1/models (`limit_exceeded`)"),
    500: _error("a bug in the service (`internal_error`); bad input never causes one"),
    503: _error("the model admits no more now (`overloaded`: from the replica, or from `attnserve serve`'s front "
                "before the service sees the request), or the service is stopping or restarting (`unavailable`)",
                {"Retry-After": {
        "description": "seconds to wait before retrying", "schema": {"type": "integer", "minimum": 1}}}),
    504: _error("no result within the deadline (`deadline_exceeded`)"),
}
DEADLINE_PARAMETER: dict[str, Any] = {
    "name": "X-Timeout-Ms", "in": "header", "required": False,
    "description": "Shortens (never extends) the route's deadline: a positive, finite number of milliseconds. "
                   "Past the deadline the answer is a 504.",
    "schema": {"type": "number", "exclusiveMinimum": 0},
}


def make_api(title: str, settings: RouteSettings, *, docs: bool = False) -> FastAPI:
    """A FastAPI app with the error mapping installed; only the `api` app serves /docs for everything."""
    kw: dict[str, Any] = {} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title=title, version="1", **kw)

    def on_error(request: Request, code: str) -> None:
        scope = request.scope.get("attnserve")
        if scope is not None:
            scope["code"] = code

    install_handlers(app, on_error, settings.error_form)
    app.add_middleware(Observed, settings=settings)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_contract(FastAPI.openapi(app), settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def document_contract(doc: dict[str, Any], settings: RouteSettings) -> dict[str, Any]:
    """Add what `Observed` and `Gate` enforce for every operation with a request body to its OpenAPI entry.

    Every such route runs its work through a `Gate` (so honours X-Timeout-Ms) and `Observed` checks its media
    type against `settings.media_types`: the document and the check must name the same types.
    """
    for path, ops in doc.get("paths", {}).items():
        for method, op in ops.items():
            if "requestBody" not in op:
                continue
            declared = set(op["requestBody"].get("content", {}))
            assert declared == set(settings.media_types), (path, method, declared, settings.media_types)
            params = op.setdefault("parameters", [])
            if all(p.get("name") != DEADLINE_PARAMETER["name"] for p in params):
                params.append(DEADLINE_PARAMETER)
    return document_auth(doc, settings) if settings.tokens else doc


def document_auth(doc: dict[str, Any], settings: RouteSettings, prefix: str = "") -> dict[str, Any]:
    """With API tokens on: the bearer scheme, and `security` on every operation that is not public."""
    doc.setdefault("components", {}).setdefault("securitySchemes", {}).update(BEARER_SCHEME)
    for path, ops in doc.get("paths", {}).items():
        if settings.is_public(prefix + path):
            continue
        for op in ops.values():
            if isinstance(op, dict) and "responses" in op:
                op["security"] = [{"bearerAuth": []}]
    return doc


@dataclass
class RouteSettings:
    """What `Observed` needs, built with the app by the deployment that serves it (`for_app`)."""

    route: str
    model: str = "unknown"
    max_body_bytes: int = 16_000_000
    paths: frozenset[str] = frozenset()  # if set, the route tag is the request path when listed, else "other"
    # Content-Types accepted for request bodies (else 415); () = the app takes no bodies (405 from the router).
    media_types: tuple[str, ...] = ("application/json",)
    tokens: tuple[bytes, ...] = ()  # API bearer tokens (config AuthArgs); () = authentication off
    public: tuple[str, ...] = ()  # paths (or prefixes ending in /) that need no token
    gate: Admission | None = None  # a model replica's admission: a full replica refuses before reading the body
    # Path prefix -> error responder for routes that speak another protocol's error form (the v2 API).
    error_forms: dict[str, ErrorForm] = field(default_factory=dict)

    @classmethod
    def for_app(cls, route: str, model: str, args: AppArgs, **kw: Any) -> RouteSettings:
        """A deployment's settings from its args: model name, body cap, API tokens (read now), public paths."""
        # Public paths are the api app's (mounted at "/"): in a model app, "/" is the model route itself.
        return cls(route, model=model, max_body_bytes=args.limits.max_body_bytes, tokens=args.auth.tokens(),
                   public=args.auth.public_paths() if route == "/" else (), **kw)

    def is_public(self, path: str) -> bool:
        return any(path == p or (p.endswith("/") and p != "/" and path.startswith(p)) for p in self.public)

    def error_form(self, path: str) -> ErrorForm:
        """The error responder of a path: another protocol's form under its prefix, else the service's."""
        return next((f for p, f in self.error_forms.items() if path.startswith(p)), to_response)

    def check_auth(self, path: str, headers: list[tuple[bytes, bytes]]) -> None:
        """401 unless authentication is off, the path is public, or a configured bearer token is sent."""
        if not self.tokens or self.is_public(path):
            return
        given = dict(headers).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        # Every configured token is compared, in constant time, whatever matches: no timing hint.
        ok = scheme.lower() == b"bearer" and sum(hmac.compare_digest(token.strip(), t) for t in self.tokens) > 0
        if not ok:
            raise Unauthorized("this route needs an API token: send `Authorization: Bearer <token>`"
                               if not given else "the API token is not valid")

    def tag(self, path: str) -> str:
        if not self.paths:
            return self.route
        return path if path in self.paths else "other"


class Observed:
    """Pure ASGI middleware: body checks before the app parses a byte, and request metrics.

    The whole body is buffered (Serve's proxy has read it already), so the size cap also holds for chunked
    uploads without Content-Length. A body must have a media type the route accepts (415), and a JSON body
    must be UTF-8 (422). Every request is counted once with the status the client got: 499
    `client_disconnected` when the client left first (Serve cancels the request), and `internal_error` for an
    exception no handler mapped (answered here, so it is counted like every other error).
    """

    def __init__(self, app: Callable, *, settings: RouteSettings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        root = scope.get("root_path", "")
        if root and scope["path"] == root:
            # Serve mounts this app at its route prefix: POST /v1/translate is the app's "/" route, not a
            # redirect to /v1/translate/.
            scope["path"] = root + "/"
        t0, state = time.perf_counter(), {"status": 500, "code": None, "started": False}
        scope["attnserve"] = state

        async def send_observed(message: dict) -> None:
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
            await send(message)

        try:
            self.settings.check_auth(scope["path"][len(root):] or "/", scope.get("headers") or [])
            if self.settings.gate is not None and scope["method"] in BODY_METHODS:
                # Refused before the body is fetched from the proxy and parsed: under overload, refusals are
                # most of the traffic, and every millisecond one costs is taken from the admitted requests.
                self.settings.gate.check(0)
            body = await self._read_body(scope, receive)
            self._check_body(scope, body)
            await self.app(scope, _replay(body, receive), send_observed)
        except (ClientDisconnected, asyncio.CancelledError) as e:
            state["status"], state["code"] = ClientDisconnected.status, ClientDisconnected.code
            if isinstance(e, asyncio.CancelledError):
                raise
        except Exception as e:  # our own checks above, or an exception no handler inside the app mapped
            if state["started"]:  # too late for an error response: count it and let the server close the stream
                state["code"] = "internal_error"
                raise
            response, state["code"] = self.settings.error_form(scope["path"][len(root):])(e)
            await response(scope, receive, send_observed)
        finally:
            self._record(state, self.settings.tag(scope["path"]), time.perf_counter() - t0)

    async def _read_body(self, scope: dict, receive: Callable) -> bytes:
        cap = self.settings.max_body_bytes
        too_large = BodyTooLarge(f"request body is over the limit of {cap} bytes")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            raise too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected("the client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _check_body(self, scope: dict, body: bytes) -> None:
        accepted = self.settings.media_types
        if not accepted or scope["method"] not in BODY_METHODS:
            return
        raw = next((v.decode("latin-1") for k, v in scope.get("headers") or [] if k == b"content-type"), None)
        header = email.message.Message()
        header["content-type"] = raw or ""
        media = header.get_content_type() if raw and "/" in raw else None
        if media not in accepted:
            got = f"Content-Type {raw!r}" if raw else "no Content-Type header"
            raise UnsupportedMediaType(f"{got}: this route accepts {' or '.join(accepted)}")
        if media == "application/json":
            charset = header.get_param("charset")
            if isinstance(charset, str) and charset.lower() not in ("utf-8", "utf8"):
                raise UnsupportedMediaType(f"charset {charset!r}: JSON bodies must be UTF-8")
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InvalidRequest(f"the body is not valid UTF-8 (bad byte at offset {e.start}): JSON must be "
                                     "UTF-8 encoded", field="body") from None

    def _record(self, state: dict, route: str, seconds: float) -> None:
        m, tags = metrics(), {"model": self.settings.model, "route": route}
        status = int(state["status"])
        m.requests.inc(1, {**tags, "status": str(status)})
        m.latency.observe(seconds, tags)
        if status >= 400:
            m.errors.inc(1, {**tags, "code": state["code"] or f"http_{status}"})


def _replay(body: bytes, receive_more: Callable[[], Awaitable[dict]]) -> Callable[[], Awaitable[dict]]:
    """The buffered body once, then the connection's own messages: its `http.disconnect` is how a streaming
    response (Starlette listens for it) learns that the client left, and stops its generator."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        while True:
            message = await receive_more()
            if message["type"] == "http.disconnect":
                return message

    return receive
