"""The request parameters of a v2 inference: each checked against its spec (`Param`), with a 400 that says
what is allowed, then the defaults filled in."""

from __future__ import annotations

import re
from typing import Any

from service.deployments.jobs import MAX_LAYERS
from service.protocols.v1.schemas import INTS
from service.protocols.v2.codec import V2Error
from service.protocols.v2.specs import COMMON_PARAMS, ModelSpec, Param

MAX_INDICES = MAX_LAYERS  # items in a list parameter, as /v1's attention_layers and attention_heads


def parameters(spec: ModelSpec, given: dict[str, Any]) -> dict[str, Any]:
    allowed = {**spec.params, **COMMON_PARAMS}
    out = {}
    for k, v in given.items():
        p = allowed.get(k)
        if p is None:
            raise V2Error(f"unknown parameter {k!r}; this model takes {', '.join(allowed)}")
        out[k] = parameter(k, p, v)
    return {k: out.get(k, p.default) for k, p in allowed.items()}


def parameter(k: str, p: Param, v: Any) -> Any:
    """One request parameter checked against its Param (V2Error saying what is allowed)."""
    hi = "" if p.hi is None else str(p.hi)

    def in_range(x: int) -> bool:
        return (p.lo is None or x >= p.lo) and (p.hi is None or x <= p.hi)

    if p.kind is bool:
        if isinstance(v, bool):
            return v
        want = "true or false"
    elif p.kind is str:
        if isinstance(v, str) and (not p.choices or v in p.choices):
            return v
        want = " or ".join(repr(c) for c in p.choices) if p.choices else "a string"
    elif p.kind is list:
        if isinstance(v, int) and not isinstance(v, bool):
            v = str(v)
        if isinstance(v, str) and re.fullmatch(INTS, v):
            items = [int(x) for x in v.split(",")]
            if len(items) <= MAX_INDICES and all(in_range(x) for x in items):
                return items
        want = f"comma-separated integers in {p.lo}..{hi} (at most {MAX_INDICES}), e.g. \"0,2\""
    else:
        if isinstance(v, int) and not isinstance(v, bool) and in_range(v):
            return v
        want = f"an integer in {p.lo}..{hi}"
    raise V2Error(f"parameter {k!r} must be {want}, got {v!r}")
