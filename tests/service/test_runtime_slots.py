"""The slot graphs update device buffers in place exactly as the host (numpy) state does, in fp32 and fp16."""

from __future__ import annotations

import numpy as np
import pytest

from service.runtime.device_slots import DeviceSlots
from service.runtime.slots import SlotBuffers

L, NH, HS = 2, 3, 4


class FakeStep:
    """Just what DeviceSlots reads from the decoder step's session: its providers."""

    def get_providers(self):
        return ["CPUExecutionProvider"]

    def get_provider_options(self):
        return {"CPUExecutionProvider": {}}


def pair(dtype) -> tuple[SlotBuffers, DeviceSlots]:
    kw = dict(rows=8, layers=L, heads=NH, head_dim=HS, max_positions=64, max_source=64, topk=4, dtype=dtype)
    return SlotBuffers(**kw), DeviceSlots(step=FakeStep(), device="cpu", **kw)


def caches(b) -> list[np.ndarray]:
    return [np.asarray(v if isinstance(v, np.ndarray) else v.numpy()) for v in (*b.cache, *b.cross)]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_device_updates_equal_the_host_ones(dtype):
    """Source writes, cache writes at each row's position, beam reorders, a compaction move and a resize."""
    rng = np.random.default_rng(0)
    host, dev = pair(dtype)
    assert dev.dtype == np.dtype(dtype) and all(v.data_type() == dev.cache[0].data_type() for v in dev.cache)
    for b in (host, dev):
        b.fit(0, 6, 5, 7)
    cross = rng.standard_normal((L, 2, 3, NH, 7, HS)).astype(dtype)  # 3 sources, padded to 7
    which, rows, lengths = np.array([0, 1, 1, 2, 2, 2]), np.arange(6), np.array([3, 7, 7, 5, 5, 5])
    host.write_sources(cross, which, rows, lengths)
    from onnxruntime import OrtValue

    dev.write_sources(OrtValue.ortvalue_from_numpy(cross), which, rows, lengths)
    np.testing.assert_array_equal(host.src_mask, dev.src_mask)
    for step in range(4):  # steps write at each row's position; beams reorder; a row leaves (compaction)
        kv = rng.standard_normal((6, L, 2, NH, HS)).astype(dtype)
        host.out_kv[:6] = kv
        dev.out_kv.update_inplace(np.concatenate([kv, np.zeros((dev.rows - 6, *kv.shape[1:]), dtype)]))
        for b in (host, dev):
            b.positions[:6] = step
            b.after_step(6)
        for b in (host, dev):
            b.copy_cache(np.array([3, 4, 5]), np.array([5, 3, 4]), step + 1)
    for b in (host, dev):
        b.move(np.array([1]), np.array([5]), 4)
        b.fit(5, 5, 40, 33)  # capacities grow (positions 40 -> 64, source 33 -> 64): kept rows survive
    assert dev.cache[0].shape() == [host.rows, NH, host.cache_len, HS]
    for i, (h, d) in enumerate(zip(caches(host), caches(dev), strict=True)):
        width = 4 if i < 2 * L else 7  # positions written / source length: past them both hold no data
        np.testing.assert_array_equal(h[:5, :, :width], d[:5, :, :width])
        assert np.abs(d[:5, :, :width]).sum() > 0
