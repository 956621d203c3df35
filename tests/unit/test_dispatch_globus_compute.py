"""The globus-compute dispatch backend, against a MOCKED Globus service.

There is no Globus service here: every test below that talks to it uses the mock in
``globus_fixtures`` — Globus Auth and the Compute web service's HTTP API served by
``globus_sdk.testing`` registered responses (the ``responses`` library), and the SDK's AMQP
result stream replaced by an in-process one fed with the ``Result`` messages the service would
publish. The SDK itself (Client, Executor, reload_tasks, serializers) is real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from globus_compute_sdk.serialize import DillDataBase64, JSONData
from globus_fixtures import (
    CLIENT_ID,
    CLIENT_SECRET,
    FakeComputeService,
    Recorder,
    Unpickled,
    offline_globus_compute,
    wait_for_threads,
)

import fedhpc
from fedhpc.common.contracts import (
    MAX_RESULT_BYTES,
    ErrorCode,
    ModelSource,
    PluginSpec,
    TaskResultDoc,
    TaskSpec,
    UpdateTarget,
    encode_task,
)
from fedhpc.coordinator.dispatch import DispatchError, DispatchEvent, SiteSpec, make_dispatcher
from fedhpc.coordinator.dispatch.globus_compute import (
    CLIENT_ID_ENV,
    CLIENT_SECRET_ENV,
    FUNCTION_NAME,
    FUNCTION_SOURCE,
    GlobusComputeDispatcher,
    function_key,
)

ENDPOINT = "2f9c6b8e-3b1a-4c2d-9e8f-7a6b5c4d3e2f"
UEP_CONFIG = {"account": "fl-project", "queue": "debug", "walltime": "00:30:00", "nodes": 1}
JSON = JSONData()


def _task(task_id: str = "t1", site: str = "polaris", **overrides: Any) -> TaskSpec:
    fields: dict[str, Any] = {
        "experiment_id": "exp",
        "round": 0,
        "task_id": task_id,
        "site": site,
        "plugin": PluginSpec(name="digits", hyperparameters={"lr": 0.1}),
        "model": ModelSource(
            model="m", version="v1", sha256="0" * 64, size_bytes=10, url="https://s3.example/m?sig=x"
        ),
        "update": UpdateTarget(object_key="updates/t1", url="https://s3.example/u?sig=y"),
        "dispatched_at": time.time(),
    }
    fields.update(overrides)
    return TaskSpec(**fields)


def _result(task_id: str, **extra: Any) -> dict[str, Any]:
    return TaskResultDoc(task_id=task_id, num_samples=32, metrics={"train_loss": 0.5}, **extra).model_dump(
        by_alias=True, exclude_none=True
    )


@dataclass
class Globus:
    """The mocked Globus service and the dispatchers a test made (closed at its end)."""

    service: FakeComputeService
    run_dir: Path
    made: list[GlobusComputeDispatcher] = field(default_factory=list)

    def dispatcher(
        self, run_dir: Path | None = None, site: str = "polaris", **config: Any
    ) -> GlobusComputeDispatcher:
        settings: dict[str, Any] = {"endpoint_id": ENDPOINT, "user_endpoint_config": UEP_CONFIG}
        settings.update(config)
        dispatcher = make_dispatcher(
            SiteSpec(name=site, backend="globus-compute", config=settings), run_dir or self.run_dir
        )
        assert isinstance(dispatcher, GlobusComputeDispatcher)
        self.made.append(dispatcher)
        return dispatcher


@pytest.fixture
def globus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Globus]:
    """The Globus service mocked with globus_sdk.testing; no thread of the SDK or the backend
    may outlive the test."""
    monkeypatch.setenv(CLIENT_ID_ENV, CLIENT_ID)
    monkeypatch.setenv(CLIENT_SECRET_ENV, CLIENT_SECRET)
    monkeypatch.setenv("GLOBUS_COMPUTE_USER_DIR", str(tmp_path / "globus-home"))
    monkeypatch.delenv("GLOBUS_SDK_ENVIRONMENT", raising=False)
    baseline = set(threading.enumerate())
    with offline_globus_compute() as service:
        harness = Globus(service, tmp_path / "run")
        try:
            yield harness
        finally:
            # Inside the mock: the SDK's threads must not outlive it (they would try the real host).
            for dispatcher in harness.made:
                dispatcher.close()
            leftover = wait_for_threads(baseline)
    assert not leftover, f"threads left behind: {leftover}"


def _collect(
    dispatcher: GlobusComputeDispatcher, done: Callable[[list[DispatchEvent]], bool], timeout: float = 5.0
) -> list[DispatchEvent]:
    events: list[DispatchEvent] = []
    deadline = time.monotonic() + timeout
    while not done(events):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; events so far: {events}")
        events.extend(dispatcher.poll())
        time.sleep(0.005)
    return events


def _finished(task_id: str) -> Callable[[list[DispatchEvent]], bool]:
    return lambda events: any(e.task_id == task_id and e.phase == "finished" for e in events)


def _result_of(events: list[DispatchEvent], task_id: str) -> TaskResultDoc:
    finished = [e for e in events if e.task_id == task_id and e.phase == "finished"]
    assert len(finished) == 1, events
    assert finished[0].result is not None
    return finished[0].result


def _acked(dispatcher: GlobusComputeDispatcher, task_id: str, timeout: float = 5.0) -> dict[str, Any]:
    """The task's record in <site>.json once the mocked service has accepted it."""
    path = dispatcher.state_dir / f"{dispatcher.site.name}.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            record = json.loads(path.read_text())["tasks"].get(task_id, {})
            if record.get("globus_task_id"):
                return dict(record)
        time.sleep(0.005)
    raise AssertionError(f"task {task_id} was never acknowledged")


# -- config and credentials (no Globus involved) -------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({}, "config.endpoint_id"),
        ({"endpoint_id": "not-a-uuid"}, "config.endpoint_id"),
        ({"endpoint_id": ENDPOINT, "queue": "debug"}, "config.queue"),
        ({"endpoint_id": ENDPOINT, "amqp_port": 1234}, "config.amqp_port"),
        ({"endpoint_id": ENDPOINT, "max_task_bytes": 20_000_000}, "config.max_task_bytes"),
        ({"endpoint_id": ENDPOINT, "function_id": "nope"}, "config.function_id"),
        ({"endpoint_id": ENDPOINT, "status_poll_s": 0}, "config.status_poll_s"),
        ({"endpoint_id": ENDPOINT, "user_endpoint_config": {"nodes": {1, 2}}}, "config.user_endpoint_config"),
    ],
    ids=[
        "missing",
        "bad-uuid",
        "unknown-key",
        "amqp-port",
        "task-cap",
        "function-id",
        "poll",
        "uep-not-json",
    ],
)
def test_bad_site_config_names_the_key(tmp_path: Path, config: dict[str, Any], key: str) -> None:
    site = SiteSpec(name="polaris", backend="globus-compute", config=config)
    with pytest.raises(DispatchError, match=rf"site 'polaris': {key}"):
        make_dispatcher(site, tmp_path)


def test_module_imports_without_globus_packages() -> None:
    """The rest of fedhpc must not need globus_compute_sdk at import time."""
    code = (
        "import sys, fedhpc.coordinator.dispatch.globus_compute as m\n"
        "bad = [n for n in sys.modules if n.split('.')[0] in ('globus_compute_sdk', 'globus_sdk', 'pika')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize(
    ("unset", "named"),
    [
        ((CLIENT_ID_ENV, CLIENT_SECRET_ENV), f"{CLIENT_ID_ENV} and {CLIENT_SECRET_ENV} are not set"),
        ((CLIENT_SECRET_ENV,), f"{CLIENT_SECRET_ENV} is not set"),
    ],
)
def test_missing_credentials_give_a_clear_error_mocked_globus(
    globus: Globus, monkeypatch: pytest.MonkeyPatch, unset: tuple[str, ...], named: str
) -> None:
    """With the Globus service mocked (globus_sdk.testing): no credentials, no HTTP call at all."""
    for name in unset:
        monkeypatch.delenv(name)
    dispatcher = globus.dispatcher()
    for call in (
        lambda: dispatcher.submit(_task()),
        lambda: dispatcher.reattach("t1", f"gc:{ENDPOINT}:t1"),
    ):
        with pytest.raises(DispatchError) as info:
            call()
        message = str(info.value)
        assert named in message
        assert CLIENT_ID_ENV in message and CLIENT_SECRET_ENV in message
        assert "confidential client" in message
    assert len(globus.service.rsps.calls) == 0


def test_oversized_task_is_refused_before_any_http_call_mocked_globus(globus: Globus) -> None:
    """Globus service mocked with globus_sdk.testing: the size guard acts before any request."""
    dispatcher = globus.dispatcher(max_task_bytes=4096)
    task = _task(plugin=PluginSpec(name="digits", hyperparameters={"blob": "x" * 5000}))
    size = len(encode_task(task).encode())
    with pytest.raises(DispatchError, match=rf"is {size} bytes of JSON, over config.max_task_bytes = 4096"):
        dispatcher.submit(task)
    assert len(globus.service.rsps.calls) == 0
    assert not (dispatcher.state_dir / "polaris.json").exists()
    assert dispatcher.poll() == []


# -- registration and submission ----------------------------------------------------------------------


def test_run_task_is_registered_once_per_run_dir_mocked_globus(
    globus: Globus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Globus service mocked with globus_sdk.testing: a second dispatcher (and a second site) on
    the same run directory reuse the persisted function id; a new fedhpc version registers again."""
    first = globus.dispatcher()
    first.submit(_task("t1"))
    _acked(first, "t1")
    first.close()
    second = globus.dispatcher()
    second.submit(_task("t2"))
    other_site = globus.dispatcher(site="aurora")
    other_site.submit(_task("t3", site="aurora"))
    globus.service.wait_for_tasks(3)
    assert globus.service.register_calls == 1

    (function_id,) = globus.service.functions
    registration = globus.service.functions[function_id]
    # Source text of a shim that imports the trainer from the site's image: no pickled code.
    assert registration["serialized"] is False
    assert registration["function_name"] == FUNCTION_NAME
    assert registration["function_code"] == FUNCTION_SOURCE
    assert "from fedhpc.trainer import run_task" in FUNCTION_SOURCE
    assert {fn for body in globus.service.submit_bodies for fn in body["tasks"]} == {function_id}
    stored = json.loads((globus.run_dir / "globus-compute" / "function.json").read_text())
    assert stored["functions"][function_key(CLIENT_ID)]["function_id"] == function_id

    monkeypatch.setattr(fedhpc, "__version__", "99.0.0")
    upgraded = globus.dispatcher()
    upgraded.submit(_task("t4"))
    globus.service.wait_for_tasks(4)
    assert globus.service.register_calls == 2
    assert (
        len(json.loads((globus.run_dir / "globus-compute" / "function.json").read_text())["functions"]) == 2
    )


def test_configured_function_id_is_not_registered_mocked_globus(globus: Globus) -> None:
    """Globus service mocked with globus_sdk.testing: config.function_id skips registration."""
    function_id = "0e4a9b1c-5d6e-4f70-8a91-b2c3d4e5f607"
    dispatcher = globus.dispatcher(function_id=function_id)
    dispatcher.submit(_task())
    globus.service.wait_for_tasks(1)
    assert globus.service.register_calls == 0
    assert list(globus.service.submit_bodies[0]["tasks"]) == [function_id]


def test_submit_sends_the_task_as_small_json_mocked_globus(globus: Globus) -> None:
    """Globus service mocked with globus_sdk.testing: the submit request the mock received holds
    the task document as JSON-serialized data (JSONData), asks for JSON results, and carries the
    user endpoint config; nothing in it is a pickle."""
    dispatcher = globus.dispatcher()
    task = _task()
    handle = dispatcher.submit(task)
    assert handle == f"gc:{ENDPOINT}:t1"
    (globus_task_id,) = globus.service.wait_for_tasks(1)

    body = globus.service.submit_bodies[0]
    buffers, args, kwargs = globus.service.task_arguments(globus_task_id)
    assert [b[: len(JSON.identifier)] for b in buffers] == [JSON.identifier, JSON.identifier]
    assert args == [json.loads(encode_task(task))]
    assert kwargs == {}
    assert body["result_serializers"] == ["globus_compute_sdk.serialize.concretes.JSONData"]
    assert body["user_endpoint_config"] == UEP_CONFIG
    assert "task_group_id" not in body  # the service hands out the task group
    payload = json.dumps(body["tasks"])
    assert len(payload) < 4096
    assert DillDataBase64.identifier not in {b[:3] for b in buffers}

    record = _acked(dispatcher, "t1")
    assert record["globus_task_id"] == globus_task_id
    assert record["task_group_id"] == globus.service.tasks[globus_task_id]["task_group_id"]
    assert record["handle"] == handle
    assert record["submitted_at"] > 0
    events = _collect(dispatcher, lambda ev: bool(ev))
    assert [(e.task_id, e.phase) for e in events] == [("t1", "queued")]


def test_submit_is_idempotent_per_task_id_mocked_globus(globus: Globus) -> None:
    """Globus service mocked with globus_sdk.testing: a task id submitted again is not sent again,
    by the same dispatcher or by one made after a restart; another experiment may not reuse it."""
    dispatcher = globus.dispatcher()
    handle = dispatcher.submit(_task())
    assert dispatcher.submit(_task()) == handle
    _acked(dispatcher, "t1")
    dispatcher.close()
    again = globus.dispatcher()
    assert again.submit(_task()) == handle
    with pytest.raises(DispatchError, match="already used by experiment 'exp'"):
        again.submit(_task(experiment_id="other"))
    time.sleep(0.05)
    assert len(globus.service.submit_bodies) == 1


def test_refused_submission_is_dispatch_failed_and_the_next_one_works_mocked_globus(globus: Globus) -> None:
    """Globus service mocked with globus_sdk.testing: the service refusing a batch (HTTP 403)
    ends the task with DISPATCH_FAILED; the SDK executor it stopped is replaced for the next task."""
    dispatcher = globus.dispatcher()
    globus.service.submit_status = 403
    dispatcher.submit(_task("t1"))
    result = _result_of(_collect(dispatcher, _finished("t1")), "t1")
    assert result.error is not None and result.error.code == ErrorCode.DISPATCH_FAILED
    assert "did not accept the task" in result.error.message
    globus.service.submit_status = 200
    dispatcher.submit(_task("t2"))
    assert len(globus.service.wait_for_tasks(1)) == 1


# -- results -------------------------------------------------------------------------------------------


def _submit_one(globus: Globus, **config: Any) -> tuple[GlobusComputeDispatcher, str]:
    dispatcher = globus.dispatcher(**config)
    dispatcher.submit(_task())
    (globus_task_id,) = globus.service.wait_for_tasks(1)
    _acked(dispatcher, "t1")
    return dispatcher, globus_task_id


def test_result_from_the_result_stream_mocked_globus(globus: Globus) -> None:
    """Globus service mocked with globus_sdk.testing, results through the offline result stream:
    a JSON result becomes the finished event's result and is stored under the run directory."""
    dispatcher, globus_task_id = _submit_one(globus)
    globus.service.deliver(globus_task_id, JSON.serialize(_result("t1")))
    events = _collect(dispatcher, _finished("t1"))
    assert [e.phase for e in events] == ["queued", "finished"]
    result = _result_of(events, "t1")
    assert result.ok and result.num_samples == 32 and result.metrics == {"train_loss": 0.5}
    stored = json.loads((dispatcher.state_dir / "polaris" / "results" / "t1.json").read_text())
    assert stored["task_id"] == "t1"
    assert (
        json.loads((dispatcher.state_dir / "polaris.json").read_text())["tasks"]["t1"]["phase"] == "finished"
    )
    time.sleep(0.05)
    assert dispatcher.poll() == []  # exactly one finished event


def test_remote_exception_is_trainer_crashed_mocked_globus(globus: Globus) -> None:
    """Globus service mocked with globus_sdk.testing: an exception raised at the site comes back
    as TRAINER_CRASHED with the remote traceback."""
    dispatcher, globus_task_id = _submit_one(globus)
    traceback = 'Traceback (most recent call last):\n  File "x.py"\nRuntimeError: CUDA out of memory'
    globus.service.deliver(globus_task_id, traceback, error=True)
    result = _result_of(_collect(dispatcher, _finished("t1")), "t1")
    assert result.error is not None and result.error.code == ErrorCode.TRAINER_CRASHED
    assert "CUDA out of memory" in result.error.message


@pytest.mark.parametrize(
    ("payload", "code", "words"),
    [
        (
            lambda: JSON.serialize(_result("t1", device={"x": "y" * MAX_RESULT_BYTES})),
            "RESULT_TOO_LARGE",
            "limit",
        ),
        (lambda: JSON.identifier + "{not json", "INVALID_RESULT", "not JSON"),
        (lambda: JSON.serialize([1, 2, 3]), "INVALID_RESULT", "list, not a JSON object"),
        (lambda: JSON.serialize({"task_id": "t1", "bogus": 1}), "INVALID_RESULT", "bogus"),
        (lambda: JSON.serialize(_result("t9")), "INVALID_RESULT", "for task 't9'"),
        (lambda: DillDataBase64().serialize(Unpickled()), "INVALID_RESULT", "DillDataBase64"),
    ],
    ids=["over-64KB", "not-json", "not-an-object", "breaks-contract", "other-task", "pickled"],
)
def test_bad_results_are_refused_mocked_globus(
    globus: Globus, payload: Callable[[], str], code: str, words: str
) -> None:
    """Globus service mocked with globus_sdk.testing: what the result stream brings is checked —
    over 64 KB, not JSON, not an object, not the contract, another task's, or a pickle (which is
    refused by the serializer's allowlist without being loaded)."""
    Recorder.hits.clear()
    dispatcher, globus_task_id = _submit_one(globus)
    globus.service.deliver(globus_task_id, payload())
    result = _result_of(_collect(dispatcher, _finished("t1")), "t1")
    assert result.error is not None and result.error.code == code
    assert words in result.error.message
    assert Recorder.hits == []


def test_endpoint_refusing_a_large_result_is_result_too_large_mocked_globus(globus: Globus) -> None:
    """Globus service mocked with globus_sdk.testing: the endpoint's own 10 MB result cap."""
    dispatcher, globus_task_id = _submit_one(globus)
    text = "MaxResultSizeExceeded(10485761, 10485760)"
    globus.service.deliver(globus_task_id, text, error=True)
    result = _result_of(_collect(dispatcher, _finished("t1")), "t1")
    assert result.error is not None and result.error.code == ErrorCode.RESULT_TOO_LARGE


# -- phases over the HTTP status API -------------------------------------------------------------------


def test_globus_task_states_map_to_phases_mocked_globus(globus: Globus) -> None:
    """Globus service mocked with globus_sdk.testing (/v2/batch_status): waiting-for-nodes stays
    queued, running becomes running (at the execution-start time), and a result the status API
    holds finishes the task even when the result stream never brings it."""
    dispatcher, globus_task_id = _submit_one(globus, status_poll_s=0.02)
    globus.service.set_status(globus_task_id, "waiting-for-nodes")
    events = _collect(dispatcher, lambda ev: len(globus.service.calls("POST", "/v2/batch_status")) >= 2)
    assert [e.phase for e in events] == ["queued"]
    started = time.time() - 5
    globus.service.set_status(globus_task_id, "running", task_transitions={"execution-start": started})
    events += _collect(dispatcher, lambda ev: any(e.phase == "running" for e in ev))
    globus.service.complete(globus_task_id, JSON.serialize(_result("t1")))
    events += _collect(dispatcher, _finished("t1"))
    assert [e.phase for e in events] == ["queued", "running", "finished"]
    assert events[1].at == pytest.approx(started)
    assert _result_of(events, "t1").ok


def test_lost_result_stream_falls_back_to_the_status_api_mocked_globus(globus: Globus) -> None:
    """Globus service mocked with globus_sdk.testing: when the SDK's result stream gives up (it
    fails its open futures), the task is not failed; its result is fetched over HTTP."""
    dispatcher, globus_task_id = _submit_one(globus, status_poll_s=0.02)
    globus.service.watcher(globus_task_id).break_stream(RuntimeError("SDK thread quit unexpectedly."))
    time.sleep(0.1)
    assert [e.phase for e in dispatcher.poll()] == ["queued"]
    globus.service.complete(globus_task_id, JSON.serialize(_result("t1")))
    assert _result_of(_collect(dispatcher, _finished("t1")), "t1").ok


# -- cancel, deadline ----------------------------------------------------------------------------------


def test_cancel_finishes_with_cancelled_and_ignores_a_late_result_mocked_globus(globus: Globus) -> None:
    """Globus service mocked with globus_sdk.testing."""
    dispatcher, globus_task_id = _submit_one(globus)
    dispatcher.cancel("t1", "round closed")
    result = _result_of(_collect(dispatcher, _finished("t1")), "t1")
    assert result.error is not None and result.error.code == ErrorCode.CANCELLED
    assert "round closed" in result.error.message
    globus.service.deliver(globus_task_id, JSON.serialize(_result("t1")))
    time.sleep(0.1)
    assert dispatcher.poll() == []
    stored = json.loads((dispatcher.state_dir / "polaris" / "results" / "t1.json").read_text())
    assert stored["error"]["code"] == "CANCELLED"
    dispatcher.cancel("t1", "again")  # finished: nothing happens
    assert dispatcher.poll() == []


def test_deadline_is_enforced_by_the_backend_mocked_globus(globus: Globus) -> None:
    """Globus service mocked with globus_sdk.testing: the endpoint cannot enforce a deadline."""
    dispatcher = globus.dispatcher()
    dispatcher.submit(_task(deadline=time.time() + 0.2))
    result = _result_of(_collect(dispatcher, _finished("t1")), "t1")
    assert result.error is not None and result.error.code == ErrorCode.DEADLINE_EXCEEDED


# -- restart and reattach ------------------------------------------------------------------------------


def test_reattach_after_restart_reloads_the_persisted_task_group_mocked_globus(globus: Globus) -> None:
    """Globus service mocked with globus_sdk.testing: a new dispatcher (after the first closed
    and its executor shut down) reattaches from the handle and <site>.json: reload_tasks asks
    for the persisted task group, a task that finished meanwhile is delivered, a running one
    reports running and is delivered when its result comes on the result stream."""
    first = globus.dispatcher()
    h1 = first.submit(_task("t1"))
    h2 = first.submit(_task("t2"))
    r1, r2 = _acked(first, "t1"), _acked(first, "t2")
    assert r1["task_group_id"] == r2["task_group_id"]
    group = r1["task_group_id"]
    first.close()
    # While no coordinator listens: t1 finishes, t2 is still running.
    globus.service.complete(r1["globus_task_id"], JSON.serialize(_result("t1")))
    globus.service.set_status(r2["globus_task_id"], "running")

    second = globus.dispatcher()
    second.reattach("t1", h1)
    second.reattach("t2", h2)
    events = _collect(second, _finished("t1"))
    assert [c.request.url.rsplit("/", 1)[-1] for c in globus.service.calls("GET", "/v2/taskgroup/")] == [
        group
    ]
    assert _result_of(events, "t1").ok
    globus.service.deliver(r2["globus_task_id"], JSON.serialize(_result("t2")))
    events += _collect(second, _finished("t2"))
    assert [(e.task_id, e.phase) for e in events] == [
        ("t1", "queued"),
        ("t2", "queued"),
        ("t1", "finished"),
        ("t2", "running"),  # the status API's state, asked right after the reload
        ("t2", "finished"),
    ]
    assert _result_of(events, "t2").ok
    # New tasks go to a new task group of this process, not into the reloaded one.
    second.submit(_task("t3"))
    globus.service.wait_for_tasks(3)
    assert "task_group_id" not in globus.service.submit_bodies[-1]
    # A third dispatcher gets the stored results without asking the service again.
    calls = len(globus.service.rsps.calls)
    third = globus.dispatcher()
    third.reattach("t1", h1)
    assert _result_of(third.poll(), "t1").ok
    assert len(globus.service.rsps.calls) == calls


def test_results_found_by_reload_are_checked_too_mocked_globus(globus: Globus) -> None:
    """Globus service mocked with globus_sdk.testing: results that reload_tasks fetches over HTTP
    (tasks that finished while no coordinator listened) go through the same checks: a pickled
    one is refused unloaded, a remote exception is TRAINER_CRASHED."""
    Recorder.hits.clear()
    first = globus.dispatcher()
    handles = {t: first.submit(_task(t)) for t in ("t1", "t2")}
    records = {t: _acked(first, t) for t in handles}
    first.close()
    globus.service.complete(records["t1"]["globus_task_id"], DillDataBase64().serialize(Unpickled()))
    with globus.service.lock:
        doc = globus.service.tasks[records["t2"]["globus_task_id"]]["doc"]
        doc.update(status="failed", exception="Traceback ...\nValueError: bad plugin", completion_t="1.0")
    second = globus.dispatcher(status_poll_s=None)
    for task_id, handle in handles.items():
        second.reattach(task_id, handle)
    events = _collect(second, lambda ev: _finished("t1")(ev) and _finished("t2")(ev))
    pickled, crashed = _result_of(events, "t1"), _result_of(events, "t2")
    assert pickled.error is not None and pickled.error.code == ErrorCode.INVALID_RESULT
    assert "DillDataBase64" in pickled.error.message
    assert crashed.error is not None and crashed.error.code == ErrorCode.TRAINER_CRASHED
    assert "ValueError: bad plugin" in crashed.error.message
    assert Recorder.hits == []


def test_reattach_problems_mocked_globus(globus: Globus) -> None:
    """Globus service mocked with globus_sdk.testing: a foreign handle is refused; a task with no
    record, or one the service never acknowledged, ends with DISPATCH_FAILED."""
    dispatcher = globus.dispatcher()
    for handle in ("local:polaris:t1", f"gc:{ENDPOINT}:t2", "gc:not-a-uuid:t1"):
        with pytest.raises(DispatchError, match="does not belong"):
            dispatcher.reattach("t1", handle)
    dispatcher.reattach("ghost", f"gc:{ENDPOINT}:ghost")
    result = _result_of(dispatcher.poll(), "ghost")
    assert result.error is not None and result.error.code == ErrorCode.DISPATCH_FAILED
    assert "no record" in result.error.message

    # A record whose Globus task id never came (the coordinator died before the service answered).
    record = {
        "experiment_id": "exp",
        "endpoint_id": ENDPOINT,
        "handle": f"gc:{ENDPOINT}:t5",
        "dispatched_at": 1.0,
    }
    crashed_dir = globus.run_dir.parent / "crashed"
    (crashed_dir / "globus-compute").mkdir(parents=True)
    (crashed_dir / "globus-compute" / "polaris.json").write_text(json.dumps({"tasks": {"t5": record}}))
    crashed = globus.dispatcher(run_dir=crashed_dir)
    crashed.reattach("t5", f"gc:{ENDPOINT}:t5")
    result = _result_of(crashed.poll(), "t5")
    assert result.error is not None and result.error.code == ErrorCode.DISPATCH_FAILED
    assert "before Globus Compute acknowledged" in result.error.message
    assert len(globus.service.rsps.calls) == 0


def test_reattach_in_a_fresh_process_mocked_globus(globus: Globus, tmp_path: Path) -> None:
    """Globus service mocked with globus_sdk.testing (here and in the child process): a process
    that knows only the run directory and the handle reattaches and gets the result."""
    first = globus.dispatcher()
    handle = first.submit(_task())
    record = _acked(first, "t1")
    first.close()
    script = textwrap.dedent(
        f"""
        import json, sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from globus_fixtures import offline_globus_compute
        from globus_compute_sdk.serialize import JSONData
        from fedhpc.coordinator.dispatch import SiteSpec, make_dispatcher

        with offline_globus_compute() as service:
            # The child's mocked service knows the task and its group, and has its result.
            gid, group = {record["globus_task_id"]!r}, {record["task_group_id"]!r}
            service.groups[group] = [gid]
            service.tasks[gid] = {{"task_group_id": group, "doc": {{"task_id": gid, "status": "success",
                "completion_t": "1.0", "result": JSONData().serialize({_result("t1")!r})}}}}
            site = SiteSpec(name="polaris", backend="globus-compute", config={{"endpoint_id": {ENDPOINT!r}}})
            dispatcher = make_dispatcher(site, {str(globus.run_dir)!r})
            dispatcher.reattach("t1", {handle!r})
            events, deadline = [], time.monotonic() + 20
            while not any(e.phase == "finished" for e in events) and time.monotonic() < deadline:
                events += dispatcher.poll()
                time.sleep(0.01)
            dispatcher.close()
            print(json.dumps([[e.phase, e.result.model_dump(mode="json") if e.result else None] for e in events]))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=_child_env(tmp_path)
    )
    assert done.returncode == 0, done.stderr
    events = json.loads(done.stdout.strip().splitlines()[-1])
    assert [phase for phase, _ in events] == ["queued", "finished"]
    assert events[1][1]["task_id"] == "t1" and events[1][1]["error"] is None


def _child_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {CLIENT_ID_ENV: CLIENT_ID, CLIENT_SECRET_ENV: CLIENT_SECRET, "GLOBUS_COMPUTE_USER_DIR": str(tmp_path)}
    )
    env.pop("GLOBUS_SDK_ENVIRONMENT", None)
    return env


def test_sites_on_one_endpoint_share_one_executor_mocked_globus(globus: Globus) -> None:
    """Globus service mocked with globus_sdk.testing: two sites on the same endpoint and user
    endpoint config submit through one Executor (one task group); closing one leaves the other
    working."""
    a = globus.dispatcher(site="a")
    b = globus.dispatcher(site="b")
    a.submit(_task("ta", site="a"))
    b.submit(_task("tb", site="b"))
    ra, rb = _acked(a, "ta"), _acked(b, "tb")
    assert ra["task_group_id"] == rb["task_group_id"]
    a.close()
    globus.service.deliver(rb["globus_task_id"], JSON.serialize(_result("tb")))
    assert _result_of(_collect(b, _finished("tb")), "tb").ok
