"""What every model deployment shares: typed args, its runtime, admission gate, one ORT thread, live batching."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from service.config import AppArgs, BatchSettings
from service.metrics import metrics
from service.protocols.asgi import Gate
from service.runtime import find_artifact


class ModelReplica:
    """Mixed into a `@serve.deployment` class. The default ``reconfigure`` drives a `@serve.batch` method named
    ``run_batch`` (the classifier); the translator overrides it for its engine."""

    def open(self, args: dict[str, Any], component: str, runtime_cls: type) -> Any:
        """Load the component's artifact into ``self.rt``; return the component's config."""
        self.args = AppArgs.model_validate(args)
        cfg, self.limits = getattr(self.args, component), self.args.limits
        path = find_artifact(self.args.resolved_root(), cfg.name, cfg.version)
        self.rt = runtime_cls(path, precision=cfg.precision, device=cfg.device, intra_op_threads=cfg.intra_op_threads,
                              cuda=cfg.cuda)
        self.gate = Gate(max_pending=cfg.max_pending, max_pending_cost=cfg.max_pending_cost, timeout_s=cfg.timeout_s,
                         retry_after_s=self.args.retry_after_s)
        self.settings = BatchSettings()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="ort")  # ORT off the event loop, one call at a time
        self.metrics = metrics()
        self.metrics.model_info.set(1, tags={"model": cfg.name, "version": self.rt.version,
                                             "precision": self.rt.precision, "device": self.rt.device})
        return cfg

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's user_config: batch size and wait applied live, without restarting the replica."""
        self.settings = BatchSettings.model_validate(user_config or {})
        self.run_batch.set_max_batch_size(self.settings.max_batch_size)
        self.run_batch.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)

    def drain(self) -> dict[str, Any]:
        """Stop admitting (new requests get a 503 + Retry-After) and report what is still in flight."""
        self.gate.draining = True
        return {"replica": serve.get_replica_context().replica_id.unique_id, "pending": self.gate.pending}

    def ready(self) -> bool:
        return True  # __init__ returns only after loading and warming up
