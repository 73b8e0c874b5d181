"""Precision variants of an fp32 graph: int8 dynamic quantisation (CPU) and fp16 (GPU).

Both keep fp32 inputs and outputs, so the runtime feeds every precision the same way.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def to_int8(src: Path, dst: Path) -> None:
    """Dynamic quantisation: int8 weights of MatMul/Gemm, activations quantised per call (no calibration)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    stripped = dst.with_suffix(".noinfo.onnx")
    save_without_value_info(src, stripped)
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)  # the quantiser logs advice on the root logger
    try:
        # Signed int8 weights: the x86 VNNI/AVX2 kernels of MatMulInteger take u8 activations x s8 weights.
        quantize_dynamic(str(stripped), str(dst), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
        stripped.unlink(missing_ok=True)


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


def save_without_value_info(src: Path, dst: Path) -> None:
    onnx.save(prepared(src), str(dst))


def to_fp16(src: Path, dst: Path) -> None:
    """fp16 weights and compute for the CUDA provider; fp32 at the inputs/outputs (casts inside)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(prepared(src), keep_io_types=True, disable_shape_infer=False)
    onnx.save(model, str(dst))


CONVERTERS = {"int8": to_int8, "fp16": to_fp16}


def variant_file(graph: str, precision: str) -> str:
    return f"{graph}.onnx" if precision == "fp32" else f"{graph}.{precision}.onnx"
