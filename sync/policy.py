"""A resolved limit policy: what every check, usage entry and consistent request carries."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sync.durations import Duration, parse_duration
from sync.errors import InvalidField

ALGORITHMS = ("fixed_window", "sliding_window", "token_bucket")
# Lease mode splits a budget into slices, one per node: a fixed window's limit, or a token
# bucket's tokens (withdrawn from one global bucket at central). A sliding window's budget
# depends on the previous window's weight at each instant: no slices (docs/lease-mode.md).
LEASE_ALGORITHMS = ("fixed_window", "token_bucket")
MODES = ("fast", "consistent", "lease")
ON_UNAVAILABLE = ("open", "closed")
MAX_LIMIT = 1_000_000_000_000
DEFAULT_ALGORITHM = "sliding_window"
DEFAULT_TIMEOUT = "250ms"
DEFAULT_TIMEOUT_DURATION = Duration(DEFAULT_TIMEOUT, 250)
MAX_TIMEOUT_MS = 60_000
# Patterns the OpenAPI documents give (the check path validates by hand, to the same rules).
NAMESPACE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # with fullmatch
NAMESPACE_PATTERN = f"^{NAMESPACE.pattern}$"
DURATION_PATTERN = r"^([1-9][0-9]{0,10}(ms|s|m|h|d)|month)$"
POLICY_FIELDS = ("limit", "duration", "algorithm", "burst", "mode", "on_unavailable", "timeout",
                 "shadow_mode")


@dataclass(frozen=True, slots=True)
class Policy:
    limit: int
    duration: Duration
    algorithm: str = DEFAULT_ALGORITHM
    burst: int | None = None
    mode: str = "fast"
    on_unavailable: str = "open"
    timeout: Duration = DEFAULT_TIMEOUT_DURATION
    # Count and bill every check but never deny: a new limit can be watched before it bites.
    shadow_mode: bool = False

    @property
    def capacity(self) -> int:
        """The largest cost one check may carry: ``burst`` for a token bucket, else ``limit``."""
        if self.algorithm == "token_bucket" and self.burst is not None:
            return self.burst
        return self.limit

    def to_dict(self) -> dict[str, Any]:
        return {
            "limit": self.limit,
            "duration": self.duration.text,
            "algorithm": self.algorithm,
            "burst": self.burst,
            "mode": self.mode,
            "on_unavailable": self.on_unavailable,
            "timeout": self.timeout.text,
            "shadow_mode": self.shadow_mode,
        }


def _positive_int(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidField(field, f"{field} must be an integer")
    if not 1 <= value <= MAX_LIMIT:
        raise InvalidField(field, f"{field} must be 1..{MAX_LIMIT}")
    return value


def _choice(value: object, field: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise InvalidField(field, f"{field} must be one of {', '.join(choices)}")
    assert isinstance(value, str)
    return value


def build_policy(
    *,
    limit: object,
    duration: object,
    algorithm: object = None,
    burst: object = None,
    mode: object = None,
    on_unavailable: object = None,
    timeout: object = None,
    shadow_mode: object = None,
) -> Policy:
    """Validate raw fields (JSON, TOML or msgpack) into a Policy; InvalidField names the culprit."""
    if limit is None:
        raise InvalidField("limit", "limit is required")
    checked_limit = _positive_int(limit, "limit")
    if duration is None:
        raise InvalidField("duration", "duration is required")
    parsed = parse_duration(duration, field="duration")
    if algorithm is None:
        # A calendar month can only be counted in fixed windows: asking for a month is
        # asking for that, not for the default algorithm and a 422.
        algorithm = "fixed_window" if parsed.is_month else DEFAULT_ALGORITHM
    algo = _choice(algorithm, "algorithm", ALGORITHMS)
    if parsed.is_month and algo != "fixed_window":
        raise InvalidField("duration", "duration 'month' works only with algorithm fixed_window")
    checked_burst: int | None = None
    if burst is not None:
        checked_burst = _positive_int(burst, "burst")
        if algo != "token_bucket":
            raise InvalidField("burst", "burst applies only to algorithm token_bucket")
    timeout_d = parse_duration(timeout if timeout is not None else DEFAULT_TIMEOUT,
                               field="timeout")
    if timeout_d.is_month or timeout_d.ms > MAX_TIMEOUT_MS:
        raise InvalidField("timeout", f"timeout must be 1ms..{MAX_TIMEOUT_MS // 1000}s")
    if shadow_mode is not None and not isinstance(shadow_mode, bool):
        raise InvalidField("shadow_mode", "shadow_mode must be true or false")
    checked_mode = _choice(mode if mode is not None else "fast", "mode", MODES)
    if checked_mode == "lease":
        _check_sliceable(algo)
    return Policy(
        limit=checked_limit,
        duration=parsed,
        algorithm=algo,
        burst=checked_burst,
        mode=checked_mode,
        on_unavailable=_choice(
            on_unavailable if on_unavailable is not None else "open", "on_unavailable",
            ON_UNAVAILABLE,
        ),
        timeout=timeout_d,
        shadow_mode=bool(shadow_mode),
    )


def _check_sliceable(algorithm: str) -> None:
    if algorithm not in LEASE_ALGORITHMS:
        raise InvalidField("algorithm", "mode lease works only with algorithm "
                           + " or ".join(LEASE_ALGORITHMS))


def policy_from_dict(data: dict[str, Any]) -> Policy:
    return build_policy(
        limit=data.get("limit"),
        duration=data.get("duration"),
        algorithm=data.get("algorithm"),
        burst=data.get("burst"),
        mode=data.get("mode"),
        on_unavailable=data.get("on_unavailable"),
        timeout=data.get("timeout"),
        shadow_mode=data.get("shadow_mode"),
    )
