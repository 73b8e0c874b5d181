"""Quality metrics over the torch-free runtime (used by `attnserve eval` and by export's precision checks)."""

from __future__ import annotations

import numpy as np
import sacrebleu

from service.runtime import ClassifierRuntime, TranslatorRuntime


def translate_all(rt: TranslatorRuntime, texts: list[str], *, beam_size: int = 1, batch_size: int = 64) -> list[str]:
    """Translations in input order; batches are formed from length-sorted texts to limit padding."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = [""] * len(texts)
    for b in range(0, len(order), batch_size):
        chunk = order[b : b + batch_size]
        for i, r in zip(chunk, rt.translate([texts[i] for i in chunk], beam_size=beam_size), strict=True):
            out[i] = r.text
    return out


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


def vit_accuracy(rt: ClassifierRuntime, images: np.ndarray, labels: np.ndarray, *, batch_size: int = 500) -> dict:
    correct = 0
    for i in range(0, len(images), batch_size):
        probs = rt.classify(rt.normalize(images[i : i + batch_size])).probs
        correct += int((probs.argmax(-1) == labels[i : i + batch_size]).sum())
    return {"accuracy": round(correct / len(images), 4), "n": int(len(images))}
