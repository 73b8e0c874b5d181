"""Precision variants of an fp32 graph: int8 dynamic quantisation (CPU) and fp16 (GPU).

Both keep fp32 inputs and outputs, so the runtime feeds every precision the same way.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx


def to_int8(src: Path, dst: Path) -> None:
    """Dynamic quantisation: int8 weights of MatMul/Gemm, activations quantised per call (no calibration)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    stripped = dst.with_suffix(".noinfo.onnx")
    save_without_value_info(src, stripped)
    try:
        # Signed int8 weights: the x86 VNNI/AVX2 kernels of MatMulInteger take u8 activations x s8 weights.
        quantize_dynamic(str(stripped), str(dst), weight_type=QuantType.QInt8)
    finally:
        stripped.unlink(missing_ok=True)


def save_without_value_info(src: Path, dst: Path) -> None:
    """The dynamo exporter's intermediate shape annotations can contradict onnx's own shape inference,
    which the converters run; dropping them lets the tools infer shapes afresh."""
    model = onnx.load(str(src))
    del model.graph.value_info[:]
    onnx.save(model, str(dst))


def to_fp16(src: Path, dst: Path) -> None:
    """fp16 weights and compute for the CUDA provider; fp32 at the inputs/outputs (casts inside)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    del model.graph.value_info[:]  # see save_without_value_info
    model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    onnx.save(model, str(dst))


CONVERTERS = {"int8": to_int8, "fp16": to_fp16}


def variant_file(graph: str, precision: str) -> str:
    return f"{graph}.onnx" if precision == "fp32" else f"{graph}.{precision}.onnx"
