"""Attention maps from raw probabilities (numpy): ViT rollout and CLS attention, translation alignment."""

from __future__ import annotations

import numpy as np


def rollout(attentions: np.ndarray, grid: int = 7, residual: float = 0.5) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema, 2020) of CLS onto the patches.

    attentions: (L, N, nh, T, T) with T = 1 + grid*grid, token 0 = CLS. Each layer's head-mean is mixed with
    the identity (the residual stream) and renormalised, the layers are multiplied from the first up, and
    CLS's row over the patch tokens is renormalised: returns (N, grid, grid), each map summing to 1.
    """
    a = attentions.astype(np.float64).mean(axis=2)  # (L, N, T, T)
    eye = np.eye(a.shape[-1])
    a = residual * eye + (1 - residual) * a
    a /= a.sum(axis=-1, keepdims=True)
    joint = a[0]
    for layer in a[1:]:
        joint = layer @ joint  # (N, T, T)
    cls = joint[:, 0, 1:]
    cls = cls / cls.sum(axis=-1, keepdims=True)
    return cls.reshape(-1, grid, grid).astype(np.float32)


def cls_attention(attentions: np.ndarray, grid: int = 7) -> np.ndarray:
    """Raw CLS -> patch attention of each layer, mean over heads: (L, N, grid, grid).

    Not renormalised: each map sums to 1 minus the attention CLS pays to itself.
    """
    a = attentions.mean(axis=2)[:, :, 0, 1:]  # (L, N, grid*grid)
    return a.reshape(a.shape[0], a.shape[1], grid, grid).astype(np.float32)


def alignment(steps: np.ndarray, n_source: int) -> np.ndarray:
    """Rows of cross-attention (already averaged over the chosen heads) -> target x source alignment.

    steps: (T, S_padded): row t is the attention of the decoder step that produced target token t. The
    source EOS column and any padding are dropped and each row renormalised, so rows sum to 1 over the
    real source tokens. A source with no token besides EOS keeps zero columns (shape (T, 0)).
    """
    a = steps[:, :n_source].astype(np.float64)
    if n_source == 0:
        return a.astype(np.float32)
    total = a.sum(axis=-1, keepdims=True)
    a = np.where(total > 0, a / np.where(total > 0, total, 1), 1.0 / n_source)  # all mass on EOS: uniform
    return a.astype(np.float32)
