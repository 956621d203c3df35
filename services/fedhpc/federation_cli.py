"""`fedhpc` commands for running federations: coordinator serve, up/down, run, status, watch,
stop, sites, report and demo. Registered on the main group by fedhpc.cli."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click
import grpc
from google.protobuf import struct_pb2

from fedhpc.api.v1 import coordinator_pb2, coordinator_pb2_grpc

DEFAULT_RUN_DIR = Path(".fedhpc/local")
DEMO_RUN_DIR = Path(".fedhpc/demo")
DEFAULT_COORDINATOR = "127.0.0.1:50053"
TERMINAL = (
    coordinator_pb2.EXPERIMENT_STATE_COMPLETED,
    coordinator_pb2.EXPERIMENT_STATE_FAILED,
    coordinator_pb2.EXPERIMENT_STATE_STOPPED,
)

# The embedded default experiment (also examples/digits.yaml; a test keeps them equal).
DEMO_SPEC = """\
name: digits-fedavg
description: Handwritten digits (scikit-learn), a small CNN, 4 non-IID sites, FedAvg.
task:
  plugin: digits
  hyperparameters: {alpha: 0.5}
strategy:
  name: sync
  rounds: 20
  min_sites: 3
  round_deadline_s: 60
  max_task_retries: 1
  final_evaluation: true
  evaluation_deadline_s: 60
algorithm:
  name: fedavg
  params: {weighting: samples}
aggregation:
  min_accepted: 1
seed: 0
"""


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _phase(value: Any) -> str:
    return coordinator_pb2.TaskPhase.Name(value).removeprefix("TASK_PHASE_")


def _state(value: Any) -> str:
    return coordinator_pb2.ExperimentState.Name(value).removeprefix("EXPERIMENT_STATE_")


# -- connecting -----------------------------------------------------------------------------
def default_coordinator() -> str:
    """$FEDHPC_COORDINATOR, else the one `fedhpc up` started here, else 127.0.0.1:50053."""
    if os.environ.get("FEDHPC_COORDINATOR"):
        return os.environ["FEDHPC_COORDINATOR"]
    from fedhpc.localrun import STATE_FILE

    state = DEFAULT_RUN_DIR / STATE_FILE
    if state.exists():
        try:
            return str(json.loads(state.read_text())["addresses"]["coordinator"])
        except (ValueError, KeyError):
            pass
    return DEFAULT_COORDINATOR


def _coordinator_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option(
        "--tls-ca",
        type=click.Path(path_type=Path, dir_okay=False, exists=True),
        envvar="FEDHPC_TLS_CA",
        help="PEM CA bundle: connect with TLS [env FEDHPC_TLS_CA].",
    )(func)
    func = click.option("--token", envvar="FEDHPC_TOKEN", help="Bearer token (admin) [env FEDHPC_TOKEN].")(
        func
    )
    return click.option(
        "--coordinator",
        "target",
        default=None,
        help="Coordinator host:port [env FEDHPC_COORDINATOR; default: the one `fedhpc up` started "
        f"under {DEFAULT_RUN_DIR}, else {DEFAULT_COORDINATOR}].",
    )(func)


@contextmanager
def _stub(
    target: str | None, token: str | None, tls_ca: Path | None
) -> Iterator[coordinator_pb2_grpc.CoordinatorStub]:
    from fedhpc.common.grpc_client import make_channel

    address = target or default_coordinator()
    channel = make_channel(address, token=token, tls_ca_file=tls_ca)
    try:
        yield coordinator_pb2_grpc.CoordinatorStub(channel)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            _fail(
                f"cannot reach the coordinator at {address} (is it running? `fedhpc up` starts one): {exc.details()}"
            )
        _fail(f"{exc.code().name}: {exc.details()}")
    finally:
        channel.close()


# -- coordinator serve ----------------------------------------------------------------------
@click.group()
def coordinator() -> None:
    """The coordinator service."""


def register(
    main: click.Group, serve_options: Callable[[str], Any], serve_config: Callable[..., Any]
) -> None:
    """Add this module's commands to the main `fedhpc` group."""

    @coordinator.command("serve")
    @serve_options("coordinator")  # type: ignore[untyped-decorator]
    @click.option(
        "--registry", "registry_address", help="Registry host:port (overrides coordinator.registry_address)."
    )
    @click.option(
        "--aggregator",
        "aggregator_address",
        help="Aggregator host:port (overrides coordinator.aggregator_address).",
    )
    @click.option(
        "--data-dir",
        type=click.Path(path_type=Path, file_okay=False),
        help="State directory (overrides coordinator.data_dir).",
    )
    def coordinator_serve(
        config_path: Path | None,
        host: str | None,
        port: int | None,
        metrics_port: int | None,
        store_root: Path | None,
        registry_address: str | None,
        aggregator_address: str | None,
        data_dir: Path | None,
    ) -> None:
        """Serve the Coordinator gRPC API until SIGTERM/SIGINT.

        Experiments, sites and tasks live in DATA_DIR/coordinator.db (SQLite); a restarted
        coordinator resumes every running experiment where it stopped.

        \b
        Example (next to a registry and an aggregator on the embedded file store):
          fedhpc coordinator serve --store-root .fedhpc/store --registry 127.0.0.1:50051 \\
              --aggregator 127.0.0.1:50052 --data-dir .fedhpc/coordinator --port 50053
        """
        settings: dict[str, Any] = {}
        for key, value in (
            ("registry_address", registry_address),
            ("aggregator_address", aggregator_address),
            ("data_dir", str(data_dir) if data_dir else None),
        ):
            if value is not None:
                settings[key] = value
        config = serve_config(
            "coordinator", config_path, host, port, metrics_port, store_root, settings or None
        )
        from fedhpc.coordinator.server import serve

        serve(config)

    for command in (coordinator, up, down, run, status, watch, stop, sites, report, demo):
        main.add_command(command)


# -- up / down ------------------------------------------------------------------------------
@click.command()
@click.option(
    "--run-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=DEFAULT_RUN_DIR,
    show_default=True,
    help="Where configuration, store, state and logs go.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="YAML merged over the generated configuration (e.g. an s3 store section).",
)
def up(run_dir: Path, config_path: Path | None) -> None:
    """Start registry, aggregator and coordinator as local processes on loopback.

    They use the file object store under RUN_DIR/store, keep running after this command
    returns, and log to RUN_DIR/logs. Other commands find the coordinator through
    RUN_DIR/control-plane.json. Stop everything with `fedhpc down`.

    \b
    Example:
      fedhpc up
      fedhpc sites add site-1 --task-config partition=0 --task-config num_partitions=2
      fedhpc run examples/digits.yaml
    """
    import yaml

    from fedhpc.localrun import ControlPlaneError, start

    extra = yaml.safe_load(config_path.read_text()) if config_path else None
    try:
        plane = start(run_dir, extra_config=extra)
    except ControlPlaneError as exc:
        _fail(str(exc))
    for service, address in plane.addresses.items():
        click.echo(
            f"{service:<12} {address}   metrics http://127.0.0.1:{plane.metrics_ports[service]}/metrics"
        )
    click.echo(f"run directory {Path(plane.run_dir)}  (stop with: fedhpc down --run-dir {run_dir})")


@click.command()
@click.option(
    "--run-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=DEFAULT_RUN_DIR,
    show_default=True,
    help="The run directory `fedhpc up` used.",
)
def down(run_dir: Path) -> None:
    """Stop the local control plane and the local sites' trainer workers.

    \b
    Example:
      fedhpc down
    """
    from fedhpc.localrun import ControlPlane, ControlPlaneError, stop

    try:
        plane = ControlPlane.load(run_dir)
    except ControlPlaneError as exc:
        _fail(str(exc))
    stop(plane)
    click.echo(f"stopped the control plane under {run_dir}")


# -- experiments ----------------------------------------------------------------------------
@click.command()
@click.argument(
    "spec_path", metavar="SPEC.yaml", type=click.Path(path_type=Path, dir_okay=False, exists=True)
)
@click.option("--id", "experiment_id", default="", help="Experiment id (default: NAME-DATE-TIME-XXXX).")
@click.option("--watch/--detach", default=True, show_default=True, help="Follow progress until it ends.")
@click.option(
    "--report-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("runs"),
    show_default=True,
    help="With --watch, write REPORT_DIR/<id>/report.json and report.png at the end.",
)
@_coordinator_options
def run(
    spec_path: Path,
    experiment_id: str,
    watch: bool,
    report_dir: Path,
    target: str | None,
    token: str | None,
    tls_ca: Path | None,
) -> None:
    """Submit SPEC.yaml as a new experiment and start it.

    The spec's keys (name, task, strategy, algorithm, aggregation, sites, seed) are
    documented in docs/experiments.md; a bad key is refused with its name.

    \b
    Example:
      fedhpc run examples/digits.yaml
      fedhpc run examples/digits.yaml --detach --coordinator 10.0.0.5:50053
    """
    with _stub(target, token, tls_ca) as stub:
        experiment = stub.CreateExperiment(
            coordinator_pb2.CreateExperimentRequest(
                spec_yaml=spec_path.read_text(), id=experiment_id, start=True
            )
        )
        click.echo(f"experiment {experiment.id} started ({experiment.total_rounds} rounds)")
        if not watch:
            return
        final = _watch(stub, experiment.id)
        _write_report(stub, final, report_dir)
    if final.state != coordinator_pb2.EXPERIMENT_STATE_COMPLETED:
        sys.exit(1)


@click.command()
@click.argument("experiment_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_coordinator_options
def status(
    experiment_id: str | None, as_json: bool, target: str | None, token: str | None, tls_ca: Path | None
) -> None:
    """Show every experiment, or one experiment in detail: rounds, sites and each failure
    with its reason.

    \b
    Example:
      fedhpc status
      fedhpc status digits-fedavg-20261121-101500-ab12
    """
    from google.protobuf import json_format

    with _stub(target, token, tls_ca) as stub:
        if experiment_id is None:
            experiments = list(stub.ListExperiments(coordinator_pb2.ListExperimentsRequest()).experiments)
            if as_json:
                click.echo(json.dumps([json_format.MessageToDict(e) for e in experiments], indent=2))
                return
            if not experiments:
                click.echo("no experiments")
            for e in experiments:
                accuracy = e.latest_metrics.get("eval_accuracy")
                shown = f"{accuracy:.4f}" if accuracy is not None else "-"
                click.echo(
                    f"{e.id:<44} {_state(e.state):<10} round {e.current_round}/{e.total_rounds:<4} accuracy {shown}"
                )
            return
        experiment = stub.GetExperiment(coordinator_pb2.GetExperimentRequest(id=experiment_id))
        tasks = list(stub.ListTasks(coordinator_pb2.ListTasksRequest(experiment_id=experiment_id)).tasks)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "experiment": json_format.MessageToDict(experiment),
                    "tasks": [json_format.MessageToDict(t) for t in tasks],
                },
                indent=2,
            )
        )
        return
    click.echo(_status_text(experiment, tasks))


def _status_text(experiment: coordinator_pb2.Experiment, tasks: list[coordinator_pb2.Task]) -> str:
    lines = [
        f"experiment {experiment.id}  ({experiment.name})",
        f"  state    {_state(experiment.state)}" + (f": {experiment.error}" if experiment.error else ""),
        f"  round    {experiment.current_round}/{experiment.total_rounds}   model {experiment.model}:"
        f"{experiment.latest_version or '-'}",
    ]
    accuracy = experiment.latest_metrics.get("eval_accuracy")
    if accuracy is not None:
        lines.append(f"  accuracy {accuracy:.4f} (federated evaluation of the latest evaluated model)")
    by_site: dict[str, list[coordinator_pb2.Task]] = {}
    for task in tasks:
        by_site.setdefault(task.site, []).append(task)
    lines.append("  sites")
    for site, site_tasks in sorted(by_site.items()):
        ok = sum(1 for t in site_tasks if t.phase == coordinator_pb2.TASK_PHASE_SUCCEEDED)
        last = site_tasks[-1]
        lines.append(
            f"    {site:<16} {ok}/{len(site_tasks)} tasks ok   now: {_phase(last.phase)} ({last.id})"
        )
    failures = [t for t in tasks if t.error.code]
    if failures:
        lines.append("  failures")
        for t in failures:
            lines.append(
                f"    round {t.round:<4} {t.site:<16} {_phase(t.phase):<10} {t.error.code}: {t.error.message}"
            )
    return "\n".join(lines)


@click.command()
@click.argument("experiment_id")
@_coordinator_options
def watch(experiment_id: str, target: str | None, token: str | None, tls_ca: Path | None) -> None:
    """Follow an experiment live: round, accuracy and each site's phase, until it ends.

    \b
    Example:
      fedhpc watch digits-fedavg-20261121-101500-ab12
    """
    with _stub(target, token, tls_ca) as stub:
        final = _watch(stub, experiment_id)
    click.echo(f"experiment {final.id} {_state(final.state).lower()}")


@click.command()
@click.argument("experiment_id")
@click.option(
    "--reason", default="stopped by the operator", show_default=True, help="Recorded with the stop."
)
@_coordinator_options
def stop(experiment_id: str, reason: str, target: str | None, token: str | None, tls_ca: Path | None) -> None:
    """Stop an experiment: tasks in flight are cancelled, the versions made so far stay.

    \b
    Example:
      fedhpc stop digits-fedavg-20261121-101500-ab12 --reason "wrong learning rate"
    """
    with _stub(target, token, tls_ca) as stub:
        experiment = stub.StopExperiment(
            coordinator_pb2.StopExperimentRequest(id=experiment_id, reason=reason)
        )
    click.echo(f"experiment {experiment.id}: {_state(experiment.state).lower()}")


@click.command()
@click.argument("experiment_id")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Directory for report.json and report.png [default: runs/<id>].",
)
@_coordinator_options
def report(
    experiment_id: str, out_dir: Path | None, target: str | None, token: str | None, tls_ca: Path | None
) -> None:
    """Write report.json and report.png for an experiment (accuracy against wall time and a
    per-site timeline of queue/download/train/upload), and print a summary table.

    \b
    Example:
      fedhpc report digits-fedavg-20261121-101500-ab12
    """
    with _stub(target, token, tls_ca) as stub:
        experiment = stub.GetExperiment(coordinator_pb2.GetExperimentRequest(id=experiment_id))
        _write_report(stub, experiment, out_dir.parent if out_dir else Path("runs"), out_dir)


def _write_report(
    stub: coordinator_pb2_grpc.CoordinatorStub,
    experiment: coordinator_pb2.Experiment,
    report_dir: Path,
    out_dir: Path | None = None,
) -> Path:
    from fedhpc.reporting import build_report, summary_table, write_report

    tasks = list(stub.ListTasks(coordinator_pb2.ListTasksRequest(experiment_id=experiment.id)).tasks)
    target = out_dir or report_dir / experiment.id
    json_path, png_path = write_report(experiment, tasks, target)
    click.echo(summary_table(build_report(experiment, tasks)))
    click.echo(f"report: {json_path}  plot: {png_path}")
    return target


# -- live progress --------------------------------------------------------------------------
class _Progress:
    """Turns the event stream into a few readable lines (and a live status line on a terminal)."""

    def __init__(self, total_rounds: int, started: float) -> None:
        self.total = total_rounds
        self.started = started
        self.phases: dict[str, str] = {}
        self.accuracy: dict[int, float] = {}
        self.live = sys.stdout.isatty()
        self._live_shown = False

    def handle(self, event: coordinator_pb2.ExperimentEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "task_phase_changed":
            change = event.task_phase_changed
            self.phases[change.site] = _phase(change.phase)
            if change.error.code:
                self._line(
                    f"  ! round {change.round} {change.site}: {_phase(change.phase)} "
                    f"{change.error.code}: {change.error.message[:160]}"
                )
        elif kind == "metrics_reported" and not event.metrics_reported.site:
            value = event.metrics_reported.metrics.get("eval_accuracy")
            if value is not None:
                self.accuracy[event.metrics_reported.round] = value
        elif kind == "round_finished":
            summary = event.round_finished.summary
            known = max(self.accuracy) if self.accuracy else None
            shown = (
                f"accuracy {self.accuracy[known]:.4f} (of r{known:04d})"
                if known is not None
                else "accuracy -"
            )
            self._line(
                f"round {summary.round:>3}/{self.total}  {summary.version}  "
                f"{summary.accepted_updates} accepted {summary.rejected_updates} rejected  {shown}  "
                f"{time.time() - self.started:6.1f} s"
            )
        elif kind == "state_changed":
            reason = f": {event.state_changed.reason}" if event.state_changed.reason else ""
            self._line(f"experiment {_state(event.state_changed.state).lower()}{reason}")
        self._status()

    def _line(self, text: str) -> None:
        if self._live_shown:
            click.echo("\r\033[K", nl=False)
            self._live_shown = False
        click.echo(text)

    def _status(self) -> None:
        if not self.live or not self.phases:
            return
        sites = "  ".join(f"{site}:{phase.lower()}" for site, phase in sorted(self.phases.items()))
        click.echo(f"\r\033[K  {sites}"[: shutil.get_terminal_size().columns + 4], nl=False)
        self._live_shown = True

    def close(self) -> None:
        if self._live_shown:
            click.echo("\r\033[K", nl=False)


def _watch(stub: coordinator_pb2_grpc.CoordinatorStub, experiment_id: str) -> coordinator_pb2.Experiment:
    experiment = stub.GetExperiment(coordinator_pb2.GetExperimentRequest(id=experiment_id))
    progress = _Progress(experiment.total_rounds, time.time())
    after = 0
    while True:
        try:
            for event in stub.WatchExperiment(
                coordinator_pb2.WatchExperimentRequest(experiment_id=experiment_id, after_sequence=after)
            ):
                after = event.sequence
                progress.handle(event)
        except grpc.RpcError as exc:
            # The coordinator restarted: pick the stream up where it broke.
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            time.sleep(1)
            continue
        experiment = stub.GetExperiment(coordinator_pb2.GetExperimentRequest(id=experiment_id))
        if experiment.state in TERMINAL:
            progress.close()
            return experiment


# -- sites ----------------------------------------------------------------------------------
@click.group()
def sites() -> None:
    """Sites: where trainers run (add, list, remove)."""


def _pairs(values: tuple[str, ...], option: str) -> dict[str, Any]:
    import yaml

    parsed: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            _fail(f"{option} expects KEY=VALUE, got {item!r}")
        parsed[key] = yaml.safe_load(raw) if raw else ""
    return parsed


@sites.command("add")
@click.argument("name")
@click.option("--backend", default="local", show_default=True, help="Dispatch backend (local, ...).")
@click.option(
    "--transport",
    default="presigned",
    show_default=True,
    type=click.Choice(["presigned", "registry-stream", "globus", "path"]),
    help="How weights reach the trainer (a file store always hands out local paths).",
)
@click.option(
    "--max-concurrent", default=1, show_default=True, type=click.IntRange(1, 4096), help="Tasks at once."
)
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Backend setting (repeatable).")
@click.option(
    "--task-config",
    "task_settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="Setting handed to the task plugin, e.g. partition=0 (repeatable).",
)
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="Free-form label (repeatable).")
@click.option(
    "--template",
    type=click.Choice(["polaris", "aurora", "frontier", "perlmutter"]),
    help="Fill the site from an HPC endpoint template (backend globus-compute); see docs/hpc.md.",
)
@click.option("--endpoint-id", help="Globus Compute endpoint UUID (with --template).")
@click.option(
    "--var",
    "template_vars",
    multiple=True,
    metavar="KEY=VALUE",
    help="Template variable, e.g. account=MYPROJ (with --template; repeatable).",
)
@click.option("--replace", is_flag=True, help="Replace an existing site of the same name.")
@_coordinator_options
def sites_add(
    name: str,
    backend: str,
    transport: str,
    max_concurrent: int,
    settings: tuple[str, ...],
    task_settings: tuple[str, ...],
    labels: tuple[str, ...],
    template: str | None,
    endpoint_id: str | None,
    template_vars: tuple[str, ...],
    replace: bool,
    target: str | None,
    token: str | None,
    tls_ca: Path | None,
) -> None:
    """Register a site.

    \b
    Example (a local site holding partition 0 of 4 of the digits data):
      fedhpc sites add site-1 --task-config partition=0 --task-config num_partitions=4
    Example (Polaris through its Globus Compute endpoint):
      fedhpc sites add polaris --template polaris --endpoint-id 2f9c... \\
          --var account=MYPROJ --var queue=prod --var walltime=01:00:00
    """
    config: dict[str, Any] = _pairs(settings, "--set")
    site_labels = {k: str(v) for k, v in _pairs(labels, "--label").items()}
    if template is not None:
        if not endpoint_id:
            _fail("--template needs --endpoint-id (the site's Globus Compute endpoint UUID)")
        from fedhpc.coordinator.templates import parse_template_vars, site_from_template

        try:
            # Kept as text: YAML would read walltime=1:30:00 as 5400 and account=0123 as 83.
            values = parse_template_vars(list(template_vars))
            filled = site_from_template(name, template, endpoint_id, values, transport=transport)
        except ValueError as exc:
            _fail(str(exc))
        backend = filled["backend"]
        transport = filled.get("transport", transport)
        config = {**filled["config"], **config}
        site_labels = {**filled.get("labels", {}), **site_labels}
    elif endpoint_id or template_vars:
        _fail("--endpoint-id and --var go with --template")
    task = _pairs(task_settings, "--task-config")
    if task:
        config["task"] = task
    struct = struct_pb2.Struct()
    struct.update(config)
    site = coordinator_pb2.Site(
        name=name,
        backend=backend,
        transport=transport,
        max_concurrent_tasks=max_concurrent,
        config=struct,
        labels=site_labels,
    )
    with _stub(target, token, tls_ca) as stub:
        added = stub.RegisterSite(coordinator_pb2.RegisterSiteRequest(site=site, replace=replace))
    click.echo(f"site {added.name} registered ({added.backend}, {added.max_concurrent_tasks} at a time)")


@sites.command("list")
@_coordinator_options
def sites_list(target: str | None, token: str | None, tls_ca: Path | None) -> None:
    """List registered sites.

    \b
    Example:
      fedhpc sites list
    """
    from google.protobuf import json_format

    with _stub(target, token, tls_ca) as stub:
        found = list(stub.ListSites(coordinator_pb2.ListSitesRequest()).sites)
    if not found:
        click.echo("no sites")
    for site in found:
        config = json.dumps(json_format.MessageToDict(site.config), sort_keys=True)
        state = coordinator_pb2.SiteState.Name(site.state).removeprefix("SITE_STATE_")
        click.echo(
            f"{site.name:<16} {site.backend:<16} {state:<12} max {site.max_concurrent_tasks}  {config}"
        )


@sites.command("remove")
@click.argument("name")
@_coordinator_options
def sites_remove(name: str, target: str | None, token: str | None, tls_ca: Path | None) -> None:
    """Remove a site (refused while a running experiment uses it).

    \b
    Example:
      fedhpc sites remove site-4
    """
    with _stub(target, token, tls_ca) as stub:
        stub.RemoveSite(coordinator_pb2.RemoveSiteRequest(name=name))
    click.echo(f"site {name} removed")


# -- demo -----------------------------------------------------------------------------------
@click.command()
@click.option(
    "--sites", "site_count", default=4, show_default=True, type=click.IntRange(1, 32), help="Local sites."
)
@click.option("--rounds", default=20, show_default=True, type=click.IntRange(1, 1000), help="FedAvg rounds.")
@click.option(
    "--alpha", default=0.5, show_default=True, type=float, help="Dirichlet alpha of the non-IID split."
)
@click.option(
    "--run-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=DEMO_RUN_DIR,
    show_default=True,
    help="Control-plane directory (emptied first).",
)
@click.option(
    "--report-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("runs"),
    show_default=True,
    help="The report goes to REPORT_DIR/<id>/.",
)
@click.option(
    "--keep-running", is_flag=True, help="Leave the control plane up afterwards (fedhpc down --run-dir ...)."
)
def demo(
    site_count: int, rounds: int, alpha: float, run_dir: Path, report_dir: Path, keep_running: bool
) -> None:
    """Run a whole federation on this machine: the control plane as local processes, SITES
    local trainer sites holding non-IID shares of the handwritten digits data, ROUNDS rounds
    of FedAvg with live progress, then a summary table and REPORT_DIR/<id>/report.json and
    report.png.

    \b
    Example:
      fedhpc demo
      fedhpc demo --sites 8 --rounds 30 --alpha 0.1
    """
    import yaml

    from fedhpc.localrun import ControlPlane, ControlPlaneError, is_running, start
    from fedhpc.localrun import stop as stop_plane

    if (run_dir / "control-plane.json").exists():
        old = ControlPlane.load(run_dir)
        if is_running(old):
            stop_plane(old)
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.time()
    click.echo(f"starting registry, aggregator and coordinator under {run_dir} ...")
    try:
        plane = start(run_dir)
    except ControlPlaneError as exc:
        _fail(str(exc))
    try:
        spec = yaml.safe_load(DEMO_SPEC)
        spec["strategy"]["rounds"] = rounds
        spec["strategy"]["min_sites"] = min(spec["strategy"]["min_sites"], site_count)
        spec["task"]["hyperparameters"]["alpha"] = alpha
        with _stub(plane.coordinator, None, None) as stub:
            for i in range(site_count):
                struct = struct_pb2.Struct()
                struct.update({"task": {"partition": i, "num_partitions": site_count}})
                stub.RegisterSite(
                    coordinator_pb2.RegisterSiteRequest(
                        site=coordinator_pb2.Site(name=f"site-{i + 1}", backend="local", config=struct)
                    )
                )
            click.echo(
                f"{site_count} local sites, digits split non-IID (Dirichlet alpha {alpha}), "
                f"{rounds} rounds of FedAvg"
            )
            experiment = stub.CreateExperiment(
                coordinator_pb2.CreateExperimentRequest(
                    spec_yaml=yaml.safe_dump(spec, sort_keys=False), start=True
                )
            )
            final = _watch(stub, experiment.id)
            _write_report(stub, final, report_dir)
        click.echo(f"demo finished in {time.time() - started:.0f} s")
    finally:
        if keep_running:
            click.echo(
                f"control plane still running: coordinator {plane.coordinator} (fedhpc down --run-dir {run_dir})"
            )
        else:
            stop_plane(plane)
    if final.state != coordinator_pb2.EXPERIMENT_STATE_COMPLETED:
        _fail(f"experiment {final.id} ended {_state(final.state)}: {final.error}")
