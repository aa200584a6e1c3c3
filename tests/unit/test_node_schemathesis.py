"""Schemathesis against the node's own OpenAPI document, in process (ASGI): whatever a
client sends, positive or negative, no endpoint answers 5xx, and every documented
response matches its schema.

Bounded: at most MAX_EXAMPLES generated cases per operation and mode."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from region_node.app import build_app
from region_node.node import RegionNode
from region_node.settings import NodeSettings
from sync.identifiers import IdentifierHasher

MAX_EXAMPLES = 50
SECRET = "s"
T0 = 1_800_000_000_000


def _config() -> Path:
    # Generated namespaces are mostly unknown or inline; these make the configured paths
    # reachable too (schemathesis draws strings like "0", "00", "A").
    path = Path(tempfile.mkdtemp(prefix="regionlimit-st-")) / "node.toml"
    vip = IdentifierHasher(SECRET).hash("0")
    path.write_text(f"""
[namespaces."0"]
limit = 3
duration = "1h"
algorithm = "fixed_window"
[[namespaces."0".overrides]]
identifier_hash = "{vip}"
limit = 5
[namespaces.A]
limit = 2
duration = "1s"
algorithm = "token_bucket"
burst = 1
[namespaces."00"]
limit = 2
duration = "month"
algorithm = "fixed_window"
""")
    return path


class Clock:
    """Moves 7 ms per call, so windows roll over during the run."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        self.now += 7
        return self.now


def _app(**settings_: Any) -> Any:
    # Explicit values win over any REGIONLIMIT_* variable in the environment.
    settings_ = {"nats_url": None, "node_token": None, "inline_namespaces": True,
                 "max_inline_namespaces": 1000, **settings_}
    node = RegionNode(NodeSettings(region="t", config=_config(), **settings_), secret=SECRET,
                      clock=Clock())
    return build_app(node)


def _schema(app: Any, *modes: GenerationMode) -> Any:
    loaded = schemathesis.openapi.from_asgi("/openapi.json", app)
    if modes:
        loaded.config.generation.update(modes=list(modes))
    return loaded


schema = _schema(_app())  # positive and negative
positive = _schema(_app(), GenerationMode.POSITIVE)
guarded = _schema(_app(node_token="tok"))
ST_SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
                       suppress_health_check=list(HealthCheck))


@positive.include(method="POST").parametrize()
@ST_SETTINGS
def test_valid_checks_get_documented_answers(case: Any) -> None:
    response = case.call()
    case.validate_response(response, checks=[
        not_a_server_error, status_code_conformance, content_type_conformance,
        response_schema_conformance])
    # Generated from the schema, so well-formed JSON: never a 400.
    assert response.status_code != 400, response.text


@schema.parametrize()
@ST_SETTINGS
def test_no_endpoint_answers_5xx(case: Any) -> None:
    response = case.call()
    case.validate_response(response, checks=[not_a_server_error, status_code_conformance])


@guarded.parametrize()
@ST_SETTINGS
def test_no_endpoint_answers_5xx_with_a_node_token(case: Any) -> None:
    response = case.call()
    case.validate_response(response, checks=[not_a_server_error])
    if case.path.startswith("/v1/check") and case.method.upper() == "POST":
        assert response.status_code == 401
