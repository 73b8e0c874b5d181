"""The ViT's part of the export: parity inputs, manifest fields, precision quality (test accuracy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from export.metrics import gate_device, provider_of, vit_accuracy
from export.samples import VIT_CASES, random_inputs
from export.specs import GraphSpec
from models.data import data_root, fashion_mnist
from models.train_vit import normalize
from service.runtime import ClassifierRuntime

TASK = "image-classification"


def test_set() -> tuple[np.ndarray, np.ndarray] | None:
    if not (data_root() / "fashion-mnist" / "t10k-images-idx3-ubyte.gz").exists():
        return None
    return fashion_mnist("test")


def random_cases(spec: GraphSpec, dims: dict) -> dict[str, dict[str, np.ndarray]]:
    return {f"random_{k}": random_inputs(spec, dims, sizes, seed=i) for i, (k, sizes) in enumerate(VIT_CASES.items())}


def real_cases(spec: GraphSpec, model: torch.nn.Module, snap: Path) -> dict[str, dict[str, np.ndarray]]:
    data = test_set()
    if data is None:
        return {}
    name = spec.inputs[0].name
    x = data[0][:8] if name == "images" else normalize(data[0][:8]).numpy()
    cases = {"test_images_batch8": {name: x}, "test_image_batch1": {name: x[3:4]}}
    if any(t.name == "cls_weights" for t in spec.inputs):  # the API's choices: one layer's head mean, all layers
        cfg = model.cfg
        w = np.zeros((len(x), cfg.depth, cfg.heads), np.float32)
        for i in range(len(x)):
            if i % 3 == 2:
                w[i] = 1.0 / (cfg.depth * cfg.heads)
            else:
                w[i, (-1 - i) % cfg.depth] = 1.0 / cfg.heads
        cases = {k: {**v, "cls_weights": w[: len(v[name])] if k.endswith("8") else w[3:4]} for k, v in cases.items()}
    return cases


def calibration(spec: GraphSpec, model: torch.nn.Module, snap: Path, dims: dict) -> tuple[list[dict], str]:
    """Feeds of ``spec``'s graph for int8 calibration, and where they came from: 512 training images in
    batches of 64 (the test split is for the quality gate); random inputs without the data."""
    if not (data_root() / "fashion-mnist" / "train-images-idx3-ubyte.gz").exists():
        return [feeds for feeds in random_cases(spec, dims).values()], "random inputs (no Fashion-MNIST data)"
    images = fashion_mnist("train")[0][:512]
    out = []
    for b in range(0, len(images), 64):
        x = images[b : b + 64]
        feeds = {spec.inputs[0].name: x if spec.inputs[0].name == "images" else normalize(x).numpy()}
        if any(t.name == "cls_weights" for t in spec.inputs):  # every layer's head mean
            feeds["cls_weights"] = np.full((len(x), dims["layers"], dims["heads"]),
                                           1.0 / (dims["layers"] * dims["heads"]), np.float32)
        out.append(feeds)
    return out, f"fashion-mnist train: {len(images)} images, {len(out)} batches"


def manifest_extra(meta: dict, cfg, snap: Path, work: Path) -> dict:
    return {
        "model": {
            "image_size": cfg.image_size,
            "channels": cfg.channels,
            "grid": cfg.grid,
            "layers": cfg.depth,
            "heads": cfg.heads,
            "tokens": cfg.grid**2 + 1,
            "classes": cfg.num_classes,
            "dim": cfg.dim,
        },
        "labels": meta["labels"],
        "preprocessing": meta["preprocessing"],
    }


def decode_parity(model, snap: Path, partial: Path, opts) -> tuple[dict | None, list]:
    return None, []  # nothing is decoded: the graph parity above covers the classifier


def quality(partial: Path, opts) -> dict:
    """Test accuracy of every precision through the runtime, and its change from fp32 in points; fp16 on
    the CUDA provider where there is one, else on the CPU provider (``gate_device``).

    ``partial``: the export's ``manifest.partial.json``; the runtime loads the unfinished folder through it."""
    data = test_set()
    if data is None:
        return {"skipped": f"no Fashion-MNIST test set under {data_root()}"}
    images, labels = data[0][: opts.quality_limit], data[1][: opts.quality_limit]
    out: dict = {"split": "fashion-mnist test", "metric": "accuracy"}
    from export.build import precisions_in  # local: build imports this module

    for p in precisions_in(partial):
        try:
            rt = ClassifierRuntime(partial, precision=p, device=gate_device(p))
            out[p] = vit_accuracy(rt, images, labels)
            out[p]["measured_with"] = provider_of(rt)
        except Exception as e:  # e.g. fp16 kernels missing on CPU: say so instead of guessing
            out[p] = {"measured": False, "reason": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        if p != "fp32" and "accuracy" in out.get("fp32", {}):
            out[p]["delta_points"] = round(100 * (out[p]["accuracy"] - out["fp32"]["accuracy"]), 2)
    return out
