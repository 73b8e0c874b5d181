"""A private `attnserve serve` per module for the fault tests (never the session service of tests/service).

One replica per model deployment (no autoscaling, so a killed replica is replaced, not scaled around), the
real artifacts, loopback ports, token auth as shipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from local_serve import shipped_config, start_service, stop_service

TRANSLATOR_MAX_PENDING = 16


def small_config(artifacts: Path) -> dict:
    config = shipped_config()
    for app in config["applications"]:
        app["args"]["artifact_root"] = str(artifacts)
        app["args"]["translator"] = {**app["args"]["translator"], "max_pending": TRANSLATOR_MAX_PENDING}
        for d in app["deployments"]:
            d.pop("autoscaling_config", None)
            d["num_replicas"] = 1
            if d["name"] == "Translator":
                d["graceful_shutdown_timeout_s"] = 20
    return config


@pytest.fixture(scope="module")
def own_service(service_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """(Service, Popen): the tests may kill parts of it, or all of it (then teardown has nothing to do)."""
    svc, proc = start_service(small_config(service_artifacts), tmp_path_factory.mktemp("reliability"))
    try:
        yield svc, proc
    finally:
        stop_service(proc)
