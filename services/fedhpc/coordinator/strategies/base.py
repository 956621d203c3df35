"""The strategy interface: events in, decisions out.

A strategy is a pure, clock-injected state machine. The coordinator (or the discrete-event
simulator) feeds it :data:`Event` objects and executes the :data:`Decision` objects it returns,
in order. Time comes only as ``now`` (epoch seconds) on each event: a strategy never sleeps,
starts threads, does I/O, reads the wall clock or draws unseeded random numbers.

Crash safety: the coordinator stores :meth:`Strategy.snapshot` in the same transaction as the
decisions it has still to execute, and after a restart calls :meth:`Strategy.restore` and
re-executes those decisions. So every task and timer id is a deterministic string derived from
the strategy's state, and events about ids the strategy no longer waits for (duplicates, late
results of cancelled tasks, timers that fired after being cancelled) are ignored.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Generic, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "REASON_COMPLETED",
    "REASON_DEADLINE",
    "REASON_SITE_LEFT",
    "REASON_STOPPED",
    "Aggregate",
    "AggregationFailed",
    "AggregationSucceeded",
    "CancelTask",
    "CancelTimer",
    "Decision",
    "DispatchTask",
    "EvalTask",
    "EvaluationState",
    "Event",
    "Finish",
    "LogEntry",
    "Seconds",
    "SetTimer",
    "SiteJoined",
    "SiteLeft",
    "SnapshotError",
    "Started",
    "StateModel",
    "StopRequested",
    "Strategy",
    "StrategyConfigBase",
    "TaskFailed",
    "TaskSucceeded",
    "TimerFired",
    "UpdateChoice",
    "answers",
    "make_aggregate_id",
    "pack_snapshot",
    "unpack_snapshot",
]

# Reasons a strategy gives in CancelTask; the coordinator passes them on to the dispatcher.
REASON_DEADLINE = "DEADLINE_EXCEEDED"
REASON_SITE_LEFT = "SITE_LEFT"
REASON_STOPPED = "STOPPED"
REASON_COMPLETED = "COMPLETED"

SNAPSHOT_SCHEMA = 1


# --------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Started:
    """The experiment starts with these active sites (in this order)."""

    now: float
    sites: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TaskSucceeded:
    """A task reported a result; for a train task the update is in the registry."""

    now: float
    task_id: str
    site: str
    num_samples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TaskFailed:
    """A task ended without a usable result. ``code`` is a stable error code
    (TRAINER_CRASHED, DEADLINE_EXCEEDED, UPDATE_REJECTED, DISPATCH_FAILED, ...)."""

    now: float
    task_id: str
    site: str
    code: str
    message: str = ""


@dataclass(frozen=True, slots=True)
class TimerFired:
    """A timer set by :class:`SetTimer` is due."""

    now: float
    timer_id: str


@dataclass(frozen=True, slots=True)
class SiteJoined:
    """A site became active (registered, or came back)."""

    now: float
    site: str


@dataclass(frozen=True, slots=True)
class SiteLeft:
    """A site is no longer active; its in-flight tasks will not report."""

    now: float
    site: str


@dataclass(frozen=True, slots=True)
class AggregationSucceeded:
    """The aggregator committed the version for ``round``. ``accepted`` and ``rejected`` hold
    task ids; ``rejected`` maps a task id to the reason its update was refused. Pass the
    Aggregate's ``aggregate_id`` back: a round can be aggregated again after a failure, and
    the id tells a stale duplicate from the answer to the retry."""

    now: float
    round: int
    accepted: tuple[str, ...]
    rejected: Mapping[str, str] = field(default_factory=dict)
    # The Aggregate.aggregate_id this answers; None matches on ``round`` alone.
    aggregate_id: str | None = None


@dataclass(frozen=True, slots=True)
class AggregationFailed:
    """The aggregator produced no version for ``round`` (e.g. too few accepted updates)."""

    now: float
    round: int
    message: str = ""
    # The Aggregate.aggregate_id this answers; None matches on ``round`` alone.
    aggregate_id: str | None = None


@dataclass(frozen=True, slots=True)
class StopRequested:
    """An operator asked the experiment to stop."""

    now: float
    reason: str = ""


Event = (
    Started
    | TaskSucceeded
    | TaskFailed
    | TimerFired
    | SiteJoined
    | SiteLeft
    | AggregationSucceeded
    | AggregationFailed
    | StopRequested
)


# --------------------------------------------------------------------------------------------
# Decisions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DispatchTask:
    """Run a task at ``site``: train from (or, with mode="evaluate", evaluate) the version
    produced by ``base_round`` (0 = the initial model). ``round`` is the round the update is
    meant for (sync) or the server version count at dispatch (async). ``deadline`` is epoch
    seconds after which the result is useless (None: no deadline)."""

    task_id: str
    site: str
    round: int
    base_round: int
    mode: Literal["train", "evaluate"]
    attempt: int
    deadline: float | None


@dataclass(frozen=True, slots=True)
class CancelTask:
    """Stop waiting for a task (and cancel it at the site where the backend can)."""

    task_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class SetTimer:
    """Deliver ``TimerFired(timer_id)`` at epoch seconds ``at``. Ids are never reused."""

    timer_id: str
    at: float


@dataclass(frozen=True, slots=True)
class CancelTimer:
    """The timer is no longer needed. A TimerFired that races with this is ignored anyway."""

    timer_id: str


@dataclass(frozen=True, slots=True)
class UpdateChoice:
    """One update to aggregate. ``staleness`` = Aggregate.base_round - the round the task
    trained from (0 for synchronous rounds)."""

    task_id: str
    site: str
    num_samples: int
    staleness: int


@dataclass(frozen=True, slots=True)
class Aggregate:
    """Produce the version for ``round`` from the version of ``base_round`` (= round - 1).
    At most one Aggregate is outstanding: the strategy waits for AggregationSucceeded or
    AggregationFailed for ``round`` before it issues the next. ``aggregate_id`` is unique
    within the experiment (``agg-0001``, ``agg-0002``, ...) and deterministic, so a re-executed
    Aggregate can be recognised (and deduplicated) by the coordinator and the aggregator."""

    round: int
    base_round: int
    updates: tuple[UpdateChoice, ...]
    min_accepted: int
    aggregate_id: str = ""


@dataclass(frozen=True, slots=True)
class Finish:
    """The experiment is over. Issued exactly once; afterwards ``handle`` returns []."""

    state: Literal["completed", "failed", "stopped"]
    reason: str


@dataclass(frozen=True, slots=True)
class LogEntry:
    """Something an operator should see in the experiment's event log (a site parked, an
    update dropped as too stale, a round retried). Informational: executing it changes
    nothing the strategy depends on."""

    kind: str
    message: str
    site: str | None = None
    task_id: str | None = None


Decision = DispatchTask | CancelTask | SetTimer | CancelTimer | Aggregate | Finish | LogEntry


# --------------------------------------------------------------------------------------------
# Configuration and state
# --------------------------------------------------------------------------------------------


# A duration in seconds: positive and finite, so snapshots stay strict JSON (no Infinity).
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class StrategyConfigBase(BaseModel):
    """Base of every strategy's configuration: unknown keys are errors, values are frozen.
    Subclasses add ``name: Literal["..."]`` (the discriminator) and their own fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class StateModel(BaseModel):
    """Base of a strategy's mutable state. Plain JSON types only (str/int/float/bool/None,
    lists, str-keyed dicts, nested StateModels) so that ``model_dump(mode="json")`` and
    ``model_validate`` round-trip it exactly; dicts keep insertion order, which decisions
    rely on, so never use sets."""

    model_config = ConfigDict(extra="forbid", validate_assignment=False)


def make_aggregate_id(sequence: int) -> str:
    """The id of the ``sequence``-th Aggregate (1-based) an experiment issues."""
    return f"agg-{sequence:04d}"


def answers(event: AggregationSucceeded | AggregationFailed, round_: int, outstanding: str | None) -> bool:
    """Whether ``event`` is the answer to the outstanding Aggregate (id ``outstanding`` for
    ``round_``), not a duplicate or a late answer to an earlier one."""
    if outstanding is None or event.round != round_:
        return False
    return event.aggregate_id is None or event.aggregate_id == outstanding


class SnapshotError(ValueError):
    """A snapshot that does not belong to this strategy or cannot be read."""


StateT = TypeVar("StateT", bound=StateModel)


def pack_snapshot(name: str, state: StateModel) -> dict[str, Any]:
    """The JSON-serializable snapshot of ``state`` for strategy ``name``."""
    return {"strategy": name, "schema": SNAPSHOT_SCHEMA, "state": state.model_dump(mode="json")}


def unpack_snapshot(name: str, snapshot: Mapping[str, Any], model: type[StateT]) -> StateT:
    """The state stored by :func:`pack_snapshot`; checks that it is ``name``'s."""
    if snapshot.get("strategy") != name:
        raise SnapshotError(f"snapshot is for strategy {snapshot.get('strategy')!r}, not {name!r}")
    if snapshot.get("schema") != SNAPSHOT_SCHEMA:
        raise SnapshotError(f"unsupported snapshot schema {snapshot.get('schema')!r}")
    try:
        return model.model_validate(snapshot.get("state"))
    except ValidationError as exc:
        raise SnapshotError(f"corrupt {name} snapshot: {exc}") from exc


ConfigT = TypeVar("ConfigT", bound=StrategyConfigBase)


class Strategy(ABC, Generic[ConfigT]):
    """A scheduling strategy. Subclasses set ``name`` (the config discriminator)."""

    name: ClassVar[str]

    def __init__(self, config: ConfigT) -> None:
        self.config = config

    @abstractmethod
    def handle(self, event: Event) -> list[Decision]:
        """React to ``event``: the decisions to execute, in order. [] once done."""

    @abstractmethod
    def snapshot(self) -> dict[str, Any]:
        """The complete state as JSON-serializable data (see :meth:`restore`)."""

    @classmethod
    @abstractmethod
    def restore(cls, config: ConfigT, snapshot: Mapping[str, Any]) -> Self:
        """A strategy in the state ``snapshot`` recorded: it returns exactly the decisions the
        original would have returned for the same remaining events."""

    @property
    @abstractmethod
    def done(self) -> bool:
        """True once Finish has been issued."""

    @property
    @abstractmethod
    def completed_rounds(self) -> int:
        """How many rounds (server versions) have been aggregated so far."""


# --------------------------------------------------------------------------------------------
# Final evaluation: shared by every strategy
# --------------------------------------------------------------------------------------------


class EvalTask(StateModel):
    site: str
    status: Literal["running", "succeeded", "failed", "cancelled"] = "running"


class EvaluationState(StateModel):
    """Evaluation of the final model on every active site, until all report or the deadline."""

    round: int
    tasks: dict[str, EvalTask] = Field(default_factory=dict)
    timer_id: str | None = None

    @staticmethod
    def task_id(round_: int, site: str) -> str:
        return f"eval-r{round_:04d}-{site}"

    @classmethod
    def start(
        cls, now: float, round_: int, sites: Iterable[str], deadline_s: float | None
    ) -> tuple[EvaluationState, list[Decision]]:
        """Dispatch one evaluate task per site on the version of ``round_``."""
        deadline = None if deadline_s is None else now + deadline_s
        state = cls(round=round_)
        decisions: list[Decision] = []
        for site in sites:
            task_id = cls.task_id(round_, site)
            state.tasks[task_id] = EvalTask(site=site)
            decisions.append(
                DispatchTask(task_id, site, round_, round_, "evaluate", attempt=1, deadline=deadline)
            )
        if deadline is not None and state.tasks:
            state.timer_id = f"deadline-eval-r{round_:04d}"
            decisions.append(SetTimer(state.timer_id, deadline))
        return state, decisions

    @property
    def finished(self) -> bool:
        return all(task.status != "running" for task in self.tasks.values())

    def record(self, task_id: str, site: str, ok: bool) -> bool:
        """Mark a running task's result; False (ignore the event) for unknown or settled ids."""
        task = self.tasks.get(task_id)
        if task is None or task.site != site or task.status != "running":
            return False
        task.status = "succeeded" if ok else "failed"
        return True

    def site_left(self, site: str) -> list[Decision]:
        """A site that left will not report: stop waiting for its task."""
        decisions: list[Decision] = []
        for task_id, task in self.tasks.items():
            if task.site == site and task.status == "running":
                task.status = "failed"
                decisions.append(CancelTask(task_id, REASON_SITE_LEFT))
        return decisions

    def expire(self, timer_id: str) -> list[Decision] | None:
        """The deadline passed: cancel the stragglers. None when ``timer_id`` is not ours."""
        if timer_id != self.timer_id:
            return None
        # The timer has fired: nothing to cancel there.
        self.timer_id = None
        return self.stop(REASON_DEADLINE)

    def stop(self, reason: str) -> list[Decision]:
        """Cancel every running task and the deadline timer."""
        decisions: list[Decision] = []
        for task_id, task in self.tasks.items():
            if task.status == "running":
                task.status = "cancelled"
                decisions.append(CancelTask(task_id, reason))
        if self.timer_id is not None:
            decisions.append(CancelTimer(self.timer_id))
            self.timer_id = None
        return decisions

    def summary(self) -> str:
        ok = sum(task.status == "succeeded" for task in self.tasks.values())
        return f"final evaluation on {ok}/{len(self.tasks)} sites"
