"""The translator deployment: its own FastAPI ingress at /v1/translate over a continuous-batching engine.

Request path: proxy -> this replica (one hop; docs/ARCHITECTURE.md). decode request -> check limits -> one
engine sequence per text -> the engine thread admits them into free decoder slots between steps -> each text
resolves as soon as it finishes (or streams its tokens) -> encode response. A text whose client went away or
whose deadline passed is dropped from its slot at the next step.
"""


import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from ray import serve

from service.config import EngineConfig
from service.deployments.engine_loop import EngineLoop
from service.deployments.replica import ModelReplica
from service.errors import (
    DeadlineExceeded,
    InvalidRequest,
    LimitExceeded,
    NotReady,
    ServiceError,
    error_body,
    to_response,
)
from service.protocols.asgi import ERROR_RESPONSES, RouteSettings, make_api
from service.protocols.v1 import pictures
from service.protocols.v1.schemas import (
    EncoderAttention,
    TokenEvent,
    TranslateRequest,
    TranslateResponse,
    Translation,
    TranslationAttention,
)
from service.runtime import InputError, TranslationResult, TranslatorRuntime
from service.runtime.attention import alignment
from service.runtime.engine import Sequence
from service.runtime.translator import Choices

ROUTE = "/v1/translate"
route = RouteSettings(ROUTE)
api = make_api("attnserve translator", route)
# One Server-Sent Event as schema tools read it: its name and its JSON data (a TokenEvent, the
# TranslateResponse, or an ErrorResponse).
SSE_EVENT = {"type": "object", "required": ["event", "data"], "properties": {
    "event": {"enum": ["token", "done", "error"]},
    "data": {"type": "string", "contentMediaType": "application/json"}}}
STREAM_RESPONSES = {200: {"description": "The translations; with `stream: true`, Server-Sent Events instead; with "
                          "`Accept: image/png` and one text, its alignment heatmap (service/protocols/v1/pictures.py).",
                          "content": {"text/event-stream": {"schema": SSE_EVENT}, **pictures.PNG_CONTENT}}}


def encode(r: TranslationResult) -> Translation:
    out = Translation(text=r.text)
    if r.attention is not None:
        out.attention = TranslationAttention(source_tokens=r.source_tokens, target_tokens=r.target_tokens,
                                             weights=r.attention.tolist(), layers=r.layers, heads=r.heads)
    if r.encoder_attention is not None:
        out.encoder_attention = EncoderAttention(tokens=r.source_tokens, weights=r.encoder_attention.tolist(),
                                                 layers=r.encoder_layers, heads=r.encoder_heads)
    return out


def attention_kw(req: TranslateRequest) -> dict[str, Any]:
    """The request's attention choices as TranslatorRuntime keywords."""
    return req.model_dump(include={"return_attention", "attention_layers", "attention_heads",
                                   "return_encoder_attention", "encoder_attention_layers", "encoder_attention_heads"})


def cost(req: TranslateRequest) -> int:
    """What a request takes from the replica's budget (`Gate`): a bound on the decoder row-steps it can use."""
    return len(req.texts) * req.beam_size * req.max_new_tokens


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


class Job:
    """The texts of one request as engine sequences, with a future per text resolved from the engine thread."""

    def __init__(self, rt: TranslatorRuntime, req: TranslateRequest, loop: asyncio.AbstractEventLoop,
                 deadline: float, *, stream: asyncio.Queue | None = None) -> None:
        self.loop, self.rt = loop, rt
        self.futures: list[asyncio.Future] = []
        self.made: list[tuple[Sequence, list[str], Choices]] = []
        for i, text in enumerate(req.texts):
            seq, pieces, choices = rt.sequence(text, beam_size=req.beam_size, max_new_tokens=req.max_new_tokens,
                                               **attention_kw(req))
            seq.deadline = deadline
            fut = loop.create_future()
            seq.on_done = self._resolver(fut)
            if stream is not None:
                seq.on_token = self._streamer(stream, i, len(pieces))
            self.futures.append(fut)
            self.made.append((seq, pieces, choices))

    def _resolver(self, fut: asyncio.Future):
        def done(seq: Sequence) -> None:
            self.loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(seq))
        return done

    def _streamer(self, queue: asyncio.Queue, index: int, n_source: int):
        def token(seq: Sequence, tok: int, row) -> None:
            item = (index, tok, list(seq.tokens), None if row is None else alignment(row[None], n_source)[0])
            self.loop.call_soon_threadsafe(queue.put_nowait, item)
        return token

    @property
    def sequences(self) -> list[Sequence]:
        return [m[0] for m in self.made]

    def result(self, i: int) -> TranslationResult:
        seq, pieces, choices = self.made[i]
        if seq.dropped == "deadline":
            raise DeadlineExceeded("the translation did not finish within the deadline")
        if seq.dropped == "shutdown":
            raise NotReady("this replica is shutting down; retry")
        if seq.dropped is not None:
            raise ServiceError(f"the translation was stopped ({seq.dropped})")
        return self.rt.result(seq, pieces, choices)


@serve.deployment(name="Translator", max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class Translator(ModelReplica):
    def __init__(self, args: dict[str, Any]) -> None:
        cfg = self.open(args, "translator", TranslatorRuntime)
        self.max_source_tokens = min(self.limits.max_source_tokens, self.rt.max_source_tokens)
        self.engine_config = EngineConfig()
        engine = self.rt.new_engine(self.engine_config.settings())
        self.loop = EngineLoop(engine, asyncio.get_running_loop(), self.metrics, self.rt.name)
        if cfg.warmup:
            for attn in (False, True):
                self.rt.translate_engine(["Hello, world."], max_new_tokens=4, return_attention=attn,
                                         return_encoder_attention=attn)
        route.configure(self.rt.name, self.args, self.gate)


    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's user_config: the engine's knobs, applied at its next iteration without a restart."""
        self.engine_config = EngineConfig.model_validate(user_config or {})
        self.loop.reconfigure(self.engine_config.settings())

    def __del__(self) -> None:
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.stop()

    def info(self) -> dict[str, Any]:
        return {"name": self.rt.name, "version": self.rt.version, "task": "translation", "route": ROUTE,
                "labels": None, "precision": self.rt.precision, "device": self.rt.device,
                "encoder_layers": self.rt.encoder_layers, "decoder_layers": self.rt.layers, "heads": self.rt.heads}

    def check_limits(self, req: TranslateRequest) -> None:
        try:  # layers/heads outside this model's: the schema cannot know them
            self.rt.choices(**attention_kw(req))
        except InputError as e:
            raise InvalidRequest(str(e), field=e.field) from None
        lim = self.limits
        if len(req.texts) > lim.max_texts:
            raise LimitExceeded(f"{len(req.texts)} texts, the limit is {lim.max_texts}", field="texts")
        for i, text in enumerate(req.texts):
            if len(text) > lim.max_text_chars:
                raise LimitExceeded(f"{len(text)} characters, the limit is {lim.max_text_chars}", field=f"texts[{i}]")
            n = self.rt.count_source_tokens(text)
            if n > self.max_source_tokens:
                raise LimitExceeded(f"{n} source tokens (with EOS), the limit is {self.max_source_tokens}",
                                    field=f"texts[{i}]")

    @api.post("/", response_model=TranslateResponse, responses={**ERROR_RESPONSES, **STREAM_RESPONSES},
              summary="Translate English to Spanish")
    async def translate(self, req: TranslateRequest, request: Request) -> Any:
        png = pictures.negotiate(request.headers.get("accept"), len(req.texts), field="texts", stream=req.stream)
        if png:  # the picture draws the alignment (and the encoder's map beside it when that is asked for)
            req = req.model_copy(update={"return_attention": True})
        timeout_s = self.gate.deadline(request)
        deadline = time.monotonic() + timeout_s  # the engine's clock (an event loop's may differ: uvloop)
        if req.stream:
            self.check_limits(req)
            self.gate.check(cost(req))  # refuse before the 200 of a stream is sent; admitted in _stream
            return StreamingResponse(self._stream(req, timeout_s, deadline), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        with self.gate.admit(cost(req)):  # before tokenizing: a refused request costs no model work
            self.check_limits(req)
            job = Job(self.rt, req, asyncio.get_running_loop(), deadline)
            results = await self.gate.within(self._run(job), timeout_s)
        if png:
            return await pictures.alignment_response(self._response(req, results))
        return self._response(req, results)

    def _response(self, req: TranslateRequest, results: list[TranslationResult]) -> TranslateResponse:
        return TranslateResponse(model=self.rt.name, version=self.rt.version,
                                 translations=[encode(r) for r in results])

    async def _run(self, job: Job) -> list[TranslationResult]:
        try:
            for seq in job.sequences:
                self.loop.submit(seq)
            await asyncio.gather(*job.futures)
            return [job.result(i) for i in range(len(job.futures))]
        finally:  # cancelled (client gone, deadline): free the slots now, not when decoding would end
            for seq in job.sequences:
                self.loop.cancel(seq)

    async def _stream(self, req: TranslateRequest, timeout_s: float, deadline: float) -> AsyncIterator[bytes]:
        queue: asyncio.Queue = asyncio.Queue()
        job = Job(self.rt, req, asyncio.get_running_loop(), deadline, stream=queue)
        task = asyncio.ensure_future(self.gate.run(self._run(job), timeout_s, cost=cost(req)))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (item := await queue.get()) is not None:
                index, _, tokens, row = item
                event = TokenEvent(index=index, token=self.rt.tokenizer.id_to_token(tokens[-1]),
                                   text=self.rt.tokenizer.decode(tokens),
                                   alignment=None if row is None else row.tolist())
                yield sse("token", event.model_dump(exclude_none=True))
            results = task.result()
            yield sse("done", self._response(req, results).model_dump(mode="json"))
        except Exception as e:  # the status line is sent already: the error becomes the last event
            response, code = to_response(e)
            yield sse("error", json.loads(response.body) if response.body else error_body(code, str(e)))
        finally:
            if not task.done():
                task.cancel()

    async def infer_texts(self, texts: list[str], beam_size: int = 1, max_new_tokens: int = 128,
                          return_attention: bool = False, timeout_s: float | None = None,
                          **attention: Any) -> dict[str, Any]:
        """The /v1 path without HTTP, for other apps through a handle (the v2 protocol in protocols/v2/routes.py).

        `attention`: the other attention fields of TranslateRequest (attention_layers, return_encoder_attention,
        ...). Same validation, limits, admission gate, deadline (`timeout_s` can only shorten it) and engine as
        POST /v1/translate. Returns {"version", "translations": [{"text", "source_tokens", "target_tokens",
        "attention" (target x source array or None), "layers", "heads", "encoder_attention" (source x source
        array or None), "encoder_layers", "encoder_heads"}]}.
        """
        try:
            req = TranslateRequest(texts=texts, beam_size=beam_size, max_new_tokens=max_new_tokens,
                                   return_attention=return_attention, **attention)
        except ValidationError as e:
            err = e.errors()[0]
            raise InvalidRequest(err["msg"], field=".".join(str(p) for p in err["loc"]) or None) from None
        timeout_s = self.gate.timeout_s if timeout_s is None else min(self.gate.timeout_s, timeout_s)
        with self.gate.admit(cost(req)):
            self.check_limits(req)
            job = Job(self.rt, req, asyncio.get_running_loop(), time.monotonic() + timeout_s)
            results = await self.gate.within(self._run(job), timeout_s)
        return {"version": self.rt.version, "translations": [
            {"text": r.text, "source_tokens": r.source_tokens, "target_tokens": r.target_tokens,
             "attention": r.attention, "layers": r.layers, "heads": r.heads,
             "encoder_attention": r.encoder_attention, "encoder_layers": r.encoder_layers,
             "encoder_heads": r.encoder_heads}
            for r in results]}
