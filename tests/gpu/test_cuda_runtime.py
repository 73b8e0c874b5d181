"""The runtime on the CUDA provider: the tokens the CPU decodes, fp16 within its gate, little host traffic.

Written against the runtime's public API (TranslatorRuntime / ClassifierRuntime, the engine through
`translate_engine` and `new_engine`), so it holds whatever the engine keeps on the device.
"""

from __future__ import annotations

import numpy as np
import pytest
from traffic import count_host_traffic

from service.runtime import ClassifierRuntime, TranslatorRuntime
from service.runtime.engine import EngineSettings

pytestmark = pytest.mark.gpu

FP16_BLEU_GATE = 0.2  # BLEU points fp16 may lose against fp32, both on CUDA
FP16_VIT_GATE = 0.002  # accuracy (0.2 points)
MAX_STEP_BYTES = 64 * 1024  # host<->device bytes per decoder step at 32 rows
ROWS = 32
TEST_SENTENCES = 200  # of the translator's test split, for token equality (every one must match)


@pytest.fixture(scope="module")
def cpu(translator_dir) -> TranslatorRuntime:
    return TranslatorRuntime(translator_dir, device="cpu")


@pytest.fixture(scope="module")
def cuda(translator_dir) -> TranslatorRuntime:
    rt = TranslatorRuntime(translator_dir, device="cuda")
    assert rt.device == "cuda" and all(p[0] == "CUDAExecutionProvider" for p in rt.providers.values()), rt.providers
    return rt


@pytest.mark.parametrize("beam,attention", [(1, False), (4, False), (1, True)])
def test_engine_tokens_on_cuda_fp32_equal_the_cpus(cpu, cuda, test_pairs, beam, attention) -> None:
    texts = [en for en, _ in test_pairs[:TEST_SENTENCES]]
    settings = EngineSettings(max_slots=64)
    on_cpu = cpu.translate_engine(texts, settings, beam_size=beam, return_attention=attention)
    on_cuda = cuda.translate_engine(texts, settings, beam_size=beam, return_attention=attention)
    differ = [(t, a.target_tokens, b.target_tokens) for t, a, b in zip(texts, on_cpu, on_cuda, strict=True)
              if a.target_tokens != b.target_tokens]
    assert not differ, f"{len(differ)} of {len(texts)} differ, e.g. {differ[:3]}"
    if attention:
        for a, b in zip(on_cpu, on_cuda, strict=True):
            np.testing.assert_allclose(a.attention, b.attention, atol=1e-3)


def test_fp16_translator_within_its_gate_on_cuda(translator_dir, cuda, test_pairs) -> None:
    from export.metrics import translator_metrics

    if "fp16" not in cuda.manifest.graphs:
        pytest.fail("no fp16 graphs in the artifact: export them (attnserve export --precision fp32,fp16)")
    fp16 = TranslatorRuntime(translator_dir, device="cuda", precision="fp16")
    assert fp16.device == "cuda"
    full, half = translator_metrics(cuda, test_pairs), translator_metrics(fp16, test_pairs)
    print(f"BLEU on CUDA over {full['n']} test pairs: fp32 {full['bleu']}, fp16 {half['bleu']}")
    assert half["bleu"] >= full["bleu"] - FP16_BLEU_GATE, (full, half)


def test_fp16_vit_within_its_gate_on_cuda(classifier_dir, shared_data) -> None:
    from export.metrics import vit_accuracy
    from models.data import fashion_mnist

    images, labels = fashion_mnist("test", shared_data / "fashion-mnist")
    fp32 = ClassifierRuntime(classifier_dir, device="cuda")
    if "fp16" not in fp32.manifest.graphs:
        pytest.fail("no fp16 graphs in the artifact: export them (attnserve export --precision fp32,fp16)")
    fp16 = ClassifierRuntime(classifier_dir, device="cuda", precision="fp16")
    assert fp32.device == fp16.device == "cuda"
    full, half = vit_accuracy(fp32, images, labels), vit_accuracy(fp16, images, labels)
    print(f"ViT accuracy on CUDA over {full['n']} test images: fp32 {full['accuracy']}, fp16 {half['accuracy']}")
    assert half["accuracy"] >= full["accuracy"] - FP16_VIT_GATE, (full, half)


def step_traffic(rt: TranslatorRuntime, texts: list[str], monkeypatch, *, steps: int = 6,
                 state: str | None = None) -> list[int]:
    """Host<->device bytes of each engine iteration (every session's runs) once ``ROWS`` greedy texts are live.

    The counter starts before the engine exists, so it knows every binding the engine keeps across steps."""
    with count_host_traffic(monkeypatch) as traffic:
        engine = rt.new_engine(EngineSettings(max_slots=ROWS, max_encoder_batch=ROWS), state=state)
        for text in texts[:ROWS]:
            seq, *_ = rt.sequence(text, max_new_tokens=steps + 8)
            engine.submit(seq)
        engine.iterate()  # admission: the 32 sources are encoded and written once
        per_step = []
        for _ in range(steps):
            before = traffic.total()
            stats = engine.iterate()
            per_step.append(traffic.total() - before)
            assert stats.rows == ROWS and not stats.admitted, "a step without all rows live, or an admission"
    return per_step


def test_host_device_traffic_per_decoder_step_is_bounded(cuda, test_pairs, monkeypatch) -> None:
    long = [en for en, _ in test_pairs if len(en) > 40]
    per_step = step_traffic(cuda, long, monkeypatch)
    print(f"host<->device bytes per engine iteration at {ROWS} rows (all sessions): {per_step}")
    assert all(0 < b < MAX_STEP_BYTES for b in per_step), per_step
