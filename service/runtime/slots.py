"""The decode engine's per-replica state: fixed slot rows, their caches, and the bound decoder step.

Rows ``[0, n)`` are the live slots, kept contiguous so every step feeds ``buffer[:n]`` without a copy. The
self-attention cache and the cross-attention keys/values grow in capacity (doubling) only when a row needs
more positions or a longer source, and shrink again when the long rows have gone: a step reads only as
much cache as the longest live row needs, not the API's maximum.

The step runs through ONNX Runtime IO binding: inputs are bound from these buffers, ``cache_out`` is bound
to the same memory as ``cache`` (the graph's scatter writes each row's new keys/values in place), and only
the top-k ids and scores (and the requested alignment rows) come back. On the CPU provider host memory is
the device. (A CUDA version of these buffers, as OrtValues on the GPU, is not written yet.)
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
        self.rows = 0
        self.cache = self.cross = np.zeros((0, layers, 2, heads, MIN_CAPACITY, head_dim), np.float32)
        self.src_mask = np.zeros((0, MIN_CAPACITY), bool)
        self._alloc(min(rows, MIN_CAPACITY), 0, MIN_CAPACITY, MIN_CAPACITY)

    def _alloc(self, rows: int, keep: int, cache_len: int, src_len: int) -> None:
        """(Re)allocate every buffer for ``rows`` rows and the given capacities, keeping rows [0, keep)."""
        old = self.__dict__.copy()
        self.rows = rows
        self.tokens = np.zeros(rows, np.int64)
        self.positions = np.zeros(rows, np.int64)
        self.align_weights = np.zeros((rows, self.layers, self.heads), np.float32)
        self.out_logprobs = np.zeros((rows, self.topk), np.float32)
        self.out_ids = np.zeros((rows, self.topk), np.int64)
        self.cache = self._kv(rows, cache_len)
        self.cross = self._kv(rows, src_len)
        self.src_mask = np.zeros((rows, src_len), bool)
        self.out_alignment = np.zeros((rows, src_len), np.float32)
        if keep:
            for name in ("tokens", "positions", "align_weights"):
                getattr(self, name)[:keep] = old[name][:keep]
            c, s = min(cache_len, old["cache"].shape[4]), min(src_len, old["cross"].shape[4])
            self.cache[:keep, ..., :c, :] = old["cache"][:keep, ..., :c, :]
            self.cross[:keep, ..., :s, :] = old["cross"][:keep, ..., :s, :]
            self.src_mask[:keep, :s] = old["src_mask"][:keep, :s]

    def _kv(self, rows: int, length: int) -> np.ndarray:
        return np.zeros((rows, self.layers, 2, self.heads, length, self.head_dim), np.float32)

    @property
    def cache_len(self) -> int:
        return self.cache.shape[4]

    @property
    def src_len(self) -> int:
        return self.cross.shape[4]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.cache, self.cross, self.src_mask, self.out_alignment))

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
        """cross (L, 2, nh, S', hs) of one source with ``length`` real tokens into ``row``."""
        self.cross[row, ..., :length, :] = cross[..., :length, :]
        self.src_mask[row] = False
        self.src_mask[row, :length] = True

    def move(self, dst: np.ndarray, src: np.ndarray, positions: int) -> None:
        """Rows ``src`` -> rows ``dst`` (all state; the cache up to ``positions``). Sources are read first."""
        if len(dst) == 0:
            return
        self.cache[dst, ..., :positions, :] = self.cache[src, ..., :positions, :]
        for a in (self.cross, self.src_mask, self.tokens, self.positions, self.align_weights):
            a[dst] = a[src]

    def copy_cache(self, dst: np.ndarray, src: np.ndarray, positions: int) -> None:
        """Beam reordering: the self-attention cache of rows ``src`` into rows ``dst`` (fancy reads copy first)."""
        self.cache[dst, ..., :positions, :] = self.cache[src, ..., :positions, :]


class SlotStep:
    """The ``decoder_step`` graph bound to a ``SlotBuffers``: ``run(n)`` advances live rows ``[0, n)``."""

    def __init__(self, session: ort.InferenceSession, buffers: SlotBuffers) -> None:
        self.session, self.b = session, buffers
        self.binding = session.io_binding()

    def run(self, n: int) -> StepOutput:
        b, io = self.b, self.binding
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        self._bind(io.bind_input, "tokens", b.tokens[:n])
        self._bind(io.bind_input, "positions", b.positions[:n])
        self._bind(io.bind_input, "cache", b.cache[:n])
        self._bind(io.bind_input, "cross_kv", b.cross[:n])
        self._bind(io.bind_input, "src_mask", b.src_mask[:n])
        self._bind(io.bind_input, "align_weights", b.align_weights[:n])
        self._bind(io.bind_output, "cache_out", b.cache[:n])  # same memory as "cache": updated in place
        self._bind(io.bind_output, "topk_logprobs", b.out_logprobs[:n])
        self._bind(io.bind_output, "topk_ids", b.out_ids[:n])
        self._bind(io.bind_output, "alignment", b.out_alignment[:n])
        self.session.run_with_iobinding(io)
        return StepOutput(b.out_logprobs[:n], b.out_ids[:n], b.out_alignment[:n])

    @staticmethod
    def _bind(bind, name: str, a: np.ndarray) -> None:
        assert a.flags.c_contiguous, name  # a live-row prefix of a C-ordered buffer always is
        bind(name, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
