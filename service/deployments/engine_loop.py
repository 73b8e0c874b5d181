"""Runs a translator `Engine` on its own thread and bridges it to the replica's asyncio loop.

The engine thread owns the engine's buffers and the ONNX Runtime step; the event loop only submits
sequences, marks them cancelled, and receives their tokens and completions through `call_soon_threadsafe`.
Metrics are recorded on the event loop too (one call per iteration), so the engine stays Ray-free.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from service.metrics import Metrics
from service.runtime.engine import Engine, EngineSettings, IterationStats, Sequence

log = logging.getLogger("attnserve")
IDLE_WAIT_S = 0.05


class EngineLoop:
    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop, metrics: Metrics, model: str) -> None:
        self.engine, self.loop, self.metrics, self.tags = engine, loop, metrics, {"model": model}
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.thread.start()

    def submit(self, seq: Sequence) -> None:
        self.engine.submit(seq)
        self.wake.set()

    def cancel(self, seq: Sequence) -> None:
        """The caller stopped waiting: past its deadline the engine drops it as "deadline" by itself."""
        if not seq.done:
            if seq.deadline is None or time.monotonic() < seq.deadline:
                seq.cancelled = True  # read by the engine thread at its next iteration
            self.wake.set()

    def reconfigure(self, settings: EngineSettings) -> None:
        self.engine.settings = settings  # read once per iteration: a whole object swap is atomic
        self.wake.set()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=10)

    def _run(self) -> None:
        while not self.stopping:
            if self.engine.idle:
                self.wake.wait(IDLE_WAIT_S)
                self.wake.clear()
                continue
            try:
                stats = self.engine.iterate()
            except Exception:  # a bug must not leave clients hanging: fail what is in flight, keep serving
                log.exception("decode engine iteration failed; dropping the sequences in flight")
                stats = IterationStats(dropped=self.engine.shutdown("error"))
            self.loop.call_soon_threadsafe(self._record, stats, self.engine.live)
        self.engine.shutdown("shutdown")

    def _record(self, stats: IterationStats, live_rows: int) -> None:
        m, tags = self.metrics, self.tags
        m.slots_in_use.set(live_rows, tags)
        for seq in stats.admitted:
            m.queue_wait.observe(seq.admitted - seq.submitted, tags)
        if stats.rows:
            m.engine_steps.inc(1, tags)
            m.step_sequences.observe(stats.sequences, tags)
            m.step_seconds.observe(stats.step_seconds, tags)
        for seq in stats.finished:
            if seq.first_token is not None:
                m.time_to_first_token.observe(seq.first_token - seq.submitted, tags)
                if len(seq.tokens) > 1:
                    per = (seq.finished_at - seq.first_token) / (len(seq.tokens) - 1)
                    m.time_per_output_token.observe(per, tags)
            m.generated_tokens.inc(len(seq.tokens), tags)
            m.input_tokens.inc(len(seq.src_ids), tags)
        for seq in stats.dropped:
            m.dropped.inc(1, {**tags, "reason": seq.dropped or "unknown"})
