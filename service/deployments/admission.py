"""Admission control and the deadline of one model replica (`Gate`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from service.errors import DeadlineExceeded, Overloaded

T = TypeVar("T")


class Gate:
    """Admission control and deadline for one replica.

    A request is admitted only while the replica holds fewer than `max_pending` requests and their summed cost
    stays within `max_pending_cost` (the translator's cost is texts x beam_size x max_new_tokens, a bound on
    the decoder rows it will take; the classifier's is its image count). Otherwise it is refused at once with
    503 + Retry-After, in the service's JSON error format (Serve's own `max_queued_requests` rejection, earlier
    in the proxy, is plain text: it is the backstop). A request dearer than the whole budget is still admitted
    into an idle replica, so the per-request limits, not the budget, decide what can ever run.

    Callers admit before any per-request work (tokenizing, image decoding) with `admit`, so a refused request
    costs the replica almost nothing. The deadline covers queueing and inference; a client may shorten it
    (X-Timeout-Ms, the v2 `timeout` parameter): `timeout` caps what it asks at the model's own.
    """

    def __init__(self, *, max_pending: int, timeout_s: float, retry_after_s: int,
                 max_pending_cost: int | None = None) -> None:
        self.max_pending, self.timeout_s, self.retry_after_s = max_pending, timeout_s, retry_after_s
        self.max_pending_cost = max_pending_cost
        self.pending = 0
        self.cost = 0
        self.draining = False  # set on shutdown: new requests get a 503, the admitted ones finish

    def timeout(self, asked_s: float | None) -> float:
        """The deadline of a request whose client asked for `asked_s` (None: nothing): never past the model's."""
        return self.timeout_s if asked_s is None else min(self.timeout_s, asked_s)

    def check(self, cost: int = 1) -> None:
        """Raise `Overloaded` if a request of this cost would not be admitted now."""
        if self.draining:
            raise Overloaded("this replica is shutting down; retry (another replica or the restarted service)",
                             retry_after_s=self.retry_after_s)
        if self.pending >= self.max_pending:
            raise Overloaded(f"{self.pending} requests already pending in this replica (limit {self.max_pending}); "
                             "retry later", retry_after_s=self.retry_after_s)
        budget = self.max_pending_cost
        if budget is not None and self.pending and self.cost + cost > budget:
            raise Overloaded(f"this request's cost {cost} on top of {self.cost} pending in this replica is over its "
                             f"budget of {budget}; retry later", retry_after_s=self.retry_after_s)

    @contextmanager
    def admit(self, cost: int = 1) -> Iterator[None]:
        """Hold a place (and `cost` of the budget) for the block, or raise `Overloaded` at once."""
        self.check(cost)
        self.pending += 1
        self.cost += cost
        try:
            yield
        finally:
            self.pending -= 1
            self.cost -= cost

    async def within(self, work: Awaitable[T], timeout_s: float) -> T:
        """Await `work` under the deadline (504 past it); admission is the caller's (`admit`)."""
        try:
            async with asyncio.timeout(timeout_s):
                return await work
        except TimeoutError:
            raise DeadlineExceeded(f"no result within the deadline of {timeout_s:.3f} s") from None

    async def run(self, work: Awaitable[T], timeout_s: float, *, cost: int = 1) -> T:
        """`admit` and `within` in one, for work that was not admitted before it was made."""
        try:
            self.check(cost)
        except Overloaded:
            _close(work)
            raise
        with self.admit(cost):
            return await self.within(work, timeout_s)


def _close(work: Awaitable[Any]) -> None:
    close = getattr(work, "close", None)
    if close is not None:
        close()  # an un-awaited coroutine would warn
