"""The real training commands on tiny configs: they run, checkpoint, and resume."""

import json

import torch

from models.checkpoint import load_checkpoint
from models.train_translator import main as train_translator
from models.train_vit import main as train_vit


def test_train_translator_tiny_checkpoints_and_resumes(shared_data, tmp_path):
    out, state = tmp_path / "tr", tmp_path / "tr-state.pt"
    args = [
        "--tiny",
        "--max-minutes",
        "0.05",
        "--eval-minutes",
        "0.05",
        "--out",
        str(out),
        "--state",
        str(state),
        "--threads",
        "1",
    ]
    train_translator(args)
    meta = json.loads((out / "config.json").read_text())
    assert meta["kind"] == "translator" and meta["valid"]["n"] == 50 and (out / "tokenizer.json").exists()
    steps = meta["training"]["steps"]
    train_translator([*args, "--resume"])
    history = torch.load(state, weights_only=False)["history"]
    assert history[-1]["step"] > steps  # resumed from the saved step, not from scratch
    assert load_checkpoint(out)[1]["kind"] == "translator"


def test_train_vit_tiny_checkpoints_and_resumes(shared_data, tmp_path):
    out, state = tmp_path / "vit", tmp_path / "vit-state.pt"
    args = ["--tiny", "--max-minutes", "0.05", "--out", str(out), "--state", str(state), "--threads", "1"]
    train_vit(args)
    model, meta = load_checkpoint(out)
    assert meta["kind"] == "vit" and len(meta["labels"]) == 10 and 0 <= meta["valid"]["accuracy"] <= 1
    first_epochs = len(meta["training"]["history"])
    train_vit([*args, "--resume"])
    history = torch.load(state, weights_only=False)["history"]
    assert len(history) > first_epochs  # resumed and trained further, not from scratch
