"""Scenario tests for FedAsync: one server update per client update, staleness, parking."""

from __future__ import annotations

from typing import Any

from fedhpc.coordinator.strategies import (
    Aggregate,
    AggregationFailed,
    AggregationSucceeded,
    CancelTask,
    CancelTimer,
    Decision,
    DispatchTask,
    FedAsyncConfig,
    FedAsyncStrategy,
    Finish,
    LogEntry,
    SetTimer,
    SiteJoined,
    SiteLeft,
    Started,
    StopRequested,
    TaskFailed,
    TaskSucceeded,
    TimerFired,
    UpdateChoice,
)


def make(**fields: Any) -> FedAsyncStrategy:
    return FedAsyncStrategy(FedAsyncConfig(**fields))


def of(kind: type[Any], decisions: list[Decision]) -> list[Any]:
    return [d for d in decisions if isinstance(d, kind)]


def dispatched(decisions: list[Decision]) -> list[str]:
    return [d.task_id for d in of(DispatchTask, decisions)]


def site_of(task_id: str) -> str:
    return task_id.rsplit("-n", 1)[0]


def ok(now: float, task_id: str, samples: int = 10) -> TaskSucceeded:
    return TaskSucceeded(now, task_id, site_of(task_id), samples, {"loss": 0.2})


def fail(now: float, task_id: str, code: str = "TRAINER_CRASHED") -> TaskFailed:
    return TaskFailed(now, task_id, site_of(task_id), code, "boom")


def committed(
    now: float, aggregate: Aggregate, rejected: dict[str, str] | None = None
) -> AggregationSucceeded:
    rejected = rejected or {}
    accepted = tuple(u.task_id for u in aggregate.updates if u.task_id not in rejected)
    return AggregationSucceeded(now, aggregate.round, accepted, rejected, aggregate.aggregate_id)


def test_each_update_is_its_own_version_and_queues_while_one_is_outstanding() -> None:
    strategy = make(rounds=3, task_deadline_s=None)
    out = strategy.handle(Started(0.0, ("site-a", "site-b")))
    assert out == [
        DispatchTask("site-a-n0001", "site-a", 0, 0, "train", 1, None),
        DispatchTask("site-b-n0001", "site-b", 0, 0, "train", 1, None),
    ]
    first = strategy.handle(ok(1.0, "site-a-n0001", 5))
    assert first == [Aggregate(1, 0, (UpdateChoice("site-a-n0001", "site-a", 5, 0),), 1, "agg-0001")]
    # b reports while version 1 is being made: it waits, and b gets no new task yet.
    assert strategy.handle(ok(2.0, "site-b-n0001", 7)) == []
    out = strategy.handle(committed(3.0, of(Aggregate, first)[0]))
    # b's update trained from version 0 goes into version 2: staleness 1. a trains again
    # from version 1, which includes its own update.
    assert out == [
        Aggregate(2, 1, (UpdateChoice("site-b-n0001", "site-b", 7, 1),), 1, "agg-0002"),
        DispatchTask("site-a-n0002", "site-a", 1, 1, "train", 1, None),
    ]
    second = of(Aggregate, out)[0]
    out = strategy.handle(committed(4.0, second))
    assert out == [DispatchTask("site-b-n0002", "site-b", 2, 2, "train", 1, None)]
    third = of(Aggregate, strategy.handle(ok(5.0, "site-b-n0002")))[0]
    assert third.round == 3 and third.updates[0].staleness == 0
    out = strategy.handle(committed(6.0, third))
    # Done: the task still running is cancelled.
    assert out == [
        CancelTask("site-a-n0002", "COMPLETED"),
        Finish("completed", "3 server updates aggregated"),
    ]
    assert strategy.done and strategy.completed_rounds == 3


def test_too_stale_update_is_dropped_and_the_site_retrains() -> None:
    strategy = make(rounds=5, task_deadline_s=None, max_staleness=0)
    strategy.handle(Started(0.0, ("a", "b")))
    first = of(Aggregate, strategy.handle(ok(1.0, "a-n0001")))[0]
    strategy.handle(ok(2.0, "b-n0001"))  # queued, staleness will be 1 > 0
    out = strategy.handle(committed(3.0, first))
    assert of(Aggregate, out) == []
    dropped = of(LogEntry, out)[0]
    assert dropped.kind == "update_dropped" and dropped.task_id == "b-n0001"
    assert out[1:] == [
        DispatchTask("a-n0002", "a", 1, 1, "train", 1, None),
        DispatchTask("b-n0002", "b", 1, 1, "train", 1, None),
    ]


def test_deadline_cancels_and_redispatches() -> None:
    strategy = make(rounds=2, task_deadline_s=30.0)
    out = strategy.handle(Started(0.0, ("a",)))
    assert out == [DispatchTask("a-n0001", "a", 0, 0, "train", 1, 30.0), SetTimer("deadline-a-n0001", 30.0)]
    out = strategy.handle(TimerFired(30.0, "deadline-a-n0001"))
    assert out == [
        CancelTask("a-n0001", "DEADLINE_EXCEEDED"),
        DispatchTask("a-n0002", "a", 0, 0, "train", 2, 60.0),
        SetTimer("deadline-a-n0002", 60.0),
    ]
    assert strategy.handle(ok(31.0, "a-n0001")) == []  # late: it was cancelled
    assert strategy.handle(TimerFired(32.0, "deadline-a-n0001")) == []  # duplicate
    out = strategy.handle(ok(40.0, "a-n0002"))
    assert out[0] == CancelTimer("deadline-a-n0002")
    assert isinstance(out[1], Aggregate)


def test_consecutive_failures_park_a_site_and_all_parked_fails() -> None:
    strategy = make(rounds=2, task_deadline_s=None, max_task_retries=1)
    strategy.handle(Started(0.0, ("a",)))
    assert strategy.handle(fail(1.0, "a-n0001")) == [DispatchTask("a-n0002", "a", 0, 0, "train", 2, None)]
    out = strategy.handle(fail(2.0, "a-n0002"))
    parked = of(LogEntry, out)[0]
    assert parked.kind == "site_parked" and parked.site == "a"
    assert isinstance(out[-1], Finish) and out[-1].state == "failed"


def test_parked_site_comes_back_by_rejoining() -> None:
    strategy = make(rounds=1, task_deadline_s=None, max_task_retries=0)
    strategy.handle(Started(0.0, ("a", "b")))
    out = strategy.handle(fail(1.0, "a-n0001"))
    assert [d.kind for d in of(LogEntry, out)] == ["site_parked"]
    assert dispatched(out) == []
    assert strategy.handle(SiteLeft(2.0, "a")) == []
    out = strategy.handle(SiteJoined(3.0, "a"))
    assert out == [DispatchTask("a-n0002", "a", 0, 0, "train", 1, None)]


def test_rejected_update_counts_as_a_failure_and_acceptance_resets() -> None:
    strategy = make(rounds=4, task_deadline_s=None, max_task_retries=1)
    strategy.handle(Started(0.0, ("a", "b")))
    first = of(Aggregate, strategy.handle(ok(1.0, "a-n0001")))[0]
    out = strategy.handle(committed(2.0, first, {"a-n0001": "NaN in layer1"}))
    assert out == [DispatchTask("a-n0002", "a", 1, 1, "train", 2, None)]
    second = of(Aggregate, strategy.handle(ok(3.0, "a-n0002")))[0]
    out = strategy.handle(committed(4.0, second))
    assert out == [DispatchTask("a-n0003", "a", 2, 2, "train", 1, None)]


def test_aggregation_failure_loses_the_update_and_retrains() -> None:
    strategy = make(rounds=2, task_deadline_s=None)
    strategy.handle(Started(0.0, ("a",)))
    first = of(Aggregate, strategy.handle(ok(1.0, "a-n0001")))[0]
    out = strategy.handle(AggregationFailed(2.0, 1, "registry unavailable", first.aggregate_id))
    assert of(LogEntry, out)[0].kind == "aggregation_failed"
    assert dispatched(out) == ["a-n0002"]
    assert strategy.completed_rounds == 0
    second = of(Aggregate, strategy.handle(ok(3.0, "a-n0002")))[0]
    assert second.round == 1 and second.aggregate_id == "agg-0002"
    assert strategy.handle(AggregationFailed(4.0, 1, "dup", first.aggregate_id)) == []


def test_concurrency_keeps_that_many_tasks_per_site() -> None:
    strategy = make(rounds=3, task_deadline_s=None, concurrency_per_site=2)
    out = strategy.handle(Started(0.0, ("a", "b")))
    assert dispatched(out) == ["a-n0001", "a-n0002", "b-n0001", "b-n0002"]
    assert dispatched(strategy.handle(fail(1.0, "a-n0002"))) == ["a-n0003"]


def test_site_left_cancels_its_tasks_but_its_reported_update_still_counts() -> None:
    strategy = make(rounds=3, task_deadline_s=20.0, concurrency_per_site=2)
    strategy.handle(Started(0.0, ("a", "b")))
    first = of(Aggregate, strategy.handle(ok(1.0, "a-n0001")))[0]
    strategy.handle(ok(2.0, "b-n0001"))  # queued behind the outstanding Aggregate
    out = strategy.handle(SiteLeft(3.0, "b"))
    assert out == [CancelTimer("deadline-b-n0002"), CancelTask("b-n0002", "SITE_LEFT")]
    out = strategy.handle(committed(4.0, first))
    assert of(Aggregate, out)[0].updates[0].task_id == "b-n0001"
    assert dispatched(out) == ["a-n0003"]  # and nothing for b


def test_no_sites_waits_for_one_to_join() -> None:
    strategy = make(rounds=1, task_deadline_s=None)
    assert strategy.handle(Started(0.0, ())) == []
    assert not strategy.done
    assert dispatched(strategy.handle(SiteJoined(1.0, "a"))) == ["a-n0001"]


def test_final_evaluation_after_the_last_update() -> None:
    strategy = make(rounds=1, task_deadline_s=None, final_evaluation=True, evaluation_deadline_s=None)
    strategy.handle(Started(0.0, ("a", "b")))
    first = of(Aggregate, strategy.handle(ok(1.0, "a-n0001")))[0]
    out = strategy.handle(committed(2.0, first))
    assert out == [
        CancelTask("b-n0001", "COMPLETED"),
        DispatchTask("eval-r0001-a", "a", 1, 1, "evaluate", 1, None),
        DispatchTask("eval-r0001-b", "b", 1, 1, "evaluate", 1, None),
    ]
    assert strategy.handle(ok(3.0, "b-n0001")) == []  # the cancelled train task
    assert strategy.handle(TaskSucceeded(4.0, "eval-r0001-a", "a", 50, {"accuracy": 0.8})) == []
    out = strategy.handle(SiteLeft(5.0, "b"))
    assert out == [
        CancelTask("eval-r0001-b", "SITE_LEFT"),
        Finish("completed", "1 server updates aggregated; final evaluation on 1/2 sites"),
    ]


def test_stop_cancels_everything_in_flight() -> None:
    strategy = make(rounds=5, task_deadline_s=10.0)
    strategy.handle(Started(0.0, ("a", "b")))
    strategy.handle(ok(1.0, "a-n0001"))  # an Aggregate is outstanding: it cannot be recalled
    out = strategy.handle(StopRequested(2.0, "budget"))
    assert out == [
        CancelTimer("deadline-b-n0001"),
        CancelTask("b-n0001", "STOPPED"),
        Finish("stopped", "budget"),
    ]
    assert strategy.handle(AggregationSucceeded(3.0, 1, ("a-n0001",), {}, "agg-0001")) == []
