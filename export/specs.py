"""Every exported graph declared as data: wrapper, inputs, outputs (with named axes) and parity tolerance.

Axis names in ``shape`` are either dynamic (``DYNAMIC``) or static numbers looked up in the model's
dimensions (``layers``, ``heads``, ``head_dim``, ``vocab``, ...). One generic exporter reads these.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from torch import nn

from export.wrappers import DecoderGraph, EncoderGraph, SlotStepGraph, ViTClsGraph, ViTGraph, ViTServeGraph
from models.train_vit import MEAN, STD  # the pixel statistics the ViT was trained with

DYNAMIC = ("batch", "src_len", "tgt_len", "past_len", "slots", "cache_len")
# Example sizes for tracing: all >= 2 and distinct, because torch.onnx.export(dynamo=True) silently fixes
# an axis whose example size is 1, and equal sizes could be unified into one symbol.
EXAMPLE_SIZES = {"batch": 2, "src_len": 5, "tgt_len": 3, "past_len": 4, "slots": 3, "cache_len": 6}
# Candidates per row that the slot step returns: beam search needs 2 * beam_size of them (beam_size <= 8).
STEP_TOPK = 16


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[str | int, ...]


@dataclass(frozen=True)
class GraphSpec:
    name: str  # file stem and key in the manifest
    wrapper: Callable[[nn.Module], nn.Module]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    atol: float = 1e-4  # fp32 ORT vs torch; probabilities and logits of these sizes agree to ~1e-6
    rtol: float = 1e-3

    def expand(self, dims: dict[str, int]) -> GraphSpec:
        """Per-layer tensors ("{i}" in the name) repeated for every decoder layer, grouped by name pattern:
        cache_k{i}, cache_v{i} -> cache_k0, cache_v0, cache_k1, cache_v1, ... then the next pattern group."""
        return replace(self, inputs=_expand(self.inputs, dims), outputs=_expand(self.outputs, dims))

    @property
    def first_vararg(self) -> int | None:
        """Index of the first per-layer input (the wrapper takes them as *args), if any."""
        return next((i for i, t in enumerate(self.inputs) if t.name[-1].isdigit()), None)

    def static_shape(self, t: TensorSpec, dims: dict[str, int]) -> list[int | str]:
        """The shape with static names replaced by numbers and dynamic ones kept as names."""
        return [d if isinstance(d, int) or d in DYNAMIC else dims[d] for d in t.shape]


def _stem(t: TensorSpec) -> str:
    return t.name.split("_")[0]


def _expand(specs: tuple[TensorSpec, ...], dims: dict[str, int]) -> tuple[TensorSpec, ...]:
    out: list[TensorSpec] = []
    group: list[TensorSpec] = []
    for t in (*specs, None):
        if t is not None and "{i}" in t.name and (not group or _stem(t) == _stem(group[0])):
            group.append(t)
            continue
        for i in range(dims.get("decoder_layers", 0)):
            out += [replace(g, name=g.name.format(i=i)) for g in group]
        group = [t] if t is not None and "{i}" in t.name else []
        if t is not None and "{i}" not in t.name:
            out.append(t)
    return tuple(out)


PIXELS = TensorSpec("pixels", "float32", ("batch", "channels", "image_size", "image_size"))
LOGITS = TensorSpec("logits", "float32", ("batch", "classes"))
VIT_ATTN = TensorSpec("attentions", "float32", ("layers", "batch", "heads", "tokens", "tokens"))
SRC_IDS = TensorSpec("src_ids", "int64", ("batch", "src_len"))
CROSS_KV = TensorSpec("cross_kv", "float32", ("decoder_layers", 2, "batch", "heads", "src_len", "head_dim"))
ENC_ATTN = TensorSpec("encoder_attentions", "float32", ("encoder_layers", "batch", "heads", "src_len", "src_len"))
TGT_IDS = TensorSpec("tgt_ids", "int64", ("batch", "tgt_len"))
SRC_MASK = TensorSpec("src_mask", "bool", ("batch", "src_len"))
PAST_KV = TensorSpec("past_kv", "float32", ("decoder_layers", 2, "batch", "heads", "past_len", "head_dim"))
DEC_LOGITS = TensorSpec("logits", "float32", ("batch", "tgt_len", "vocab"))
PRESENT_KV = TensorSpec(
    "present_kv", "float32", ("decoder_layers", 2, "batch", "heads", "past_len+tgt_len", "head_dim")
)
CROSS_ATTN = TensorSpec("cross_attentions", "float32", ("decoder_layers", "batch", "heads", "tgt_len", "src_len"))
DEC_INPUTS = (TGT_IDS, CROSS_KV, SRC_MASK, PAST_KV)
STEP_INPUTS = (
    TensorSpec("tokens", "int64", ("slots",)),
    TensorSpec("positions", "int64", ("slots",)),
    TensorSpec("src_mask", "bool", ("slots", "src_len")),
    TensorSpec("align_weights", "float32", ("slots", "decoder_layers", "heads")),
    # "{i}": one tensor per decoder layer (GraphSpec.expand), passed to the wrapper as *args
    TensorSpec("cache_k{i}", "float32", ("slots", "heads", "cache_len", "head_dim")),
    TensorSpec("cache_v{i}", "float32", ("slots", "heads", "cache_len", "head_dim")),
    TensorSpec("cross_k{i}", "float32", ("slots", "heads", "src_len", "head_dim")),
    TensorSpec("cross_v{i}", "float32", ("slots", "heads", "src_len", "head_dim")),
)
STEP_OUTPUTS = (
    TensorSpec("topk_logprobs", "float32", ("slots", "topk")),
    TensorSpec("topk_ids", "int64", ("slots", "topk")),
    TensorSpec("alignment", "float32", ("slots", "src_len")),
    TensorSpec("new_kv", "float32", ("slots", "decoder_layers", 2, "heads", "head_dim")),
)

IMAGES_U8 = TensorSpec("images", "uint8", ("batch", "image_size", "image_size"))
PROBS = TensorSpec("probs", "float32", ("batch", "classes"))
ROLLOUT = TensorSpec("rollout", "float32", ("batch", "grid", "grid"))
CLS_WEIGHTS = TensorSpec("cls_weights", "float32", ("batch", "layers", "heads"))
CLS_MAP = TensorSpec("cls_attention", "float32", ("batch", "grid", "grid"))
VIT_GRAPHS = (
    GraphSpec("vit", lambda m: ViTGraph(m, attention=False), (PIXELS,), (LOGITS,)),
    GraphSpec("vit_attn", lambda m: ViTGraph(m, attention=True), (PIXELS,), (LOGITS, VIT_ATTN)),
    # What the service runs: uint8 in, probabilities (and the 7x7 rollout) out.
    GraphSpec("classify", lambda m: ViTServeGraph(m, rollout=False, mean=MEAN, std=STD), (IMAGES_U8,), (PROBS,)),
    GraphSpec("classify_rollout", lambda m: ViTServeGraph(m, rollout=True, mean=MEAN, std=STD), (IMAGES_U8,),
              (PROBS, ROLLOUT)),
    # The CLS token's attention over the patches, per-row weights over layers x heads (the API's "cls" map).
    GraphSpec("classify_cls", lambda m: ViTClsGraph(m, mean=MEAN, std=STD), (IMAGES_U8, CLS_WEIGHTS),
              (PROBS, CLS_MAP)),
)
TRANSLATOR_GRAPHS = (
    GraphSpec("encoder", lambda m: EncoderGraph(m, attention=False), (SRC_IDS,), (CROSS_KV,)),
    GraphSpec("encoder_attn", lambda m: EncoderGraph(m, attention=True), (SRC_IDS,), (CROSS_KV, ENC_ATTN)),
    GraphSpec("decoder", lambda m: DecoderGraph(m, attention=False), DEC_INPUTS, (DEC_LOGITS, PRESENT_KV)),
    GraphSpec(
        "decoder_attn", lambda m: DecoderGraph(m, attention=True), DEC_INPUTS, (DEC_LOGITS, PRESENT_KV, CROSS_ATTN)
    ),
    GraphSpec("decoder_step", lambda m: SlotStepGraph(m, topk=STEP_TOPK), STEP_INPUTS, STEP_OUTPUTS),
)
GRAPHS = {"vit": VIT_GRAPHS, "translator": TRANSLATOR_GRAPHS}


def model_dims(kind: str, cfg) -> dict[str, int]:
    """The static axis sizes of a model family, from its config dataclass."""
    if kind == "vit":
        return {
            "channels": cfg.channels,
            "image_size": cfg.image_size,
            "classes": cfg.num_classes,
            "layers": cfg.depth,
            "heads": cfg.heads,
            "tokens": cfg.grid**2 + 1,
            "grid": cfg.grid,
        }
    return {
        "encoder_layers": cfg.encoder_layers,
        "decoder_layers": cfg.decoder_layers,
        "heads": cfg.heads,
        "head_dim": cfg.dim // cfg.heads,
        "vocab": cfg.vocab_size,
        "max_positions": cfg.max_positions,
        "topk": STEP_TOPK,
    }
