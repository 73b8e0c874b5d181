"""Inputs for tracing and parity: random ones of any size, and real ones from the test split."""

from __future__ import annotations

import numpy as np

from export.specs import GraphSpec
from models.translator import BOS, EOS, PAD


def random_inputs(spec: GraphSpec, dims: dict[str, int], sizes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Valid random inputs for ``spec`` at the given dynamic sizes (a size may be 0 for past_len, 1 for any).

    Token ids avoid the special ids except for a trailing EOS; source rows have different lengths, with
    row 0 full length, so padding and masks are exercised.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    lengths = None
    rows = sizes["slots"] if any("slots" in t.shape for t in spec.inputs) else sizes.get("batch", 1)
    if "src_len" in sizes:
        s = sizes["src_len"]
        lengths = np.concatenate([[s], rng.integers(1, s + 1, size=max(rows - 1, 0))])
    for t in spec.inputs:
        shape = tuple(
            sizes[d] if isinstance(d, str) and d in sizes else d if isinstance(d, int) else dims[d] for d in t.shape
        )
        if t.name == "src_ids":
            ids = rng.integers(4, dims["vocab"], size=shape)
            for i, n in enumerate(lengths):
                ids[i, n - 1], ids[i, n:] = EOS, PAD
            out[t.name] = ids.astype(np.int64)
        elif t.name == "tokens":
            out[t.name] = rng.integers(4, dims["vocab"], size=shape).astype(np.int64)
        elif t.name == "positions":  # row 0 at the cache's last position, the rest anywhere before it
            pos = rng.integers(0, sizes["cache_len"], size=shape)
            pos[0] = sizes["cache_len"] - 1
            out[t.name] = pos.astype(np.int64)
        elif t.dtype == "uint8":
            out[t.name] = rng.integers(0, 256, size=shape).astype(np.uint8)
        elif t.name in ("align_weights", "cls_weights"):
            out[t.name] = rng.random(shape).astype(np.float32)
        elif t.name == "tgt_ids":
            ids = rng.integers(4, dims["vocab"], size=shape)
            ids[:, 0] = BOS
            out[t.name] = ids.astype(np.int64)
        elif t.name == "src_mask":
            out[t.name] = np.arange(shape[1])[None, :] < lengths[:, None]
        else:
            out[t.name] = rng.standard_normal(shape).astype(t.dtype)
    return out


# Sizes checked on every export: the tracing sizes plus the edge cases the trap warns about.
# slots/cache_len are the slot step's axes (the other graphs ignore them); a cache of 1 holds position 0 only.
TRANSLATOR_CASES = {
    "batch2_src5_tgt3_past4": {"batch": 2, "src_len": 5, "tgt_len": 3, "past_len": 4, "slots": 3, "cache_len": 6},
    "batch1_src1_tgt1_past0": {"batch": 1, "src_len": 1, "tgt_len": 1, "past_len": 0, "slots": 1, "cache_len": 1},
    "batch3_src7_tgt1_past0": {"batch": 3, "src_len": 7, "tgt_len": 1, "past_len": 0, "slots": 2, "cache_len": 9},
    "batch1_src9_tgt1_past6": {"batch": 1, "src_len": 9, "tgt_len": 1, "past_len": 6, "slots": 5, "cache_len": 2},
    "batch4_src2_tgt5_past1": {"batch": 4, "src_len": 2, "tgt_len": 5, "past_len": 1, "slots": 4, "cache_len": 17},
}
VIT_CASES = {"batch1": {"batch": 1}, "batch2": {"batch": 2}, "batch5": {"batch": 5}}
