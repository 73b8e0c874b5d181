"""Every error status of the real app, in the one JSON format; bad input never yields a 500."""

from __future__ import annotations

import asyncio
import io
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image, ImageOps
from service_helpers import LONG_DECODE, TEST_LIMITS, TRANSLATOR_MAX_PENDING, b64, png, settled, value, wait_for

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


# --- hardening: every input below once gave a 5xx, a wrong status, or a status the OpenAPI document did not list ---

JSON = {"content-type": "application/json"}


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def with_chunk(data: bytes, kind: bytes, payload: bytes) -> bytes:
    end = data.rindex(b"IEND") - 4
    return data[:end] + png_chunk(kind, payload) + data[end:]


def test_lone_surrogate_text_422(service):
    with service.client() as c:
        # A JSON escape of a lone surrogate is well-formed JSON but no character: it used to reach the tokenizer.
        err = error(c.post("/v1/translate", content=b'{"texts": ["ok", "a\\ud800b"]}', headers=JSON), 422,
                    "invalid_request", "texts[1]")
        assert "surrogate" in err["message"] and "UTF-8" in err["message"]
        # A valid pair is a character (U+1F600) and translates.
        assert c.post("/v1/translate", content=b'{"texts": ["hi \\ud83d\\ude00"], "max_new_tokens": 4}',
                      headers=JSON).status_code == 200
        # The surrogate as raw (CESU-style) bytes is not UTF-8 at all.
        err = error(c.post("/v1/translate", content=b'{"texts": ["a\xed\xa0\x80b"]}', headers=JSON), 422,
                    "invalid_request", "body")
        assert "UTF-8" in err["message"]


@pytest.mark.parametrize("route", ["/v1/translate", "/v1/classify"])
def test_bodies_that_are_not_utf8_json_422(service, route):
    with service.client() as c:
        err = error(c.post(route, content='{"texts": ["café"]}'.encode("latin-1"), headers=JSON), 422,
                    "invalid_request", "body")
        assert "UTF-8" in err["message"]
        err = error(c.post(route, content=b'{"texts": [', headers=JSON), 422, "invalid_request", "body")
        assert "not valid JSON" in err["message"]
        deep = b"[" * 100_000 + b"]" * 100_000  # past any JSON parser's nesting limit
        error(c.post(route, content=deep, headers=JSON), 422, "invalid_request", "body")
        error(c.post(route, content=b'{}', headers={"content-type": "application/json; charset=latin-1"}), 415,
              "unsupported_media_type")


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "application/xml", None])
@pytest.mark.parametrize(("route", "accepted"), [("/v1/translate", ["application/json"]),
                                                 ("/v1/classify", ["application/json", "multipart/form-data"])])
def test_wrong_content_type_415(service, route, accepted, ctype):
    headers = {"content-type": ctype} if ctype else {}
    with service.client() as c:
        r = c.post(route, content=b'{"texts": ["hi"]}', headers=headers)
    err = error(r, 415, "unsupported_media_type")
    assert all(a in err["message"] for a in accepted), err  # the message lists what is accepted


@pytest.mark.parametrize("raw", ["0", "-5", "-0", "nan", "NaN", "inf", "-inf", "Infinity", "1e999", "", "5ms"])
def test_bad_timeout_header_422(service, raw):
    with service.client() as c:
        err = error(c.post("/v1/translate", json={"texts": ["hi"]}, headers={"X-Timeout-Ms": raw}), 422,
                    "invalid_request", "x-timeout-ms")
    assert "positive, finite number of milliseconds" in err["message"]


def test_small_positive_timeout_is_a_deadline_not_an_error(service):
    with service.client() as c:
        error(c.post("/v1/translate", json={"texts": ["Where is the station?"]}, headers={"X-Timeout-Ms": "0.001"}),
              504, "deadline_exceeded")
        ok = c.post("/v1/translate", json={"texts": ["hi"], "max_new_tokens": 4}, headers={"X-Timeout-Ms": "60000"})
        assert ok.status_code == 200, ok.text


def test_chunked_body_without_content_length(service):
    cap = TEST_LIMITS["max_body_bytes"]

    def chunks(total: int, head: bytes = b'{"texts": ["', tail: bytes = b'"]}'):
        yield head
        for _ in range(total // 10_000):
            yield b"x" * 10_000
        yield tail

    with service.client() as c:
        r = c.post("/v1/translate", content=chunks(cap + 50_000), headers=JSON)
        assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
        error(r, 413, "body_too_large")
        small = c.post("/v1/translate", content=iter([b'{"texts": ["hi"], ', b'"max_new_tokens": 4}']), headers=JSON)
        assert small.status_code == 200, small.text


def test_json_wire_format_is_strict(service):
    with service.client() as c:
        for body, field in [({"images": [""]}, "images[0]"),
                            ({"images": [b64(png())], "return_attention": 0}, "return_attention"),
                            ({"images": [b64(png())], "return_attention": "true"}, "return_attention"),
                            ({"images": [b64(png())], "top_k": "3"}, "top_k"),
                            ({"images": [b64(png())], "top_k": 3.5}, "top_k")]:
            error(c.post("/v1/classify", json=body), 422, "invalid_request", field)
        # JSON Schema's integer, as the document says "integer": 3.0 is one (and means 3)
        r = c.post("/v1/classify", json={"images": [b64(png())], "top_k": 3.0})
        assert r.status_code == 200 and len(r.json()["predictions"][0]["top_k"]) == 3, r.text
        for body, field in [({"texts": ["hi"], "beam_size": "2"}, "beam_size"),
                            ({"texts": ["hi"], "return_attention": 1}, "return_attention")]:
            error(c.post("/v1/translate", json=body), 422, "invalid_request", field)


def test_multipart_form_fields_are_validated_as_documented(service):
    image = ("images", ("a.png", png(), "image/png"))
    with service.client() as c:
        for raw in ("0", "1", "yes", "on", ""):
            error(c.post("/v1/classify", files=[image], data={"return_attention": raw}), 422, "invalid_request",
                  "return_attention")
        for raw in ("3.5", "+3", "three", " 3"):
            error(c.post("/v1/classify", files=[image], data={"top_k": raw}), 422, "invalid_request", "top_k")
        r = c.post("/v1/classify", files=[image], data={"top_k": "3.0"})  # the integer 3.0, as a form writes it
        assert r.status_code == 200 and len(r.json()["predictions"][0]["top_k"]) == 3, r.text
        for raw in ("true", "True", "false"):  # Python's requests sends str(True) == "True"
            r = c.post("/v1/classify", files=[image], data={"return_attention": raw, "top_k": "2"})
            assert r.status_code == 200, r.text
            assert (r.json()["predictions"][0]["attention"] is not None) == (raw.lower() == "true")
        error(c.post("/v1/classify", files=[image], data={"colour": "red"}), 422, "invalid_request", "colour")


def test_multipart_limits_and_malformed_bodies_422(service):
    image = ("images", ("a.png", png(np.zeros((28, 28), np.uint8)), "image/png"))
    with service.client() as c:
        err = error(c.post("/v1/classify", files=[image] * 65), 422, "limit_exceeded", "images")
        assert "64" in err["message"]
        err = error(c.post("/v1/classify", files=[image], data={f"f{i}": "1" for i in range(17)}), 422,
                    "limit_exceeded")
        assert "top_k" in err["message"]
        error(c.post("/v1/classify", files=[image], data={"top_k": "1" * 5000}), 422, "limit_exceeded")
        error(c.post("/v1/classify", content=b"--x\r\nnot a part", headers={"content-type": "multipart/form-data"}),
              422, "invalid_request", "body")  # no boundary
        error(c.post("/v1/classify", content=b"garbage", headers={"content-type": "multipart/form-data; boundary=b"}),
              422)
        error(c.post("/v1/classify", files=[("images", ("a.png", b"", "image/png"))]), 400, "bad_image", "images[0]")


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def test_every_image_mode_is_converted_not_rejected(service):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    images = {
        "16-bit gray": encode(Image.fromarray(rng.integers(0, 65536, (30, 40), dtype=np.uint16))),
        "CMYK JPEG": encode(rgb.convert("CMYK"), "JPEG"),
        "palette": encode(rgb.quantize(16)),
        "palette+tRNS": encode(rgb.quantize(16), transparency=0),
        "LA": encode(rgb.convert("LA")),
        "1-bit": encode(rgb.convert("1")),
        "RGB tRNS": encode(rgb, transparency=(0, 0, 0)),
        "EXIF-rotated JPEG": encode(rgb, "JPEG", exif=_exif(6)),
        "EXIF-rotated PNG": encode(rgb, exif=_exif(8)),
    }
    with service.client() as c:
        r = c.post("/v1/classify", json={"images": [b64(v) for v in images.values()]})
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == len(images)


def test_exif_orientation_changes_what_is_classified(service):
    arr = np.zeros((28, 40), np.uint8)
    arr[4:24, 2:12] = 255  # off-centre: a rotation moves it
    tagged = encode(Image.fromarray(arr), exif=_exif(6))
    upright = encode(ImageOps.exif_transpose(Image.open(io.BytesIO(tagged))))
    with service.client() as c:
        preds = c.post("/v1/classify", json={"images": [b64(tagged), b64(upright)], "top_k": 10}).json()["predictions"]
    assert preds[0]["top_k"] == preds[1]["top_k"]


def test_undecodable_images_400(service):
    seed = png()
    zero = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 5, 8, 0, 0, 0, 0)) + \
        png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b"")
    bad = {
        "garbage eXIf": with_chunk(seed, b"eXIf", b"garbage, not a TIFF header"),  # was a 500
        "truncated PNG": seed[: len(seed) // 2],
        "truncated JPEG": encode(Image.new("RGB", (40, 40), (9, 9, 9)), "JPEG")[:200],
        "zero-size PNG": zero,
        "bad CRC": seed[:40] + bytes([seed[40] ^ 0xFF]) + seed[41:],
    }
    with service.client() as c:
        for name, data in bad.items():
            err = error(c.post("/v1/classify", json={"images": [b64(png()), b64(data)]}), 400, "bad_image",
                        "images[1]")
            assert err["message"], name
            err = error(c.post("/v1/classify", files=[("images", ("x.png", data, "image/png"))]), 400, "bad_image")
        assert "EXIF" in error(c.post("/v1/classify", json={"images": [b64(bad["garbage eXIf"])]}), 400)["message"]


def test_client_disconnect_is_counted_as_499_not_500(service):
    url = service.metrics_url
    before = settled(url)
    body = {"texts": [LONG_DECODE] * 32, "max_new_tokens": 256}  # 32 rows x 256 greedy steps outlast 0.5 s
    with httpx.Client(base_url=service.base, timeout=httpx.Timeout(120, read=0.5)) as c:
        try:
            r = c.post("/v1/translate", json=body)  # the client gives up (and closes the connection) after 0.5 s
            pytest.fail(f"answered within 0.5 s: {r.status_code} {r.text[:300]}")
        except httpx.ReadTimeout:
            pass

    def count(s, **labels) -> float:
        return value(s, "ray_attnserve_requests_total", route="/v1/translate", **labels)

    wait_for(url, lambda s: count(s, status="499") > count(before, status="499"), timeout_s=90)
    after = settled(url)
    assert count(after, status="499") - count(before, status="499") == 1
    assert value(after, "ray_attnserve_errors_total", code="client_disconnected") - \
        value(before, "ray_attnserve_errors_total", code="client_disconnected") == 1
    assert count(after, status="500") == count(before, status="500")
    assert value(after, "ray_attnserve_errors_total", code="internal_error") == \
        value(before, "ray_attnserve_errors_total", code="internal_error")
    assert value(after, "ray_attnserve_errors_total", code="http_500") == 0


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

