"""Gate: admission by count and by cost, before any per-request work; released on every exit (no Ray)."""

from __future__ import annotations

import asyncio

import pytest

from service.deployments.admission import Gate
from service.deployments.jobs import TranslateJob
from service.errors import DeadlineExceeded, Overloaded


def gate(**kw) -> Gate:
    return Gate(**{"max_pending": 8, "timeout_s": 5.0, "retry_after_s": 2, **kw})


def test_cost_budget_refuses_with_retry_after_and_releases() -> None:
    g = gate(max_pending_cost=100)
    with g.admit(60):
        assert (g.pending, g.cost) == (1, 60)
        with pytest.raises(Overloaded) as e, g.admit(41):
            pass
        assert e.value.status == 503 and e.value.headers == {"Retry-After": "2"}
        with g.admit(40):
            assert g.cost == 100
    assert (g.pending, g.cost) == (0, 0)


def test_request_dearer_than_budget_runs_alone() -> None:
    g = gate(max_pending_cost=10)
    with g.admit(50):  # an idle replica takes it: the per-request limits decide what can run
        with pytest.raises(Overloaded), g.admit(1):
            pass


def test_count_limit_and_no_budget() -> None:
    g = gate(max_pending=1)
    with g.admit(10**9):
        with pytest.raises(Overloaded, match="limit 1"), g.admit(1):
            pass


def test_released_after_error_and_deadline() -> None:
    g = gate(max_pending_cost=10)
    with pytest.raises(ValueError), g.admit(5):
        raise ValueError("tokenizer failed")

    async def slow() -> None:
        await asyncio.sleep(1)

    with pytest.raises(DeadlineExceeded):
        asyncio.run(g.run(slow(), 0.01, cost=5))
    assert (g.pending, g.cost) == (0, 0)


def test_translator_cost_is_a_token_budget() -> None:
    job = TranslateJob(texts=["a", "b", "c"], beam_size=4, max_new_tokens=32)
    assert job.cost == 3 * 4 * 32


def test_timeout_is_capped_at_the_models() -> None:
    g = gate(timeout_s=5.0)
    assert (g.timeout(None), g.timeout(1.5), g.timeout(60.0)) == (5.0, 1.5, 5.0)
