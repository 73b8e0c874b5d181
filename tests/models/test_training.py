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


def test_continue_a_checkpoint_without_its_optimizer_state(shared_data, tmp_path):
    """A fresh clone has the committed weights and config.json but no runs/ state: `--resume` continues them."""
    out = tmp_path / "vit"
    base = ["--tiny", "--max-minutes", "0.05", "--out", str(out), "--threads", "1"]
    train_vit([*base, "--state", str(tmp_path / "a.pt")])
    before = load_checkpoint(out)[1]["training"]
    train_vit([*base, "--state", str(tmp_path / "gone.pt"), "--resume", "--lr", "5e-4"])
    state = torch.load(tmp_path / "gone.pt", weights_only=False)
    history = state["history"]
    assert history[: len(before["history"])] == before["history"]  # the record carries over
    assert len(history) > len(before["history"]) and history[-1]["step"] > before["steps"]
    assert history[-1]["train_minutes"] > before["train_minutes"]
    assert state["commands"][0] == before["command"] and "--resume" in state["commands"][-1]
    after = load_checkpoint(out)[1]
    # The checkpoint is replaced only by a better one; its command line names every run behind its weights.
    if after["training"]["steps"] > before["steps"]:
        assert after["valid"]["accuracy"] > max(h["valid_accuracy"] for h in before["history"])
        assert after["training"]["command"].startswith(before["command"] + "`, then `")
    else:
        assert after["training"] == before and state["best"] == max(h["valid_accuracy"] for h in before["history"])


def test_strong_augmentation_is_seeded_and_pads_with_background():
    from models.train_vit import MEAN, STD, augment_strong

    background = -MEAN / STD
    images = torch.full((8, 1, 28, 28), background)
    images[:, :, 8:20, 10:18] = 2.0  # a bright block on the background
    a = augment_strong(images, torch.Generator().manual_seed(1))
    b = augment_strong(images, torch.Generator().manual_seed(1))
    assert a.shape == images.shape and torch.equal(a, b)
    assert not torch.equal(a, images)  # it moved, turned or erased something
    blank = augment_strong(torch.full((4, 1, 28, 28), background), torch.Generator().manual_seed(2))
    torch.testing.assert_close(blank, torch.full_like(blank, background))  # no black borders from the warp


def test_vit_ema_checkpoint_holds_the_averaged_weights(shared_data, tmp_path):
    out, state = tmp_path / "vit", tmp_path / "state.pt"
    args = ["--tiny", "--epochs", "1", "--max-minutes", "1", "--ema", "0.9", "--augment", "strong"]
    train_vit([*args, "--out", str(out), "--state", str(state), "--threads", "1"])
    model, meta = load_checkpoint(out)
    assert meta["training"]["ema"] == 0.9 and meta["training"]["augment"] == "strong"
    raw = torch.load(state, weights_only=False)["model"]  # the optimizer's weights, kept to resume
    saved = model.state_dict()
    assert saved.keys() == raw.keys()
    assert not torch.equal(saved["head.weight"], raw["head.weight"])  # the checkpoint is the average


def test_pick_device_auto_is_the_cpu_without_a_gpu():
    from models.training import pick_device

    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
