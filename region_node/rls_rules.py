"""How an Envoy rate limit request names regionlimit checks: domain + descriptor -> namespace
+ identifier (the mapping rule of docs/gateways.md).

The default rule, for any domain:

    namespace  = "<domain>.<key 1>.<key 2>..."   (the descriptor's entry keys, in order)
    identifier = "<value 1>|<value 2>..."         (its entry values, in order)

so ``domain: edge`` with ``[("remote_address", "10.0.0.1")]`` is a check of namespace
``edge.remote_address`` for identifier ``10.0.0.1``. A ``[rls.domains.NAME]`` table in the
node's policy file changes that for one domain:

    namespace = "api"          every descriptor of the domain counts in namespace "api"
    namespace_key = "plan"     the value of the "plan" entry is the namespace
    identifier_keys = ["key"]  only these entries (in this order) form the identifier

A descriptor with no identifying entry (only a ``generic_key``, say) has the identifier
``*``: one counter shared by every request that carries it.
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sync.errors import InvalidField

SHARED_IDENTIFIER = "*"
IDENTIFIER_SEPARATOR = "|"
MAX_DESCRIPTORS = 64  # Envoy sends one per matching rate limit action; more is a bug
MAX_ENTRIES = 16
DOMAIN_FIELDS = ("namespace", "namespace_key", "identifier_keys")
Entries = Sequence[tuple[str, str]]


class RuleError(InvalidField):
    """A request the rule cannot map; ``field`` names the request part (no values: an
    entry value may be a raw identifier, which is never echoed)."""


@dataclass(frozen=True, slots=True)
class DomainRule:
    namespace: str | None = None
    namespace_key: str | None = None
    identifier_keys: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class RlsRules:
    domains: dict[str, DomainRule] = field(default_factory=dict)

    def map_descriptor(self, domain: str, entries: Entries, where: str) -> tuple[str, str]:
        """(namespace, raw identifier) of one descriptor; RuleError names what is wrong."""
        if not entries:
            raise RuleError(f"{where}.entries", f"{where} has no entries")
        if len(entries) > MAX_ENTRIES:
            raise RuleError(f"{where}.entries", f"{where} has more than {MAX_ENTRIES} entries")
        for i, (key, _) in enumerate(entries):
            if not key:
                raise RuleError(f"{where}.entries[{i}].key", f"{where}.entries[{i}] has an "
                                "empty key")
        rule = self.domains.get(domain, DomainRule())
        rest = list(entries)
        namespace = rule.namespace
        if rule.namespace_key is not None:
            named = [value for key, value in entries if key == rule.namespace_key]
            if not named:
                raise RuleError(f"{where}.entries", f"{where} has no {rule.namespace_key!r} "
                                f"entry, which names the namespace in domain {domain!r}")
            namespace = named[0]
            rest = [(k, v) for k, v in entries if k != rule.namespace_key]
        if namespace is None:
            namespace = ".".join([domain, *(key for key, _ in rest)])
        if rule.identifier_keys is not None:
            values = dict(rest)
            missing = [key for key in rule.identifier_keys if key not in values]
            if missing:
                raise RuleError(f"{where}.entries", f"{where} lacks the {missing[0]!r} entry "
                                f"that identifies the caller in domain {domain!r}")
            parts = [values[key] for key in rule.identifier_keys]
        else:
            parts = [value for _, value in rest]
        identifier = IDENTIFIER_SEPARATOR.join(parts) if parts else SHARED_IDENTIFIER
        return namespace, identifier or SHARED_IDENTIFIER


def load_rls_rules(path: Path | None) -> RlsRules:
    """The ``[rls]`` table of the node's policy file (the default rule without one)."""
    if path is None:
        return RlsRules()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidField(None, f"{path}: {exc}") from None
    return parse_rls_rules(data, source=str(path))


def parse_rls_rules(data: dict[str, Any], *, source: str) -> RlsRules:
    table = data.get("rls", {})
    if not isinstance(table, dict):
        raise InvalidField("rls", f"{source}: [rls] must be a table")
    unknown = set(table) - {"domains"}
    if unknown:
        raise InvalidField("rls", f"{source}: rls: unknown key {sorted(unknown)[0]!r}")
    domains = table.get("domains", {})
    if not isinstance(domains, dict):
        raise InvalidField("rls.domains", f"{source}: [rls.domains] must be a table")
    return RlsRules({name: _domain_rule(rule, f"{source}: rls.domains.{name}")
                     for name, rule in domains.items()})


def _domain_rule(table: object, where: str) -> DomainRule:
    if not isinstance(table, dict):
        raise InvalidField("rls.domains", f"{where} must be a table")
    unknown = set(table) - set(DOMAIN_FIELDS)
    if unknown:
        raise InvalidField(sorted(unknown)[0], f"{where}: unknown key {sorted(unknown)[0]!r}")
    namespace, key, identifier_keys = (table.get(name) for name in DOMAIN_FIELDS)
    if namespace is not None and key is not None:
        raise InvalidField("namespace", f"{where}: give namespace or namespace_key, not both")
    for name, value in (("namespace", namespace), ("namespace_key", key)):
        if value is not None and (not isinstance(value, str) or not value):
            raise InvalidField(name, f"{where}.{name} must be a non-empty string")
    if identifier_keys is not None and (
            not isinstance(identifier_keys, list)
            or not all(isinstance(k, str) and k for k in identifier_keys)):
        raise InvalidField("identifier_keys", f"{where}.identifier_keys must be a list of "
                           "entry keys")
    return DomainRule(namespace, key,
                      None if identifier_keys is None else tuple(identifier_keys))
