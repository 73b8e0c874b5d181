"""`attnserve serve` as a subprocess on free loopback ports: shared by tests/service and tests/reliability.

Ray starts as shipped (token auth with a per-start token, loopback node); the caller's Ray and artifact
variables are dropped so the config given here is what runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from service.launch.ports import choose_port

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """Outside the ephemeral range, as `attnserve serve` chooses its own (service/launch/ports.py): the service
    binds it seconds later, and Ray's processes take ephemeral ports meanwhile."""
    return choose_port()


def shipped_config() -> dict:
    return yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())


@dataclass
class Service:
    base: str
    metrics_url: str
    config: dict
    log: Path
    pid: int  # the `attnserve serve` process; Ray's processes are its descendants
    front_metrics_url: str = ""  # HAProxy's Prometheus exporter (service/launch/front.py)

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=120, **kw)


def start_service(config: dict, tmp: Path, env: dict[str, str] | None = None,
                  args: tuple[str, ...] = ()) -> tuple[Service, subprocess.Popen]:
    """Start with ``config`` and wait until ready (minutes on a loaded 2-core machine); fail with its log."""
    (tmp / "serve_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    port, metrics_port, front_metrics_port = free_port(), free_port(), free_port()
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    for var in ("ATTNSERVE_ARTIFACTS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        full_env.pop(var, None)
    log = tmp / "serve.log"
    cmd = [sys.executable, "-m", "service.cli", "serve", "--config", str(tmp / "serve_config.yaml"),
           "--port", str(port), "--metrics-port", str(metrics_port),
           "--front-metrics-port", str(front_metrics_port), "--no-export", *args]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while "Ctrl-C to stop" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_service(proc)
            pytest.fail(f"attnserve serve did not become ready:\n{log.read_text()[-4000:]}")
        time.sleep(1)
    return Service(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", config, log,
                   proc.pid, f"http://127.0.0.1:{front_metrics_port}/metrics"), proc


def stop_service(proc: subprocess.Popen) -> None:
    """SIGTERM (the service drains and stops Ray), SIGKILL after 90 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
