"""The acceptance test of the endpoint-engine backend: a federated experiment whose two sites
run their trainers through the Globus Compute endpoint engine inside (shimmed) Apptainer.

Registry, aggregator and coordinator run as processes (fedhpc.localrun, as `fedhpc up`
starts them). The coordinator drives one ``GlobusComputeEngine`` per site (Parsl's
``LocalProvider``); each engine launches its worker pool as
``apptainer run --nv -B /data /fake/trainer.sif globus-compute-endpoint python-exec
parsl.executors.high_throughput.process_worker_pool ...``. ``apptainer`` is the shim in
``tests/integration/apptainer_shim``: it logs that line and execs the worker command, as the
trainer image's runscript does. Synchronous FedAvg on digits (partitions 0 and 1 of 2), a
final evaluation; the model must improve and every task succeed.
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import globus_compute_endpoint  # noqa: F401  - the hpc extra: a missing package must fail, not skip
import grpc
import pytest
import yaml
from google.protobuf import struct_pb2

from fedhpc.api.v1 import coordinator_pb2, coordinator_pb2_grpc
from fedhpc.localrun import ControlPlane, start, stop

SHIM_DIR = Path(__file__).resolve().parents[1] / "integration" / "apptainer_shim"
IMAGE = "/fake/trainer.sif"
CONTAINER_OPTIONS = "--nv -B /data"
ROUNDS = 3
TERMINAL = (
    coordinator_pb2.EXPERIMENT_STATE_COMPLETED,
    coordinator_pb2.EXPERIMENT_STATE_FAILED,
    coordinator_pb2.EXPERIMENT_STATE_STOPPED,
)

# Engine starts, worker pools and the first torch import per site take seconds each, on a
# machine other test runs may share.
pytestmark = pytest.mark.timeout(420)


@pytest.fixture
def shim_log(tmp_path: Path) -> Path:
    return tmp_path / "apptainer.log"


@pytest.fixture
def plane(tmp_path: Path, shim_log: Path) -> Iterator[ControlPlane]:
    # The coordinator runs the engines: its environment decides which `apptainer` the job
    # scripts find.
    env = {
        "PATH": os.pathsep.join([str(SHIM_DIR), os.environ.get("PATH", "")]),
        "APPTAINER_SHIM_LOG": str(shim_log),
    }
    plane = start(tmp_path / "run", env=env)
    try:
        yield plane
    finally:
        # SIGTERM: the coordinator closes its dispatchers, which stop the engines and their workers.
        stop(plane)


def _register_sites(stub: coordinator_pb2_grpc.CoordinatorStub, count: int) -> None:
    for i in range(count):
        site: dict[str, Any] = {
            "task": {"partition": i, "num_partitions": count},
            "container_type": "apptainer",
            "container_uri": IMAGE,
            "container_cmd_options": CONTAINER_OPTIONS,
            # Fast scaling decisions for a test; real sites keep the defaults.
            "strategy_period_s": 0.5,
        }
        config = struct_pb2.Struct()
        config.update(site)
        stub.RegisterSite(
            coordinator_pb2.RegisterSiteRequest(
                site=coordinator_pb2.Site(name=f"hpc-{i + 1}", backend="endpoint-engine", config=config)
            )
        )


def _wait(stub: coordinator_pb2_grpc.CoordinatorStub, experiment_id: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        experiment = stub.GetExperiment(coordinator_pb2.GetExperimentRequest(id=experiment_id))
        if experiment.state in TERMINAL:
            return experiment
        time.sleep(0.5)
    raise AssertionError(f"experiment {experiment_id} did not finish in {timeout} s")


def _coordinator_log(plane: ControlPlane) -> str:
    path = Path(plane.run_dir) / "logs" / "coordinator.log"
    return path.read_text(errors="replace")[-6000:] if path.exists() else "(no coordinator log)"


def test_sync_fedavg_through_the_endpoint_engine_in_apptainer_improves_the_model(
    plane: ControlPlane, shim_log: Path
) -> None:
    stub = coordinator_pb2_grpc.CoordinatorStub(grpc.insecure_channel(plane.coordinator))
    _register_sites(stub, 2)
    spec = yaml.safe_dump(
        {
            "name": "endpoint-engine-e2e",
            "task": {"plugin": "digits", "hyperparameters": {"alpha": 0.5}},
            "strategy": {
                "name": "sync",
                "rounds": ROUNDS,
                "min_sites": 2,
                "round_deadline_s": 300,
                "final_evaluation": True,
            },
            "algorithm": {"name": "fedavg"},
            "seed": 1,
        }
    )
    created = stub.CreateExperiment(coordinator_pb2.CreateExperimentRequest(spec_yaml=spec, start=True))
    experiment = _wait(stub, created.id, timeout=360)
    assert experiment.state == coordinator_pb2.EXPERIMENT_STATE_COMPLETED, (
        f"{experiment.error}\n{_coordinator_log(plane)}"
    )

    # The model learned: the final model's held-out accuracy is far above the initial one's.
    accuracy = {
        r.round: r.metrics["eval_accuracy"] for r in experiment.rounds if "eval_accuracy" in r.metrics
    }
    assert 0 in accuracy and ROUNDS in accuracy, accuracy
    assert accuracy[ROUNDS] >= accuracy[0] + 0.3, accuracy
    assert accuracy[ROUNDS] >= 0.75, accuracy
    assert [r.accepted_updates for r in experiment.rounds[1:]] == [2] * ROUNDS

    # Every task went through the engines and succeeded: ROUNDS train tasks per site plus the
    # final evaluation at each site.
    tasks = stub.ListTasks(coordinator_pb2.ListTasksRequest(experiment_id=experiment.id)).tasks
    assert all(t.phase == coordinator_pb2.TASK_PHASE_SUCCEEDED for t in tasks), [
        (t.id, coordinator_pb2.TaskPhase.Name(t.phase), t.error.code, t.error.message) for t in tasks
    ]
    train = [t for t in tasks if t.result.update.object_key]
    assert sorted((t.round, t.site) for t in train) == sorted(
        (r, f"hpc-{s}") for r in range(1, ROUNDS + 1) for s in (1, 2)
    )
    assert len(tasks) == len(train) + 2

    # Each site's engine launched its worker pool once (reused for every round), inside the
    # image: apptainer run {options} {image} {worker command}.
    launches = [shlex.split(line) for line in shim_log.read_text().splitlines()]
    assert len(launches) == 2, launches
    for words in launches:
        assert words[:8] == [
            "run",
            *shlex.split(CONTAINER_OPTIONS),
            IMAGE,
            "globus-compute-endpoint",
            "python-exec",
            "parsl.executors.high_throughput.process_worker_pool",
        ], words
    logdirs = sorted(next(w for w in words if w.startswith("--logdir=")) for words in launches)
    engine_root = Path(plane.run_dir) / "coordinator" / "endpoint-engine"
    assert logdirs == [
        f"--logdir={engine_root / f'hpc-{i}' / f'fedhpc-hpc-{i}-HighThroughputExecutor'}" for i in (1, 2)
    ]
