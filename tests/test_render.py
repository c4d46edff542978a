"""The render matrix: every answer profile renders to a clean, lint- and type-clean project."""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import PROFILES, ROOT, render, run, tool_env, without_foreign_templates

# Build and tool output inside a rendered (and installed) project: not rendered by Copier.
NOT_RENDERED = {
    ".venv",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    "__pycache__",
    ".nox",
    ".hypothesis",
}
STUB_NAMES = ("items_pb2.py", "items_pb2.pyi", "items_pb2_grpc.py", "items_pb2_grpc.pyi")
DESCRIPTOR_SET = "descriptors.binpb"


def _rendered_files(project: Path) -> Iterator[Path]:
    for root, dirs, names in os.walk(project):
        dirs[:] = sorted(d for d in dirs if d not in NOT_RENDERED)
        for name in sorted(names):
            if (Path(root) == project and name == "uv.lock") or "_pb2" in name:
                continue  # written by `uv sync`, not by Copier
            if name == DESCRIPTOR_SET:
                continue  # likewise
            yield Path(root, name)


def _text(path: Path) -> str | None:
    """The file's text, or None for a binary file (copied verbatim, never templated)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None


def _tree(project: Path) -> dict[str, bytes]:
    return {p.relative_to(project).as_posix(): p.read_bytes() for p in _rendered_files(project)}


def _toml(path: Path) -> dict[str, object]:
    return tomllib.loads(path.read_text(encoding="utf-8"))


def _package(profile: str) -> str:
    return str(PROFILES[profile].get("package_name", "acme_items"))


@pytest.mark.parametrize("profile", PROFILES)
def test_render_leaves_no_jinja(rendered: Callable[[str], Path], profile: str) -> None:
    """No `.jinja` file, no templated path and no Jinja delimiter survives rendering."""
    project = rendered(profile)
    files = list(_rendered_files(project))
    assert len(files) > 30, [f.name for f in files]
    leftovers: list[str] = []
    for path in files:
        rel = path.relative_to(project).as_posix()
        assert not rel.endswith(".jinja"), rel
        assert "{{" not in rel, rel
        for lineno, line in enumerate((_text(path) or "").splitlines(), 1):
            # `}}` alone is legitimate (nested dicts, JSON in the README); an opening
            # delimiter is never legitimate in a rendered file, except in other tools'
            # templates (GitHub's expressions, Prometheus' and Grafana's templates).
            jinja = without_foreign_templates(rel, line)
            if any(marker in jinja for marker in ("{{", "{%", "%}", "{#")):
                leftovers.append(f"{rel}:{lineno}: {line.strip()}")
    assert not leftovers, "\n".join(leftovers)


@pytest.mark.parametrize("profile", PROFILES)
def test_generated_files_cite_only_what_the_owner_can_open(
    rendered: Callable[[str], Path], profile: str
) -> None:
    """No rendered file refers to the template's internal notes, which services never get."""
    project = rendered(profile)
    citing = [
        path.relative_to(project).as_posix()
        for path in _rendered_files(project)
        if "pitfalls" in (_text(path) or "").lower()
    ]
    assert not citing, f"these files cite notes the service does not ship: {citing}"


@pytest.mark.slow
@pytest.mark.parametrize("profile", PROFILES)
def test_render_passes_ruff_and_mypy_strict(installed: Callable[[str], Path], profile: str) -> None:
    """The generated project's own ruff (lint, format) and strict mypy config pass."""
    project = installed(profile)
    run(["uv", "run", "ruff", "check", "--no-cache", "."], project, timeout=300)
    run(["uv", "run", "ruff", "format", "--no-cache", "--check", "."], project, timeout=300)
    proc = run(["uv", "run", "mypy"], project, timeout=600)
    assert "Success: no issues found" in proc.stdout, proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("profile", PROFILES)
def test_install_generates_stubs_that_git_does_not_track(
    installed: Callable[[str], Path], tmp_path: Path, profile: str
) -> None:
    """`uv sync` writes the protobuf stubs; the generated .gitignore keeps them out of git."""
    project = installed(profile)
    stubs = project / "src" / _package(profile) / "v1"
    for name in STUB_NAMES:
        assert (stubs / name).is_file(), f"uv sync did not generate {name}"
    copy = tmp_path / "repo"
    shutil.copytree(project, copy, ignore=shutil.ignore_patterns(".venv", "*_cache"))
    assert (copy / "src" / _package(profile) / "v1" / "items_pb2.py").is_file()
    # Only the project's own .gitignore may decide: no global or system excludes.
    git_env = {"GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1"}
    run(["git", "init", "-q"], copy, **git_env)
    run(["git", "add", "-A"], copy, **git_env)
    staged = run(["git", "status", "--porcelain"], copy, **git_env).stdout.splitlines()
    assert f"A  src/{_package(profile)}/v1/__init__.py" in staged, staged
    assert f"A  proto/{_package(profile)}/v1/items.proto" in staged, staged
    assert (project / "src" / _package(profile) / DESCRIPTOR_SET).is_file()
    leaked = [line for line in staged if "_pb2" in line or DESCRIPTOR_SET in line]
    assert not leaked, f"generated stubs would be committed: {leaked}"


def test_gateway_answer_decides_whether_the_gateway_is_rendered(
    rendered: Callable[[str], Path],
) -> None:
    """with_gateway=false (minimal) leaves out the gateway's code, tests, docs and tools."""
    gateway_paths = ("src/acme_items/gateway/routes.py", "tests/unit/gateway", "docs/gateway.md")
    default, minimal = rendered("default"), rendered("minimal")
    for path in gateway_paths:
        assert (default / path).exists(), path
        assert not (minimal / path).exists(), path
    assert not (minimal / "src" / "acme_items" / "gateway").exists()
    for text, present in (
        ((default / "pyproject.toml").read_text(encoding="utf-8"), True),
        ((minimal / "pyproject.toml").read_text(encoding="utf-8"), False),
    ):
        assert ("openapi-spec-validator" in text) is present
        assert ("httpserver : gateway" in text) is present
    assert "docs/gateway.md" not in (minimal / "README.md").read_text(encoding="utf-8")
    # No gateway code in the two modules rendered from templates, no settings, no docs.
    package = minimal / "src" / "acme_items"
    assert "GatewaySettings" not in (package / "settings.py").read_text(encoding="utf-8")
    assert "gateway" not in (package / "app.py").read_text(encoding="utf-8")
    assert "GatewaySettings" in (default / "src" / "acme_items" / "settings.py").read_text(
        encoding="utf-8"
    )
    for name in ("configuration.md", "architecture.md"):
        assert "GATEWAY__" not in (minimal / "docs" / name).read_text(encoding="utf-8"), name
    assert "swagger-ui-bundle" not in (minimal / "pyproject.toml").read_text(encoding="utf-8")


def test_custom_profile_names_everything_after_its_answers(
    rendered: Callable[[str], Path],
) -> None:
    """Package dir, proto path and package, ports, distribution and script follow the answers."""
    project = rendered("custom")
    assert (project / "src" / "ledger_svc" / "__main__.py").is_file()
    assert not (project / "src" / "acme_items").exists()
    proto = project / "proto" / "ledger_svc" / "v1" / "items.proto"
    assert "\npackage corp.billing.ledger.v1;\n" in proto.read_text(encoding="utf-8")
    defaults = _toml(project / "src" / "ledger_svc" / "defaults.toml")
    assert (defaults["grpc_port"], defaults["admin_port"], defaults["http_port"]) == (
        7443,
        7090,
        7080,
    )
    assert defaults["service_name"] == "billing-ledger"
    pyproject = _toml(project / "pyproject.toml")
    meta = pyproject["project"]
    assert isinstance(meta, dict)
    assert meta["name"] == "billing-ledger"
    assert meta["description"] == "Keeps the ledger of every bill"
    assert meta["authors"] == [{"name": "Ledger Team", "email": "ledger@example.org"}]
    assert meta["scripts"] == {"billing-ledger": "ledger_svc.__main__:main"}


def test_custom_profile_has_no_trace_of_the_default_names(
    rendered: Callable[[str], Path],
) -> None:
    """No file or path still mentions the default names: nothing is hard-coded."""
    project = rendered("custom")
    defaults = ("acme_items", "acme-items", "acme.items", "Acme Items")
    traces = [
        f"{path.relative_to(project)}: {name}"
        for path in _rendered_files(project)
        for name in defaults
        if name in path.relative_to(project).as_posix() or name in (_text(path) or "")
    ]
    assert not traces, traces


def test_redis_answer_decides_whether_redis_url_is_configured(
    rendered: Callable[[str], Path],
) -> None:
    """with_redis=false (minimal) leaves no redis_url in defaults.toml; the default has one."""
    minimal = _toml(rendered("minimal") / "src" / "acme_items" / "defaults.toml")
    default = _toml(rendered("default") / "src" / "acme_items" / "defaults.toml")
    assert "redis_url" not in minimal
    assert default["redis_url"] == "redis://127.0.0.1:6379/0"
    assert minimal["gateway_enabled"] is False
    assert default["gateway_enabled"] is True


# The answers file records `with_redis: false` itself, and the template's path (which may
# contain the word); nothing else in a with_redis=false service may name Redis.
REDIS_ALLOWED = {".copier-answers.yml"}


def _redis_mentions(project: Path) -> list[str]:
    """Every file (the lock file and generated stubs included) whose path or text names Redis."""
    found = []
    for root, dirs, names in os.walk(project):
        dirs[:] = sorted(d for d in dirs if d not in NOT_RENDERED and d != ".git")
        for name in sorted(names):
            path = Path(root, name)
            relative = path.relative_to(project).as_posix()
            text = (_text(path) or "") if relative not in REDIS_ALLOWED else ""
            if "redis" in relative.lower() or "redis" in text.lower():
                found.append(relative)
    return found


def test_without_redis_no_file_mentions_redis(installed: Callable[[str], Path]) -> None:
    """with_redis=false: no Redis code, dependency, setting, test or doc; the default has them."""
    assert _redis_mentions(installed("minimal")) == []
    mentions = set(_redis_mentions(installed("default")))
    expected = {
        "uv.lock",
        "pyproject.toml",
        "compose.yaml",
        ".github/workflows/ci.yml",
        "src/acme_items/localdeps.py",
        "src/acme_items/cache.py",
        "tests/integration/test_localdeps.py",
        "docs/cache.md",
    }
    assert expected <= mentions, sorted(expected - mentions)


@pytest.fixture(scope="module")
def plain_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The template's working tree outside git.

    Rendering a dirty git working tree makes Copier commit the changes in a scratch clone,
    so `_commit` in the answers file changes every second; a plain directory has none.
    """
    dst = tmp_path_factory.mktemp("template")
    shutil.copy2(ROOT / "copier.yml", dst / "copier.yml")
    shutil.copytree(ROOT / "template", dst / "template")
    return dst


@pytest.mark.parametrize("profile", PROFILES)
def test_rendering_twice_gives_byte_identical_trees(
    plain_template: Path, tmp_path: Path, profile: str
) -> None:
    """Renders are deterministic, so an update diff shows only real template changes."""
    first = _tree(render(tmp_path / "first", plain_template, **PROFILES[profile]))
    second = _tree(render(tmp_path / "second", plain_template, **PROFILES[profile]))
    assert first.keys() == second.keys()
    differing = sorted(name for name in first if first[name] != second[name])
    assert not differing, differing


# The python_version answers besides the default, each needing its own interpreter.
OTHER_PYTHONS = ["3.12", "3.13"]


@pytest.mark.parametrize("version", OTHER_PYTHONS)
def test_python_version_answer_sets_every_target(
    installed: Callable[[str], Path], tmp_path: Path, version: str
) -> None:
    """.python-version, requires-python, ruff's and mypy's targets follow the answer; ruff passes.

    The ruff binary is the one the default project pins, run against this render's
    configuration; `test_python_version_answer_installs_and_checks` does the rest.
    """
    project = render(tmp_path / "project", python_version=version)
    assert (project / ".python-version").read_text(encoding="utf-8") == f"{version}\n"
    pyproject = _toml(project / "pyproject.toml")
    meta, tool = pyproject["project"], pyproject["tool"]
    assert isinstance(meta, dict)
    assert isinstance(tool, dict)
    assert meta["requires-python"] == f">={version}"
    assert tool["ruff"]["target-version"] == f"py{version.replace('.', '')}"
    assert tool["mypy"]["python_version"] == version
    ruff = str(installed("default") / ".venv" / "bin" / "ruff")
    run([ruff, "check", "--no-cache", "."], project)
    run([ruff, "format", "--no-cache", "--check", "."], project)


def _uv_without_pinned_python(args: list[str], project: Path) -> subprocess.CompletedProcess[str]:
    """Run uv as a user does: with the interpreter chosen by the project's .python-version."""
    env = tool_env()
    env.pop("UV_PYTHON", None)
    return subprocess.run(
        ["uv", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.parametrize("version", OTHER_PYTHONS)
def test_python_version_answer_installs_and_checks(tmp_path: Path, version: str) -> None:
    """With that interpreter installed, `uv sync` uses it and ruff, mypy and unit tests pass.

    Skipped where uv finds no such interpreter (uv would try to download one), unless
    the version is listed in TEMPLATE_TEST_PYTHONS under CI=true: a CI machine that is
    meant to have it must not skip silently.
    """
    project = render(tmp_path / "project", python_version=version)
    found = _uv_without_pinned_python(["python", "find", "--no-python-downloads"], project)
    if found.returncode != 0:
        expected = version in os.environ.get("TEMPLATE_TEST_PYTHONS", "").split()
        reason = f"no Python {version} installed that uv can find: {found.stderr.strip()[-300:]}"
        if expected and os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    for args in (
        ["sync", "--quiet", "--no-python-downloads"],
        ["run", "--no-sync", "python", "-c", "import sys; print(sys.version)"],
        ["run", "--no-sync", "ruff", "check", "--no-cache", "."],
        ["run", "--no-sync", "mypy"],
        ["run", "--no-sync", "pytest", "-q", "-p", "no:cacheprovider", "tests/unit"],
    ):
        proc = _uv_without_pinned_python(args, project)
        assert proc.returncode == 0, (
            f"uv {' '.join(args)}:\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}"
        )
        if args[-1].startswith("import sys"):
            assert proc.stdout.startswith(f"{version}."), proc.stdout


@pytest.mark.parametrize("license_id", ["Proprietary", "MIT", "Apache-2.0", "BSD-3-Clause"])
def test_license_answer_writes_the_licence_and_declares_it(tmp_path: Path, license_id: str) -> None:
    """LICENSE holds the chosen licence naming the owners; pyproject declares it (PEP 639)."""
    project = render(tmp_path / "project", license=license_id, author_name="Ledger Team")
    text = (project / "LICENSE").read_text(encoding="utf-8")
    first_line = {
        "Proprietary": "Copyright (c) Ledger Team. All rights reserved.",
        "MIT": "MIT License",
        "Apache-2.0": "Apache License",
        "BSD-3-Clause": "BSD 3-Clause License",
    }[license_id]
    assert text.splitlines()[0].strip() == first_line
    if license_id != "Apache-2.0":  # its owners go in a notice, not in the licence text
        assert "Ledger Team" in text
    meta = _toml(project / "pyproject.toml")["project"]
    assert isinstance(meta, dict)
    assert meta["license-files"] == ["LICENSE"]
    if license_id == "Proprietary":
        assert meta["license"] == "LicenseRef-Proprietary"
        assert "Private :: Do Not Upload" in meta["classifiers"]
    else:
        assert meta["license"] == license_id
        assert "classifiers" not in meta
