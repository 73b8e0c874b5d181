"""The v2 wire models of the metadata routes, and the OpenAPI entries of every v2 route (bodies, errors)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from service.protocols.v2 import codec
from service.protocols.v2.compression import ENCODINGS
from service.protocols.v2.specs import TensorSpec


class V2ErrorResponse(BaseModel):
    error: str


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    parameters: dict[str, str] = Field(description="attnserve's addition: what each tensor and request parameter "
                                       "means (keys `input.<name>`, `output.<name>`, `parameter.<name>`).")


class RepositoryModel(BaseModel):
    name: str
    version: str | None = None
    state: str = Field(description="READY or UNAVAILABLE")
    reason: str = ""


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": V2ErrorResponse, "description": "malformed request or over a limit"},
    404: {"model": V2ErrorResponse, "description": "unknown model, version or route"},
    503: {"model": V2ErrorResponse, "description": "model not ready, or its queue is full (Retry-After)"},
    401: {"model": V2ErrorResponse, "description": "no or an invalid `Authorization: Bearer` token; only when "
          "API tokens are configured, and not on the public paths",
          "headers": {"WWW-Authenticate": {"description": "Bearer realm=\"attnserve\"",
                                           "schema": {"type": "string"}}}}}


def _inlined(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema with its `$defs` put in place (they would not resolve inside an OpenAPI document)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items()}
        return [walk(v) for v in node] if isinstance(node, list) else node

    return walk(schema)


INFER_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _inlined(codec.InferenceRequest)},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary", "description": (
        "Binary tensor data extension: the JSON InferenceRequest (Inference-Header-Content-Length bytes), then "
        "each binary input's raw bytes in input order (little-endian; BYTES elements as a 4-byte little-endian "
        "length and the bytes).")}}}},
    "parameters": [
        {"name": "Inference-Header-Content-Length", "in": "header", "required": False, "schema": {
            "type": "integer", "minimum": 0}, "description": "Length of the JSON header when binary data follows."},
        {"name": "Content-Encoding", "in": "header", "required": False,
         "schema": {"type": "string", "enum": list(ENCODINGS)}},
        {"name": "X-Timeout-Ms", "in": "header", "required": False, "schema": {"type": "number", "exclusiveMinimum": 0},
         "description": "Shortens (never extends) the model's deadline, like the `timeout` parameter."}]}
INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The outputs; with binary outputs, the JSON header (Inference-Header-Content-Length "
                         "bytes) and then their bytes.",
          "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
          "headers": {"Inference-Header-Content-Length": {"schema": {"type": "integer"},
                                                          "description": "present when binary outputs follow"}}},
    **ERRORS,
    413: {"model": V2ErrorResponse, "description": "body over the cap"},
    504: {"model": V2ErrorResponse, "description": "no result within the deadline"},
}
