"""The runtime (and the service app, once it exists) must not load torch: measured thread contention."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

MODULES = ["service.runtime"] + (["service.app"] if importlib.util.find_spec("service.app") else [])


@pytest.mark.parametrize("module", MODULES)
def test_import_leaves_torch_out(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", f"importing {module} loaded torch"
