"""Vision Transformer for 28x28 grayscale images with an optional convolutional stem.

The conv stem (two stride-2 3x3 convolutions) learns faster per epoch than linear patches on a CPU
budget; both produce a 7x7 grid of tokens, each tied to one 4x4 image region, so attention maps still
point at image locations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from models.attention import FeedForward, MultiHeadAttention


@dataclass
class ViTConfig:
    image_size: int = 28
    patch_size: int = 4
    channels: int = 1
    num_classes: int = 10
    dim: int = 128
    depth: int = 6
    heads: int = 4
    mlp_dim: int = 256
    dropout: float = 0.0
    stem: str = "conv"  # "conv" or "linear"
    layer_norm_eps: float = 1e-5

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def to_dict(self) -> dict:
        return asdict(self)


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.attn = MultiHeadAttention(dim=cfg.dim, heads=cfg.heads, dropout=cfg.dropout)
        self.norm_mlp = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.mlp = FeedForward(dim=cfg.dim, hidden=cfg.mlp_dim)

    def forward(self, x: Tensor, *, return_attention: bool) -> tuple[Tensor, Tensor | None]:
        h = self.norm_attn(x)
        a, probs = self.attn(h, self.attn.project_kv(h), return_attention=return_attention)
        x = x + a
        return x + self.mlp(self.norm_mlp(x)), probs


def patch_embedding(cfg: ViTConfig) -> nn.Module:
    if cfg.stem == "linear":
        return nn.Conv2d(cfg.channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
    assert cfg.patch_size == 4, "the conv stem downsamples by exactly 4"
    return nn.Sequential(
        nn.Conv2d(cfg.channels, 32, 3, stride=2, padding=1),
        nn.BatchNorm2d(32),
        nn.GELU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.BatchNorm2d(64),
        nn.GELU(),
        nn.Conv2d(64, cfg.dim, 1),
    )


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.to_patch_embedding = patch_embedding(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, cfg.grid**2 + 1, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)

    def forward(self, images: Tensor, *, return_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        """images (B, C, H, W) normalised floats -> logits (B, classes), attentions (L, B, nh, N, N) if asked.

        N = grid*grid + 1; token 0 is CLS, token 1 + r*grid + c is the patch at row r, column c.
        """
        x = self.to_patch_embedding(images)  # (B, d, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, d)
        x = torch.cat([self.cls_token.expand(x.size(0), -1, -1), x], dim=1) + self.pos_embedding
        attentions = []
        for block in self.blocks:
            x, probs = block(x, return_attention=return_attention)
            attentions.append(probs)
        logits = self.head(self.norm(x[:, 0]))
        return logits, torch.stack(attentions) if return_attention else None
