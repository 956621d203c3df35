"""Synchronous rounds with a quorum and a deadline (FedAvg-style scheduling).

Round r: dispatch one train task per selected site, all training from the version of round
r-1. The round settles as soon as every dispatched task has finished (succeeded, or failed
with no retry left), or at the round deadline, whichever comes first. With at least
``min_sites`` successful updates it aggregates them (stragglers are cancelled); with fewer it
re-runs the round (up to ``max_round_retries`` times) and then fails the experiment.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Self

from pydantic import Field, model_validator

from fedhpc.coordinator.strategies.base import (
    REASON_DEADLINE,
    REASON_SITE_LEFT,
    REASON_STOPPED,
    Aggregate,
    AggregationFailed,
    AggregationSucceeded,
    CancelTask,
    CancelTimer,
    Decision,
    DispatchTask,
    EvaluationState,
    Event,
    Finish,
    LogEntry,
    Seconds,
    SetTimer,
    SiteJoined,
    SiteLeft,
    Started,
    StateModel,
    StopRequested,
    Strategy,
    StrategyConfigBase,
    TaskFailed,
    TaskSucceeded,
    TimerFired,
    UpdateChoice,
    answers,
    make_aggregate_id,
    pack_snapshot,
    unpack_snapshot,
)

__all__ = ["SyncConfig", "SyncStrategy"]


class SyncConfig(StrategyConfigBase):
    """``strategy: {name: sync, ...}``: synchronous rounds with quorum and deadline."""

    name: Literal["sync"] = Field(default="sync", description="Selects this strategy.")
    rounds: int = Field(default=10, ge=1, description="Total number of rounds (aggregations).")
    min_sites: int = Field(
        default=1, ge=1, description="Quorum: successful updates a round needs to be aggregated."
    )
    sites_per_round: int = Field(
        default=0,
        ge=0,
        description="Sites asked to train each round, chosen by rotation; 0 = every active site.",
    )
    round_deadline_s: Seconds | None = Field(
        default=3600.0,
        description="Seconds a round may take from dispatch; then it settles with whoever "
        "succeeded. null = wait for every dispatched task.",
    )
    max_task_retries: int = Field(
        default=1,
        ge=0,
        description="Re-dispatches of a failed task to the same site within a round "
        "(only before the round deadline).",
    )
    max_round_retries: int = Field(
        default=2,
        ge=0,
        description="Re-runs of a round that missed its quorum or whose aggregation failed; "
        "then the experiment fails.",
    )
    min_accepted: int = Field(
        default=1,
        ge=1,
        description="Updates the aggregator must accept (after validation) to commit a round; "
        "at most min_sites.",
    )
    final_evaluation: bool = Field(
        default=False,
        description="After the last round, evaluate the final model on every active site.",
    )
    evaluation_deadline_s: Seconds | None = Field(
        default=3600.0,
        description="Seconds the final evaluation may take; null = wait for every site.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> SyncConfig:
        if self.sites_per_round and self.sites_per_round < self.min_sites:
            raise ValueError(
                f"sites_per_round ({self.sites_per_round}) is below min_sites ({self.min_sites}): "
                "no round could reach its quorum"
            )
        if self.min_accepted > self.min_sites:
            raise ValueError(
                f"min_accepted ({self.min_accepted}) exceeds min_sites ({self.min_sites}): "
                "a round with its quorum could still never be committed"
            )
        return self


TaskStatus = Literal["running", "succeeded", "failed", "cancelled"]


class _Task(StateModel):
    site: str
    attempt: int
    status: TaskStatus = "running"
    num_samples: int = 0


class _SyncState(StateModel):
    phase: Literal["idle", "training", "aggregating", "evaluating", "done"] = "idle"
    # Active sites in the order they became active: the rotation order.
    sites: list[str] = Field(default_factory=list)
    rotation: int = 0
    # Round being trained or aggregated (1-based), and how many re-runs it has had.
    round: int = 0
    round_try: int = 0
    completed: int = 0
    # Last attempt number per site for this round, across re-runs, so task ids never repeat.
    attempts: dict[str, int] = Field(default_factory=dict)
    # Tasks of the current run of the round, in dispatch order.
    tasks: dict[str, _Task] = Field(default_factory=dict)
    deadline: float | None = None
    timer_id: str | None = None
    # Aggregates issued so far (for their ids), and the id of the outstanding one.
    aggregations: int = 0
    aggregate_id: str | None = None
    evaluation: EvaluationState | None = None


class SyncStrategy(Strategy[SyncConfig]):
    """Synchronous rounds; see the module docstring."""

    name: ClassVar[str] = "sync"

    def __init__(self, config: SyncConfig) -> None:
        super().__init__(config)
        self._s = _SyncState()

    # -- Strategy interface ---------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._s.phase == "done"

    @property
    def completed_rounds(self) -> int:
        return self._s.completed

    def snapshot(self) -> dict[str, Any]:
        return pack_snapshot(self.name, self._s)

    @classmethod
    def restore(cls, config: SyncConfig, snapshot: Mapping[str, Any]) -> Self:
        strategy = cls(config)
        strategy._s = unpack_snapshot(cls.name, snapshot, _SyncState)
        return strategy

    def handle(self, event: Event) -> list[Decision]:
        if self.done:
            return []
        if self._s.phase == "idle":
            # Before Started only a stop means anything.
            if isinstance(event, Started):
                return self._on_started(event)
            if isinstance(event, StopRequested):
                return self._on_stop(event)
            return []
        match event:
            case TaskSucceeded():
                return self._on_result(event, ok=True)
            case TaskFailed():
                return self._on_result(event, ok=False)
            case TimerFired():
                return self._on_timer(event)
            case SiteJoined():
                return self._on_joined(event)
            case SiteLeft():
                return self._on_left(event)
            case AggregationSucceeded():
                return self._on_aggregated(event)
            case AggregationFailed():
                return self._on_aggregation_failed(event)
            case StopRequested():
                return self._on_stop(event)
            case Started():
                return []  # a duplicate

    # -- events ---------------------------------------------------------------------------

    def _on_started(self, event: Started) -> list[Decision]:
        self._s.sites = list(dict.fromkeys(event.sites))
        self._s.round = 1
        return self._start_round(event.now)

    def _on_result(self, event: TaskSucceeded | TaskFailed, ok: bool) -> list[Decision]:
        s = self._s
        if s.phase == "evaluating":
            return self._on_evaluation_result(event.task_id, event.site, ok)
        task = s.tasks.get(event.task_id)
        if s.phase != "training" or task is None or task.site != event.site or task.status != "running":
            return []  # duplicate, late (cancelled) or unknown: never counted twice
        if isinstance(event, TaskSucceeded):
            task.status = "succeeded"
            task.num_samples = event.num_samples
            return self._settle_if_all_finished(event.now)
        task.status = "failed"
        if self._may_retry(task.site, event.now):
            return [self._dispatch(task.site)]
        return self._settle_if_all_finished(event.now)

    def _on_timer(self, event: TimerFired) -> list[Decision]:
        s = self._s
        if s.phase == "evaluating" and s.evaluation is not None:
            decisions = s.evaluation.expire(event.timer_id)
            return [] if decisions is None else decisions + self._finish_evaluation()
        if s.phase != "training" or event.timer_id != s.timer_id:
            return []  # a timer cancelled earlier, or a duplicate
        s.timer_id = None  # it fired: nothing left to cancel
        return self._settle(event.now)

    def _on_joined(self, event: SiteJoined) -> list[Decision]:
        # A new site trains from the next round (or the next run of this one) on.
        if event.site not in self._s.sites:
            self._s.sites.append(event.site)
        return []

    def _on_left(self, event: SiteLeft) -> list[Decision]:
        s = self._s
        if event.site not in s.sites:
            return []
        s.sites.remove(event.site)
        if s.phase == "evaluating" and s.evaluation is not None:
            cancelled = s.evaluation.site_left(event.site)
            return cancelled + self._finish_evaluation()
        if s.phase != "training":
            return []
        decisions: list[Decision] = []
        for task_id, task in s.tasks.items():
            if task.site == event.site and task.status == "running":
                # It will never report: a terminal failure, with no retry at a site that left.
                task.status = "failed"
                decisions.append(CancelTask(task_id, REASON_SITE_LEFT))
        return decisions + self._settle_if_all_finished(event.now)

    def _on_aggregated(self, event: AggregationSucceeded) -> list[Decision]:
        s = self._s
        if s.phase != "aggregating" or not answers(event, s.round, s.aggregate_id):
            return []  # a duplicate, or the answer to an earlier try
        s.aggregate_id = None
        s.completed = s.round
        if s.round >= self.config.rounds:
            return self._end_training(event.now)
        s.round += 1
        s.round_try = 0
        s.attempts = {}
        return self._start_round(event.now)

    def _on_aggregation_failed(self, event: AggregationFailed) -> list[Decision]:
        s = self._s
        if s.phase != "aggregating" or not answers(event, s.round, s.aggregate_id):
            return []
        s.aggregate_id = None
        return self._retry_round(event.now, f"aggregation failed: {event.message}")

    def _on_stop(self, event: StopRequested) -> list[Decision]:
        s = self._s
        decisions: list[Decision] = []
        if s.phase == "training":
            decisions += self._cancel_running(REASON_STOPPED)
            if s.timer_id is not None:
                decisions.append(CancelTimer(s.timer_id))
                s.timer_id = None
        if s.evaluation is not None and s.phase == "evaluating":
            decisions += s.evaluation.stop(REASON_STOPPED)
        # An outstanding Aggregate cannot be recalled; its result will be ignored.
        return decisions + self._finish("stopped", event.reason or "stop requested")

    # -- rounds ---------------------------------------------------------------------------

    def _start_round(self, now: float) -> list[Decision]:
        s = self._s
        s.phase = "training"
        s.tasks = {}
        deadline_s = self.config.round_deadline_s
        s.deadline = None if deadline_s is None else now + deadline_s
        decisions: list[Decision] = [self._dispatch(site) for site in self._select_sites()]
        if s.deadline is not None:
            s.timer_id = f"deadline-r{s.round:04d}-t{s.round_try}"
            decisions.append(SetTimer(s.timer_id, s.deadline))
        elif not s.tasks:
            # No site to ask and no deadline to wait for: nothing could change the outcome.
            decisions += self._settle(now)
        return decisions

    def _select_sites(self) -> list[str]:
        """Every active site, or the next ``sites_per_round`` of them in rotation: fair and
        deterministic without a random number generator."""
        s = self._s
        n = len(s.sites)
        k = self.config.sites_per_round or n
        if k >= n:
            return list(s.sites)
        start = s.rotation % n
        s.rotation = (start + k) % n
        return [s.sites[(start + i) % n] for i in range(k)]

    def _dispatch(self, site: str) -> DispatchTask:
        s = self._s
        attempt = s.attempts.get(site, 0) + 1
        s.attempts[site] = attempt
        task_id = f"r{s.round:04d}-{site}-a{attempt}"
        s.tasks[task_id] = _Task(site=site, attempt=attempt)
        return DispatchTask(task_id, site, s.round, s.round - 1, "train", attempt, s.deadline)

    def _may_retry(self, site: str, now: float) -> bool:
        s = self._s
        if site not in s.sites or (s.deadline is not None and now >= s.deadline):
            return False
        retries_used = sum(task.site == site for task in s.tasks.values()) - 1
        return retries_used < self.config.max_task_retries

    def _settle_if_all_finished(self, now: float) -> list[Decision]:
        # Waiting longer cannot add an update once nothing is running.
        s = self._s
        if s.tasks and all(task.status != "running" for task in s.tasks.values()):
            return self._settle(now)
        return []

    def _settle(self, now: float) -> list[Decision]:
        """End this run of the round: aggregate with a quorum, otherwise re-run or fail."""
        s = self._s
        decisions: list[Decision] = []
        if s.timer_id is not None:
            decisions.append(CancelTimer(s.timer_id))
            s.timer_id = None
        decisions += self._cancel_running(REASON_DEADLINE)
        updates = tuple(
            UpdateChoice(task_id, task.site, task.num_samples, staleness=0)
            for task_id, task in s.tasks.items()
            if task.status == "succeeded"
        )
        if len(updates) >= self.config.min_sites:
            s.phase = "aggregating"
            s.aggregations += 1
            s.aggregate_id = make_aggregate_id(s.aggregations)
            decisions.append(
                Aggregate(s.round, s.round - 1, updates, self.config.min_accepted, s.aggregate_id)
            )
            return decisions
        why = f"{len(updates)} successful update(s), quorum is {self.config.min_sites}"
        return decisions + self._retry_round(now, why)

    def _retry_round(self, now: float, why: str) -> list[Decision]:
        s = self._s
        if s.round_try >= self.config.max_round_retries:
            return self._finish("failed", f"round {s.round} failed after {s.round_try + 1} run(s): {why}")
        s.round_try += 1
        note = LogEntry("round_retried", f"round {s.round} re-run {s.round_try}: {why}")
        return [note, *self._start_round(now)]

    def _cancel_running(self, reason: str) -> list[Decision]:
        decisions: list[Decision] = []
        for task_id, task in self._s.tasks.items():
            if task.status == "running":
                task.status = "cancelled"
                decisions.append(CancelTask(task_id, reason))
        return decisions

    # -- the end --------------------------------------------------------------------------

    def _end_training(self, now: float) -> list[Decision]:
        s = self._s
        if not self.config.final_evaluation:
            return self._finish("completed", f"{s.completed} rounds aggregated")
        s.phase = "evaluating"
        s.tasks = {}
        s.evaluation, decisions = EvaluationState.start(
            now, s.completed, s.sites, self.config.evaluation_deadline_s
        )
        return decisions + self._finish_evaluation()

    def _on_evaluation_result(self, task_id: str, site: str, ok: bool) -> list[Decision]:
        evaluation = self._s.evaluation
        if evaluation is None or not evaluation.record(task_id, site, ok):
            return []
        return self._finish_evaluation()

    def _finish_evaluation(self) -> list[Decision]:
        """Finish once every evaluation task is settled; [] while some still run."""
        evaluation = self._s.evaluation
        if evaluation is None or not evaluation.finished:
            return []
        decisions = evaluation.stop(REASON_DEADLINE)  # only the timer is left to cancel
        reason = f"{self._s.completed} rounds aggregated; {evaluation.summary()}"
        return decisions + self._finish("completed", reason)

    def _finish(self, state: Literal["completed", "failed", "stopped"], reason: str) -> list[Decision]:
        self._s.phase = "done"
        return [Finish(state, reason)]
