"""A lease-mode key whose budget is spent: deny on the node, re-ask in the background.

Pure (no I/O, time passed in). Without this, every check after the budget is spent would
wait a round trip for the authority's "no". Instead the node remembers the free budget
of the authority's last answer per key and denies a check that it cannot cover at once:

- when that answer is recent (under ``RECHECK_S`` old), or
- while the key is *exhausted*: a check was denied for want of budget and no answer has
  added to the node's slice since. Then a check that finds a re-ask due (at most one
  every ``RECHECK_S``, so only while checks keep arriving) asks again in the
  background, so budget another region gives back is found within about ``RECHECK_S``
  plus a round trip.

A local deny never admits, so exactness does not depend on any of this. A new window (or
policy) starts a new slice and so a fresh ``Exhaustion``: a fixed window's exhaustion
ends with its window.
"""

from __future__ import annotations

from dataclasses import dataclass

RECHECK_S = 0.5  # an exhausted key asks the authority again at most this often


@dataclass(slots=True)
class Exhaustion:
    free: int = 0  # budget nobody held, as of the authority's last answer
    answered_at: float | None = None  # monotonic time of that answer
    exhausted: bool = False
    recheck_at: float = 0.0  # monotonic: no re-ask before this

    def answered(self, *, free: int, grew: bool, mono: float) -> None:
        """The authority answered: ``free`` is left, and the node's slice ``grew`` or not."""
        self.free, self.answered_at = free, mono
        if grew:
            self.exhausted = False

    def denies(self, need: int, mono: float) -> bool:
        """Whether a check needing ``need`` beyond the node's slice is denied without
        asking the authority."""
        if need <= self.free or self.answered_at is None:
            return False
        return self.exhausted or mono - self.answered_at < RECHECK_S

    def denied(self, mono: float, *, asked: bool) -> bool:
        """A check was denied for want of budget, ``asked`` of the authority just now or
        locally. Returns whether to re-ask in the background now."""
        self.exhausted = True
        if asked:
            self.recheck_at = mono + RECHECK_S
            return False
        if mono < self.recheck_at:
            return False
        self.recheck_at = mono + RECHECK_S
        return True
