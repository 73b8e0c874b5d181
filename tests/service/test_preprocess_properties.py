"""Property-based tests of image preprocessing (hypothesis): untrusted bytes never escape as anything but a
4xx error, every decodable image of any mode and size becomes uint8 (28, 28), base64 round-trips.

Pure unit tests: no service, no model. Derandomized, so a failure reproduces on every run and machine.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from service.errors import BadImage, LimitExceeded
from service.protocols.v1.preprocess import decode_base64, to_model_input

LIMITS = {"max_bytes": 200_000, "max_pixels": 1_000_000}
PROPS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow])


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def chunk(kind: bytes, data: bytes) -> bytes:
    """A PNG chunk with a correct CRC, so the decoder reads its payload instead of rejecting the file."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def with_chunk(png: bytes, kind: bytes, data: bytes) -> bytes:
    iend = png.rindex(b"IEND") - 4  # insert before IEND
    return png[:iend] + chunk(kind, data) + png[iend:]


def decode(raw: bytes) -> np.ndarray:
    """The property: the result is a (28, 28) uint8 array, or the error is one of the service's 4xx errors."""
    out = to_model_input(raw, field="images[0]", **LIMITS)
    assert out.shape == (28, 28) and out.dtype == np.uint8
    return out


def decode_or_4xx(raw: bytes) -> None:
    try:
        decode(raw)
    except (BadImage, LimitExceeded) as e:  # BadImage includes ImageTooLarge
        assert e.status in (400, 422) and e.field == "images[0]" and e.message


SEED_PNG = encode(Image.fromarray(np.arange(12 * 20, dtype=np.uint8).reshape(12, 20)))
SEED_JPEG = encode(Image.new("RGB", (20, 12), (200, 30, 90)), "JPEG")


# --- untrusted bytes ----------------------------------------------------------------------------------------------


@PROPS
@given(st.binary(max_size=2048))
@example(b"")
@example(b"\x89PNG\r\n\x1a\n")
@example(SEED_PNG[:40])  # truncated inside IDAT
@example(SEED_JPEG[:-20])  # truncated JPEG
def test_arbitrary_bytes_only_raise_service_errors(raw):
    decode_or_4xx(raw)


@PROPS
@given(seed=st.sampled_from([SEED_PNG, SEED_JPEG]), data=st.data())
def test_corrupted_images_only_raise_service_errors(seed, data):
    """Valid files with bytes flipped, cut or inserted reach deep into the decoders (random bytes rarely do)."""
    raw = bytearray(seed)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip":
            raw[pos] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del raw[pos : pos + data.draw(st.integers(1, 64))]
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
        if not raw:
            break
    decode_or_4xx(bytes(raw))


@PROPS
@given(kind=st.sampled_from([b"eXIf", b"iCCP", b"tRNS", b"PLTE", b"sBIT", b"gAMA", b"pHYs", b"zTXt", b"iTXt"]),
       payload=st.binary(max_size=64))
@example(kind=b"eXIf", payload=b"garbage, not a TIFF header")  # was a 500: exif_transpose raised SyntaxError
@example(kind=b"eXIf", payload=b"MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x09\x00\x00")
def test_png_with_garbage_chunk_only_raises_service_errors(kind, payload):
    decode_or_4xx(with_chunk(SEED_PNG, kind, payload))


def test_garbage_exif_is_a_bad_image_that_says_why():
    with pytest.raises(BadImage) as e:
        decode(with_chunk(SEED_PNG, b"eXIf", b"garbage, not a TIFF header"))
    assert e.value.code == "bad_image" and "EXIF" in e.value.message


def png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize(("width", "height"), [(0, 5), (5, 0), (0, 0), (2**31 - 1, 2**31 - 1), (100_000, 100_000)])
def test_zero_size_and_huge_headers_are_rejected_before_decoding(width, height):
    with pytest.raises(BadImage) as e:
        decode(png_header(width, height))
    assert e.value.status == 400


@pytest.mark.parametrize(("width", "height"), [(1, 1_000_000), (1_000_000, 1), (3000, 300), (2049, 1)])
def test_long_thin_images_convert_without_a_huge_square(width, height):
    raw = encode(Image.new("L", (width, height), 200))
    assert (decode(raw) >= 199).all()  # uniform stays uniform; padding took the border colour


# --- valid images -------------------------------------------------------------------------------------------------

# (mode Pillow builds, format) pairs that PNG/JPEG can store; together they decode to every mode a client can send.
MODES = [("1", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("RGB", "PNG"), ("RGBA", "PNG"), ("I;16", "PNG"),
         ("L", "JPEG"), ("RGB", "JPEG"), ("CMYK", "JPEG")]


@st.composite
def images(draw) -> tuple[bytes, str]:
    mode, fmt = draw(st.sampled_from(MODES))
    w, h = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    elif mode == "P":
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).quantize(draw(st.integers(2, 256)))
    elif mode in ("LA", "RGBA"):
        img = Image.fromarray(rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8), mode)
    else:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    kw = {}
    if mode in ("L", "RGB", "P") and fmt == "PNG" and draw(st.booleans()):
        kw["transparency"] = 0 if mode != "RGB" else (0, 0, 0)  # a tRNS colour key
    if draw(st.booleans()):
        exif = Image.Exif()
        exif[0x0112] = draw(st.integers(1, 8))  # EXIF orientation
        kw["exif"] = exif.tobytes()
    return encode(img, fmt, **kw), mode


@PROPS
@given(images())
def test_every_valid_image_becomes_28x28_uint8(image):
    raw, mode = image
    decode(raw)


@PROPS
@given(st.integers(1, 8), st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_exif_orientation_is_applied(orientation, w, h, seed):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    tagged = encode(Image.fromarray(arr), exif=exif.tobytes())
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(tagged)))  # what a viewer shows
    np.testing.assert_array_equal(decode(tagged), decode(encode(upright)))


@PROPS
@given(st.integers(0, 255), st.integers(1, 40), st.integers(1, 40))
def test_16_bit_gray_is_rescaled_not_clipped(level, w, h):
    wide = Image.fromarray(np.full((h, w), level * 257, np.uint16))  # same brightness in 16 bits
    narrow = Image.fromarray(np.full((h, w), level, np.uint8))
    assert Image.open(io.BytesIO(encode(wide))).mode.startswith("I")
    np.testing.assert_array_equal(decode(encode(wide)), decode(encode(narrow)))


def test_transparent_pixels_become_black_for_every_transparency_kind():
    white = np.full((28, 28), 255, np.uint8)
    keyed_l = encode(Image.fromarray(white), transparency=255)
    keyed_rgb = encode(Image.fromarray(np.dstack([white] * 3)), transparency=(255, 255, 255))
    la = encode(Image.fromarray(np.dstack([white, np.zeros_like(white)]), "LA"))
    wide = encode(Image.fromarray(np.full((28, 28), 65535, np.uint16)), transparency=65535)
    for raw in (keyed_l, keyed_rgb, la, wide):
        assert decode(raw).max() == 0


def test_gray_28x28_passes_through_bit_exact_in_every_gray_encoding():
    arr = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    np.testing.assert_array_equal(decode(encode(Image.fromarray(arr))), arr)
    np.testing.assert_array_equal(decode(encode(Image.fromarray(arr.astype(np.uint16) * 257))), arr)
    np.testing.assert_array_equal(decode(encode(Image.fromarray(arr).convert("P"))), arr)


# --- base64 -------------------------------------------------------------------------------------------------------


@PROPS
@given(st.binary(max_size=600), st.sampled_from(["", "data:image/png;base64,", "data:,"]), st.booleans())
def test_base64_round_trips(raw, prefix, wrapped):
    text = base64.encodebytes(raw).decode() if wrapped else base64.b64encode(raw).decode()  # encodebytes wraps
    assert decode_base64(prefix + text, field="images[0]", max_bytes=600) == raw


@PROPS
@given(st.text(max_size=200))
def test_any_string_decodes_or_is_a_bad_image(text):
    try:
        raw = decode_base64(text, field="images[3]", max_bytes=100)
    except (BadImage, LimitExceeded) as e:
        assert e.field == "images[3]" and e.message
    else:
        assert len(raw) <= 103  # at most one base64 quantum over: to_model_input checks the exact size


@PROPS
@given(st.binary(max_size=300), st.integers(1, 300))
def test_base64_size_limit_is_exact_enough(raw, max_bytes):
    text = base64.b64encode(raw).decode()
    if len(raw) <= max_bytes:
        assert decode_base64(text, field="f", max_bytes=max_bytes) == raw
    else:
        assume(len(raw) > max_bytes + 3)
        with pytest.raises(LimitExceeded):
            decode_base64(text, field="f", max_bytes=max_bytes)
