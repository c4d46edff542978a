"""Copier migration to 0.3.0: carry your dependencies into pyproject.toml's own region.

Up to 0.2.0 the template's dependencies and yours shared one sorted list, so `uv add`
put yours among the template's, and the 0.3.0 layout (the template's region, then
yours) would conflict with every line you added. Copier runs this script twice while
updating across 0.3.0:

- `before` (in the project, before Copier takes its snapshot): takes the entries that
  are not the template's out of `[project] dependencies` and `[dependency-groups] dev`,
  stages the result, and keeps them in the git directory;
- `after` (once the new pyproject.toml is written): appends them to your region of the
  same lists, where `uv add` would have put them.

An entry naming one of the template's packages stays where it is: if you changed its
version, git shows the conflict to resolve. Both stages are idempotent: `before` does
nothing once pyproject.toml has the regions, `after` nothing without kept entries, and
it never adds a package a list already names. Standard library only: it runs in
Copier's own interpreter.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path("pyproject.toml")
STASH = "copier-dependency-regions.json"
# The 0.3.0 layout ends the template's region with this line in each list.
REGION_END = "# --- end of the template's dependencies"
# (table header, list key) of the lists `uv add` and `uv add --dev` write to.
LISTS = {
    "dependencies": ("[project]", "dependencies"),
    "dev": ("[dependency-groups]", "dev"),
}
# What the template put in those lists in every release before 0.3.0 (0.1.0, 0.2.0).
TEMPLATE_PACKAGES = {
    "dependencies": {
        "asyncpg",
        "googleapis-common-protos",
        "grpcio",
        "grpcio-health-checking",
        "grpcio-reflection",
        "grpcio-status",
        "httptools",
        "orjson",
        "protobuf",
        "pydantic",
        "pydantic-settings",
        "uvicorn",
    },
    "dev": {
        "asyncpg-stubs",
        "grpcio-tools",
        "hatchling",
        "import-linter",
        "mypy",
        "nox",
        "pytest",
        "pytest-asyncio",
        "ruff",
        "types-grpcio",
        "types-grpcio-health-checking",
        "types-grpcio-reflection",
        "types-grpcio-status",
        "types-protobuf",
    },
}
_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")


def package(requirement: str) -> str:
    """The normalized project name of a PEP 508 requirement ("Foo_Bar>=1" -> "foo-bar")."""
    match = _NAME.match(requirement.strip())
    if match is None:
        return ""
    return re.sub(r"[-_.]+", "-", match.group()).lower()


def entry(line: str) -> str | None:
    """The requirement a line of a multi-line TOML array holds, or None (comment, bracket)."""
    try:
        values = tomllib.loads(f"v = [\n{line}\n]")["v"]
    except tomllib.TOMLDecodeError:
        return None
    return values[0] if len(values) == 1 and isinstance(values[0], str) else None


def array_lines(lines: list[str], header: str, key: str) -> range | None:
    """Indices of the lines between `key = [` and its `]` in table `header`, or None."""
    table = None
    start = None
    for index, line in enumerate(lines):
        stripped = line.strip()
        if start is not None:
            if stripped == "]":
                return range(start, index)
        elif stripped.startswith("["):
            table = stripped
        elif table == header and re.fullmatch(rf"{re.escape(key)}\s*=\s*\[", stripped):
            start = index + 1
    return None


def git_path(name: str) -> Path:
    """A file in the project's git directory (worktrees and submodules included)."""
    out = subprocess.run(
        ["git", "rev-parse", "--git-path", name],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip())


def before() -> None:
    """Take your entries out of the template's lists; stage that; keep them for `after`."""
    if not PYPROJECT.is_file():
        return
    text = PYPROJECT.read_text(encoding="utf-8")
    if REGION_END in text:
        return
    lines = text.splitlines(keepends=True)
    kept: dict[str, list[str]] = {}
    drop: set[int] = set()
    for name, (header, key) in LISTS.items():
        span = array_lines(lines, header, key)
        if span is None:
            continue
        for index in span:
            requirement = entry(lines[index])
            if requirement is not None and package(requirement) not in TEMPLATE_PACKAGES[name]:
                kept.setdefault(name, []).append(lines[index].rstrip("\n"))
                drop.add(index)
    if not kept:
        return
    stash = git_path(STASH)
    if stash.exists():
        # A run that stopped between the stages: keep what it took out too.
        for name, earlier in json.loads(stash.read_text(encoding="utf-8")).items():
            kept[name] = [*earlier, *(line for line in kept.get(name, []) if line not in earlier)]
    stash.write_text(json.dumps(kept, indent=2), encoding="utf-8")
    PYPROJECT.write_text(
        "".join(line for index, line in enumerate(lines) if index not in drop), encoding="utf-8"
    )
    # Copier snapshots the index, not the working tree: an unstaged edit would be undone.
    subprocess.run(["git", "add", "--", str(PYPROJECT)], check=True)
    moved = [entry(line) or line for name in kept for line in kept[name]]
    print(f"pyproject.toml: set aside your dependencies for the new layout: {', '.join(moved)}")


def after() -> None:
    """Append the kept entries to your region of each list, unless a list names them."""
    stash = git_path(STASH)
    if not stash.exists():
        return
    kept: dict[str, list[str]] = json.loads(stash.read_text(encoding="utf-8"))
    lines = PYPROJECT.read_text(encoding="utf-8").splitlines(keepends=True)
    added: list[str] = []
    skipped: list[str] = []
    found = {name: array_lines(lines, *LISTS[name]) for name in kept}
    spans = {name: span for name, span in found.items() if span is not None}
    missing = [name for name in kept if name not in spans]
    if missing:
        where = ", ".join(f"{LISTS[name][1]} in {LISTS[name][0]}" for name in missing)
        raise SystemExit(f"pyproject.toml has no list {where}: add {kept} by hand")
    # The lower list first, so that inserting lines leaves the other one's indices valid.
    for name in sorted(spans, key=lambda name: spans[name].start, reverse=True):
        span = spans[name]
        present = {package(r) for r in map(entry, lines[span.start : span.stop]) if r}
        new = []
        for line in kept[name]:
            requirement = entry(line) or line
            if package(requirement) in present:
                skipped.append(requirement)
            else:
                new.append(f"{line}\n")
                added.append(requirement)
        lines[span.stop : span.stop] = new
    PYPROJECT.write_text("".join(lines), encoding="utf-8")
    stash.unlink()
    if added:
        print(f"pyproject.toml: your dependencies are in your region now: {', '.join(added)}")
    if skipped:
        print(
            "pyproject.toml: the template now has these itself, yours were left out: "
            f"{', '.join(skipped)}"
        )


def main(argv: list[str]) -> int:
    """Run the stage Copier names (`before` or `after`)."""
    stages = {"before": before, "after": after}
    if len(argv) != 2 or argv[1] not in stages:
        print(f"usage: {argv[0]} before|after", file=sys.stderr)
        return 2
    stages[argv[1]]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
