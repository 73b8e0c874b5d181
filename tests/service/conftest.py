"""One real attnserve for all HTTP tests: `attnserve serve` in a subprocess on free loopback ports.

The config is deploy/serve_config.yaml with the artifact root pointed at the real artifacts and a few limits
tightened so every error status is reachable with small requests. $ATTNSERVE_TEST_ARTIFACTS points the app at
another artifact root (for iterating on the service before the trained checkpoints exist).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from local_serve import Service, shipped_config, start_service, stop_service
from service_helpers import TEST_LIMITS, TRANSLATOR_MAX_PENDING


def test_config(artifacts: Path) -> dict:
    config = shipped_config()
    for app in config["applications"]:
        args = app["args"]
        args["artifact_root"] = str(artifacts)
        args["limits"] = {**args["limits"], **TEST_LIMITS}
        args["translator"] = {**args["translator"], "max_pending": TRANSLATOR_MAX_PENDING}
    return config


@pytest.fixture(scope="session")
def service(service_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    # The secure default: token auth with a per-start token, loopback node (tests/service/test_security.py).
    svc, proc = start_service(test_config(service_artifacts), tmp_path_factory.mktemp("serve"),
                              {"RAY_metrics_report_interval_ms": "1000"})
    try:
        yield svc
    finally:
        stop_service(proc)
        # SIGTERM must stop Serve and Ray cleanly (exit 0 after "stopped.").
        assert proc.returncode == 0 and "stopped." in svc.log.read_text(), svc.log.read_text()[-3000:]
