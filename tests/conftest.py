"""Session fixtures shared by tests/export and tests/service.

- ``artifacts_dir``: the real artifacts in ``artifacts/`` (repo root), exported from the committed checkpoints
  by ``attnserve export`` when missing or stale (a no-op when up to date; a few minutes on 2 CPU cores otherwise).
- ``tiny_artifacts``: tiny random-weight ViT and translator checkpoints exported to a temp folder, for fast
  unit tests of the exporter and the runtime. Their parity checks run like the real ones; their quality gates
  are off (random weights).

Tests marked ``gpu`` (tests/gpu) run only where ONNX Runtime's CUDA provider works; elsewhere they skip, saying why.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from models.data import data_root

REPO = Path(__file__).resolve().parents[1]
MODELS = ("translator-en-es", "vit-fashion")
SENTENCES = [
    ("The cat sleeps on the red chair.", "El gato duerme en la silla roja."),
    ("I want to go home now.", "Quiero ir a casa ahora."),
    ("Where is the train station?", "¿Dónde está la estación de tren?"),
    ("We ate bread and cheese.", "Comimos pan y queso."),
    ("She reads a book every night.", "Ella lee un libro cada noche."),
]


def cuda_unavailable() -> str | None:
    """None when ONNX Runtime can run a graph on its CUDA provider here, else why not."""
    try:
        import onnx
        import onnxruntime as ort

        from service.runtime.sessions import CUDA, check_install, device_of, make_session
    except ImportError as e:
        return f"cannot import {e.name}"
    try:
        check_install()
    except Exception as e:  # noqa: BLE001 - the message says what to fix
        return str(e)
    if CUDA not in ort.get_available_providers():
        return (f"ONNX Runtime {ort.__version__} has no CUDA provider ({ort.get_available_providers()}): the gpu "
                "extra (onnxruntime-gpu) and an NVIDIA GPU are needed")
    h = onnx.helper
    x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    model = h.make_model(h.make_graph([h.make_node("Add", ["x", "x"], ["y"])], "probe", [x],
                                      [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])]),
                         opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 9
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.onnx"
        onnx.save(model, str(path))
        session = make_session(path, device="cuda")
        if device_of([session]) != "cuda":
            return f"the CUDA provider is installed but does not start (the session got {session.get_providers()})"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    reason = cuda_unavailable() if gpu else None
    for item in gpu if reason else []:
        item.add_marker(pytest.mark.skip(reason=f"gpu: {reason}"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (or $ATTNSERVE_DATA); tests that need it skip with the reason when it is absent."""
    root = data_root()
    if not (root / "spa-eng" / "spa.txt").exists() or not (root / "fashion-mnist").exists():
        pytest.skip(f"shared datasets not found at {root} (set ATTNSERVE_DATA or place ../shared beside the repo)")
    return root


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """``artifacts/`` with every model exported from the current checkpoints (runs `attnserve export`)."""
    ckpt = REPO / "models" / "checkpoints"
    missing = [m for m in MODELS if not (ckpt / m / "model.safetensors").exists()]
    if missing:
        pytest.skip(f"no trained checkpoint for {missing} under {ckpt}")
    if not (data_root() / "spa-eng" / "spa.txt").exists():
        pytest.skip(f"shared data not found at {data_root()}: export verifies on the test splits")
    out = REPO / "artifacts"
    # A subprocess: the export loads torch, and ORT tests in this process should not share threads with it.
    subprocess.run([sys.executable, "-m", "service.cli", "export", "--out", str(out)], cwd=REPO, check=True)
    return out


@pytest.fixture(scope="session")
def service_artifacts(request: pytest.FixtureRequest) -> Path:
    """The artifact root a test service runs: $ATTNSERVE_TEST_ARTIFACTS, else ``artifacts_dir``."""
    override = os.environ.get("ATTNSERVE_TEST_ARTIFACTS")
    return Path(override) if override else request.getfixturevalue("artifacts_dir")


def _tiny_checkpoints(root: Path) -> dict[str, Path]:
    import torch

    from models.checkpoint import save_checkpoint
    from models.data import FASHION_LABELS
    from models.tokenizer import train_tokenizer
    from models.translator import Translator, TranslatorConfig
    from models.vit import ViT, ViTConfig

    torch.manual_seed(0)
    vit = ViT(ViTConfig(dim=32, depth=2, heads=2, mlp_dim=64)).eval()
    extra = {
        "labels": FASHION_LABELS,
        "preprocessing": {"size": [28, 28], "mode": "L", "scale": 1 / 255, "mean": 0.286, "std": 0.353},
    }
    save_checkpoint(vit, root / "vit-tiny", kind="vit", extra=extra)
    tok = train_tokenizer([x for pair in SENTENCES for x in pair] * 4, vocab_size=120)
    cfg = TranslatorConfig(
        vocab_size=tok.get_vocab_size(),
        dim=32,
        heads=4,
        encoder_layers=2,
        decoder_layers=2,
        ffn_dim=64,
        max_positions=256,
    )
    translator = Translator(cfg).eval()
    save_checkpoint(translator, root / "translator-tiny", kind="translator", extra={})
    tok.save(str(root / "translator-tiny" / "tokenizer.json"))
    return {"vit": root / "vit-tiny", "translator": root / "translator-tiny"}


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory) -> dict[str, Path]:
    """{"vit": dir, "translator": dir, "checkpoints": {...}, "out": root} of tiny exported artifacts (fp32 + int8)."""
    from export.build import ExportOptions, export_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    ckpts = _tiny_checkpoints(root / "checkpoints")
    # Random weights: their quality is noise, so the precision quality gates are off (their checks run).
    opts = ExportOptions(out=root / "artifacts", greedy_sentences=8, quality_limit=8, gates=False)
    dirs = {kind: export_checkpoint(path, opts) for kind, path in ckpts.items()}
    return {**dirs, "checkpoints": ckpts, "out": root / "artifacts"}
