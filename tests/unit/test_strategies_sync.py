"""Scenario tests for the synchronous strategy: rounds, quorum, deadlines, retries, sites."""

from __future__ import annotations

import json
from typing import Any

import pytest

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
    SnapshotError,
    Started,
    StopRequested,
    SyncConfig,
    SyncStrategy,
    TaskFailed,
    TaskSucceeded,
    TimerFired,
    UpdateChoice,
)


def make(**fields: Any) -> SyncStrategy:
    return SyncStrategy(SyncConfig(**fields))


def of(kind: type[Any], decisions: list[Decision]) -> list[Any]:
    return [d for d in decisions if isinstance(d, kind)]


def dispatched(decisions: list[Decision]) -> list[str]:
    return [d.task_id for d in of(DispatchTask, decisions)]


def ok(now: float, task_id: str, samples: int = 10) -> TaskSucceeded:
    site = task_id.split("-", 1)[1].rsplit("-a", 1)[0]
    return TaskSucceeded(now, task_id, site, samples, {"loss": 0.1})


def fail(now: float, task_id: str, code: str = "TRAINER_CRASHED") -> TaskFailed:
    site = task_id.split("-", 1)[1].rsplit("-a", 1)[0]
    return TaskFailed(now, task_id, site, code, "boom")


def committed(now: float, aggregate: Aggregate) -> AggregationSucceeded:
    ids = tuple(u.task_id for u in aggregate.updates)
    return AggregationSucceeded(now, aggregate.round, ids, {}, aggregate.aggregate_id)


def test_happy_path_runs_every_round_and_completes() -> None:
    strategy = make(rounds=3, round_deadline_s=100.0)
    out = strategy.handle(Started(0.0, ("site-a", "site-b")))
    assert out == [
        DispatchTask("r0001-site-a-a1", "site-a", 1, 0, "train", 1, 100.0),
        DispatchTask("r0001-site-b-a1", "site-b", 1, 0, "train", 1, 100.0),
        SetTimer("deadline-r0001-t0", 100.0),
    ]
    for round_ in (1, 2, 3):
        start = 10.0 * round_
        a, b = f"r{round_:04d}-site-a-a1", f"r{round_:04d}-site-b-a1"
        assert strategy.handle(ok(start + 1, a, 5)) == []
        out = strategy.handle(ok(start + 2, b, 7))
        aggregate = Aggregate(
            round_,
            round_ - 1,
            (UpdateChoice(a, "site-a", 5, 0), UpdateChoice(b, "site-b", 7, 0)),
            1,
            f"agg-{round_:04d}",
        )
        # Everyone reported: aggregate at once, no need to wait for the deadline.
        assert out == [CancelTimer(f"deadline-r{round_:04d}-t0"), aggregate]
        assert strategy.completed_rounds == round_ - 1
        out = strategy.handle(committed(start + 3, aggregate))
        assert strategy.completed_rounds == round_
        if round_ < 3:
            assert dispatched(out) == [f"r{round_ + 1:04d}-site-a-a1", f"r{round_ + 1:04d}-site-b-a1"]
            assert {d.base_round for d in of(DispatchTask, out)} == {round_}
    assert out == [Finish("completed", "3 rounds aggregated")]
    assert strategy.done
    assert strategy.handle(ok(100.0, "r0003-site-a-a1")) == []


def test_quorum_at_deadline_aggregates_and_cancels_the_straggler() -> None:
    strategy = make(rounds=2, min_sites=2, round_deadline_s=60.0)
    strategy.handle(Started(0.0, ("a", "b", "c")))
    strategy.handle(ok(5.0, "r0001-a-a1"))
    strategy.handle(ok(6.0, "r0001-b-a1"))
    out = strategy.handle(TimerFired(60.0, "deadline-r0001-t0"))
    assert out[0] == CancelTask("r0001-c-a1", "DEADLINE_EXCEEDED")
    aggregate = out[1]
    assert isinstance(aggregate, Aggregate)
    assert [u.site for u in aggregate.updates] == ["a", "b"]
    assert not of(CancelTimer, out)  # the timer fired: nothing to cancel
    # The straggler's late result changes nothing.
    assert strategy.handle(ok(61.0, "r0001-c-a1")) == []
    assert strategy.handle(fail(61.0, "r0001-c-a1")) == []
    out = strategy.handle(committed(62.0, aggregate))
    assert dispatched(out) == ["r0002-a-a1", "r0002-b-a1", "r0002-c-a1"]


def test_failed_task_is_retried_at_the_same_site_while_time_remains() -> None:
    strategy = make(rounds=1, round_deadline_s=60.0, max_task_retries=2)
    strategy.handle(Started(0.0, ("a", "b")))
    out = strategy.handle(fail(5.0, "r0001-a-a1", "DISPATCH_FAILED"))
    assert out == [DispatchTask("r0001-a-a2", "a", 1, 0, "train", 2, 60.0)]
    assert dispatched(strategy.handle(fail(6.0, "r0001-a-a2"))) == ["r0001-a-a3"]
    # Retries used up: the site is done for this round, the round waits for b.
    assert strategy.handle(fail(7.0, "r0001-a-a3")) == []
    out = strategy.handle(ok(8.0, "r0001-b-a1"))
    aggregate = of(Aggregate, out)[0]
    assert [u.task_id for u in aggregate.updates] == ["r0001-b-a1"]


def test_no_retry_after_the_deadline() -> None:
    strategy = make(rounds=1, round_deadline_s=60.0, max_task_retries=3)
    strategy.handle(Started(0.0, ("a", "b")))
    strategy.handle(ok(5.0, "r0001-b-a1"))
    out = strategy.handle(fail(61.0, "r0001-a-a1", "DEADLINE_EXCEEDED"))
    assert dispatched(out) == []
    assert of(Aggregate, out)  # everything has finished


def test_round_missing_quorum_is_rerun_then_the_experiment_fails() -> None:
    strategy = make(rounds=3, min_sites=2, round_deadline_s=50.0, max_round_retries=1, max_task_retries=0)
    strategy.handle(Started(0.0, ("a", "b")))
    strategy.handle(ok(1.0, "r0001-a-a1"))
    out = strategy.handle(TimerFired(50.0, "deadline-r0001-t0"))
    assert out[0] == CancelTask("r0001-b-a1", "DEADLINE_EXCEEDED")
    assert isinstance(out[1], LogEntry) and out[1].kind == "round_retried"
    # Same round, same base; attempts continue so no task id repeats; a new timer id.
    assert out[2:] == [
        DispatchTask("r0001-a-a2", "a", 1, 0, "train", 2, 100.0),
        DispatchTask("r0001-b-a2", "b", 1, 0, "train", 2, 100.0),
        SetTimer("deadline-r0001-t1", 100.0),
    ]
    strategy.handle(fail(60.0, "r0001-a-a2"))
    out = strategy.handle(fail(61.0, "r0001-b-a2"))
    assert out[0] == CancelTimer("deadline-r0001-t1")
    assert isinstance(out[-1], Finish) and out[-1].state == "failed"
    assert "round 1 failed after 2 run(s)" in out[-1].reason
    assert strategy.done


def test_aggregation_failure_reruns_the_round() -> None:
    strategy = make(rounds=1, round_deadline_s=50.0, max_round_retries=1)
    strategy.handle(Started(0.0, ("a",)))
    aggregate = of(Aggregate, strategy.handle(ok(1.0, "r0001-a-a1")))[0]
    out = strategy.handle(AggregationFailed(2.0, 1, "0 accepted < 1", aggregate.aggregate_id))
    assert dispatched(out) == ["r0001-a-a2"]
    # A duplicate of that failure, or of anything older, is ignored.
    assert strategy.handle(AggregationFailed(3.0, 1, "0 accepted < 1", aggregate.aggregate_id)) == []
    second = of(Aggregate, strategy.handle(ok(4.0, "r0001-a-a2")))[0]
    assert second.aggregate_id == "agg-0002" and second.round == 1
    assert strategy.handle(AggregationFailed(5.0, 1, "stale", aggregate.aggregate_id)) == []
    out = strategy.handle(AggregationFailed(6.0, 1, "all rejected", second.aggregate_id))
    assert out == [Finish("failed", "round 1 failed after 2 run(s): aggregation failed: all rejected")]


def test_duplicate_aggregation_result_is_ignored() -> None:
    strategy = make(rounds=3, round_deadline_s=None)
    strategy.handle(Started(0.0, ("a",)))
    aggregate = of(Aggregate, strategy.handle(ok(1.0, "r0001-a-a1")))[0]
    assert dispatched(strategy.handle(committed(2.0, aggregate))) == ["r0002-a-a1"]
    assert strategy.handle(committed(3.0, aggregate)) == []
    # Without an id the round number still tells a duplicate apart.
    assert strategy.handle(AggregationSucceeded(3.0, 1, ("r0001-a-a1",))) == []
    assert strategy.completed_rounds == 1


def test_no_deadline_means_no_timer() -> None:
    strategy = make(rounds=1, round_deadline_s=None)
    out = strategy.handle(Started(0.0, ("a",)))
    assert out == [DispatchTask("r0001-a-a1", "a", 1, 0, "train", 1, None)]


def test_site_left_mid_round_counts_as_failed_and_settles_the_round() -> None:
    strategy = make(rounds=2, round_deadline_s=50.0)
    strategy.handle(Started(0.0, ("a", "b")))
    strategy.handle(ok(1.0, "r0001-a-a1"))
    out = strategy.handle(SiteLeft(2.0, "b"))
    assert out[0] == CancelTask("r0001-b-a1", "SITE_LEFT")
    assert of(Aggregate, out)[0].updates == (UpdateChoice("r0001-a-a1", "a", 10, 0),)
    assert strategy.handle(ok(3.0, "r0001-b-a1")) == []


def test_site_joined_mid_round_trains_from_the_next_round() -> None:
    strategy = make(rounds=2, round_deadline_s=50.0)
    strategy.handle(Started(0.0, ("a",)))
    assert strategy.handle(SiteJoined(1.0, "b")) == []
    assert strategy.handle(SiteJoined(1.5, "b")) == []  # a duplicate
    aggregate = of(Aggregate, strategy.handle(ok(2.0, "r0001-a-a1")))[0]
    out = strategy.handle(committed(3.0, aggregate))
    assert dispatched(out) == ["r0002-a-a1", "r0002-b-a1"]


def test_sites_per_round_rotates_deterministically() -> None:
    strategy = make(rounds=3, sites_per_round=2, round_deadline_s=None)
    out = strategy.handle(Started(0.0, ("a", "b", "c")))
    chosen = [sorted(d.site for d in of(DispatchTask, out))]
    for round_ in (1, 2):
        aggregate: Aggregate | None = None
        for task_id in dispatched(out):
            aggregate = next(iter(of(Aggregate, strategy.handle(ok(float(round_), task_id)))), aggregate)
        assert aggregate is not None
        out = strategy.handle(committed(float(round_), aggregate))
        chosen.append(sorted(d.site for d in of(DispatchTask, out)))
    assert chosen == [["a", "b"], ["a", "c"], ["b", "c"]]


def test_stop_cancels_tasks_and_timer_then_ignores_everything() -> None:
    strategy = make(rounds=2, round_deadline_s=50.0)
    strategy.handle(Started(0.0, ("a", "b")))
    strategy.handle(ok(1.0, "r0001-a-a1"))
    out = strategy.handle(StopRequested(2.0, "operator asked"))
    assert out == [
        CancelTask("r0001-b-a1", "STOPPED"),
        CancelTimer("deadline-r0001-t0"),
        Finish("stopped", "operator asked"),
    ]
    assert strategy.done
    assert strategy.handle(ok(3.0, "r0001-b-a1")) == []
    assert strategy.handle(StopRequested(4.0, "again")) == []


def test_stop_before_start_and_events_before_start() -> None:
    strategy = make()
    assert strategy.handle(TimerFired(0.0, "deadline-r0001-t0")) == []
    assert strategy.handle(StopRequested(1.0, "")) == [Finish("stopped", "stop requested")]


def test_final_evaluation_waits_for_every_site() -> None:
    strategy = make(rounds=1, round_deadline_s=None, final_evaluation=True, evaluation_deadline_s=30.0)
    strategy.handle(Started(0.0, ("a", "b")))
    strategy.handle(ok(1.0, "r0001-a-a1"))
    aggregate = of(Aggregate, strategy.handle(ok(2.0, "r0001-b-a1")))[0]
    out = strategy.handle(committed(3.0, aggregate))
    assert out == [
        DispatchTask("eval-r0001-a", "a", 1, 1, "evaluate", 1, 33.0),
        DispatchTask("eval-r0001-b", "b", 1, 1, "evaluate", 1, 33.0),
        SetTimer("deadline-eval-r0001", 33.0),
    ]
    assert strategy.handle(TaskSucceeded(4.0, "eval-r0001-a", "a", 100, {"accuracy": 0.9})) == []
    assert strategy.handle(TaskSucceeded(4.5, "eval-r0001-a", "a", 100, {})) == []  # duplicate
    out = strategy.handle(TaskFailed(5.0, "eval-r0001-b", "b", "TRAINER_CRASHED", "oom"))
    assert out == [
        CancelTimer("deadline-eval-r0001"),
        Finish("completed", "1 rounds aggregated; final evaluation on 1/2 sites"),
    ]


def test_final_evaluation_deadline_cancels_the_rest() -> None:
    strategy = make(rounds=1, round_deadline_s=None, final_evaluation=True, evaluation_deadline_s=30.0)
    strategy.handle(Started(0.0, ("a", "b")))
    strategy.handle(ok(1.0, "r0001-a-a1"))
    aggregate = of(Aggregate, strategy.handle(ok(2.0, "r0001-b-a1")))[0]
    strategy.handle(committed(3.0, aggregate))
    strategy.handle(TaskSucceeded(4.0, "eval-r0001-a", "a", 100, {"accuracy": 0.9}))
    out = strategy.handle(TimerFired(33.0, "deadline-eval-r0001"))
    assert out == [
        CancelTask("eval-r0001-b", "DEADLINE_EXCEEDED"),
        Finish("completed", "1 rounds aggregated; final evaluation on 1/2 sites"),
    ]


def test_snapshot_restores_through_json_mid_round() -> None:
    config = SyncConfig(rounds=2, min_sites=2, sites_per_round=2, round_deadline_s=60.0)
    original = SyncStrategy(config)
    original.handle(Started(0.0, ("a", "b", "c")))
    original.handle(fail(1.0, "r0001-a-a1"))
    restored = SyncStrategy.restore(config, json.loads(json.dumps(original.snapshot())))
    assert restored.snapshot() == original.snapshot()
    events = [ok(2.0, "r0001-a-a2"), ok(3.0, "r0001-b-a1")]
    for event in events:
        assert restored.handle(event) == original.handle(event)


def test_restore_refuses_another_strategys_snapshot() -> None:
    sync = make()
    with pytest.raises(SnapshotError, match="not 'fedasync'"):
        FedAsyncStrategy.restore(FedAsyncConfig(), sync.snapshot())
    with pytest.raises(SnapshotError, match="corrupt"):
        SyncStrategy.restore(SyncConfig(), {"strategy": "sync", "schema": 1, "state": {"phase": "bogus"}})
