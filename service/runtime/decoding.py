"""Greedy and beam search over a key/value-cached decoder step, in numpy.

The decoder is reached only through ``step(tokens (n,1), cross (L,2,n,nh,S,hs), src_mask (n,S), past
(L,2,n,nh,P,hs)) -> (logits (n,V), present (L,2,n,nh,P+1,hs), attention (n,S) | None)``, so the same
search runs on any backend. Finished sentences leave the batch (their rows are dropped from the caches),
which keeps late steps cheap when lengths differ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Step = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray | None]]


@dataclass
class Hypothesis:
    tokens: list[int]  # generated ids, without BOS and EOS
    score: float  # sum of token log-probabilities (EOS included) / length ** length_penalty
    attention: np.ndarray | None  # (len(tokens), S): the step attention row that produced each token


def chosen_log_prob(logits: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """log_softmax(logits)[i, chosen[i]] without materialising the whole log-softmax."""
    m = logits.max(axis=-1)
    lse = m + np.log(np.exp(logits - m[:, None]).sum(axis=-1))
    return logits[np.arange(len(chosen)), chosen].astype(np.float64) - lse


def candidates(logits: np.ndarray, scores: np.ndarray, per_beam: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``per_beam`` best continuations of every beam: (scores + log-probs, flat index beam * V + token).

    logits (nb*k, V), scores (nb, k) -> two (nb, k * per_beam) arrays. Picking by repeated argmax over the
    raw logits (same order as the log-probs) is several times cheaper than a full log-softmax + partition
    over nb x k x V, which dominated the step time.
    """
    nb, k = scores.shape
    vocab = logits.shape[-1]
    x = logits.astype(np.float32, copy=True)
    m = x.max(axis=-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[:, 0]
    rows = np.arange(len(x))
    idx = np.zeros((len(x), per_beam), dtype=np.int64)
    val = np.full((len(x), per_beam), -np.inf)
    for r in range(min(per_beam, vocab)):
        i = x.argmax(axis=-1)  # lowest index among equals, as greedy's argmax
        idx[:, r], val[:, r] = i, x[rows, i]
        x[rows, i] = -np.inf
    cand = scores.reshape(-1, 1) + (val - lse[:, None])
    flat = idx + (rows % k)[:, None] * vocab
    return cand.reshape(nb, k * per_beam), flat.reshape(nb, k * per_beam)


def empty_past(cross: np.ndarray) -> np.ndarray:
    layers, _, n, heads, _, head_dim = cross.shape
    return np.zeros((layers, 2, n, heads, 0, head_dim), dtype=cross.dtype)


def greedy(
    step: Step, cross: np.ndarray, src_mask: np.ndarray, *, bos: int, eos: int, max_new_tokens: int
) -> list[Hypothesis]:
    """Argmax decoding of a batch; row i of the result belongs to row i of ``cross``/``src_mask``."""
    n = cross.shape[2]
    active = np.arange(n)
    tokens = np.full((n, 1), bos, dtype=np.int64)
    past = empty_past(cross)
    out: list[list[int]] = [[] for _ in range(n)]
    scores = np.zeros(n)
    rows: list[list[np.ndarray]] = [[] for _ in range(n)]
    for _ in range(max_new_tokens):
        logits, past, attn = step(tokens, cross, src_mask, past)
        nxt = logits.argmax(axis=-1)
        logp = chosen_log_prob(logits, nxt)
        for j, i in enumerate(active):
            out[i].append(int(nxt[j]))
            scores[i] += logp[j]
            if attn is not None:
                rows[i].append(attn[j])
        live = nxt != eos
        if not live.any():
            break
        if not live.all():  # drop finished rows from every per-row array
            active, nxt, past = active[live], nxt[live], past[:, :, live]
            cross, src_mask = cross[:, :, live], src_mask[live]
        tokens = nxt[:, None].astype(np.int64)
    hyps = []
    for i in range(n):
        toks = out[i][: out[i].index(eos)] if eos in out[i] else out[i]
        attn_i = np.stack(rows[i])[: len(toks)] if rows[i] else None  # the EOS step's row is dropped
        hyps.append(Hypothesis(toks, float(scores[i]) / max(len(out[i]), 1), attn_i))
    return hyps


def beam_search(
    step: Step,
    cross: np.ndarray,
    src_mask: np.ndarray,
    *,
    bos: int,
    eos: int,
    max_new_tokens: int,
    beam_size: int,
    length_penalty: float = 1.0,
) -> list[Hypothesis]:
    """Beam search of a batch: ``beam_size`` live hypotheses per sentence, the key/value cache reordered by beam.

    A hypothesis ending in EOS is finished with score logp_sum / steps ** length_penalty (steps counts the
    EOS). Only EOS candidates ranked within the top ``beam_size`` finish a hypothesis; a sentence stops once
    it has ``beam_size`` finished ones (or at ``max_new_tokens``, when its live beams count as finished).
    With ``beam_size=1`` this is greedy decoding.
    """
    k = beam_size
    n, src_len = cross.shape[2], src_mask.shape[1]
    cross, src_mask = np.repeat(cross, k, axis=2), np.repeat(src_mask, k, axis=0)  # row b*k + j = beam j of b
    past = empty_past(cross)
    active = np.arange(n)  # sentence of each live group of k rows
    scores = np.full((n, k), -np.inf)
    scores[:, 0] = 0.0  # first step: expand beam 0 only (all beams are the same BOS)
    seqs = np.zeros((n, k, 0), dtype=np.int64)
    hist = np.zeros((n, k, 0, src_len), dtype=np.float32)
    with_attn = False
    tokens = np.full((n * k, 1), bos, dtype=np.int64)
    finished: list[list[tuple[float, list[int], np.ndarray | None]]] = [[] for _ in range(n)]
    for t in range(max_new_tokens):
        logits, past, attn = step(tokens, cross, src_mask, past)
        with_attn = attn is not None
        nb, vocab = len(active), logits.shape[-1]
        cand, flat = candidates(logits, scores, 2 * k)  # (nb, k * 2k): enough to hold the best 2k
        order = np.lexsort((flat, -cand), axis=-1)  # best first; ties: lowest index, as argmax
        src_beam = np.zeros((nb, k), dtype=np.int64)
        new_tok = np.full((nb, k), eos, dtype=np.int64)
        new_score = np.full((nb, k), -np.inf)
        last = t == max_new_tokens - 1
        keep = np.ones(nb, dtype=bool)
        for b in range(nb):
            filled = 0
            for rank, j in enumerate(order[b]):
                c = cand[b, j]
                beam, tok = divmod(int(flat[b, j]), vocab)
                if not np.isfinite(c):
                    break
                if tok == eos:
                    if rank < k:
                        row = b * k + beam
                        a = np.concatenate([hist[b, beam], attn[row : row + 1]]) if with_attn else None
                        finished[active[b]].append((c / (t + 1) ** length_penalty, seqs[b, beam].tolist(), a))
                    continue
                src_beam[b, filled], new_tok[b, filled], new_score[b, filled] = beam, tok, c
                filled += 1
                if filled == k:
                    break
            if last:  # out of steps: live beams count as finished
                for j in range(filled):
                    beam = src_beam[b, j]
                    row = b * k + beam
                    a = np.concatenate([hist[b, beam], attn[row : row + 1]]) if with_attn else None
                    toks = [*seqs[b, beam].tolist(), int(new_tok[b, j])]
                    finished[active[b]].append((new_score[b, j] / (t + 1) ** length_penalty, toks, a))
            if len(finished[active[b]]) >= k or filled == 0:
                keep[b] = False
        if last or not keep.any():
            break
        rows = (np.arange(nb)[:, None] * k + src_beam).reshape(-1)  # reorder caches by beam
        seqs = np.concatenate([seqs[np.arange(nb)[:, None], src_beam], new_tok[:, :, None]], axis=2)
        if with_attn:
            step_rows = attn[rows].reshape(nb, k, 1, -1)
            hist = np.concatenate([hist[np.arange(nb)[:, None], src_beam], step_rows], axis=2)
        past, scores = past[:, :, rows], new_score
        if not keep.all():
            flat_keep = np.repeat(keep, k)
            active, seqs, scores, past = active[keep], seqs[keep], scores[keep], past[:, :, flat_keep]
            hist = hist[keep] if with_attn else hist
            cross, src_mask = cross[:, :, flat_keep], src_mask[flat_keep]
            new_tok = new_tok[keep]
        tokens = new_tok.reshape(-1, 1)
    hyps = []
    for fin in finished:
        score, toks, a = max(fin, key=lambda f: f[0])  # max keeps the first of equal scores
        hyps.append(Hypothesis(toks, float(score), None if a is None else a[: len(toks)]))
    return hyps
