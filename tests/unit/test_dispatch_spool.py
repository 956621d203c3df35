"""The local backend's spool protocol and the worker's pure helpers (no worker process here)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedhpc.common.contracts import (
    MAX_RESULT_BYTES,
    ErrorCode,
    ModelSource,
    PluginSpec,
    TaskSpec,
    Timings,
    parse_result,
)
from fedhpc.coordinator.dispatch.worker import (
    WORKER_MODULE,
    Spool,
    StatusEntry,
    check_task_id,
    describe_exit,
    fail_waiting,
    is_worker_process,
    load_runner,
    settle_orphans,
    validate_output,
)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.create()
    return spool


def _task(task_id: str) -> TaskSpec:
    return TaskSpec(
        experiment_id="exp",
        round=0,
        task_id=task_id,
        site="s1",
        mode="evaluate",
        plugin=PluginSpec(name="digits"),
        model=ModelSource(model="m", version="v1", sha256="0" * 64, size_bytes=0, path="/dev/null"),
        dispatched_at=time.time(),
    )


def _result(task_id: str, **extra: object) -> bytes:
    return json.dumps({"task_id": task_id, **extra}).encode()


@pytest.mark.parametrize("task_id", ["t1", "exp-1.r3:site_a@2", "A" * 200, "0", "_x"])
def test_safe_task_ids(task_id: str) -> None:
    assert check_task_id(task_id) == task_id


@pytest.mark.parametrize("task_id", ["", ".", "..", ".x", "-x", "a/b", "a b", "a\\b", "A" * 201, "é"])
def test_unsafe_task_ids(task_id: str) -> None:
    with pytest.raises(ValueError, match="cannot name a spool file"):
        check_task_id(task_id)


def test_queue_is_in_submit_order_not_name_order(spool: Spool) -> None:
    base = time.time_ns()
    for offset, task_id in enumerate(["zeta", "alpha", "mid"]):
        spool.write_task(_task(task_id), base + offset)
    assert spool.queued() == ["zeta", "alpha", "mid"]
    assert json.loads(spool.task_path("alpha").read_text())["task_id"] == "alpha"
    assert not [p for p in spool.tasks.iterdir() if p.name.startswith(".")]  # no temp files left


def test_claim_moves_a_task_once_and_where_follows_it(spool: Spool) -> None:
    spool.write_task(_task("t1"), time.time_ns())
    assert spool.where("t1") == "queued"
    assert spool.claim("t1")
    assert not spool.claim("t1")
    assert spool.where("t1") == "running"
    assert spool.running_ids() == ["t1"]
    assert spool.write_result_once("t1", '{"task_id": "t1"}')
    spool.running_path("t1").unlink()
    assert spool.where("t1") == "finished"
    assert spool.where("never") is None


def test_first_result_wins(spool: Spool) -> None:
    assert spool.write_result_once("t1", "first")
    assert not spool.write_result_once("t1", "second")
    stored = spool.read_result("t1")
    assert stored is not None and stored[0] == b"first"
    assert spool.read_result("t2") is None
    assert [p.name for p in spool.results.iterdir()] == ["t1.json"]


def test_status_keeps_latest_phase_and_history(spool: Spool) -> None:
    spool.write_status("t1", [StatusEntry("queued", 1.0)])
    spool.append_status("t1", "running", 2.0)
    spool.append_status("t1", "training", 3.0)
    doc = json.loads(spool.status_path("t1").read_text())
    assert (doc["phase"], doc["at"]) == ("training", 3.0)
    assert spool.read_status("t1") == [
        StatusEntry("queued", 1.0),
        StatusEntry("running", 2.0),
        StatusEntry("training", 3.0),
    ]
    assert spool.status_experiment("t1") is None
    spool.write_status("t2", [StatusEntry("queued", 1.0)], experiment_id="exp")
    spool.append_status("t2", "running", 2.0)
    assert spool.status_experiment("t2") == "exp"
    assert spool.read_status("missing") == []
    spool.status_path("bad").write_text("{")
    assert spool.read_status("bad") == []


def test_cancel_requests(spool: Spool) -> None:
    spool.request_cancel("t1", "operator said so")
    (spool.cancel / ".t2.123.tmp").write_text("half written")
    assert spool.cancel_requests() == {"t1": "operator said so"}
    spool.clear_cancel("t1")
    spool.clear_cancel("t1")
    assert "t1" not in spool.cancel_requests()


def test_pid_file_and_log_tail(spool: Spool) -> None:
    assert spool.read_pid() is None
    spool.write_pid(1234)
    assert spool.read_pid() == 1234
    spool.pid_file.write_text("garbage")
    assert spool.read_pid() is None
    spool.log_file.write_text("x" * 5000 + "\nthe end\n")
    assert spool.log_tail(spool.log_file, 20).endswith("the end")
    assert len(spool.log_tail(spool.log_file, 20)) <= 20
    assert spool.log_tail(spool.root / "nope.log") == ""


def test_validate_output_keeps_a_good_result_verbatim() -> None:
    raw = _result("t1", num_samples=3)
    assert validate_output("t1", raw, Timings()) == raw.decode()


@pytest.mark.parametrize(
    ("raw", "code", "words"),
    [
        (
            _result("t1", metrics={f"k{i}": 1.0 for i in range(MAX_RESULT_BYTES // 8)}),
            "RESULT_TOO_LARGE",
            "limit",
        ),
        (b"[1, 2]", "INVALID_RESULT", "invalid result"),
        (b"not json", "INVALID_RESULT", "invalid result"),
        (_result("t1", num_samples=-1), "INVALID_RESULT", "num_samples"),
        (_result("t2"), "INVALID_RESULT", "for task 't2'"),
    ],
)
def test_validate_output_replaces_bad_results(raw: bytes, code: str, words: str) -> None:
    doc = parse_result(validate_output("t1", raw, Timings(dispatched_at=5.0)))
    assert doc.task_id == "t1"
    assert doc.error is not None and doc.error.code == code and words in doc.error.message
    assert doc.timings.dispatched_at == 5.0


def test_describe_exit() -> None:
    assert describe_exit(3 << 8) == "exited with code 3"
    assert describe_exit(signal.SIGKILL) == "was killed by SIGKILL"


def test_load_runner() -> None:
    assert load_runner("json:dumps") is json.dumps
    with pytest.raises(TypeError, match="module:function"):
        load_runner("json.dumps")
    with pytest.raises(TypeError, match="not callable"):
        load_runner("json:__name__")
    with pytest.raises(ImportError):
        load_runner("no_such_module_xyz:run")
    with pytest.raises(AttributeError):
        load_runner("json:no_such_function")


def test_settle_orphans(spool: Spool) -> None:
    for task_id in ("returned", "cancelled", "crashed", "done"):
        spool.write_task(_task(task_id), time.time_ns())
        assert spool.claim(task_id)
    spool.output_path("returned").write_bytes(_result("returned", num_samples=4))
    spool.request_cancel("cancelled", "stop")
    spool.write_result_once("done", '{"task_id": "done", "num_samples": 9}')

    assert sorted(settle_orphans(spool)) == ["cancelled", "crashed", "done", "returned"]

    results = {
        t: parse_result(spool.result_path(t).read_bytes())
        for t in ("returned", "cancelled", "crashed", "done")
    }
    assert results["returned"].ok and results["returned"].num_samples == 4
    assert results["cancelled"].error is not None and results["cancelled"].error.code == ErrorCode.CANCELLED
    assert results["crashed"].error is not None and results["crashed"].error.code == ErrorCode.TRAINER_CRASHED
    assert results["done"].num_samples == 9
    assert spool.running_ids() == []
    assert list(spool.outputs.iterdir()) == []
    assert spool.cancel_requests() == {}


def test_fail_waiting(spool: Spool) -> None:
    spool.write_task(_task("a"), time.time_ns())
    spool.write_task(_task("b"), time.time_ns() + 1)
    assert fail_waiting(spool, ErrorCode.DISPATCH_FAILED, "no runner") == ["a", "b"]
    assert spool.queued() == [] and spool.running_ids() == []
    doc = parse_result(spool.result_path("b").read_bytes())
    assert (
        doc.error is not None
        and doc.error.code == ErrorCode.DISPATCH_FAILED
        and doc.error.message == "no runner"
    )


def test_is_worker_process_checks_command_line_and_spool(spool: Spool) -> None:
    assert not is_worker_process(os.getpid(), spool.root)
    code = "import time; time.sleep(60)"
    fake = subprocess.Popen([sys.executable, "-c", code, WORKER_MODULE, "--spool", str(spool.root)])
    try:
        deadline = time.monotonic() + 10
        while not is_worker_process(fake.pid, spool.root):
            assert time.monotonic() < deadline, "the fake worker never showed its command line"
            time.sleep(0.01)
        assert not is_worker_process(fake.pid, spool.root / "other")
        fake.kill()
        deadline = time.monotonic() + 10
        while is_worker_process(fake.pid, spool.root):  # a zombie no longer counts
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        fake.kill()
        fake.wait()
    assert not is_worker_process(fake.pid, spool.root)
