"""The translator's part of the export: parity inputs, greedy-token parity, manifest fields, BLEU per precision."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from export.metrics import gate_device, provider_of, translator_metrics
from export.parity import Mismatch, token_parity
from export.samples import TRANSLATOR_CASES, random_inputs
from export.specs import GraphSpec
from models.data import data_root, spa_eng_splits
from models.train_translator import MAX_LEN, pad
from models.translator import BOS, EOS, PAD, UNK, Translator, greedy_decode
from service.runtime import TranslatorRuntime
from service.runtime.decoding import greedy

TASK = "translation"


def test_pairs() -> list[tuple[str, str]] | None:
    if not (data_root() / "spa-eng" / "spa.txt").exists():
        return None
    return spa_eng_splits()["test"]


def spread(items: list, n: int) -> list:
    """n items evenly spaced over the list: the split is sorted by length, so its head is all short."""
    if n >= len(items):
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, n).astype(int)]


def source_ids(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids[: MAX_LEN - 1] + [EOS] for e in tok.encode_batch(texts)]


def random_cases(spec: GraphSpec, dims: dict) -> dict[str, dict[str, np.ndarray]]:
    return {f"random_{k}": random_inputs(spec, dims, s, seed=i) for i, (k, s) in enumerate(TRANSLATOR_CASES.items())}


@torch.no_grad()
def real_cases(spec: GraphSpec, model: Translator, snap: Path) -> dict[str, dict[str, np.ndarray]]:
    """Real test sentences: the encoder on them; the decoder teacher-forced with an empty past, then one
    cached step on top of that past."""
    pairs = test_pairs()
    if pairs is None:
        return {}
    tok = Tokenizer.from_file(str(snap / "tokenizer.json"))
    pairs = spread(pairs, 4)
    src = pad(source_ids(tok, [en for en, _ in pairs]))
    if spec.name.startswith("encoder"):
        return {
            "test_batch4": {"src_ids": src.numpy()},
            "test_batch1": {"src_ids": src[2:3, : int((src[2] != PAD).sum())].numpy()},
        }
    cross = model.cross_kv(model.encode(src)[0])
    mask = src != PAD
    tgt = torch.tensor([[BOS, *(e.ids + [UNK] * 3)[:3]] for e in tok.encode_batch([es for _, es in pairs])])
    empty = torch.zeros(cross.size(0), 2, len(pairs), cross.size(3), 0, cross.size(5))
    _, present, _ = model.decode(tgt, cross, mask, empty)
    if spec.name == "decoder_step":
        return {"test_slots4_positions": slot_case(model, tgt, cross, mask, present)}
    nxt = tgt[:, -1:]
    cases = {
        "test_batch4_tgt4_past0": (tgt, cross, mask, empty),
        "test_batch4_tgt1_past4": (nxt, cross, mask, present),
        "test_batch1_tgt1_past0": (tgt[1:2, :1], cross[:, :, 1:2], mask[1:2], empty[:, :, 1:2]),
    }
    names = ("tgt_ids", "cross_kv", "src_mask", "past_kv")
    return {k: {n: t.contiguous().numpy() for n, t in zip(names, v, strict=True)} for k, v in cases.items()}


def slot_case(model: Translator, tgt, cross, mask, present) -> dict[str, np.ndarray]:
    """Real sentences as engine slots at different positions: row i continues after 4 - i teacher-forced
    tokens (its cache holds them; later cache entries are stale on purpose), weights on the last layer."""
    n, past, layers = tgt.size(0), present.size(4), present.size(0)
    positions = torch.tensor([max(past - i, 0) for i in range(n)])
    align = torch.zeros(n, layers, cross.size(3))
    align[:, -1] = 1.0 / cross.size(3)
    feeds = {"tokens": tgt[torch.arange(n), positions.clamp(max=tgt.size(1) - 1)], "positions": positions,
             "src_mask": mask, "align_weights": align}
    for i in range(layers):
        for j, kv in enumerate("kv"):
            cache = torch.zeros(n, present.size(3), past + 2, present.size(5))
            cache[:, :, :past] = present[i, j]
            feeds[f"cache_{kv}{i}"] = cache
            feeds[f"cross_{kv}{i}"] = cross[i, j]
    return {k: v.contiguous().numpy() for k, v in feeds.items()}


@torch.no_grad()
def calibration(spec: GraphSpec, model: Translator, snap: Path, dims: dict) -> tuple[list[dict[str, np.ndarray]], str]:
    """Feeds of ``spec``'s graph for int8 calibration, and where they came from: 256 valid-split pairs in
    batches of 32, the decoders teacher-forced on the reference (empty past, then one cached token), the slot
    step with every row at a random position of its reference. Random inputs without the data."""
    pairs = spa_eng_splits()["valid"] if test_pairs() is not None else None
    if pairs is None:
        return [feeds for feeds in random_cases(spec, dims).values()], "random inputs (no spa-eng data)"
    tok = Tokenizer.from_file(str(snap / "tokenizer.json"))
    rng = np.random.default_rng(0)
    pairs, out = spread(pairs, 256), []
    for b in range(0, len(pairs), 32):
        batch = pairs[b : b + 32]
        src = pad(source_ids(tok, [en for en, _ in batch]))
        if spec.name.startswith("encoder"):
            out.append({"src_ids": src.numpy()})
            continue
        rows = [[BOS, *e.ids[: MAX_LEN - 2]] for e in tok.encode_batch([es for _, es in batch])]
        tgt, mask = pad(rows), src != PAD
        cross = model.cross_kv(model.encode(src)[0])
        empty = torch.zeros(cross.size(0), 2, len(batch), cross.size(3), 0, cross.size(5))
        _, present, _ = model.decode(tgt, cross, mask, empty)
        if spec.name == "decoder_step":
            out.append(step_feeds(tgt, cross, mask, present, [int(rng.integers(0, len(r))) for r in rows]))
            continue
        k = int(rng.integers(1, tgt.size(1)))
        for feeds in ((tgt, cross, mask, empty), (tgt[:, k : k + 1], cross, mask, present[..., :k, :])):
            out.append({n: t.contiguous().numpy() for n, t in zip(("tgt_ids", "cross_kv", "src_mask", "past_kv"),
                                                                 feeds, strict=True)})
    return out, f"spa-eng valid split: {len(pairs)} pairs, {len(out)} batches"


def step_feeds(tgt, cross, mask, present, positions: list[int]) -> dict[str, np.ndarray]:
    """Slot-step inputs: row i at ``positions[i]`` of its teacher-forced target, its cache holding the targets
    before it; alignment asked on half the rows (the last layer's head mean)."""
    n, layers = tgt.size(0), cross.size(0)
    pos = torch.tensor(positions)
    align = torch.zeros(n, layers, cross.size(3))
    align[::2, -1] = 1.0 / cross.size(3)
    feeds = {"tokens": tgt[torch.arange(n), pos], "positions": pos, "src_mask": mask, "align_weights": align}
    for i in range(layers):
        for j, kv in enumerate("kv"):
            feeds[f"cache_{kv}{i}"] = present[i, j][:, :, : int(pos.max()) + 1]
            feeds[f"cross_{kv}{i}"] = cross[i, j]
    return {k: v.contiguous().numpy() for k, v in feeds.items()}


def manifest_extra(meta: dict, cfg, snap: Path, work: Path) -> dict:
    shutil.copy2(snap / "tokenizer.json", work / "tokenizer.json")
    return {
        "model": {
            "encoder_layers": cfg.encoder_layers,
            "decoder_layers": cfg.decoder_layers,
            "heads": cfg.heads,
            "head_dim": cfg.dim // cfg.heads,
            "dim": cfg.dim,
            "vocab": cfg.vocab_size,
            "max_positions": cfg.max_positions,
            "max_source_tokens": MAX_LEN,
        },
        "tokenizer": "tokenizer.json",
        "special_tokens": {"pad": PAD, "bos": BOS, "eos": EOS, "unk": UNK},
        "preprocessing": {"source": "tokenizer.json encode, truncated to max_source_tokens - 1, then EOS appended"},
    }


@torch.no_grad()
def decode_parity(model: Translator, snap: Path, partial: Path, opts) -> tuple[dict | None, list[Mismatch]]:
    """Greedy tokens: torch (models.translator.greedy_decode) vs the ORT runtime, on spread test sentences.

    ``partial``: the export's ``manifest.partial.json``; the runtime loads the unfinished folder through it.

    The fast and the attention decoder graphs, and the engine's slot step (all sentences in flight together,
    half of them with alignment), must agree with torch exactly.
    """
    pairs = test_pairs()
    if pairs is None:
        return {"skipped": f"no spa-eng data under {data_root()}"}, []
    tok = Tokenizer.from_file(str(snap / "tokenizer.json"))
    texts = [en for en, _ in spread(pairs, opts.greedy_sentences)]
    ids = source_ids(tok, texts)
    torch_tokens: list[list[int]] = []
    for b in range(0, len(ids), 32):
        torch_tokens += greedy_decode(model, pad(ids[b : b + 32]), max_new_tokens=MAX_LEN)
    rt = TranslatorRuntime(partial, device="cpu")
    result, bad = {}, []
    for attention in (False, True):
        ort_tokens: list[list[int]] = []
        for b in range(0, len(texts), 32):
            cross, mask, _ = rt.encode(texts[b : b + 32])
            step = rt.step_fn(return_attention=attention)
            hyps = greedy(step, cross, mask, bos=BOS, eos=EOS, max_new_tokens=MAX_LEN)
            ort_tokens += [h.tokens for h in hyps]
        name = "decoder_attn" if attention else "decoder"
        result[name], mism = token_parity(torch_tokens, ort_tokens)
        bad += [Mismatch(name, m.case, m.output, m.detail) for m in mism]
    # The serving engine: every sentence submitted at once, with and without alignment in the same steps.
    made = [rt.sequence(t, max_new_tokens=MAX_LEN, return_attention=i % 2 == 1) for i, t in enumerate(texts)]
    engine = rt.new_engine()
    for seq, *_ in made:
        engine.submit(seq)
    while not engine.idle:
        engine.iterate()
    engine_tokens = [seq.tokens for seq, *_ in made]
    result["decoder_step"], mism = token_parity(torch_tokens, engine_tokens)
    bad += [Mismatch("decoder_step", m.case, m.output, m.detail) for m in mism]
    return result, bad


def quality(partial: Path, opts) -> dict:
    """Greedy BLEU/chrF on the test split for every precision through the serving engine, change vs fp32;
    fp16 on the CUDA provider where there is one, else on the CPU provider (``gate_device``).

    ``partial``: the export's ``manifest.partial.json`` (see decode_parity)."""
    pairs = test_pairs()
    if pairs is None:
        return {"skipped": f"no spa-eng data under {data_root()}"}
    pairs = spread(pairs, opts.quality_limit) if opts.quality_limit else pairs
    out: dict = {"split": "spa-eng test (SPLIT.md)", "metric": "bleu", "decoding": "greedy"}
    from export.build import precisions_in

    for p in precisions_in(partial):
        try:
            rt = TranslatorRuntime(partial, precision=p, device=gate_device(p))
            out[p] = translator_metrics(rt, pairs)
            out[p]["measured_with"] = provider_of(rt)
        except Exception as e:  # e.g. fp16 kernels missing on CPU: record it rather than guess
            out[p] = {"measured": False, "reason": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        if p != "fp32" and "bleu" in out.get("fp32", {}):
            out[p]["delta_bleu"] = round(out[p]["bleu"] - out["fp32"]["bleu"], 2)
    return out
