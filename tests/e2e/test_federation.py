"""End-to-end federations: registry, aggregator and coordinator as separate processes
(fedhpc.localrun, exactly what `fedhpc up` starts), four local trainer sites (worker
processes forking one trainer per task), the built-in digits plugin.

* synchronous FedAvg and FedBuff on a real S3 server (SeaweedFS): trainers move weights
  through presigned URLs, both reach >= 0.90 held-out accuracy;
* the coordinator killed with SIGKILL mid-round and restarted: the experiment completes with
  exactly one model version per round;
* faulty sites (a trainer that crashes, one that hangs past the deadline, one that returns a
  corrupted update, one whose training diverges to NaN): the experiment completes and `fedhpc status` shows each failure and its reason.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from click.testing import CliRunner
from google.protobuf import struct_pb2

from fedhpc.api.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, registry_pb2, registry_pb2_grpc
from fedhpc.common.config import S3StoreConfig
from fedhpc.localrun import ControlPlane, restart_service, start, stop

HERE = Path(__file__).resolve().parent
TERMINAL = (
    coordinator_pb2.EXPERIMENT_STATE_COMPLETED,
    coordinator_pb2.EXPERIMENT_STATE_FAILED,
    coordinator_pb2.EXPERIMENT_STATE_STOPPED,
)
# The fault plugin lives next to this file; the coordinator and the site workers import it.
ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH", "")]))}


def _store_section(config: S3StoreConfig) -> dict[str, Any]:
    data = config.model_dump(mode="json")
    data["secret_key"] = config.secret_key.get_secret_value()
    return {k: v for k, v in data.items() if v is not None}


@pytest.fixture
def plane_on_s3(tmp_path: Path, s3_store_config: S3StoreConfig) -> Iterator[ControlPlane]:
    plane = start(tmp_path / "run", extra_config={"store": _store_section(s3_store_config)}, env=ENV)
    try:
        yield plane
    finally:
        stop(plane)


@pytest.fixture
def plane_on_files(tmp_path: Path) -> Iterator[ControlPlane]:
    plane = start(tmp_path / "run", env=ENV)
    try:
        yield plane
    finally:
        stop(plane)


def _stub(plane: ControlPlane) -> coordinator_pb2_grpc.CoordinatorStub:
    return coordinator_pb2_grpc.CoordinatorStub(grpc.insecure_channel(plane.coordinator))


def _add_sites(
    stub: coordinator_pb2_grpc.CoordinatorStub, count: int, faults: dict[int, str] | None = None
) -> None:
    for i in range(count):
        task: dict[str, Any] = {"partition": i, "num_partitions": count}
        site: dict[str, Any] = {"task": task}
        fault = (faults or {}).get(i)
        if fault == "corrupt":
            site["runner"] = "fault_plugins:corrupting_runner"
        elif fault:
            task["fault"] = fault
        config = struct_pb2.Struct()
        config.update(site)
        stub.RegisterSite(
            coordinator_pb2.RegisterSiteRequest(
                site=coordinator_pb2.Site(name=f"site-{i + 1}", backend="local", config=config)
            )
        )


def _spec(
    strategy: dict[str, Any], *, algorithm: dict[str, Any] | None = None, plugin: str = "digits"
) -> str:
    return yaml.safe_dump(
        {
            "name": "e2e",
            "task": {"plugin": plugin, "hyperparameters": {"alpha": 0.5}},
            "strategy": strategy,
            "algorithm": algorithm or {"name": "fedavg"},
            "seed": 1,
        }
    )


def _run(
    stub: coordinator_pb2_grpc.CoordinatorStub, spec: str, timeout: float = 300
) -> coordinator_pb2.Experiment:
    experiment = stub.CreateExperiment(coordinator_pb2.CreateExperimentRequest(spec_yaml=spec, start=True))
    return _wait(stub, experiment.id, timeout)


def _wait(
    stub: coordinator_pb2_grpc.CoordinatorStub, experiment_id: str, timeout: float
) -> coordinator_pb2.Experiment:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            experiment = stub.GetExperiment(coordinator_pb2.GetExperimentRequest(id=experiment_id))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            time.sleep(0.5)
            continue
        if experiment.state in TERMINAL:
            return experiment
        time.sleep(0.5)
    raise AssertionError(f"experiment {experiment_id} did not finish in {timeout} s")


def _final_accuracy(experiment: coordinator_pb2.Experiment) -> float:
    evaluated = [r for r in experiment.rounds if "eval_accuracy" in r.metrics]
    assert evaluated, "no round was evaluated"
    last = evaluated[-1]
    assert last.round == experiment.total_rounds, (
        f"the final model (round {experiment.total_rounds}) was not evaluated"
    )
    return last.metrics["eval_accuracy"]


def _versions(plane: ControlPlane, model: str) -> list[str]:
    with grpc.insecure_channel(plane.registry) as channel:
        reply = registry_pb2_grpc.RegistryStub(channel).ListVersions(
            registry_pb2.ListVersionsRequest(model=model, page=common_pb2.PageRequest(page_size=1000))
        )
    return [v.manifest.version for v in reply.versions]


@pytest.mark.s3
@pytest.mark.slow
def test_sync_fedavg_on_s3_reaches_090(plane_on_s3: ControlPlane) -> None:
    stub = _stub(plane_on_s3)
    _add_sites(stub, 4)
    spec = _spec(
        {"name": "sync", "rounds": 12, "min_sites": 4, "round_deadline_s": 120, "final_evaluation": True}
    )
    experiment = _run(stub, spec)
    assert experiment.state == coordinator_pb2.EXPERIMENT_STATE_COMPLETED, experiment.error
    assert _final_accuracy(experiment) >= 0.90
    assert _versions(plane_on_s3, experiment.model) == [f"r{i:04d}" for i in range(13)]
    # The updates went to S3 through presigned PUTs and came back checked.
    tasks = stub.ListTasks(coordinator_pb2.ListTasksRequest(experiment_id=experiment.id)).tasks
    train = [t for t in tasks if t.result.update.object_key]
    assert len(train) == 48
    assert all(t.phase == coordinator_pb2.TASK_PHASE_SUCCEEDED for t in tasks)


@pytest.mark.s3
@pytest.mark.slow
def test_fedbuff_on_s3_reaches_090(plane_on_s3: ControlPlane) -> None:
    stub = _stub(plane_on_s3)
    _add_sites(stub, 4)
    spec = _spec(
        {"name": "fedbuff", "rounds": 16, "buffer_size": 3, "task_deadline_s": 120, "final_evaluation": True},
        algorithm={"name": "fedbuff", "params": {"weighting": "samples"}},
    )
    experiment = _run(stub, spec)
    assert experiment.state == coordinator_pb2.EXPERIMENT_STATE_COMPLETED, experiment.error
    assert _final_accuracy(experiment) >= 0.90
    assert _versions(plane_on_s3, experiment.model) == [f"r{i:04d}" for i in range(17)]
    accepted = sum(r.accepted_updates for r in experiment.rounds)
    assert accepted == 16 * 3


@pytest.mark.slow
def test_coordinator_killed_mid_round_resumes_without_gap_or_duplicate(plane_on_files: ControlPlane) -> None:
    stub = _stub(plane_on_files)
    _add_sites(stub, 3)
    spec = _spec({"name": "sync", "rounds": 6, "min_sites": 3, "round_deadline_s": 120})
    experiment = stub.CreateExperiment(coordinator_pb2.CreateExperimentRequest(spec_yaml=spec, start=True))
    # Wait until round 3 is under way (tasks dispatched, not yet aggregated), then kill -9.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        tasks = stub.ListTasks(coordinator_pb2.ListTasksRequest(experiment_id=experiment.id, round=3)).tasks
        if tasks and any(t.phase != coordinator_pb2.TASK_PHASE_SUCCEEDED for t in tasks):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("round 3 never started")
    os.kill(plane_on_files.pids["coordinator"], signal.SIGKILL)
    os.waitpid(plane_on_files.pids["coordinator"], 0)
    restart_service(plane_on_files, "coordinator", env=ENV)
    stub = _stub(plane_on_files)
    final = _wait(stub, experiment.id, 300)
    assert final.state == coordinator_pb2.EXPERIMENT_STATE_COMPLETED, final.error
    assert _versions(plane_on_files, final.model) == [f"r{i:04d}" for i in range(7)]
    assert [r.round for r in final.rounds] == list(range(7))
    assert all(r.accepted_updates == 3 for r in final.rounds[1:])
    # Each update was aggregated once: one successful train task per site and round.
    tasks = stub.ListTasks(coordinator_pb2.ListTasksRequest(experiment_id=final.id)).tasks
    succeeded = [(t.round, t.site) for t in tasks if t.phase == coordinator_pb2.TASK_PHASE_SUCCEEDED]
    assert sorted(succeeded) == sorted({(r, f"site-{s}") for r in range(1, 7) for s in (1, 2, 3)})


@pytest.mark.slow
def test_crashing_hanging_and_corrupt_sites_are_reported_and_the_experiment_completes(
    plane_on_files: ControlPlane,
) -> None:
    stub = _stub(plane_on_files)
    _add_sites(stub, 5, faults={1: "crash", 2: "hang", 3: "corrupt", 4: "nan"})
    spec = _spec(
        {"name": "sync", "rounds": 2, "min_sites": 1, "round_deadline_s": 15, "max_task_retries": 0},
        plugin="fault_plugins:FaultyDigits",
    )
    experiment = _run(stub, spec, timeout=120)
    assert experiment.state == coordinator_pb2.EXPERIMENT_STATE_COMPLETED, experiment.error
    assert [r.accepted_updates for r in experiment.rounds[1:]] == [1, 1]
    assert [r.rejected_updates for r in experiment.rounds[1:]] == [1, 1]

    from fedhpc.cli import main

    result = CliRunner().invoke(main, ["status", experiment.id, "--coordinator", plane_on_files.coordinator])
    assert result.exit_code == 0, result.output
    failures = result.output.split("failures", 1)[1]
    assert "site-2" in failures and "TRAINER_CRASHED" in failures
    assert "site-3" in failures and "DEADLINE_EXCEEDED" in failures
    assert "site-4" in failures and "UPDATE_REJECTED" in failures and "CHECKSUM_MISMATCH" in failures
    assert "site-5" in failures and "TRAINING_FAILED" in failures and "non-finite" in failures
