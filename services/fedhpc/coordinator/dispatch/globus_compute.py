"""The ``globus-compute`` dispatch backend: tasks run at HPC sites through the Globus Compute service.

A site names a Globus Compute endpoint (``endpoint_id``, and for a multi-user endpoint the
``user_endpoint_config`` its template takes: account, queue, walltime, nodes, ...). The trainer
code is baked into the site's container image, so what is registered with Globus Compute is a
three-line source shim that imports and calls ``fedhpc.trainer.run_task``; it is registered once
per run directory and its function id is kept in ``<run_dir>/globus-compute/function.json``.

Only JSON travels: the task document goes out as the one argument with ``JSONData`` data
serialization, the endpoint is asked to serialize the result with ``JSONData``, and the result is
deserialized by a serializer whose allowlist holds nothing but ``JSONData`` (and a source-text
code strategy), so a pickled (dill) result is refused without being loaded.

Task bookkeeping lives in ``<run_dir>/globus-compute/<site>.json`` (task id -> Globus task id,
task group, submit time, deadline, last phase) and ``<run_dir>/globus-compute/<site>/results/``
(one result document per finished task, written once). A restarted coordinator reattaches with
``Executor.reload_tasks(task_group_id)``.

Phases: Globus Compute reports task states only through its HTTP status API, which this backend
polls every ``status_poll_s`` (``received``, ``waiting-for-ep``, ``waiting-for-nodes``,
``waiting-for-launch`` -> ``queued``; ``running``, ``execution-start`` -> ``running``). The
trainer's own phases (downloading, training, ...) are not visible through Globus Compute.

SDK objects are typed ``Any`` here: globus-compute-sdk 4.19 is mostly unannotated. The few
private SDK attributes this module touches are named where they are used; the SDK is pinned
(``fedhpc[hpc]``: ``globus-compute-sdk==4.19.0``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import textwrap
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

import fedhpc
from fedhpc.common.contracts import (
    ContractError,
    ErrorCode,
    TaskResultDoc,
    TaskSpec,
    Timings,
    encode_result,
    encode_task,
    parse_result,
)
from fedhpc.common.logging import get_logger
from fedhpc.coordinator.dispatch.base import Dispatcher, DispatchError, DispatchEvent, Phase, SiteSpec
from fedhpc.coordinator.dispatch.worker import check_task_id, error_result, validate_output

__all__ = [
    "CLIENT_ID_ENV",
    "CLIENT_SECRET_ENV",
    "FUNCTION_NAME",
    "FUNCTION_SOURCE",
    "GLOBUS_PHASES",
    "GlobusComputeDispatcher",
    "GlobusComputeSiteConfig",
    "function_key",
]

log = get_logger(__name__)

CLIENT_ID_ENV = "GLOBUS_COMPUTE_CLIENT_ID"
CLIENT_SECRET_ENV = "GLOBUS_COMPUTE_CLIENT_SECRET"

#: What is registered with Globus Compute: source text, not a pickle. The trainer code is in the
#: site's image (pinned with the coordinator), so the function only has to find it there.
FUNCTION_NAME = "fedhpc_run_task"
FUNCTION_SOURCE = textwrap.dedent(
    '''\
    def fedhpc_run_task(task):
        """fedhpc.trainer.run_task from the site's image: a task document in, a result document out."""
        from fedhpc.trainer import run_task

        return run_task(task)
    '''
)
_ENTRY_POINT = "fedhpc.trainer:run_task"

#: Globus Compute task states (``globus_compute_common.tasks.TaskState``) and the fedhpc phase
#: each one means. States not listed (success, failed, result-*) end a task through its result.
GLOBUS_PHASES: dict[str, Phase] = {
    "received": "queued",
    "waiting-for-ep": "queued",
    "waiting-for-nodes": "queued",
    "waiting-for-launch": "queued",
    "execution-start": "running",
    "running": "running",
}

# Globus Compute refuses a task whose arguments exceed 10 MB; leave room for the request around it.
_GLOBUS_ARGUMENT_CAP = 10 * 1000 * 1000
_MAX_TASK_BYTES_LIMIT = 9 * 1000 * 1000
_DEFAULT_MAX_TASK_BYTES = 1024 * 1024
_STATE_SCHEMA = "fedhpc.globus-compute.site/v1"
_FUNCTIONS_SCHEMA = "fedhpc.globus-compute.functions/v1"
# The service answers status queries for at most this many tasks per request (as the SDK batches).
_STATUS_BATCH = 128
# A failed reload (network, service hiccup) is retried with this backoff, doubling up to the cap.
_RELOAD_BACKOFF_S = 5.0
_RELOAD_BACKOFF_MAX_S = 300.0
# close() waits this long for a batch the SDK is sending right now, so its Globus task ids are
# persisted; and this long for a status/reload pass in flight.
_SUBMITTER_JOIN_S = 30.0
_SYNC_JOIN_S = 10.0
_REMOTE_TEXT_CHARS = 3000


class GlobusComputeSiteConfig(BaseModel):
    """``SiteSpec.config`` for a globus-compute site."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_id: uuid.UUID = Field(description="The Globus Compute endpoint that runs this site's tasks.")
    user_endpoint_config: dict[str, Any] = Field(
        default_factory=dict,
        description="Values for a multi-user endpoint's config template (account, queue, walltime, nodes, ...).",
    )
    function_id: uuid.UUID | None = Field(
        default=None,
        description="A function id registered (and allowed on the endpoint) beforehand; default: register once.",
    )
    amqp_port: Literal[443, 5671, 5672] | None = Field(
        default=None, description="Port for the result stream (AMQP); default: what the service says (443)."
    )
    max_task_bytes: int = Field(
        default=_DEFAULT_MAX_TASK_BYTES,
        ge=1024,
        le=_MAX_TASK_BYTES_LIMIT,
        description="Largest task document (JSON bytes) sent; Globus Compute's own cap is 10 MB.",
    )
    status_poll_s: float | None = Field(
        default=30.0,
        gt=0,
        description="How often task states are asked over HTTP (phases, and results the result stream lost); "
        "null: never.",
    )

    @field_validator("user_endpoint_config")
    @classmethod
    def _json_only(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"must be JSON (strings, numbers, booleans, lists, objects): {exc}") from exc
        return value


def _parse_config(site: SiteSpec) -> GlobusComputeSiteConfig:
    try:
        return GlobusComputeSiteConfig.model_validate(site.config)
    except ValidationError as exc:
        problems = "; ".join(
            f"config.{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise DispatchError(f"globus-compute site {site.name!r}: {problems}") from exc


def _credentials(site: str, endpoint_id: uuid.UUID) -> tuple[str, str]:
    """The confidential client's id and secret, or a DispatchError saying what to set."""
    client_id = os.environ.get(CLIENT_ID_ENV, "").strip()
    secret = os.environ.get(CLIENT_SECRET_ENV, "").strip()
    missing = [name for name, value in ((CLIENT_ID_ENV, client_id), (CLIENT_SECRET_ENV, secret)) if not value]
    if missing:
        raise DispatchError(
            f"globus-compute site {site!r}: {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
            f"not set. The coordinator authenticates to Globus Compute without a browser: set "
            f"{CLIENT_ID_ENV} and {CLIENT_SECRET_ENV} to the client id and secret of a Globus "
            f"confidential client (a service identity registered at app.globus.org/settings/developers) "
            f"that may use endpoint {endpoint_id}"
        )
    return client_id, secret


def _environment() -> str:
    # Function ids and task groups exist in one Globus environment only.
    return os.environ.get("GLOBUS_SDK_ENVIRONMENT", "production")


def function_key(client_id: str) -> str:
    """What a registered function id is valid for: the shim and fedhpc version (a new version
    registers again), the Globus environment, and the identity that owns the function."""
    source = hashlib.sha256(f"{FUNCTION_NAME}\n{FUNCTION_SOURCE}".encode()).hexdigest()[:16]
    return f"{_ENTRY_POINT}@{fedhpc.__version__}+{source}/{_environment()}/{client_id}"


# -- files -------------------------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes) -> None:
    # fsync: these files are what a coordinator on a rebooted VM re-attaches from.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise DispatchError(f"{path} is not readable JSON ({exc}); move it aside to start afresh") from exc
    if not isinstance(data, dict):
        raise DispatchError(f"{path} does not hold a JSON object; move it aside to start afresh")
    return data


_FUNCTION_LOCKS: dict[Path, threading.Lock] = {}
_FUNCTION_LOCKS_GUARD = threading.Lock()


def _function_id(run_dir: Path, key: str, register: Callable[[], str]) -> str:
    """The function id for ``key`` from ``function.json``, registering (once) when there is none."""
    path = run_dir / "globus-compute" / "function.json"
    with _FUNCTION_LOCKS_GUARD:
        lock = _FUNCTION_LOCKS.setdefault(path, threading.Lock())
    # Held across the registration so that two sites starting together register once.
    with lock:
        functions = _read_json(path).get("functions", {})
        entry = functions.get(key)
        if isinstance(entry, dict) and isinstance(entry.get("function_id"), str):
            return str(entry["function_id"])
        function_id = str(register())
        functions[key] = {
            "function_id": function_id,
            "entry_point": _ENTRY_POINT,
            "fedhpc_version": fedhpc.__version__,
            "environment": _environment(),
            "registered_at": time.time(),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        document = {"schema": _FUNCTIONS_SCHEMA, "functions": functions}
        _atomic_write(path, json.dumps(document, indent=1, sort_keys=True).encode())
        log.info("registered the trainer with Globus Compute", extra={"function_id": function_id, "key": key})
        return function_id


class _SiteState:
    """``<site>.json`` and the site's result files, shared by every dispatcher of the site in this
    process (a closed dispatcher's late callbacks and its successor write the same object)."""

    _instances: ClassVar[weakref.WeakValueDictionary[Path, _SiteState]] = weakref.WeakValueDictionary()
    _guard = threading.Lock()

    def __init__(self, path: Path, site: str) -> None:
        self.path = path
        self.site = site
        self.results = path.with_suffix("") / "results"
        self.results.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        tasks = _read_json(path).get("tasks", {})
        self.tasks: dict[str, dict[str, Any]] = tasks if isinstance(tasks, dict) else {}

    @classmethod
    def open(cls, path: Path, site: str) -> _SiteState:
        with cls._guard:
            state = cls._instances.get(path)
            if state is None:
                state = cls(path, site)
                cls._instances[path] = state
            return state

    def get(self, task_id: str) -> dict[str, Any] | None:
        with self.lock:
            record = self.tasks.get(task_id)
            return dict(record) if isinstance(record, dict) else None

    def put(self, task_id: str, record: dict[str, Any]) -> None:
        with self.lock:
            self.tasks[task_id] = dict(record)
            self._save()

    def update(self, task_id: str, **fields: Any) -> None:
        with self.lock:
            record = self.tasks.get(task_id)
            if not isinstance(record, dict):
                return
            changed = {k: v for k, v in fields.items() if record.get(k) != v}
            if changed:
                record.update(changed)
                self._save()

    def _save(self) -> None:
        groups = sorted({r["task_group_id"] for r in self.tasks.values() if r.get("task_group_id")})
        document = {"schema": _STATE_SCHEMA, "site": self.site, "task_groups": groups, "tasks": self.tasks}
        _atomic_write(self.path, json.dumps(document, indent=1, sort_keys=True).encode())

    def result_path(self, task_id: str) -> Path:
        return self.results / f"{task_id}.json"

    def read_result(self, task_id: str) -> str | None:
        try:
            return self.result_path(task_id).read_text()
        except FileNotFoundError:
            return None

    def store_result(self, task_id: str, text: str) -> str:
        """Store a task's result unless one is stored already; return the stored one (the first
        writer wins, so a late trainer result never replaces CANCELLED or DEADLINE_EXCEEDED)."""
        final = self.result_path(task_id)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with tmp.open("w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, final)
        except FileExistsError:
            return final.read_text()
        finally:
            tmp.unlink(missing_ok=True)
        return text


# -- the Globus Compute side -------------------------------------------------------------------------


def _serializer() -> Any:
    from globus_compute_sdk.serialize import ComputeSerializer, JSONData, PureSourceTextInspect

    # The allowlist is what keeps pickles out: a dill payload coming back fails to deserialize
    # instead of being loaded. (The SDK requires one code strategy in it; we never receive code.)
    return ComputeSerializer(
        strategy_code=PureSourceTextInspect(),
        strategy_data=JSONData(),  # type: ignore[no-untyped-call]
        allowed_deserializer_types=[PureSourceTextInspect, JSONData],
    )


def _make_client(client_id: str, secret: str) -> Any:
    """A Compute client authenticated as the confidential client. Tokens stay in memory: a client
    identity can always get new ones, and nothing secret is written to disk (the control-plane
    image runs with a read-only root filesystem)."""
    import globus_sdk
    from globus_compute_sdk import Client
    from globus_compute_sdk.serialize import JSONData, PureSourceTextInspect

    app = globus_sdk.ClientApp(
        app_name="fedhpc-coordinator",
        client_id=client_id,
        client_secret=secret,
        config=globus_sdk.GlobusAppConfig(token_storage="memory"),
    )
    client = Client(
        app=app,
        code_serialization_strategy=PureSourceTextInspect(),
        data_serialization_strategy=JSONData(),  # type: ignore[no-untyped-call]
    )
    client.fx_serializer = _serializer()
    return client


@functools.cache
def _executor_class() -> Any:
    from globus_compute_sdk import Executor

    class _AckingExecutor(Executor):
        """An Executor that says when the service has accepted a batch (the futures then carry
        their Globus task ids), so that the ids are on disk before anything else can go wrong."""

        fedhpc_on_ack: Callable[[list[Any]], None] | None = None

        def _submit_tasks(self, *args: Any, **kwargs: Any) -> None:
            try:
                super()._submit_tasks(*args, **kwargs)
            finally:
                # SDK 4.19: _submit_tasks(tg, endpoint, resource_spec, uep_config, result_serde,
                # futs, tasks). poll() also picks the ids up, should this hook ever go quiet.
                futures = kwargs.get("futs", args[5] if len(args) > 5 else [])
                hook = self.fedhpc_on_ack
                if hook is not None:
                    try:
                        hook(list(futures))
                    except Exception:
                        log.exception("recording Globus Compute task ids failed")

    return _AckingExecutor


def _is_permanent(exc: BaseException) -> bool:
    """A Globus API refusal that asking again will not change (unknown or forbidden task group)."""
    status = getattr(exc, "http_status", None)
    return isinstance(status, int) and status in (400, 401, 403, 404, 410)


class _Channel:
    """One ``Executor`` (and its Globus client) per endpoint and user-endpoint config, shared by
    every site of this coordinator that uses them."""

    def __init__(self, key: tuple[str, ...], config: GlobusComputeSiteConfig, credentials: tuple[str, str]):
        self.key = key
        self.config = config
        self.credentials = credentials
        self.refs = 0
        self.client: Any = None
        self.executor: Any = None
        self._executors: list[Any] = []
        self._start_lock = threading.Lock()  # creating the client: HTTP under it
        self._reload_lock = threading.Lock()  # reloads: HTTP under it
        self._lock = threading.Lock()  # futures, owners: never held while calling out
        self.futures: dict[str, Future[Any]] = {}  # Globus task id -> future
        self.task_groups: set[str] = set()
        self._reloaded: set[str] = set()
        self._owners: dict[int, Callable[[Future[Any]], None]] = {}

    def start(self) -> None:
        """Create the client and executor (HTTP: a token, the service's version check)."""
        if self.executor is not None:
            return
        with self._start_lock:
            if self.executor is None:
                self.client = _make_client(*self.credentials)
                self.executor = self._new_executor(task_group_id=None)

    def _new_executor(self, task_group_id: str | None) -> Any:
        executor = _executor_class()(
            endpoint_id=str(self.config.endpoint_id),
            client=self.client,
            user_endpoint_config=dict(self.config.user_endpoint_config) or None,
            amqp_port=self.config.amqp_port,
            result_serializers=["globus_compute_sdk.serialize.JSONData"],
            label=f"fedhpc:{self.config.endpoint_id}",
        )
        # The SDK hands a new Executor the last task group any Executor used; a channel keeps its
        # own (a new one from the service, or the one reloaded), so that shutting one channel's
        # result stream down never touches another's.
        executor.task_group_id = task_group_id
        executor.fedhpc_on_ack = self._on_ack
        self._executors.append(executor)
        return executor

    def submit(
        self, function_id: str, task: dict[str, Any], on_ack: Callable[[Future[Any]], None]
    ) -> Future[Any]:
        with self._lock:
            if getattr(self.executor, "_stopped", False):
                # A failed batch stops an SDK Executor for good; the next task gets a new one.
                previous = self.executor.task_group_id
                self.executor = self._new_executor(str(previous) if previous else None)
            future: Future[Any] = self.executor.submit_to_registered_function(function_id, args=(task,))
            self._owners[id(future)] = on_ack
            return future

    def _on_ack(self, futures: list[Any]) -> None:
        acked: list[tuple[Callable[[Future[Any]], None], Future[Any]]] = []
        with self._lock:
            for future in futures:
                group = future._metadata.get("task_group_uuid")
                if group:
                    self.task_groups.add(str(group))
                if future.task_id:
                    self.futures[str(future.task_id)] = future
                owner = self._owners.pop(id(future), None)
                if owner is not None:
                    acked.append((owner, future))
        for owner, future in acked:
            owner(future)

    def lookup(self, globus_task_id: str) -> Future[Any] | None:
        with self._lock:
            return self.futures.get(globus_task_id)

    def forget(self, globus_task_id: str) -> None:
        """Drop a settled task's future (its result is on disk now)."""
        with self._lock:
            self.futures.pop(globus_task_id, None)

    def reload(self, task_group_id: str) -> None:
        """Futures for every task of a task group (``Executor.reload_tasks``), once per group:
        finished tasks come back done, pending ones are watched on the result stream."""
        with self._reload_lock:
            if task_group_id in self._reloaded:
                return
            executor = self.executor
            current = executor.task_group_id
            futures = list(executor.reload_tasks(task_group_id))
            # reload_tasks also makes the reloaded group the one new tasks go to; keep new tasks
            # in this process's own group, so that the next restart reloads only the groups of
            # recent processes, not every task the run directory ever saw.
            executor.task_group_id = current
            with self._lock:
                self.task_groups.add(task_group_id)
                for future in futures:
                    if future.task_id:
                        self.futures.setdefault(str(future.task_id), future)
            self._reloaded.add(task_group_id)

    def task_status(self, globus_task_ids: list[str]) -> dict[str, Any]:
        """The service's status documents for these tasks (``POST /v2/batch_status``)."""
        client = self.client
        # The Client's own web client and request lock (private in SDK 4.19): its session is not
        # meant to be used by two threads at once.
        with client._request_lock:
            response = client._compute_web_client.v2.get_task_batch(globus_task_ids)
        results = response.data.get("results", {}) if isinstance(response.data, dict) else {}
        return results if isinstance(results, dict) else {}

    def stop(self) -> None:
        """Stop the executors and result streams without waiting for results: the tasks go on
        at the site and a later coordinator reattaches to them."""
        groups = set(self.task_groups)
        for executor in self._executors:
            executor.shutdown(wait=False)  # tasks already handed to it are still sent
            # Let a batch in flight finish, so its task ids reach the site state (private: 4.19).
            submitter = getattr(executor, "_task_submitter", None)
            if isinstance(submitter, threading.Thread) and submitter is not threading.current_thread():
                submitter.join(_SUBMITTER_JOIN_S)
            if executor.task_group_id:
                groups.add(str(executor.task_group_id))
        from globus_compute_sdk.sdk import executor as sdk_executor

        # Executor.shutdown leaves the result stream (one per task group) running until its
        # futures complete; ours are no longer anyone's concern in this process.
        watchers = getattr(sdk_executor, "_RESULT_WATCHERS", {})
        for group in groups:
            watcher = watchers.get(uuid.UUID(group))
            if watcher is not None:
                watcher.shutdown(wait=False, cancel_futures=True)


_CHANNELS: dict[tuple[str, ...], _Channel] = {}
_CHANNELS_GUARD = threading.Lock()


def _acquire_channel(
    run_dir: Path, config: GlobusComputeSiteConfig, credentials: tuple[str, str]
) -> _Channel:
    # Keyed by run directory too: one coordinator has one; tests run several in one process.
    key = (
        str(run_dir),
        str(config.endpoint_id),
        json.dumps(config.user_endpoint_config, sort_keys=True),
        str(config.amqp_port),
        credentials[0],
    )
    with _CHANNELS_GUARD:
        channel = _CHANNELS.get(key)
        if channel is None:
            channel = _CHANNELS[key] = _Channel(key, config, credentials)
        channel.refs += 1
        return channel


def _release_channel(channel: _Channel) -> None:
    with _CHANNELS_GUARD:
        channel.refs -= 1
        if channel.refs > 0:
            return
        _CHANNELS.pop(channel.key, None)
    channel.stop()


# -- results -----------------------------------------------------------------------------------------


def _result_from_value(task_id: str, value: Any, timings: Timings) -> TaskResultDoc:
    """The trainer's returned value as a checked result document (size, contract, task id)."""
    if not isinstance(value, dict):
        message = f"the trainer returned {type(value).__name__}, not a JSON object"
        return error_result(task_id, ErrorCode.INVALID_RESULT, message, timings)
    try:
        raw = json.dumps(value, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        return error_result(
            task_id, ErrorCode.INVALID_RESULT, f"the trainer's result is not JSON: {exc}", timings
        )
    return _parse_stored(task_id, validate_output(task_id, raw, timings))


def _parse_stored(task_id: str, text: str) -> TaskResultDoc:
    try:
        return parse_result(text)
    except ContractError as exc:  # a hand-edited result file must not crash the poll
        return error_result(task_id, ErrorCode.INVALID_RESULT, str(exc))


def _is_decode_failure(exc: BaseException) -> bool:
    """Whether the SDK failed to deserialize a result (rather than the task failing): the result
    stream wraps the error as "Malformed or unexpected data structure", reload_tasks as a
    TaskExecutionFailed; either way the cause is a SerdeError (a strategy the allowlist refuses,
    a bad header) or a ValueError (JSON that does not parse)."""
    from globus_compute_sdk.errors import SerdeError

    cause = exc.__cause__
    return (
        isinstance(exc, SerdeError)
        or isinstance(cause, SerdeError | ValueError)
        or str(exc).startswith("Malformed or unexpected data structure")
    )


def _remote_failure(task_id: str, text: str, timings: Timings) -> TaskResultDoc:
    text = text.strip()
    if "MaxResultSizeExceeded" in text:
        code = ErrorCode.RESULT_TOO_LARGE
        message = "the endpoint refused the trainer's result as too large"
    else:
        code = ErrorCode.TRAINER_CRASHED
        message = "the task raised at the site"
    tail = text[-_REMOTE_TEXT_CHARS:]
    return error_result(task_id, code, f"{message}:\n{tail}" if tail else message, timings)


def _future_outcome(task_id: str, future: Future[Any], timings: Timings) -> TaskResultDoc | None:
    """What a completed (not cancelled) future means for the task; None when the task is still
    out there but the result stream that would have brought its result failed."""
    from globus_compute_sdk.errors import TaskExecutionFailed

    exc = future.exception()
    if exc is None:
        return _result_from_value(task_id, future.result(), timings)
    if getattr(future, "task_id", None) is None:
        # Never acknowledged: the service refused the batch (auth, endpoint, function, quota).
        message = f"Globus Compute did not accept the task: {exc!r}"[:_REMOTE_TEXT_CHARS]
        return error_result(task_id, ErrorCode.DISPATCH_FAILED, message, timings)
    if _is_decode_failure(exc):
        cause = exc.__cause__ or exc
        message = f"the trainer's result is not JSON-serialized data: {cause!r}"[:_REMOTE_TEXT_CHARS]
        return error_result(task_id, ErrorCode.INVALID_RESULT, message, timings)
    if isinstance(exc, TaskExecutionFailed):
        return _remote_failure(task_id, str(exc.remote_data), timings)
    # Anything else (the result stream gave up: "SDK thread quit unexpectedly", AMQP errors)
    # says nothing about the task, which the service accepted and may still be running.
    return None


def _decode_status_result(
    task_id: str, serializer: Any, doc: dict[str, Any], timings: Timings
) -> TaskResultDoc:
    """A completed task's status document (``/v2/batch_status``) as a result document."""
    if doc.get("status") == "success" and "result" in doc:
        try:
            value = serializer.deserialize(doc["result"])
        except Exception as exc:
            message = f"the trainer's result is not JSON-serialized data: {exc!r}"[:_REMOTE_TEXT_CHARS]
            return error_result(task_id, ErrorCode.INVALID_RESULT, message, timings)
        return _result_from_value(task_id, value, timings)
    return _remote_failure(task_id, str(doc.get("exception") or doc.get("reason") or ""), timings)


# -- the dispatcher ----------------------------------------------------------------------------------


@dataclass
class _Tracked:
    task_id: str
    phase: Phase
    dispatched_at: float
    deadline: float | None
    globus_task_id: str | None = None
    task_group_id: str | None = None
    future: Future[Any] | None = None

    @property
    def timings(self) -> Timings:
        return Timings(dispatched_at=self.dispatched_at)


class GlobusComputeDispatcher(Dispatcher):
    """Runs a site's tasks on its Globus Compute endpoint (see the module docstring)."""

    backend = "globus-compute"

    def __init__(self, site: SiteSpec, run_dir: Path) -> None:
        super().__init__(site, run_dir)
        self.config = _parse_config(site)
        self.state_dir = self.run_dir.resolve() / "globus-compute"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._state = _SiteState.open(self.state_dir / f"{site.name}.json", site.name)
        self._lock = threading.RLock()
        self._tracked: dict[str, _Tracked] = {}
        self._finished: set[str] = set()
        self._events: list[DispatchEvent] = []
        self._channel: _Channel | None = None
        self._credentials: tuple[str, str] | None = None
        self._function: str | None = str(self.config.function_id) if self.config.function_id else None
        # Task groups to reload (reattached tasks) -> when to try next.
        self._reloads: dict[str, float] = {}
        self._reload_backoff: dict[str, float] = {}
        self._next_status = 0.0
        self._sync_thread: threading.Thread | None = None
        self._closing = False

    # -- the Dispatcher interface ---------------------------------------------------------------------

    def submit(self, task: TaskSpec) -> str:
        if task.site != self.site.name:
            raise DispatchError(f"task {task.task_id!r} is for site {task.site!r}, not {self.site.name!r}")
        task_id = _checked_id(task.task_id)
        # The size guard comes before anything else: an oversized task never reaches the service.
        text = encode_task(task)
        size = len(text.encode())
        if size > self.config.max_task_bytes:
            raise DispatchError(
                f"task {task_id!r} is {size} bytes of JSON, over config.max_task_bytes = "
                f"{self.config.max_task_bytes} of globus-compute site {self.site.name!r} (Globus Compute "
                f"itself refuses arguments over {_GLOBUS_ARGUMENT_CAP} bytes); tasks carry references "
                "to weights (URLs, registry refs, staged paths), never the weights"
            )
        credentials = self._need_credentials()
        with self._lock:
            known = self._known(task)
            if known is not None:
                return known
        failure: Exception | None = None
        try:
            channel = self._ensure_channel(credentials)
            function_id = self._ensure_function(channel)
        except Exception as exc:
            failure = exc
        with self._lock:
            known = self._known(task)  # another thread may have submitted it meanwhile
            if known is not None:
                return known
            handle = self._handle(task_id)
            now = time.time()
            tracked = _Tracked(task_id, "queued", task.dispatched_at, task.deadline)
            # Recorded before it is sent: a crash after the service took it still leaves a trace.
            self._state.put(
                task_id,
                {
                    "experiment_id": task.experiment_id,
                    "endpoint_id": str(self.config.endpoint_id),
                    "handle": handle,
                    "submitted_at": now,
                    "dispatched_at": task.dispatched_at,
                    "deadline": task.deadline,
                    "globus_task_id": None,
                    "task_group_id": None,
                    "phase": "queued",
                },
            )
            self._tracked[task_id] = tracked
            self._events.append(DispatchEvent(task_id=task_id, phase="queued", at=now))
            if failure is None:
                try:
                    tracked.future = channel.submit(function_id, json.loads(text), self._acked(task_id))
                except Exception as exc:
                    failure = exc
            if failure is not None:
                log.error(
                    "globus-compute submit failed",
                    extra={"site": self.site.name, "task": task_id, "error": repr(failure)},
                )
                message = f"cannot submit to Globus Compute endpoint {self.config.endpoint_id}: {failure!r}"
                self._finish(
                    task_id, error_result(task_id, ErrorCode.DISPATCH_FAILED, message, tracked.timings)
                )
                return handle
            future = tracked.future
            log.info("task submitted to Globus Compute", extra={"site": self.site.name, "task": task_id})
        if future is not None:
            future.add_done_callback(functools.partial(self._on_done, task_id))
        return handle

    def reattach(self, task_id: str, handle: str) -> None:
        _checked_id(task_id)
        endpoint = self._check_handle(task_id, handle)
        self._need_credentials()
        with self._lock:
            if task_id in self._tracked or task_id in self._finished:
                return
            record = self._state.get(task_id)
            if record is None:
                message = f"task {task_id!r} has no record in {self._state.path} (handle {handle!r})"
                self._track_failed(task_id, ErrorCode.DISPATCH_FAILED, message, Timings())
                return
            if record.get("endpoint_id") != endpoint:
                raise DispatchError(
                    f"handle {handle!r} names endpoint {endpoint}, but task {task_id!r} went to "
                    f"{record.get('endpoint_id')} (site {self.site.name!r})"
                )
            self._resume(task_id, record)

    def poll(self) -> list[DispatchEvent]:
        with self._lock:
            now = time.time()
            for tracked in list(self._tracked.values()):
                future = tracked.future
                if tracked.globus_task_id is None and future is not None and getattr(future, "task_id", None):
                    self._record_ack(tracked.task_id, future)  # in case the ack hook did not run
                if tracked.deadline is not None and now > tracked.deadline:
                    self._stop_tracking_future(tracked)
                    message = (
                        f"the task's deadline passed before its result came back from Globus Compute "
                        f"endpoint {self.config.endpoint_id} (the task may still run there; its result is ignored)"
                    )
                    self._finish(
                        tracked.task_id,
                        error_result(tracked.task_id, ErrorCode.DEADLINE_EXCEEDED, message, tracked.timings),
                    )
            events, self._events = self._events, []
            self._kick()
            return events

    def cancel(self, task_id: str, reason: str) -> None:
        _checked_id(task_id)
        with self._lock:
            tracked = self._tracked.get(task_id)
            if tracked is None:
                return
            self._stop_tracking_future(tracked)
            message = (
                f"cancelled: {reason}. Globus Compute cannot stop a task it has accepted: it may still "
                "run at the site, and its result is ignored"
            )
            self._finish(task_id, error_result(task_id, ErrorCode.CANCELLED, message, tracked.timings))
            log.info("task cancelled", extra={"site": self.site.name, "task": task_id, "reason": reason})

    def close(self) -> None:
        with self._lock:
            self._closing = True  # no new background pass, no new channel
            sync = self._sync_thread
        # Joins and the channel's release happen outside the lock: a background pass and the
        # SDK's submitter thread (which the channel waits for) call back into this dispatcher.
        if sync is not None and sync is not threading.current_thread():
            sync.join(_SYNC_JOIN_S)
        with self._lock:
            self._tracked.clear()
            self._finished.clear()
            self._events.clear()
            self._reloads.clear()
            channel, self._channel = self._channel, None
        if channel is not None:
            _release_channel(channel)
        with self._lock:
            self._sync_thread = None
            self._closing = False

    def shutdown(self) -> None:
        # No workers of ours to stop: the endpoint's workers belong to the endpoint.
        self.close()

    # -- submit / reattach helpers --------------------------------------------------------------------

    def _handle(self, task_id: str) -> str:
        return f"gc:{self.config.endpoint_id}:{task_id}"

    def _check_handle(self, task_id: str, handle: str) -> str:
        prefix, _, rest = handle.partition(":")
        endpoint, _, handle_task = rest.partition(":")
        try:
            endpoint = str(uuid.UUID(endpoint))
        except ValueError:
            endpoint = ""
        if prefix != "gc" or not endpoint or handle_task != task_id:
            raise DispatchError(
                f"handle {handle!r} does not belong to task {task_id!r} on globus-compute site "
                f"{self.site.name!r} (expected gc:<endpoint id>:{task_id})"
            )
        return endpoint

    def _need_credentials(self) -> tuple[str, str]:
        credentials = _credentials(self.site.name, self.config.endpoint_id)
        with self._lock:
            self._credentials = credentials
        return credentials

    def _known(self, task: TaskSpec) -> str | None:
        """The handle of a task submitted before (by this or an earlier process), now tracked again."""
        task_id = task.task_id
        record = self._state.get(task_id)
        if record is None:
            return None
        if record.get("experiment_id") != task.experiment_id:
            raise DispatchError(
                f"task id {task_id!r} was already used by experiment {record.get('experiment_id')!r} at "
                f"site {self.site.name!r}; task ids must be unique within a run directory"
            )
        if task_id not in self._tracked and task_id not in self._finished:
            self._resume(task_id, record)
        return str(record.get("handle") or self._handle(task_id))

    def _resume(self, task_id: str, record: dict[str, Any]) -> None:
        """Track a task from its record: its stored result, or where it is now."""
        timings = Timings(dispatched_at=float(record.get("dispatched_at") or 0.0))
        stored = self._state.read_result(task_id)
        if stored is not None:
            self._tracked[task_id] = _Tracked(task_id, "queued", timings.dispatched_at, None)
            self._finish(task_id, _parse_stored(task_id, stored), stored=stored)
            return
        globus_task_id = record.get("globus_task_id")
        group = record.get("task_group_id")
        if not globus_task_id or not group:
            message = (
                "the coordinator stopped before Globus Compute acknowledged the task, so its Globus task "
                "id is unknown: it may run at the site, but its result cannot be collected"
            )
            self._track_failed(task_id, ErrorCode.DISPATCH_FAILED, message, timings)
            return
        phase: Phase = "running" if record.get("phase") == "running" else "queued"
        deadline = record.get("deadline")
        globus_task_id, group = str(globus_task_id), str(group)
        tracked = _Tracked(
            task_id,
            phase,
            timings.dispatched_at,
            float(deadline) if deadline is not None else None,
            globus_task_id=globus_task_id,
            task_group_id=group,
        )
        self._tracked[task_id] = tracked
        self._events.append(DispatchEvent(task_id=task_id, phase=phase, at=time.time()))
        channel = self._channel
        future = channel.lookup(globus_task_id) if channel is not None else None
        if future is not None and not future.cancelled():
            # Still known to this process's executor (a dispatcher of this site was closed and
            # a new one made): no reload needed.
            tracked.future = future
            future.add_done_callback(functools.partial(self._on_done, task_id))
        else:
            self._reloads.setdefault(group, 0.0)
        self._kick()

    def _track_failed(self, task_id: str, code: ErrorCode, message: str, timings: Timings) -> None:
        self._tracked[task_id] = _Tracked(task_id, "queued", timings.dispatched_at, None)
        self._finish(task_id, error_result(task_id, code, message, timings))

    def _ensure_channel(self, credentials: tuple[str, str]) -> _Channel:
        with self._lock:
            if self._closing:
                raise DispatchError(f"globus-compute site {self.site.name!r} is being closed")
            if self._channel is None:
                self._channel = _acquire_channel(self.run_dir.resolve(), self.config, credentials)
            channel = self._channel
        channel.start()
        return channel

    def _ensure_function(self, channel: _Channel) -> str:
        if self._function is None:
            self._function = _function_id(
                self.run_dir.resolve(),
                function_key(channel.credentials[0]),
                lambda: str(
                    channel.client.register_source_code(
                        FUNCTION_SOURCE,
                        FUNCTION_NAME,
                        description=f"fedhpc {fedhpc.__version__}: {_ENTRY_POINT} from the site's image",
                    )
                ),
            )
        return self._function

    # -- callbacks (SDK threads) ----------------------------------------------------------------------

    def _acked(self, task_id: str) -> Callable[[Future[Any]], None]:
        return functools.partial(self._record_ack, task_id)

    def _record_ack(self, task_id: str, future: Future[Any]) -> None:
        globus_task_id = getattr(future, "task_id", None)
        if not globus_task_id:
            return
        group = getattr(future, "_metadata", {}).get("task_group_uuid")
        with self._lock:
            self._state.update(
                task_id, globus_task_id=str(globus_task_id), task_group_id=str(group) if group else None
            )
            tracked = self._tracked.get(task_id)
            if tracked is not None:
                tracked.globus_task_id = str(globus_task_id)
                tracked.task_group_id = str(group) if group else None
        log.info(
            "Globus Compute accepted the task",
            extra={"site": self.site.name, "task": task_id, "globus_task": str(globus_task_id)},
        )

    def _on_done(self, task_id: str, future: Future[Any]) -> None:
        if future.cancelled():
            return  # the channel was stopped (close()): nobody in this process waits for it any more
        record = self._state.get(task_id) or {}
        timings = Timings(dispatched_at=float(record.get("dispatched_at") or 0.0))
        try:
            result = _future_outcome(task_id, future, timings)
        except Exception as exc:  # never let a bad result kill the SDK's thread
            log.exception(
                "cannot read a Globus Compute result", extra={"site": self.site.name, "task": task_id}
            )
            result = error_result(
                task_id, ErrorCode.INVALID_RESULT, f"cannot read the result: {exc!r}", timings
            )
        with self._lock:
            if result is None:
                tracked = self._tracked.get(task_id)
                if tracked is not None and tracked.future is future:
                    tracked.future = None
                if self.config.status_poll_s is not None:
                    log.warning(
                        "Globus Compute result stream failed; asking for the result over HTTP",
                        extra={"site": self.site.name, "task": task_id, "error": repr(future.exception())},
                    )
                    return
                message = (
                    f"the Globus Compute result stream failed ({future.exception()!r}) and status "
                    "polling is off (config.status_poll_s), so the task's result cannot be collected"
                )
                result = error_result(task_id, ErrorCode.DISPATCH_FAILED, message, timings)
            self._finish(task_id, result)

    # -- events ---------------------------------------------------------------------------------------

    def _finish(self, task_id: str, result: TaskResultDoc, stored: str | None = None) -> None:
        """Store the task's result (first writer wins) and, if this dispatcher tracks the task,
        queue its one ``finished`` event. Works after close() too: the result then waits on disk."""
        with self._lock:
            if stored is None:
                stored = self._state.store_result(task_id, encode_result(result))
                self._state.update(task_id, phase="finished")
            tracked = self._tracked.pop(task_id, None)
            if tracked is not None and tracked.globus_task_id and self._channel is not None:
                self._channel.forget(tracked.globus_task_id)
            if tracked is None or task_id in self._finished:
                return
            self._finished.add(task_id)
            document = _parse_stored(task_id, stored)
            self._events.append(
                DispatchEvent(task_id=task_id, phase="finished", at=time.time(), result=document)
            )
            outcome = document.error.code.value if document.error else "ok"
            log.info("task finished", extra={"site": self.site.name, "task": task_id, "outcome": outcome})

    def _advance(self, task_id: str, phase: Phase, at: float) -> None:
        with self._lock:
            tracked = self._tracked.get(task_id)
            if tracked is None or phase != "running" or tracked.phase != "queued":
                return
            tracked.phase = phase
            self._state.update(task_id, phase=phase)
            self._events.append(DispatchEvent(task_id=task_id, phase=phase, at=at))

    def _stop_tracking_future(self, tracked: _Tracked) -> None:
        # Globus Compute has no task cancellation, and Future.cancel() would not help: the SDK
        # sends a queued task whether or not its future was cancelled, and its result and
        # submitter threads raise InvalidStateError on a future cancelled under them. So the
        # future is only let go of; when its result comes, _finish finds the task already
        # settled (the stored CANCELLED / DEADLINE_EXCEEDED wins) and emits nothing.
        tracked.future = None

    # -- background: reloads after a restart, task states over HTTP ------------------------------------

    def _kick(self) -> None:
        """Start a background pass if one is due and none runs (never blocks the caller)."""
        with self._lock:
            if self._closing or (self._sync_thread is not None and self._sync_thread.is_alive()):
                return
            now = time.monotonic()
            reload_due = any(when <= now for when in self._reloads.values())
            status_due = (
                self.config.status_poll_s is not None
                and now >= self._next_status
                and any(t.globus_task_id for t in self._tracked.values())
            )
            if not (reload_due or status_due):
                return
            thread = threading.Thread(
                target=self._sync_pass, name=f"fedhpc-globus-compute-{self.site.name}", daemon=True
            )
            self._sync_thread = thread
            thread.start()

    def _sync_pass(self) -> None:
        try:
            with self._lock:
                credentials = self._credentials
                now = time.monotonic()
                reloads = [group for group, when in self._reloads.items() if when <= now]
                status_due = self.config.status_poll_s is not None and now >= self._next_status
            if credentials is None or self._closing:
                return
            try:
                channel = self._ensure_channel(credentials)
            except Exception as exc:
                if self._closing:
                    return
                log.warning("cannot reach Globus Compute", extra={"site": self.site.name, "error": repr(exc)})
                for group in reloads:
                    self._retry_reload_later(group)
                return
            for group in reloads:
                if not self._closing:
                    self._reload(channel, group)
            if status_due and not self._closing:
                self._refresh_status(channel)
        except Exception:
            log.exception("globus-compute background pass failed", extra={"site": self.site.name})

    def _retry_reload_later(self, group: str) -> None:
        with self._lock:
            if group in self._reloads:
                backoff = min(
                    self._reload_backoff.get(group, _RELOAD_BACKOFF_S / 2) * 2, _RELOAD_BACKOFF_MAX_S
                )
                self._reload_backoff[group] = backoff
                self._reloads[group] = time.monotonic() + backoff

    def _reload(self, channel: _Channel, group: str) -> None:
        try:
            channel.reload(group)
        except Exception as exc:
            if not _is_permanent(exc):
                log.warning(
                    "reloading a Globus Compute task group failed; will retry",
                    extra={"site": self.site.name, "task_group": group, "error": repr(exc)},
                )
                self._retry_reload_later(group)
                return
            with self._lock:
                self._reloads.pop(group, None)
                for tracked in [t for t in self._tracked.values() if t.task_group_id == group]:
                    message = f"Globus Compute refused to reload task group {group}: {exc!r}"[
                        :_REMOTE_TEXT_CHARS
                    ]
                    self._finish(
                        tracked.task_id,
                        error_result(tracked.task_id, ErrorCode.DISPATCH_FAILED, message, tracked.timings),
                    )
            return
        attach: list[tuple[str, Future[Any]]] = []
        with self._lock:
            self._reloads.pop(group, None)
            self._reload_backoff.pop(group, None)
            for tracked in [
                t for t in self._tracked.values() if t.task_group_id == group and t.future is None
            ]:
                future = channel.lookup(tracked.globus_task_id or "")
                if future is not None:
                    tracked.future = future
                    attach.append((tracked.task_id, future))
                elif self.config.status_poll_s is None:
                    message = (
                        f"Globus Compute does not list task {tracked.globus_task_id} in task group {group}"
                    )
                    self._finish(
                        tracked.task_id,
                        error_result(tracked.task_id, ErrorCode.DISPATCH_FAILED, message, tracked.timings),
                    )
                # else: the status poll asks for it by id
        for task_id, future in attach:
            # Runs the callback at once for tasks that finished while no coordinator listened.
            future.add_done_callback(functools.partial(self._on_done, task_id))

    def _refresh_status(self, channel: _Channel) -> None:
        with self._lock:
            interval = self.config.status_poll_s or 0.0
            self._next_status = time.monotonic() + interval
            wanted = {t.globus_task_id: t.task_id for t in self._tracked.values() if t.globus_task_id}
        ids = sorted(wanted)
        for start in range(0, len(ids), _STATUS_BATCH):
            chunk = ids[start : start + _STATUS_BATCH]
            try:
                docs = channel.task_status(chunk)
            except Exception as exc:
                log.warning(
                    "cannot get task states from Globus Compute",
                    extra={"site": self.site.name, "error": repr(exc)},
                )
                return
            for globus_task_id, doc in docs.items():
                task_id = wanted.get(str(globus_task_id))
                if task_id is not None and isinstance(doc, dict):
                    self._apply_status(channel, task_id, doc)

    def _apply_status(self, channel: _Channel, task_id: str, doc: dict[str, Any]) -> None:
        with self._lock:
            tracked = self._tracked.get(task_id)
            if tracked is None:
                return
            timings = tracked.timings
        if doc.get("completion_t") and ("result" in doc or "exception" in doc):
            # Also the fallback for a result the result stream lost: the first copy stored wins.
            result = _decode_status_result(task_id, channel.client.fx_serializer, doc, timings)
            self._finish(task_id, result)
            return
        phase = GLOBUS_PHASES.get(str(doc.get("status", "")).lower())
        if phase == "running":
            transitions = (doc.get("details") or {}).get("task_transitions") or {}
            started = transitions.get("execution-start") if isinstance(transitions, dict) else None
            at = float(started) if isinstance(started, int | float) else time.time()
            self._advance(task_id, "running", at)


def _checked_id(task_id: str) -> str:
    # Task ids name result files, so the local backend's rule applies.
    try:
        return check_task_id(task_id)
    except ValueError as exc:
        raise DispatchError(str(exc)) from exc
