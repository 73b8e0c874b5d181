"""Thin torch modules that give each ONNX graph plain tensor inputs and outputs (no None, no kwargs)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.translator import PAD, Translator
from models.vit import ViT


class ViTGraph(nn.Module):
    """pixels (B,1,28,28) -> logits (B,C) [, attentions (L,B,nh,T,T)]."""

    def __init__(self, model: ViT, *, attention: bool) -> None:
        super().__init__()
        self.model, self.attention = model, attention

    def forward(self, pixels: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        logits, attn = self.model(pixels, return_attention=self.attention)
        return (logits, attn) if self.attention else logits


class ViTServeGraph(nn.Module):
    """images (B,H,W) uint8 as decoded -> probs (B,C) [, rollout (B,g,g)]: what the service needs, no more.

    Normalisation (x / 255 - mean) / std is in the graph, so the host sends bytes; with ``rollout`` the
    attention rollout (as service.runtime.attention.rollout: head mean, 0.5 residual, layers multiplied, CLS
    row over the patches renormalised) is computed in the graph instead of returning every layer's maps.
    """

    def __init__(self, model: ViT, *, rollout: bool, mean: float, std: float, residual: float = 0.5) -> None:
        super().__init__()
        self.model, self.rollout, self.mean, self.std, self.residual = model, rollout, mean, std, residual

    def forward(self, images: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        x = (images.float()[:, None] / 255.0 - self.mean) / self.std
        logits, attn = self.model(x, return_attention=self.rollout)
        probs = logits.softmax(-1)
        if not self.rollout:
            return probs
        a = attn.mean(2)  # (L, B, T, T)
        eye = torch.eye(a.size(-1), dtype=a.dtype)
        a = self.residual * eye + (1 - self.residual) * a
        a = a / a.sum(-1, keepdim=True)
        joint = a[0]
        for layer in range(1, a.size(0)):
            joint = a[layer] @ joint
        cls = joint[:, 0, 1:]
        cls = cls / cls.sum(-1, keepdim=True)
        grid = self.model.cfg.grid
        return probs, cls.reshape(-1, grid, grid)


class ViTClsGraph(nn.Module):
    """images (B,H,W) uint8, cls_weights (B,L,nh) -> probs (B,C), cls_attention (B,g,g).

    The CLS token's attention over the patches, weighted per row over layers x heads by ``cls_weights`` (the
    service sends 1/k on the k chosen layer-head pairs) and renormalised over the patches. Per-row weights
    keep rows independent, so one call serves requests with different choices; only g*g weights per image
    leave the graph instead of every layer's (nh, T, T) maps.
    """

    def __init__(self, model: ViT, *, mean: float, std: float) -> None:
        super().__init__()
        self.model, self.mean, self.std = model, mean, std

    def forward(self, images: Tensor, cls_weights: Tensor) -> tuple[Tensor, Tensor]:
        x = (images.float()[:, None] / 255.0 - self.mean) / self.std
        logits, attn = self.model(x, return_attention=True)
        cls = torch.einsum("blh,lbhp->bp", cls_weights, attn[:, :, :, 0, 1:])  # (B, g*g)
        cls = cls / cls.sum(-1, keepdim=True).clamp_min(1e-30)  # all-zero weights: zeros, not NaN
        grid = self.model.cfg.grid
        return logits.softmax(-1), cls.reshape(-1, grid, grid)


class EncoderGraph(nn.Module):
    """src_ids (B,S) -> cross_kv (L,2,B,nh,S,hs) [, encoder_attentions (L,B,nh,S,S)].

    Returns the decoder's cross-attention keys/values rather than the memory: they are all the decoder
    needs, and projecting them once here keeps that work out of every decoder step.
    """

    def __init__(self, model: Translator, *, attention: bool) -> None:
        super().__init__()
        self.model, self.attention = model, attention

    def forward(self, src_ids: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        memory, attn = self.model.encode(src_ids, return_attention=self.attention)
        cross = self.model.cross_kv(memory)
        return (cross, attn) if self.attention else cross


class DecoderGraph(nn.Module):
    """tgt_ids (B,T), cross_kv, src_mask (B,S) bool, past_kv (L,2,B,nh,P,hs), P may be 0
    -> logits (B,T,V), present_kv (L,2,B,nh,P+T,hs) [, cross_attentions (L,B,nh,T,S)]."""

    def __init__(self, model: Translator, *, attention: bool) -> None:
        super().__init__()
        self.model, self.attention = model, attention

    def forward(self, tgt_ids: Tensor, cross_kv: Tensor, src_mask: Tensor, past_kv: Tensor) -> tuple[Tensor, ...]:
        logits, present, attn = self.model.decode(tgt_ids, cross_kv, src_mask, past_kv, return_attention=self.attention)
        return (logits, present, attn) if self.attention else (logits, present)


class SlotStepGraph(nn.Module):
    """The serving engine's decoder step over slots (rows at their own positions), token choice in the graph.

    tokens (N,), positions (N,), src_mask (N,S) bool, align_weights (N,L,nh), then per layer the self-attention
    cache keys and values (N,nh,C,hs), then per layer the cross keys and values (N,nh,S,hs)
    -> topk_logprobs (N,K), topk_ids (N,K) (sorted, ties by lower id, so column 0 is greedy's argmax),
    alignment (N,S) = the cross-attention weighted by ``align_weights`` (zeros: none), new_kv (N,L,2,nh,hs):
    this step's keys/values, which the caller writes at each row's position. Full logits never leave the graph.
    """

    def __init__(self, model: Translator, *, topk: int) -> None:
        super().__init__()
        self.model, self.topk = model, topk

    def forward(
        self, tokens: Tensor, positions: Tensor, src_mask: Tensor, align_weights: Tensor, *kv: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        layers = len(kv) // 4
        cache = [(kv[2 * i], kv[2 * i + 1]) for i in range(layers)]
        cross = [(kv[2 * layers + 2 * i], kv[2 * layers + 2 * i + 1]) for i in range(layers)]
        logprobs, new_kv, probs = self.model.step(tokens, positions, cache, cross, src_mask)
        values, ids = torch.topk(logprobs, self.topk, dim=-1)
        alignment = torch.einsum("nlh,nlhs->ns", align_weights, probs)
        return values, ids, alignment, new_kv


__all__ = ["PAD", "DecoderGraph", "EncoderGraph", "SlotStepGraph", "ViTClsGraph", "ViTGraph", "ViTServeGraph"]
