"""HTTP plumbing shared by the three Serve apps: body cap, per-request metrics, admission control, deadlines."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request

from service.errors import DeadlineExceeded, InvalidRequest, Overloaded, error_body, install_handlers
from service.metrics import metrics

T = TypeVar("T")
TIMEOUT_HEADER = "x-timeout-ms"  # a client may shorten (never extend) the route's deadline

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"description": desc, "model": None, "content": {"application/json": {"schema": {
        "$ref": "#/components/schemas/ErrorResponse"}}}}
    for code, desc in [(400, "undecodable or too many pixels"), (413, "body over the cap"),
                       (422, "schema violation or limit"), (503, "queue full (Retry-After)"),
                       (504, "past the deadline")]
}


def make_api(title: str, settings: RouteSettings, *, docs: bool = False) -> FastAPI:
    """A FastAPI app with the error mapping installed; only the `api` app serves /docs for everything."""
    kw: dict[str, Any] = {} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title=title, version="1", **kw)

    def on_error(request: Request, code: str) -> None:
        scope = request.scope.get("attnserve")
        if scope is not None:
            scope["code"] = code

    install_handlers(app, on_error)
    app.add_middleware(Observed, settings=settings)
    return app


@dataclass
class RouteSettings:
    """What `Observed` needs, filled in by the deployment's __init__ (the FastAPI app is built at import)."""

    route: str
    model: str = "unknown"
    max_body_bytes: int = 16_000_000
    paths: frozenset[str] = frozenset()  # if set, the route tag is the request path when listed, else "other"

    def tag(self, path: str) -> str:
        if not self.paths:
            return self.route
        return path if path in self.paths else "other"


class Observed:
    """Pure ASGI middleware: caps the body (413 before the app parses a byte) and records request metrics.

    The whole body is buffered (Serve's proxy has read it already), so the cap also holds for chunked
    uploads without Content-Length.
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
        t0, state = time.perf_counter(), {"status": 500, "code": None}
        scope["attnserve"] = state

        async def send_observed(message: dict) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            await send(message)

        try:
            body = await self._read_body(scope, receive)
            if body is None:
                state["code"] = "body_too_large"
                await _send_json(send_observed, 413, error_body(
                    "body_too_large", f"request body is over the limit of {self.settings.max_body_bytes} bytes"))
                return
            await self.app(scope, _replay(body), send_observed)
        finally:
            self._record(state, self.settings.tag(scope["path"]), time.perf_counter() - t0)

    async def _read_body(self, scope: dict, receive: Callable) -> bytes | None:
        cap = self.settings.max_body_bytes
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _record(self, state: dict, route: str, seconds: float) -> None:
        m, tags = metrics(), {"model": self.settings.model, "route": route}
        status = int(state["status"])
        m.requests.inc(1, {**tags, "status": str(status)})
        m.latency.observe(seconds, tags)
        if status >= 400:
            m.errors.inc(1, {**tags, "code": state["code"] or f"http_{status}"})


def _replay(body: bytes) -> Callable[[], Awaitable[dict]]:
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # like a real connection: nothing more until it closes
        return {"type": "http.disconnect"}

    return receive


async def _send_json(send: Callable, status: int, payload: dict) -> None:
    data = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class Gate:
    """Admission control and deadline for one replica.

    Past `max_pending` requests in this replica a request is refused at once with 503 + Retry-After, in the
    service's JSON error format (Serve's own `max_queued_requests` rejection, earlier in the proxy, is plain
    text: it is the backstop). The deadline covers queueing and inference; the client may shorten it with
    the `X-Timeout-Ms` header.
    """

    def __init__(self, *, max_pending: int, timeout_s: float, retry_after_s: int) -> None:
        self.max_pending, self.timeout_s, self.retry_after_s = max_pending, timeout_s, retry_after_s
        self.pending = 0

    def deadline(self, request: Request) -> float:
        raw = request.headers.get(TIMEOUT_HEADER)
        if raw is None:
            return self.timeout_s
        try:
            ms = float(raw)
        except ValueError:
            msg = f"{TIMEOUT_HEADER} must be a number of milliseconds, got {raw!r}"
            raise InvalidRequest(msg, field=TIMEOUT_HEADER) from None
        return max(0.0, min(self.timeout_s, ms / 1000))

    async def run(self, work: Awaitable[T], timeout_s: float) -> T:
        if self.pending >= self.max_pending:
            _close(work)
            raise Overloaded(f"{self.pending} requests already pending in this replica (limit {self.max_pending}); "
                             "retry later", retry_after_s=self.retry_after_s)
        self.pending += 1
        try:
            async with asyncio.timeout(timeout_s):
                return await work
        except TimeoutError:
            raise DeadlineExceeded(f"no result within the deadline of {timeout_s:.3f} s") from None
        finally:
            self.pending -= 1


def _close(work: Awaitable[Any]) -> None:
    close = getattr(work, "close", None)
    if close is not None:
        close()  # an un-awaited coroutine would warn
