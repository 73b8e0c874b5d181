"""A private `attnserve serve` per module for the fault tests (never the session service of tests/service).

One replica per model deployment (no autoscaling, so a killed replica is replaced, not scaled around), the
real artifacts, loopback ports, token auth as shipped.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TRANSLATOR_MAX_PENDING = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    base: str
    metrics_url: str
    config: dict
    log: Path
    pid: int  # the `attnserve serve` process; Ray's processes are its descendants


def small_config(artifacts: Path) -> dict:
    config = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())
    for app in config["applications"]:
        app["args"]["artifact_root"] = str(artifacts)
        app["args"]["translator"] = {**app["args"]["translator"], "max_pending": TRANSLATOR_MAX_PENDING}
        for d in app["deployments"]:
            d.pop("autoscaling_config", None)
            d["num_replicas"] = 1
            if d["name"] == "Translator":
                d["graceful_shutdown_timeout_s"] = 20
    return config


def start_service(artifacts: Path, tmp: Path) -> tuple[Service, subprocess.Popen]:
    config = small_config(artifacts)
    (tmp / "serve_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("ATTNSERVE_ARTIFACTS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(var, None)
    log = tmp / "serve.log"
    cmd = [sys.executable, "-m", "service.cli", "serve", "--config", str(tmp / "serve_config.yaml"),
           "--port", str(port), "--metrics-port", str(metrics_port), "--no-export"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while "Ctrl-C to stop" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"attnserve serve did not become ready:\n{log.read_text()[-4000:]}")
        time.sleep(1)
    return Service(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", config, log,
                   proc.pid), proc


def stop_service(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def own_service(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """(Service, Popen): the tests may kill parts of it, or all of it (then teardown has nothing to do)."""
    override = os.environ.get("ATTNSERVE_TEST_ARTIFACTS")
    artifacts = Path(override) if override else request.getfixturevalue("artifacts_dir")
    svc, proc = start_service(artifacts, tmp_path_factory.mktemp("reliability"))
    try:
        yield svc, proc
    finally:
        stop_service(proc)
