"""The IETF httpapi RateLimit header fields, draft-ietf-httpapi-ratelimit-headers-10.

That draft replaces the older ``RateLimit-Limit/-Remaining/-Reset`` triple with two
structured fields (RFC 8941 lists of items):

    RateLimit-Policy: "api";q=100;w=60      quota q per window w seconds, named policy
    RateLimit: "api";r=42;t=17              remaining r, seconds t until the quota resets

The policy name is the namespace (its characters are all valid in a structured-field
string). ``w`` is left out for calendar-month windows, whose length varies.
"""

from __future__ import annotations

from sync.policy import Policy

Headers = list[tuple[bytes, bytes]]
DRAFT = "draft-ietf-httpapi-ratelimit-headers-10"


def ceil_seconds(ms: int) -> int:
    return max(0, -(-ms // 1000))


def policy_item(name: str, policy: Policy) -> bytes:
    """One RateLimit-Policy item: quota ``q`` (the limit) per window ``w`` seconds."""
    if policy.duration.is_month:
        return f'"{name}";q={policy.limit}'.encode()
    return f'"{name}";q={policy.limit};w={ceil_seconds(policy.duration.ms)}'.encode()


def ietf_fields(name: str, policy: Policy, remaining: int, reset_in_ms: int) -> Headers:
    """``RateLimit-Policy`` and ``RateLimit`` for one decision on policy ``name``."""
    return [
        (b"ratelimit-policy", policy_item(name, policy)),
        (b"ratelimit", f'"{name}";r={remaining};t={ceil_seconds(reset_in_ms)}'.encode()),
    ]
