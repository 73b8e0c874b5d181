"""ONNX Runtime sessions: provider choice and deliberate thread settings, created once per graph."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from service.runtime.errors import DeviceError

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def resolve_device(device: str) -> str:
    """ "auto" -> "cuda" when ONNX Runtime has the CUDA provider, else "cpu"."""
    available = ort.get_available_providers()
    if device == "auto":
        return "cuda" if CUDA in available else "cpu"
    if device == "cuda" and CUDA not in available:
        raise DeviceError(f"device 'cuda' asked for, but ONNX Runtime only has {available} (install onnxruntime-gpu)")
    if device not in ("cpu", "cuda"):
        raise DeviceError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    return device


def make_session(path: Path, *, device: str, intra_op_threads: int = 1) -> ort.InferenceSession:
    """One session for one graph.

    Threads: one intra-op thread per replica by default. Serving scales by replicas and batching, and on a
    few shared cores extra intra-op threads mostly spin and contend (measured: ORT with 1 thread beat
    torch's default threading several times in a busy process). Inter-op parallelism is off: these graphs
    are chains with little independent work.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # warnings about unused initialisers etc. are noise at serving time
    # Spinning threads burn the cores other replicas need; wake on demand instead.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = [CUDA, CPU] if device == "cuda" else [CPU]
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
