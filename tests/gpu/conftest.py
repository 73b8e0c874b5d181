"""Fixtures for tests/gpu: the real artifacts on the CPU and on the CUDA provider.

Tests marked `gpu` skip unless ONNX Runtime's CUDA provider works here (tests/conftest.py says why when not).
bench/gpu_check.sh runs them on a GPU machine: `pytest -m gpu tests/gpu`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # traffic.py, as tests/service's helpers


@pytest.fixture(scope="session")
def translator_dir(service_artifacts: Path) -> Path:
    from service.runtime import find_artifact

    return find_artifact(service_artifacts, "translator-en-es")


@pytest.fixture(scope="session")
def classifier_dir(service_artifacts: Path) -> Path:
    from service.runtime import find_artifact

    return find_artifact(service_artifacts, "vit-fashion")


@pytest.fixture(scope="session")
def test_pairs(shared_data: Path) -> list[tuple[str, str]]:
    from models.data import spa_eng_splits

    return spa_eng_splits(shared_data / "spa-eng" / "spa.txt")["test"]
