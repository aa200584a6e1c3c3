"""Keyed hashing of raw identifiers (API keys, user ids, IPs) on arrival."""

from __future__ import annotations

import hashlib
import re
from typing import TypeGuard

from sync.errors import InvalidField

DIGEST_SIZE = 16  # 128 bits: 32 hex characters
# The shape of every identifier hash: the HTTP APIs and the message decoder both check it.
HASH_PATTERN = f"^[0-9a-f]{{{DIGEST_SIZE * 2}}}$"
KEY_HASH = re.compile(HASH_PATTERN[1:-1])  # with fullmatch
# The contract's identifier rule, in its one home: every path (node checks, admin API,
# usage queries, the command line) asks is_identifier / check_identifier.
MAX_IDENTIFIER_BYTES = 256
IDENTIFIER_RULE = f"identifier must be a string of 1..{MAX_IDENTIFIER_BYTES} bytes"


def is_identifier(value: object) -> TypeGuard[str]:
    """A str of 1..256 bytes UTF-8. Cheap on the check path: a string of at most 64
    characters cannot exceed 256 bytes, so only longer ones are encoded to measure."""
    return (isinstance(value, str) and value != ""
            and (len(value) <= MAX_IDENTIFIER_BYTES // 4
                 or len(value.encode()) <= MAX_IDENTIFIER_BYTES))


def check_identifier(value: object, *, field: str = "identifier") -> str:
    """The identifier itself, or InvalidField naming `field`."""
    if not is_identifier(value):
        raise InvalidField(field, IDENTIFIER_RULE)
    return value


class IdentifierHasher:
    """Keyed BLAKE2b: without the secret, an IPv4 address can't be recovered by enumeration."""

    __slots__ = ("_key",)

    def __init__(self, secret: str | bytes) -> None:
        raw = secret.encode() if isinstance(secret, str) else secret
        if not raw:
            raise ValueError("identifier secret must not be empty")
        # BLAKE2b keys are at most 64 bytes; longer secrets are condensed first.
        self._key = raw if len(raw) <= 64 else hashlib.blake2b(raw).digest()

    def hash(self, identifier: str) -> str:
        return hashlib.blake2b(
            identifier.encode(), key=self._key, digest_size=DIGEST_SIZE
        ).hexdigest()
