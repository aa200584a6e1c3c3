"""The node's memory of a spent lease-mode key (region_node/lease_exhaustion.py)."""

from __future__ import annotations

from region_node.lease_exhaustion import RECHECK_S, Exhaustion


def test_a_key_never_answered_for_is_asked() -> None:
    assert not Exhaustion().denies(1, 0.0)


def test_a_recent_answer_that_cannot_cover_the_need_denies_and_re_asks_once() -> None:
    budget = Exhaustion()
    budget.answered(free=2, grew=True, mono=10.0)
    assert not budget.denies(2, 10.1)  # the authority still had enough
    assert budget.denies(3, 10.1)
    assert budget.denied(10.1, asked=False)  # the first local deny asks again at once
    assert not budget.denied(10.2, asked=False)
    assert budget.denied(10.1 + RECHECK_S, asked=False)  # at most one re-ask per interval


def test_an_old_answer_alone_does_not_deny() -> None:
    budget = Exhaustion()
    budget.answered(free=0, grew=True, mono=10.0)
    assert budget.denies(1, 10.0 + RECHECK_S / 2)
    assert not budget.denies(1, 10.0 + RECHECK_S)  # budget may have come back since


def test_an_exhausted_key_denies_until_an_answer_adds_to_the_slice() -> None:
    budget = Exhaustion()
    budget.answered(free=0, grew=False, mono=10.0)
    assert not budget.denied(10.0, asked=True)  # the "no" was the authority's own answer
    assert budget.denies(1, 100.0)  # however long ago: re-asks keep it current
    assert not budget.denied(10.0 + RECHECK_S / 2, asked=False)
    assert budget.denied(10.0 + RECHECK_S, asked=False)
    budget.answered(free=0, grew=False, mono=11.0)  # still nothing
    assert budget.denies(1, 100.0)
    budget.answered(free=0, grew=True, mono=12.0)  # another region gave units back
    assert not budget.denies(1, 12.0 + RECHECK_S)


def test_a_need_within_the_free_budget_is_asked_for_even_when_exhausted() -> None:
    budget = Exhaustion()
    budget.answered(free=4, grew=False, mono=10.0)
    budget.denied(10.0, asked=True)  # a cost of 5 was refused
    assert budget.denies(5, 10.1)
    assert not budget.denies(4, 10.1)
