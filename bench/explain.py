"""`attnserve bench explain`: are the ViT attention maps the API returns better than chance at finding evidence?

Deletion: patches (4x4 pixel blocks of the 7x7 grid) are set to the background (0) in a given order, most
important first; the curve is the probability of the originally predicted class after each step, and its mean
(area under the curve) is lower when the order finds the evidence sooner. Insertion: patches are copied from
the image onto a blank one in the same order; a higher mean is better. Orders compared on the Fashion-MNIST test
split: each map the API offers (the rollout, `attention: rollout`; the CLS attention, `attention: cls`, of the
last layer (its default), of every layer alone and of all layers together; most attended first), random (mean of
several seeds), and the two default maps and the all-layer mean reversed (least attended first). A map no better
than random on both curves would say nothing about the model.
"""

from __future__ import annotations

import argparse

import numpy as np
from tqdm import tqdm

from service.runtime import ClassifierRuntime, find_artifact

PATCH = 4


def patch_masks(grid: int, size: int) -> np.ndarray:
    """(grid*grid, size, size) bool: pixel mask of each patch, row-major as the rollout's cells."""
    masks = np.zeros((grid * grid, size, size), bool)
    for i in range(grid * grid):
        r, c = divmod(i, grid)
        masks[i, r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH] = True
    return masks


def curves(rt: ClassifierRuntime, image: np.ndarray, label: int, order: np.ndarray, masks: np.ndarray,
           step: int) -> tuple[float, float]:
    """Mean probability of ``label`` along the deletion and the insertion curve for one patch order."""
    cuts = list(range(0, len(order) + 1, step))
    if cuts[-1] != len(order):
        cuts.append(len(order))
    deleted, inserted = [], []
    for k in cuts:
        m = masks[order[:k]].any(axis=0) if k else np.zeros(image.shape, bool)
        deleted.append(np.where(m, 0, image))
        inserted.append(np.where(m, image, 0))
    probs, _ = rt.predict(np.stack(deleted + inserted).astype(np.uint8))
    p = probs[:, label]
    return float(p[: len(cuts)].mean()), float(p[len(cuts) :].mean())


def api_maps(rt: ClassifierRuntime, images: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Predicted classes and every map the API offers that is worth a row: the rollout, the CLS attention of
    each layer (head mean) and of all layers together (`attention: cls`'s default)."""
    probs, rollout = rt.predict(images, rollout=True)
    maps = {"rollout (API default)": rollout}
    last = rt.layers - 1
    choices = {f"cls, layer {last} = last": [last],
               f"cls, layers 0-{last} mean (`cls` default)": list(range(rt.layers)),
               **{f"cls, layer {layer}": [layer] for layer in range(last)}}
    for name, layers in choices.items():
        maps[name] = rt.predict(images, cls_weights=rt.cls_choice(layers).weights)[1]
    return probs.argmax(-1), maps


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="attnserve bench explain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default="artifacts", help="artifact root (attnserve export)")
    p.add_argument("--images", type=int, default=500, help="test images, spread over the split")
    p.add_argument("--step", type=int, default=2, help="patches removed or added per curve point")
    p.add_argument("--seeds", type=int, default=3, help="random orders averaged per image")
    a = p.parse_args(argv)

    from models.data import fashion_mnist  # the IDX reader only: models.data does not import torch

    rt = ClassifierRuntime(find_artifact(a.artifacts, "vit-fashion"), device="cpu")
    images, _ = fashion_mnist("test")
    idx = np.linspace(0, len(images) - 1, min(a.images, len(images))).astype(int)
    images = images[idx]
    predicted, maps = api_maps(rt, images)
    masks = patch_masks(rt.grid, rt.image_size)
    rng = np.random.default_rng(0)
    rows: dict[str, list[tuple[float, float]]] = {"random": []}
    reverse = list(maps)[:3]  # the API's two defaults and the all-layer mean: a bound from the other side
    for name in maps:
        rows[name] = []
    for name in reverse:
        rows[f"{name}, reversed"] = []
    for i, (img, label) in enumerate(tqdm(list(zip(images, predicted, strict=True)), desc="images", unit="image",
                                          leave=False, disable=None)):
        rand = [curves(rt, img, label, rng.permutation(rt.grid**2), masks, a.step) for _ in range(a.seeds)]
        rows["random"].append(tuple(np.mean(rand, axis=0)))
        for name, m in maps.items():
            order = np.argsort(-m[i].reshape(-1), kind="stable")
            rows[name].append(curves(rt, img, label, order, masks, a.step))
            if name in reverse:
                rows[f"{name}, reversed"].append(curves(rt, img, label, order[::-1], masks, a.step))
    print(f"# {rt.name}/{rt.version}: {len(images)} Fashion-MNIST test images, predicted class, {rt.grid}x{rt.grid} "
          f"patches of {PATCH}x{PATCH} px, {a.step} per step, random = mean of {a.seeds} orders; cls maps are head "
          "means; difference to random per image, mean and 95% interval (1.96 standard errors)\n")
    print("| order | deletion mean p (lower = better) | insertion mean p (higher = better) | deletion - random "
          "| insertion - random | better than random on both |")
    print("|---|---:|---:|---:|---:|---|")
    rand = np.array(rows["random"])
    for name, vals in sorted(rows.items(), key=lambda kv: (kv[0] != "random", kv[0].endswith("reversed"))):
        v = np.array(vals)
        d, ins = v.mean(axis=0)
        if name == "random":
            print(f"| {name} | {d:.3f} | {ins:.3f} | | | |")
            continue
        diff = v - rand
        half = 1.96 * diff.std(axis=0, ddof=1) / np.sqrt(len(diff))
        lo, hi = diff.mean(axis=0) - half, diff.mean(axis=0) + half
        verdict = "yes" if hi[0] < 0 and lo[1] > 0 else ("no: worse" if lo[0] > 0 and hi[1] < 0 else "no")
        print(f"| {name} | {d:.3f} | {ins:.3f} | {diff[:, 0].mean():+.3f} ± {half[0]:.3f} "
              f"| {diff[:, 1].mean():+.3f} ± {half[1]:.3f} | {verdict} |")
