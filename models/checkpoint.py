"""Checkpoints that describe themselves: safetensors weights + config.json (+ tokenizer/labels), no pickle."""

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


def save_checkpoint(model: torch.nn.Module, out: Path, *, kind: str, extra: dict[str, Any]) -> None:
    """Write weights and config.json; ``extra`` (training details, metrics) is merged into config.json."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(out / "model.safetensors")  # atomic: a reader never sees half a file
    meta = {"kind": kind, "config": model.cfg.to_dict(), **extra}
    (out / "config.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / "config.json").read_text())


def load_checkpoint(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A model in eval mode from a checkpoint folder, and its config.json."""
    meta = read_meta(path)
    model_cls, cfg_cls = KINDS[meta["kind"]]
    model = model_cls(cfg_cls(**meta["config"]))
    model.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
    return model.eval(), meta
