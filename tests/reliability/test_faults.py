"""Fault tests on a private `attnserve serve`: overload, a killed replica, SIGTERM under load.

Loopback only, time-bounded; each test prints a `RELIABILITY-RESULT` line (`pytest -s`) with its figures.
Order matters: the overload test measures capacity on a fresh service, SIGTERM ends the service.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections import Counter

import aiohttp
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.soak import ClosedLoop, Sample, replica_processes
from service.client import ApiError, Client

pytestmark = pytest.mark.slow

BODY = {"texts": ["The cat sleeps on the red chair."], "max_new_tokens": 16}
TRANSLATOR = "ray::ServeReplica:translator:Translator"
CLIENTS = 8
DEADLINE_MS = 5000


def result(name: str, **figures: object) -> None:
    print(f"\nRELIABILITY-RESULT {name} " + " ".join(f"{k}={v}" for k, v in figures.items()), flush=True)


def json_error(s: Sample) -> dict | None:
    try:
        body = json.loads(s.body)
    except ValueError:
        return None
    return body.get("error") if isinstance(body, dict) else None


def capacity(url: str, body: dict, seconds: float = 8.0) -> float:
    """Successful requests/s of `CLIENTS` closed-loop clients, after a short warm-up."""
    load = ClosedLoop(url, body, CLIENTS).start()
    time.sleep(2.0)
    t = load.elapsed()
    time.sleep(seconds)
    done = [s for s in load.since(t) if s.status == 200]
    load.stop()
    return len(done) / seconds


async def open_loop(url: str, body: dict, rate: float, seconds: float) -> tuple[list[Sample], float]:
    """Requests sent at `rate`/s for `seconds`, whatever the answers; returns every answer and the time taken.

    aiohttp rather than httpx: the generator shares the service's two cores, and at 3x capacity httpx spent
    most of one (an 8-second schedule then took 38 s, measured 2026-11-22)."""
    samples: list[Sample] = []
    headers = {"X-Timeout-Ms": str(DEADLINE_MS)}
    timeout = aiohttp.ClientTimeout(total=DEADLINE_MS / 1000 + 15)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), headers=headers,
                                     timeout=timeout) as client:
        t0 = time.monotonic()

        async def one() -> None:
            t = time.monotonic()
            try:
                async with client.post(url, json=body) as r:
                    text = (await r.read()).decode("utf-8", "replace")
                    s = Sample(0, r.status, 0, "" if r.status == 200 else text[:300], dict(r.headers))
            except (aiohttp.ClientError, TimeoutError) as e:
                s = Sample(0, -1, 0, repr(e)[:300])
            s.seconds, s.t = time.monotonic() - t, time.monotonic() - t0
            samples.append(s)

        tasks = []
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
        return samples, time.monotonic() - t0


def front_denied(url: str) -> float:
    """Requests the front (HAProxy) refused itself, before Serve saw them."""
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        if family.name == "haproxy_frontend_requests_denied":
            return sum(x.value for x in family.samples if x.labels.get("proxy") == "attnserve")
    raise AssertionError("haproxy_frontend_requests_denied_total not exported")


def quantile(xs: list[float], q: float) -> str:
    xs = sorted(xs)
    return f"{xs[int(q * (len(xs) - 1))]:.2f}" if xs else "nan"


# Four sentences, 64 new tokens each: capacity is the model's (decoder steps), which admission control is for.
COMPUTE_BODY = {"texts": [
    "The old man who lived near the river told us a long story about his childhood in the mountains.",
    "We should have left the house earlier, because the train to the city was already full when we arrived.",
    "She asked me whether I had ever read the book that her father wrote before the war.",
    "If it rains tomorrow, we will stay at home and watch a movie with our friends.",
], "max_new_tokens": 64}


@pytest.mark.parametrize(("case", "body"), [
    ("compute", COMPUTE_BODY),  # capacity is the model's (decoder steps), which admission control is for
    # One short sentence: capacity is the HTTP stack's. Without the front a refusal cost ~8 ms of Python (Serve's
    # proxy, the replica's gate), nearly a success, and goodput was 0.35-0.66 of capacity; the front (HAProxy,
    # service/launch/front.py) refuses in microseconds: 1.15 and 1.42 measured (2026-11-22).
    ("light", BODY),
])
def test_overload_sheds_with_json_503_and_keeps_goodput(own_service, case: str, body: dict) -> None:
    """The issue's goal: at 3x capacity, goodput >= 90% of capacity, every answer a 200 or the service's JSON
    503 with Retry-After, within the deadline; no replica dies. (Capacity is that of `CLIENTS` closed-loop
    clients; the front admits more at once, so goodput can exceed it.)"""
    svc, _ = own_service
    url = svc.base + "/v1/translate"
    pids = {p.pid for p in replica_processes(svc.pid)}
    cap = capacity(url, body)
    assert cap > 0
    denied = front_denied(svc.front_metrics_url)
    samples, took = asyncio.run(open_loop(url, body, 3 * cap, 10.0))
    denied = front_denied(svc.front_metrics_url) - denied
    statuses = Counter(s.status for s in samples)
    ok = [s for s in samples if s.status == 200]
    shed = [s for s in samples if s.status == 503]
    goodput = len(ok) / took
    plain_503 = [s for s in shed if json_error(s) is None]
    result(f"overload-{case}", capacity_rps=f"{cap:.1f}", offered_rps=f"{3 * cap:.1f}", goodput_rps=f"{goodput:.1f}",
           goodput_ratio=f"{goodput / cap:.2f}", statuses=dict(statuses), front_refused=int(denied),
           proxy_plain_503=len(plain_503),
           schedule_s=f"{took:.1f}", ok_p50_s=quantile([s.seconds for s in ok], 0.5),
           ok_p99_s=quantile([s.seconds for s in ok], 0.99), refused_p50_s=quantile([s.seconds for s in shed], 0.5),
           refused_p99_s=quantile([s.seconds for s in shed], 0.99),
           slowest_s=quantile([s.seconds for s in samples], 1.0))
    assert set(statuses) <= {200, 503}, [s.body for s in samples if s.status not in (200, 503)][:3]
    assert not plain_503, f"Serve's proxy answered {len(plain_503)} plain-text 503s: {plain_503[0].body!r}"
    for s in shed:
        assert int(s.headers["Retry-After"]) >= 1
        assert json_error(s)["code"] == "overloaded", s.body
    # Every answer within the client's deadline (X-Timeout-Ms), plus a second for the trip through the proxy.
    late = [s for s in samples if s.seconds > DEADLINE_MS / 1000 + 1.0]
    assert not late, f"{len(late)} answers after the deadline, slowest {max(s.seconds for s in late):.1f} s"
    assert goodput >= 0.9 * cap
    assert {p.pid for p in replica_processes(svc.pid)} == pids, "a replica died (OOM?) under overload"


class RetryingClients:
    """`n` threads calling the service through `service.client.Client`, which retries what a dead replica lost."""

    def __init__(self, base: str, n: int) -> None:
        self.base, self.ok, self.failed = base, 0, []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def _run(self) -> None:
        with Client(self.base, retries=8, backoff_s=0.25, timeout_s=60) as c:
            while not self._stop.is_set():
                try:
                    c.translate(BODY["texts"], max_new_tokens=BODY["max_new_tokens"])
                    self.ok += 1
                except ApiError as e:
                    self.failed.append(str(e)[:200])

    def start(self) -> RetryingClients:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=90)


def test_sigkill_replica_under_load(own_service) -> None:
    svc, _ = own_service
    url = svc.base + "/v1/translate"
    load = ClosedLoop(url, BODY, CLIENTS, timeout_s=60).start()
    retrying = RetryingClients(svc.base, 4).start()  # the same kill, seen through the typed client
    time.sleep(5.0)
    before = [s for s in load.since(1.0) if s.status == 200]
    rate = len(before) / (load.elapsed() - 1.0)
    (victim,) = replica_processes(svc.pid, TRANSLATOR)
    t_kill, in_flight = load.elapsed(), load.in_flight
    victim.send_signal(signal.SIGKILL)
    recovered = None
    while load.elapsed() < t_kill + 90:
        time.sleep(0.5)
        now = load.elapsed()
        if now - t_kill < 2.0:
            continue
        window = [s for s in load.since(now - 2.0) if s.status == 200]
        if len(window) / 2.0 >= 0.5 * rate:
            recovered = now - 2.0 - t_kill  # the start of the first 2 s window back at half the rate or more
            break
    time.sleep(2.0)  # the retrying clients' last retries
    samples = load.stop()
    retrying.stop()
    after = [s for s in samples if s.t >= t_kill]
    failed = [s for s in after if s.status != 200]
    hung = [s for s in samples if s.status == -1 and "Timeout" in s.body]
    new = replica_processes(svc.pid, TRANSLATOR)
    result("sigkill", rate_before_rps=f"{rate:.1f}", in_flight_at_kill=in_flight, failed=len(failed),
           failed_statuses=dict(Counter(s.status for s in failed)), hung=len(hung),
           recovery_s=f"{recovered:.1f}" if recovered is not None else "none",
           new_replica=[p.pid for p in new] != [victim.pid] and bool(new),
           failure_sample=(failed[0].body[:120] if failed else ""),
           retrying_client_ok=retrying.ok, retrying_client_failed=len(retrying.failed))
    assert recovered is not None, "throughput did not come back within 90 s"
    assert len(failed) <= in_flight, [s.body for s in failed][:3]
    assert not hung
    assert new and new[0].pid != victim.pid
    # Inference is idempotent: the typed client retries what the dead replica lost (the proxy's plain 500).
    assert not retrying.failed, retrying.failed[:3]
    assert retrying.ok > 0


def test_sigterm_drains_in_flight_and_loses_nothing(own_service) -> None:
    svc, proc = own_service
    url = svc.base + "/v1/translate"
    load = ClosedLoop(url, BODY, CLIENTS, timeout_s=60).start()
    time.sleep(4.0)
    t_term, in_flight = load.elapsed(), load.in_flight
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    t_gone = load.elapsed()
    time.sleep(1.0)  # a few attempts against the closed port
    samples = load.stop()
    after = [s for s in samples if s.t >= t_term]
    started_before = [s for s in after if s.t - s.seconds < t_term]

    def kind(s: Sample) -> str:
        if s.status == -1:
            return "refused" if "ConnectError" in s.body else "dropped"
        return str(s.status)

    kinds = Counter(kind(s) for s in after)
    # Lost = admitted work without its answer. Everything in flight at SIGTERM must complete; afterwards the
    # replicas are draining and admit nothing (503), so a connection the proxy closes in its final teardown
    # ("dropped") carried no admitted work: like "refused", a client retries it. Both are counted.
    lost = [s for s in started_before if s.status != 200] + [s for s in after if s.status >= 500 and s.status != 503]
    result("sigterm", in_flight_at_term=in_flight, in_flight_ok=sum(s.status == 200 for s in started_before),
           outcomes=dict(kinds), lost=len(lost), exit_s=f"{t_gone - t_term:.1f}", returncode=proc.returncode,
           lost_sample=(lost[0].body[:120] if lost else ""))
    assert proc.returncode == 0
    assert all(s.status == 200 for s in started_before), Counter(kind(s) for s in started_before)
    assert not lost, [s.body for s in lost][:3]
    assert kinds["503"] > 0, "new requests during the drain should get a 503"
    assert set(kinds) <= {"200", "503", "refused", "dropped"}
    for s in after:
        if s.status == 503:
            # overloaded: a draining replica, or the front while Serve is gone; unavailable: Serve's proxy closed
            # the front's connection in its teardown (service/launch/front.py)
            assert json.loads(s.body)["error"]["code"] in ("overloaded", "unavailable")
            assert int(s.headers["retry-after"]) >= 1
