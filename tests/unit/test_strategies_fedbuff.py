"""Scenario tests for FedBuff: K buffered updates per server version, continuous training."""

from __future__ import annotations

from typing import Any

from fedhpc.coordinator.strategies import (
    Aggregate,
    AggregationSucceeded,
    CancelTask,
    Decision,
    DispatchTask,
    FedBuffConfig,
    FedBuffStrategy,
    Finish,
    LogEntry,
    Started,
    StopRequested,
    TaskSucceeded,
    UpdateChoice,
)


def make(**fields: Any) -> FedBuffStrategy:
    return FedBuffStrategy(FedBuffConfig(**fields))


def of(kind: type[Any], decisions: list[Decision]) -> list[Any]:
    return [d for d in decisions if isinstance(d, kind)]


def ok(now: float, task_id: str, samples: int = 10) -> TaskSucceeded:
    return TaskSucceeded(now, task_id, task_id.rsplit("-n", 1)[0], samples, {})


def committed(now: float, aggregate: Aggregate) -> AggregationSucceeded:
    ids = tuple(u.task_id for u in aggregate.updates)
    return AggregationSucceeded(now, aggregate.round, ids, {}, aggregate.aggregate_id)


def test_aggregates_every_k_updates_and_redispatches_on_report() -> None:
    strategy = make(rounds=2, buffer_size=2, min_accepted=2, task_deadline_s=None)
    strategy.handle(Started(0.0, ("a", "b", "c")))
    # a reports: buffered, and a trains again at once from the same (latest) version.
    assert strategy.handle(ok(1.0, "a-n0001", 3)) == [DispatchTask("a-n0002", "a", 0, 0, "train", 1, None)]
    out = strategy.handle(ok(2.0, "b-n0001", 4))
    assert out == [
        Aggregate(
            1,
            0,
            (UpdateChoice("a-n0001", "a", 3, 0), UpdateChoice("b-n0001", "b", 4, 0)),
            2,
            "agg-0001",
        ),
        DispatchTask("b-n0002", "b", 0, 0, "train", 1, None),
    ]
    first = of(Aggregate, out)[0]
    # While version 1 is being made, reports keep buffering; more than K may collect.
    strategy.handle(ok(3.0, "c-n0001", 5))
    strategy.handle(ok(4.0, "a-n0002", 6))
    strategy.handle(ok(5.0, "b-n0002", 7))
    out = strategy.handle(committed(6.0, first))
    second = of(Aggregate, out)[0]
    assert second.round == 2 and second.base_round == 1
    assert [(u.task_id, u.staleness) for u in second.updates] == [
        ("c-n0001", 1),
        ("a-n0002", 1),
        ("b-n0002", 1),
    ]
    out = strategy.handle(committed(7.0, second))
    assert of(CancelTask, out) == [
        CancelTask("c-n0002", "COMPLETED"),
        CancelTask("a-n0003", "COMPLETED"),
        CancelTask("b-n0003", "COMPLETED"),
    ]
    assert out[-1] == Finish("completed", "2 server updates aggregated")


def test_dispatches_after_a_version_train_from_it() -> None:
    strategy = make(rounds=3, buffer_size=1, task_deadline_s=None)
    strategy.handle(Started(0.0, ("a", "b")))
    first = of(Aggregate, strategy.handle(ok(1.0, "a-n0001")))[0]
    strategy.handle(committed(2.0, first))
    out = strategy.handle(ok(3.0, "b-n0001"))
    assert of(Aggregate, out)[0].updates == (UpdateChoice("b-n0001", "b", 10, 1),)
    assert of(DispatchTask, out) == [DispatchTask("b-n0002", "b", 1, 1, "train", 1, None)]


def test_stale_updates_are_dropped_before_aggregating() -> None:
    strategy = make(rounds=4, buffer_size=2, max_staleness=0, task_deadline_s=None)
    strategy.handle(Started(0.0, ("a", "b", "c")))
    strategy.handle(ok(1.0, "a-n0001"))
    first = of(Aggregate, strategy.handle(ok(2.0, "b-n0001")))[0]
    strategy.handle(ok(3.0, "c-n0001"))  # from version 0; version 1 is on its way
    out = strategy.handle(committed(4.0, first))
    assert [d.task_id for d in of(LogEntry, out)] == ["c-n0001"]
    assert of(Aggregate, out) == []


def test_stop() -> None:
    strategy = make(rounds=2, buffer_size=2, task_deadline_s=None)
    strategy.handle(Started(0.0, ("a",)))
    out = strategy.handle(StopRequested(1.0, "enough"))
    assert out == [CancelTask("a-n0001", "STOPPED"), Finish("stopped", "enough")]
    assert strategy.done
