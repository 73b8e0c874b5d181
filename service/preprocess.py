"""Image decoding for /v1/classify: base64 or raw bytes -> uint8 (28, 28), the model's input space.

Documented conversion (any size, any Pillow mode):
1. The pixel count is read from the header and checked against `max_image_pixels` *before* decoding, so a
   decompression bomb costs nothing (400 `image_too_large`).
2. EXIF orientation is applied; transparency is composited onto black (Fashion-MNIST backgrounds are black).
3. Converted to 8-bit grayscale ("L", ITU-R 601 luma).
4. Non-square images are padded to a square with the median of their border pixels, so objects keep their
   aspect ratio and the padding matches the background.
5. Resized to 28x28 with Lanczos filtering. A 28x28 grayscale image passes through unchanged (bit-exact).
No inversion is done: dark-on-light photos should be inverted by the client to match Fashion-MNIST.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import BadImage, ImageTooLarge, LimitExceeded

SIZE = 28
FORMATS = ("PNG", "JPEG")


def decode_base64(data: str, *, field: str, max_bytes: int) -> bytes:
    """Base64 (optionally a data: URL) -> bytes; the size is checked on the encoded length first (cheap)."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    if len(data) * 3 // 4 > max_bytes + 3:
        raise LimitExceeded(f"image is over the limit of {max_bytes} bytes", field=field)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadImage(f"not valid base64: {e}", field=field) from None
    return raw


def to_model_input(raw: bytes, *, field: str, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Encoded PNG/JPEG bytes -> uint8 (28, 28)."""
    if len(raw) > max_bytes:
        raise LimitExceeded(f"image is {len(raw)} bytes, over the limit of {max_bytes}", field=field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw), formats=FORMATS)
            w, h = img.size
            if w * h > max_pixels:
                raise ImageTooLarge(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}", field=field)
            img.load()
    except ImageTooLarge:
        raise
    except UnidentifiedImageError:
        raise BadImage("not a PNG or JPEG image (send base64 of the file's bytes)", field=field) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"cannot decode the image as PNG or JPEG: {e}", field=field) from None
    return _convert(img)


def _convert(img: Image.Image) -> np.ndarray:
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, rgba)
    if img.mode != "L":
        img = img.convert("L")
    w, h = img.size
    if w != h:
        a = np.asarray(img)
        border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
        side = max(w, h)
        square = Image.new("L", (side, side), int(np.median(border)))
        square.paste(img, ((side - w) // 2, (side - h) // 2))
        img = square
    if img.size != (SIZE, SIZE):
        img = img.resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8).copy()
