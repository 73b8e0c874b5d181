"""The byte counter the GPU traffic test relies on, checked where it can be: on the CPU provider (runs in CI)."""

from __future__ import annotations

import numpy as np
from traffic import count_host_traffic

from service.runtime import ClassifierRuntime


def test_counter_sees_exactly_what_a_bound_run_moves(classifier_dir, monkeypatch) -> None:
    rt = ClassifierRuntime(classifier_dir, device="cpu")
    images = np.zeros((32, rt.image_size, rt.image_size), np.uint8)
    with count_host_traffic(monkeypatch) as traffic:
        rt.predict(images)
        rt.predict(images[:5], rollout=True)
    assert traffic.of(rt.sessions["classify"]) == [32 * 28 * 28 + 32 * rt.classes * 4]  # uint8 in, float32 out
    assert traffic.of(rt.sessions["classify_rollout"]) == [5 * 28 * 28 + 5 * rt.classes * 4 + 5 * 7 * 7 * 4]
    assert traffic.of(rt.sessions["vit"]) == []


def test_counter_sees_plain_runs_and_device_ortvalues(translator_dir, monkeypatch) -> None:
    import onnxruntime as ort

    from service.runtime import TranslatorRuntime

    rt = TranslatorRuntime(translator_dir, device="cpu")
    ids = np.array([[5, 6, 7, 2]], np.int64)
    with count_host_traffic(monkeypatch) as traffic:
        (cross,) = rt.sessions["encoder"].run(["cross_kv"], {"src_ids": ids})
        io = rt.sessions["encoder"].io_binding()
        io.bind_ortvalue_input("src_ids", ort.OrtValue.ortvalue_from_numpy(ids))
        out = np.empty_like(cross)  # kept alive while bound
        io.bind_output("cross_kv", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        rt.sessions["encoder"].run_with_iobinding(io)
    assert traffic.of(rt.sessions["encoder"]) == [ids.nbytes + cross.nbytes] * 2
    np.testing.assert_array_equal(out, cross)
