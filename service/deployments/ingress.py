"""The `api` app at "/": /v1/models, /healthz, /readyz and the OpenAPI docs for every route.

It is off the hot path: /v1/translate and /v1/classify go straight from Serve's proxy to the model
deployments (their own ingresses). It reaches them through deployment handles for readiness and model info.
"""

import asyncio
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve

from service.config import AppArgs
from service.deployments import classifier, translator
from service.errors import NotReady
from service.protocols import demo
from service.protocols.asgi import RouteSettings, make_api
from service.protocols.v1.schemas import ErrorResponse, Health, LimitsInfo, ModelInfo, ModelsResponse
from service.protocols.v2.routes import configure as configure_v2
from service.protocols.v2.routes import error_response as v2_error_response
from service.protocols.v2.routes import install as install_v2

# The Serve application names of the model apps, as in deploy/serve_config.yaml.
MODEL_APPS = {"translator": translator, "classifier": classifier}
PROBE_TIMEOUT_S = 2.0
route = RouteSettings("/", paths=frozenset({"/", "/healthz", "/readyz", "/v1/models", "/docs", "/openapi.json"}),
                      media_types=())  # GET only: a POST is a 405 from the router
api = make_api("attnserve", route)  # /docs and /openapi.json are explicit routes below
api.description = "Transformer translation (en->es) and ViT classification, with attention on request."
install_v2(api)  # the Open Inference Protocol v2 routes under /v2: service/protocols/v2/routes.py
demo.install(api)  # GET / (the web demo) and /static/... (its files, Swagger UI's): service/protocols/demo.py


def merged_openapi() -> dict[str, Any]:
    """One OpenAPI document: this app's routes plus the model apps' routes under their prefixes."""
    if _merged:
        return _merged
    api.openapi_schema = None
    doc = FastAPI.openapi(api)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for module in MODEL_APPS.values():
        sub = module.api.openapi()
        for path, ops in sub.get("paths", {}).items():
            doc["paths"][module.ROUTE + path.rstrip("/")] = ops
        schemas.update(sub.get("components", {}).get("schemas", {}))
    schemas["ErrorResponse"] = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, sub_schema in schemas["ErrorResponse"].pop("$defs", {}).items():
        schemas[name] = sub_schema
    _merged.update(doc)
    return doc



_merged: dict[str, Any] = {}


@serve.deployment(name="Api", max_ongoing_requests=100, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(api)
class Api:
    def __init__(self, args: dict[str, Any]) -> None:
        self.args = AppArgs.model_validate(args)
        route.configure("api", self.args)
        route.paths = route.paths | configure_v2(self.args)
        route.error_forms = {"/v2": v2_error_response}  # 401/413/415 on v2 paths in the protocol's form

    async def _call_all(self, method: str) -> list[Any]:
        try:
            handles = [serve.get_app_handle(name) for name in MODEL_APPS]
            calls = [getattr(h, method).remote() for h in handles]
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                return list(await asyncio.gather(*calls))
        except Exception as e:  # not deployed yet, starting, or unhealthy: all mean "not ready"
            raise NotReady(f"model apps not ready: {type(e).__name__}: {e}") from None

    @api.get("/healthz", response_model=Health, summary="The API process is alive")
    async def healthz(self) -> Health:
        return Health(status="ok")

    @api.get("/readyz", response_model=Health, responses={503: {"model": ErrorResponse}},
             summary="Both models are loaded and warmed up")
    async def readyz(self) -> Health:
        await self._call_all("ready")
        return Health(status="ready")

    @api.get("/v1/models", response_model=ModelsResponse, responses={503: {"model": ErrorResponse}},
             summary="Served models, versions, labels and request limits")
    async def models(self) -> ModelsResponse:
        infos = await self._call_all("info")
        return ModelsResponse(models=[ModelInfo(**i) for i in infos],
                              limits=LimitsInfo(**self.args.limits.model_dump()))

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self) -> JSONResponse:
        return JSONResponse(merged_openapi())

    @api.get("/docs", include_in_schema=False)
    async def docs(self) -> HTMLResponse:
        return demo.docs_page()  # Swagger UI from local files: no CDN

