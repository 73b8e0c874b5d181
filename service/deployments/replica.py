"""What every model deployment shares: typed args, its runtime, admission gate, the Serve deployment options."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray import serve

from service.config import MODEL_MAX_ONGOING_REQUESTS, AppArgs
from service.deployments.admission import Gate
from service.metrics import metrics
from service.runtime import find_artifact


def model_deployment(name: str) -> Callable[[type], Any]:
    """`@serve.deployment` of a model replica. deploy/serve_config.yaml's `deployments:` override these options;
    `max_ongoing_requests` is the config's value (a unit test checks they agree)."""
    return serve.deployment(name=name, max_ongoing_requests=MODEL_MAX_ONGOING_REQUESTS,
                            ray_actor_options={"num_cpus": 1})


class ModelReplica:
    """Mixed into a model's `@serve.deployment` class: `open` loads its artifact and makes its admission gate."""

    def open(self, args: dict[str, Any], component: str, runtime_cls: type) -> Any:
        """Load the component's artifact into ``self.rt``; return the component's config."""
        self.args = AppArgs.model_validate(args)
        cfg, self.limits = getattr(self.args, component), self.args.limits
        path = find_artifact(self.args.resolved_root(), cfg.name, cfg.version)
        self.rt = runtime_cls(path, precision=cfg.precision, device=cfg.device, intra_op_threads=cfg.intra_op_threads,
                              cuda=cfg.cuda)
        self.gate = Gate(max_pending=cfg.max_pending, max_pending_cost=cfg.max_pending_cost, timeout_s=cfg.timeout_s,
                         retry_after_s=self.args.retry_after_s)
        self.metrics = metrics()
        self.metrics.model_info.set(1, tags={"model": cfg.name, "version": self.rt.version,
                                             "precision": self.rt.precision, "device": self.rt.device})
        return cfg

    def drain(self) -> dict[str, Any]:
        """Stop admitting (new requests get a 503 + Retry-After) and report what is still in flight."""
        self.gate.draining = True
        return {"replica": serve.get_replica_context().replica_id.unique_id, "pending": self.gate.pending}

    def ready(self) -> bool:
        return True  # __init__ returns only after loading and warming up
