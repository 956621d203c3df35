"""Property tests: every strategy driven by random interleavings in a small simulated world.

The world executes the strategy's decisions the way the coordinator does (tasks in flight,
timers, one aggregator) and checks every decision against the contract as it goes. Random
actions complete or fail tasks, fire timers (also late or cancelled ones), answer or fail
aggregations, replay duplicates and late results, move sites in and out, and stop. Then the
world behaves (tasks succeed, aggregations commit, timers fire) and the strategy must finish.

Every event is also handled by a copy restored from the JSON of the strategy's snapshot just
before it, and by a long-lived copy restored at a random earlier point: both must decide
exactly what the original decides.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fedhpc.coordinator.strategies import (
    Aggregate,
    AggregationFailed,
    AggregationSucceeded,
    CancelTask,
    CancelTimer,
    Decision,
    DispatchTask,
    Event,
    FedAsyncConfig,
    FedBuffConfig,
    Finish,
    LogEntry,
    SetTimer,
    SiteJoined,
    SiteLeft,
    Started,
    StopRequested,
    Strategy,
    StrategyConfig,
    SyncConfig,
    TaskFailed,
    TaskSucceeded,
    TimerFired,
    make_strategy,
    restore_strategy,
)

SITE_POOL = ("s0", "s1", "site-a", "s3", "s4-n0001", "s5")
FAIL_CODES = ("TRAINER_CRASHED", "DEADLINE_EXCEEDED", "UPDATE_REJECTED", "DISPATCH_FAILED")
# Weighted: results and timers are the common case.
ACTIONS = (
    "succeed",
    "succeed",
    "succeed",
    "succeed",
    "fail",
    "fail",
    "timer",
    "timer",
    "aggregated",
    "aggregated",
    "aggregated",
    "aggregation_failed",
    "duplicate",
    "late_result",
    "stale_timer",
    "leave",
    "join",
    "stop",
    "restore",
)


def roundtrip(strategy: Strategy[Any], config: StrategyConfig) -> Strategy[Any]:
    snapshot = json.loads(json.dumps(strategy.snapshot(), allow_nan=False))
    return restore_strategy(config, snapshot)


class World:
    """Executes decisions like the coordinator would, asserting the contract on each."""

    def __init__(self, config: StrategyConfig, sites: list[str]) -> None:
        self.config = config
        self.strategy = make_strategy(config)
        self.twin: Strategy[Any] | None = None
        self.now = 1000.0
        self.sync = isinstance(config, SyncConfig)
        self.concurrency = 1 if isinstance(config, SyncConfig) else config.concurrency_per_site
        self.active = list(sites)
        self.dispatched: dict[str, DispatchTask] = {}
        self.inflight: dict[str, DispatchTask] = {}
        self.cancelled: list[str] = []
        self.reported_ok: dict[str, int] = {}  # train task id -> num_samples (while in flight)
        self.timers: dict[str, float] = {}
        self.dead_timers: list[str] = []
        self.aggregate: Aggregate | None = None
        self.completed = 0
        self.aggregated_ids: set[str] = set()
        self.replayable: list[Event] = []
        self.finishes: list[Finish] = []
        self.stopped = False
        self.deliver(Started(self.now, tuple(sites)))

    # -- delivering events ----------------------------------------------------------------

    def deliver(self, event: Event, *, expect_nothing: bool = False) -> list[Decision]:
        self.now = max(self.now, event.now)
        was_done = self.strategy.done
        fresh = roundtrip(self.strategy, self.config)
        decisions = self.strategy.handle(event)
        assert fresh.handle(event) == decisions, "restored copy decided differently"
        if self.twin is not None:
            assert self.twin.handle(event) == decisions, "copy restored earlier diverged"
        if was_done or expect_nothing:
            assert decisions == [], f"{event} should be ignored"
        self.apply(decisions)
        return decisions

    def apply(self, decisions: list[Decision]) -> None:
        for decision in decisions:
            assert not self.finishes, "a decision after Finish"
            match decision:
                case DispatchTask():
                    self.on_dispatch(decision)
                case CancelTask():
                    assert decision.task_id in self.inflight, f"cancelled {decision.task_id} not in flight"
                    del self.inflight[decision.task_id]
                    self.cancelled.append(decision.task_id)
                case SetTimer():
                    assert decision.timer_id not in self.timers and decision.timer_id not in self.dead_timers
                    assert decision.at >= self.now
                    self.timers[decision.timer_id] = decision.at
                case CancelTimer():
                    assert decision.timer_id in self.timers, f"cancelled timer {decision.timer_id} not set"
                    del self.timers[decision.timer_id]
                    self.dead_timers.append(decision.timer_id)
                case Aggregate():
                    self.on_aggregate(decision)
                case Finish():
                    self.finishes.append(decision)
                case LogEntry():
                    pass
        if self.finishes:
            assert self.strategy.done
            assert not self.inflight, "tasks left in flight after Finish"
            assert not self.timers, "timers left set after Finish"

    def on_dispatch(self, task: DispatchTask) -> None:
        assert task.task_id not in self.dispatched, f"task id {task.task_id} reused"
        assert task.site in self.active, f"dispatched to inactive site {task.site}"
        assert task.attempt >= 1
        assert task.deadline is None or task.deadline > self.now
        self.dispatched[task.task_id] = task
        self.inflight[task.task_id] = task
        if task.mode == "evaluate":
            assert self.completed == self.config.rounds
            assert task.round == task.base_round == self.completed
            return
        assert self.completed < self.config.rounds
        assert task.base_round == self.completed, "train task not from the latest version"
        assert task.round == (self.completed + 1 if self.sync else task.base_round)
        at_site = [t for t in self.inflight.values() if t.site == task.site and t.mode == "train"]
        assert len(at_site) <= self.concurrency, f"{task.site} over its concurrency"

    def on_aggregate(self, aggregate: Aggregate) -> None:
        assert self.aggregate is None, "two Aggregates outstanding"
        assert aggregate.round == self.completed + 1 <= self.config.rounds
        assert aggregate.base_round == self.completed
        assert aggregate.updates and aggregate.min_accepted >= 1
        if isinstance(self.config, FedAsyncConfig):
            assert len(aggregate.updates) == 1
        if isinstance(self.config, FedBuffConfig):
            assert len(aggregate.updates) >= self.config.buffer_size
        for update in aggregate.updates:
            assert update.task_id not in self.aggregated_ids, f"{update.task_id} aggregated twice"
            assert update.task_id in self.reported_ok, f"{update.task_id} never succeeded in flight"
            assert update.num_samples == self.reported_ok[update.task_id]
            task = self.dispatched[update.task_id]
            assert task.mode == "train" and update.site == task.site
            assert update.staleness == aggregate.base_round - task.base_round >= 0
            if self.sync:
                assert update.staleness == 0 and task.round == aggregate.round
            limit = getattr(self.config, "max_staleness", None)
            assert limit is None or update.staleness <= limit
            self.aggregated_ids.add(update.task_id)
        self.aggregate = aggregate

    # -- actions --------------------------------------------------------------------------

    def tick(self, pick: int) -> float:
        self.now += float(pick % 7) * 3.0
        return self.now

    def finish_task(self, pick: int, ok: bool) -> None:
        if not self.inflight:
            return
        task = list(self.inflight.values())[pick % len(self.inflight)]
        del self.inflight[task.task_id]
        event: Event
        if ok:
            samples = 1 + pick % 50
            if task.mode == "train":
                self.reported_ok[task.task_id] = samples
            event = TaskSucceeded(self.now, task.task_id, task.site, samples, {"loss": 0.5})
        else:
            event = TaskFailed(self.now, task.task_id, task.site, FAIL_CODES[pick % len(FAIL_CODES)], "boom")
        self.replayable.append(event)
        self.deliver(event)

    def fire_timer(self, pick: int, earliest: bool = False) -> None:
        if not self.timers:
            return
        items = sorted(self.timers.items(), key=lambda kv: kv[1]) if earliest else list(self.timers.items())
        timer_id, at = items[0] if earliest else items[pick % len(items)]
        del self.timers[timer_id]
        self.dead_timers.append(timer_id)
        event = TimerFired(max(self.now, at), timer_id)
        self.replayable.append(event)
        self.deliver(event)

    def answer_aggregate(self, pick: int, ok: bool) -> None:
        aggregate = self.aggregate
        if aggregate is None:
            return
        self.aggregate = None
        ids = [u.task_id for u in aggregate.updates]
        # Reject the updates whose bit in pick is set (about one in four).
        rejected = {tid: "non-finite values" for i, tid in enumerate(ids) if (pick >> (2 * i)) & 3 == 3}
        accepted = tuple(tid for tid in ids if tid not in rejected)
        event: Event
        if ok and len(accepted) >= aggregate.min_accepted:
            self.completed += 1
            event = AggregationSucceeded(
                self.now, aggregate.round, accepted, rejected, aggregate.aggregate_id
            )
        else:
            event = AggregationFailed(self.now, aggregate.round, "too few accepted", aggregate.aggregate_id)
        self.replayable.append(event)
        self.deliver(event)

    def duplicate(self, pick: int) -> None:
        if self.replayable:
            event = self.replayable[pick % len(self.replayable)]
            self.deliver(dataclasses.replace(event, now=self.now), expect_nothing=True)

    def late_result(self, pick: int) -> None:
        if not self.cancelled:
            return
        task = self.dispatched[self.cancelled[pick % len(self.cancelled)]]
        event: Event = (
            TaskSucceeded(self.now, task.task_id, task.site, 7)
            if pick % 2
            else TaskFailed(self.now, task.task_id, task.site, "CANCELLED", "cancelled")
        )
        self.deliver(event, expect_nothing=True)

    def stale_timer(self, pick: int) -> None:
        if self.dead_timers:
            timer_id = self.dead_timers[pick % len(self.dead_timers)]
            self.deliver(TimerFired(self.now, timer_id), expect_nothing=True)

    def leave(self, pick: int) -> None:
        if self.active:
            site = self.active.pop(pick % len(self.active))
            self.deliver(SiteLeft(self.now, site))

    def join(self, pick: int) -> None:
        candidates = [site for site in SITE_POOL if site not in self.active]
        if candidates:
            site = candidates[pick % len(candidates)]
            self.active.append(site)
            self.deliver(SiteJoined(self.now, site))

    def stop(self, pick: int) -> None:
        if pick % 5 == 0:  # rare: most runs should get further
            self.stopped = not self.strategy.done or self.stopped
            self.deliver(StopRequested(self.now, "operator"))

    def act(self, action: str, pick: int) -> None:
        self.tick(pick)
        match action:
            case "succeed":
                self.finish_task(pick, ok=True)
            case "fail":
                self.finish_task(pick, ok=False)
            case "timer":
                self.fire_timer(pick)
            case "aggregated":
                self.answer_aggregate(pick, ok=True)
            case "aggregation_failed":
                self.answer_aggregate(pick, ok=False)
            case "duplicate":
                self.duplicate(pick)
            case "late_result":
                self.late_result(pick)
            case "stale_timer":
                self.stale_timer(pick)
            case "leave":
                self.leave(pick)
            case "join":
                self.join(pick)
            case "stop":
                self.stop(pick)
            case "restore":
                self.twin = roundtrip(self.strategy, self.config)

    def behave(self, max_steps: int = 5000) -> None:
        """A well-behaved world from here on: the strategy must finish."""
        for _ in range(max_steps):
            if self.strategy.done:
                return
            self.now += 1.0
            if self.aggregate is not None:
                self.answer_aggregate(0, ok=True)
            elif self.inflight:
                self.finish_task(0, ok=True)
            elif self.timers:
                self.fire_timer(0, earliest=True)
            elif len(self.active) < len(SITE_POOL):
                self.join(0)
            else:
                raise AssertionError(f"stuck: nothing in flight, no timer, {self.strategy.snapshot()}")
        raise AssertionError("did not finish")


# -- configurations -----------------------------------------------------------------------

deadlines = st.sampled_from([None, 40.0, 150.0])


@st.composite
def sync_configs(draw: st.DrawFn) -> SyncConfig:
    min_sites = draw(st.integers(1, 3))
    return SyncConfig(
        rounds=draw(st.integers(1, 4)),
        min_sites=min_sites,
        sites_per_round=draw(st.sampled_from([0, *range(min_sites, 4)])),
        round_deadline_s=draw(deadlines),
        max_task_retries=draw(st.integers(0, 2)),
        max_round_retries=draw(st.integers(0, 3)),
        min_accepted=draw(st.integers(1, min_sites)),
        final_evaluation=draw(st.booleans()),
        evaluation_deadline_s=draw(deadlines),
    )


def _async_fields(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "rounds": draw(st.integers(1, 5)),
        "concurrency_per_site": draw(st.integers(1, 2)),
        "max_staleness": draw(st.sampled_from([None, 0, 1, 3])),
        "task_deadline_s": draw(deadlines),
        "max_task_retries": draw(st.integers(0, 2)),
        "final_evaluation": draw(st.booleans()),
        "evaluation_deadline_s": draw(deadlines),
    }


@st.composite
def fedasync_configs(draw: st.DrawFn) -> FedAsyncConfig:
    return FedAsyncConfig(**_async_fields(draw))


@st.composite
def fedbuff_configs(draw: st.DrawFn) -> FedBuffConfig:
    buffer_size = draw(st.integers(1, 3))
    return FedBuffConfig(
        **_async_fields(draw), buffer_size=buffer_size, min_accepted=draw(st.integers(1, buffer_size))
    )


starting_sites = st.lists(st.sampled_from(SITE_POOL), min_size=0, max_size=4, unique=True)
action_lists = st.lists(st.tuples(st.sampled_from(ACTIONS), st.integers(0, 2**16)), max_size=80)
# Random worlds only: no I/O, so the deadline guards against hangs, not slow machines.
run_settings = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run_world(config: StrategyConfig, sites: list[str], actions: list[tuple[str, int]]) -> World:
    world = World(config, sites)
    for action, pick in actions:
        world.act(action, pick)
    world.behave()
    assert len(world.finishes) == 1
    finish = world.finishes[0]
    if finish.state == "completed":
        assert world.completed == config.rounds
    if world.stopped:
        assert finish.state == "stopped"
    if finish.state == "stopped":
        assert world.stopped
    # A finished strategy ignores everything, including the restored copy of it.
    world.deliver(StopRequested(world.now + 1, "again"), expect_nothing=True)
    return world


@run_settings
@given(config=sync_configs(), sites=starting_sites, actions=action_lists)
def test_sync_random_worlds(config: SyncConfig, sites: list[str], actions: list[tuple[str, int]]) -> None:
    run_world(config, sites, actions)


@run_settings
@given(config=fedasync_configs(), sites=starting_sites, actions=action_lists)
def test_fedasync_random_worlds(
    config: FedAsyncConfig, sites: list[str], actions: list[tuple[str, int]]
) -> None:
    run_world(config, sites, actions)


@run_settings
@given(config=fedbuff_configs(), sites=starting_sites, actions=action_lists)
def test_fedbuff_random_worlds(
    config: FedBuffConfig, sites: list[str], actions: list[tuple[str, int]]
) -> None:
    run_world(config, sites, actions)


@settings(max_examples=100, deadline=None)
@given(
    config=st.one_of(sync_configs(), fedasync_configs(), fedbuff_configs()),
    sites=st.lists(st.sampled_from(SITE_POOL), min_size=1, max_size=4, unique=True),
)
def test_well_behaved_world_completes(config: StrategyConfig, sites: list[str]) -> None:
    """No failures, no departures: every strategy completes all its rounds."""
    assume(not isinstance(config, SyncConfig) or len(sites) >= config.min_sites)
    world = run_world(config, sites, [])
    assert world.finishes[0].state == "completed"
    assert world.completed == config.rounds
