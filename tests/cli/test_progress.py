"""Long commands show a progress bar on a terminal (tqdm), and none in a pipe or a log."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def run_on_a_terminal(cmd: list[str]) -> str:
    """Run with stdout and stderr on a pseudo-terminal (as a person at a shell would) and return what it wrote."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 0-column terminal shows no bar
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=child, stderr=child, env={**os.environ, "PYTHONPATH": str(REPO)})
    os.close(child)
    out = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(main)
    assert proc.wait(timeout=300) == 0, out.decode(errors="replace")[-3000:]
    return out.decode(errors="replace")


@pytest.mark.slow
def test_eval_shows_progress_on_a_terminal_only(service_artifacts: Path, tmp_path: Path):
    rng = np.random.default_rng(0)
    npz = tmp_path / "images.npz"
    np.savez(npz, images=rng.integers(0, 256, (1200, 28, 28), dtype=np.uint8), labels=rng.integers(0, 10, 1200))
    cmd = [sys.executable, "-m", "service.cli", "eval", "vit", "--npz", str(npz), "--artifacts",
           str(service_artifacts), "--backend", "onnx"]
    shown = run_on_a_terminal(cmd)
    assert "classify" in shown and "3/3" in shown, shown[-2000:]  # 1200 images in batches of 500
    piped = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert piped.returncode == 0 and "classify" not in piped.stdout + piped.stderr, piped.stderr[-2000:]
    assert '"n": 1200' in piped.stdout
