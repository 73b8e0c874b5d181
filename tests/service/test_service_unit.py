"""Fast unit tests: the Serve config, typed args, preprocessing, error mapping, the torch-free import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from ray.serve.schema import ServeDeploySchema
from service_helpers import png

from service.app import BuildArgs
from service.config import MODEL_APPS, MODEL_MAX_ONGOING_REQUESTS, BatchSettings, EngineConfig
from service.errors import BadImage, ImageTooLarge, LimitExceeded, field_path
from service.protocols.v1.preprocess import decode_base64, to_model_input

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "deploy" / "serve_config.yaml"


def test_serve_config_is_valid_and_consistent():
    raw = yaml.safe_load(CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(raw)
    components = set()
    for app in raw["applications"]:
        assert app["import_path"] == "service.app:build_app"
        args = BuildArgs.model_validate(app["args"])
        components.add(args.component)
        for d in app["deployments"]:
            if "user_config" in d:  # model deployments: batches must not be capped by max_ongoing_requests
                if d["name"] == "Translator":  # the engine's knobs, validated like reconfigure() does
                    EngineConfig.model_validate(d["user_config"])
                else:
                    assert d["max_ongoing_requests"] >= d["user_config"]["max_batch_size"], d["name"]
                    # One set of batch defaults: config.py's are the shipped config's (the decorator uses them).
                    assert BatchSettings().model_dump() == BatchSettings.model_validate(d["user_config"]).model_dump()
                assert d["max_ongoing_requests"] == MODEL_MAX_ONGOING_REQUESTS, d["name"]
                assert d["max_queued_requests"] > 0 and d["autoscaling_config"]
                assert {"num_cpus", "num_gpus"} <= set(d["ray_actor_options"])
                pending = getattr(args, d["name"].lower()).max_pending
                assert pending < d["max_ongoing_requests"], "max_pending must answer before the proxy queues"
    assert components == {*MODEL_APPS, "api"} and {a["name"] for a in raw["applications"]} == components
    assert {a.route_prefix for a in schema.applications} == {"/v1/translate", "/v1/classify", "/"}


def test_preprocess_identity_for_28x28_gray():
    arr = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    out = to_model_input(png(arr), field="f", max_bytes=10**6, max_pixels=10**6)
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize(("shape", "mode"), [((100, 60, 4), "RGBA"), ((30, 90, 3), "RGB"), ((280, 280), "L")])
def test_preprocess_any_size_and_mode(shape, mode):
    arr = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    out = to_model_input(png(arr, mode=mode), field="f", max_bytes=10**6, max_pixels=10**6)
    assert out.shape == (28, 28) and out.dtype == np.uint8


def test_preprocess_pads_with_border_and_composites_alpha_on_black():
    arr = np.full((20, 60), 200, np.uint8)  # uniform light background, wide
    out = to_model_input(png(arr), field="f", max_bytes=10**6, max_pixels=10**6)
    assert np.all(np.abs(out.astype(int) - 200) <= 1)  # padding matched the background
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., :3] = 255  # white but fully transparent -> black
    assert to_model_input(png(rgba, mode="RGBA"), field="f", max_bytes=10**6, max_pixels=10**6).max() == 0


def test_preprocess_rejections():
    with pytest.raises(ImageTooLarge) as e:
        to_model_input(png(np.zeros((200, 200), np.uint8)), field="images[2]", max_bytes=10**6, max_pixels=10_000)
    assert e.value.status == 400 and e.value.field == "images[2]"
    with pytest.raises(BadImage):
        to_model_input(b"not an image", field="f", max_bytes=10**6, max_pixels=10**6)
    buf = __import__("io").BytesIO()
    Image.new("L", (28, 28)).save(buf, "GIF")  # a real image, but not an accepted format
    with pytest.raises(BadImage):
        to_model_input(buf.getvalue(), field="f", max_bytes=10**6, max_pixels=10**6)
    with pytest.raises(LimitExceeded):
        to_model_input(png(), field="f", max_bytes=10, max_pixels=10**6)
    with pytest.raises(BadImage):
        decode_base64("!!!", field="f", max_bytes=100)
    assert decode_base64("data:image/png;base64,aGk=", field="f", max_bytes=100) == b"hi"


def test_field_paths():
    assert field_path(("body", "texts", 3)) == "texts[3]"
    assert field_path(("body",)) == "body"
    assert field_path(("body", "a", "b")) == "a.b"


def test_service_never_imports_torch():
    code = ("import sys, service.app, service.deployments.translator, service.deployments.classifier, "
            "service.deployments.ingress, service.launch.local, service.deployments.engine_loop; "
            "bad = [m for m in ('torch', 'models') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
