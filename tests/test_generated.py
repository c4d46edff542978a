"""The default project's own test suite passes against the real PostgreSQL, all of it."""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from support import run

TIERS = ("unit", "integration", "lifecycle")


def _collected(project: Path) -> int:
    """How many tests the suite holds, counted without its conftest files.

    Collection does not need the fixtures, so this count cannot be cut by a conftest
    that deselects or filters tests: the run below must report the same number.
    """
    args = ["uv", "run", "pytest", "--collect-only", "-q", "--noconftest", "-p", "no:cacheprovider"]
    proc = run(args, project, timeout=300)
    counted = re.search(r"(\d+) tests? collected", proc.stdout)
    assert counted is not None, proc.stdout[-2000:]
    return int(counted.group(1))


def test_generated_project_test_suite_passes_in_full(default_project: Path, tmp_path: Path) -> None:
    """Unit, integration and lifecycle tests of the generated service all run and pass.

    Every collected test runs (nothing deselected), each tier passes tests of its own,
    and under CI (`CI` set, where every tool is installed) nothing is skipped: a
    conftest that skipped the integration or lifecycle tier would otherwise pass.
    """
    report = tmp_path / "junit.xml"
    args = ["uv", "run", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={report}"]
    proc = run(args, default_project, timeout=900)
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
    assert ran == _collected(default_project), (summary, outcomes)
    for tier in TIERS:
        assert outcomes[tier, "passed"] > 0, f"no {tier} test passed: {outcomes}"
    skipped = sum(count for (_, status), count in outcomes.items() if status == "skipped")
    if os.environ.get("CI"):
        assert skipped == 0, f"{skipped} skipped under CI:\n{proc.stdout[-3000:]}"


def test_generated_project_nox_lint_and_types_pass(default_project: Path) -> None:
    """The generated noxfile's lint and type sessions pass on a fresh render."""
    run(["uv", "run", "nox", "-s", "lint", "types"], default_project, timeout=600)
