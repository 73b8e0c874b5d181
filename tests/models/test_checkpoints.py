"""The committed checkpoints: self-describing, pickle-free, small enough to ship."""

import json

import pytest
import torch

from models.checkpoint import CHECKPOINTS, load_checkpoint

NAMES = ["translator-en-es", "vit-fashion"]


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_loads_and_describes_itself(name):
    path = CHECKPOINTS / name
    model, meta = load_checkpoint(path)
    assert meta["kind"] in ("translator", "vit")
    assert "command" in meta["training"] and "hardware" in meta["training"]
    assert (path / "MODEL_CARD.md").exists()
    assert not list(path.glob("*.pt")) and not list(path.glob("*.pkl"))  # no pickle in the repo
    if meta["kind"] == "translator":
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        assert tok.get_vocab_size() == meta["config"]["vocab_size"]
        ids = torch.tensor([tok.encode("Hello.").ids + [2]])
        assert model.encode(ids)[0].shape[-1] == meta["config"]["dim"]
    else:
        assert len(meta["labels"]) == meta["config"]["num_classes"]


def test_checkpoints_stay_under_60_mb():
    """The bound the GPU-trained models were given (#11): the repository and the device tree stay small."""
    total = sum(f.stat().st_size for n in NAMES for f in (CHECKPOINTS / n).iterdir())
    assert total < 60 * 10**6, f"{total / 10**6:.1f} MB"


@pytest.mark.parametrize("name", NAMES)
def test_model_card_reports_the_measured_test_metrics(name):
    meta = json.loads((CHECKPOINTS / name / "config.json").read_text())
    card = (CHECKPOINTS / name / "MODEL_CARD.md").read_text()
    assert "test" in meta, "run `attnserve model-card` after training"
    key = "bleu" if meta["kind"] == "translator" else "accuracy"
    value = meta["test"][key]
    assert (f"**{value}**" if key == "bleu" else f"**{value:.4f}**") in card
