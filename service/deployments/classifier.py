"""The classifier deployment: `@serve.batch` over the ViT graphs behind one method, `infer(ClassifyJob)`.

/v1/classify (service/protocols/v1/classify.py) is this replica's own FastAPI app, built at start
(`__serve_build_asgi_app__`); the v2 protocol calls `infer` through a handle. In `infer`: check the map's
layers and heads -> admit (`Gate`) -> decode the files -> one batched model call per graph -> the result.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI
from ray import serve

from service.config import BatchSettings
from service.deployments.jobs import ClassifyJob, ClassifyResult
from service.deployments.replica import ModelReplica, model_deployment
from service.errors import InvalidRequest, LimitExceeded
from service.protocols.asgi import RouteSettings
from service.protocols.v1 import classify as v1
from service.protocols.v1.preprocess import to_model_input
from service.runtime import ClassifierRuntime, InputError

OFFLOAD_BYTES = 64_000  # images bigger than this are decoded in a thread, not on the event loop
GRAPHS = {None: "fast", "rollout": "attention", "cls": "cls"}  # attention method -> graph tag of the metrics
_BATCH = BatchSettings()


@dataclass
class Attention:
    """Which map a request asked for: its method, the layers and heads it averages, the graph's weights."""

    method: str  # "rollout" | "cls"
    layers: list[int]
    heads: list[int]
    weights: np.ndarray | None = None  # cls: (L, nh) weights over layers x heads


@dataclass
class Batched:
    """One job's images in the batch queue."""

    images: np.ndarray  # uint8 (n, H, W)
    attention: Attention | None
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class Output:
    probs: np.ndarray  # (n, C)
    maps: np.ndarray | None  # (n, grid, grid): the asked map of each image


@model_deployment("Classifier")
@serve.ingress()
class Classifier(ModelReplica):
    def __init__(self, args: dict[str, Any]) -> None:
        cfg = self.open(args, "classifier", ClassifierRuntime)
        self.settings = BatchSettings()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="ort")  # ORT off the event loop, one call at a time
        size = self.rt.image_size
        if cfg.warmup:
            zeros = np.zeros((2, size, size), np.uint8)
            for kw in ({}, {"rollout": True}, {"cls_weights": self.rt.cls_choice().weights}):
                self.rt.predict(zeros, **kw)

    def __serve_build_asgi_app__(self) -> FastAPI:
        settings = RouteSettings.for_app(v1.ROUTE, self.rt.name, self.args, gate=self.gate, media_types=v1.MEDIA_TYPES)
        return v1.build_api(self, settings, self.limits)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's user_config: batch size and wait applied live, without restarting the replica."""
        self.settings = BatchSettings.model_validate(user_config or {})
        self.run_batch.set_max_batch_size(self.settings.max_batch_size)
        self.run_batch.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)

    def info(self) -> dict[str, Any]:
        return {"name": self.rt.name, "version": self.rt.version, "task": "image-classification", "route": v1.ROUTE,
                "labels": self.rt.labels, "precision": self.rt.precision, "device": self.rt.device,
                "encoder_layers": self.rt.layers, "heads": self.rt.heads}

    def attention(self, job: ClassifyJob) -> Attention | None:
        """The map a job asks for (None: none), checked against this model's layers and heads (else 422),
        also when `return_attention` is false, so a request is valid or not whatever its flags."""
        layers, heads = job.attention_layers, job.attention_heads
        if job.attention not in ("rollout", "cls"):
            raise InvalidRequest(f"attention must be rollout or cls, got {job.attention!r}", field="attention")
        if job.attention != "cls" and (layers is not None or heads is not None):
            name = "attention_layers" if layers is not None else "attention_heads"
            raise InvalidRequest(f"{name} chooses the CLS map: set attention to \"cls\" (the rollout always uses "
                                 "every layer and head)", field=name)
        if job.attention == "rollout":
            attn = Attention("rollout", list(range(self.rt.layers)), list(range(self.rt.heads)))
        else:
            try:
                c = self.rt.cls_choice(layers, heads)
            except InputError as e:
                raise InvalidRequest(str(e), field=e.field) from None
            attn = Attention("cls", c.layers, c.heads, c.weights)
        return attn if job.return_attention else None

    async def infer(self, job: ClassifyJob) -> ClassifyResult:
        """Classify a job: what /v1/classify and the v2 protocol both call. Pixels first, then the files."""
        n = job.count
        if n == 0:
            raise InvalidRequest("no images", field="images")
        attn = self.attention(job)
        if n > self.limits.max_images:
            raise LimitExceeded(f"{n} images, the limit is {self.limits.max_images}", field="images")
        size = self.rt.image_size
        timeout_s = self.gate.timeout(job.timeout_s)
        with self.gate.admit(n):  # before decoding: a refused request costs no image work
            parts = [] if job.pixels is None else [np.asarray(job.pixels, np.uint8).reshape(-1, size, size)]
            offset = len(parts[0]) if parts else 0
            parts += [(await self.decode(raw, offset + i))[None] for i, raw in enumerate(job.files)]
            out = await self.gate.within(self.run_batch(Batched(np.concatenate(parts), attn)), timeout_s)
        res = ClassifyResult(model=self.rt.name, version=self.rt.version, labels=self.rt.labels, probs=out.probs,
                             maps=out.maps)
        if attn is not None:
            res.method, res.layers, res.heads = attn.method, attn.layers, attn.heads  # type: ignore[assignment]
        return res

    async def decode(self, raw: bytes, i: int) -> np.ndarray:
        kw = {"field": f"images[{i}]", "max_bytes": self.limits.max_image_bytes,
              "max_pixels": self.limits.max_image_pixels, "size": self.rt.image_size}
        if len(raw) <= OFFLOAD_BYTES:
            return to_model_input(raw, **kw)
        return await asyncio.to_thread(to_model_input, raw, **kw)

    @serve.batch(max_batch_size=_BATCH.max_batch_size, batch_wait_timeout_s=_BATCH.batch_wait_timeout_s)
    async def run_batch(self, jobs: list[Batched]) -> list[Output]:
        start, m, tags = time.perf_counter(), self.metrics, {"model": self.rt.name}
        m.batch_size.observe(len(jobs), tags)
        for job in jobs:
            m.queue_wait.observe(start - job.enqueued, tags)
        out: list[Output | None] = [None] * len(jobs)
        # One model call per graph: a request's result never depends on its batch-mates. CLS jobs with different
        # layers/heads share a call: the graph takes each image's own weights.
        for method, graph in GRAPHS.items():
            idx = [i for i, j in enumerate(jobs) if (j.attention.method if j.attention else None) == method]
            if not idx:
                continue
            images = np.concatenate([jobs[i].images for i in idx])
            weights = None
            if method == "cls":
                weights = np.concatenate([np.broadcast_to(jobs[i].attention.weights,
                                                          (len(jobs[i].images), *jobs[i].attention.weights.shape))
                                          for i in idx])
            probs, maps = await self._run(images, graph, method == "rollout", weights)
            pos = 0
            for i in idx:
                n = len(jobs[i].images)
                out[i] = Output(probs[pos : pos + n], None if maps is None else maps[pos : pos + n])
                pos += n
        assert all(o is not None and len(o.probs) == len(j.images) for o, j in zip(out, jobs, strict=True))
        return out  # type: ignore[return-value]

    async def _run(self, images: np.ndarray, graph: str, rollout: bool,
                   weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        m, tags = self.metrics, {"model": self.rt.name}
        probs, maps = [], []
        for lo in range(0, len(images), self.settings.max_batch_items):
            hi = lo + self.settings.max_batch_items
            chunk, w = images[lo:hi], (None if weights is None else weights[lo:hi])
            t0 = time.perf_counter()
            res = await asyncio.get_running_loop().run_in_executor(self.pool, self._infer, chunk, rollout, w)
            m.inference.observe(time.perf_counter() - t0, {**tags, "graph": graph})
            m.batch_items.observe(len(chunk), {**tags, "graph": graph})
            probs.append(res[0])
            maps.append(res[1])
        m.images.inc(len(images), tags)
        return np.concatenate(probs), (None if maps[0] is None else np.concatenate(maps))

    def _infer(self, images: np.ndarray, rollout: bool,
               weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        return self.rt.predict(images, rollout=rollout, cls_weights=weights)
