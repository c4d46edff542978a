"""The default project's own test suite passes against the real PostgreSQL."""

from __future__ import annotations

import re
from pathlib import Path

from support import run


def test_generated_project_test_suite_passes(default_project: Path) -> None:
    """Unit, integration and lifecycle tests of the generated service all pass."""
    args = ["uv", "run", "pytest", "-q", "-p", "no:cacheprovider"]
    proc = run(args, default_project, timeout=900)
    summary = proc.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed is not None, summary
    # Guard against a collection mistake that silently runs almost nothing.
    assert int(passed.group(1)) >= 40, summary
    assert "failed" not in summary
    assert "error" not in summary


def test_generated_project_nox_lint_and_types_pass(default_project: Path) -> None:
    """The generated noxfile's lint and type sessions pass on a fresh render."""
    run(["uv", "run", "nox", "-s", "lint", "types"], default_project, timeout=600)
