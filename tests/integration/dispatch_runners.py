"""Task runners for the local dispatch tests, loaded by the site worker as ``dispatch_runners:run``.

The task's plugin name picks the behaviour; ``site_config.record_dir`` gets one JSON line per
start and end of each run (with the task process's pid), so tests check ordering and process
lifetimes from what the runner saw instead of sleeping and hoping.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Phase = Callable[[str], None]


def _record(task: dict[str, Any], event: str) -> None:
    record_dir = task["site_config"].get("record_dir")
    if record_dir:
        line = json.dumps({"event": event, "at": time.time(), "pid": os.getpid(), "cwd": os.getcwd()})
        with (Path(record_dir) / f"{task['task_id']}.jsonl").open("a") as f:
            f.write(line + "\n")


def _result(task: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "schema": "fedhpc.result/v1",
        "task_id": task["task_id"],
        "num_samples": 10,
        "metrics": {"train_loss": 0.5},
        **extra,
    }


def _succeed(task: dict[str, Any], on_phase: Phase) -> dict[str, Any]:
    on_phase("downloading")
    on_phase("training")
    time.sleep(float(task["plugin"]["hyperparameters"].get("sleep_s", 0.0)))
    on_phase("uploading")
    return _result(task)


def _hang(task: dict[str, Any], on_phase: Phase) -> dict[str, Any]:
    on_phase("training")
    while True:
        time.sleep(60)


def _crash(task: dict[str, Any], on_phase: Phase) -> dict[str, Any]:
    on_phase("training")
    print("about to crash", flush=True)
    os._exit(3)


def _raise(task: dict[str, Any], on_phase: Phase) -> dict[str, Any]:
    raise RuntimeError("boom")


def _oversize(task: dict[str, Any], on_phase: Phase) -> dict[str, Any]:
    return _result(task, metrics={f"m{i:05d}": float(i) for i in range(5000)})


def _invalid(task: dict[str, Any], on_phase: Phase) -> dict[str, Any]:
    return _result(task, num_samples=-1)


def _wrong_id(task: dict[str, Any], on_phase: Phase) -> dict[str, Any]:
    return _result(task, task_id="someone-else")


def _bad_phase(task: dict[str, Any], on_phase: Phase) -> dict[str, Any]:
    on_phase("sightseeing")
    return _succeed(task, on_phase)


_BEHAVIOURS: dict[str, Callable[[dict[str, Any], Phase], dict[str, Any]]] = {
    "succeed": _succeed,
    "hang": _hang,
    "crash": _crash,
    "raise": _raise,
    "oversize": _oversize,
    "invalid": _invalid,
    "wrong_id": _wrong_id,
    "bad_phase": _bad_phase,
}


def run(task: dict[str, Any], *, on_phase: Phase | None = None) -> dict[str, Any]:
    _record(task, "start")
    result = _BEHAVIOURS[task["plugin"]["name"]](task, on_phase or (lambda phase: None))
    _record(task, "end")
    return result
