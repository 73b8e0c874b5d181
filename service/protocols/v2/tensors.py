"""v2 tensors <-> the jobs and results of the replicas: the inputs decoded into a `TranslateJob` or
`ClassifyJob`, the results encoded as the model's output tensors (and their output parameters)."""

from __future__ import annotations

from typing import Any

import numpy as np

from service.deployments.jobs import ClassifyJob, ClassifyResult, TranslateJob, TranslateResult
from service.protocols.v2 import codec
from service.protocols.v2.codec import BYTES, V2Error
from service.protocols.v2.specs import ModelSpec

Tensors = dict[str, tuple[np.ndarray, str]]  # output name -> (data, datatype)


def _rows(req: codec.Request, name: str, datatype: str, item: list[int], what: str) -> np.ndarray | None:
    """Input `name` checked: its datatype, and shape [n, *item] or [n, *item, 1] with n >= 1."""
    arr = req.inputs.get(name)
    if arr is None:
        return None
    if req.datatypes[name] != datatype:
        raise V2Error(f"input {name!r} must be {datatype}, got {req.datatypes[name]}")
    shape = list(arr.shape)
    if not (shape[1:] == item or shape[1:] == [*item, 1]) or shape[0] < 1:
        want = ", ".join(["n", *map(str, item)])
        raise V2Error(f"input {name!r} must have shape [{want}] or [{want}, 1] with n >= 1, got {shape} ({what})")
    return arr.reshape(-1, *item)


def translate_job(req: codec.Request, p: dict[str, Any], names: set[str], spec: ModelSpec,
                  timeout_s: float | None) -> TranslateJob:
    arr = _rows(req, "TEXT", BYTES, [], "UTF-8 texts")
    if arr is None:
        raise V2Error("missing input 'TEXT' (BYTES, shape [n] or [n, 1])")
    texts = []
    for i, raw in enumerate(arr):
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise V2Error(f"TEXT[{i}] is not valid UTF-8 (bad byte at offset {e.start})") from None
    needs = {spec.needs.get(n) for n in names}
    return TranslateJob(texts=texts, beam_size=p["beam_size"], max_new_tokens=p["max_new_tokens"],
                        return_attention="return_attention" in needs, attention_layers=p["attention_layers"],
                        attention_heads=p["attention_heads"],
                        return_encoder_attention="return_encoder_attention" in needs,
                        encoder_attention_layers=p["encoder_attention_layers"],
                        encoder_attention_heads=p["encoder_attention_heads"], timeout_s=timeout_s)


def classify_job(req: codec.Request, p: dict[str, Any], names: set[str], spec: ModelSpec,
                 timeout_s: float | None) -> ClassifyJob:
    size = spec.facts["image_size"]
    pixels = _rows(req, "IMAGE", "UINT8", [size, size], "grayscale pixels")
    files = _rows(req, "IMAGE_BYTES", BYTES, [], "PNG or JPEG files")
    if pixels is None and files is None:
        raise V2Error(f"missing input: IMAGE (UINT8 [n, {size}, {size}]) and/or IMAGE_BYTES (BYTES [n], PNG or JPEG)")
    asked = [n for n in ("ROLLOUT", "CLS_ATTENTION") if n in names]
    if len(asked) == 2:
        raise V2Error("one attention map per request: ROLLOUT or CLS_ATTENTION")
    method = {"ROLLOUT": "rollout", "CLS_ATTENTION": "cls"}[asked[0]] if asked else (p["attention"] or "rollout")
    if p["attention"] is not None and p["attention"] != method:
        raise V2Error(f"parameter 'attention' is {p['attention']!r}, but {asked[0]} is requested")
    return ClassifyJob(pixels=None if pixels is None else np.ascontiguousarray(pixels, dtype=np.uint8),
                       files=[] if files is None else list(files), return_attention=bool(asked),
                       attention=method, attention_layers=p["attention_layers"],
                       attention_heads=p["attention_heads"], timeout_s=timeout_s)


def _pad_tokens(rows: list[list[str]]) -> np.ndarray:
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), b"", dtype=object)
    for i, r in enumerate(rows):
        out[i, : len(r)] = [t.encode("utf-8") for t in r]
    return out


def _strings(items: list[str]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = [s.encode("utf-8") for s in items]
    return out


def _indices(xs: list[int]) -> str:
    return ",".join(str(x) for x in xs)


def translate_outputs(res: TranslateResult) -> tuple[Tensors, dict[str, dict[str, Any]]]:
    """The translator's output tensors, and the output parameters `layers` and `heads` of its maps."""
    rs = res.translations
    src, tgt = _pad_tokens([r.source_tokens for r in rs]), _pad_tokens([r.target_tokens for r in rs])
    align = np.zeros((len(rs), tgt.shape[1], src.shape[1]), np.float32)
    encoder = np.zeros((len(rs), src.shape[1], src.shape[1]), np.float32)
    for i, r in enumerate(rs):
        for a, out in ((r.attention, align), (r.encoder_attention, encoder)):
            if a is not None:
                out[i, : a.shape[0], : a.shape[1]] = a
    params: dict[str, dict[str, Any]] = {}
    if rs and any(r.attention is not None for r in rs):  # the same choices for every text of a job
        params["ALIGNMENT"] = {"layers": _indices(rs[0].layers), "heads": _indices(rs[0].heads)}
    if rs and any(r.encoder_attention is not None for r in rs):
        params["ENCODER_ATTENTION"] = {"layers": _indices(rs[0].encoder_layers),
                                       "heads": _indices(rs[0].encoder_heads)}
    return {"TRANSLATION": (_strings([r.text for r in rs]), BYTES), "SOURCE_TOKENS": (src, BYTES),
            "TARGET_TOKENS": (tgt, BYTES), "ALIGNMENT": (align, "FP32"),
            "ENCODER_ATTENTION": (encoder, "FP32")}, params


def classify_outputs(res: ClassifyResult, top_k: int, spec: ModelSpec) -> tuple[Tensors, dict[str, dict[str, Any]]]:
    """The classifier's output tensors, and the output parameters of its map."""
    probs = np.asarray(res.probs, np.float32)
    order = res.top_k(top_k)
    names = np.empty(order.shape, dtype=object)
    names[...] = [[res.labels[j].encode("utf-8") for j in row] for row in order]
    grid = spec.facts["grid"]
    maps = np.zeros((len(probs), grid, grid), np.float32) if res.maps is None else np.asarray(res.maps, np.float32)
    params = {}
    if res.maps is not None and res.method is not None:
        params["CLS_ATTENTION" if res.method == "cls" else "ROLLOUT"] = {
            "method": res.method, "layers": _indices(res.layers), "heads": _indices(res.heads)}
    return {"PROBABILITIES": (probs, "FP32"), "LABEL": (_strings([res.labels[int(r[0])] for r in order]), BYTES),
            "TOP_K_LABELS": (names, BYTES), "TOP_K_SCORES": (np.take_along_axis(probs, order, axis=1), "FP32"),
            "ROLLOUT": (maps, "FP32"), "CLS_ATTENTION": (maps, "FP32")}, params


def classification(name: str, k: Any, tensors: Tensors, labels: list[str] | None) -> tuple[np.ndarray, str]:
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
