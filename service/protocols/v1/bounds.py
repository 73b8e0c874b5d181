"""The /v1 request schemas in the OpenAPI document made as narrow as the service: the configured limits and the
served models' layer and head ranges (from their manifests). A request the document allows is then one the
service accepts, except for what JSON Schema cannot say (an image that decodes, the body cap, source tokens);
the schema fuzzer (tests/service/test_schema_fuzz.py, positive_data_acceptance) holds the document to it."""

from __future__ import annotations

import copy
from typing import Any

from service.config import Limits
from service.runtime import Manifest


def _body(doc: dict[str, Any], path: str, media: str) -> dict[str, Any] | None:
    schema = doc.get("paths", {}).get(path, {}).get("post", {}).get("requestBody", {}).get("content", {})
    schema = schema.get(media, {}).get("schema")
    if schema is None:
        return None
    ref = schema.get("$ref", "")
    return doc["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else schema


def _items(prop: dict[str, Any], lo: int, hi: int) -> None:
    """Bound the integer items of a `list[int] | None` property."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") == "array":
            branch["items"] = {**branch["items"], "minimum": lo, "maximum": hi}


def ints_pattern(lo: int, hi: int, max_items: int) -> str:
    """A comma-separated list of 1..max_items whole numbers in lo..hi, as a regular expression."""
    one = "|".join(str(i) for i in sorted(range(lo, hi + 1), key=lambda i: -len(str(i))))
    return f"^(?:{one})(?:,(?:{one})){{0,{max_items - 1}}}$"


def base64_length(max_bytes: int) -> int:
    """The longest base64 text whose decoded size passes `decode_base64`'s cheap length check."""
    return (max_bytes + 3) * 4 // 3


def publish(doc: dict[str, Any], limits: Limits, translator: Manifest | None,
            classifier: Manifest | None) -> dict[str, Any]:
    doc = copy.deepcopy(doc)  # the route modules' schemas stay as written
    t = _body(doc, "/v1/translate", "application/json")
    if t is not None:
        p = t["properties"]
        p["texts"]["maxItems"] = limits.max_texts
        p["texts"]["items"] = {**p["texts"]["items"], "maxLength": limits.max_text_chars}
        if translator is not None:
            dec, enc, heads = (int(translator.model[k]) for k in ("decoder_layers", "encoder_layers", "heads"))
            _items(p["attention_layers"], -dec, dec - 1)
            _items(p["encoder_attention_layers"], -enc, enc - 1)
            _items(p["attention_heads"], 0, heads - 1)
            _items(p["encoder_attention_heads"], 0, heads - 1)
    c = _body(doc, "/v1/classify", "application/json")
    m = _body(doc, "/v1/classify", "multipart/form-data")
    if c is not None and m is not None:
        c["properties"]["images"]["maxItems"] = m["properties"]["images"]["maxItems"] = limits.max_images
        c["properties"]["images"]["items"]["maxLength"] = base64_length(limits.max_image_bytes)
        if classifier is not None:
            layers, heads = int(classifier.model["layers"]), int(classifier.model["heads"])
            _items(c["properties"]["attention_layers"], -layers, layers - 1)
            _items(c["properties"]["attention_heads"], 0, heads - 1)
            for name, lo, hi in (("attention_layers", -layers, layers - 1), ("attention_heads", 0, heads - 1)):
                m["properties"][name]["pattern"] = ints_pattern(lo, hi, 16)
    return doc
