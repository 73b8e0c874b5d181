"""Content-Encoding of v2 bodies: gzip or deflate requests (decompressed within the body cap), and compressed
responses when the client accepts them."""

from __future__ import annotations

import gzip
import zlib

from service.errors import LimitExceeded
from service.protocols.v2.codec import V2Error

COMPRESS_MIN_BYTES = 1024  # smaller responses are sent as they are, whatever Accept-Encoding says
ENCODINGS = ("gzip", "deflate")


def decompressed(body: bytes, encoding: str | None, max_bytes: int) -> bytes:
    enc = (encoding or "identity").strip().lower()
    if enc in ("", "identity"):
        return body
    if enc not in ENCODINGS:
        raise V2Error(f"Content-Encoding {enc!r} is not supported; use gzip, deflate or none")
    d = zlib.decompressobj(wbits=31 if enc == "gzip" else 15)
    try:
        out = d.decompress(body, max_bytes + 1)
    except zlib.error as e:
        raise V2Error(f"the body is not valid {enc} data: {e}") from None
    if len(out) > max_bytes or d.unconsumed_tail:
        raise LimitExceeded(f"the decompressed body is over the limit of {max_bytes} bytes")
    return out


def compressed(body: bytes, accept_encoding: str | None, headers: dict[str, str]) -> bytes:
    """`body` compressed as the client accepts (setting Content-Encoding in `headers`), or as it is."""
    accept = (accept_encoding or "").lower()
    if len(body) < COMPRESS_MIN_BYTES:
        return body
    if "gzip" in accept:
        headers["Content-Encoding"] = "gzip"
        return gzip.compress(body, compresslevel=1)
    if "deflate" in accept:
        headers["Content-Encoding"] = "deflate"
        return zlib.compress(body, 1)
    return body
