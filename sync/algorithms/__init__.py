"""Limit algorithms, by name. Each decides on a KeyState in memory; none does I/O."""

from __future__ import annotations

from sync.algorithms.base import Algorithm, Decision
from sync.algorithms.fixed_window import FixedWindow
from sync.algorithms.sliding_window import SlidingWindow
from sync.algorithms.token_bucket import TokenBucket

ALGORITHMS: dict[str, Algorithm] = {
    "fixed_window": FixedWindow(),
    "sliding_window": SlidingWindow(),
    "token_bucket": TokenBucket(),
}

__all__ = ["ALGORITHMS", "Algorithm", "Decision"]
