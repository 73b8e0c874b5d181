"""The one generic exporter: a GraphSpec + a torch model -> an .onnx file with named dynamic axes."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch.export import Dim

from export.samples import random_inputs
from export.specs import DYNAMIC, EXAMPLE_SIZES, GraphSpec

OPSET = 18  # LayerNormalization is native from 17; 18 is read by every ORT and quantisation tool we use


def export_graph(
    spec: GraphSpec, model: torch.nn.Module, dims: dict[str, int], path: Path, *, opset: int = OPSET
) -> None:
    """Trace ``spec.wrapper(model)`` with torch.onnx.export(dynamo=True) at sizes >= 2 and write one file."""
    wrapper = spec.wrapper(model).eval()
    example = random_inputs(spec, dims, EXAMPLE_SIZES)
    args = tuple(torch.from_numpy(example[t.name]) for t in spec.inputs)
    axes = {d: Dim(d) for d in DYNAMIC}
    shapes = [{i: axes[d] for i, d in enumerate(t.shape) if d in DYNAMIC} for t in spec.inputs]
    first = spec.first_vararg  # per-layer inputs reach the wrapper as *args: their shapes nest in one tuple
    dynamic_shapes = (*shapes[:first], tuple(shapes[first:])) if first is not None else tuple(shapes)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter, not about our graph
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
    program.save(str(path), external_data=False)


def describe(path: Path) -> dict:
    """Inputs and outputs of an ONNX file as written: name, numpy dtype, shape (str = dynamic axis)."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def info(v) -> dict:
        t = v.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name
        shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        return {"name": v.name, "dtype": dtype, "shape": shape}

    return {"inputs": [info(v) for v in graph.input], "outputs": [info(v) for v in graph.output]}
