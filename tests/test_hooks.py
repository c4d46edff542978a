"""The Copier migrations of hooks/, run as Copier runs them, stage by stage, and again.

tests/test_update.py runs them inside real updates; here each stage runs on its own, so
that idempotency (a stage run twice changes nothing more) and the edge cases are seen.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from support import ROOT

DEPENDENCY_REGIONS = ROOT / "hooks" / "dependency_regions.py"

# pyproject.toml as 0.2.0 rendered it, after `uv add humanize` and `uv add --dev
# time-machine` (sorted in), a changed pin of a template package, and a comment.
OLD_LAYOUT = """\
[project]
name = "acme-items"
dependencies = [
    "asyncpg>=0.30,<0.33",
    "grpcio>=1.90,<2",
    "humanize>=4.9",  # dates in reports
    "orjson>=3.10,<4",
]

[dependency-groups]
dev = [
    "mypy==2.4.1",
    "pytest==9.2.0",
    "time-machine>=2.16",
]

[tool.ruff]
line-length = 100
"""
# The same lists as the 0.3.0 layout renders them (shortened), before `after` runs.
NEW_LAYOUT = """\
[project]
name = "acme-items"
dependencies = [
    # --- template: managed by `copier update` ---
    "asyncpg>=0.30,<0.33",
    "grpcio>=1.85.1,<2",
    "orjson>=3.10,<4",
    # --- end of the template's dependencies ---
    #
    # --- yours: `uv add NAME` appends here ---
    #
]

[dependency-groups]
dev = [
    # --- template: managed by `copier update` ---
    "mypy==2.4.1",
    "pytest==9.2.0",
    "time-machine==2.19.0",
    # --- end of the template's dependencies ---
    #
    # --- yours: `uv add --dev NAME` appends here ---
    #
]

[tool.ruff]
line-length = 100
"""


def git(cwd: Path, *args: str) -> str:
    """Run git in cwd."""
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)
    return proc.stdout


def stage(project: Path, name: str) -> str:
    """Run one stage of the migration as Copier does: its Python, cwd in the project."""
    proc = subprocess.run(
        [sys.executable, str(DEPENDENCY_REGIONS), name],
        cwd=project,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git repository with the 0.2.0 layout committed."""
    for role in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{role}_NAME", "Template Tests")
        monkeypatch.setenv(f"GIT_{role}_EMAIL", "template-tests@example.invalid")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", "/dev/null")
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    git(tmp_path, "-c", "init.defaultBranch=main", "init", "-q")
    (tmp_path / "pyproject.toml").write_text(OLD_LAYOUT, encoding="utf-8")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-q", "-m", "0.2.0")
    return tmp_path


def test_before_takes_out_only_the_users_packages_and_stages_that(project: Path) -> None:
    """The template's packages stay, a changed pin included; the index has the result."""
    stage(project, "before")
    stage(project, "before")

    text = (project / "pyproject.toml").read_text(encoding="utf-8")
    data = tomllib.loads(text)
    assert data["project"]["dependencies"] == [
        "asyncpg>=0.30,<0.33",
        "grpcio>=1.90,<2",
        "orjson>=3.10,<4",
    ]
    assert data["dependency-groups"]["dev"] == ["mypy==2.4.1", "pytest==9.2.0"]
    assert git(project, "show", ":pyproject.toml") == text
    assert not git(project, "diff", "--name-only").strip()


def test_after_appends_them_to_the_users_region_once(project: Path) -> None:
    """Run twice, each entry lands once, below the template's, comment and all."""
    stage(project, "before")
    (project / "pyproject.toml").write_text(NEW_LAYOUT, encoding="utf-8")  # Copier's render

    said = stage(project, "after")
    assert stage(project, "after") == ""

    text = (project / "pyproject.toml").read_text(encoding="utf-8")
    assert text.count("humanize") == 1
    assert '    #\n    "humanize>=4.9",  # dates in reports\n]' in text
    data = tomllib.loads(text)
    assert data["project"]["dependencies"][-1] == "humanize>=4.9"
    # The template has time-machine itself now: its line wins, and the user is told.
    assert data["dependency-groups"]["dev"].count("time-machine==2.19.0") == 1
    assert "time-machine>=2.16" not in text
    assert "humanize>=4.9" in said
    assert "time-machine>=2.16" in said
    assert not Path(
        git(project, "rev-parse", "--git-path", "copier-dependency-regions.json").strip()
    ).exists()


def test_a_project_with_the_regions_already_is_left_alone(project: Path) -> None:
    """Updating from an unreleased commit past the layout change: nothing to move."""
    (project / "pyproject.toml").write_text(NEW_LAYOUT, encoding="utf-8")

    assert stage(project, "before") == ""
    assert stage(project, "after") == ""

    assert (project / "pyproject.toml").read_text(encoding="utf-8") == NEW_LAYOUT
