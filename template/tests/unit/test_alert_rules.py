"""The alert rules, their unit tests, their runbooks and the dashboard hold together.

deploy/observability/rules.yml passes `promtool check rules` and its unit tests
(rules_test.yml beside this file); every alert has a severity, a summary, a description
and a section in docs/runbooks.md, and a unit test that makes it fire; the monitoring
component's PrometheusRule carries the same rules; dashboard.json is a Grafana dashboard
whose queries all go to its data source variable. That the queries find real series is
tests/lifecycle/test_dashboard_and_rules.py's part.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
OBSERVABILITY = ROOT / "deploy" / "observability"
RULES = OBSERVABILITY / "rules.yml"
UNIT_TESTS = Path(__file__).with_name("rules_test.yml")
RUNBOOKS = ROOT / "docs" / "runbooks.md"
COMPONENT = ROOT / "deploy" / "k8s" / "components" / "monitoring"
SEVERITIES = {"page", "ticket"}
# The dashboard model of Grafana 11.0, which Grafana 11 and 12 both load.
SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GRID_COLUMNS = 24


def required(name: str, install: str) -> str:
    """A program the checks need; missing, the test fails under CI and is skipped elsewhere."""
    found = shutil.which(name)
    if found is not None:
        return found
    message = f"{name} is not installed ({install})"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def promtool() -> str:
    return required("promtool", "Debian and Ubuntu: apt-get install prometheus")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)  # noqa: S603 - fixed argv


def _rules() -> dict[str, Any]:
    rules: dict[str, Any] = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return rules


def _alerts() -> list[dict[str, Any]]:
    return [rule for group in _rules()["groups"] for rule in group["rules"] if "alert" in rule]


def test_the_rules_pass_promtool_check() -> None:
    checked = _run(promtool(), "check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_alerts_fire_when_and_only_when_their_unit_tests_say() -> None:
    tested = _run(promtool(), "test", "rules", str(UNIT_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_a_broken_threshold_fails_the_unit_tests(tmp_path: Path) -> None:
    """The unit tests are not vacuous: a page that needs 24 times the budget fails them."""
    broken = RULES.read_text(encoding="utf-8").replace("(14.4 *", "(24 *")
    assert broken != RULES.read_text(encoding="utf-8")
    rules = tmp_path / "deploy" / "observability" / "rules.yml"
    rules.parent.mkdir(parents=True)
    rules.write_text(broken, encoding="utf-8")
    tests = tmp_path / "tests" / "unit" / UNIT_TESTS.name
    tests.parent.mkdir(parents=True)
    shutil.copy2(UNIT_TESTS, tests)
    tested = _run(promtool(), "test", "rules", str(tests))
    assert tested.returncode != 0
    assert "GrpcErrorBudgetBurnFast" in tested.stdout + tested.stderr


@pytest.mark.parametrize("alert", _alerts(), ids=lambda rule: rule["alert"])
def test_every_alert_has_a_severity_a_summary_a_description_and_a_runbook(
    alert: dict[str, Any],
) -> None:
    name = alert["alert"]
    assert alert["labels"]["severity"] in SEVERITIES
    annotations = alert["annotations"]
    assert annotations["summary"].strip()
    assert annotations["description"].strip()
    assert annotations["runbook"] == f"docs/runbooks.md#{name.lower()}"
    sections = re.findall(r"^### (\w+)$", RUNBOOKS.read_text(encoding="utf-8"), re.MULTILINE)
    assert name in sections, f"docs/runbooks.md has no section `### {name}`"


def test_every_runbook_section_is_an_alert() -> None:
    sections = re.findall(r"^### (\w+)$", RUNBOOKS.read_text(encoding="utf-8"), re.MULTILINE)
    assert sorted(sections) == sorted(alert["alert"] for alert in _alerts())


def test_every_alert_fires_in_a_unit_test() -> None:
    tests = UNIT_TESTS.read_text(encoding="utf-8")
    fired = set(re.findall(r'ALERTS\{alertname="(\w+)",alertstate="firing"', tests))
    fired |= set(re.findall(r"^\s+alertname: (\w+)$", tests, re.MULTILINE))
    assert {alert["alert"] for alert in _alerts()} <= fired


def test_the_prometheus_rule_of_the_monitoring_component_carries_the_same_rules() -> None:
    manifest = yaml.safe_load((COMPONENT / "prometheusrule.yaml").read_text(encoding="utf-8"))
    assert manifest["kind"] == "PrometheusRule"
    assert manifest["spec"] == _rules()


def test_an_overlay_with_the_monitoring_component_scrapes_the_admin_port(tmp_path: Path) -> None:
    kubectl = required("kubectl", "https://kubernetes.io/docs/tasks/tools/")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base = os.path.relpath(ROOT / "deploy" / "k8s" / "overlays" / "prod", overlay)
    component = os.path.relpath(COMPONENT, overlay)
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {base}\ncomponents:\n  - {component}\n",
        encoding="utf-8",
    )
    built = _run(kubectl, "kustomize", str(overlay))
    assert built.returncode == 0, built.stderr
    docs = {doc["kind"]: doc for doc in yaml.safe_load_all(built.stdout) if doc}
    assert docs["PrometheusRule"]["spec"] == _rules()
    pods = docs["Deployment"]["spec"]["template"]
    monitor = docs["PodMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= pods["metadata"]["labels"].items()
    job = pods["metadata"]["labels"][monitor["jobLabel"]]
    assert f'job="{job}"' in RULES.read_text(encoding="utf-8")
    [endpoint] = monitor["podMetricsEndpoints"]
    ports = {port["name"] for port in pods["spec"]["containers"][0]["ports"]}
    assert endpoint["port"] in ports
    assert endpoint["path"] == "/metrics"


def _panels(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for panel in items:
        found.append(panel)
        found += _panels(panel.get("panels", []))
    return found


def test_the_dashboard_queries_only_its_data_source_variable() -> None:
    dashboard = json.loads((OBSERVABILITY / "dashboard.json").read_text(encoding="utf-8"))
    assert dashboard["schemaVersion"] == SCHEMA_VERSION
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "namespace"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"] == DATASOURCE
    panels = _panels(dashboard["panels"])
    assert len({panel["id"] for panel in panels}) == len(panels), "panel ids must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= GRID_COLUMNS, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]
    # No data source of one Grafana: their uids are the variable, nothing else.
    uids = re.findall(r'"uid": "([^"]*)"', json.dumps(dashboard, indent=0))
    assert set(uids) == {dashboard["uid"], "${datasource}"}
