"""The one contract between the protocols and the model replicas: a job in, a result out.

Protocol-neutral: /v1 (JSON, multipart, SSE) and the Open Inference Protocol v2 each decode their wire format
into a job, call the same replica method (`Translator.infer`, `Classifier.infer`: in the replica itself for
/v1, through a deployment handle for v2) and encode the result. Nothing here knows HTTP or either wire format.
Plain dataclasses of Python values and numpy arrays: a handle call pickles them as they are.

The published bounds of a request (beam size, new tokens, layer and head indices, top-k) are here once; the
configurable limits (texts, characters, images, bytes) are `service/config.py: Limits`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # annotations only: the client imports the bounds below without numpy or the runtime
    import numpy as np

    from service.runtime.translator import TranslationResult

MAX_BEAM = 8
MAX_NEW_TOKENS = 256
DEFAULT_MAX_NEW_TOKENS = 128
MAX_TOP_K = 10
DEFAULT_TOP_K = 3
# Published maxima of layer and head indices; a model's own ranges (smaller) come from its manifest.
MAX_LAYERS, MAX_HEADS = 16, 16
Method = Literal["rollout", "cls"]


@dataclass(frozen=True)
class TranslateJob:
    """Texts to translate, how, which attention maps to return, and the deadline the client asked for."""

    texts: list[str]
    beam_size: int = 1
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    return_attention: bool = False
    attention_layers: list[int] | None = None  # None: the model's default (the last layer)
    attention_heads: list[int] | None = None  # None: all heads
    return_encoder_attention: bool = False
    encoder_attention_layers: list[int] | None = None
    encoder_attention_heads: list[int] | None = None
    timeout_s: float | None = None  # the client's deadline; the replica caps it at the model's own

    @property
    def cost(self) -> int:
        """What the job takes from the replica's budget (`Gate`): a bound on the decoder row-steps it can use."""
        return len(self.texts) * self.beam_size * self.max_new_tokens

    def attention_choices(self) -> dict[str, bool | list[int] | None]:
        """The attention choices as `TranslatorRuntime.sequence`/`choices` keywords."""
        return {"return_attention": self.return_attention, "attention_layers": self.attention_layers,
                "attention_heads": self.attention_heads, "return_encoder_attention": self.return_encoder_attention,
                "encoder_attention_layers": self.encoder_attention_layers,
                "encoder_attention_heads": self.encoder_attention_heads}


@dataclass
class TranslateResult:
    model: str
    version: str
    translations: list[TranslationResult]  # one per text, in order (tokens, text, alignment arrays)


@dataclass(frozen=True)
class TokenUpdate:
    """One generated token of a streamed translation (greedy decoding only)."""

    index: int  # which text of the job
    token: str  # the new target piece
    text: str  # the translation so far
    alignment: list[float] | None  # this token's alignment row over the source tokens, if asked


@dataclass(frozen=True)
class ClassifyJob:
    """Images to classify (pixels and/or encoded files), which map to return, and the client's deadline."""

    pixels: np.ndarray | None = None  # uint8 (n, H, W) at the model's size; first in the result
    files: list[bytes] = field(default_factory=list)  # PNG/JPEG, decoded in the replica after admission
    return_attention: bool = False
    attention: Method = "rollout"
    attention_layers: list[int] | None = None  # `cls` only; None: all layers
    attention_heads: list[int] | None = None  # `cls` only; None: all heads
    timeout_s: float | None = None

    @property
    def count(self) -> int:
        return (0 if self.pixels is None else len(self.pixels)) + len(self.files)


@dataclass
class ClassifyResult:
    model: str
    version: str
    labels: list[str]
    probs: np.ndarray  # (n, classes) float32, in label order
    maps: np.ndarray | None  # (n, grid, grid) the asked map of each image, rows sum to 1; None when not asked
    method: Method | None = None  # which map `maps` is, and the layers and heads it averages
    layers: list[int] = field(default_factory=list)
    heads: list[int] = field(default_factory=list)

    def top_k(self, k: int) -> np.ndarray:
        """(n, k) class indices, most likely first (ties: the lower index)."""
        import numpy as np

        return np.argsort(-self.probs, axis=1, kind="stable")[:, :k]
