"""The Open Inference Protocol v2 wire format (KServe/Triton REST): request parsing and response encoding.

A v2 body is a JSON header, optionally followed by raw tensor bytes (the binary tensor data extension):
`Inference-Header-Content-Length` says where the JSON ends; each binary input says its byte size in
`parameters.binary_data_size`, in the order of `inputs`. Numbers are little-endian, row-major; a BYTES
element is a 4-byte little-endian length and then that many bytes. Responses use the same layout for the
outputs asked with `binary_data: true` (or every output under `binary_data_output: true`).

Pure functions over bytes and numpy, no HTTP or Ray: every malformed body is a `V2Error`, never anything else.
The pydantic models below both validate the JSON header and document it in the OpenAPI schema.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from service.errors import InvalidRequest

HEADER = "inference-header-content-length"
Parameter = StrictBool | StrictInt | StrictFloat | StrictStr
# v2 datatype -> numpy dtype, little-endian. BYTES is an object array of `bytes`; BF16 is not supported.
DTYPES: dict[str, np.dtype] = {name: np.dtype(t).newbyteorder("<") for name, t in {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}.items()}
BYTES = "BYTES"
DATATYPES = (*DTYPES, BYTES)
Datatype = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
                   "FP64", "BYTES"]
assert set(Datatype.__args__) == set(DATATYPES)  # type: ignore[attr-defined]


class V2Error(InvalidRequest):
    """A body that is not a well-formed v2 request (answered 400 on the v2 routes)."""


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    shape: list[Annotated[int, Field(ge=0)]] = Field(description="Dimensions, each >= 0.")
    datatype: Datatype = Field(description="The element type (BF16 is not supported).")
    parameters: dict[str, Parameter] = Field(default_factory=dict, description=(
        "`binary_data_size`: the tensor's bytes follow the JSON header (binary tensor data extension)."))
    data: list[Any] | None = Field(None, description="Row-major elements, flat or nested; BYTES as UTF-8 strings. "
                                   "Absent when the tensor is sent as binary data.")


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    parameters: dict[str, Parameter] = Field(default_factory=dict, description=(
        "`binary_data`: return this output as binary data after the JSON header; `classification`: k, return "
        "the top k classes as BYTES \"score:index:label\" instead (classification extension)."))


class InferenceRequest(BaseModel):
    """The JSON header of POST /v2/models/{name}/infer."""

    model_config = ConfigDict(extra="forbid", strict=True)
    id: str | None = None
    # KServe's Python SDK (InferenceRESTClient) sends these in the body too; the path names the model, and a
    # body that names another one is refused (400).
    model_name: str | None = Field(None, description="Optional; if sent, the model of the path.")
    model_version: str | None = Field(None, description="Optional; if sent, the version served (or of the path).")
    parameters: dict[str, Parameter] = Field(default_factory=dict, description=(
        "`binary_data_output`: every output as binary data; `timeout`: microseconds (shortens the deadline); "
        "model parameters as listed in the model metadata."))
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = Field(None, description="Outputs to return; absent: the default ones.")


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Parameter] | None = Field(None, description="`binary_data_size` when sent as binary.")
    data: list[Any] | None = Field(None, description="Flat row-major elements, when not sent as binary data.")


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[ResponseOutput]


@dataclass
class Request:
    id: str | None
    parameters: dict[str, Any]
    inputs: dict[str, np.ndarray]  # name -> array of the declared shape (BYTES: object array of bytes)
    datatypes: dict[str, str]
    outputs: list[RequestOutput] | None
    model_name: str | None = None
    model_version: str | None = None


@dataclass
class Output:
    name: str
    datatype: str
    data: np.ndarray  # BYTES: object array of bytes or str
    binary: bool
    parameters: dict[str, Any] = field(default_factory=dict)


def parse_request(body: bytes, header_length: str | None) -> Request:
    """A v2 request body (and its Inference-Header-Content-Length, if any) -> named numpy inputs."""
    if header_length is None:
        head, rest = body, b""
    else:
        if not (header_length.isascii() and header_length.isdigit()):
            raise V2Error(f"Inference-Header-Content-Length must be a byte count, got {header_length!r}")
        n = int(header_length)
        if n > len(body):
            raise V2Error(f"Inference-Header-Content-Length is {n}, but the body has only {len(body)} bytes")
        head, rest = body[:n], body[n:]
    try:
        req = InferenceRequest.model_validate_json(head)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        if first["type"] == "json_invalid":
            raise V2Error(f"the inference header is not valid JSON: {first['msg']}"
                          + ("" if header_length else " (binary data needs Inference-Header-Content-Length)")) from None
        raise V2Error(f"{where}: {first['msg']}") from None
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    offset = 0
    for t in req.inputs:
        if t.name in inputs:
            raise V2Error(f"input {t.name!r} appears twice")
        count = int(np.prod(t.shape, dtype=object)) if t.shape else 1
        size = t.parameters.get("binary_data_size")
        if size is not None:
            if t.data is not None:
                raise V2Error(f"input {t.name!r} has both `data` and `binary_data_size`")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise V2Error(f"input {t.name!r}: binary_data_size must be a byte count, got {size!r}")
            if offset + size > len(rest):
                raise V2Error(f"input {t.name!r}: binary_data_size {size} runs past the end of the body "
                              f"({len(rest) - offset} binary bytes left)")
            arr = from_binary(rest[offset : offset + size], t.datatype, count, t.name)
            offset += size
        elif t.data is not None:
            arr = from_json(t.data, t.datatype, count, t.name)
        else:
            raise V2Error(f"input {t.name!r} has neither `data` nor `parameters.binary_data_size`")
        inputs[t.name] = arr.reshape(t.shape)
        datatypes[t.name] = t.datatype
    if offset != len(rest):
        raise V2Error(f"{len(rest) - offset} bytes after the JSON header belong to no input's binary_data_size")
    return Request(req.id, req.parameters, inputs, datatypes, req.outputs, req.model_name, req.model_version)


def from_binary(raw: bytes, datatype: str, count: int, name: str) -> np.ndarray:
    if datatype == BYTES:
        items, pos = [], 0
        while pos < len(raw):
            if pos + 4 > len(raw):
                raise V2Error(f"input {name!r}: BYTES data ends inside an element's 4-byte length")
            (n,) = struct.unpack_from("<I", raw, pos)
            pos += 4
            if pos + n > len(raw):
                raise V2Error(f"input {name!r}: a BYTES element of {n} bytes runs past its binary_data_size")
            items.append(raw[pos : pos + n])
            pos += n
        if len(items) != count:
            raise V2Error(f"input {name!r}: {len(items)} BYTES elements for a shape of {count} elements")
        return _object_array(items)
    dtype = DTYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise V2Error(f"input {name!r}: {len(raw)} bytes of {datatype}, the shape needs {count * dtype.itemsize}")
    arr = np.frombuffer(raw, dtype=dtype)
    if datatype == "BOOL" and arr.size and raw.translate(None, b"\x00\x01"):
        raise V2Error(f"input {name!r}: BOOL bytes must be 0 or 1")
    return arr.astype(dtype.newbyteorder("="), copy=False)


def from_json(data: list[Any], datatype: str, count: int, name: str) -> np.ndarray:
    flat = _flatten(data)
    if len(flat) != count:
        raise V2Error(f"input {name!r}: {len(flat)} elements in `data` for a shape of {count} elements")
    if datatype == BYTES:
        if not all(isinstance(x, str) for x in flat):
            raise V2Error(f"input {name!r}: BYTES elements in JSON must be strings")
        try:
            return _object_array([x.encode("utf-8") for x in flat])
        except UnicodeEncodeError:
            raise V2Error(f"input {name!r}: a string holds a lone surrogate; texts must be valid Unicode") from None
    dtype = DTYPES[datatype]
    if datatype == "BOOL":
        ok = all(isinstance(x, bool) for x in flat)
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        ok = all(isinstance(x, int) and not isinstance(x, bool) and info.min <= x <= info.max for x in flat)
    else:
        ok = all(isinstance(x, int | float) and not isinstance(x, bool) for x in flat)
    if not ok:
        raise V2Error(f"input {name!r}: every element must be a {datatype} value "
                      + ("(true or false)" if datatype == "BOOL" else "in range"))
    return np.array(flat, dtype=dtype.newbyteorder("="))


def _flatten(data: list[Any]) -> list[Any]:
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out


def _object_array(items: list[Any]) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


def to_bytes_element(x: Any) -> bytes:
    return x if isinstance(x, bytes) else str(x).encode("utf-8")


def encode_response(model_name: str, model_version: str | None, request_id: str | None,
                    outputs: list[Output]) -> tuple[bytes, int | None]:
    """Outputs -> (body, Inference-Header-Content-Length or None when the body is JSON only)."""
    entries, blobs = [], []
    for o in outputs:
        entry: dict[str, Any] = {"name": o.name, "datatype": o.datatype, "shape": list(o.data.shape)}
        params = dict(o.parameters)
        if o.binary:
            blob = binary_tensor(o.data, o.datatype)
            params["binary_data_size"] = len(blob)
            blobs.append(blob)
        elif o.datatype == BYTES:
            entry["data"] = [to_bytes_element(x).decode("utf-8", "replace") for x in o.data.reshape(-1)]
        else:
            entry["data"] = o.data.reshape(-1).tolist()
        if params:
            entry["parameters"] = params
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": entries}
    if request_id is not None:
        doc["id"] = request_id
    head = json.dumps(doc, ensure_ascii=False, allow_nan=False).encode("utf-8")
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


def binary_tensor(data: np.ndarray, datatype: str) -> bytes:
    if datatype == BYTES:
        parts = []
        for x in data.reshape(-1):
            b = to_bytes_element(x)
            parts.append(struct.pack("<I", len(b)) + b)
        return b"".join(parts)
    return np.ascontiguousarray(data, dtype=DTYPES[datatype]).tobytes()
