"""The exporter on tiny random models: parity on every graph, dynamic axes, precisions, idempotence."""

from __future__ import annotations

import json

import pytest
import torch

from export.build import ExportOptions, export_checkpoint
from export.parity import ParityError, compare, cpu_session
from export.samples import random_inputs
from export.specs import TRANSLATOR_GRAPHS, model_dims
from models.checkpoint import load_checkpoint


def manifest(d):
    return json.loads((d / "manifest.json").read_text())


@pytest.mark.parametrize("kind", ["vit", "translator"])
def test_export_writes_verified_manifest(tiny_artifacts, kind):
    m = manifest(tiny_artifacts[kind])
    assert m["parity"]["passed"] and m["parity"]["mismatches"] == []
    assert set(m["graphs"]) == {"fp32", "int8"}
    for graphs in m["graphs"].values():
        for g in graphs.values():
            assert g["file"] in m["files"]
            assert g["inputs"][0]["shape"][0] == "batch"  # batch is dynamic, not fixed by the example
    expected = {"vit", "vit_attn"} if kind == "vit" else {"encoder", "encoder_attn", "decoder", "decoder_attn"}
    assert set(m["graphs"]["fp32"]) == expected
    cases = {c["case"] for r in m["parity"]["graphs"].values() for c in r}
    assert any("batch1" in c for c in cases)
    if kind == "translator":
        assert "tokenizer.json" in m["files"]
        dec = m["graphs"]["fp32"]["decoder"]["inputs"]
        assert [i["name"] for i in dec] == ["tgt_ids", "cross_kv", "src_mask", "past_kv"]
        assert dec[3]["shape"][4] == "past_len"
        assert any("past0" in c for c in cases)
    else:
        assert m["labels"][0] == "T-shirt/top" and m["preprocessing"]["mean"] == 0.286


def test_greedy_tokens_parity_recorded(tiny_artifacts, shared_data):
    greedy = manifest(tiny_artifacts["translator"])["parity"]["greedy_tokens"]
    for graph in ("decoder", "decoder_attn"):
        assert greedy[graph]["identical"] == greedy[graph]["sentences"] == 8


def test_export_is_idempotent(tiny_artifacts, capsys):
    before = (tiny_artifacts["vit"] / "manifest.json").stat().st_mtime_ns
    again = export_checkpoint(tiny_artifacts["checkpoints"]["vit"], ExportOptions(out=tiny_artifacts["out"]))
    assert again == tiny_artifacts["vit"]
    assert (again / "manifest.json").stat().st_mtime_ns == before
    assert "up to date" in capsys.readouterr().out


def test_parity_reports_every_mismatch(tiny_artifacts):
    """A graph checked against different weights fails on every output of every case, all in one error."""
    model, _ = load_checkpoint(tiny_artifacts["checkpoints"]["translator"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    dims = model_dims("translator", model.cfg)
    spec = next(s for s in TRANSLATOR_GRAPHS if s.name == "decoder_attn")
    sess = cpu_session(tiny_artifacts["translator"] / "decoder_attn.onnx")
    bad = []
    for i, sizes in enumerate(
        [
            {"batch": 1, "src_len": 1, "tgt_len": 1, "past_len": 0},
            {"batch": 2, "src_len": 3, "tgt_len": 2, "past_len": 2},
        ]
    ):
        bad += compare(spec, spec.wrapper(model).eval(), sess, f"case{i}", random_inputs(spec, dims, sizes))[1]
    assert len(bad) >= 4  # logits and present_kv of both cases at least
    err = ParityError(bad)
    assert "decoder_attn [case0] logits" in str(err) and "decoder_attn [case1]" in str(err)


def test_fp16_variant_builds_runs_and_agrees(tiny_artifacts, tmp_path, shared_data):
    """fp16 (for GPUs) is exported with fp32 inputs/outputs and its measured quality change recorded; on the
    CPU provider it still runs, so its outputs can be checked against fp32 here."""
    import numpy as np

    from service.runtime import ClassifierRuntime

    opts = ExportOptions(out=tmp_path, precisions=("fp32", "fp16"), greedy_sentences=4, quality_limit=16)
    out = export_checkpoint(tiny_artifacts["checkpoints"]["vit"], opts)
    m = manifest(out)
    assert set(m["graphs"]) == {"fp32", "fp16"} and "fp16" in m["quality"]
    pixels = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    ref = ClassifierRuntime(out, precision="fp32", device="cpu").classify(pixels, return_attention=True)
    half = ClassifierRuntime(out, precision="fp16", device="cpu").classify(pixels, return_attention=True)
    np.testing.assert_allclose(half.probs, ref.probs, atol=2e-2)
    np.testing.assert_allclose(half.attentions.sum(-1), 1.0, atol=2e-2)
