"""Checkpoints that describe themselves: safetensors weights + config.json (+ tokenizer/labels), no pickle.

Weights are stored in half precision (``STORED_DTYPE``) and upcast to fp32 on load: half the repository and
half of what a GPU machine must be sent, for no measurable quality (the fp16-stored translator: test BLEU 45.61
against 45.65 from its fp32 file; the exports pass parity against the upcast model).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from models.translator import Translator, TranslatorConfig
from models.vit import ViT, ViTConfig

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
KINDS: dict[str, tuple[type, type]] = {"translator": (Translator, TranslatorConfig), "vit": (ViT, ViTConfig)}
STORED_DTYPE = torch.float16


def save_checkpoint(model: torch.nn.Module, out: Path, *, kind: str, extra: dict[str, Any]) -> None:
    """Write weights and config.json; ``extra`` (training details, metrics) is merged into config.json."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: stored(v.detach().cpu()) for k, v in model.state_dict().items()}
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(out / "model.safetensors")  # atomic: a reader never sees half a file
    meta = {"kind": kind, "config": model.cfg.to_dict(), **extra}
    (out / "config.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


def stored(t: torch.Tensor) -> torch.Tensor:
    """A tensor as the checkpoint file holds it: floats in ``STORED_DTYPE``, anything else unchanged."""
    return (t.to(STORED_DTYPE) if t.is_floating_point() else t).contiguous().clone()


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / "config.json").read_text())


def load_checkpoint(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A model in eval mode from a checkpoint folder, and its config.json."""
    meta = read_meta(path)
    model_cls, cfg_cls = KINDS[meta["kind"]]
    model = model_cls(cfg_cls(**meta["config"]))
    weights = load_file(str(Path(path) / "model.safetensors"))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in weights.items()})  # fp32 math
    return model.eval(), meta
