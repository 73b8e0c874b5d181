"""Small ONNX graphs that update the decode state where it lives (CPU or GPU), built with onnx.helper at load.

They run through IO binding over the slot buffers (`OrtValue`s on the sessions' device), each output bound to
the same memory as the buffer it updates: ONNX Runtime's ScatterND copies its input into its output only when
they differ, so the update is in place and nothing crosses to the host but the few index vectors.

- ``write_kv``: this step's keys/values (``new_kv`` from the decoder step) into each row's cache at its position.
- ``move_rows``: rows ``src`` -> rows ``dst`` of every buffer given (beam reorder; compaction). Gather runs before
  the scatter, so sources are read first, as overlapping moves need.
- ``write_source``: the encoder's keys/values (one per source) into the cross buffers of the rows that decode it,
  zero-padded to the buffers' source capacity.
- ``resize``: a buffer's kept rows and positions into a larger or smaller one, zeros elsewhere.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
I64 = TensorProto.INT64


def elem(dtype: np.dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _model(nodes, inputs, outputs, inits, name: str) -> bytes:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="attnserve")
    model.ir_version = 8  # what every supported ONNX Runtime reads
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _const(name: str, value) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.int64), name)


def _buf(name: str, dtype, dims: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem(dtype), dims)


def kv_names(layers: int, kind: str) -> list[str]:
    return [f"{kind}_{kv}{i}" for i in range(layers) for kv in "kv"]


def write_kv(layers: int, heads: int, head_dim: int, dtype) -> bytes:
    """cache_* (R, nh, C, hs), new_kv (n, L, 2, nh, hs), positions (n,) -> cache_* with row r < n written at
    [r, :, positions[r]]."""
    names = kv_names(layers, "cache")
    nodes = [
        helper.make_node("Shape", ["positions"], ["n1"]),
        helper.make_node("Squeeze", ["n1"], ["n"]),
        helper.make_node("Range", ["zero", "n", "one"], ["rows"]),
        helper.make_node("Concat", ["n1", "nh_1"], ["shape3"], axis=0),
        helper.make_node("Reshape", ["rows", "col3"], ["r3"]),
        helper.make_node("Reshape", ["positions", "col3"], ["p3"]),
        helper.make_node("Expand", ["r3", "shape3"], ["R"]),
        helper.make_node("Expand", ["heads", "shape3"], ["H"]),
        helper.make_node("Expand", ["p3", "shape3"], ["P"]),
        helper.make_node("Concat", ["R", "H", "P"], ["indices"], axis=2),  # (n, nh, 3): row, head, position
    ]
    for i in range(layers):
        nodes.append(helper.make_node("Gather", ["new_kv", f"l{i}"], [f"kv{i}"], axis=1))  # (n, 2, nh, hs)
        for j, kv in enumerate("kv"):
            name = f"cache_{kv}{i}"
            nodes.append(helper.make_node("Gather", [f"kv{i}", f"l{j}"], [f"u_{name}"], axis=1))  # (n, nh, hs)
            nodes.append(helper.make_node("ScatterND", [name, "indices", f"u_{name}"], [f"out_{name}"]))
    inits = [_const("zero", 0), _const("one", 1), _const("nh_1", [heads, 1]), _const("col3", [-1, 1, 1]),
             _const("heads", np.arange(heads).reshape(1, heads, 1)),
             *(_const(f"l{i}", i) for i in range(max(layers, 2)))]
    dims = lambda p: [f"{p}rows", heads, f"{p}len", head_dim]  # noqa: E731
    inputs = [_buf(n, dtype, dims("")) for n in names]
    inputs += [_buf("new_kv", dtype, ["n", layers, 2, heads, head_dim]), _buf("positions", np.int64, ["n"])]
    outputs = [_buf(f"out_{n}", dtype, dims("")) for n in names]
    return _model(nodes, inputs, outputs, inits, "write_kv")


def move_rows(specs: list[tuple[str, np.dtype, list]]) -> bytes:
    """Every buffer (name, dtype, dims) -> the same buffer with rows ``dst`` set to the old rows ``src``."""
    nodes = [helper.make_node("Unsqueeze", ["dst", "axis1"], ["dst2"])]
    for name, _, _ in specs:
        nodes.append(helper.make_node("Gather", [name, "src"], [f"g_{name}"], axis=0))
        nodes.append(helper.make_node("ScatterND", [name, "dst2", f"g_{name}"], [f"out_{name}"]))
    inputs = [_buf(n, t, d) for n, t, d in specs]
    inputs += [_buf("src", np.int64, ["m"]), _buf("dst", np.int64, ["m"])]
    outputs = [_buf(f"out_{n}", t, d) for n, t, d in specs]
    return _model(nodes, inputs, outputs, [_const("axis1", [1])], "move_rows")


def write_source(layers: int, heads: int, head_dim: int, dtype) -> bytes:
    """cross_* (R, nh, S, hs), cross_kv (L, 2, b, nh, S', hs), which (m,), rows (m,) -> cross_* with row rows[i]
    set to source which[i] (zeros past S')."""
    names = kv_names(layers, "cross")
    nodes = [
        helper.make_node("Unsqueeze", ["rows", "axis1"], ["rows2"]),
        helper.make_node("Shape", [names[0]], ["cap"], start=2, end=3),
        helper.make_node("Shape", ["cross_kv"], ["have"], start=4, end=5),
        helper.make_node("Sub", ["cap", "have"], ["extra"]),
        helper.make_node("Concat", ["zeros6", "extra", "zeros1"], ["pads"], axis=0),
    ]
    for i in range(layers):
        nodes.append(helper.make_node("Gather", ["cross_kv", f"l{i}"], [f"x{i}"], axis=0))  # (2, b, nh, S', hs)
        for j, kv in enumerate("kv"):
            name = f"cross_{kv}{i}"
            nodes += [
                helper.make_node("Gather", [f"x{i}", f"l{j}"], [f"s_{name}"], axis=0),  # (b, nh, S', hs)
                helper.make_node("Gather", [f"s_{name}", "which"], [f"w_{name}"], axis=0),  # (m, nh, S', hs)
                helper.make_node("Pad", [f"w_{name}", "pads"], [f"p_{name}"]),
                helper.make_node("ScatterND", [name, "rows2", f"p_{name}"], [f"out_{name}"]),
            ]
    inits = [_const("axis1", [1]), _const("zeros6", [0] * 6), _const("zeros1", [0]),
             *(_const(f"l{i}", i) for i in range(max(layers, 2)))]
    dims = ["rows", heads, "src_len", head_dim]
    inputs = [_buf(n, dtype, dims) for n in names]
    inputs += [_buf("cross_kv", dtype, [layers, 2, "b", heads, "s", head_dim]),
               _buf("which", np.int64, ["m"]), _buf("rows", np.int64, ["m"])]
    outputs = [_buf(f"out_{n}", dtype, dims) for n in names]
    return _model(nodes, inputs, outputs, inits, "write_source")


def resize(dtype, rank: int = 4) -> bytes:
    """old (any shape of ``rank``), ends (rank,), pads (2*rank,) -> Pad(old[:ends...], pads) (zeros)."""
    nodes = [helper.make_node("Slice", ["old", "starts", "ends"], ["kept"]),
             helper.make_node("Pad", ["kept", "pads"], ["new"])]
    dims = [f"d{i}" for i in range(rank)]
    inputs = [_buf("old", dtype, dims), _buf("ends", np.int64, [rank]), _buf("pads", np.int64, [2 * rank])]
    outputs = [_buf("new", dtype, [f"e{i}" for i in range(rank)])]
    return _model(nodes, inputs, outputs, [_const("starts", [0] * rank)], "resize")
