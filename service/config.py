"""Typed application arguments: `deploy/serve_config.yaml` `args:` -> `AppArgs` -> `service.app:build_app`.

This is the only configuration object of the service layer. Serve-level knobs (replicas, max_ongoing_requests,
max_queued_requests, user_config batch settings, resources) stay in the `deployments:` section of the Serve
config, where Serve itself applies them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.runtime.engine import EngineSettings
from service.runtime.manifest import NAME_PATTERN  # names and versions are artifact folder names
from service.runtime.sessions import CudaOptions

REPO_ROOT = Path(__file__).resolve().parents[1]
# The Serve application names (and `component`s) of the model apps in deploy/serve_config.yaml; the third is "api".
TRANSLATOR_APP, CLASSIFIER_APP = "translator", "classifier"
MODEL_APPS = (TRANSLATOR_APP, CLASSIFIER_APP)
# Requests a model replica takes from the proxy: far above `max_pending`, so the replica's Gate answers overload
# with its JSON 503 instead of the proxy queueing. deploy/serve_config.yaml says the same (a unit test checks).
MODEL_MAX_ONGOING_REQUESTS = 1024
PROBE_TIMEOUT_S = 2.0  # readiness and model-info calls from the api app to the model apps


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Limits(_Strict):
    """Per-request limits, enforced before any model work and published in GET /v1/models."""

    max_texts: int = Field(64, ge=1, le=64, description="texts per translate request")
    max_text_chars: int = Field(1000, ge=1, description="characters per text")
    max_source_tokens: int = Field(200, ge=1, description="BPE tokens per text (incl. EOS)")
    max_images: int = Field(64, ge=1, le=64, description="images per classify request")
    max_image_bytes: int = Field(2_000_000, ge=64, description="encoded bytes per image")
    max_image_pixels: int = Field(4_000_000, ge=784, description="width*height per image, checked before decoding")
    max_body_bytes: int = Field(16_000_000, ge=1024, description="HTTP request body")


class ModelArgs(_Strict):
    name: str = Field(pattern=NAME_PATTERN, description="artifact name: the folder under the artifact root")
    version: str | None = Field(None, pattern=NAME_PATTERN,
                                description="artifact version (folder name); None = the newest complete one")
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="ONNX Runtime's provider: auto = cuda when "
                                                  "the CUDA provider works at start (the launcher decides), else cpu; "
                                                  "cuda where it cannot run is an error at start")
    cuda: CudaOptions = Field(CudaOptions(), description="CUDA provider options (service/runtime/sessions.py)")
    gpu_share: float = Field(0.5, gt=0, le=1, description="the GPU share each replica asks Ray for "
                             "(ray_actor_options.num_gpus) when the device resolves to cuda; set by `attnserve serve` "
                             "and deploy/gen_kuberay.py's GPU variant. 0.5 + 0.5: translator and classifier share "
                             "one card")
    intra_op_threads: int = Field(1, ge=1, le=64, description="ONNX Runtime threads per replica")
    timeout_s: float = Field(30.0, gt=0, description="request deadline; past it the client gets a 504")
    max_pending: int = Field(256, ge=1, description="requests admitted per replica; beyond it a 503 + Retry-After")
    max_pending_cost: int | None = Field(None, ge=1, description="summed cost admitted per replica (translator: "
                                         "texts x beam_size x max_new_tokens; classifier: images); beyond it a "
                                         "503 + Retry-After; None = no budget, only max_pending")
    warmup: bool = Field(True, description="run one batch per graph before reporting ready")


class AuthArgs(_Strict):
    """Optional API authentication with bearer tokens: on as soon as any token is configured.

    Tokens come from an environment variable (comma-separated; in KubeRay from a Secret) and/or a file (one
    per line, `#` comments), read when a replica starts; several may be valid at once (rotation). Ray's
    metrics export port is Ray's, not the app's: protect it at the network (deploy/kuberay NetworkPolicies).
    """

    tokens_env: str = Field("ATTNSERVE_API_TOKENS", description="environment variable with comma-separated tokens")
    tokens_file: str | None = Field(None, description="file with one token per line")
    public_health: bool = Field(True, description="/healthz, /readyz and /v2/health/* answer without a token")
    public_docs: bool = Field(True, description="the demo page, its files, /docs and /openapi.json answer without "
                              "a token (the demo then needs one for the model routes)")

    def tokens(self) -> tuple[bytes, ...]:
        raw = os.environ.get(self.tokens_env, "").split(",")
        if self.tokens_file:
            raw += [ln.split("#", 1)[0] for ln in Path(self.tokens_file).read_text().splitlines()]
        return tuple(dict.fromkeys(t.strip().encode() for t in raw if t.strip()))

    def public_paths(self) -> tuple[str, ...]:
        """Path prefixes that need no token (an exact path, or a prefix ending in /)."""
        health = ("/healthz", "/readyz", "/v2/health/") if self.public_health else ()
        docs = ("/", "/docs", "/openapi.json", "/static/") if self.public_docs else ()
        return health + docs


class AppArgs(_Strict):
    artifact_root: str = Field("artifacts", description="relative paths resolve against $ATTNSERVE_ARTIFACTS, "
                               "the working directory, then the repository root")
    translator: ModelArgs = ModelArgs(name="translator-en-es", timeout_s=60.0, max_pending_cost=65536)
    classifier: ModelArgs = ModelArgs(name="vit-fashion", max_pending_cost=2048)
    limits: Limits = Limits()
    retry_after_s: int = Field(1, ge=1, description="Retry-After sent with 503s")
    auth: AuthArgs = AuthArgs()

    def resolved_root(self) -> Path:
        """Replicas may start in another working directory than the CLI: resolve the root deterministically."""
        env = os.environ.get("ATTNSERVE_ARTIFACTS")
        if env:
            return Path(env).resolve()
        root = Path(self.artifact_root)
        if root.is_absolute():
            return root
        for base in (Path.cwd(), REPO_ROOT):
            if (base / root).is_dir():
                return (base / root).resolve()
        return (REPO_ROOT / root).resolve()


class BatchSettings(_Strict):
    """The classifier deployment's `user_config`, applied live by `reconfigure()`, no restart. These defaults are
    the ones deploy/serve_config.yaml ships (the decorator's @serve.batch starts from them too)."""

    max_batch_size: int = Field(32, ge=1, le=256, description="requests merged by @serve.batch")
    batch_wait_timeout_s: float = Field(0.002, ge=0, le=1, description="wait for a fuller batch at most this long")
    max_batch_items: int = Field(64, ge=1, le=1024, description="texts/images per model call; bigger batches are split")


_ENGINE = EngineSettings()


class EngineConfig(_Strict):
    """The translator deployment's `user_config`: the decode engine's knobs, applied live by `reconfigure()`."""

    # Defaults are the engine's own (service/runtime/engine.py: EngineSettings); this adds bounds and docs.
    max_slots: int = Field(_ENGINE.max_slots, ge=8, le=1024,
                           description="live decoder rows per step (a beam-k text takes k)")
    max_step_tokens: int = Field(_ENGINE.max_step_tokens, ge=64, le=65536,
                                 description="per iteration: live rows plus source tokens of texts admitted")
    admit_wait_s: float = Field(_ENGINE.admit_wait_s, ge=0, le=1,
                                description="hold new texts back this long to encode a fuller batch")
    max_encoder_batch: int = Field(_ENGINE.max_encoder_batch, ge=1, le=256,
                                   description="texts encoded together at admission")

    def settings(self) -> EngineSettings:
        return EngineSettings(**self.model_dump())

