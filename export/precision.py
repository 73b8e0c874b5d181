"""Precision variants of an fp32 graph: int8 static quantisation (CPU) and fp16 (GPU).

int8 keeps fp32 inputs and outputs. fp16 keeps fp32 only where the host reads or writes small tensors
(logits, probabilities, alignment, weights): the translator's keys and values (``KV_TENSORS``: the encoder's
cross_kv, the decoder's past/present, the slot step's caches, cross keys/values and new_kv) are fp16 at the
graph boundary too, so on CUDA the decode state lives in fp16 with no cast and no fp32 copy. The runtime reads
each graph's input types (the manifest records every input's and output's dtype).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def to_int8(src: Path, dst: Path, calibration: list[dict[str, np.ndarray]]) -> None:
    """Static int8: weights per output channel, activations with scales calibrated once on real inputs
    (``calibration``: feeds of the graph from real data outside the test split), so a row's result depends on that row
    alone; dynamic quantisation scaled the activations per call across all rows of a step, which changed 3 of 60
    test sentences with their step-mates. Only MatMuls with a constant weight are quantised (QDQ pairs that
    ONNX Runtime fuses into int8 kernels); attention over the caches, softmax and layer norms stay fp32.
    Measured on the decoder step (32 rows, cache 128, 1 thread): 0.64x fp32's CPU time, 1.09x dynamic int8's
    (docs/BENCHMARKS.md, `attnserve bench step`)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Feeds(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    model = gemm_as_matmul(prepared(src))
    weights = {i.name for i in model.graph.initializer}
    nodes = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    ready = dst.with_suffix(".calib.onnx")
    onnx.save(model, str(ready))
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)  # the quantiser logs advice on the root logger
    try:
        quantize_static(str(ready), str(dst), Feeds(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                        nodes_to_quantize=nodes, calibrate_method=CalibrationMethod.MinMax)
    finally:
        root.setLevel(level)
        ready.unlink(missing_ok=True)


def gemm_as_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """Gemm(x, W, b) with a constant W -> MatMul(x, W') + b: one weight layout for the quantiser (2-D Linear
    layers export as Gemm, 3-D ones as MatMul)."""
    inits = {i.name: i for i in model.graph.initializer}
    for node in list(model.graph.node):
        if node.op_type != "Gemm" or node.input[1] not in inits:
            continue
        attr = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attr.get("transA", 0) or attr.get("alpha", 1.0) != 1.0 or attr.get("beta", 1.0) != 1.0:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        w = w.T if attr.get("transB", 0) else w
        weight, product = f"{node.input[1]}_kn", f"{node.output[0]}_mm"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), weight))
        biased = len(node.input) > 2 and node.input[2]
        new = [onnx.helper.make_node("MatMul", [node.input[0], weight], [product if biased else node.output[0]],
                                     name=f"{node.name}_matmul")]
        if biased:
            add = onnx.helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_add")
            new.append(add)
        at = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        for i, n in enumerate(new):
            model.graph.node.insert(at + i, n)
    return model


def prepared(src: Path) -> onnx.ModelProto:
    """The fp32 graph made friendly to the converters.

    - The dynamo exporter's intermediate shape annotations can contradict onnx's own shape inference, which
      the converters run: they are dropped and inferred afresh.
    - The tied output projection reads ``Transpose(embed.weight)``; folded into a constant, it becomes an
      int8 MatMulInteger like every other weight instead of an fp32 MatMul fed by a per-call dequantisation
      of the whole 8k x d table (measured: most of the int8 decoder step).
    """
    model = onnx.load(str(src))
    del model.graph.value_info[:]
    inits = {i.name: i for i in model.graph.initializer}
    for node in list(model.graph.node):
        if node.op_type == "Transpose" and node.input[0] in inits:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            folded = numpy_helper.to_array(inits[node.input[0]]).transpose(perm)
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(folded), node.output[0]))
            model.graph.node.remove(node)
    return model


# Keys and values: fp16 at the boundary of an fp16 graph (the decode state); every other float stays fp32.
KV_TENSORS = re.compile(r"(cross_kv|past_kv|present_kv|new_kv|cache_[kv]\d+|cross_[kv]\d+)")


def fp32_io(model: onnx.ModelProto) -> list[str]:
    """Float inputs/outputs an fp16 graph keeps in fp32: all but the keys and values."""
    return [
        v.name
        for v in (*model.graph.input, *model.graph.output)
        if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and not KV_TENSORS.fullmatch(v.name)
    ]


def to_fp16(src: Path, dst: Path, calibration: object = None) -> None:
    """fp16 weights and compute for the CUDA provider; keys/values fp16 at the boundary, other floats fp32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = prepared(src)
    model = convert_float_to_float16(model, keep_io_types=fp32_io(model), disable_shape_infer=False)
    onnx.save(model, str(dst))


CONVERTERS = {"int8": to_int8, "fp16": to_fp16}
# How each variant is made, recorded in the manifest; an artifact made another way is rebuilt.
METHODS = {
    "int8": "onnxruntime.quantization.quantize_static (QDQ, MatMul weights QInt8 per channel, activations QUInt8"
            " calibrated MinMax on real inputs, not the test split: exporter.int8_calibration)",
    "fp16": "onnxruntime.transformers.float16 (fp32 I/O except keys/values: fp16 decode state)",
}


def variant_file(graph: str, precision: str) -> str:
    return f"{graph}.onnx" if precision == "fp32" else f"{graph}.{precision}.onnx"
