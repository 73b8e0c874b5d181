"""Open Inference Protocol v2 (KServe/Triton REST) routes on the `api` app, beside the /v1 routes.

Decode the v2 request (codec.py, then tensors.py into a `TranslateJob` or `ClassifyJob`) -> the model
deployment's `infer` through its app handle (the same method /v1 calls: the same limits, admission gate,
deadline, engine or batch and metrics) -> encode the requested outputs, as JSON or binary tensor data. Errors
leave in the protocol's form, `{"error": "<message>"}`, with a 4xx status for anything the client sent (400 for a
malformed or out-of-limit request, 404 for an unknown model, version or route, 405 with Allow for a method a
route does not serve) and 503/504 for overload and deadlines.

This adds one hop to v1's path (proxy -> api -> model replica): /v1 stays the fastest route.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from ray import serve

from service.config import CLASSIFIER_APP, PROBE_TIMEOUT_S, TRANSLATOR_APP, AppArgs
from service.errors import InvalidRequest, NotFound, NotReady, ServiceError, describe
from service.protocols.asgi import client_timeout_s
from service.protocols.v2 import codec, tensors
from service.protocols.v2.codec import Output, V2Error
from service.protocols.v2.compression import compressed, decompressed
from service.protocols.v2.models import (
    ERRORS,
    INFER_BODY,
    INFER_RESPONSES,
    ModelMetadata,
    RepositoryModel,
    ServerMetadata,
)
from service.protocols.v2.params import parameters
from service.protocols.v2.specs import ModelSpec, TensorSpec

SERVER = {"name": "attnserve", "version": "0.1.0", "extensions": ["binary_tensor_data", "classification"]}
PLATFORM = "onnxruntime_onnx"
TRITON_TYPES = {"BOOL": "TYPE_BOOL", "UINT8": "TYPE_UINT8", "FP32": "TYPE_FP32", codec.BYTES: "TYPE_STRING"}


@dataclass
class V2Config:
    """What the v2 routes serve, built by the `api` deployment from its args and the models' manifests."""

    specs: dict[str, ModelSpec]  # model name (as in URLs) -> its spec; spec.app is its Serve app
    max_body_bytes: int
    max_batch: dict[str, int]  # Serve app -> items per request (Triton config's max_batch_size)
    handles: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_args(cls, args: AppArgs, specs: dict[str, ModelSpec]) -> V2Config:
        return cls(specs, args.limits.max_body_bytes, {TRANSLATOR_APP: args.limits.max_texts,
                                                       CLASSIFIER_APP: args.limits.max_images})

    def paths(self) -> frozenset[str]:
        """The fixed v2 paths (route tags of the metrics)."""
        out = {"/v2", "/v2/health/live", "/v2/health/ready", "/v2/repository/index"}
        for name in self.specs:
            out |= {f"/v2/models/{name}{s}" for s in ("", "/ready", "/config", "/infer")}
        return frozenset(out)

    def spec(self, name: str) -> ModelSpec:
        if name not in self.specs:
            raise NotFound(f"unknown model {name!r}; served: {', '.join(self.specs)}")
        return self.specs[name]

    def handle(self, app: str) -> Any:
        if app not in self.handles:
            self.handles[app] = serve.get_app_handle(app)
        return self.handles[app]

    async def call(self, app: str, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        """A method of a model deployment through its app handle; its ServiceErrors come back as themselves."""
        try:
            call = getattr(self.handle(app), method).remote(*args)
            if timeout_s is None:
                return await call
            async with asyncio.timeout(timeout_s):
                return await call
        except ServiceError:  # over gRPC (the throughput-optimised ingress) a replica's error arrives as itself
            raise
        except Exception as e:
            # Over Ray's actor calls it arrives wrapped (RayTaskError, which may also subclass the original).
            cause = getattr(e, "cause", None)
            if isinstance(cause, ServiceError):
                raise cause from None
            if isinstance(e, TimeoutError):
                raise NotReady(f"the {app} app did not answer within {timeout_s} s") from None
            if cause is not None:  # the replica ran and failed: a bug, a 500 with a plain message
                raise
            raise NotReady(f"the {app} app is not available: {type(e).__name__}: {e}") from None

    async def info(self, name: str, version: str | None) -> dict[str, Any]:
        info = await self.call(self.spec(name).app, "info", timeout_s=PROBE_TIMEOUT_S)
        if version is not None and version != info["version"]:
            raise NotFound(f"model {name!r} has no version {version!r}; served: {info['version']!r}")
        return info


def error_response(exc: BaseException) -> tuple[JSONResponse, str]:
    """An error in the protocol's form, and its code for the metrics: also what the middleware and the router
    answer on v2 paths (401, 404, 405, 413) before a route runs."""
    status, code, message, field_, headers = describe(exc)
    if status == 422:  # the protocol answers every malformed or out-of-limit request with a 400
        status = 400
    if field_ and field_ not in ("body",) and not message.startswith(field_):
        message = f"{field_}: {message}"
    return JSONResponse({"error": message}, status, headers=headers), code


class V2Route(APIRoute):
    """Every error of a v2 route in the protocol's form, `{"error": "..."}`."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as e:
                response, code = error_response(e)
                scope = request.scope.get("attnserve")
                if scope is not None:
                    scope["code"] = code  # counted in attnserve_errors like every other error
                return response

        return run


def metadata(cfg: V2Config, name: str, info: dict[str, Any]) -> ModelMetadata:
    spec = cfg.spec(name)
    docs = spec.describe(info.get("labels"))
    docs["device"] = info["device"]  # the replica's ONNX Runtime sessions' actual provider (cpu|cuda)
    return ModelMetadata(name=name, versions=[info["version"]], platform=PLATFORM, inputs=spec.inputs,
                         outputs=spec.outputs, parameters=docs)


def triton_config(cfg: V2Config, name: str, info: dict[str, Any]) -> dict[str, Any]:
    """Triton's model configuration (as `tritonclient.http.get_model_config` expects), from the metadata."""
    meta = metadata(cfg, name, info)

    def listed(ts: list[TensorSpec]) -> list[dict[str, Any]]:
        return [{"name": t.name, "data_type": TRITON_TYPES[t.datatype], "dims": t.shape[1:] or [1]} for t in ts]

    return {"name": name, "platform": PLATFORM, "backend": "attnserve",
            "max_batch_size": cfg.max_batch[cfg.spec(name).app], "version_policy": {"latest": {"num_versions": 1}},
            "input": listed(meta.inputs), "output": listed(meta.outputs),
            "parameters": {k: {"string_value": v} for k, v in meta.parameters.items()}}


async def infer(cfg: V2Config, request: Request, name: str, version: str | None) -> Response:
    spec = cfg.spec(name)
    body = decompressed(await request.body(), request.headers.get("content-encoding"), cfg.max_body_bytes)
    req = codec.parse_request(body, request.headers.get(codec.HEADER))
    if req.model_name is not None and req.model_name != name:
        raise V2Error(f"model_name {req.model_name!r} in the body is not the model of the path, {name!r}")
    version = version if version is not None else req.model_version
    if req.model_version is not None and req.model_version != version:
        raise V2Error(f"model_version {req.model_version!r} in the body is not the version of the path, {version!r}")
    p = parameters(spec, req.parameters)
    wanted = spec.wanted(req, p)
    names = {o.name for o in wanted}
    asked = client_timeout_s(request.headers)
    timeout_s = None if p["timeout"] is None else p["timeout"] / 1e6
    timeout_s = asked if timeout_s is None else (timeout_s if asked is None else min(asked, timeout_s))
    unknown = set(req.inputs) - {t.name for t in spec.inputs}
    if unknown:
        raise V2Error(f"unknown input {sorted(unknown)[0]!r}; this model's inputs are "
                      f"{', '.join(t.name for t in spec.inputs)}")
    if version is not None:
        await cfg.info(name, version)  # 404 for a version not served, before any model work
    if spec.app == TRANSLATOR_APP:
        res = await cfg.call(spec.app, "infer", tensors.translate_job(req, p, names, spec, timeout_s))
        outs, params = tensors.translate_outputs(res)
        labels = None
    else:
        res = await cfg.call(spec.app, "infer", tensors.classify_job(req, p, names, spec, timeout_s))
        outs, params = tensors.classify_outputs(res, p["top_k"], spec)
        labels = res.labels
    outputs = []
    for o in wanted:
        binary = o.parameters.get("binary_data", p["binary_data_output"])
        k = o.parameters.get("classification")
        data, datatype = outs[o.name]
        if k is not None:
            data, datatype = tensors.classification(o.name, k, outs, labels)
        outputs.append(Output(o.name, datatype, data, bool(binary), params.get(o.name, {})))
    payload, header_length = codec.encode_response(name, res.version, req.id, outputs)
    headers = {} if header_length is None else {"Inference-Header-Content-Length": str(header_length)}
    payload = compressed(payload, request.headers.get("accept-encoding"), headers)
    media = "application/json" if header_length is None else "application/octet-stream"
    return Response(payload, 200, headers=headers, media_type=media)


def build_router(cfg: V2Config) -> APIRouter:
    """The v2 routes over `cfg` (no module state: each `api` replica builds its own)."""
    router = APIRouter(route_class=V2Route, tags=["Open Inference Protocol v2"])

    @router.get("/v2", response_model=ServerMetadata, summary="Server metadata")
    async def server_metadata() -> ServerMetadata:
        return ServerMetadata(**SERVER)

    @router.get("/v2/health/live", summary="The server is live (200)")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @router.get("/v2/health/ready", summary="Every model is ready (200, else 400)", responses=ERRORS)
    async def ready() -> dict[str, bool]:
        try:
            await asyncio.gather(*(cfg.call(s.app, "ready", timeout_s=PROBE_TIMEOUT_S) for s in cfg.specs.values()))
        except ServiceError as e:
            raise InvalidRequest(f"not ready: {e.message}") from None
        return {"ready": True}

    async def model_ready(name: str, version: str | None) -> dict[str, Any]:
        spec = cfg.spec(name)
        try:
            await cfg.info(name, version)
            await cfg.call(spec.app, "ready", timeout_s=PROBE_TIMEOUT_S)
        except NotReady as e:
            raise InvalidRequest(f"model {name!r} is not ready: {e.message}") from None
        return {"name": name, "ready": True}

    @router.get("/v2/models/{name}/ready", summary="The model is ready (200, else 400)", responses=ERRORS)
    async def ready_model(name: str) -> dict[str, Any]:
        return await model_ready(name, None)

    @router.get("/v2/models/{name}/versions/{version}/ready", summary="The model version is ready", responses=ERRORS)
    async def ready_version(name: str, version: str) -> dict[str, Any]:
        return await model_ready(name, version)

    @router.get("/v2/models/{name}", response_model=ModelMetadata, summary="Model metadata", responses=ERRORS)
    async def model_metadata(name: str) -> ModelMetadata:
        return metadata(cfg, name, await cfg.info(name, None))

    @router.get("/v2/models/{name}/versions/{version}", response_model=ModelMetadata,
                summary="Model version metadata", responses=ERRORS)
    async def version_metadata(name: str, version: str) -> ModelMetadata:
        return metadata(cfg, name, await cfg.info(name, version))

    @router.get("/v2/models/{name}/config", summary="Triton-style model configuration", responses=ERRORS)
    async def model_config(name: str) -> dict[str, Any]:
        return triton_config(cfg, name, await cfg.info(name, None))

    @router.get("/v2/models/{name}/versions/{version}/config", summary="Triton-style model configuration",
                responses=ERRORS)
    async def version_config(name: str, version: str) -> dict[str, Any]:
        return triton_config(cfg, name, await cfg.info(name, version))

    @router.post("/v2/repository/index", response_model=list[RepositoryModel],
                 summary="Served models and their state (Triton model repository index)")
    async def repository_index() -> list[RepositoryModel]:
        out = []
        for name in cfg.specs:
            try:
                info = await cfg.info(name, None)
                out.append(RepositoryModel(name=name, version=info["version"], state="READY"))
            except ServiceError as e:
                out.append(RepositoryModel(name=name, state="UNAVAILABLE", reason=e.message))
        return out

    @router.post("/v2/models/{name}/infer", summary="Inference (JSON or binary tensor data)",
                 openapi_extra=INFER_BODY, responses=INFER_RESPONSES, response_model=codec.InferenceResponse)
    async def infer_model(name: str, request: Request) -> Response:
        return await infer(cfg, request, name, None)

    @router.post("/v2/models/{name}/versions/{version}/infer", summary="Inference on a model version",
                 openapi_extra=INFER_BODY, responses=INFER_RESPONSES, response_model=codec.InferenceResponse)
    async def infer_version(name: str, version: str, request: Request) -> Response:
        return await infer(cfg, request, name, version)

    return router
