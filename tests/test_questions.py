"""copier.yml: only known keys, every free-text answer validated, bad answers refused early."""

from __future__ import annotations

import ast
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import copier
import pytest
import yaml
from support import ROOT, without_foreign_templates

COPIER_YML = ROOT / "copier.yml"

# Settings that Copier reads from copier.yml ("Available settings" in Copier's
# configuring docs). Settings the docs mark "Not supported in copier.yml" (data, defaults,
# overwrite, pretend, quiet, unsafe, vcs_ref, ...) are left out on purpose.
COPIER_SETTINGS = {
    "_answers_file",
    "_envops",
    "_exclude",
    "_external_data",
    "_jinja_extensions",
    "_message_after_copy",
    "_message_after_update",
    "_message_before_copy",
    "_message_before_update",
    "_migrations",
    "_min_copier_version",
    "_preserve_symlinks",
    "_secret_questions",
    "_skip_if_exists",
    "_skip_tasks",
    "_subdirectory",
    "_tasks",
    "_templates_suffix",
}
# Settings that make `copier copy` refuse to run without --trust. `_migrations` makes
# only an update that crosses a migration's version ask for it (docs/updating.md).
COPY_UNSAFE_SETTINGS = {"_jinja_extensions", "_tasks"}
MIGRATION_COMMAND = ["{{ _copier_python }}", "{{ _copier_conf.src_path }}/hooks/"]
# Keys of a question mapping ("Advanced prompt formatting" in Copier's docs). Copier
# silently ignores any other key, so a typo such as `validater` would disable a check.
QUESTION_KEYS = {
    "ask",
    "choices",
    "default",
    "help",
    "multiline",
    "multiselect",
    "placeholder",
    "qmark",
    "secret",
    "type",
    "validator",
    "when",
}
QUESTION_TYPES = {"bool", "float", "int", "json", "path", "str", "yaml"}
SEED_ONCE = re.compile(r"^\{% if _copier_operation == 'update' %\}(?P<path>[^{}]+)\{% endif %\}$")


TOOL_DIRECTORIES = {".venv", ".mypy_cache", ".ruff_cache", ".hypothesis"}


def _project_files(project: Path) -> Iterator[Path]:
    """Files Copier rendered: not the virtualenv, lock file, stubs and caches `uv sync` adds.

    Nor what the generated tests leave behind (hypothesis keeps its cache in the project).
    """
    for root, dirs, names in os.walk(project):
        dirs[:] = [d for d in dirs if d not in TOOL_DIRECTORIES]
        for name in names:
            generated = name in {"uv.lock", "descriptors.binpb"} or "_pb2" in name
            if not (generated or name.endswith((".pyc", ".pyo"))):
                yield Path(root, name)


def _config() -> dict[str, Any]:
    config = yaml.safe_load(COPIER_YML.read_text(encoding="utf-8"))
    assert isinstance(config, dict)
    return config


def _questions() -> dict[str, dict[str, Any]]:
    return {k: v for k, v in _config().items() if not k.startswith("_")}


def test_top_level_keys_are_copier_settings_or_question_mappings() -> None:
    """Every `_key` is a documented Copier setting; every other key a question mapping."""
    config = _config()
    unknown = sorted(k for k in config if k.startswith("_") and k not in COPIER_SETTINGS)
    assert not unknown, f"not Copier settings (typos?): {unknown}"
    short_form = sorted(k for k, v in _questions().items() if not isinstance(v, dict))
    assert not short_form, f"questions must use the mapping form (type, help, ...): {short_form}"
    assert _questions(), "copier.yml asks no questions"


def test_copy_needs_no_trust() -> None:
    """No tasks or Jinja extensions: `copier copy` never asks for --trust."""
    unsafe = sorted(COPY_UNSAFE_SETTINGS & _config().keys())
    assert not unsafe, f"these settings make `copier copy` demand --trust: {unsafe}"


def test_migrations_run_standard_library_scripts_of_hooks_for_one_version() -> None:
    """Each migration: a release version, Copier's own Python, a script in hooks/.

    The script imports only the standard library: it runs in the user's Copier
    environment, which has nothing else.
    """
    for migration in _config().get("_migrations", []):
        assert re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+", str(migration["version"])), migration
        interpreter, script, *_ = migration["command"]
        assert interpreter == MIGRATION_COMMAND[0], migration
        assert script.startswith(MIGRATION_COMMAND[1]), migration
        path = ROOT / "hooks" / script.removeprefix(MIGRATION_COMMAND[1])
        assert path.is_file(), f"{path} does not exist"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {
            name.split(".")[0]
            for node in ast.walk(tree)
            for name in (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
        }
        outside = sorted(imported - set(sys.stdlib_module_names) - {"__future__"})
        assert not outside, f"{path.name} imports more than the standard library: {outside}"


def test_minimum_copier_version_knows_every_variable_the_template_uses() -> None:
    """`_copier_operation` (seed-once exclusions) exists from Copier 9.6.0 on.

    An older Copier renders it as empty: the exclusions vanish and `copier update`
    overwrites user code.
    """
    config = _config()
    uses_operation = "_copier_operation" in COPIER_YML.read_text()
    minimum = tuple(int(part) for part in str(config["_min_copier_version"]).split("."))
    assert not uses_operation or minimum >= (9, 6, 0), minimum


def test_settings_point_at_existing_template_files() -> None:
    """The default answers file name, and the subdirectory with its answers template."""
    config = _config()
    assert config["_answers_file"] == ".copier-answers.yml", "custom names need -a on update"
    template = ROOT / config["_subdirectory"]
    assert template.is_dir()
    suffix = config["_templates_suffix"]
    assert (template / f"{{{{_copier_conf.answers_file}}}}{suffix}").is_file()


def test_question_mappings_use_only_copier_question_keys() -> None:
    """A misspelt key (`validater`, `defualt`) would be ignored by Copier: refuse it here."""
    typos = {
        name: sorted(set(question) - QUESTION_KEYS)
        for name, question in _questions().items()
        if set(question) - QUESTION_KEYS
    }
    assert not typos, f"unknown question keys (Copier would ignore them): {typos}"


def test_every_question_has_a_type_and_help() -> None:
    """Each question states its type and explains itself."""
    for name, question in _questions().items():
        assert question.get("type") in QUESTION_TYPES, f"{name}: type {question.get('type')!r}"
        assert str(question.get("help", "")).strip(), f"{name}: no help text"


def test_every_free_text_and_number_question_has_a_validator() -> None:
    """Free text and numbers are validated; only choices and booleans go without."""
    for name, question in _questions().items():
        if question["type"] in {"str", "int"} and "choices" not in question:
            assert str(question.get("validator", "")).strip(), f"{name}: no validator"


def test_choice_defaults_are_among_the_choices() -> None:
    """A choice question's default is one of its choices."""
    for name, question in _questions().items():
        if "choices" in question:
            assert question["default"] in question["choices"], name


def test_seed_once_exclusions_name_rendered_paths(rendered: Callable[[str], Path]) -> None:
    """Copier matches _exclude against rendered paths: no `.jinja` suffix, and each one exists."""
    project = rendered("default")
    files = [p.relative_to(project).as_posix() for p in _project_files(project)]
    patterns = [m["path"] for e in _config()["_exclude"] if (m := SEED_ONCE.match(e))]
    assert len(patterns) >= 5, "seed-once exclusions not found in _exclude"
    for pattern in patterns:
        assert not pattern.endswith(_config()["_templates_suffix"]), pattern
        parts = pattern.split("/")
        matches = [
            f
            for f in files
            if len(f.split("/")) == len(parts)
            and all(fnmatchcase(a, b) for a, b in zip(f.split("/"), parts, strict=True))
        ]
        assert matches, f"seed-once pattern {pattern!r} matches no rendered file"


def _matching(files: list[str], pattern: str) -> set[str]:
    """The rendered files a Copier path pattern (one glob per path segment) matches."""
    parts = pattern.split("/")
    return {
        f
        for f in files
        if len(f.split("/")) == len(parts)
        and all(fnmatchcase(a, b) for a, b in zip(f.split("/"), parts, strict=True))
    }


def test_the_ownership_doc_lists_exactly_the_seed_once_and_ensure_exists_files(
    rendered: Callable[[str], Path],
) -> None:
    """docs/ownership.md and copier.yml name the same seed-once and ensure-exists files.

    A file the doc calls seed-once that `copier update` overwrites (or the reverse)
    would lose a service owner's work or leave them without fixes.
    """
    project = rendered("default")
    files = [p.relative_to(project).as_posix() for p in _project_files(project)]
    documented: dict[str, set[str]] = {"seed-once": set(), "ensure-exists": set()}
    doc = (project / "docs" / "ownership.md").read_text(encoding="utf-8")
    for row in re.finditer(r"^\| (?P<files>.+) \| (?P<owner>[a-z-]+) \|$", doc, re.MULTILINE):
        if row["owner"] not in documented:
            continue
        for path in re.findall(r"`([^`]+)`", row["files"]):
            # A path may be written relative to the one before it (`repo/items.py`).
            found = {f for f in files if f == path or f.endswith(f"/{path}")}
            assert len(found) == 1, f"{path!r} in docs/ownership.md names {sorted(found)}"
            documented[row["owner"]] |= found
    config = _config()
    seed_once = [m["path"] for e in config["_exclude"] if (m := SEED_ONCE.match(e))]
    declared = {
        "seed-once": set().union(*(_matching(files, p) for p in seed_once)),
        "ensure-exists": set().union(*(_matching(files, p) for p in config["_skip_if_exists"])),
    }
    assert documented == declared


# --- validators ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The template's working tree outside git: Copier reads it in place, no clone per copy."""
    dst = tmp_path_factory.mktemp("template")
    shutil.copy2(COPIER_YML, dst / COPIER_YML.name)
    subdirectory = _config()["_subdirectory"]
    shutil.copytree(ROOT / subdirectory, dst / subdirectory)
    return str(dst)


# (answers, question that must refuse, its message: fragments in order, split at '…')
REFUSED: list[tuple[dict[str, Any], str, str]] = [
    ({"project_name": ""}, "project_name", "project_name must not be empty"),
    ({"project_name": "   "}, "project_name", "project_name must not be empty"),
    ({"project_name": "Items!"}, "project_name", "may contain letters, digits, spaces"),
    # A default derived from an earlier answer is validated like a typed one.
    ({"project_name": "2fa service"}, "project_slug", 'must be kebab-case…(got "2fa-service")'),
    ({"project_slug": "My_Service"}, "project_slug", 'must be kebab-case…(got "My_Service")'),
    ({"project_slug": "-x"}, "project_slug", 'must be kebab-case…(got "-x")'),
    ({"project_slug": "a--b"}, "project_slug", 'must be kebab-case…(got "a--b")'),
    (
        {"package_name": "1abc"},
        "package_name",
        'valid Python identifier in snake_case…(got "1abc")',
    ),
    (
        {"package_name": "my-pkg"},
        "package_name",
        'valid Python identifier in snake_case…(got "my-pkg")',
    ),
    ({"package_name": "class"}, "package_name", '"class" is a reserved Python keyword'),
    ({"package_name": "import"}, "package_name", '"import" is a reserved Python keyword'),
    ({"package_name": "grpc"}, "package_name", '"grpc" would shadow the standard-library or'),
    ({"package_name": "asyncio"}, "package_name", '"asyncio" would shadow the standard-library'),
    ({"description": 'Say "hi"'}, "description", "must not contain double quotes or backslashes"),
    ({"description": "C:\\items"}, "description", "must not contain double quotes or backslashes"),
    ({"description": "two\nlines"}, "description", "description must be a single line"),
    ({"author_name": 'A "B"'}, "author_name", "without double quotes or backslashes"),
    (
        {"author_email": "not-an-email"},
        "author_email",
        'like name@example.com (got "not-an-email")',
    ),
    ({"author_email": "a@b"}, "author_email", 'must look like name@example.com (got "a@b")'),
    (
        {"author_email": "a b@x.org"},
        "author_email",
        'must look like name@example.com (got "a b@x.org")',
    ),
    (
        {"proto_package": "Acme.Items.v1"},
        "proto_package",
        'lowercase identifiers separated by single dots, e.g. acme.items.v1 (got "Acme.Items.v1")',
    ),
    (
        {"proto_package": "acme..v1"},
        "proto_package",
        'lowercase identifiers separated by single dots, e.g. acme.items.v1 (got "acme..v1")',
    ),
    (
        {"proto_package": "acme.items"},
        "proto_package",
        "must end with the major version segment '.v1', e.g. acme.items.v1",
    ),
    (
        {"proto_package": "acme.items.v2"},
        "proto_package",
        "must end with the major version segment '.v1', e.g. acme.items.v1",
    ),
    ({"proto_package": "v1"}, "proto_package", "needs at least one segment before '.v1'"),
    (
        {"proto_package": "acme.class.v1"},
        "proto_package",
        'segment "class" is a Python keyword…(got "acme.class.v1")',
    ),
    (
        {"proto_package": "acme.items.message.v1"},
        "proto_package",
        'segment "message" is a protobuf keyword…(got "acme.items.message.v1")',
    ),
    (
        {"proto_package": "new.items.v1"},
        "proto_package",
        'segment "new" is a C++ or Java keyword…(got "new.items.v1")',
    ),
    # The default derived from the package name is checked the same way.
    ({"package_name": "match_items"}, "proto_package", 'segment "match" is a Python keyword'),
    ({"proto_package": "google.items.v1"}, "proto_package", "reserved 'google.' or 'grpc.'"),
    ({"grpc_port": 0}, "grpc_port", "grpc_port must be between 1 and 65535 (got 0)"),
    ({"grpc_port": 70000}, "grpc_port", "grpc_port must be between 1 and 65535 (got 70000)"),
    ({"http_port": 0}, "http_port", "http_port must be between 1 and 65535 (got 0)"),
    ({"admin_port": 70000}, "admin_port", "admin_port must be between 1 and 65535 (got 70000)"),
    ({"http_port": 50051}, "http_port", "http_port must differ from grpc_port (both are 50051)"),
    ({"admin_port": 50051}, "admin_port", "admin_port must differ from grpc_port (both are 50051)"),
    ({"admin_port": 8080}, "admin_port", "admin_port must differ from http_port (both are 8080)"),
    (
        {"grpc_port": 7000, "http_port": 7001, "admin_port": 7001},
        "admin_port",
        "admin_port must differ from http_port (both are 7001)",
    ),
    ({"slo_availability": 98.9}, "slo_availability", "from 99 to 99.99…(got 98.9)"),
    ({"slo_availability": 100}, "slo_availability", "from 99 to 99.99…(got 100"),
    ({"slo_availability": 99.995}, "slo_availability", "at most three decimals (got 99.995)"),
    ({"slo_availability": 99.9991}, "slo_availability", "at most three decimals (got 99.9991)"),
    ({"slo_latency_ms": 200}, "slo_latency_ms", "a bound of the latency histogram…(got 200)"),
    ({"slo_latency_ms": 30000}, "slo_latency_ms", "a bound of the latency histogram…(got 30000)"),
    ({"slo_latency_ms": 0}, "slo_latency_ms", "a bound of the latency histogram…(got 0)"),
]


@pytest.mark.parametrize(
    ("data", "question", "message"),
    REFUSED,
    ids=[",".join(f"{k}={v!r}" for k, v in d.items()) for d, _, _ in REFUSED],
)
def test_bad_answer_is_refused_before_any_file_is_written(
    template: str, tmp_path: Path, data: dict[str, Any], question: str, message: str
) -> None:
    """Copier raises with the validator's message; the destination stays empty."""
    dst = tmp_path / "project"
    # In non-interactive mode Copier raises ValueError("Validation error for question
    # '<name>': <rendered validator>") while asking, i.e. before rendering anything.
    parts = [
        re.escape(f"Validation error for question '{question}': "),
        *map(re.escape, message.split("…")),
    ]
    expected = ".*".join(parts)
    with pytest.raises(ValueError, match=expected):
        copier.run_copy(template, dst, data=data, defaults=True, unsafe=False, quiet=True)
    assert not dst.exists() or not any(dst.iterdir())


def test_python_version_outside_the_choices_is_refused(template: str, tmp_path: Path) -> None:
    """An unsupported Python version is refused by the choice list, before any file."""
    dst = tmp_path / "project"
    with pytest.raises(ValueError, match=r"Invalid choice for 'python_version': '3\.10'"):
        copier.run_copy(template, dst, data={"python_version": "3.10"}, defaults=True, quiet=True)
    assert not dst.exists() or not any(dst.iterdir())


def test_license_outside_the_choices_is_refused(template: str, tmp_path: Path) -> None:
    """Only the listed SPDX ids (and Proprietary) are licences the template can write."""
    dst = tmp_path / "project"
    with pytest.raises(ValueError, match=r"Invalid choice for 'license': 'GPL-3\.0'"):
        copier.run_copy(template, dst, data={"license": "GPL-3.0"}, defaults=True, quiet=True)
    assert not dst.exists() or not any(dst.iterdir())


def test_boundary_answers_are_accepted(template: str, tmp_path: Path) -> None:
    """Valid edge values pass every validator (pretend: validate without writing)."""
    data = {
        "project_name": "A.b_c-d 2",
        "project_slug": "a1-b2",
        "package_name": "svc_2",
        "description": "It's fine: one line, 'single' quotes",
        "author_email": "x.y+z@sub.example.org",
        # Keywords only as whole segments: these contain some.
        "proto_package": "a.classic.b_c.newer.v1",
        "grpc_port": 1,
        "http_port": 65535,
        "admin_port": 2,
        "slo_availability": 99.99,
        "slo_latency_ms": 10000,
    }
    worker = copier.run_copy(
        template, tmp_path / "project", data=data, defaults=True, pretend=True, quiet=True
    )
    assert {k: worker.answers.combined[k] for k in data} == data


def test_defaults_derive_the_names_from_the_project_name(template: str, tmp_path: Path) -> None:
    """Slug, package and protobuf package follow the project name, and pass validation."""
    worker = copier.run_copy(
        template,
        tmp_path / "project",
        data={"project_name": "Billing Ledger 2"},
        defaults=True,
        pretend=True,
        quiet=True,
    )
    answers = worker.answers.combined
    assert answers["project_slug"] == "billing-ledger-2"
    assert answers["package_name"] == "billing_ledger_2"
    # Digits stay attached to their word: a protobuf segment cannot start with one.
    assert answers["proto_package"] == "billing.ledger_2.v1"


def test_defaults_render_without_trust_and_leave_no_jinja(
    rendered: Callable[[str], Path],
) -> None:
    """The `rendered` fixture copies with unsafe=False; nothing templated survives."""
    project = rendered("default")
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text(encoding="utf-8"))
    assert answers["package_name"] == "acme_items"
    leftovers = []
    for path in _project_files(project):
        assert not path.name.endswith(".jinja"), path
        assert "{{" not in path.as_posix(), path
        text = path.read_bytes().decode("utf-8", errors="replace")
        # Other tools' templates: GitHub's expressions, Prometheus' and Grafana's.
        text = without_foreign_templates(path.relative_to(project).as_posix(), text)
        leftovers += [f"{path}: {m}" for m in ("{{", "{%", "%}", "{#") if m in text]
    assert not leftovers, leftovers
