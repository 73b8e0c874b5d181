"""protocols/v1/pictures.py: the PNGs decode, have the drawn size, label what they were given, render accents."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from service_helpers import png

from service.errors import InvalidRequest
from service.protocols.v1 import pictures

SRC = ["▁Where", "▁is", "▁the", "▁train", "▁station", "?"]
TGT = ["▁¿", "Dónde", "▁está", "▁la", "▁estación", "▁de", "▁tren", "?"]


def weights(n_tgt: int, n_src: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.full(n_src, 0.3), size=n_tgt)


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data), formats=["PNG"])
    img.load()
    return img


def test_readable_labels():
    assert [pictures.readable(t) for t in ["▁está", "ción", "?", "▁", "▁¡", "¿"]] == \
        ["está", "·ción", "?", "␣", "¡", "¿"]


def test_alignment_png_decodes_with_labels_from_its_input():
    pic = pictures.alignment_png(SRC, TGT, weights(len(TGT), len(SRC)), title="¿Dónde está la estación de tren?")
    img = decode(pic.png)
    assert img.format == "PNG" and img.size == pic.size
    assert pic.x_labels == ["Where", "is", "the", "train", "station", "?"]
    assert pic.y_labels == ["¿", "·Dónde", "está", "la", "estación", "de", "tren", "?"]
    # one 30 px cell per token: more target tokens make a taller picture
    longer = pictures.alignment_png(SRC, [*TGT, "▁sí"], weights(len(TGT) + 1, len(SRC)))
    assert longer.size[1] - pictures.alignment_png(SRC, TGT, weights(len(TGT), len(SRC))).size[1] == 30


def test_accented_labels_draw_differently_from_plain_ones():
    # The font has the glyphs: accents and ¿/¡ change the pixels (a missing glyph draws the same box for all).
    w = weights(2, 1)
    a = pictures.alignment_png(["▁x"], ["▁¿", "▁está"], w)
    b = pictures.alignment_png(["▁x"], ["▁¡", "▁esta"], w)
    c = pictures.alignment_png(["▁x"], ["▁?", "▁esta"], w)
    arrays = [np.asarray(decode(p.png)) for p in (a, b, c)]
    assert arrays[0].shape == arrays[1].shape == arrays[2].shape
    assert not np.array_equal(arrays[0], arrays[1]) and not np.array_equal(arrays[1], arrays[2])
    assert pictures.font(12).getbbox("¿")[2] > 0


def test_percentile_stretch_shows_structure_of_a_near_uniform_map():
    rollout = np.full((7, 7), 1 / 49) + np.linspace(-1e-3, 1e-3, 49).reshape(7, 7)
    scaled, lo, hi = pictures.stretch(rollout)
    assert scaled.min() == 0 and scaled.max() == 1 and lo < hi  # a linear max-scaling would give 0.95..1
    assert np.all(pictures.stretch(np.ones((3, 3)))[0] == 0)


@pytest.mark.parametrize("size, mode", [((28, 28), "L"), ((100, 60), "RGBA"), ((40, 90), "RGB")])
def test_overlay_png_any_input_size(size, mode):
    arr = np.random.default_rng(0).integers(0, 256, (size[1], size[0], len(mode)) if mode != "L" else size[::-1],
                                           dtype=np.uint8)
    rollout = weights(1, 49).reshape(7, 7)
    pic = pictures.overlay_png(png(arr, mode=mode), rollout, title="Ankle boot (97.0%)", side=280)
    img = decode(pic.png)
    assert img.size == pic.size and img.size[1] >= 280 and img.size[0] >= 2 * 280
    lo, hi = pic.scale
    assert lo < hi and lo >= rollout.min() and hi <= rollout.max()


def test_empty_alignment_still_draws():
    pic = pictures.alignment_png([], [], [])
    assert decode(pic.png).size == pic.size


@pytest.mark.parametrize("accept, png_wanted", [
    (None, False), ("*/*", False), ("application/json", False), ("image/png", True), ("image/*", True),
    ("image/png, application/json;q=0.5", True), ("application/json, image/png;q=0.5", False),
    ("image/png;q=0", False), ("text/html, image/png", True),
])
def test_content_negotiation(accept, png_wanted):
    assert pictures.wants_png(accept) is png_wanted


def test_a_picture_is_of_one_item():
    assert pictures.negotiate("image/png", 1, field="texts") is True
    with pytest.raises(InvalidRequest, match="one item") as e:
        pictures.negotiate("image/png", 2, field="texts")
    assert e.value.field == "texts"
    with pytest.raises(InvalidRequest, match="stream"):
        pictures.negotiate("image/png", 1, field="texts", stream=True)


def test_map_captions_name_the_map():
    assert pictures.map_caption("rollout", list(range(6)), [0, 1, 2, 3]).startswith("attention rollout (all 6 layers")
    assert pictures.map_caption("cls", [5], [0, 1, 2, 3]) == "CLS attention, layer 5, heads 0-3 mean"
    assert pictures.map_caption("cls", [0, 2], [1]) == "CLS attention, layers 0,2, head 1 mean"
    assert pictures.map_caption("cls", [5], [1]) == "CLS attention, layer 5, head 1"
    pic = pictures.overlay_png(png(np.zeros((28, 28), np.uint8)), np.full((7, 7), 1 / 49),
                               caption="CLS attention, layers 0,1,2,3,4,5, heads 0,1,2,3 and a long tail of words")
    assert pic.caption.startswith("CLS attention") and pic.size[0] >= 3 * 12 + 2 * 280 + 80


def test_alignment_picture_with_the_encoder_panel():
    src, tgt = ["▁Where", "▁is", "?"], ["▁¿", "Dónde", "▁está", "?"]
    one = pictures.alignment_png(src, tgt, weights(len(tgt), len(src)), caption="decoder layer 2, heads 0-3 mean")
    two = pictures.alignment_png(src, tgt, weights(len(tgt), len(src)), encoder=weights(len(src), len(src)),
                                 encoder_caption="encoder layer 2, head 0")
    assert one.encoder_scale is None and two.encoder_scale is not None
    assert two.size[0] > one.size[0] + 3 * 30 and two.x_labels == one.x_labels == ["Where", "is", "?"]
    assert pictures.layers_caption("decoder", [0, 1, 2], [1]) == "decoder layers 0-2, head 1 mean"
