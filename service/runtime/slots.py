"""The decode engine's per-replica state: slot rows, their caches, and the bound decoder step.

Rows ``[0, n)`` are the live slots, kept contiguous so every step feeds ``buffer[:n]`` without a copy. Each
decoder layer has its own key and value buffers (rows, heads, capacity, head_dim) for the self-attention
cache and for the cross-attention: slicing one stacked tensor inside the graph copied it at every step
(measured: 28% of the step). Capacities grow by doubling only when a row needs more positions or a longer
source, and shrink when the long rows have gone, so a step reads only as much cache as its longest row needs.

The step runs through ONNX Runtime IO binding straight from these buffers (no copies in or out); it returns
the top-k ids and scores, the requested alignment rows and this step's keys/values, which `write_step` puts
at each row's position. On the CPU provider host memory is the device. (A CUDA version of these buffers, as
OrtValues on the GPU with the cache write done on the device, is not written yet.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

MIN_CAPACITY = 16


@dataclass
class StepOutput:
    logprobs: np.ndarray  # (n, K) sorted, best first
    ids: np.ndarray  # (n, K)
    alignment: np.ndarray  # (n, S): weighted cross-attention (zeros for rows that asked for none)


def grown(capacity: int, needed: int, limit: int) -> int:
    while capacity < needed:
        capacity *= 2
    return min(capacity, limit)


class SlotBuffers:
    """Host-side (CPU-provider) buffers for the live slots of a decoder; every capacity grows on demand."""

    def __init__(self, *, rows: int, layers: int, heads: int, head_dim: int, max_positions: int, max_source: int,
                 topk: int) -> None:
        self.layers, self.heads, self.head_dim = layers, heads, head_dim
        self.max_positions, self.max_source, self.topk = max_positions, max_source, topk
        self.rows, self.cache_len, self.src_len = 0, MIN_CAPACITY, MIN_CAPACITY
        self.cache: list[np.ndarray] = []  # k0, v0, k1, v1, ...: (rows, nh, cache_len, hs)
        self.cross: list[np.ndarray] = []  # k0, v0, k1, v1, ...: (rows, nh, src_len, hs)
        self._alloc(min(rows, MIN_CAPACITY), 0, MIN_CAPACITY, MIN_CAPACITY)

    def _alloc(self, rows: int, keep: int, cache_len: int, src_len: int) -> None:
        """(Re)allocate every buffer for ``rows`` rows and the given capacities, keeping rows [0, keep)."""
        old = {k: v for k, v in self.__dict__.items() if isinstance(v, np.ndarray | list)}
        self.rows, self.cache_len, self.src_len = rows, cache_len, src_len
        self.tokens = np.zeros(rows, np.int64)
        self.positions = np.zeros(rows, np.int64)
        self.align_weights = np.zeros((rows, self.layers, self.heads), np.float32)
        self.src_mask = np.zeros((rows, src_len), bool)
        self.out_logprobs = np.zeros((rows, self.topk), np.float32)
        self.out_ids = np.zeros((rows, self.topk), np.int64)
        self.out_alignment = np.zeros((rows, src_len), np.float32)
        self.out_kv = np.zeros((rows, self.layers, 2, self.heads, self.head_dim), np.float32)
        self.cache = [self._kv(rows, cache_len) for _ in range(2 * self.layers)]
        self.cross = [self._kv(rows, src_len) for _ in range(2 * self.layers)]
        if keep:
            for name in ("tokens", "positions", "align_weights"):
                getattr(self, name)[:keep] = old[name][:keep]
            s = min(src_len, old["src_mask"].shape[1])
            self.src_mask[:keep, :s] = old["src_mask"][:keep, :s]
            for new, prev in zip(self.cache, old["cache"], strict=True):
                c = min(cache_len, prev.shape[2])
                new[:keep, :, :c] = prev[:keep, :, :c]
            for new, prev in zip(self.cross, old["cross"], strict=True):
                new[:keep, :, :s] = prev[:keep, :, :s]

    def _kv(self, rows: int, length: int) -> np.ndarray:
        return np.zeros((rows, self.heads, length, self.head_dim), np.float32)

    def fit(self, n: int, rows_needed: int, positions_needed: int, source_needed: int) -> None:
        """Resize rows, cache and cross capacity to what the live rows need, keeping live rows ``[0, n)``."""
        rows = self._target(self.rows, rows_needed, rows_needed)
        cache_len = self._target(self.cache_len, positions_needed, self.max_positions)
        src_len = self._target(self.src_len, source_needed, self.max_source)
        if (rows, cache_len, src_len) != (self.rows, self.cache_len, self.src_len):
            self._alloc(rows, n, cache_len, src_len)

    @staticmethod
    def _target(capacity: int, needed: int, limit: int) -> int:
        if needed > capacity:
            return grown(max(capacity, 1), needed, max(limit, needed))
        while capacity > MIN_CAPACITY and needed <= capacity // 4:  # hysteresis: no resize back and forth
            capacity //= 2
        return capacity

    def write_source(self, row: int, cross: np.ndarray, length: int) -> None:
        """cross (L, 2, nh, S', hs) of one source (the encoder's layout) with ``length`` real tokens into ``row``."""
        for i, buf in enumerate(self.cross):
            buf[row, :, :length] = cross[i // 2, i % 2, :, :length]
        self.src_mask[row] = False
        self.src_mask[row, :length] = True

    def write_step(self, n: int) -> None:
        """This step's keys/values (``out_kv``) into each live row's cache at that row's position."""
        rows, pos = np.arange(n), self.positions[:n]
        for i, buf in enumerate(self.cache):
            buf[rows, :, pos] = self.out_kv[:n, i // 2, i % 2]  # (n, nh, hs)

    def move(self, dst: np.ndarray, src: np.ndarray, positions: int) -> None:
        """Rows ``src`` -> rows ``dst`` (all state; the cache up to ``positions``). Sources are read first."""
        if len(dst) == 0:
            return
        self.copy_cache(dst, src, positions)
        for buf in self.cross:
            buf[dst] = buf[src]
        for a in (self.src_mask, self.tokens, self.positions, self.align_weights):
            a[dst] = a[src]

    def copy_cache(self, dst: np.ndarray, src: np.ndarray, positions: int) -> None:
        """Beam reordering: the self-attention cache of rows ``src`` into rows ``dst`` (fancy reads copy first)."""
        for buf in self.cache:
            buf[dst, :, :positions] = buf[src, :, :positions]


class SlotStep:
    """The ``decoder_step`` graph bound to a ``SlotBuffers``: ``run(n)`` advances live rows ``[0, n)``."""

    def __init__(self, session: ort.InferenceSession, buffers: SlotBuffers) -> None:
        self.session, self.b = session, buffers
        self.binding = session.io_binding()

    def run(self, n: int) -> StepOutput:
        b, io = self.b, self.binding
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        inputs = {"tokens": b.tokens, "positions": b.positions, "src_mask": b.src_mask,
                  "align_weights": b.align_weights}
        for i in range(b.layers):
            for j, kv in enumerate("kv"):
                inputs[f"cache_{kv}{i}"] = b.cache[2 * i + j]
                inputs[f"cross_{kv}{i}"] = b.cross[2 * i + j]
        for name, a in inputs.items():
            self._bind(io.bind_input, name, a[:n])
        outputs = {"topk_logprobs": b.out_logprobs, "topk_ids": b.out_ids, "alignment": b.out_alignment,
                   "new_kv": b.out_kv}
        for name, a in outputs.items():
            self._bind(io.bind_output, name, a[:n])
        self.session.run_with_iobinding(io)
        b.write_step(n)
        return StepOutput(b.out_logprobs[:n], b.out_ids[:n], b.out_alignment[:n])

    @staticmethod
    def _bind(bind, name: str, a: np.ndarray) -> None:
        assert a.flags.c_contiguous, name  # a live-row prefix of a C-ordered buffer always is
        bind(name, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
