"""The ``local`` backend's spool and its site worker process.

A site's spool is a directory (``<run_dir>/sites/<site>/``); the coordinator's dispatcher and
the site worker talk only through it, so either can die and restart without losing a task::

    tasks/<id>.json      submitted, waiting (the task document; mtime = submit order)
    running/<id>.json    claimed by the worker (moved here from tasks/ with os.replace)
    outputs/<id>.json    what the task's runner returned, before the worker checked it
    results/<id>.json    the final result document (written once: first writer wins)
    status/<id>.json     latest phase + time, and every phase so far
    cancel/<id>          cancellation request (the reason)
    logs/<id>.log        the task process's stdout and stderr
    worker.pid  worker.lock  worker.log

Every file appears atomically (written aside, then renamed or linked into place) and a task
moves tasks/ -> running/ -> results/ creating the next file before removing the previous one,
so a reader that looks in that order always finds it.

The worker (``python -m fedhpc.coordinator.dispatch.worker --spool DIR``) imports the task
runner once, then forks one child per task, at most ``--max-concurrent`` at a time, in submit
order. A crash, a kill or a hang costs only that task.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import importlib
import json
import os
import re
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from fedhpc.common.contracts import (
    MAX_RESULT_BYTES,
    ContractError,
    ErrorCode,
    TaskErrorDoc,
    TaskResultDoc,
    TaskSpec,
    Timings,
    encode_result,
    encode_task,
    parse_result,
    parse_task,
)
from fedhpc.common.logging import configure_logging, get_logger, log_context

__all__ = [
    "DEFAULT_RUNNER",
    "RUNNER_PHASES",
    "WORKER_MODULE",
    "Runner",
    "Spool",
    "StatusEntry",
    "Worker",
    "check_task_id",
    "describe_exit",
    "error_result",
    "fail_waiting",
    "is_worker_process",
    "load_runner",
    "main",
    "settle_orphans",
    "validate_output",
]

WORKER_MODULE = "fedhpc.coordinator.dispatch.worker"

# Not __name__: run with -m, that is "__main__", and the log should say which module wrote it.
log = get_logger(WORKER_MODULE)
DEFAULT_RUNNER = "fedhpc.trainer:run_task"
#: Phases a runner may report through ``on_phase``; anything else is logged and ignored.
RUNNER_PHASES = ("downloading", "evaluating", "training", "uploading")
# Task ids become file names: no separators, no leading dot, bounded length.
_TASK_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@+=-]{0,199}")
# How much of a task's log a TRAINER_CRASHED message quotes (the message limit is 4096).
_LOG_TAIL_CHARS = 1500

Runner = Callable[..., Any]


def check_task_id(task_id: str) -> str:
    """The id, if it is safe as a file name; else ValueError saying what is allowed."""
    if not _TASK_ID.fullmatch(task_id):
        raise ValueError(
            f"task id {task_id!r} cannot name a spool file: use 1-200 of A-Z a-z 0-9 _ . : @ + = - "
            "(not starting with '.' or '-')"
        )
    return task_id


def error_result(
    task_id: str, code: ErrorCode, message: str, timings: Timings | None = None
) -> TaskResultDoc:
    """A failure result for a task the caller may only know by id."""
    return TaskResultDoc(
        task_id=task_id,
        error=TaskErrorDoc(code=code, message=message[:4096]),
        timings=timings or Timings(),
    )


def describe_exit(wait_status: int) -> str:
    code = os.waitstatus_to_exitcode(wait_status)
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


def validate_output(task_id: str, raw: bytes, timings: Timings) -> str:
    """The result text to store for what a runner returned: the runner's own document when it
    satisfies the contract, else a RESULT_TOO_LARGE / INVALID_RESULT failure result."""
    if len(raw) > MAX_RESULT_BYTES:
        message = f"the trainer's result is {len(raw)} bytes of JSON, over the {MAX_RESULT_BYTES}-byte limit"
        return encode_result(error_result(task_id, ErrorCode.RESULT_TOO_LARGE, message, timings))
    try:
        doc = parse_result(raw)
    except ContractError as exc:
        return encode_result(error_result(task_id, ErrorCode.INVALID_RESULT, str(exc), timings))
    if doc.task_id != task_id:
        message = f"the trainer returned a result for task {doc.task_id!r}, not {task_id!r}"
        return encode_result(error_result(task_id, ErrorCode.INVALID_RESULT, message, timings))
    return raw.decode()


def load_runner(path: str) -> Runner:
    """Import ``module:function``; ImportError/AttributeError/TypeError say what is wrong."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise TypeError(f"runner {path!r} is not of the form module:function")
    target = getattr(importlib.import_module(module_name), attr)
    if not callable(target):
        raise TypeError(f"runner {path!r} is not callable")
    runner: Runner = target
    return runner


# -- the spool ----------------------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes) -> None:
    # No fsync: the spool must survive a killed process, not a lost machine, and a fsync per
    # phase change would make status updates the slowest part of a short task.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class StatusEntry:
    phase: str
    at: float


class Spool:
    """The file protocol between a site's dispatcher and its worker (see the module docstring)."""

    SUBDIRS = ("tasks", "running", "outputs", "results", "status", "cancel", "logs")

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tasks = self.root / "tasks"
        self.running = self.root / "running"
        self.outputs = self.root / "outputs"
        self.results = self.root / "results"
        self.status = self.root / "status"
        self.cancel = self.root / "cancel"
        self.logs = self.root / "logs"
        self.pid_file = self.root / "worker.pid"
        self.lock_file = self.root / "worker.lock"
        self.log_file = self.root / "worker.log"

    def create(self) -> None:
        for name in self.SUBDIRS:
            (self.root / name).mkdir(parents=True, exist_ok=True)

    # paths
    def task_path(self, task_id: str) -> Path:
        return self.tasks / f"{task_id}.json"

    def running_path(self, task_id: str) -> Path:
        return self.running / f"{task_id}.json"

    def output_path(self, task_id: str) -> Path:
        return self.outputs / f"{task_id}.json"

    def result_path(self, task_id: str) -> Path:
        return self.results / f"{task_id}.json"

    def status_path(self, task_id: str) -> Path:
        return self.status / f"{task_id}.json"

    def cancel_path(self, task_id: str) -> Path:
        return self.cancel / task_id

    def task_log_path(self, task_id: str) -> Path:
        return self.logs / f"{task_id}.log"

    # tasks
    def write_task(self, task: TaskSpec, submitted_ns: int) -> None:
        """Queue a task; its mtime is set to ``submitted_ns`` before it appears, so the worker
        can order the queue by a stat instead of reading every file."""
        path = self.task_path(task.task_id)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(encode_task(task))
        os.utime(tmp, ns=(submitted_ns, submitted_ns))
        os.replace(tmp, path)

    def queued(self) -> list[str]:
        """Ids of the waiting tasks, oldest submission first."""
        entries: list[tuple[int, str]] = []
        for path in self.tasks.glob("*.json"):
            with contextlib.suppress(FileNotFoundError):  # claimed meanwhile
                entries.append((path.stat().st_mtime_ns, path.stem))
        return [task_id for _, task_id in sorted(entries)]

    def running_ids(self) -> list[str]:
        return sorted(path.stem for path in self.running.glob("*.json"))

    def claim(self, task_id: str) -> bool:
        """Move a waiting task to running/; False if someone else moved or removed it first."""
        try:
            os.replace(self.task_path(task_id), self.running_path(task_id))
        except FileNotFoundError:
            return False
        return True

    def where(self, task_id: str) -> str | None:
        """ "queued", "running", "finished", or None if the spool has never seen the task.

        Looks in the order a task moves, so a task moving meanwhile is still found."""
        if self.task_path(task_id).exists():
            return "queued"
        if self.running_path(task_id).exists():
            return "running"
        if self.result_path(task_id).exists():
            return "finished"
        return None

    # status
    def _read_status_doc(self, task_id: str) -> dict[str, Any]:
        try:
            doc = json.loads(self.status_path(task_id).read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def read_status(self, task_id: str) -> list[StatusEntry]:
        try:
            return [
                StatusEntry(str(e["phase"]), float(e["at"]))
                for e in self._read_status_doc(task_id)["history"]
            ]
        except (KeyError, TypeError, ValueError):
            return []

    def status_experiment(self, task_id: str) -> str | None:
        """The experiment that submitted this task id (recorded at submit), if known."""
        owner = self._read_status_doc(task_id).get("experiment_id")
        return owner if isinstance(owner, str) else None

    def write_status(
        self, task_id: str, history: list[StatusEntry], experiment_id: str | None = None
    ) -> None:
        latest = history[-1]
        doc: dict[str, Any] = {
            "task_id": task_id,
            "phase": latest.phase,
            "at": latest.at,
            "history": [{"phase": e.phase, "at": e.at} for e in history],
        }
        if experiment_id is not None:
            doc["experiment_id"] = experiment_id
        _atomic_write(self.status_path(task_id), json.dumps(doc).encode())

    def append_status(self, task_id: str, phase: str, at: float) -> None:
        # Only one process writes a task's status at a time (dispatcher before the task is
        # queued, worker at claim, then the task's process), so read-modify-write is safe.
        history = [*self.read_status(task_id), StatusEntry(phase, at)]
        self.write_status(task_id, history, self.status_experiment(task_id))

    # results
    def write_result_once(self, task_id: str, text: str) -> bool:
        """Store the result unless one exists (True if this call stored it). A hard link
        cannot replace an existing file, so of two racing writers (a child's late result,
        the worker's DEADLINE_EXCEEDED) exactly one wins."""
        path = self.result_path(task_id)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink()
        return True

    def read_result(self, task_id: str) -> tuple[bytes, float] | None:
        """(the result document, when it was written) or None."""
        path = self.result_path(task_id)
        try:
            return path.read_bytes(), path.stat().st_mtime
        except FileNotFoundError:
            return None

    # cancellation
    def request_cancel(self, task_id: str, reason: str) -> None:
        _atomic_write(self.cancel_path(task_id), reason.encode())

    def cancel_requests(self) -> dict[str, str]:
        requests: dict[str, str] = {}
        for path in self.cancel.iterdir():
            if path.name.startswith("."):
                continue
            with contextlib.suppress(FileNotFoundError):
                requests[path.name] = path.read_text(errors="replace")
        return requests

    def clear_cancel(self, task_id: str) -> None:
        self.cancel_path(task_id).unlink(missing_ok=True)

    # worker bookkeeping
    def read_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def write_pid(self, pid: int) -> None:
        _atomic_write(self.pid_file, f"{pid}\n".encode())

    def log_tail(self, path: Path, chars: int = _LOG_TAIL_CHARS) -> str:
        try:
            with path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - chars))
                return f.read().decode(errors="replace").strip()
        except FileNotFoundError:
            return ""


def is_worker_process(pid: int, spool_root: Path) -> bool:
    """Whether ``pid`` is a live site worker for this spool (not a reused pid, not a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return False
        # No procfs (macOS): the best we can do is "some process has that pid".
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    except OSError:
        return False
    args = [a.decode(errors="replace") for a in raw.split(b"\0")]
    # A zombie's cmdline is empty, so an exited worker awaiting its parent counts as gone.
    return WORKER_MODULE in args and str(spool_root) in args


# -- the task process (a forked child of the worker) ------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this process if the worker dies (Linux), so a worker killed with
    SIGKILL leaves no task running that nobody will ever collect."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the worker died before prctl took effect
        os._exit(1)


def _redirect_output(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _call_runner(runner: Runner, task: TaskSpec, on_phase: Callable[[str], None]) -> str:
    """What to put in outputs/: the runner's result as JSON, or why there is none."""
    timings = Timings(dispatched_at=task.dispatched_at, started_at=time.time())
    try:
        result = runner(json.loads(encode_task(task)), on_phase=on_phase)
    except Exception as exc:
        # run_task never raises for task-level problems, so this is a bug or a broken install.
        traceback.print_exc()
        message = f"the task runner raised {type(exc).__name__}: {exc}"
        return encode_result(error_result(task.task_id, ErrorCode.TRAINER_CRASHED, message, timings))
    try:
        return json.dumps(result)
    except (TypeError, ValueError) as exc:
        message = f"the task runner returned something that is not JSON ({type(result).__name__}): {exc}"
        return encode_result(error_result(task.task_id, ErrorCode.INVALID_RESULT, message, timings))


def _child_main(spool: Spool, task: TaskSpec, runner: Runner, parent: int, close_fds: list[int]) -> NoReturn:
    code = 0
    try:
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)  # own group: killing the task kills whatever it started too
        _die_with_parent(parent)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        for fd in close_fds:  # the worker's lock: a stray task must not keep a new worker out
            with contextlib.suppress(OSError):
                os.close(fd)
        _redirect_output(spool.task_log_path(task.task_id))

        def on_phase(phase: str) -> None:
            if phase not in RUNNER_PHASES:
                log.warning("ignoring unknown task phase", extra={"phase": phase})
                return
            spool.append_status(task.task_id, phase, time.time())

        text = _call_runner(runner, task, on_phase)
        _atomic_write(spool.output_path(task.task_id), text.encode())
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 70
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


# -- the worker ---------------------------------------------------------------------------------------


@dataclass
class _Child:
    task: TaskSpec
    pid: int
    started_at: float
    aborted: bool = False

    def timings(self) -> Timings:
        return Timings(
            dispatched_at=self.task.dispatched_at, started_at=self.started_at, finished_at=time.time()
        )


class Worker:
    """Runs a spool's tasks: claims them in submit order, forks one process per task, enforces
    deadlines and cancellations, and turns every way a task process can end into a result."""

    def __init__(
        self,
        spool: Spool,
        runner: Runner,
        max_concurrent: int,
        *,
        poll_interval_s: float = 0.1,
        idle_exit_s: float | None = None,
        inherited_fds: list[int] | None = None,
    ) -> None:
        self.spool = spool
        self.runner = runner
        self.max_concurrent = max_concurrent
        self.poll_interval_s = poll_interval_s
        self.idle_exit_s = idle_exit_s
        self._inherited_fds = inherited_fds or []
        self._children: dict[int, _Child] = {}
        self._stop_signal: int | None = None

    def request_stop(self, signum: int, _frame: FrameType | None = None) -> None:
        self._stop_signal = signum

    def run(self) -> int:
        idle_since = time.monotonic()
        while self._stop_signal is None:
            self._reap()
            self._handle_cancels()
            self._enforce_deadlines()
            waiting = self._start_queued()
            if self._children or waiting:
                idle_since = time.monotonic()
            elif self.idle_exit_s is not None and time.monotonic() - idle_since >= self.idle_exit_s:
                log.info("site worker idle; exiting", extra={"idle_exit_s": self.idle_exit_s})
                break
            time.sleep(self.poll_interval_s)
        if self._stop_signal is not None:
            name = signal.Signals(self._stop_signal).name
            log.info("site worker stopping", extra={"signal": name, "running": len(self._children)})
            self._abort_all(f"the site worker was stopped ({name}) while the task was running")
        return 0

    # tasks
    def _start_queued(self) -> int:
        """Start waiting tasks while there is room; returns how many still wait."""
        queued = self.spool.queued()
        started = 0
        for task_id in queued:
            if len(self._children) >= self.max_concurrent:
                break
            started += 1
            if self.spool.claim(task_id):
                self._begin(task_id)
        return len(queued) - started

    def _begin(self, task_id: str) -> None:
        """Run a claimed task (or finish it at once if it cannot run)."""
        now = time.time()
        try:
            task = parse_task(self.spool.running_path(task_id).read_bytes())
        except (ContractError, FileNotFoundError) as exc:
            self._finish_now(task_id, error_result(task_id, ErrorCode.INVALID_TASK, str(exc)))
            return
        if self.spool.result_path(task_id).exists():  # already ran (a resubmitted id)
            self.spool.running_path(task_id).unlink(missing_ok=True)
            return
        if task.deadline is not None and now >= task.deadline:
            waited = now - task.dispatched_at
            message = (
                f"the deadline passed before the task could start (it was dispatched {waited:.1f} s ago)"
            )
            timings = Timings(dispatched_at=task.dispatched_at, finished_at=now)
            self._finish_now(task_id, error_result(task_id, ErrorCode.DEADLINE_EXCEEDED, message, timings))
            return
        self.spool.append_status(task_id, "running", now)
        self._fork(task, now)

    def _fork(self, task: TaskSpec, now: float) -> None:
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            _child_main(self.spool, task, self.runner, parent, self._inherited_fds)
        with contextlib.suppress(OSError):  # the child does it too; whoever is first wins
            os.setpgid(pid, pid)
        self._children[pid] = _Child(task=task, pid=pid, started_at=now)
        log.info("task started", extra={"task": task.task_id, "pid": pid, "running": len(self._children)})

    def _finish_now(self, task_id: str, doc: TaskResultDoc) -> None:
        """Record the result of a claimed task that never got a process."""
        self.spool.write_result_once(task_id, encode_result(doc))
        self.spool.running_path(task_id).unlink(missing_ok=True)
        log.info("task finished", extra={"task": task_id, "error": doc.error.code.value if doc.error else ""})

    # children
    def _reap(self) -> None:
        while self._children:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self._children.pop(pid, None)
            if child is not None:
                self._collect(child, wait_status)

    def _collect(self, child: _Child, wait_status: int) -> None:
        """Turn an exited task process into its result: what it returned, checked, or why none."""
        task_id = child.task.task_id
        output = self.spool.output_path(task_id)
        try:
            raw: bytes | None = output.read_bytes()
        except FileNotFoundError:
            raw = None
        if raw is not None:
            text = validate_output(task_id, raw, child.timings())
        else:
            tail = self.spool.log_tail(self.spool.task_log_path(task_id))
            message = f"the task process {describe_exit(wait_status)} without returning a result"
            if tail:
                message += f"; last output:\n{tail}"
            text = encode_result(error_result(task_id, ErrorCode.TRAINER_CRASHED, message, child.timings()))
        stored = self.spool.write_result_once(task_id, text)
        output.unlink(missing_ok=True)
        self.spool.running_path(task_id).unlink(missing_ok=True)
        log.info(
            "task process exited",
            extra={"task": task_id, "pid": child.pid, "exit": describe_exit(wait_status), "stored": stored},
        )

    def _abort(self, child: _Child, code: ErrorCode, message: str) -> None:
        """Record why the task ends (first result wins), then kill its process group."""
        self.spool.write_result_once(
            child.task.task_id,
            encode_result(error_result(child.task.task_id, code, message, child.timings())),
        )
        child.aborted = True
        for kill in (os.killpg, os.kill):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(child.pid, signal.SIGKILL)
        log.info("task killed", extra={"task": child.task.task_id, "pid": child.pid, "code": code.value})

    def _abort_all(self, message: str) -> None:
        for child in list(self._children.values()):
            self._abort(child, ErrorCode.TRAINER_CRASHED, message)
        for pid, child in list(self._children.items()):
            with contextlib.suppress(ChildProcessError):
                _, wait_status = os.waitpid(pid, 0)
                self._collect(child, wait_status)
            self._children.pop(pid, None)

    def _enforce_deadlines(self) -> None:
        now = time.time()
        for child in list(self._children.values()):
            deadline = child.task.deadline
            if deadline is not None and now >= deadline and not child.aborted:
                ran = now - child.started_at
                self._abort(
                    child, ErrorCode.DEADLINE_EXCEEDED, f"the deadline passed after {ran:.1f} s of running"
                )

    def _handle_cancels(self) -> None:
        requests = self.spool.cancel_requests()
        if not requests:
            return
        by_task = {child.task.task_id: child for child in self._children.values()}
        for task_id, reason in requests.items():
            message = f"cancelled: {reason}" if reason else "cancelled"
            child = by_task.get(task_id)
            if child is not None:
                if not child.aborted:
                    self._abort(child, ErrorCode.CANCELLED, message)
            elif self.spool.claim(task_id):
                self._finish_now(task_id, error_result(task_id, ErrorCode.CANCELLED, message))
            # else: already finished, or unknown here: nothing to stop.
            self.spool.clear_cancel(task_id)


def settle_orphans(spool: Spool) -> list[str]:
    """Settle tasks a previous worker left in running/: deliver what they returned if they got
    that far, else report them crashed (or cancelled, if that was asked). Returns their ids."""
    cancels = spool.cancel_requests()
    settled = spool.running_ids()
    for task_id in settled:
        if spool.result_path(task_id).exists():
            pass
        elif spool.output_path(task_id).exists():
            spool.write_result_once(
                task_id, validate_output(task_id, spool.output_path(task_id).read_bytes(), Timings())
            )
        elif task_id in cancels:
            reason = cancels[task_id]
            doc = error_result(
                task_id, ErrorCode.CANCELLED, f"cancelled: {reason}" if reason else "cancelled"
            )
            spool.write_result_once(task_id, encode_result(doc))
        else:
            message = "the site worker died while the task was running; the task's process died with it"
            spool.write_result_once(
                task_id, encode_result(error_result(task_id, ErrorCode.TRAINER_CRASHED, message))
            )
        spool.output_path(task_id).unlink(missing_ok=True)
        spool.running_path(task_id).unlink(missing_ok=True)
        spool.clear_cancel(task_id)
        log.info("orphaned task settled", extra={"task": task_id})
    return settled


def fail_waiting(spool: Spool, code: ErrorCode, message: str) -> list[str]:
    """Finish every waiting task with the same error (the worker cannot run any of them)."""
    failed = []
    for task_id in spool.queued():
        if spool.claim(task_id):
            spool.write_result_once(task_id, encode_result(error_result(task_id, code, message)))
            spool.running_path(task_id).unlink(missing_ok=True)
            failed.append(task_id)
    return failed


@contextlib.contextmanager
def _spool_lock(spool: Spool) -> Iterator[int | None]:
    """The spool's exclusive lock (fd) or None if another worker holds it."""
    fd = os.open(spool.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        yield fd
    finally:
        os.close(fd)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m {WORKER_MODULE}",
        description="A local site's worker: runs the tasks queued in a spool directory.",
    )
    parser.add_argument("--spool", type=Path, required=True, help="the site's spool directory")
    parser.add_argument("--max-concurrent", type=int, default=1, help="tasks running at once (default 1)")
    parser.add_argument(
        "--runner", default=DEFAULT_RUNNER, help=f"module:function (default {DEFAULT_RUNNER})"
    )
    parser.add_argument(
        "--poll-interval-s", type=float, default=0.1, help="spool scan interval (default 0.1)"
    )
    parser.add_argument(
        "--idle-exit-s",
        type=float,
        default=None,
        help="exit after this long with nothing to do (default: never)",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if args.max_concurrent < 1:
        parser.error("--max-concurrent must be at least 1")
    if args.poll_interval_s <= 0:
        parser.error("--poll-interval-s must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 stopped (SIGTERM, idle, or another worker already serves the spool),
    3 the runner cannot be imported (waiting tasks are failed with DISPATCH_FAILED)."""
    args = _parse_args(argv)
    configure_logging(args.log_level)
    spool = Spool(args.spool.resolve())
    spool.create()
    with log_context(site=spool.root.name), _spool_lock(spool) as lock_fd:
        if lock_fd is None:
            log.info("another site worker serves this spool; exiting")
            return 0
        settle_orphans(spool)
        try:
            runner = load_runner(args.runner)
        except Exception as exc:
            message = (
                f"the site worker cannot load its task runner {args.runner!r}: {type(exc).__name__}: {exc}"
            )
            log.error(message)
            fail_waiting(spool, ErrorCode.DISPATCH_FAILED, message)
            return 3
        worker = Worker(
            spool,
            runner,
            args.max_concurrent,
            poll_interval_s=args.poll_interval_s,
            idle_exit_s=args.idle_exit_s,
            inherited_fds=[lock_fd],
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, worker.request_stop)
        spool.write_pid(os.getpid())  # last: a pid file means "ready"
        log.info(
            "site worker ready", extra={"pid": os.getpid(), "runner": args.runner, "max": args.max_concurrent}
        )
        try:
            return worker.run()
        finally:
            if spool.read_pid() == os.getpid():
                spool.pid_file.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
