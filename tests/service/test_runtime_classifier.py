"""ClassifierRuntime on a tiny exported ViT: batching, attention maps, preprocessing."""

from __future__ import annotations

import numpy as np
import pytest

from service.runtime import ClassifierRuntime, InputError


@pytest.fixture(scope="module")
def rt(tiny_artifacts) -> ClassifierRuntime:
    return ClassifierRuntime(tiny_artifacts["vit"], device="cpu")


def images(n: int = 5) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


def test_batch_equals_one_at_a_time(rt):
    x = rt.normalize(images())
    batched = rt.classify(x, return_attention=True)
    for i in range(len(x)):
        single = rt.classify(x[i : i + 1], return_attention=True)
        np.testing.assert_allclose(batched.probs[i], single.probs[0], atol=1e-6)
        np.testing.assert_allclose(batched.attentions[:, i], single.attentions[:, 0], atol=1e-6)
    plain = rt.classify(x)
    assert plain.attentions is None
    np.testing.assert_allclose(plain.probs, batched.probs, atol=1e-6)
    np.testing.assert_allclose(plain.probs.sum(-1), 1.0, atol=1e-5)


def test_attention_maps(rt):
    out = rt.classify(rt.normalize(images(3)), return_attention=True)
    layers, n, heads, tokens, _ = out.attentions.shape
    assert (n, tokens) == (3, 50) and layers == rt.manifest.model["layers"]
    roll = rt.rollout(out.attentions)
    assert roll.shape == (3, 7, 7) and (roll >= 0).all()
    np.testing.assert_allclose(roll.sum(axis=(1, 2)), 1.0, atol=1e-5)
    cls = rt.cls_attention(out.attentions)
    assert cls.shape == (layers, 3, 7, 7)
    np.testing.assert_allclose(cls[0, 1], out.attentions[0, 1, :, 0, 1:].mean(0).reshape(7, 7), atol=1e-7)


def test_normalize_matches_training(rt):
    from models.train_vit import normalize  # torch, only in this test process

    x = images(2)
    np.testing.assert_array_equal(rt.normalize(x), normalize(x).numpy())


def test_bad_shapes(rt):
    with pytest.raises(InputError):
        rt.normalize(np.zeros((2, 27, 28), np.uint8))
    with pytest.raises(InputError):
        rt.classify(np.zeros((2, 28, 28), np.float32))


@pytest.mark.parametrize("n", [1, 5])
def test_predict_in_graph_equals_host_preprocessing_and_rollout(rt, n):
    """The service's uint8 graph (normalisation and rollout inside) agrees with the host-side path."""
    x = images(n)
    probs, rollout = rt.predict(x, rollout=True)
    ref = rt.classify(rt.normalize(x), return_attention=True)
    np.testing.assert_allclose(probs, ref.probs, atol=1e-5)
    np.testing.assert_allclose(rollout, rt.rollout(ref.attentions), atol=1e-5)
    np.testing.assert_allclose(rollout.sum(axis=(1, 2)), 1.0, atol=1e-5)
    plain, none = rt.predict(x)
    assert none is None
    np.testing.assert_allclose(plain, probs, atol=1e-6)
