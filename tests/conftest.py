"""Fixtures of the template's tests: rendered and installed projects, cached per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from support import PROFILES, render, uv_sync


def pytest_addoption(parser: pytest.Parser) -> None:
    """`--update-from`: which past releases tests/test_update.py updates from."""
    parser.addoption(
        "--update-from",
        choices=("recent", "all"),
        default="recent",
        help=(
            "recent (default): each of the last releases with the default answers, the "
            "latest also with the custom ones; all: every release with every answer "
            "profile, and the updated services' own lint, types and unit tests "
            "(`nox -s update`)"
        ),
    )


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Render a profile of PROFILES once per session; returns its directory."""
    cache: dict[str, Path] = {}

    def get(profile: str) -> Path:
        if profile not in cache:
            dst = tmp_path_factory.mktemp(f"render-{profile}") / "project"
            cache[profile] = render(dst, **PROFILES[profile])
        return cache[profile]

    return get


@pytest.fixture(scope="session")
def installed(rendered: Callable[[str], Path]) -> Callable[[str], Path]:
    """Render and `uv sync` a profile once per session; returns its directory."""
    done: set[str] = set()

    def get(profile: str) -> Path:
        project = rendered(profile)
        if profile not in done:
            uv_sync(project)
            done.add(profile)
        return project

    return get


@pytest.fixture(scope="session")
def default_project(installed: Callable[[str], Path]) -> Path:
    """The default-answers project, rendered and installed."""
    return installed("default")
