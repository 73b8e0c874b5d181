"""Our translator's weights as a CTranslate2 model, the fastest peer we benchmark against.

Reads the safetensors checkpoint with numpy (no torch) and fills ctranslate2's TransformerSpec: pre-norm,
GELU (erf), layer-norm epsilon from the config, shared (tied) embeddings, learned positions added to
embeddings scaled by sqrt(d), EOS appended to the source by us (as in training).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from ctranslate2.converters.converter import Converter
from ctranslate2.specs import common_spec, transformer_spec
from safetensors.numpy import load_file
from tokenizers import Tokenizer


class AttnserveConverter(Converter):
    """``AttnserveConverter(checkpoint_dir).convert(out_dir)`` -> a CTranslate2 model folder."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = Path(checkpoint)

    def _load(self) -> transformer_spec.TransformerSpec:
        cfg = json.loads((self.checkpoint / "config.json").read_text())["config"]
        w = load_file(str(self.checkpoint / "model.safetensors"))
        spec = transformer_spec.TransformerSpec.from_config(
            (cfg["encoder_layers"], cfg["decoder_layers"]),
            cfg["heads"],
            pre_norm=True,
            activation=common_spec.Activation.GELU,  # torch nn.GELU() default: exact erf
            alignment_layer=-1,
            alignment_heads=cfg["heads"],  # alignment = mean over every head of the last layer, as ours
        )
        spec.config.layer_norm_epsilon = cfg["layer_norm_eps"]
        spec.config.decoder_start_token = "<s>"
        for side in (spec.encoder, spec.decoder):
            emb = side.embeddings[0] if isinstance(side.embeddings, list) else side.embeddings
            emb.weight = w["embed.weight"]
            side.scale_embeddings = True  # embed * sqrt(d)
            side.position_encodings.encodings = w["pos.weight"]
        spec.decoder.projection.weight = w["embed.weight"]  # tied output projection, no bias
        norm(spec.encoder.layer_norm, w, "encoder_norm")
        norm(spec.decoder.layer_norm, w, "decoder_norm")
        for i, layer in enumerate(spec.encoder.layer):
            p = f"encoder.{i}."
            self_attention(layer.self_attention, w, p + "attn")
            norm(layer.self_attention.layer_norm, w, p + "norm_attn")
            ffn(layer.ffn, w, p)
        for i, layer in enumerate(spec.decoder.layer):
            p = f"decoder.{i}."
            self_attention(layer.self_attention, w, p + "self_attn")
            norm(layer.self_attention.layer_norm, w, p + "norm_self")
            linear(layer.attention.linear[0], w, p + "cross_attn.to_q")
            linear(layer.attention.linear[1], w, p + "cross_attn.to_kv")  # rows: keys then values, as CT2
            linear(layer.attention.linear[2], w, p + "cross_attn.to_out")
            norm(layer.attention.layer_norm, w, p + "norm_cross")
            ffn(layer.ffn, w, p)
        vocab = vocabulary(self.checkpoint / "tokenizer.json")
        spec.register_source_vocabulary(vocab)
        spec.register_target_vocabulary(vocab)
        return spec


def vocabulary(path: Path) -> list[str]:
    tok = Tokenizer.from_file(str(path))
    return [tok.id_to_token(i) for i in range(tok.get_vocab_size())]


def linear(spec, w: dict[str, np.ndarray], name: str) -> None:
    spec.weight, spec.bias = w[name + ".weight"], w[name + ".bias"]


def norm(spec, w: dict[str, np.ndarray], name: str) -> None:
    spec.gamma, spec.beta = w[name + ".weight"], w[name + ".bias"]


def self_attention(spec, w: dict[str, np.ndarray], name: str) -> None:
    # CT2 fuses q, k, v into one projection; ours is to_q + to_kv (keys then values).
    spec.linear[0].weight = np.concatenate([w[name + ".to_q.weight"], w[name + ".to_kv.weight"]])
    spec.linear[0].bias = np.concatenate([w[name + ".to_q.bias"], w[name + ".to_kv.bias"]])
    linear(spec.linear[1], w, name + ".to_out")


def ffn(spec, w: dict[str, np.ndarray], prefix: str) -> None:
    norm(spec.layer_norm, w, prefix + "norm_ffn")
    linear(spec.linear_0, w, prefix + "ffn.0")
    linear(spec.linear_1, w, prefix + "ffn.2")


def source_tokens(tok: Tokenizer, texts: list[str], max_source_tokens: int = 128) -> list[list[str]]:
    """Source pieces + EOS, truncated as in training (CT2 adds no EOS by itself for this spec)."""
    return [e.tokens[: max_source_tokens - 1] + ["</s>"] for e in tok.encode_batch(texts)]
