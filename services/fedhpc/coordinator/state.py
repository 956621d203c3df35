"""The coordinator's persistent state: SQLite in WAL mode under the data directory.

Everything needed to resume after a kill -9 is here: experiments (with the strategy's
snapshot), sites, tasks (with the dispatcher handle to re-attach), rounds, timers, the
event log that WatchExperiment replays, and the *outbox*: decisions a strategy made that
have not been carried out yet. A strategy step is one transaction (new snapshot + its
decisions into the outbox + task/round changes), and each decision leaves the outbox in
the same transaction that records its effect, so a crash at any point either redoes an
idempotent step or finds it done.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS experiments (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    spec_yaml TEXT NOT NULL,
    state TEXT NOT NULL,
    model TEXT NOT NULL,
    sites_json TEXT NOT NULL DEFAULT '[]',
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    error TEXT NOT NULL DEFAULT '',
    snapshot_json TEXT,
    optimizer_state TEXT NOT NULL DEFAULT '',
    stop_reason TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS sites (
    name TEXT PRIMARY KEY,
    backend TEXT NOT NULL,
    config_json TEXT NOT NULL,
    transport TEXT NOT NULL,
    max_concurrent INTEGER NOT NULL,
    state TEXT NOT NULL,
    labels_json TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    last_seen REAL
);
CREATE TABLE IF NOT EXISTS tasks (
    experiment_id TEXT NOT NULL,
    task_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    base_round INTEGER NOT NULL,
    site TEXT NOT NULL,
    mode TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    phase TEXT NOT NULL,
    handle TEXT NOT NULL DEFAULT '',
    dispatched_at REAL,
    result_json TEXT,
    error_code TEXT NOT NULL DEFAULT '',
    error_message TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL,
    PRIMARY KEY (experiment_id, task_id)
);
CREATE TABLE IF NOT EXISTS rounds (
    experiment_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    started_at REAL,
    finished_at REAL,
    version TEXT NOT NULL DEFAULT '',
    accepted INTEGER NOT NULL DEFAULT 0,
    rejected INTEGER NOT NULL DEFAULT 0,
    -- Federated evaluation of this round's model: sample-weighted sums and the sample count.
    eval_sums_json TEXT NOT NULL DEFAULT '{}',
    eval_samples INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (experiment_id, round)
);
CREATE TABLE IF NOT EXISTS timers (
    experiment_id TEXT NOT NULL,
    timer_id TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (experiment_id, timer_id)
);
CREATE TABLE IF NOT EXISTS outbox (
    experiment_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    decision_json TEXT NOT NULL,
    PRIMARY KEY (experiment_id, seq)
);
CREATE TABLE IF NOT EXISTS events (
    experiment_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    time REAL NOT NULL,
    payload BLOB NOT NULL,
    PRIMARY KEY (experiment_id, seq)
);
"""

TERMINAL_PHASES = ("SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELLED", "REJECTED")


@dataclass(frozen=True)
class ExperimentRow:
    id: str
    name: str
    spec_yaml: str
    state: str
    model: str
    sites: list[str]
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str
    snapshot: dict[str, Any] | None
    optimizer_state: str
    stop_reason: str


@dataclass(frozen=True)
class SiteRow:
    name: str
    backend: str
    config: dict[str, Any]
    transport: str
    max_concurrent: int
    state: str
    labels: dict[str, str]
    created_at: float
    last_seen: float | None


@dataclass(frozen=True)
class TaskRow:
    experiment_id: str
    task_id: str
    round: int
    base_round: int
    site: str
    mode: str
    attempt: int
    phase: str
    handle: str
    dispatched_at: float | None
    result: dict[str, Any] | None
    error_code: str
    error_message: str
    updated_at: float

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL_PHASES


@dataclass(frozen=True)
class RoundRow:
    experiment_id: str
    round: int
    started_at: float | None
    finished_at: float | None
    version: str
    accepted: int
    rejected: int
    eval_sums: dict[str, float]
    eval_samples: int

    @property
    def metrics(self) -> dict[str, float]:
        if not self.eval_samples:
            return {}
        return {k: v / self.eval_samples for k, v in self.eval_sums.items()}


class StateStore:
    """Thread-safe access to coordinator.db. Writes take one lock and one transaction."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        # One connection shared under the lock: SQLite serializes writers anyway, and the
        # coordinator's load is a handful of statements per task event.
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._db.execute(sql, args))

    # -- experiments ------------------------------------------------------------------
    def insert_experiment(self, row: ExperimentRow) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO experiments (id, name, spec_yaml, state, model, sites_json, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    row.id,
                    row.name,
                    row.spec_yaml,
                    row.state,
                    row.model,
                    json.dumps(row.sites),
                    row.created_at,
                ),
            )

    def experiment(self, experiment_id: str) -> ExperimentRow | None:
        rows = self._query("SELECT * FROM experiments WHERE id = ?", (experiment_id,))
        return _experiment(rows[0]) if rows else None

    def experiments(self, states: tuple[str, ...] | None = None) -> list[ExperimentRow]:
        if states is None:
            rows = self._query("SELECT * FROM experiments ORDER BY created_at, id")
        else:
            # The engine asks for the running ones on every pass: leave the rest in the database.
            marks = ", ".join("?" for _ in states)
            rows = self._query(
                f"SELECT * FROM experiments WHERE state IN ({marks}) ORDER BY created_at, id", states
            )
        return [_experiment(r) for r in rows]

    @staticmethod
    def update_experiment(db: sqlite3.Connection, experiment_id: str, **fields: Any) -> None:
        if "snapshot" in fields:
            fields["snapshot_json"] = json.dumps(fields.pop("snapshot"))
        if "sites" in fields:
            fields["sites_json"] = json.dumps(fields.pop("sites"))
        assignments = ", ".join(f"{name} = ?" for name in fields)
        db.execute(f"UPDATE experiments SET {assignments} WHERE id = ?", (*fields.values(), experiment_id))

    # -- sites ------------------------------------------------------------------------
    def upsert_site(self, row: SiteRow) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO sites VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    row.name,
                    row.backend,
                    json.dumps(row.config),
                    row.transport,
                    row.max_concurrent,
                    row.state,
                    json.dumps(row.labels),
                    row.created_at,
                    row.last_seen,
                ),
            )

    def site(self, name: str) -> SiteRow | None:
        rows = self._query("SELECT * FROM sites WHERE name = ?", (name,))
        return _site(rows[0]) if rows else None

    def sites(self) -> list[SiteRow]:
        return [_site(r) for r in self._query("SELECT * FROM sites ORDER BY name")]

    def open_task_counts(self) -> dict[str, int]:
        """Unfinished tasks per site, over every experiment."""
        marks = ", ".join("?" for _ in TERMINAL_PHASES)
        rows = self._query(
            f"SELECT site, COUNT(*) AS n FROM tasks WHERE phase NOT IN ({marks}) GROUP BY site",
            TERMINAL_PHASES,
        )
        return {r["site"]: int(r["n"]) for r in rows}

    def count_sites(self, state: str) -> int:
        return int(self._query("SELECT COUNT(*) FROM sites WHERE state = ?", (state,))[0][0])

    def delete_site(self, name: str) -> bool:
        with self.transaction() as db:
            return db.execute("DELETE FROM sites WHERE name = ?", (name,)).rowcount > 0

    def touch_site(self, name: str, when: float) -> None:
        with self.transaction() as db:
            db.execute("UPDATE sites SET last_seen = ? WHERE name = ?", (when, name))

    # -- tasks ------------------------------------------------------------------------
    @staticmethod
    def insert_task(db: sqlite3.Connection, row: TaskRow) -> bool:
        """False when the task exists already (re-executed dispatch decision)."""
        cursor = db.execute(
            "INSERT OR IGNORE INTO tasks (experiment_id, task_id, round, base_round, site, mode, attempt, "
            "phase, handle, dispatched_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.experiment_id,
                row.task_id,
                row.round,
                row.base_round,
                row.site,
                row.mode,
                row.attempt,
                row.phase,
                row.handle,
                row.dispatched_at,
                row.updated_at,
            ),
        )
        return cursor.rowcount > 0

    @staticmethod
    def update_task(db: sqlite3.Connection, experiment_id: str, task_id: str, **fields: Any) -> None:
        if "result" in fields:
            result = fields.pop("result")
            fields["result_json"] = None if result is None else json.dumps(result)
        fields.setdefault("updated_at", time.time())
        assignments = ", ".join(f"{name} = ?" for name in fields)
        db.execute(
            f"UPDATE tasks SET {assignments} WHERE experiment_id = ? AND task_id = ?",
            (*fields.values(), experiment_id, task_id),
        )

    def task(self, experiment_id: str, task_id: str) -> TaskRow | None:
        rows = self._query(
            "SELECT * FROM tasks WHERE experiment_id = ? AND task_id = ?", (experiment_id, task_id)
        )
        return _task(rows[0]) if rows else None

    def tasks(self, experiment_id: str, round_number: int | None = None) -> list[TaskRow]:
        if round_number is None:
            rows = self._query(
                "SELECT * FROM tasks WHERE experiment_id = ? ORDER BY dispatched_at, task_id",
                (experiment_id,),
            )
        else:
            rows = self._query(
                "SELECT * FROM tasks WHERE experiment_id = ? AND round = ? ORDER BY dispatched_at, task_id",
                (experiment_id, round_number),
            )
        return [_task(r) for r in rows]

    def open_tasks(self, experiment_id: str) -> list[TaskRow]:
        marks = ", ".join("?" for _ in TERMINAL_PHASES)
        rows = self._query(
            f"SELECT * FROM tasks WHERE experiment_id = ? AND phase NOT IN ({marks})",
            (experiment_id, *TERMINAL_PHASES),
        )
        return [_task(r) for r in rows]

    # -- rounds -----------------------------------------------------------------------
    @staticmethod
    def ensure_round(
        db: sqlite3.Connection, experiment_id: str, round_number: int, started_at: float
    ) -> None:
        db.execute(
            "INSERT OR IGNORE INTO rounds (experiment_id, round, started_at) VALUES (?, ?, ?)",
            (experiment_id, round_number, started_at),
        )

    @staticmethod
    def finish_round(
        db: sqlite3.Connection,
        experiment_id: str,
        round_number: int,
        *,
        version: str,
        accepted: int,
        rejected: int,
        finished_at: float,
    ) -> None:
        # Async strategies may produce a version in a round nobody was dispatched for.
        StateStore.ensure_round(db, experiment_id, round_number, finished_at)
        db.execute(
            "UPDATE rounds SET version = ?, accepted = ?, rejected = ?, finished_at = ? "
            "WHERE experiment_id = ? AND round = ?",
            (version, accepted, rejected, finished_at, experiment_id, round_number),
        )

    @staticmethod
    def add_evaluation(
        db: sqlite3.Connection, experiment_id: str, round_number: int, metrics: dict[str, float], samples: int
    ) -> RoundRow | None:
        """Fold one site's evaluation of a round's model into the sample-weighted means."""
        rows = list(
            db.execute(
                "SELECT * FROM rounds WHERE experiment_id = ? AND round = ?", (experiment_id, round_number)
            )
        )
        if not rows or samples <= 0:
            return None
        sums: dict[str, float] = json.loads(rows[0]["eval_sums_json"])
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + value * samples
        total = rows[0]["eval_samples"] + samples
        db.execute(
            "UPDATE rounds SET eval_sums_json = ?, eval_samples = ? WHERE experiment_id = ? AND round = ?",
            (json.dumps(sums), total, experiment_id, round_number),
        )
        row = db.execute(
            "SELECT * FROM rounds WHERE experiment_id = ? AND round = ?", (experiment_id, round_number)
        ).fetchone()
        return _round(row)

    def rounds(self, experiment_id: str) -> list[RoundRow]:
        rows = self._query("SELECT * FROM rounds WHERE experiment_id = ? ORDER BY round", (experiment_id,))
        return [_round(r) for r in rows]

    # -- timers -----------------------------------------------------------------------
    @staticmethod
    def set_timer(db: sqlite3.Connection, experiment_id: str, timer_id: str, at: float) -> None:
        db.execute("INSERT OR REPLACE INTO timers VALUES (?, ?, ?)", (experiment_id, timer_id, at))

    @staticmethod
    def cancel_timer(db: sqlite3.Connection, experiment_id: str, timer_id: str) -> None:
        db.execute("DELETE FROM timers WHERE experiment_id = ? AND timer_id = ?", (experiment_id, timer_id))

    def due_timers(self, experiment_id: str, now: float) -> list[tuple[str, float]]:
        rows = self._query(
            "SELECT timer_id, at FROM timers WHERE experiment_id = ? AND at <= ? ORDER BY at, timer_id",
            (experiment_id, now),
        )
        return [(r["timer_id"], r["at"]) for r in rows]

    # -- outbox -----------------------------------------------------------------------
    @staticmethod
    def push_outbox(db: sqlite3.Connection, experiment_id: str, decisions: list[dict[str, Any]]) -> None:
        row = db.execute(
            "SELECT COALESCE(MAX(seq), 0) FROM outbox WHERE experiment_id = ?", (experiment_id,)
        ).fetchone()
        seq = int(row[0])
        for decision in decisions:
            seq += 1
            db.execute("INSERT INTO outbox VALUES (?, ?, ?)", (experiment_id, seq, json.dumps(decision)))

    def outbox(self, experiment_id: str) -> list[tuple[int, dict[str, Any]]]:
        rows = self._query(
            "SELECT seq, decision_json FROM outbox WHERE experiment_id = ? ORDER BY seq", (experiment_id,)
        )
        return [(r["seq"], json.loads(r["decision_json"])) for r in rows]

    @staticmethod
    def pop_outbox(db: sqlite3.Connection, experiment_id: str, seq: int) -> None:
        db.execute("DELETE FROM outbox WHERE experiment_id = ? AND seq = ?", (experiment_id, seq))

    # -- events -----------------------------------------------------------------------
    @staticmethod
    def append_event(db: sqlite3.Connection, experiment_id: str, when: float, payload: bytes) -> int:
        row = db.execute(
            "SELECT COALESCE(MAX(seq), 0) FROM events WHERE experiment_id = ?", (experiment_id,)
        ).fetchone()
        seq = int(row[0]) + 1
        db.execute("INSERT INTO events VALUES (?, ?, ?, ?)", (experiment_id, seq, when, payload))
        return seq

    def events_after(
        self, experiment_id: str, after: int, limit: int = 500
    ) -> list[tuple[int, float, bytes]]:
        rows = self._query(
            "SELECT seq, time, payload FROM events WHERE experiment_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (experiment_id, after, limit),
        )
        return [(r["seq"], r["time"], bytes(r["payload"])) for r in rows]


def _experiment(r: sqlite3.Row) -> ExperimentRow:
    return ExperimentRow(
        id=r["id"],
        name=r["name"],
        spec_yaml=r["spec_yaml"],
        state=r["state"],
        model=r["model"],
        sites=json.loads(r["sites_json"]),
        created_at=r["created_at"],
        started_at=r["started_at"],
        finished_at=r["finished_at"],
        error=r["error"],
        snapshot=json.loads(r["snapshot_json"]) if r["snapshot_json"] else None,
        optimizer_state=r["optimizer_state"],
        stop_reason=r["stop_reason"],
    )


def _site(r: sqlite3.Row) -> SiteRow:
    return SiteRow(
        name=r["name"],
        backend=r["backend"],
        config=json.loads(r["config_json"]),
        transport=r["transport"],
        max_concurrent=r["max_concurrent"],
        state=r["state"],
        labels=json.loads(r["labels_json"]),
        created_at=r["created_at"],
        last_seen=r["last_seen"],
    )


def _task(r: sqlite3.Row) -> TaskRow:
    return TaskRow(
        experiment_id=r["experiment_id"],
        task_id=r["task_id"],
        round=r["round"],
        base_round=r["base_round"],
        site=r["site"],
        mode=r["mode"],
        attempt=r["attempt"],
        phase=r["phase"],
        handle=r["handle"],
        dispatched_at=r["dispatched_at"],
        result=json.loads(r["result_json"]) if r["result_json"] else None,
        error_code=r["error_code"],
        error_message=r["error_message"],
        updated_at=r["updated_at"],
    )


def _round(r: sqlite3.Row) -> RoundRow:
    return RoundRow(
        experiment_id=r["experiment_id"],
        round=r["round"],
        started_at=r["started_at"],
        finished_at=r["finished_at"],
        version=r["version"],
        accepted=r["accepted"],
        rejected=r["rejected"],
        eval_sums=json.loads(r["eval_sums_json"]),
        eval_samples=r["eval_samples"],
    )
