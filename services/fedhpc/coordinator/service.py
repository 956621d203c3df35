"""The Coordinator gRPC servicer: experiments, sites, tasks, the event stream, direct reports.

Reads come straight from the state database; changes are recorded there and the engine is
woken to act on them.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any, NoReturn

import grpc
from google.protobuf import json_format, struct_pb2

from fedhpc.api.v1 import coordinator_pb2, coordinator_pb2_grpc
from fedhpc.common.auth import Role, principal_from_context
from fedhpc.common.contracts import MAX_RESULT_BYTES, ContractError, parse_result
from fedhpc.common.logging import get_logger
from fedhpc.common.manifest import timestamp_at
from fedhpc.coordinator import metrics
from fedhpc.coordinator.dispatch import SiteSpec, known_backends
from fedhpc.coordinator.engine import Engine
from fedhpc.coordinator.spec import SpecError, parse_spec
from fedhpc.coordinator.state import ExperimentRow, SiteRow, StateStore, TaskRow
from fedhpc.coordinator.transfer import GlobusTransferConfig

log = get_logger(__name__)

SERVICE_NAME = "fedhpc.v1.Coordinator"
# Trainers reporting directly hold a site token; everything else is for operators.
METHOD_ROLES: dict[str, Role] = {f"/{SERVICE_NAME}/ReportTaskResult": Role.SITE}
TERMINAL_STATES = ("COMPLETED", "FAILED", "STOPPED")
TRANSPORTS = ("presigned", "registry-stream", "globus", "path")
DEFAULT_PAGE_SIZE = 100
WATCH_POLL_S = 1.0


class CoordinatorService(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, state: StateStore, engine: Engine) -> None:
        self._state = state
        self._engine = engine

    @staticmethod
    def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
        context.abort(code, message)
        raise AssertionError("unreachable")  # context.abort raises

    # -- experiments --------------------------------------------------------------------
    def CreateExperiment(
        self, request: coordinator_pb2.CreateExperimentRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.Experiment:
        try:
            spec = parse_spec(request.spec_yaml)
        except SpecError as exc:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"invalid experiment spec: {exc}")
        experiment_id = request.id or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        if self._state.experiment(experiment_id) is not None:
            self._abort(
                context, grpc.StatusCode.ALREADY_EXISTS, f"experiment {experiment_id!r} exists already"
            )
        unknown = [s for s in spec.sites if self._state.site(s) is None]
        if unknown:
            self._abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"sites: {', '.join(unknown)} not registered (fedhpc sites add ...)",
            )
        if not spec.sites and not self._state.sites():
            self._abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                "no sites are registered; add one with fedhpc sites add",
            )
        row = ExperimentRow(
            id=experiment_id,
            name=spec.name,
            spec_yaml=request.spec_yaml,
            state="RUNNING" if request.start else "CREATED",
            model=spec.model or experiment_id,
            sites=list(spec.sites),
            created_at=time.time(),
            started_at=time.time() if request.start else None,
            finished_at=None,
            error="",
            snapshot=None,
            optimizer_state="",
            stop_reason="",
        )
        self._state.insert_experiment(row)
        log.info("experiment %s created (%s)", experiment_id, row.state.lower())
        self._engine.wake()
        return self._experiment(experiment_id)

    def StartExperiment(
        self, request: coordinator_pb2.StartExperimentRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.Experiment:
        row = self._existing(request.id, context)
        if row.state == "RUNNING":
            return self._experiment(row.id)
        if row.state != "CREATED":
            self._abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"experiment {row.id} is {row.state}; it cannot start",
            )
        with self._state.transaction() as db:
            StateStore.update_experiment(db, row.id, state="RUNNING", started_at=time.time())
        self._engine.wake()
        return self._experiment(row.id)

    def StopExperiment(
        self, request: coordinator_pb2.StopExperimentRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.Experiment:
        row = self._existing(request.id, context)
        reason = request.reason or "stopped by the operator"
        if row.state in TERMINAL_STATES:
            return self._experiment(row.id)
        with self._state.transaction() as db:
            if row.state == "CREATED":
                StateStore.update_experiment(
                    db, row.id, state="STOPPED", finished_at=time.time(), stop_reason=reason
                )
            else:
                StateStore.update_experiment(db, row.id, state="STOPPING", stop_reason=reason)
        if row.state != "CREATED":
            self._engine.request_stop(row.id, reason)
        return self._experiment(row.id)

    def GetExperiment(
        self, request: coordinator_pb2.GetExperimentRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.Experiment:
        return self._experiment(self._existing(request.id, context).id)

    def ListExperiments(
        self, request: coordinator_pb2.ListExperimentsRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.ListExperimentsResponse:
        rows = self._state.experiments()
        page, token = _page([r.id for r in rows], request.page.page_size, request.page.page_token, context)
        return coordinator_pb2.ListExperimentsResponse(
            experiments=[self._experiment(i) for i in page], next_page_token=token
        )

    def WatchExperiment(
        self, request: coordinator_pb2.WatchExperimentRequest, context: grpc.ServicerContext
    ) -> Iterator[coordinator_pb2.ExperimentEvent]:
        row = self._existing(request.experiment_id, context)
        after = request.after_sequence
        while context.is_active():
            batch = self._state.events_after(row.id, after)
            for seq, _, payload in batch:
                event = coordinator_pb2.ExperimentEvent.FromString(payload)
                event.sequence = seq
                after = seq
                yield event
            if batch:
                continue
            current = self._state.experiment(row.id)
            if current is None or current.state in TERMINAL_STATES:
                return  # every event of a finished experiment has been sent
            with self._engine.changed:
                self._engine.changed.wait(WATCH_POLL_S)

    # -- sites --------------------------------------------------------------------------
    def RegisterSite(
        self, request: coordinator_pb2.RegisterSiteRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.Site:
        site = request.site
        config = json_format.MessageToDict(site.config) if site.HasField("config") else {}
        try:
            spec = SiteSpec(
                name=site.name,
                backend=site.backend or "local",
                config=config,
                max_concurrent_tasks=site.max_concurrent_tasks or 1,
                transport=site.transport or "presigned",
            )
        except ValueError as exc:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"invalid site: {exc}")
        if spec.backend not in known_backends():
            self._abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"site.backend: unknown backend {spec.backend!r}; known: {', '.join(known_backends())}",
            )
        if spec.transport not in TRANSPORTS:
            self._abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"site.transport: unknown transport {spec.transport!r}; known: {', '.join(TRANSPORTS)}",
            )
        if spec.transport == "globus":
            try:
                GlobusTransferConfig.from_site_config(spec.config)
            except ValueError as exc:
                self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"site.config.globus_transfer: {exc}")
        existing = self._state.site(spec.name)
        if existing is not None and not request.replace:
            self._abort(
                context,
                grpc.StatusCode.ALREADY_EXISTS,
                f"site {spec.name!r} exists; pass replace to change it",
            )
        self._engine.forget_site(spec.name)
        self._state.upsert_site(
            SiteRow(
                name=spec.name,
                backend=spec.backend,
                config=spec.config,
                transport=spec.transport,
                max_concurrent=spec.max_concurrent_tasks,
                state="ACTIVE",
                labels=dict(site.labels),
                created_at=existing.created_at if existing else time.time(),
                last_seen=existing.last_seen if existing else None,
            )
        )
        metrics.SITES_ACTIVE.set(sum(1 for s in self._state.sites() if s.state == "ACTIVE"))
        found = self._state.site(spec.name)
        assert found is not None
        return _site_proto(found)

    def ListSites(
        self, request: coordinator_pb2.ListSitesRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.ListSitesResponse:
        sites = {s.name: s for s in self._state.sites()}
        page, token = _page(list(sites), request.page.page_size, request.page.page_token, context)
        return coordinator_pb2.ListSitesResponse(
            sites=[_site_proto(sites[n]) for n in page], next_page_token=token
        )

    def RemoveSite(
        self, request: coordinator_pb2.RemoveSiteRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.RemoveSiteResponse:
        if self._state.site(request.name) is None:
            self._abort(context, grpc.StatusCode.NOT_FOUND, f"site {request.name!r} is not registered")
        busy = [
            e.id
            for e in self._state.experiments(states=("RUNNING", "STOPPING"))
            if request.name in e.sites or not e.sites
        ]
        if busy:
            self._abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"site {request.name!r} is used by running experiment(s) {', '.join(busy)}; stop them first",
            )
        self._engine.forget_site(request.name)
        self._state.delete_site(request.name)
        metrics.SITES_ACTIVE.set(sum(1 for s in self._state.sites() if s.state == "ACTIVE"))
        return coordinator_pb2.RemoveSiteResponse()

    # -- tasks --------------------------------------------------------------------------
    def ListTasks(
        self, request: coordinator_pb2.ListTasksRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.ListTasksResponse:
        self._existing(request.experiment_id, context)
        tasks = self._state.tasks(request.experiment_id, request.round or None)
        by_id = {t.task_id: t for t in tasks}
        page, token = _page(list(by_id), request.page.page_size or 10_000, request.page.page_token, context)
        return coordinator_pb2.ListTasksResponse(
            tasks=[task_proto(by_id[i]) for i in page], next_page_token=token
        )

    def ReportTaskResult(
        self, request: coordinator_pb2.ReportTaskResultRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.ReportTaskResultResponse:
        size = request.result.ByteSize()
        if size > MAX_RESULT_BYTES:
            self._abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the result is {size} bytes, over the {MAX_RESULT_BYTES}-byte limit",
            )
        experiment_id, _, task_id = request.result.task_id.partition(".")
        task = self._state.task(experiment_id, task_id)
        if task is None:
            self._abort(context, grpc.StatusCode.NOT_FOUND, f"no task {request.result.task_id!r}")
        principal = principal_from_context(context)
        if not principal.is_admin and (
            principal.site != task.site or not principal.may_act_on(experiment_id)
        ):
            self._abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{principal.describe()} may not report task {request.result.task_id!r} of site {task.site!r}",
            )
        try:
            result = parse_result(_result_from_proto(request.result))
        except ContractError as exc:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        accepted, phase = self._engine.report_result(result)
        return coordinator_pb2.ReportTaskResultResponse(
            accepted=accepted, phase=coordinator_pb2.TaskPhase.Value(f"TASK_PHASE_{phase}")
        )

    # -- helpers ------------------------------------------------------------------------
    def _existing(self, experiment_id: str, context: grpc.ServicerContext) -> ExperimentRow:
        row = self._state.experiment(experiment_id)
        if row is None:
            self._abort(context, grpc.StatusCode.NOT_FOUND, f"no experiment {experiment_id!r}")
        return row

    def _experiment(self, experiment_id: str) -> coordinator_pb2.Experiment:
        row = self._state.experiment(experiment_id)
        assert row is not None
        return experiment_proto(row, self._state)


def experiment_proto(row: ExperimentRow, state: StateStore) -> coordinator_pb2.Experiment:
    try:
        total_rounds = parse_spec(row.spec_yaml).strategy.rounds
    except SpecError:
        total_rounds = 0
    rounds = state.rounds(row.id)
    done = [r for r in rounds if r.finished_at and r.round > 0]
    with_metrics = [r for r in rounds if r.metrics]
    experiment = coordinator_pb2.Experiment(
        id=row.id,
        name=row.name,
        state=coordinator_pb2.ExperimentState.Value(f"EXPERIMENT_STATE_{row.state}"),
        spec_yaml=row.spec_yaml,
        model=row.model,
        current_round=max((r.round for r in done), default=0),
        total_rounds=total_rounds,
        latest_version=max((r.version for r in rounds if r.version), default=""),
        latest_metrics=with_metrics[-1].metrics if with_metrics else {},
        sites=row.sites,
        error=row.error,
    )
    for r in rounds:
        summary = experiment.rounds.add(
            round=r.round,
            version=r.version,
            accepted_updates=r.accepted,
            rejected_updates=r.rejected,
            metrics=r.metrics,
        )
        summary.started_at.CopyFrom(timestamp_at(r.started_at))
        if r.finished_at:
            summary.finished_at.CopyFrom(timestamp_at(r.finished_at))
    experiment.created_at.CopyFrom(timestamp_at(row.created_at))
    if row.started_at:
        experiment.started_at.CopyFrom(timestamp_at(row.started_at))
    if row.finished_at:
        experiment.finished_at.CopyFrom(timestamp_at(row.finished_at))
    return experiment


def task_proto(row: TaskRow) -> coordinator_pb2.Task:
    task = coordinator_pb2.Task(
        id=row.task_id,
        experiment_id=row.experiment_id,
        round=row.round,
        site=row.site,
        phase=coordinator_pb2.TaskPhase.Value(f"TASK_PHASE_{row.phase}"),
        attempt=row.attempt,
        base_version=f"r{row.base_round:04d}",
    )
    result = row.result or {}
    timings = result.get("timings", {})
    started = timings.get("started_at", 0.0)
    dispatched = row.dispatched_at or timings.get("dispatched_at", 0.0)
    task.timings.CopyFrom(
        coordinator_pb2.TaskTimings(
            dispatched_at=dispatched,
            started_at=started,
            finished_at=timings.get("finished_at", 0.0)
            or (row.updated_at if row.phase in ("FAILED",) else 0.0),
            queue_wait_s=max(0.0, started - dispatched) if started and dispatched else 0.0,
            download_s=timings.get("download_s", 0.0),
            train_s=timings.get("train_s", 0.0),
            upload_s=timings.get("upload_s", 0.0),
        )
    )
    if row.error_code:
        task.error.CopyFrom(coordinator_pb2.TaskError(code=row.error_code, message=row.error_message))
    if result:
        task.result.CopyFrom(
            coordinator_pb2.TaskResult(
                task_id=result.get("task_id", ""),
                num_samples=result.get("num_samples", 0),
                metrics=result.get("metrics", {}),
                steps=result.get("steps", 0),
                device=result.get("device", {}),
            )
        )
        update = result.get("update")
        if update:
            task.result.update.object_key = update["object_key"]
            task.result.update.sha256 = update["sha256"]
            task.result.update.size_bytes = update["size_bytes"]
    return task


def _site_proto(row: SiteRow) -> coordinator_pb2.Site:
    config = struct_pb2.Struct()
    config.update(row.config)
    site = coordinator_pb2.Site(
        name=row.name,
        backend=row.backend,
        config=config,
        transport=row.transport,
        max_concurrent_tasks=row.max_concurrent,
        state=coordinator_pb2.SiteState.Value(f"SITE_STATE_{row.state}"),
        labels=row.labels,
    )
    site.created_at.CopyFrom(timestamp_at(row.created_at))
    if row.last_seen:
        site.last_seen.CopyFrom(timestamp_at(row.last_seen))
    return site


def _result_from_proto(result: coordinator_pb2.TaskResult) -> dict[str, Any]:
    data: dict[str, Any] = {
        "task_id": result.task_id,
        "num_samples": result.num_samples,
        "metrics": dict(result.metrics),
        "steps": result.steps,
        "device": dict(result.device),
        "timings": {
            "dispatched_at": result.timings.dispatched_at,
            "started_at": result.timings.started_at,
            "finished_at": result.timings.finished_at,
            "download_s": result.timings.download_s,
            "train_s": result.timings.train_s,
            "upload_s": result.timings.upload_s,
        },
    }
    if result.HasField("update"):
        data["update"] = {
            "object_key": result.update.object_key,
            "sha256": result.update.sha256,
            "size_bytes": result.update.size_bytes,
        }
    if result.HasField("error") and result.error.code:
        data["error"] = {"code": result.error.code, "message": result.error.message}
    return data


def _page(ids: list[str], size: int, token: str, context: grpc.ServicerContext) -> tuple[list[str], str]:
    size = size or DEFAULT_PAGE_SIZE
    try:
        start = int(token) if token else 0
    except ValueError:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"page_token {token!r} is not one this server issued")
        raise
    end = start + size
    return ids[start:end], (str(end) if end < len(ids) else "")


__all__ = ["METHOD_ROLES", "SERVICE_NAME", "CoordinatorService", "experiment_proto", "task_proto"]
