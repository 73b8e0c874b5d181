"""The v2 wire codec against the real tritonclient's encoder and decoder, without a server."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tritonclient.http import InferInput, InferRequestedOutput, InferResult
from tritonclient.http._utils import _get_inference_request

from service.protocols.v2.codec import Output, V2Error, encode_response, parse_request


def triton_body(inputs: list[InferInput], outputs: list[InferRequestedOutput] | None = None,
                **params) -> tuple[bytes, str | None]:
    body, json_size = _get_inference_request(inputs=inputs, request_id="r1", outputs=outputs, sequence_id=0,
                                             sequence_start=False, sequence_end=False, priority=0, timeout=None,
                                             custom_parameters=params or None)
    return body, None if json_size is None else str(json_size)


def tensor(name: str, arr: np.ndarray, datatype: str, *, binary: bool) -> InferInput:
    t = InferInput(name, list(arr.shape), datatype)
    t.set_data_from_numpy(arr, binary_data=binary)
    return t


@pytest.mark.parametrize("binary", [True, False])
def test_request_round_trip(binary):
    texts = np.array(["héllo", "", "a\x00b"], dtype=object).reshape(3, 1)
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    floats = np.array([[1.5, -2.0]], np.float32)
    body, header = triton_body([tensor("TEXT", texts, "BYTES", binary=binary),
                                tensor("IMAGE", images, "UINT8", binary=binary),
                                tensor("X", floats, "FP32", binary=binary)], beam_size=2)
    assert (header is not None) == binary
    req = parse_request(body, header)
    assert req.id == "r1" and req.parameters == {"binary_data_output": True, "beam_size": 2} and req.outputs is None
    assert req.inputs["TEXT"].shape == (3, 1)
    assert [x.decode() for x in req.inputs["TEXT"].reshape(-1)] == ["héllo", "", "a\x00b"]
    np.testing.assert_array_equal(req.inputs["IMAGE"], images)
    np.testing.assert_array_equal(req.inputs["X"], floats)
    assert req.datatypes == {"TEXT": "BYTES", "IMAGE": "UINT8", "X": "FP32"}


def test_requested_outputs_are_parsed():
    outs = [InferRequestedOutput("LABEL", binary_data=False), InferRequestedOutput("PROBABILITIES", class_count=2)]
    body, header = triton_body([tensor("IMAGE", np.zeros((1, 28, 28), np.uint8), "UINT8", binary=True)], outs)
    req = parse_request(body, header)
    assert [(o.name, o.parameters) for o in req.outputs] == [
        ("LABEL", {"binary_data": False}), ("PROBABILITIES", {"binary_data": True, "classification": 2})]


@pytest.mark.parametrize("binary", [True, False])
def test_response_decodes_in_tritonclient(binary):
    probs = np.random.default_rng(0).random((2, 10), dtype=np.float32)
    labels = np.array([b"Shirt", "Bäg".encode()], dtype=object)
    body, header = encode_response("m", "v1", "r1", [Output("P", "FP32", probs, binary),
                                                     Output("L", "BYTES", labels, binary, {"layer": 2})])
    res = InferResult.from_response_body(body, header_length=header)
    np.testing.assert_array_equal(res.as_numpy("P"), probs)
    # tritonclient gives BYTES as bytes from binary data, as str from JSON
    assert [x.decode() if binary else x for x in res.as_numpy("L")] == ["Shirt", "Bäg"]
    assert res.get_response()["model_version"] == "v1" and res.get_output("L")["parameters"]["layer"] == 2


def json_body(inputs: list[dict], **extra) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def with_binary(datatype: str, shape: list[int], size: int, tail: bytes) -> tuple[bytes, str]:
    head = json_body([{"name": "X", "shape": shape, "datatype": datatype, "parameters": {"binary_data_size": size}}])
    return head + tail, str(len(head))


@pytest.mark.parametrize(("body", "header", "message"), [
    (b"{", None, "not valid JSON"),
    (b'{"inputs": []}', None, "at least 1"),
    (json_body([{"name": "X", "shape": [2], "datatype": "FP32", "data": [1.0]}]), None, "1 elements"),
    (json_body([{"name": "X", "shape": [1], "datatype": "UINT8", "data": [300]}]), None, "UINT8"),
    (json_body([{"name": "X", "shape": [1], "datatype": "UINT8", "data": [1.5]}]), None, "UINT8"),
    (json_body([{"name": "X", "shape": [1], "datatype": "BF16", "data": [1]}]), None, "Input should be 'BOOL'"),
    (json_body([{"name": "X", "shape": [-1], "datatype": "FP32", "data": []}]), None, "greater than or equal to 0"),
    (json_body([{"name": "X", "shape": [1], "datatype": "BYTES", "data": [1]}]), None, "strings"),
    (json_body([{"name": "X", "shape": [1], "datatype": "FP32"}]), None, "neither"),
    (json_body([{"name": "X", "shape": [1], "datatype": "FP32", "data": [1]}] * 2), None, "twice"),
    (json_body([{"name": "X", "shape": [1], "datatype": "FP32", "data": [1]}], extra=1), None, "extra"),
    (*with_binary("FP32", [1], 4, b"\0" * 3), "past the end"),
    (*with_binary("FP32", [2], 4, b"\0" * 4), "the shape needs 8"),
    (*with_binary("BYTES", [1], 4, b"\x09\0\0\0"), "runs past"),
    (*with_binary("BOOL", [1], 1, b"\x02"), "0 or 1"),
    (*with_binary("FP32", [1], 4, b"\0" * 8), "belong to no input"),
    (b"{}", "99", "only 2 bytes"),
    (b"{}", "x", "byte count"),
])
def test_malformed_requests_are_v2_errors(body, header, message):
    with pytest.raises(V2Error, match=message):
        parse_request(body, header)
