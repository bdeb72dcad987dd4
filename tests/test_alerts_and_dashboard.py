"""Alert rules and the Grafana dashboard: valid, tested with promtool, and built on real metric names."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import aiohttp
import pytest
import yaml

from gateway.app import Gateway

from .tools import require

ROOT = Path(__file__).parent.parent
RULES = ROOT / "config" / "prometheus" / "alerts.yaml"
RULE_TESTS = ROOT / "config" / "prometheus" / "alerts.test.yaml"
DASHBOARD = ROOT / "config" / "grafana" / "heartbeat-gateway.json"
RUNBOOK = ROOT / "docs" / "runbook.md"
METRIC = re.compile(r"\b(heartbeat_gateway_[a-z_]+|process_[a-z_]+|up)\b")
SUFFIX = re.compile(r"_(bucket|sum|count)$")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = require("promtool", "apt-get install prometheus")
    return subprocess.run([tool, *args], capture_output=True, text=True, check=False, timeout=60)


def rules() -> list[dict[str, object]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_promtool_accepts_the_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_fires_on_bad_series_and_stays_quiet_on_healthy_ones() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {m for m in re.findall(r"alertname: (\w+)", RULE_TESTS.read_text())}
    assert tested == {rule["alert"] for rule in rules()}


def test_every_alert_has_a_summary_description_and_a_runbook_section() -> None:
    runbook = RUNBOOK.read_text()
    anchors = {heading.strip().lower() for heading in re.findall(r"^## (\w+)$", runbook, re.MULTILINE)}
    for rule in rules():
        annotations = rule["annotations"]
        assert isinstance(annotations, dict)
        assert annotations["summary"]
        assert annotations["description"]
        anchor = str(annotations["runbook_url"]).rsplit("#", 1)[1]
        assert anchor == str(rule["alert"]).lower()
        assert anchor in anchors, f"docs/runbook.md has no section for {rule['alert']}"


async def exported_names(gateway: Gateway) -> set[str]:
    async with aiohttp.ClientSession() as session, session.get(gateway.admin_url + "/metrics") as response:
        text = await response.text()
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(SUFFIX.sub("", re.split(r"[{ ]", line, maxsplit=1)[0]))
    return names


async def test_rules_and_dashboard_use_only_exported_metrics(gateway: Gateway) -> None:
    exported = await exported_names(gateway) | {"up"}
    # The lease TTL gauge appears only while there are active leases: it is declared, not always sampled.
    exported.add("heartbeat_gateway_lease_ttl_seconds")
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    expressions += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    expressions += [str(rule["expr"]) for rule in rules()]
    used = {SUFFIX.sub("", name) for expr in expressions for name in METRIC.findall(expr)}
    assert used, "no metric names found"
    assert used - exported == set()


def test_the_dashboard_covers_what_operators_need() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    text = json.dumps(dashboard)
    for needed in (
        "heartbeat_gateway_heartbeats_total",  # worker heartbeats
        'heartbeat_gateway_upstream_requests_total{route=\\"heartbeat\\"}',  # upstream heartbeats
        "heartbeat_gateway_request_duration_seconds_bucket",  # latency percentiles
        "heartbeat_gateway_heartbeat_conflicts_total",
        "heartbeat_gateway_leases_lost_total",
        "heartbeat_gateway_leases{",
        "heartbeat_gateway_lease_remaining_seconds_bucket",
        "heartbeat_gateway_upstream_errors_total",
    ):
        assert needed in text, needed
    # Any Prometheus data source, chosen in the dashboard: works imported by hand or provisioned by a sidecar.
    assert dashboard["templating"]["list"][0] == dashboard["templating"]["list"][0] | {"type": "datasource"}
    assert all(panel["datasource"]["uid"] == "${datasource}" for panel in dashboard["panels"])
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    # The latency panels show exemplars: a dot on a slow bucket opens its trace (with tracing on).
    latency = [t for p in dashboard["panels"] for t in p["targets"] if "request_duration_seconds_bucket" in t["expr"]]
    assert len(latency) == 4
    assert all(target.get("exemplar") is True for target in latency)


@pytest.mark.parametrize("path", [RULES, RULE_TESTS])
def test_yaml_files_parse(path: Path) -> None:
    assert yaml.safe_load(path.read_text())
