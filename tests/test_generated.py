"""The default project's own test suite passes against the real PostgreSQL, all of it."""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from support import run

TIERS = ("unit", "integration", "lifecycle")


def _collected(project: Path, paths: tuple[str, ...] = ()) -> int:
    """How many tests the suite (or `paths` of it) holds, counted without its conftest files.

    Collection does not need the fixtures, so this count cannot be cut by a conftest
    that deselects or filters tests: the run below must report the same number.
    """
    args = ["uv", "run", "pytest", "--collect-only", "-q", "--noconftest", "-p", "no:cacheprovider"]
    proc = run([*args, *paths], project, timeout=300)
    counted = re.search(r"(\d+) tests? collected", proc.stdout)
    assert counted is not None, proc.stdout[-2000:]
    return int(counted.group(1))


def _run_suite(project: Path, report: Path, tiers: tuple[str, ...] = TIERS) -> None:
    """Run the project's tests of `tiers`, and check that they all ran.

    Every collected test runs, each tier passes tests of its own, and under CI (`CI`
    set) nothing is skipped.
    """
    paths = () if tiers == TIERS else tuple(f"tests/{tier}" for tier in tiers)
    args = ["uv", "run", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={report}"]
    proc = run([*args, *paths], project, timeout=900)
    summary = proc.stdout.strip().splitlines()[-1]
    assert "failed" not in summary, summary
    assert "error" not in summary, summary
    assert "deselected" not in summary, summary

    outcomes: Counter[tuple[str, str]] = Counter()
    for case in ET.parse(report).getroot().iter("testcase"):  # noqa: S314 - our own report
        tier = next((t for t in TIERS if f"tests.{t}." in case.get("classname", "")), "other")
        status = "skipped" if case.find("skipped") is not None else "passed"
        outcomes[tier, status] += 1
    ran = sum(outcomes.values())
    assert ran == _collected(project, paths), (summary, outcomes)
    for tier in tiers:
        assert outcomes[tier, "passed"] > 0, f"no {tier} test passed: {outcomes}"
    skipped = sum(count for (_, status), count in outcomes.items() if status == "skipped")
    if os.environ.get("CI"):
        assert skipped == 0, f"{skipped} skipped under CI:\n{proc.stdout[-3000:]}"


def test_generated_project_test_suite_passes_in_full(default_project: Path, tmp_path: Path) -> None:
    """Unit, integration and lifecycle tests of the generated service all run and pass.

    Every collected test runs (nothing deselected), each tier passes tests of its own,
    and under CI (`CI` set, where every tool is installed) nothing is skipped: a
    conftest that skipped the integration or lifecycle tier would otherwise pass.
    """
    _run_suite(default_project, tmp_path / "junit.xml")


def test_custom_profile_integration_and_lifecycle_tiers_pass(
    installed: Callable[[str], Path], tmp_path: Path
) -> None:
    """The custom answers (other package, proto package, ports) run, not only lint.

    A bug that depends on the package name or the proto package (a hard-coded import,
    a method path, a port) shows in the tiers that serve requests: the in-process
    server and the real process. The unit tier's property tests are left to the
    default profile, where they cost the same and find the same.
    """
    _run_suite(installed("custom"), tmp_path / "junit.xml", ("integration", "lifecycle"))


def test_generated_project_nox_lint_and_types_pass(default_project: Path) -> None:
    """The generated noxfile's lint and type sessions pass on a fresh render."""
    run(["uv", "run", "nox", "-s", "lint", "types"], default_project, timeout=600)
