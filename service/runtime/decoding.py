"""Greedy and beam search over a key/value-cached decoder step, in numpy.

The decoder is reached only through ``step(tokens (n,1), cross (L,2,n,nh,S,hs), src_mask (n,S), past
(L,2,n,nh,P,hs)) -> (logits (n,V), present (L,2,n,nh,P+1,hs), attention (n,S) | None)``, so the same
search runs on any backend. Finished sentences leave the batch (their rows are dropped from the caches),
which keeps late steps cheap when lengths differ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

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


@dataclass
class Beams:
    """One sentence's beam search, whatever computes its steps: ``decoding.beam_search`` (a batch of sentences
    on a host-side step) and the serving engine (its slots) both advance it with ``advance``."""

    seqs: np.ndarray  # (k, t) token ids of the live hypotheses
    scores: np.ndarray  # (k,) their log-probability sums
    hist: np.ndarray | None  # (k, t, S) the attention row that produced each token; None: not asked
    finished: list[tuple[float, list[int], np.ndarray | None]] = field(default_factory=list)

    @classmethod
    def start(cls, k: int, width: int | None) -> Beams:
        scores = np.full(k, -np.inf)
        scores[0] = 0.0  # all beams start as the same BOS: expand one
        hist = None if width is None else np.zeros((k, 0, width), np.float32)
        return cls(np.zeros((k, 0), np.int64), scores, hist)

    def best(self) -> Hypothesis:
        score, toks, a = max(self.finished, key=lambda f: f[0])  # max keeps the first of equal scores
        return Hypothesis(toks, float(score), None if a is None else a[: len(toks)])

    def _row(self, beam: int, attn: np.ndarray | None) -> np.ndarray | None:
        return None if self.hist is None else np.concatenate([self.hist[beam], attn[beam : beam + 1]])


def advance(bm: Beams, cand: np.ndarray, flat: np.ndarray, attn: np.ndarray | None, *, vocab: int, eos: int,
            step: int, last: bool, length_penalty: float) -> tuple[np.ndarray, np.ndarray] | None:
    """One step of one sentence: candidates ``cand`` (scores + log-probs) of ``flat`` (beam * vocab + token),
    this step's attention rows ``attn`` (k, S) or None. Returns (source beam, new token) per live hypothesis,
    for the caller to reorder its cache by, or None when the sentence is done (``bm.best()``).

    A hypothesis ending in EOS is finished with score logp_sum / steps ** length_penalty (steps counts the
    EOS). Only EOS candidates ranked within the top k finish a hypothesis; a sentence stops once it has k
    finished ones (or at the last step, when its live beams count as finished). Beams that were not refilled
    keep -inf scores and never expand.
    """
    k = len(bm.scores)
    order = np.lexsort((flat, -cand))  # best first; ties: lowest (beam, token), as argmax
    src_beam, new_tok, new_score = np.zeros(k, np.int64), np.full(k, eos, np.int64), np.full(k, -np.inf)
    filled = 0
    for rank, j in enumerate(order):
        c = cand[j]
        if not np.isfinite(c):
            break
        beam, tok = divmod(int(flat[j]), vocab)
        if tok == eos:
            if rank < k:
                bm.finished.append((c / (step + 1) ** length_penalty, bm.seqs[beam].tolist(), bm._row(beam, attn)))
            continue
        src_beam[filled], new_tok[filled], new_score[filled] = beam, tok, c
        filled += 1
        if filled == k:
            break
    if last:  # out of steps: live beams count as finished
        for j in range(filled):
            toks = [*bm.seqs[src_beam[j]].tolist(), int(new_tok[j])]
            bm.finished.append((new_score[j] / (step + 1) ** length_penalty, toks, bm._row(src_beam[j], attn)))
    if last or filled == 0 or len(bm.finished) >= k:
        return None
    bm.seqs = np.concatenate([bm.seqs[src_beam], new_tok[:, None]], axis=1)
    if bm.hist is not None:
        bm.hist = np.concatenate([bm.hist[src_beam], attn[src_beam][:, None]], axis=1)
    bm.scores = new_score
    return src_beam, new_tok


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
    """Beam search of a batch (``advance`` per sentence): ``beam_size`` live hypotheses per sentence, the
    key/value cache reordered by beam; finished sentences leave the batch. With ``beam_size=1`` this is greedy
    decoding."""
    k = beam_size
    n = cross.shape[2]
    cross, src_mask = np.repeat(cross, k, axis=2), np.repeat(src_mask, k, axis=0)  # row b*k + j = beam j of b
    past = empty_past(cross)
    active = list(range(n))  # the sentence of each live group of k rows
    beams: list[Beams] = []
    results: list[Hypothesis | None] = [None] * n
    tokens = np.full((n * k, 1), bos, dtype=np.int64)
    for t in range(max_new_tokens):
        logits, past, attn = step(tokens, cross, src_mask, past)
        if not beams:
            beams = [Beams.start(k, None if attn is None else src_mask.shape[1]) for _ in range(n)]
        scores = np.stack([beams[i].scores for i in active])
        cand, flat = candidates(logits, scores, 2 * k)  # (nb, k * 2k): enough to hold the best 2k
        keep, rows, toks = [], [], []
        for b, i in enumerate(active):
            moved = advance(beams[i], cand[b], flat[b], None if attn is None else attn[b * k : (b + 1) * k],
                            vocab=logits.shape[-1], eos=eos, step=t, last=t == max_new_tokens - 1,
                            length_penalty=length_penalty)
            if moved is None:
                results[i] = beams[i].best()
                continue
            keep.append(b)
            rows.append(b * k + moved[0])
            toks.append(moved[1])
        if not keep:
            break
        past = past[:, :, np.concatenate(rows)]  # reorder caches by beam, finished sentences dropped
        groups = (np.array(keep)[:, None] * k + np.arange(k)).reshape(-1)
        cross, src_mask = cross[:, :, groups], src_mask[groups]
        active = [active[b] for b in keep]
        tokens = np.concatenate(toks).reshape(-1, 1)
    return results
