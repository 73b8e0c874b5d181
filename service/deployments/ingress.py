"""The `api` app at "/": /v1/models, /healthz, /readyz, the v2 protocol's routes, the demo and the OpenAPI docs.

It is off the hot path: /v1/translate and /v1/classify go straight from Serve's proxy to the model
deployments (their own ingresses). It reaches them through deployment handles for readiness, model info and
v2 inference. Its FastAPI app is built per replica from the args (`__serve_build_asgi_app__`), no module state.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve

from service.config import CLASSIFIER_APP, MODEL_APPS, PROBE_TIMEOUT_S, TRANSLATOR_APP, AppArgs
from service.errors import NotReady
from service.protocols import demo
from service.protocols.asgi import RouteSettings, document_auth, make_api
from service.protocols.v1 import bounds
from service.protocols.v1 import classify as v1_classify
from service.protocols.v1 import translate as v1_translate
from service.protocols.v1.schemas import ErrorResponse, Health, LimitsInfo, ModelInfo, ModelsResponse
from service.protocols.v2.routes import V2Config, build_router, error_response
from service.protocols.v2.specs import ModelSpec, classifier_spec, translator_spec
from service.runtime import Manifest, find_artifact, load_manifest

PATHS = frozenset({"/", "/healthz", "/readyz", "/v1/models", "/docs", "/openapi.json"})


def load_manifests(args: AppArgs) -> dict[str, Manifest]:
    """Each model app's manifest (the version it serves): the facts the protocols publish (shapes, ranges)."""
    root = args.resolved_root()
    return {app: load_manifest(find_artifact(root, cfg.name, cfg.version), verify=False)
            for app, cfg in ((TRANSLATOR_APP, args.translator), (CLASSIFIER_APP, args.classifier))}


def v2_specs(args: AppArgs, manifests: dict[str, Manifest]) -> dict[str, ModelSpec]:
    """The v2 face of each model, by the model name in v2 URLs."""
    return {args.translator.name: translator_spec(manifests[TRANSLATOR_APP]),
            args.classifier.name: classifier_spec(manifests[CLASSIFIER_APP])}


def merged_openapi(args: AppArgs, api: FastAPI, manifests: dict[str, Manifest] | None = None) -> dict[str, Any]:
    """One OpenAPI document: the `api` app's routes plus the model apps' routes under their prefixes."""
    doc = FastAPI.openapi(api)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    model_apis = {v1_translate.ROUTE: v1_translate.build_api(None, RouteSettings(v1_translate.ROUTE)),
                  v1_classify.ROUTE: v1_classify.build_api(None, RouteSettings(
                      v1_classify.ROUTE, media_types=v1_classify.MEDIA_TYPES), args.limits)}
    for route, sub_api in model_apis.items():
        sub = sub_api.openapi()
        for path, ops in sub.get("paths", {}).items():
            doc["paths"][route + path.rstrip("/")] = ops
        schemas.update(sub.get("components", {}).get("schemas", {}))
    schemas["ErrorResponse"] = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, sub_schema in schemas["ErrorResponse"].pop("$defs", {}).items():
        schemas[name] = sub_schema
    manifests = manifests or {}
    doc = bounds.publish(doc, args.limits, manifests.get(TRANSLATOR_APP), manifests.get(CLASSIFIER_APP))
    settings = RouteSettings.for_app("/", "api", args)
    return document_auth(doc, settings) if settings.tokens else doc


def build_api(replica: Api | None, args: AppArgs, v2: V2Config,
              manifests: dict[str, Manifest] | None = None) -> FastAPI:
    """The `api` app of one replica (`replica` None: only for its OpenAPI document)."""
    settings = RouteSettings.for_app("/", "api", args, paths=PATHS | v2.paths(), media_types=(),
                                     error_forms={"/v2": error_response})  # v2 paths answer in the v2 form
    api = make_api("attnserve", settings)  # /docs and /openapi.json are explicit routes below
    api.description = "Transformer translation (en->es) and ViT classification, with attention on request."
    api.include_router(build_router(v2))  # the Open Inference Protocol v2 routes under /v2
    demo.install(api)  # GET / (the web demo) and /static/... (its files, Swagger UI's): service/protocols/demo.py
    merged: dict[str, Any] = {}

    @api.get("/healthz", response_model=Health, summary="The API process is alive")
    async def healthz() -> Health:
        return Health(status="ok")

    @api.get("/readyz", response_model=Health, responses={503: {"model": ErrorResponse}},
             summary="Both models are loaded and warmed up")
    async def readyz() -> Health:
        assert replica is not None
        await replica.call_all("ready")
        return Health(status="ready")

    @api.get("/v1/models", response_model=ModelsResponse, responses={503: {"model": ErrorResponse}},
             summary="Served models, versions, labels and request limits")
    async def models() -> ModelsResponse:
        assert replica is not None
        infos = await replica.call_all("info")
        return ModelsResponse(models=[ModelInfo(**i) for i in infos], limits=LimitsInfo(**args.limits.model_dump()))

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        if not merged:
            merged.update(merged_openapi(args, api, manifests))
        return JSONResponse(merged)

    @api.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return demo.docs_page()  # Swagger UI from local files: no CDN

    return api


@serve.deployment(name="Api", max_ongoing_requests=100, ray_actor_options={"num_cpus": 0.1})
@serve.ingress()
class Api:
    def __init__(self, args: dict[str, Any]) -> None:
        self.args = AppArgs.model_validate(args)
        self.manifests = load_manifests(self.args)
        self.v2 = V2Config.from_args(self.args, v2_specs(self.args, self.manifests))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self, self.args, self.v2, self.manifests)

    async def call_all(self, method: str) -> list[Any]:
        try:
            calls = [getattr(self.v2.handle(name), method).remote() for name in MODEL_APPS]
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                return list(await asyncio.gather(*calls))
        except Exception as e:  # not deployed yet, starting, or unhealthy: all mean "not ready"
            raise NotReady(f"model apps not ready: {type(e).__name__}: {e}") from None

