"""`regionlimit central`, `regionlimit central migrate` and the operator commands."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from pydantic import SecretStr, ValidationError

from central.settings import CentralSettings
from regionlimit.cli_errors import CliError, dev_secret, settings_error
from regionlimit.logs import configure_logging


def _settings(args: argparse.Namespace) -> CentralSettings:
    flags = {k: v for k, v in {"host": getattr(args, "host", None),
                               "port": getattr(args, "port", None),
                               "database_url": getattr(args, "database_url", None),
                               "nats_url": getattr(args, "nats_url", None)}.items()
             if v is not None}
    try:
        return CentralSettings(**flags)
    except ValidationError as exc:
        raise settings_error(exc) from None


def _database_url(settings: CentralSettings) -> str:
    if settings.database_url is None:
        raise CliError("a database is required: --database-url or REGIONLIMIT_DATABASE_URL")
    return settings.database_url.get_secret_value()


def cmd_central(args: argparse.Namespace) -> None:
    from central.server import serve_central

    settings = _settings(args)
    database_url = _database_url(settings)
    if settings.nats_url is None:
        raise CliError("NATS is required: --nats-url or REGIONLIMIT_NATS_URL")
    for name, kind in (("identifier_secret", "identifier secret"), ("admin_token",
                                                                    "admin token")):
        if getattr(settings, name) is None:
            if not args.dev:
                raise CliError(f"REGIONLIMIT_{name.upper()} is required (or --dev)")
            settings = settings.model_copy(update={name: SecretStr(dev_secret(kind))})
    configure_logging(settings.log_level)
    serve_central(settings, database_url=database_url)


def cmd_migrate(args: argparse.Namespace) -> None:
    from central.migrate import run_migrations

    settings = _settings(args)
    configure_logging(settings.log_level)
    asyncio.run(run_migrations(_database_url(settings)))
    print("database is at the newest schema")


def register(commands: Any) -> None:
    central = commands.add_parser("central", help="run a central replica (or: migrate)")
    central.add_argument("--host")
    central.add_argument("--port", type=int)
    central.add_argument("--database-url")
    central.add_argument("--nats-url")
    central.add_argument("--dev", action="store_true", help="allow generated secrets")
    central.set_defaults(run=cmd_central)
    sub = central.add_subparsers(dest="central_command", metavar="migrate")
    migrate = sub.add_parser("migrate", help="apply database migrations")
    migrate.add_argument("--database-url", default=argparse.SUPPRESS)
    migrate.set_defaults(run=cmd_migrate)
