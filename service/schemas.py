"""HTTP request/response models (pydantic v2): the one place the wire format is defined.

Hard bounds here are the API's published maxima; the tighter, configurable limits (characters, source tokens,
bytes and pixels per image, body size) are checked by the app from `Limits` and published in `/v1/models`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    # Unknown fields are an error, not silently ignored: a typo like "beam" must not fall back to a default.
    model_config = ConfigDict(extra="forbid")


class TranslateRequest(_Strict):
    texts: list[str] = Field(min_length=1, max_length=64, description="English sentences to translate.")
    beam_size: int = Field(1, ge=1, le=8, description="1 = greedy decoding.")
    max_new_tokens: int = Field(128, ge=1, le=256, description="Cap on generated target tokens per text.")
    return_attention: bool = Field(False, description="Also return cross-attention (runs the slower attention graphs).")


class TranslationAttention(BaseModel):
    source_tokens: list[str]
    target_tokens: list[str]
    weights: list[list[float]] = Field(description="target x source; every row sums to 1.")
    layer: int = Field(description="Decoder layer the cross-attention comes from.")
    heads: list[int] = Field(description="Heads averaged into `weights`.")


class Translation(BaseModel):
    text: str
    attention: TranslationAttention | None = None


class TranslateResponse(BaseModel):
    model: str
    version: str
    translations: list[Translation]


class ClassifyRequest(_Strict):
    images: list[str] = Field(min_length=1, max_length=64, description="Base64 PNG or JPEG (data: URLs accepted).")
    top_k: int = Field(3, ge=1, le=10)
    return_attention: bool = Field(False, description="Also return the 7x7 attention rollout of CLS onto patches.")


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifierAttention(BaseModel):
    grid: list[int] = Field(description="[rows, cols] of the patch grid, [7, 7].")
    rollout: list[list[float]] = Field(description="Attention rollout of the CLS token onto the patches (sums to 1).")


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
