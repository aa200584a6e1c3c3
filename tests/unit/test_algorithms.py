"""Properties of the limit algorithms, driven through CounterStore.check with an explicit clock.

Every check takes ``now`` as an argument, so the tests replay generated histories of
``(now_ms, cost)`` events and compare the decisions with independent reference models
written with exact fractions (fractions.Fraction), plus the invariants of the contract:
no window over its limit, no bucket over ``burst + rate x T``, exact ``retry_after_ms``,
``cost: 0`` and denied checks consume nothing, a fresh key limited to 1 gets exactly one.

"Absent other traffic" probes need two identical stores; a store is rebuilt by replaying
the same history, which is deterministic.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

from region_node.counters import CounterStore
from sync.algorithms import ALGORITHMS
from sync.algorithms.base import MAX_COUNT, Decision, KeyState
from sync.errors import InvalidField
from sync.messages import UsageBatch, decode_usage, encode_usage
from sync.policy import MAX_LIMIT, Policy, build_policy
from sync.windows import window_bounds

NS = "ns"
KEY = "0123456789abcdef0123456789abcdef"
ALGORITHM_NAMES = ("fixed_window", "sliding_window", "token_bucket")
DURATIONS = ("1ms", "3ms", "7ms", "10ms", "250ms", "1s", "90s", "1m", "1h", "1d")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

Event = tuple[int, int]  # (now_ms, cost)
PROPERTY = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def utc_ms(*args: int) -> int:
    return (datetime(*args, tzinfo=UTC) - EPOCH) // timedelta(milliseconds=1)


# --- strategies ------------------------------------------------------------------------


@st.composite
def policies(draw: st.DrawFn, algorithms: Sequence[str] = ALGORITHM_NAMES) -> Policy:
    algorithm = draw(st.sampled_from(algorithms))
    limit = draw(st.one_of(st.integers(1, 12), st.integers(1, 10**9)))
    burst = None
    if algorithm == "token_bucket" and draw(st.booleans()):
        burst = draw(st.one_of(st.integers(1, 15), st.integers(1, 10**9)))
    return build_policy(limit=limit, duration=draw(st.sampled_from(DURATIONS)),
                        algorithm=algorithm, burst=burst)


@st.composite
def month_policies(draw: st.DrawFn) -> Policy:
    return build_policy(limit=draw(st.integers(1, 12)), duration="month",
                        algorithm="fixed_window")


def _gap(draw: st.DrawFn, policy: Policy) -> int:
    d = policy.duration.ms or 31 * 86_400_000
    return draw(st.one_of(st.just(0), st.integers(0, max(1, d // 8)), st.integers(0, 3 * d)))


def _cost(draw: st.DrawFn, policy: Policy) -> int:
    capacity = policy.capacity
    return draw(st.one_of(st.just(1), st.just(0), st.integers(0, min(capacity, 20)),
                          st.integers(0, capacity)))


@st.composite
def histories(draw: st.DrawFn, policy: Policy, max_events: int = 30) -> list[Event]:
    """Non-decreasing times (epoch ms), costs 0..capacity, many at or near boundaries."""
    if policy.duration.is_month:
        # Around the turn of the year and a leap February.
        now = draw(st.sampled_from([utc_ms(2025, 12, 1), utc_ms(2024, 1, 20),
                                    utc_ms(2023, 12, 31, 23, 59, 59)]))
    else:
        now = draw(st.integers(0, 4 * 10**12))
    events = []
    for _ in range(draw(st.integers(1, max_events))):
        now += _gap(draw, policy)
        events.append((now, _cost(draw, policy)))
    return events


@st.composite
def scenarios(draw: st.DrawFn, algorithms: Sequence[str] = ALGORITHM_NAMES
              ) -> tuple[Policy, list[Event]]:
    policy = draw(policies(algorithms))
    return policy, draw(histories(policy))


@st.composite
def month_scenarios(draw: st.DrawFn) -> tuple[Policy, list[Event]]:
    policy = draw(month_policies())
    return policy, draw(histories(policy))


KINDS = [*ALGORITHM_NAMES, "month"]  # "month": fixed_window over calendar months
PER_KIND = settings(max_examples=50, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def draw_scenario(data: st.DataObject, kind: str) -> tuple[Policy, list[Event]]:
    strategy = month_scenarios() if kind == "month" else scenarios([kind])
    return data.draw(strategy, label="scenario")


def replay(policy: Policy, events: Sequence[Event]) -> tuple[CounterStore, list[Decision]]:
    store = CounterStore()
    return store, [store.check(NS, KEY, policy, cost, now) for now, cost in events]


def probe(policy: Policy, history: Sequence[Event], now: int, cost: int) -> Decision:
    """The decision for one more check after ``history``, on a fresh copy of the state."""
    store, _ = replay(policy, history)
    return store.check(NS, KEY, policy, cost, now)


# --- independent reference models (exact fractions, own window arithmetic) --------------


def month_start_end(now: int) -> tuple[int, int]:
    moment = EPOCH + timedelta(milliseconds=now)
    start = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    end = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=UTC)
    return ((start - EPOCH) // timedelta(milliseconds=1),
            (end - EPOCH) // timedelta(milliseconds=1))


class FixedModel:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.admitted: dict[int, int] = defaultdict(int)

    def bounds(self, now: int) -> tuple[int, int]:
        if self.policy.duration.is_month:
            return month_start_end(now)
        d = self.policy.duration.ms
        return now // d * d, now // d * d + d

    def check(self, now: int, cost: int) -> Decision:
        start, end = self.bounds(now)
        used, limit = self.admitted[start], self.policy.limit
        if used + max(cost, 1) <= limit:
            self.admitted[start] += cost
            return Decision(True, limit - used - cost, end, None)
        return Decision(False, limit - used, end, end - now)


class SlidingModel:
    """count(t) = this window's cost + the previous window's weighted by the part of it
    still inside the span [t - d, t]."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.admitted: dict[int, int] = defaultdict(int)

    def count(self, now: int) -> Fraction:
        d = self.policy.duration.ms
        w, elapsed = divmod(now, d)
        return self.admitted[w] + self.admitted[w - 1] * Fraction(d - elapsed, d)

    def check(self, now: int, cost: int) -> Decision:
        d, limit = self.policy.duration.ms, self.policy.limit
        w = now // d
        count = self.count(now)
        allowed = count + max(cost, 1) <= limit
        if allowed:
            self.admitted[w] += cost
        reset_at = (w + 2) * d if self.admitted[w] else (w + 1) * d
        room = math.floor(limit - count)
        if allowed:
            return Decision(True, room - cost, reset_at, None)
        # Absent other traffic the count only falls: bisect for the first instant it fits.
        lo, hi = now, (w + 2) * d
        need = max(cost, 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.count(mid) + need <= limit:
                hi = mid
            else:
                lo = mid
        return Decision(False, max(0, room), reset_at, hi - now)


class BucketModel:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.tokens: Fraction | None = None
        self.at = 0

    def check(self, now: int, cost: int) -> Decision:
        capacity, d, rate = self.policy.capacity, self.policy.duration.ms, self.policy.limit
        if self.tokens is None:
            self.tokens = Fraction(capacity)
        else:
            self.tokens = min(Fraction(capacity),
                              self.tokens + Fraction((now - self.at) * rate, d))
        self.at = now
        allowed = self.tokens >= max(cost, 1)
        if allowed:
            self.tokens -= cost
        reset_at = now + math.ceil((capacity - self.tokens) * d / rate)
        if allowed:
            return Decision(True, math.floor(self.tokens), reset_at, None)
        retry = math.ceil((max(cost, 1) - self.tokens) * d / rate)
        return Decision(False, max(0, math.floor(self.tokens)), reset_at, retry)


MODELS = {"fixed_window": FixedModel, "sliding_window": SlidingModel,
          "token_bucket": BucketModel}


# --- agreement with the reference models -----------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@PER_KIND
@given(data=st.data())
def test_decisions_match_independent_reference_model(kind: str, data: st.DataObject
                                                      ) -> None:
    policy, events = draw_scenario(data, kind)
    model = MODELS[policy.algorithm](policy)
    _, decisions = replay(policy, events)
    for i, ((now, cost), decision) in enumerate(zip(events, decisions, strict=True)):
        expected = model.check(now, cost)
        assert decision == expected, f"event {i} ({now}, {cost}) of {policy}"


@PROPERTY
@given(scenarios(["sliding_window"]))
def test_sliding_window_weights_previous_window_by_part_inside_span(
        scenario: tuple[Policy, list[Event]]) -> None:
    """The same comparison as above, restated with floats away from rounding edges, so a
    shared misconception between the store and the exact model would still show."""
    policy, events = scenario
    d, limit = policy.duration.ms, policy.limit
    admitted: dict[int, int] = defaultdict(int)
    _, decisions = replay(policy, events)
    for (now, cost), decision in zip(events, decisions, strict=True):
        w, elapsed = divmod(now, d)
        weighted = admitted[w] + admitted[w - 1] * (d - elapsed) / d
        margin = limit - weighted - max(cost, 1)
        if abs(margin) > 1e-6 * max(1, limit):
            assert decision.allowed == (margin > 0)
        if decision.allowed:
            admitted[w] += cost


def test_sliding_window_example_by_hand() -> None:
    """limit 10 per 1s: 8 admitted in [0, 1000); at 1250 the previous window weighs
    8 * 0.75 = 6, so 4 more fit and a 5th does not."""
    policy = build_policy(limit=10, duration="1s", algorithm="sliding_window")
    store = CounterStore()
    assert store.check(NS, KEY, policy, 8, 500).allowed
    decision = store.check(NS, KEY, policy, 4, 1250)
    assert decision == Decision(True, 0, 3000, None)
    denied = store.check(NS, KEY, policy, 1, 1250)
    assert not denied.allowed
    # 6 + 4 = 10 until the previous window's weight drops by one: 8 * (1000 - e) / 1000
    # <= 5 at e = 375.
    assert denied.retry_after_ms == 1375 - 1250


# --- invariants ------------------------------------------------------------------------


@PROPERTY
@given(st.one_of(scenarios(["fixed_window"]), month_scenarios()))
def test_fixed_window_never_admits_more_than_limit_in_one_window(
        scenario: tuple[Policy, list[Event]]) -> None:
    policy, events = scenario
    _, decisions = replay(policy, events)
    per_window: dict[int, int] = defaultdict(int)
    for (now, cost), decision in zip(events, decisions, strict=True):
        if decision.allowed:
            per_window[window_bounds(policy.duration, now)[0]] += cost
    assert all(total <= policy.limit for total in per_window.values()), dict(per_window)


@PROPERTY
@given(scenarios(["token_bucket"]))
def test_token_bucket_never_admits_more_than_burst_plus_rate_times_interval(
        scenario: tuple[Policy, list[Event]]) -> None:
    policy, events = scenario
    _, decisions = replay(policy, events)
    admitted = [(now, cost) for (now, cost), decision in zip(events, decisions, strict=True)
                if decision.allowed and cost]
    d, rate, burst = policy.duration.ms, policy.limit, policy.capacity
    for i in range(len(admitted)):
        total = 0
        for j in range(i, len(admitted)):
            total += admitted[j][1]
            interval = admitted[j][0] - admitted[i][0]
            # total <= burst + (rate / d) * interval, in integers.
            assert total * d <= burst * d + rate * interval, (admitted[i], admitted[j])


@pytest.mark.parametrize("kind", KINDS)
@PER_KIND
@given(data=st.data())
def test_remaining_is_never_negative_and_is_exactly_what_fits_now(
        kind: str, data: st.DataObject) -> None:
    policy, events = draw_scenario(data, kind)
    _, decisions = replay(policy, events)
    assert all(decision.remaining >= 0 for decision in decisions)
    last_now = events[-1][0]
    remaining = decisions[-1].remaining
    assert remaining <= policy.capacity
    if remaining >= 1:
        assert probe(policy, events, last_now, remaining).allowed
    if remaining + 1 <= policy.capacity:
        assert not probe(policy, events, last_now, remaining + 1).allowed


@pytest.mark.parametrize("kind", KINDS)
@PER_KIND
@given(data=st.data())
def test_retry_after_is_exact(kind: str, data: st.DataObject) -> None:
    """For a denied check at ``now``: the same check at now + retry_after_ms is allowed and
    at now + retry_after_ms - 1 denied, absent other traffic."""
    policy, events = draw_scenario(data, kind)
    # Finish with a check large enough to be denied now and then.
    last_now = events[-1][0]
    final_cost = data.draw(st.integers(1, policy.capacity), label="final cost")
    events = [*events, (last_now + data.draw(st.integers(0, 5)), final_cost)]
    _, decisions = replay(policy, events)
    denied = [i for i, decision in enumerate(decisions) if not decision.allowed]
    assume(denied)
    for i in sorted({denied[0], denied[len(denied) // 2], denied[-1]}):
        now, cost = events[i]
        retry = decisions[i].retry_after_ms
        assert retry is not None and retry > 0
        history = events[: i + 1]
        note(f"denied event {i}: now={now} cost={cost} retry={retry}")
        assert probe(policy, history, now + retry, cost).allowed
        assert not probe(policy, history, now + retry - 1, cost).allowed
    for decision in decisions:
        assert (decision.retry_after_ms is None) == decision.allowed


@pytest.mark.parametrize("kind", KINDS)
@PER_KIND
@given(data=st.data())
def test_cost_zero_consumes_nothing_and_answers_remaining_above_zero(
        kind: str, data: st.DataObject) -> None:
    policy, events = draw_scenario(data, kind)
    _, decisions = replay(policy, events)
    for (_, cost), decision in zip(events, decisions, strict=True):
        if cost == 0:
            assert decision.allowed == (decision.remaining > 0)
    paying = [(i, event) for i, event in enumerate(events) if event[1]]
    _, without_zero = replay(policy, [event for _, event in paying])
    for (i, _), decision in zip(paying, without_zero, strict=True):
        assert decision == decisions[i]


@pytest.mark.parametrize("kind", KINDS)
@PER_KIND
@given(data=st.data())
def test_denied_check_consumes_nothing(kind: str, data: st.DataObject) -> None:
    """Without any of the denied checks, every check is decided the same: the allowed ones
    replayed alone, and each denied one asked again after only the allowed ones before it."""
    policy, events = draw_scenario(data, kind)
    _, decisions = replay(policy, events)
    kept = [i for i, decision in enumerate(decisions) if decision.allowed]
    _, replayed = replay(policy, [events[i] for i in kept])
    assert replayed == [decisions[i] for i in kept]
    for k, decision in enumerate(decisions):
        if not decision.allowed:
            before = [events[i] for i in kept if i < k]
            assert probe(policy, before, *events[k]) == decision, f"denied event {k}"


@PROPERTY
@given(st.sampled_from(ALGORITHM_NAMES), st.sampled_from(DURATIONS),
       st.integers(0, 4 * 10**12), st.integers(2, 20), st.booleans())
def test_brand_new_key_limited_to_one_gets_exactly_one(
        algorithm: str, duration: str, now: int, attempts: int, probe_first: bool) -> None:
    policy = build_policy(limit=1, duration=duration, algorithm=algorithm)
    store = CounterStore()
    if probe_first:
        assert store.check(NS, KEY, policy, 0, now) == (True, 1, *_reset_and_none(store, now))
    decisions = [store.check(NS, KEY, policy, 1, now) for _ in range(attempts)]
    assert [decision.allowed for decision in decisions] == [True] + [False] * (attempts - 1)
    assert decisions[0].remaining == 0
    assert all(decision.retry_after_ms for decision in decisions[1:])


def _reset_and_none(store: CounterStore, now: int) -> tuple[int, None]:
    state = store.get(NS, KEY)
    assert state is not None
    algorithm = state.policy.algorithm
    return (now if algorithm == "token_bucket" else state.cur_end), None


def test_brand_new_key_limited_to_one_per_month_gets_exactly_one() -> None:
    policy = build_policy(limit=1, duration="month", algorithm="fixed_window")
    store = CounterStore()
    now = utc_ms(2026, 5, 17, 8)
    assert [store.check(NS, KEY, policy, 1, now).allowed for _ in range(5)] == [
        True, False, False, False, False]


# --- calendar month --------------------------------------------------------------------


MONTH = build_policy(limit=3, duration="month", algorithm="fixed_window")


@pytest.mark.parametrize(("inside", "start", "end"), [
    ((2025, 12, 31, 23, 59, 59), (2025, 12, 1), (2026, 1, 1)),   # December -> January
    ((2024, 2, 29, 12), (2024, 2, 1), (2024, 3, 1)),              # leap February: 29 days
    ((2025, 2, 28, 23), (2025, 2, 1), (2025, 3, 1)),              # ordinary February
    ((2026, 1, 1), (2026, 1, 1), (2026, 2, 1)),                   # first instant of a month
])
def test_calendar_month_resets_at_midnight_utc_on_the_first(
        inside: tuple[int, ...], start: tuple[int, ...], end: tuple[int, ...]) -> None:
    now, start_ms, end_ms = utc_ms(*inside), utc_ms(*start), utc_ms(*end)
    store = CounterStore()
    for _ in range(3):
        assert store.check(NS, KEY, MONTH, 1, now).allowed
    denied = store.check(NS, KEY, MONTH, 1, now)
    assert denied == Decision(False, 0, end_ms, end_ms - now)
    state = store.get(NS, KEY)
    assert state is not None and (state.cur_start, state.cur_end) == (start_ms, end_ms)
    last_ms = store.check(NS, KEY, MONTH, 1, end_ms - 1)
    assert not last_ms.allowed and last_ms.retry_after_ms == 1
    fresh = store.check(NS, KEY, MONTH, 1, end_ms)
    assert fresh.allowed and fresh.remaining == 2
    assert fresh.reset_at == month_start_end(end_ms)[1]


def test_leap_february_window_is_29_days_and_ordinary_28() -> None:
    store = CounterStore()
    store.check(NS, "a" * 32, MONTH, 1, utc_ms(2024, 2, 10))
    store.check(NS, "b" * 32, MONTH, 1, utc_ms(2025, 2, 10))
    leap, ordinary = store.get(NS, "a" * 32), store.get(NS, "b" * 32)
    assert leap is not None and ordinary is not None
    assert leap.cur_end - leap.cur_start == 29 * 86_400_000
    assert ordinary.cur_end - ordinary.cur_start == 28 * 86_400_000


@pytest.mark.parametrize("algorithm", ["sliding_window", "token_bucket"])
def test_month_with_another_algorithm_is_invalid(algorithm: str) -> None:
    with pytest.raises(InvalidField) as caught:
        build_policy(limit=5, duration="month", algorithm=algorithm)
    assert caught.value.field == "duration"


def test_month_without_algorithm_means_fixed_window() -> None:
    # Was a 422 (the default algorithm is sliding_window, which cannot count a month).
    assert build_policy(limit=5, duration="month").algorithm == "fixed_window"
    assert build_policy(limit=5, duration="1h").algorithm == "sliding_window"


# --- the algorithms alone: pure functions of (state, policy, now, cost) -----------------


@pytest.mark.parametrize("algorithm", ALGORITHM_NAMES)
def test_algorithms_are_pure_functions_of_their_inputs(algorithm: str) -> None:
    """Two states fed the same (now, cost) sequence decide identically, whatever the wall
    clock says: nothing but ``now`` carries time."""
    policy = build_policy(limit=5, duration="10s", algorithm=algorithm)
    events = [(1_000, 2), (1_000, 2), (1_000, 2), (4_000, 1), (9_999, 3), (10_000, 3),
              (21_000, 5), (21_000, 0)]
    runs = []
    for _ in range(2):
        start, end = window_bounds(policy.duration, events[0][0])
        state = KeyState(policy, start, end, events[0][0])
        out = []
        for now, cost in events:
            if now >= state.cur_end:  # the store's window roll, by hand
                start, end = window_bounds(policy.duration, now)
                state.prev = state.cur if start == state.cur_end else 0
                state.cur, state.cur_start, state.cur_end = 0, start, end
            out.append(ALGORITHMS[algorithm].decide(state, policy, now, cost))
        runs.append(out)
    assert runs[0] == runs[1]
    assert runs[0][2].allowed is False  # 2 + 2 + 2 > 5 in every algorithm


@pytest.mark.parametrize("algorithm", ["fixed_window", "sliding_window", "token_bucket"])
def test_denied_cost_saturates_at_the_documented_bound(algorithm: str) -> None:
    """Denials have no cap: ~10^7 denied checks of a large cost once pushed a count past
    2^63, which the ledger could not store (issue 10). The count stops at MAX_COUNT."""
    policy = build_policy(limit=MAX_LIMIT, duration="1d", algorithm=algorithm)
    store = CounterStore()
    now = 1_800_000_000_000 - 1_800_000_000_000 % 86_400_000 + 1000
    assert store.check("ns", "0" * 32, policy, MAX_LIMIT, now).allowed
    for _ in range(MAX_COUNT // MAX_LIMIT + 2):  # ~9,000 denials of a full-limit cost
        assert not store.check("ns", "0" * 32, policy, MAX_LIMIT, now).allowed
    [(_, [entry])] = store.take_usage(now)
    assert (entry.admitted, entry.denied) == (MAX_LIMIT, MAX_COUNT)
    decode_usage(encode_usage(UsageBatch("n1", "eu", now, [entry])))  # still a valid message
