"""Translation over ONNX Runtime: tokenise, encode once, decode with the cached decoder step, align."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from service.runtime import attention
from service.runtime.base import ArtifactRuntime
from service.runtime.decoding import Hypothesis, Step, beam_search, greedy
from service.runtime.engine import Engine, EngineSettings, Sequence
from service.runtime.errors import InputError
from service.runtime.slots import SlotBuffers, SlotStep

MAX_BEAM = 8


@dataclass
class TranslationResult:
    text: str
    source_tokens: list[str]  # tokenizer pieces of the source, without the appended EOS
    target_tokens: list[str]  # generated pieces, without BOS/EOS
    attention: np.ndarray | None  # (len(target_tokens), len(source_tokens)), rows sum to 1
    layer: int
    heads: list[int]


class TranslatorRuntime(ArtifactRuntime):
    """Encoder and decoder-step sessions; the attention variants only run when alignment is asked for."""

    GRAPHS = ("encoder", "decoder", "decoder_attn", "decoder_step")

    def __init__(
        self, artifact_dir: Path, *, precision: str = "fp32", device: str = "auto", intra_op_threads: int = 1
    ) -> None:
        super().__init__(artifact_dir, precision=precision, device=device, intra_op_threads=intra_op_threads)
        self.tokenizer = Tokenizer.from_file(str(self.artifact_dir / (self.manifest.tokenizer or "tokenizer.json")))
        special = self.manifest.special_tokens or {}
        self.pad, self.bos, self.eos = special.get("pad", 0), special.get("bos", 1), special.get("eos", 2)
        m = self.manifest.model
        self.layers, self.heads = int(m["decoder_layers"]), int(m["heads"])
        self.max_source_tokens = int(m["max_source_tokens"])  # EOS included, as in training
        self.max_positions = int(m["max_positions"])
        self.vocab, self.head_dim = int(m["vocab"]), int(m["head_dim"])
        step_outputs = {t.name: t for t in self.manifest.graph(precision, "decoder_step").outputs}
        self.topk = int(step_outputs["topk_ids"].shape[1])

    def _source(self, text: str) -> tuple[list[int], list[str]]:
        enc = self.tokenizer.encode(text)
        n = self.max_source_tokens - 1
        return [*enc.ids[:n], self.eos], list(enc.tokens[:n])

    def source(self, text: str) -> tuple[list[int], list[str]]:
        """(ids with EOS, pieces) as the model sees them; a blank text has none: it translates to ""."""
        return ([], []) if not text.strip() else self._source(text)

    def count_source_tokens(self, text: str) -> int:
        """Source length the model sees (EOS included) before truncation, for request limits."""
        return len(self.tokenizer.encode(text).ids) + 1

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
        """-> cross_kv (L,2,N,nh,S,hs), src_mask (N,S) bool, source tokens per text."""
        sources = [self._source(t) for t in texts]
        ids = np.full((len(texts), max(len(s[0]) for s in sources)), self.pad, dtype=np.int64)
        for i, (row, _) in enumerate(sources):
            ids[i, : len(row)] = row
        (cross,) = self.sessions["encoder"].run(["cross_kv"], {"src_ids": ids})
        return cross, ids != self.pad, [s[1] for s in sources]

    def encode_ids(self, sources: list[list[int]]) -> np.ndarray:
        """Source ids (EOS included) -> cross_kv (L, 2, n, nh, S, hs), padded to the longest."""
        ids = np.full((len(sources), max(len(s) for s in sources)), self.pad, dtype=np.int64)
        for i, row in enumerate(sources):
            ids[i, : len(row)] = row
        (cross,) = self.sessions["encoder"].run(["cross_kv"], {"src_ids": ids})
        return cross

    def new_engine(self, settings: EngineSettings | None = None, *, rows: int | None = None) -> Engine:
        """A continuous-batching engine with its own slot buffers (one per replica)."""
        settings = settings or EngineSettings()
        buffers = SlotBuffers(rows=rows or settings.max_slots, layers=self.layers, heads=self.heads,
                              head_dim=self.head_dim, max_positions=self.max_positions,
                              max_source=self.max_source_tokens, topk=self.topk)
        step = SlotStep(self.sessions["decoder_step"], buffers)
        return Engine(buffers, step, self.encode_ids, bos=self.bos, eos=self.eos, vocab=self.vocab, settings=settings)

    def align_weights(self, layer: int = -1, heads: list[int] | None = None) -> tuple[np.ndarray, int, list[int]]:
        """(L, nh) weights averaging the chosen heads of one decoder layer, and the normalised layer/heads."""
        if not -self.layers <= layer < self.layers:
            raise InputError(f"attention_layer must be in [-{self.layers}, {self.layers - 1}], got {layer}")
        layer = layer % self.layers
        heads = list(range(self.heads)) if heads is None else sorted(set(heads))
        if not heads or not all(0 <= h < self.heads for h in heads):
            raise InputError(f"attention_heads must be a non-empty subset of 0..{self.heads - 1}, got {heads}")
        w = np.zeros((self.layers, self.heads), np.float32)
        w[layer, heads] = 1.0 / len(heads)
        return w, layer, heads

    def sequence(self, text: str, *, beam_size: int = 1, max_new_tokens: int = 128, length_penalty: float = 1.0,
                 return_attention: bool = False, attention_layer: int = -1,
                 attention_heads: list[int] | None = None) -> tuple[Sequence, list[str], int, list[int]]:
        """An engine sequence for one text (checked like ``translate``), its source pieces, layer and heads."""
        self._check(beam_size, max_new_tokens)
        weights, layer, heads = self.align_weights(attention_layer, attention_heads)
        ids, pieces = self.source(text)
        seq = Sequence(ids, beam_size=beam_size, max_new_tokens=max_new_tokens, length_penalty=length_penalty,
                       align=weights if return_attention else None)
        return seq, pieces, layer, heads

    def result(self, seq: Sequence, source_tokens: list[str], layer: int, heads: list[int]) -> TranslationResult:
        """A finished engine sequence -> the same result ``translate`` gives."""
        return self._result(Hypothesis(seq.tokens, seq.score, seq.attention), source_tokens, layer, heads)

    def translate_engine(
        self, texts: list[str], settings: EngineSettings | None = None, **kw
    ) -> list[TranslationResult]:
        """Translate through a private engine, all texts submitted at once (tests, eval, parity)."""
        engine = self.new_engine(settings)
        made = [self.sequence(t, **kw) for t in texts]
        for seq, *_ in made:
            engine.submit(seq)
        while not engine.idle:
            engine.iterate()
        return [self.result(seq, *rest) for seq, *rest in made]

    def _check(self, beam_size: int, max_new_tokens: int) -> None:
        if not 1 <= beam_size <= MAX_BEAM:
            raise InputError(f"beam_size must be between 1 and {MAX_BEAM}, got {beam_size}")
        if not 1 <= max_new_tokens < self.max_positions:
            raise InputError(f"max_new_tokens must be between 1 and {self.max_positions - 1}, got {max_new_tokens}")

    def step_fn(self, *, return_attention: bool, layer: int = -1, heads: list[int] | None = None) -> Step:
        """The decoder step for ``decoding``; with attention it yields the chosen layer's head-mean row."""
        heads = list(range(self.heads)) if heads is None else heads
        sess = self.sessions["decoder_attn" if return_attention else "decoder"]
        names = ["logits", "present_kv", "cross_attentions"] if return_attention else ["logits", "present_kv"]

        def step(tokens: np.ndarray, cross: np.ndarray, mask: np.ndarray, past: np.ndarray):
            out = sess.run(names, {"tgt_ids": tokens, "cross_kv": cross, "src_mask": mask, "past_kv": past})
            attn = out[2][layer][:, heads, -1].mean(axis=1) if return_attention else None  # (n, S)
            return out[0][:, -1], out[1], attn

        return step

    def translate(
        self,
        texts: list[str],
        *,
        beam_size: int = 1,
        max_new_tokens: int = 128,
        length_penalty: float = 1.0,
        return_attention: bool = False,
        attention_layer: int = -1,
        attention_heads: list[int] | None = None,
    ) -> list[TranslationResult]:
        """Translate a batch; each result equals translating that text alone (tokens exactly, floats to ~1e-6).

        Alignment rows: one per target token, the cross-attention of the step that produced it (mean over
        ``attention_heads`` of ``attention_layer``); the EOS step's row and the source EOS column are
        dropped and rows renormalised over the real source tokens.
        """
        if not texts:
            return []
        self._check(beam_size, max_new_tokens)
        _, layer, heads = self.align_weights(attention_layer, attention_heads)
        cross, mask, src_tokens = self.encode(texts)
        step = self.step_fn(return_attention=return_attention, layer=layer, heads=heads)
        kw = {"bos": self.bos, "eos": self.eos, "max_new_tokens": max_new_tokens}
        if beam_size == 1:
            hyps = greedy(step, cross, mask, **kw)
        else:
            hyps = beam_search(step, cross, mask, beam_size=beam_size, length_penalty=length_penalty, **kw)
        return [self._result(h, s, layer, heads) for h, s in zip(hyps, src_tokens, strict=True)]

    def _result(self, h: Hypothesis, source_tokens: list[str], layer: int, heads: list[int]) -> TranslationResult:
        align = None if h.attention is None else attention.alignment(h.attention, len(source_tokens))
        return TranslationResult(
            text=self.tokenizer.decode(h.tokens),
            source_tokens=source_tokens,
            target_tokens=[self.tokenizer.id_to_token(t) for t in h.tokens],
            attention=align,
            layer=layer,
            heads=heads,
        )
