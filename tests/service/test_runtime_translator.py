"""TranslatorRuntime and the numpy searches on a tiny exported translator (random weights)."""

from __future__ import annotations

import numpy as np
import pytest
from service_helpers import renormalised, teacher_forced

from service.runtime import InputError, TranslatorRuntime
from service.runtime.decoding import beam_search, greedy

TEXTS = ["The cat sleeps.", "Where is the red train station now?", "I", "We ate bread and cheese every night."]
MAX = 12  # random weights rarely emit EOS: keep the searches short


@pytest.fixture(scope="module")
def rt(tiny_artifacts) -> TranslatorRuntime:
    return TranslatorRuntime(tiny_artifacts["translator"], device="cpu")


def key(r):
    return (r.text, r.target_tokens, r.source_tokens)


@pytest.mark.parametrize("beam", [1, 3])
def test_batch_equals_one_at_a_time(rt, beam):
    batched = rt.translate(TEXTS, beam_size=beam, max_new_tokens=MAX, return_attention=True)
    for text, b in zip(TEXTS, batched, strict=True):
        (single,) = rt.translate([text], beam_size=beam, max_new_tokens=MAX, return_attention=True)
        assert key(b) == key(single)
        np.testing.assert_allclose(b.attention, single.attention, atol=1e-5)


def test_attention_flag_does_not_change_tokens(rt):
    plain = rt.translate(TEXTS, beam_size=2, max_new_tokens=MAX)
    with_attn = rt.translate(TEXTS, beam_size=2, max_new_tokens=MAX, return_attention=True)
    assert [key(r) for r in plain] == [key(r) for r in with_attn]
    assert all(r.attention is None for r in plain)


def test_beam_one_equals_greedy(rt):
    cross, mask, _ = rt.encode(TEXTS)
    for attention in (False, True):
        step = rt.step_fn(return_attention=attention)
        g = greedy(step, cross, mask, bos=rt.bos, eos=rt.eos, max_new_tokens=MAX)
        b = beam_search(step, cross, mask, bos=rt.bos, eos=rt.eos, max_new_tokens=MAX, beam_size=1)
        assert [h.tokens for h in g] == [h.tokens for h in b]
        if attention:
            for hg, hb in zip(g, b, strict=True):
                np.testing.assert_allclose(hg.attention, hb.attention, atol=1e-6)


@pytest.mark.parametrize("layers,heads", [(None, None), ([0], [1]), ([1, 0, -1], [0, 3])])
def test_alignment_rows_sum_to_one(rt, layers, heads):
    for r in rt.translate(
        TEXTS, beam_size=2, max_new_tokens=MAX, return_attention=True, attention_layers=layers, attention_heads=heads
    ):
        assert r.attention.shape == (len(r.target_tokens), len(r.source_tokens))
        np.testing.assert_allclose(r.attention.sum(axis=1), 1.0, atol=1e-5)
        assert r.layers == sorted({x % rt.layers for x in layers or [-1]})
        assert r.heads == sorted(set(heads or range(rt.heads)))


@pytest.mark.parametrize("engine", [False, True])
def test_several_layers_average_the_raw_maps_of_each(rt, engine):
    """Layers [0, 1] x heads [1, 2]: the mean of the four raw rows, EOS dropped, renormalised; the encoder map
    likewise over its own layers; checked against the teacher-forced attention graphs."""
    kw = {"return_attention": True, "attention_layers": [0, 1], "attention_heads": [2, 1],
          "return_encoder_attention": True, "encoder_attention_layers": [-1, 0], "encoder_attention_heads": [3]}
    run = rt.translate_engine if engine else rt.translate
    for text, r in zip(TEXTS, run(TEXTS, max_new_tokens=MAX, **kw), strict=True):
        cross, enc = teacher_forced(rt, text, r.target_tokens)
        n = len(r.source_tokens)
        expected = renormalised(cross[[0, 1]][:, [1, 2]].mean(axis=(0, 1)), n)
        np.testing.assert_allclose(r.attention, expected, atol=1e-5)
        assert (r.layers, r.heads, r.encoder_layers, r.encoder_heads) == ([0, 1], [1, 2], [0, rt.encoder_layers - 1],
                                                                          [3])
        e = enc[[0, rt.encoder_layers - 1]][:, [3]].mean(axis=(0, 1))[:n]
        assert r.encoder_attention.shape == (n, n)
        np.testing.assert_allclose(r.encoder_attention, renormalised(e, n), atol=1e-5)
        np.testing.assert_allclose(r.encoder_attention.sum(axis=1), 1.0, atol=1e-5)


def test_encoder_attention_only_when_asked(rt):
    plain = rt.translate_engine(TEXTS[:2], max_new_tokens=MAX, return_attention=True)
    both = rt.translate_engine(TEXTS[:2], max_new_tokens=MAX, return_attention=True, return_encoder_attention=True)
    assert all(r.encoder_attention is None for r in plain)
    assert [r.target_tokens for r in plain] == [r.target_tokens for r in both]
    for p, b in zip(plain, both, strict=True):
        np.testing.assert_allclose(p.attention, b.attention, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [{"beam_size": 0}, {"beam_size": 9}, {"attention_layers": [5]}, {"attention_heads": [7]}, {"max_new_tokens": 0},
     {"attention_layers": []}, {"encoder_attention_layers": [-3]}, {"encoder_attention_heads": [4]}],
)
def test_bad_arguments_raise_input_error(rt, kwargs):
    with pytest.raises(InputError):
        rt.translate(["hello"], **kwargs)


def test_int8_runs_and_counts_tokens(tiny_artifacts, rt):
    int8 = TranslatorRuntime(tiny_artifacts["translator"], precision="int8", device="cpu")
    assert len(int8.translate(TEXTS, max_new_tokens=4)) == len(TEXTS)
    assert rt.count_source_tokens("The cat sleeps.") == len(rt.tokenizer.encode("The cat sleeps.").ids) + 1


def test_serving_loads_only_the_graphs_it_runs(tiny_artifacts):
    """The engine needs the encoders and the step graph; the request-level decoder graphs load on first use."""
    fresh = TranslatorRuntime(tiny_artifacts["translator"], device="cpu")
    fresh.translate_engine(TEXTS, max_new_tokens=4, return_attention=True, return_encoder_attention=True)
    fresh.translate_engine(TEXTS, beam_size=2, max_new_tokens=4)
    assert set(fresh.sessions) == {"encoder", "encoder_attn", "decoder_step"}
    fresh.translate(TEXTS[:1], max_new_tokens=2)
    assert "decoder" in fresh.sessions and "decoder_attn" not in fresh.sessions
