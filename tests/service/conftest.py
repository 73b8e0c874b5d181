"""One real attnserve for all HTTP tests: `attnserve serve` in a subprocess on free loopback ports.

The config is deploy/serve_config.yaml with the artifact root pointed at the real artifacts and a few limits
tightened so every error status is reachable with small requests. $ATTNSERVE_TEST_ARTIFACTS points the app at
another artifact root (for iterating on the service before the trained checkpoints exist).
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

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TEST_LIMITS = {"max_body_bytes": 1_000_000, "max_image_pixels": 1_000_000, "max_text_chars": 300}
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

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=120, **kw)


def test_config(artifacts: Path) -> dict:
    config = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())
    for app in config["applications"]:
        args = app["args"]
        args["artifact_root"] = str(artifacts)
        args["limits"] = {**args["limits"], **TEST_LIMITS}
        args["translator"] = {**args["translator"], "max_pending": TRANSLATOR_MAX_PENDING}
    return config


@pytest.fixture(scope="session")
def service_artifacts(request: pytest.FixtureRequest) -> Path:
    override = os.environ.get("ATTNSERVE_TEST_ARTIFACTS")
    return Path(override) if override else request.getfixturevalue("artifacts_dir")


@pytest.fixture(scope="session")
def service(service_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("serve")
    config = test_config(service_artifacts)
    (tmp / "serve_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    port, metrics_port = free_port(), free_port()
    # The secure default: token auth with a per-start token, loopback node (tests/service/test_security.py).
    env = {**os.environ, "RAY_metrics_report_interval_ms": "1000", "OMP_NUM_THREADS": "1"}
    for var in ("ATTNSERVE_ARTIFACTS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(var, None)
    log = tmp / "serve.log"
    cmd = [sys.executable, "-m", "service.cli", "serve", "--config", str(tmp / "serve_config.yaml"),
           "--port", str(port), "--metrics-port", str(metrics_port), "--no-export"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # a loaded 2-core machine can take minutes
        while "Ctrl-C to stop" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"attnserve serve did not become ready:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield Service(base, f"http://127.0.0.1:{metrics_port}/metrics", config, log, proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        # SIGTERM must stop Serve and Ray cleanly (exit 0 after "stopped.").
        assert proc.returncode == 0 and "stopped." in log.read_text(), log.read_text()[-3000:]
