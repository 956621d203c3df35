"""Shared by tests/deploy/test_monitoring.py and tests/e2e/test_prometheus_scrape.py: the metrics
the services define (read from their source), the PromQL of the Grafana dashboard and of the
alert rules, and the metric names that PromQL refers to.

Not a test module: pytest collects nothing here.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "services" / "fedhpc"
MONITORING = ROOT / "monitoring"
PROMETHEUS_CONFIG = MONITORING / "prometheus.yml"
ALERTS = MONITORING / "alerts.yml"
ALERTS_TEST = MONITORING / "alerts_test.yml"
DASHBOARD = MONITORING / "grafana" / "fedhpc.json"

METRIC_TYPES = ("Counter", "Gauge", "Histogram", "Summary", "Info", "Enum")
PREFIX = "fedhpc_"

# Grafana's own variables; the dashboard's are in its templating list.
GRAFANA_BUILTINS = ("__rate_interval", "__interval", "__range", "__interval_ms", "__range_s", "__range_ms")


@dataclass(frozen=True)
class MetricDef:
    name: str  # as passed to the constructor
    kind: str  # Counter, Gauge, Histogram, ...
    labels: tuple[str, ...]
    where: str  # path:line

    @property
    def family(self) -> str:
        """The metric family name prometheus_client exports (a counter's without _total)."""
        if self.kind == "Counter" and self.name.endswith("_total"):
            return self.name[: -len("_total")]
        if self.kind == "Info" and self.name.endswith("_info"):
            return self.name[: -len("_info")]
        return self.name

    @property
    def series(self) -> tuple[str, ...]:
        """Every series name this metric appears under on /metrics."""
        family = self.family
        if self.kind == "Counter":
            return (f"{family}_total", f"{family}_created")
        if self.kind == "Histogram":
            return (f"{family}_bucket", f"{family}_sum", f"{family}_count", f"{family}_created")
        if self.kind == "Summary":
            return (family, f"{family}_sum", f"{family}_count", f"{family}_created")
        if self.kind == "Info":
            return (f"{family}_info",)
        return (family,)


def _metric_constructors(tree: ast.Module) -> tuple[set[str], set[str]]:
    """Names bound to prometheus_client metric classes, and names bound to the module itself."""
    classes: set[str] = set()
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "prometheus_client":
            classes.update(a.asname or a.name for a in node.names if a.name in METRIC_TYPES)
        elif isinstance(node, ast.Import):
            modules.update(a.asname or a.name for a in node.names if a.name == "prometheus_client")
    return classes, modules


def _str_list(node: ast.expr | None) -> tuple[str, ...]:
    if isinstance(node, ast.List | ast.Tuple):
        return tuple(e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str))
    return ()


def defined_metrics(package: Path = PACKAGE) -> dict[str, MetricDef]:
    """Every prometheus_client metric constructed in the package, by constructor name.

    Reads the source with ast, so definitions spread over several lines are found; only calls
    of classes imported from prometheus_client count (collections.Counter does not).
    """
    found: dict[str, MetricDef] = {}
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        classes, modules = _metric_constructors(tree)
        if not classes and not modules:
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Name) and func.id in classes:
                kind = func.id
            elif (
                isinstance(func, ast.Attribute)
                and func.attr in METRIC_TYPES
                and isinstance(func.value, ast.Name)
                and func.value.id in modules
            ):
                kind = func.attr
            else:
                continue
            name_node = (
                node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "name"), None)
            )
            if not (isinstance(name_node, ast.Constant) and isinstance(name_node.value, str)):
                continue
            labels_node = node.args[2] if len(node.args) > 2 else None
            for keyword in node.keywords:
                if keyword.arg == "labelnames":
                    labels_node = keyword.value
            where = f"{path.relative_to(package.parents[1])}:{node.lineno}"
            found[name_node.value] = MetricDef(name_node.value, kind, _str_list(labels_node), where)
    return found


def exported_series(metrics: Mapping[str, MetricDef]) -> dict[str, MetricDef]:
    """Series name on /metrics -> its metric definition."""
    return {series: m for m in metrics.values() for series in m.series}


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_NAME = re.compile(r"(?<![A-Za-z0-9_:$])fedhpc_[A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The fedhpc metric names a PromQL expression (or a label_values() selector) refers to.

    String literals (label values, regexes) are removed first; every identifier starting with
    ``fedhpc_`` that remains is a metric name: no label of the services starts with it.
    """
    return set(_NAME.findall(_STRING.sub('""', expr)))


def unknown_names(expr: str, series: Mapping[str, MetricDef]) -> set[str]:
    return {name for name in metric_names(expr) if name not in series}


# -- the dashboard --------------------------------------------------------------------------------
def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included (a collapsed row holds its panels)."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


_LABEL_VALUES = re.compile(
    r"^\s*label_values\(\s*(?:(?P<selector>.+?)\s*,\s*)?(?P<label>[A-Za-z_]\w*)\s*\)\s*$"
)


def variable_query(variable: Mapping[str, Any]) -> str | None:
    """The PromQL selector behind a query variable (label_values(SELECTOR, label) -> SELECTOR)."""
    if variable.get("type") != "query":
        return None
    query = variable.get("query")
    text = query.get("query", "") if isinstance(query, dict) else str(query or "")
    match = _LABEL_VALUES.match(text)
    if match:
        return match.group("selector")
    return text or None


def dashboard_exprs(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    exprs: list[tuple[str, str]] = []
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("expr"):
                exprs.append((f"panel {panel.get('title')!r} target {target.get('refId')}", target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        selector = variable_query(variable)
        if selector:
            exprs.append((f"variable {variable['name']!r}", selector))
    return exprs


_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def variables_used(expr: str) -> set[str]:
    return {next(g for g in m.groups() if g) for m in _VARIABLE.finditer(expr)}


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Replace Grafana variables ($name, ${name}, ${name:fmt}, [[name]]) with concrete values."""

    def replace(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name not in values:
            raise KeyError(f"no value given for dashboard variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(replace, expr)


# -- the alert rules --------------------------------------------------------------------------------
def load_rules(path: Path = ALERTS) -> list[dict[str, Any]]:
    """Every rule (alerting and recording) of every group."""
    data = yaml.safe_load(path.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def alert_rules(path: Path = ALERTS) -> list[dict[str, Any]]:
    return [rule for rule in load_rules(path) if "alert" in rule]


def rule_exprs(path: Path = ALERTS) -> list[tuple[str, str]]:
    return [
        (f"rule {rule.get('alert') or rule.get('record')!r}", str(rule["expr"])) for rule in load_rules(path)
    ]
