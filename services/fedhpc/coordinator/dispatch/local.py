"""The ``local`` dispatch backend: each site is a worker process on this machine.

The dispatcher writes tasks into the site's spool (``<run_dir>/sites/<site>/``, see
:mod:`fedhpc.coordinator.dispatch.worker`) and reads phases and results back from it. The site
worker runs detached in its own session, so it and its tasks survive a coordinator killed with
SIGKILL; a new coordinator ``reattach``es and gets every result the spool holds.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedhpc.common.contracts import (
    ContractError,
    ErrorCode,
    TaskResultDoc,
    TaskSpec,
    encode_result,
    parse_result,
)
from fedhpc.common.logging import get_logger
from fedhpc.coordinator.dispatch.base import PHASES, Dispatcher, DispatchError, DispatchEvent, SiteSpec
from fedhpc.coordinator.dispatch.worker import (
    DEFAULT_RUNNER,
    WORKER_MODULE,
    Spool,
    StatusEntry,
    check_task_id,
    error_result,
    is_worker_process,
)

__all__ = ["LocalDispatcher", "LocalSiteConfig"]

log = get_logger(__name__)

#: A worker that dies this many times in a row before it is ready means the site cannot run
#: anything (bad interpreter, fedhpc missing there): its tasks then fail with DISPATCH_FAILED.
MAX_FAILED_STARTS = 3
# How long shutdown() waits for a worker to stop its tasks after SIGTERM before SIGKILL.
_SHUTDOWN_GRACE_S = 10.0
# Workers of closed dispatchers that were still running: kept referenced so that Popen does not
# warn about them, and reaped when they exit (the coordinator's own children only).
_DETACHED: list[subprocess.Popen[bytes]] = []


class LocalSiteConfig(BaseModel):
    """``SiteSpec.config`` for a local site."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data_dir: Path | None = Field(
        default=None,
        description="The site's data directory: the worker's cwd and $FEDHPC_DATA_DIR (default <spool>/data).",
    )
    python: str | None = Field(default=None, description="Interpreter for the worker (default: this one).")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment for the worker.")
    runner: str = Field(
        default=DEFAULT_RUNNER,
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="module:function that runs one task document.",
    )
    poll_interval_s: float = Field(
        default=0.1, gt=0, le=10, description="How often the worker scans the spool."
    )
    idle_exit_s: float | None = Field(
        default=None, gt=0, description="The worker exits after this long idle (it restarts on demand)."
    )

    @field_validator("python")
    @classmethod
    def _python_exists(cls, value: str | None) -> str | None:
        if value is None:
            return None
        found = shutil.which(value)
        if found is None:
            raise ValueError(f"{value!r} is not an executable file or a command on PATH")
        return found


@dataclass
class _Tracked:
    task_id: str
    seen: int = 0  # status history entries already turned into events


class LocalDispatcher(Dispatcher):
    backend = "local"

    def __init__(self, site: SiteSpec, run_dir: Path) -> None:
        super().__init__(site, run_dir)
        self.config = _parse_config(site)
        self.spool = Spool(self.run_dir.resolve() / "sites" / site.name)
        self.spool.create()
        self.data_dir = (self.config.data_dir or self.spool.root / "data").resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._tracked: dict[str, _Tracked] = {}
        self._finished: set[str] = set()
        self._proc: subprocess.Popen[bytes] | None = None
        self._failed_starts = 0
        self._last_submit_ns = 0

    # -- the Dispatcher interface ---------------------------------------------------------------------

    def submit(self, task: TaskSpec) -> str:
        if task.site != self.site.name:
            raise DispatchError(f"task {task.task_id!r} is for site {task.site!r}, not {self.site.name!r}")
        task_id = _checked_id(task.task_id)
        with self._lock:
            if task_id not in self._tracked and task_id not in self._finished:
                if self.spool.where(task_id) is None:
                    self._enqueue(task)
                else:
                    self._check_same_experiment(task)
                self._tracked[task_id] = _Tracked(task_id)
            if self.spool.where(task_id) in ("queued", "running"):
                self._ensure_worker()
        return self._handle(task_id)

    def reattach(self, task_id: str, handle: str) -> None:
        _checked_id(task_id)
        if handle != self._handle(task_id):
            raise DispatchError(
                f"handle {handle!r} does not belong to task {task_id!r} on local site {self.site.name!r}"
            )
        with self._lock:
            if task_id in self._tracked or task_id in self._finished:
                return
            # The coordinator saw the phases before its restart; report where the task is now.
            history = self.spool.read_status(task_id)
            pending = self.spool.where(task_id) in ("queued", "running")
            self._tracked[task_id] = _Tracked(
                task_id, seen=max(0, len(history) - 1) if pending else len(history)
            )
            if pending:
                self._ensure_worker()

    def poll(self) -> list[DispatchEvent]:
        with self._lock:
            events: list[DispatchEvent] = []
            for tracked in list(self._tracked.values()):
                events.extend(self._scan(tracked))
            if self._tracked:
                self._ensure_worker()
            return events

    def cancel(self, task_id: str, reason: str) -> None:
        _checked_id(task_id)
        with self._lock:
            if self.spool.where(task_id) in (None, "finished"):
                return
            # The worker owns running and waiting tasks; it kills or drops this one and writes
            # the CANCELLED result. A dead worker is restarted and does it then.
            self.spool.request_cancel(task_id, reason)
            log.info(
                "task cancel requested", extra={"site": self.site.name, "task": task_id, "reason": reason}
            )
            self._ensure_worker()

    def close(self) -> None:
        with self._lock:
            self._tracked.clear()
            self._finished.clear()
            if self._proc is not None and self._proc.poll() is None:
                _DETACHED.append(self._proc)
            self._proc = None

    def shutdown(self) -> None:
        with self._lock:
            pids = self._worker_pids()
            for pid in pids:
                _signal(pid, signal.SIGTERM)
            deadline = time.monotonic() + _SHUTDOWN_GRACE_S
            while self._worker_pids() and time.monotonic() < deadline:
                time.sleep(0.02)
            for pid in self._worker_pids():
                log.warning(
                    "site worker ignored SIGTERM; killing it", extra={"site": self.site.name, "pid": pid}
                )
                _signal(pid, signal.SIGKILL)
            if self._proc is not None:
                self._proc.wait()
                self._proc = None
            _reap_detached()

    # -- tasks ----------------------------------------------------------------------------------------

    def _handle(self, task_id: str) -> str:
        return f"local:{self.site.name}:{task_id}"

    def _check_same_experiment(self, task: TaskSpec) -> None:
        # Idempotency is by task id, so an id reused by another experiment on the same run
        # directory would silently get the old task's result.
        owner = self.spool.status_experiment(task.task_id)
        if owner is not None and owner != task.experiment_id:
            raise DispatchError(
                f"task id {task.task_id!r} was already used by experiment {owner!r} at site "
                f"{self.site.name!r}; task ids must be unique within a run directory"
            )

    def _enqueue(self, task: TaskSpec) -> None:
        # Status first: the worker only touches a task's status after it has claimed the task.
        now_ns = max(time.time_ns(), self._last_submit_ns + 1)  # strictly increasing: submit order
        self._last_submit_ns = now_ns
        self.spool.write_status(task.task_id, [StatusEntry("queued", now_ns / 1e9)], task.experiment_id)
        self.spool.write_task(task, now_ns)
        log.info("task queued", extra={"site": self.site.name, "task": task.task_id})

    def _scan(self, tracked: _Tracked) -> list[DispatchEvent]:
        """New events for one task; stops tracking it once it finished."""
        task_id = tracked.task_id
        # Result before status: a task's phases are all written before its result, so a result
        # seen here means the status read next is complete.
        stored = self.spool.read_result(task_id)
        if stored is None and self.spool.where(task_id) is None:
            message = f"task {task_id!r} is not in the spool of site {self.site.name!r} ({self.spool.root})"
            stored = (
                encode_result(error_result(task_id, ErrorCode.DISPATCH_FAILED, message)).encode(),
                time.time(),
            )
        history = self.spool.read_status(task_id)
        events = [
            DispatchEvent(task_id=task_id, phase=e.phase, at=e.at)
            for e in history[tracked.seen :]
            if e.phase in PHASES
        ]
        tracked.seen = len(history)
        if stored is not None:
            raw, written_at = stored
            last = history[-1].at if history else written_at
            events.append(
                DispatchEvent(
                    task_id=task_id, phase="finished", at=max(written_at, last), result=_parse(task_id, raw)
                )
            )
            del self._tracked[task_id]
            self._finished.add(task_id)
        return events

    # -- the site worker ------------------------------------------------------------------------------

    def _worker_pids(self) -> list[int]:
        pids = []
        if self._proc is not None and self._proc.poll() is None:
            pids.append(self._proc.pid)
        pid = self.spool.read_pid()
        if pid is not None and pid not in pids and is_worker_process(pid, self.spool.root):
            pids.append(pid)
        return pids

    def _ensure_worker(self) -> None:
        """Start the site worker unless one is alive; after repeated failed starts, fail the
        stranded tasks instead of starting it forever."""
        self._account_exit()
        if self._worker_pids():
            return
        if self._failed_starts >= MAX_FAILED_STARTS:
            self._fail_stranded()
            self._failed_starts = 0
            return
        self._start_worker()

    def _account_exit(self) -> None:
        """Note how the worker this dispatcher started ended, if it did."""
        if self._proc is None or self._proc.poll() is None:
            return
        became_ready = self.spool.read_pid() == self._proc.pid or self._proc.returncode == 0
        self._failed_starts = 0 if became_ready else self._failed_starts + 1
        if not became_ready:
            log.warning(
                "site worker exited before it was ready",
                extra={
                    "site": self.site.name,
                    "exit_code": self._proc.returncode,
                    "log": str(self.spool.log_file),
                },
            )
        self._proc = None

    def _worker_command(self) -> list[str]:
        command = [
            self.config.python or sys.executable,
            "-m",
            WORKER_MODULE,
            "--spool",
            str(self.spool.root),
            "--max-concurrent",
            str(self.site.max_concurrent_tasks),
            "--runner",
            self.config.runner,
            "--poll-interval-s",
            str(self.config.poll_interval_s),
        ]
        if self.config.idle_exit_s is not None:
            command += ["--idle-exit-s", str(self.config.idle_exit_s)]
        return command

    def _start_worker(self) -> None:
        # Tasks' temporary files (downloaded weights) go under the spool: a task killed for its
        # deadline cannot clean up after itself, and the run directory's removal then does.
        tmp = self.spool.root / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "TMPDIR": str(tmp),
            **self.config.env,
            "FEDHPC_SITE": self.site.name,
            "FEDHPC_DATA_DIR": str(self.data_dir),
        }
        command = self._worker_command()
        with self.spool.log_file.open("ab") as log_file:
            try:
                # Own session: a signal to the coordinator's process group (Ctrl-C, a dying
                # terminal) must not reach the site's tasks.
                self._proc = subprocess.Popen(
                    command,
                    cwd=self.data_dir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                self._failed_starts += 1
                log.error("cannot start site worker", extra={"site": self.site.name, "error": str(exc)})
                return
        log.info(
            "site worker started", extra={"site": self.site.name, "pid": self._proc.pid, "command": command}
        )

    def _fail_stranded(self) -> None:
        """The worker cannot start: finish every waiting or orphaned task with DISPATCH_FAILED."""
        tail = self.spool.log_tail(self.spool.log_file)
        message = (
            f"the site worker of {self.site.name!r} failed to start {MAX_FAILED_STARTS} times in a row; "
            f"see {self.spool.log_file}" + (f"; it ends with:\n{tail}" if tail else "")
        )
        stranded = [*self.spool.queued(), *self.spool.running_ids()]
        for task_id in stranded:
            self.spool.write_result_once(
                task_id, encode_result(error_result(task_id, ErrorCode.DISPATCH_FAILED, message))
            )
            self.spool.task_path(task_id).unlink(missing_ok=True)
            self.spool.running_path(task_id).unlink(missing_ok=True)
        log.error(
            "site worker cannot start; tasks failed", extra={"site": self.site.name, "tasks": len(stranded)}
        )


def _parse_config(site: SiteSpec) -> LocalSiteConfig:
    try:
        return LocalSiteConfig.model_validate(site.config)
    except ValidationError as exc:
        problems = "; ".join(
            f"config.{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise DispatchError(f"local site {site.name!r}: {problems}") from exc


def _checked_id(task_id: str) -> str:
    try:
        return check_task_id(task_id)
    except ValueError as exc:
        raise DispatchError(str(exc)) from exc


def _parse(task_id: str, raw: bytes) -> TaskResultDoc:
    # The worker already checked it; a hand-edited or truncated file must still not crash the poll.
    try:
        return parse_result(raw)
    except ContractError as exc:
        return error_result(task_id, ErrorCode.INVALID_RESULT, str(exc))


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _reap_detached() -> None:
    for proc in list(_DETACHED):
        if proc.poll() is not None:
            _DETACHED.remove(proc)
