"""Which subjects a tick's changed totals go to: the interest rule (sync/interest.py) applied.

Cold keys go nowhere; hot keys go to the nodes that serve them, each on its own subject;
blocked keys go to every node on their partition's subject. During a rollout, nodes of the
previous release listen only on the one shared totals subject: while any such node has
sent usage recently, every total that goes anywhere also goes there. With partitions, one
``LegacyNodes`` serves every partition a replica leads, and the replicas tell each other
(the roster's heartbeat) whether they saw such a node, since an old node needs the blocks
of every partition, not only of those its keys fall in.

The share applies only where the over-admission argument holds for it: fixed windows
(one window, no remote debits). A sliding window weighs the previous window, and a token
bucket carries its level across windows, so "below share of this window's limit" does not
mean "harmless to be blind"; their totals go to the serving nodes from the first unit on
(share 0), still never to nodes that do not serve them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from sync.algorithms import ALGORITHMS
from sync.errors import InvalidField
from sync.interest import Audience, delivery
from sync.messages import KeyTotal, UsageBatch
from sync.partitions import node_totals_subject, partition_of, partition_totals_subject
from sync.policy import Policy
from sync.subjects import TOTALS

LEGACY_QUIET_MS = 300_000  # a previous-release node silent this long is gone


def share_for(algorithm: str, share: float) -> float:
    """The broadcast share that keeps the over-admission bound for ``algorithm``."""
    rules = ALGORITHMS[algorithm]
    if rules.blocks and rules.past_windows == 0 and not rules.debits_remote:
        return share
    return 0.0


@dataclass(slots=True)
class LegacyNodes:
    """Nodes of the previous release (their usage batches lack the ``addressed`` mark),
    by the time they last sent usage."""

    last_seen: dict[str, int] = field(default_factory=dict)
    # Whether another central replica saw such a node (it says so in its heartbeat).
    elsewhere: Callable[[], bool] = lambda: False

    def saw(self, batch: UsageBatch) -> None:
        if batch.addressed:
            self.last_seen.pop(batch.node_id, None)
        else:
            self.last_seen[batch.node_id] = batch.flushed_at

    def active(self, now: int) -> bool:
        return self.seen_here(now) or self.elsewhere()

    def seen_here(self, now: int) -> bool:
        """Whether this replica itself received usage of such a node lately."""
        for node_id, seen in list(self.last_seen.items()):
            if seen + LEGACY_QUIET_MS > now:
                return True
            del self.last_seen[node_id]
        return False


@dataclass(slots=True)
class RoutedTotals:
    """Totals by subject, and how many went addressed and broadcast (for metrics)."""

    by_subject: dict[str, list[KeyTotal]] = field(default_factory=dict)
    addressed: int = 0
    broadcast: int = 0

    def add(self, subject: str, total: KeyTotal) -> None:
        self.by_subject.setdefault(subject, []).append(total)


class TotalsRouter:
    def __init__(self, *, share: float, partitions: int,
                 legacy: LegacyNodes | None = None) -> None:
        self.share = share
        self.partitions = partitions
        self.legacy = legacy if legacy is not None else LegacyNodes()
        self._node_subjects: dict[str, str | None] = {}

    def _node_subject(self, node_id: str) -> str | None:
        """The node's own subject, or None for an id that cannot be a subject token (a
        previous release's ``region.host.hex``): such a node gets the shared subject."""
        if node_id not in self._node_subjects:
            try:
                subject: str | None = node_totals_subject(node_id)
            except InvalidField:
                subject = None
            if len(self._node_subjects) > 100_000:  # ids are per process start
                self._node_subjects.clear()
            self._node_subjects[node_id] = subject
        return self._node_subjects[node_id]

    def wanted(self, *, total: int, policy: Policy, blocked_until: int, now: int) -> bool:
        """Whether a key-window's total goes anywhere (``route`` drops the rest): lets
        the caller skip building totals of cold keys."""
        return delivery(total=total, limit=policy.limit, blocked=blocked_until > now,
                        served_by=(), share=share_for(policy.algorithm, self.share)
                        ).audience is not Audience.NONE

    def route(self, totals: Iterable[KeyTotal], now: int) -> RoutedTotals:
        routed = RoutedTotals()
        legacy = self.legacy.active(now)
        for total in totals:
            blocked = total.blocked_until > now
            audience = delivery(
                total=total.total, limit=total.policy.limit, blocked=blocked,
                served_by=total.components,
                share=share_for(total.policy.algorithm, self.share))
            if audience.audience is Audience.NONE:
                continue
            shared = legacy
            if audience.audience is Audience.EVERYONE:
                routed.add(partition_totals_subject(partition_of(
                    total.namespace, total.key_hash, partitions=self.partitions)), total)
                routed.broadcast += 1
            else:
                for node_id in sorted(audience.node_ids):
                    subject = self._node_subject(node_id)
                    if subject is None:
                        shared = True
                    else:
                        routed.add(subject, total)
                        routed.addressed += 1
            if shared:
                routed.add(TOTALS, total)
                routed.broadcast += 1
        return routed
