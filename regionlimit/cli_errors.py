"""What every `regionlimit` command shares: the one-line error and the --dev secret."""

from __future__ import annotations

import secrets
import sys

from pydantic import ValidationError


class CliError(Exception):
    """A one-line message for stderr and a non-zero exit."""


def settings_error(exc: ValidationError) -> CliError:
    first = exc.errors()[0]
    name = "REGIONLIMIT_" + str(first["loc"][0]).upper() if first["loc"] else "settings"
    return CliError(f"{name}: {first['msg']}")


def dev_secret(kind: str) -> str:
    value = secrets.token_urlsafe(32)
    print(f"WARNING: --dev: using a generated {kind}; do not use --dev in production",
          file=sys.stderr)
    return value
