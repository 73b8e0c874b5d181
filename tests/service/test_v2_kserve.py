"""The v2 routes driven by KServe's own Python SDK (`kserve.InferenceRESTClient`, protocol v2), unchanged: it
puts `model_name` (and `id`) in the request body, which the v2 endpoint accepts (and checks against the path).

kserve pins protobuf<7 and psutil<6, which the serving stack has newer: the Makefile installs it with
--no-deps, and pyproject's dev extra lists what `from kserve import InferenceRESTClient` imports.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from service_helpers import png

kserve = pytest.importorskip("kserve", reason="make install puts kserve in the dev venv (pip install --no-deps)")
pytestmark = pytest.mark.slow
MT, VIT = "translator-en-es", "vit-fashion"


def infer(service, model: str, inputs: list, **kw):
    async def go():
        client = kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v2", timeout=120))
        try:
            return await client.infer(service.base, kserve.InferRequest(model, inputs, **kw), model_name=model)
        finally:
            await client.close()

    return asyncio.run(go())


def test_kserve_sdk_translates_like_v1(service):
    texts = ["The cat sleeps on the red chair.", "Where is the train station?"]
    with service.client() as c:
        v1 = [t["text"] for t in c.post("/v1/translate", json={"texts": texts}).json()["translations"]]
    for binary in (False, True):
        t = kserve.InferInput("TEXT", [len(texts)], "BYTES")
        t.set_data_from_numpy(np.array([s.encode() for s in texts], dtype=np.object_), binary_data=binary)
        res = infer(service, MT, [t], request_id="k1")
        assert res.model_name == MT and res.id == "k1"
        out = {o.name: o for o in res.outputs}
        assert [x.decode() if isinstance(x, bytes) else x for x in out["TRANSLATION"].as_numpy()] == v1


def test_kserve_sdk_classifies_pixels_and_files(service):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (2, 28, 28), dtype=np.uint8)
    pixels = kserve.InferInput("IMAGE", [2, 28, 28], "UINT8")
    pixels.set_data_from_numpy(images, binary_data=True)
    files = kserve.InferInput("IMAGE_BYTES", [1], "BYTES")
    files.set_data_from_numpy(np.array([png(images[0])], dtype=np.object_), binary_data=True)
    res = infer(service, VIT, [pixels, files], parameters={"top_k": 2})
    probs = {o.name: o for o in res.outputs}["PROBABILITIES"].as_numpy()
    assert probs.shape == (3, 10)
    np.testing.assert_allclose(probs[0], probs[2], atol=1e-5)  # the PNG of image 0 is image 0


def test_body_model_name_must_be_the_paths(service):
    with service.client() as c:
        body = {"model_name": VIT, "inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["Hi."]}]}
        r = c.post(f"/v2/models/{MT}/infer", json=body)
        assert r.status_code == 400 and "model_name" in r.json()["error"]
        r = c.post(f"/v2/models/{MT}/infer", json={**body, "model_name": MT, "model_version": "nope"})
        assert r.status_code == 404 and "nope" in r.json()["error"]
