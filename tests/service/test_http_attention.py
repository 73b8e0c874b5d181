"""Attention choices over real HTTP (issue #10): which map, which layers and heads; values checked against the
runtime computed independently in this process, on the same artifacts the service runs."""

from __future__ import annotations

import asyncio
import io
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from service_helpers import b64, events, png, renormalised, teacher_forced

from service.runtime import ClassifierRuntime, TranslatorRuntime, find_artifact

pytestmark = pytest.mark.slow
VIT, MT = "vit-fashion", "translator-en-es"
TEXTS = ["Where is the train station?", "The cat sleeps on the red chair.", "We ate bread and cheese."]


@pytest.fixture(scope="module")
def vit(service_artifacts: Path) -> ClassifierRuntime:
    return ClassifierRuntime(find_artifact(service_artifacts, VIT), device="cpu")


@pytest.fixture(scope="module")
def mt(service_artifacts: Path) -> TranslatorRuntime:
    return TranslatorRuntime(find_artifact(service_artifacts, MT), device="cpu")


def gray(seed: int) -> np.ndarray:
    """A 28x28 grayscale image: the service decodes its PNG to exactly these pixels."""
    return np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)


def host_cls(attentions: np.ndarray, layers: list[int], heads: list[int]) -> np.ndarray:
    """CLS -> patches from the raw per-layer maps of `vit_attn`, mean over layers and heads, renormalised."""
    a = attentions[layers][:, :, heads, 0, 1:].astype(np.float64).mean(axis=(0, 2))  # (N, 49)
    return (a / a.sum(-1, keepdims=True)).reshape(-1, 7, 7)


# ---- classify ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("choice", "layers", "heads"), [
    ({}, [0, 1, 2, 3, 4, 5], [0, 1, 2, 3]),  # null = all layers, all heads
    ({"attention_layers": [0, -1], "attention_heads": [1, 2]}, [0, 5], [1, 2]),
    ({"attention_layers": [5, -1, 2], "attention_heads": [3, 3]}, [2, 5], [3]),  # duplicates merged
])
def test_classify_cls_map_equals_the_runtimes(service, vit, choice, layers, heads):
    images = np.stack([gray(i) for i in range(3)])
    ref = vit.classify(vit.normalize(images), return_attention=True)
    expected = host_cls(ref.attentions, layers, heads)
    body = {"images": [b64(png(a)) for a in images], "return_attention": True, "attention": "cls", **choice}
    form = {"return_attention": "true", "attention": "cls",
            **{k: ",".join(map(str, v)) for k, v in choice.items()}}
    with service.client() as c:
        js = c.post("/v1/classify", json=body).json()
        mp = c.post("/v1/classify", files=[("images", (f"{i}.png", png(a), "image/png"))
                                           for i, a in enumerate(images)], data=form).json()
    assert js == mp
    for i, p in enumerate(js["predictions"]):
        a = p["attention"]
        assert (a["method"], a["grid"], a["layers"], a["heads"]) == ("cls", [7, 7], layers, heads)
        w = np.array(a["weights"])
        np.testing.assert_allclose(w, expected[i], atol=1e-5)
        np.testing.assert_allclose(w.sum(), 1.0, atol=1e-5)
        np.testing.assert_allclose([s["score"] for s in p["top_k"]], np.sort(ref.probs[i])[::-1][:3], atol=1e-5)


def test_classify_rollout_is_the_default_and_equals_the_runtimes(service, vit):
    images = np.stack([gray(10 + i) for i in range(2)])
    ref = vit.rollout(vit.classify(vit.normalize(images), return_attention=True).attentions)
    with service.client() as c:
        preds = c.post("/v1/classify", json={"images": [b64(png(a)) for a in images],
                                             "return_attention": True}).json()["predictions"]
        plain = c.post("/v1/classify", json={"images": [b64(png(images[0]))], "attention": "cls"}).json()
    for i, p in enumerate(preds):
        a = p["attention"]
        assert (a["method"], a["layers"], a["heads"]) == ("rollout", list(range(6)), [0, 1, 2, 3])
        np.testing.assert_allclose(np.array(a["weights"]), ref[i], atol=1e-5)
    assert plain["predictions"][0]["attention"] is None  # the choice alone asks for nothing


async def _post_all(base: str, bodies: list[dict]) -> list[dict]:
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=httpx.Limits(max_connections=64)) as c:
        rs = await asyncio.gather(*(c.post("/v1/classify", json=b) for b in bodies))
    assert [r.status_code for r in rs] == [200] * len(bodies)
    return [r.json() for r in rs]


def test_concurrent_requests_with_different_maps_are_not_mixed(service):
    """Requests batched together with different maps, layers and heads each get their own map."""
    choices = [{}, {"return_attention": True}, {"return_attention": True, "attention": "cls"},
               {"return_attention": True, "attention": "cls", "attention_layers": [0], "attention_heads": [2]},
               {"return_attention": True, "attention": "cls", "attention_layers": [1, 3]}]
    bodies = [{"images": [b64(png(gray(100 + i)))] * (1 + i % 2), **choices[i % len(choices)]} for i in range(30)]
    with service.client() as c:
        sequential = [c.post("/v1/classify", json=b).json() for b in bodies]
    concurrent = asyncio.run(_post_all(service.base, bodies))
    for s, k in zip(sequential, concurrent, strict=True):
        for ps, pk in zip(s["predictions"], k["predictions"], strict=True):
            assert ps["label"] == pk["label"]
            if ps["attention"] is None:
                assert pk["attention"] is None
                continue
            assert {k: v for k, v in ps["attention"].items() if k != "weights"} == \
                   {k: v for k, v in pk["attention"].items() if k != "weights"}
            np.testing.assert_allclose(ps["attention"]["weights"], pk["attention"]["weights"], atol=1e-5)


def test_classify_choices_out_of_range_are_422_naming_the_range(service):
    image = b64(png(gray(0)))
    cases = [
        ({"attention": "cls", "attention_layers": [6]}, "attention_layers", "[-6, 5]"),
        ({"attention": "cls", "attention_layers": [-7]}, "attention_layers", "[-6, 5]"),
        ({"attention": "cls", "attention_heads": [4]}, "attention_heads", "[0, 3]"),
        ({"attention_layers": [0]}, "attention_layers", "set attention to \"cls\""),  # rollout takes every layer
        ({"attention": "cls", "attention_layers": [16]}, "attention_layers", ""),  # over the published maximum
        ({"attention": "cls", "attention_heads": []}, "attention_heads", ""),
        ({"attention": "mean"}, "attention", ""),
    ]
    with service.client() as c:
        for extra, field, message in cases:
            r = c.post("/v1/classify", json={"images": [image], "return_attention": True, **extra})
            err = r.json()["error"]
            assert (r.status_code, err["code"]) == (422, "invalid_request"), (extra, r.text)
            assert err["field"].startswith(field) and message in err["message"], err  # e.g. attention_layers[0]
        files = [("images", ("a.png", png(gray(0)), "image/png"))]
        for form, field in (({"attention": "cls", "attention_layers": "9"}, "attention_layers"),
                            ({"attention": "cls", "attention_layers": "0, 1"}, "attention_layers"),
                            ({"attention": "cls", "attention_heads": "x"}, "attention_heads"),
                            ({"attention": "CLS"}, "attention")):
            r = c.post("/v1/classify", files=files, data=form)
            assert r.status_code == 422 and r.json()["error"]["field"].startswith(field), (form, r.text)
        r = c.post("/v1/classify", files=files, data={"attention": "cls", "attention_layers": "9"})
        assert "[-6, 5]" in r.json()["error"]["message"]


def test_classify_picture_names_its_map(service):
    image = b64(png(gray(3)))
    with service.client(headers={"Accept": "image/png"}) as c:
        default = c.post("/v1/classify", json={"images": [image]})
        cls = c.post("/v1/classify", json={"images": [image], "attention": "cls", "attention_layers": [0, 1]})
        one = c.post("/v1/classify", json={"images": [image], "attention": "cls", "attention_heads": [2]})
    assert default.headers["x-attention"].startswith("attention rollout")
    assert cls.headers["x-attention"] == "CLS attention, layers 0,1, heads 0-3 mean"
    assert one.headers["x-attention"] == "CLS attention, layers 0-5, head 2 mean"  # the default: all layers
    assert [Image.open(io.BytesIO(r.content)).format for r in (default, cls, one)] == ["PNG"] * 3
    assert len({default.content, cls.content, one.content}) == 3  # three maps, three pictures


def test_models_publish_the_ranges(service):
    with service.client() as c:
        models = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
    assert (models[VIT]["encoder_layers"], models[VIT]["heads"], models[VIT]["decoder_layers"]) == (6, 4, None)


def model_info(service, task: str) -> dict:
    with service.client() as c:
        return next(m for m in c.get("/v1/models").json()["models"] if m["task"] == task)


def test_openapi_describes_the_classify_choices(service):
    with service.client() as c:
        doc = c.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    body = doc["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    req = body["application/json"]["schema"]["properties"]
    assert req["attention"]["enum"] == ["rollout", "cls"] and req["attention"]["default"] == "rollout"
    vit = model_info(service, "image-classification")  # the document's ranges are the served model's
    n, heads = vit["encoder_layers"], vit["heads"]
    for name, lo, hi in (("attention_layers", -n, n - 1), ("attention_heads", 0, heads - 1)):
        options = req[name]["anyOf"]
        arr = next(o for o in options if o.get("type") == "array")
        assert {"type": "null"} in options and req[name].get("default") is None
        assert (arr["minItems"], arr["maxItems"]) == (1, 16)
        assert (arr["items"]["minimum"], arr["items"]["maximum"]) == (lo, hi)
    att = schemas["ClassifierAttention"]
    assert set(att["required"]) == {"method", "grid", "weights", "layers", "heads"}
    assert att["properties"]["method"]["enum"] == ["rollout", "cls"]
    form = body["multipart/form-data"]["schema"]
    assert form["properties"]["attention"]["enum"] == ["rollout", "cls"]
    pattern = re.compile(form["properties"]["attention_layers"]["pattern"])
    assert pattern.fullmatch(f"0,{n - 1},-{n}") and not pattern.fullmatch(str(n)) and not pattern.fullmatch("0,x")
    # layers and heads choose the CLS map only: with the rollout (the default) they are refused, as documented
    assert {"properties": {"attention": {"const": "cls"}}, "required": ["attention"]} in form["anyOf"]


# ---- translate -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("beam", [1, 3])
def test_alignment_of_several_layers_is_their_mean(service, mt, beam):
    """layers [0, 2] x heads [1, 3]: the mean of those four raw cross-attention rows, EOS dropped, renormalised;
    the single-layer answers are the same rows of each layer alone."""
    body = {"texts": TEXTS, "beam_size": beam, "return_attention": True, "attention_heads": [3, 1]}
    with service.client() as c:
        both = c.post("/v1/translate", json={**body, "attention_layers": [2, 0, -1]}).json()["translations"]
        each = [c.post("/v1/translate", json={**body, "attention_layers": [layer]}).json()["translations"]
                for layer in (0, 2)]
    for i, (text, t) in enumerate(zip(TEXTS, both, strict=True)):
        a = t["attention"]
        assert (a["layers"], a["heads"]) == ([0, 2], [1, 3])  # -1 is 2: merged, sorted
        cross, _ = teacher_forced(mt, text, a["target_tokens"])
        n = len(a["source_tokens"])
        raw = {layer: cross[layer][[1, 3]].mean(axis=0) for layer in (0, 2)}  # (T, S) head means
        np.testing.assert_allclose(a["weights"], renormalised((raw[0] + raw[2]) / 2, n), atol=1e-4)
        for layer, answer in zip((0, 2), each, strict=True):
            single = answer[i]["attention"]
            assert single["target_tokens"] == a["target_tokens"] and single["layers"] == [layer]
            np.testing.assert_allclose(single["weights"], renormalised(raw[layer], n), atol=1e-4)


def test_encoder_attention_is_each_texts_own_block(service, mt):
    """Texts of different lengths encoded in one batch: each gets its S x S block over its source tokens (padding
    and EOS excluded), rows summing to 1, equal to its encoder run alone; the alignment is unchanged."""
    body = {"texts": TEXTS, "return_encoder_attention": True, "encoder_attention_layers": [0, -1],
            "encoder_attention_heads": [2]}
    with service.client() as c:
        r = c.post("/v1/translate", json=body).json()["translations"]
        plain = c.post("/v1/translate", json={"texts": TEXTS}).json()["translations"]
        default = c.post("/v1/translate", json={"texts": TEXTS[:1], "return_encoder_attention": True,
                                                "return_attention": True}).json()["translations"][0]
    assert [t["text"] for t in r] == [t["text"] for t in plain]  # the attention graph changes no token
    for text, t in zip(TEXTS, r, strict=True):
        e = t["encoder_attention"]
        assert t["attention"] is None and (e["layers"], e["heads"]) == ([0, 2], [2])
        _, pieces = mt.source(text)
        assert e["tokens"] == pieces
        w = np.array(e["weights"])
        assert w.shape == (len(pieces), len(pieces))
        np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-5)
        _, enc = teacher_forced(mt, text, [])
        expected = renormalised(enc[[0, 2]][:, [2]].mean(axis=(0, 1))[: len(pieces)], len(pieces))
        np.testing.assert_allclose(w, expected, atol=1e-5)
    e = default["encoder_attention"]
    assert (e["layers"], e["heads"]) == ([2], [0, 1, 2, 3]) and e["tokens"] == default["attention"]["source_tokens"]



@pytest.mark.parametrize("beam", [1, 4])
def test_stream_and_beam_carry_the_encoder_attention_in_done(service, beam):
    body = {"texts": TEXTS[:2], "beam_size": beam, "return_attention": True, "attention_layers": [0, 1],
            "return_encoder_attention": True}
    with service.client() as c:
        plain = c.post("/v1/translate", json=body).json()
        with c.stream("POST", "/v1/translate", json={**body, "stream": True}) as r:
            got = events(r.iter_lines())
    assert got[-1][0] == "done" and got[-1][1] == plain  # the done event is the response, encoder map included
    for i, t in enumerate(plain["translations"]):
        assert t["encoder_attention"]["layers"] == [2] and t["attention"]["layers"] == [0, 1]
        rows = [d["alignment"] for k, d in got if k == "token" and d["index"] == i]
        if beam == 1:  # greedy streams each token's row of the several-layer alignment
            np.testing.assert_allclose(rows, t["attention"]["weights"], atol=1e-5)
        else:
            assert rows == []


def test_translate_choices_out_of_range_are_422_naming_the_range(service):
    cases = [({"attention_layers": [3]}, "attention_layers", "[-3, 2]"),
             ({"attention_layers": [-4]}, "attention_layers", "[-3, 2]"),
             ({"attention_heads": [4]}, "attention_heads", "[0, 3]"),
             ({"encoder_attention_layers": [3]}, "encoder_attention_layers", "[-3, 2]"),
             ({"encoder_attention_heads": [4]}, "encoder_attention_heads", "[0, 3]"),
             ({"attention_layers": []}, "attention_layers", ""),
             ({"attention_layers": [16]}, "attention_layers", ""),
             ({"encoder_attention_layers": list(range(17))}, "encoder_attention_layers", "")]
    with service.client() as c:
        for extra, field, message in cases:
            # Checked whether or not the map is asked for: a request is valid or not whatever its flags.
            r = c.post("/v1/translate", json={"texts": ["Hello."], **extra})
            err = r.json()["error"]
            assert (r.status_code, err["code"]) == (422, "invalid_request"), (extra, r.text)
            assert err["field"].startswith(field) and message in err["message"], err


def test_translate_picture_has_the_encoder_panel_when_asked(service):
    body = {"texts": ["Where is the train station?"], "attention_layers": [0, 2]}
    with service.client(headers={"Accept": "image/png"}) as c:
        one = c.post("/v1/translate", json=body)
        two = c.post("/v1/translate", json={**body, "return_encoder_attention": True,
                                            "encoder_attention_heads": [0]})
    assert one.headers["x-attention"] == "decoder layers 0,2, heads 0-3 mean"
    assert "x-encoder-attention" not in one.headers
    assert two.headers["x-encoder-attention"] == "encoder layer 2, head 0"
    a, b = (Image.open(io.BytesIO(r.content)) for r in (one, two))
    assert a.format == b.format == "PNG" and b.width > a.width + 200  # a second panel, source x source


def test_models_publish_the_translator_ranges(service):
    with service.client() as c:
        models = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
    assert (models[MT]["encoder_layers"], models[MT]["decoder_layers"], models[MT]["heads"]) == (3, 3, 4)


def test_openapi_describes_the_translate_choices(service):
    with service.client() as c:
        schemas = c.get("/openapi.json").json()["components"]["schemas"]
    req = schemas["TranslateRequest"]["properties"]
    assert "attention_layer" not in req and req["return_encoder_attention"]["type"] == "boolean"
    mt = model_info(service, "translation")  # the document's ranges are the served model's
    dec, enc, h = mt["decoder_layers"], mt["encoder_layers"], mt["heads"]
    for name, lo, hi in (("attention_layers", -dec, dec - 1), ("attention_heads", 0, h - 1),
                         ("encoder_attention_layers", -enc, enc - 1), ("encoder_attention_heads", 0, h - 1)):
        arr = next(o for o in req[name]["anyOf"] if o.get("type") == "array")
        assert {"type": "null"} in req[name]["anyOf"] and (arr["minItems"], arr["maxItems"]) == (1, 16)
        assert (arr["items"]["minimum"], arr["items"]["maximum"]) == (lo, hi), name
    assert set(schemas["TranslationAttention"]["required"]) == {"source_tokens", "target_tokens", "weights",
                                                                "layers", "heads"}
    assert set(schemas["EncoderAttention"]["required"]) == {"tokens", "weights", "layers", "heads"}
    enc = schemas["Translation"]["properties"]["encoder_attention"]["anyOf"]
    assert {"$ref": "#/components/schemas/EncoderAttention"} in enc
