"""Image decoding for /v1/classify: base64 or raw bytes -> uint8 (size, size), the model's input space (its
manifest's `image_size`; 28 for the Fashion-MNIST ViT).

Documented conversion (any size, any Pillow mode):
1. The pixel count is read from the header and checked against `max_image_pixels` *before* decoding, so a
   decompression bomb costs nothing (400 `image_too_large`).
2. EXIF orientation is applied (unreadable EXIF is a 400 `bad_image`: the orientation cannot be honoured);
   transparency (alpha or a tRNS colour key) is composited onto black (Fashion-MNIST backgrounds are black).
3. Converted to 8-bit grayscale ("L", ITU-R 601 luma); 16-bit samples are rescaled to 8 bits, not clipped.
4. Non-square images are padded to a square with the median of their border pixels, so objects keep their
   aspect ratio and the padding matches the background (a side over 2048 is first shrunk, aspect kept).
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

SIZE = 28  # the default `size`: the shipped ViT's (the replica passes its manifest's)
FORMATS = ("PNG", "JPEG")
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16-bit grayscale PNGs decode to one of these
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")
MAX_SIDE = 2048  # longer sides are shrunk (aspect kept) before padding to a square


def decode_base64(data: str, *, field: str, max_bytes: int) -> bytes:
    """Base64 (optionally a data: URL) -> bytes; the size is checked on the encoded length first (cheap).

    Whitespace is ignored (line-wrapped output of `base64` is accepted); anything else outside the base64
    alphabet is a 400 `bad_image`.
    """
    if data.startswith("data:"):
        data = data.partition(",")[2]
    data = "".join(data.split())
    if len(data) * 3 // 4 > max_bytes + 3:
        raise LimitExceeded(f"image is over the limit of {max_bytes} bytes", field=field)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadImage(f"not valid base64 (A-Z a-z 0-9 + / with = padding, optionally a data: URL): {e}",
                       field=field) from None
    return raw


def to_model_input(raw: bytes, *, field: str, max_bytes: int, max_pixels: int, size: int = SIZE) -> np.ndarray:
    """Encoded PNG/JPEG bytes -> uint8 (size, size).

    Raises only `BadImage` (400), `ImageTooLarge` (400) or `LimitExceeded` (422): the bytes are untrusted,
    so whatever Pillow raises while decoding or converting them is a bad image, never a 500.
    """
    if len(raw) > max_bytes:
        raise LimitExceeded(f"image is {len(raw)} bytes, over the limit of {max_bytes}", field=field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw), formats=FORMATS)
            w, h = img.size
            if w * h > max_pixels:
                raise ImageTooLarge(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}", field=field)
            if w == 0 or h == 0:
                raise BadImage(f"image is {w}x{h}: width and height must be at least 1", field=field)
            img.load()
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not a PNG or JPEG image (send base64 of the file's bytes)", field=field) from None
    except Exception as e:  # OSError, SyntaxError, ValueError, struct.error, DecompressionBomb*, ...
        raise BadImage(f"cannot decode the image as PNG or JPEG: {_reason(e)}", field=field) from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about corrupt EXIF it could still read
        try:
            img = ImageOps.exif_transpose(img)
        except Exception as e:
            raise BadImage(f"cannot read the image's EXIF orientation: {_reason(e)} "
                           "(re-save the image without EXIF metadata)", field=field) from None
    try:
        return _convert(img, size)
    except Exception as e:
        raise BadImage(f"cannot convert the {img.mode} image to grayscale: {_reason(e)}", field=field) from None


def _reason(e: BaseException) -> str:
    return str(e) or type(e).__name__


def _gray(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> "L": 16-bit and float samples rescaled (not clipped), transparency onto black."""
    if img.mode in WIDE_MODES or img.mode == "F":
        a = np.asarray(img).astype(np.float64)
        if img.mode != "F":
            a = a / 257  # 16-bit full scale (65535) -> 8-bit full scale (255); Pillow's convert would clip
        gray = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        key = img.info.get("transparency")
        if isinstance(key, int):
            gray[np.asarray(img) == key] = 0
        return Image.fromarray(gray, "L")
    if img.mode in ALPHA_MODES or (img.mode in ("L", "RGB", "P") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    elif img.mode not in ("1", "L", "P", "RGB", "CMYK", "YCbCr", "HSV"):
        img = img.convert("RGB")  # other modes (LAB, ...) have no direct conversion to L
    return img if img.mode == "L" else img.convert("L")


def _convert(img: Image.Image, size: int) -> np.ndarray:
    img = _gray(img)
    w, h = img.size
    if max(w, h) > MAX_SIDE:
        # Padding a 1 x 4,000,000 image (within the pixel cap) to a square would allocate 16 TB: shrink long
        # sides first. Images up to MAX_SIDE (all the usual ones) are unaffected.
        scale = MAX_SIDE / max(w, h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
        w, h = img.size
    if w != h:
        a = np.asarray(img)
        border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
        side = max(w, h)
        square = Image.new("L", (side, side), int(np.median(border)))
        square.paste(img, ((side - w) // 2, (side - h) // 2))
        img = square
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8).copy()
