"""Alert rules, their promtool unit tests, and the Grafana dashboard (monitoring/).

What an SRE would notice: the rules load in Prometheus, each alert fires when it should and stays
quiet when it should not (promtool's own unit tests), each alert says what to do, and no panel or
alert queries a metric the system does not export.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from monitoring.metrics import create_pipeline_metrics, create_retention_metrics, create_webhook_metrics

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "monitoring" / "alerts" / "rules.yaml"
RULE_TESTS = REPO / "monitoring" / "alerts" / "rules_test.yaml"
DASHBOARD = REPO / "monitoring" / "dashboards" / "headshots.json"
DASHBOARD_ROWS = ["Batch progress (per tenant and batch)", "GPU pool", "Privacy"]
# Labels that would identify a person; metrics must never carry them (ARCHITECTURE.md).
PERSONAL_LABELS = {"person", "person_id", "name", "email"}

PROMQL_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
                   "bool", "offset", "inf", "nan"}


def promtool() -> str:
    found = shutil.which("promtool")
    if not found:
        pytest.fail("promtool is not installed: run `bash scripts/setup.sh` as root "
                    "(it installs the Debian `prometheus` package, which ships promtool)")
    return found


def run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def every_metric() -> CollectorRegistry:
    """A fresh registry holding every metric the system defines."""
    registry = CollectorRegistry()
    create_pipeline_metrics(registry)
    create_retention_metrics(registry)
    create_webhook_metrics(registry)
    return registry


def exported_metric_names() -> set[str]:
    """Every series name the system exports, from fresh registries (as Prometheus would scrape them)."""
    registry = every_metric()
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum", "_created")}
    return {family.name + suffix for family in registry.collect() for suffix in suffixes[family.type]}


def metric_names_in(expression: str) -> set[str]:
    """The metric names a PromQL expression selects (Grafana variables allowed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression)    # string literals
    text = re.sub(r"\{[^}]*\}", "", text)                        # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)                       # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    names = re.findall(r"(?<![\w:$.])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()", text)
    return {name for name in names if name not in PROMQL_KEYWORDS}


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def dashboard_expressions() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = [(panel["title"], target["expr"]) for panel in dashboard["panels"]
             for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = re.fullmatch(r"label_values\((\w+),\s*\w+\)", variable["query"]["query"])
            assert query, f"variable {variable['name']}: expected label_values(metric, label)"
            found.append((f"variable {variable['name']}", query.group(1)))
    return found


# --- promtool --------------------------------------------------------------------------------------

def test_rules_pass_promtool_check():
    result = run_promtool("check", "rules", str(RULES), cwd=RULES.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_every_alert_passes_its_promtool_unit_tests():
    result = run_promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_unit_tests_fail_when_an_alert_threshold_is_loosened(tmp_path):
    """The promtool tests pin each alert's timing: an overdue alert that waits 2 h instead of 1 h fails them."""
    alert = "expr: max by (artifact) (headshots_retention_overdue_objects) > 0\n        for: "
    loosened = RULES.read_text().replace(alert + "1h", alert + "2h")
    assert loosened != RULES.read_text()
    (tmp_path / "rules.yaml").write_text(loosened)
    shutil.copy(RULE_TESTS, tmp_path / "rules_test.yaml")
    result = run_promtool("test", "rules", "rules_test.yaml", cwd=tmp_path)
    assert result.returncode != 0 and "HeadshotsRetentionOverdue" in result.stdout + result.stderr


def test_each_alert_is_tested_firing_and_quiet_and_says_what_to_do():
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    for rule in rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["runbook"], name
        assert "\n" not in rule["annotations"]["runbook"], f"{name}: the runbook is one line"
        outcomes = {bool(case["exp_alerts"]) for case in cases if case["alertname"] == name}
        assert outcomes == {True, False}, f"{name}: needs a promtool case where it fires and one where it does not"


# --- metric names ----------------------------------------------------------------------------------

def test_every_metric_in_the_alert_rules_and_the_dashboard_is_exported():
    exported = exported_metric_names()
    used = {f"alert {rule['alert']}": metric_names_in(rule["expr"]) for rule in rules()}
    used.update((f"panel {title}", metric_names_in(expression)) for title, expression in dashboard_expressions())
    unknown = {where: sorted(names - exported) for where, names in used.items() if names - exported}
    assert unknown == {}, "define these in monitoring/metrics.py or fix the name"
    assert all(used.values()), [where for where, names in used.items() if not names]


def test_the_metric_name_check_finds_an_unknown_name():
    expression = ('sum by (stage) (rate(headshots_stage_errors_totl{tenant=~"$tenant"}[$__rate_interval])) '
                  '/ on () group_left max(headshots_retention_overdue_objects offset 5m) > bool 0')
    assert metric_names_in(expression) == {"headshots_stage_errors_totl", "headshots_retention_overdue_objects"}
    assert "headshots_stage_errors_totl" not in exported_metric_names()


def test_every_metric_name_follows_the_prometheus_conventions():
    """One ``headshots_`` prefix (so our series are found, and never mistaken for Ray's or an exporter's),
    and a unit, when a name has one, in base units at the end (before a counter's ``_total``)."""
    units = {"seconds", "bytes", "ratio"}
    others = {"milliseconds", "ms", "minutes", "hours", "days", "kilobytes", "megabytes", "percent"}
    families = list(every_metric().collect())
    assert families
    for family in families:
        name = family.name  # without a counter's _total
        words = name.split("_")
        assert name.startswith("headshots_") and words[1] != "headshots", name
        assert not set(words) & others, f"{name}: use base units (seconds, bytes, ratio)"
        assert not set(words[:-1]) & units, f"{name}: the unit goes last"


def test_metric_labels_never_identify_a_person():
    registry = CollectorRegistry()
    pipeline, retention = create_pipeline_metrics(registry), create_retention_metrics(registry)
    for metrics in (pipeline, retention):
        for field_name, metric in vars(metrics).items():
            assert not set(metric._labelnames) & PERSONAL_LABELS, field_name


# --- the dashboard -----------------------------------------------------------------------------------

def test_dashboard_has_the_three_rows_and_every_panel_queries_prometheus():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert [panel["title"] for panel in panels if panel["type"] == "row"] == DASHBOARD_ROWS
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    section = None
    by_row: dict[str, list[str]] = {}
    for panel in panels:
        if panel["type"] == "row":
            section = panel["title"]
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        by_row.setdefault(section, []).extend(target["expr"] for target in panel["targets"])
    privacy = " ".join(by_row["Privacy"])
    for metric in ("headshots_retention_overdue_objects", "headshots_deletion_request_duration_seconds_bucket",
                   "headshots_retention_last_success_timestamp_seconds",
                   "headshots_deletion_oldest_pending_request_age_seconds"):
        assert metric in privacy
    gpu_pool = " ".join(by_row["GPU pool"])
    for metric in ("headshots_gpu_busy_ratio", "headshots_images_generated_total", "headshots_gpu_memory_used_bytes"):
        assert metric in gpu_pool
    assert "$tenant" in " ".join(by_row[DASHBOARD_ROWS[0]])
