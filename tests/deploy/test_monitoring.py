"""The monitoring bundle: Prometheus config, alert rules and their promtool unit tests, the
Grafana dashboard and its provisioning, checked offline.

promtool (Debian package `prometheus`, `make system-deps`) must be installed: these tests fail
without it, they never skip.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedhpc.common.config import AggregatorConfig, CoordinatorConfig, RegistryConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import promql_names as pn

GRAFANA = pn.MONITORING / "grafana"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "fedhpc.yml"
SEVERITIES = {"critical", "warning", "info"}


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(
            "promtool not found on PATH: install the Debian package `prometheus` (make system-deps)",
            pytrace=False,
        )
    # From the repository root: promtool resolves rule_files relative to the file naming them.
    return subprocess.run(
        [promtool, *args], cwd=pn.ROOT, capture_output=True, text=True, timeout=120, check=False
    )


def _assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"{' '.join(result.args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )


@pytest.fixture(scope="module")
def series() -> dict[str, pn.MetricDef]:
    return pn.exported_series(pn.defined_metrics())


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return pn.load_dashboard()


# -- promtool ---------------------------------------------------------------------------------------
def test_promtool_check_config() -> None:
    result = _promtool("check", "config", "monitoring/prometheus.yml")
    _assert_ok(result)
    # The config's rule file was found and checked too.
    assert "1 rule files found" in result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    _assert_ok(_promtool("check", "rules", "monitoring/alerts.yml"))


def test_promtool_test_rules() -> None:
    result = _promtool("test", "rules", "monitoring/alerts_test.yml")
    _assert_ok(result)
    assert "SUCCESS" in result.stdout + result.stderr


# -- the alert rules --------------------------------------------------------------------------------
def test_every_alert_has_a_firing_unit_test() -> None:
    tests = yaml.safe_load(pn.ALERTS_TEST.read_text())
    assert tests["rule_files"] == ["alerts.yml"]
    fired: set[str] = set()
    checked: set[str] = set()
    for group in tests["tests"]:
        for case in group.get("alert_rule_test", []):
            checked.add(case["alertname"])
            if case.get("exp_alerts"):
                fired.add(case["alertname"])
    alerts = {rule["alert"] for rule in pn.alert_rules()}
    assert alerts, "alerts.yml defines no alert"
    assert not alerts - fired, f"alerts without a unit test that fires them: {sorted(alerts - fired)}"
    assert not checked - alerts, f"unit tests for alerts that do not exist: {sorted(checked - alerts)}"


def test_alerts_have_for_severity_and_annotations() -> None:
    names = [rule["alert"] for rule in pn.alert_rules()]
    assert len(names) == len(set(names)), "alert names must be unique"
    for rule in pn.alert_rules():
        name = rule["alert"]
        assert name.startswith("Fedhpc"), name
        assert "for" in rule, f"{name}: no `for:`"
        assert rule.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity not in {SEVERITIES}"
        annotations = rule.get("annotations", {})
        assert annotations.get("summary") and annotations.get("description"), (
            f"{name}: needs summary and description"
        )


# -- metric names -----------------------------------------------------------------------------------
def test_source_parser_finds_the_services_metrics() -> None:
    metrics = pn.defined_metrics()
    # One of each kind, including definitions spread over several lines.
    assert metrics["fedhpc_task_phase_seconds"].kind == "Histogram"
    assert metrics["fedhpc_task_phase_seconds"].labels == ("site", "phase")
    assert metrics["fedhpc_grpc_server_handled_total"].labels == ("component", "service", "method", "code")
    assert metrics["fedhpc_experiments_running"].kind == "Gauge"
    assert metrics["fedhpc_rounds_total"].series[0] == "fedhpc_rounds_total"
    assert "fedhpc_aggregation_throughput_gbps_bucket" in pn.exported_series(metrics)
    # collections.Counter(...) in reporting.py is no metric.
    assert all(name.startswith("fedhpc_") for name in metrics)


def test_metric_name_parser_ignores_strings_and_labels() -> None:
    expr = (
        'sum by (site, le) (rate(fedhpc_task_phase_seconds_bucket{site=~"fedhpc_x.*", phase="queue"}[5m]))'
        " / on() group_left fedhpc_experiments_running"
    )
    assert pn.metric_names(expr) == {"fedhpc_task_phase_seconds_bucket", "fedhpc_experiments_running"}


@pytest.mark.parametrize("source", ["dashboard", "alerts"], ids=["grafana/fedhpc.json", "alerts.yml"])
def test_every_referenced_metric_is_defined_by_the_services(
    source: str, series: dict[str, pn.MetricDef], dashboard: dict[str, Any]
) -> None:
    exprs = pn.dashboard_exprs(dashboard) if source == "dashboard" else pn.rule_exprs()
    assert exprs
    problems = []
    for where, expr in exprs:
        names = pn.metric_names(expr)
        if not names and not expr.strip().startswith("up{"):
            problems.append(f"{where}: refers to no fedhpc metric: {expr}")
        for name in sorted(pn.unknown_names(expr, series)):
            problems.append(f"{where}: {name} is not exported by any service")
    assert not problems, "\n".join(problems)


def test_dashboard_covers_every_metric(series: dict[str, pn.MetricDef], dashboard: dict[str, Any]) -> None:
    shown = {series[name].name for _, expr in pn.dashboard_exprs(dashboard) for name in pn.metric_names(expr)}
    missing = sorted(set(pn.defined_metrics()) - shown)
    assert not missing, (
        f"metrics with no dashboard panel (add one to monitoring/grafana/fedhpc.json): {missing}"
    )


# -- the dashboard ----------------------------------------------------------------------------------
def test_dashboard_is_valid_and_every_panel_has_a_target(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "fedhpc"
    assert dashboard["title"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    panels = list(pn.iter_panels(dashboard))
    assert panels
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel.get("title"), f"panel {panel['id']} has no title"
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"{panel['title']}: wider than the grid"
        if panel["type"] == "row":
            continue
        targets = panel.get("targets", [])
        assert targets, f"panel {panel['title']!r} has no target"
        for target in targets:
            assert target.get("expr", "").strip(), f"panel {panel['title']!r} target without expr"
            assert target.get("refId")
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]


def test_dashboard_variables_are_defined(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    known = set(variables) | set(pn.GRAFANA_BUILTINS)
    for where, expr in pn.dashboard_exprs(dashboard):
        undefined = pn.variables_used(expr) - known
        assert not undefined, f"{where}: undefined variables {sorted(undefined)} in {expr}"
    # Multi-value variables match as regexes: "All" must be a regex too, not a {a,b} glob.
    for variable in variables.values():
        if variable.get("includeAll"):
            assert variable.get("allValue") == ".*", variable["name"]


def test_substitute_replaces_every_variable_form() -> None:
    expr = 'rate(x{site=~"$site", e=~"${experiment}", f="[[site]]"}[$__rate_interval])'
    values = {"site": "a", "experiment": "b", "__rate_interval": "1m"}
    assert pn.substitute(expr, values) == 'rate(x{site=~"a", e=~"b", f="a"}[1m])'
    with pytest.raises(KeyError):
        pn.substitute("$window", values)


# -- provisioning and scrape targets ----------------------------------------------------------------
def test_grafana_provisioning(dashboard: dict[str, Any]) -> None:
    datasources = yaml.safe_load(DATASOURCES.read_text())
    assert datasources["apiVersion"] == 1
    (source,) = datasources["datasources"]
    assert (source["type"], source["uid"], source["url"]) == (
        "prometheus",
        "prometheus",
        "http://prometheus:9090",
    )
    default = next(v for v in dashboard["templating"]["list"] if v["name"] == "DS_PROMETHEUS")
    assert default["current"]["value"] == source["uid"]

    providers = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_scrape_jobs_use_the_services_default_metrics_ports() -> None:
    config = yaml.safe_load(pn.PROMETHEUS_CONFIG.read_text())
    assert config["rule_files"] == ["alerts.yml"]
    assert (pn.PROMETHEUS_CONFIG.parent / "alerts.yml").is_file()
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    expected = {
        "fedhpc-registry": f"registry:{RegistryConfig().server.metrics_port}",
        "fedhpc-aggregator": f"aggregator:{AggregatorConfig().server.metrics_port}",
        "fedhpc-coordinator": f"coordinator:{CoordinatorConfig().server.metrics_port}",
    }
    for name, target in expected.items():
        targets = [t for static in jobs[name]["static_configs"] for t in static["targets"]]
        assert targets == [target], name
        # A target label named like a metric label (component, service) would rename the
        # metric's own label to exported_*.
        for static in jobs[name]["static_configs"]:
            assert not set(static.get("labels", {})) & {"component", "service", "site", "experiment"}
