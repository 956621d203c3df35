"""Asynchronous strategies: FedAsync here, and the machinery FedBuff shares.

Every active site keeps ``concurrency_per_site`` train tasks going, each from the latest server
version at its dispatch. Successful updates wait in arrival order; an update whose staleness
(server version now - version it trained from) exceeds ``max_staleness`` is dropped. The
strategy aggregates from that queue, one Aggregate at a time, each producing the next server
version, until ``rounds`` versions exist.

FedAsync (Xie et al., 2019) aggregates every update on its own, and a site trains again only
once its update is in a version, so its next task starts from a model that includes it.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Self, TypeVar

from pydantic import Field

from fedhpc.coordinator.strategies.base import (
    REASON_COMPLETED,
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

__all__ = ["AsyncConfigBase", "AsyncStrategyBase", "FedAsyncConfig", "FedAsyncStrategy", "QueuedUpdate"]


class AsyncConfigBase(StrategyConfigBase):
    """Keys shared by the asynchronous strategies."""

    rounds: int = Field(default=100, ge=1, description="Server updates (aggregations) to perform.")
    concurrency_per_site: int = Field(
        default=1, ge=1, description="Train tasks each active site keeps in flight."
    )
    max_staleness: int | None = Field(
        default=None,
        ge=0,
        description="Drop updates trained from a version more than this many versions old; "
        "null = keep all (the aggregator still down-weights stale updates).",
    )
    task_deadline_s: Seconds | None = Field(
        default=3600.0,
        description="Seconds a task may take from dispatch (queue wait included); then it is "
        "cancelled, counted as a failure and re-dispatched. null = no deadline.",
    )
    max_task_retries: int = Field(
        default=3,
        ge=0,
        description="Consecutive failures (task failed, deadline missed, update rejected) a site "
        "may have and still get a new task; one more and the site is parked until it re-joins.",
    )
    final_evaluation: bool = Field(
        default=False,
        description="After the last server update, evaluate the final model on every active, unparked site.",
    )
    evaluation_deadline_s: Seconds | None = Field(
        default=3600.0,
        description="Seconds the final evaluation may take; null = wait for every site.",
    )


class FedAsyncConfig(AsyncConfigBase):
    """``strategy: {name: fedasync, ...}``: one server update per client update."""

    name: Literal["fedasync"] = Field(default="fedasync", description="Selects this strategy.")


class _Running(StateModel):
    site: str
    base_round: int
    attempt: int
    timer_id: str | None = None


class QueuedUpdate(StateModel):
    """A successful update waiting for (or in) an Aggregate."""

    task_id: str
    site: str
    num_samples: int
    base_round: int


class _Site(StateModel):
    # Kept after a site leaves, so task ids stay unique when it comes back.
    next_task: int = 1
    failures: int = 0
    parked: bool = False


class _AsyncState(StateModel):
    phase: Literal["idle", "running", "evaluating", "done"] = "idle"
    # Server versions aggregated so far; the latest model is the version of this round.
    version: int = 0
    # Active sites in the order they became active.
    sites: list[str] = Field(default_factory=list)
    site_info: dict[str, _Site] = Field(default_factory=dict)
    running: dict[str, _Running] = Field(default_factory=dict)
    # Successful updates not yet in an Aggregate, in arrival order.
    buffer: list[QueuedUpdate] = Field(default_factory=list)
    # The updates of the outstanding Aggregate (for round version + 1), if any.
    aggregating: list[QueuedUpdate] | None = None
    # Aggregates issued so far (for their ids), and the id of the outstanding one.
    aggregations: int = 0
    aggregate_id: str | None = None
    evaluation: EvaluationState | None = None


AsyncConfigT = TypeVar("AsyncConfigT", bound=AsyncConfigBase)


class AsyncStrategyBase(Strategy[AsyncConfigT]):
    """Asynchronous scheduling; subclasses decide when and what to aggregate."""

    # True: a site's slot stays taken until its update is aggregated (FedAsync);
    # False: the site is re-dispatched as soon as it reports (FedBuff).
    hold_slot_until_aggregated: ClassVar[bool]

    def __init__(self, config: AsyncConfigT) -> None:
        super().__init__(config)
        self._s = _AsyncState()

    @abstractmethod
    def _take_batch(self, buffer: list[QueuedUpdate]) -> list[QueuedUpdate]:
        """Remove and return the updates of the next Aggregate; [] to keep waiting."""

    @property
    def min_accepted(self) -> int:
        return 1

    # -- Strategy interface ---------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._s.phase == "done"

    @property
    def completed_rounds(self) -> int:
        return self._s.version

    def snapshot(self) -> dict[str, Any]:
        return pack_snapshot(self.name, self._s)

    @classmethod
    def restore(cls, config: AsyncConfigT, snapshot: Mapping[str, Any]) -> Self:
        strategy = cls(config)
        strategy._s = unpack_snapshot(cls.name, snapshot, _AsyncState)
        return strategy

    def handle(self, event: Event) -> list[Decision]:
        if self.done:
            return []
        if self._s.phase == "idle":
            if isinstance(event, Started):
                return self._on_started(event)
            if isinstance(event, StopRequested):
                return self._on_stop(event)
            return []
        match event:
            case TaskSucceeded():
                return self._on_succeeded(event)
            case TaskFailed():
                return self._on_failed(event)
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
        s = self._s
        s.phase = "running"
        s.sites = list(dict.fromkeys(event.sites))
        for site in s.sites:
            s.site_info.setdefault(site, _Site())
        return self._advance(event.now)

    def _on_succeeded(self, event: TaskSucceeded) -> list[Decision]:
        s = self._s
        if s.phase == "evaluating":
            return self._on_evaluation_result(event.task_id, event.site, ok=True)
        task = s.running.get(event.task_id)
        if s.phase != "running" or task is None or task.site != event.site:
            return []  # duplicate, late (cancelled) or unknown: never counted twice
        decisions = self._retire(event.task_id)
        update = QueuedUpdate(
            task_id=event.task_id, site=event.site, num_samples=event.num_samples, base_round=task.base_round
        )
        if self._too_stale(update):
            decisions.append(self._dropped(update))
        else:
            s.buffer.append(update)
        return decisions + self._advance(event.now)

    def _on_failed(self, event: TaskFailed) -> list[Decision]:
        s = self._s
        if s.phase == "evaluating":
            return self._on_evaluation_result(event.task_id, event.site, ok=False)
        task = s.running.get(event.task_id)
        if s.phase != "running" or task is None or task.site != event.site:
            return []
        decisions = self._retire(event.task_id)
        decisions += self._count_failure(task.site, f"{event.code}: {event.message}")
        return decisions + self._advance(event.now)

    def _on_timer(self, event: TimerFired) -> list[Decision]:
        s = self._s
        if s.phase == "evaluating" and s.evaluation is not None:
            decisions = s.evaluation.expire(event.timer_id)
            return [] if decisions is None else decisions + self._finish_evaluation()
        task_id = event.timer_id.removeprefix("deadline-")
        task = s.running.get(task_id)
        if s.phase != "running" or task is None or task.timer_id != event.timer_id:
            return []  # cancelled earlier, or a duplicate
        task.timer_id = None  # it fired: nothing left to cancel
        decisions = [*self._retire(task_id), CancelTask(task_id, REASON_DEADLINE)]
        decisions += self._count_failure(task.site, "deadline exceeded")
        return decisions + self._advance(event.now)

    def _on_joined(self, event: SiteJoined) -> list[Decision]:
        s = self._s
        if event.site in s.sites:
            return []
        s.sites.append(event.site)
        # Coming back is a fresh start: a parked site gets another chance.
        info = s.site_info.setdefault(event.site, _Site())
        info.failures = 0
        info.parked = False
        return self._advance(event.now)

    def _on_left(self, event: SiteLeft) -> list[Decision]:
        s = self._s
        if event.site not in s.sites:
            return []
        s.sites.remove(event.site)
        if s.phase == "evaluating" and s.evaluation is not None:
            cancelled = s.evaluation.site_left(event.site)
            return cancelled + self._finish_evaluation()
        decisions: list[Decision] = []
        for task_id in [tid for tid, task in s.running.items() if task.site == event.site]:
            decisions += [*self._retire(task_id), CancelTask(task_id, REASON_SITE_LEFT)]
        # Its updates already reported stay queued: they are valid and already uploaded.
        return decisions + self._advance(event.now)

    def _on_aggregated(self, event: AggregationSucceeded) -> list[Decision]:
        s = self._s
        batch = s.aggregating
        if s.phase != "running" or batch is None or not answers(event, s.version + 1, s.aggregate_id):
            return []  # a duplicate, or the answer to an earlier Aggregate
        s.version += 1
        s.aggregating = None
        s.aggregate_id = None
        decisions: list[Decision] = []
        for update in batch:
            if update.task_id in event.rejected:
                reason = event.rejected[update.task_id]
                decisions += self._count_failure(update.site, f"update {update.task_id} rejected: {reason}")
            else:
                s.site_info[update.site].failures = 0
        if s.version >= self.config.rounds:
            return decisions + self._end_training(event.now)
        return decisions + self._advance(event.now)

    def _on_aggregation_failed(self, event: AggregationFailed) -> list[Decision]:
        s = self._s
        batch = s.aggregating
        if s.phase != "running" or batch is None or not answers(event, s.version + 1, s.aggregate_id):
            return []
        s.aggregating = None
        s.aggregate_id = None
        # The updates are lost; each site that contributed counts one failure, so a broken
        # aggregator parks every site in the end instead of looping for ever.
        decisions: list[Decision] = [
            LogEntry("aggregation_failed", f"aggregation for round {event.round} failed: {event.message}")
        ]
        for site in dict.fromkeys(update.site for update in batch):
            decisions += self._count_failure(site, f"aggregation failed: {event.message}")
        return decisions + self._advance(event.now)

    def _on_stop(self, event: StopRequested) -> list[Decision]:
        s = self._s
        decisions = self._cancel_running(REASON_STOPPED)
        if s.evaluation is not None and s.phase == "evaluating":
            decisions += s.evaluation.stop(REASON_STOPPED)
        # An outstanding Aggregate cannot be recalled; its result will be ignored.
        return decisions + self._finish("stopped", event.reason or "stop requested")

    # -- scheduling -----------------------------------------------------------------------

    def _advance(self, now: float) -> list[Decision]:
        """After any change: aggregate if a batch is ready, fill free slots, detect a dead end."""
        decisions = self._maybe_aggregate()
        decisions += self._fill_slots(now)
        return decisions + self._fail_if_stuck()

    def _maybe_aggregate(self) -> list[Decision]:
        s = self._s
        if s.phase != "running" or s.aggregating is not None:
            return []
        # Staleness only grows while updates wait: check again before aggregating.
        decisions: list[Decision] = [self._dropped(update) for update in s.buffer if self._too_stale(update)]
        s.buffer = [update for update in s.buffer if not self._too_stale(update)]
        batch = self._take_batch(s.buffer)
        if not batch:
            return decisions
        s.aggregating = batch
        s.aggregations += 1
        s.aggregate_id = make_aggregate_id(s.aggregations)
        updates = tuple(
            UpdateChoice(u.task_id, u.site, u.num_samples, staleness=s.version - u.base_round) for u in batch
        )
        aggregate = Aggregate(s.version + 1, s.version, updates, self.min_accepted, s.aggregate_id)
        return [*decisions, aggregate]

    def _fill_slots(self, now: float) -> list[Decision]:
        s = self._s
        if s.phase != "running":
            return []
        decisions: list[Decision] = []
        for site in s.sites:
            if s.site_info[site].parked:
                continue
            for _ in range(self.config.concurrency_per_site - self._slots_taken(site)):
                decisions += self._dispatch(site, now)
        return decisions

    def _slots_taken(self, site: str) -> int:
        s = self._s
        taken = sum(task.site == site for task in s.running.values())
        if self.hold_slot_until_aggregated:
            waiting = [*s.buffer, *(s.aggregating or [])]
            taken += sum(update.site == site for update in waiting)
        return taken

    def _dispatch(self, site: str, now: float) -> list[Decision]:
        s = self._s
        info = s.site_info[site]
        task_id = f"{site}-n{info.next_task:04d}"
        info.next_task += 1
        attempt = info.failures + 1
        deadline_s = self.config.task_deadline_s
        deadline = None if deadline_s is None else now + deadline_s
        task = _Running(site=site, base_round=s.version, attempt=attempt)
        s.running[task_id] = task
        decisions: list[Decision] = [
            DispatchTask(task_id, site, s.version, s.version, "train", attempt, deadline)
        ]
        if deadline is not None:
            task.timer_id = f"deadline-{task_id}"
            decisions.append(SetTimer(task.timer_id, deadline))
        return decisions

    def _fail_if_stuck(self) -> list[Decision]:
        """Every active site is parked and nothing is running or aggregating: nothing will ever
        happen again. (With no active site at all, wait: a site may join.)"""
        s = self._s
        if s.phase != "running" or s.running or s.aggregating is not None or not s.sites:
            return []
        if any(not s.site_info[site].parked for site in s.sites):
            return []
        return self._finish("failed", f"all {len(s.sites)} active site(s) are parked after repeated failures")

    def _retire(self, task_id: str) -> list[Decision]:
        """Forget a running task; cancel its deadline timer."""
        task = self._s.running.pop(task_id)
        return [] if task.timer_id is None else [CancelTimer(task.timer_id)]

    def _count_failure(self, site: str, why: str) -> list[Decision]:
        info = self._s.site_info[site]
        info.failures += 1
        if info.parked or info.failures <= self.config.max_task_retries:
            return []
        info.parked = True
        message = f"site {site} parked after {info.failures} consecutive failures (last: {why})"
        return [LogEntry("site_parked", message, site=site)]

    def _too_stale(self, update: QueuedUpdate) -> bool:
        limit = self.config.max_staleness
        return limit is not None and self._s.version - update.base_round > limit

    def _dropped(self, update: QueuedUpdate) -> LogEntry:
        staleness = self._s.version - update.base_round
        message = (
            f"update {update.task_id} dropped: staleness {staleness} > max_staleness "
            f"{self.config.max_staleness}"
        )
        return LogEntry("update_dropped", message, site=update.site, task_id=update.task_id)

    def _cancel_running(self, reason: str) -> list[Decision]:
        decisions: list[Decision] = []
        for task_id in list(self._s.running):
            decisions += [*self._retire(task_id), CancelTask(task_id, reason)]
        return decisions

    # -- the end --------------------------------------------------------------------------

    def _end_training(self, now: float) -> list[Decision]:
        s = self._s
        decisions = self._cancel_running(REASON_COMPLETED)
        s.buffer = []
        if not self.config.final_evaluation:
            return decisions + self._finish("completed", f"{s.version} server updates aggregated")
        s.phase = "evaluating"
        sites = [site for site in s.sites if not s.site_info[site].parked]
        s.evaluation, started = EvaluationState.start(
            now, s.version, sites, self.config.evaluation_deadline_s
        )
        return decisions + started + self._finish_evaluation()

    def _on_evaluation_result(self, task_id: str, site: str, ok: bool) -> list[Decision]:
        evaluation = self._s.evaluation
        if evaluation is None or not evaluation.record(task_id, site, ok):
            return []
        return self._finish_evaluation()

    def _finish_evaluation(self) -> list[Decision]:
        evaluation = self._s.evaluation
        if evaluation is None or not evaluation.finished:
            return []
        decisions = evaluation.stop(REASON_DEADLINE)  # only the timer is left to cancel
        reason = f"{self._s.version} server updates aggregated; {evaluation.summary()}"
        return decisions + self._finish("completed", reason)

    def _finish(self, state: Literal["completed", "failed", "stopped"], reason: str) -> list[Decision]:
        self._s.phase = "done"
        return [Finish(state, reason)]


class FedAsyncStrategy(AsyncStrategyBase[FedAsyncConfig]):
    """FedAsync: each update becomes its own server version, in arrival order."""

    name: ClassVar[str] = "fedasync"
    hold_slot_until_aggregated: ClassVar[bool] = True

    def _take_batch(self, buffer: list[QueuedUpdate]) -> list[QueuedUpdate]:
        return [buffer.pop(0)] if buffer else []
