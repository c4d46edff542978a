"""Checks of this service: `uv run nox` runs lint, types and tests; `-s NAME` runs one.

Sessions reuse the project environment that `uv sync` manages (no extra venvs),
so they check exactly what runs in production.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "types", "tests"]


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    """Ruff (lint, formatting; `-- --fix` to apply fixes) and the layer contracts."""
    session.run("uv", "run", "ruff", "check", ".", *session.posargs)
    session.run("uv", "run", "ruff", "format", "--check", ".")
    session.run("uv", "run", "lint-imports")


@nox.session(python=False)
def types(session: nox.Session) -> None:
    """Mypy, strict."""
    session.run("uv", "run", "mypy")


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    """Unit, integration (PostgreSQL) and lifecycle tests; pass pytest options after `--`."""
    session.run("uv", "run", "pytest", *session.posargs)
