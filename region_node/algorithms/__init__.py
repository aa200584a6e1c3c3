"""Limit algorithms, by name. Each decides on a KeyState in memory; none does I/O."""

from __future__ import annotations

from region_node.algorithms.base import Algorithm, Decision
from region_node.algorithms.fixed_window import FixedWindow
from region_node.algorithms.sliding_window import SlidingWindow
from region_node.algorithms.token_bucket import TokenBucket

ALGORITHMS: dict[str, Algorithm] = {
    "fixed_window": FixedWindow(),
    "sliding_window": SlidingWindow(),
    "token_bucket": TokenBucket(),
}

__all__ = ["ALGORITHMS", "Algorithm", "Decision"]
