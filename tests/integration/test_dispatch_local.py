"""The local dispatch backend with real site workers and the runners in dispatch_runners.py:
results and phases, the concurrency limit, every way a task can fail, cancellation, and
surviving the death of the coordinator or of the worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fedhpc.common.contracts import (
    ErrorCode,
    ModelSource,
    PluginSpec,
    TaskResultDoc,
    TaskSpec,
    UpdateTarget,
)
from fedhpc.coordinator.dispatch import DispatchEvent, SiteSpec, make_dispatcher
from fedhpc.coordinator.dispatch.local import LocalDispatcher

pytestmark = pytest.mark.timeout(60)

RUNNERS_DIR = Path(__file__).parent
SITE = "site-a"

MakeDispatcher = Callable[..., LocalDispatcher]


def _site(max_concurrent: int = 1, **config: Any) -> SiteSpec:
    base: dict[str, Any] = {
        "runner": "dispatch_runners:run",
        "env": {"PYTHONPATH": str(RUNNERS_DIR)},
        "poll_interval_s": 0.02,
    }
    return SiteSpec(
        name=SITE, backend="local", config={**base, **config}, max_concurrent_tasks=max_concurrent
    )


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


@pytest.fixture
def record_dir(tmp_path: Path) -> Path:
    path = tmp_path / "records"
    path.mkdir()
    return path


@pytest.fixture
def dispatchers(run_dir: Path) -> Iterator[MakeDispatcher]:
    """Makes dispatchers on one run directory; stops their site workers afterwards."""
    made: list[LocalDispatcher] = []

    def make(max_concurrent: int = 1, **config: Any) -> LocalDispatcher:
        dispatcher = make_dispatcher(_site(max_concurrent, **config), run_dir)
        assert isinstance(dispatcher, LocalDispatcher)
        made.append(dispatcher)
        return dispatcher

    yield make
    for dispatcher in made:
        dispatcher.shutdown()


def _task(
    task_id: str, behaviour: str, record_dir: Path, deadline: float | None = None, **hp: Any
) -> TaskSpec:
    return TaskSpec(
        experiment_id="exp",
        round=0,
        task_id=task_id,
        site=SITE,
        plugin=PluginSpec(name=behaviour, hyperparameters=hp),
        model=ModelSource(model="m", version="v1", sha256="0" * 64, size_bytes=0, path="/dev/null"),
        update=UpdateTarget(object_key=f"updates/{task_id}", path=f"/nonexistent/{task_id}"),
        site_config={"record_dir": str(record_dir)},
        dispatched_at=time.time(),
        deadline=deadline,
    )


def _records(record_dir: Path, task_id: str) -> list[dict[str, Any]]:
    path = record_dir / f"{task_id}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _wait_until(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _poll_until(
    dispatcher: LocalDispatcher, done: Callable[[list[DispatchEvent]], bool], timeout: float = 15.0
) -> list[DispatchEvent]:
    events: list[DispatchEvent] = []
    deadline = time.monotonic() + timeout
    while True:
        events += dispatcher.poll()
        if done(events):
            return events
        if time.monotonic() > deadline:
            log = dispatcher.spool.log_tail(dispatcher.spool.log_file, 3000)
            pytest.fail(f"timed out; events so far: {events}\nworker.log:\n{log}")
        time.sleep(0.02)


def _finished(events: list[DispatchEvent]) -> dict[str, TaskResultDoc]:
    results: dict[str, TaskResultDoc] = {}
    for event in events:
        if event.phase == "finished":
            assert event.task_id not in results, f"task {event.task_id} finished twice"
            assert event.result is not None
            results[event.task_id] = event.result
    return results


def _wait_results(dispatcher: LocalDispatcher, *task_ids: str, timeout: float = 15.0) -> list[DispatchEvent]:
    return _poll_until(dispatcher, lambda events: set(task_ids) <= set(_finished(events)), timeout)


def _error(result: TaskResultDoc) -> ErrorCode:
    assert result.error is not None, f"expected a failure, got {result}"
    return result.error.code


def _alive(pid: int) -> bool:
    """Alive and not a zombie (an exited task process awaiting its reaper is gone for us)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_success_delivers_result_and_every_phase_once(dispatchers: MakeDispatcher, record_dir: Path) -> None:
    dispatcher = dispatchers()
    handle = dispatcher.submit(_task("t1", "succeed", record_dir))
    events = _wait_results(dispatcher, "t1")

    assert handle == "local:site-a:t1"
    phases = [e.phase for e in events]
    assert phases == ["queued", "running", "downloading", "training", "uploading", "finished"]
    times = [e.at for e in events]
    assert times == sorted(times)
    result = _finished(events)["t1"]
    assert result.ok and result.num_samples == 10 and result.metrics == {"train_loss": 0.5}
    # Exactly once: later polls have nothing more to say.
    time.sleep(0.1)
    assert dispatcher.poll() == []
    # The task ran in the site's data directory; the worker logs JSON lines.
    assert _records(record_dir, "t1")[0]["cwd"] == str(dispatcher.data_dir)
    assert all(json.loads(line)["msg"] for line in dispatcher.spool.log_file.read_text().splitlines())


def test_max_concurrent_one_runs_tasks_one_after_another(
    dispatchers: MakeDispatcher, record_dir: Path
) -> None:
    dispatcher = dispatchers(max_concurrent=1)
    for task_id in ("a", "b", "c"):
        dispatcher.submit(_task(task_id, "succeed", record_dir, sleep_s=0.2))
    _wait_results(dispatcher, "a", "b", "c")

    spans = {t: (_records(record_dir, t)[0]["at"], _records(record_dir, t)[1]["at"]) for t in ("a", "b", "c")}
    # Submit order, no overlap.
    assert spans["a"][1] <= spans["b"][0]
    assert spans["b"][1] <= spans["c"][0]


def test_max_concurrent_two_runs_tasks_side_by_side(dispatchers: MakeDispatcher, record_dir: Path) -> None:
    dispatcher = dispatchers(max_concurrent=2)
    for task_id in ("a", "b", "c"):
        dispatcher.submit(_task(task_id, "succeed", record_dir, sleep_s=0.5))
    _wait_results(dispatcher, "a", "b", "c")

    spans = {t: (_records(record_dir, t)[0]["at"], _records(record_dir, t)[1]["at"]) for t in ("a", "b", "c")}
    assert spans["b"][0] < spans["a"][1]  # a and b overlapped
    assert spans["c"][0] >= min(spans["a"][1], spans["b"][1])  # c waited for a free slot


def test_crash_is_reported_with_exit_code_and_output(dispatchers: MakeDispatcher, record_dir: Path) -> None:
    dispatcher = dispatchers()
    dispatcher.submit(_task("t1", "crash", record_dir))
    result = _finished(_wait_results(dispatcher, "t1"))["t1"]

    assert _error(result) == ErrorCode.TRAINER_CRASHED
    assert result.error is not None
    assert "exited with code 3" in result.error.message
    assert "about to crash" in result.error.message


def test_runner_that_raises_is_reported_crashed(dispatchers: MakeDispatcher, record_dir: Path) -> None:
    dispatcher = dispatchers()
    dispatcher.submit(_task("t1", "raise", record_dir))
    result = _finished(_wait_results(dispatcher, "t1"))["t1"]

    assert _error(result) == ErrorCode.TRAINER_CRASHED
    assert result.error is not None and "RuntimeError: boom" in result.error.message


@pytest.mark.parametrize(
    ("behaviour", "code"),
    [
        ("oversize", ErrorCode.RESULT_TOO_LARGE),
        ("invalid", ErrorCode.INVALID_RESULT),
        ("wrong_id", ErrorCode.INVALID_RESULT),
    ],
)
def test_bad_results_are_replaced_by_failures(
    dispatchers: MakeDispatcher, record_dir: Path, behaviour: str, code: ErrorCode
) -> None:
    dispatcher = dispatchers()
    dispatcher.submit(_task("t1", behaviour, record_dir))
    assert _error(_finished(_wait_results(dispatcher, "t1"))["t1"]) == code


def test_unknown_phase_from_runner_is_ignored(dispatchers: MakeDispatcher, record_dir: Path) -> None:
    dispatcher = dispatchers()
    dispatcher.submit(_task("t1", "bad_phase", record_dir))
    events = _wait_results(dispatcher, "t1")
    assert [e.phase for e in events] == [
        "queued",
        "running",
        "downloading",
        "training",
        "uploading",
        "finished",
    ]


def test_hang_past_deadline_is_killed(dispatchers: MakeDispatcher, record_dir: Path) -> None:
    dispatcher = dispatchers()
    # A worker up first, so that the deadline cannot pass while it starts (a loaded machine).
    dispatcher.submit(_task("warm-up", "succeed", record_dir))
    _wait_results(dispatcher, "warm-up")
    dispatcher.submit(_task("t1", "hang", record_dir, deadline=time.time() + 1.0))
    events = _wait_results(dispatcher, "t1")

    assert "training" in [e.phase for e in events]  # it ran, and was killed
    assert _error(_finished(events)["t1"]) == ErrorCode.DEADLINE_EXCEEDED
    pid = _records(record_dir, "t1")[0]["pid"]
    _wait_until(lambda: not _alive(pid), "the hung task process to die")


def test_deadline_passed_while_queued_never_runs(dispatchers: MakeDispatcher, record_dir: Path) -> None:
    dispatcher = dispatchers()
    dispatcher.submit(_task("t1", "succeed", record_dir, deadline=time.time() - 1))
    events = _wait_results(dispatcher, "t1")

    assert _error(_finished(events)["t1"]) == ErrorCode.DEADLINE_EXCEEDED
    assert [e.phase for e in events] == ["queued", "finished"]
    assert _records(record_dir, "t1") == []


def test_cancel_running_and_queued_tasks(dispatchers: MakeDispatcher, record_dir: Path) -> None:
    dispatcher = dispatchers(max_concurrent=1)
    dispatcher.submit(_task("running", "hang", record_dir))
    dispatcher.submit(_task("queued", "succeed", record_dir))
    _poll_until(dispatcher, lambda events: any(e.phase == "training" for e in events))

    dispatcher.cancel("queued", "operator stopped the experiment")
    dispatcher.cancel("running", "operator stopped the experiment")
    results = _finished(_wait_results(dispatcher, "running", "queued"))

    assert _error(results["running"]) == ErrorCode.CANCELLED
    assert _error(results["queued"]) == ErrorCode.CANCELLED
    assert results["queued"].error is not None
    assert "operator stopped the experiment" in results["queued"].error.message
    assert _records(record_dir, "queued") == []  # dropped from the queue, never started
    pid = _records(record_dir, "running")[0]["pid"]
    _wait_until(lambda: not _alive(pid), "the cancelled task process to die")
    # Cancelling a finished task changes nothing.
    dispatcher.cancel("running", "again")
    time.sleep(0.1)
    assert dispatcher.poll() == []


def test_submit_twice_runs_once(dispatchers: MakeDispatcher, record_dir: Path) -> None:
    dispatcher = dispatchers()
    task = _task("t1", "succeed", record_dir, sleep_s=0.2)
    first = dispatcher.submit(task)
    second = dispatcher.submit(task)
    events = _wait_results(dispatcher, "t1")
    third = dispatcher.submit(task)  # after it finished
    time.sleep(0.2)
    events += dispatcher.poll()

    assert first == second == third
    assert len(_finished(events)) == 1
    assert [r["event"] for r in _records(record_dir, "t1")] == ["start", "end"]


def test_results_survive_a_coordinator_killed_with_sigkill(
    dispatchers: MakeDispatcher, run_dir: Path, record_dir: Path
) -> None:
    """A coordinator process submits two tasks and is killed with SIGKILL; a new dispatcher
    reattaches and gets both results (one finished while nobody watched) exactly once."""
    site = _site(max_concurrent=2)
    tasks = [_task("quick", "succeed", record_dir), _task("slow", "succeed", record_dir, sleep_s=1.0)]
    script = textwrap.dedent(
        """
        import json, os, signal, sys
        from pathlib import Path
        from fedhpc.common.contracts import parse_task
        from fedhpc.coordinator.dispatch import SiteSpec, make_dispatcher
        site, run_dir, tasks = json.loads(sys.stdin.read())
        dispatcher = make_dispatcher(SiteSpec.model_validate(site), Path(run_dir))
        handles = {t["task_id"]: dispatcher.submit(parse_task(t)) for t in tasks}
        print(json.dumps(handles), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    payload = json.dumps(
        [site.model_dump(), str(run_dir), [json.loads(t.model_dump_json(by_alias=True)) for t in tasks]]
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], input=payload, capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    handles = json.loads(proc.stdout)

    dispatcher = dispatchers(max_concurrent=2)
    _wait_until(lambda: dispatcher.spool.result_path("quick").exists(), "the quick task to finish unobserved")
    worker_pid = dispatcher.spool.read_pid()
    for task_id, handle in handles.items():
        dispatcher.reattach(task_id, handle)
    events = _wait_results(dispatcher, "quick", "slow")
    time.sleep(0.1)
    events += dispatcher.poll()

    results = _finished(events)  # asserts once each
    assert results["quick"].ok and results["slow"].ok
    quick_phases = [e.phase for e in events if e.task_id == "quick"]
    assert quick_phases == ["finished"]  # phases from before the restart are not replayed
    assert dispatcher.spool.read_pid() == worker_pid  # the same worker carried on


def test_worker_killed_with_sigkill_orphans_crash_and_new_tasks_run(
    dispatchers: MakeDispatcher, record_dir: Path
) -> None:
    dispatcher = dispatchers()
    dispatcher.submit(_task("orphan", "hang", record_dir))
    _poll_until(dispatcher, lambda events: any(e.phase == "training" for e in events))
    old_worker = dispatcher.spool.read_pid()
    assert old_worker is not None
    task_pid = _records(record_dir, "orphan")[0]["pid"]

    os.kill(old_worker, signal.SIGKILL)
    result = _finished(_wait_results(dispatcher, "orphan"))["orphan"]

    assert _error(result) == ErrorCode.TRAINER_CRASHED
    assert result.error is not None and "site worker died" in result.error.message
    _wait_until(lambda: not _alive(task_pid), "the orphaned task process to die with its worker")
    dispatcher.submit(_task("after", "succeed", record_dir))
    assert _finished(_wait_results(dispatcher, "after"))["after"].ok
    assert dispatcher.spool.read_pid() not in (None, old_worker)


def test_shutdown_stops_worker_and_its_tasks(dispatchers: MakeDispatcher, record_dir: Path) -> None:
    dispatcher = dispatchers()
    dispatcher.submit(_task("t1", "hang", record_dir))
    _poll_until(dispatcher, lambda events: any(e.phase == "training" for e in events))
    worker_pid = dispatcher.spool.read_pid()
    assert worker_pid is not None
    task_pid = _records(record_dir, "t1")[0]["pid"]

    dispatcher.shutdown()

    assert not _alive(worker_pid)
    _wait_until(lambda: not _alive(task_pid), "the task process to stop")
    result = _finished(_wait_results(dispatcher, "t1"))["t1"]
    assert _error(result) == ErrorCode.TRAINER_CRASHED
    assert result.error is not None and "SIGTERM" in result.error.message
    assert not dispatcher.spool.pid_file.exists()


def test_runner_that_cannot_be_imported_fails_tasks(dispatchers: MakeDispatcher, record_dir: Path) -> None:
    dispatcher = dispatchers(runner="dispatch_runners:no_such_runner")
    dispatcher.submit(_task("t1", "succeed", record_dir))
    result = _finished(_wait_results(dispatcher, "t1"))["t1"]

    assert _error(result) == ErrorCode.DISPATCH_FAILED
    assert result.error is not None and "dispatch_runners:no_such_runner" in result.error.message


def test_worker_that_cannot_start_fails_tasks(dispatchers: MakeDispatcher, record_dir: Path) -> None:
    dispatcher = dispatchers(python="false")  # starts, exits 1 at once: never ready
    dispatcher.submit(_task("t1", "succeed", record_dir))
    result = _finished(_wait_results(dispatcher, "t1"))["t1"]

    assert _error(result) == ErrorCode.DISPATCH_FAILED
    assert result.error is not None and "failed to start 3 times" in result.error.message


def test_idle_worker_exits_and_restarts_on_demand(dispatchers: MakeDispatcher, record_dir: Path) -> None:
    dispatcher = dispatchers(idle_exit_s=0.2)
    dispatcher.submit(_task("t1", "succeed", record_dir))
    _wait_results(dispatcher, "t1")
    _wait_until(lambda: not dispatcher._worker_pids(), "the idle worker to exit")

    dispatcher.submit(_task("t2", "succeed", record_dir))
    assert _finished(_wait_results(dispatcher, "t2"))["t2"].ok
