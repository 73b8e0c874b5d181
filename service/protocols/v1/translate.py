"""POST /v1/translate: the translator's own FastAPI app (its replica is the ingress; one hop from the proxy).

Decode the TranslateRequest into a `TranslateJob` -> the replica's `infer` (the same method the v2 protocol
calls through a handle) -> encode the `TranslateResult` as JSON, as Server-Sent Events (`stream`), or as the
alignment picture (`Accept: image/png`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from service.deployments.jobs import TokenUpdate, TranslateJob, TranslateResult
from service.errors import error_body, to_response
from service.protocols.asgi import ERROR_RESPONSES, RouteSettings, client_timeout_s, make_api
from service.protocols.v1 import pictures
from service.protocols.v1.schemas import (
    EncoderAttention,
    TokenEvent,
    TranslateRequest,
    TranslateResponse,
    Translation,
    TranslationAttention,
)

ROUTE = "/v1/translate"
# One Server-Sent Event as schema tools read it: its name and its JSON data (a TokenEvent, the
# TranslateResponse, or an ErrorResponse).
SSE_EVENT = {"type": "object", "required": ["event", "data"], "properties": {
    "event": {"enum": ["token", "done", "error"]},
    "data": {"type": "string", "contentMediaType": "application/json"}}}
STREAM_RESPONSES = {200: {"description": "The translations; with `stream: true`, Server-Sent Events instead; with "
                          "`Accept: image/png` and one text, its alignment heatmap (service/protocols/v1/pictures.py).",
                          "content": {"text/event-stream": {"schema": SSE_EVENT}, **pictures.PNG_CONTENT}}}


class Translates(Protocol):
    """What the route needs of the translator replica (service/deployments/translator.py)."""

    def check(self, job: TranslateJob) -> None: ...

    def infer(self, job: TranslateJob,
              on_token: Callable[[TokenUpdate], None] | None = None) -> Awaitable[TranslateResult]: ...


def to_job(req: TranslateRequest, request: Request) -> TranslateJob:
    return TranslateJob(**req.model_dump(exclude={"stream"}), timeout_s=client_timeout_s(request.headers))


def encode(res: TranslateResult) -> TranslateResponse:
    out = []
    for r in res.translations:
        t = Translation(text=r.text)
        if r.attention is not None:
            t.attention = TranslationAttention(source_tokens=r.source_tokens, target_tokens=r.target_tokens,
                                               weights=r.attention.tolist(), layers=r.layers, heads=r.heads)
        if r.encoder_attention is not None:
            t.encoder_attention = EncoderAttention(tokens=r.source_tokens, weights=r.encoder_attention.tolist(),
                                                   layers=r.encoder_layers, heads=r.encoder_heads)
        out.append(t)
    return TranslateResponse(model=res.model, version=res.version, translations=out)


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def stream(replica: Translates, job: TranslateJob) -> AsyncIterator[bytes]:
    """A `token` event per generated token, then `done` with the whole response (or `error`)."""
    queue: asyncio.Queue[TokenUpdate | None] = asyncio.Queue()
    task = asyncio.ensure_future(replica.infer(job, on_token=queue.put_nowait))
    task.add_done_callback(lambda _: queue.put_nowait(None))
    try:
        while (u := await queue.get()) is not None:
            event = TokenEvent(index=u.index, token=u.token, text=u.text, alignment=u.alignment)
            yield sse("token", event.model_dump(exclude_none=True))
        yield sse("done", encode(task.result()).model_dump(mode="json"))
    except Exception as e:  # the status line is sent already: the error becomes the last event
        response, code = to_response(e)
        yield sse("error", json.loads(response.body) if response.body else error_body(code, str(e)))
    finally:
        if not task.done():
            task.cancel()



def build_api(replica: Translates | None, settings: RouteSettings) -> FastAPI:
    """The app of one translator replica (`replica` None: only for its OpenAPI document)."""
    api = make_api("attnserve translator", settings)

    @api.post("/", response_model=TranslateResponse, responses={**ERROR_RESPONSES, **STREAM_RESPONSES},
              summary="Translate English to Spanish")
    async def translate(req: TranslateRequest, request: Request) -> Any:
        assert replica is not None
        png = pictures.negotiate(request.headers.get("accept"), len(req.texts), field="texts", stream=req.stream)
        if png:  # the picture draws the alignment (and the encoder's map beside it when that is asked for)
            req = req.model_copy(update={"return_attention": True})
        job = to_job(req, request)
        if req.stream:
            replica.check(job)  # refuse before the 200 of a stream is sent; admitted in `infer`
            return StreamingResponse(stream(replica, job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        response = encode(await replica.infer(job))
        return await pictures.alignment_response(response) if png else response

    return api
