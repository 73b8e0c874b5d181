"""Decode state resident on the sessions' device: caches and cross keys/values as ``OrtValue``s there.

Allocated by the replica once (and again only when a capacity changes), bound to the decoder step by pointer
through IO binding, and updated in place by the small graphs of `slot_graphs` run on the same provider: the
cache write after each step, the beam reorder and compaction (row moves), the encoder -> cross copy at
admission, and the resize. What crosses between host and device per step: token ids and positions in, top-k
ids and scores out, and the alignment rows only when a live row asked for them. The source mask and the
alignment weights live on the device too and are uploaded only when admission or compaction changed them.

On the CPU provider the same code runs with ``device="cpu"`` buffers (what CI exercises); on CUDA the buffers
are CUDA memory and nothing else changes.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from service.runtime import slot_graphs
from service.runtime.slots import SlotBuffers


class DeviceSlots(SlotBuffers):
    def __init__(self, *, step: ort.InferenceSession, device: str = "cpu", device_id: int = 0, **kw) -> None:
        self.device, self.device_id = device, device_id
        self.providers = [(p, step.get_provider_options().get(p, {})) for p in step.get_providers()]
        dtype = kw["dtype"]
        layers, heads, head_dim = kw["layers"], kw["heads"], kw["head_dim"]
        self._write_kv = self._session(slot_graphs.write_kv(layers, heads, head_dim, dtype))
        self._write_source = self._session(slot_graphs.write_source(layers, heads, head_dim, dtype))
        self._resize = self._session(slot_graphs.resize(dtype))
        kv = ["rows", heads, "len", head_dim]
        caches = [(n, dtype, kv) for n in slot_graphs.kv_names(layers, "cache")]
        crosses = [(n, dtype, kv) for n in slot_graphs.kv_names(layers, "cross")]
        self._move_cache = self._session(slot_graphs.move_rows(caches))
        self._move_all = self._session(slot_graphs.move_rows(caches + crosses))
        self._dirty = True
        self._kv_bound: tuple | None = None
        self._alive: list[np.ndarray] = []  # host arrays bound by address until their graph has run
        super().__init__(**kw)

    def _session(self, model: bytes) -> tuple[ort.InferenceSession, ort.IOBinding]:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1  # memory moves: one thread, no spinning
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        sess = ort.InferenceSession(model, sess_options=opts, providers=self.providers)
        return sess, sess.io_binding()

    # -- memory --------------------------------------------------------------------------------------------
    def _zeros(self, shape: tuple[int, ...], dtype) -> ort.OrtValue:
        """A zeroed device buffer (masked cache positions must hold finite values: 0 x NaN is NaN)."""
        return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), self.device, self.device_id)

    def _empty(self, shape: tuple[int, ...], dtype) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.device, self.device_id)

    def _alloc_state(self, rows: int, keep: int, cache_len: int, src_len: int) -> None:
        old_cache, old_cross = self.cache, self.cross
        nh, hs, t = self.heads, self.head_dim, self.dtype
        self.out_kv = self._empty((rows, self.layers, 2, nh, hs), t)
        self.dev_mask = self._empty((rows, src_len), np.bool_)
        self.dev_align = self._empty((rows, self.layers, nh), self.align_dtype)
        self.dev_alignment = self._empty((rows, src_len), np.float32)  # the alignment output nobody reads
        self._dirty = True
        if not keep:
            self.cache = [self._zeros((rows, nh, cache_len, hs), t) for _ in range(2 * self.layers)]
            self.cross = [self._zeros((rows, nh, src_len, hs), t) for _ in range(2 * self.layers)]
            return
        self.cache = [self._resized(v, keep, rows, cache_len) for v in old_cache]
        self.cross = [self._resized(v, keep, rows, src_len) for v in old_cross]

    def _resized(self, old: ort.OrtValue, keep: int, rows: int, length: int) -> ort.OrtValue:
        """Rows [0, keep) and positions [0, min(old, new)) of ``old`` in a new (rows, nh, length, hs) buffer."""
        n = min(length, old.shape()[2])
        new = self._empty((rows, self.heads, length, self.head_dim), self.dtype)
        sess, io = self._resize
        self._bind_value(io.bind_input, "old", old, old.shape())
        self._host(io.bind_input, "ends", np.array([keep, self.heads, n, self.head_dim], np.int64))
        self._host(io.bind_input, "pads", np.array([0, 0, 0, 0, rows - keep, 0, length - n, 0], np.int64))
        self._bind_value(io.bind_output, "new", new, new.shape())
        self._run(sess, io)
        return new

    # -- state updates on the device -----------------------------------------------------------------------
    def encode(self, encoder: ort.InferenceSession, ids: np.ndarray) -> ort.OrtValue:
        """The encoder with its output left on the device (only the source ids go in)."""
        io = encoder.io_binding()
        self._host(io.bind_input, "src_ids", ids)
        io.bind_output("cross_kv", self.device, self.device_id)
        encoder.run_with_iobinding(io)
        self._alive.clear()
        return io.get_outputs()[0]

    def write_sources(self, cross: ort.OrtValue, which: np.ndarray, rows: np.ndarray, lengths: np.ndarray) -> None:
        sess, io = self._write_source
        self._bind_state(io, self.cross, "cross")
        self._bind_value(io.bind_input, "cross_kv", cross, cross.shape())
        self._host(io.bind_input, "which", which.astype(np.int64))
        self._host(io.bind_input, "rows", rows.astype(np.int64))
        self._run(sess, io)
        self.src_mask[rows] = np.arange(self.src_len) < lengths[:, None]
        self._dirty = True

    def _move_state(self, dst: np.ndarray, src: np.ndarray, positions: int, *, cross: bool) -> None:
        sess, io = self._move_all if cross else self._move_cache
        self._bind_state(io, self.cache, "cache")
        if cross:
            self._bind_state(io, self.cross, "cross")
        self._host(io.bind_input, "src", src.astype(np.int64))
        self._host(io.bind_input, "dst", dst.astype(np.int64))
        self._run(sess, io)
        self._dirty = self._dirty or cross  # compaction moved the mask and weights of the host mirror

    def after_step(self, n: int) -> None:
        sess, io = self._write_kv
        key = (n, self.generation)
        if key != self._kv_bound:  # by address, as the step's bindings: valid until rows or buffers change
            io.clear_binding_inputs()
            io.clear_binding_outputs()
            self._bind_state(io, self.cache, "cache")
            self._bind_value(io.bind_input, "new_kv", self.out_kv, (n, *self.out_kv.shape()[1:]))
            self.bind_host(io.bind_input, "positions", self.positions[:n])
            self._kv_bound = key
        else:
            self.transfer_bytes += self.positions[:n].nbytes
        sess.run_with_iobinding(io)

    def _bind_state(self, io: ort.IOBinding, values: list[ort.OrtValue], kind: str) -> None:
        """Each buffer as input and, at the same address, as its own output: ScatterND updates it in place."""
        for name, v in zip(slot_graphs.kv_names(self.layers, kind), values, strict=True):
            self._bind_value(io.bind_input, name, v, v.shape())
            self._bind_value(io.bind_output, f"out_{name}", v, v.shape())

    # -- the step's bindings -------------------------------------------------------------------------------
    def before_step(self, n: int) -> None:
        if self._dirty:  # admission or compaction changed them: one upload, then they stay on the device
            self.dev_mask.update_inplace(self.src_mask)
            self.dev_align.update_inplace(self.align_weights)
            self.transfer_bytes += self.src_mask.nbytes + self.align_weights.nbytes
            self._dirty = False

    def bind_inputs(self, io: ort.IOBinding, n: int) -> None:
        self.bind_host(io.bind_input, "tokens", self.tokens[:n])  # persistent host buffers, bound by address
        self.bind_host(io.bind_input, "positions", self.positions[:n])
        self._bind_value(io.bind_input, "src_mask", self.dev_mask, (n, self.src_len))
        self._bind_value(io.bind_input, "align_weights", self.dev_align, (n, self.layers, self.heads))
        for i in range(self.layers):
            for j, kv in enumerate("kv"):
                c, x = self.cache[2 * i + j], self.cross[2 * i + j]
                self._bind_value(io.bind_input, f"cache_{kv}{i}", c, (n, *c.shape()[1:]))
                self._bind_value(io.bind_input, f"cross_{kv}{i}", x, (n, *x.shape()[1:]))

    def bind_outputs(self, io: ort.IOBinding, n: int, alignment: bool) -> None:
        self.bind_host(io.bind_output, "topk_logprobs", self.out_logprobs[:n])
        self.bind_host(io.bind_output, "topk_ids", self.out_ids[:n])
        if alignment:
            self.bind_host(io.bind_output, "alignment", self.out_alignment[:n])
        else:
            self._bind_value(io.bind_output, "alignment", self.dev_alignment, (n, self.src_len))
        self._bind_value(io.bind_output, "new_kv", self.out_kv, (n, *self.out_kv.shape()[1:]))

    # -- binding helpers -----------------------------------------------------------------------------------
    def _bind_value(self, bind, name: str, v: ort.OrtValue, shape) -> None:
        """A (leading-rows prefix of a) device buffer, by address: nothing is copied."""
        bind(name, self.device, self.device_id, ORT_NP[v.data_type()], list(shape), v.data_ptr())

    def _host(self, bind, name: str, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a)
        self._alive.append(a)
        self.bind_host(bind, name, a)

    def _run(self, sess: ort.InferenceSession, io: ort.IOBinding) -> None:
        sess.run_with_iobinding(io)
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        self._alive.clear()


ORT_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
          "tensor(bool)": np.bool_, "tensor(double)": np.float64}
