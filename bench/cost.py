"""`attnserve bench cost`: what one request costs in CPU in each process of the serving path, per route.

Sends `--requests` requests at `--concurrency` (closed loop, the bodies of `bench http`) to a running service,
reads each process's CPU time (user + system, psutil) before and after, and divides the difference by the
requests answered. The processes are the `attnserve serve` process tree (found from the process listening on
--url's port: HAProxy's parent when the front is on, else the Serve proxy's root), grouped by role from their
process titles as bench/soak.py finds replicas: the HAProxy front, Serve's proxy, each Serve replica
(`ray::ServeReplica:<app>:<deployment>`: Serve's wrapper, the ASGI middleware, validation, the model, JSON:
one process, so one number), Serve's controller, the `attnserve serve` driver, and Ray's own processes.
Then the same load against the single-process baseline (bench/baseline_server.py), whose one process does all
of it. CPU time does not depend on how busy the machine is as much as latency does, but batching does depend
on concurrency: compare rows of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import defaultdict
from urllib.parse import urlparse

import httpx
import psutil

from bench.http import add_load_args, bodies, start_baseline

WARMUP = 20


def listener(port: int) -> psutil.Process:
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid:
            return psutil.Process(c.pid)
    raise SystemExit(f"attnserve bench cost: nothing of this user's listens on port {port}")


def role(p: psutil.Process) -> str:
    """A short name for what a process of the serving tree does."""
    try:
        cmd = p.cmdline()
        name = p.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "gone"
    title = cmd[0] if cmd else name
    if "haproxy" in name:
        return "front (haproxy)"
    if title.startswith("ray::ServeReplica:"):
        app = title.removeprefix("ray::ServeReplica:").split(":")[0]
        return f"replica {app}"
    if title.startswith("ray::ProxyActor"):
        return "Serve proxy"
    if title.startswith("ray::ServeController"):
        return "Serve controller"
    if "service.cli" in " ".join(cmd) or "attnserve" in " ".join(cmd[:2]):
        return "attnserve serve (driver)"
    return "Ray (gcs, raylet, agents, idle workers)"


def serving_tree(port: int) -> tuple[psutil.Process, list[psutil.Process]]:
    """The `attnserve serve` process that serves `port` (an ancestor of its listener) and its whole tree."""
    root: psutil.Process | None = listener(port)
    while root is not None and role(root) != "attnserve serve (driver)":
        root = root.parent()
    if root is None:
        raise SystemExit(f"attnserve bench cost: port {port} is not served by an `attnserve serve` process tree")
    return root, [root, *root.children(recursive=True)]


def cpu(procs: list[psutil.Process]) -> dict[int, float]:
    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system  # not children_*: a child counts itself
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return out


async def send(base: str, route: str, n: int, concurrency: int, items: int) -> tuple[int, int, float]:
    """n requests, `concurrency` at a time; (answered 200, failed, seconds)."""
    reqs = bodies(route, items)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    ok = failed = 0
    left = n
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:

        async def worker(k: int) -> None:
            nonlocal ok, failed, left
            i = k
            while left > 0:
                left -= 1
                try:
                    r = await client.post(f"/v1/{route}", json=reqs[i % len(reqs)])
                    good = r.status_code == 200
                except httpx.HTTPError:
                    good = False
                ok, failed = ok + good, failed + (not good)
                i += concurrency

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        return ok, failed, time.perf_counter() - t0


def measure(base: str, procs: list[psutil.Process], route: str, n: int, concurrency: int,
            items: int) -> tuple[dict[str, float], int, int, float]:
    """CPU ms per answered request by role, with the requests answered, failed and the wall time."""
    asyncio.run(send(base, route, WARMUP, concurrency, items))  # connections, caches, replica threads
    before = cpu(procs)
    ok, failed, seconds = asyncio.run(send(base, route, n, concurrency, items))
    after = cpu(procs)
    by_role: dict[str, float] = defaultdict(float)
    for p in procs:
        if p.pid in before and p.pid in after:
            by_role[role(p)] += after[p.pid] - before[p.pid]
    return {k: 1000 * v / max(ok, 1) for k, v in by_role.items()}, ok, failed, seconds


ORDER = ["front (haproxy)", "Serve proxy", "replica translator", "replica classifier", "replica api",
         "Serve controller", "attnserve serve (driver)", "Ray (gcs, raylet, agents, idle workers)"]


def table(rows: list[tuple[str, int, dict[str, float], int, int, float, float | None]]) -> str:
    roles = [r for r in ORDER if any(r in row[2] for row in rows)]
    roles += sorted({k for row in rows for k in row[2]} - set(roles))
    head = ["route", "conc."] + [f"{r} ms" for r in roles] + ["total ms", "baseline ms", "answered", "failed",
                                                               "req/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for route, c, per, ok, failed, rps, base in rows:
        cells = [route, str(c)] + [f"{per.get(r, 0.0):.2f}" for r in roles]
        cells += [f"{sum(per.values()):.2f}", "-" if base is None else f"{base:.2f}", str(ok), str(failed),
                  f"{rps:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="attnserve bench cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the running attnserve (loopback only)")
    add_load_args(p, concurrency=[1, 32])
    p.add_argument("--requests", type=int, default=400, help="per route and concurrency")
    a = p.parse_args(argv)
    url = urlparse(a.url)
    if url.hostname not in ("127.0.0.1", "localhost"):
        sys.exit("attnserve bench cost: loopback only (--url http://127.0.0.1:PORT)")

    root, procs = serving_tree(url.port or 80)
    print(f"serving tree of pid {root.pid}: {len(procs)} processes", flush=True)
    rows = []
    for route in a.routes:
        for c in a.concurrency:
            per, ok, failed, seconds = measure(a.url, procs, route, a.requests, c, a.items)
            rows.append([route, c, per, ok, failed, ok / seconds, None])
            print(f"attnserve {route:9} c={c:<3} total {sum(per.values()):6.2f} ms CPU/request  "
                  + "  ".join(f"{k} {v:.2f}" for k, v in sorted(per.items())), flush=True)
    if not a.no_baseline:
        proc = start_baseline(a.baseline_port, a.artifacts)
        try:
            base = psutil.Process(proc.pid)
            for row in rows:
                per, ok, failed, seconds = measure(f"http://127.0.0.1:{a.baseline_port}", [base], row[0],
                                                   a.requests, row[1], a.items)
                row[6] = sum(per.values())
                print(f"baseline  {row[0]:9} c={row[1]:<3} total {row[6]:6.2f} ms CPU/request "
                      f"({ok / seconds:.1f} req/s, {failed} failed)", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"\nCPU ms per answered request, by process ({a.items} item(s) per request, {a.requests} requests)\n")
    print(table([tuple(r) for r in rows]))
