"""Every error status of the real app, in the one JSON format; bad input never yields a 500."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
from conftest import TEST_LIMITS, TRANSLATOR_MAX_PENDING
from service_helpers import b64, png

pytestmark = pytest.mark.slow


def error(r: httpx.Response, status: int, code: str | None = None, field: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) <= {"code", "message", "field"} and err["message"]
    if code:
        assert err["code"] == code, err
    if field:
        assert err.get("field") == field, err
    return err


@pytest.mark.parametrize(("body", "field"), [
    ({"texts": []}, "texts"),
    ({}, "texts"),
    ({"texts": ["a"] * 65}, "texts"),
    ({"texts": ["hi"], "beam_size": 9}, "beam_size"),
    ({"texts": ["hi"], "max_new_tokens": 0}, "max_new_tokens"),
    ({"texts": ["hi", 3]}, "texts[1]"),
    ({"texts": ["hi"], "beam": 2}, "beam"),
])
def test_translate_schema_422(service, body, field):
    with service.client() as c:
        error(c.post("/v1/translate", json=body), 422, "invalid_request", field)


def test_limits_422(service):
    with service.client() as c:
        long = "word " * (TEST_LIMITS["max_text_chars"] // 5 + 1)
        error(c.post("/v1/translate", json={"texts": ["ok", long]}), 422, "limit_exceeded", "texts[1]")
        error(c.post("/v1/classify", json={"images": [b64(png())], "top_k": 11}), 422, "invalid_request", "top_k")
        error(c.post("/v1/classify", content=b"{not json", headers={"content-type": "application/json"}), 422)
        error(c.post("/v1/classify", files=[("top_k", (None, "3"))]), 422, field="images")
        error(c.post("/v1/classify", files=[("images", ("a.png", png(), "image/png"))], data={"top_k": "0"}),
              422, field="top_k")


def test_bad_images_400(service):
    huge = np.zeros((1001, 1000), np.uint8)  # 1,001,000 pixels > the test cap of 1,000,000; compresses to ~1 KB
    with service.client() as c:
        error(c.post("/v1/classify", json={"images": ["not base64!"]}), 400, "bad_image", "images[0]")
        error(c.post("/v1/classify", json={"images": [b64(png()), b64(b"GIF89a garbage")]}), 400, "bad_image",
              "images[1]")
        error(c.post("/v1/classify", json={"images": [b64(png(huge))]}), 400, "image_too_large", "images[0]")
        error(c.post("/v1/classify", files=[("images", ("x.png", b"\x89PNG\r\n\x1a\n broken", "image/png"))]),
              400, "bad_image")


def test_body_over_cap_413(service):
    with service.client() as c:
        big = {"texts": ["x" * (TEST_LIMITS["max_body_bytes"] + 10)]}
        error(c.post("/v1/translate", json=big), 413, "body_too_large")
        error(c.post("/v1/classify", files=[("images", ("x.png", b"0" * (TEST_LIMITS["max_body_bytes"] + 10)))]),
              413, "body_too_large")


def test_past_deadline_504(service):
    with service.client() as c:
        error(c.post("/v1/translate", json={"texts": ["Where is the station?"]}, headers={"X-Timeout-Ms": "1"}),
              504, "deadline_exceeded")
        error(c.post("/v1/translate", json={"texts": ["hi"]}, headers={"X-Timeout-Ms": "soon"}), 422,
              field="x-timeout-ms")


def test_unknown_route_404_json(service):
    with service.client() as c:
        error(c.get("/v1/nothing"), 404, "not_found")


async def _burst(base: str, n: int) -> list[httpx.Response]:
    body = {"texts": ["The old man walked slowly along the quiet river in the evening light."] * 4,
            "beam_size": 4, "max_new_tokens": 64}
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=httpx.Limits(max_connections=n)) as c:
        return await asyncio.gather(*(c.post("/v1/translate", json=body) for _ in range(n)))


def test_queue_full_503_with_retry_after(service):
    # Run last in this module: the admitted part of the burst keeps the translator busy for a while.
    for _ in range(3):
        rs = asyncio.run(_burst(service.base, 4 * TRANSLATOR_MAX_PENDING))
        assert {r.status_code for r in rs} <= {200, 503}
        rejected = [r for r in rs if r.status_code == 503]
        if rejected:
            break
    assert rejected, "a burst of 4x max_pending requests was never rejected"
    for r in rejected:
        error(r, 503, "overloaded")
        assert int(r.headers["retry-after"]) >= 1
