"""Node side of lease mode: answer from this node's slice of a key's budget, no hop.

A slice is the total this node may admit for a key in the current window (for a token
bucket: in total, see below), granted by the lease authority
(central/lease/authority.py), and valid until a local deadline: the moment the node
SENT the request plus the lease's time to live. The authority's own
deadline starts when it decided, which is later, so the node always stops first.

- Enough left in the slice: admit at once (a background refill starts when less than
  half of the last increment, or than two round trips of the key's demand, is left).
- Not enough: wait up to the policy's ``timeout`` for a grant; checks of one key share
  one request at a time. The authority answering "not enough free budget" denies;
  no answer in time lets ``on_unavailable`` decide (``source: "fallback"``).
- Budget spent: denied on the node with no wait, asking again in the background at a
  bounded rate (region_node/lease_exhaustion.py).
- Unused slices go back when the key falls idle and when the node stops; a new window
  starts from nothing, so window ends need no message.
- A token bucket's slices are tokens withdrawn from the key's one global bucket at
  central; they belong to no window (sync/windows.py ``lease_window``). A key that went
  idle comes back under a new holder name, so its count starts over without a total to
  remember.

Admitted and denied cost is recorded in the node's counters, so usage is published and
billed exactly as in fast mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import nats.errors

from region_node.check_result import CheckResult, Source
from region_node.checker import Result
from region_node.counters import CounterStore
from region_node.lease_exhaustion import Exhaustion
from region_node.metrics import NodeMetrics
from sync.algorithms import ALGORITHMS
from sync.clock import Clock
from sync.connection import NatsLink
from sync.errors import MalformedMessage, UnsupportedVersion
from sync.messages import LeaseGrant, LeaseRequest, decode_lease_grant, encode_lease_request
from sync.policy import Policy
from sync.subjects import LEASE
from sync.windows import lease_window

log = logging.getLogger("regionlimit.lease")
UNAVAILABLE = (nats.errors.Error, TimeoutError, MalformedMessage, UnsupportedVersion)
REFILL_BELOW = 0.5  # refill in the background under this share of the last increment
# ... or once what is left would last fewer than this many round trips at the key's
# demand: a refill must arrive before the slice runs dry, or checks wait for it.
REFILL_RTTS = 2.0
RENEW_BEFORE = 0.3  # renew an active key's lease in the last 30% of its life
TICK_S = 0.25
RETURN_TIMEOUT_S = 2.0
MIN_ATTEMPT_S = 0.2
TRIM_AFTER_S = 1.0  # a slice is trimmed at most this often (from its last request)
KEEP_HORIZON_S = 1.0  # a trimmed slice keeps this long of its recent demand
# Time constant of a key's demand average: a burst counts as that much cost per second
# for about this long, and a steady rate is tracked within a few of them.
DEMAND_TAU_S = 1.0
# A slice younger than DEMAND_TAU_S also estimates its demand as its cost so far over its
# age (at least this): the average alone lags a new key's rate by about DEMAND_TAU_S,
# and its first slices would then run dry every round trip.
YOUNG_AGE_MIN_S = 0.5


@dataclass(slots=True)
class Slice:
    policy: Policy
    window_start: int
    window_end: int
    holder: str  # the name the authority knows this node's grant for the key by
    granted: int = 0  # total this node may admit in the window
    spent: int = 0  # admitted from slices in the window
    deadline: float = 0.0  # monotonic; no spending from then on
    budget: Exhaustion = field(default_factory=Exhaustion)  # the authority's last word
    increment: int = 0  # size of the last increment, for the refill threshold
    rtt_s: float = 0.0  # how long the last grant took to arrive
    ttl_s: float = 0.0  # the last lease's time to live
    # Demand: cost per second the key's checks ask for, a moving average with a
    # DEMAND_TAU_S time constant (as of ``rate_at``).
    rate: float = 0.0
    rate_at: float = 0.0
    born: float = 0.0  # monotonic
    cost_so_far: int = 0
    asked_since: float = 0.0  # the last request
    used_at: float = 0.0
    request: asyncio.Task[LeaseGrant | None] | None = None

    def left(self, mono: float) -> int:
        return self.granted - self.spent if mono < self.deadline else 0


class LeaseClient:
    def __init__(self, *, link: NatsLink, node_id: str, region: str, store: CounterStore,
                 metrics: NodeMetrics, clock: Clock, idle_s: float = 2.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._link = link
        self._node_id = node_id
        self._region = region
        self._store = store
        self._metrics = metrics
        self._clock = clock
        self._idle_s = idle_s
        self._mono = monotonic  # injectable: tests step it past a re-ask's interval
        self._slices: dict[tuple[str, str], Slice] = {}
        # Keys whose slice went back while their window lasts: (start, end, spent).
        self._retired: dict[tuple[str, str], tuple[int, int, int]] = {}
        self._sweep: list[tuple[str, str]] = []
        self._seq = 0
        self._holders = 0  # token bucket slices started afresh: each gets its own name
        for name in ("lease_local_answers", "lease_local_denials", "lease_waits",
                     "lease_requests", "lease_requests_failed", "lease_returns"):
            metrics.counters[name] = 0
        metrics.gauges["lease_units_held"] = self.units_held

    def units_held(self) -> int:
        """Unused units of unexpired slices (computed on scrape: active lease keys)."""
        mono = self._mono()
        return sum(s.left(mono) for s in self._slices.values())

    # --- checks ----------------------------------------------------------------------

    def check(self, namespace: str, key_hash: str, policy: Policy, cost: int, label: str
              ) -> Result | Awaitable[Result]:
        now, mono = self._clock(), self._mono()
        s = self._slice(namespace, key_hash, policy, now)
        s.rate = s.rate * math.exp((s.rate_at - mono) / DEMAND_TAU_S) + cost / DEMAND_TAU_S
        s.rate_at = s.used_at = mono
        s.cost_so_far += cost
        left = s.left(mono)
        if cost <= left and (cost or left):
            return self._admit(namespace, key_hash, s, cost, label, now, mono)
        if cost == 0:
            return self._deny(namespace, key_hash, s, cost, label, now)
        if s.budget.denies(cost - left, mono):
            if s.budget.denied(mono, asked=False) and s.request is None:
                self._start_request(namespace, key_hash, s, want=cost - left)
            self._metrics.counters["lease_local_denials"] += 1
            return self._deny(namespace, key_hash, s, cost, label, now)
        return self._wait(namespace, key_hash, s, cost, label)

    def _slice(self, namespace: str, key_hash: str, policy: Policy, now: int) -> Slice:
        key = (namespace, key_hash)
        s = self._slices.get(key)
        if s is not None and now < s.window_end and s.policy == policy:
            return s
        windowed = ALGORITHMS[policy.algorithm].lease_windows
        start, end = lease_window(windowed, policy.duration, now)
        mono = self._mono()
        fresh = self._slices[key] = Slice(policy, start, end, self._node_id, born=mono,
                                          rate_at=mono, asked_since=mono, used_at=mono)
        # Within a window the authority counts one grant per node, however many slices
        # the node went through (a returned one, one under a changed limit): a new slice
        # starts from what the node spent, or it could spend those units twice.
        if s is not None and (s.window_start, s.window_end) == (start, end):
            fresh.spent, fresh.holder = s.spent, s.holder
        elif not windowed:
            # No window ends to forget a spent count at: a new name starts a new count.
            self._holders += 1
            fresh.holder = f"{self._node_id}~{self._holders}"
        else:
            retired = self._retired.pop(key, None)
            if retired is not None and retired[0] == start:
                fresh.spent = retired[2]
        return fresh

    def _admit(self, namespace: str, key_hash: str, s: Slice, cost: int, label: str,
               now: int, mono: float) -> Result:
        s.spent += cost
        self._store.record(namespace, key_hash, s.policy, cost, True, now)
        self._metrics.count_check(label, True, "local")
        self._metrics.counters["lease_local_answers"] += 1
        if s.request is None and s.granted - s.spent < max(
                s.increment * REFILL_BELOW, self._demand(s, mono) * s.rtt_s * REFILL_RTTS):
            self._start_request(namespace, key_hash, s, want=0)
        return self._result(s, True, s.left(mono) + s.budget.free, now, "local", cost)

    def _deny(self, namespace: str, key_hash: str, s: Slice, cost: int, label: str,
              now: int) -> Result:
        if cost:
            self._store.record(namespace, key_hash, s.policy, cost, False, now)
        self._metrics.count_check(label, False, "local")
        return self._result(s, False, 0, now, "local", cost)

    @staticmethod
    def _result(s: Slice, allowed: bool, remaining: int, now: int, source: Source,
                cost: int) -> Result:
        policy = s.policy
        if ALGORITHMS[policy.algorithm].lease_windows:
            retry = None if allowed else max(1, s.window_end - now)
            return CheckResult(allowed, policy.limit, remaining, s.window_end, retry,
                               "lease", source)
        # Best effort: the node cannot see the global bucket. The cost refills in the
        # bucket this long from now (sooner if other nodes give tokens back), and it is
        # full when what the check could not see as remaining has refilled.
        per_token = policy.duration.ms
        retry = None if allowed else max(1, -(-max(1, cost) * per_token // policy.limit))
        missing = max(0, policy.capacity - remaining)
        return CheckResult(allowed, policy.limit, remaining,
                           now + -(-missing * per_token // policy.limit), retry, "lease",
                           source)

    async def _wait(self, namespace: str, key_hash: str, s: Slice, cost: int, label: str
                    ) -> Result:
        started = time.perf_counter()
        self._metrics.counters["lease_waits"] += 1
        deadline = self._mono() + s.policy.timeout.ms / 1000
        answered = False
        while (budget := deadline - self._mono()) > 0:
            if s.request is None:
                self._start_request(namespace, key_hash, s,
                                    want=max(0, cost - s.left(self._mono())))
            request = s.request
            assert request is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(request), budget)
            if not request.done():
                break
            grant = request.result()
            mono, now = self._mono(), self._clock()
            s = self._slice(namespace, key_hash, s.policy, now)
            if cost <= s.left(mono):
                self._metrics.latency.observe(time.perf_counter() - started)
                return self._admit(namespace, key_hash, s, cost, label, now, mono)
            if grant is not None:
                answered = True
                if grant.free < cost - s.left(mono):
                    # The authority has no more to give: deny, and deny further checks
                    # locally rather than asking again for every one.
                    s.budget.denied(mono, asked=True)
                    self._metrics.latency.observe(time.perf_counter() - started)
                    return self._deny(namespace, key_hash, s, cost, label, now)
            else:
                await asyncio.sleep(min(0.05, max(0.0, deadline - self._mono())))
        self._metrics.latency.observe(time.perf_counter() - started)
        return self._fallback(namespace, key_hash, s, cost, label, answered)

    def _fallback(self, namespace: str, key_hash: str, s: Slice, cost: int, label: str,
                  answered: bool) -> Result:
        now = self._clock()
        allowed = s.policy.on_unavailable == "open"
        # Admitted outside any slice: billed like every other admission, counted apart.
        self._store.record(namespace, key_hash, s.policy, cost, allowed, now)
        self._metrics.count_check(label, allowed, "fallback")
        self._metrics.fallbacks[label] = self._metrics.fallbacks.get(label, 0) + 1
        retry = None if allowed else s.policy.timeout.ms
        return CheckResult(allowed, s.policy.limit, 0, now + s.policy.timeout.ms, retry,
                           "lease", "fallback")

    # --- requests ----------------------------------------------------------------------

    def _start_request(self, namespace: str, key_hash: str, s: Slice, *, want: int) -> None:
        s.request = asyncio.get_running_loop().create_task(
            self._acquire(namespace, key_hash, s, want), name="lease-acquire")

    @staticmethod
    def _demand(s: Slice, mono: float) -> float:
        """The key's demand (cost per second) as of ``mono``."""
        average = s.rate * math.exp((s.rate_at - mono) / DEMAND_TAU_S)
        age = mono - s.born
        if age >= DEMAND_TAU_S:
            return average
        return max(average, s.cost_so_far / max(age, YOUNG_AGE_MIN_S))

    async def _acquire(self, namespace: str, key_hash: str, s: Slice, want: int
                       ) -> LeaseGrant | None:
        try:
            sent = self._mono()
            s.asked_since = sent
            grant = await self._ask("acquire", namespace, key_hash, s, want=want,
                                    demand=math.ceil(self._demand(s, sent)))
            if grant is not None:
                self._apply(namespace, key_hash, s, grant, sent)
            return grant
        finally:
            s.request = None

    async def _ask(self, op: str, namespace: str, key_hash: str, s: Slice, *, want: int,
                   demand: int) -> LeaseGrant | None:
        nc = self._link.nc
        if nc is None or not nc.is_connected:
            return None
        self._seq += 1
        request = LeaseRequest(op, namespace, key_hash, s.policy, s.holder,
                               self._region, window_start=s.window_start, used=s.spent,
                               seq=self._seq, want=min(want, s.policy.capacity),
                               demand=demand)
        self._metrics.counters["lease_requests"] += 1
        try:
            # Half the timeout per attempt: a request lost with a killed replica leaves
            # time to ask another one before on_unavailable has to decide, and a slow
            # authority still gets a fair chance to answer.
            reply = await nc.request(LEASE, encode_lease_request(request),
                                     timeout=max(s.policy.timeout.ms / 2000, MIN_ATTEMPT_S))
            return decode_lease_grant(reply.data)
        except UNAVAILABLE as exc:
            self._metrics.counters["lease_requests_failed"] += 1
            log.debug("lease %s unanswered (%s)", op, type(exc).__name__)
            return None

    def _apply(self, namespace: str, key_hash: str, s: Slice, grant: LeaseGrant,
               sent: float) -> None:
        current = self._slices.get((namespace, key_hash))
        if current is not s or grant.window_start != s.window_start:
            return  # the key moved to another window or policy meanwhile: not this slice
        s.increment = max(0, grant.granted - s.granted)
        s.rtt_s = self._mono() - sent
        # The authority's total is authoritative, even below what this node believed.
        s.granted = grant.granted
        s.ttl_s = grant.ttl_ms / 1000
        s.deadline = sent + s.ttl_s
        s.budget.answered(free=grant.free, grew=s.increment > 0, mono=self._mono())

    # --- returns and renewals ------------------------------------------------------------

    async def run(self) -> None:
        """Return idle keys' slices and renew active keys' leases, until cancelled."""
        while True:
            await asyncio.sleep(TICK_S)
            await self.tick()

    async def tick(self) -> None:
        now, mono = self._clock(), self._mono()
        returns = []
        for key, s in list(self._slices.items()):
            if now >= s.window_end:
                del self._slices[key]  # a grant ends with its window
            elif s.request is not None:
                continue
            elif mono - s.used_at >= self._idle_s:
                del self._slices[key]
                if ALGORITHMS[s.policy.algorithm].lease_windows:  # else: a new name next
                    self._retired[key] = (s.window_start, s.window_end, s.spent)
                if s.left(mono) > 0:
                    returns.append(self._give_back(*key, s))
            elif (keep := self._worth_keeping(s, mono)) is not None:
                self._start_trim(*key, s, keep)
            elif s.left(mono) > 0 and s.deadline - mono < RENEW_BEFORE * s.ttl_s:
                self._start_request(*key, s, want=0)
        self._forget_ended(now)
        if returns:
            await asyncio.gather(*returns)

    def _forget_ended(self, now: int, *, budget: int = 5_000) -> None:
        """Drop retired keys whose window has ended, ``budget`` of them per tick."""
        if not self._sweep:
            self._sweep = list(self._retired)
        chunk = self._sweep[-budget:]
        del self._sweep[-budget:]
        for key in chunk:
            retired = self._retired.get(key)
            if retired is not None and retired[1] <= now:
                del self._retired[key]

    @staticmethod
    def _worth_keeping(s: Slice, mono: float) -> int | None:
        """How much of a slice to keep when it holds far more than its recent demand
        needs while the free budget is short (others may be denied meanwhile); None to
        keep it all."""
        left = s.left(mono)
        if left <= s.budget.free or mono - s.asked_since < TRIM_AFTER_S:
            return None
        keep = int(LeaseClient._demand(s, mono) * KEEP_HORIZON_S) + 1
        return keep if left > 2 * keep else None

    def _start_trim(self, namespace: str, key_hash: str, s: Slice, keep: int) -> None:
        s.granted = s.spent + keep  # stop spending the rest first
        s.request = asyncio.get_running_loop().create_task(
            self._trim(namespace, key_hash, s, keep), name="lease-trim")

    async def _trim(self, namespace: str, key_hash: str, s: Slice, keep: int
                    ) -> LeaseGrant | None:
        try:
            self._metrics.counters["lease_returns"] += 1
            await self._ask("return", namespace, key_hash, s, want=keep, demand=0)
            return None  # a return's answer is not a grant to spend
        finally:
            s.request = None

    async def _give_back(self, namespace: str, key_hash: str, s: Slice) -> None:
        # Stop spending first: from here on the slice is only what was used.
        s.granted, s.deadline = s.spent, 0.0
        self._metrics.counters["lease_returns"] += 1
        await self._ask("return", namespace, key_hash, s, want=0, demand=0)

    async def stop(self) -> None:
        """Give every unused slice back (graceful stop), within a bounded time."""
        mono = self._mono()
        held = [(key, s) for key, s in self._slices.items() if s.left(mono) > 0]
        self._slices.clear()
        for _, s in held:
            if s.request is not None:
                s.request.cancel()
        if held:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(
                    *(self._give_back(*key, s) for key, s in held)), RETURN_TIMEOUT_S)
