"""deploy/prometheus: the config and the alert rules pass promtool; the rules' unit tests pass."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

PROM = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
pytestmark = pytest.mark.skipif(shutil.which("promtool") is None,
                                reason="promtool not on PATH: `make tools` (root) or `apt-get install prometheus`")


def promtool(*args: str) -> str:
    r = subprocess.run(["promtool", *args], cwd=PROM, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"promtool {' '.join(args)}\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def test_check_config() -> None:
    out = promtool("check", "config", "prometheus.yml")
    assert "1 rule files found" in out


def test_check_rules() -> None:
    promtool("check", "rules", "alerts.yml")


def test_rule_unit_tests() -> None:
    promtool("test", "rules", "alerts_test.yml")
