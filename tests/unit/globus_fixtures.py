"""Globus Compute without the Globus service, for tests of the globus-compute dispatch backend.

The Globus service cannot run here, so it is MOCKED: its HTTP API (Globus Auth's token endpoint
and the Compute web service) is served by ``globus_sdk.testing`` registered responses on a
``responses`` mock, with stateful callbacks where the answer depends on what was submitted;
and the SDK's AMQP result stream (``_ResultWatcher``, a pika connection to the service) is
replaced by :class:`OfflineResultWatcher`, which takes the same ``Result`` messages the service
would publish and runs them through the SDK's own matching and deserialization code.

Everything else is the real SDK: ``Client``, ``Executor`` (its submitter thread, batching,
``reload_tasks``), serializers.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import responses
from globus_compute_common import messagepack
from globus_compute_common.messagepack.message_types import Result, ResultErrorDetails
from globus_compute_sdk.sdk import executor as sdk_executor
from globus_compute_sdk.serialize import ComputeSerializer
from globus_sdk.testing import RegisteredResponse, load_response
from pika.spec import Basic, BasicProperties

COMPUTE_URL = "https://compute.api.globus.org"
AUTH_URL = "https://auth.globus.org"
COMPUTE_SCOPE = "https://auth.globus.org/scopes/facd7ccc-c5f4-42aa-916b-a0e270e2c2a9/all"
CLIENT_ID = "6b0d1c34-1d4b-4b8f-9b5e-0d3c2a9e7f10"
CLIENT_SECRET = "not-a-real-secret"


class _NoChannel:
    """What ``_on_message`` gets as the AMQP channel: it only nacks malformed messages."""

    def __init__(self) -> None:
        self.nacked: list[int] = []

    def basic_nack(self, delivery_tag: int, requeue: bool = True) -> None:
        self.nacked.append(delivery_tag)


class OfflineResultWatcher(sdk_executor._ResultWatcher):  # type: ignore[misc]
    """The SDK's result watcher minus its AMQP connection: :meth:`publish` hands it a result as
    the service would, and the SDK's own ``_on_message`` / ``_match_results_to_futures`` resolve
    the futures (deserialization included)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tag = 0
        self.channel = _NoChannel()

    def run(self) -> None:
        self._thread_id = threading.get_ident()
        while not self._time_to_stop:
            if self._time_to_check_results.wait(0.01):
                self._time_to_check_results.clear()
                self._match_results_to_futures()

    def publish(self, result: Result) -> None:
        self._tag += 1
        self._on_message(
            self.channel, Basic.Deliver(delivery_tag=self._tag), BasicProperties(), messagepack.pack(result)
        )

    def break_stream(self, error: Exception) -> None:
        """What the real watcher does when it gives up on the AMQP service: fail every open future."""
        with self._new_futures_lock:
            while self._open_futures:
                _, future = self._open_futures.popitem()
                future.set_exception(error)
            self._open_futures_empty.set()


class FakeComputeService:
    """A stateful stand-in for the Globus Compute web service on a ``responses`` mock."""

    def __init__(self, rsps: responses.RequestsMock) -> None:
        self.rsps = rsps
        self.lock = threading.Lock()
        self.functions: dict[str, dict[str, Any]] = {}
        self.tasks: dict[str, dict[str, Any]] = {}  # Globus task id -> its record
        self.groups: dict[str, list[str]] = {}
        self.submit_bodies: list[dict[str, Any]] = []
        self.submit_status = 200
        # Static answers: globus_sdk.testing registered responses.
        load_response(
            RegisteredResponse(
                service="auth",
                path="/v2/oauth2/token",
                method="POST",
                json={
                    "access_token": "compute-access-token",
                    "scope": COMPUTE_SCOPE,
                    "expires_in": 172800,
                    "token_type": "Bearer",
                    "resource_server": "funcx_service",
                    "other_tokens": [],
                },
            ),
            requests_mock=rsps,
        )
        # The stock compute version fixture names a key the SDK does not read (min_endpoint_version).
        load_response(
            RegisteredResponse(
                service="compute",
                path="/v2/version",
                json={"api": "1.0.0", "min_sdk_version": "1.0.0", "min_ep_version": "1.0.0"},
            ),
            requests_mock=rsps,
        )
        # Stateful answers.
        rsps.add_callback("POST", f"{COMPUTE_URL}/v3/functions", callback=self._register)
        rsps.add_callback(
            "POST",
            re.compile(re.escape(COMPUTE_URL) + r"/v3/endpoints/[0-9a-f-]+/submit"),
            callback=self._submit,
        )
        rsps.add_callback(
            "GET", re.compile(re.escape(COMPUTE_URL) + r"/v2/taskgroup/[0-9a-f-]+"), callback=self._task_group
        )
        rsps.add_callback("POST", f"{COMPUTE_URL}/v2/batch_status", callback=self._batch_status)

    # -- what tests look at -------------------------------------------------------------------------

    def calls(self, method: str, path: str) -> list[Any]:
        """Requests the mock received for a path (a regex) on the Compute service."""
        pattern = re.compile(re.escape(COMPUTE_URL) + path)
        return [c for c in self.rsps.calls if c.request.method == method and pattern.match(c.request.url)]

    @property
    def register_calls(self) -> int:
        return len(self.calls("POST", "/v3/functions"))

    def wait_for_tasks(self, count: int, timeout: float = 5.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.tasks) >= count:
                    return list(self.tasks)
            time.sleep(0.005)
        raise AssertionError(f"the mocked service received {len(self.tasks)} tasks, expected {count}")

    def task_arguments(self, globus_task_id: str) -> tuple[list[str], Any, Any]:
        """The task's packed buffers as sent, and its args and kwargs decoded as JSON."""
        buffers = ComputeSerializer.unpack_buffers(self.tasks[globus_task_id]["payload"])
        args, kwargs = (json.loads(b.split("\n", 1)[1]) for b in buffers)
        return buffers, args, kwargs

    # -- the service finishing tasks -----------------------------------------------------------------

    def set_status(self, globus_task_id: str, status: str, **details: Any) -> None:
        with self.lock:
            doc = self.tasks[globus_task_id]["doc"]
            doc["status"] = status
            if details:
                doc["details"] = details

    def complete(self, globus_task_id: str, payload: str) -> None:
        """The task finished with this serialized result; the status API now has it."""
        with self.lock:
            doc = self.tasks[globus_task_id]["doc"]
            doc.update(status="success", result=payload, completion_t=str(time.time()))

    def watcher(self, globus_task_id: str, timeout: float = 5.0) -> OfflineResultWatcher:
        """The result stream of the task's group once it watches the task (the SDK starts it,
        and hands it the future, right after the service accepted the batch)."""
        group = uuid.UUID(self.tasks[globus_task_id]["task_group_id"])
        deadline = time.monotonic() + timeout
        while True:
            watcher = sdk_executor._RESULT_WATCHERS.get(group)
            if watcher is not None and globus_task_id in watcher.get_open_futures():
                assert isinstance(watcher, OfflineResultWatcher)
                return watcher
            if time.monotonic() > deadline:
                raise AssertionError(f"no result watcher watches task {globus_task_id}")
            time.sleep(0.005)

    def deliver(self, globus_task_id: str, payload: str, *, error: bool = False) -> None:
        """Publish the task's result on its task group's result stream."""
        watcher = self.watcher(globus_task_id)
        details = (
            ResultErrorDetails(
                code="RemoteExecutionError", user_message="An error occurred during the execution"
            )
            if error
            else None
        )
        watcher.publish(Result(task_id=uuid.UUID(globus_task_id), data=payload, error_details=details))

    # -- callbacks -----------------------------------------------------------------------------------

    def _register(self, request: Any) -> tuple[int, dict[str, str], str]:
        function_id = str(uuid.uuid4())
        with self.lock:
            self.functions[function_id] = json.loads(request.body)
        return 200, {}, json.dumps({"function_uuid": function_id})

    def _submit(self, request: Any) -> tuple[int, dict[str, str], str]:
        body = json.loads(request.body)
        endpoint_id = request.url.rstrip("/").split("/")[-2]
        with self.lock:
            self.submit_bodies.append(body)
            if self.submit_status != 200:
                return self.submit_status, {}, json.dumps({"code": "FORBIDDEN", "error": "forbidden"})
            group = body.get("task_group_id")
            if group is not None and group not in self.groups:
                # As the real service: a task group id it did not hand out is an error.
                return 404, {}, json.dumps({"code": "TASK_GROUP_NOT_FOUND", "error": group})
            group = group or str(uuid.uuid4())
            self.groups.setdefault(group, [])
            accepted: dict[str, list[str]] = {}
            for function_id, payloads in body["tasks"].items():
                for payload in payloads:
                    task_id = str(uuid.uuid4())
                    self.tasks[task_id] = {
                        "task_group_id": group,
                        "endpoint_id": endpoint_id,
                        "function_id": function_id,
                        "payload": payload,
                        "doc": {"task_id": task_id, "status": "waiting-for-ep"},
                    }
                    self.groups[group].append(task_id)
                    accepted.setdefault(function_id, []).append(task_id)
        answer = {
            "request_id": str(uuid.uuid4()),
            "task_group_id": group,
            "endpoint_id": endpoint_id,
            "tasks": accepted,
        }
        return 200, {}, json.dumps(answer)

    def _task_group(self, request: Any) -> tuple[int, dict[str, str], str]:
        group = request.url.rstrip("/").split("/")[-1]
        with self.lock:
            if group not in self.groups:
                return 404, {}, json.dumps({"code": "TASK_GROUP_NOT_FOUND", "error": group})
            tasks = [{"id": t, "created_at": "2026-01-01T00:00:00"} for t in self.groups[group]]
        return 200, {}, json.dumps({"taskgroup_id": group, "create_websockets_queue": True, "tasks": tasks})

    def _batch_status(self, request: Any) -> tuple[int, dict[str, str], str]:
        wanted = json.loads(request.body)["task_ids"]
        with self.lock:
            results = {t: dict(self.tasks[t]["doc"]) for t in wanted if t in self.tasks}
        return 200, {}, json.dumps({"response": "batch", "results": results})


@contextmanager
def offline_globus_compute(env: dict[str, str] | None = None) -> Iterator[FakeComputeService]:
    """The mocked Globus service for the duration of the block: HTTP through ``responses`` and
    the offline result stream. Callers close their dispatchers inside the block (an Executor's
    threads must not outlive the mock: they would try the real host)."""
    original = sdk_executor._ResultWatcher
    sdk_executor._ResultWatcher = OfflineResultWatcher
    try:
        with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
            yield FakeComputeService(rsps)
    finally:
        sdk_executor._ResultWatcher = original


def wait_for_threads(baseline: set[threading.Thread], timeout: float = 10.0) -> list[threading.Thread]:
    """Threads started since ``baseline`` that are still alive after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        extra = [t for t in threading.enumerate() if t not in baseline and t.is_alive()]
        if not extra or time.monotonic() > deadline:
            return extra
        time.sleep(0.01)


class Recorder:
    """Proof that a pickle was never loaded: unpickling an :class:`Unpickled` calls :meth:`hit`."""

    hits: ClassVar[list[str]] = []

    @classmethod
    def hit(cls, note: str) -> str:
        cls.hits.append(note)
        return note


class Unpickled:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (Recorder.hit, ("a pickled result was loaded",))
