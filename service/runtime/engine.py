"""Iteration-level (continuous) batching for the translator: a small state machine over decoder slots.

Verbs: ``submit`` a sequence (one text with its own beam size, token cap and attention choice); then each
``iterate()`` drops sequences whose client went away or whose deadline passed, ``admit``s waiting ones into
free slots (one encoder batch, bounded by a token budget), runs one decoder ``step`` over every live slot, and
``retire``s finished sequences at once, compacting the live slots. A beam-k sequence holds k slots.

A row's computation depends only on that row (the step graph has no shared padding or length), so a
sequence's tokens are the same whatever it runs with. No torch, no Ray: tested on its own.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from service.runtime import attention
from service.runtime.decoding import Beams, advance
from service.runtime.slots import SlotBuffers, SlotStep

# source ids (EOS included), encoder attention wanted -> cross_kv (L, 2, n, nh, S, hs), (L_enc, n, nh, S, S) | None
Encode = Callable[[list[list[int]], bool], tuple[np.ndarray, np.ndarray | None]]


@dataclass
class EngineSettings:
    max_slots: int = 64  # live rows per step (a beam-k sequence takes k)
    max_step_tokens: int = 2048  # per iteration: one per live row plus the source tokens of admitted ones
    admit_wait_s: float = 0.0  # hold new sequences back up to this long to encode them in one batch
    max_encoder_batch: int = 32  # sequences admitted together
    encoder_padding: float = 0.25  # admitted sources are encoded in length groups padded at most this much


@dataclass
class Sequence:
    """One text being translated. Callbacks run on the engine's thread."""

    src_ids: list[int]  # EOS included; [] = nothing to translate (finishes at once, empty)
    beam_size: int = 1
    max_new_tokens: int = 128
    length_penalty: float = 1.0
    align: np.ndarray | None = None  # (L, nh) weights over layers x heads of the alignment row; None = none
    encoder_align: np.ndarray | None = None  # (L_enc, nh) weights of the encoder self-attention map; None = none
    deadline: float | None = None  # time.monotonic() past which the sequence is dropped
    on_token: Callable[[Sequence, int, np.ndarray | None], None] | None = None  # greedy only: each new token
    on_done: Callable[[Sequence], None] | None = None
    # engine state
    id: int = field(default_factory=itertools.count().__next__)
    submitted: float = field(default_factory=time.monotonic)
    admitted: float | None = None
    first_token: float | None = None
    finished_at: float | None = None
    cancelled: bool = False  # set from any thread; the engine drops it within one iteration
    rows: list[int] = field(default_factory=list)
    steps: int = 0
    tokens: list[int] = field(default_factory=list)  # the result, without EOS
    score: float = 0.0
    attention: np.ndarray | None = None  # (len(tokens), S) the step rows that produced each token
    encoder_attention: np.ndarray | None = None  # (S, S) encoder self-attention (EOS included), when asked
    dropped: str | None = None  # "disconnect" | "deadline" | "shutdown"
    _greedy_rows: list[np.ndarray] = field(default_factory=list)
    _beam: Beams | None = None

    @property
    def done(self) -> bool:
        return self.finished_at is not None


@dataclass
class IterationStats:
    rows: int = 0  # live rows in the step (0: no step ran)
    sequences: int = 0
    step_seconds: float = 0.0
    admitted: list[Sequence] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)
    dropped: list[Sequence] = field(default_factory=list)


def length_groups(lengths: list[int], padding: float) -> list[list[int]]:
    """Indices of ``lengths`` in groups of similar length, each padded to its longest by at most ``padding`` of
    its real tokens: the encoder's cost follows its padded batch, and one long source would otherwise pad every
    short one admitted with it (a row's result does not depend on its batch-mates)."""
    groups: list[list[int]] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        n = lengths[i]
        if groups and n * (len(groups[-1]) + 1) <= (1 + padding) * (real + n):
            groups[-1].append(i)
            real += n
        else:
            groups.append([i])
            real = n
    return groups


class Engine:
    def __init__(self, buffers: SlotBuffers, step: SlotStep, encode: Encode, *, bos: int, eos: int, vocab: int,
                 settings: EngineSettings | None = None) -> None:
        self.b, self.step_graph, self.encode = buffers, step, encode
        self.bos, self.eos, self.vocab = bos, eos, vocab
        self.settings = settings or EngineSettings()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.owner: dict[int, Sequence] = {}  # live row -> its sequence
        self.live = 0  # rows [0, live) are in use
        self.lock = threading.Lock()  # guards `waiting` (submit may come from another thread)

    # -- verbs -------------------------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> Sequence:
        if not 1 <= seq.beam_size <= self.settings.max_slots:
            raise ValueError(f"beam_size {seq.beam_size} does not fit in {self.settings.max_slots} slots")
        if seq.max_new_tokens > self.b.max_positions:
            raise ValueError(f"max_new_tokens {seq.max_new_tokens} over the model's {self.b.max_positions}")
        with self.lock:
            self.waiting.append(seq)
        return seq

    @property
    def reserved(self) -> int:
        """Slots held by the running sequences: a beam-k sequence holds k, also before it has k rows."""
        return sum(s.beam_size for s in self.running)

    @property
    def transfer_bytes(self) -> int:
        """Host<->device bytes bound to this engine's graphs so far (slots.py: the counter at the binding)."""
        return self.b.transfer_bytes

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    def iterate(self) -> IterationStats:
        stats = IterationStats()
        self._drop_cancelled(stats)
        self._admit(stats)
        if self.live:
            self._step(stats)
        return stats

    def shutdown(self, reason: str = "shutdown") -> list[Sequence]:
        """Drop everything (the replica is going away); returns the dropped sequences."""
        with self.lock:
            pending, self.waiting = list(self.waiting), deque()
        out = [*pending, *self.running]
        for seq in pending:
            self._finish(seq, dropped=reason)
        for seq in list(self.running):
            self._release(seq)
            self._finish(seq, dropped=reason)
        self._compact()
        return out

    # -- internals -------------------------------------------------------------------------------------------
    def _drop_cancelled(self, stats: IterationStats) -> None:
        now = time.monotonic()

        def reason(s: Sequence) -> str | None:
            if s.cancelled:
                return "disconnect"
            return "deadline" if s.deadline is not None and now > s.deadline else None

        with self.lock:
            gone = [(s, r) for s in self.waiting if (r := reason(s))]
            for s, _ in gone:
                self.waiting.remove(s)
        running = [(s, r) for s in self.running if (r := reason(s))]
        for s, r in gone + running:
            self._release(s)
            self._finish(s, dropped=r)
            stats.dropped.append(s)
        if running:
            self._compact()

    def _admit(self, stats: IterationStats) -> None:
        st = self.settings
        with self.lock:
            if not self.waiting:
                return
            oldest = time.monotonic() - self.waiting[0].submitted
            if self.live and oldest < st.admit_wait_s and len(self.waiting) < st.max_encoder_batch:
                return  # hold back a little to encode a fuller batch
            budget = st.max_step_tokens - self.reserved
            free = st.max_slots - self.reserved
            batch: list[Sequence] = []
            while self.waiting and len(batch) < st.max_encoder_batch:
                seq = self.waiting[0]
                cost = len(seq.src_ids) + seq.beam_size
                if seq.beam_size > free or (cost > budget and (batch or self.live)):
                    break  # FIFO: later sequences wait too, so a big one is never starved
                self.waiting.popleft()
                batch.append(seq)
                budget, free = budget - cost, free - seq.beam_size
        now = time.monotonic()
        for seq in batch:
            seq.admitted = now
        stats.admitted = batch
        empty = [s for s in batch if not s.src_ids]
        for seq in empty:  # nothing to translate: done, without a slot
            if seq.encoder_align is not None:
                seq.encoder_attention = np.zeros((0, 0), np.float32)
            self._finish(seq)
            stats.finished.append(seq)
        batch = [s for s in batch if s.src_ids]
        if not batch:
            return
        rows = self.reserved + sum(s.beam_size for s in batch)
        self.b.fit(self.live, rows, self._positions_needed(), max(len(s.src_ids) for s in [*batch, *self.running]))
        self._encoder_maps([s for s in batch if s.encoder_align is not None])
        for group in length_groups([len(s.src_ids) for s in batch], self.settings.encoder_padding):
            seqs = [batch[i] for i in group]
            start = self.live
            for seq in seqs:  # one row each, a group's rows together: its keys/values land as one block
                seq.rows = [self.live]  # a beam sequence's k rows come after its first step (`_expand`)
                self.owner[self.live] = seq
                self.live += 1
            cross = self.step_graph.encode([s.src_ids for s in seqs])  # (L, 2, n, nh, S, hs), where the state is
            self.b.write_sources(cross, np.arange(len(seqs)), np.arange(start, self.live),
                                 np.array([len(s.src_ids) for s in seqs]))
        for seq in batch:
            k = seq.beam_size
            rows = np.array(seq.rows)
            self.b.tokens[rows], self.b.positions[rows] = self.bos, 0
            self.b.align_weights[rows] = 0.0 if seq.align is None else seq.align
            if k > 1:
                seq._beam = Beams.start(k, len(seq.src_ids) if seq.align is not None else None)
            self.running.append(seq)

    def _encoder_maps(self, asking: list[Sequence]) -> None:
        """The encoder's attention variant, only for the sequences that ask for its map, each keeping its own
        S x S block (padding excluded). The decoder keeps the plain encoder's keys/values: that graph's differ
        by ~1e-6, and a text's tokens must not depend on whether it, or a batch-mate, asked for a map."""
        if not asking:
            return
        _, enc = self.encode([s.src_ids for s in asking], True)  # (L_enc, n, nh, S, S)
        for i, seq in enumerate(asking):
            n = len(seq.src_ids)
            seq.encoder_attention = attention.weighted(enc[:, i, :, :n, :n], seq.encoder_align)

    def _positions_needed(self) -> int:
        return int(self.b.positions[: self.live].max()) + 1 if self.live else 1

    def _step(self, stats: IterationStats) -> None:
        n = self.live
        # Rows for every slot held (beam sequences get theirs after the first step): no shrink-then-grow.
        self.b.fit(n, max(n, self.reserved), self._positions_needed(), max(len(s.src_ids) for s in self.running))
        t0 = time.monotonic()
        out = self.step_graph.run(n, alignment=any(s.align is not None for s in self.running))
        stats.rows, stats.sequences, stats.step_seconds = n, len(self.running), time.monotonic() - t0
        now = time.monotonic()
        reorder: list[tuple[np.ndarray, np.ndarray]] = []  # every beam sequence's (rows, source rows)
        expand: list[tuple[Sequence, np.ndarray]] = []  # beam sequences after their first step, new tokens
        for seq in list(self.running):
            if seq._beam is None:
                done = self._advance_greedy(seq, out, now)
            else:
                done = self._advance_beam(seq, out, reorder, expand)
            seq.steps += 1
            if done:
                self._release(seq)
                self._finish(seq)
                stats.finished.append(seq)
        if reorder:  # one cache reorder for the whole step (rows of different sequences never overlap)
            dst, src = (np.concatenate(a) for a in zip(*reorder, strict=True))
            self.b.copy_cache(dst, src, self._positions_needed())
        if expand:
            self._expand(expand)
        self._compact()

    def _expand(self, expand: list[tuple[Sequence, np.ndarray]]) -> None:
        """Each beam sequence's first step ran on one row (all k beams start as the same BOS: k rows would
        compute it k times); its k beams, all children of that row, now get rows of their own (its copies)."""
        extra = sum(seq.beam_size - 1 for seq, _ in expand)
        self.b.fit(self.live, self.live + extra, self._positions_needed(), max(len(s.src_ids) for s in self.running))
        dst, src = [], []
        for seq, _ in expand:
            new = list(range(self.live, self.live + seq.beam_size - 1))
            self.live += len(new)
            dst += new
            src += [seq.rows[0]] * len(new)
            seq.rows += new
            for r in new:
                self.owner[r] = seq
        self.b.move(np.array(dst), np.array(src), self._positions_needed())
        for seq, new_tok in expand:
            rows = np.array(seq.rows)
            self.b.tokens[rows], self.b.positions[rows] = new_tok, seq.steps

    def _advance_greedy(self, seq: Sequence, out, now: float) -> bool:
        r = seq.rows[0]
        tok = int(out.ids[r, 0])
        seq.score += float(out.logprobs[r, 0])
        row = out.alignment[r, : len(seq.src_ids)].copy() if seq.align is not None else None
        if seq.first_token is None:
            seq.first_token = now
        if tok == self.eos:
            return True
        seq.tokens.append(tok)
        if row is not None:
            seq._greedy_rows.append(row)
        if seq.on_token is not None:
            seq.on_token(seq, tok, row)
        if len(seq.tokens) >= seq.max_new_tokens:
            return True
        self.b.tokens[r], self.b.positions[r] = tok, self.b.positions[r] + 1
        return False

    def _advance_beam(self, seq: Sequence, out, reorder: list[tuple[np.ndarray, np.ndarray]],
                      expand: list[tuple[Sequence, np.ndarray]]) -> bool:
        """`decoding.advance` (the one beam search) on this sequence's rows; the cache reorder is the slots'.
        At the first step the sequence has one row (beam 0; the others' scores are -inf: no candidates)."""
        bm, k, t = seq._beam, seq.beam_size, seq.steps
        rows = np.array(seq.rows)
        width, m = 2 * k, len(rows)
        cand = (bm.scores[:m, None] + out.logprobs[rows, :width].astype(np.float64)).reshape(-1)
        flat = (np.arange(m)[:, None] * self.vocab + out.ids[rows, :width]).reshape(-1)
        attn = out.alignment[rows, : len(seq.src_ids)] if seq.align is not None else None
        if seq.first_token is None:
            seq.first_token = time.monotonic()
        moved = advance(bm, cand, flat, attn, vocab=self.vocab, eos=self.eos, step=t,
                        last=t == seq.max_new_tokens - 1, length_penalty=seq.length_penalty)
        if moved is None:
            best = bm.best()
            seq.tokens, seq.score, seq.attention = best.tokens, best.score, best.attention
            return True
        src_beam, new_tok = moved
        if m < k:
            expand.append((seq, new_tok))
            return False
        reorder.append((rows, rows[src_beam]))
        self.b.tokens[rows], self.b.positions[rows] = new_tok, t + 1
        return False

    def _finish(self, seq: Sequence, dropped: str | None = None) -> None:
        seq.dropped = dropped
        seq.finished_at = time.monotonic()
        if seq in self.running:
            self.running.remove(seq)
        if seq._beam is None and seq.align is not None:
            width = len(seq.src_ids)
            seq.attention = np.stack(seq._greedy_rows) if seq._greedy_rows else np.zeros((0, width), np.float32)
        if seq.on_done is not None:
            seq.on_done(seq)

    def _release(self, seq: Sequence) -> None:
        for r in seq.rows:
            del self.owner[r]
        seq.rows = []

    def _compact(self) -> None:
        """Move live rows from the tail into freed rows so that rows [0, live) are exactly the live ones."""
        n = sum(len(s.rows) for s in self.running)
        holes = [r for r in range(n) if r not in self.owner]
        tail = [r for r in range(n, self.live) if r in self.owner]
        assert len(holes) == len(tail), (holes, tail)
        if holes:
            self.b.move(np.array(holes), np.array(tail), self._positions_needed())
            for dst, src in zip(holes, tail, strict=True):
                seq = self.owner.pop(src)
                seq.rows[seq.rows.index(src)] = dst
                self.owner[dst] = seq
        self.live = n
