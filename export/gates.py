"""Quality gates: a precision variant may lose at most this much quality against fp32 on the test split.

The losses are the ones ``family_*.quality()`` measured (BLEU points for the translator, accuracy points for
the ViT). A variant over its gate fails the export with ``QualityGateError`` and nothing is installed; the
thresholds and the verdicts are recorded in the manifest's ``gates``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gate:
    metric: str  # the quality key per precision ("bleu", "accuracy")
    delta: str  # its change vs fp32 in points, as quality() records it ("delta_bleu", "delta_points")
    unit: str
    max_loss: dict[str, float]  # precision -> largest allowed loss vs fp32, in `unit`


GATES = {
    "translation": Gate("bleu", "delta_bleu", "BLEU", {"int8": 0.5, "fp16": 0.2}),
    "image-classification": Gate("accuracy", "delta_points", "accuracy points", {"int8": 0.5, "fp16": 0.2}),
}


class QualityGateError(Exception):
    """A precision variant lost more quality against fp32 than its gate allows."""

    def __init__(self, name: str, failures: list[str]) -> None:
        self.failures = failures
        super().__init__(
            f"{name}: quality gate failed, nothing installed: {'; '.join(failures)}. Keep the precision out"
            " (`attnserve export --precision fp32,...`) or improve the model; the measured figures are in the"
            " partial folder's manifest.partial.json"
        )


def check_gates(task: str, quality: dict, *, max_loss: dict[str, float] | None = None) -> tuple[dict, list[str]]:
    """-> (the manifest's ``gates``: thresholds, measured losses, verdicts; the failures, one line each).

    Each built precision gets a ``status``: "passed", "failed", or "not run" (its quality could not be
    measured: no kernels for it on this machine, say) with the reason and never a pass; ``ran_on`` names the
    ONNX Runtime provider that measured it. ``passed`` is true only when every built precision ran and passed;
    only a failure fails the export (a variant that could not be measured is installed, marked not run).
    """
    gate = GATES[task]
    limits = {**gate.max_loss, **(max_loss or {})}
    out: dict = {"metric": gate.metric, "unit": gate.unit, "max_loss": limits, "precisions": {}}
    failures: list[str] = []
    if "skipped" in quality:
        out["checked"] = False
        out["reason"] = quality["skipped"]
        return out, failures
    out["checked"] = True
    not_run = []
    for p, limit in limits.items():
        q = quality.get(p)
        if q is None:
            continue  # this precision was not built
        if gate.delta not in q:
            out["precisions"][p] = {"checked": False, "status": "not run", "reason": q.get("reason", "not measured")}
            not_run.append(p)
            continue
        loss = round(-float(q[gate.delta]), 2) + 0.0  # + 0.0: no "-0.0"
        ok = loss <= limit
        out["precisions"][p] = {"loss": loss, "max_loss": limit, "passed": ok, "status": "passed" if ok else "failed",
                                "ran_on": q.get("measured_with", "unknown")}
        if not ok:
            failures.append(f"{p} loses {loss} {gate.unit} against fp32 (allowed: {limit})")
    out["not_run"] = not_run
    out["passed"] = not failures and not not_run
    return out, failures
