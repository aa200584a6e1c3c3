"""The `regionlimit` command: one entry point for nodes, central, dev and operator tools."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from regionlimit import central_cli, operator
from regionlimit.cli_errors import CliError, dev_secret, settings_error
from regionlimit.logs import configure_logging
from sync.errors import RegionLimitError

__all__ = ["CliError", "build_parser", "main"]


def cmd_node(args: argparse.Namespace) -> None:
    from region_node.server import serve_node
    from region_node.settings import NodeSettings

    flags = {k: v for k, v in {"region": args.region, "host": args.host, "port": args.port,
                               "config": args.config, "nats_url": args.nats_url}.items()
             if v is not None}
    try:
        settings = NodeSettings(**flags)
    except ValidationError as exc:
        raise settings_error(exc) from None
    if settings.region is None:
        raise CliError("a region is required: --region or REGIONLIMIT_REGION")
    if settings.identifier_secret is not None:
        secret = settings.identifier_secret.get_secret_value()
    elif args.dev:
        secret = dev_secret("identifier secret")
    else:
        raise CliError("REGIONLIMIT_IDENTIFIER_SECRET is required (or --dev for a generated "
                       "one)")
    configure_logging(settings.log_level)
    serve_node(settings, secret=secret)


def cmd_hash(args: argparse.Namespace) -> None:
    from region_node.settings import NodeSettings
    from sync.identifiers import IDENTIFIER_RULE, IdentifierHasher, is_identifier

    secret = NodeSettings().identifier_secret
    if secret is None:
        raise CliError("REGIONLIMIT_IDENTIFIER_SECRET is required to hash identifiers")
    identifier = sys.stdin.readline().rstrip("\n") if args.identifier == "-" else args.identifier
    if not is_identifier(identifier):
        raise CliError(IDENTIFIER_RULE)
    print(IdentifierHasher(secret.get_secret_value()).hash(identifier))


def cmd_dev(args: argparse.Namespace) -> None:
    from pathlib import Path

    from regionlimit.dev import run_dev

    configure_logging("info")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        run_dev(port_base=args.port_base, nats_url=args.nats_url,
                state_dir=Path(args.state_dir) if args.state_dir else None)
    except RuntimeError as exc:
        raise CliError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regionlimit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    node = commands.add_parser("node", help="run a region node")
    node.add_argument("--region")
    node.add_argument("--host")
    node.add_argument("--port", type=int)
    node.add_argument("--config", help="TOML policy file")
    node.add_argument("--nats-url")
    node.add_argument("--dev", action="store_true", help="allow a generated secret")
    node.set_defaults(run=cmd_node)

    hash_ = commands.add_parser("hash", help="print an identifier's hash (secret from env)")
    hash_.add_argument("identifier", help="the raw identifier, or - to read it from stdin")
    hash_.set_defaults(run=cmd_hash)

    dev = commands.add_parser("dev", help="run NATS, central and three region nodes locally")
    dev.add_argument("--port-base", type=int, default=8080,
                     help="central on N, nodes us/eu/ap on N+1..N+3 (default 8080)")
    dev.add_argument("--nats-url", help="use this NATS instead of an embedded nats-server")
    dev.add_argument("--state-dir", help="where logs, the SQLite ledger and the generated "
                     "secret and token are kept (default: .regionlimit/dev)")
    dev.set_defaults(run=cmd_dev)

    central_cli.register(commands)
    operator.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (CliError, RegionLimitError) as exc:
        print(f"regionlimit: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
