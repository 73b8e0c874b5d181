"""Quality metrics over the torch-free runtime (used by `attnserve eval` and by export's precision checks)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import sacrebleu
from tqdm import tqdm

from service.runtime import ClassifierRuntime, TranslatorRuntime
from service.runtime.engine import EngineSettings


def gate_device(precision: str) -> str:
    """Where a precision's quality gate runs: fp16 is for GPUs, so on the CUDA provider when ONNX Runtime has
    one; everything else (and fp16 without CUDA, which the CPU provider runs too, slowly) on the CPU provider."""
    return "cuda" if precision == "fp16" and "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


def provider_of(rt) -> str:
    """The provider a runtime's sessions actually run on (the first one each session was given)."""
    providers = {s.get_providers()[0] for s in rt.sessions.values()}
    return ", ".join(sorted(providers))


def translate_all(rt: TranslatorRuntime, texts: list[str], *, beam_size: int = 1, slots: int = 64) -> list[str]:
    """Translations in input order, decoded by the serving engine (all texts queued, ``slots`` rows in flight):
    ``rt.translate_engine``'s loop, with a progress bar (on a terminal only) counting finished texts."""
    engine = rt.new_engine(EngineSettings(max_slots=max(slots, beam_size)))
    made = [rt.sequence(t, beam_size=beam_size) for t in texts]
    with tqdm(total=len(made), desc="translate", unit="text", leave=False, disable=None) as bar:
        for seq, *_ in made:
            seq.on_done = lambda _: bar.update()
            engine.submit(seq)
        while not engine.idle:
            engine.iterate()
    return [rt.result(seq, *rest).text for seq, *rest in made]


def bleu_chrf(hyps: list[str], refs: list[str]) -> dict:
    """Corpus BLEU (sacrebleu's default 13a tokenizer) and chrF, one reference per sentence."""
    return {
        "bleu": round(sacrebleu.corpus_bleu(hyps, [refs]).score, 2),
        "chrf": round(sacrebleu.corpus_chrf(hyps, [refs]).score, 2),
        "n": len(hyps),
    }


def translator_metrics(rt: TranslatorRuntime, pairs: list[tuple[str, str]], *, beam_size: int = 1) -> dict:
    hyps = translate_all(rt, [en for en, _ in pairs], beam_size=beam_size)
    return bleu_chrf(hyps, [es for _, es in pairs])


def vit_accuracy(rt: ClassifierRuntime, images: np.ndarray, labels: np.ndarray, *, batch_size: int = 500,
                 flip: bool = False) -> dict:
    """Accuracy through the graph the service runs. ``flip``: test-time augmentation, the mean of the class
    probabilities of each image and its mirror image (twice the compute; not what the service serves)."""
    correct = 0
    for i in tqdm(range(0, len(images), batch_size), desc="classify", unit="batch", leave=False, disable=None):
        batch = images[i : i + batch_size]
        probs, _ = rt.predict(batch)
        if flip:
            probs = probs + rt.predict(np.ascontiguousarray(batch[..., ::-1]))[0]
        correct += int((probs.argmax(-1) == labels[i : i + batch_size]).sum())
    return {"accuracy": round(correct / len(images), 4), "n": int(len(images))}
