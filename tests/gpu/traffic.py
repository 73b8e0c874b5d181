"""Count the bytes each ONNX Runtime run moves between host memory and the session's device, at the binding.

Instrumentation, not a mock: every IOBinding and session call still runs; the counter only records what was
bound where. A run's host<->device traffic is what its inputs and outputs bound in host memory weigh, because
ONNX Runtime copies host-bound inputs to a CUDA session's device before each run and its outputs back after
(an input bound as a device OrtValue, or an output left on the device, costs nothing). On the CPU provider the
same count says what a CUDA session bound the same way would copy. Bindings made before the counter starts are
unknown to it (their runs count 0): start it before the engine or runtime binds anything.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from onnxruntime.capi import onnxruntime_inference_collection as ortc


def _nbytes(element_type: Any, shape: Any) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(element_type).itemsize


@dataclass
class Traffic:
    """Host bytes per run, by session: ``runs[session]`` is one total per run, in order."""

    runs: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    _bound: dict[int, dict[tuple[str, str], int | None]] = field(default_factory=lambda: defaultdict(dict))

    def of(self, session: Any) -> list[int]:
        return self.runs[id(session)]

    def total(self) -> int:
        """Bytes of every run seen so far, all sessions together."""
        return sum(sum(r) for r in self.runs.values())


@contextmanager
def count_host_traffic(monkeypatch: pytest.MonkeyPatch) -> Iterator[Traffic]:
    t = Traffic()
    B, S = ortc.IOBinding, ortc.InferenceSession

    def wrap(cls: type, name: str, record) -> None:
        original = getattr(cls, name)

        def patched(self, *args, **kw):
            record(self, *args, **kw)
            return original(self, *args, **kw)

        monkeypatch.setattr(cls, name, patched)

    def bind_input(io, name, device_type, device_id, element_type, shape, buffer_ptr):
        t._bound[id(io)][("in", name)] = _nbytes(element_type, shape) if device_type == "cpu" else 0

    def bind_cpu_input(io, name, arr):
        t._bound[id(io)][("in", name)] = np.asarray(arr).nbytes

    def bind_output(io, name, device_type="cpu", device_id=0, element_type=None, shape=None, buffer_ptr=None):
        host = device_type == "cpu"
        t._bound[id(io)][("out", name)] = (_nbytes(element_type, shape) if shape is not None else None) if host else 0

    def bind_ortvalue(kind):
        def record(io, name, value):
            t._bound[id(io)][(kind, name)] = value.numpy().nbytes if value.device_name().lower() == "cpu" else 0
        return record

    def clear(kind):
        def record(io):
            for key in [k for k in t._bound[id(io)] if k[0] == kind]:
                del t._bound[id(io)][key]
        return record

    original_run_io = S.run_with_iobinding

    def run_with_iobinding(session, io, run_options=None):
        out = original_run_io(session, io, run_options)
        bound = t._bound[id(io)]
        moved = sum(v for v in bound.values() if v is not None)
        unsized = [name for (kind, name), v in bound.items() if kind == "out" and v is None]
        if unsized:  # host outputs ORT allocated: their sizes are known now (outputs come in bind order)
            order = [name for kind, name in bound if kind == "out"]
            values = io.get_outputs()
            moved += sum(values[order.index(name)].numpy().nbytes for name in unsized)
        t.runs[id(session)].append(moved)
        return out

    original_run = S.run

    def run(session, output_names, input_feed, run_options=None):
        # A plain run: numpy feeds and the returned arrays are host memory.
        out = original_run(session, output_names, input_feed, run_options)
        t.runs[id(session)].append(sum(np.asarray(v).nbytes for v in [*input_feed.values(), *out]))
        return out

    wrap(B, "bind_input", bind_input)
    wrap(B, "bind_cpu_input", bind_cpu_input)
    wrap(B, "bind_output", bind_output)
    wrap(B, "bind_ortvalue_input", bind_ortvalue("in"))
    wrap(B, "bind_ortvalue_output", bind_ortvalue("out"))
    wrap(B, "clear_binding_inputs", clear("in"))
    wrap(B, "clear_binding_outputs", clear("out"))
    monkeypatch.setattr(S, "run_with_iobinding", run_with_iobinding)
    monkeypatch.setattr(S, "run", run)
    yield t
