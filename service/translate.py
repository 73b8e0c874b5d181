"""The translator deployment: its own FastAPI ingress at /v1/translate, batching with @serve.batch.

Request path: proxy -> this replica (one hop; see docs/ARCHITECTURE.md for the measured alternatives).
decode request -> check limits -> batch -> run (fast or attention graphs) -> encode response.
"""

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from ray import serve

from service.errors import LimitExceeded
from service.http import ERROR_RESPONSES, RouteSettings, make_api
from service.replica import ModelReplica
from service.runtime import TranslationResult, TranslatorRuntime
from service.schemas import TranslateRequest, TranslateResponse, Translation, TranslationAttention

ROUTE = "/v1/translate"
route = RouteSettings(ROUTE)
api = make_api("attnserve translator", route)


@dataclass
class Job:
    texts: list[str]
    beam_size: int
    max_new_tokens: int
    return_attention: bool
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def key(self) -> tuple[bool, int, int]:
        # Requests are only merged when they run the same graph with the same decoding settings, so a
        # request's result never depends on what it was batched with.
        return self.return_attention, self.beam_size, self.max_new_tokens


def encode(r: TranslationResult, with_attention: bool) -> Translation:
    if not with_attention or r.attention is None:
        return Translation(text=r.text)
    return Translation(text=r.text, attention=TranslationAttention(
        source_tokens=r.source_tokens, target_tokens=r.target_tokens, weights=r.attention.tolist(),
        layer=r.layer, heads=r.heads))


@serve.deployment(name="Translator", max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class Translator(ModelReplica):
    def __init__(self, args: dict[str, Any]) -> None:
        cfg = self.open(args, "translator", TranslatorRuntime)
        self.max_source_tokens = min(self.limits.max_source_tokens, self.rt.max_source_tokens)
        if cfg.warmup:
            for attn in (False, True):
                self.rt.translate(["Hello, world."], max_new_tokens=4, return_attention=attn)
        route.model, route.max_body_bytes = self.rt.name, self.limits.max_body_bytes

    def info(self) -> dict[str, Any]:
        return {"name": self.rt.name, "version": self.rt.version, "task": "translation", "route": ROUTE,
                "labels": None, "precision": self.rt.precision, "device": self.rt.device}

    def check_limits(self, req: TranslateRequest) -> None:
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

    @api.post("/", response_model=TranslateResponse, responses=ERROR_RESPONSES, summary="Translate English to Spanish")
    async def translate(self, req: TranslateRequest, request: Request) -> TranslateResponse:
        self.check_limits(req)
        job = Job(req.texts, req.beam_size, req.max_new_tokens, req.return_attention)
        results = await self.gate.run(self.run_batch(job), self.gate.deadline(request))
        return TranslateResponse(model=self.rt.name, version=self.rt.version,
                                 translations=[encode(r, req.return_attention) for r in results])

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def run_batch(self, jobs: list[Job]) -> list[list[TranslationResult]]:
        start, m = time.perf_counter(), self.metrics
        tags = {"model": self.rt.name}
        m.batch_size.observe(len(jobs), tags)
        groups: dict[tuple[bool, int, int], list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            m.queue_wait.observe(start - job.enqueued, tags)
            groups[job.key].append(i)
        out: list[list[TranslationResult]] = [[] for _ in jobs]
        for (attn, beam, max_new), idx in groups.items():
            texts = [t for i in idx for t in jobs[i].texts]
            results: list[TranslationResult] = []
            for lo in range(0, len(texts), self.settings.max_batch_items):
                chunk = texts[lo : lo + self.settings.max_batch_items]
                results += await self._run(chunk, attn, beam, max_new)
            pos = 0
            for i in idx:
                n = len(jobs[i].texts)
                out[i], pos = results[pos : pos + n], pos + n
        assert all(len(o) == len(j.texts) for o, j in zip(out, jobs, strict=True))
        return out

    async def _run(self, texts: list[str], attn: bool, beam: int, max_new: int) -> list[TranslationResult]:
        graph, t0 = ("attention" if attn else "fast"), time.perf_counter()
        results = await asyncio.get_running_loop().run_in_executor(
            self.pool, lambda: self.rt.translate(texts, beam_size=beam, max_new_tokens=max_new, return_attention=attn))
        m, tags = self.metrics, {"model": self.rt.name}
        m.inference.observe(time.perf_counter() - t0, {**tags, "graph": graph})
        m.batch_items.observe(len(texts), {**tags, "graph": graph})
        m.input_tokens.inc(sum(len(r.source_tokens) + 1 for r in results), tags)
        m.generated_tokens.inc(sum(len(r.target_tokens) for r in results), tags)
        return results

