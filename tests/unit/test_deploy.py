"""deploy/ and docs: every metric the dashboard and alerts use exists; the docs cover them all."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tenantgate.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus-alerts.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"
METRIC_NAME = re.compile(r"\btenantgate_[a-zA-Z0-9_]+")


def exposed_names() -> set[str]:
    """Every sample name a scrape of a fresh registry can contain (``_created`` excluded)."""
    names: set[str] = set()
    for family in Metrics(["acme", "globex"]).registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def family_names() -> set[str]:
    """The names an operator searches for: counters with ``_total``, histograms bare."""
    names: set[str] = set()
    for family in Metrics(["acme"]).registry.collect():
        names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


def dashboard_exprs() -> list[str]:
    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "definition", "query") and isinstance(value, str):
                    yield value
                else:
                    yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)

    return list(walk(json.loads(DASHBOARD.read_text(encoding="utf-8"))))


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def referenced(exprs: list[str]) -> set[str]:
    return {name for expr in exprs for name in METRIC_NAME.findall(expr)}


def balanced(expr: str) -> bool:
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values may hold anything
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for ch in expr:
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return False
    return not stack


def test_dashboard_metrics_exist() -> None:
    exprs = dashboard_exprs()
    used = referenced(exprs)
    assert used, "the dashboard references no tenantgate metric"
    assert used <= exposed_names(), f"unknown metrics: {sorted(used - exposed_names())}"


def test_alert_metrics_exist() -> None:
    used = referenced([rule["expr"] for rule in alert_rules()])
    assert used, "the alerts reference no tenantgate metric"
    assert used <= exposed_names(), f"unknown metrics: {sorted(used - exposed_names())}"


def test_dashboard_covers_every_metric() -> None:
    used = referenced(dashboard_exprs())
    bare = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    missing = {
        name
        for name in family_names()
        if name not in used and name not in bare  # histograms appear as _bucket etc.
    }
    assert not missing, f"metrics without a dashboard panel: {sorted(missing)}"


def test_dashboard_is_a_grafana_dashboard() -> None:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dash["title"]
    assert dash["uid"]
    assert dash["schemaVersion"] >= 30
    ids = [panel["id"] for panel in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "job", "tenant"} <= variables
    for panel in dash["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert balanced(target["expr"]), target["expr"]
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("p50", "p99", "rejections", "connections", "bytes", "auth", "cache", "reload"):
        assert topic in titles, topic


def test_alerts_are_prometheus_rule_groups() -> None:
    data = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names))
    assert {group["name"] for group in data["groups"]}
    for rule in alert_rules():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert rule["annotations"]["summary"]
        assert balanced(rule["expr"]), rule["expr"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"])
    exprs = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    assert "up{" in exprs["TenantgateDown"]
    expected_metric = {
        "TenantgateRejectionSpike": "tenantgate_rejections_total",
        "TenantgateAuthFailureSpike": "tenantgate_auth_failures_total",
        "TenantgateConfigReloadFailed": "tenantgate_config_reloads_total",
        "TenantgateHighP99Latency": "tenantgate_statement_duration_seconds_bucket",
        "TenantgateAuditEventsDropped": "tenantgate_audit_dropped_total",
    }
    for alert, metric in expected_metric.items():
        assert metric in exprs[alert], alert


@pytest.mark.parametrize("name", sorted(family_names()))
def test_operations_doc_documents_every_metric(name: str) -> None:
    text = OPERATIONS.read_text(encoding="utf-8")
    assert f"`{name}`" in text, f"docs/operations.md does not document {name}"


def test_operations_doc_promql_examples_use_real_metrics() -> None:
    text = OPERATIONS.read_text(encoding="utf-8")
    used = set(METRIC_NAME.findall(text))
    # Prose may name families (``tenantgate_statement_duration_seconds``) as well as samples.
    valid = exposed_names() | family_names()
    assert used <= valid, f"unknown metrics in docs: {sorted(used - valid)}"
