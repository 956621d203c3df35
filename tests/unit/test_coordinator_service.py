"""The Coordinator servicer's edge checks, called directly (no network): bad specs, unknown
sites and backends, oversized or foreign task results."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from fedhpc.api.v1 import coordinator_pb2
from fedhpc.common.auth import Principal, Role, _bind
from fedhpc.coordinator.engine import Engine
from fedhpc.coordinator.service import CoordinatorService
from fedhpc.coordinator.state import ExperimentRow, StateStore, TaskRow
from fedhpc.federation_cli import DEMO_SPEC


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code


class Context:
    def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise Aborted(code, message)

    def is_active(self) -> bool:
        return True


class IdleEngine:
    """Stands in for the engine: these calls only record state and wake it."""

    def __init__(self) -> None:
        self.reported: list[Any] = []

    def wake(self) -> None:
        pass

    def forget_site(self, name: str) -> None:
        pass

    def request_stop(self, experiment_id: str, reason: str) -> None:
        pass

    def report_result(self, result: Any) -> tuple[bool, str]:
        self.reported.append(result)
        return True, "SUCCEEDED"


@pytest.fixture
def service(tmp_path: Path) -> tuple[CoordinatorService, StateStore, IdleEngine]:
    state = StateStore(tmp_path / "coordinator.db")
    engine = IdleEngine()
    return CoordinatorService(state, engine), state, engine  # type: ignore[arg-type]


def site(
    name: str, backend: str = "local", transport: str = "presigned"
) -> coordinator_pb2.RegisterSiteRequest:
    config = struct_pb2.Struct()
    config.update({"task": {"partition": 0, "num_partitions": 1}})
    return coordinator_pb2.RegisterSiteRequest(
        site=coordinator_pb2.Site(name=name, backend=backend, transport=transport, config=config)
    )


def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(Aborted) as caught:
        call()
    return caught.value.code, str(caught.value)


def test_sites_register_list_replace_remove(service: Any) -> None:
    servicer, _, _ = service
    added = servicer.RegisterSite(site("a"), Context())
    assert added.backend == "local" and added.state == coordinator_pb2.SITE_STATE_ACTIVE
    assert code_of(lambda: servicer.RegisterSite(site("a"), Context()))[0] == grpc.StatusCode.ALREADY_EXISTS
    request = site("a")
    request.replace = True
    servicer.RegisterSite(request, Context())
    assert [s.name for s in servicer.ListSites(coordinator_pb2.ListSitesRequest(), Context()).sites] == ["a"]
    servicer.RemoveSite(coordinator_pb2.RemoveSiteRequest(name="a"), Context())
    missing = code_of(lambda: servicer.RemoveSite(coordinator_pb2.RemoveSiteRequest(name="a"), Context()))
    assert missing[0] == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("request_", "named"),
    [
        (site("b", backend="carrier-pigeon"), "site.backend"),
        (site("b", transport="fax"), "site.transport"),
        (site("bad name!"), "name"),
    ],
)
def test_bad_sites_are_invalid_argument_naming_the_field(service: Any, request_: Any, named: str) -> None:
    servicer, _, _ = service
    code, message = code_of(lambda: servicer.RegisterSite(request_, Context()))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and named in message


def test_experiments_are_checked_at_creation(service: Any) -> None:
    servicer, _, _ = service
    none_yet = code_of(
        lambda: servicer.CreateExperiment(
            coordinator_pb2.CreateExperimentRequest(spec_yaml=DEMO_SPEC), Context()
        )
    )
    assert none_yet[0] == grpc.StatusCode.FAILED_PRECONDITION and "no sites" in none_yet[1]
    servicer.RegisterSite(site("a"), Context())
    bad = code_of(
        lambda: servicer.CreateExperiment(
            coordinator_pb2.CreateExperimentRequest(spec_yaml=DEMO_SPEC.replace("rounds: 20", "rounds: 0")),
            Context(),
        )
    )
    assert bad[0] == grpc.StatusCode.INVALID_ARGUMENT and "strategy" in bad[1]
    unknown_site = code_of(
        lambda: servicer.CreateExperiment(
            coordinator_pb2.CreateExperimentRequest(spec_yaml=DEMO_SPEC + "sites: [zz]\n"), Context()
        )
    )
    assert unknown_site[0] == grpc.StatusCode.INVALID_ARGUMENT and "zz" in unknown_site[1]
    created = servicer.CreateExperiment(
        coordinator_pb2.CreateExperimentRequest(spec_yaml=DEMO_SPEC, id="x1"), Context()
    )
    assert created.state == coordinator_pb2.EXPERIMENT_STATE_CREATED and created.total_rounds == 20
    again = code_of(
        lambda: servicer.CreateExperiment(
            coordinator_pb2.CreateExperimentRequest(spec_yaml=DEMO_SPEC, id="x1"), Context()
        )
    )
    assert again[0] == grpc.StatusCode.ALREADY_EXISTS
    stopped = servicer.StopExperiment(coordinator_pb2.StopExperimentRequest(id="x1"), Context())
    assert stopped.state == coordinator_pb2.EXPERIMENT_STATE_STOPPED
    start = code_of(
        lambda: servicer.StartExperiment(coordinator_pb2.StartExperimentRequest(id="x1"), Context())
    )
    assert start[0] == grpc.StatusCode.FAILED_PRECONDITION


def _with_task(state: StateStore) -> None:
    state.insert_experiment(
        ExperimentRow("x", "x", DEMO_SPEC, "RUNNING", "x", [], time.time(), None, None, "", None, "", "")
    )
    with state.transaction() as db:
        StateStore.insert_task(
            db, TaskRow("x", "t1", 1, 0, "a", "train", 1, "DISPATCHED", "h", 1.0, None, "", "", 1.0)
        )


def test_a_direct_report_over_64_kb_is_refused(service: Any) -> None:
    servicer, state, engine = service
    _with_task(state)
    result = coordinator_pb2.TaskResult(task_id="x.t1", metrics={f"m{i:05d}": float(i) for i in range(6000)})
    code, message = code_of(
        lambda: servicer.ReportTaskResult(coordinator_pb2.ReportTaskResultRequest(result=result), Context())
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "65536" in message
    assert engine.reported == []


def test_a_site_may_report_only_its_own_tasks(service: Any) -> None:
    servicer, state, engine = service
    _with_task(state)
    result = coordinator_pb2.TaskResult(task_id="x.t1", num_samples=5)
    request = coordinator_pb2.ReportTaskResultRequest(result=result)
    other = Context()
    _bind(other, Principal(role=Role.SITE, site="b", experiment="x"))  # type: ignore[arg-type]
    assert code_of(lambda: servicer.ReportTaskResult(request, other))[0] == grpc.StatusCode.PERMISSION_DENIED
    own = Context()
    _bind(own, Principal(role=Role.SITE, site="a", experiment="x"))  # type: ignore[arg-type]
    reply = servicer.ReportTaskResult(request, own)
    assert reply.accepted and engine.reported[0].num_samples == 5
    unknown = coordinator_pb2.ReportTaskResultRequest(result=coordinator_pb2.TaskResult(task_id="x.nope"))
    assert code_of(lambda: servicer.ReportTaskResult(unknown, Context()))[0] == grpc.StatusCode.NOT_FOUND


def test_engine_type_is_what_the_service_expects() -> None:
    # IdleEngine mirrors the part of Engine the servicer calls.
    for name in ("wake", "forget_site", "request_stop", "report_result"):
        assert callable(getattr(Engine, name))


def test_a_globus_transfer_site_needs_a_valid_transfer_section(service: Any) -> None:
    servicer, _, _ = service
    code, message = code_of(lambda: servicer.RegisterSite(site("g", transport="globus"), Context()))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "globus_transfer" in message
    request = site("g", transport="globus")
    request.site.config.update(
        {
            "globus_transfer": {
                "source_collection": "6c8b1f8e-2c41-4f1a-9d3e-0a6a1f0b9b11",
                "source_path": "/fedhpc",
                "site_collection": "0f7d2a55-7a0e-4f0e-9a9e-3b5d8c2f4e21",
                "site_path": "/eagle/proj/fedhpc",
                "site_local_path": "/lus/eagle/projects/proj/fedhpc",
            }
        }
    )
    assert servicer.RegisterSite(request, Context()).transport == "globus"
