"""`attnserve bench http`: load the running service, then a single-process FastAPI+ORT baseline, same load.

Closed-loop clients (each sends its next request when the previous answer arrives) at each concurrency,
per route, for a fixed time. Loopback only. Mean batch size comes from the service's own
`attnserve_batch_size` histogram (a metrics scrape before and after each run).

`--device cuda`: the baseline runs on ONNX Runtime's CUDA provider (it fails clearly without one), and the
running service must report that device for its models in /v1/models (start it with
`attnserve serve --device cuda`); a mismatch stops the bench before it measures anything.
"""

import argparse
import asyncio
import base64
import gzip
import io
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.config import REPO_ROOT

SENTENCES = [
    "The cat sleeps on the red chair.", "I want to go home now.", "Where is the train station?",
    "We ate bread and cheese.", "She reads a book every night.", "Tom is taller than his brother.",
    "It is raining again today.", "Can you help me with my homework?",
]
WARMUP = 2
MODELS = {"translate": "translator-en-es", "classify": "vit-fashion"}


@dataclass
class Result:
    requests: int
    items: int
    seconds: float
    latencies: list[float]
    errors: int

    def row(self) -> dict[str, float]:
        lat = np.array(self.latencies or [float("nan")]) * 1000
        return {"rps": self.requests / self.seconds, "items_s": self.items / self.seconds,
                "p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
                "p99": float(np.percentile(lat, 99)), "errors": self.errors}


def images(n: int) -> list[str]:
    """Base64 PNGs: Fashion-MNIST test images when ../shared/data has them, else random pixels."""
    path = Path(os.environ.get("ATTNSERVE_DATA", REPO_ROOT.parent / "shared" / "data"))
    path = path / "fashion-mnist" / "t10k-images-idx3-ubyte.gz"
    if path.exists():
        arr = np.frombuffer(gzip.decompress(path.read_bytes()), np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    else:
        arr = np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    out = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def bodies(route: str, items: int) -> list[dict]:
    if route == "translate":
        return [{"texts": [SENTENCES[(i + j) % len(SENTENCES)] for j in range(items)]} for i in range(len(SENTENCES))]
    pngs = images(64)
    return [{"images": [pngs[(i + j) % len(pngs)] for j in range(items)]} for i in range(len(pngs))]


async def load(base: str, route: str, concurrency: int, seconds: float, items: int) -> Result:
    reqs = bodies(route, items)
    lat: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
        for body in reqs[:WARMUP]:  # warm connections and caches, not counted
            await client.post(f"/v1/{route}", json=body)
        stop = time.perf_counter() + seconds

        async def worker(k: int) -> None:
            nonlocal errors
            i = k
            while time.perf_counter() < stop:
                t = time.perf_counter()
                try:
                    r = await client.post(f"/v1/{route}", json=reqs[i % len(reqs)])
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    lat.append(time.perf_counter() - t)
                else:
                    errors += 1
                i += concurrency

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        dt = time.perf_counter() - t0
    return Result(len(lat), len(lat) * items, dt, lat, errors)


def scrape(metrics_url: str, model: str) -> tuple[float, float, float]:
    """(requests finished, batch-size sum, batch count) for one model, summed over replicas."""
    text = httpx.get(metrics_url, timeout=10).text
    out = {"ray_attnserve_requests_total": 0.0, "ray_attnserve_batch_size_sum": 0.0,
           "ray_attnserve_batch_size_count": 0.0}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in out and s.labels.get("model") == model:
                out[s.name] += s.value
    return tuple(out.values())  # type: ignore[return-value]


def scrape_after(metrics_url: str, model: str, sent: int, wait_s: float) -> tuple[float, float, float]:
    """Ray exports metrics every few seconds: poll until every request sent is counted, then until the
    batch count stops moving (the counter and the histogram are not always exported together)."""
    deadline, last = time.monotonic() + wait_s, None
    while True:
        now = scrape(metrics_url, model)
        if (now[0] >= sent and now == last) or time.monotonic() > deadline:
            return now
        last = now if now[0] >= sent else None
        time.sleep(1)
        time.sleep(1)


def check_device(base: str, device: str) -> None:
    """Stop unless ONNX Runtime here has the device and every model of the service runs on it."""
    from service.runtime.errors import DeviceError
    from service.runtime.sessions import resolve_device

    try:
        resolve_device(device)
    except DeviceError as e:
        sys.exit(f"attnserve bench http: the baseline cannot run on {device}: {e}")
    models = httpx.get(f"{base}/v1/models", timeout=30).json()["models"]
    wrong = {m["name"]: m["device"] for m in models if m["device"] != device}
    if wrong:
        sys.exit(f"attnserve bench http: --device {device}, but the service runs {wrong}: start it with "
                 f"`attnserve serve --device {device}`")


def start_baseline(port: int, artifacts: str | None, device: str = "cpu") -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ATTNSERVE_BASELINE_DEVICE": device}
    if artifacts:
        env["ATTNSERVE_ARTIFACTS"] = artifacts
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "bench.baseline_server:app", "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "warning"], cwd=REPO_ROOT, env=env)
    for _ in range(120):
        try:
            httpx.get(f"http://127.0.0.1:{port}/docs", timeout=1)
            return proc
        except httpx.HTTPError:
            if proc.poll() is not None:
                raise RuntimeError("baseline server exited") from None
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("baseline server did not start")


def add_load_args(p: argparse.ArgumentParser, *, concurrency: list[int]) -> None:
    """The load and baseline flags `bench http` and `bench cost` share."""
    p.add_argument("--routes", nargs="+", default=["translate", "classify"], choices=["translate", "classify"],
                   help="routes to load (default: both)")
    p.add_argument("--concurrency", nargs="+", type=int, default=concurrency,
                   help="closed-loop clients, one row each")
    p.add_argument("--items", type=int, default=1, help="texts or images per request")
    p.add_argument("--baseline-port", type=int, default=8100, help="loopback port for the baseline server")
    p.add_argument("--no-baseline", action="store_true", help="measure the service only")
    p.add_argument("--artifacts", help="artifact root for the baseline (default: as the service resolves it)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="attnserve bench http", description=__doc__)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the running attnserve")
    p.add_argument("--metrics-url", default="http://127.0.0.1:8080/metrics",
                   help="the service's Prometheus export, for the mean batch size")
    add_load_args(p, concurrency=[1, 8, 32, 64])
    p.add_argument("--seconds", type=float, default=8.0, help="per route and concurrency, per server")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="the baseline's ONNX Runtime provider; the service must run on the same (checked)")
    p.add_argument("--metrics-wait", type=float, default=40.0, help="max wait for a scrape to count a run")
    a = p.parse_args(argv)
    if not a.url.startswith(("http://127.0.0.1", "http://localhost")):
        sys.exit("attnserve bench http: loopback only (--url http://127.0.0.1:PORT)")
    check_device(a.url, a.device)

    rows: list[tuple[str, int, dict, dict | None]] = []
    # Requests counted so far per model: lets us wait until a run's requests are all in the scrape.
    sent = {route: scrape(a.metrics_url, MODELS[route])[0] for route in a.routes}
    for route in a.routes:
        for c in a.concurrency:
            before = scrape_after(a.metrics_url, MODELS[route], int(sent[route]), a.metrics_wait)
            result = asyncio.run(load(a.url, route, c, a.seconds, a.items))
            sent[route] += result.requests + result.errors + WARMUP
            after = scrape_after(a.metrics_url, MODELS[route], int(sent[route]), a.metrics_wait)
            # Exact mean: each successful request was in exactly one batch. (Ray exports a histogram's _sum
            # from bucket midpoints, so _sum/_count is only an approximation.)
            res, batches = result.row(), after[2] - before[2]
            res["batch"] = (result.requests + WARMUP) / batches if batches else float("nan")
            rows.append((route, c, res, None))
            print(f"attnserve {route:9} c={c:<3} {res['rps']:8.1f} req/s  p50 {res['p50']:7.1f} ms  "
                  f"p99 {res['p99']:7.1f} ms  errors {res['errors']}  batch {res['batch']:.2f}", flush=True)
    if not a.no_baseline:
        proc = start_baseline(a.baseline_port, a.artifacts, a.device)
        try:
            base = f"http://127.0.0.1:{a.baseline_port}"
            for i, (route, c, res, _) in enumerate(rows):
                ref = asyncio.run(load(base, route, c, a.seconds, a.items)).row()
                rows[i] = (route, c, res, ref)
                print(f"baseline  {route:9} c={c:<3} {ref['rps']:8.1f} req/s  p50 {ref['p50']:7.1f} ms  "
                      f"p99 {ref['p99']:7.1f} ms  errors {ref['errors']}", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(table(rows, a.items, a.device))


def table(rows: list[tuple[str, int, dict, dict | None]], items: int, device: str = "cpu") -> str:
    head = ("| route | conc. | req/s | items/s | p50 ms | p95 ms | p99 ms | errors | mean batch "
            "| baseline req/s | baseline p50 / p99 ms | baseline errors | ratio |")
    lines = [f"\n{items} item(s) per request, ONNX Runtime on {device}\n", head, "|" + " --- |" * 13]
    for route, c, r, b in rows:
        base = (f"{b['rps']:.1f} | {b['p50']:.1f} / {b['p99']:.1f} | {b['errors']} | {r['rps'] / b['rps']:.2f}x"
                if b and b["rps"] else "- | - | - | -")
        batch = "-" if np.isnan(r["batch"]) else f"{r['batch']:.2f}"  # the translator has no request batches
        lines.append(f"| {route} | {c} | {r['rps']:.1f} | {r['items_s']:.1f} | {r['p50']:.1f} | {r['p95']:.1f} | "
                     f"{r['p99']:.1f} | {r['errors']} | {batch} | {base} |")
    return "\n".join(lines)
