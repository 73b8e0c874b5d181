"""Precision variants on tiny random models: fp16 keeps the decode state in fp16 at the graph boundary, int8
is row-independent, and a quality gate that could not run is reported as not run, never as passed."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from export.build import ExportOptions, export_checkpoint
from export.gates import check_gates
from export.precision import KV_TENSORS
from service.runtime import TranslatorRuntime
from service.runtime.engine import EngineSettings

TEXTS = ["The cat is on the table.", "I like green apples.", "Where is the station?", "We are going home now.",
         "He reads a book.", "Tom was here yesterday.", "She has two dogs.", "It is very cold today."]


@pytest.fixture(scope="module")
def tiny_fp16(tiny_artifacts, tmp_path_factory, shared_data):
    opts = ExportOptions(out=tmp_path_factory.mktemp("fp16"), precisions=("fp32", "int8", "fp16"),
                         greedy_sentences=4, quality_limit=8, gates=False)
    return export_checkpoint(tiny_artifacts["checkpoints"]["translator"], opts)


def test_fp16_graphs_keep_keys_and_values_in_fp16(tiny_fp16):
    """Keys/values (encoder cross_kv, decoder past/present, slot caches, cross keys/values, new_kv) are fp16 at
    the boundary of every fp16 translator graph; ids, positions and masks keep their integer/bool types; the other
    floats (logprobs, alignment, weights) stay fp32. The manifest records each graph's I/O dtypes as written."""
    m = json.loads((tiny_fp16 / "manifest.json").read_text())
    step = {t["name"]: t["dtype"] for t in [*m["graphs"]["fp16"]["decoder_step"]["inputs"],
                                           *m["graphs"]["fp16"]["decoder_step"]["outputs"]]}
    assert step["cache_k0"] == step["cache_v1"] == step["cross_k0"] == step["cross_v1"] == step["new_kv"] == "float16"
    assert step["tokens"] == step["positions"] == step["topk_ids"] == "int64" and step["src_mask"] == "bool"
    assert step["topk_logprobs"] == step["alignment"] == step["align_weights"] == "float32"
    assert {t["name"]: t["dtype"] for t in m["graphs"]["fp16"]["encoder"]["outputs"]} == {"cross_kv": "float16"}
    for precision, graphs in m["graphs"].items():
        for name, g in graphs.items():
            model = onnx.load(str(tiny_fp16 / g["file"]), load_external_data=False)
            written = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}
            for t in (*g["inputs"], *g["outputs"]):  # the manifest says what the file holds
                assert onnx.helper.tensor_dtype_to_np_dtype(written[t["name"]]).name == t["dtype"], (name, t)
                if precision != "fp16" and t["dtype"].startswith("float"):
                    assert t["dtype"] == "float32", (precision, name, t)
                if precision == "fp16" and KV_TENSORS.fullmatch(t["name"]):
                    assert t["dtype"] == "float16", (name, t)


def test_fp16_engine_runs_and_its_gate_says_where(tiny_fp16):
    """The engine decodes through the fp16 step (fp16 caches, from the graph's input types) on the CPU provider,
    and the export measured fp16's quality on a named provider rather than calling it unchecked."""
    m = json.loads((tiny_fp16 / "manifest.json").read_text())
    assert m["quality"]["fp16"]["measured_with"] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    rt = TranslatorRuntime(tiny_fp16, precision="fp16", device="cpu")
    assert rt.translate_engine(TEXTS[:2])[0].target_tokens is not None
    assert next(iter(rt.sessions.values())).get_providers()[0] == "CPUExecutionProvider"


@pytest.mark.parametrize("precision", ["fp32", "int8", "fp16"])
def test_a_row_does_not_depend_on_its_step_mates(tiny_fp16, precision):
    """Decoding a sentence alone or among others in the same steps gives the same tokens, in every precision
    (int8 included: activation scales calibrated at export, not computed per step across the rows)."""
    rt = TranslatorRuntime(tiny_fp16, precision=precision, device="cpu")
    together = rt.translate_engine(TEXTS, EngineSettings(max_slots=8), max_new_tokens=24)
    alone = [rt.translate_engine([t], max_new_tokens=24)[0] for t in TEXTS]
    assert [r.target_tokens for r in together] == [r.target_tokens for r in alone]


def test_int8_is_static(tiny_fp16):
    """int8 scales are constants of the graph (calibrated at export), not computed per call from the rows."""
    m = json.loads((tiny_fp16 / "manifest.json").read_text())
    ops = {n.op_type for n in onnx.load(str(tiny_fp16 / m["graphs"]["int8"]["decoder_step"]["file"])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and not ops & {"DynamicQuantizeLinear", "MatMulInteger"}
    assert "quantize_static" in m["exporter"]["int8"]


def test_a_gate_that_could_not_run_is_not_a_pass():
    quality = {"fp32": {"bleu": 30.0},
               "int8": {"bleu": 29.9, "delta_bleu": -0.1, "measured_with": "CPUExecutionProvider"},
               "fp16": {"measured": False, "reason": "NOT_IMPLEMENTED: LayerNormalization(float16)"}}
    gates, failures = check_gates("translation", quality)
    assert failures == []  # nothing measured worse than allowed, so the export installs ...
    assert gates["precisions"]["fp16"] == {"checked": False, "status": "not run",
                                           "reason": "NOT_IMPLEMENTED: LayerNormalization(float16)"}
    assert gates["not_run"] == ["fp16"] and gates["passed"] is False  # ... but the gates did not pass
    assert gates["precisions"]["int8"]["status"] == "passed"
    assert gates["precisions"]["int8"]["ran_on"] == "CPUExecutionProvider"
    del quality["fp16"]
    gates, _ = check_gates("translation", quality)
    assert gates["passed"] is True and gates["not_run"] == []


def test_fp16_cross_kv_feeds_the_fp16_step(tiny_fp16):
    """The encoder's fp16 cross_kv goes into the fp16 step's buffers without a cast (same dtype end to end)."""
    rt = TranslatorRuntime(tiny_fp16, precision="fp16", device="cpu")
    cross, _ = rt.encode_ids([[5, 6, 7, 2]])
    assert cross.dtype == np.float16
