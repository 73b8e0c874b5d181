"""The decode engine's per-replica state: slot rows, their caches, and the bound decoder step.

Rows ``[0, n)`` are the live slots, kept contiguous so every step feeds ``buffer[:n]`` without a copy. Each
decoder layer has its own key and value buffers (rows, heads, capacity, head_dim) for the self-attention
cache and for the cross-attention: slicing one stacked tensor inside the graph copied it at every step
(measured: 28% of the step). Capacities grow by doubling only when a row needs more positions or a longer
source, and shrink when the long rows have gone, so a step reads only as much cache as its longest row needs.

Two homes for the caches and cross keys/values, one interface:
- ``SlotBuffers`` (host): numpy arrays, bound to the step as CPU memory; the cache write, beam reorder and
  compaction are numpy. On the CPU provider host memory is the device.
- ``DeviceSlots`` (service/runtime/device_slots.py): ``OrtValue``s on the sessions' device, updated there by
  small graphs; per step only token ids and positions go in and top-k ids/scores (and alignment rows when
  asked) come out. Runs on the CPU provider too (device ``cpu``), so CI exercises it.

The small per-row state (tokens, positions, alignment weights, source mask) always has a host mirror that the
engine writes. ``transfer_bytes`` counts the bytes bound as host memory to a graph, i.e. what crosses between
host and device on an accelerator (on the CPU provider it is what would).

The cache dtype is the graph's (``tensor(float16)`` graphs get float16 caches), read from its input types.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

MIN_CAPACITY = 16
ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(bool)": np.bool_}


@dataclass
class StepOutput:
    logprobs: np.ndarray  # (n, K) sorted, best first
    ids: np.ndarray  # (n, K)
    alignment: np.ndarray | None  # (n, S): weighted cross-attention (None when no live row asked for it)


def grown(capacity: int, needed: int, limit: int) -> int:
    while capacity < needed:
        capacity *= 2
    return min(capacity, limit)


def input_dtypes(session: ort.InferenceSession) -> dict[str, np.dtype]:
    return {i.name: np.dtype(ORT_TYPES[i.type]) for i in session.get_inputs()}


class SlotBuffers:
    """Host-side (numpy) buffers for the live slots of a decoder; every capacity grows on demand."""

    device = "cpu"

    def __init__(self, *, rows: int, layers: int, heads: int, head_dim: int, max_positions: int, max_source: int,
                 topk: int, dtype=np.float32, align_dtype=np.float32) -> None:
        self.layers, self.heads, self.head_dim = layers, heads, head_dim
        self.max_positions, self.max_source, self.topk = max_positions, max_source, topk
        self.dtype, self.align_dtype = np.dtype(dtype), np.dtype(align_dtype)
        self.rows, self.cache_len, self.src_len = 0, MIN_CAPACITY, MIN_CAPACITY
        self.transfer_bytes = 0  # host<->device bytes at the bindings (see the module doc)
        self.cache: list = []  # k0, v0, k1, v1, ...: (rows, nh, cache_len, hs)
        self.cross: list = []  # k0, v0, k1, v1, ...: (rows, nh, src_len, hs)
        self._alloc(min(rows, MIN_CAPACITY), 0, MIN_CAPACITY, MIN_CAPACITY)

    # -- capacity ------------------------------------------------------------------------------------------
    def _alloc(self, rows: int, keep: int, cache_len: int, src_len: int) -> None:
        """(Re)allocate every buffer for ``rows`` rows and the given capacities, keeping rows [0, keep)."""
        old = {k: v for k, v in self.__dict__.items() if isinstance(v, np.ndarray)}
        self.rows, self.cache_len, self.src_len = rows, cache_len, src_len
        self.generation = getattr(self, "generation", 0) + 1  # bindings by address are stale after this
        self.tokens = np.zeros(rows, np.int64)
        self.positions = np.zeros(rows, np.int64)
        self.align_weights = np.zeros((rows, self.layers, self.heads), self.align_dtype)
        self.src_mask = np.zeros((rows, src_len), bool)
        self.out_logprobs = np.zeros((rows, self.topk), np.float32)
        self.out_ids = np.zeros((rows, self.topk), np.int64)
        self.out_alignment = np.zeros((rows, src_len), np.float32)
        if keep:
            for name in ("tokens", "positions", "align_weights"):
                getattr(self, name)[:keep] = old[name][:keep]
            s = min(src_len, old["src_mask"].shape[1])
            self.src_mask[:keep, :s] = old["src_mask"][:keep, :s]
        self._alloc_state(rows, keep, cache_len, src_len)

    def _alloc_state(self, rows: int, keep: int, cache_len: int, src_len: int) -> None:
        old_cache, old_cross = self.cache, self.cross
        self.out_kv = np.zeros((rows, self.layers, 2, self.heads, self.head_dim), self.dtype)
        self.cache = [self._kv(rows, cache_len) for _ in range(2 * self.layers)]
        self.cross = [self._kv(rows, src_len) for _ in range(2 * self.layers)]
        if keep:
            for new, prev in zip(self.cache, old_cache, strict=True):
                c = min(cache_len, prev.shape[2])
                new[:keep, :, :c] = prev[:keep, :, :c]
            for new, prev in zip(self.cross, old_cross, strict=True):
                s = min(src_len, prev.shape[2])
                new[:keep, :, :s] = prev[:keep, :, :s]

    def _kv(self, rows: int, length: int) -> np.ndarray:
        return np.zeros((rows, self.heads, length, self.head_dim), self.dtype)

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

    # -- state updates -------------------------------------------------------------------------------------
    def write_sources(self, cross, which: np.ndarray, rows: np.ndarray, lengths: np.ndarray) -> None:
        """The encoder's output ``cross`` (L, 2, b, nh, S', hs) into ``rows``: row rows[i] decodes source
        which[i], whose real length is lengths[i]."""
        s = cross.shape[4]
        block = len(rows) == cross.shape[2] and (np.diff(rows) == 1).all() and (which == np.arange(len(rows))).all()
        for i, buf in enumerate(self.cross):  # past s: stale values, masked
            if block:  # the engine's case: a plain block copy (fancy indexing measured ~10% of int8 engine CPU)
                buf[rows[0] : rows[0] + len(rows), :, :s] = cross[i // 2, i % 2]
            else:
                buf[rows, :, :s] = cross[i // 2, i % 2][which]
        self.src_mask[rows] = np.arange(self.src_len) < lengths[:, None]

    def write_step(self, n: int) -> None:
        """This step's keys/values (``out_kv``) into each live row's cache at that row's position."""
        rows, pos = np.arange(n), self.positions[:n]
        for i, buf in enumerate(self.cache):
            buf[rows, :, pos] = self.out_kv[:n, i // 2, i % 2]  # (n, nh, hs)

    def move(self, dst: np.ndarray, src: np.ndarray, positions: int) -> None:
        """Rows ``src`` -> rows ``dst`` (all state; the cache up to ``positions``). Sources are read first."""
        if len(dst) == 0:
            return
        self._move_state(dst, src, positions, cross=True)
        for a in (self.src_mask, self.tokens, self.positions, self.align_weights):
            a[dst] = a[src]

    def copy_cache(self, dst: np.ndarray, src: np.ndarray, positions: int) -> None:
        """Beam reordering: the self-attention cache of rows ``src`` into rows ``dst`` (sources read first);
        rows that keep their own beam are not touched."""
        moved = dst != src
        if moved.any():
            self._move_state(dst[moved], src[moved], positions, cross=False)

    def _move_state(self, dst: np.ndarray, src: np.ndarray, positions: int, *, cross: bool) -> None:
        for buf in self.cache:
            buf[dst, :, :positions] = buf[src, :, :positions]  # fancy reads copy first
        for buf in self.cross if cross else ():
            buf[dst] = buf[src]

    # -- the step's bindings -------------------------------------------------------------------------------
    def bind_inputs(self, io: ort.IOBinding, n: int) -> None:
        inputs = {"tokens": self.tokens, "positions": self.positions, "src_mask": self.src_mask,
                  "align_weights": self.align_weights}
        for i in range(self.layers):
            for j, kv in enumerate("kv"):
                inputs[f"cache_{kv}{i}"] = self.cache[2 * i + j]
                inputs[f"cross_{kv}{i}"] = self.cross[2 * i + j]
        for name, a in inputs.items():
            self.bind_host(io.bind_input, name, a[:n])

    def bind_outputs(self, io: ort.IOBinding, n: int, alignment: bool) -> None:
        for name, a in (("topk_logprobs", self.out_logprobs), ("topk_ids", self.out_ids),
                        ("alignment", self.out_alignment), ("new_kv", self.out_kv)):
            self.bind_host(io.bind_output, name, a[:n])

    def before_step(self, n: int) -> None:
        """State the host changed since the last step, to the device (nothing here: host memory is bound)."""

    def after_step(self, n: int) -> None:
        self.write_step(n)

    def bind_host(self, bind, name: str, a: np.ndarray) -> None:
        """Host memory to a graph: what crosses to the device (counted)."""
        assert a.flags.c_contiguous, name  # a live-row prefix of a C-ordered buffer always is
        bind(name, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
        self.transfer_bytes += a.nbytes


class SlotStep:
    """The ``decoder_step`` graph bound to slot buffers: ``run(n)`` advances live rows ``[0, n)``; ``encode``
    runs the encoder for new sources, its output left where the buffers' ``write_sources`` reads it."""

    def __init__(self, session: ort.InferenceSession, buffers: SlotBuffers, encoder: ort.InferenceSession,
                 pad: int) -> None:
        self.session, self.b, self.encoder, self.pad = session, buffers, encoder, pad
        self.binding = session.io_binding()
        self._bound: tuple | None = None
        self._step_bytes = 0

    def encode(self, sources: list[list[int]]):
        ids = np.full((len(sources), max(len(s) for s in sources)), self.pad, dtype=np.int64)
        for i, row in enumerate(sources):
            ids[i, : len(row)] = row
        return self.b.encode(self.encoder, ids) if hasattr(self.b, "encode") else self._encode_host(ids)

    def _encode_host(self, ids: np.ndarray) -> np.ndarray:
        (cross,) = self.encoder.run(["cross_kv"], {"src_ids": ids})
        self.b.transfer_bytes += ids.nbytes + cross.nbytes
        return cross

    def run(self, n: int, alignment: bool = True) -> StepOutput:
        """Bindings are by address, so they stay valid while the rows, the alignment choice and the buffers
        (``generation``) do: rebinding ~30 names every step cost ~0.5 ms of Python at 32 rows."""
        b, io = self.b, self.binding
        b.before_step(n)
        key = (n, alignment, b.generation)
        if key != self._bound:
            io.clear_binding_inputs()
            io.clear_binding_outputs()
            before = b.transfer_bytes
            b.bind_inputs(io, n)
            b.bind_outputs(io, n, alignment)
            self._bound, self._step_bytes = key, b.transfer_bytes - before
        else:
            b.transfer_bytes += self._step_bytes  # the same host memory crosses again
        self.session.run_with_iobinding(io)
        b.after_step(n)
        return StepOutput(b.out_logprobs[:n], b.out_ids[:n], b.out_alignment[:n] if alignment else None)
