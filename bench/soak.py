"""`attnserve bench soak`: steady load at a fraction of measured capacity for N minutes, one table row a minute.

Closed-loop translate clients against a running service (loopback only). First a short run at `--clients`
measures capacity (requests/s); then the soak paces the same clients to `--fraction` of it (each client waits
between requests so the total rate holds). Every minute: requests, errors by status, p50/p99 latency and the
RSS of the Serve replica processes (found by their process title `ray::ServeReplica:...`), then totals.
The helpers here (closed-loop load, replica processes) are shared with tests/reliability.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx
import numpy as np
import psutil

from service.launch.local import is_loopback

REPLICA_TITLE = "ray::ServeReplica:"
BODY = {"texts": ["The cat sleeps on the red chair."], "max_new_tokens": 16}


@dataclass
class Sample:
    t: float  # seconds since the load started, when the answer (or the failure) arrived
    status: int  # HTTP status; -1: no response (connection refused or reset, client timeout)
    seconds: float  # latency
    body: str = ""  # the start of a non-200 body
    headers: dict = field(default_factory=dict)


class ClosedLoop:
    """`clients` threads, each sending its next request when the previous one returned (after `pause_s`)."""

    def __init__(self, url: str, body: dict, clients: int, *, timeout_s: float = 60.0, pause_s: float = 0.0,
                 headers: dict | None = None) -> None:
        self.url, self.body, self.timeout_s, self.pause_s = url, body, timeout_s, pause_s
        self.headers = headers or {}
        self.samples: list[Sample] = []
        self.in_flight = 0
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]
        self.t0 = 0.0

    def _client(self) -> None:
        with httpx.Client(timeout=self.timeout_s, headers=self.headers) as client:
            while not self._stop.is_set():
                with self._lock:
                    self.in_flight += 1
                t = time.monotonic()
                try:
                    r = client.post(self.url, json=self.body)
                    s = Sample(0.0, r.status_code, 0.0, "" if r.status_code == 200 else r.text[:300],
                               dict(r.headers))
                except httpx.HTTPError as e:
                    s = Sample(0.0, -1, 0.0, repr(e)[:300])
                    self._stop.wait(0.05)  # a refused connection returns at once: do not spin
                now = time.monotonic()
                s.t, s.seconds = now - self.t0, now - t
                with self._lock:
                    self.in_flight -= 1
                    self.samples.append(s)
                if self.pause_s:
                    self._stop.wait(self.pause_s)

    def start(self) -> ClosedLoop:
        self.t0 = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def stop(self) -> list[Sample]:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout_s + 5)
        return self.samples

    def since(self, t: float) -> list[Sample]:
        with self._lock:
            return [s for s in self.samples if s.t >= t]


def replica_processes(root_pid: int | None = None, title: str = REPLICA_TITLE) -> list[psutil.Process]:
    """Serve replica worker processes by process title; only descendants of `root_pid` when given."""
    procs = psutil.Process(root_pid).children(recursive=True) if root_pid else psutil.process_iter()
    out = []
    for p in procs:
        try:
            cmd = p.cmdline()
            if cmd and cmd[0].startswith(title):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return out


def rss_mib(procs: list[psutil.Process]) -> dict[str, float]:
    out: dict[str, float] = {}
    for p in procs:
        try:
            name = p.cmdline()[0].removeprefix(REPLICA_TITLE).split(".")[0]  # the title names the running task
            out[f"{name}[{p.pid}]"] = p.memory_info().rss / 2**20
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, IndexError):
            pass
    return out


def percentiles(samples: list[Sample]) -> tuple[float, float]:
    ok = [s.seconds for s in samples if s.status == 200]
    if not ok:
        return float("nan"), float("nan")
    return float(np.percentile(ok, 50)), float(np.percentile(ok, 99))


def row(label: str, samples: list[Sample], rss: dict[str, float]) -> str:
    p50, p99 = percentiles(samples)
    errors = Counter(s.status for s in samples if s.status != 200)
    errs = " ".join(f"{k}:{v}" for k, v in sorted(errors.items())) or "-"
    mem = " ".join(f"{k}={v:.0f}" for k, v in sorted(rss.items())) or "-"
    return f"{label:>6} {len(samples):>8} {errs:>14} {p50 * 1000:>8.0f} {p99 * 1000:>8.0f}  {mem}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="attnserve bench soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the running attnserve (loopback only)")
    p.add_argument("--minutes", type=float, default=10.0, help="length of the steady run")
    p.add_argument("--clients", type=int, default=8, help="closed-loop clients of the capacity run")
    p.add_argument("--fraction", type=float, default=0.7, help="of the measured capacity")
    p.add_argument("--measure-s", type=float, default=15.0, help="capacity run length")
    p.add_argument("--pid", type=int, help="only replicas under this process (an `attnserve serve`)")
    a = p.parse_args(argv)
    host = urlparse(a.url).hostname or ""
    if not is_loopback(host):
        p.error(f"--url must be a loopback address (got {host!r}): a soak is a local test, not a load tool")
    url = a.url.rstrip("/") + "/v1/translate"

    cap = ClosedLoop(url, BODY, a.clients).start()
    time.sleep(a.measure_s)
    samples = cap.stop()
    ok = [s for s in samples if s.status == 200]
    capacity = len(ok) / a.measure_s
    if not ok:
        raise SystemExit(f"no successful request in the capacity run: {samples[:1]}")
    mean = float(np.mean([s.seconds for s in ok]))
    # Each client: one request (mean latency at the lower load, roughly) then a pause, for fraction x capacity.
    pause = max(0.0, a.clients / (a.fraction * capacity) - mean)
    print(f"capacity {capacity:.1f} req/s ({a.clients} clients, {a.measure_s:.0f} s); soak at {a.fraction:.0%}: "
          f"target {a.fraction * capacity:.1f} req/s, {pause * 1000:.0f} ms pause per client", flush=True)
    print(f"{'minute':>6} {'requests':>8} {'errors':>14} {'p50 ms':>8} {'p99 ms':>8}  replica RSS MiB", flush=True)
    load = ClosedLoop(url, BODY, a.clients, pause_s=pause).start()
    first_rss = rss_mib(replica_processes(a.pid))
    minutes = max(1, round(a.minutes))
    try:
        for m in range(minutes):
            end = (m + 1) * 60.0 * a.minutes / minutes
            time.sleep(max(0.0, end - load.elapsed()))
            window = [s for s in load.since(end - 60.0 * a.minutes / minutes) if s.t < end]
            print(row(str(m + 1), window, rss_mib(replica_processes(a.pid))), flush=True)
    finally:
        total = load.stop()
    last_rss = rss_mib(replica_processes(a.pid))
    print(row("total", total, last_rss), flush=True)
    print(f"rate {len(total) / max(load.elapsed(), 1e-9):.1f} req/s; replica RSS start -> end MiB: "
          + " ".join(f"{k} {first_rss.get(k, float('nan')):.0f}->{v:.0f}" for k, v in sorted(last_rss.items())),
          flush=True)
