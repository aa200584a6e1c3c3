"""The node's TOML policy file (API.md: [namespaces.NAME] and [[namespaces.NAME.overrides]])."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from region_node.policies import NamespaceConfig
from sync.errors import InvalidField
from sync.policy import NAMESPACE, POLICY_FIELDS, Policy, build_policy

HASH_PATTERN = re.compile(r"[0-9a-f]{32}")


class PolicyFileError(InvalidField):
    """Names the file and the dotted path of the bad entry."""


def load_policy_file(path: Path) -> dict[str, NamespaceConfig]:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise PolicyFileError(None, f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyFileError(None, f"{path}: {exc}") from None
    return parse_policy_document(data, source=str(path))


def parse_policy_document(data: dict[str, Any], *, source: str) -> dict[str, NamespaceConfig]:
    namespaces = data.get("namespaces", {})
    if not isinstance(namespaces, dict):
        raise PolicyFileError("namespaces", f"{source}: [namespaces] must be a table")
    result = {}
    for name, table in namespaces.items():
        where = f"namespaces.{name}"
        if not NAMESPACE.fullmatch(name):
            raise PolicyFileError(where, f"{source}: bad namespace name {name!r}")
        if not isinstance(table, dict):
            raise PolicyFileError(where, f"{source}: {where} must be a table")
        base = _policy(table, f"{source}: {where}", extra="overrides")
        items = table.get("overrides", [])
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise PolicyFileError(f"{where}.overrides", f"{source}: {where}.overrides must be "
                                  f"an array of tables ([[{where}.overrides]])")
        overrides: dict[str, Policy] = {}
        for i, item in enumerate(items):
            at = f"{where}.overrides[{i}]"
            key_hash = item.get("identifier_hash")
            if not isinstance(key_hash, str) or not HASH_PATTERN.fullmatch(key_hash):
                raise PolicyFileError(f"{at}.identifier_hash", f"{source}: {at}.identifier_hash "
                                      "must be 32 lowercase hex characters (regionlimit hash)")
            if key_hash in overrides:
                raise PolicyFileError(f"{at}.identifier_hash", f"{source}: {at}.identifier_hash "
                                      "repeats an earlier override of the same identifier")
            inherited = base.to_dict()
            if "burst" not in item and item.get("algorithm", base.algorithm) != "token_bucket":
                # An override that leaves the token bucket leaves its burst behind too.
                inherited["burst"] = None
            overrides[key_hash] = _policy({**inherited, **item}, f"{source}: {at}",
                                          extra="identifier_hash")
        result[name] = NamespaceConfig(base, overrides)
    return result


def _policy(table: dict[str, Any], where: str, *, extra: str) -> Policy:
    unknown = set(table) - set(POLICY_FIELDS) - {extra}
    if unknown:
        raise PolicyFileError(sorted(unknown)[0], f"{where}: unknown key {sorted(unknown)[0]!r}")
    try:
        return build_policy(**{k: table.get(k) for k in POLICY_FIELDS})
    except InvalidField as exc:
        raise PolicyFileError(exc.field, f"{where}.{exc.field}: {exc.message}") from None
