"""Open Inference Protocol v2 (KServe/Triton REST) on the `api` app, beside the /v1 routes.

Decode the v2 request (codec.py beside this) -> call the model deployment's public method through its app handle
(`Translator.infer_texts`, `Classifier.infer_images`: the same limits, admission gate, deadline, engine or batch
and metrics as /v1) -> encode the requested outputs, as JSON or binary tensor data. Errors leave in the
protocol's form, `{"error": "<message>"}`, with a 4xx status for anything the client sent (400 for a malformed
or out-of-limit request, 404 for an unknown model, version or route) and 503/504 for overload and deadlines.

This adds one hop to v1's path (proxy -> api -> model replica): /v1 stays the fastest route.
"""

from __future__ import annotations

import asyncio
import gzip
import math
import re
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from ray import serve

from service.config import AppArgs
from service.errors import InvalidRequest, LimitExceeded, NotReady, ServiceError, describe
from service.protocols.asgi import TIMEOUT_HEADER
from service.protocols.v2 import codec
from service.protocols.v2.codec import BYTES, Output, V2Error

SERVER = {"name": "attnserve", "version": "0.1.0", "extensions": ["binary_tensor_data", "classification"]}
PROBE_TIMEOUT_S = 2.0
PLATFORM = "onnxruntime_onnx"
COMPRESS_MIN_BYTES = 1024  # smaller responses are sent as they are, whatever Accept-Encoding says


class NotFound(ServiceError):
    status, code = 404, "not_found"


# ---- what each model takes and gives -------------------------------------------------------------------------


class TensorSpec(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: any size.")


class Param(BaseModel):
    kind: type  # bool, int, str (one of `choices`), or list: whole numbers, comma-separated in a string ("0,2")
    default: Any
    lo: int | None = None  # int and list items
    hi: int | None = None
    doc: str = ""
    choices: tuple[str, ...] = ()

    model_config = {"arbitrary_types_allowed": True}

    def describe(self) -> str:
        kind = {list: "string of comma-separated integers", str: "string"}.get(self.kind, self.kind.__name__)
        bounds = "" if self.lo is None else f" {self.lo}..{self.hi if self.hi is not None else ''}"
        if self.choices:
            bounds = f" {' | '.join(self.choices)}"
        default = "" if self.default is None else f", default {self.default!r}"
        return f"{kind}{bounds}{default}: {self.doc}"


def _p(kind: type, default: Any, lo: int | None = None, hi: int | None = None, doc: str = "",
       choices: tuple[str, ...] = ()) -> Param:
    return Param(kind=kind, default=default, lo=lo, hi=hi, doc=doc, choices=choices)


INTS = re.compile(r"-?[0-9]+(,-?[0-9]+)*")
MAX_INDICES = 16  # items in a list parameter, as /v1's attention_layers and attention_heads


class ModelSpec:
    """One model's v2 face: its Serve app, inputs, outputs, parameters, and which outputs need which graph."""

    def __init__(self, app: str, inputs: list[TensorSpec], outputs: list[TensorSpec], default: tuple[str, ...],
                 extra: Callable[[dict[str, Any]], list[str]], needs: dict[str, str], params: dict[str, Param],
                 docs: dict[str, str]) -> None:
        self.app, self.inputs, self.outputs, self.params, self.docs = app, inputs, outputs, params, docs
        # `extra(parameters)`: the outputs added to the default ones when no `outputs` are listed (what the
        # return_* flags ask for); `needs`: output -> the boolean parameter whose attention graph it needs (the
        # other outputs come free with every result).
        self.default, self.extra, self.needs = default, extra, needs
        self.output_names = [o.name for o in outputs]

    def wanted(self, req: codec.Request, p: dict[str, Any]) -> list[codec.RequestOutput]:
        """The outputs to return: the requested ones, else the default ones (+ the attention ones asked for)."""
        if req.outputs is None:
            names = list(dict.fromkeys([*self.default, *self.extra(p)]))
            return [codec.RequestOutput(name=n) for n in names]
        seen = set()
        for o in req.outputs:
            if o.name not in self.output_names:
                raise V2Error(f"unknown output {o.name!r}; this model's outputs are {', '.join(self.output_names)}")
            if o.name in seen:
                raise V2Error(f"output {o.name!r} is requested twice")
            seen.add(o.name)
            for k in o.parameters:
                if k not in ("binary_data", "classification"):
                    raise V2Error(f"output {o.name!r}: unknown parameter {k!r}; allowed: binary_data, classification")
        for name, flag in self.needs.items():
            if name in seen and p.get(flag) is False:
                raise V2Error(f"{flag} is false, but {name} is requested")
        return list(req.outputs)


def _translator_extra(p: dict[str, Any]) -> list[str]:
    out = ["SOURCE_TOKENS", "TARGET_TOKENS", "ALIGNMENT"] if p["return_attention"] else []
    return out + (["SOURCE_TOKENS", "ENCODER_ATTENTION"] if p["return_encoder_attention"] else [])


TRANSLATOR = ModelSpec(
    "translator",
    inputs=[TensorSpec(name="TEXT", datatype=BYTES, shape=[-1])],
    outputs=[TensorSpec(name="TRANSLATION", datatype=BYTES, shape=[-1]),
             TensorSpec(name="SOURCE_TOKENS", datatype=BYTES, shape=[-1, -1]),
             TensorSpec(name="TARGET_TOKENS", datatype=BYTES, shape=[-1, -1]),
             TensorSpec(name="ALIGNMENT", datatype="FP32", shape=[-1, -1, -1]),
             TensorSpec(name="ENCODER_ATTENTION", datatype="FP32", shape=[-1, -1, -1])],
    default=("TRANSLATION",), extra=_translator_extra,
    needs={"ALIGNMENT": "return_attention", "ENCODER_ATTENTION": "return_encoder_attention"},
    params={"beam_size": _p(int, 1, 1, 8, "1 = greedy decoding"),
            "max_new_tokens": _p(int, 128, 1, 256, "cap on generated target tokens per text"),
            "return_attention": _p(bool, None, doc="implied by requesting ALIGNMENT; true with no `outputs` "
                                   "adds SOURCE_TOKENS, TARGET_TOKENS and ALIGNMENT"),
            "attention_layers": _p(list, None, -16, 15, "ALIGNMENT: decoder layers averaged, e.g. \"0,2\" "
                                   "(negative counts from the last; duplicates merged); default the last"),
            "attention_heads": _p(list, None, 0, 15, "ALIGNMENT: heads averaged, e.g. \"1,3\"; default all"),
            "return_encoder_attention": _p(bool, None, doc="implied by requesting ENCODER_ATTENTION; true with no "
                                           "`outputs` adds SOURCE_TOKENS and ENCODER_ATTENTION"),
            "encoder_attention_layers": _p(list, None, -16, 15, "ENCODER_ATTENTION: encoder layers averaged, as "
                                           "attention_layers; default the last"),
            "encoder_attention_heads": _p(list, None, 0, 15, "ENCODER_ATTENTION: heads averaged; default all")},
    docs={
        "TEXT": "UTF-8 English texts, shape [n] or [n, 1].",
        "TRANSLATION": "UTF-8 Spanish translations, [n].",
        "SOURCE_TOKENS": "[n, S]: each text's source pieces (without EOS), padded with empty strings to the "
                         "longest S.",
        "TARGET_TOKENS": "[n, T]: each translation's pieces (without BOS/EOS), padded with empty strings.",
        "ALIGNMENT": "[n, T, S] decoder cross-attention (target x source), mean over the parameters "
                     "`attention_layers` and `attention_heads` (output parameters `layers` and `heads`); row t of "
                     "text i sums to 1 over its source tokens; zero where TARGET_TOKENS or SOURCE_TOKENS is "
                     "padding. Runs the decoder's attention graph.",
        "ENCODER_ATTENTION": "[n, S, S] encoder self-attention (source x source: row i is what source token i "
                             "attended to), mean over `encoder_attention_layers` and `encoder_attention_heads` "
                             "(output parameters `layers` and `heads`); EOS dropped, rows sum to 1; zero where "
                             "SOURCE_TOKENS is padding. Runs the encoder's attention graph.",
    })


def _classifier_maps(p: dict[str, Any]) -> list[str]:
    if not p["return_attention"]:
        return []
    return ["CLS_ATTENTION" if p["attention"] == "cls" else "ROLLOUT"]


CLASSIFIER = ModelSpec(
    "classifier",
    inputs=[TensorSpec(name="IMAGE", datatype="UINT8", shape=[-1, 28, 28]),
            TensorSpec(name="IMAGE_BYTES", datatype=BYTES, shape=[-1])],
    outputs=[TensorSpec(name="PROBABILITIES", datatype="FP32", shape=[-1, 10]),
             TensorSpec(name="LABEL", datatype=BYTES, shape=[-1]),
             TensorSpec(name="TOP_K_LABELS", datatype=BYTES, shape=[-1, -1]),
             TensorSpec(name="TOP_K_SCORES", datatype="FP32", shape=[-1, -1]),
             TensorSpec(name="ROLLOUT", datatype="FP32", shape=[-1, 7, 7]),
             TensorSpec(name="CLS_ATTENTION", datatype="FP32", shape=[-1, 7, 7])],
    default=("PROBABILITIES", "LABEL", "TOP_K_LABELS", "TOP_K_SCORES"), extra=_classifier_maps,
    needs={"ROLLOUT": "return_attention", "CLS_ATTENTION": "return_attention"},
    params={"top_k": _p(int, 3, 1, 10, "classes in TOP_K_LABELS and TOP_K_SCORES"),
            "return_attention": _p(bool, None, doc="implied by requesting ROLLOUT or CLS_ATTENTION; true with no "
                                   "`outputs` adds the map `attention` names"),
            "attention": _p(str, None, choices=("rollout", "cls"), doc="the map: ROLLOUT (rollout, the default) or "
                            "CLS_ATTENTION (cls); implied by requesting one of them (one map per request)"),
            "attention_layers": _p(list, None, -16, 15, "CLS_ATTENTION only: layers averaged, e.g. \"0,5\" "
                                   "(negative counts from the last; duplicates merged); default the last"),
            "attention_heads": _p(list, None, 0, 15, "CLS_ATTENTION only: heads averaged, e.g. \"0,2\"; "
                                  "default all")},
    docs={
        "IMAGE": "UINT8 grayscale pixels, [n, 28, 28] or [n, 28, 28, 1], Fashion-MNIST style (light object on "
                 "black).",
        "IMAGE_BYTES": "Encoded PNG or JPEG files, [n] or [n, 1], any size or mode (converted like /v1/classify). "
                       "With IMAGE too, the IMAGE rows come first, then these.",
        "PROBABILITIES": "[n, 10] class probabilities in label order (config parameter `labels`). Output "
                         "parameter `classification: k` returns BYTES [n, k] \"score:index:label\" instead.",
        "LABEL": "[n] the most likely label.",
        "TOP_K_LABELS": "[n, top_k] labels, most likely first.",
        "TOP_K_SCORES": "[n, top_k] their probabilities.",
        "ROLLOUT": "[n, 7, 7] attention rollout of CLS onto the patches over all layers (sums to 1; as /v1's "
                   "`attention: rollout`). Runs the rollout graph. Output parameters `method`, `layers`, `heads`.",
        "CLS_ATTENTION": "[n, 7, 7] the CLS token's attention over the patches, mean over the parameters "
                         "`attention_layers` and `attention_heads`, renormalised (sums to 1; as /v1's `attention: "
                         "cls`). Runs the CLS graph. Output parameters `method`, `layers`, `heads`. Not with ROLLOUT "
                         "in one request. All layers averaged (the default) and ROLLOUT beat random order at finding "
                         "the evidence; a single layer's map need not (layer 0 alone is worse than random; "
                         "docs/BENCHMARKS.md).",
    })
SPECS = {"translator": TRANSLATOR, "classifier": CLASSIFIER}
ALL_ON = {"return_attention": True, "return_encoder_attention": True}  # for the docs
# Request parameters every model takes (tritonclient sends these itself).
COMMON_PARAMS = {"binary_data_output": _p(bool, False, doc="every output as binary tensor data"),
                 "timeout": _p(int, None, 1, None, "microseconds; shortens (never extends) the deadline")}


# ---- the wire models of the GET routes (for the OpenAPI document) ---------------------------------------------


class V2ErrorResponse(BaseModel):
    error: str


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    parameters: dict[str, str] = Field(description="attnserve's addition: what each tensor and request parameter "
                                       "means (keys `input.<name>`, `output.<name>`, `parameter.<name>`).")


class RepositoryModel(BaseModel):
    name: str
    version: str | None = None
    state: str = Field(description="READY or UNAVAILABLE")
    reason: str = ""


ERRORS = {400: {"model": V2ErrorResponse, "description": "malformed request or over a limit"},
          404: {"model": V2ErrorResponse, "description": "unknown model, version or route"},
          503: {"model": V2ErrorResponse, "description": "model not ready, or its queue is full (Retry-After)"},
          401: {"model": V2ErrorResponse, "description": "no or an invalid `Authorization: Bearer` token; only when "
                "API tokens are configured, and not on the public paths",
                "headers": {"WWW-Authenticate": {"description": "Bearer realm=\"attnserve\"",
                                                 "schema": {"type": "string"}}}}}


# ---- routing, state, errors ----------------------------------------------------------------------------------


class State:
    """Filled in by `Api.__init__` (`configure`): model names -> Serve apps, limits, cached handles."""

    def __init__(self) -> None:
        self.models: dict[str, str] = {}
        self.max_body_bytes = 16_000_000
        self.handles: dict[str, Any] = {}
        self.max_batch = {"translator": 64, "classifier": 64}

    def handle(self, app: str) -> Any:
        if app not in self.handles:
            self.handles[app] = serve.get_app_handle(app)
        return self.handles[app]


state = State()


def install(app: FastAPI) -> None:
    """Register the v2 routes on the `api` app (before `@serve.ingress` wraps it)."""
    app.include_router(router)


def configure(args: AppArgs) -> frozenset[str]:
    """Set the model names and limits from the app args; returns the fixed v2 paths (metrics route tags)."""
    state.models = {args.translator.name: "translator", args.classifier.name: "classifier"}
    state.max_body_bytes = args.limits.max_body_bytes
    state.max_batch = {"translator": args.limits.max_texts, "classifier": args.limits.max_images}
    paths = {"/v2", "/v2/health/live", "/v2/health/ready", "/v2/repository/index"}
    for name in state.models:
        paths |= {f"/v2/models/{name}{s}" for s in ("", "/ready", "/config", "/infer")}
    return frozenset(paths)


def error_response(exc: BaseException) -> tuple[JSONResponse, str]:
    """An error in the protocol's form, and its code for the metrics: also what the middleware answers on v2
    paths (401, 413) before a route runs."""
    status, code, message, field, headers = describe(exc)
    if status == 422:  # the protocol answers every malformed or out-of-limit request with a 400
        status = 400
    if field and field not in ("body",) and not message.startswith(field):
        message = f"{field}: {message}"
    return JSONResponse({"error": message}, status, headers=headers), code


def protocol_error(request: Request, exc: BaseException) -> JSONResponse:
    response, code = error_response(exc)
    scope = request.scope.get("attnserve")
    if scope is not None:
        scope["code"] = code  # counted in attnserve_errors like every other error
    return response


class V2Route(APIRoute):
    """Every error of a v2 route in the protocol's form, `{"error": "..."}`."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as e:
                return protocol_error(request, e)

        return run


router = APIRouter(route_class=V2Route, tags=["Open Inference Protocol v2"])


def model_app(name: str) -> str:
    if name not in state.models:
        raise NotFound(f"unknown model {name!r}; served: {', '.join(state.models)}")
    return state.models[name]


async def call(app: str, method: str, *args: Any, timeout_s: float | None = None, **kw: Any) -> Any:
    """A method of a model deployment through its app handle; its ServiceErrors come back as themselves."""
    try:
        call = getattr(state.handle(app), method).remote(*args, **kw)
        if timeout_s is None:
            return await call
        async with asyncio.timeout(timeout_s):
            return await call
    except ServiceError:  # over gRPC (the throughput-optimised ingress) a replica's error arrives as itself
        raise
    except Exception as e:
        # Over Ray's actor calls it arrives wrapped (RayTaskError, which may also subclass the original): unwrap.
        cause = getattr(e, "cause", None)
        if isinstance(cause, ServiceError):
            raise cause from None
        if isinstance(e, TimeoutError):
            raise NotReady(f"the {app} app did not answer within {timeout_s} s") from None
        if cause is not None:  # the replica ran and failed: a bug, a 500 with a plain message
            raise
        raise NotReady(f"the {app} app is not available: {type(e).__name__}: {e}") from None


async def model_info(name: str, version: str | None) -> dict[str, Any]:
    app = model_app(name)
    info = await call(app, "info", timeout_s=PROBE_TIMEOUT_S)
    if version is not None and version != info["version"]:
        raise NotFound(f"model {name!r} has no version {version!r}; served: {info['version']!r}")
    return info


# ---- health and metadata -------------------------------------------------------------------------------------


@router.get("/v2", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(**SERVER)


@router.get("/v2/health/live", summary="The server is live (200)")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready", summary="Every model is ready (200, else 400)", responses=ERRORS)
async def ready() -> dict[str, bool]:
    try:
        await asyncio.gather(*(call(app, "ready", timeout_s=PROBE_TIMEOUT_S) for app in state.models.values()))
    except ServiceError as e:
        raise InvalidRequest(f"not ready: {e.message}") from None
    return {"ready": True}


async def _model_ready(name: str, version: str | None) -> dict[str, Any]:
    app = model_app(name)
    try:
        await model_info(name, version)
        await call(app, "ready", timeout_s=PROBE_TIMEOUT_S)
    except NotReady as e:
        raise InvalidRequest(f"model {name!r} is not ready: {e.message}") from None
    return {"name": name, "ready": True}


@router.get("/v2/models/{name}/ready", summary="The model is ready (200, else 400)", responses=ERRORS)
async def model_ready(name: str) -> dict[str, Any]:
    return await _model_ready(name, None)


@router.get("/v2/models/{name}/versions/{version}/ready", summary="The model version is ready", responses=ERRORS)
async def model_version_ready(name: str, version: str) -> dict[str, Any]:
    return await _model_ready(name, version)


def _metadata(name: str, info: dict[str, Any]) -> ModelMetadata:
    spec = SPECS[state.models[name]]
    docs = {f"{'input' if t.name in {i.name for i in spec.inputs} else 'output'}.{t.name}": spec.docs[t.name]
            for t in [*spec.inputs, *spec.outputs]}
    for k, p in {**spec.params, **COMMON_PARAMS}.items():
        docs[f"parameter.{k}"] = p.describe()
    extras = dict.fromkeys(n for method in ("rollout", "cls") for n in spec.extra({**ALL_ON, "attention": method}))
    flags = " / ".join(k for k in ("return_attention", "return_encoder_attention") if k in spec.params)
    docs["outputs.default"] = (f"without `outputs`: {', '.join(spec.default)}; {flags} true add (as each "
                               f"parameter says) {', '.join(extras)}")
    if info.get("labels"):
        docs["labels"] = ",".join(info["labels"])
    docs["device"] = info["device"]  # the replica's ONNX Runtime sessions' actual provider (cpu|cuda)
    return ModelMetadata(name=name, versions=[info["version"]], platform=PLATFORM, inputs=spec.inputs,
                         outputs=spec.outputs, parameters=docs)


@router.get("/v2/models/{name}", response_model=ModelMetadata, summary="Model metadata", responses=ERRORS)
async def model_metadata(name: str) -> ModelMetadata:
    return _metadata(name, await model_info(name, None))


@router.get("/v2/models/{name}/versions/{version}", response_model=ModelMetadata,
            summary="Model version metadata", responses=ERRORS)
async def model_version_metadata(name: str, version: str) -> ModelMetadata:
    return _metadata(name, await model_info(name, version))


TRITON_TYPES = {"BOOL": "TYPE_BOOL", "UINT8": "TYPE_UINT8", "FP32": "TYPE_FP32", BYTES: "TYPE_STRING"}


def _config(name: str, info: dict[str, Any]) -> dict[str, Any]:
    """Triton's model configuration (as `tritonclient.http.get_model_config` expects), from the metadata."""
    meta = _metadata(name, info)

    def tensors(ts: list[TensorSpec]) -> list[dict[str, Any]]:
        return [{"name": t.name, "data_type": TRITON_TYPES[t.datatype], "dims": t.shape[1:] or [1]} for t in ts]

    return {"name": name, "platform": PLATFORM, "backend": "attnserve",
            "max_batch_size": state.max_batch[state.models[name]],
            "version_policy": {"latest": {"num_versions": 1}},
            "input": tensors(meta.inputs), "output": tensors(meta.outputs),
            "parameters": {k: {"string_value": v} for k, v in meta.parameters.items()}}


@router.get("/v2/models/{name}/config", summary="Triton-style model configuration", responses=ERRORS)
async def model_config(name: str) -> dict[str, Any]:
    return _config(name, await model_info(name, None))


@router.get("/v2/models/{name}/versions/{version}/config", summary="Triton-style model configuration",
            responses=ERRORS)
async def model_version_config(name: str, version: str) -> dict[str, Any]:
    return _config(name, await model_info(name, version))


@router.post("/v2/repository/index", response_model=list[RepositoryModel],
             summary="Served models and their state (Triton model repository index)")
async def repository_index() -> list[RepositoryModel]:
    out = []
    for name in state.models:
        try:
            info = await model_info(name, None)
            out.append(RepositoryModel(name=name, version=info["version"], state="READY"))
        except ServiceError as e:
            out.append(RepositoryModel(name=name, state="UNAVAILABLE", reason=e.message))
    return out


# ---- inference -----------------------------------------------------------------------------------------------

def _inlined(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema with its `$defs` put in place (they would not resolve inside an OpenAPI document)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items()}
        return [walk(v) for v in node] if isinstance(node, list) else node

    return walk(schema)


INFER_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _inlined(codec.InferenceRequest)},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary", "description": (
        "Binary tensor data extension: the JSON InferenceRequest (Inference-Header-Content-Length bytes), then "
        "each binary input's raw bytes in input order (little-endian; BYTES elements as a 4-byte little-endian "
        "length and the bytes).")}}}},
    "parameters": [
        {"name": "Inference-Header-Content-Length", "in": "header", "required": False, "schema": {
            "type": "integer", "minimum": 0}, "description": "Length of the JSON header when binary data follows."},
        {"name": "Content-Encoding", "in": "header", "required": False,
         "schema": {"type": "string", "enum": ["gzip", "deflate"]}},
        {"name": "X-Timeout-Ms", "in": "header", "required": False, "schema": {"type": "number", "exclusiveMinimum": 0},
         "description": "Shortens (never extends) the model's deadline, like the `timeout` parameter."}]}
INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The outputs; with binary outputs, the JSON header (Inference-Header-Content-Length "
                         "bytes) and then their bytes.",
          "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
          "headers": {"Inference-Header-Content-Length": {"schema": {"type": "integer"},
                                                          "description": "present when binary outputs follow"}}},
    **ERRORS,
    413: {"model": V2ErrorResponse, "description": "body over the cap"},
    504: {"model": V2ErrorResponse, "description": "no result within the deadline"},
}


def parameters(spec: ModelSpec, given: dict[str, Any]) -> dict[str, Any]:
    allowed = {**spec.params, **COMMON_PARAMS}
    out = {}
    for k, v in given.items():
        p = allowed.get(k)
        if p is None:
            raise V2Error(f"unknown parameter {k!r}; this model takes {', '.join(allowed)}")
        out[k] = _parameter(k, p, v)
    return {k: out.get(k, p.default) for k, p in allowed.items()}


def _parameter(k: str, p: Param, v: Any) -> Any:
    """One request parameter checked against its Param (V2Error saying what is allowed)."""
    hi = "" if p.hi is None else str(p.hi)

    def in_range(x: int) -> bool:
        return (p.lo is None or x >= p.lo) and (p.hi is None or x <= p.hi)

    if p.kind is bool:
        if isinstance(v, bool):
            return v
        want = "true or false"
    elif p.kind is str:
        if isinstance(v, str) and (not p.choices or v in p.choices):
            return v
        want = " or ".join(repr(c) for c in p.choices) if p.choices else "a string"
    elif p.kind is list:
        if isinstance(v, int) and not isinstance(v, bool):
            v = str(v)
        if isinstance(v, str) and INTS.fullmatch(v):
            items = [int(x) for x in v.split(",")]
            if len(items) <= MAX_INDICES and all(in_range(x) for x in items):
                return items
        want = f"comma-separated integers in {p.lo}..{hi} (at most {MAX_INDICES}), e.g. \"0,2\""
    else:
        if isinstance(v, int) and not isinstance(v, bool) and in_range(v):
            return v
        want = f"an integer in {p.lo}..{hi}"
    raise V2Error(f"parameter {k!r} must be {want}, got {v!r}")


def client_timeout_s(request: Request, timeout_us: int | None) -> float | None:
    """The deadline the client asks for (X-Timeout-Ms or the `timeout` parameter); the model caps it."""
    out = None if timeout_us is None else timeout_us / 1e6
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is not None:
        try:
            ms = float(raw)
        except ValueError:
            ms = math.nan
        if not (math.isfinite(ms) and ms > 0):
            raise V2Error(f"{TIMEOUT_HEADER} must be a positive, finite number of milliseconds, got {raw!r}")
        out = ms / 1000 if out is None else min(out, ms / 1000)
    return out


def decoded_body(request: Request, body: bytes) -> bytes:
    enc = request.headers.get("content-encoding", "identity").strip().lower()
    if enc in ("", "identity"):
        return body
    if enc not in ("gzip", "deflate"):
        raise V2Error(f"Content-Encoding {enc!r} is not supported; use gzip, deflate or none")
    d = zlib.decompressobj(wbits=31 if enc == "gzip" else 15)
    try:
        out = d.decompress(body, state.max_body_bytes + 1)
    except zlib.error as e:
        raise V2Error(f"the body is not valid {enc} data: {e}") from None
    if len(out) > state.max_body_bytes or d.unconsumed_tail:
        raise LimitExceeded(f"the decompressed body is over the limit of {state.max_body_bytes} bytes")
    return out


def encoded(request: Request, body: bytes, headers: dict[str, str]) -> bytes:
    accept = request.headers.get("accept-encoding", "").lower()
    if len(body) < COMPRESS_MIN_BYTES:
        return body
    if "gzip" in accept:
        headers["Content-Encoding"] = "gzip"
        return gzip.compress(body, compresslevel=1)
    if "deflate" in accept:
        headers["Content-Encoding"] = "deflate"
        return zlib.compress(body, 1)
    return body


async def _infer(request: Request, name: str, version: str | None) -> Response:
    app = model_app(name)
    spec = SPECS[app]
    body = decoded_body(request, await request.body())
    req = codec.parse_request(body, request.headers.get(codec.HEADER))
    p = parameters(spec, req.parameters)
    wanted = spec.wanted(req, p)
    names = {o.name for o in wanted}
    attention = any(spec.needs.get(n) == "return_attention" for n in names)
    timeout_s = client_timeout_s(request, p["timeout"])
    unknown = set(req.inputs) - {t.name for t in spec.inputs}
    if unknown:
        raise V2Error(f"unknown input {sorted(unknown)[0]!r}; this model's inputs are "
                      f"{', '.join(t.name for t in spec.inputs)}")
    if version is not None:
        await model_info(name, version)  # 404 for a version not served, before any model work
    if app == "translator":
        encoder = any(spec.needs.get(n) == "return_encoder_attention" for n in names)
        choices = {k: p[k] for k in ("attention_layers", "attention_heads", "encoder_attention_layers",
                                     "encoder_attention_heads")}
        out = await call(app, "infer_texts", _texts(req), p["beam_size"], p["max_new_tokens"], attention, timeout_s,
                         return_encoder_attention=encoder, **choices)
        tensors, params = _translator_outputs(out["translations"]), _attention_params(out["translations"])
    else:
        images, encoded_images = _images(req)
        method = _classifier_method(names, p)
        out = await call(app, "infer_images", images, encoded_images, attention, timeout_s, method,
                         p["attention_layers"], p["attention_heads"])
        tensors, params = _classifier_outputs(out, p["top_k"]), _map_params(out)
    outputs = []
    for o in wanted:
        binary = o.parameters.get("binary_data", p["binary_data_output"])
        k = o.parameters.get("classification")
        data, datatype = tensors[o.name]
        if k is not None:
            data, datatype = _classification(o.name, k, tensors, out.get("labels"))
        outputs.append(Output(o.name, datatype, data, bool(binary), params.get(o.name, {})))
    payload, header_length = codec.encode_response(name, out["version"], req.id, outputs)
    headers = {} if header_length is None else {"Inference-Header-Content-Length": str(header_length)}
    payload = encoded(request, payload, headers)
    media = "application/json" if header_length is None else "application/octet-stream"
    return Response(payload, 200, headers=headers, media_type=media)


def _texts(req: codec.Request) -> list[str]:
    arr = req.inputs.get("TEXT")
    if arr is None:
        raise V2Error("missing input 'TEXT' (BYTES, shape [n] or [n, 1])")
    if req.datatypes["TEXT"] != BYTES:
        raise V2Error(f"input 'TEXT' must be BYTES, got {req.datatypes['TEXT']}")
    if not (arr.ndim == 1 or (arr.ndim == 2 and arr.shape[1] == 1)) or arr.shape[0] < 1:
        raise V2Error(f"input 'TEXT' must have shape [n] or [n, 1] with n >= 1, got {list(arr.shape)}")
    texts = []
    for i, raw in enumerate(arr.reshape(-1)):
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise V2Error(f"TEXT[{i}] is not valid UTF-8 (bad byte at offset {e.start})") from None
    return texts


def _images(req: codec.Request) -> tuple[np.ndarray | None, list[bytes]]:
    images = req.inputs.get("IMAGE")
    encoded_images = req.inputs.get("IMAGE_BYTES")
    if images is None and encoded_images is None:
        raise V2Error("missing input: IMAGE (UINT8 [n, 28, 28]) and/or IMAGE_BYTES (BYTES [n], PNG or JPEG)")
    if images is not None:
        dt, shape = req.datatypes["IMAGE"], list(images.shape)
        if dt != "UINT8":
            raise V2Error(f"input 'IMAGE' must be UINT8, got {dt}")
        if not (shape[1:] == [28, 28] or shape[1:] == [28, 28, 1]) or shape[0] < 1:
            raise V2Error(f"input 'IMAGE' must have shape [n, 28, 28] or [n, 28, 28, 1] with n >= 1, got {shape}")
        images = np.ascontiguousarray(images.reshape(-1, 28, 28), dtype=np.uint8)
    raws: list[bytes] = []
    if encoded_images is not None:
        dt, shape = req.datatypes["IMAGE_BYTES"], list(encoded_images.shape)
        if dt != BYTES:
            raise V2Error(f"input 'IMAGE_BYTES' must be BYTES, got {dt}")
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
            raise V2Error(f"input 'IMAGE_BYTES' must have shape [n] or [n, 1] with n >= 1, got {shape}")
        raws = list(encoded_images.reshape(-1))
    return images, raws


def _pad_tokens(rows: list[list[str]]) -> np.ndarray:
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), b"", dtype=object)
    for i, r in enumerate(rows):
        out[i, : len(r)] = [t.encode("utf-8") for t in r]
    return out


def _translator_outputs(results: list[dict[str, Any]]) -> dict[str, tuple[np.ndarray, str]]:
    src = _pad_tokens([r["source_tokens"] for r in results])
    tgt = _pad_tokens([r["target_tokens"] for r in results])
    align = np.zeros((len(results), tgt.shape[1], src.shape[1]), np.float32)
    encoder = np.zeros((len(results), src.shape[1], src.shape[1]), np.float32)
    for i, r in enumerate(results):
        for key, out in (("attention", align), ("encoder_attention", encoder)):
            a = r.get(key)
            if a is not None:
                out[i, : a.shape[0], : a.shape[1]] = a
    texts = np.empty(len(results), dtype=object)
    texts[:] = [r["text"].encode("utf-8") for r in results]
    return {"TRANSLATION": (texts, BYTES), "SOURCE_TOKENS": (src, BYTES), "TARGET_TOKENS": (tgt, BYTES),
            "ALIGNMENT": (align, "FP32"), "ENCODER_ATTENTION": (encoder, "FP32")}


def _attention_params(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Output parameters `layers` and `heads` (the same for every text of a request)."""
    out = {}
    r = results[0] if results else None
    if r is not None and any(x.get("attention") is not None for x in results):
        out["ALIGNMENT"] = {"layers": _indices(r["layers"]), "heads": _indices(r["heads"])}
    if r is not None and any(x.get("encoder_attention") is not None for x in results):
        out["ENCODER_ATTENTION"] = {"layers": _indices(r["encoder_layers"]), "heads": _indices(r["encoder_heads"])}
    return out


def _classifier_method(names: set[str], p: dict[str, Any]) -> str:
    """The map a classifier request asks for: from its requested output, else the `attention` parameter."""
    asked = [n for n in ("ROLLOUT", "CLS_ATTENTION") if n in names]
    if len(asked) == 2:
        raise V2Error("one attention map per request: ROLLOUT or CLS_ATTENTION")
    method = {"ROLLOUT": "rollout", "CLS_ATTENTION": "cls"}[asked[0]] if asked else (p["attention"] or "rollout")
    if p["attention"] is not None and p["attention"] != method:
        raise V2Error(f"parameter 'attention' is {p['attention']!r}, but {asked[0]} is requested")
    return method


def _indices(xs: list[int]) -> str:
    return ",".join(str(x) for x in xs)


def _map_params(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    if out.get("attention") is None:
        return {}
    name = "CLS_ATTENTION" if out["method"] == "cls" else "ROLLOUT"
    return {name: {"method": out["method"], "layers": _indices(out["layers"]), "heads": _indices(out["heads"])}}


def _classifier_outputs(out: dict[str, Any], top_k: int) -> dict[str, tuple[np.ndarray, str]]:
    probs, labels = np.asarray(out["probs"], np.float32), out["labels"]
    order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    names = np.empty(order.shape, dtype=object)
    names[...] = [[labels[j].encode("utf-8") for j in row] for row in order]
    best = np.empty(len(probs), dtype=object)
    best[:] = [labels[int(row[0])].encode("utf-8") for row in order]
    maps = out.get("attention")
    maps = np.zeros((len(probs), 7, 7), np.float32) if maps is None else np.asarray(maps, np.float32)
    return {"PROBABILITIES": (probs, "FP32"), "LABEL": (best, BYTES), "TOP_K_LABELS": (names, BYTES),
            "TOP_K_SCORES": (np.take_along_axis(probs, order, axis=1), "FP32"), "ROLLOUT": (maps, "FP32"),
            "CLS_ATTENTION": (maps, "FP32")}


def _classification(name: str, k: Any, tensors: dict[str, tuple[np.ndarray, str]],
                    labels: list[str] | None) -> tuple[np.ndarray, str]:
    """Triton's classification extension: the top k of a probability output as BYTES "score:index:label"."""
    if labels is None or name != "PROBABILITIES":
        raise V2Error(f"output {name!r} does not support the classification parameter (only PROBABILITIES does)")
    probs = tensors[name][0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= probs.shape[1]:
        raise V2Error(f"output {name!r}: classification must be an integer in 1..{probs.shape[1]}, got {k!r}")
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    out = np.empty(order.shape, dtype=object)
    out[...] = [[f"{probs[i, j]:f}:{j}:{labels[j]}".encode() for j in row] for i, row in enumerate(order)]
    return out, BYTES


@router.post("/v2/models/{name}/infer", summary="Inference (JSON or binary tensor data)",
             openapi_extra=INFER_BODY, responses=INFER_RESPONSES, response_model=codec.InferenceResponse)
async def infer(name: str, request: Request) -> Response:
    return await _infer(request, name, None)


@router.post("/v2/models/{name}/versions/{version}/infer", summary="Inference on a model version",
             openapi_extra=INFER_BODY, responses=INFER_RESPONSES, response_model=codec.InferenceResponse)
async def infer_version(name: str, version: str, request: Request) -> Response:
    return await _infer(request, name, version)


@router.api_route("/v2/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
async def not_found(rest: str, request: Request) -> Response:
    raise NotFound(f"no v2 route {request.method} /v2/{rest} (see GET /openapi.json for the served ones)")
