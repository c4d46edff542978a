"""Release the template: check, tag, and record the release in releases.toml.

    nox -s release -- 0.3.0 --summary "One line on what the release brings"

Run it on the commit to release, with a clean working tree, after the CHANGELOG has its
`## [0.3.0] - YYYY-MM-DD` section (and `## [Unreleased]` above it, empty). It refuses,
changing nothing, when:

- the version is not X.Y.Z or not newer than every release in releases.toml, or its tag
  exists;
- the CHANGELOG has no section for it, the section is empty, or [Unreleased] still
  has entries;
- a Copier migration in copier.yml has a newer version (it would not run when services
  update to this release), or a migration first released now is not announced in the
  section's "Upgrade" notes with `--trust`.

Then it tags the commit `vX.Y.Z` (annotated), and in one commit on top records it:
releases.toml gets the version, the commit, the CHANGELOG's date and the summary; the
CHANGELOG section gets the line "Commit `abc1234` (tag `vX.Y.Z`)." (A commit cannot name
itself, hence the second commit.) Pushing is left to you: it prints the command.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
VERSION = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+")
HEADING = re.compile(r"^## \[(?P<name>[^\]]+)\](?: - (?P<date>[0-9]{4}-[0-9]{2}-[0-9]{2}))?$")


class RefusedError(Exception):
    """The release cannot be made as asked; nothing was changed."""


def key(version: str) -> tuple[int, ...]:
    """A version as a comparable tuple."""
    return tuple(int(part) for part in version.split("."))


def git(*args: str) -> str:
    """Run git in the repository; its output."""
    proc = subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False, timeout=60
    )
    if proc.returncode != 0:
        raise RefusedError(f"git {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def sections(changelog: str) -> dict[str, tuple[str | None, str, int]]:
    """CHANGELOG sections by name: (date, body, line index of the heading)."""
    lines = changelog.splitlines()
    found: dict[str, tuple[str | None, str, int]] = {}
    starts = [(i, m) for i, line in enumerate(lines) if (m := HEADING.match(line))]
    for n, (index, match) in enumerate(starts):
        end = starts[n + 1][0] if n + 1 < len(starts) else len(lines)
        body = "\n".join(lines[index + 1 : end]).strip()
        found[match["name"]] = (match["date"], body, index)
    return found


def migrations() -> list[str]:
    """Versions of the Copier migrations in copier.yml."""
    config = yaml.safe_load((ROOT / "copier.yml").read_text(encoding="utf-8"))
    return [str(migration["version"]) for migration in config.get("_migrations", [])]


def check_version(version: str, summary: str) -> str:
    """A new version, a clean tree, a one-line summary; returns the latest release."""
    if not VERSION.fullmatch(version):
        raise RefusedError(f"version must be X.Y.Z: {version!r}")
    if not summary.strip() or "\n" in summary:
        raise RefusedError("--summary must be one non-empty line")
    if git("status", "--porcelain").strip():
        raise RefusedError("the working tree has uncommitted changes: commit them first")
    released = tomllib.loads((ROOT / "releases.toml").read_text(encoding="utf-8"))["release"]
    latest = max((r["version"] for r in released), key=key)
    if key(version) <= key(latest):
        raise RefusedError(f"{version} is not newer than the latest release, {latest}")
    if git("tag", "--list", f"v{version}").strip():
        raise RefusedError(f"tag v{version} exists already")
    return latest


def check_changelog(version: str) -> tuple[str, str]:
    """The version's CHANGELOG section, dated and filled; returns (date, body)."""
    found = sections((ROOT / "CHANGELOG.md").read_text(encoding="utf-8"))
    if "Unreleased" not in found:
        raise RefusedError("CHANGELOG.md has no [Unreleased] section (keep it, empty)")
    if found["Unreleased"][1]:
        raise RefusedError(f"CHANGELOG.md: move the [Unreleased] entries under [{version}]")
    if version not in found:
        raise RefusedError(f"CHANGELOG.md has no section `## [{version}] - YYYY-MM-DD`")
    date, body, _ = found[version]
    if date is None or not body:
        raise RefusedError(f"CHANGELOG.md: [{version}] needs a date and entries")
    return date, body


def check_migrations(version: str, latest: str, body: str) -> None:
    """Every migration runs by this release; one first released now is announced."""
    pending = migrations()
    later = [v for v in pending if key(v) > key(version)]
    if later:
        raise RefusedError(
            f"copier.yml has migrations for {', '.join(later)}, newer than {version}: they "
            "would not run on updates to this release (give them this version)"
        )
    new = [v for v in pending if key(latest) < key(v)]
    if new and not ("### Upgrade" in body and "--trust" in body):
        raise RefusedError(
            f"this release carries a Copier migration ({', '.join(new)}): say in the "
            f"CHANGELOG's [{version}] Upgrade notes that updating to it takes --trust"
        )


def record(version: str, summary: str, date: str, commit: str) -> None:
    """Append the release to releases.toml and name its commit in the CHANGELOG."""
    releases = ROOT / "releases.toml"
    entry = (
        f"\n[[release]]\nversion = {json.dumps(version)}\ncommit = {json.dumps(commit)}\n"
        f"date = {json.dumps(date)}\nsummary = {json.dumps(summary, ensure_ascii=False)}\n"
    )
    releases.write_text(releases.read_text(encoding="utf-8") + entry, encoding="utf-8")

    changelog = ROOT / "CHANGELOG.md"
    lines = changelog.read_text(encoding="utf-8").splitlines(keepends=True)
    _, _, heading = sections("".join(lines))[version]
    lines[heading + 1 : heading + 1] = [f"\nCommit `{commit[:7]}` (tag `v{version}`).\n"]
    changelog.write_text("".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Check, tag, record; print what to push."""
    parser = argparse.ArgumentParser(prog="nox -s release --", description=__doc__.split("\n")[0])
    parser.add_argument("version", help="the version to release, X.Y.Z")
    parser.add_argument("--summary", required=True, help="one line for releases.toml")
    args = parser.parse_args(argv)
    try:
        latest = check_version(args.version, args.summary)
        date, body = check_changelog(args.version)
        check_migrations(args.version, latest, body)
        commit = git("rev-parse", "HEAD").strip()
        git("tag", "--annotate", f"v{args.version}", "--message", f"Release {args.version}")
        record(args.version, args.summary, date, commit)
        git("add", "releases.toml", "CHANGELOG.md")
        git("commit", "--quiet", "--message", f"Release {args.version}: record its commit")
    except RefusedError as exc:
        print(f"release: {exc}", file=sys.stderr)
        return 1
    print(f"Released {args.version}: tag v{args.version} is {commit[:7]}, recorded on top.")
    print(f"Publish both: git push origin HEAD v{args.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
