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


def host_cls(attentions: np.ndarray, layers: list[int], heads: list[int]) -> np.ndarray:
    """CLS -> patches from the raw maps, mean over the chosen layers and heads, renormalised: (N, 7, 7)."""
    a = attentions[layers][:, :, heads, 0, 1:].astype(np.float64).mean(axis=(0, 2))  # (N, 49)
    return (a / a.sum(-1, keepdims=True)).reshape(-1, 7, 7)


@pytest.mark.parametrize("layers,heads", [(None, None), ([0], [1]), ([0, -1], None), ([-1, 1], [0, 1, 1])])
def test_predict_cls_equals_host_cls_attention(rt, layers, heads):
    x = images(4)
    choice = rt.cls_choice(layers, heads)
    assert choice.layers == sorted({i % rt.layers for i in (layers or range(rt.layers))})  # None: all layers
    probs, cls = rt.predict(x, cls_weights=choice.weights)
    ref = rt.classify(rt.normalize(x), return_attention=True)
    np.testing.assert_allclose(probs, ref.probs, atol=1e-5)
    np.testing.assert_allclose(cls, host_cls(ref.attentions, choice.layers, choice.heads), atol=1e-5)
    np.testing.assert_allclose(cls.sum(axis=(1, 2)), 1.0, atol=1e-5)


def test_predict_cls_rows_with_different_choices_are_independent(rt):
    x = images(3)
    choices = [rt.cls_choice([0], [0]), rt.cls_choice(None, None), rt.cls_choice([0, 1], [1])]
    _, mixed = rt.predict(x, cls_weights=np.stack([c.weights for c in choices]))
    for i, c in enumerate(choices):
        _, alone = rt.predict(x[i : i + 1], cls_weights=c.weights)
        np.testing.assert_allclose(mixed[i], alone[0], atol=1e-6)


def test_cls_choice_errors_name_the_field_and_range(rt):
    for layers, heads, field, allowed in (([rt.layers], None, "attention_layers", f"[-{rt.layers}, {rt.layers - 1}]"),
                                          ([-rt.layers - 1], None, "attention_layers", "[-"),
                                          (None, [rt.heads], "attention_heads", f"[0, {rt.heads - 1}]"),
                                          (None, [-1], "attention_heads", "[0,"), ([], None, "attention_layers", "")):
        with pytest.raises(InputError) as e:
            rt.cls_choice(layers, heads)
        assert e.value.field == field and allowed in str(e.value), str(e.value)
    with pytest.raises(InputError):
        rt.predict(images(1), rollout=True, cls_weights=rt.cls_choice().weights)


def test_serving_loads_only_the_graphs_it_runs(tiny_artifacts):
    """`predict` runs the classify graphs; `vit`/`vit_attn` (raw maps for tools) load on first use."""
    fresh = ClassifierRuntime(tiny_artifacts["vit"], device="cpu")
    fresh.predict(images(2))
    fresh.predict(images(2), rollout=True)
    fresh.predict(images(2), cls_weights=fresh.cls_choice().weights)
    assert set(fresh.sessions) == {"classify", "classify_rollout", "classify_cls"}
    fresh.classify(fresh.normalize(images(2)), return_attention=True)
    assert "vit_attn" in fresh.sessions and "vit" not in fresh.sessions
