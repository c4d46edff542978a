"""Command line: `serve` runs the service, `migrate` applies schema migrations.

`migrate --create-database` first creates the database when PostgreSQL lacks it.
`healthcheck` asks a running server for its health (container checks); `dev` serves
with reload on code changes, on throwaway PostgreSQL and Redis when none answer.

Exit codes: 0 success, 1 runtime failure (a dependency unreachable, a port taken,
a forced shutdown), 2 invalid configuration or usage, 3 database not migrated.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from . import app, dev, healthcheck, logs, provisioning, tracing
from .errors import ServiceError
from .migrate import MigrationError
from .provisioning import ProvisioningError
from .settings import ConfigError, Settings, load, redact

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_MIGRATED = 3

log = logging.getLogger(__package__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=app.command_name(),
        description="Run the service. Configuration comes from the environment "
        "(see docs/configuration.md).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="serve gRPC and the admin endpoints until SIGTERM")
    migrate = commands.add_parser("migrate", help="apply pending database migrations and exit")
    migrate.add_argument(
        "--create-database",
        action="store_true",
        help="create the database of DATABASE_URL first when it does not exist",
    )
    commands.add_parser("check-config", help="validate the configuration and exit")
    check = commands.add_parser(
        "healthcheck", help="exit 0 when the local server reports SERVING over grpc.health.v1"
    )
    check.add_argument("--timeout", type=float, default=2.0, help="seconds (default 2)")
    check.add_argument("--service", default="", help='service name (default "": the server)')
    develop = commands.add_parser(
        "dev", help="serve with reload on changes; throwaway PostgreSQL/Redis if none answer"
    )
    develop.add_argument(
        "--watch",
        type=Path,
        action="append",
        help=f"a path to watch (repeatable; default {dev.PACKAGE_DIR})",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = _parser().parse_args(argv)
    try:
        settings = load()
        tracing.protocol(os.environ)
    except (ConfigError, tracing.TracingConfigError) as exc:
        print(exc, file=sys.stderr)  # noqa: T201 - logging is not configured yet
        return EXIT_USAGE
    logs.configure(level=settings.log.level, fmt=settings.log.format)
    if args.command in {"check-config", "healthcheck", "dev"}:
        return _tool(args, settings)
    try:
        if args.command == "migrate":
            if args.create_database and asyncio.run(
                provisioning.create_database(
                    str(settings.database_url), timeout=settings.db.connect_timeout
                )
            ):
                log.info("database created", extra={"database": redact(settings.database_url)})
            applied = asyncio.run(app.run_migrations(settings))
            log.info("database is up to date", extra={"applied": applied})
            return 0
        return asyncio.run(app.serve(settings))
    except app.NotMigratedError as exc:
        log.error(str(exc))  # noqa: TRY400 - an expected condition, no traceback
        return EXIT_NOT_MIGRATED
    except (ServiceError, MigrationError, ProvisioningError, OSError, app.StartupError) as exc:
        remedy = provisioning.remedy(exc, app.command_name())
        message = f"{exc}; {remedy}" if remedy else str(exc)
        log.error("startup failed: %s", message)  # noqa: TRY400 - the message says it all
        return EXIT_FAILURE


def _tool(args: argparse.Namespace, settings: Settings) -> int:
    """The commands that do not run the service in this process."""
    if args.command == "healthcheck":
        return healthcheck.run(settings, service=args.service, timeout=args.timeout)
    if args.command == "dev":
        return asyncio.run(dev.run(settings, watch=args.watch or [dev.PACKAGE_DIR]))
    log.info("configuration is valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
