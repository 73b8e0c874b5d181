"""Fixtures for the live deploy tests: one two-node Ray cluster per module, serving deploy/serve_config.yaml."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from localcluster import REPO, LocalCluster, small_cluster_config


@pytest.fixture(scope="module")
def served_root(request: pytest.FixtureRequest) -> Path:
    """The artifacts to serve: the session's export of the committed checkpoints, or $ATTNSERVE_TEST_ARTIFACTS
    (as in tests/service: for iterating before the trained checkpoints exist)."""
    env = os.environ.get("ATTNSERVE_TEST_ARTIFACTS")
    return Path(env) if env else request.getfixturevalue("artifacts_dir")


@pytest.fixture(scope="module")
def cluster_root(served_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """An artifact root of our own, linking the newest served version of each model, so a test can export a
    second version into it without touching artifacts/. Returns (root, {"translator": v, "classifier": v})."""
    from service.runtime import find_artifact

    root = tmp_path_factory.mktemp("cluster-artifacts")
    versions = {}
    for key, name in (("translator", "translator-en-es"), ("classifier", "vit-fashion")):
        src = find_artifact(served_root, name, None)
        (root / name).mkdir()
        (root / name / src.name).symlink_to(src.resolve(), target_is_directory=True)
        versions[key] = src.name
    return root, versions


@pytest.fixture(scope="module")
def cluster(cluster_root: tuple[Path, dict[str, str]]) -> Iterator[LocalCluster]:
    root, versions = cluster_root
    # Metrics reach the export port every 2 s instead of 10 s, so the tests wait less; nothing else changes.
    c = LocalCluster(cpus=(1, 1), env={"RAY_metrics_report_interval_ms": "2000"})
    try:
        c.start()
        c.deploy(small_cluster_config(port=c.serve_port, artifact_root=root, versions=versions))
        c.wait_running(timeout_s=300)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def second_version(cluster_root: tuple[Path, dict[str, str]]) -> str:
    """A second exported version of the classifier, made the way an operator would (`attnserve export`)."""
    root, versions = cluster_root
    if not (REPO / "models" / "checkpoints" / "vit-fashion" / "model.safetensors").exists():
        pytest.skip("no vit-fashion checkpoint to export a second version from")
    version = f"{versions['classifier']}-rollout"
    cmd = [sys.executable, "-m", "service.cli", "export", "--models", "vit-fashion", "--version", version,
           "--out", str(root), "--precision", "fp32", "--quality-limit", "200", "--threads", "1"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    return version


@pytest.fixture(scope="module")
def prometheus(cluster: LocalCluster) -> Iterator[Any]:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not on PATH: `make tools` (root) or `apt-get install prometheus`")
    from promserver import Prometheus, config_for

    prom = Prometheus(config_for(cluster.sd_file))
    try:
        yield prom
    finally:
        prom.stop()
