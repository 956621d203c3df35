"""The local backend's site config and the checks submit/reattach make before touching a worker."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedhpc.common.contracts import ErrorCode, ModelSource, PluginSpec, TaskSpec, UpdateTarget
from fedhpc.coordinator.dispatch import DispatchError, SiteSpec, make_dispatcher
from fedhpc.coordinator.dispatch.local import LocalDispatcher
from fedhpc.coordinator.dispatch.worker import DEFAULT_RUNNER, WORKER_MODULE, StatusEntry

_made: list[LocalDispatcher] = []


@pytest.fixture(autouse=True)
def _no_workers_left() -> Iterator[None]:
    """None of these tests should start a site worker; fail (and stop it) if one did."""
    yield
    started = [d for d in _made if d._worker_pids()]
    for dispatcher in _made:
        dispatcher.shutdown()
    _made.clear()
    assert not started, "a site worker was started"


def _dispatcher(tmp_path: Path, max_concurrent: int = 1, **config: Any) -> LocalDispatcher:
    site = SiteSpec(name="s1", backend="local", config=config, max_concurrent_tasks=max_concurrent)
    dispatcher = make_dispatcher(site, tmp_path / "run")
    assert isinstance(dispatcher, LocalDispatcher)
    _made.append(dispatcher)
    return dispatcher


def _task(task_id: str = "t1", site: str = "s1") -> TaskSpec:
    return TaskSpec(
        experiment_id="exp",
        round=0,
        task_id=task_id,
        site=site,
        plugin=PluginSpec(name="digits"),
        model=ModelSource(model="m", version="v1", sha256="0" * 64, size_bytes=0, path="/dev/null"),
        update=UpdateTarget(object_key="k", path="/tmp/k"),
        dispatched_at=time.time(),
    )


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"pythn": "python3"}, "config.pythn"),
        ({"python": "/no/such/python"}, "config.python"),
        ({"runner": "not a path"}, "config.runner"),
        ({"poll_interval_s": 0}, "config.poll_interval_s"),
        ({"idle_exit_s": -1}, "config.idle_exit_s"),
        ({"env": {"A": 1}}, "config.env.A"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, config: dict[str, Any], key: str) -> None:
    with pytest.raises(DispatchError) as info:
        _dispatcher(tmp_path, **config)
    assert key in str(info.value) and "'s1'" in str(info.value)


def test_defaults_and_worker_command(tmp_path: Path) -> None:
    dispatcher = _dispatcher(tmp_path, max_concurrent=3)
    assert dispatcher.data_dir == dispatcher.spool.root / "data"
    assert dispatcher.data_dir.is_dir()
    assert dispatcher._worker_command() == [
        sys.executable,
        "-m",
        WORKER_MODULE,
        "--spool",
        str(dispatcher.spool.root),
        "--max-concurrent",
        "3",
        "--runner",
        DEFAULT_RUNNER,
        "--poll-interval-s",
        "0.1",
    ]


def test_python_is_resolved_on_path_and_idle_exit_is_passed(tmp_path: Path) -> None:
    dispatcher = _dispatcher(tmp_path, python="sh", idle_exit_s=30, data_dir=str(tmp_path / "data"))
    command = dispatcher._worker_command()
    assert Path(command[0]).is_absolute() and Path(command[0]).name == "sh"
    assert command[-2:] == ["--idle-exit-s", "30.0"]
    assert dispatcher.data_dir == tmp_path / "data"


def test_submit_refuses_another_sites_task_and_unsafe_ids(tmp_path: Path) -> None:
    dispatcher = _dispatcher(tmp_path)
    with pytest.raises(DispatchError, match="for site 'elsewhere'"):
        dispatcher.submit(_task(site="elsewhere"))
    for bad in ("../escape", ".hidden", "a/b", "x" * 201):
        with pytest.raises(DispatchError, match="cannot name a spool file"):
            dispatcher.submit(_task(task_id=bad))
    assert list(dispatcher.spool.tasks.iterdir()) == []
    with pytest.raises(DispatchError, match="cannot name a spool file"):
        dispatcher.cancel("../../x", "no")
    with pytest.raises(DispatchError, match="cannot name a spool file"):
        dispatcher.reattach("../x", "local:s1:../x")


def test_reattach_refuses_a_foreign_handle(tmp_path: Path) -> None:
    dispatcher = _dispatcher(tmp_path)
    for handle in ("local:s2:t1", "local:s1:t2", "globus:abc"):
        with pytest.raises(DispatchError, match="does not belong"):
            dispatcher.reattach("t1", handle)


def test_reattach_of_a_task_the_spool_never_saw_finishes_it(tmp_path: Path) -> None:
    dispatcher = _dispatcher(tmp_path)
    dispatcher.reattach("lost", "local:s1:lost")
    events = dispatcher.poll()
    assert [e.phase for e in events] == ["finished"]
    result = events[0].result
    assert result is not None and result.error is not None
    assert result.error.code == ErrorCode.DISPATCH_FAILED
    assert dispatcher.poll() == []


def test_reattach_delivers_a_stored_result_once(tmp_path: Path) -> None:
    dispatcher = _dispatcher(tmp_path)
    dispatcher.spool.write_result_once("t1", '{"task_id": "t1", "num_samples": 7}')
    dispatcher.reattach("t1", "local:s1:t1")
    dispatcher.reattach("t1", "local:s1:t1")
    events = dispatcher.poll()
    assert [(e.phase, e.result.num_samples if e.result else None) for e in events] == [("finished", 7)]
    assert dispatcher.poll() == []


def test_a_corrupt_result_file_becomes_invalid_result(tmp_path: Path) -> None:
    dispatcher = _dispatcher(tmp_path)
    dispatcher.spool.write_result_once("t1", "{not json")
    dispatcher.reattach("t1", "local:s1:t1")
    (event,) = dispatcher.poll()
    assert event.result is not None and event.result.error is not None
    assert event.result.error.code == ErrorCode.INVALID_RESULT


def test_cancel_of_an_unknown_or_finished_task_does_nothing(tmp_path: Path) -> None:
    dispatcher = _dispatcher(tmp_path)
    dispatcher.cancel("nobody", "why not")
    dispatcher.spool.write_result_once("done", '{"task_id": "done"}')
    dispatcher.cancel("done", "too late")
    assert dispatcher.spool.cancel_requests() == {}


def test_a_task_id_used_by_another_experiment_is_refused(tmp_path: Path) -> None:
    dispatcher = _dispatcher(tmp_path)
    dispatcher.spool.write_status("t1", [StatusEntry("queued", 1.0)], experiment_id="older-exp")
    dispatcher.spool.write_result_once("t1", '{"task_id": "t1"}')
    with pytest.raises(DispatchError, match="already used by experiment 'older-exp'"):
        dispatcher.submit(_task("t1"))


def test_resubmitting_a_finished_task_delivers_its_result_without_running_it(tmp_path: Path) -> None:
    dispatcher = _dispatcher(tmp_path)
    dispatcher.spool.write_status("t1", [StatusEntry("queued", 1.0)], experiment_id="exp")
    dispatcher.spool.write_result_once("t1", '{"task_id": "t1", "num_samples": 5}')
    assert dispatcher.submit(_task("t1")) == "local:s1:t1"
    events = dispatcher.poll()
    assert [e.phase for e in events] == ["queued", "finished"]
    assert events[-1].result is not None and events[-1].result.num_samples == 5
    assert dispatcher.spool.queued() == []
