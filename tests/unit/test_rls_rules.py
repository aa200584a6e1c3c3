"""The mapping rule from Envoy's domain + descriptor to a namespace and an identifier, the
[rls] table that configures it, shadow_mode in the node file, and the IETF RateLimit fields
(the middleware's copy is tested with the client package)."""

from __future__ import annotations

from typing import Any

import pytest

from region_node.policy_file import PolicyFileError, parse_policy_document
from region_node.ratelimit_fields import ietf_fields
from region_node.rls_rules import RlsRules, RuleError, parse_rls_rules
from sync.errors import InvalidField
from sync.policy import build_policy


def rules(text: dict[str, Any]) -> RlsRules:
    return parse_rls_rules({"rls": {"domains": text}}, source="node.toml")


def test_default_rule_joins_keys_into_the_namespace_and_values_into_the_identifier() -> None:
    default = RlsRules()
    assert default.map_descriptor("edge", [("remote_address", "10.0.0.1")], "d") == (
        "edge.remote_address", "10.0.0.1")
    assert default.map_descriptor("edge", [("generic_key", "checkout"), ("user", "u1")],
                                  "d") == ("edge.generic_key.user", "checkout|u1")
    assert default.map_descriptor("edge", [("generic_key", "")], "d") == (
        "edge.generic_key", "*")


def test_a_domain_table_fixes_the_namespace_or_names_its_key_and_the_identifier() -> None:
    configured = rules({"gw": {"namespace": "api", "identifier_keys": ["api_key"]},
                        "plans": {"namespace_key": "plan"}})
    assert configured.map_descriptor("gw", [("route", "/a"), ("api_key", "k")], "d") == (
        "api", "k")
    assert configured.map_descriptor("plans", [("plan", "gold"), ("user", "u")], "d") == (
        "gold", "u")
    assert configured.map_descriptor("plans", [("plan", "gold")], "d") == ("gold", "*")
    with pytest.raises(RuleError, match="no 'plan' entry"):
        configured.map_descriptor("plans", [("user", "u")], "descriptors[0]")
    with pytest.raises(RuleError, match="lacks the 'api_key' entry"):
        configured.map_descriptor("gw", [("user", "u")], "descriptors[0]")


@pytest.mark.parametrize(("table", "field"), [
    ({"gw": {"namespace": "a", "namespace_key": "b"}}, "namespace"),
    ({"gw": {"namespace": ""}}, "namespace"),
    ({"gw": {"identifier_keys": "api_key"}}, "identifier_keys"),
    ({"gw": {"namespaces": "a"}}, "namespaces"),
    ({"gw": "api"}, "rls.domains"),
])
def test_bad_rls_tables_name_the_entry(table: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidField) as caught:
        rules(table)
    assert caught.value.field == field
    assert "node.toml: rls.domains.gw" in caught.value.message


def test_shadow_mode_in_the_node_file() -> None:
    parsed = parse_policy_document({"namespaces": {"api": {
        "limit": 5, "duration": "1h", "shadow_mode": True,
        "overrides": [{"identifier_hash": "0" * 32, "shadow_mode": False}]}}}, source="f")
    assert parsed["api"].policy.shadow_mode is True
    assert parsed["api"].overrides["0" * 32].shadow_mode is False
    with pytest.raises(PolicyFileError, match="shadow_mode must be true or false"):
        parse_policy_document({"namespaces": {"api": {
            "limit": 5, "duration": "1h", "shadow_mode": "yes"}}}, source="f")


def test_ietf_fields_follow_the_draft_syntax() -> None:
    hourly = build_policy(limit=100, duration="1h")
    assert ietf_fields("api", hourly, 42, 1_001) == [
        (b"ratelimit-policy", b'"api";q=100;w=3600'), (b"ratelimit", b'"api";r=42;t=2')]
    monthly = build_policy(limit=9, duration="month", algorithm="fixed_window")
    assert ietf_fields("m", monthly, 0, 0)[0] == (b"ratelimit-policy", b'"m";q=9')
