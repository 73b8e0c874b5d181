"""`attnserve bench engine`: the continuous-batching engine vs the previous request-level batching, same load.

Open loop: requests arrive as a Poisson process at each rate, whether or not earlier ones have finished, for
``--seconds`` per point; then the run drains. Each request is one test-split sentence (spread over the whole
length range), ~20% with beam 4, ~20% with the alignment, max 128 new tokens. Both arms run the same arrival
schedule on the same artifact in this process, one ONNX Runtime thread each, one after the other:

- engine: `TranslatorRuntime.new_engine()` driven by its own thread, as the translator replica runs it;
  a request's first token time is when its first token leaves the engine (streaming).
- request-level (baseline, the previous serving path): `@serve.batch` semantics re-created outside Serve
  (up to 16 requests, 10 ms batch wait, one batch at a time), requests grouped by (attention, beam, max new
  tokens) and each group decoded to the end by `TranslatorRuntime.translate` (host-side loop); the first token
  is only available when the whole group is done.

Goodput counts generated tokens of requests answered within the p99 bound (``--bound``). The last table gives
the highest rate each arm sustains: every request answered, p99 latency within the bound.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from bench.runtime import check_device
from service.runtime import TranslatorRuntime, find_artifact
from service.runtime.engine import EngineSettings, Sequence

MAX_NEW = 128


@dataclass
class Req:
    text: str
    beam: int
    attn: bool
    arrive: float = 0.0  # offset in the schedule, seconds
    sent: float = 0.0
    first: float | None = None
    done: float | None = None
    tokens: int = 0


@dataclass
class Point:
    arm: str
    rate: float
    reqs: list[Req] = field(default_factory=list)
    seconds: float = 0.0

    def row(self, bound: float) -> dict[str, float]:
        lat = np.array([r.done - r.sent for r in self.reqs if r.done is not None])
        ttft = np.array([r.first - r.sent for r in self.reqs if r.first is not None])
        good = sum(r.tokens for r in self.reqs if r.done is not None and r.done - r.sent <= bound)
        return {
            "answered": len(lat) / max(len(self.reqs), 1),
            "rps": len(lat) / self.seconds,
            "goodput": good / self.seconds,
            "ttft50": float(np.percentile(ttft, 50)) if len(ttft) else float("nan"),
            "p50": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "p99": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
        }


def workload(texts: list[str], rate: float, seconds: float, seed: int) -> list[Req]:
    rng = random.Random(seed)
    out, t = [], rng.expovariate(rate)
    while t < seconds:
        out.append(Req(rng.choice(texts), beam=4 if rng.random() < 0.2 else 1, attn=rng.random() < 0.2, arrive=t))
        t += rng.expovariate(rate)
    return out


async def replay(reqs: list[Req], submit, drain_s: float) -> float:
    """Send each request at its arrival time (submit returns an awaitable); returns the elapsed seconds."""
    loop, t0 = asyncio.get_running_loop(), time.monotonic()
    tasks = []
    for r in reqs:
        delay = t0 + r.arrive - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        r.sent = time.monotonic()
        tasks.append(loop.create_task(submit(r)))
    await asyncio.wait(tasks, timeout=drain_s)
    return time.monotonic() - t0


class EngineArm:
    def __init__(self, rt: TranslatorRuntime, settings: EngineSettings) -> None:
        self.rt, self.engine = rt, rt.new_engine(settings)
        self.wake, self.stop = threading.Event(), False
        self.steps = self.rows = 0
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop:
            if self.engine.idle:
                self.wake.wait(0.01)
                self.wake.clear()
                continue
            stats = self.engine.iterate()
            if stats.rows:
                self.steps, self.rows = self.steps + 1, self.rows + stats.sequences

    async def submit(self, r: Req) -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        seq, *_ = self.rt.sequence(r.text, beam_size=r.beam, max_new_tokens=MAX_NEW, return_attention=r.attn)

        def on_token(s: Sequence, tok: int, row) -> None:
            if r.first is None:
                r.first = time.monotonic()

        def on_done(s: Sequence) -> None:
            r.done, r.tokens = time.monotonic(), len(s.tokens)
            r.first = r.first or r.done  # beams: the whole answer is the first thing a client sees
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(None))

        seq.on_token, seq.on_done = on_token, on_done
        self.engine.submit(seq)
        self.wake.set()
        await fut

    def close(self) -> None:
        self.stop = True
        self.thread.join()


class RequestLevelArm:
    """The previous path: @serve.batch semantics over the host-side decoding loop (see the module doc)."""

    def __init__(self, rt: TranslatorRuntime, max_batch: int = 16, wait_s: float = 0.01) -> None:
        self.rt, self.max_batch, self.wait_s = rt, max_batch, wait_s
        self.queue: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None
        self.batches = self.requests = 0

    async def submit(self, r: Req) -> None:
        if self.queue is None:
            self.queue = asyncio.Queue()
            self.worker = asyncio.get_running_loop().create_task(self.run())
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((r, fut))
        await fut

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), max(0.0, deadline - time.monotonic())))
                except TimeoutError:
                    break
            self.batches, self.requests = self.batches + 1, self.requests + len(batch)
            groups: dict[tuple[bool, int], list] = defaultdict(list)
            for item in batch:
                groups[(item[0].attn, item[0].beam)].append(item)
            for (attn, beam), items in groups.items():
                texts = [r.text for r, _ in items]
                res = await loop.run_in_executor(None, lambda t=texts, a=attn, b=beam: self.rt.translate(
                    t, beam_size=b, max_new_tokens=MAX_NEW, return_attention=a))
                now = time.monotonic()
                for (r, _), out in zip(items, res, strict=True):
                    r.first = r.done = now
                    r.tokens = len(out.target_tokens)
            for _, fut in batch:  # @serve.batch resolves every request of a batch together
                fut.set_result(None)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.cancel()


def test_texts(limit: int) -> list[str]:
    from models.data import spa_eng_splits  # the split only: models.data does not import torch

    pairs = spa_eng_splits()["test"]
    idx = np.linspace(0, len(pairs) - 1, min(limit, len(pairs))).astype(int)  # sorted by length: spread
    return [pairs[i][0] for i in idx]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="attnserve bench engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default="artifacts", help="artifact root (attnserve export)")
    p.add_argument("--rates", nargs="+", type=float, default=[16, 32, 48, 64, 72, 80, 96],
                   help="arrival rates (requests/s), one table row each")
    p.add_argument("--seconds", type=float, default=15.0, help="arrivals per point")
    p.add_argument("--drain", type=float, default=60.0, help="max wait for the last answers of a point")
    p.add_argument("--bound", type=float, default=2.0, help="p99 latency bound for goodput and sustained rate, s")
    p.add_argument("--slots", type=int, default=64, help="engine max_slots")
    p.add_argument("--arms", nargs="+", default=["engine", "request-level"], choices=["engine", "request-level"],
                   help="which batching to measure (default: both)")
    p.add_argument("--precision", default="fp32", help="exported graph: fp32, int8 or fp16")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrivals and texts")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="ONNX Runtime provider of both arms (cuda: the engine keeps its decode state on the GPU; "
                   "fails when ONNX Runtime has no CUDA provider)")
    a = p.parse_args(argv)
    check_device(a.device)

    rt = TranslatorRuntime(find_artifact(a.artifacts, "translator-en-es"), precision=a.precision, device=a.device)
    texts = test_texts(2000)
    rt.translate_engine(texts[:8])  # warm up both paths
    rt.translate(texts[:8])
    print(f"# {rt.name}/{rt.version} {a.precision} on {rt.device}, 1 ORT thread; Poisson arrivals for "
          f"{a.seconds:g} s per rate; mix: test split, 20% beam 4, 20% alignment, max {MAX_NEW} new tokens", flush=True)
    points: list[Point] = []
    for rate in a.rates:
        reqs_template = workload(texts, rate, a.seconds, a.seed + int(rate * 1000))
        for arm_name in a.arms:
            reqs = [Req(r.text, r.beam, r.attn, r.arrive) for r in reqs_template]
            arm = EngineArm(rt, EngineSettings(max_slots=a.slots)) if arm_name == "engine" else RequestLevelArm(rt)
            elapsed = asyncio.run(replay(reqs, arm.submit, a.drain))
            arm.close()
            pt = Point(arm_name, rate, reqs, max(elapsed, a.seconds))
            points.append(pt)
            row = pt.row(a.bound)
            extra = (f"seq/step {arm.rows / max(arm.steps, 1):5.1f}" if arm_name == "engine"
                     else f"req/batch {arm.requests / max(arm.batches, 1):5.1f}")
            print(f"  rate {rate:5.1f}/s {arm_name:13} answered {row['answered']:6.1%} {row['rps']:6.1f} req/s "
                  f"goodput {row['goodput']:7.1f} tok/s  TTFT p50 {row['ttft50'] * 1e3:7.0f} ms  "
                  f"latency p50 {row['p50'] * 1e3:7.0f} p99 {row['p99'] * 1e3:7.0f} ms  {extra}", flush=True)
    print_tables(points, a)


def print_tables(points: list[Point], a) -> None:
    print(f"\n| rate (req/s) | arm | answered | req/s | goodput (tok/s, p99 ≤ {a.bound:g} s) | TTFT p50 (ms) "
          "| latency p50 (ms) | latency p99 (ms) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for pt in points:
        r = pt.row(a.bound)
        print(f"| {pt.rate:g} | {pt.arm} | {r['answered']:.1%} | {r['rps']:.1f} | {r['goodput']:.0f} | "
              f"{r['ttft50'] * 1e3:.0f} | {r['p50'] * 1e3:.0f} | {r['p99'] * 1e3:.0f} |")
    best: dict[str, float] = {}
    for pt in points:
        r = pt.row(a.bound)
        if r["answered"] == 1.0 and r["p99"] <= a.bound:
            best[pt.arm] = max(best.get(pt.arm, 0.0), pt.rate)
    peak = {arm: max((pt.row(a.bound)["rps"] for pt in points if pt.arm == arm), default=0.0) for arm in a.arms}
    print(f"\n| arm | highest rate tested with every request answered and p99 ≤ {a.bound:g} s | peak answered req/s |")
    print("|---|---:|---:|")
    for arm in a.arms:
        print(f"| {arm} | {best.get(arm, 0):g} req/s | {peak[arm]:.1f} |")
    if len(best) == 2 and best.get("request-level"):
        print(f"\nengine ÷ request-level sustained rate: {best['engine'] / best['request-level']:.2f}×")
