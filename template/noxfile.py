"""Checks of this service: `uv run nox` runs lint, types and tests; `-s NAME` runs one.

Sessions reuse the project environment that `uv sync` manages (no extra venvs),
so they check exactly what runs in production. `docs`, `image` and `fuzz` are run on demand.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tomllib
from pathlib import Path

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


@nox.session(python=False)
def fuzz(session: nox.Session) -> None:
    """Fuzz the HTTP/JSON gateway from its OpenAPI document at length (run on demand).

    The default run fuzzes 30 cases per operation and mode; this one 500
    (`GATEWAY_FUZZ_EXAMPLES` to choose).
    """
    if not any(Path("src").glob("*/gateway")):
        session.skip("this service has no HTTP/JSON gateway")
    examples = os.environ.get("GATEWAY_FUZZ_EXAMPLES", "500")
    session.run(
        "uv",
        "run",
        "pytest",
        "-s",
        "-k",
        "fuzzing",
        "tests/lifecycle/test_gateway_lifecycle.py",
        *session.posargs,
        env={"GATEWAY_FUZZ_EXAMPLES": examples},
    )


@nox.session(python=False)
def docs(session: nox.Session) -> None:
    """Build the documentation site into site/, strictly: a broken link fails the build."""
    session.run("uv", "run", "--group", "docs", "mkdocs", "build", "--strict", *session.posargs)


def _builder() -> list[str]:
    """The docker client when its daemon answers, else buildah (daemonless), else nothing."""
    docker = shutil.which("docker")
    if docker is not None:
        info = subprocess.run([docker, "info"], capture_output=True, check=False)  # noqa: S603
        if info.returncode == 0:
            return [docker]
    buildah = shutil.which("buildah")
    return [buildah] if buildah is not None else []


@nox.session(python=False)
def image(session: nox.Session) -> None:
    """Build the container image (docker, or buildah without a daemon) and print its size."""
    builder = _builder()
    if not builder:
        session.error("neither a running docker daemon nor buildah was found")
    project = tomllib.loads(Path("pyproject.toml").read_text(encoding="utf-8"))["project"]
    tag = f"{project['name']}:local"
    session.run(*builder, "build", "--tag", tag, *session.posargs, ".")
    if Path(builder[0]).name == "docker":
        listed = session.run(builder[0], "image", "inspect", tag, silent=True)
        size = f"{json.loads(str(listed))[0]['Size'] / 1e6:.1f} MB"
    else:
        listed = session.run(builder[0], "images", "--json", tag, silent=True)
        size = str(json.loads(str(listed))[0]["size"])
    session.log(f"{tag}: {size} uncompressed")
