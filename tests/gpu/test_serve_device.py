"""One request end to end through Ray Serve, started as a user would: `attnserve serve --device DEVICE`.

The `cuda` case needs a GPU (marker `gpu`); the `cpu` case runs everywhere and checks the same plumbing: the flag
reaches every replica, and /v1/models, the v2 metadata and the `attnserve_model_info` metric show the device the
replicas' ONNX Runtime sessions actually run on.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from local_serve import REPO, free_port, shipped_config, stop_service
from prometheus_client.parser import text_string_to_metric_families


def model_info_devices(metrics_url: str) -> dict[str, str]:
    """{model: device} from `ray_attnserve_model_info` (Ray exports replica metrics about 10 s after first use)."""
    families = text_string_to_metric_families(httpx.get(metrics_url, timeout=10).text)
    return {s.labels["model"]: s.labels["device"] for f in families if f.name == "ray_attnserve_model_info"
            for s in f.samples if s.value == 1}


@pytest.mark.slow
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.gpu), "cpu"])
def test_serve_device_end_to_end(device: str, service_artifacts: Path, tmp_path: Path) -> None:
    config = shipped_config()
    config["applications"][0]["args"]["artifact_root"] = str(service_artifacts)
    (tmp_path / "serve_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("ATTNSERVE_ARTIFACTS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "service.cli", "serve", "--config", str(tmp_path / "serve_config.yaml"),
           "--port", str(port), "--metrics-port", str(metrics_port), "--admission-front", "none", "--no-export",
           "--device", device]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while "Ctrl-C to stop" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(1)
        assert f"translator on {device}, classifier on {device}" in log.read_text()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            r = c.post("/v1/translate", json={"texts": ["The cat sleeps on the red chair."], "beam_size": 4})
            assert r.status_code == 200, r.text
            assert r.json()["translations"][0]["text"]
            models = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
            v2 = c.get("/v2/models/translator-en-es").json()
        assert {m["device"] for m in models.values()} == {device}, models
        assert v2["parameters"]["device"] == device, v2
        deadline = time.monotonic() + 60
        while (seen := model_info_devices(f"http://127.0.0.1:{metrics_port}/metrics")) != {
                "translator-en-es": device, "vit-fashion": device}:
            assert time.monotonic() < deadline, f"attnserve_model_info: {seen}"
            time.sleep(2)
    finally:
        stop_service(proc)
