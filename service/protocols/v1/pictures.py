"""Attention as PNG pictures (Pillow only): the translation alignment heatmap and the ViT rollout overlay.

Both maps are near-uniform when scaled linearly by their maximum (a rollout mixes in the identity at every
layer; an alignment row spreads mass over function words), so colours come from a percentile stretch: the map is
scaled between its 2nd and 98th percentiles and clipped, and the legend prints the weights at both ends.

Text uses DejaVu Sans (Debian `fonts-dejavu-core`, installed by `make tools`) when present, else Pillow's bundled
scalable font: both cover the accents and the `¿`/`¡` of Spanish.
"""

from __future__ import annotations

import asyncio
import io
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from fastapi.responses import Response
from PIL import Image, ImageDraw, ImageFont, ImageOps

from service.errors import InvalidRequest
from service.protocols.v1.preprocess import FORMATS
from service.protocols.v1.schemas import ClassifyResponse, TranslateResponse

FONT_FILES = (Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
              Path("/usr/share/fonts/dejavu/DejaVuSans.ttf"))
PNG_MEDIA_TYPE = "image/png"
STRETCH = (2.0, 98.0)  # percentiles mapped to the ends of the colour scale
LEGEND_NOTE = "colour: percentile stretch p2-p98"
# viridis at 9 evenly spaced stops (perceptually uniform, readable in gray and by most colour-blind readers)
VIRIDIS = np.array([(68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141), (39, 173, 129),
                    (92, 200, 99), (170, 220, 50), (253, 231, 37)], dtype=np.float64)
BG, INK, MUTED = (255, 255, 255), (20, 20, 20), (110, 110, 110)


@dataclass
class Picture:
    """A rendered PNG plus what was drawn, so callers and tests can check it without OCR."""

    png: bytes
    size: tuple[int, int]
    x_labels: list[str] = field(default_factory=list)
    y_labels: list[str] = field(default_factory=list)
    scale: tuple[float, float] = (0.0, 1.0)  # the weights at the two ends of the colour scale
    title: str = ""
    caption: str = ""  # which map (ViT overlay) or which layers and heads (alignment)
    encoder_scale: tuple[float, float] | None = None  # the encoder panel's colour scale, when it was drawn


@lru_cache(maxsize=8)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    for path in FONT_FILES:
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font


def readable(piece: str) -> str:
    """A tokenizer piece as a label: `▁` (word start) dropped; a word-internal piece marked with a leading `·`."""
    if piece.startswith("▁"):
        return piece[1:] or "␣"
    if piece and all(unicodedata.category(c).startswith("P") for c in piece):
        return piece  # punctuation glued to the previous word reads fine as itself
    return "·" + piece


def stretch(values: np.ndarray, percentiles: tuple[float, float] = STRETCH) -> tuple[np.ndarray, float, float]:
    """Scale to [0, 1] between two percentiles of the values (clipped); a flat map becomes all zeros."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return v, 0.0, 0.0
    lo, hi = (float(p) for p in np.percentile(v, percentiles))
    if hi <= lo:
        return np.zeros_like(v), lo, hi
    return np.clip((v - lo) / (hi - lo), 0.0, 1.0), lo, hi


def colormap(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB (..., 3) through VIRIDIS, linearly between its stops."""
    pos = np.clip(np.asarray(x, dtype=np.float64), 0, 1) * (len(VIRIDIS) - 1)
    i = np.minimum(pos.astype(int), len(VIRIDIS) - 2)
    t = (pos - i)[..., None]
    return np.rint(VIRIDIS[i] * (1 - t) + VIRIDIS[i + 1] * t).astype(np.uint8)


def _encode(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def _text_size(draw: ImageDraw.ImageDraw, text: str, f) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=f)
    return int(right - left), int(bottom - top)


def _legend(draw: ImageDraw.ImageDraw, canvas: Image.Image, x: int, y: int, height: int, lo: float, hi: float,
            f) -> None:
    """A vertical colour bar at (x, y) with the weights at its ends."""
    bar = colormap(np.linspace(1, 0, height))[:, None, :].repeat(14, axis=1)
    canvas.paste(Image.fromarray(bar, "RGB"), (x, y))
    draw.rectangle((x, y, x + 13, y + height - 1), outline=MUTED)
    draw.text((x + 20, y), f"{hi:.3g}", fill=INK, font=f, anchor="lt")
    draw.text((x + 20, y + height), f"{lo:.3g}", fill=INK, font=f, anchor="lb")


def _heatmap(xs: list[str], ys: list[str], w: np.ndarray, note: str, cell: int) -> tuple[Image.Image, float, float]:
    """One labelled heatmap panel: ``xs`` along the top (rotated), ``ys`` down the left, a legend, a note."""
    f, small = font(15), font(12)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    x_label_h = max([_text_size(probe, s, f)[0] for s in xs] + [20]) + 12  # x labels are drawn rotated 90 degrees
    y_label_w = max([_text_size(probe, s, f)[0] for s in ys] + [20]) + 12
    grid_w, grid_h = cell * max(len(xs), 1), cell * max(len(ys), 1)
    legend_w, note_h = 90, 28
    width = max(y_label_w + grid_w + legend_w, _text_size(probe, note, small)[0] + 16)
    height = x_label_h + grid_h + note_h
    canvas = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(canvas)
    gx, gy = y_label_w, x_label_h
    scaled, lo, hi = stretch(w)
    if w.size:
        heat = Image.fromarray(colormap(scaled), "RGB").resize((grid_w, grid_h), Image.Resampling.NEAREST)
        canvas.paste(heat, (gx, gy))
    for j, s in enumerate(xs):  # rotated labels, reading bottom-up, ending just above their column
        tw, th = _text_size(probe, s, f)
        label = Image.new("RGBA", (tw + 6, th + 8), (0, 0, 0, 0))
        ImageDraw.Draw(label).text((3, 2), s, fill=INK, font=f)
        label = label.rotate(90, expand=True)
        canvas.paste(label, (gx + j * cell + (cell - label.width) // 2, gy - 4 - label.height), label)
    for i, s in enumerate(ys):
        draw.text((gx - 6, gy + i * cell + cell // 2), s, fill=INK, font=f, anchor="rm")
    draw.rectangle((gx - 1, gy - 1, gx + grid_w, gy + grid_h), outline=MUTED)
    _legend(draw, canvas, gx + grid_w + 14, gy, min(grid_h, 200) if w.size else 60, lo, hi, small)
    draw.text((8, height - note_h + 6), note, fill=MUTED, font=small)
    return canvas, lo, hi


def alignment_png(source_tokens: list[str], target_tokens: list[str], weights: np.ndarray | list[list[float]], *,
                  title: str = "", cell: int = 30, caption: str = "",
                  encoder: np.ndarray | list[list[float]] | None = None, encoder_caption: str = "") -> Picture:
    """Target x source alignment as a heatmap: source pieces along the top (x), target pieces down the left (y).

    With ``encoder`` (source x source), a second panel beside it: the encoder's self-attention, source pieces on
    both axes. ``caption``/``encoder_caption`` name the layers and heads of each (``layers_caption``)."""
    w = np.asarray(weights, dtype=np.float64).reshape(len(target_tokens), len(source_tokens))
    xs, ys = [readable(t) for t in source_tokens], [readable(t) for t in target_tokens]
    note = "rows: target, columns: source" + (f" ({caption})" if caption else "") + f"; {LEGEND_NOTE}"
    panels = [_heatmap(xs, ys, w, note, cell)]
    if encoder is not None:
        e = np.asarray(encoder, dtype=np.float64).reshape(len(source_tokens), len(source_tokens))
        enote = "encoder: rows attend to columns" + (f" ({encoder_caption})" if encoder_caption else "")
        panels.append(_heatmap(xs, xs, e, enote, cell))
    f, gap = font(15), 24
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_h = 30 if title else 8
    width = max(sum(p.width for p, *_ in panels) + gap * (len(panels) - 1), _text_size(probe, title, f)[0] + 16)
    height = title_h + max(p.height for p, *_ in panels)
    canvas = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((8, 6), title, fill=INK, font=f)
    x = 0
    for p, *_ in panels:
        canvas.paste(p, (x, title_h))
        x += p.width + gap
    _, lo, hi = panels[0]
    return Picture(_encode(canvas), canvas.size, xs, ys, (lo, hi), title, caption,
                   encoder_scale=panels[1][1:] if encoder is not None else None)


def _display_image(raw: bytes) -> Image.Image:
    """The uploaded image as the model saw its geometry: EXIF-rotated, alpha onto black, padded to a square."""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(raw), formats=FORMATS))
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(a / (257 if img.mode != "F" else 1), 0, 255).astype(np.uint8), "L")
    img = img.convert("RGB")
    w, h = img.size
    if w != h:  # same padding as service/protocols/v1/preprocess.py: the median border (here per channel)
        a = np.asarray(img)
        border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
        side = max(w, h)
        square = Image.new("RGB", (side, side), tuple(int(c) for c in np.median(border, axis=0)))
        square.paste(img, ((side - w) // 2, (side - h) // 2))
        img = square
    return img


def _span(xs: list[int]) -> str:
    if len(xs) > 2 and xs == list(range(xs[0], xs[-1] + 1)):
        return f"{xs[0]}-{xs[-1]}"
    return ",".join(map(str, xs))


def layers_caption(what: str, layers: list[int], heads: list[int]) -> str:
    """e.g. "decoder layer 2, heads 0-3 mean", "encoder layers 0,2, head 1 mean" (no layers: just ``what``)."""
    if not layers:
        return what
    text = (f"{what} {'layer' if len(layers) == 1 else 'layers'} {_span(layers)}, "
            f"{'head' if len(heads) == 1 else 'heads'} {_span(heads)}")
    return text + " mean" if len(layers) * len(heads) > 1 else text


def map_caption(method: str, layers: list[int], heads: list[int]) -> str:
    """What a ViT map is, in words: "attention rollout (all 6 layers, ...)", "CLS attention, layer 5, heads 0-3
    mean"."""
    if method == "rollout":
        return f"attention rollout (all {len(layers)} layers, head means)"
    return layers_caption("CLS attention,", layers, heads)


def overlay_png(raw: bytes, rollout: np.ndarray | list[list[float]], *, title: str = "", side: int = 280,
                alpha: float = 0.55, caption: str = "attention rollout") -> Picture:
    """The input image and, beside it, the image with the map (bicubic-upscaled) over it, plus a legend.

    ``caption`` names the map (``map_caption``); it is printed under the pictures."""
    img = _display_image(raw)
    resample = Image.Resampling.NEAREST if img.width * 4 <= side else Image.Resampling.LANCZOS
    img = img.resize((side, side), resample)
    scaled, lo, hi = stretch(np.asarray(rollout, dtype=np.float64))
    smooth = Image.fromarray(scaled.astype(np.float32), "F").resize((side, side), Image.Resampling.BICUBIC)
    heat = Image.fromarray(colormap(np.asarray(smooth)), "RGB")
    blended = Image.blend(ImageOps.grayscale(img).convert("RGB"), heat, alpha)
    f, small = font(15), font(12)
    pad, title_h, note_h, legend_w = 12, (30 if title else 8), 26, 80
    canvas = Image.new("RGB", (pad + side + pad + side + pad + legend_w, title_h + side + note_h), BG)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 6), title, fill=INK, font=f)
    canvas.paste(img, (pad, title_h))
    canvas.paste(blended, (2 * pad + side, title_h))
    _legend(draw, canvas, 3 * pad + 2 * side, title_h, side, lo, hi, small)
    note = f"input | {caption} (CLS -> patches, bicubic); {LEGEND_NOTE}"
    width = max(canvas.width, _text_size(draw, note, small)[0] + 2 * pad)
    if width > canvas.width:  # a long caption widens the picture rather than being cut off
        wide = Image.new("RGB", (width, canvas.height), BG)
        wide.paste(canvas, (0, 0))
        canvas, draw = wide, ImageDraw.Draw(wide)
    draw.text((pad, title_h + side + 6), note, fill=MUTED, font=small)
    return Picture(_encode(canvas), canvas.size, [], [], (lo, hi), title, caption)


# --- HTTP: content negotiation on POST /v1/translate and POST /v1/classify (`Accept: image/png`) -------------

PNG_CONTENT = {PNG_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}


def _accept_q(accept: str) -> list[tuple[str, float]]:
    out = []
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for p in params:
            name, _, value = p.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if media:
            out.append((media.lower(), q))
    return out


def wants_png(accept: str | None) -> bool:
    """True when the Accept header prefers image/png (or image/*) to JSON; `*/*` and no header mean JSON."""
    if not accept:
        return False
    png = json = 0.0
    for media, q in _accept_q(accept):
        if media in (PNG_MEDIA_TYPE, "image/*"):
            png = max(png, q)
        elif media in ("application/json", "application/*", "*/*"):
            json = max(json, q)
    return png > 0 and png > json


def negotiate(accept: str | None, n_items: int, *, field: str, stream: bool = False) -> bool:
    """Whether to answer a picture; a picture request must name exactly one item and not stream (else 422)."""
    if not wants_png(accept):
        return False
    if stream:
        raise InvalidRequest("Accept: image/png answers one picture, not a stream: drop `stream` or ask for "
                             "text/event-stream", field="stream")
    if n_items != 1:
        raise InvalidRequest(f"Accept: image/png draws one item, got {n_items}: send one, or ask for "
                             "application/json", field=field)
    return True


def _png_response(pic: Picture, headers: dict[str, str]) -> Response:
    return Response(pic.png, media_type=PNG_MEDIA_TYPE, headers={"Cache-Control": "no-store", **headers})


async def alignment_response(resp: TranslateResponse) -> Response:
    """A TranslateResponse of one text with attention -> the alignment heatmap PNG (rendered off the loop), with
    the encoder's self-attention as a second panel when the response carries it."""
    (t,) = resp.translations
    a, e = t.attention, t.encoder_attention  # a is None for a blank text (nothing to align): an empty map
    src, tgt, w = (a.source_tokens, a.target_tokens, a.weights) if a is not None else ([], [], [])
    caption = layers_caption("decoder", a.layers, a.heads) if a is not None else ""
    kw = {}
    if e is not None:
        kw = {"encoder": e.weights, "encoder_caption": layers_caption("encoder", e.layers, e.heads)}
    pic = await asyncio.to_thread(alignment_png, src, tgt, w, title=f"{resp.model} {resp.version}: {t.text}",
                                  caption=caption, **kw)
    headers = {"X-Model": resp.model, "X-Model-Version": resp.version, "X-Attention": caption}
    if e is not None:
        headers["X-Encoder-Attention"] = kw["encoder_caption"]
    return _png_response(pic, headers)


async def overlay_response(raw: bytes, resp: ClassifyResponse) -> Response:
    """A ClassifyResponse of one image with its attention map -> the overlay PNG, the map named in the caption
    and in the `X-Attention` header."""
    (p,) = resp.predictions
    a = p.attention
    if a is None:
        raise AssertionError("a picture needs the prediction's attention map")
    caption = map_caption(a.method, a.layers, a.heads)
    pic = await asyncio.to_thread(overlay_png, raw, a.weights, caption=caption,
                                  title=f"{resp.model} {resp.version}: {p.label} ({p.score:.1%})")
    return _png_response(pic, {"X-Model": resp.model, "X-Model-Version": resp.version, "X-Label": p.label,
                               "X-Attention": caption})
