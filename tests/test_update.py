"""`copier update` from each past release to the working tree, and from synthetic tags.

The releases come from releases.toml (version -> commit), not from tags, which need not
survive a clone: a temporary clone of this repository tags those commits and commits the
working tree as the next release. Each case renders a release, makes a service owner's
typical changes, commits, updates, and checks the result: no conflict, every change
kept, every file the template manages equal to a fresh copy of the working tree with
the same answers (and the same `uv add`s), nothing stale left, the service installs,
passes its own lint and type checks, and its migrations apply once.

`--update-from=recent` (the default run) updates from the last RECENT releases with the
default answers and from the latest with the custom ones; `--update-from=all` (`nox -s
update`) from every release with every answer profile, and runs the updated services'
unit tests too.

The synthetic tests change a copy of the working tree between two tags: what no release
has done yet (a dependency added to the template's region while the user added theirs),
and a real conflict, with what Copier prints about it.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import copier
import pytest
import yaml
from copier.errors import UnsafeTemplateError
from support import PROFILES, ROOT, run

ADMIN_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
RECENT = 2  # releases the default run updates from
SEED_ONCE = re.compile(r"^\{% if _copier_operation == 'update' %\}(?P<path>[^{}]+)\{% endif %\}$")
CONFLICT_MARKER = re.compile(r"^(<{7}|>{7}|={7})( |$)", re.MULTILINE)
UNMERGED = {"DD", "AU", "UD", "UA", "DU", "AA", "UU"}  # `git status --porcelain` codes

# The service owner's dependencies, added with `uv add` (each with its own version
# range, so that `uv add` writes the same line whenever it runs).
USER_DEPENDENCY = "humanize>=4.9"
USER_DEV_DEPENDENCY = "time-machine>=2.16"
USER_SETTING = "LOG__LEVEL=DEBUG"
USER_MIGRATION = "0002_items_name_idx.sql"
USER_MIGRATION_SQL = "-- Lookups by name.\nCREATE INDEX items_name_idx ON items (name);\n"

# A new RPC, from the proto through the servicer, domain service and repository.
USER_RPC = """

  // Counts the items.
  rpc CountItems(CountItemsRequest) returns (CountItemsResponse) {
    option (google.api.http) = {get: "/v1/items:count"};
  }"""
USER_MESSAGES = """
message CountItemsRequest {}

message CountItemsResponse {
  // How many items there are.
  int64 total = 1;
}
"""
USER_SERVICER_METHOD = '''
    async def CountItems(
        self, request: items_pb2.CountItemsRequest, context: ServicerContext[Any, Any]
    ) -> items_pb2.CountItemsResponse:
        """Count the items."""
        return items_pb2.CountItemsResponse(total=await self._items.count())
'''
USER_PROTOCOL_METHOD = '''
    async def count(self) -> int:
        """How many items there are."""
        ...
'''
USER_SERVICE_METHOD = '''
    async def count(self) -> int:
        """How many items there are."""
        return await self._repo.count()
'''
USER_REPOSITORY_METHOD = '''
    async def count(self) -> int:
        """How many items there are."""
        total: int = await self._db.fetchval("SELECT count(*) FROM items")
        return total
'''
USER_FAKE_METHOD = '''
    async def count(self) -> int:
        """How many items there are."""
        return len(self.items)
'''
USER_TEST = """

async def test_count_counts_the_items(service: ItemService) -> None:
    await service.create("first", "", "")
    assert await service.count() == 1
"""
FAKE_DELETE_END = "        del self.items[item_id]\n        return True\n"
PROTOCOL_DELETE = (
    '        """Delete the item if it exists (at `expected_version`, when given)."""\n        ...\n'
)


# --- helpers ---------------------------------------------------------------------------


def git(cwd: Path, *args: str) -> str:
    """Run git in cwd (identity and config come from the environment set by the fixture)."""
    proc = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"git {' '.join(args)} in {cwd}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def commit_all(cwd: Path, message: str) -> None:
    """Stage everything and commit."""
    git(cwd, "add", "-A")
    git(cwd, "commit", "-q", "--no-verify", "--allow-empty", "-m", message)


def edit(path: Path, old: str, new: str) -> None:
    """Replace exactly one occurrence of old."""
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"{path}: expected one {old!r}"
    path.write_text(text.replace(old, new), encoding="utf-8")


def append(path: Path, text: str) -> None:
    """Append text on a new line at the end of a file; a leading newline leaves a blank line."""
    body = path.read_text(encoding="utf-8").rstrip("\n")
    path.write_text(f"{body}\n{text.rstrip()}\n", encoding="utf-8")


def files(root: Path) -> dict[str, Path]:
    """Every file under root, outside .git, by relative POSIX path."""
    return {
        p.relative_to(root).as_posix(): p
        for p in root.rglob("*")
        if p.is_file() and ".git" not in p.relative_to(root).parts
    }


def project_files(project: Path) -> set[str]:
    """The project's files as git sees them: tracked or new, not ignored."""
    out = git(project, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    return {name for name in out.split("\0") if name and (project / name).is_file()}


def matches(relpath: str, patterns: list[str]) -> bool:
    """Whether a rendered path matches one of Copier's path patterns (no `**`)."""
    parts = relpath.split("/")
    return any(
        len(parts) == len(p.split("/"))
        and all(fnmatchcase(a, b) for a, b in zip(parts, p.split("/"), strict=True))
        for p in patterns
    )


def ownership(template: Path) -> tuple[list[str], list[str]]:
    """(seed-once, ensure-exists) path patterns of a template's copier.yml."""
    config = yaml.safe_load((template / "copier.yml").read_text(encoding="utf-8"))
    seed_once = [m["path"] for e in config["_exclude"] if (m := SEED_ONCE.match(e))]
    return seed_once, list(config.get("_skip_if_exists", []))


def version_key(version: str) -> tuple[int, ...]:
    """A release version ("0.2.0") as a comparable tuple."""
    assert re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+", version), f"not X.Y.Z: {version!r}"
    return tuple(int(part) for part in version.split("."))


def assert_no_conflicts(project: Path) -> None:
    """No .rej file, no conflict marker, no unmerged path."""
    tree = files(project)
    assert not [name for name in tree if name.endswith(".rej")]
    marked = [
        name
        for name, path in tree.items()
        if ".venv" not in name.split("/")
        and CONFLICT_MARKER.search(path.read_bytes().decode("utf-8", errors="replace"))
    ]
    assert not marked, f"conflict markers in {marked}"
    status = git(project, "status", "--porcelain").splitlines()
    unmerged = [line for line in status if line[:2] in UNMERGED]
    assert not unmerged, f"unmerged paths: {unmerged}"


# --- releases ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Release:
    """One entry of releases.toml."""

    version: str
    commit: str


def releases() -> list[Release]:
    """The template's releases, oldest first."""
    data = tomllib.loads((ROOT / "releases.toml").read_text(encoding="utf-8"))
    found = [Release(r["version"], r["commit"]) for r in data["release"]]
    return sorted(found, key=lambda r: version_key(r.version))


def migration_versions(template: Path) -> list[str]:
    """The versions of the Copier migrations in a template's copier.yml."""
    config = yaml.safe_load((template / "copier.yml").read_text(encoding="utf-8"))
    return [str(m["version"]) for m in config.get("_migrations", [])]


def next_version() -> str:
    """What the working tree will be released as: past the latest release and migration.

    A migration runs only on an update to a tagged version at or past its own, so the
    working tree is tagged with one.
    """
    major, minor, _ = version_key(releases()[-1].version)
    candidates = [f"{major}.{minor + 1}.0", *migration_versions(ROOT)]
    return max(candidates, key=version_key)


@dataclass(frozen=True)
class Case:
    """Update a service generated from `release` with the answers of `profile`."""

    release: Release
    profile: str

    @property
    def id(self) -> str:
        """The test id: `0.1.0-default`."""
        return f"{self.release.version}-{self.profile}"


def cases(scope: str) -> list[Case]:
    """`recent`: the last RECENT releases, default answers, and the latest with custom ones.

    `all`: every release with every answer profile.
    """
    known = releases()
    if scope == "all":
        return [Case(release, profile) for release in known for profile in PROFILES]
    return [
        *(Case(release, "default") for release in known[-RECENT:]),
        Case(known[-1], "custom"),
    ]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize `case` by `--update-from`."""
    if "case" in metafunc.fixturenames:
        chosen = cases(metafunc.config.getoption("--update-from"))
        metafunc.parametrize("case", chosen, ids=[c.id for c in chosen])


@pytest.fixture(autouse=True, scope="module")
def git_identity() -> Iterator[None]:
    """A git identity and no user or system config, for our git calls and for Copier's."""
    with pytest.MonkeyPatch.context() as patch:
        for role in ("AUTHOR", "COMMITTER"):
            patch.setenv(f"GIT_{role}_NAME", "Template Tests")
            patch.setenv(f"GIT_{role}_EMAIL", "template-tests@example.invalid")
        patch.setenv("GIT_CONFIG_GLOBAL", "/dev/null")
        patch.setenv("GIT_CONFIG_NOSYSTEM", "1")
        yield


@pytest.fixture(scope="module")
def template_clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clone of this repository, releases tagged and the working tree as the next one.

    The releases are tagged from releases.toml; the working tree is committed on top.
    """
    clone = tmp_path_factory.mktemp("update") / "template"
    git(ROOT.parent, "clone", "--quiet", str(ROOT), str(clone))
    # Tags are not trusted to survive a clone: drop them, and tag from releases.toml.
    for tag in git(clone, "tag", "--list").split():
        git(clone, "tag", "--delete", tag)
    for release in releases():
        kind = subprocess.run(
            ["git", "cat-file", "-t", release.commit], cwd=clone, capture_output=True, check=False
        )
        assert kind.stdout.strip() == b"commit", (
            f"releases.toml: {release.version} is commit {release.commit}, which this "
            "checkout lacks (a shallow clone? `git fetch --unshallow`)"
        )
        git(clone, "tag", f"v{release.version}", release.commit)
    # The working tree, uncommitted changes and deletions included, as one commit.
    git(clone, "rm", "-r", "-q", "--ignore-unmatch", ".")
    listed = git(ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, clone / name)
    commit_all(clone, "The working tree")
    git(clone, "tag", f"v{next_version()}")
    return clone


@pytest.fixture(scope="module")
def fresh_copy(
    template_clone: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], Path]:
    """A fresh copy of the working tree with a profile's answers, plus the user's `uv add`s."""
    cache: dict[str, Path] = {}

    def get(profile: str) -> Path:
        if profile not in cache:
            dst = tmp_path_factory.mktemp(f"fresh-{profile}") / "service"
            copier.run_copy(
                str(template_clone),
                dst,
                data=PROFILES[profile],
                defaults=True,
                unsafe=False,
                quiet=True,
                vcs_ref=f"v{next_version()}",
            )
            add_user_dependencies(dst, lock=False)
            cache[profile] = dst
        return cache[profile]

    return get


# --- what a service owner does ------------------------------------------------------------


def add_user_dependencies(project: Path, *, lock: bool = True) -> None:
    """`uv add` a dependency and a dev dependency (locked, as a user commits them)."""
    mode = "--no-sync" if lock else "--frozen"
    run(["uv", "add", "--quiet", mode, USER_DEPENDENCY], project)
    run(["uv", "add", "--quiet", mode, "--dev", USER_DEV_DEPENDENCY], project)


def add_count_items(project: Path, package: str) -> None:
    """A new RPC: in the proto, the servicer, the domain service, its repository, a test."""
    proto = project / "proto" / package / "v1" / "items.proto"
    text = proto.read_text(encoding="utf-8")
    end_of_service = text.index("\n}\n", text.index("service ItemService {"))
    proto.write_text(text[:end_of_service] + USER_RPC + text[end_of_service:], encoding="utf-8")
    append(proto, USER_MESSAGES)
    src = project / "src" / package
    append(src / "api" / "items.py", USER_SERVICER_METHOD)
    edit(src / "domain" / "items.py", PROTOCOL_DELETE, PROTOCOL_DELETE + USER_PROTOCOL_METHOD)
    append(src / "domain" / "items.py", USER_SERVICE_METHOD)
    append(src / "repo" / "items.py", USER_REPOSITORY_METHOD)
    tests = project / "tests" / "unit" / "test_items_domain.py"
    edit(tests, FAKE_DELETE_END, FAKE_DELETE_END + USER_FAKE_METHOD)
    append(tests, USER_TEST)


def make_user_changes(project: Path, package: str) -> set[str]:
    """A service owner's typical work, committed (but for .env, which git ignores).

    Returns the files the user created.
    """
    add_count_items(project, package)
    migration = f"src/{package}/migrations/{USER_MIGRATION}"
    (project / migration).write_text(USER_MIGRATION_SQL, encoding="utf-8")
    add_user_dependencies(project)
    commit_all(project, "Our changes")
    append(project / ".env", USER_SETTING)
    return {migration, "uv.lock"}


# --- checks of an updated service ----------------------------------------------------------


def assert_matches_fresh_copy(
    project: Path, fresh: Path, template: Path, before: dict[str, bytes], own: set[str]
) -> None:
    """Managed files equal the fresh copy's; seed-once and ensure-exists ones are as left.

    `before` is the service's files before the update (path -> content), `own` the files
    the user created.
    """
    seed_once, ensure_exists = ownership(template)
    updated = project_files(project) | {".env"}
    fresh_files = files(fresh)
    drifted = [
        name
        for name, path in fresh_files.items()
        if not matches(name, seed_once)
        and not (matches(name, ensure_exists) and name in before)
        and (name not in updated or (project / name).read_bytes() != path.read_bytes())
    ]
    assert not drifted, f"differ from a fresh copy of the working tree: {drifted}"
    kept = [name for name in before if matches(name, seed_once + ensure_exists)]
    changed = [name for name in kept if (project / name).read_bytes() != before[name]]
    assert not changed, f"seed-once or ensure-exists files changed by the update: {changed}"
    # Nothing else: what the template removed is gone, and it added nothing unasked.
    extra = sorted(
        name
        for name in updated - set(fresh_files) - own
        if not (matches(name, seed_once) and name in before)
    )
    assert not extra, f"not in a fresh copy, not the user's: {extra}"
    assert all((project / name).read_bytes() == before[name] for name in own)


def package_of(project: Path) -> str:
    """The package name a service was generated with."""
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text(encoding="utf-8"))
    return str(answers["package_name"])


def database_url(name: str) -> str:
    """ADMIN_URL with another database."""
    return urlunsplit(urlsplit(ADMIN_URL)._replace(path=f"/{name}"))


async def admin(statement: str) -> None:
    """Run one statement on the admin database."""
    conn = await asyncpg.connect(ADMIN_URL, timeout=10)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def schema_state(url: str) -> tuple[list[tuple[int, Any]], bool]:
    """(applied migrations as (version, applied_at), whether the user's index exists)."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        rows = await conn.fetch("SELECT version, applied_at FROM schema_migrations ORDER BY 1")
        index = await conn.fetchval("SELECT to_regclass('items_name_idx') IS NOT NULL")
    finally:
        await conn.close()
    return [(row["version"], row["applied_at"]) for row in rows], bool(index)


def assert_migrations_apply_once(project: Path, slug: str) -> None:
    """`migrate` twice on a throwaway database: the user's migration too, nothing twice."""
    name = f"update_{uuid.uuid4().hex[:12]}"
    url = database_url(name)
    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        run(["uv", "run", "--no-sync", slug, "migrate"], project, DATABASE_URL=url)
        first, index = asyncio.run(schema_state(url))
        assert [version for version, _ in first] == [1, 2], first
        assert index, "the user's migration did not run"
        run(["uv", "run", "--no-sync", slug, "migrate"], project, DATABASE_URL=url)
        second, _ = asyncio.run(schema_state(url))
        assert second == first, "the second migrate applied something again"
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# --- the tests ---------------------------------------------------------------------------


def test_update_from_a_release_keeps_user_work_and_equals_a_fresh_copy(
    case: Case,
    template_clone: Path,
    fresh_copy: Callable[[str], Path],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """From a release to the working tree: clean merge, work kept, no drift, installs."""
    answers = PROFILES[case.profile]
    old_config = git(template_clone, "show", f"v{case.release.version}:copier.yml")
    known = {k for k in yaml.safe_load(old_config) if not k.startswith("_")}
    project = tmp_path / "service"
    copier.run_copy(
        str(template_clone),
        project,
        data={k: v for k, v in answers.items() if k in known},
        defaults=True,
        unsafe=False,
        quiet=True,
        vcs_ref=f"v{case.release.version}",
    )
    git(project, "-c", "init.defaultBranch=main", "init", "-q")
    commit_all(project, "Generated from the template")
    package, slug = package_of(project), answers.get("project_slug", "acme-items")
    own = make_user_changes(project, package)
    before = {name: (project / name).read_bytes() for name in project_files(project) | {".env"}}

    target = next_version()
    crossed = [
        v
        for v in migration_versions(template_clone)
        if version_key(case.release.version) < version_key(v) <= version_key(target)
    ]
    if crossed:
        # What the docs promise: without --trust, Copier stops before changing anything.
        with pytest.raises(UnsafeTemplateError, match="migrations"):
            copier.run_update(project, data=answers, defaults=True, overwrite=True, quiet=True)
        assert not git(project, "status", "--porcelain").strip()
    copier.run_update(
        project, data=answers, defaults=True, overwrite=True, unsafe=bool(crossed), quiet=True
    )

    assert_no_conflicts(project)
    recorded = yaml.safe_load((project / ".copier-answers.yml").read_text(encoding="utf-8"))
    assert recorded["_commit"] == f"v{target}"
    assert_matches_fresh_copy(project, fresh_copy(case.profile), template_clone, before, own)
    # The dependency migration cleaned up after itself.
    assert not (project / ".git" / "copier-dependency-regions.json").exists()

    # The service installs (the stubs now have the new RPC) and its checks pass.
    run(["uv", "sync", "--quiet"], project)
    stubs = (project / "src" / package / "v1" / "items_pb2_grpc.py").read_text(encoding="utf-8")
    assert "CountItems" in stubs
    run(["uv", "run", "--no-sync", "nox", "-s", "lint", "types"], project)
    if request.config.getoption("--update-from") == "all":
        unit = ["pytest", "-q", "-p", "no:cacheprovider", "tests/unit"]
        run(["uv", "run", "--no-sync", *unit], project)
    assert_migrations_apply_once(project, slug)


# --- synthetic releases: what no real release has done yet --------------------------------

TEMPLATE_SRC = "template/src/{{package_name}}"
USER_README_LINE = "On call: the items team, #items-oncall."
TEMPLATE_DOC_LINE = "Changed in template v0.2.0: this line proves managed files are updated."
TEMPLATE_README_LINE = "Template v0.2.0 README line: must not reach seed-once READMEs."
TEMPLATE_PROTO_LINE = "// Template v0.2.0 proto comment: must not reach seed-once protos."
NEW_TEMPLATE_FILE = "docs/added-in-v0.2.0.md"
TEMPLATE_DEPENDENCY = '"httpx>=0.28,<1",'
TEMPLATE_DEV_DEPENDENCY = '"pytest-timeout==2.4.0",'


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


@pytest.fixture
def template_repo(tmp_path: Path) -> Path:
    """A git copy of the template's working tree (uncommitted changes included), tagged v0.1.0."""
    repo = tmp_path / "template"
    ignore = shutil.ignore_patterns(
        ".git", ".nox", ".venv", ".venv-tools", "venv", "node_modules", "__pycache__", "*_cache"
    )
    shutil.copytree(ROOT, repo, ignore=ignore)
    git(repo, "-c", "init.defaultBranch=main", "init", "-q")
    commit_all(repo, "Template v0.1.0")
    git(repo, "tag", "v0.1.0")
    return repo


def test_template_changes_merge_with_user_dependencies_and_skip_seed_once_files(
    template_repo: Path, tmp_path: Path
) -> None:
    """A later release adds dependencies to its region while the user added theirs.

    It also changes seed-once files (not applied) and a managed one, and adds a file.
    """
    project = tmp_path / "service"
    copier.run_copy(
        str(template_repo), project, defaults=True, unsafe=False, quiet=True, vcs_ref="v0.1.0"
    )
    git(project, "-c", "init.defaultBranch=main", "init", "-q")
    commit_all(project, "Generated from the template")
    pkg = package_of(project)
    proto_v1 = (project / "proto" / pkg / "v1" / "items.proto").read_text(encoding="utf-8")

    # The user's work: seed-once files edited, dependencies added.
    edit(project / "src" / pkg / "domain" / "items.py", "NAME_MAX = 200", "NAME_MAX = 120")
    append(project / "README.md", USER_README_LINE)
    add_user_dependencies(project, lock=False)
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

    assert_no_conflicts(project)
    items = (project / "src" / pkg / "domain" / "items.py").read_text(encoding="utf-8")
    assert "NAME_MAX = 120" in items
    assert "NAME_MAX = 250" not in items
    readme = (project / "README.md").read_text(encoding="utf-8")
    assert USER_README_LINE in readme
    assert TEMPLATE_README_LINE not in readme
    assert (project / "proto" / pkg / "v1" / "items.proto").read_text(encoding="utf-8") == proto_v1
    assert TEMPLATE_DOC_LINE in (project / "src" / pkg / "deadlines.py").read_text(encoding="utf-8")
    assert (project / NEW_TEMPLATE_FILE).read_text(encoding="utf-8") == "New in v0.2.0.\n"
    assert_dependencies_of_both_kept(project / "pyproject.toml")


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
    # The message tells how to find the conflicts, what the two modes write, and when
    # an update takes --trust.
    advice = ("git status", "--diff-filter=U", "--conflict inline", "--conflict rej", "--trust")
    for line in advice:
        assert line in proc.stderr, f"{line!r} not in the update message:\n{proc.stderr}"
    assert "UU noxfile.py" in git(project, "status", "--porcelain").splitlines()
    assert git(project, "diff", "--name-only", "--diff-filter=U").split() == ["noxfile.py"]
    merged = (project / "noxfile.py").read_text(encoding="utf-8")
    assert "<<<<<<< before updating" in merged
    assert ">>>>>>> after updating" in merged
