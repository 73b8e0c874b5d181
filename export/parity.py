"""ORT vs PyTorch parity: every mismatch is collected, then raised together as one ParityError."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnxruntime as ort
import torch

from export.specs import GraphSpec


@dataclass
class Mismatch:
    graph: str
    case: str
    output: str
    detail: str


class ParityError(Exception):
    """The exported graphs disagree with the torch model; ``mismatches`` lists every disagreement."""

    def __init__(self, mismatches: list[Mismatch]) -> None:
        self.mismatches = mismatches
        lines = [f"  {m.graph} [{m.case}] {m.output}: {m.detail}" for m in mismatches]
        super().__init__(f"{len(mismatches)} ORT/torch parity mismatch(es):\n" + "\n".join(lines))


def cpu_session(path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def compare(
    spec: GraphSpec, wrapper: torch.nn.Module, session: ort.InferenceSession, case: str, feeds: dict[str, np.ndarray]
) -> tuple[dict, list[Mismatch]]:
    """Run one input case through both; returns the max abs error per output and any mismatches."""
    with torch.no_grad():
        ref = wrapper(*(torch.from_numpy(feeds[t.name]) for t in spec.inputs))
    ref = ref if isinstance(ref, tuple) else (ref,)
    names = [t.name for t in spec.outputs]
    got = session.run(names, feeds)
    errors, bad = {}, []
    for name, r, g in zip(names, ref, got, strict=True):
        r = r.numpy()
        if r.shape != g.shape:
            bad.append(Mismatch(spec.name, case, name, f"shape {g.shape}, torch {r.shape}"))
            continue
        if not np.isfinite(g).all():
            bad.append(Mismatch(spec.name, case, name, "non-finite values"))
            continue
        err = float(np.abs(g - r).max()) if r.size else 0.0
        errors[name] = err
        if not np.allclose(g, r, atol=spec.atol, rtol=spec.rtol):
            bad.append(
                Mismatch(spec.name, case, name, f"max abs error {err:.2e} > atol {spec.atol} + rtol {spec.rtol}")
            )
    return {"case": case, "max_abs_error": errors}, bad


def token_parity(torch_tokens: list[list[int]], ort_tokens: list[list[int]]) -> tuple[dict, list[Mismatch]]:
    """Greedy token sequences must be identical."""
    diff = [i for i, (a, b) in enumerate(zip(torch_tokens, ort_tokens, strict=True)) if a != b]
    result = {
        "sentences": len(torch_tokens),
        "identical": len(torch_tokens) - len(diff),
        "differing_indices": diff[:20],
    }
    bad = [
        Mismatch("greedy", f"sentence {i}", "tokens", f"ORT {ort_tokens[i]} != torch {torch_tokens[i]}")
        for i in diff[:5]
    ]
    if len(diff) > 5:
        bad.append(Mismatch("greedy", "...", "tokens", f"{len(diff) - 5} more sentences differ"))
    return result, bad


def as_dicts(mismatches: list[Mismatch]) -> list[dict]:
    return [asdict(m) for m in mismatches]
