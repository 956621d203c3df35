"""The coordinator's engine: runs every experiment's strategy against the real world.

One loop thread owns the strategies. Each pass it (1) carries out the decisions waiting in
each running experiment's outbox, (2) polls the sites' dispatchers, (3) fires due timers,
and (4) feeds what happened to the strategy. A strategy step -- the event's own effects
(task phase, round metrics), the strategy's new snapshot and its decisions -- is one SQLite
transaction, and a decision leaves the outbox in the transaction that records its effect.
After a kill -9, :meth:`Engine.start` restores each strategy from its snapshot, re-attaches
the dispatched tasks and re-executes the outbox; dispatching (by task id) and aggregating
(by new version id) are idempotent, so nothing is done twice.

Aggregations run on a worker thread so a large model does not stall the other experiments;
their decision stays in the outbox until the result is recorded.
"""

from __future__ import annotations

import dataclasses
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2

from fedhpc.api.v1 import aggregator_pb2, aggregator_pb2_grpc, common_pb2, coordinator_pb2, registry_pb2
from fedhpc.common.config import CoordinatorConfig, StoreConfig
from fedhpc.common.contracts import (
    ErrorCode,
    ModelSource,
    PluginSpec,
    TaskErrorDoc,
    TaskResultDoc,
    TaskSpec,
    UpdateTarget,
)
from fedhpc.common.logging import get_logger, log_context
from fedhpc.common.manifest import timestamp_at
from fedhpc.common.registry_client import RegistryClient
from fedhpc.common.storage import ObjectStore
from fedhpc.coordinator import metrics
from fedhpc.coordinator.dispatch import Dispatcher, DispatchEvent, SiteSpec, make_dispatcher
from fedhpc.coordinator.spec import ExperimentSpec, parse_spec
from fedhpc.coordinator.state import ExperimentRow, StateStore, TaskRow
from fedhpc.coordinator.strategies import (
    Aggregate,
    AggregationFailed,
    AggregationSucceeded,
    CancelTask,
    CancelTimer,
    Decision,
    DispatchTask,
    Event,
    Finish,
    LogEntry,
    SetTimer,
    Started,
    StopRequested,
    Strategy,
    TaskFailed,
    TaskSucceeded,
    TimerFired,
    UpdateChoice,
    make_strategy,
    restore_strategy,
)
from fedhpc.coordinator.transfer import (
    GlobusTransferStager,
    StagedFile,
    TransferFailed,
    without_transfer_config,
)

log = get_logger("fedhpc.coordinator")

# Dispatcher phases -> the API's task phases (the worker's "running" is the download start).
_PHASES = {
    "queued": "QUEUED",
    "running": "DOWNLOADING",
    "downloading": "DOWNLOADING",
    "training": "TRAINING",
    "uploading": "UPLOADING",
}
_FAILED_PHASE = {ErrorCode.DEADLINE_EXCEEDED: "TIMED_OUT", ErrorCode.CANCELLED: "CANCELLED"}
SITE_EXPORT_INTERVAL_S = 1.0
_FINISH_STATES = {"completed": "COMPLETED", "failed": "FAILED", "stopped": "STOPPED"}
# Transient aggregator failures are retried after this long; the decision stays in the outbox.
_AGGREGATE_RETRY_S = 2.0
_RETRYABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)


class Pending:
    """A decision that cannot be carried out yet (its model is still being staged)."""


PENDING = Pending()


def version_id(round_number: int) -> str:
    """The registry version a round produces: exactly one per round (r0000 is the initial model)."""
    return f"r{round_number:04d}"


def decision_to_dict(decision: Decision) -> dict[str, Any]:
    return {"type": type(decision).__name__, **dataclasses.asdict(decision)}


_DECISIONS: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (DispatchTask, CancelTask, SetTimer, CancelTimer, Aggregate, Finish, LogEntry)
}


def decision_from_dict(data: dict[str, Any]) -> Decision:
    fields = dict(data)
    cls = _DECISIONS[fields.pop("type")]
    if cls is Aggregate:
        fields["updates"] = tuple(UpdateChoice(**u) for u in fields["updates"])
    decision: Decision = cls(**fields)
    return decision


@dataclasses.dataclass
class _Running:
    """In-memory companions of a running experiment (rebuilt from the database on restart)."""

    spec: ExperimentSpec
    strategy: Strategy[Any]
    aggregation: tuple[int, Future[Any]] | None = None
    retry_at: float = 0.0


class Engine:
    """Runs the experiments recorded in ``state``; thread-safe entry points for the service."""

    def __init__(
        self,
        config: CoordinatorConfig,
        state: StateStore,
        registry: RegistryClient,
        aggregator: aggregator_pb2_grpc.AggregatorStub,
        store_config: StoreConfig,
        store: ObjectStore | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._state = state
        self._registry = registry
        self._aggregator = aggregator
        self._store_config = store_config
        self._store = store
        self._clock = clock
        self._running: dict[str, _Running] = {}
        self._dispatchers: dict[str, Dispatcher] = {}
        # Dispatcher task id (experiment.task) -> (experiment, strategy task id).
        self._routes: dict[str, tuple[str, str]] = {}
        self._inbox: dict[str, list[Event]] = defaultdict(list)
        self._versions: dict[tuple[str, str, bool], tuple[registry_pb2.ModelVersion, float]] = {}
        self._stagers: dict[str, GlobusTransferStager] = {}
        self._staging: dict[tuple[str, str], Future[StagedFile]] = {}
        self._next_site_export = 0.0
        self._stage_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="globus-stage")
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="aggregate")
        # Watchers wait on this for new events.
        self.changed = threading.Condition()

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="coordinator-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._stage_pool.shutdown(wait=False, cancel_futures=True)
        for dispatcher in self._dispatchers.values():
            dispatcher.close()

    def shutdown_sites(self) -> None:
        """Stop every site's worker processes (``fedhpc down``)."""
        for site in self._state.sites():
            try:
                self._dispatcher(site.name).shutdown()
            except Exception as exc:  # a broken site must not keep the others running
                log.warning("could not stop site %s: %s", site.name, exc)

    def wake(self) -> None:
        self._wake.set()

    def request_stop(self, experiment_id: str, reason: str) -> None:
        with self._lock:
            self._inbox[experiment_id].append(StopRequested(now=self._clock(), reason=reason))
        self.wake()

    def report_result(self, result: TaskResultDoc) -> tuple[bool, str]:
        """A trainer reporting directly: returns (accepted, phase)."""
        with self._lock:
            route = self._routes.get(result.task_id)
        if route is None:
            return False, "UNSPECIFIED"
        self._on_dispatch_event(route, DispatchEvent(result.task_id, "finished", self._clock(), result))
        return True, "SUCCEEDED" if result.ok else "FAILED"

    # -- the loop -----------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping.is_set():
            busy = False
            try:
                busy = self._pass()
            except Exception:
                log.exception("coordinator engine pass failed; retrying")
                time.sleep(self._config.tick_seconds)
            if not busy:
                self._wake.wait(self._config.tick_seconds)
                self._wake.clear()

    def _pass(self) -> bool:
        busy = False
        running = self._state.experiments(states=("RUNNING", "STOPPING"))
        metrics.EXPERIMENTS_RUNNING.set(len(running))
        if time.monotonic() >= self._next_site_export:
            # Gauges for scrapes every few seconds: not worth three queries on every pass.
            self._next_site_export = time.monotonic() + SITE_EXPORT_INTERVAL_S
            metrics.SITES_ACTIVE.set(self._state.count_sites("ACTIVE"))
            self._export_in_flight()
        for experiment in running:
            with log_context(experiment=experiment.id):
                try:
                    busy |= self._step(experiment)
                except Exception as exc:
                    log.exception("experiment %s failed", experiment.id)
                    self._fail(experiment.id, f"internal error: {exc}")
        busy |= self._poll_dispatchers()
        return busy

    def _export_in_flight(self) -> None:
        counts = self._state.open_task_counts()
        for site in self._state.sites():
            metrics.TASKS_IN_FLIGHT.labels(site=site.name).set(counts.get(site.name, 0))

    def _step(self, experiment: ExperimentRow) -> bool:
        running = self._running.get(experiment.id) or self._resume(experiment)
        busy = self._execute_outbox(experiment, running)
        now = self._clock()
        for timer_id, _ in self._state.due_timers(experiment.id, now):
            self._feed(
                experiment.id,
                running,
                TimerFired(now=now, timer_id=timer_id),
                _drop_timer(experiment.id, timer_id),
            )
            busy = True
        with self._lock:
            events, self._inbox[experiment.id] = self._inbox[experiment.id], []
        for event in events:
            self._feed(experiment.id, running, event)
            busy = True
        return busy

    # -- start and resume -------------------------------------------------------------
    def _resume(self, experiment: ExperimentRow) -> _Running:
        spec = parse_spec(experiment.spec_yaml)
        if experiment.snapshot is None:
            return self._begin(experiment, spec)
        strategy = restore_strategy(spec.strategy, experiment.snapshot)
        running = _Running(spec, strategy)
        self._running[experiment.id] = running
        for task in self._state.open_tasks(experiment.id):
            route = f"{experiment.id}.{task.task_id}"
            with self._lock:
                self._routes[route] = (experiment.id, task.task_id)
            if task.handle:
                self._dispatcher(task.site).reattach(route, task.handle)
        log.info("resumed experiment %s from its snapshot", experiment.id)
        return running

    def _begin(self, experiment: ExperimentRow, spec: ExperimentSpec) -> _Running:
        now = self._clock()
        self._ensure_initial_model(experiment, spec)
        sites = experiment.sites or [s.name for s in self._state.sites() if s.state == "ACTIVE"]
        strategy = make_strategy(spec.strategy)
        running = _Running(spec, strategy)
        self._running[experiment.id] = running

        def record(db: Any) -> None:
            StateStore.ensure_round(db, experiment.id, 0, now)
            StateStore.finish_round(
                db, experiment.id, 0, version=version_id(0), accepted=0, rejected=0, finished_at=now
            )
            StateStore.update_experiment(db, experiment.id, sites=sites)

        self._feed(experiment.id, running, Started(now=now, sites=tuple(sites)), record)
        log.info("experiment %s started on %d sites: %s", experiment.id, len(sites), ", ".join(sites))
        return running

    def _ensure_initial_model(self, experiment: ExperimentRow, spec: ExperimentSpec) -> None:
        """Version r0000 of the experiment's model: the plugin's initial weights or a copy of
        ``initial_version``. Re-running after a crash finds it there."""
        self._registry.create_model(experiment.model, spec.description or spec.name)
        try:
            self._registry.get_version(common_pb2.ModelRef(model=experiment.model, version=version_id(0)))
            return
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        with tempfile.TemporaryDirectory(prefix="fedhpc-init-") as tmp:
            path = Path(tmp) / "weights.safetensors"
            if spec.initial_version:
                model, _, version = spec.initial_version.partition("@")
                self._registry.pull(common_pb2.ModelRef(model=model, version=version or "latest"), path)
            else:
                _write_initial_weights(spec, path)
            self._registry.push(
                experiment.model,
                path,
                version=version_id(0),
                algorithm="init",
                producer="coordinator",
                aliases=("latest",),
            )

    # -- feeding the strategy -----------------------------------------------------------
    def _feed(
        self,
        experiment_id: str,
        running: _Running,
        event: Event,
        effects: Callable[[Any], None] | None = None,
    ) -> None:
        """One strategy step, atomically with the event's own effects."""
        try:
            decisions = running.strategy.handle(event)
            with self._state.transaction() as db:
                if effects is not None:
                    effects(db)
                StateStore.update_experiment(db, experiment_id, snapshot=running.strategy.snapshot())
                StateStore.push_outbox(db, experiment_id, [decision_to_dict(d) for d in decisions])
        except Exception:
            # The in-memory strategy may be ahead of the database now: rebuild it from there.
            self._running.pop(experiment_id, None)
            raise
        self._notify()
        self.wake()

    # -- executing decisions ------------------------------------------------------------
    def _execute_outbox(self, experiment: ExperimentRow, running: _Running) -> bool:
        busy = False
        # A round's dispatches are recorded in one transaction: hundreds of sites per round
        # would otherwise pay one commit each.
        recorded: list[Callable[[Any], None]] = []
        try:
            for seq, data in self._state.outbox(experiment.id):
                decision = decision_from_dict(data)
                if isinstance(decision, DispatchTask):
                    record = self._dispatch(experiment, running, seq, decision)
                    if isinstance(record, Pending):
                        # Stays in the outbox; the staging thread wakes the loop when done.
                        continue
                    if record is not None:
                        recorded.append(record)
                    busy = True
                    continue
                self._record_all(recorded)
                go_on, happened = self._execute_one(experiment, running, seq, decision)
                busy |= happened
                if not go_on:
                    break
        finally:
            self._record_all(recorded)
        return busy

    def _record_all(self, recorded: list[Callable[[Any], None]]) -> None:
        if not recorded:
            return
        with self._state.transaction() as db:
            for record in recorded:
                record(db)
        recorded.clear()
        self._notify()

    def _execute_one(
        self, experiment: ExperimentRow, running: _Running, seq: int, decision: Decision
    ) -> tuple[bool, bool]:
        """Carry out one non-dispatch decision: (go on with the next one, something happened)."""
        if isinstance(decision, Aggregate):
            done = self._aggregate(experiment, running, seq, decision)
            # Decisions after an unfinished aggregation wait: the outbox is carried out in order.
            return done, done
        self._execute(experiment, running, seq, decision)
        return experiment.id in self._running, True

    def _execute(self, experiment: ExperimentRow, running: _Running, seq: int, decision: Decision) -> None:
        eid = experiment.id
        now = self._clock()
        if isinstance(decision, CancelTask):
            self._cancel(experiment, seq, decision)
        elif isinstance(decision, SetTimer):
            with self._state.transaction() as db:
                StateStore.set_timer(db, eid, decision.timer_id, decision.at)
                StateStore.pop_outbox(db, eid, seq)
        elif isinstance(decision, CancelTimer):
            with self._state.transaction() as db:
                StateStore.cancel_timer(db, eid, decision.timer_id)
                StateStore.pop_outbox(db, eid, seq)
        elif isinstance(decision, LogEntry):
            log.info("%s: %s", decision.kind, decision.message, extra={"site": decision.site})
            with self._state.transaction() as db:
                StateStore.pop_outbox(db, eid, seq)
        elif isinstance(decision, Finish):
            state = _FINISH_STATES[decision.state]
            with self._state.transaction() as db:
                StateStore.update_experiment(
                    db,
                    eid,
                    state=state,
                    finished_at=now,
                    error=decision.reason if state == "FAILED" else "",
                )
                StateStore.pop_outbox(db, eid, seq)
                self._event(db, eid, now, state_changed=_state_changed(state, decision.reason))
            self._running.pop(eid, None)
            metrics.EXPERIMENTS_FINISHED.labels(state=state.lower()).inc()
            log.info("experiment %s %s: %s", eid, state.lower(), decision.reason)
            self._notify()

    def _dispatch(
        self, experiment: ExperimentRow, running: _Running, seq: int, decision: DispatchTask
    ) -> Callable[[Any], None] | Pending | None:
        """Submit the task; return how to record it (the caller batches these into one
        transaction), PENDING while its model is still being staged, or None when the failure
        was recorded already."""
        eid = experiment.id
        route = f"{eid}.{decision.task_id}"
        existing = self._state.task(eid, decision.task_id)
        if existing is not None and existing.handle:
            # Done before a crash; only the outbox entry was left.
            return lambda db: StateStore.pop_outbox(db, eid, seq)
        now = self._clock()
        try:
            site = self._state.site(decision.site)
            if site is None:
                raise LookupError(f"site {decision.site!r} is not registered")
            staged = None
            if site.transport == "globus":
                staged = self._staged_model(experiment, decision, site.config)
                if staged is None:
                    return PENDING
            task = self._task_spec(
                experiment, running.spec, decision, route, site.config, site.transport, now, staged
            )
            with self._lock:
                self._routes[route] = (eid, decision.task_id)
            handle = self._dispatcher(decision.site).submit(task)
        except Exception as exc:
            reason = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else str(exc)
            log.warning("dispatching %s to %s failed: %s", decision.task_id, decision.site, reason)
            failed = TaskFailed(
                now=now,
                task_id=decision.task_id,
                site=decision.site,
                code=ErrorCode.DISPATCH_FAILED.value,
                message=reason,
            )

            def record_failure(db: Any) -> None:
                self._insert_task(db, eid, decision, "FAILED", "", now)
                StateStore.update_task(
                    db,
                    eid,
                    decision.task_id,
                    error_code=ErrorCode.DISPATCH_FAILED.value,
                    error_message=reason[:2000],
                )
                StateStore.pop_outbox(db, eid, seq)
                self._task_event(
                    db,
                    eid,
                    decision.task_id,
                    decision.site,
                    decision.round,
                    "FAILED",
                    now,
                    code=ErrorCode.DISPATCH_FAILED.value,
                    message=reason,
                )

            self._feed(eid, running, failed, record_failure)
            return None

        def record(db: Any) -> None:
            self._insert_task(db, eid, decision, "DISPATCHED", handle, now)
            StateStore.ensure_round(db, eid, decision.round, now)
            StateStore.pop_outbox(db, eid, seq)
            if (
                decision.mode == "train"
                and decision.attempt == 1
                and _first_of_round(db, eid, decision.round)
            ):
                self._event(
                    db,
                    eid,
                    now,
                    round_started=coordinator_pb2.RoundStarted(
                        round=decision.round, base_version=version_id(decision.base_round)
                    ),
                )
            self._task_event(db, eid, decision.task_id, decision.site, decision.round, "DISPATCHED", now)
            metrics.TASKS_DISPATCHED.labels(site=decision.site).inc()

        return record

    @staticmethod
    def _insert_task(db: Any, eid: str, decision: DispatchTask, phase: str, handle: str, now: float) -> None:
        StateStore.insert_task(
            db,
            TaskRow(
                experiment_id=eid,
                task_id=decision.task_id,
                round=decision.round,
                base_round=decision.base_round,
                site=decision.site,
                mode=decision.mode,
                attempt=decision.attempt,
                phase=phase,
                handle=handle,
                dispatched_at=now,
                result=None,
                error_code="",
                error_message="",
                updated_at=now,
            ),
        )

    def _task_spec(
        self,
        experiment: ExperimentRow,
        spec: ExperimentSpec,
        decision: DispatchTask,
        route: str,
        site_config: dict[str, Any],
        transport: str,
        now: float,
        staged: StagedFile | None = None,
    ) -> TaskSpec:
        ref = common_pb2.ModelRef(model=experiment.model, version=version_id(decision.base_round))
        # A file store has no URLs to hand out: its trainers get local paths instead.
        version = self._version(ref, presign=transport == "presigned" and self._store is None)
        source: dict[str, Any] = {
            "model": experiment.model,
            "version": ref.version,
            "sha256": version.manifest.sha256,
            "size_bytes": version.manifest.size_bytes,
        }
        local = self._local_path(version.object_key)
        stager = self._stager(decision.site, site_config) if transport == "globus" else None
        if stager is not None:
            if staged is None:
                raise RuntimeError(f"the model for {decision.task_id} was not staged at {decision.site}")
            source["path"] = staged.local_path
        elif transport == "registry-stream":
            source["registry"] = self._config.trainer_registry_address or self._config.registry_address
        elif version.get_url:
            source["url"] = version.get_url
        elif local is not None:
            source["path"] = str(local)
        else:
            source["registry"] = self._config.trainer_registry_address or self._config.registry_address
        update = None
        if decision.mode == "train":
            key = f"updates/{experiment.id}/{version_id(decision.round)}/{decision.task_id}.safetensors"
            target = self._store.writable_path(key) if self._store is not None and stager is None else None
            if stager is not None:
                update = UpdateTarget(object_key=key, path=stager.update_location(key).local_path)
            elif target is not None:
                update = UpdateTarget(object_key=key, path=str(target))
            else:
                presigned = self._registry.stub.PresignBlob(
                    registry_pb2.PresignBlobRequest(
                        object_key=key,
                        method=registry_pb2.PRESIGN_METHOD_PUT,
                        ttl_seconds=self._config.presign_ttl_seconds,
                    )
                )
                update = UpdateTarget(object_key=key, url=presigned.url)
        return TaskSpec(
            experiment_id=experiment.id,
            round=decision.round,
            task_id=route,
            site=decision.site,
            attempt=decision.attempt,
            mode=decision.mode,
            plugin=PluginSpec(name=spec.task.plugin, hyperparameters=spec.task.hyperparameters),
            model=ModelSource(**source),
            update=update,
            site_config=dict(site_config.get("task", {})),
            dispatched_at=now,
            deadline=decision.deadline,
            seed=spec.seed * 1_000_003 + decision.round * 1009 + decision.attempt,
        )

    def _stager(self, site: str, site_config: dict[str, Any]) -> GlobusTransferStager:
        stager = self._stagers.get(site)
        if stager is None:
            stager = GlobusTransferStager.for_site(site_config, site=site)
            self._stagers[site] = stager
        return stager

    def _staged_model(
        self, experiment: ExperimentRow, decision: DispatchTask, site_config: dict[str, Any]
    ) -> StagedFile | None:
        """The task's model staged at its site by Globus Transfer, or None while that is under
        way on a thread of its own (a transfer can take minutes; the loop goes on meanwhile).
        A failed transfer raises TransferFailed, which fails the dispatch with its reason."""
        key = (experiment.id, decision.task_id)
        future = self._staging.get(key)
        if future is None:
            ref = common_pb2.ModelRef(model=experiment.model, version=version_id(decision.base_round))
            version = self._version(ref, presign=False)
            stager = self._stager(decision.site, site_config)
            started = time.time()

            def stage() -> StagedFile:
                staged = stager.stage_model(
                    experiment.id,
                    ref.version,
                    version.object_key,
                    version.manifest.sha256,
                    version.manifest.size_bytes,
                )
                metrics.TASK_PHASE_SECONDS.labels(site=decision.site, phase="transfer").observe(
                    time.time() - started
                )
                return staged

            future = self._stage_pool.submit(stage)
            future.add_done_callback(lambda _: self.wake())
            self._staging[key] = future
            return None
        if not future.done():
            return None
        del self._staging[key]
        return future.result()

    def _fetch_update(self, task: TaskRow, result: TaskResultDoc) -> TaskResultDoc:
        """For a Globus Transfer site: bring the update from the site into the store; a failed
        transfer fails the task with the transfer's reason."""
        site = self._state.site(task.site)
        if site is None or site.transport != "globus" or result.update is None:
            return result
        started = time.time()
        try:
            self._stager(task.site, site.config).fetch_update(
                f"{task.experiment_id}.{task.task_id}",
                result.update.object_key,
                object_key=result.update.object_key,
            )
        except TransferFailed as exc:
            return failure_result_for(result, exc.task_error_code, str(exc))
        metrics.TASK_PHASE_SECONDS.labels(site=task.site, phase="transfer").observe(time.time() - started)
        return result

    def _version(self, ref: common_pb2.ModelRef, *, presign: bool) -> registry_pb2.ModelVersion:
        """GetVersion, cached: versions are immutable, and a presigned URL is reused for a
        small part of its lifetime (a round dispatches to every site at once)."""
        key = (ref.model, ref.version, presign)
        now = self._clock()
        cached = self._versions.get(key)
        if cached is not None and (not presign or now - cached[1] < self._config.presign_ttl_seconds / 10):
            return cached[0]
        version = self._registry.get_version(ref, presign=presign)
        if len(self._versions) > 1000:
            self._versions.clear()
        self._versions[key] = (version, now)
        return version

    def _local_path(self, key: str) -> Path | None:
        return self._store.local_path(key) if self._store is not None else None

    def _cancel(self, experiment: ExperimentRow, seq: int, decision: CancelTask) -> None:
        eid = experiment.id
        task = self._state.task(eid, decision.task_id)
        now = self._clock()
        if task is not None and not task.terminal:
            try:
                self._dispatcher(task.site).cancel(f"{eid}.{task.task_id}", decision.reason)
            except Exception as exc:
                log.warning("cancelling %s at %s failed: %s", task.task_id, task.site, exc)
        with self._state.transaction() as db:
            if task is not None and not task.terminal:
                phase = "TIMED_OUT" if decision.reason == ErrorCode.DEADLINE_EXCEEDED.value else "CANCELLED"
                StateStore.update_task(
                    db,
                    eid,
                    task.task_id,
                    phase=phase,
                    error_code=decision.reason,
                    error_message=f"cancelled by the strategy: {decision.reason}",
                )
                self._task_event(
                    db, eid, task.task_id, task.site, task.round, phase, now, code=decision.reason
                )
            StateStore.pop_outbox(db, eid, seq)
        self._notify()

    # -- aggregation ----------------------------------------------------------------------
    def _aggregate(self, experiment: ExperimentRow, running: _Running, seq: int, decision: Aggregate) -> bool:
        """Start or finish the aggregation; True once its result is recorded."""
        if running.aggregation is None:
            if self._clock() < running.retry_at:
                return False
            request = self._aggregate_request(experiment, running.spec, decision)
            future = self._pool.submit(
                self._aggregator.Aggregate, request, timeout=self._config.aggregation_timeout_seconds
            )
            future.add_done_callback(lambda _: self.wake())
            running.aggregation = (seq, future)
            return False
        _, future = running.aggregation
        if not future.done():
            return False
        running.aggregation = None
        now = self._clock()
        eid = experiment.id
        try:
            response: aggregator_pb2.AggregateResponse = future.result()
        except grpc.RpcError as exc:
            if exc.code() in _RETRYABLE:
                log.warning("aggregation of round %d failed (%s); retrying", decision.round, exc.details())
                running.retry_at = now + _AGGREGATE_RETRY_S
                return False
            metrics.AGGREGATIONS.labels(outcome="failed").inc()
            message = f"{exc.code().name}: {exc.details()}"
            self._feed(
                eid,
                running,
                AggregationFailed(
                    now=now, round=decision.round, message=message, aggregate_id=decision.aggregate_id or None
                ),
                lambda db: StateStore.pop_outbox(db, eid, seq),
            )
            return True
        by_task = {choice.task_id: choice for choice in decision.updates}
        accepted: list[str] = []
        rejected: dict[str, str] = {}
        for outcome in response.outcomes:
            _, _, task_id = outcome.task_id.partition(".")
            if outcome.code in (
                aggregator_pb2.UPDATE_OUTCOME_CODE_ACCEPTED,
                aggregator_pb2.UPDATE_OUTCOME_CODE_CLIPPED,
            ):
                accepted.append(task_id)
            elif task_id in by_task:
                reason = aggregator_pb2.UpdateOutcomeCode.Name(outcome.code).removeprefix(
                    "UPDATE_OUTCOME_CODE_"
                )
                rejected[task_id] = f"{reason}: {outcome.message}"

        def record(db: Any) -> None:
            StateStore.finish_round(
                db,
                eid,
                decision.round,
                version=response.version.manifest.version,
                accepted=len(accepted),
                rejected=len(rejected),
                finished_at=now,
            )
            if response.optimizer_state.version:
                StateStore.update_experiment(
                    db,
                    eid,
                    optimizer_state=f"{response.optimizer_state.model}@{response.optimizer_state.version}",
                )
            for task_id, reason in rejected.items():
                task = by_task[task_id]
                StateStore.update_task(
                    db,
                    eid,
                    task_id,
                    phase="REJECTED",
                    error_code=ErrorCode.UPDATE_REJECTED.value,
                    error_message=reason,
                )
                self._task_event(
                    db,
                    eid,
                    task_id,
                    task.site,
                    decision.round,
                    "REJECTED",
                    now,
                    code="UPDATE_REJECTED",
                    message=reason,
                )
                metrics.UPDATES_REJECTED.labels(site=task.site).inc()
            StateStore.pop_outbox(db, eid, seq)
            summary = coordinator_pb2.RoundSummary(
                round=decision.round,
                version=response.version.manifest.version,
                accepted_updates=len(accepted),
                rejected_updates=len(rejected),
            )
            summary.finished_at.CopyFrom(timestamp_at(now))
            self._event(db, eid, now, round_finished=coordinator_pb2.RoundFinished(summary=summary))

        metrics.AGGREGATIONS.labels(outcome="succeeded").inc()
        metrics.ROUNDS.labels(experiment=eid).inc()
        metrics.EXPERIMENT_ROUND.labels(experiment=eid).set(decision.round)
        metrics.ROUND_FINISHED_TIME.labels(experiment=eid).set(now)
        metrics.AGGREGATION_SECONDS.observe(response.timing.total_s)
        self._feed(
            eid,
            running,
            AggregationSucceeded(
                now=now,
                round=decision.round,
                accepted=tuple(accepted),
                rejected=rejected,
                aggregate_id=decision.aggregate_id or None,
            ),
            record,
        )
        log.info(
            "round %d aggregated into %s: %d accepted, %d rejected",
            decision.round,
            response.version.manifest.version,
            len(accepted),
            len(rejected),
        )
        return True

    def _aggregate_request(
        self, experiment: ExperimentRow, spec: ExperimentSpec, decision: Aggregate
    ) -> aggregator_pb2.AggregateRequest:
        updates = []
        for choice in decision.updates:
            metrics.UPDATE_STALENESS.observe(choice.staleness)
            task = self._state.task(experiment.id, choice.task_id)
            blob = (task.result or {}).get("update") if task is not None else None
            if blob is None:
                continue
            updates.append(
                aggregator_pb2.UpdateRef(
                    blob=common_pb2.BlobRef(
                        object_key=blob["object_key"], sha256=blob["sha256"], size_bytes=blob["size_bytes"]
                    ),
                    num_samples=choice.num_samples,
                    staleness=choice.staleness,
                    site=choice.site,
                    task_id=f"{experiment.id}.{choice.task_id}",
                )
            )
        params = struct_pb2.Struct()
        params.update(spec.algorithm.params)
        request = aggregator_pb2.AggregateRequest(
            base=common_pb2.ModelRef(model=experiment.model, version=version_id(decision.base_round)),
            updates=updates,
            algorithm=aggregator_pb2.AlgorithmSpec(name=spec.algorithm.name, params=params),
            min_accepted=decision.min_accepted,
            new_version=version_id(decision.round),
            round=decision.round,
            max_update_norm=spec.aggregation.max_update_norm,
            clip_to_norm=spec.aggregation.clip_to_norm,
            accumulate_float64=spec.aggregation.accumulate_float64,
            aliases=["latest"],
        )
        if experiment.optimizer_state:
            model, _, version = experiment.optimizer_state.partition("@")
            request.optimizer_state.CopyFrom(common_pb2.ModelRef(model=model, version=version))
        return request

    # -- dispatcher events ------------------------------------------------------------------
    def _dispatcher(self, site_name: str) -> Dispatcher:
        dispatcher = self._dispatchers.get(site_name)
        if dispatcher is None:
            site = self._state.site(site_name)
            if site is None:
                raise LookupError(f"site {site_name!r} is not registered")
            spec = SiteSpec(
                name=site.name,
                backend=site.backend,
                # The plugin's and the transfer's settings are not the backend's.
                config={k: v for k, v in without_transfer_config(site.config).items() if k != "task"},
                max_concurrent_tasks=site.max_concurrent,
                transport=site.transport,
            )
            dispatcher = make_dispatcher(spec, self._config.data_dir)
            self._dispatchers[site_name] = dispatcher
        return dispatcher

    def forget_site(self, site_name: str) -> None:
        dispatcher = self._dispatchers.pop(site_name, None)
        if dispatcher is not None:
            dispatcher.close()

    def _poll_dispatchers(self) -> bool:
        busy = False
        for name, dispatcher in list(self._dispatchers.items()):
            try:
                events = dispatcher.poll()
            except Exception as exc:
                log.warning("polling site %s failed: %s", name, exc)
                continue
            for event in events:
                with self._lock:
                    route = self._routes.get(event.task_id)
                if route is not None:
                    self._on_dispatch_event(route, event)
                    busy = True
        return busy

    def _on_dispatch_event(self, route: tuple[str, str], event: DispatchEvent) -> None:
        eid, task_id = route
        task = self._state.task(eid, task_id)
        if task is None or task.terminal:
            return  # a late result of a cancelled task, or a duplicate
        running = self._running.get(eid)
        if event.phase != "finished":
            phase = _PHASES.get(event.phase)
            if phase is None or phase == task.phase:
                return
            with self._state.transaction() as db:
                StateStore.update_task(db, eid, task_id, phase=phase)
                self._task_event(db, eid, task_id, task.site, task.round, phase, event.at)
            self._notify()
            return
        if running is None:
            return  # the experiment finished meanwhile
        result = event.result
        if result is None:
            return
        self._state.touch_site(task.site, event.at)
        metrics.SITE_LAST_SEEN.labels(site=task.site).set(event.at)
        self._record_task_metrics(task, result)
        if result.ok and result.update is not None:
            result = self._fetch_update(task, result)
        if result.ok and (task.mode == "evaluate" or result.update is not None):
            self._feed(eid, running, *self._succeeded(eid, task, result))
        else:
            self._feed(eid, running, *self._failed(eid, task, result))
        with self._lock:
            self._routes.pop(f"{eid}.{task_id}", None)

    def _succeeded(
        self, eid: str, task: TaskRow, result: TaskResultDoc
    ) -> tuple[Event, Callable[[Any], None]]:
        now = self._clock()
        evaluation = {k: v for k, v in result.metrics.items() if k.startswith("eval_")}

        def record(db: Any) -> None:
            StateStore.update_task(db, eid, task.task_id, phase="SUCCEEDED", result=_result_json(result))
            self._task_event(db, eid, task.task_id, task.site, task.round, "SUCCEEDED", now)
            self._event(
                db,
                eid,
                now,
                metrics_reported=coordinator_pb2.MetricsReported(
                    round=task.round, site=task.site, metrics=dict(result.metrics)
                ),
            )
            if evaluation and result.eval_samples:
                row = StateStore.add_evaluation(db, eid, task.base_round, evaluation, result.eval_samples)
                if row is not None:
                    for key, value in row.metrics.items():
                        metrics.EXPERIMENT_METRIC.labels(experiment=eid, metric=key).set(value)
                    self._event(
                        db,
                        eid,
                        now,
                        metrics_reported=coordinator_pb2.MetricsReported(
                            round=task.base_round, metrics=row.metrics
                        ),
                    )

        event = TaskSucceeded(
            now=now,
            task_id=task.task_id,
            site=task.site,
            num_samples=result.num_samples,
            metrics=dict(result.metrics),
        )
        return event, record

    def _failed(self, eid: str, task: TaskRow, result: TaskResultDoc) -> tuple[Event, Callable[[Any], None]]:
        now = self._clock()
        if result.error is not None:
            code, message = result.error.code, result.error.message
        else:
            code, message = ErrorCode.INVALID_RESULT, "a train task succeeded without an update"
        phase = _FAILED_PHASE.get(code, "FAILED")

        def record(db: Any) -> None:
            StateStore.update_task(
                db,
                eid,
                task.task_id,
                phase=phase,
                result=_result_json(result),
                error_code=code.value,
                error_message=message[:2000],
            )
            self._task_event(
                db, eid, task.task_id, task.site, task.round, phase, now, code=code.value, message=message
            )

        metrics.TASKS_FAILED.labels(site=task.site, code=code.value).inc()
        return TaskFailed(
            now=now, task_id=task.task_id, site=task.site, code=code.value, message=message
        ), record

    @staticmethod
    def _record_task_metrics(task: TaskRow, result: TaskResultDoc) -> None:
        timings = result.timings
        for phase, seconds in (
            ("queue", timings.queue_wait_s),
            ("download", timings.download_s),
            ("train", timings.train_s),
            ("upload", timings.upload_s),
        ):
            if seconds > 0:
                metrics.TASK_PHASE_SECONDS.labels(site=task.site, phase=phase).observe(seconds)

    # -- events for watchers ----------------------------------------------------------------
    def _event(self, db: Any, eid: str, now: float, **payload: Any) -> None:
        event = coordinator_pb2.ExperimentEvent(experiment_id=eid, **payload)
        event.time.CopyFrom(timestamp_at(now))
        StateStore.append_event(db, eid, now, event.SerializeToString())

    def _task_event(
        self,
        db: Any,
        eid: str,
        task_id: str,
        site: str,
        round_number: int,
        phase: str,
        now: float,
        *,
        code: str = "",
        message: str = "",
    ) -> None:
        changed = coordinator_pb2.TaskPhaseChanged(
            task_id=task_id,
            site=site,
            round=round_number,
            phase=coordinator_pb2.TaskPhase.Value(f"TASK_PHASE_{phase}"),
        )
        if code:
            changed.error.CopyFrom(coordinator_pb2.TaskError(code=code, message=message[:2000]))
        self._event(db, eid, now, task_phase_changed=changed)

    def _notify(self) -> None:
        with self.changed:
            self.changed.notify_all()

    def _fail(self, experiment_id: str, reason: str) -> None:
        now = self._clock()
        self._running.pop(experiment_id, None)
        with self._state.transaction() as db:
            StateStore.update_experiment(
                db, experiment_id, state="FAILED", finished_at=now, error=reason[:2000]
            )
            self._event(db, experiment_id, now, state_changed=_state_changed("FAILED", reason))
        self._notify()


def _state_changed(state: str, reason: str) -> coordinator_pb2.ExperimentStateChanged:
    return coordinator_pb2.ExperimentStateChanged(
        state=coordinator_pb2.ExperimentState.Value(f"EXPERIMENT_STATE_{state}"), reason=reason[:2000]
    )


def _drop_timer(experiment_id: str, timer_id: str) -> Callable[[Any], None]:
    def effects(db: Any) -> None:
        # A timer fires once: it leaves the table in the step that delivers it.
        StateStore.cancel_timer(db, experiment_id, timer_id)

    return effects


def _first_of_round(db: Any, eid: str, round_number: int) -> bool:
    row = db.execute(
        "SELECT COUNT(*) FROM tasks WHERE experiment_id = ? AND round = ? AND mode = 'train'",
        (eid, round_number),
    ).fetchone()
    return int(row[0]) == 1


def _result_json(result: TaskResultDoc) -> dict[str, Any]:
    data: dict[str, Any] = result.model_dump(mode="json", by_alias=True, exclude_none=True)
    return data


def _write_initial_weights(spec: ExperimentSpec, path: Path) -> None:
    # Imported here: only the coordinator process that creates round 0 needs torch and the plugin.
    from fedhpc.common.tensors import write_safetensors_file
    from fedhpc.trainer.plugins import make_initial_weights

    weights = make_initial_weights(spec.task.plugin, spec.task.hyperparameters, spec.seed)
    write_safetensors_file(path, {name: tensor.contiguous() for name, tensor in weights.items()})


def failure_result_for(result: TaskResultDoc, code: ErrorCode, message: str) -> TaskResultDoc:
    """The same result, turned into a failure (the trainer's timings and metrics kept)."""
    return result.model_copy(update={"error": TaskErrorDoc(code=code, message=message[:4096])})
