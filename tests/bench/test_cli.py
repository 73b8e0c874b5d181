"""`attnserve bench NAME` reaches bench/, and the HTTP bench stays as light as the service it loads."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

from service.cli import COMMANDS

REPO = Path(__file__).resolve().parents[2]


def test_every_bench_command_is_a_main_in_the_bench_package():
    bench = {k: target for k, (target, _) in COMMANDS.items() if k[0] == "bench"}
    assert {("bench", "runtime"), ("bench", "http")} <= set(bench)
    for key, target in bench.items():
        module, func = target.split(":")
        assert module == f"bench.{key[1]}", key
        assert callable(getattr(importlib.import_module(module), func)), key
    assert not [k for k, (target, _) in COMMANDS.items() if k[0] != "bench" and target.startswith("bench.")]


def test_http_bench_and_its_baseline_never_import_torch():
    code = ("import sys, bench.http, bench.runtime; bad = [m for m in ('torch', 'models') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
