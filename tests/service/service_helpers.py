"""Small helpers for the service tests: images, metrics scrapes, SSE parsing, reference attention maps."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

# The session service's config (tests/service/conftest.py): limits small enough to reach every error status.
TEST_LIMITS = {"max_body_bytes": 1_000_000, "max_image_pixels": 1_000_000, "max_text_chars": 300}
TRANSLATOR_MAX_PENDING = 16
# A reliably long decode: greedy decoding of this text runs on to max_new_tokens (measured 256 of 256 with the
# d=320 checkpoint; test_buffers_grow_for_long_rows_and_shrink_after fails first if a new checkpoint stops early).
LONG_DECODE = " ".join(["ha"] * 60)


def png(arr: np.ndarray | None = None, *, seed: int = 0, mode: str | None = None, fmt: str = "PNG") -> bytes:
    if arr is None:
        arr = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
KEEP = ("model", "route", "status", "code", "graph", "le", "reason")


def scrape(url: str) -> Samples:
    """`ray_attnserve_*` samples summed over replicas/workers, keyed by (name, our labels)."""
    out: Samples = {}
    for fam in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for s in fam.samples:
            if not s.name.startswith("ray_attnserve_"):
                continue
            key = (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k in KEEP)))
            out[key] = out.get(key, 0.0) + s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def settled(url: str, quiet_s: float = 3.0, timeout_s: float = 60.0) -> Samples:
    """A scrape that stopped changing for `quiet_s` (Ray exports every second in the tests)."""
    deadline, last, since = time.monotonic() + timeout_s, None, time.monotonic()
    while time.monotonic() < deadline:
        now = scrape(url)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return now
        time.sleep(0.5)
    raise TimeoutError("metrics never settled")


def wait_for(url: str, done: Callable[[Samples], bool], timeout_s: float = 60.0) -> Samples:
    deadline = time.monotonic() + timeout_s
    while True:
        now = scrape(url)
        if done(now) or time.monotonic() > deadline:
            return now
        time.sleep(0.5)


def events(lines) -> list[tuple[str, dict]]:
    """Parse a text/event-stream body into (event, data) pairs."""
    out, event = [], None
    for line in lines:
        if line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: "):
            out.append((event, json.loads(line[len("data: "):])))
    return out


def teacher_forced(rt, text: str, target_tokens: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Independently of the engine, for one text: the target fed whole through `decoder_attn` -> raw
    cross-attention (L, nh, T, S), and `encoder_attn` -> self-attention (L_enc, nh, S, S); S includes EOS."""
    ids, _ = rt.source(text)
    src = np.array([ids], np.int64)
    cross, enc = rt.sessions["encoder_attn"].run(["cross_kv", "encoder_attentions"], {"src_ids": src})
    tgt = np.array([[rt.bos, *(rt.tokenizer.token_to_id(t) for t in target_tokens)]], np.int64)
    past = np.zeros((rt.layers, 2, 1, rt.heads, 0, rt.head_dim), np.float32)
    (attn,) = rt.sessions["decoder_attn"].run(["cross_attentions"], {"tgt_ids": tgt, "cross_kv": cross,
                                                                     "src_mask": src != rt.pad, "past_kv": past})
    return attn[:, 0, :, : len(target_tokens)], enc[:, 0]


def renormalised(rows: np.ndarray, n: int) -> np.ndarray:
    """Drop the EOS column (and padding): rows summing to 1 over the n real source tokens."""
    rows = rows[..., :n]
    return rows / rows.sum(-1, keepdims=True)
