"""The node's TOML policy file (region_node/policy_file.py) and policy resolution
(region_node/policies.py): configured namespaces and per-identifier overrides win over
inline fields; every mistake in the file names the file and the dotted path of the entry."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from region_node.policies import NamespaceConfig, PolicyResolver
from region_node.policy_file import PolicyFileError, load_policy_file, parse_policy_document
from sync.api_errors import ApiError, UnknownNamespace
from sync.identifiers import IdentifierHasher
from sync.policy import build_policy

HASHER = IdentifierHasher("s")
VIP = HASHER.hash("sk_live_vip")
OTHER = HASHER.hash("sk_live_other")

DOCUMENT = f"""
[namespaces.api]
limit = 100
duration = "1m"
algorithm = "sliding_window"
mode = "fast"

[[namespaces.api.overrides]]
identifier_hash = "{VIP}"
limit = 1000

[[namespaces.api.overrides]]
identifier_hash = "{OTHER}"
duration = "1h"
algorithm = "fixed_window"
mode = "consistent"
on_unavailable = "closed"
timeout = "1s"

[namespaces."billing:free"]
limit = 100
duration = "month"
algorithm = "fixed_window"

[namespaces.bucket]
limit = 10
duration = "1s"
algorithm = "token_bucket"
burst = 20

[[namespaces.bucket.overrides]]
identifier_hash = "{VIP}"
algorithm = "fixed_window"
"""


def parse(text: str) -> dict[str, NamespaceConfig]:
    return parse_policy_document(tomllib.loads(text), source="node.toml")


def test_namespaces_and_overrides_parse() -> None:
    namespaces = parse(DOCUMENT)
    assert set(namespaces) == {"api", "billing:free", "bucket"}
    api = namespaces["api"]
    assert api.policy == build_policy(limit=100, duration="1m", algorithm="sliding_window")
    # An override replaces only the fields it names; the rest come from the namespace.
    assert api.overrides[VIP] == build_policy(limit=1000, duration="1m",
                                              algorithm="sliding_window")
    assert api.overrides[OTHER] == build_policy(
        limit=100, duration="1h", algorithm="fixed_window", mode="consistent",
        on_unavailable="closed", timeout="1s")
    assert namespaces["billing:free"].policy.duration.is_month
    assert namespaces["bucket"].policy.capacity == 20


def test_an_override_may_leave_the_token_bucket() -> None:
    """The namespace's burst belongs to its token bucket; an override switching to another
    algorithm does not inherit it (it used to fail: 'burst applies only to token_bucket')."""
    override = parse(DOCUMENT)["bucket"].overrides[VIP]
    assert override == build_policy(limit=10, duration="1s", algorithm="fixed_window")


def test_load_policy_file_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(DOCUMENT)
    assert load_policy_file(path) == parse(DOCUMENT)


def test_a_month_without_algorithm_is_a_fixed_window() -> None:
    namespaces = parse('[namespaces.quota]\nlimit = 100\nduration = "month"\n')
    assert namespaces["quota"].policy.algorithm == "fixed_window"
    with pytest.raises(PolicyFileError):  # an explicit other algorithm stays a mistake
        parse('[namespaces.quota]\nlimit = 1\nduration = "month"\nalgorithm = "token_bucket"\n')


def test_empty_document_has_no_namespaces() -> None:
    assert parse("") == {}


@pytest.mark.parametrize(("text", "field", "where"), [
    ("namespaces = 5", "namespaces", "[namespaces]"),
    ('[namespaces."a b"]\nlimit = 1\nduration = "1s"', "namespaces.a b", "bad namespace"),
    ('[namespaces]\napi = 5', "namespaces.api", "namespaces.api must be a table"),
    ('[namespaces.api]\nduration = "1s"', "limit", "namespaces.api.limit"),
    ('[namespaces.api]\nlimit = 1', "duration", "namespaces.api.duration"),
    ('[namespaces.api]\nlimit = 0\nduration = "1s"', "limit", "namespaces.api.limit"),
    ('[namespaces.api]\nlimit = true\nduration = "1s"', "limit", "namespaces.api.limit"),
    ('[namespaces.api]\nlimit = 1.5\nduration = "1s"', "limit", "namespaces.api.limit"),
    ('[namespaces.api]\nlimit = 1\nduration = "1y"', "duration", "namespaces.api.duration"),
    # A month without algorithm is now a fixed window; with another algorithm, a mistake.
    ('[namespaces.api]\nlimit = 1\nduration = "month"\nalgorithm = "sliding_window"',
     "duration", "namespaces.api.duration"),
    ('[namespaces.api]\nlimit = 1\nduration = "1s"\nlimt = 2', "limt", "unknown key 'limt'"),
    ('[namespaces.api]\nlimit = 1\nduration = "1s"\nidentifier_hash = "' + VIP + '"',
     "identifier_hash", "unknown key 'identifier_hash'"),
    ('[namespaces.api]\nlimit = 1\nduration = "1s"\nburst = 3', "burst",
     "namespaces.api.burst"),
    ('[namespaces.api]\nlimit = 1\nduration = "1s"\n[[namespaces.api.overrides]]\nlimit = 2',
     "namespaces.api.overrides[0].identifier_hash", "regionlimit hash"),
    ('[namespaces.api]\nlimit = 1\nduration = "1s"\n[[namespaces.api.overrides]]\n'
     'identifier_hash = "' + VIP.upper() + '"', "namespaces.api.overrides[0].identifier_hash",
     "lowercase"),
    ('[namespaces.api]\nlimit = 1\nduration = "1s"\n[[namespaces.api.overrides]]\n'
     'identifier_hash = "' + VIP + '"\nlimit = -1', "limit",
     "namespaces.api.overrides[0].limit"),
    ('[namespaces.api]\nlimit = 1\nduration = "1s"\n[[namespaces.api.overrides]]\n'
     'identifier_hash = "' + VIP + '"\nwhat = 1', "what", "unknown key 'what'"),
    ('[namespaces.api]\nlimit = 1\nduration = "1s"\n[[namespaces.api.overrides]]\n'
     'identifier_hash = "' + VIP + '"\noverrides = []', "overrides",
     "unknown key 'overrides'"),
    # Overrides must be an array of tables; these used to crash with a TypeError or blame
    # identifier_hash.
    ('[namespaces.api]\nlimit = 1\nduration = "1s"\noverrides = 5',
     "namespaces.api.overrides", "array of tables"),
    ('[namespaces.api]\nlimit = 1\nduration = "1s"\n[namespaces.api.overrides]\nx = 1',
     "namespaces.api.overrides", "array of tables"),
    ('[namespaces.api]\nlimit = 1\nduration = "1s"\noverrides = ["abc"]',
     "namespaces.api.overrides", "array of tables"),
    # The same identifier twice is a typo, not a silent "last one wins".
    ('[namespaces.api]\nlimit = 1\nduration = "1s"\n'
     '[[namespaces.api.overrides]]\nidentifier_hash = "' + VIP + '"\nlimit = 2\n'
     '[[namespaces.api.overrides]]\nidentifier_hash = "' + VIP + '"\nlimit = 3',
     "namespaces.api.overrides[1].identifier_hash", "repeats"),
])
def test_mistakes_name_the_file_and_the_entry(text: str, field: str, where: str) -> None:
    with pytest.raises(PolicyFileError) as caught:
        parse(text)
    assert caught.value.field == field
    assert caught.value.message.startswith("node.toml: ")
    assert where in caught.value.message
    assert "\n" not in caught.value.message  # one line for the CLI


def test_missing_or_malformed_file_is_a_policy_file_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyFileError, match=r"missing\.toml"):
        load_policy_file(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[namespaces.api\nlimit = 1")
    with pytest.raises(PolicyFileError, match=r"bad\.toml"):
        load_policy_file(bad)


# --- resolution ------------------------------------------------------------------------


def resolver(**kwargs: object) -> PolicyResolver:
    return PolicyResolver(file_namespaces=parse(DOCUMENT), **kwargs)  # type: ignore[arg-type]


INLINE = (5, "1s", "fixed_window", None, None, None, None)


def test_configuration_wins_over_inline_fields() -> None:
    policies = resolver()
    assert policies.resolve("api", OTHER.replace("a", "b"), INLINE).limit == 100
    assert policies.resolve("api", VIP, INLINE).limit == 1000
    assert policies.resolve("api", VIP, None).limit == 1000
    assert policies.label("api") == "api"


def test_central_configuration_wins_over_the_file() -> None:
    policies = resolver()
    central = NamespaceConfig(build_policy(limit=7, duration="1m"))
    policies.set_central({"api": central}, version=3)
    assert policies.resolve("api", VIP, None).limit == 7  # central's has no override
    assert policies.resolve("bucket", VIP, None).algorithm == "fixed_window"  # file still
    assert policies.central_version == 3


def test_unknown_namespace_without_inline_fields_is_404() -> None:
    with pytest.raises(UnknownNamespace) as caught:
        resolver().resolve("nope", VIP, None)
    assert caught.value.status == 404 and caught.value.field == "namespace"


def test_inline_policies_resolve_and_share_one_metrics_label() -> None:
    policies = resolver()
    policy = policies.resolve("adhoc", VIP, INLINE)
    assert policy == build_policy(limit=5, duration="1s", algorithm="fixed_window")
    assert policies.resolve("adhoc", OTHER, INLINE) is policy  # cached
    assert policies.label("adhoc") == "inline"


def test_inline_namespaces_can_be_disabled() -> None:
    policies = resolver(inline_enabled=False)
    with pytest.raises(ApiError) as caught:
        policies.resolve("adhoc", VIP, INLINE)
    assert (caught.value.status, caught.value.code) == (422, "inline_disabled")
    assert policies.resolve("api", VIP, INLINE).limit == 1000  # configured ones still work


def test_inline_namespaces_are_capped() -> None:
    policies = resolver(max_inline_namespaces=2)
    policies.resolve("a", VIP, INLINE)
    policies.resolve("b", VIP, INLINE)
    with pytest.raises(ApiError) as caught:
        policies.resolve("c", VIP, INLINE)
    assert (caught.value.status, caught.value.code, caught.value.field) == (
        422, "too_many_inline_namespaces", "namespace")
    # Known inline namespaces keep working, with other fields too.
    assert policies.resolve("a", VIP, (9, "1m", None, None, None, None, None)).limit == 9
