"""Closed-loop HTTP load for the cluster tests: every request's time, status and served model version."""

from __future__ import annotations

import base64
import io
import threading
import time
from dataclasses import dataclass, field

import httpx
import numpy as np
from PIL import Image


def png_b64(seed: int) -> str:
    """A 28x28 grayscale PNG, different per seed (so batches are not all the same image)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@dataclass
class Result:
    t: float  # seconds since the load started, when the response arrived
    status: int  # HTTP status, or -1 when no response came (connection error, timeout)
    version: str | None
    error: str = ""


@dataclass
class Load:
    """`concurrency` threads; each sends its next request as soon as the previous one returned."""

    url: str
    body: dict
    concurrency: int
    timeout_s: float = 60.0
    results: list[Result] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.concurrency)]
        self.t0 = 0.0

    def _client(self) -> None:
        with httpx.Client(timeout=self.timeout_s) as client:
            while not self._stop.is_set():
                try:
                    r = client.post(self.url, json=self.body)
                    ok = r.status_code == 200
                    res = Result(time.monotonic() - self.t0, r.status_code, r.json()["version"] if ok else None,
                                 "" if ok else r.text[:300])
                except httpx.HTTPError as e:
                    res = Result(time.monotonic() - self.t0, -1, None, repr(e))
                with self._lock:
                    self.results.append(res)

    def start(self) -> Load:
        self.t0 = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> list[Result]:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout_s + 5)
        return self.results

    def failures(self) -> list[Result]:
        with self._lock:
            return [r for r in self.results if r.status != 200]
