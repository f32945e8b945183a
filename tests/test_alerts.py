"""The alert rules: valid for promtool, unit-tested, and the same as the Helm chart's.

deploy/prometheus/alerts.yaml is the source of truth. promtool checks it and runs its unit tests
(deploy/prometheus/alerts_test.yaml); the chart's PrometheusRule is rendered by Helm's own SDK
with default values and must carry the same alerts with the same expressions (once the chart's
selector is replaced by the file's), durations and severities.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import EXPECTED_ALERTS, promtool, registry_series_names

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yaml"
CHART_DIR = ROOT / "helm" / "flespi-mirror"
METRICS_DOC = ROOT / "docs" / "metrics.md"

FILE_SELECTOR = 'job="flespi-mirror"'
RELEASE = "flespi-mirror"  # so the chart's fullname, hence its job label, is "flespi-mirror"
NAMESPACE = "monitoring"
CHART_SELECTOR = f'job="{RELEASE}",namespace="{NAMESPACE}"'

_RENDER = r"""
import json, os, sys
out = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)  # whatever the Go side prints must not mix with the JSON answer
import helm_python as helm
chart_dir, name, namespace = sys.argv[1:4]
with helm.Chart.load(chart_dir) as chart:
    rendered = chart.render({"prometheusRule": {"enabled": True}}, name=name, namespace=namespace)
out.write(json.dumps(rendered))
out.flush()
"""


def metric_names_in(expr: str) -> set[str]:
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    pattern = r"\b(?:flespi_mirror_\w+|process_\w+|python_\w+|up)\b(?!\s*[(=!~])"
    return set(re.findall(pattern, without_strings))


def file_rules() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    rules = [rule for group in doc["groups"] for rule in group["rules"]]
    by_name = {rule["alert"]: rule for rule in rules}
    assert len(by_name) == len(rules), "an alert name is used twice"
    return by_name


def chart_rules() -> dict[str, dict[str, Any]]:
    """The chart's PrometheusRule rendered with default values (in a child: the SDK starts Go)."""
    done = subprocess.run(
        [sys.executable, "-c", _RENDER, str(CHART_DIR), RELEASE, NAMESPACE],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rendered: dict[str, str] = json.loads(done.stdout)
    [text] = [t for path, t in rendered.items() if path.endswith("/prometheusrule.yaml")]
    rule_object = yaml.safe_load(text)
    assert rule_object["kind"] == "PrometheusRule"
    rules = [rule for group in rule_object["spec"]["groups"] for rule in group["rules"]]
    return {rule["alert"]: rule for rule in rules}


def normalise(expr: str) -> str:
    return " ".join(str(expr).split())


def test_alert_rules_pass_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in result.stdout


def test_alert_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_file_has_the_issues_alerts_with_severity_and_annotations() -> None:
    rules = file_rules()
    assert set(rules) == EXPECTED_ALERTS
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert "for" in rule, name


def test_every_alert_fires_in_a_unit_test_and_stays_silent_in_another() -> None:
    doc = yaml.safe_load(ALERTS_TEST.read_text())
    assert doc["rule_files"] == [ALERTS.name]
    fires: set[str] = set()
    silent: set[str] = set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    assert fires == EXPECTED_ALERTS, f"never fires in a test: {EXPECTED_ALERTS - fires}"
    assert silent == EXPECTED_ALERTS, f"never checked silent: {EXPECTED_ALERTS - silent}"
    healthy = [c for c in doc["tests"] if "healthy" in c["name"]]
    assert healthy, "a test case with a healthy mirror is missing"
    checked = {c["alertname"] for c in healthy[0]["alert_rule_test"] if not c["exp_alerts"]}
    assert checked == EXPECTED_ALERTS


def test_alerts_use_only_metrics_the_mirror_exports() -> None:
    known = registry_series_names() | {"up"}
    for name, rule in file_rules().items():
        used = metric_names_in(rule["expr"])
        assert used, name
        assert used <= known, f"{name} uses unknown series {used - known}"


def test_the_charts_rules_match_the_file_with_default_values() -> None:
    ours = file_rules()
    theirs = chart_rules()
    assert set(theirs) == set(ours)
    for name, rule in ours.items():
        chart_rule = theirs[name]
        chart_expr = normalise(chart_rule["expr"]).replace(CHART_SELECTOR, FILE_SELECTOR)
        assert chart_expr == normalise(rule["expr"]), name
        assert str(chart_rule["for"]) == str(rule["for"]), name
        assert chart_rule["labels"]["severity"] == rule["labels"]["severity"], name


def test_the_charts_rules_pass_promtool_check_rules(tmp_path: Path) -> None:
    rules = list(chart_rules().values())
    path = tmp_path / "chart-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "chart", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_documented() -> None:
    text = METRICS_DOC.read_text()
    for name in EXPECTED_ALERTS:
        assert re.search(rf"`{name}`", text), f"{name} is missing from {METRICS_DOC.name}"
