"""TranslatorRuntime and the numpy searches on a tiny exported translator (random weights)."""

from __future__ import annotations

import numpy as np
import pytest

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


@pytest.mark.parametrize("layer,heads", [(-1, None), (0, [1]), (1, [0, 3])])
def test_alignment_rows_sum_to_one(rt, layer, heads):
    for r in rt.translate(
        TEXTS, beam_size=2, max_new_tokens=MAX, return_attention=True, attention_layer=layer, attention_heads=heads
    ):
        assert r.attention.shape == (len(r.target_tokens), len(r.source_tokens))
        np.testing.assert_allclose(r.attention.sum(axis=1), 1.0, atol=1e-5)
        assert r.layer == layer % rt.layers and r.heads == (heads or list(range(rt.heads)))


@pytest.mark.parametrize(
    "kwargs",
    [{"beam_size": 0}, {"beam_size": 9}, {"attention_layer": 5}, {"attention_heads": [7]}, {"max_new_tokens": 0}],
)
def test_bad_arguments_raise_input_error(rt, kwargs):
    with pytest.raises(InputError):
        rt.translate(["hello"], **kwargs)


def test_int8_runs_and_counts_tokens(tiny_artifacts, rt):
    int8 = TranslatorRuntime(tiny_artifacts["translator"], precision="int8", device="cpu")
    assert len(int8.translate(TEXTS, max_new_tokens=4)) == len(TEXTS)
    assert rt.count_source_tokens("The cat sleeps.") == len(rt.tokenizer.encode("The cat sleeps.").ids) + 1
