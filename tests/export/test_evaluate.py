"""`attnserve eval` through the ONNX runtime (no torch in the process) and through the torch fallback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
PAIRS = [("The cat sleeps.", "El gato duerme."), ("Where is the station?", "¿Dónde está la estación?"), ("I", "Yo")]

RUN = (
    "import sys, json; from export.evaluate import {fn}; {fn}({argv!r}); "
    "print(json.dumps({{'torch': 'torch' in sys.modules}}))"
)


def eval_cmd(fn: str, argv: list[str]) -> tuple[dict, bool]:
    """Run an eval entry point in a fresh process; returns its JSON line and whether torch got imported."""
    out = subprocess.run(
        [sys.executable, "-c", RUN.format(fn=fn, argv=argv)], cwd=REPO, capture_output=True, text=True, check=True
    )
    lines = out.stdout.strip().splitlines()
    return json.loads(lines[-2]), json.loads(lines[-1])["torch"]


@pytest.fixture(scope="module")
def tiny_root(tiny_artifacts, tmp_path_factory) -> Path:
    """The tiny artifacts under the real models' names, as `--artifacts` expects."""
    root = tmp_path_factory.mktemp("root")
    for kind, name in (("vit", "vit-fashion"), ("translator", "translator-en-es")):
        shutil.copytree(tiny_artifacts[kind], root / name / tiny_artifacts[kind].name)
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("eval")
    (d / "pairs.tsv").write_text("".join(f"{en}\t{es}\n" for en, es in PAIRS))
    rng = np.random.default_rng(0)
    np.savez(d / "images.npz", images=rng.integers(0, 256, (6, 28, 28), dtype=np.uint8), labels=np.arange(6) % 10)
    return {"pairs": d / "pairs.tsv", "npz": d / "images.npz"}


def test_eval_translator_on_onnx_without_torch(tiny_root, tiny_artifacts, files):
    ck = str(tiny_artifacts["checkpoints"]["translator"])
    args = ["--pairs", str(files["pairs"]), "--artifacts", str(tiny_root), "--checkpoint", ck]
    result, torch_loaded = eval_cmd("translator_main", args)
    assert set(result) == {"bleu", "chrf", "n"} and result["n"] == 3
    assert not torch_loaded
    beam, _ = eval_cmd("translator_main", [*args, "--beam", "2"])
    assert beam["n"] == 3
    fallback, torch_loaded = eval_cmd("translator_main", [*args, "--backend", "torch"])
    assert torch_loaded and fallback == result  # same weights, same greedy tokens


def test_eval_vit_onnx_matches_torch(tiny_root, tiny_artifacts, files):
    ck = str(tiny_artifacts["checkpoints"]["vit"])
    args = ["--npz", str(files["npz"]), "--artifacts", str(tiny_root), "--checkpoint", ck]
    result, torch_loaded = eval_cmd("vit_main", args)
    assert set(result) == {"accuracy", "n"} and result["n"] == 6 and not torch_loaded
    fallback, torch_loaded = eval_cmd("vit_main", [*args, "--artifacts", str(tiny_root / "none")])
    assert torch_loaded and fallback == result
    # test-time flip: the same averaged probabilities through ONNX Runtime and torch
    flip, _ = eval_cmd("vit_main", [*args, "--tta", "flip"])
    flip_torch, _ = eval_cmd("vit_main", [*args, "--tta", "flip", "--artifacts", str(tiny_root / "none")])
    assert flip == flip_torch and flip["n"] == 6


@pytest.mark.slow
def test_flip_averages_each_image_with_its_mirror(artifacts_dir):
    from export.metrics import vit_accuracy
    from models.data import fashion_mnist
    from service.runtime import ClassifierRuntime, find_artifact

    rt = ClassifierRuntime(find_artifact(artifacts_dir, "vit-fashion"))
    images = fashion_mnist("test")[0][:1000]
    probs = rt.predict(images)[0] + rt.predict(np.ascontiguousarray(images[..., ::-1]))[0]
    labels = probs.argmax(-1)  # right for every image only if both views are averaged
    assert vit_accuracy(rt, images, labels, batch_size=300, flip=True)["accuracy"] == 1.0
    assert (rt.predict(images)[0].argmax(-1) != labels).any()  # the flip changes some answers (measured: it does)
    assert vit_accuracy(rt, images, labels, batch_size=300)["accuracy"] < 1.0


@pytest.mark.slow
def test_eval_real_artifacts(artifacts_dir, tmp_path):
    from models.data import fashion_mnist, spa_eng_splits

    test = spa_eng_splits()["test"][::100][:12]
    (tmp_path / "pairs.tsv").write_text("".join(f"{en}\t{es}\n" for en, es in test))
    images, labels = fashion_mnist("test")
    np.savez(tmp_path / "t.npz", images=images[:64], labels=labels[:64])
    tr, torch_loaded = eval_cmd(
        "translator_main", ["--pairs", str(tmp_path / "pairs.tsv"), "--artifacts", str(artifacts_dir)]
    )
    assert tr["n"] == 12 and 0 <= tr["bleu"] <= 100 and not torch_loaded
    vit, torch_loaded = eval_cmd("vit_main", ["--npz", str(tmp_path / "t.npz"), "--artifacts", str(artifacts_dir)])
    assert vit["n"] == 64 and vit["accuracy"] > 0.5 and not torch_loaded
