"""Benchmark workers, one backend per process (``python -m bench.runtime_workers BACKEND SPEC.json``).

Each process loads only its own library: torch and ONNX Runtime/CTranslate2 sharing a process were measured
to slow each other several times (thread contention). Prints one JSON list of result rows.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def timed(run: Callable[[int], int], n_items: int, batch: int, min_seconds: float) -> dict:
    """Call ``run(start)`` on successive batches (after one warm-up) until ``min_seconds`` have passed.

    ``run`` handles ``batch`` items from ``start`` and returns the target tokens produced. Both wall time and
    this process's CPU time are kept: with one compute thread per backend, throughput per CPU-second is what
    other load on a shared machine disturbs least.
    """
    run(0)
    items = tokens = 0
    start, t0, c0 = 0, time.perf_counter(), time.process_time()
    while True:
        tokens += run(start)
        items += batch
        start = (start + batch) % max(n_items - batch + 1, 1)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            break
    cpu = time.process_time() - c0
    return {
        "items_per_s": items / elapsed,
        "tokens_per_s": tokens / elapsed if tokens else None,
        "items_per_cpu_s": items / cpu,
        "tokens_per_cpu_s": tokens / cpu if tokens else None,
        "seconds": elapsed,
        "cpu_seconds": cpu,
    }


def engine_rows(spec: dict) -> list[dict]:
    """The serving path: one `Engine` per (precision, decoding, attention), fed each batch at once and iterated
    until idle, as the translator replica's engine thread does (its slot buffers reused across batches)."""
    from service.runtime import TranslatorRuntime
    from service.runtime.engine import EngineSettings

    _, texts = load_workload(spec)
    rows = []
    for precision in spec["precisions"]:
        tr = TranslatorRuntime(spec["translator"], precision=precision, device=spec["device"],
                               intra_op_threads=spec["threads"])
        for beam in (1, 4):
            for attention in (False, True):
                for b in spec["translator_batches"]:
                    settings = EngineSettings(max_slots=max(64, b * beam), max_step_tokens=1 << 16,
                                              max_encoder_batch=b)
                    state = {"state": spec["state"]} if spec.get("state") else {}
                    engine = tr.new_engine(settings, **state)
                    steps = [0]

                    def run(s, b=b, beam=beam, attention=attention, engine=engine, steps=steps, tr=tr):
                        seqs = [tr.sequence(t, beam_size=beam, return_attention=attention)[0]
                                for t in texts[s : s + b]]
                        for seq in seqs:
                            engine.submit(seq)
                        while not engine.idle:
                            steps[0] += bool(engine.iterate().rows)
                        return sum(len(seq.tokens) for seq in seqs)

                    m = timed(run, len(texts), b, spec["min_seconds"])
                    moved = getattr(engine, "transfer_bytes", None)
                    if moved is not None and steps[0]:
                        m["bytes_per_step"] = moved / steps[0]  # host<->device at the binding, warm-up included
                    rows.append(row("translator", "engine", precision, decoding(beam), attention, b, m))
        if precision == "fp32":
            eng = tr.translate_engine(texts[: spec["sample"]])
            rows.append({"sample_tokens": [r.target_tokens for r in eng]})
    return rows


def loop_rows(spec: dict) -> list[dict]:
    """The older request-level host loop (`reference.translate`), kept as a labelled row: it no longer serves."""
    from service.runtime import TranslatorRuntime

    _, texts = load_workload(spec)
    rows = []
    for precision in spec["precisions"]:
        tr = TranslatorRuntime(spec["translator"], precision=precision, device=spec["device"],
                               intra_op_threads=spec["threads"])
        for beam in (1, 4):
            for attention in (False, True):
                for b in spec["translator_batches"]:

                    def run(s, b=b, beam=beam, attention=attention, tr=tr):
                        res = tr.translate(texts[s : s + b], beam_size=beam, return_attention=attention)
                        return sum(len(r.target_tokens) for r in res)

                    m = timed(run, len(texts), b, spec["min_seconds"])
                    rows.append(row("translator", "host loop", precision, decoding(beam), attention, b, m))
    return rows


def vit_rows(spec: dict) -> list[dict]:
    from service.runtime import ClassifierRuntime

    images, _ = load_workload(spec)
    rows = []
    for precision in spec["precisions"]:
        vit = ClassifierRuntime(spec["vit"], precision=precision, device=spec["device"],
                                intra_op_threads=spec["threads"])
        pixels = vit.normalize(images)
        for attention in (False, True):
            for b in spec["vit_batches"]:

                def run(s, b=b, attention=attention, vit=vit, pixels=pixels):
                    vit.classify(pixels[s : s + b], return_attention=attention)
                    return 0

                m = timed(run, len(pixels), b, spec["min_seconds"])
                rows.append(row("vit", "onnxruntime", precision, "-", attention, b, m))
    return rows


def torch_rows(spec: dict) -> list[dict]:
    import torch
    from tokenizers import Tokenizer

    from models.checkpoint import load_checkpoint
    from models.train_translator import MAX_LEN, pad
    from models.train_vit import normalize
    from models.translator import BOS, EOS, PAD, greedy_decode
    from service.runtime.decoding import beam_search

    if spec["device"] != "cpu":
        print("pytorch rows run on CPU only", file=sys.stderr)
        return []
    torch.set_num_threads(spec["threads"])
    torch.set_num_interop_threads(1)
    images, texts = load_workload(spec)
    rows = []
    vit, _ = load_checkpoint(Path(spec["vit_checkpoint"]))
    pixels = normalize(images)
    for attention in (False, True):
        for b in spec["vit_batches"]:

            @torch.no_grad()
            def run(s, b=b, attention=attention):
                vit(pixels[s : s + b], return_attention=attention)
                return 0

            rows.append(
                row("vit", "pytorch", "fp32", "-", attention, b, timed(run, len(pixels), b, spec["min_seconds"]))
            )
    model, _ = load_checkpoint(Path(spec["translator_checkpoint"]))
    tok = Tokenizer.from_file(str(Path(spec["translator_checkpoint"]) / "tokenizer.json"))
    ids = [e.ids[: MAX_LEN - 1] + [EOS] for e in tok.encode_batch(texts)]

    @torch.no_grad()
    def step(tokens, cross, mask, past, attention=False):
        logits, present, attn = model.decode(
            *(torch.from_numpy(np.ascontiguousarray(a)) for a in (tokens, cross, mask, past)),
            return_attention=attention,
        )
        return logits[:, -1].numpy(), present.numpy(), None if attn is None else attn[-1].mean(1)[:, -1].numpy()

    for beam in (1, 4):
        for attention in (False, True):
            for b in spec["translator_batches"]:

                @torch.no_grad()
                def run(s, b=b, beam=beam, attention=attention):
                    src = pad(ids[s : s + b])
                    if beam == 1 and not attention:  # the model's own cached greedy loop
                        return sum(len(h) for h in greedy_decode(model, src, max_new_tokens=MAX_LEN))
                    cross = model.cross_kv(model.encode(src)[0]).numpy()
                    hyps = beam_search(
                        lambda *a: step(*a, attention=attention),
                        cross,
                        (src != PAD).numpy(),
                        bos=BOS,
                        eos=EOS,
                        max_new_tokens=MAX_LEN,
                        beam_size=beam,
                    )
                    return sum(len(h.tokens) for h in hyps)

                rows.append(
                    row(
                        "translator",
                        "pytorch",
                        "fp32",
                        decoding(beam),
                        attention,
                        b,
                        timed(run, len(texts), b, spec["min_seconds"]),
                    )
                )
    return rows


def ct2_rows(spec: dict) -> list[dict]:
    import ctranslate2
    from tokenizers import Tokenizer

    from bench.ct2 import source_tokens

    _, texts = load_workload(spec)
    tok = Tokenizer.from_file(str(Path(spec["translator_checkpoint"]) / "tokenizer.json"))
    sources = source_tokens(tok, texts)
    rows = []
    device = spec["device"]
    if device == "cuda" and ctranslate2.get_cuda_device_count() == 0:
        print("ctranslate2: no CUDA device visible to its wheel; no CTranslate2 rows", file=sys.stderr)
        return []
    for precision in spec["precisions"]:
        tr = ctranslate2.Translator(
            spec["ct2_model"],
            device=device,
            compute_type={"fp32": "float32", "fp16": "float16"}.get(precision, precision),
            intra_threads=spec["threads"],
            inter_threads=1,
        )
        for beam in (1, 4):
            for attention in (False, True):
                for b in spec["translator_batches"]:

                    def run(s, b=b, beam=beam, attention=attention, tr=tr):
                        res = tr.translate_batch(
                            sources[s : s + b],
                            beam_size=beam,
                            max_decoding_length=128,
                            return_attention=attention,
                            max_batch_size=b,
                        )
                        return sum(len(r.hypotheses[0]) for r in res)

                    rows.append(
                        row(
                            "translator",
                            "ctranslate2",
                            precision,
                            decoding(beam),
                            attention,
                            b,
                            timed(run, len(texts), b, spec["min_seconds"]),
                        )
                    )
        if precision == "fp32":
            res = tr.translate_batch(sources[: spec["sample"]], beam_size=1, max_decoding_length=128)
            rows.append({"sample_tokens": [r.hypotheses[0] for r in res]})
    return rows


def decoding(beam: int) -> str:
    return "greedy" if beam == 1 else f"beam {beam}"


def row(model: str, backend: str, precision: str, dec: str, attention: bool, batch: int, m: dict) -> dict:
    return {
        "model": model,
        "backend": backend,
        "precision": precision,
        "decoding": dec,
        "attention": attention,
        "batch": batch,
        **m,
    }


def load_workload(spec: dict) -> tuple[np.ndarray, list[str]]:
    with np.load(spec["workload"]) as f:
        images = f["images"]
    return images, json.loads(Path(spec["texts"]).read_text())


WORKERS = {"engine": engine_rows, "ctranslate2": ct2_rows, "loop": loop_rows, "vit": vit_rows,
           "pytorch": torch_rows}

if __name__ == "__main__":
    backend, spec_path = sys.argv[1], sys.argv[2]
    print(json.dumps(WORKERS[backend](json.loads(Path(spec_path).read_text()))))
