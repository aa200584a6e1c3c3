"""The interest rule: which totals central sends to which node, and which a node keeps.

Most keys of an API-key limiter are cold: far below their limit, served by one node.
Sending every key's total to every node costs every node memory and decoding for keys it
never checks. The rule:

- Central sends a key's total only once the key is *hot*: its global total has reached
  ``broadcast_share`` of its limit (``REGIONLIMIT_BROADCAST_SHARE``, default 0.5), or the
  key is blocked. Below that share no node needs other nodes' counts to decide: even if
  all of them were admitted at once, the key stays below its limit.
- A hot key's total is *addressed* to the nodes that served it in its window (they have
  a component in it); a blocked key goes to every node (the partition's subject), so a
  block reaches every node within one tick, including nodes that never served the key.
- A node keeps: keys it served in the window, keys central addressed to it, blocked keys
  until they unblock. It drops the rest on receipt, without storing them.

Effect on the over-admission bound (see docs/central-at-scale.md for the derivation):
with D the delay from an admission on one node to its visibility on another (flush +
central tick + delivery) and r_i the admission rate of node i for one key, today the
excess over the limit is at most sum_i r_i * D. Under this rule a node learns the others'
usage only once the key is hot, but the key turns hot at ``share * limit`` <= limit, and
from then on totals flow as before; the same bound holds:
excess <= max(0, share * limit + sum_i r_i * D - limit) <= sum_i r_i * D.
A node that starts serving an already hot key learns its total one D after its first
flush (it was not addressed before), which that same bound covers.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from sync.errors import InvalidField

DEFAULT_BROADCAST_SHARE = 0.5


class InterestSettings(BaseSettings):
    """``REGIONLIMIT_BROADCAST_SHARE``: share of the limit from which totals travel."""

    model_config = SettingsConfigDict(env_prefix="REGIONLIMIT_", extra="ignore")

    broadcast_share: float = Field(default=DEFAULT_BROADCAST_SHARE, ge=0.0, le=1.0)


class Audience(Enum):
    NONE = "none"  # cold: nobody needs it
    SERVING = "serving"  # hot: the nodes that served the key
    EVERYONE = "everyone"  # blocked: every node of the partition


@dataclass(frozen=True, slots=True)
class Delivery:
    audience: Audience
    node_ids: frozenset[str]  # for SERVING; empty otherwise


NOBODY = Delivery(Audience.NONE, frozenset())


def _check_share(share: float) -> None:
    if not 0.0 <= share <= 1.0:
        raise InvalidField("broadcast_share", f"must be between 0 and 1; got {share!r}")


def is_hot(total: int, limit: int, *, share: float = DEFAULT_BROADCAST_SHARE) -> bool:
    """The key's total has reached ``share`` of its limit (integers: no rounding)."""
    _check_share(share)
    # total >= share * limit without float error for big limits: compare in integers
    # on the share's exact rational value.
    numerator, denominator = share.as_integer_ratio()
    return total * denominator >= numerator * limit


def delivery(*, total: int, limit: int, blocked: bool, served_by: Iterable[str],
             share: float = DEFAULT_BROADCAST_SHARE) -> Delivery:
    """Who must receive a changed key's total at the next tick."""
    if blocked:
        return Delivery(Audience.EVERYONE, frozenset())
    if is_hot(total, limit, share=share):
        return Delivery(Audience.SERVING, frozenset(served_by))
    return NOBODY


def node_keeps(*, served_in_window: bool, addressed: bool, blocked: bool) -> bool:
    """Whether a node stores a total it received (else it drops it undecoded further)."""
    return served_in_window or addressed or blocked


def blind_excess(*, limit: int, share: float, rates_per_s: Iterable[float],
                 delay_s: float) -> float:
    """The worst excess over ``limit`` reached while nodes were blind to each other (the
    key was cold): at most ``share * limit`` was flushed, plus what the nodes admitted in
    the delay D before the first total reached them."""
    _check_share(share)
    # Written as steady - (1 - share) * limit, not share * limit + steady - limit: in floats
    # the latter can round above the steady excess it can never exceed.
    return max(0.0, sum(rates_per_s) * delay_s - (1.0 - share) * limit)


def over_admission_bound(*, limit: int, share: float, rates_per_s: Iterable[float],
                         delay_s: float) -> float:
    """The worst excess over ``limit`` of one key under the rule: the larger of the
    blind phase's and the steady state's (sum r_i * D, as without the rule), which is
    always the latter since ``share <= 1``."""
    rates = list(rates_per_s)
    steady = sum(rates) * delay_s
    return max(steady, blind_excess(limit=limit, share=share, rates_per_s=rates,
                                    delay_s=delay_s))
