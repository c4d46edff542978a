"""tools/release.py (`nox -s release`), run in a clone of this repository.

A release tags the commit and records it on top; a refused one changes nothing.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from support import ROOT


def _next(version: str, minors: int = 1) -> str:
    major, minor, _ = (int(part) for part in version.split("."))
    return f"{major}.{minor + minors}.0"


# Relative to the newest recorded release, so the tests hold after every release.
LATEST = tomllib.loads((ROOT / "releases.toml").read_text(encoding="utf-8"))["release"][-1][
    "version"
]
VERSION = _next(LATEST)
NEWER = _next(LATEST, 2)
SUMMARY = "Delivery, the first hour, and updates across releases"


def git(cwd: Path, *args: str) -> str:
    """Run git in cwd."""
    proc = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=60
    )
    return proc.stdout


def release(clone: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the clone's own release script."""
    return subprocess.run(
        [sys.executable, str(clone / "tools" / "release.py"), *args],
        cwd=clone,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def section(version: str, *, upgrade: bool = True) -> str:
    """A CHANGELOG section; with an Upgrade note that names --trust."""
    note = "\n### Upgrade\n\n- Update with `copier update --trust` (a migration).\n"
    return f"## [{version}] - 2026-12-01\n\n### Added\n\n- Something.\n{note if upgrade else ''}\n"


def with_section(clone: Path, text: str) -> None:
    """Put a section under [Unreleased] and commit."""
    changelog = clone / "CHANGELOG.md"
    old = changelog.read_text(encoding="utf-8")
    changelog.write_text(old.replace("## [Unreleased]\n\n", f"## [Unreleased]\n\n{text}", 1))
    git(clone, "commit", "-q", "-am", "CHANGELOG")


def set_migration_version(clone: Path, version: str) -> None:
    """Give every migration in copier.yml this version, and commit."""
    config = clone / "copier.yml"
    text = config.read_text(encoding="utf-8")
    for migration in yaml.safe_load(text).get("_migrations", []):
        old = f'version: "{migration["version"]}"'
        assert old in text
        text = text.replace(old, f'version: "{version}"')
    config.write_text(text, encoding="utf-8")
    git(clone, "commit", "-q", "--allow-empty", "-am", "migrations")


@pytest.fixture
def clone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clone of this repository's HEAD with the script of the working tree."""
    for role in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{role}_NAME", "Template Tests")
        monkeypatch.setenv(f"GIT_{role}_EMAIL", "template-tests@example.invalid")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", "/dev/null")
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    repo = tmp_path / "template"
    git(tmp_path, "clone", "-q", str(ROOT), str(repo))
    for name in ("tools/release.py", "copier.yml", "releases.toml"):
        (repo / name).parent.mkdir(exist_ok=True)
        (repo / name).write_bytes((ROOT / name).read_bytes())
    # The repository's own unreleased entries are not the tests' business.
    changelog = repo / "CHANGELOG.md"
    text = changelog.read_text(encoding="utf-8")
    start = text.index("## [Unreleased]\n") + len("## [Unreleased]\n")
    changelog.write_text(text[:start] + "\n" + text[text.index("\n## [", start) + 1 :])
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--allow-empty", "-m", "The working tree's release script")
    set_migration_version(repo, VERSION)
    return repo


def test_release_tags_the_commit_and_records_it_on_top(clone: Path) -> None:
    """Tag at the released commit; releases.toml and the CHANGELOG name it, one commit later."""
    with_section(clone, section(VERSION))
    released = git(clone, "rev-parse", "HEAD").strip()

    proc = release(clone, VERSION, "--summary", SUMMARY)

    assert proc.returncode == 0, proc.stderr
    assert f"git push origin HEAD v{VERSION}" in proc.stdout
    assert git(clone, "rev-parse", f"v{VERSION}^{{commit}}").strip() == released
    assert git(clone, "rev-parse", "HEAD^").strip() == released
    assert not git(clone, "status", "--porcelain").strip()
    entries = tomllib.loads((clone / "releases.toml").read_text(encoding="utf-8"))["release"]
    assert entries[-1] == {
        "version": VERSION,
        "commit": released,
        "date": "2026-12-01",
        "summary": SUMMARY,
    }
    changelog = (clone / "CHANGELOG.md").read_text(encoding="utf-8")
    heading = f"## [{VERSION}] - 2026-12-01\n\nCommit `{released[:7]}` (tag `v{VERSION}`).\n\n"
    assert heading in changelog


@pytest.mark.parametrize(
    ("prepare", "args", "reason"),
    [
        (lambda _: None, [VERSION], f"no section `## [{VERSION}]"),
        (lambda c: with_section(c, section(LATEST)), [LATEST], "not newer than"),
        (lambda c: with_section(c, section(VERSION)), [VERSION[:-2]], "must be X.Y.Z"),
        (
            lambda c: with_section(c, section(VERSION, upgrade=False)),
            [VERSION],
            "Upgrade notes",
        ),
        (
            lambda c: (with_section(c, section(VERSION)), set_migration_version(c, NEWER)),
            [VERSION],
            f"newer than {VERSION}",
        ),
        (
            lambda c: (with_section(c, section(VERSION)), (c / "README.md").write_text("x")),
            [VERSION],
            "uncommitted changes",
        ),
        (
            lambda c: with_section(c, "- Leftover entry.\n\n" + section(VERSION)),
            [VERSION],
            "move the [Unreleased] entries",
        ),
    ],
    ids=[
        "no-section",
        "not-newer",
        "bad-version",
        "migration-not-announced",
        "migration-too-new",
        "dirty",
        "unreleased-left",
    ],
)
def test_a_refused_release_says_why_and_changes_nothing(
    clone: Path, prepare: Callable[[Path], object], args: list[str], reason: str
) -> None:
    """No tag, no commit, no edited file: only the reason on stderr."""
    prepare(clone)
    head = git(clone, "rev-parse", "HEAD").strip()
    status = git(clone, "status", "--porcelain")

    proc = release(clone, *args, "--summary", SUMMARY)

    assert proc.returncode == 1
    assert reason in proc.stderr, proc.stderr
    assert git(clone, "rev-parse", "HEAD").strip() == head
    assert git(clone, "status", "--porcelain") == status
    assert not git(clone, "tag", "--list", f"v{VERSION}*").strip()
