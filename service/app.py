"""`service.app:build_app`, the import path of every application in deploy/serve_config.yaml.

One Serve config deploys three applications built here, chosen by `args.component`:
- `translator` at /v1/translate and `classifier` at /v1/classify: each model deployment is its own FastAPI
  ingress with @serve.batch, so a request crosses one hop (proxy -> model replica);
- `api` at /: /v1/models, /healthz, /readyz, /docs.
docs/ARCHITECTURE.md has the measurements behind this layout.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from ray.serve import Application

from service.config import AppArgs

Component = Literal["translator", "classifier", "api"]


class BuildArgs(AppArgs):
    component: Component = Field("api", description="which of the three applications to build")


def build_app(args: dict[str, Any] | BuildArgs) -> Application:
    parsed = args if isinstance(args, BuildArgs) else BuildArgs.model_validate(args)
    app_args = parsed.model_dump(exclude={"component"}, mode="json")
    if parsed.component == "translator":
        from service.deployments.translator import Translator

        return Translator.bind(app_args)
    if parsed.component == "classifier":
        from service.deployments.classifier import Classifier

        return Classifier.bind(app_args)
    from service.deployments.ingress import Api

    return Api.bind(app_args)
