"""Translation over ONNX Runtime: tokenise, encode once, decode with the cached decoder step, align."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from service.runtime import attention, reference
from service.runtime.base import ArtifactRuntime
from service.runtime.decoding import Hypothesis, Step
from service.runtime.device_slots import DeviceSlots
from service.runtime.engine import Engine, EngineSettings, Sequence
from service.runtime.errors import InputError
from service.runtime.sessions import CudaOptions
from service.runtime.slots import SlotBuffers, SlotStep, input_dtypes

MAX_BEAM = 8
CPU_STATE = "host"  # on the CPU provider: the faster decode state there (bench runtime --state)


def device_id(session) -> int:
    return int(session.get_provider_options().get("CUDAExecutionProvider", {}).get("device_id", 0))


@dataclass
class TranslationResult:
    text: str
    source_tokens: list[str]  # tokenizer pieces of the source, without the appended EOS
    target_tokens: list[str]  # generated pieces, without BOS/EOS
    attention: np.ndarray | None  # (len(target_tokens), len(source_tokens)), rows sum to 1
    layers: list[int]  # decoder layers and heads averaged into `attention`
    heads: list[int]
    encoder_attention: np.ndarray | None = None  # (len(source_tokens),) * 2 encoder self-attention, rows sum to 1
    encoder_layers: list[int] = field(default_factory=list)
    encoder_heads: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Choices:
    """A text's attention choices: the alignment's decoder layers/heads and the encoder map's (each checked,
    also when its map is not asked for, so a request is valid or not whatever its flags)."""

    align: attention.Choice
    encoder: attention.Choice
    return_attention: bool = False
    return_encoder_attention: bool = False


class TranslatorRuntime(ArtifactRuntime):
    """Encoder and decoder-step sessions; the attention variants only run when attention is asked for."""

    GRAPHS = ("encoder", "encoder_attn", "decoder_step")  # what serving runs, loaded at start
    REFERENCE_GRAPHS = ("decoder", "decoder_attn")  # the request-level path's: loaded on first use

    def __init__(
        self, artifact_dir: Path, *, precision: str = "fp32", device: str = "auto", intra_op_threads: int = 1,
        cuda: CudaOptions | None = None,
    ) -> None:
        super().__init__(artifact_dir, precision=precision, device=device, intra_op_threads=intra_op_threads,
                         cuda=cuda)
        self.sessions = reference.LazySessions(self, self.REFERENCE_GRAPHS, intra_op_threads)
        self.tokenizer = Tokenizer.from_file(str(self.artifact_dir / (self.manifest.tokenizer or "tokenizer.json")))
        special = self.manifest.special_tokens or {}
        self.pad, self.bos, self.eos = special.get("pad", 0), special.get("bos", 1), special.get("eos", 2)
        m = self.manifest.model
        self.layers, self.heads = int(m["decoder_layers"]), int(m["heads"])
        self.encoder_layers = int(m["encoder_layers"])
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
        cross, _ = self.encode_ids([s[0] for s in sources])
        ids_mask = np.zeros((len(texts), cross.shape[4]), bool)
        for i, (row, _) in enumerate(sources):
            ids_mask[i, : len(row)] = True
        return cross, ids_mask, [s[1] for s in sources]

    def encode_ids(self, sources: list[list[int]], attention: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Source ids (EOS included) -> cross_kv (L, 2, n, nh, S, hs), padded to the longest, and with
        ``attention`` the encoder's self-attention (L_enc, n, nh, S, S) from the `encoder_attn` graph."""
        ids = np.full((len(sources), max(len(s) for s in sources)), self.pad, dtype=np.int64)
        for i, row in enumerate(sources):
            ids[i, : len(row)] = row
        if attention:
            cross, attn = self.sessions["encoder_attn"].run(["cross_kv", "encoder_attentions"], {"src_ids": ids})
            return cross, attn
        (cross,) = self.sessions["encoder"].run(["cross_kv"], {"src_ids": ids})
        return cross, None

    def new_engine(self, settings: EngineSettings | None = None, *, rows: int | None = None,
                   state: str | None = None) -> Engine:
        """A continuous-batching engine with its own slot buffers (one per replica). ``state``: "device" keeps
        the caches as OrtValues on the sessions' device (`DeviceSlots`), "host" as numpy (`SlotBuffers`);
        None: device on CUDA, and on CPU the faster of the two there (``CPU_STATE``)."""
        settings = settings or EngineSettings()
        state = state or ("device" if self.device == "cuda" else CPU_STATE)
        if state not in ("host", "device"):
            raise ValueError(f"state must be 'host' or 'device', got {state!r}")
        step = self.sessions["decoder_step"]
        types = input_dtypes(step)  # the graph's cache type: fp16 graphs get fp16 caches
        kw = dict(rows=rows or settings.max_slots, layers=self.layers, heads=self.heads, head_dim=self.head_dim,
                  max_positions=self.max_positions, max_source=self.max_source_tokens, topk=self.topk,
                  dtype=types["cache_k0"], align_dtype=types["align_weights"])
        if state == "device":
            buffers = DeviceSlots(step=step, device=self.device, device_id=device_id(step), **kw)
        else:
            buffers = SlotBuffers(**kw)
        slot_step = SlotStep(step, buffers, self.sessions["encoder"], self.pad)
        return Engine(buffers, slot_step, self.encode_ids, bos=self.bos, eos=self.eos, vocab=self.vocab,
                      settings=settings)

    def choices(self, *, return_attention: bool = False, attention_layers: list[int] | None = None,
                attention_heads: list[int] | None = None, return_encoder_attention: bool = False,
                encoder_attention_layers: list[int] | None = None,
                encoder_attention_heads: list[int] | None = None) -> Choices:
        """Both maps' layers and heads, checked against this model's (InputError naming the field and range)."""
        align = attention.choose(attention_layers, attention_heads, self.layers, self.heads, what="decoder layers")
        encoder = attention.choose(encoder_attention_layers, encoder_attention_heads, self.encoder_layers,
                                   self.heads, what="encoder layers",
                                   fields=("encoder_attention_layers", "encoder_attention_heads"))
        return Choices(align, encoder, return_attention, return_encoder_attention)

    def sequence(self, text: str, *, beam_size: int = 1, max_new_tokens: int = 128, length_penalty: float = 1.0,
                 **attention_kw) -> tuple[Sequence, list[str], Choices]:
        """An engine sequence for one text (checked like ``translate``; ``attention_kw`` as ``choices``), its
        source pieces and its attention choices."""
        self._check(beam_size, max_new_tokens)
        c = self.choices(**attention_kw)
        ids, pieces = self.source(text)
        seq = Sequence(ids, beam_size=beam_size, max_new_tokens=max_new_tokens, length_penalty=length_penalty,
                       align=c.align.weights if c.return_attention else None,
                       encoder_align=c.encoder.weights if c.return_encoder_attention else None)
        return seq, pieces, c

    def result(self, seq: Sequence, source_tokens: list[str], choices: Choices) -> TranslationResult:
        """A finished engine sequence -> the same result ``translate`` gives."""
        return self._result(Hypothesis(seq.tokens, seq.score, seq.attention), source_tokens, choices,
                            seq.encoder_attention)

    def translate_engine(
        self, texts: list[str], settings: EngineSettings | None = None, *, state: str | None = None, **kw
    ) -> list[TranslationResult]:
        """Translate through a private engine, all texts submitted at once (tests, eval, parity)."""
        engine = self.new_engine(settings, state=state)
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

    def step_fn(self, *, return_attention: bool, weights: np.ndarray | None = None) -> Step:
        """The request-level decoder step (`reference.step_fn`): export's parity checks and eval use it."""
        return reference.step_fn(self, return_attention=return_attention, weights=weights)

    def translate(self, texts: list[str], **kw) -> list[TranslationResult]:
        """The older request-level host loop (`reference.translate`): parity, eval and bench; serving runs the
        engine. Each result equals translating that text alone."""
        return reference.translate(self, texts, **kw)

    def _result(self, h: Hypothesis, source_tokens: list[str], c: Choices,
                encoder: np.ndarray | None = None) -> TranslationResult:
        n = len(source_tokens)
        align = None if h.attention is None else attention.alignment(h.attention, n)
        return TranslationResult(
            text=self.tokenizer.decode(h.tokens),
            source_tokens=source_tokens,
            target_tokens=[self.tokenizer.id_to_token(t) for t in h.tokens],
            attention=align,
            layers=c.align.layers,
            heads=c.align.heads,
            encoder_attention=None if encoder is None else attention.self_attention(encoder, n),
            encoder_layers=c.encoder.layers,
            encoder_heads=c.encoder.heads,
        )
