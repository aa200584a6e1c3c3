"""Operator commands talking to central's admin API: usage, namespaces, overrides.

    regionlimit usage --namespace api --month 2026-11 --by region [--csv | --json]
    regionlimit namespaces list | get NAME | set NAME --limit 100 --duration 1m | delete NAME
    regionlimit overrides list NS | get NS --identifier-hash H | set NS --identifier ID ...

Central's URL and the admin token come from REGIONLIMIT_CENTRAL_URL and
REGIONLIMIT_ADMIN_TOKEN, or --central-url / --admin-token. Raw identifiers travel only in
request bodies (``--identifier -`` reads one from stdin, out of the shell history).
Errors print one line and exit 1 (``regionlimit.cli.main``); this module is imported by
``regionlimit.cli``, never the other way round.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TextIO
from urllib.parse import quote

import httpx
from pydantic import ValidationError

from regionlimit.cli_errors import CliError, settings_error
from regionlimit.cli_settings import ClientSettings
from sync.identifiers import IDENTIFIER_RULE, is_identifier

TIMEOUT_S = 30.0
MONTH = re.compile(r"(\d{4})-(\d{2})")
POLICY_FIELDS = ("limit", "duration", "algorithm", "burst", "mode", "on_unavailable",
                 "timeout", "shadow_mode")
NUMERIC = frozenset({"admitted", "denied", "limit", "burst", "version"})


# --- talking to central ------------------------------------------------------------------

class Central:
    def __init__(self, args: argparse.Namespace) -> None:
        try:
            settings = ClientSettings(**{k: v for k, v in {
                "central_url": args.central_url, "admin_token": args.admin_token}.items()
                if v is not None})
        except ValidationError as exc:
            raise settings_error(exc) from None
        if settings.admin_token is None:
            raise CliError("an admin token is required: REGIONLIMIT_ADMIN_TOKEN or "
                           "--admin-token")
        self.url = settings.central_url.rstrip("/")
        self._client = httpx.Client(
            base_url=self.url, timeout=TIMEOUT_S,
            headers={"authorization": f"Bearer {settings.admin_token.get_secret_value()}"})

    def request(self, method: str, path: str, *, body: Any = None,
                accept: str = "application/json") -> httpx.Response:
        try:
            response = self._client.request(method, path, json=body,
                                            headers={"accept": accept})
        except httpx.HTTPError as exc:
            raise CliError(f"cannot reach central at {self.url}: {exc}") from None
        _raise_for_error(response)
        return response

    def json(self, method: str, path: str, *, body: Any = None) -> Any:
        response = self.request(method, path, body=body)
        if response.status_code == 204:
            return None
        try:
            return response.json()
        except ValueError:
            raise CliError(f"central answered {method} {path} with non-JSON "
                           f"({response.status_code})") from None

    def stream_text(self, method: str, path: str, *, body: Any, accept: str
                    ) -> Iterator[str]:
        try:
            with self._client.stream(method, path, json=body,
                                     headers={"accept": accept}) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for_error(response)
                yield from response.iter_text()
        except httpx.HTTPError as exc:
            raise CliError(f"cannot reach central at {self.url}: {exc}") from None

    def identifier_hash(self, args: argparse.Namespace) -> str:
        if args.identifier_hash:
            return str(args.identifier_hash).lower()
        answer = self.json("POST", "/v1/identifiers/hash",
                           body={"identifier": read_identifier(args.identifier)})
        return str(answer["identifier_hash"])


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
        message = str(error.get("message") or error.get("code"))
        field = error.get("field")
    except (ValueError, KeyError, TypeError, AttributeError):
        message, field = response.text.strip()[:200] or response.reason_phrase, None
    where = f" ({field})" if field else ""
    raise CliError(f"central answered {response.status_code}{where}: {message}")


def read_identifier(value: str) -> str:
    """``-`` reads the raw identifier from stdin, keeping it out of the shell history."""
    identifier = sys.stdin.readline().rstrip("\n") if value == "-" else value
    if not is_identifier(identifier):
        raise CliError(IDENTIFIER_RULE)
    return identifier


def _path(*segments: str) -> str:
    return "/v1/namespaces/" + "/".join(quote(s, safe="") for s in segments)


# --- output ------------------------------------------------------------------------------

def render_table(columns: Sequence[str], rows: Sequence[Sequence[Any]],
                 out: TextIO | None = None) -> None:
    """Aligned columns; counts right-aligned; ``-`` for nothing."""
    out = out or sys.stdout
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(name), *(len(row[i]) for row in cells)])
              for i, name in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        parts = [value.rjust(width) if name in NUMERIC else value.ljust(width)
                 for name, value, width in zip(columns, values, widths, strict=True)]
        return "  ".join(parts).rstrip()

    print(line(columns), file=out)
    print(line(["-" * width for width in widths]), file=out)
    for row in cells:
        print(line(row), file=out)


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def print_record(record: dict[str, Any]) -> None:
    width = max(len(key) for key in record)
    for key, value in record.items():
        shown = json.dumps(value) if isinstance(value, dict) else _cell(value)
        print(f"{key.ljust(width)}  {shown}")


# --- usage -------------------------------------------------------------------------------

def month_range(month: str) -> tuple[str, str]:
    """``2026-11`` -> (``2026-11-01``, ``2026-12-01``)."""
    match = MONTH.fullmatch(month)
    if match is None or not 1 <= int(match.group(2)) <= 12:
        raise CliError(f"--month must be YYYY-MM, e.g. 2026-11; got {month!r}")
    year, number = int(match.group(1)), int(match.group(2))
    following = f"{year + 1:04d}-01" if number == 12 else f"{year:04d}-{number + 1:02d}"
    return f"{year:04d}-{number:02d}-01", f"{following}-01"


def usage_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"namespace": args.namespace}
    if args.identifier is not None:
        body["identifier"] = read_identifier(args.identifier)
    if args.identifier_hash is not None:
        body["identifier_hash"] = args.identifier_hash.lower()
    if args.month is not None:
        body["from"], body["to"] = month_range(args.month)
    for name in ("from_", "to"):
        value = getattr(args, name)
        if value is not None:
            body[name.rstrip("_")] = int(value) if value.isdigit() else value
    groups = [g.strip() for item in args.by or [] for g in item.split(",") if g.strip()]
    if groups:
        body["group_by"] = list(dict.fromkeys(groups))
    return body


def cmd_usage(args: argparse.Namespace) -> None:
    central = Central(args)
    body = usage_body(args)
    if args.csv:
        for chunk in central.stream_text("POST", "/v1/usage/query", body=body,
                                         accept="text/csv"):
            sys.stdout.write(chunk)
        sys.stdout.flush()
        return
    answer = central.json("POST", "/v1/usage/query", body=body)
    if args.json:
        print_json(answer)
        return
    rows = answer["rows"]
    columns = ["identifier_hash"]
    columns += [name for name in ("region", "period") if rows and name in rows[0]]
    columns += ["admitted", "denied"]
    print(f"namespace {answer['namespace']}, {answer['from']} to {answer['to']}")
    if not rows:
        print("no usage")
        return
    table = [[row.get(name) for name in columns] for row in rows]
    if len(rows) > 1:
        blank = [""] * (len(columns) - 3)
        table.append(["total", *blank, sum(r["admitted"] for r in rows),
                      sum(r["denied"] for r in rows)])
    render_table(columns, table)


# --- namespaces --------------------------------------------------------------------------

def policy_fields(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in POLICY_FIELDS
            if getattr(args, name, None) is not None}


def cmd_namespaces(args: argparse.Namespace) -> None:
    central = Central(args)
    action = args.namespaces_command
    if action == "list":
        answer = central.json("GET", "/v1/namespaces")
        if args.json:
            print_json(answer)
            return
        columns = ["namespace", *POLICY_FIELDS, "version"]
        render_table(columns, [[ns.get(c) for c in columns] for ns in answer["namespaces"]])
    elif action == "delete":
        central.json("DELETE", _path(args.name))
        print(f"deleted namespace {args.name}")
    else:
        if action == "get":
            answer = central.json("GET", _path(args.name))
        else:
            answer = central.json("PUT", _path(args.name), body=policy_fields(args))
        if args.json:
            print_json(answer)
        else:
            print_record(answer)


# --- overrides ---------------------------------------------------------------------------

def cmd_overrides(args: argparse.Namespace) -> None:
    central = Central(args)
    action = args.overrides_command
    if action == "list":
        answer = central.json("GET", _path(args.namespace, "overrides"))
        if args.json:
            print_json(answer)
            return
        columns = ["identifier_hash", *POLICY_FIELDS]
        render_table(columns, [[o.get(c) for c in columns] for o in answer["overrides"]])
        return
    if action == "set":
        body = {"identifier": read_identifier(args.identifier), **policy_fields(args)}
        answer = central.json("PUT", _path(args.namespace, "overrides"), body=body)
    else:
        path = _path(args.namespace, "overrides", central.identifier_hash(args))
        if action == "delete":
            central.json("DELETE", path)
            print(f"deleted override {path.rsplit('/', 1)[1]} of {args.namespace}")
            return
        answer = central.json("GET", path)
    if args.json:
        print_json(answer)
    else:
        print_record(answer)


# --- the parsers ---------------------------------------------------------------------------

def _connection_flags() -> argparse.ArgumentParser:
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--central-url", help="default: $REGIONLIMIT_CENTRAL_URL or "
                       "http://127.0.0.1:8080")
    flags.add_argument("--admin-token", help="default: $REGIONLIMIT_ADMIN_TOKEN (prefer it: "
                       "a flag shows in ps)")
    return flags


def _policy_flags(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument("--limit", type=int, required=required)
    parser.add_argument("--duration", required=required, help="e.g. 1m, 1h, 1d, month")
    parser.add_argument("--algorithm",
                        choices=["fixed_window", "sliding_window", "token_bucket"])
    parser.add_argument("--burst", type=int, help="token bucket capacity (default: limit)")
    parser.add_argument("--mode", choices=["fast", "consistent", "lease"])
    parser.add_argument("--on-unavailable", choices=["open", "closed"])
    parser.add_argument("--timeout", help="consistent and lease mode: e.g. 250ms")
    parser.add_argument("--shadow-mode", action=argparse.BooleanOptionalAction,
                        help="count and bill every check but never deny")


def _identifier_flags(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--identifier-hash", help="from `regionlimit hash` or the usage rows")
    which.add_argument("--identifier", help="raw identifier (sent in the body), or - for "
                       "stdin")


def register(commands: Any) -> None:
    connection = _connection_flags()

    usage = commands.add_parser(
        "usage", parents=[connection], help="usage for billing, from central's ledger",
        description="Admitted and denied cost per identifier; default: the current month.")
    usage.add_argument("--namespace", required=True)
    who = usage.add_mutually_exclusive_group()
    who.add_argument("--identifier", help="raw identifier (sent in the body), or - for stdin")
    who.add_argument("--identifier-hash")
    usage.add_argument("--month", help="a calendar month (UTC), e.g. 2026-11")
    usage.add_argument("--from", dest="from_", metavar="FROM",
                       help="ISO date/datetime or epoch ms (inclusive)")
    usage.add_argument("--to", help="ISO date/datetime or epoch ms (exclusive)")
    usage.add_argument("--by", action="append", metavar="region|day|month",
                       help="group rows; repeat or comma-separate (--by region,day)")
    output = usage.add_mutually_exclusive_group()
    output.add_argument("--csv", action="store_true", help="CSV with a header line")
    output.add_argument("--json", action="store_true", help="the API's JSON")
    usage.set_defaults(run=_checked_usage)

    namespaces = commands.add_parser("namespaces", help="namespaces configured at central")
    ns_sub = namespaces.add_subparsers(dest="namespaces_command", required=True,
                                       metavar="list|get|set|delete")
    for name, help_ in (("list", "all namespaces"), ("get", "one namespace"),
                        ("set", "create or replace a namespace"),
                        ("delete", "delete a namespace")):
        sub = ns_sub.add_parser(name, parents=[connection], help=help_)
        if name != "list":
            sub.add_argument("name", metavar="NAMESPACE")
        if name == "set":
            _policy_flags(sub, required=True)
        if name != "delete":
            sub.add_argument("--json", action="store_true")
        sub.set_defaults(run=cmd_namespaces)

    overrides = commands.add_parser("overrides", help="per-identifier overrides")
    ov_sub = overrides.add_subparsers(dest="overrides_command", required=True,
                                      metavar="list|get|set|delete")
    for name, help_ in (("list", "the overrides of a namespace"), ("get", "one override"),
                        ("set", "create or replace an override"),
                        ("delete", "delete an override")):
        sub = ov_sub.add_parser(name, parents=[connection], help=help_)
        sub.add_argument("namespace", metavar="NAMESPACE")
        if name == "set":
            sub.add_argument("--identifier", required=True,
                             help="raw identifier (sent in the body), or - for stdin")
            _policy_flags(sub, required=False)
        elif name != "list":
            _identifier_flags(sub)
        if name != "delete":
            sub.add_argument("--json", action="store_true")
        sub.set_defaults(run=cmd_overrides)


def _checked_usage(args: argparse.Namespace) -> None:
    if args.month is not None and (args.from_ is not None or args.to is not None):
        raise CliError("--month cannot be combined with --from/--to")
    cmd_usage(args)
