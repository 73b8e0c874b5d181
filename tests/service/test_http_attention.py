"""Attention choices over real HTTP (issue #10): which map, which layers and heads; values checked against the
runtime computed independently in this process, on the same artifacts the service runs."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from service_helpers import b64, png

from service.runtime import ClassifierRuntime, find_artifact

pytestmark = pytest.mark.slow
VIT = "vit-fashion"


@pytest.fixture(scope="module")
def vit(service_artifacts: Path) -> ClassifierRuntime:
    return ClassifierRuntime(find_artifact(service_artifacts, VIT), device="cpu")


def gray(seed: int) -> np.ndarray:
    """A 28x28 grayscale image: the service decodes its PNG to exactly these pixels."""
    return np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)


def host_cls(attentions: np.ndarray, layers: list[int], heads: list[int]) -> np.ndarray:
    """CLS -> patches from the raw per-layer maps of `vit_attn`, mean over layers and heads, renormalised."""
    a = attentions[layers][:, :, heads, 0, 1:].astype(np.float64).mean(axis=(0, 2))  # (N, 49)
    return (a / a.sum(-1, keepdims=True)).reshape(-1, 7, 7)


# ---- classify ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("choice", "layers", "heads"), [
    ({}, [5], [0, 1, 2, 3]),  # null = the last layer, all heads
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
    assert one.headers["x-attention"] == "CLS attention, layer 5, head 2"
    assert [Image.open(io.BytesIO(r.content)).format for r in (default, cls, one)] == ["PNG"] * 3
    assert len({default.content, cls.content, one.content}) == 3  # three maps, three pictures


def test_models_publish_the_ranges(service):
    with service.client() as c:
        models = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
    assert (models[VIT]["encoder_layers"], models[VIT]["heads"], models[VIT]["decoder_layers"]) == (6, 4, None)


def test_openapi_describes_the_classify_choices(service):
    with service.client() as c:
        doc = c.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    body = doc["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    req = body["application/json"]["schema"]["properties"]
    assert req["attention"]["enum"] == ["rollout", "cls"] and req["attention"]["default"] == "rollout"
    for name, lo, hi in (("attention_layers", -16, 15), ("attention_heads", 0, 15)):
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
    assert form["properties"]["attention_layers"]["pattern"] == "^-?[0-9]+(,-?[0-9]+)*$"
