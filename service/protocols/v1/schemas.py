"""HTTP request/response models (pydantic v2): the one place the wire format is defined.

Hard bounds here are the API's published maxima; the tighter, configurable limits (characters, source tokens,
bytes and pixels per image, body size) are checked by the app from `Limits` and published in `/v1/models`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, WithJsonSchema

from service.deployments.jobs import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TOP_K,
    MAX_BEAM,
    MAX_HEADS,
    MAX_LAYERS,
    MAX_NEW_TOKENS,
    MAX_TOP_K,
)


class _Strict(BaseModel):
    # Unknown fields are an error, not silently ignored: a typo like "beam" must not fall back to a default.
    # No coercion either ("4" or 4.0 for an integer, 0 or "yes" for a boolean): the wire format is exactly
    # what the OpenAPI document says.
    model_config = ConfigDict(extra="forbid", strict=True)


def _encodable(text: str) -> str:
    # JSON may escape a lone surrogate ("\ud800"); it is no character, and the tokenizer cannot take it.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"lone surrogate U+{ord(text[e.start]):04X} at character {e.start}: texts must be valid "
                         "Unicode (encodable as UTF-8; surrogates only as pairs, e.g. \\ud83d\\ude00)") from None
    return text


Utf8Text = Annotated[str, AfterValidator(_encodable)]


def _integral(value: object) -> object:
    # JSON Schema's "integer" is any number with a zero fractional part: 2.0 is one, as the document promises.
    # Still strict otherwise: "2", true and 2.5 are not.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Int = Annotated[int, BeforeValidator(_integral)]
INTS = r"-?[0-9]+(,-?[0-9]+)*"  # a list of whole numbers in one string ("0,5", "-1"): forms and v2 parameters
# Published maxima of layer and head indices (service/deployments/jobs.py); a model's own ranges, smaller, are in
# GET /v1/models' answers and in the 422 for an index outside them.
LayerIndex = Annotated[Int, Field(ge=-MAX_LAYERS, le=MAX_LAYERS - 1)]
HeadIndex = Annotated[Int, Field(ge=0, le=MAX_HEADS - 1)]
Base64Image = Annotated[
    str,
    StringConstraints(min_length=1),
    WithJsonSchema({"type": "string", "minLength": 1, "contentEncoding": "base64",
                    "description": "Base64 of a PNG or JPEG file; a data: URL prefix and whitespace are allowed. "
                                   "Not base64, or not an image: 400 bad_image."}),
]
# A 2x2 black PNG: the smallest request that classifies (Swagger's "Try it out" and the fuzzer's first example).
EXAMPLE_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAAAAABX3VL4AAAAC0lEQVR4nGNgQAYAAA4AAamRc7EAAAAASUVORK5CYII="


class TranslateRequest(_Strict):
    texts: list[Utf8Text] = Field(min_length=1, max_length=64, description="English sentences to translate.")
    beam_size: Int = Field(1, ge=1, le=MAX_BEAM, description="1 = greedy decoding.")
    max_new_tokens: Int = Field(DEFAULT_MAX_NEW_TOKENS, ge=1, le=MAX_NEW_TOKENS,
                                description="Cap on generated target tokens per text.")
    return_attention: bool = Field(False, description="Also return the alignment (decoder cross-attention).")
    attention_layers: list[LayerIndex] | None = Field(None, min_length=1, max_length=MAX_LAYERS, description=(
        "Decoder layers averaged into the alignment; negative counts from the last; duplicates are merged; null = "
        "the last layer. Outside the model's (GET /v1/models: `decoder_layers`): 422."))
    attention_heads: list[HeadIndex] | None = Field(None, min_length=1, max_length=MAX_HEADS, description=(
        "Heads averaged into the alignment (0-based; duplicates are merged); null = all. Outside the model's "
        "(GET /v1/models: `heads`): 422."))
    return_encoder_attention: bool = Field(False, description=(
        "Also return the encoder's self-attention over the source tokens (source x source; runs the encoder's "
        "attention graph)."))
    encoder_attention_layers: list[LayerIndex] | None = Field(None, min_length=1, max_length=MAX_LAYERS, description=(
        "Encoder layers averaged into `encoder_attention`, as `attention_layers` (GET /v1/models: "
        "`encoder_layers`); null = the last."))
    encoder_attention_heads: list[HeadIndex] | None = Field(None, min_length=1, max_length=MAX_HEADS, description=(
        "Heads averaged into `encoder_attention`, as `attention_heads`; null = all."))
    stream: bool = Field(False, description="Answer with Server-Sent Events: a `token` event per generated token "
                         "(greedy decoding; beam search sends only the final event), then a `done` event whose data "
                         "is the TranslateResponse.")


class TokenEvent(BaseModel):
    """Data of one `token` event of a streamed translation."""

    index: int = Field(description="Which text of the request.")
    token: str = Field(description="The new target piece (`▁` marks a word start).")
    text: str = Field(description="The translation so far.")
    alignment: list[float] | None = Field(None, description="This token's alignment row over the source tokens "
                                          "(the mean over `attention_layers` and `attention_heads`, as the final "
                                          "`attention.weights` row), if asked.")


class TranslationAttention(BaseModel):
    source_tokens: list[str]
    target_tokens: list[str]
    weights: list[list[float]] = Field(description="target x source; every row sums to 1.")
    layers: list[int] = Field(description="Decoder layers averaged into `weights` (sorted, non-negative).")
    heads: list[int] = Field(description="Heads averaged into `weights`.")


class EncoderAttention(BaseModel):
    tokens: list[str] = Field(description="The source pieces (without EOS), as `attention.source_tokens`.")
    weights: list[list[float]] = Field(description="source x source: row i is what source token i attended to in "
                                       "the encoder, over the source tokens (EOS dropped); every row sums to 1.")
    layers: list[int] = Field(description="Encoder layers averaged into `weights` (sorted, non-negative).")
    heads: list[int] = Field(description="Heads averaged into `weights`.")


class Translation(BaseModel):
    text: str
    attention: TranslationAttention | None = None
    encoder_attention: EncoderAttention | None = None


class TranslateResponse(BaseModel):
    model: str
    version: str
    translations: list[Translation]


CLASSIFIER_MAPS = (
    "Which map `return_attention` returns: `rollout` (default), the attention rollout of the CLS token onto the "
    "patches over all layers (each layer's head mean mixed 0.5/0.5 with the identity, layers multiplied); or "
    "`cls`, the raw attention of the CLS token over the patches, mean over `attention_layers` and "
    "`attention_heads`, renormalised over the patches. Both run one attention graph. Measured against random "
    "patch order (deletion and insertion curves, 300 test images; docs/BENCHMARKS.md, `attnserve bench explain`): "
    "the rollout beats random on both by the widest margin, and so does the CLS map averaged over all layers "
    "(`cls`'s default). A single layer's map shows what that layer attends to, not where the evidence is: layer 0 "
    "alone is WORSE than random, and the previous model's last layer was no better than random.")


# `attention_layers` and `attention_heads` choose the CLS map: with the rollout (the default) they are a 422.
ONLY_CLS_CHOOSES = {"anyOf": [
    {"properties": {"attention": {"const": "cls"}}, "required": ["attention"]},
    {"properties": {"attention_layers": {"type": "null"}, "attention_heads": {"type": "null"}}}]}


class ClassifyRequest(_Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{"images": [EXAMPLE_PNG], "top_k": 3}],
                                                 **ONLY_CLS_CHOOSES})

    images: list[Base64Image] = Field(min_length=1, max_length=64, description="Base64 PNG or JPEG images.")
    top_k: Int = Field(DEFAULT_TOP_K, ge=1, le=MAX_TOP_K)
    return_attention: bool = Field(False, description="Also return a 7x7 attention map over the patches (`attention`"
                                   " picks which).")
    attention: Literal["rollout", "cls"] = Field("rollout", description=CLASSIFIER_MAPS)
    attention_layers: list[LayerIndex] | None = Field(None, min_length=1, max_length=MAX_LAYERS, description=(
        "`cls` only: encoder layers averaged into the map; negative counts from the last; duplicates are merged; "
        "null = all layers (their mean beats random patch order at finding the evidence; the last layer "
        "alone, [-1], does not: docs/BENCHMARKS.md). Outside the model's layers (GET /v1/models: "
        "`encoder_layers`): 422."))
    attention_heads: list[HeadIndex] | None = Field(None, min_length=1, max_length=MAX_HEADS, description=(
        "`cls` only: heads averaged into the map (0-based; duplicates are merged); null = all. Outside the "
        "model's heads (GET /v1/models: `heads`): 422."))


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifierAttention(BaseModel):
    method: Literal["rollout", "cls"] = Field(description="Which map: see the request's `attention`.")
    grid: list[int] = Field(description="[rows, cols] of the patch grid, [7, 7].")
    weights: list[list[float]] = Field(description="grid rows x grid cols: attention of the CLS token over the "
                                       "patches (row-major as the image), summing to 1.")
    layers: list[int] = Field(description="Layers the map comes from (rollout: all of them).")
    heads: list[int] = Field(description="Heads averaged into the map (rollout: all of them).")


class Prediction(BaseModel):
    label: str
    index: int
    score: float
    top_k: list[LabelScore]
    attention: ClassifierAttention | None = None


class ClassifyResponse(BaseModel):
    model: str
    version: str
    predictions: list[Prediction]


class LimitsInfo(BaseModel):
    max_texts: int
    max_text_chars: int
    max_source_tokens: int
    max_images: int
    max_image_bytes: int
    max_image_pixels: int
    max_body_bytes: int


class ModelInfo(BaseModel):
    name: str
    version: str
    task: Literal["translation", "image-classification"]
    route: str
    labels: list[str] | None = None
    precision: str
    device: str
    encoder_layers: int | None = Field(None, description="Transformer encoder layers (the ViT's layers): the range "
                                       "of `attention_layers` (classify) and `encoder_attention_layers` (translate).")
    decoder_layers: int | None = Field(None, description="Decoder layers (translator): the range of "
                                       "`attention_layers` on /v1/translate.")
    heads: int | None = Field(None, description="Attention heads per layer: the range of the `*_heads` choices.")


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
    limits: LimitsInfo


class Health(BaseModel):
    status: Literal["ok", "ready"]


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
