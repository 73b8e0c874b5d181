"""`attnserve bench http|engine --device cuda` refuses clearly where ONNX Runtime has no CUDA provider (this CPU
machine), both in the bench and in the baseline server it starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from bench.http import check_device

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                                reason="ONNX Runtime has CUDA here: nothing to refuse")


def test_bench_stops_before_measuring_without_cuda():
    with pytest.raises(SystemExit, match="cannot run on cuda.*onnxruntime-gpu"):
        check_device("http://127.0.0.1:9", "cuda")  # never reached: the device check comes first


def test_baseline_server_fails_at_start_without_cuda():
    env = {**os.environ, "ATTNSERVE_BASELINE_DEVICE": "cuda", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", "import bench.baseline_server"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "DeviceError" in run.stderr and "device 'cuda' asked for" in run.stderr


def test_engine_bench_stops_before_measuring_without_cuda():
    run = subprocess.run([sys.executable, "-m", "service.cli", "bench", "engine", "--device", "cuda"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "--device cuda" in run.stderr and "install onnxruntime-gpu" in run.stderr
