"""A real Prometheus scraping a real local federation.

The control plane runs as processes (fedhpc.localrun), three local sites train the digits
plugin through a short synchronous FedAvg experiment, and Prometheus 2.x (Debian package
`prometheus`; the test fails without it, it never skips) scrapes the three metrics ports every
second with the job names of monitoring/prometheus.yml and evaluates monitoring/alerts.yml.
Then, through Prometheus' HTTP API:

* rounds, aggregation, per-site phase and gRPC metrics arrived with non-zero values;
* every PromQL expression of the Grafana dashboard (variables filled in) and of the alert rules
  evaluates, names only metrics the services export, and the dashboard's panels show data;
* every rule evaluated without error and no alert is pending or firing after a healthy run.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import struct_pb2

from fedhpc.api.v1 import coordinator_pb2, coordinator_pb2_grpc
from fedhpc.localrun import ControlPlane, start, stop
from fedhpc.testing.ports import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))
import promql_names as pn

SITES = 3
JOBS = ("fedhpc-registry", "fedhpc-aggregator", "fedhpc-coordinator")
ROUNDS = 3
TERMINAL = (
    coordinator_pb2.EXPERIMENT_STATE_COMPLETED,
    coordinator_pb2.EXPERIMENT_STATE_FAILED,
    coordinator_pb2.EXPERIMENT_STATE_STOPPED,
)
# Dashboard expressions whose metrics only appear when something goes wrong: a healthy run
# leaves them empty. Every other panel must show data.
FAILURE_ONLY_METRICS = {"fedhpc_tasks_failed_total", "fedhpc_coordinator_updates_rejected_total"}
FAILURE_ONLY = (*FAILURE_ONLY_METRICS, 'code!="OK"')


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as exc:  # 400/422 carry the error as JSON
            return json.loads(exc.read())

    def query(self, expr: str) -> dict[str, Any]:
        reply: dict[str, Any] = self.get("/api/v1/query", query=expr)
        assert reply.get("status") == "success", f"{expr}: {reply.get('errorType')}: {reply.get('error')}"
        return reply

    def values(self, expr: str) -> list[float]:
        return [float(r["value"][1]) for r in self.query(expr)["data"]["result"]]

    def log_tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else ""


def _scrape_config(plane: ControlPlane) -> dict[str, Any]:
    """monitoring/prometheus.yml with its fedhpc jobs pointed at the local metrics ports."""
    config: dict[str, Any] = yaml.safe_load(pn.PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(pn.ALERTS)]
    jobs = []
    for job in config["scrape_configs"]:
        service = job["job_name"].removeprefix("fedhpc-")
        if service in plane.metrics_ports:
            job["static_configs"] = [{"targets": [f"127.0.0.1:{plane.metrics_ports[service]}"]}]
            jobs.append(job)
    assert {j["job_name"] for j in jobs} == set(JOBS)
    config["scrape_configs"] = jobs
    return config


def _start_prometheus(config_path: Path, workdir: Path) -> Prometheus:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not found on PATH: install the Debian package `prometheus`", pytrace=False)
    last = ""
    for attempt in range(3):  # a free port can be taken before Prometheus binds it
        port = free_port()
        log = workdir / f"prometheus-{attempt}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={workdir / f'tsdb-{attempt}'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        server = Prometheus(f"http://127.0.0.1:{port}", process, log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=1) as reply:
                    if reply.status == 200:
                        return server
            except OSError:
                pass
            time.sleep(0.1)
        last = server.log_tail()
        _stop_prometheus(server)
    pytest.fail(f"Prometheus did not start:\n{last}", pytrace=False)


def _stop_prometheus(server: Prometheus) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=5)


def _wait_for(what: str, condition: Callable[[], bool], server: Prometheus, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.25)
    raise AssertionError(f"{what} within {timeout:.0f} s\n{server.log_tail()}")


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[ControlPlane]:
    plane = start(tmp_path / "run")
    try:
        yield plane
    finally:
        stop(plane)


@pytest.fixture
def prometheus(tmp_path: Path, plane: ControlPlane) -> Iterator[Prometheus]:
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(_scrape_config(plane), sort_keys=False))
    server = _start_prometheus(config_path, workdir)
    try:
        yield server
    finally:
        _stop_prometheus(server)


def _targets_up(server: Prometheus) -> bool:
    targets = server.get("/api/v1/targets")["data"]["activeTargets"]
    return sorted(t["labels"]["job"] for t in targets) == sorted(JOBS) and all(
        t["health"] == "up" for t in targets
    )


def _run_experiment(plane: ControlPlane) -> coordinator_pb2.Experiment:
    with grpc.insecure_channel(plane.coordinator) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        for i in range(SITES):
            config = struct_pb2.Struct()
            config.update({"task": {"partition": i, "num_partitions": SITES}})
            stub.RegisterSite(
                coordinator_pb2.RegisterSiteRequest(
                    site=coordinator_pb2.Site(name=f"site-{i + 1}", backend="local", config=config)
                )
            )
        spec = {
            "name": "scrape",
            "task": {"plugin": "digits", "hyperparameters": {"alpha": 0.5}},
            "strategy": {
                "name": "sync",
                "rounds": ROUNDS,
                "min_sites": SITES,
                "round_deadline_s": 120,
                "final_evaluation": True,
            },
            "algorithm": {"name": "fedavg"},
            "seed": 1,
        }
        experiment = stub.CreateExperiment(
            coordinator_pb2.CreateExperimentRequest(spec_yaml=yaml.safe_dump(spec), start=True)
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            experiment = stub.GetExperiment(coordinator_pb2.GetExperimentRequest(id=experiment.id))
            if experiment.state in TERMINAL:
                return experiment
            time.sleep(0.25)
    raise AssertionError(f"experiment {experiment.id} did not finish in 120 s")


def test_prometheus_scrapes_a_federation_and_every_query_works(
    plane: ControlPlane, prometheus: Prometheus
) -> None:
    _wait_for("every fedhpc target up", lambda: _targets_up(prometheus), prometheus)

    experiment = _run_experiment(plane)
    assert experiment.state == coordinator_pb2.EXPERIMENT_STATE_COMPLETED, experiment.error

    # A few scrapes after the end: the last round's and the final evaluation's values are in.
    def final_values_scraped() -> bool:
        # The coordinator drops a finished experiment's progress series: look back over the run.
        rounds = prometheus.values(
            f'max_over_time(fedhpc_experiment_round{{experiment="{experiment.id}"}}[5m])'
        )
        running = prometheus.values("fedhpc_experiments_running")
        accuracy = prometheus.values(
            f'fedhpc_experiment_metric{{experiment="{experiment.id}", metric="eval_accuracy"}}'
        )
        return rounds == [ROUNDS] and running == [0] and len(accuracy) == 1

    _wait_for("the finished experiment scraped", final_values_scraped, prometheus)
    time.sleep(2)

    # Rounds, accuracy.
    assert prometheus.values(f'fedhpc_rounds_total{{experiment="{experiment.id}"}}') == [ROUNDS]
    (accuracy,) = prometheus.values(
        f'fedhpc_experiment_metric{{experiment="{experiment.id}", metric="eval_accuracy"}}'
    )
    assert 0.5 < accuracy <= 1
    # Aggregation: committed calls, bytes read, throughput observed.
    assert prometheus.values('fedhpc_aggregations_total{result="committed"}') == [ROUNDS]
    (read,) = prometheus.values('fedhpc_aggregation_bytes_total{direction="read"}')
    assert read > 0
    (gbps,) = prometheus.values("fedhpc_aggregation_throughput_gbps_sum")
    assert gbps > 0
    # Per-site phases: every site trained, queued and downloaded.
    for phase in ("queue", "download", "train"):
        counts = prometheus.query(f'sum by (site) (fedhpc_task_phase_seconds_count{{phase="{phase}"}})')
        by_site = {r["metric"]["site"]: float(r["value"][1]) for r in counts["data"]["result"]}
        assert set(by_site) == {f"site-{i + 1}" for i in range(SITES)}, phase
        assert all(v > 0 for v in by_site.values()), (phase, by_site)
    # gRPC: the coordinator answered, the registry served commits, latency has quantiles.
    (created,) = prometheus.values(
        'fedhpc_grpc_server_handled_total{component="coordinator", method="CreateExperiment", code="OK"}'
    )
    assert created == 1
    (commits,) = prometheus.values(
        'sum(fedhpc_grpc_server_handled_total{component="registry", method="CommitVersion", code="OK"})'
    )
    assert commits >= ROUNDS
    (p95,) = prometheus.values(
        'histogram_quantile(0.95, sum by (le) (fedhpc_grpc_server_handling_seconds_bucket{component="registry"}))'
    )
    assert 0 < p95 < 600

    # Every expression of the dashboard and of the alert rules.
    series = pn.exported_series(pn.defined_metrics())
    dashboard = pn.load_dashboard()
    values = {
        "experiment": experiment.id,
        "site": "site-1|site-2",
        "window": "1m",
        "__rate_interval": "1m",
        "__interval": "15s",
        "__range": "1h",
    }
    empty = []
    checked = 0
    for where, expr in pn.dashboard_exprs(dashboard) + pn.rule_exprs():
        concrete = pn.substitute(expr, values)
        assert not pn.unknown_names(concrete, series), f"{where}: unknown metrics in {concrete}"
        reply = prometheus.query(concrete)
        checked += 1
        shows_health = where.startswith(("panel", "variable")) and not any(s in expr for s in FAILURE_ONLY)
        if shows_health and not reply["data"]["result"]:
            empty.append(f"{where}: {concrete}")
    assert checked >= 40
    # What the services really export agrees with what the source says they define.
    present = set(prometheus.get("/api/v1/label/__name__/values")["data"])
    referenced = {
        name for _, expr in pn.dashboard_exprs(dashboard) + pn.rule_exprs() for name in pn.metric_names(expr)
    }
    assert not referenced - present - FAILURE_ONLY_METRICS, sorted(referenced - present)
    unparsed = {n for n in present if n.startswith(pn.PREFIX)} - set(series)
    assert not unparsed, f"exported, but promql_names.defined_metrics() did not find them: {sorted(unparsed)}"
    assert not empty, "dashboard queries with no data after a healthy run:\n" + "\n".join(empty)

    # The rules were evaluated by this Prometheus without errors, and none fired.
    groups = prometheus.get("/api/v1/rules")["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {r["name"] for r in rules} == {r["alert"] for r in pn.alert_rules()}
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    alerts = prometheus.get("/api/v1/alerts")["data"]["alerts"]
    assert alerts == [], alerts
    # And the site-filtered dashboard shows the two selected sites only.
    sites = prometheus.query(
        pn.substitute(
            'sum by (site) (fedhpc_task_phase_seconds_count{site=~"$site"})', {"site": values["site"]}
        )
    )
    assert {r["metric"]["site"] for r in sites["data"]["result"]} == {"site-1", "site-2"}
