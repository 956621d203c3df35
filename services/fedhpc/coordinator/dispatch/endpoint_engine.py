"""The ``endpoint-engine`` dispatch backend: the Globus Compute endpoint engine, without the cloud.

A site is one ``globus_compute_endpoint.engines.GlobusComputeEngine`` (Parsl's
HighThroughputExecutor behind a Parsl provider: ``LocalProvider`` here, ``PBSProProvider`` or
``SlurmProvider`` on a login node) driven directly by the coordinator process. Tasks are packed
exactly as a Globus Compute endpoint receives them from the ``globus-compute`` backend -- the
function that backend registers (a source shim calling ``fedhpc.trainer.run_task``, as
``PureSourceTextInspect`` text) and the task document as ``JSONData``, packed by the SDK's
``ComputeSerializer`` into a messagepack ``Task`` -- and run by the same worker pool, launched
through the same container command (``apptainer run {options} {image} globus-compute-endpoint
python-exec parsl.executors.high_throughput.process_worker_pool ...``). Results come back as
JSON only.

The engine lives in the coordinator process: it starts (in the background) on the first
submit, is reused for every later task of the site, and stops with ``close``/``shutdown``.
Its tasks therefore do not survive the coordinator: a task reattached by a new coordinator
process finishes at once with ``TRAINER_CRASHED`` so that the strategy retries it. A running
task cannot be stopped either (Parsl's executor has no cancel): ``cancel`` and a passed
deadline finish the task for the coordinator and drop whatever it returns later.

globus-compute-endpoint and parsl are imported only here, and only when a site uses the
backend (``pip install 'fedhpc[hpc]'``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import ipaddress
import json
import os
import re
import shlex
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedhpc.common.contracts import (
    ContractError,
    ErrorCode,
    TaskResultDoc,
    TaskSpec,
    Timings,
    encode_task,
    parse_result,
)
from fedhpc.common.logging import get_logger
from fedhpc.coordinator.dispatch.base import Dispatcher, DispatchError, DispatchEvent, Phase, SiteSpec
from fedhpc.coordinator.dispatch.worker import check_task_id, error_result, validate_output

__all__ = [
    "ENGINE_RESTARTED_MESSAGE",
    "EndpointEngineDispatcher",
    "EndpointEngineSiteConfig",
    "pack_task",
    "result_from_message",
]

log = get_logger(__name__)

#: The message of a reattached task (the engine, and every task it held, ended with the
#: coordinator process that ran it).
ENGINE_RESTARTED_MESSAGE = (
    "the Globus Compute engine restarted with the coordinator: this task ran in the engine of a "
    "previous coordinator process and its result is lost"
)
# What the engine's workers accept: the function as source text and the task document as
# JSON -- no pickle either way (results come back as JSON only).
_CODE_STRATEGY = "globus_compute_sdk.serialize.PureSourceTextInspect"
_JSON_STRATEGY = "globus_compute_sdk.serialize.JSONData"
_PROVIDERS = {"local": "LocalProvider", "pbspro": "PBSProProvider", "slurm": "SlurmProvider"}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A task error's message is capped at 4096 characters; a remote traceback ends with what matters.
_MESSAGE_TAIL = 3000
# close()/shutdown() wait this long for an engine that is still starting.
_START_JOIN_S = 300.0
# Pids of the engine's helper processes, to stop those a SIGKILLed coordinator left behind.
_STATE_FILE = "engine.json"
_PATH_LOCK = threading.Lock()


class EndpointEngineSiteConfig(BaseModel):
    """``SiteSpec.config`` for an endpoint-engine site (the coordinator strips ``task``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: Literal["local", "pbspro", "slurm"] = Field(
        default="local", description="Parsl provider: LocalProvider, PBSProProvider or SlurmProvider."
    )
    provider_options: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Keyword arguments of the Parsl provider (account, queue/partition, walltime, "
            "nodes_per_block, init_blocks, min_blocks, max_blocks, worker_init, scheduler_options, "
            "launcher: a parsl.launchers class name or {type: name, ...its arguments})."
        ),
    )
    max_workers_per_node: int = Field(default=1, ge=1, le=1024, description="Trainers at once per node.")
    available_accelerators: int | list[str] | None = Field(
        default=None,
        description="GPUs per node to pin workers to (CUDA_VISIBLE_DEVICES per worker); Parsl's option.",
    )
    container_type: Literal["none", "apptainer"] = Field(
        default="none", description="Launch the worker pool inside an Apptainer image."
    )
    container_uri: str | None = Field(default=None, min_length=1, description="The image (.sif path or URI).")
    container_cmd_options: str = Field(
        default="", description="Options for `apptainer run`, e.g. '--nv -B /lus/data'."
    )
    address: str = Field(
        default="127.0.0.1",
        min_length=1,
        description="Address workers use to reach the engine's interchange (a login node's HSN address).",
    )
    encrypted: bool | None = Field(
        default=None,
        description="CurveZMQ between interchange and workers; default: on unless address is loopback.",
    )
    strategy_period_s: float = Field(
        default=5.0, gt=0, le=600, description="How often the engine's scaling strategy runs."
    )
    max_idletime_s: float = Field(
        default=120.0, ge=0, description="An idle block (batch job) is released after this long."
    )
    heartbeat_period_s: int = Field(
        default=30,
        ge=1,
        le=3600,
        description="Worker pools and the interchange heartbeat this often; a dead worker is noticed within it.",
    )
    heartbeat_threshold_s: int = Field(
        default=120,
        ge=2,
        le=86400,
        description="A worker pool silent this long is lost: its tasks fail (TRAINER_CRASHED).",
    )
    report_running: bool = Field(
        default=True,
        description="Report `running` when a worker takes a task (Parsl's monitoring channel; one more process).",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment exported in the batch job before the worker pool starts.",
    )

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not an environment variable name")
        return value

    @field_validator("container_cmd_options")
    @classmethod
    def _shell_words(cls, value: str) -> str:
        try:
            shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"cannot be split into shell words: {exc}") from exc
        return value

    @property
    def use_encryption(self) -> bool:
        if self.encrypted is not None:
            return self.encrypted
        return not _is_loopback(self.address)


class _ConfigProblem(ValueError):
    """A bad ``config`` value found while building Parsl objects; ``key`` is its dotted path."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass
class _Tracked:
    task: TaskSpec
    packed: bytes
    gc_task_id: uuid.UUID
    phase: Phase = "queued"
    engine: Any = None  # the engine it was handed to (None: waiting for the engine to start)

    @property
    def submitted(self) -> bool:
        return self.engine is not None


class EndpointEngineDispatcher(Dispatcher):
    backend = "endpoint-engine"

    def __init__(self, site: SiteSpec, run_dir: Path) -> None:
        super().__init__(site, run_dir)
        self.config = _parse_config(site)
        self.engine_dir = self.run_dir.resolve() / "endpoint-engine" / site.name
        # Build the Parsl objects once now, so that a bad provider option fails the
        # construction with its key instead of every task later.
        try:
            _make_provider(self.config, self._worker_env())
        except _ConfigProblem as exc:
            raise DispatchError(f"endpoint-engine site {site.name!r}: {exc.key}: {exc}") from exc
        except ImportError as exc:
            raise DispatchError(
                f"endpoint-engine site {site.name!r} needs globus-compute-endpoint and parsl "
                f"(pip install 'fedhpc[hpc]'): {exc}"
            ) from exc
        # Handles name this dispatcher: a task of another instance (a previous coordinator
        # process) cannot be in this one's engine.
        self._instance = uuid.uuid4().hex
        self._lock = threading.RLock()
        self._tracked: dict[str, _Tracked] = {}
        self._finished: set[str] = set()
        self._events: list[DispatchEvent] = []
        self._engine: Any = None
        self._starter: threading.Thread | None = None
        self._stoppers: list[threading.Thread] = []
        self._closing = False

    # -- the Dispatcher interface ---------------------------------------------------------------------

    def submit(self, task: TaskSpec) -> str:
        if task.site != self.site.name:
            raise DispatchError(f"task {task.task_id!r} is for site {task.site!r}, not {self.site.name!r}")
        task_id = _checked_id(task.task_id)
        with self._lock:
            if task_id in self._tracked or task_id in self._finished:
                return self._handle(task_id)
            self._closing = False  # a closed dispatcher that is used again starts a new engine
            gc_task_id = uuid.uuid4()
            tracked = _Tracked(task=task, packed=pack_task(task, gc_task_id), gc_task_id=gc_task_id)
            self._tracked[task_id] = tracked
            self._emit(task_id, "queued", time.time())
            log.info("task queued", extra={"site": self.site.name, "task": task_id})
            if self._usable_engine() is not None:
                self._hand_over(tracked)
            else:
                self._start_engine_soon()
        return self._handle(task_id)

    def reattach(self, task_id: str, handle: str) -> None:
        _checked_id(task_id)
        prefix = f"{self.backend}:{self.site.name}:"
        instance, _, handle_task = handle.removeprefix(prefix).partition(":")
        if not handle.startswith(prefix) or not instance or handle_task != task_id:
            raise DispatchError(
                f"handle {handle!r} does not belong to task {task_id!r} on endpoint-engine site {self.site.name!r}"
            )
        with self._lock:
            if task_id in self._tracked or task_id in self._finished:
                return
            # Engine futures do not outlive the process that made them: fail the task now so the
            # strategy retries it under a new id, instead of waiting for a deadline.
            result = error_result(task_id, ErrorCode.TRAINER_CRASHED, ENGINE_RESTARTED_MESSAGE)
            self._finished.add(task_id)
            self._events.append(
                DispatchEvent(task_id=task_id, phase="finished", at=time.time(), result=result)
            )
            log.warning(
                "reattached task lost with the previous engine",
                extra={"site": self.site.name, "task": task_id},
            )

    def poll(self) -> list[DispatchEvent]:
        with self._lock:
            now = time.time()
            for task_id, tracked in list(self._tracked.items()):
                deadline = tracked.task.deadline
                if deadline is not None and now > deadline:
                    if not tracked.submitted:
                        where = "the site's engine was starting; it will not run"
                    else:
                        where = "a worker was running it" if tracked.phase == "running" else "it was queued"
                        where += (
                            "; the engine cannot withdraw it, so it still runs to its end (occupying a "
                            "worker) and its result is dropped"
                        )
                    message = f"the task's deadline passed {now - deadline:.1f} s ago while {where}"
                    self._finish(task_id, _failure(tracked.task, ErrorCode.DEADLINE_EXCEEDED, message))
            self._usable_engine()  # replaces an engine whose executor gave up
            events, self._events = self._events, []
            return events

    def cancel(self, task_id: str, reason: str) -> None:
        _checked_id(task_id)
        with self._lock:
            tracked = self._tracked.get(task_id)
            if tracked is None:
                return
            # Parsl's executor cannot withdraw a task: one still waiting in the interchange runs
            # when a worker frees up, one running runs to its end. Its result is dropped.
            self._finish(
                task_id,
                _failure(
                    tracked.task,
                    ErrorCode.CANCELLED,
                    f"cancelled: {reason}"
                    + (
                        ""
                        if not tracked.submitted
                        else " (the engine cannot stop a task it "
                        "already holds: it runs to its end and its result is dropped)"
                    ),
                ),
            )
            log.info("task cancelled", extra={"site": self.site.name, "task": task_id, "reason": reason})

    def close(self) -> None:
        # The engine is a child of this process: leaving it running would orphan its
        # interchange and workers, and a new coordinator could not use them anyway.
        self._stop_engine()

    def shutdown(self) -> None:
        self._stop_engine()
        # `fedhpc down` after a coordinator was killed: its engine's processes are orphans.
        _reap_orphans(self.engine_dir)

    # -- tasks ----------------------------------------------------------------------------------------

    def _handle(self, task_id: str) -> str:
        return f"{self.backend}:{self.site.name}:{self._instance}:{task_id}"

    def _emit(self, task_id: str, phase: Phase, at: float, result: TaskResultDoc | None = None) -> None:
        self._events.append(DispatchEvent(task_id=task_id, phase=phase, at=at, result=result))

    def _finish(self, task_id: str, result: TaskResultDoc) -> None:
        """The task's one finished event (lock held); later news of it is ignored."""
        tracked = self._tracked.pop(task_id, None)
        if tracked is None:
            return
        self._finished.add(task_id)
        self._emit(task_id, "finished", time.time(), result)
        log.info(
            "task finished",
            extra={
                "site": self.site.name,
                "task": task_id,
                "code": result.error.code.value if result.error is not None else "OK",
            },
        )

    def _hand_over(self, tracked: _Tracked) -> None:
        """Submit to the running engine (lock held)."""
        from globus_compute_endpoint.engines import GCFuture  # type: ignore[import-untyped]

        task_id = tracked.task.task_id
        future = GCFuture(tracked.gc_task_id)
        if self.config.report_running:
            # The engine sets block_id when Parsl's monitoring reports the task on a worker
            # pool; the interchange hands a pool a task only when one of its workers is free.
            future.bind("block_id", functools.partial(self._on_placed, task_id, tracked.gc_task_id))
        future.add_done_callback(functools.partial(self._on_done, task_id, tracked.gc_task_id, self._engine))
        tracked.engine = self._engine
        try:
            self._engine.submit(
                future, tracked.packed, resource_specification={}, result_serializers=[_JSON_STRATEGY]
            )
        except Exception as exc:  # the engine stopped between the check and the submit
            self._finish(
                task_id,
                _failure(
                    tracked.task, ErrorCode.DISPATCH_FAILED, f"the engine refused the task: {_describe(exc)}"
                ),
            )

    def _current(self, task_id: str, gc_task_id: uuid.UUID) -> _Tracked | None:
        tracked = self._tracked.get(task_id)
        return tracked if tracked is not None and tracked.gc_task_id == gc_task_id else None

    def _on_placed(self, task_id: str, gc_task_id: uuid.UUID, _future: Any, block_id: Any) -> None:
        # Called on the engine's monitoring thread.
        with self._lock:
            tracked = self._current(task_id, gc_task_id)
            if tracked is not None and tracked.phase == "queued" and block_id is not None:
                tracked.phase = "running"
                self._emit(task_id, "running", time.time())

    def _on_done(self, task_id: str, gc_task_id: uuid.UUID, engine: Any, future: Any) -> None:
        # Called on Parsl's result thread (or, for a submission that failed at once, in submit).
        with self._lock:
            tracked = self._current(task_id, gc_task_id)
            if tracked is None:
                return  # cancelled or past its deadline: already finished
            # Parsl fails every outstanding task when its blocks keep failing to start.
            engine_failed = bool(getattr(engine.executor, "bad_state_is_set", False))
            try:
                packed = future.result()
            except Exception as exc:
                result = _failure(
                    tracked.task, ErrorCode.TRAINER_CRASHED, f"the engine lost the task: {_describe(exc)}"
                )
            else:
                result = result_from_message(tracked.task, packed, engine_failed=engine_failed)
            self._finish(task_id, result)

    # -- the engine -----------------------------------------------------------------------------------

    def _worker_env(self) -> dict[str, str]:
        return {"FEDHPC_SITE": self.site.name, **self.config.env}

    def _usable_engine(self) -> Any:
        """The running engine, or None (lock held). An engine whose executor gave up (blocks
        that fail to start, e.g. a bad image or queue) is stopped; the next submit starts a new one."""
        engine = self._engine
        if engine is None:
            return None
        if getattr(engine.executor, "bad_state_is_set", False):
            # Parsl has already failed every task it held (DISPATCH_FAILED through _on_done).
            reason = f"its executor failed: {engine.executor.executor_exception}"
        else:
            interchange = getattr(engine.executor, "interchange_proc", None)
            code = interchange.poll() if interchange is not None else None
            if code is None:
                return engine
            # Nothing in Parsl notices a dead interchange: its tasks would wait forever.
            reason = f"its interchange exited with code {code}"
            for task_id, tracked in list(self._tracked.items()):
                if tracked.engine is engine:
                    self._finish(
                        task_id,
                        _failure(
                            tracked.task,
                            ErrorCode.TRAINER_CRASHED,
                            f"the Globus Compute engine of site {self.site.name!r} lost the task: {reason}",
                        ),
                    )
        log.error(
            "the site's engine failed; a new one starts with the next task",
            extra={"site": self.site.name, "error": _tail(reason)},
        )
        self._engine = None
        self._stop_in_background(engine)
        return None

    def _start_engine_soon(self) -> None:
        """Start the engine on a thread (lock held): a batch provider's first block submission
        or a worker pool start must not stall the coordinator's loop."""
        if self._starter is not None:
            return
        self._starter = threading.Thread(
            target=self._start_engine, name=f"endpoint-engine-start-{self.site.name}", daemon=True
        )
        self._starter.start()

    def _start_engine(self) -> None:
        started = time.monotonic()
        engine: Any = None
        try:
            _reap_orphans(self.engine_dir)
            engine = self._build_engine()
            engine.start(
                endpoint_id=uuid.uuid4(), run_dir=str(self.engine_dir), monitored=self.config.report_running
            )
            _write_state(self.engine_dir, engine)
        except Exception as exc:
            log.exception("cannot start the site's engine", extra={"site": self.site.name})
            if engine is not None:
                with contextlib.suppress(Exception):
                    engine.shutdown(block=True)
            with self._lock:
                self._starter = None
                message = (
                    f"the Globus Compute engine of site {self.site.name!r} did not start: {_describe(exc)}"
                )
                for task_id, tracked in list(self._tracked.items()):
                    if not tracked.submitted:
                        self._finish(task_id, _failure(tracked.task, ErrorCode.DISPATCH_FAILED, message))
            return
        log.info(
            "engine started",
            extra={
                "site": self.site.name,
                "seconds": round(time.monotonic() - started, 3),
                "run_dir": str(self.engine_dir),
                "provider": self.config.provider,
                "container": self.config.container_type,
            },
        )
        with self._lock:
            self._starter = None
            closing = self._closing
            if not closing:
                self._engine = engine
                for tracked in list(self._tracked.values()):
                    if not tracked.submitted:
                        self._hand_over(tracked)
        if closing:  # close() or shutdown() came while it started (and waits for this thread)
            _shutdown_engine(engine, self.site.name)

    def _build_engine(self) -> Any:
        from globus_compute_endpoint.engines import GlobusComputeEngine

        _put_first_on_path(Path(sys.executable).parent)
        self.engine_dir.mkdir(parents=True, exist_ok=True)
        options: dict[str, Any] = {}
        if self.config.container_type == "apptainer":
            options.update(
                container_type="apptainer",
                container_uri=self.config.container_uri,
                container_cmd_options=self.config.container_cmd_options,
            )
        if self.config.available_accelerators is not None:
            options["available_accelerators"] = self.config.available_accelerators
        return GlobusComputeEngine(
            label=f"fedhpc-{self.site.name}",
            address=self.config.address,
            encrypted=self.config.use_encryption,
            max_workers_per_node=self.config.max_workers_per_node,
            heartbeat_period=self.config.heartbeat_period_s,
            heartbeat_threshold=self.config.heartbeat_threshold_s,
            provider=_make_provider(self.config, self._worker_env()),
            job_status_kwargs={
                "max_idletime": self.config.max_idletime_s,
                "strategy_period": self.config.strategy_period_s,
            },
            allowed_serializers=[_CODE_STRATEGY, _JSON_STRATEGY],
            working_dir=str(self.engine_dir / "tasks"),
            **options,
        )

    def _stop_in_background(self, engine: Any) -> None:
        thread = threading.Thread(
            target=_shutdown_engine, args=(engine, self.site.name), name="endpoint-engine-stop", daemon=True
        )
        self._stoppers.append(thread)
        thread.start()

    def _stop_engine(self) -> None:
        with self._lock:
            self._closing = True
            starter = self._starter
        if starter is not None:
            starter.join(_START_JOIN_S)
        with self._lock:
            engine, self._engine = self._engine, None
            stoppers, self._stoppers = self._stoppers, []
            self._tracked.clear()
            self._events.clear()
        if engine is not None:
            _shutdown_engine(engine, self.site.name)
            with contextlib.suppress(OSError):
                (self.engine_dir / _STATE_FILE).unlink()
        for thread in stoppers:
            thread.join(_START_JOIN_S)


# -- packing and results ------------------------------------------------------------------------------


def pack_task(task: TaskSpec, gc_task_id: uuid.UUID) -> bytes:
    """The messagepack ``Task`` a Globus Compute endpoint gets when the ``globus-compute``
    backend submits ``task``: the function it registers -- source text that imports and calls
    ``fedhpc.trainer.run_task`` from the site's image (the service stores source registered with
    ``register_source_code`` as ``PureSourceTextInspect`` text) -- and the task document as its one
    ``JSONData`` argument. Sharing that shim means these tests run the very function the Globus
    service would hand a real endpoint."""
    from globus_compute_common import messagepack
    from globus_compute_sdk.serialize import ComputeSerializer, JSONData, PureSourceTextInspect

    from fedhpc.coordinator.dispatch.globus_compute import FUNCTION_NAME, FUNCTION_SOURCE

    serde = ComputeSerializer(strategy_data=JSONData())  # type: ignore[no-untyped-call]
    function = f"{PureSourceTextInspect.identifier}{FUNCTION_NAME}:{FUNCTION_SOURCE}"
    buffer = serde.pack_buffers(
        [function, serde.serialize([json.loads(encode_task(task))]), serde.serialize({})]
    )
    packed: bytes = messagepack.pack(messagepack.message_types.Task(task_id=gc_task_id, task_buffer=buffer))
    return packed


def result_from_message(task: TaskSpec, packed: bytes, *, engine_failed: bool = False) -> TaskResultDoc:
    """The result document for the engine's messagepack ``Result`` of ``task``.

    A remote exception is ``TRAINER_CRASHED`` (``DISPATCH_FAILED`` when the engine itself
    failed, e.g. its blocks cannot start), a result over Globus Compute's size limit
    ``RESULT_TOO_LARGE``; a returned document is checked like any trainer output (64 KB,
    the contract, the task id)."""
    from globus_compute_common import messagepack
    from globus_compute_common.messagepack.message_types import Result
    from globus_compute_sdk.serialize import JSONData

    timings = Timings(dispatched_at=task.dispatched_at)
    try:
        message = messagepack.unpack(packed)
    except Exception as exc:
        return _failure(
            task, ErrorCode.INVALID_RESULT, f"the engine returned an unreadable message: {_describe(exc)}"
        )
    if not isinstance(message, Result):
        return _failure(
            task, ErrorCode.INVALID_RESULT, f"the engine returned a {type(message).__name__}, not a Result"
        )
    data = message.data if isinstance(message.data, str) else str(message.data)
    if message.is_error:
        code = message.error_details.code if message.error_details is not None else ""
        # The engine frames remote tracebacks with rules of '+' and '-'; they only take room.
        text = _tail("\n".join(line for line in data.strip().splitlines() if line.strip("+-")))
        if code == "MaxResultSizeExceeded":
            return _failure(
                task, ErrorCode.RESULT_TOO_LARGE, f"the trainer's result was refused by the worker: {text}"
            )
        if engine_failed:
            return _failure(task, ErrorCode.DISPATCH_FAILED, f"the site's engine failed: {text}")
        return _failure(task, ErrorCode.TRAINER_CRASHED, f"the task failed on the worker: {text}")
    if not data.startswith(JSONData.identifier):
        return _failure(
            task,
            ErrorCode.INVALID_RESULT,
            f"the worker's result is not JSON data (serializer header {data[:3]!r})",
        )
    raw = data[len(JSONData.identifier) :].encode()
    try:
        return parse_result(validate_output(task.task_id, raw, timings))
    except ContractError as exc:  # validate_output returns valid documents; keep the poll safe anyway
        return _failure(task, ErrorCode.INVALID_RESULT, str(exc))


def _failure(task: TaskSpec, code: ErrorCode, message: str) -> TaskResultDoc:
    return error_result(task.task_id, code, message, Timings(dispatched_at=task.dispatched_at))


def _tail(text: str) -> str:
    return text if len(text) <= _MESSAGE_TAIL else "..." + text[-_MESSAGE_TAIL:]


def _describe(exc: BaseException) -> str:
    return _tail(f"{type(exc).__name__}: {exc}")


# -- Parsl objects ------------------------------------------------------------------------------------


def _integral(value: Any) -> Any:
    """Whole floats as ints, recursively: site configs arrive through protobuf Structs, whose
    numbers are all doubles, and Parsl wants ``init_blocks=1``, not ``1.0``."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def _make_launcher(spec: Any) -> Any:
    import parsl.launchers

    key = "config.provider_options.launcher"
    if isinstance(spec, str):
        name, kwargs = spec, {}
    elif isinstance(spec, dict) and isinstance(spec.get("type"), str):
        name, kwargs = spec["type"], {k: v for k, v in spec.items() if k != "type"}
    else:
        raise _ConfigProblem(key, "must be a parsl.launchers class name or {type: name, ...arguments}")
    known = sorted(n for n in dir(parsl.launchers) if n.endswith("Launcher") and n != "Launcher")
    if name not in known:
        raise _ConfigProblem(key, f"unknown launcher {name!r}; known: {', '.join(known)}")
    try:
        return getattr(parsl.launchers, name)(**kwargs)
    except (TypeError, ValueError) as exc:
        raise _ConfigProblem(key, f"{name}: {exc}") from exc


def _make_provider(config: EndpointEngineSiteConfig, env: dict[str, str]) -> Any:
    """A new Parsl provider (one per engine start: providers keep their jobs' state)."""
    import parsl.providers

    cls = getattr(parsl.providers, _PROVIDERS[config.provider])
    accepted = [name for name in inspect.signature(cls).parameters if name != "self"]
    options = _integral(dict(config.provider_options))
    for key in options:
        if key not in accepted:
            raise _ConfigProblem(
                f"config.provider_options.{key}",
                f"not an option of parsl's {cls.__name__}; options: {', '.join(accepted)}",
            )
    if "launcher" in options:
        options["launcher"] = _make_launcher(options["launcher"])
    worker_init = options.get("worker_init", "")
    if not isinstance(worker_init, str):
        raise _ConfigProblem("config.provider_options.worker_init", "must be a string of shell commands")
    # Exported first, so a site's own worker_init (module load, conda activate) can use them.
    exports = "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items())
    options["worker_init"] = exports + worker_init
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise _ConfigProblem("config.provider_options", f"{cls.__name__}: {exc}") from exc


def _shutdown_engine(engine: Any, site: str) -> None:
    try:
        # Scales in every block (LocalProvider kills the pool's process group; batch providers
        # cancel the jobs), then stops the interchange.
        engine.shutdown(block=True)
    except Exception:
        log.exception("stopping the site's engine failed", extra={"site": site})
    else:
        log.info("engine stopped", extra={"site": site})


def _put_first_on_path(directory: Path) -> None:
    # Parsl starts the interchange (and LocalProvider the worker pool) as
    # `globus-compute-endpoint python-exec ...` through PATH, with this process's environment
    # and no hook for another; the engine must find this interpreter's entry point.
    with _PATH_LOCK:
        parts = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p]
        if not parts or parts[0] != str(directory):
            os.environ["PATH"] = os.pathsep.join([str(directory), *parts])


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


# -- helper processes a killed coordinator leaves behind ----------------------------------------------


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22: start time in clock ticks since boot


def _write_state(engine_dir: Path, engine: Any) -> None:
    executor = engine.executor
    pids = [getattr(executor.interchange_proc, "pid", None)]
    monitoring = getattr(executor, "zmq_monitoring", None)
    pids.append(getattr(getattr(monitoring, "process", None), "pid", None))
    processes = [{"pid": pid, "start": _start_time(pid)} for pid in pids if isinstance(pid, int)]
    state = {"coordinator": {"pid": os.getpid(), "start": _start_time(os.getpid())}, "processes": processes}
    tmp = engine_dir / f".{_STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, engine_dir / _STATE_FILE)


def _reap_orphans(engine_dir: Path) -> None:
    """Stop the interchange and monitoring router of an engine whose coordinator died without
    stopping them (SIGKILL); its worker pools exit on their own once the interchange is gone."""
    try:
        state = json.loads((engine_dir / _STATE_FILE).read_text())
        owner = state["coordinator"]
        processes = [(int(p["pid"]), p["start"]) for p in state["processes"]]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if _start_time(int(owner["pid"])) == owner["start"] and owner["start"] is not None:
        return  # its coordinator still runs (another process on the same run directory)
    for pid, start in processes:
        if start is not None and _start_time(pid) == start:
            log.warning("stopping an engine process a previous coordinator left behind", extra={"pid": pid})
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(OSError):
        (engine_dir / _STATE_FILE).unlink()


# -- config and ids -----------------------------------------------------------------------------------


def _parse_config(site: SiteSpec) -> EndpointEngineSiteConfig:
    try:
        config = EndpointEngineSiteConfig.model_validate(site.config)
    except ValidationError as exc:
        problems = "; ".join(
            f"config.{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise DispatchError(f"endpoint-engine site {site.name!r}: {problems}") from exc
    # Cross-field rules, checked here so that the message names the key to fix.
    problem = None
    if config.container_type == "apptainer" and config.container_uri is None:
        problem = "config.container_uri: required when container_type is apptainer"
    elif config.container_type == "none" and config.container_uri is not None:
        problem = "config.container_uri: only used with container_type: apptainer"
    elif config.container_type == "none" and config.container_cmd_options:
        problem = "config.container_cmd_options: only used with container_type: apptainer"
    elif config.heartbeat_threshold_s <= config.heartbeat_period_s:
        problem = "config.heartbeat_threshold_s: must be longer than heartbeat_period_s"
    if problem is not None:
        raise DispatchError(f"endpoint-engine site {site.name!r}: {problem}")
    return config


def _checked_id(task_id: str) -> str:
    try:
        return check_task_id(task_id)
    except ValueError as exc:
        raise DispatchError(str(exc)) from exc
