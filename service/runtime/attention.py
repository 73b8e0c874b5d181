"""Attention maps from raw probabilities (numpy): ViT rollout and CLS attention, translation alignment; and
the per-request choice of layers and heads that the graphs take as weights."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.runtime.errors import InputError


@dataclass(frozen=True)
class Choice:
    """Layers and heads averaged into a map: ``weights`` (n_layers, n_heads) is 1/k on each of the k chosen
    layer-head pairs, zero elsewhere, so a graph's weighted sum over layers x heads is their mean."""

    weights: np.ndarray
    layers: list[int]  # sorted, non-negative, no duplicates
    heads: list[int]


def choose(layers: list[int] | None, heads: list[int] | None, n_layers: int, n_heads: int, *,
           fields: tuple[str, str] = ("attention_layers", "attention_heads"), what: str = "layers") -> Choice:
    """The mean over the chosen layers and heads. ``layers``: None = the last layer; negative indices count
    from the end; ``heads``: None = all. Duplicates (also -1 and n-1) are merged. Out of range: InputError
    naming the field and the allowed range. ``what`` names the layers in messages (e.g. "decoder layers")."""
    lf, hf = fields
    chosen = [-1] if layers is None else list(layers)
    if not chosen:
        raise InputError(f"{lf} must name at least one layer (or be null for the last)", field=lf)
    bad = [x for x in chosen if not -n_layers <= x < n_layers]
    if bad:
        raise InputError(f"{lf} must be in [-{n_layers}, {n_layers - 1}] (the model has {n_layers} {what}; "
                         f"negative counts from the last), got {bad[0]}", field=lf)
    hs = list(range(n_heads)) if heads is None else list(heads)
    if not hs:
        raise InputError(f"{hf} must name at least one head (or be null for all)", field=hf)
    bad = [h for h in hs if not 0 <= h < n_heads]
    if bad:
        raise InputError(f"{hf} must be in [0, {n_heads - 1}] (the model has {n_heads} heads per layer), "
                         f"got {bad[0]}", field=hf)
    ls, hs = sorted({x % n_layers for x in chosen}), sorted(set(hs))
    w = np.zeros((n_layers, n_heads), np.float32)
    w[np.ix_(ls, hs)] = 1.0 / (len(ls) * len(hs))
    return Choice(w, ls, hs)


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


def weighted(maps: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """maps (L, nh, ...) averaged with a Choice's weights (L, nh) -> (...)."""
    return np.einsum("lh,lh...->...", weights, maps.astype(np.float64)).astype(np.float32)


def self_attention(a: np.ndarray, n_source: int) -> np.ndarray:
    """(S, S) encoder self-attention of one source (EOS last, already averaged over layers and heads) -> its
    (n, n) block over the real source tokens, rows renormalised to sum to 1 (the EOS row and column are dropped,
    as in the alignment)."""
    return alignment(a[:n_source], n_source)
