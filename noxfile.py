"""Every check of the template repository. `nox` runs the default sessions (lint, tests)."""

from __future__ import annotations

import os
import shutil

import nox

nox.options.default_venv_backend = "uv"
nox.options.sessions = ["lint", "tests"]
nox.options.error_on_missing_interpreters = True


def _install(session: nox.Session, *groups: str) -> None:
    args = [f"--group={group}" for group in groups]
    session.run_install(
        "uv",
        "sync",
        "--no-install-project",
        "--no-default-groups",
        *args,
        env={"UV_PROJECT_ENVIRONMENT": session.virtualenv.location},
    )


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff on the template's own code (tests, hooks, noxfile)."""
    _install(session, "lint")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def tests(session: nox.Session) -> None:
    """The template test suite: questions, render matrix, generated suite, e2e, update."""
    _install(session, "test")
    session.run("pytest", *session.posargs)


@nox.session
def update(session: nox.Session) -> None:
    """`copier update` from every past release with every answer profile (a few minutes)."""
    _install(session, "test")
    session.run("pytest", "tests/test_update.py", "--update-from=all", *session.posargs)


@nox.session
def release(session: nox.Session) -> None:
    """Tag a release and record it: `nox -s release -- 0.3.0 --summary "..."`."""
    _install(session, "test")
    session.run("python", "tools/release.py", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """GetItem throughput and latency: generated service vs a bare grpc.aio server."""
    _install(session, "test")
    session.run("python", "bench/run.py", *session.posargs)


@nox.session
def browser(session: nox.Session) -> None:
    """The gateway's API reference page in headless Chromium (Debian's chromium, chromedriver)."""
    _install(session, "test", "browser")
    if shutil.which("chromedriver") is None and shutil.which("apt-get") and os.geteuid() == 0:
        session.run("apt-get", "install", "-y", "-q", "chromium", "chromium-driver", external=True)
    session.run("pytest", "-m", "browser", "-s", "tests/test_e2e.py", *session.posargs)


@nox.session
def image(session: nox.Session) -> None:
    """Render the default service and build its container image (docker or buildah)."""
    _install(session, "test")
    session.run("pytest", "-m", "image", "-s", *session.posargs)
