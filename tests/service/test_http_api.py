"""Every route of the real app over real HTTP: payloads, attention shapes, multipart, batching equivalence."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
from service_helpers import b64, png, scrape, settled, value, wait_for

pytestmark = pytest.mark.slow
TEXTS = ["The cat sleeps on the red chair.", "Where is the train station?", "We ate bread and cheese."]


def test_health_ready_models(service):
    with service.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").json() == {"status": "ready"}
        body = c.get("/v1/models").json()
    by_task = {m["task"]: m for m in body["models"]}
    assert by_task["translation"]["name"] == "translator-en-es" and by_task["translation"]["route"] == "/v1/translate"
    vit = by_task["image-classification"]
    assert vit["name"] == "vit-fashion" and len(vit["labels"]) == 10 and vit["version"]
    limits = service.config["applications"][0]["args"]["limits"]
    assert body["limits"] == limits


def test_openapi_docs_cover_every_route(service):
    with service.client() as c:
        assert c.get("/docs").status_code == 200
        doc = c.get("/openapi.json").json()
    assert {"/v1/translate", "/v1/classify", "/v1/models", "/healthz", "/readyz"} <= set(doc["paths"])
    content = doc["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(content)
    assert "TranslateRequest" in doc["components"]["schemas"]


def test_translate_with_attention(service):
    with service.client() as c:
        plain = c.post("/v1/translate", json={"texts": TEXTS}).json()
        attn = c.post("/v1/translate", json={"texts": TEXTS, "return_attention": True}).json()
    assert plain["model"] == "translator-en-es" and plain["version"]
    assert [t["attention"] for t in plain["translations"]] == [None] * len(TEXTS)
    # The attention graphs give the same translations as the fast ones.
    assert [t["text"] for t in attn["translations"]] == [t["text"] for t in plain["translations"]]
    for t in attn["translations"]:
        a = t["attention"]
        w = np.array(a["weights"])
        assert w.shape == (len(a["target_tokens"]), len(a["source_tokens"]))
        np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-4)
        assert a["heads"] and a["layers"] == [2] and t["encoder_attention"] is None


def test_classify_json_multipart_and_attention(service):
    images = [png(seed=i) for i in range(3)]
    with service.client() as c:
        js = c.post("/v1/classify", json={"images": [b64(i) for i in images], "top_k": 4,
                                          "return_attention": True}).json()
        files = [("images" if i else "files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
        mp = c.post("/v1/classify", files=files, data={"top_k": "4", "return_attention": "true"}).json()
    assert js == mp
    for p in js["predictions"]:
        assert len(p["top_k"]) == 4 and p["top_k"][0]["label"] == p["label"]
        assert p["score"] == p["top_k"][0]["score"]
        assert p["attention"]["grid"] == [7, 7] and p["attention"]["method"] == "rollout"
        r = np.array(p["attention"]["weights"])
        assert r.shape == (7, 7)
        np.testing.assert_allclose(r.sum(), 1.0, atol=1e-4)


def test_any_size_and_mode_is_accepted(service):
    rng = np.random.default_rng(1)
    cases = [png(rng.integers(0, 256, (60, 100, 4), dtype=np.uint8), mode="RGBA"),
             png(rng.integers(0, 256, (50, 40, 3), dtype=np.uint8), mode="RGB", fmt="JPEG"),
             png(rng.integers(0, 2, (28, 28), dtype=np.uint8).astype(bool), mode="1")]
    with service.client() as c:
        r = c.post("/v1/classify", json={"images": [b64(x) for x in cases]})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 3


async def _post_all(base: str, route: str, bodies: list[dict]) -> list[dict]:
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=httpx.Limits(max_connections=64)) as c:
        rs = await asyncio.gather(*(c.post(route, json=b) for b in bodies))
    assert [r.status_code for r in rs] == [200] * len(bodies)
    return [r.json() for r in rs]


def test_concurrent_requests_batch_and_match_sequential(service):
    imgs = [b64(png(seed=100 + i)) for i in range(40)]
    # Mixed flags in one burst: requests are split by graph inside a batch.
    bodies = [{"images": [im], "return_attention": i % 3 == 0} for i, im in enumerate(imgs)]
    with service.client() as c:
        sequential = [c.post("/v1/classify", json=b).json() for b in bodies]
    before = settled(service.metrics_url)
    concurrent = asyncio.run(_post_all(service.base, "/v1/classify", bodies))
    for s, k in zip(sequential, concurrent, strict=True):
        (ps,), (pk,) = s["predictions"], k["predictions"]
        assert ps["index"] == pk["index"] and ps["label"] == pk["label"]
        np.testing.assert_allclose([t["score"] for t in ps["top_k"]], [t["score"] for t in pk["top_k"]], atol=1e-5)
        if ps["attention"]:
            np.testing.assert_allclose(ps["attention"]["weights"], pk["attention"]["weights"], atol=1e-5)
    name, tags = "ray_attnserve_batch_size", {"model": "vit-fashion"}
    after = wait_for(service.metrics_url, lambda s: value(s, "ray_attnserve_requests_total", model="vit-fashion")
                     - value(before, "ray_attnserve_requests_total", model="vit-fashion") >= len(bodies))

    def multi(s):  # batches with more than one request = all batches - batches of size <= 1
        return value(s, name + "_count", **tags) - value(s, name + "_bucket", le="1.0", **tags)

    assert multi(after) - multi(before) > 0, "32+ concurrent requests never formed a batch > 1"


def test_concurrent_translations_match_sequential(service):
    bodies = [{"texts": [TEXTS[i % 3]], "return_attention": i % 2 == 0} for i in range(12)]
    with service.client() as c:
        sequential = [c.post("/v1/translate", json=b).json() for b in bodies]
    concurrent = asyncio.run(_post_all(service.base, "/v1/translate", bodies))
    assert [r["translations"][0]["text"] for r in concurrent] == [r["translations"][0]["text"] for r in sequential]


def test_metrics_count_exactly_what_was_sent(service):
    url = service.metrics_url
    before = settled(url)
    images = [b64(png(seed=200 + i)) for i in range(5)]
    with service.client() as c:
        assert c.post("/v1/classify", json={"images": images[:2]}).status_code == 200
        assert c.post("/v1/classify", json={"images": images[2:]}).status_code == 200
        tr = c.post("/v1/translate", json={"texts": TEXTS[:2], "return_attention": True}).json()
        assert c.post("/v1/translate", json={"texts": []}).status_code == 422
    attn = [t["attention"] for t in tr["translations"]]
    src_tokens = sum(len(a["source_tokens"]) + 1 for a in attn)  # + EOS
    gen_tokens = sum(len(a["target_tokens"]) for a in attn)
    expected = {
        ("ray_attnserve_requests_total", (("model", "vit-fashion"), ("route", "/v1/classify"), ("status", "200"))): 2,
        ("ray_attnserve_requests_total", (("model", "translator-en-es"), ("route", "/v1/translate"),
                                          ("status", "200"))): 1,
        ("ray_attnserve_requests_total", (("model", "translator-en-es"), ("route", "/v1/translate"),
                                          ("status", "422"))): 1,
        ("ray_attnserve_errors_total", (("code", "invalid_request"), ("model", "translator-en-es"),
                                        ("route", "/v1/translate"))): 1,
        ("ray_attnserve_images_total", (("model", "vit-fashion"),)): 5,
        ("ray_attnserve_input_tokens_total", (("model", "translator-en-es"),)): src_tokens,
        ("ray_attnserve_generated_tokens_total", (("model", "translator-en-es"),)): gen_tokens,
    }

    def delta(s):
        return {k: s.get(k, 0.0) - before.get(k, 0.0) for k in expected}

    wait_for(url, lambda s: all(d >= expected[k] for k, d in delta(s).items()))
    assert delta(settled(url)) == expected
    final = scrape(url)
    for hist in ("request_latency_seconds", "queue_wait_seconds", "batch_size", "batch_items", "inference_seconds",
                 "engine_sequences_per_step", "engine_step_seconds", "time_to_first_token_seconds",
                 "time_per_output_token_seconds"):
        assert any(n == f"ray_attnserve_{hist}_count" for n, _ in final), hist
    assert "ray_serve_" in httpx.get(url, timeout=10).text  # Serve's own metrics are exported too
