"""Pre-LN Transformer encoder-decoder for translation, with a key/value-cached decoder step.

``encode()`` runs once per source batch; ``cross_kv()`` projects the encoder output into each decoder
layer's cross-attention keys/values once; ``decode()`` advances the target by any number of tokens given
the past self-attention cache. Decoding strategies (greedy, beam) live outside the model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import FeedForward, MultiHeadAttention

PAD, BOS, EOS, UNK = 0, 1, 2, 3


@dataclass
class TranslatorConfig:
    vocab_size: int = 8000
    dim: int = 256
    heads: int = 4
    encoder_layers: int = 3
    decoder_layers: int = 3
    ffn_dim: int = 1024
    max_positions: int = 512
    dropout: float = 0.1
    layer_norm_eps: float = 1e-5

    def to_dict(self) -> dict:
        return asdict(self)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TranslatorConfig) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.attn = MultiHeadAttention(dim=cfg.dim, heads=cfg.heads, dropout=cfg.dropout)
        self.norm_ffn = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(dim=cfg.dim, hidden=cfg.ffn_dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor, *, return_attention: bool) -> tuple[Tensor, Tensor | None]:
        h = self.norm_attn(x)
        a, probs = self.attn(h, self.attn.project_kv(h), mask, return_attention=return_attention)
        x = x + a
        return x + self.dropout(self.ffn(self.norm_ffn(x))), probs


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TranslatorConfig) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.self_attn = MultiHeadAttention(dim=cfg.dim, heads=cfg.heads, dropout=cfg.dropout)
        self.norm_cross = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.cross_attn = MultiHeadAttention(dim=cfg.dim, heads=cfg.heads, dropout=cfg.dropout)
        self.norm_ffn = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(dim=cfg.dim, hidden=cfg.ffn_dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        past: tuple[Tensor, Tensor] | None,
        cross: tuple[Tensor, Tensor],
        self_mask: Tensor | None,
        cross_mask: Tensor,
        *,
        return_attention: bool,
    ) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor | None]:
        h = self.norm_self(x)
        k, v = self.self_attn.project_kv(h)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        a, _ = self.self_attn(h, (k, v), self_mask)
        x = x + a
        a, probs = self.cross_attn(self.norm_cross(x), cross, cross_mask, return_attention=return_attention)
        x = x + a
        return x + self.dropout(self.ffn(self.norm_ffn(x))), (k, v), probs

    def step(
        self, x: Tensor, cache: tuple[Tensor, Tensor], valid: Tensor, cross: tuple[Tensor, Tensor], src_mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One token per row: x (N, d), cache keys/values (N, nh, C, hs) each, valid (N, C) bool, cross
        keys/values (N, nh, S, hs) each -> x (N, d), this token's keys/values (N, 2, nh, hs), cross-attention
        probabilities (N, nh, S)."""
        h = self.norm_self(x)[:, None]  # (N, 1, d)
        k, v = self.self_attn.project_kv(h)  # (N, nh, 1, hs)
        x = x + self.self_attn.attend_cached(h, cache[0], cache[1], valid, k, v)[:, 0]
        h = self.norm_cross(x)[:, None]
        a, probs = self.cross_attn(h, cross, src_mask[:, None, None, :], return_attention=True)
        x = x + a[:, 0]
        return x + self.ffn(self.norm_ffn(x)), torch.stack([k[:, :, 0], v[:, :, 0]], 1), probs[:, :, 0]


class Translator(nn.Module):
    def __init__(self, cfg: TranslatorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim, padding_idx=PAD)
        self.pos = nn.Embedding(cfg.max_positions, cfg.dim)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.encoder_norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.decoder_norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.scale = cfg.dim**0.5
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=m.embedding_dim**-0.5)

    def embed_tokens(self, ids: Tensor, offset: Tensor | int = 0) -> Tensor:
        positions = torch.arange(ids.size(1), device=ids.device) + offset
        return self.dropout(self.embed(ids) * self.scale + self.pos(positions))

    def encode(self, src: Tensor, *, return_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        """src (B, S) token ids, PAD-padded -> memory (B, S, d), attentions (L, B, nh, S, S) if asked."""
        mask = (src != PAD)[:, None, None, :]  # (B, 1, 1, S)
        x = self.embed_tokens(src)
        attentions = []
        for layer in self.encoder:
            x, probs = layer(x, mask, return_attention=return_attention)
            attentions.append(probs)
        memory = self.encoder_norm(x)
        return memory, torch.stack(attentions) if return_attention else None

    def cross_kv(self, memory: Tensor) -> Tensor:
        """Cross-attention keys/values of every decoder layer: (L, 2, B, nh, S, hs)."""
        return torch.stack([torch.stack(layer.cross_attn.project_kv(memory)) for layer in self.decoder])

    def decode(
        self,
        tgt: Tensor,
        cross: Tensor,
        src_mask: Tensor,
        past: Tensor | None = None,
        *,
        return_attention: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Advance the decoder by tgt (B, T) tokens.

        cross: (L, 2, B, nh, S, hs) from ``cross_kv``; src_mask: (B, S) bool, True on real tokens;
        past: (L, 2, B, nh, P, hs) or None. Returns logits (B, T, V), present (L, 2, B, nh, P+T, hs) and,
        when asked, cross-attention (L, B, nh, T, S).
        """
        past_len = 0 if past is None else past.size(4)
        t = tgt.size(1)
        q_pos = torch.arange(t, device=tgt.device) + past_len
        k_pos = torch.arange(past_len + t, device=tgt.device)
        self_mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T, P+T)
        cross_mask = src_mask[:, None, None, :]
        x = self.embed_tokens(tgt, past_len)
        present, attentions = [], []
        for i, layer in enumerate(self.decoder):
            layer_past = None if past is None else (past[i, 0], past[i, 1])
            x, kv, probs = layer(
                x, layer_past, (cross[i, 0], cross[i, 1]), self_mask, cross_mask, return_attention=return_attention
            )
            present.append(torch.stack(kv))
            attentions.append(probs)
        logits = self.decoder_norm(x) @ self.embed.weight.T  # tied output projection
        return logits, torch.stack(present), torch.stack(attentions) if return_attention else None

    def step(
        self,
        tokens: Tensor,
        positions: Tensor,
        cache: list[tuple[Tensor, Tensor]],
        cross: list[tuple[Tensor, Tensor]],
        src_mask: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One decoder step for independent rows at their own positions (the serving engine's slots).

        tokens, positions (N,) int64; cache: per layer, self-attention keys and values (N, nh, C, hs) holding
        each row's positions < its own (later entries are ignored); cross: per layer, keys and values
        (N, nh, S, hs); src_mask (N, S) bool. Per-layer tensors, not one stacked tensor: slicing a stacked
        one copies it in the exported graph at every step. Returns log-probabilities (N, V), this step's
        keys/values (N, L, 2, nh, hs) and the cross-attention probabilities (N, L, nh, S). A row's result
        depends only on that row: no padding, no shared length.
        """
        x = self.embed(tokens) * self.scale + self.pos(positions)  # (N, d); eval only: no dropout
        valid = torch.arange(cache[0][0].size(2), device=tokens.device)[None, :] < positions[:, None]  # (N, C)
        new_kv, probs = [], []
        for i, layer in enumerate(self.decoder):
            x, kv, p = layer.step(x, cache[i], valid, cross[i], src_mask)
            new_kv.append(kv)
            probs.append(p)
        logits = self.decoder_norm(x) @ self.embed.weight.T
        return logits.log_softmax(-1), torch.stack(new_kv, 1), torch.stack(probs, 1)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced decoder hidden states (B, T, d) before the output projection."""
        memory, _ = self.encode(src)
        cross = self.cross_kv(memory)
        src_mask = src != PAD
        t = tgt_in.size(1)
        causal = torch.ones(t, t, dtype=torch.bool, device=src.device).tril()[None, None]
        x = self.embed_tokens(tgt_in)
        for i, layer in enumerate(self.decoder):
            x, _, _ = layer(
                x, None, (cross[i, 0], cross[i, 1]), causal, src_mask[:, None, None, :], return_attention=False
            )
        return self.decoder_norm(x)

    def loss(self, src: Tensor, tgt: Tensor, *, label_smoothing: float = 0.1) -> Tensor:
        """Cross-entropy of tgt (B, T) = [BOS, ..., EOS, PAD...], computed only on non-pad positions."""
        hidden = self(src, tgt[:, :-1])
        labels = tgt[:, 1:]
        keep = labels != PAD
        logits = hidden[keep] @ self.embed.weight.T  # (N, V): skip the projection on padding
        return F.cross_entropy(logits, labels[keep], label_smoothing=label_smoothing)


@torch.no_grad()
def greedy_decode(model: Translator, src: Tensor, max_new_tokens: int = 128) -> list[list[int]]:
    """Reference greedy decoding with the KV cache (torch); the service has its own ORT version."""
    model.eval()
    memory, _ = model.encode(src)
    cross = model.cross_kv(memory)
    src_mask = src != PAD
    tokens = torch.full((src.size(0), 1), BOS, dtype=torch.long, device=src.device)
    past, steps = None, []
    finished = torch.zeros(src.size(0), dtype=torch.bool, device=src.device)
    for _ in range(max_new_tokens):
        logits, past, _ = model.decode(tokens, cross, src_mask, past)
        tokens = logits[:, -1:].argmax(-1)  # (B, 1)
        steps.append(tokens)
        finished |= tokens[:, 0] == EOS
        if finished.all():
            break
    out = torch.cat(steps, 1).tolist()
    return [row[: row.index(EOS)] if EOS in row else row for row in out]
