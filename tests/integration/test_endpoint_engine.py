"""The endpoint-engine dispatch backend on the real Globus Compute endpoint engine
(``GlobusComputeEngine`` + Parsl's ``LocalProvider``): real worker pools run
``fedhpc.trainer.run_task`` on digits tasks whose model and update are files in tmp_path.

* a train task: ``queued`` -> ``running`` -> ``finished`` with a verified update; idempotent
  submit; a worker that dies mid-task (``TRAINER_CRASHED``) and the engine going on after it;
  cancel and a passed deadline (the result that comes later is dropped);
* reattach after a coordinator restart and bad handles, config errors naming their key;
* every way a worker's message becomes a result (crafted messagepack ``Result`` s);
* ``container_type: apptainer``: the worker pool is launched as
  ``apptainer run {options} {image} globus-compute-endpoint python-exec
  parsl.executors.high_throughput.process_worker_pool ...`` (through the shim in
  ``apptainer_shim/``, which logs the line and execs the command as the image's runscript does),
  with CurveZMQ encryption on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import globus_compute_endpoint  # noqa: F401  - the hpc extra: a missing package must fail, not skip
import pytest
from globus_compute_common import messagepack
from globus_compute_common.messagepack.message_types import Result, ResultErrorDetails
from globus_compute_sdk.serialize import ComputeSerializer, JSONData, PureSourceTextInspect

from fedhpc.common.contracts import ErrorCode, ModelSource, PluginSpec, TaskSpec, UpdateTarget
from fedhpc.common.tensors import write_safetensors_file
from fedhpc.coordinator.dispatch import DispatchError, DispatchEvent, SiteSpec, make_dispatcher
from fedhpc.coordinator.dispatch.endpoint_engine import (
    ENGINE_RESTARTED_MESSAGE,
    EndpointEngineDispatcher,
    pack_task,
    result_from_message,
)
from fedhpc.coordinator.dispatch.globus_compute import FUNCTION_NAME, FUNCTION_SOURCE
from fedhpc.trainer import make_initial_weights

# Engines start in 3-7 s on an idle machine; other test runs may share its two cores.
pytestmark = pytest.mark.timeout(300)

HERE = Path(__file__).resolve().parent
SHIM_DIR = HERE / "apptainer_shim"
# tests/e2e/fault_plugins.py: a digits plugin whose trainer dies on request (site_config fault).
FAULT_PLUGINS = HERE.parent / "e2e"
SITE = "hpc-a"
WAIT_S = 180.0


# -- helpers ------------------------------------------------------------------------------------------


def _site(**config: Any) -> SiteSpec:
    base: dict[str, Any] = {"strategy_period_s": 0.5}
    return SiteSpec(name=SITE, backend="endpoint-engine", config={**base, **config})


class Files:
    """The global model (digits initial weights) and the update targets, in one directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.model_path = root / "model.safetensors"
        blob = write_safetensors_file(self.model_path, make_initial_weights("digits", {}, 0))
        self.model = ModelSource(
            model="exp", version="r0000", sha256=blob.sha256, size_bytes=blob.size, path=str(self.model_path)
        )

    def task(
        self,
        task_id: str,
        *,
        plugin: str = "digits",
        site_config: dict[str, Any] | None = None,
        deadline: float | None = None,
    ) -> TaskSpec:
        return TaskSpec(
            experiment_id="exp",
            round=1,
            task_id=task_id,
            site=SITE,
            plugin=PluginSpec(name=plugin, hyperparameters={}),
            model=self.model,
            update=UpdateTarget(
                object_key=f"updates/{task_id}", path=str(self.root / f"{task_id}.safetensors")
            ),
            site_config={"partition": 0, "num_partitions": 2, **(site_config or {})},
            dispatched_at=time.time(),
            deadline=deadline,
        )


def _poll_until(
    dispatcher: EndpointEngineDispatcher, done: Callable[[list[DispatchEvent]], bool], timeout: float = WAIT_S
) -> list[DispatchEvent]:
    events: list[DispatchEvent] = []
    deadline = time.monotonic() + timeout
    while not done(events):
        if time.monotonic() > deadline:
            logs = sorted(dispatcher.engine_dir.rglob("*.log")) + sorted(dispatcher.engine_dir.rglob("*.err"))
            tails = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-1500:]}" for p in logs)
            pytest.fail(f"timed out; events so far: {events}\n{tails}")
        events += dispatcher.poll()
        time.sleep(0.05)
    return events


def _finished(task_ids: set[str]) -> Callable[[list[DispatchEvent]], bool]:
    return lambda events: task_ids <= {e.task_id for e in events if e.phase == "finished"}


def _of(events: list[DispatchEvent], task_id: str) -> list[DispatchEvent]:
    return [e for e in events if e.task_id == task_id]


def _result(events: list[DispatchEvent], task_id: str) -> Any:
    (finished,) = [e for e in _of(events, task_id) if e.phase == "finished"]
    assert finished.result is not None
    return finished.result


# -- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    return Files(tmp_path_factory.mktemp("engine-files"))


@pytest.fixture(scope="module")
def engine_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EndpointEngineDispatcher]:
    """One site (one engine, two workers) shared by the tests that run tasks: an engine start
    costs seconds. Its workers find the fault plugin through the site's ``env``."""
    dispatcher = make_dispatcher(
        # A dead worker is noticed within heartbeat_period_s (Parsl's default: 30 s).
        _site(max_workers_per_node=2, heartbeat_period_s=2, env={"PYTHONPATH": str(FAULT_PLUGINS)}),
        tmp_path_factory.mktemp("engine-run"),
    )
    assert isinstance(dispatcher, EndpointEngineDispatcher)
    try:
        yield dispatcher
    finally:
        dispatcher.shutdown()


@pytest.fixture
def idle_dispatchers(tmp_path: Path) -> Iterator[Callable[..., EndpointEngineDispatcher]]:
    """Dispatchers that are never given a task (their engine never starts); closed afterwards."""
    made: list[EndpointEngineDispatcher] = []

    def make(**config: Any) -> EndpointEngineDispatcher:
        dispatcher = make_dispatcher(_site(**config), tmp_path / "run")
        assert isinstance(dispatcher, EndpointEngineDispatcher)
        made.append(dispatcher)
        return dispatcher

    yield make
    for dispatcher in made:
        dispatcher.close()


# -- tasks on the real engine -------------------------------------------------------------------------


def test_train_task_runs_on_a_worker_and_returns_a_verified_update(
    engine_site: EndpointEngineDispatcher, files: Files
) -> None:
    task = files.task("train-1")
    handle = engine_site.submit(task)
    assert handle.startswith(f"endpoint-engine:{SITE}:") and handle.endswith(":train-1")
    events = _poll_until(engine_site, _finished({"train-1"}))
    assert [e.phase for e in _of(events, "train-1")] == ["queued", "running", "finished"]
    result = _result(events, "train-1")
    assert result.ok, result.error
    assert result.num_samples > 0 and "eval_accuracy" in result.metrics
    assert result.timings.dispatched_at == task.dispatched_at
    assert result.timings.started_at >= task.dispatched_at
    update = Path(files.root / "train-1.safetensors")
    assert result.update is not None and result.update.object_key == "updates/train-1"
    assert result.update.size_bytes == update.stat().st_size
    assert result.update.sha256 == hashlib.sha256(update.read_bytes()).hexdigest()
    # The worker ran in the engine's task directory, not the coordinator's cwd.
    assert (engine_site.engine_dir / "tasks").is_dir()

    # Idempotent: the same id again is the same task, not a second run.
    assert engine_site.submit(task) == handle
    time.sleep(1.0)
    assert engine_site.poll() == []


def test_a_worker_that_dies_is_trainer_crashed_and_the_engine_goes_on(
    engine_site: EndpointEngineDispatcher, files: Files
) -> None:
    crash = files.task("crash-1", plugin="fault_plugins:FaultyDigits", site_config={"fault": "crash"})
    engine_site.submit(crash)
    events = _poll_until(engine_site, _finished({"crash-1"}))
    result = _result(events, "crash-1")
    assert result.error is not None and result.error.code == ErrorCode.TRAINER_CRASHED
    assert "WorkerLost" in result.error.message, result.error.message
    assert [e.phase for e in _of(events, "crash-1")] in (
        ["queued", "running", "finished"],
        ["queued", "finished"],
    )

    # Parsl replaces the dead worker; the site keeps running tasks.
    engine_site.submit(files.task("after-crash"))
    events = _poll_until(engine_site, _finished({"after-crash"}))
    assert _result(events, "after-crash").ok


def test_cancel_and_a_passed_deadline_finish_the_task_and_drop_its_late_result(
    engine_site: EndpointEngineDispatcher, files: Files
) -> None:
    engine_site.submit(files.task("cancel-me"))
    engine_site.cancel("cancel-me", "round closed")
    engine_site.cancel("cancel-me", "again")  # a second cancel changes nothing
    engine_site.submit(files.task("late", deadline=time.time() - 1))
    engine_site.cancel("never-submitted", "no such task")
    events = _poll_until(engine_site, _finished({"cancel-me", "late"}), timeout=5)
    cancelled = _result(events, "cancel-me")
    assert cancelled.error is not None and cancelled.error.code == ErrorCode.CANCELLED
    assert "round closed" in cancelled.error.message
    late = _result(events, "late")
    assert late.error is not None and late.error.code == ErrorCode.DEADLINE_EXCEEDED
    assert "deadline passed" in late.error.message
    # Both still run at the site (the engine cannot withdraw a task); what they return is dropped.
    _poll_until(engine_site, lambda _: (files.root / "cancel-me.safetensors").exists())
    engine_site.submit(files.task("marker"))
    events = _poll_until(engine_site, _finished({"marker"}))
    assert {e.task_id for e in events} == {"marker"}


def test_a_site_whose_workers_cannot_start_fails_its_tasks_with_the_cause(
    tmp_path: Path, files: Files
) -> None:
    # No apptainer on the job's PATH: every block exits 127 and Parsl gives up on the engine.
    dispatcher = make_dispatcher(
        _site(container_type="apptainer", container_uri="/fake/trainer.sif", env={"PATH": "/usr/bin:/bin"}),
        tmp_path / "run",
    )
    assert isinstance(dispatcher, EndpointEngineDispatcher)
    try:
        dispatcher.submit(files.task("no-apptainer"))
        events = _poll_until(dispatcher, _finished({"no-apptainer"}))
    finally:
        dispatcher.shutdown()
    result = _result(events, "no-apptainer")
    assert result.error is not None and result.error.code == ErrorCode.DISPATCH_FAILED
    assert "apptainer: command not found" in result.error.message, result.error.message
    assert "EXIT CODE: 127" in result.error.message


# -- without an engine --------------------------------------------------------------------------------


def test_reattach_after_a_restart_fails_the_task_so_the_strategy_retries(
    idle_dispatchers: Callable[..., EndpointEngineDispatcher],
) -> None:
    before = idle_dispatchers()
    after = idle_dispatchers()  # the next coordinator process
    handle = f"endpoint-engine:{SITE}:{uuid.uuid4().hex}:exp.r0001-hpc-a"
    after.reattach("exp.r0001-hpc-a", handle)
    after.reattach("exp.r0001-hpc-a", handle)  # once only
    (event,) = after.poll()
    assert event.phase == "finished" and event.result is not None and event.result.error is not None
    assert event.result.error.code == ErrorCode.TRAINER_CRASHED
    assert event.result.error.message == ENGINE_RESTARTED_MESSAGE
    assert after.poll() == []
    for bad in (
        f"local:{SITE}:exp.r0001-hpc-a",
        f"endpoint-engine:other-site:{uuid.uuid4().hex}:exp.r0001-hpc-a",
        f"endpoint-engine:{SITE}:{uuid.uuid4().hex}:another-task",
        f"endpoint-engine:{SITE}:",
    ):
        with pytest.raises(DispatchError, match="does not belong"):
            before.reattach("exp.r0001-hpc-a", bad)
    with pytest.raises(DispatchError, match="cannot name"):
        before.reattach("../etc", f"endpoint-engine:{SITE}:x:../etc")


def test_tasks_for_another_site_and_bad_ids_are_refused(
    idle_dispatchers: Callable[..., EndpointEngineDispatcher], files: Files
) -> None:
    dispatcher = idle_dispatchers()
    with pytest.raises(DispatchError, match="is for site"):
        dispatcher.submit(files.task("t").model_copy(update={"site": "elsewhere"}))
    with pytest.raises(DispatchError, match="cannot name"):
        dispatcher.submit(files.task("-bad"))
    assert dispatcher.poll() == []


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"bogus": 1}, "config.bogus: Extra inputs are not permitted"),
        ({"provider": "lsf"}, "config.provider: Input should be 'local', 'pbspro' or 'slurm'"),
        (
            {"provider_options": {"queue": "debug"}},
            "config.provider_options.queue: not an option of parsl's LocalProvider",
        ),
        ({"provider": "pbspro", "provider_options": {"partition": "x"}}, "config.provider_options.partition"),
        (
            {"provider_options": {"launcher": "NoSuchLauncher"}},
            "config.provider_options.launcher: unknown launcher",
        ),
        (
            {"provider_options": {"launcher": {"type": "MpiExecLauncher", "nope": 1}}},
            "config.provider_options.launcher",
        ),
        ({"provider_options": {"worker_init": 3}}, "config.provider_options.worker_init: must be a string"),
        ({"container_type": "apptainer"}, "config.container_uri: required when container_type is apptainer"),
        ({"container_uri": "/x.sif"}, "config.container_uri: only used with container_type: apptainer"),
        ({"container_type": "docker", "container_uri": "x"}, "config.container_type"),
        (
            {"container_type": "apptainer", "container_uri": "/x.sif", "container_cmd_options": "-B '/x"},
            "config.container_cmd_options",
        ),
        ({"max_workers_per_node": 0}, "config.max_workers_per_node"),
        ({"env": {"A-B": "1"}}, "config.env"),
        ({"strategy_period_s": 0}, "config.strategy_period_s"),
        (
            {"heartbeat_period_s": 30, "heartbeat_threshold_s": 30},
            "config.heartbeat_threshold_s: must be longer",
        ),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, config: dict[str, Any], message: str) -> None:
    with pytest.raises(DispatchError, match=f"endpoint-engine site '{SITE}': .*{re.escape(message)}"):
        make_dispatcher(SiteSpec(name=SITE, backend="endpoint-engine", config=config), tmp_path)


def test_batch_provider_options_are_accepted_including_protobuf_doubles(tmp_path: Path) -> None:
    # Site configs arrive through protobuf Structs: every number is a double.
    config = {
        "provider": "pbspro",
        "provider_options": {
            "account": "FLtrain",
            "queue": "debug",
            "walltime": "01:00:00",
            "nodes_per_block": 2.0,
            "init_blocks": 0.0,
            "max_blocks": 4.0,
            "select_options": "ngpus=4",
            "worker_init": "module load conda",
            "launcher": {
                "type": "MpiExecLauncher",
                "bind_cmd": "--cpu-bind",
                "overrides": "--depth=64 --ppn 1",
            },
        },
        "max_workers_per_node": 4.0,
        "available_accelerators": 4.0,
        "address": "10.1.2.3",
        "container_type": "apptainer",
        "container_uri": "/lus/images/trainer.sif",
        "container_cmd_options": "--nv -B /lus/data",
    }
    dispatcher = make_dispatcher(SiteSpec(name=SITE, backend="endpoint-engine", config=config), tmp_path)
    assert isinstance(dispatcher, EndpointEngineDispatcher)
    assert dispatcher.config.use_encryption  # not loopback: CurveZMQ on by default
    assert dispatcher.config.max_workers_per_node == 4
    dispatcher.close()


# -- packing and results ------------------------------------------------------------------------------


def test_a_task_is_packed_as_an_endpoint_receives_it(files: Files) -> None:
    task = files.task("pack-1")
    gc_task_id = uuid.uuid4()
    message = messagepack.unpack(pack_task(task, gc_task_id))
    assert message.task_id == gc_task_id
    # What the globus-compute backend registers, as the service hands it to an endpoint: source
    # text (no pickle), and the task document as JSON.
    serde = ComputeSerializer(allowed_deserializer_types=[PureSourceTextInspect, JSONData])
    code, args, kwargs = serde.unpack_buffers(message.task_buffer)
    assert code == f"st\n{FUNCTION_NAME}:{FUNCTION_SOURCE}"
    assert args.startswith("11\n") and kwargs == "11\n{}"
    function, (document,), extra = serde.unpack_and_deserialize(message.task_buffer)
    assert function.__name__ == FUNCTION_NAME and extra == {}
    assert TaskSpec.model_validate(document) == task
    assert "from fedhpc.trainer import run_task" in FUNCTION_SOURCE


def _message(data: str, error_code: str | None = None) -> bytes:
    details = None if error_code is None else ResultErrorDetails(code=error_code, user_message="remote error")
    packed: bytes = messagepack.pack(Result(task_id=uuid.uuid4(), data=data, error_details=details))
    return packed


def _json(document: Any) -> str:
    return "11\n" + json.dumps(document)


@pytest.mark.parametrize(
    ("data", "error_code", "engine_failed", "code", "text"),
    [
        (_json({"task_id": "r-1", "num_samples": 3}), None, False, None, ""),
        (
            _json({"task_id": "r-1", "metrics": {f"m{i}": 0.5 for i in range(6000)}}),
            None,
            False,
            "RESULT_TOO_LARGE",
            "over the 65536-byte limit",
        ),
        (_json({"task_id": "r-1", "num_samples": -1}), None, False, "INVALID_RESULT", "num_samples"),
        (_json({"task_id": "someone-else"}), None, False, "INVALID_RESULT", "for task 'someone-else'"),
        (_json([1, 2]), None, False, "INVALID_RESULT", "invalid result"),
        ("00\ngASVBAAAAAAAAABLAS4=\n", None, False, "INVALID_RESULT", "not JSON data"),
        (
            "MaxResultSizeExceeded(11000000, 10485760)",
            "MaxResultSizeExceeded",
            False,
            "RESULT_TOO_LARGE",
            "11000000",
        ),
        (
            "Traceback ...\nZeroDivisionError: division by zero\n",
            "RemoteExecutionError",
            False,
            "TRAINER_CRASHED",
            "ZeroDivisionError: division by zero",
        ),
        (
            "BadStateException: block failed: apptainer: not found",
            "RemoteExecutionError",
            True,
            "DISPATCH_FAILED",
            "apptainer: not found",
        ),
    ],
)
def test_worker_messages_become_results(
    files: Files, data: str, error_code: str | None, engine_failed: bool, code: str | None, text: str
) -> None:
    task = files.task("r-1")
    result = result_from_message(task, _message(data, error_code), engine_failed=engine_failed)
    assert result.task_id == "r-1"
    if code is None:
        assert result.ok and result.num_samples == 3
        return
    assert result.error is not None and result.error.code == code
    assert text in result.error.message
    assert result.timings.dispatched_at == task.dispatched_at


def test_an_unreadable_message_is_an_invalid_result(files: Files) -> None:
    result = result_from_message(files.task("r-2"), b"\x00not messagepack")
    assert result.error is not None and result.error.code == ErrorCode.INVALID_RESULT


# -- the container launch -----------------------------------------------------------------------------


def test_apptainer_launches_the_worker_pool_as_image_runscript_arguments(
    tmp_path: Path, files: Files
) -> None:
    shim_log = tmp_path / "apptainer.log"
    path = os.pathsep.join([str(SHIM_DIR), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    dispatcher = make_dispatcher(
        _site(
            container_type="apptainer",
            container_uri="/fake/trainer.sif",
            container_cmd_options="--nv -B /data",
            encrypted=True,
            # The job script exports these before the launch: the shim is found first on PATH.
            env={"PATH": path, "APPTAINER_SHIM_LOG": str(shim_log)},
        ),
        tmp_path / "run",
    )
    assert isinstance(dispatcher, EndpointEngineDispatcher)
    try:
        dispatcher.submit(files.task("in-container"))
        events = _poll_until(dispatcher, _finished({"in-container"}))
    finally:
        dispatcher.shutdown()
    result = _result(events, "in-container")
    assert result.ok, result.error
    assert [e.phase for e in _of(events, "in-container")] == ["queued", "running", "finished"]

    (line,) = shim_log.read_text().splitlines()
    words = shlex.split(line)
    assert words[:8] == [
        "run",
        "--nv",
        "-B",
        "/data",
        "/fake/trainer.sif",
        "globus-compute-endpoint",
        "python-exec",
        "parsl.executors.high_throughput.process_worker_pool",
    ]
    worker_args = words[8:]
    assert "--max_workers_per_node=1" in worker_args
    # Encrypted: the pool gets the engine's certificate directory, not "None".
    cert_dir = worker_args[worker_args.index("--cert_dir") + 1]
    assert cert_dir != "None" and Path(cert_dir).is_dir()


# -- a coordinator killed with SIGKILL ----------------------------------------------------------------

_KILLED_COORDINATOR = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    from fedhpc.common.contracts import TaskSpec
    from fedhpc.coordinator.dispatch import SiteSpec, make_dispatcher

    run_dir, task_file, site_json = sys.argv[1:]
    dispatcher = make_dispatcher(SiteSpec.model_validate_json(site_json), Path(run_dir))
    dispatcher.submit(TaskSpec.model_validate_json(Path(task_file).read_text()))
    deadline = time.monotonic() + 150
    while not any(e.phase == "finished" for e in dispatcher.poll()):
        if time.monotonic() > deadline:
            sys.exit(3)
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _pools_under(run_dir: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "process_worker_pool" in cmdline and str(run_dir) in cmdline and _alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_the_engine_of_a_killed_coordinator_is_stopped_by_the_next_one(tmp_path: Path, files: Files) -> None:
    run_dir = tmp_path / "run"
    # Short heartbeats: a worker pool exits this soon after its interchange is gone.
    site = _site(heartbeat_period_s=1, heartbeat_threshold_s=3)
    task_file = tmp_path / "task.json"
    task_file.write_text(files.task("before-kill").model_dump_json(by_alias=True))
    output = tmp_path / "coordinator.out"
    with output.open("wb") as out:
        # A file, not a pipe: the orphans would hold a pipe open and the wait would never end.
        coordinator = subprocess.run(
            [sys.executable, "-c", _KILLED_COORDINATOR, str(run_dir), str(task_file), site.model_dump_json()],
            timeout=240,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    assert coordinator.returncode == -signal.SIGKILL, output.read_text(errors="replace")[-3000:]
    engine_dir = run_dir / "endpoint-engine" / SITE
    state = json.loads((engine_dir / "engine.json").read_text())
    helpers = [p["pid"] for p in state["processes"]]  # the interchange and the monitoring router
    pools = _pools_under(run_dir)
    try:
        assert helpers and all(_alive(pid) for pid in helpers)
        assert pools, "the killed coordinator's worker pool is not running"

        # `fedhpc down` (or the next engine start at this site) stops the orphans; the pool
        # follows once it misses the interchange's heartbeats.
        dispatcher = make_dispatcher(site, run_dir)
        dispatcher.shutdown()
        assert _wait_gone(helpers, timeout=15) == []
        assert _wait_gone(pools, timeout=30) == []
        assert not (engine_dir / "engine.json").exists()
    finally:
        for pid in [*helpers, *pools]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
