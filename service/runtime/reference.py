"""The non-serving decode paths: what export's parity checks, eval and the benchmarks run, never a replica.

Serving runs the continuous-batching engine over the `decoder_step` graph (and the classifier's `classify*`
graphs). The request-level path here decodes a whole batch with the host-side search of `decoding` over the
`decoder`/`decoder_attn` graphs (the decoder fed its past keys/values); the ViT's `vit`/`vit_attn` graphs give
every layer's raw maps. Their sessions are made on first use (`LazySessions`), so a replica never loads them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from service.runtime import attention
from service.runtime.decoding import Step, beam_search, greedy
from service.runtime.sessions import make_session

if TYPE_CHECKING:
    import onnxruntime as ort

    from service.runtime.base import ArtifactRuntime
    from service.runtime.translator import TranslationResult, TranslatorRuntime


class LazySessions(dict):
    """A runtime's sessions by graph name: the serving graphs made at start, the reference ones on first use."""

    def __init__(self, rt: ArtifactRuntime, reference: tuple[str, ...], intra_op_threads: int) -> None:
        super().__init__(rt.sessions)
        self.rt, self.reference, self.threads = rt, reference, intra_op_threads

    def __missing__(self, graph: str) -> ort.InferenceSession:
        if graph not in self.reference:
            raise KeyError(graph)
        rt = self.rt
        path = rt.artifact_dir / rt.manifest.graph(rt.precision, graph).file
        self[graph] = session = make_session(path, device=rt.device, intra_op_threads=self.threads,
                                             cuda=rt.cuda_options)
        return session


def step_fn(rt: TranslatorRuntime, *, return_attention: bool, weights: np.ndarray | None = None) -> Step:
    """The decoder step for ``decoding``; with attention it yields each row's cross-attention weighted over
    layers x heads by ``weights`` (L, nh) (a ``Choice``'s; default: the last layer's head mean)."""
    if weights is None:
        weights = attention.choose(None, None, rt.layers, rt.heads).weights
    sess = rt.sessions["decoder_attn" if return_attention else "decoder"]
    names = ["logits", "present_kv", "cross_attentions"] if return_attention else ["logits", "present_kv"]

    def step(tokens: np.ndarray, cross: np.ndarray, mask: np.ndarray, past: np.ndarray):
        out = sess.run(names, {"tgt_ids": tokens, "cross_kv": cross, "src_mask": mask, "past_kv": past})
        attn = np.einsum("lh,lnhs->ns", weights, out[2][:, :, :, -1]) if return_attention else None  # (n, S)
        return out[0][:, -1], out[1], attn

    return step


def translate(
    rt: TranslatorRuntime,
    texts: list[str],
    *,
    beam_size: int = 1,
    max_new_tokens: int = 128,
    length_penalty: float = 1.0,
    **attention_kw,
) -> list[TranslationResult]:
    """Translate a batch; each result equals translating that text alone (tokens exactly, floats to ~1e-6).

    ``attention_kw`` as ``TranslatorRuntime.choices``. Alignment rows: one per target token, the
    cross-attention of the step that produced it (mean over ``attention_heads`` of ``attention_layers``); the
    EOS step's row and the source EOS column are dropped and rows renormalised over the real source tokens.
    The encoder map: the encoder self-attention (mean over its chosen layers and heads), source EOS row and
    column dropped, rows renormalised.
    """
    if not texts:
        return []
    rt._check(beam_size, max_new_tokens)
    c = rt.choices(**attention_kw)
    sources = [rt._source(t) for t in texts]
    cross, _ = rt.encode_ids([s[0] for s in sources])
    # The map from the attention graph; the decoder keeps the plain graph's keys/values (as the engine does).
    enc = rt.encode_ids([s[0] for s in sources], attention=True)[1] if c.return_encoder_attention else None
    mask = np.zeros((len(texts), cross.shape[4]), bool)
    for i, (row, _) in enumerate(sources):
        mask[i, : len(row)] = True
    step = step_fn(rt, return_attention=c.return_attention, weights=c.align.weights)
    kw = {"bos": rt.bos, "eos": rt.eos, "max_new_tokens": max_new_tokens}
    if beam_size == 1:
        hyps = greedy(step, cross, mask, **kw)
    else:
        hyps = beam_search(step, cross, mask, beam_size=beam_size, length_penalty=length_penalty, **kw)
    out = []
    for i, (h, (ids, pieces)) in enumerate(zip(hyps, sources, strict=True)):
        e = None if enc is None else attention.weighted(enc[:, i, :, : len(ids), : len(ids)], c.encoder.weights)
        out.append(rt._result(h, pieces, c, e))
    return out
