"""The translator deployment: a continuous-batching engine behind one method, `infer(TranslateJob)`.

/v1/translate (service/protocols/v1/translate.py) is this replica's own FastAPI app, built at start
(`__serve_build_asgi_app__`); the v2 protocol calls `infer` through a handle. In `infer`: admit (`Gate`) ->
check limits -> one engine sequence per text -> the engine thread admits them into free decoder slots between
steps -> each text resolves as soon as it finishes (or streams its tokens). A text whose client went away or
whose deadline passed is dropped from its slot at the next step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from ray import serve

from service.config import EngineConfig
from service.deployments.engine_loop import EngineLoop
from service.deployments.jobs import TokenUpdate, TranslateJob, TranslateResult
from service.deployments.replica import ModelReplica, model_deployment
from service.errors import DeadlineExceeded, InvalidRequest, LimitExceeded, NotReady, ServiceError
from service.protocols.asgi import RouteSettings
from service.protocols.v1 import translate as v1
from service.runtime import InputError, TranslationResult, TranslatorRuntime
from service.runtime.attention import alignment
from service.runtime.engine import Sequence
from service.runtime.translator import Choices


class EngineJob:
    """A job's texts as engine sequences, with a future per text resolved from the engine thread."""

    def __init__(self, rt: TranslatorRuntime, job: TranslateJob, loop: asyncio.AbstractEventLoop,
                 deadline: float, on_token: Callable[[TokenUpdate], None] | None = None) -> None:
        self.loop, self.rt = loop, rt
        self.futures: list[asyncio.Future] = []
        self.made: list[tuple[Sequence, list[str], Choices]] = []
        for i, text in enumerate(job.texts):
            seq, pieces, choices = rt.sequence(text, beam_size=job.beam_size, max_new_tokens=job.max_new_tokens,
                                               **job.attention_choices())
            seq.deadline = deadline
            fut = loop.create_future()
            seq.on_done = self._resolver(fut)
            if on_token is not None:
                seq.on_token = self._streamer(on_token, i, len(pieces))
            self.futures.append(fut)
            self.made.append((seq, pieces, choices))

    def _resolver(self, fut: asyncio.Future):
        def done(seq: Sequence) -> None:
            self.loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(seq))
        return done

    def _streamer(self, on_token: Callable[[TokenUpdate], None], index: int, n_source: int):
        def token(seq: Sequence, tok: int, row) -> None:
            tokens, row = list(seq.tokens), (None if row is None else alignment(row[None], n_source)[0])
            self.loop.call_soon_threadsafe(lambda: on_token(TokenUpdate(
                index=index, token=self.rt.tokenizer.id_to_token(tokens[-1]), text=self.rt.tokenizer.decode(tokens),
                alignment=None if row is None else row.tolist())))
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


@model_deployment("Translator")
@serve.ingress()
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

    def __serve_build_asgi_app__(self) -> FastAPI:
        return v1.build_api(self, RouteSettings.for_app(v1.ROUTE, self.rt.name, self.args, gate=self.gate))

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's user_config: the engine's knobs, applied at its next iteration without a restart."""
        self.engine_config = EngineConfig.model_validate(user_config or {})
        self.loop.reconfigure(self.engine_config.settings())

    def __del__(self) -> None:
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.stop()

    def info(self) -> dict[str, Any]:
        return {"name": self.rt.name, "version": self.rt.version, "task": "translation", "route": v1.ROUTE,
                "labels": None, "precision": self.rt.precision, "device": self.rt.device,
                "encoder_layers": self.rt.encoder_layers, "decoder_layers": self.rt.layers, "heads": self.rt.heads}

    def check_limits(self, job: TranslateJob) -> None:
        try:  # layers/heads outside this model's: a protocol's schema cannot know them
            self.rt.choices(**job.attention_choices())
        except InputError as e:
            raise InvalidRequest(str(e), field=e.field) from None
        lim = self.limits
        if len(job.texts) > lim.max_texts:
            raise LimitExceeded(f"{len(job.texts)} texts, the limit is {lim.max_texts}", field="texts")
        for i, text in enumerate(job.texts):
            if len(text) > lim.max_text_chars:
                raise LimitExceeded(f"{len(text)} characters, the limit is {lim.max_text_chars}", field=f"texts[{i}]")
            n = self.rt.count_source_tokens(text)
            if n > self.max_source_tokens:
                raise LimitExceeded(f"{n} source tokens (with EOS), the limit is {self.max_source_tokens}",
                                    field=f"texts[{i}]")

    def check(self, job: TranslateJob) -> None:
        """Raise now what `infer` would refuse at once (limits, a full replica): before a stream's 200 is sent."""
        self.check_limits(job)
        self.gate.check(job.cost)

    async def infer(self, job: TranslateJob,
                    on_token: Callable[[TokenUpdate], None] | None = None) -> TranslateResult:
        """Translate a job: what /v1/translate and the v2 protocol both call. `on_token` (in this replica only)
        gets each generated token of a greedy text as it comes."""
        timeout_s = self.gate.timeout(job.timeout_s)
        deadline = time.monotonic() + timeout_s  # the engine's clock (an event loop's may differ: uvloop)
        with self.gate.admit(job.cost):  # before tokenizing: a refused request costs no model work
            self.check_limits(job)
            work = EngineJob(self.rt, job, asyncio.get_running_loop(), deadline, on_token)
            results = await self.gate.within(self._run(work), timeout_s)
        return TranslateResult(model=self.rt.name, version=self.rt.version, translations=results)

    async def _run(self, work: EngineJob) -> list[TranslationResult]:
        try:
            for seq in work.sequences:
                self.loop.submit(seq)
            await asyncio.gather(*work.futures)
            return [work.result(i) for i in range(len(work.futures))]
        finally:  # cancelled (client gone, deadline): free the slots now, not when decoding would end
            for seq in work.sequences:
                self.loop.cancel(seq)
