"""A consecutive-failure circuit breaker shared by the blocking and the async client."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Literal

__all__ = ["BreakerState", "CircuitBreaker"]

logger = logging.getLogger(__name__)

BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Consecutive-failure breaker: closed -> open (cool-down) -> half-open (one probe).

    Thread-safe; the lock is never held across I/O, so it is equally cheap in async code.
    `clock` is injectable so tests step through cool-downs without sleeping.
    """

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        cool_down: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        name: str = "rate limiter",
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if cool_down < 0:
            raise ValueError("cool_down must be >= 0")
        self.failure_threshold = failure_threshold
        self.cool_down = cool_down
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._state: BreakerState = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False

    @property
    def state(self) -> BreakerState:
        return self._state

    def allow(self) -> bool:
        """May a call go to the limiter now? In half-open, True for the one probe only."""
        with self._lock:
            if self._state == "closed":
                return True
            if self._state == "open":
                if self._clock() - self._opened_at < self.cool_down:
                    return False
                self._state = "half_open"
            if self._probe_in_flight:
                return False
            self._probe_in_flight = True
        logger.info("circuit to %s half-open: probing", self.name)
        return True

    def retry_in(self) -> float:
        """Seconds until the next probe may go out (0 unless open)."""
        with self._lock:
            if self._state != "open":
                return 0.0
            return max(0.0, self._opened_at + self.cool_down - self._clock())

    def record_success(self) -> None:
        with self._lock:
            was = self._state
            self._state = "closed"
            self._failures = 0
            self._probe_in_flight = False
        if was != "closed":
            logger.warning("circuit to %s closed: the limiter answers again", self.name)

    def record_failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._state == "open":
                # A call that started before the circuit opened: the cool-down stands.
                return
            if self._state == "closed" and self._failures < self.failure_threshold:
                return
            self._state = "open"
            self._opened_at = self._clock()
            self._probe_in_flight = False
            failures = self._failures
        logger.warning(
            "circuit to %s open for %.1fs after %d consecutive failures",
            self.name,
            self.cool_down,
            failures,
        )

    def release(self) -> None:
        """A call ended with neither answer nor failure (cancelled): free the probe slot."""
        with self._lock:
            self._probe_in_flight = False
