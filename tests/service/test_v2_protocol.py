"""The Open Inference Protocol v2 routes of the real service, driven by the stock `tritonclient.http` client."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as triton
from service_helpers import b64, png, scrape, value, wait_for
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.slow
TEXTS = ["The cat sleeps on the red chair.", "Where is the train station?", "We ate bread and cheese."]
MT, VIT = "translator-en-es", "vit-fashion"


@pytest.fixture(scope="module")
def client(service):
    c = triton.InferenceServerClient(service.base.removeprefix("http://"), network_timeout=120.0,
                                     connection_timeout=120.0)
    yield c
    c.close()


def text_input(texts: list[str], *, binary: bool = True, column: bool = False) -> triton.InferInput:
    arr = np.array([t.encode() for t in texts], dtype=np.object_)
    if column:
        arr = arr.reshape(-1, 1)
    t = triton.InferInput("TEXT", list(arr.shape), "BYTES")
    t.set_data_from_numpy(arr, binary_data=binary)
    return t


def image_input(images: np.ndarray, *, binary: bool = True) -> triton.InferInput:
    t = triton.InferInput("IMAGE", list(images.shape), "UINT8")
    t.set_data_from_numpy(images, binary_data=binary)
    return t


def out(*names: str, binary: bool = True, **kw) -> list[triton.InferRequestedOutput]:
    return [triton.InferRequestedOutput(n, binary_data=binary, **kw) for n in names]


def strings(arr: np.ndarray) -> list:
    return [x.decode() if isinstance(x, bytes) else x for x in arr.reshape(-1)]


def error_of(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def test_server_and_model_metadata(service, client):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "attnserve" and "binary_tensor_data" in meta["extensions"]
    for name in (MT, VIT):
        assert client.is_model_ready(name)
        m = client.get_model_metadata(name)
        assert m["name"] == name and len(m["versions"]) == 1
        assert client.is_model_ready(name, model_version=m["versions"][0])
        assert not client.is_model_ready(name, model_version="nope")
        config = client.get_model_config(name, model_version=m["versions"][0])
        assert config["name"] == name and config["max_batch_size"] >= 1
    mt = client.get_model_metadata(MT)
    assert [i["name"] for i in mt["inputs"]] == ["TEXT"]
    assert {o["name"]: o["datatype"] for o in mt["outputs"]} == {
        "TRANSLATION": "BYTES", "SOURCE_TOKENS": "BYTES", "TARGET_TOKENS": "BYTES", "ALIGNMENT": "FP32",
        "ENCODER_ATTENTION": "FP32"}
    assert "[n, T, S]" in mt["parameters"]["output.ALIGNMENT"]
    assert mt["parameters"]["outputs.default"].endswith("SOURCE_TOKENS, TARGET_TOKENS, ALIGNMENT, ENCODER_ATTENTION")
    with service.client() as c:
        infos = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
    n, heads = infos[MT]["decoder_layers"], infos[MT]["heads"]  # the ranges come from the model's manifest
    ints = "string of comma-separated integers"
    assert mt["parameters"]["parameter.attention_layers"].startswith(f"{ints} -{n}..{n - 1}")
    assert mt["parameters"]["parameter.attention_heads"].startswith(f"{ints} 0..{heads - 1}")
    vit = client.get_model_metadata(VIT)
    assert vit["inputs"][0]["shape"] == [-1, 28, 28] and vit["outputs"][0]["shape"] == [-1, 10]
    assert {i["name"] for i in vit["inputs"]} == {"IMAGE", "IMAGE_BYTES"}
    assert len(vit["parameters"]["labels"].split(",")) == 10
    assert vit["parameters"]["outputs.default"].endswith("ROLLOUT, CLS_ATTENTION")
    assert vit["parameters"]["parameter.attention"].startswith("string rollout | cls")
    index = client.get_model_repository_index()
    assert {(m["name"], m["state"]) for m in index} == {(MT, "READY"), (VIT, "READY")}


@pytest.mark.parametrize("binary", [True, False])
def test_translate_matches_v1(service, client, binary):
    with service.client() as c:
        v1 = [t["text"] for t in c.post("/v1/translate", json={"texts": TEXTS}).json()["translations"]]
    # No outputs listed: tritonclient asks for binary outputs; the default output is TRANSLATION only.
    outputs = None if binary else out("TRANSLATION", binary=False)
    res = client.infer(MT, [text_input(TEXTS, binary=binary, column=not binary)], outputs=outputs, request_id="7")
    resp = res.get_response()
    assert [o["name"] for o in resp["outputs"]] == ["TRANSLATION"]
    assert resp["id"] == "7" and resp["model_name"] == MT and resp["model_version"]
    assert ("binary_data_size" in resp["outputs"][0].get("parameters", {})) == binary
    assert strings(res.as_numpy("TRANSLATION")) == v1


def test_translate_alignment_and_beam(service, client):
    with service.client() as c:
        v1 = c.post("/v1/translate", json={"texts": TEXTS[:2], "return_attention": True, "beam_size": 3}).json()
    res = client.infer(MT, [text_input(TEXTS[:2])], parameters={"beam_size": 3},
                       outputs=out("ALIGNMENT", "TARGET_TOKENS", "TRANSLATION") + out("SOURCE_TOKENS", binary=False))
    names = [o["name"] for o in res.get_response()["outputs"]]
    assert names == ["ALIGNMENT", "TARGET_TOKENS", "TRANSLATION", "SOURCE_TOKENS"]  # exactly what was asked
    align, tgt, src = res.as_numpy("ALIGNMENT"), res.as_numpy("TARGET_TOKENS"), res.as_numpy("SOURCE_TOKENS")
    assert align.dtype == np.float32 and align.shape == (2, tgt.shape[1], src.shape[1])
    params = res.get_output("ALIGNMENT")["parameters"]
    for i, t in enumerate(v1["translations"]):
        a = t["attention"]
        assert strings(res.as_numpy("TRANSLATION"))[i] == t["text"]
        nt, ns = len(a["target_tokens"]), len(a["source_tokens"])
        assert strings(tgt[i])[:nt] == a["target_tokens"] and set(strings(tgt[i])[nt:]) <= {""}
        assert strings(src[i])[:ns] == a["source_tokens"] and set(strings(src[i])[ns:]) <= {""}
        np.testing.assert_allclose(align[i, :nt, :ns], np.array(a["weights"]), atol=1e-5)
        assert not align[i, nt:].any() and not align[i, :, ns:].any()
        assert params["layers"] == ",".join(map(str, a["layers"])) and params["heads"] == ",".join(map(str, a["heads"]))


def test_translate_chosen_layers_and_encoder_attention_match_v1(service, client):
    choice = {"attention_layers": [0, 2], "attention_heads": [1, 3], "encoder_attention_layers": [-1, 0]}
    with service.client() as c:
        v1 = c.post("/v1/translate", json={"texts": TEXTS[:2], "return_attention": True,
                                           "return_encoder_attention": True, **choice}).json()["translations"]
    params = {k: ",".join(map(str, v)) for k, v in choice.items()}
    res = client.infer(MT, [text_input(TEXTS[:2])], parameters=params,
                       outputs=out("ALIGNMENT", "ENCODER_ATTENTION", "SOURCE_TOKENS"))
    align, enc, src = res.as_numpy("ALIGNMENT"), res.as_numpy("ENCODER_ATTENTION"), res.as_numpy("SOURCE_TOKENS")
    assert enc.shape == (2, src.shape[1], src.shape[1])
    assert res.get_output("ALIGNMENT")["parameters"].items() >= {"layers": "0,2", "heads": "1,3"}.items()
    assert res.get_output("ENCODER_ATTENTION")["parameters"].items() >= {"layers": "0,2", "heads": "0,1,2,3"}.items()
    for i, t in enumerate(v1):
        a, e = t["attention"], t["encoder_attention"]
        nt, ns = len(a["target_tokens"]), len(e["tokens"])
        np.testing.assert_allclose(align[i, :nt, :ns], np.array(a["weights"]), atol=1e-6)
        np.testing.assert_allclose(enc[i, :ns, :ns], np.array(e["weights"]), atol=1e-6)
        assert not enc[i, ns:].any() and not enc[i, :, ns:].any()
    # return_encoder_attention with no outputs: TRANSLATION, SOURCE_TOKENS, ENCODER_ATTENTION
    res = client.infer(MT, [text_input(TEXTS[:1])], parameters={"return_encoder_attention": True})
    assert [o["name"] for o in res.get_response()["outputs"]] == ["TRANSLATION", "SOURCE_TOKENS", "ENCODER_ATTENTION"]
    for params, outputs, message in (
            # the model's own ranges (from its manifest) in the parameter's bounds
            ({"attention_layers": "3"}, out("ALIGNMENT"), "comma-separated integers in -3..2"),
            ({"encoder_attention_heads": "4"}, out("ENCODER_ATTENTION"), "comma-separated integers in 0..3"),
            ({"attention_layers": "16"}, None, "comma-separated integers in -3..2"),
            ({"return_encoder_attention": False}, out("ENCODER_ATTENTION"), "return_encoder_attention is false")):
        status, got = status_and_message(lambda p=params, o=outputs: client.infer(
            MT, [text_input(TEXTS[:1])], parameters=p, outputs=o))
        assert status == 400 and message in got, (params, got)


def test_classify_matches_v1_with_top_k_and_rollout(service, client):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    with service.client() as c:
        v1 = c.post("/v1/classify", json={"images": [b64(png(a)) for a in images], "top_k": 4,
                                          "return_attention": True}).json()["predictions"]
    encoded = np.array([png(images[2])], dtype=np.object_)
    blob = triton.InferInput("IMAGE_BYTES", [1], "BYTES")
    blob.set_data_from_numpy(encoded)
    # Two images as a UINT8 tensor (JSON data), the third as a PNG file (binary data): rows in that order.
    res = client.infer(VIT, [image_input(images[:2, :, :, None], binary=False), blob], parameters={"top_k": 4},
                       outputs=out("PROBABILITIES", "LABEL", "TOP_K_LABELS", "TOP_K_SCORES", "ROLLOUT"))
    probs, rollout = res.as_numpy("PROBABILITIES"), res.as_numpy("ROLLOUT")
    assert probs.shape == (3, 10) and rollout.shape == (3, 7, 7)
    assert res.as_numpy("TOP_K_LABELS").shape == (3, 4)
    for i, p in enumerate(v1):
        assert strings(res.as_numpy("LABEL"))[i] == p["label"]
        assert strings(res.as_numpy("TOP_K_LABELS")[i]) == [k["label"] for k in p["top_k"]]
        np.testing.assert_allclose(res.as_numpy("TOP_K_SCORES")[i], [k["score"] for k in p["top_k"]], rtol=1e-5)
        np.testing.assert_allclose(rollout[i], np.array(p["attention"]["weights"]), atol=1e-6)
        np.testing.assert_allclose(probs[i].sum(), 1.0, atol=1e-4)


def test_classify_cls_attention_matches_v1(service, client):
    images = np.random.default_rng(5).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    choice = {"attention_layers": [0, -1], "attention_heads": [1, 3]}
    with service.client() as c:
        v1 = c.post("/v1/classify", json={"images": [b64(png(a)) for a in images], "return_attention": True,
                                          "attention": "cls", **choice}).json()["predictions"]
    params = {k: ",".join(map(str, v)) for k, v in choice.items()}
    res = client.infer(VIT, [image_input(images)], parameters=params, outputs=out("CLS_ATTENTION", "LABEL"))
    cls = res.as_numpy("CLS_ATTENTION")
    assert cls.shape == (2, 7, 7) and res.get_output("CLS_ATTENTION")["parameters"].items() >= {
        "method": "cls", "layers": "0,5", "heads": "1,3"}.items()
    for i, p in enumerate(v1):
        np.testing.assert_allclose(cls[i], np.array(p["attention"]["weights"]), atol=1e-6)
    # return_attention with no outputs: the `attention` parameter picks the map
    res = client.infer(VIT, [image_input(images)], parameters={"return_attention": True, "attention": "cls"})
    names = [o["name"] for o in res.get_response()["outputs"]]
    assert names == ["PROBABILITIES", "LABEL", "TOP_K_LABELS", "TOP_K_SCORES", "CLS_ATTENTION"]
    np.testing.assert_allclose(res.as_numpy("CLS_ATTENTION").sum(axis=(1, 2)), 1.0, atol=1e-5)
    rollout = client.infer(VIT, [image_input(images)], outputs=out("ROLLOUT"))
    assert rollout.get_output("ROLLOUT")["parameters"].items() >= {"method": "rollout", "layers": "0,1,2,3,4,5",
                                                                    "heads": "0,1,2,3"}.items()
    for params, outputs, message in (
            ({}, out("ROLLOUT", "CLS_ATTENTION"), "one attention map"),
            ({"attention": "rollout"}, out("CLS_ATTENTION"), "'attention' is 'rollout'"),
            ({"attention": "max"}, None, "'rollout' or 'cls'"),
            ({"attention_layers": "6"}, out("CLS_ATTENTION"), "comma-separated integers in -6..5"),
            ({"attention_layers": "0,x"}, out("CLS_ATTENTION"), "comma-separated"),
            ({"attention_heads": "1"}, out("ROLLOUT"), "set attention to \"cls\"")):
        status, message_got = status_and_message(lambda p=params, o=outputs: client.infer(
            VIT, [image_input(images)], parameters=p, outputs=o))
        assert status == 400 and message in message_got, (params, message_got)


def test_classify_requested_output_and_classification_extension(client):
    images = np.random.default_rng(4).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    res = client.infer(VIT, [image_input(images)], outputs=out("LABEL", binary=False))
    assert [o["name"] for o in res.get_response()["outputs"]] == ["LABEL"]
    both = client.infer(VIT, [image_input(images)], outputs=out("PROBABILITIES", "LABEL"))
    top = client.infer(VIT, [image_input(images)], outputs=out("PROBABILITIES", class_count=3))
    classes = top.as_numpy("PROBABILITIES")
    assert classes.shape == (2, 3)
    probs = both.as_numpy("PROBABILITIES")
    for i, row in enumerate(classes):
        score, index, label = strings(row)[0].split(":")
        assert int(index) == int(np.argmax(probs[i])) and label == strings(both.as_numpy("LABEL"))[i]
        assert abs(float(score) - probs[i].max()) < 1e-5


def status_and_message(call) -> tuple[int, str]:
    e = error_of(call)
    return int(e.status()), e.message()


def test_errors_in_protocol_form(service, client):
    texts = [text_input(["Hello."])]
    cases = {
        "unknown model": (lambda: client.infer("nope", texts), 404, "unknown model"),
        "unknown version": (lambda: client.infer(MT, texts, model_version="0"), 404, "no version"),
        "wrong datatype": (lambda: client.infer(MT, [fp32_text()]), 400, "must be BYTES"),
        "wrong shape": (lambda: client.infer(VIT, [image_input(np.zeros((1, 27, 27), np.uint8))]), 400, "shape"),
        "unknown input": (lambda: client.infer(VIT, texts), 400, "unknown input"),
        "unknown output": (lambda: client.infer(MT, texts, outputs=out("ROLLOUT")), 400, "unknown output"),
        "unknown parameter": (lambda: client.infer(MT, texts, parameters={"beam": 2}), 400, "unknown parameter"),
        "bad beam_size": (lambda: client.infer(MT, texts, parameters={"beam_size": 99}), 400, "beam_size"),
        "over a limit": (lambda: client.infer(MT, [text_input(["word " * 100])]), 400, "limit"),
        "bad image": (lambda: client.infer(VIT, [_image_bytes(b"not a png")]), 400, "PNG or JPEG"),
        "classification on text": (lambda: client.infer(MT, texts, outputs=out("TRANSLATION", class_count=1)), 400,
                                   "classification"),
    }
    for what, (call, status, message) in cases.items():
        got_status, got = status_and_message(call)
        assert (got_status, message in got) == (status, True), (what, got_status, got)
    with service.client() as c:
        for r in (c.get("/v2/models/nope"), c.get("/v2/nowhere"),
                  c.post(f"/v2/models/{MT}/infer", content=b"{not json")):
            assert r.status_code in (400, 404) and isinstance(r.json()["error"], str), r.text


def fp32_text() -> triton.InferInput:
    t = triton.InferInput("TEXT", [1], "FP32")
    t.set_data_from_numpy(np.zeros(1, np.float32))
    return t


def _image_bytes(raw: bytes) -> triton.InferInput:
    t = triton.InferInput("IMAGE_BYTES", [1], "BYTES")
    t.set_data_from_numpy(np.array([raw], dtype=np.object_))
    return t


def test_compressed_bodies_and_timeout(service, client):
    res = client.infer(MT, [text_input(TEXTS)], request_compression_algorithm="gzip",
                       response_compression_algorithm="deflate", timeout=60_000_000,
                       outputs=out("TRANSLATION", "ALIGNMENT"))
    assert len(strings(res.as_numpy("TRANSLATION"))) == 3 and res.as_numpy("ALIGNMENT").ndim == 3
    body = {"inputs": [{"name": "TEXT", "shape": [3], "datatype": "BYTES", "data": TEXTS}],
            "outputs": [{"name": "ALIGNMENT"}]}
    with service.client() as c:
        r = c.post(f"/v2/models/{MT}/infer", json=body, headers={"Accept-Encoding": "gzip"})
        assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
        assert r.json()["outputs"][0]["datatype"] == "FP32"
        r = c.post(f"/v2/models/{MT}/infer", json=body, headers={"X-Timeout-Ms": "0.001"})
        assert r.status_code == 504 and isinstance(r.json()["error"], str)


def test_openapi_and_metrics(service, client):
    with service.client() as c:
        doc = c.get("/openapi.json").json()
    assert {"/v2", "/v2/health/ready", "/v2/models/{name}", "/v2/models/{name}/infer"} <= set(doc["paths"])
    body = doc["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]
    assert {"application/json", "application/octet-stream"} <= set(body)
    assert "$defs" not in str(body["application/json"]["schema"])
    route = f"/v2/models/{MT}/infer"
    before = value(scrape(service.metrics_url), "ray_attnserve_requests_total", route=route, status="200")
    client.infer(MT, [text_input(["Good morning."])])
    wait_for(service.metrics_url, lambda s: value(s, "ray_attnserve_requests_total", route=route,
                                                  status="200") > before)
