"""`attnserve bench explain`: are the ViT attention maps the API returns better than chance at finding evidence?

Deletion: patches (4x4 pixel blocks of the 7x7 grid) are set to the background (0) in a given order, most
important first; the curve is the probability of the originally predicted class after each step, and its mean
(area under the curve) is lower when the order finds the evidence sooner. Insertion: patches are copied from
the image onto a blank one in the same order; a higher mean is better. Orders compared on the Fashion-MNIST test
split: the API's map (rollout, most attended first), random (mean of several seeds), and the map reversed
(least attended first). A map no better than random on both curves would say nothing about the model.
"""

from __future__ import annotations

import argparse

import numpy as np

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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="attnserve bench explain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--images", type=int, default=500, help="test images, spread over the split")
    p.add_argument("--step", type=int, default=2, help="patches removed or added per curve point")
    p.add_argument("--seeds", type=int, default=3, help="random orders averaged per image")
    a = p.parse_args(argv)

    from models.data import fashion_mnist  # the IDX reader only: models.data does not import torch

    rt = ClassifierRuntime(find_artifact(a.artifacts, "vit-fashion"), device="cpu")
    images, _ = fashion_mnist("test")
    idx = np.linspace(0, len(images) - 1, min(a.images, len(images))).astype(int)
    images = images[idx]
    probs, rollout = rt.predict(images, rollout=True)
    predicted = probs.argmax(-1)
    masks = patch_masks(rt.grid, rt.image_size)
    rng = np.random.default_rng(0)
    rows: dict[str, list[tuple[float, float]]] = {"rollout (API default)": [], "random": [], "rollout reversed": []}
    for img, label, roll in zip(images, predicted, rollout, strict=True):
        order = np.argsort(-roll.reshape(-1), kind="stable")
        rows["rollout (API default)"].append(curves(rt, img, label, order, masks, a.step))
        rows["rollout reversed"].append(curves(rt, img, label, order[::-1], masks, a.step))
        rand = [curves(rt, img, label, rng.permutation(len(order)), masks, a.step) for _ in range(a.seeds)]
        rows["random"].append(tuple(np.mean(rand, axis=0)))
    print(f"# {rt.name}/{rt.version}: {len(images)} Fashion-MNIST test images, predicted class, {rt.grid}x{rt.grid} "
          f"patches of {PATCH}x{PATCH} px, {a.step} per step, random = mean of {a.seeds} orders\n")
    print("| order | deletion mean p (lower = better) | insertion mean p (higher = better) |")
    print("|---|---:|---:|")
    for name, vals in rows.items():
        d, i = np.mean(vals, axis=0)
        print(f"| {name} | {d:.3f} | {i:.3f} |")
    d = np.array(rows["rollout (API default)"]) - np.array(rows["random"])
    lower, higher = (d[:, 0] < 0).mean(), (d[:, 1] > 0).mean()
    print(f"\nrollout - random, per image: deletion {d[:, 0].mean():+.3f} (rollout lower on {lower:.0%} of images), "
          f"insertion {d[:, 1].mean():+.3f} (higher on {higher:.0%})")
