"""POST /v1/classify: the classifier's own FastAPI app (JSON base64 images or a multipart upload).

Decode the request (JSON `ClassifyRequest`, or the multipart form below) into a `ClassifyJob` -> the replica's
`infer` (the same method the v2 protocol calls through a handle) -> encode the `ClassifyResult` as predictions,
or as the image with its map overlaid (`Accept: image/png`).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable
from typing import Annotated, Any, Literal, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from service.config import Limits
from service.deployments.jobs import DEFAULT_TOP_K, MAX_HEADS, MAX_LAYERS, MAX_TOP_K, ClassifyJob, ClassifyResult
from service.errors import InvalidRequest, LimitExceeded
from service.protocols.asgi import ERROR_RESPONSES, RouteSettings, client_timeout_s, make_api
from service.protocols.v1 import pictures
from service.protocols.v1.preprocess import decode_base64
from service.protocols.v1.schemas import (
    CLASSIFIER_MAPS,
    INTS,
    ClassifierAttention,
    ClassifyRequest,
    ClassifyResponse,
    HeadIndex,
    LabelScore,
    LayerIndex,
    Prediction,
)

ROUTE = "/v1/classify"
MEDIA_TYPES = ("application/json", "multipart/form-data")
MAX_FORM_FIELDS = 16  # the form has five fields; a few spare so an unknown one gets a clear 422 naming it
MAX_FIELD_BYTES = 1024


class Classifies(Protocol):
    """What the route needs of the classifier replica (service/deployments/classifier.py)."""

    def infer(self, job: ClassifyJob) -> Awaitable[ClassifyResult]: ...


def _form_bool(value: object) -> object:
    # A form field is text: a boolean is spelled true or false (any case, as Python's requests sends True).
    # Other spellings (0, 1, yes, on) are refused, as the schema's "boolean" says.
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"must be true or false, got {value!r}")


def _form_int(value: object) -> object:
    # Decimal digits; "3.0" too, since JSON Schema's integer 3.0 is written so in a form.
    if isinstance(value, str) and re.fullmatch(r"[0-9]+(\.0+)?", value):
        return int(value.partition(".")[0])
    raise ValueError(f"must be a whole number in decimal digits, got {value!r}")


def _form_ints(value: object) -> object:
    # A list in one text field: comma-separated whole numbers, exactly as INTS_SCHEMA's pattern ("0,5", "-1").
    if isinstance(value, str) and re.fullmatch(INTS, value):
        return [int(v) for v in value.split(",")]
    raise ValueError(f"must be comma-separated whole numbers without spaces (e.g. 0,5 or -1), got {value!r}")


class ClassifyForm(BaseModel):
    """The non-file fields of a multipart upload (the files go in repeated `images` parts)."""

    model_config = ConfigDict(extra="forbid")
    top_k: Annotated[int, BeforeValidator(_form_int)] = Field(DEFAULT_TOP_K, ge=1, le=MAX_TOP_K)
    return_attention: Annotated[bool, BeforeValidator(_form_bool)] = False
    attention: Literal["rollout", "cls"] = "rollout"
    attention_layers: Annotated[list[LayerIndex] | None, BeforeValidator(_form_ints)] = Field(
        None, min_length=1, max_length=MAX_LAYERS)
    attention_heads: Annotated[list[HeadIndex] | None, BeforeValidator(_form_ints)] = Field(
        None, min_length=1, max_length=MAX_HEADS)


FORM_FIELDS = ", ".join(ClassifyForm.model_fields)
INTS_SCHEMA = {"type": "string", "pattern": f"^{INTS}$"}
MULTIPART_SCHEMA = {
    "type": "object", "required": ["images"],
    "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1, "maxItems": 64,
                   "description": "PNG or JPEG files, one part each (a file that is not one: 400 bad_image). "
                                  "File parts under any other name (e.g. `files`) are images too, in order."},
        "top_k": {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K, "default": DEFAULT_TOP_K},
        "return_attention": {"type": "boolean", "default": False, "description": "`true` or `false` (any case)."},
        "attention": {"type": "string", "enum": ["rollout", "cls"], "default": "rollout",
                      "description": CLASSIFIER_MAPS},
        "attention_layers": {**INTS_SCHEMA, "description": "`cls` only: comma-separated layer indices (e.g. `0,5`, "
                             "`-1`; as the JSON field `attention_layers`); absent = all layers."},
        "attention_heads": {**INTS_SCHEMA, "description": "`cls` only: comma-separated head indices (e.g. `0,2`; "
                            "as the JSON field `attention_heads`); absent = all heads."},
    },
    # No other text fields (422 naming the field). A file part under another name (`files` is common) is taken
    # as an image too, as the description says: JSON Schema cannot tell a file part from a text field.
    "additionalProperties": False,
    # attention_layers and attention_heads choose the CLS map: with the rollout (the default) they are a 422.
    "anyOf": [{"properties": {"attention": {"const": "cls"}}, "required": ["attention"]},
              {"properties": {"attention_layers": False, "attention_heads": False}}],
}
OPENAPI_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": ClassifyRequest.model_json_schema()},
    "multipart/form-data": {"schema": MULTIPART_SCHEMA},
}}}
RESPONSES = {**ERROR_RESPONSES, 400: {**ERROR_RESPONSES[422], "description": (
    "an image is not base64, not a PNG or JPEG, or cannot be decoded (`bad_image`), or has more pixels than "
    "the limit (`image_too_large`)")}, 200: {"description": "The predictions; with `Accept: image/png` and one "
    "image, the image with its attention map (`attention`) overlaid (service/protocols/v1/pictures.py).",
    "content": pictures.PNG_CONTENT}}


def validation_error(e: ValidationError, prefix: tuple[str, ...] = ("body",)) -> RequestValidationError:
    return RequestValidationError([{**err, "loc": (*prefix, *err["loc"])} for err in e.errors()])


def check_count(n: int, limits: Limits) -> None:
    if n > limits.max_images:
        raise LimitExceeded(f"{n} images, the limit is {limits.max_images}", field="images")


async def read_json(request: Request, limits: Limits) -> tuple[list[bytes], ClassifyRequest]:
    try:
        opts = ClassifyRequest.model_validate_json(await request.body())
    except ValidationError as e:
        raise validation_error(e) from None
    check_count(len(opts.images), limits)
    return [decode_base64(b, field=f"images[{i}]", max_bytes=limits.max_image_bytes)
            for i, b in enumerate(opts.images)], opts


async def read_multipart(request: Request, limits: Limits) -> tuple[list[bytes], ClassifyForm]:
    form = await parse_multipart(request, limits.max_images)
    try:
        # Every file part is an image, in order, whatever its field name (`images` documented, `files` common).
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise RequestValidationError([{"type": "missing", "loc": ("body", "images"),
                                           "msg": "at least one image file part (e.g. -F images=@tshirt.png)"}])
        check_count(len(files), limits)
        fields = {k: v for k, v in form.multi_items() if not isinstance(v, UploadFile)}
        try:
            opts = ClassifyForm.model_validate(fields)
        except ValidationError as e:
            raise validation_error(e) from None
        return [await f.read() for f in files], opts
    finally:
        await form.close()


async def parse_multipart(request: Request, n: int) -> FormData:
    # Starlette's parser directly, not request.form(): that turns every parse error into a bare 400.
    parser = MultiPartParser(request.headers, request.stream(), max_files=n, max_fields=MAX_FORM_FIELDS,
                             max_part_size=MAX_FIELD_BYTES)
    try:
        return await parser.parse()
    except MultiPartException as e:
        if e.message.startswith("Too many files"):
            raise LimitExceeded(f"more than {n} image file parts, the limit is {n}", field="images") from None
        if e.message.startswith("Too many fields"):
            raise LimitExceeded(f"more than {MAX_FORM_FIELDS} text fields; the form's fields are "
                                f"{FORM_FIELDS}", field="body") from None
        if e.message.startswith("Part exceeded"):
            raise LimitExceeded(f"a text field is over {MAX_FIELD_BYTES} bytes; the form's fields are "
                                f"{FORM_FIELDS}", field="body") from None
        raise InvalidRequest(f"malformed multipart/form-data body: {e.message}", field="body") from None


def encode(res: ClassifyResult, top_k: int) -> ClassifyResponse:
    preds = []
    for i, order in enumerate(res.top_k(top_k)):
        p, best = res.probs[i], int(order[0])
        attention = None
        if res.maps is not None and res.method is not None:
            attention = ClassifierAttention(method=res.method, grid=list(res.maps.shape[1:]),
                                            weights=res.maps[i].tolist(), layers=res.layers, heads=res.heads)
        preds.append(Prediction(label=res.labels[best], index=best, score=float(p[best]),
                                top_k=[LabelScore(label=res.labels[int(j)], score=float(p[j])) for j in order],
                                attention=attention))
    return ClassifyResponse(model=res.model, version=res.version, predictions=preds)


def build_api(replica: Classifies | None, settings: RouteSettings, limits: Limits) -> FastAPI:
    """The app of one classifier replica (`replica` None: only for its OpenAPI document)."""
    api = make_api("attnserve classifier", settings)

    @api.post("/", response_model=ClassifyResponse, responses=RESPONSES, openapi_extra=OPENAPI_BODY,
              summary="Classify images (JSON base64 or multipart upload)")
    async def classify(request: Request) -> Any:
        assert replica is not None
        multipart = request.headers.get("content-type", "").lower().startswith("multipart/form-data")
        raws, opts = await (read_multipart(request, limits) if multipart else read_json(request, limits))
        png = pictures.negotiate(request.headers.get("accept"), len(raws), field="images")
        job = ClassifyJob(files=raws, return_attention=opts.return_attention or png, attention=opts.attention,
                          attention_layers=opts.attention_layers, attention_heads=opts.attention_heads,
                          timeout_s=client_timeout_s(request.headers))
        resp = encode(await replica.infer(job), opts.top_k)
        return await pictures.overlay_response(raws[0], resp) if png else resp

    return api
