"""ONNX Runtime sessions: the install check, provider choice, CUDA options and thread settings, per graph once.

GPU serving needs the `onnxruntime-gpu` wheel (`pip install 'attnserve[gpu]'`, or `make serve DEVICE=cuda`), which
pulls its CUDA 13 / cuDNN 9 libraries as pip packages (its `[cuda,cudnn]` extras) and loads them with
`onnxruntime.preload_dlls()`; the machine needs only an NVIDIA driver for CUDA 13. Never install `onnxruntime`
beside it: both wheels write the same `onnxruntime/` package and whichever was installed last wins, often losing
the CUDA provider, so `check_install()` refuses such an environment.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Literal

import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field

from service.runtime.errors import DeviceError

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
# pyproject.toml's gpu extra (a test checks they agree): PyPI's 1.31 wheels are built for CUDA 13 and cuDNN 9.
ORT_GPU_PIN = "onnxruntime-gpu[cuda,cudnn]==1.31.1"
CUDA_MAJOR = 13  # of that wheel (its [cuda] extra: nvidia-cuda-runtime~=13.0); deploy/docker's CUDA base matches
GPU_INSTALL = ("install the GPU build in a venv of its own: `make serve DEVICE=cuda` (makes .venv-gpu with "
               f"'.[gpu]': {ORT_GPU_PIN}), on a machine with an NVIDIA driver for CUDA 13")


class CudaOptions(BaseModel):
    """ONNX Runtime's CUDA provider options, per replica (ignored on CPU). Defaults are chosen, not ORT's own."""

    model_config = ConfigDict(extra="forbid")

    device_id: int = Field(0, ge=0, description="the CUDA device among those Ray gives the replica (usually 0)")
    gpu_mem_limit_mib: int = Field(4096, ge=64, description="cap of ORT's memory arena for this replica; the "
                                   "CUDA context and cuDNN/cuBLAS workspaces come on top (a few hundred MiB)")
    # kSameAsRequested: the arena grows by what a run asks for, not to the next power of two, so one odd batch
    # shape does not reserve twice the memory it needs for the life of the replica.
    arena_extend_strategy: Literal["kSameAsRequested", "kNextPowerOfTwo"] = "kSameAsRequested"
    # HEURISTIC: batch sizes vary per call; EXHAUSTIVE benchmarks cuDNN's algorithms for every new shape (the
    # first request of each new batch size would pay for it). The ViT's patch embedding is the only convolution.
    cudnn_conv_algo_search: Literal["HEURISTIC", "EXHAUSTIVE", "DEFAULT"] = "HEURISTIC"
    # Off: fp32 graphs then compute in full fp32 and decode the same tokens as the CPU provider (tests/gpu). The
    # speed path on Ampere and later is the fp16 graphs (precision: fp16), not TF32.
    use_tf32: bool = False

    def provider_options(self) -> dict[str, str]:
        return {
            "device_id": str(self.device_id),
            "gpu_mem_limit": str(self.gpu_mem_limit_mib * 2**20),
            "arena_extend_strategy": self.arena_extend_strategy,
            "cudnn_conv_algo_search": self.cudnn_conv_algo_search,
            "use_tf32": "1" if self.use_tf32 else "0",
        }


def installed_onnxruntimes() -> list[str]:
    """The ONNX Runtime distributions importlib.metadata finds on sys.path ("name version")."""
    found = []
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return found


def check_install() -> None:
    """Refuse an environment holding both `onnxruntime` and `onnxruntime-gpu` (see the module docstring)."""
    found = installed_onnxruntimes()
    if len(found) > 1:
        raise DeviceError(
            f"both {' and '.join(found)} are installed: they write the same `onnxruntime` package, so which one "
            "imports (and whether the CUDA provider works) depends on install order. Fix: `pip uninstall -y "
            "onnxruntime onnxruntime-gpu`, then install one: `pip install -e '.[serve]'` (CPU) or "
            f"`make serve DEVICE=cuda` ({ORT_GPU_PIN} alone in .venv-gpu)")


def available() -> list[str]:
    return ort.get_available_providers()


def resolve_device(device: str) -> str:
    """ "auto" -> "cuda" when ONNX Runtime has the CUDA provider, else "cpu"; "cuda" without it is an error."""
    check_install()
    if device not in ("auto", "cpu", "cuda"):
        raise DeviceError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    providers = available()
    if device == "auto":
        return "cuda" if CUDA in providers else "cpu"
    if device == "cuda" and CUDA not in providers:
        build = ", ".join(installed_onnxruntimes()) or "no onnxruntime distribution"
        raise DeviceError(f"device 'cuda' asked for, but ONNX Runtime here ({build}) has only {providers}: "
                          f"{GPU_INSTALL}")
    return device


_preloaded = False


def preload_cuda_libraries() -> None:
    """Load the CUDA/cuDNN libraries of the nvidia-* pip packages (the gpu extra) before the first CUDA session,
    as onnxruntime-gpu's docs say; a no-op on CPU builds (no preload_dlls) and after the first call."""
    global _preloaded
    if not _preloaded and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    _preloaded = True


def session_providers(device: str, cuda: CudaOptions | None = None) -> list[str | tuple[str, dict[str, str]]]:
    if device == "cuda":
        return [(CUDA, (cuda or CudaOptions()).provider_options()), CPU]
    return [CPU]


def make_session(path: Path, *, device: str, intra_op_threads: int = 1,
                 cuda: CudaOptions | None = None) -> ort.InferenceSession:
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
    if device == "cuda":
        preload_cuda_libraries()
    return ort.InferenceSession(str(path), sess_options=opts, providers=session_providers(device, cuda))


def device_of(sessions: list[ort.InferenceSession]) -> str:
    """What the sessions actually run on: "cuda" only when every one got the CUDA provider first. ORT falls back
    to CPU, with only a log line, when the CUDA provider cannot load (missing libraries, no visible GPU)."""
    return "cuda" if sessions and all(s.get_providers()[0] == CUDA for s in sessions) else "cpu"


def require_device(wanted: str, sessions: dict[str, ort.InferenceSession]) -> str:
    """The sessions' actual device; an error when "cuda" was asked for and any graph did not get it."""
    got = device_of(list(sessions.values()))
    if wanted == "cuda" and got != "cuda":
        on_cpu = sorted(g for g, s in sessions.items() if s.get_providers()[0] != CUDA)
        raise DeviceError(f"device 'cuda' asked for, but ONNX Runtime could not start its CUDA provider for "
                          f"{on_cpu} (no GPU visible to this process, e.g. Ray gave it num_gpus 0, or CUDA 13/"
                          f"cuDNN 9 libraries missing): {GPU_INSTALL}")
    return got
