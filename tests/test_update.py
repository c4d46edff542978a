"""`copier update` from an earlier tag: user work kept, template changes applied, no conflicts."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from fnmatch import fnmatchcase
from pathlib import Path

import copier
import pytest
import yaml
from support import ROOT, run

PKG = "acme_items"  # the default answers
TEMPLATE_SRC = "template/src/{{package_name}}"
SEED_ONCE = re.compile(r"^\{% if _copier_operation == 'update' %\}(?P<path>[^{}]+)\{% endif %\}$")
CONFLICT_MARKER = re.compile(r"^(<{7}|>{7}|={7})( |$)", re.MULTILINE)

# What the "user" and the "template maintainer" change between v0.1.0 and v0.2.0.
USER_README_LINE = "On call: the items team, #items-oncall."
USER_FILE = f"src/{PKG}/reports.py"
USER_FILE_TEXT = '"""Monthly reports: the service owner\'s own module."""\n'
TEMPLATE_DOC_LINE = "Changed in template v0.2.0: this line proves managed files are updated."
TEMPLATE_README_LINE = "Template v0.2.0 README line: must not reach seed-once READMEs."
TEMPLATE_PROTO_LINE = "// Template v0.2.0 proto comment: must not reach seed-once protos."
NEW_TEMPLATE_FILE = "docs/added-in-v0.2.0.md"
# Dependencies: the user adds theirs with `uv add`, the template adds others in v0.2.0.
# In one sorted list each pair would be inserted at the same place, and conflict.
USER_DEPENDENCY = "httpx-auth"
USER_DEV_DEPENDENCY = "pytest-cov"
TEMPLATE_DEPENDENCY = '"httpx>=0.28,<1",'
TEMPLATE_DEV_DEPENDENCY = '"pytest-timeout==2.4.0",'


def add_user_dependencies(project: Path) -> None:
    """What a service owner does: `uv add` a dependency and a dev dependency (no install)."""
    run(["uv", "add", "--frozen", USER_DEPENDENCY], project)
    run(["uv", "add", "--frozen", "--dev", USER_DEV_DEPENDENCY], project)


def add_template_dependencies(pyproject_jinja: Path) -> None:
    """What a template maintainer does: a dependency into a group of the template's region."""
    edit(
        pyproject_jinja,
        '    "httptools>=0.6",\n',
        f'    "httptools>=0.6",\n    {TEMPLATE_DEPENDENCY}\n',
    )
    edit(
        pyproject_jinja,
        '    "pytest-asyncio==1.5.0",\n',
        f'    "pytest-asyncio==1.5.0",\n    {TEMPLATE_DEV_DEPENDENCY}\n',
    )


def git(cwd: Path, *args: str) -> str:
    """Run git in cwd (identity and config come from the environment set by the fixture)."""
    proc = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, f"git {' '.join(args)} in {cwd}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def commit_all(cwd: Path, message: str) -> None:
    """Stage everything and commit."""
    git(cwd, "add", "-A")
    git(cwd, "commit", "-q", "--no-verify", "-m", message)


def edit(path: Path, old: str, new: str) -> None:
    """Replace exactly one occurrence of old."""
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"{path}: expected one {old!r}"
    path.write_text(text.replace(old, new), encoding="utf-8")


def append(path: Path, line: str) -> None:
    """Append one line at the end of a text file."""
    text = path.read_text(encoding="utf-8")
    path.write_text(text.rstrip("\n") + f"\n{line}\n", encoding="utf-8")


def files(root: Path) -> dict[str, Path]:
    """Every file under root, outside .git, by relative POSIX path."""
    return {
        p.relative_to(root).as_posix(): p
        for p in root.rglob("*")
        if p.is_file() and ".git" not in p.relative_to(root).parts
    }


def is_seed_once(relpath: str, patterns: list[str]) -> bool:
    """Whether a rendered path matches one of the update-time exclusions of copier.yml."""
    parts = relpath.split("/")
    return any(
        len(parts) == len(p.split("/"))
        and all(fnmatchcase(a, b) for a, b in zip(parts, p.split("/"), strict=True))
        for p in patterns
    )


def assert_dependencies_of_both_kept(pyproject: Path) -> None:
    """The user's and the template's new dependencies are there, each in its own region."""
    text = pyproject.read_text(encoding="utf-8")
    data = tomllib.loads(text)
    dependencies = data["project"]["dependencies"]
    dev = data["dependency-groups"]["dev"]
    assert USER_DEPENDENCY in dependencies
    assert TEMPLATE_DEPENDENCY.strip('",') in dependencies
    assert USER_DEV_DEPENDENCY in dev
    assert TEMPLATE_DEV_DEPENDENCY.strip('",') in dev
    # `uv add` put the user's below the template's region, not sorted in among them.
    ends = [m.start() for m in re.finditer(r"# --- end of the template's dependencies", text)]
    assert len(ends) == 2, "pyproject.toml lost its region markers"
    assert text.index(f'"{USER_DEPENDENCY}"') > ends[0]
    assert text.index(f'"{USER_DEV_DEPENDENCY}"') > ends[1]


@pytest.fixture(autouse=True)
def git_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """A git identity and no user or system config, for our git calls and for Copier's."""
    for role in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{role}_NAME", "Template Tests")
        monkeypatch.setenv(f"GIT_{role}_EMAIL", "template-tests@example.invalid")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", "/dev/null")
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")


@pytest.fixture
def template_repo(tmp_path: Path) -> Path:
    """A git copy of the template's working tree (uncommitted changes included), tagged v0.1.0."""
    repo = tmp_path / "template"
    ignore = shutil.ignore_patterns(".git", ".nox", ".venv", "venv", "__pycache__", "*_cache")
    shutil.copytree(ROOT, repo, ignore=ignore)
    git(repo, "-c", "init.defaultBranch=main", "init", "-q")
    commit_all(repo, "Template v0.1.0")
    git(repo, "tag", "v0.1.0")
    return repo


def test_update_keeps_user_work_and_applies_template_changes(
    template_repo: Path, tmp_path: Path
) -> None:
    """Seed-once edits survive, managed files follow the template, no conflict anywhere."""
    project = tmp_path / "service"
    copier.run_copy(
        str(template_repo), project, defaults=True, unsafe=False, quiet=True, vcs_ref="v0.1.0"
    )
    git(project, "-c", "init.defaultBranch=main", "init", "-q")
    commit_all(project, "Generated from the template")
    proto_v1 = (project / "proto" / PKG / "v1" / "items.proto").read_text(encoding="utf-8")

    # The user's work: seed-once files edited, a file of their own added.
    edit(project / "src" / PKG / "domain" / "items.py", "NAME_MAX = 200", "NAME_MAX = 120")
    append(project / "README.md", USER_README_LINE)
    (project / USER_FILE).write_text(USER_FILE_TEXT, encoding="utf-8")
    add_user_dependencies(project)
    commit_all(project, "Our changes")

    # The template's next release changes a managed file and the same seed-once files.
    deadlines = template_repo / TEMPLATE_SRC / "deadlines.py"
    text = deadlines.read_text(encoding="utf-8")
    end_of_docstring = text.index('"""', 3)
    deadlines.write_text(
        f"{text[:end_of_docstring]}{TEMPLATE_DOC_LINE}\n{text[end_of_docstring:]}",
        encoding="utf-8",
    )
    edit(template_repo / TEMPLATE_SRC / "domain" / "items.py", "NAME_MAX = 200", "NAME_MAX = 250")
    append(template_repo / "template" / "README.md.jinja", TEMPLATE_README_LINE)
    append(
        template_repo / "template" / "proto" / "{{package_name}}" / "v1" / "items.proto.jinja",
        TEMPLATE_PROTO_LINE,
    )
    (template_repo / "template" / NEW_TEMPLATE_FILE).write_text("New in v0.2.0.\n")
    add_template_dependencies(template_repo / "template" / "pyproject.toml.jinja")
    commit_all(template_repo, "Template v0.2.0")
    git(template_repo, "tag", "v0.2.0")

    copier.run_update(
        project, defaults=True, overwrite=True, unsafe=False, quiet=True, vcs_ref="v0.2.0"
    )

    # No conflict of any kind.
    tree = files(project)
    assert not [name for name in tree if name.endswith(".rej")]
    marked = [
        name
        for name, path in tree.items()
        if CONFLICT_MARKER.search(path.read_bytes().decode("utf-8", errors="replace"))
    ]
    assert not marked, f"conflict markers in {marked}"
    assert not git(project, "diff", "--name-only", "--diff-filter=U").strip()

    # Seed-once: the user's edits kept, the template's changes to them not applied.
    items = (project / "src" / PKG / "domain" / "items.py").read_text(encoding="utf-8")
    assert "NAME_MAX = 120" in items
    assert "NAME_MAX = 250" not in items
    readme = (project / "README.md").read_text(encoding="utf-8")
    assert USER_README_LINE in readme
    assert TEMPLATE_README_LINE not in readme
    assert (project / "proto" / PKG / "v1" / "items.proto").read_text(encoding="utf-8") == proto_v1

    # The user's own file kept; managed files (changed and new) follow the template.
    assert (project / USER_FILE).read_text(encoding="utf-8") == USER_FILE_TEXT
    assert TEMPLATE_DOC_LINE in (project / "src" / PKG / "deadlines.py").read_text(encoding="utf-8")
    assert (project / NEW_TEMPLATE_FILE).read_text(encoding="utf-8") == "New in v0.2.0.\n"
    assert_dependencies_of_both_kept(project / "pyproject.toml")

    answers = yaml.safe_load((project / ".copier-answers.yml").read_text(encoding="utf-8"))
    assert answers["_commit"] == "v0.2.0"
    assert answers["_src_path"] == str(template_repo)

    # Update == fresh copy for every file the template manages (no silent drift).
    fresh = tmp_path / "fresh"
    copier.run_copy(
        str(template_repo), fresh, defaults=True, unsafe=False, quiet=True, vcs_ref="v0.2.0"
    )
    # ... plus what the user did to a managed file: the same `uv add`s.
    add_user_dependencies(fresh)
    config = yaml.safe_load((template_repo / "copier.yml").read_text(encoding="utf-8"))
    seed_once = [m["path"] for e in config["_exclude"] if (m := SEED_ONCE.match(e))]
    drifted = [
        name
        for name, path in files(fresh).items()
        if not is_seed_once(name, seed_once)
        and (name not in tree or tree[name].read_bytes() != path.read_bytes())
    ]
    assert not drifted, f"updated project differs from a fresh v0.2.0 copy: {drifted}"


def test_update_that_leaves_a_conflict_exits_0_and_says_how_to_resolve_it(
    template_repo: Path, tmp_path: Path
) -> None:
    """What docs/updating.md and the update message describe: UU, inline markers, exit 0."""
    project = tmp_path / "service"
    copier.run_copy(
        str(template_repo), project, defaults=True, unsafe=False, quiet=True, vcs_ref="v0.1.0"
    )
    git(project, "-c", "init.defaultBranch=main", "init", "-q")
    commit_all(project, "Generated from the template")
    sessions = 'nox.options.sessions = ["lint", "types", "tests"]'
    # The user and the template's next release change the same line of a managed file.
    edit(project / "noxfile.py", sessions, 'nox.options.sessions = ["lint", "tests"]')
    commit_all(project, "Our default sessions")
    edit(
        template_repo / "template" / "noxfile.py",
        sessions,
        'nox.options.sessions = ["lint", "types", "tests", "audit"]',
    )
    commit_all(template_repo, "Template v0.2.0")
    git(template_repo, "tag", "v0.2.0")

    copier_cli = Path(sys.executable).parent / "copier"
    proc = subprocess.run(
        [str(copier_cli), "update", "--defaults", "--vcs-ref", "v0.2.0"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert proc.returncode == 0, proc.stderr
    # The message tells how to find the conflicts and what the two modes write.
    for advice in ("git status", "--diff-filter=U", "--conflict inline", "--conflict rej"):
        assert advice in proc.stderr, f"{advice!r} not in the update message:\n{proc.stderr}"
    assert "UU noxfile.py" in git(project, "status", "--porcelain").splitlines()
    assert git(project, "diff", "--name-only", "--diff-filter=U").split() == ["noxfile.py"]
    merged = (project / "noxfile.py").read_text(encoding="utf-8")
    assert "<<<<<<< before updating" in merged
    assert ">>>>>>> after updating" in merged
