"""The classifier deployment: its own FastAPI ingress at /v1/classify (JSON base64 or multipart), @serve.batch."""

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from ray import serve
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from service.deployments.replica import ModelReplica
from service.errors import InvalidRequest, LimitExceeded
from service.protocols.asgi import ERROR_RESPONSES, RouteSettings, make_api
from service.protocols.v1 import pictures
from service.protocols.v1.preprocess import decode_base64, to_model_input
from service.protocols.v1.schemas import (
    CLASSIFIER_MAPS,
    MAX_HEADS,
    MAX_LAYERS,
    ClassifierAttention,
    ClassifyRequest,
    ClassifyResponse,
    HeadIndex,
    LabelScore,
    LayerIndex,
    Prediction,
)
from service.runtime import ClassifierRuntime, InputError

ROUTE = "/v1/classify"
OFFLOAD_BYTES = 64_000  # images bigger than this are decoded in a thread, not on the event loop
MAX_FORM_FIELDS = 16  # the form has five fields; a few spare so an unknown one gets a clear 422 naming it
MAX_FIELD_BYTES = 1024
route = RouteSettings(ROUTE, media_types=("application/json", "multipart/form-data"))
api = make_api("attnserve classifier", route)


def _form_bool(value: object) -> object:
    # A form field is text: a boolean is spelled true or false (any case, as Python's requests sends True).
    # Other spellings (0, 1, yes, on) are refused, as the schema's "boolean" says.
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"must be true or false, got {value!r}")


def _form_int(value: object) -> object:
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    raise ValueError(f"must be a whole number in decimal digits, got {value!r}")


INTS = r"-?[0-9]+(,-?[0-9]+)*"


def _form_ints(value: object) -> object:
    # A list in one text field: comma-separated whole numbers, exactly as INTS_SCHEMA's pattern ("0,5", "-1").
    if isinstance(value, str) and re.fullmatch(INTS, value):
        return [int(v) for v in value.split(",")]
    raise ValueError(f"must be comma-separated whole numbers without spaces (e.g. 0,5 or -1), got {value!r}")


class ClassifyForm(BaseModel):
    """The non-file fields of a multipart upload (the files go in repeated `images` parts)."""

    model_config = ConfigDict(extra="forbid")
    top_k: Annotated[int, BeforeValidator(_form_int)] = Field(3, ge=1, le=10)
    return_attention: Annotated[bool, BeforeValidator(_form_bool)] = False
    attention: Literal["rollout", "cls"] = "rollout"
    attention_layers: Annotated[list[LayerIndex] | None, BeforeValidator(_form_ints)] = Field(
        None, min_length=1, max_length=MAX_LAYERS)
    attention_heads: Annotated[list[HeadIndex] | None, BeforeValidator(_form_ints)] = Field(
        None, min_length=1, max_length=MAX_HEADS)


FORM_FIELDS = ", ".join(ClassifyForm.model_fields)
INTS_SCHEMA = {"type": "string", "pattern": f"^{INTS}$"}


MULTIPART_SCHEMA = {
    "type": "object", "required": ["images"],
    "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1, "maxItems": 64,
                   "description": "PNG or JPEG files, one part each."},
        "top_k": {"type": "integer", "minimum": 1, "maximum": 10, "default": 3},
        "return_attention": {"type": "boolean", "default": False, "description": "`true` or `false` (any case)."},
        "attention": {"type": "string", "enum": ["rollout", "cls"], "default": "rollout",
                      "description": CLASSIFIER_MAPS},
        "attention_layers": {**INTS_SCHEMA, "description": "`cls` only: comma-separated layer indices (e.g. `0,5`, "
                             "`-1`; as the JSON field `attention_layers`); absent = all layers."},
        "attention_heads": {**INTS_SCHEMA, "description": "`cls` only: comma-separated head indices (e.g. `0,2`; "
                            "as the JSON field `attention_heads`); absent = all heads."},
    },
    # Every file part is an image, whatever its name (`images` documented, `files` common); no other text fields.
    "additionalProperties": {"type": "string", "format": "binary"},
}
OPENAPI_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": ClassifyRequest.model_json_schema()},
    "multipart/form-data": {"schema": MULTIPART_SCHEMA},
}}}
RESPONSES = {**ERROR_RESPONSES, 400: {**ERROR_RESPONSES[422], "description": (
    "an image is not base64, not a PNG or JPEG, or cannot be decoded (`bad_image`), or has more pixels than "
    "the limit (`image_too_large`)")}, 200: {"description": "The predictions; with `Accept: image/png` and one "
    "image, the image with its attention map (`attention`) overlaid (service/protocols/v1/pictures.py).",
    "content": pictures.PNG_CONTENT}}
GRAPHS = {None: "fast", "rollout": "attention", "cls": "cls"}  # attention method -> graph tag of the metrics


@dataclass
class Attention:
    """Which map a request asked for: its method, the layers and heads it averages, the graph's weights."""

    method: str  # "rollout" | "cls"
    layers: list[int]
    heads: list[int]
    weights: np.ndarray | None = None  # cls: (L, nh) weights over layers x heads


@dataclass
class Job:
    images: np.ndarray  # uint8 (n, 28, 28)
    attention: Attention | None
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class Output:
    probs: np.ndarray  # (n, C)
    maps: np.ndarray | None  # (n, 7, 7): the asked map of each image


def validation_error(e: ValidationError, prefix: tuple[str, ...] = ("body",)) -> RequestValidationError:
    return RequestValidationError([{**err, "loc": (*prefix, *err["loc"])} for err in e.errors()])


@serve.deployment(name="Classifier", max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class Classifier(ModelReplica):
    def __init__(self, args: dict[str, Any]) -> None:
        cfg = self.open(args, "classifier", ClassifierRuntime)
        if cfg.warmup:
            zeros = np.zeros((2, 28, 28), np.uint8)
            for kw in ({}, {"rollout": True}, {"cls_weights": self.rt.cls_choice().weights}):
                self.rt.predict(zeros, **kw)
        route.configure(self.rt.name, self.args, self.gate)

    def info(self) -> dict[str, Any]:
        return {"name": self.rt.name, "version": self.rt.version, "task": "image-classification", "route": ROUTE,
                "labels": self.rt.labels, "precision": self.rt.precision, "device": self.rt.device,
                "encoder_layers": self.rt.layers, "heads": self.rt.heads}

    def attention(self, wanted: bool, method: str, layers: list[int] | None,
                  heads: list[int] | None) -> Attention | None:
        """The map a request asks for (None: none), checked against this model's layers and heads (else 422),
        also when `return_attention` is false, so a request is valid or not whatever its flags."""
        if method != "cls" and (layers is not None or heads is not None):
            name = "attention_layers" if layers is not None else "attention_heads"
            raise InvalidRequest(f"{name} chooses the CLS map: set attention to \"cls\" (the rollout always uses "
                                 "every layer and head)", field=name)
        if method == "rollout":
            attn = Attention("rollout", list(range(self.rt.layers)), list(range(self.rt.heads)))
        else:
            try:
                c = self.rt.cls_choice(layers, heads)
            except InputError as e:
                raise InvalidRequest(str(e), field=e.field) from None
            attn = Attention("cls", c.layers, c.heads, c.weights)
        return attn if wanted else None

    @api.post("/", response_model=ClassifyResponse, responses=RESPONSES, openapi_extra=OPENAPI_BODY,
              summary="Classify images (JSON base64 or multipart upload)")
    async def classify(self, request: Request) -> ClassifyResponse:
        if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            raws, opts = await self.read_multipart(request)
        else:
            try:
                opts = ClassifyRequest.model_validate_json(await request.body())
            except ValidationError as e:
                raise validation_error(e) from None
            self.check_count(len(opts.images))
            raws = [decode_base64(b, field=f"images[{i}]", max_bytes=self.limits.max_image_bytes)
                    for i, b in enumerate(opts.images)]
        png = pictures.negotiate(request.headers.get("accept"), len(raws), field="images")
        attn = self.attention(opts.return_attention or png, opts.attention, opts.attention_layers,
                              opts.attention_heads)
        timeout_s = self.gate.deadline(request)
        with self.gate.admit(len(raws)):  # before decoding: a refused request costs no image work
            images = np.stack([await self.decode(raw, i) for i, raw in enumerate(raws)])
            out = await self.gate.within(self.run_batch(Job(images, attn)), timeout_s)
        resp = ClassifyResponse(model=self.rt.name, version=self.rt.version,
                                predictions=[self.encode(out, i, opts.top_k, attn) for i in range(len(images))])
        return await pictures.overlay_response(raws[0], resp) if png else resp

    async def read_multipart(self, request: Request) -> tuple[list[bytes], ClassifyForm]:
        form = await self.parse_multipart(request)
        try:
            # Every file part is an image, in order, whatever its field name (`images` documented, `files` common).
            files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            if not files:
                raise RequestValidationError([{"type": "missing", "loc": ("body", "images"),
                                               "msg": "at least one image file part (e.g. -F images=@shirt.png)"}])
            self.check_count(len(files))
            fields = {k: v for k, v in form.multi_items() if not isinstance(v, UploadFile)}
            try:
                opts = ClassifyForm.model_validate(fields)
            except ValidationError as e:
                raise validation_error(e) from None
            return [await f.read() for f in files], opts
        finally:
            await form.close()

    async def parse_multipart(self, request: Request) -> FormData:
        # Starlette's parser directly, not request.form(): that turns every parse error into a bare 400.
        n = self.limits.max_images
        parser = MultiPartParser(request.headers, request.stream(), max_files=n, max_fields=MAX_FORM_FIELDS,
                                 max_part_size=MAX_FIELD_BYTES)
        try:
            return await parser.parse()
        except MultiPartException as e:
            if e.message.startswith("Too many files"):
                raise LimitExceeded(f"more than {n} image file parts, the limit is {n}", field="images") from None
            if e.message.startswith("Too many fields"):
                raise LimitExceeded(f"more than {MAX_FORM_FIELDS} text fields; the form's fields are "
                                    f"{FORM_FIELDS}", field="body") from None
            if e.message.startswith("Part exceeded"):
                raise LimitExceeded(f"a text field is over {MAX_FIELD_BYTES} bytes; the form's fields are "
                                    f"{FORM_FIELDS}", field="body") from None
            raise InvalidRequest(f"malformed multipart/form-data body: {e.message}", field="body") from None

    def check_count(self, n: int) -> None:
        if n > self.limits.max_images:
            raise LimitExceeded(f"{n} images, the limit is {self.limits.max_images}", field="images")

    async def decode(self, raw: bytes, i: int) -> np.ndarray:
        kw = {"field": f"images[{i}]", "max_bytes": self.limits.max_image_bytes,
              "max_pixels": self.limits.max_image_pixels}
        if len(raw) <= OFFLOAD_BYTES:
            return to_model_input(raw, **kw)
        return await asyncio.to_thread(to_model_input, raw, **kw)

    def encode(self, out: Output, i: int, top_k: int, attn: Attention | None) -> Prediction:
        p = out.probs[i]
        order = np.argsort(-p, kind="stable")[:top_k]
        best = int(order[0])
        attention = None
        if attn is not None and out.maps is not None:
            attention = ClassifierAttention(method=attn.method, grid=list(out.maps.shape[1:]),
                                            weights=out.maps[i].tolist(), layers=attn.layers, heads=attn.heads)
        return Prediction(label=self.rt.labels[best], index=best, score=float(p[best]),
                          top_k=[LabelScore(label=self.rt.labels[int(j)], score=float(p[j])) for j in order],
                          attention=attention)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def run_batch(self, jobs: list[Job]) -> list[Output]:
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

    async def infer_images(self, images: np.ndarray | None, encoded: list[bytes], return_attention: bool = False,
                           timeout_s: float | None = None, attention: str = "rollout",
                           attention_layers: list[int] | None = None,
                           attention_heads: list[int] | None = None) -> dict[str, Any]:
        """The /v1 path without HTTP, for other apps through a handle (the v2 protocol in protocols/v2/routes.py).

        `images` uint8 (n, 28, 28) and/or PNG/JPEG files (decoded like /v1/classify, appended after `images`).
        Same limits, checks, admission gate, deadline (`timeout_s` can only shorten it) and batching as POST
        /v1/classify. Returns {"version", "labels", "probs" (n, C), "attention" (n, 7, 7) or None, and with
        it "method", "layers", "heads"}.
        """
        n = (0 if images is None else len(images)) + len(encoded)
        if n == 0:
            raise InvalidRequest("no images", field="images")
        if attention not in ("rollout", "cls"):
            raise InvalidRequest(f"attention must be rollout or cls, got {attention!r}", field="attention")
        attn = self.attention(return_attention, attention, attention_layers, attention_heads)
        self.check_count(n)
        timeout_s = self.gate.timeout_s if timeout_s is None else min(self.gate.timeout_s, timeout_s)
        with self.gate.admit(n):
            parts = [] if images is None else [np.asarray(images, np.uint8).reshape(-1, 28, 28)]
            offset = len(parts[0]) if parts else 0
            parts += [(await self.decode(raw, offset + i))[None] for i, raw in enumerate(encoded)]
            out = await self.gate.within(self.run_batch(Job(np.concatenate(parts), attn)), timeout_s)
        res = {"version": self.rt.version, "labels": self.rt.labels, "probs": out.probs, "attention": out.maps}
        if attn is not None:
            res |= {"method": attn.method, "layers": attn.layers, "heads": attn.heads}
        return res
