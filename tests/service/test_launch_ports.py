"""`attnserve serve` cannot lose its own ports to a race (service/launch/ports.py).

The failure this guards against: a port chosen by binding port 0 is an ephemeral port, and Ray's processes take
ephemeral ports between the choice and Ray's bind ("Failed to bind to address 127.0.0.1:34145", about one start
in a dozen). The chooser is exercised thousands of times against the kernel's real range, then the real service
is started a few times in a row (slow, under the heavy lock).
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
from pathlib import Path

import pytest

from service.launch.ports import PREFERRED, RAY_RANGES, candidates, choose_port, ephemeral_range, is_free


def in_any(port: int, ranges) -> bool:
    return any(lo <= port <= hi for lo, hi in ranges)


def test_the_kernels_range_is_read():
    lo, hi = ephemeral_range()
    if Path("/proc/sys/net/ipv4/ip_local_port_range").exists():
        assert (lo, hi) == tuple(int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert 1024 <= lo < hi <= 65535


def test_a_thousand_choices_stay_outside_the_ephemeral_and_rays_ranges_and_are_distinct():
    eph = ephemeral_range()
    taken: set[int] = set()
    rng = random.Random(17)
    for _ in range(1000):
        port = choose_port(taken=taken, rng=rng)
        assert not in_any(port, [eph, *RAY_RANGES]), port
    assert len(taken) == 1000  # never the same port twice within one start


def test_an_ephemeral_range_over_the_preferred_band_falls_back_to_what_is_left():
    pool = candidates((1024, 29999))
    assert pool and min(pool) >= 10000 and not in_any(min(pool), RAY_RANGES)
    assert all(not in_any(p, [(1024, 29999), *RAY_RANGES]) for p in pool[:: max(len(pool) // 500, 1)])
    assert candidates((32768, 60999))[0] == PREFERRED[0]


def test_a_port_in_use_is_never_chosen():
    with socket.socket() as held:
        held.bind(("127.0.0.1", candidates()[0]))
        held.listen()
        busy = held.getsockname()[1]
        assert not is_free(busy)
        # Every other candidate taken but one free port: the chooser finds that one, never the busy one.
        pool, rng = candidates(), random.Random(0)
        free = next(p for p in pool[1:] if is_free(p))
        for _ in range(50):
            assert choose_port(rng=rng, taken=set(pool) - {busy, free}) == free


def test_the_race_cannot_happen_ephemeral_sockets_opened_after_the_choice_never_take_it():
    """What Ray's processes do between the choice and the bind: open many sockets on ephemeral ports. Each one
    lands in the kernel's range, so the chosen ports all stay bindable."""
    taken: set[int] = set()
    chosen = [choose_port(taken=taken) for _ in range(20)]
    eph, others = ephemeral_range(), []
    try:
        for _ in range(2000):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            others.append(s)
            assert eph[0] <= s.getsockname()[1] <= eph[1]
        assert all(is_free(p) for p in chosen)
    finally:
        for s in others:
            s.close()


@pytest.mark.slow
def test_the_service_starts_every_time(service_artifacts: Path, tmp_path: Path):
    """A few real starts in a row (ATTNSERVE_START_REPEATS, default 3): each must come up ready and answer.
    Each start chooses the port behind the front and Ray's two metric ports itself. The last one also logs
    JSON (--log-format json): every line Serve logged is one JSON object."""
    from local_serve import shipped_config, start_service, stop_service

    config = shipped_config()
    for app in config["applications"]:
        app["args"]["artifact_root"] = str(service_artifacts)
    n = int(os.environ.get("ATTNSERVE_START_REPEATS", "3"))
    for i in range(n):
        (tmp_path / f"start{i}").mkdir()
        json_logs = i == n - 1
        svc, proc = start_service(config, tmp_path / f"start{i}", args=("--log-format", "json") if json_logs else ())
        try:
            with svc.client() as c:
                assert c.get("/readyz").status_code == 200
                r = c.post("/v1/translate", json={"texts": ["Hello."]})
                assert r.status_code == 200, r.text
            if json_logs:
                assert_json_logs(svc.log.read_text())
        finally:
            stop_service(proc)
        assert proc.returncode == 0, svc.log.read_text()[-1000:]
        log = svc.log.read_text()
        assert "Failed to bind" not in log and "proxy restarted" not in log, log[-1000:]


def assert_json_logs(ready_log: str) -> None:
    """Every line Serve logged (controller, app builds, proxy, replicas) is one JSON object."""
    folder = Path(re.search(r"^  logs +(\S+)$", ready_log, re.M).group(1))
    logs = {f.name: [line for line in f.read_text().splitlines() if line.strip()] for f in folder.glob("*.log")}
    assert any(name.startswith("controller_") and lines for name, lines in logs.items()), sorted(logs)
    for name, lines in logs.items():
        for line in lines:
            record = json.loads(line)  # fails on any line that is not JSON
            assert {"asctime", "levelname", "message", "component_name"} <= record.keys(), (name, record)
